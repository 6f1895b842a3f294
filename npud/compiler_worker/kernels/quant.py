"""Quantised kernels: QuantizeLinear/DequantizeLinear islands, fused QDQ binaries, dynamic
quantisation and the int8 MAC GEMM."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..errors import CompileError
from ..lowered import ESIZE, LOp, cstrides
from .base import ALIGN, I32, I8, T, Ctx, Emitter, Plan, al, choose_block, sub4
from .eltwise import broadcast_tiles, operand_slots, plan_eltwise


def plan_qelt(op: LOp, cx: Ctx):
    """QuantizeLinear/DequantizeLinear: element-wise with broadcast constant
    scale/zero-point operands (per-tensor or per-axis); planned like eltwise,
    with one extra 4-byte slot per element for the intermediate."""
    plan_eltwise(op, cx)
    n = len(op.plan.opshapes)
    bpe = ESIZE * (n + 2)
    block = choose_block(op.plan.cshape, bpe, cx.S - ALIGN * 8)
    op.plan = dataclasses.replace(op.plan, block=block, sram=bpe * math.prod(block))


def emit_qelt(op: LOp, em: Emitter):
    pl = op.plan
    cshape, block, opshapes = pl.cshape, pl.block, pl.opshapes
    slots, O0 = operand_slots(opshapes, block, ESIZE)
    E0 = O0 + al(math.prod(block) * ESIZE)
    out = em.pt[op.outs[0]]
    ost = cstrides(cshape)
    for origin, size, tin, ooff in broadcast_tiles(op, em, slots, opshapes, cshape, block):
        tshape = sub4(size)
        f32 = T(O0, tshape)
        if op.kind == "dequant":      # (float(x) - zp) * scale, as ONNX computes it
            em.vec("vunary", "COPY", tin[0], f32)
            em.vec("vbinary", "SUB", f32, tin[1], f32)
            em.vec("vbinary", "MUL", f32, tin[2], f32)
            em.store(O0, op.outs[0], ooff, tshape, sub4(ost))
            continue
        # quantise: saturate(round_half_even(x / scale) + zp), the division in float32
        em.vec("vbinary", "DIV", tin[0], tin[1], f32)
        if op.p["zp"] is not None:
            em.vec("requant", f32, T(E0, tshape, out.dtype), scale=1.0, zp=op.p["zp"])
            em.store(E0, op.outs[0], ooff, tshape, sub4(ost))
        else:                         # per-axis zero points: add them in int32, then saturate
            em.vec("requant", f32, T(E0, tshape, I32), scale=1.0, zp=0)
            em.vec("vbinary", "ADD", T(E0, tshape, I32), tin[2], T(O0, tshape, out.dtype))
            em.store(O0, op.outs[0], ooff, tshape, sub4(ost))


def plan_qbinary(op: LOp, cx: Ctx):
    """A fused QDQ binary: planned like eltwise, with 1-byte elements (the
    engine's float32 intermediates are not SRAM tiles)."""
    plan_eltwise(op, cx)
    bpe = 1 + len(op.plan.opshapes)
    block = choose_block(op.plan.cshape, bpe, cx.S - ALIGN * 8)
    op.plan = dataclasses.replace(op.plan, block=block, sram=bpe * math.prod(block) + ALIGN * 3)


def emit_qbinary(op: LOp, em: Emitter):
    pl, q = op.plan, op.p["q"]
    cshape, block, opshapes = pl.cshape, pl.block, pl.opshapes
    slots, O0 = operand_slots(opshapes, block, 1)
    ost = cstrides(cshape)
    odt = em.pt[op.outs[0]].dtype
    for origin, size, tin, ooff in broadcast_tiles(op, em, slots, opshapes, cshape, block):
        em.vec("qbinary", op.p["func"], tin[0], tin[1], T(O0, sub4(size), odt),
               a_scale=q["a_scale"], a_zp=q["a_zp"], b_scale=q["b_scale"], b_zp=q["b_zp"],
               y_scale=q["y_scale"], y_zp=q["y_zp"], lo=q["lo"], hi=q["hi"])
        em.store(O0, op.outs[0], ooff, sub4(size), sub4(ost))


@dataclass(frozen=True, kw_only=True)
class DynqPlan(Plan):
    """DynamicQuantizeLinear of all ``n`` elements in one tile (min/max need the whole tensor)."""
    n: int


def plan_dynq(op: LOp, cx: Ctx):
    n = cx.pt[op.ins[0]].numel
    need = al(n * 4) * 3 + ALIGN * 16
    if need > cx.S:
        raise CompileError(f"DynamicQuantizeLinear of {n} elements does not fit SRAM (the "
                           "whole tensor's min/max are needed at once)", node=op.node, op=op.op)
    op.plan = DynqPlan(n=n, sram=need)


def emit_dynq(op: LOp, em: Emitter):
    """ONNX DynamicQuantizeLinear (uint8): scale = (max(x,0) - min(x,0)) / 255,
    zp = saturate(round(-min(x,0) / scale)), y = saturate(round(x / scale) + zp)."""
    n = op.plan.n
    X, Y = 0, al(n * 4)
    S_ = Y + al(n * 4)                       # scalar slots, 64 bytes apart
    MX, MN, ZERO, K255, SC, ZP8, ZP32 = (S_ + ALIGN * i for i in range(7))
    one = (1, 1, 1, 1)
    xt = T(X, (1, 1, 1, n))
    em.load(X, op.ins[0], 0, (1, 1, 1, n), (n, n, n, 1))
    em.vec("reduce", "MAX", 0xF, xt, T(MX, one))
    em.vec("reduce", "MIN", 0xF, xt, T(MN, one))
    em.vec("fill", T(ZERO, one), 0.0)
    em.vec("fill", T(K255, one), 255.0)
    em.vec("vbinary", "MAX", T(MX, one), T(ZERO, one), T(MX, one))
    em.vec("vbinary", "MIN", T(MN, one), T(ZERO, one), T(MN, one))
    em.vec("vbinary", "SUB", T(MX, one), T(MN, one), T(SC, one))
    em.vec("vbinary", "DIV", T(SC, one), T(K255, one), T(SC, one))
    em.vec("vbinary", "SUB", T(ZERO, one), T(MN, one), T(MX, one))       # -min
    em.vec("vbinary", "DIV", T(MX, one), T(SC, one), T(MX, one))
    em.vec("requant", T(MX, one), T(ZP8, one, "uint8"), scale=1.0, zp=0)
    em.vec("vunary", "COPY", T(ZP8, one, "uint8"), T(ZP32, one, I32))
    # y: the tensor as [1,1,n,1] so the one-element zero-point vector is "per channel"
    col = (1, 1, n, 1)
    em.vec("vbinary", "DIV", T(X, col), T(SC, one), T(Y, col))
    em.vec("requant", T(Y, col), T(X, col, "uint8"), scale=1.0, zp_addr=ZP32)
    y, ys, yz = op.outs
    em.store(X, y, 0, (1, 1, 1, n), (n, n, n, 1))
    em.store(SC, ys, 0, one, (1, 1, 1, 1))
    em.store(ZP8, yz, 0, one, (1, 1, 1, 1))


@dataclass(frozen=True, kw_only=True)
class QMatmulPlan(Plan):
    """Int8 GEMM: ``bsz`` batches of ``m x k @ k x n`` in ``blk`` (m, n, k) tiles; ``rs``: a
    non-zero weight zero point (row sums needed); ``w``, ``bias``, ``scale``, ``zw``, ``ones`` consts."""
    m: int
    n: int
    k: int
    bsz: int
    batched_a: bool
    blk: dict
    rs: bool
    w: str
    bias: str
    scale: str | None
    zw: str | None
    ones: str | None
    layout: "QMatmulLayout"


@dataclass(frozen=True)
class QMatmulLayout:
    """SRAM addresses of one int8 GEMM tile's buffers: int8 operands ``a``, ``w``, int32
    accumulator ``acc``, requantised output ``o8``, ``bias``/``scale``/``zw`` vectors; with a
    non-zero weight zero point, the ``ones`` column, row sums ``rs`` and their product ``tmp``.
    ``sram``: their total."""
    a: int
    w: int
    acc: int
    o8: int
    bias: int
    scale: int
    zw: int
    ones: int
    rs: int
    tmp: int
    sram: int


def qmatmul_layout(blk: dict, rs: bool) -> QMatmulLayout:
    """The one SRAM layout of an int8 GEMM tile of ``blk`` (m, n, k); ``rs``: row sums needed."""
    mb, nb, kb = blk["m"], blk["n"], blk["k"]
    w = al(mb * kb)
    acc = w + al(kb * nb)
    o8 = acc + al(mb * nb * 4)
    bias = o8 + al(mb * nb)
    scale = bias + al(nb * 4)
    zw = scale + al(nb * 4)
    ones = zw + al(nb * 4)
    rsum = ones + al(kb)
    tmp = rsum + al(mb * 4)
    sram = tmp + al(mb * nb * 4) if rs else ones
    return QMatmulLayout(a=0, w=w, acc=acc, o8=o8, bias=bias, scale=scale, zw=zw, ones=ones, rs=rsum,
                         tmp=tmp, sram=sram)


def plan_qmatmul(op: LOp, cx: Ctx):
    """int8 MAC GEMM: a [.., M, K] int8/uint8 x w [K, N] (or [B, K, N]) int8 ->
    int32 (+ bias with the zero-point corrections) -> requant to int8/uint8."""
    q = op.p["q"]
    sa = op.p["a_shape"]
    w = np.asarray(q["w"])
    k, n = w.shape[-2], w.shape[-1]
    batched = w.ndim == 3
    bsz = w.shape[0] if batched else 1
    m = math.prod(sa[:-1]) // bsz
    za = int(q["x_zp"])
    zw = np.asarray(q["w_zp"], np.int64).reshape(n)
    w3 = w.reshape(bsz, k, n).astype(np.int64)
    # sum_k (a - za)(w - zw) = a.w - za sum_k w - zw sum_k a + K za zw
    bias = (np.asarray(q["bias"], np.int64).reshape(1, n) - za * w3.sum(axis=1) + k * za * zw)
    if np.any(np.abs(bias) >= 1 << 31):
        raise CompileError("int32 bias with zero-point corrections overflows", node=op.node, op=op.op)
    rs = bool(np.any(zw != 0))
    blk = {"m": m, "n": n, "k": k}
    budget = cx.S - ALIGN * 8
    while qmatmul_layout(blk, rs).sram > budget:
        key = max(("m", "n", "k"), key=lambda x: blk[x] * (2 if x == "k" else 1))
        if blk[key] == 1:
            raise CompileError("matmul tile does not fit SRAM", node=op.node, op=op.op)
        blk[key] = -(-blk[key] // 2)
    layout = qmatmul_layout(blk, rs)
    op.plan = QMatmulPlan(
        m=m, n=n, k=k, bsz=bsz, batched_a=len(sa) == 3 and batched, blk=blk, rs=rs,
        w=cx.add_const(op.node + ".w8", w.reshape(bsz, k, n), I8),
        bias=cx.add_const(op.node + ".bias32", bias.astype(np.int32), I32),
        scale=None if q["scale"] is None else cx.add_const(op.node + ".scale", q["scale"]),
        zw=cx.add_const(op.node + ".zw", zw.astype(np.int32), I32) if rs else None,
        ones=cx.add_const(op.node + ".ones", np.ones(blk["k"], np.int8), I8) if rs else None,
        layout=layout, sram=layout.sram)


def emit_qmatmul(op: LOp, em: Emitter):
    pl, q = op.plan, op.p["q"]
    m, n, k, bsz, blk = pl.m, pl.n, pl.k, pl.bsz, pl.blk
    mb, nb, kb = blk["m"], blk["n"], blk["k"]
    xdt = em.pt[op.ins[0]].dtype
    odt = em.pt[op.outs[0]].dtype
    lay = pl.layout
    A0, W0, ACC, O8, BIAS = lay.a, lay.w, lay.acc, lay.o8, lay.bias
    SC, ZW, ONES, RS, TMP = lay.scale, lay.zw, lay.ones, lay.rs, lay.tmp
    last_ones = None
    for b in range(bsz):
        for n0 in range(0, n, nb):
            ns = min(nb, n - n0)
            em.load(BIAS, pl.bias, b * n + n0, (ns,), (1,))
            if pl.scale:
                em.load(SC, pl.scale, n0, (ns,), (1,))
            if pl.rs:
                em.load(ZW, pl.zw, n0, (ns,), (1,))
            for m0 in range(0, m, mb):
                ms = min(mb, m - m0)
                acc = T(ACC, (ms, ns), I32)
                for k0 in range(0, k, kb):
                    ks = min(kb, k - k0)
                    arow = (b * m + m0) if bsz > 1 else m0
                    em.load(A0, op.ins[0], arow * k + k0, (ms, ks), (k, 1))
                    em.load(W0, pl.w, b * k * n + k0 * n + n0, (ks, ns), (n, 1))
                    at = T(A0, (ms, ks), xdt)
                    em.mac("matmul", at, T(W0, (ks, ns), I8), acc,
                           bias=BIAS if k0 == 0 else None, accumulate=k0 > 0)
                    if pl.rs:
                        if last_ones != ks:
                            em.load(ONES, pl.ones, 0, (ks, 1), (1, 1))
                            last_ones = ks
                        em.mac("matmul", at, T(ONES, (ks, 1), I8), T(RS, (ms, 1), I32),
                               accumulate=k0 > 0)
                if pl.rs:      # - zw[n] * sum_k a[m, k]
                    em.vec("vbinary", "MUL", T(RS, (ms, 1), I32), T(ZW, (1, ns), I32),
                           T(TMP, (ms, ns), I32))
                    em.vec("vbinary", "SUB", acc, T(TMP, (ms, ns), I32), acc)
                ooff = (b * m + m0) * n + n0
                if q["scale"] is None:          # MatMulInteger: the int32 accumulator
                    em.store(ACC, op.outs[0], ooff, (ms, ns), (n, 1))
                    continue
                em.vec("requant", acc, T(O8, (ms, ns), odt), scale_addr=SC, zp=q["y_zp"],
                       lo=q["lo"], hi=q["hi"])
                em.store(O8, op.outs[0], ooff, (ms, ns), (n, 1))
