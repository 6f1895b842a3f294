"""Pass 7: memory planning.

Device memory of one job is a set of page-aligned regions: the weights blob
(mapped read-only; cut into several regions when it is larger than the
device's largest buffer object, ``max_buffer_bytes``), the activation arena (read-write), one region per graph
input (read-only) and one per graph output (read-write).  Arena tensors get
offsets by liveness: a tensor is live from the first op that touches it to
the last, aliases (Reshape, Flatten...) extend their root's lifetime, and
tensors are placed largest first at the lowest offset that no
simultaneously live tensor occupies (greedy by size, as TFLite/Vela do).
"""

from __future__ import annotations

import numpy as np

from ..errors import CompileError
from ..lower_index import io_dtype

BASE_VA = 0x10_0000
VA_ALIGN = 0x1_0000          # 64 KiB: a multiple of every supported page size up to 64 KiB
GUARD = 0x1_0000             # an unmapped gap between regions turns overruns into page faults
TENSOR_ALIGN = 64


def _up(x, a):
    return -(-x // a) * a


def _weights_region_name(index: int) -> str:
    """The first weights region keeps its old name; the rest are numbered."""
    return "weights" if index == 0 else f"weights:{index}"


def _weights_blob(pt, limit: int) -> tuple[bytearray, dict, list[tuple[int, int]]]:
    """Every constant laid out in one blob, cut into parts (byte ranges of the blob) no larger
    than ``limit``, the device's largest buffer object: each part becomes a weights region of its
    own, loaded as a buffer of its own.  Returns the blob, {tensor: (part, offset in the part)}
    and the parts.  A single constant larger than ``limit`` cannot be split (one DMA reads it
    from one region) and is a CompileError naming it.

    The blob is laid out first and allocated once, and each constant is written into it in
    place: a ResNet-50's 100 MB were copied three more times (``tobytes``, the growing blob,
    the final ``bytes``), ~0.15 s of a cold compile."""
    woff, placed = {}, []
    parts = [[0, 0]]
    end = 0
    for name, t in pt.items():
        if t.kind != "const" or t.alias:
            continue
        dtype = np.dtype(t.dtype).newbyteorder("<")
        size = t.const.size * dtype.itemsize
        if size > limit:
            raise CompileError(f"constant {name!r} is {size} bytes, more than the device's largest "
                               f"buffer object (max_buffer_bytes = {limit})")
        start = parts[-1][0]
        if end + size - start > limit:
            parts[-1][1] = end
            parts.append([end, end])
            start = end
        woff[name] = (len(parts) - 1, end - start)
        placed.append((end, dtype, t.const))
        end = _up(end + size, TENSOR_ALIGN)
    parts[-1][1] = end
    blob = bytearray(end)
    for offset, dtype, const in placed:
        np.frombuffer(blob, dtype, const.size, offset).reshape(const.shape)[...] = const
    return blob, woff, [(a, b) for a, b in parts]


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
    blob, woff, wparts = _weights_blob(pt, ctx.config.max_buffer_bytes)
    regions = []
    va = BASE_VA

    def region(name, kind, size, writable, **extra):
        nonlocal va
        r = {"name": name, "kind": kind, "va": va, "size": int(size), "writable": writable, **extra}
        regions.append(r)
        va = _up(va + max(size, 1), VA_ALIGN) + GUARD
        return r

    wregs = [region(_weights_region_name(i), "weights", end - start, False, offset=start)
             for i, (start, end) in enumerate(wparts)]
    areg = region("arena", "arena", arena_size, True)
    io_in, io_out = [], []
    declared = ctx.graph.meta.get("declared", {})   # import_onnx.declared_dims, by graph input/output
    for name, pname in ctx.io["inputs"]:
        t = pt[pname]
        r = region(f"input:{name}", "input", t.nbytes, False, tensor=name)
        t.va = r["va"]
        io_in.append({"name": name, "dtype": io_dtype(ctx.graph.tensors[name].dtype),
                      "shape": list(t.shape if t.logical is None else t.logical),
                      "va": r["va"], "size": t.nbytes, **declared.get(name, {})})
    for oname, pname in ctx.io["outputs"]:
        t = pt[root(pname)]
        r = region(f"output:{oname}", "output", t.nbytes, True, tensor=oname)
        t.va = r["va"]
        g = ctx.graph.tensors[oname]
        shape = pt[pname].shape if pt[pname].logical is None else pt[pname].logical   # a scalar's logical shape is ()
        io_out.append({"name": oname, "dtype": io_dtype(g.dtype if g.const is None else g.const.dtype),
                       "shape": list(shape), "va": r["va"], "size": t.nbytes, **declared.get(oname, {})})
    for name, t in pt.items():
        r = root(name)
        rt = pt[r]
        if rt.kind == "const":
            part, off = woff[r]
            rt.va = wregs[part]["va"] + off
        elif rt.kind == "arena":
            rt.va = areg["va"] + offsets.get(r, 0)
        t.va = rt.va
    ctx.weights = blob   # not copied into bytes: to_bytes reads it as it is
    ctx.memory = {"regions": regions, "arena_bytes": arena_size, "naive_bytes": naive,
                  "weights_bytes": len(blob), "tensors": len(items)}
    ctx.io_table = {"inputs": io_in, "outputs": io_out}
