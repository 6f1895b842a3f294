"""Kernels of the index family: ``gather`` (ONNX Gather with indices computed at run time)
as ``dma_gather`` commands.

A gather LOp reads table ``ins[0]`` (any dtype, contiguous, viewed as ``[outer, rows, row]``)
by the int32 indices ``ins[1]`` (``n`` of them) into ``outs[0]`` (``[outer, n, row]``).  Each
tile loads a chunk of indices into SRAM and gathers a block of outer slices for them straight
from device memory: the table never passes through SRAM whole, so a vocabulary of any size
is looked up in place.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CompileError
from ..lowered import LOp
from .base import ALIGN, I32, Ctx, Emitter, Plan, T, al


@dataclass(frozen=True, kw_only=True)
class GatherPlan(Plan):
    """``chunk`` indices x ``outer_block`` outer slices per tile."""
    chunk: int
    outer_block: int


def _gather_sram(ob: int, c: int, row: int, esize: int) -> int:
    """SRAM bytes of one gather tile: ``c`` indices, then ``ob * c`` gathered rows."""
    return al(c * 4) + ob * c * row * esize


def plan_gather(op: LOp, cx: Ctx):
    """Index chunks (and outer blocks) whose gathered rows fit SRAM; a single table row that
    does not fit is a CompileError naming its size."""
    outer, row, n = op.p["outer"], op.p["row"], op.p["n"]
    es = cx.pt[op.ins[0]].esize
    budget = cx.S - ALIGN
    if _gather_sram(1, 1, row, es) > budget:
        raise CompileError(f"a gathered row of {row} elements does not fit SRAM ({cx.S} bytes)")
    c = n
    while c > 1 and _gather_sram(1, c, row, es) > budget:
        c = -(-c // 2)
    ob = outer
    while ob > 1 and _gather_sram(ob, c, row, es) > budget:
        ob = -(-ob // 2)
    op.plan = GatherPlan(chunk=c, outer_block=ob, sram=_gather_sram(ob, c, row, es))


def emit_gather(op: LOp, em: Emitter):
    outer, rows, row, n = op.p["outer"], op.p["rows"], op.p["row"], op.p["n"]
    c, ob = op.plan.chunk, op.plan.outer_block
    table, idx, out = op.ins[0], op.ins[1], op.outs[0]
    dt = em.pt[table].dtype
    es = em.pt[table].esize
    data = al(c * 4)
    for j0 in range(0, n, c):
        cs = min(c, n - j0)
        em.load(0, idx, j0, (cs,), (1,))
        for o0 in range(0, outer, ob):
            os_ = min(ob, outer - o0)
            em._q("dma")
            em.sb.dma_gather(data, em.va(table, o0 * rows * row), dt, T(0, (cs,), I32),
                             rows=rows, row=row, row_stride=row * es, outer=os_,
                             outer_stride=rows * row * es)
            em.dma_bytes += os_ * cs * row * es
            em.store(data, out, (o0 * n + j0) * row, (os_, cs, row), (n * row, row, 1))
