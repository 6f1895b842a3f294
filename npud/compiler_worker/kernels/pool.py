"""Pooling (max/average, global) in bands of output rows x channel blocks."""

from __future__ import annotations

from dataclasses import dataclass

from npud.emulator.isa import tile as mk_tile

from ..errors import CompileError
from ..lowered import LOp, cstrides
from .base import ALIGN, Ctx, Emitter, Plan, al, band_rows, pad4


# --- pooling -----------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class PoolPlan(Plan):
    """Pooling: ``cb`` channels x ``ohb`` output rows per tile (global pooling: 1 row)."""
    cb: int
    ohb: int
    layout: "PoolLayout"


@dataclass(frozen=True)
class PoolLayout:
    """SRAM addresses of one pooling tile: the input band ``x`` and the output ``out``;
    ``sram`` their (unpadded) total."""
    x: int
    out: int
    sram: int


def pool_layout(p: dict, H: int, W: int, OW: int, cb: int, ohb: int) -> PoolLayout:
    """The one SRAM layout of a pooling tile of ``cb`` channels x ``ohb`` output rows (global
    pooling: the whole ``H x W`` plane in, one pixel out)."""
    if p["global"]:
        return PoolLayout(x=0, out=al(H * W * cb * 4), sram=(H * W + 1) * cb * 4)
    band = band_rows(ohb, p["stride"][0], 1, p["kernel"][0]) * W * cb * 4
    return PoolLayout(x=0, out=al(band), sram=band + ohb * OW * cb * 4)


def plan_pool(op: LOp, cx: Ctx):
    p = op.p
    x = cx.pt[op.ins[0]]
    N, H, W, C = x.shape
    _, OH, OW, _ = cx.pt[op.outs[0]].shape
    kh, kw = p["kernel"]
    S = cx.S - ALIGN * 4
    if p["global"]:
        cb = max(1, min(C, S // ((H * W + 1) * 4)))
        if H * W * 4 * 2 > S:
            raise CompileError(f"global pooling over {H}x{W} does not fit SRAM", node=op.node, op=op.op)
        layout = pool_layout(p, H, W, OW, cb, 1)
        op.plan = PoolPlan(cb=cb, ohb=1, layout=layout, sram=layout.sram)
        return
    pt_, pl_, pb_, pr_ = p["pads"]
    eh, ew = p["extra"]
    if pb_ + eh >= kh or pr_ + ew >= kw:
        raise CompileError("ceil_mode padding reaches a whole window", node=op.node, op=op.op)
    best = None
    for cb in sorted({max(1, -(-C // d)) for d in (1, 2, 4, 8, 16, 32, 64, 128)}, reverse=True):
        for ohb in range(OH, 0, -1) if OH <= 64 else sorted({max(1, -(-OH // d)) for d in range(1, 257)},
                                                             reverse=True):
            if pool_layout(p, H, W, OW, cb, ohb).sram + ALIGN * 2 <= S:
                best = (cb, ohb)
                break
        if best:
            break
    if best is None:
        raise CompileError("pooling does not fit SRAM", node=op.node, op=op.op)
    cb, ohb = best
    layout = pool_layout(p, H, W, OW, cb, ohb)
    op.plan = PoolPlan(cb=cb, ohb=ohb, layout=layout, sram=layout.sram)


def emit_pool(op: LOp, em: Emitter):
    p, pl = op.p, op.plan
    x = em.pt[op.ins[0]]
    N, H, W, C = x.shape
    _, OH, OW, _ = em.pt[op.outs[0]].shape
    kh, kw = p["kernel"]
    sh, sw = p["stride"]
    pt_, pl_, pb_, pr_ = p["pads"]
    eh, ew = p["extra"]
    cb, ohb = pl.cb, pl.ohb
    xst = cstrides(x.shape)
    dt = x.dtype

    def T(dtype, addr, shape):
        return mk_tile(addr, dtype, pad4(shape))
    ost = cstrides((N, OH, OW, C))
    X0, O0 = pl.layout.x, pl.layout.out
    for n in range(N):
        for c0 in range(0, C, cb):
            cs = min(cb, C - c0)
            if p["global"]:
                em.load(X0, op.ins[0], n * xst[0] + c0, (1, H, W, cs), xst)
                em.pool(p["func"], T(dt, X0, (1, H, W, cs)), T(dt, O0, (1, 1, 1, cs)), kernel=(H, W))
                em.store(O0, op.outs[0], n * ost[0] + c0, (1, 1, 1, cs), ost)
                continue
            for o0 in range(0, OH, ohb):
                o1 = min(OH, o0 + ohb)
                r0 = o0 * sh - pt_
                r1 = (o1 - 1) * sh - pt_ + kh
                lo, hi = max(r0, 0), min(r1, H)
                xs = (1, hi - lo, W, cs)
                em.load(X0, op.ins[0], n * xst[0] + lo * xst[1] + c0, xs, xst)
                tsh = (1, o1 - o0, OW, cs)
                em.pool(p["func"], T(dt, X0, xs), T(dt, O0, tsh), kernel=(kh, kw), stride=(sh, sw),
                        pad=(lo - r0, r1 - hi, pl_, pr_ + ew),
                        count_include_pad=bool(p["count_include_pad"]))
                em.store(O0, op.outs[0], n * ost[0] + o0 * ost[1] + c0, tsh, ost)
