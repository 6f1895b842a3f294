"""Pass 7: memory planning.

Device memory of one job is a set of page-aligned regions: the weights blob
(mapped read-only), the activation arena (read-write), one region per graph
input (read-only) and one per graph output (read-write).  Arena tensors get
offsets by liveness: a tensor is live from the first op that touches it to
the last, aliases (Reshape, Flatten...) extend their root's lifetime, and
tensors are placed largest first at the lowest offset that no
simultaneously live tensor occupies (greedy by size, as TFLite/Vela do).
"""

from __future__ import annotations

import numpy as np

from ..lower_index import io_dtype

BASE_VA = 0x10_0000
VA_ALIGN = 0x1_0000          # 64 KiB: a multiple of every supported page size up to 64 KiB
GUARD = 0x1_0000             # an unmapped gap between regions turns overruns into page faults
TENSOR_ALIGN = 64


def _up(x, a):
    return -(-x // a) * a


def run(ctx) -> None:
    pt, lops = ctx.ptensors, ctx.lops

    def root(n):
        while pt[n].alias:
            n = pt[n].alias
        return n

    first, last = {}, {}
    for i, op in enumerate(lops):
        for t in list(op.ins) + list(op.outs):
            r = root(t)
            first.setdefault(r, i)
            last[r] = i
    # arena placement, largest first
    items = [r for r in first if pt[r].kind == "arena"]
    items.sort(key=lambda r: (-pt[r].nbytes, first[r]))
    placed = []   # (offset, end, first, last)
    offsets = {}
    for r in items:
        size = _up(pt[r].nbytes, TENSOR_ALIGN)
        lo, hi = first[r], last[r]
        conflicts = sorted((o, e) for o, e, f, l in placed if not (l < lo or f > hi))
        off = 0
        for o, e in conflicts:
            if off + size <= o:
                break
            off = max(off, e)
        offsets[r] = off
        placed.append((off, off + size, lo, hi))
    arena_size = max((e for _, e, _, _ in placed), default=0)
    naive = sum(_up(pt[r].nbytes, TENSOR_ALIGN) for r in items)
    # weights blob
    blob = bytearray()
    woff = {}
    for name, t in pt.items():
        if t.kind == "const" and not t.alias:
            woff[name] = len(blob)
            data = t.const.astype(np.dtype(t.dtype).newbyteorder("<"), copy=False).tobytes()
            blob += data
            blob += bytes(_up(len(blob), TENSOR_ALIGN) - len(blob))
    regions = []
    va = BASE_VA

    def region(name, kind, size, writable, **extra):
        nonlocal va
        r = {"name": name, "kind": kind, "va": va, "size": int(size), "writable": writable, **extra}
        regions.append(r)
        va = _up(va + max(size, 1), VA_ALIGN) + GUARD
        return r

    wreg = region("weights", "weights", len(blob), False)
    areg = region("arena", "arena", arena_size, True)
    io_in, io_out = [], []
    for name, pname in ctx.io["inputs"]:
        t = pt[pname]
        r = region(f"input:{name}", "input", t.nbytes, False, tensor=name)
        t.va = r["va"]
        io_in.append({"name": name, "dtype": io_dtype(ctx.graph.tensors[name].dtype), "shape": list(t.shape if t.logical is None else t.logical),
                      "va": r["va"], "size": t.nbytes})
    for oname, pname in ctx.io["outputs"]:
        t = pt[root(pname)]
        r = region(f"output:{oname}", "output", t.nbytes, True, tensor=oname)
        t.va = r["va"]
        g = ctx.graph.tensors[oname]
        io_out.append({"name": oname, "dtype": io_dtype(g.dtype if g.const is None else g.const.dtype), "shape": list(pt[pname].shape if pt[pname].logical is None else pt[pname].logical),
                       "va": r["va"], "size": t.nbytes})
    for name, t in pt.items():
        r = root(name)
        rt = pt[r]
        if rt.kind == "const":
            rt.va = wreg["va"] + woff[r]
        elif rt.kind == "arena":
            rt.va = areg["va"] + offsets.get(r, 0)
        t.va = rt.va
    ctx.weights = bytes(blob)
    ctx.memory = {"regions": regions, "arena_bytes": arena_size, "naive_bytes": naive,
                  "weights_bytes": len(blob), "tensors": len(items)}
    ctx.io_table = {"inputs": io_in, "outputs": io_out}
