"""Element-wise kernels (binary, unary, select with broadcasting and fused epilogues), strided
copies, fills and exact dtype conversions (cvt)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..lowered import ESIZE, LOp, cstrides
from .base import (ALIGN, F32, T, Ctx, Emitter, Plan, al, choose_block, collapse, emit_epilogue,
                   epi_slots, sub4, tiles)


# --- element-wise ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class EltwisePlan(Plan):
    """Broadcasting element-wise: the op collapsed to ``cshape`` (each operand's ``opshapes``,
    1 where it broadcasts), walked in ``block`` tiles."""
    cshape: list
    opshapes: list
    block: list


def plan_eltwise(op: LOp, cx: Ctx):
    out = cx.pt[op.outs[0]]
    nmain = op.p.get("nmain") or {"unary": 1, "select": 3}.get(op.kind, 2)
    mains = op.ins[:nmain]
    oshape = out.shape
    shapes = [cx.pt[m].shape for m in mains]
    steps = op.p.get("epilogue", [])
    # collapse: per dim, which operands are full there
    sig = []
    for d, o in enumerate(oshape):
        sig.append(tuple(s[d] == o and o != 1 for s in shapes))
    groups = []
    for d, o in enumerate(oshape):
        if o == 1:
            continue
        if groups and groups[-1][1] == sig[d]:
            groups[-1][0] *= o
        else:
            groups.append([o, sig[d]])
    if not groups:
        groups = [[1, tuple(True for _ in shapes)]]
    cshape = [g[0] for g in groups]
    opshapes = [[g[0] if g[1][k] else 1 for g in groups] for k in range(len(shapes))]
    # every operand's slot may be as large as the block (a broadcast operand is
    # only smaller along its size-1 dims), so count them all
    bpe = ESIZE * (1 + len(opshapes) + epi_slots(steps))
    block = choose_block(cshape, bpe, cx.S - ALIGN * 8)
    op.plan = EltwisePlan(cshape=cshape, opshapes=opshapes, block=block, sram=bpe * math.prod(block))


def operand_slots(opshapes, block, esize: int) -> tuple[list[int], int]:
    """SRAM slots for the operands of a broadcasting element-wise op (a broadcast dimension
    takes one element of the block); their addresses and the first free address after them."""
    slots, addr = [], 0
    for s in opshapes:
        slots.append(addr)
        addr += al(math.prod(b if x != 1 else 1 for b, x in zip(block, s)) * esize)
    return slots, addr


def broadcast_tiles(op: LOp, em: Emitter, slots: list[int], opshapes, cshape, block,
                     native: bool = True):
    """Walk ``cshape`` in ``block`` tiles, loading each operand's part of the tile into its slot
    (an operand broadcast along the walk is loaded once, not per tile).  Yields the tile's
    origin, size, operand tiles and the output offset.  Operand tiles have their tensor's element
    type (``native``) or float32, as the float element-wise kernels read them."""
    ost = cstrides(cshape)
    last = [None] * len(opshapes)
    for origin, size in tiles(cshape, block):
        operands = []
        for k, (name, s) in enumerate(zip(op.ins, opshapes)):
            st = cstrides(s)
            off = sum(o * t for o, t, x in zip(origin, st, s) if x != 1)
            ts = sub4([z if x != 1 else 1 for z, x in zip(size, s)])
            if last[k] != (off, tuple(ts)):
                em.load(slots[k], name, off, ts, sub4(st))
                last[k] = (off, tuple(ts))
            operands.append(T(slots[k], ts, em.pt[name].dtype if native else F32))
        yield origin, size, operands, sum(o * t for o, t in zip(origin, ost))


def emit_eltwise(op: LOp, em: Emitter):
    pl = op.plan
    cshape, block = pl.cshape, pl.block
    opshapes = pl.opshapes
    slots, out_addr = operand_slots(opshapes, block, ESIZE)
    ep_slot = out_addr + al(math.prod(block) * ESIZE)
    steps = op.p.get("epilogue", [])
    ost = cstrides(cshape)
    native = op.p.get("native", False)   # integer or mixed operands (lower_index.py)
    odt = em.pt[op.outs[0]].dtype if native else F32
    for origin, size, tiles_in, ooff in broadcast_tiles(op, em, slots, opshapes, cshape, block, native=native):
        tshape = sub4(size)
        ot = T(out_addr, tshape, odt)
        if op.kind == "unary":
            em.vec("vunary", op.p["func"], tiles_in[0], ot, op.p.get("p0", 0.0), op.p.get("p1", 0.0))
        elif op.kind == "select":
            em.vec("select", tiles_in[0], tiles_in[1], tiles_in[2], ot)
        else:
            em.vec("vbinary", op.p["func"], tiles_in[0], tiles_in[1], ot)
        emit_epilogue(em, steps, out_addr, tshape, ep_slot,
                      lambda name, sl: em.load(sl, name, ooff, tshape, sub4(ost)))
        em.store(out_addr, op.outs[0], ooff, tshape, sub4(ost))


# --- copies -------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class CopyPlan(Plan):
    """Per strided copy: (src, src offset, src strides, dst, dst offset, dst strides, collapsed
    shape, block)."""
    copies: list


@dataclass(frozen=True, kw_only=True)
class ChunkPlan(Plan):
    """A dense tensor of ``n`` elements in ``chunk``-element pieces (fill, cvt)."""
    chunk: int
    n: int


def plan_copy(op: LOp, cx: Ctx):
    plans = []
    for (src, soff, sst, dst, doff, dst_st, shape) in op.p["copies"]:
        cshape, (cs, cd) = collapse(shape, sst, dst_st)
        block = choose_block(cshape, ESIZE, cx.S - ALIGN)
        plans.append((src, soff, cs, dst, doff, cd, cshape, block))
    op.plan = CopyPlan(copies=plans, sram=max((math.prod(p[7]) * ESIZE for p in plans), default=0))


def emit_copy(op: LOp, em: Emitter):
    for (src, soff, cs, dst, doff, cd, cshape, block) in op.plan.copies:
        for origin, size in tiles(cshape, block):
            so = soff + sum(o * s for o, s in zip(origin, cs))
            do = doff + sum(o * s for o, s in zip(origin, cd))
            ts = sub4(size)
            em.load(0, src, so, ts, sub4(cs))
            em.store(0, dst, do, ts, sub4(cd))


def plan_fill(op: LOp, cx: Ctx):
    n = cx.pt[op.outs[0]].numel
    chunk = min(n, (cx.S - ALIGN) // ESIZE)
    op.plan = ChunkPlan(chunk=chunk, n=n, sram=chunk * ESIZE)


def emit_fill(op: LOp, em: Emitter):
    chunk, n = op.plan.chunk, op.plan.n
    em.vec("fill", T(0, (chunk,), em.pt[op.outs[0]].dtype), float(op.p["value"]))
    for o in range(0, n, chunk):
        c = min(chunk, n - o)
        em.store(0, op.outs[0], o, (c,), (1,))


def plan_cvt(op: LOp, cx: Ctx):
    n = cx.pt[op.outs[0]].numel
    chunk = max(1, min(n, (cx.S - ALIGN * 4) // (ESIZE * 2)))
    op.plan = ChunkPlan(chunk=chunk, n=n, sram=chunk * ESIZE * 2)


def emit_cvt(op: LOp, em: Emitter):
    """Exact dtype conversion of a dense tensor (integer graph inputs/outputs)."""
    chunk, n = op.plan.chunk, op.plan.n
    src, dst = em.pt[op.ins[0]], em.pt[op.outs[0]]
    O0 = al(chunk * ESIZE)
    for o in range(0, n, chunk):
        c = min(chunk, n - o)
        em.load(0, op.ins[0], o, (c,), (1,))
        em.vec("vunary", "COPY", T(0, (c,), src.dtype), T(O0, (c,), dst.dtype))
        em.store(O0, op.outs[0], o, (c,), (1,))
