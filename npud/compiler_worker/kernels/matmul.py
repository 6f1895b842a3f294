"""Float GEMM (MatMul, Gemm) in batch/M/N/K blocks, with fused bias and epilogue."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CompileError
from ..lowered import LOp, cstrides
from .base import ALIGN, T, Ctx, Emitter, Plan, al, emit_epilogue, epi_slots


# --- matmul -----------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class MatmulPlan(Plan):
    """Float GEMM: batch dims collapsed to ``B`` (2 of them; ``af``/``bf``: whether A/B are full
    along each), ``m x k @ k x n``, tiled in ``blk`` (b0, b1, m, n, k); ``bias`` a const or None."""
    B: list
    af: list
    bf: list
    m: int
    n: int
    k: int
    blk: dict
    bias: str | None
    layout: "MatmulLayout"


@dataclass(frozen=True)
class MatmulLayout:
    """SRAM addresses of one float GEMM tile's buffers: operands ``a`` and ``w``, output ``out``
    (accumulated over K blocks), ``bias`` vector, epilogue operand ``epi``; ``sram`` their total."""
    a: int
    w: int
    out: int
    bias: int
    epi: int
    sram: int


def matmul_layout(blk: dict, af, bf, nres: int) -> MatmulLayout:
    """The one SRAM layout of a float GEMM tile of ``blk`` (b0, b1, m, n, k); ``af``/``bf``: whether
    A/B are full along each batch dim (else broadcast: one slice); ``nres`` epilogue slots."""
    ab = (blk["b0"] if af[0] else 1) * (blk["b1"] if af[1] else 1)
    wb = (blk["b0"] if bf[0] else 1) * (blk["b1"] if bf[1] else 1)
    ob = blk["b0"] * blk["b1"]
    a_sz = al(ab * blk["m"] * blk["k"] * 4)
    w_sz = al(wb * blk["k"] * blk["n"] * 4)
    o_sz = al(ob * blk["m"] * blk["n"] * 4)
    bias = a_sz + w_sz + o_sz
    epi = bias + al(blk["n"] * 4)
    return MatmulLayout(a=0, w=a_sz, out=a_sz + w_sz, bias=bias, epi=epi, sram=epi + o_sz * nres)


def plan_matmul(op: LOp, cx: Ctx):
    p = op.p
    sa, sb = list(p["a_shape"]), list(p["b_shape"])
    m, k = sa[-2], sa[-1]
    n = sb[-1]
    ba, bb = sa[:-2], sb[:-2]
    r = max(len(ba), len(bb))
    ba = [1] * (r - len(ba)) + ba
    bb = [1] * (r - len(bb)) + bb
    bo = [max(x, y) for x, y in zip(ba, bb)]
    groups = []
    for d in range(r):
        if bo[d] == 1:
            continue
        sig = (ba[d] != 1, bb[d] != 1)
        if groups and groups[-1][1] == sig:
            groups[-1][0] *= bo[d]
        else:
            groups.append([bo[d], sig])
    if len(groups) > 2:
        raise CompileError("batch dimensions do not collapse to 2", node=op.node, op=op.op)
    while len(groups) < 2:
        groups.insert(0, [1, (False, False)])
    B = [g[0] for g in groups]
    af = [g[1][0] for g in groups]
    bf = [g[1][1] for g in groups]
    steps = p.get("epilogue", [])
    blk = {"b0": B[0], "b1": B[1], "m": m, "n": n, "k": k}
    extra = epi_slots(steps)

    def size(b):
        return matmul_layout(b, af, bf, extra).sram

    budget = cx.S - ALIGN * 4
    cols = cx.config.mac_cols
    while size(blk) > budget:
        if blk["b0"] > 1:
            blk["b0"] = -(-blk["b0"] // 2)
            continue
        if blk["b1"] > 1:
            blk["b1"] = -(-blk["b1"] // 2)
            continue
        a_b, w_b, o_b = blk["m"] * blk["k"], blk["k"] * blk["n"], blk["m"] * blk["n"]
        big = max(a_b, w_b, o_b)
        if big == w_b:
            key = "n" if (blk["n"] >= blk["k"] and blk["n"] > cols) or blk["k"] <= 64 else "k"
        elif big == a_b:
            key = "m" if blk["m"] >= blk["k"] or blk["k"] <= 64 else "k"
        else:
            key = "m" if blk["m"] >= blk["n"] or blk["n"] <= cols else "n"
        if blk[key] == 1:
            key = max(("m", "n", "k"), key=lambda x: blk[x])
            if blk[key] == 1:
                raise CompileError("matmul tile does not fit SRAM", node=op.node, op=op.op)
        blk[key] = -(-blk[key] // 2)
    bias = None
    if p.get("bias") is not None:
        bias = cx.add_const(op.node + ".bias", np.asarray(p["bias"], np.float32).reshape(n))
    layout = matmul_layout(blk, af, bf, extra)
    op.plan = MatmulPlan(B=B, af=af, bf=bf, m=m, n=n, k=k, blk=blk, bias=bias, layout=layout,
                         sram=layout.sram)


def emit_matmul(op: LOp, em: Emitter):
    pl = op.plan
    B, af, bf, m, n, k, blk = pl.B, pl.af, pl.bf, pl.m, pl.n, pl.k, pl.blk
    a_name, b_name = op.ins[0], op.ins[1]
    A_shape = [B[0] if af[0] else 1, B[1] if af[1] else 1, m, k]
    W_shape = [B[0] if bf[0] else 1, B[1] if bf[1] else 1, k, n]
    O_shape = [B[0], B[1], m, n]
    ast, wst, ost = cstrides(A_shape), cstrides(W_shape), cstrides(O_shape)
    b0b, b1b, mb, nb, kb = blk["b0"], blk["b1"], blk["m"], blk["n"], blk["k"]
    lay = pl.layout
    A0, W0, O0, BIAS, EP = lay.a, lay.w, lay.out, lay.bias, lay.epi
    steps = op.p.get("epilogue", [])
    last_w = last_bias = None
    for b0 in range(0, B[0], b0b):
        for b1 in range(0, B[1], b1b):
            s0, s1 = min(b0b, B[0] - b0), min(b1b, B[1] - b1)
            for n0 in range(0, n, nb):
                ns = min(nb, n - n0)
                if pl.bias and last_bias != n0:
                    em.load(BIAS, pl.bias, n0, (ns,), (1,))
                    last_bias = n0
                for m0 in range(0, m, mb):
                    ms = min(mb, m - m0)
                    for k0 in range(0, k, kb):
                        ks = min(kb, k - k0)
                        ash = [s0 if af[0] else 1, s1 if af[1] else 1, ms, ks]
                        aoff = (b0 if af[0] else 0) * ast[0] + (b1 if af[1] else 0) * ast[1] \
                            + m0 * ast[2] + k0
                        em.load(A0, a_name, aoff, ash, ast)
                        wsh = [s0 if bf[0] else 1, s1 if bf[1] else 1, ks, ns]
                        woff = (b0 if bf[0] else 0) * wst[0] + (b1 if bf[1] else 0) * wst[1] \
                            + k0 * wst[2] + n0
                        key = (woff, tuple(wsh))
                        if key != last_w:
                            em.load(W0, b_name, woff, wsh, wst)
                            last_w = key
                        em.mac("matmul", T(A0, ash), T(W0, wsh), T(O0, [s0, s1, ms, ns]),
                               bias=BIAS if (pl.bias and k0 == 0) else None,
                               accumulate=k0 > 0)
                    osh = [s0, s1, ms, ns]
                    ooff = b0 * ost[0] + b1 * ost[1] + m0 * ost[2] + n0
                    emit_epilogue(em, steps, O0, osh, EP,
                                  lambda name, sl: em.load(sl, name, ooff, osh, ost))
                    em.store(O0, op.outs[0], ooff, osh, ost)
