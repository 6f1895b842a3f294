"""Kernels that reduce along axes: softmax (and log-softmax), reductions, layer and instance
normalisation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import CompileError
from ..lowered import LOp, cstrides
from .base import ALIGN, T, Ctx, Emitter, Plan, al, tiles


# --- softmax / reduce / norm ------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SoftmaxPlan(Plan):
    """Softmax over the middle of ``[pre, ax, post]``, in ``preb x ax x postb`` tiles."""
    pre: int
    ax: int
    post: int
    preb: int
    postb: int


@dataclass(frozen=True, kw_only=True)
class ReducePlan(Plan):
    """A reduction collapsed to 4-D ``cshape`` (``red``: which dims reduce), in ``block`` tiles."""
    cshape: list
    red: list
    block: list


@dataclass(frozen=True, kw_only=True)
class LayerNormPlan(Plan):
    """Layer normalisation in ``rb``-row tiles; ``gamma``/``beta`` consts (beta may be None)."""
    rb: int
    gamma: str
    beta: str | None


@dataclass(frozen=True, kw_only=True)
class InstanceNormPlan(Plan):
    """Instance normalisation in ``cb``-channel planes; ``gamma``/``beta`` consts."""
    cb: int
    gamma: str
    beta: str


def plan_softmax(op: LOp, cx: Ctx):
    shape, axis = op.p["shape"], op.p["axis"]
    pre = math.prod(shape[:axis])
    ax = shape[axis]
    post = math.prod(shape[axis + 1:])
    S = cx.S - ALIGN * 4
    if ax * 4 * 2 > S:
        raise CompileError(f"softmax axis of {ax} elements does not fit SRAM", node=op.node, op=op.op)
    postb = min(post, S // (ax * 8))
    preb = max(1, min(pre, S // (ax * postb * 8))) if postb == post else 1
    op.plan = SoftmaxPlan(pre=pre, ax=ax, post=post, preb=preb, postb=postb, sram=preb * ax * postb * 8)


def emit_softmax(op: LOp, em: Emitter):
    pl = op.plan
    pre, ax, post, preb, postb = pl.pre, pl.ax, pl.post, pl.preb, pl.postb
    st = (ax * post, post, 1)
    for p0 in range(0, pre, preb):
        ps = min(preb, pre - p0)
        for q0 in range(0, post, postb):
            qs = min(postb, post - q0)
            sh = (1, ps, ax, qs)
            off = p0 * ax * post + q0
            em.load(0, op.ins[0], off, sh, (0,) + st)
            O0 = al(ps * ax * qs * 4)
            em.vec("softmax", T(0, sh), T(O0, sh), axis=2)
            if op.p["log"]:
                em.vec("vunary", "LOG", T(O0, sh), T(O0, sh))
            em.store(O0, op.outs[0], off, sh, (0,) + st)


def plan_reduce(op: LOp, cx: Ctx):
    shape, axes = op.p["shape"], set(op.p["axes"])
    dims = []
    for d, s in enumerate(shape):
        if s == 1:
            continue
        red = d in axes
        if dims and dims[-1][1] == red:
            dims[-1][0] *= s
        else:
            dims.append([s, red])
    if not dims:
        dims = [[1, False]]
    if len(dims) > 4:
        raise CompileError("reduction pattern needs more than 4 dims", node=op.node, op=op.op)
    while len(dims) < 4:
        dims.insert(0, [1, False])
    cshape = [d[0] for d in dims]
    red = [d[1] for d in dims]
    rp = math.prod(s for s, r in zip(cshape, red) if r)
    S = cx.S - ALIGN * 4
    budget = S // ((rp + 1) * 4)
    if budget < 1:
        raise CompileError(f"reduction over {rp} elements does not fit SRAM", node=op.node, op=op.op)
    block = list(cshape)
    inner = 1
    stop = False
    for d in reversed(range(4)):
        if red[d]:
            continue
        if stop:
            block[d] = 1
        elif inner * cshape[d] <= budget:
            inner *= cshape[d]
        else:
            block[d] = max(1, budget // inner)
            stop = True
    # emit_reduce's layout: the input block, then (aligned) its reduced output
    oblock = [1 if r else b for b, r in zip(block, red)]
    op.plan = ReducePlan(cshape=cshape, red=red, block=block,
                         sram=al(math.prod(block) * 4) + math.prod(oblock) * 4)


def emit_reduce(op: LOp, em: Emitter):
    pl = op.plan
    cshape, red, block = pl.cshape, pl.red, pl.block
    ist = cstrides(cshape)
    oshape = [1 if r else s for s, r in zip(cshape, red)]
    ost = cstrides(oshape)
    mask = sum(1 << d for d in range(4) if red[d])
    O0 = al(math.prod(block) * 4)
    for origin, size in tiles(cshape, block):
        em.load(0, op.ins[0], sum(o * s for o, s in zip(origin, ist)), size, ist)
        osz = [1 if r else s for s, r in zip(size, red)]
        em.vec("reduce", op.p["func"], mask, T(0, size), T(O0, osz))
        em.store(O0, op.outs[0], sum(o * s for o, s, r in zip(origin, ost, red) if not r), osz, ost)


def plan_norm(op: LOp, cx: Ctx):
    p = op.p
    S = cx.S - ALIGN * 8
    if p["mode"] == "layer":
        rows, d = p["rows"], p["d"]
        rb = max(0, (S - 2 * al(d * 4)) // (d * 8))
        if rb < 1:
            raise CompileError(f"normalising {d} elements does not fit SRAM", node=op.node, op=op.op)
        rb = min(rb, rows)
        op.plan = LayerNormPlan(
            rb=rb, gamma=cx.add_const(op.node + ".gamma", p["gamma"]),
            beta=None if p["beta"] is None else cx.add_const(op.node + ".beta", p["beta"]),
            sram=rb * d * 8 + 2 * d * 4)
    else:
        N, H, W, C = cx.pt[op.ins[0]].shape
        cb = min(C, S // ((H * W * 2 + 2) * 4))
        if cb < 1:
            raise CompileError("instance normalisation plane does not fit SRAM", node=op.node, op=op.op)
        op.plan = InstanceNormPlan(cb=cb, gamma=cx.add_const(op.node + ".gamma", p["gamma"]),
                                   beta=cx.add_const(op.node + ".beta", p["beta"]),
                                   sram=cb * (H * W * 2 + 2) * 4)


def emit_norm(op: LOp, em: Emitter):
    p, pl = op.p, op.plan
    if p["mode"] == "layer":
        rows, d, rb = p["rows"], p["d"], pl.rb
        G0, B0 = 0, al(d * 4)
        X0 = B0 + al(d * 4)
        em.load(G0, pl.gamma, 0, (d,), (1,))
        if pl.beta:
            em.load(B0, pl.beta, 0, (d,), (1,))
        for r0 in range(0, rows, rb):
            rs = min(rb, rows - r0)
            O0 = X0 + al(rs * d * 4)
            em.load(X0, op.ins[0], r0 * d, (rs, d), (d, 1))
            em.vec("norm", T(X0, (rs, d)), T(O0, (rs, d)), axes=(3,), eps=p["eps"], gamma=G0,
                   beta=B0 if pl.beta else None)
            em.store(O0, op.outs[0], r0 * d, (rs, d), (d, 1))
        return
    N, H, W, C = em.pt[op.ins[0]].shape
    cb = pl.cb
    st = cstrides((N, H, W, C))
    for n in range(N):
        for c0 in range(0, C, cb):
            cs = min(cb, C - c0)
            G0, B0 = 0, al(cs * 4)
            X0 = B0 + al(cs * 4)
            O0 = X0 + al(H * W * cs * 4)
            em.load(G0, pl.gamma, c0, (cs,), (1,))
            em.load(B0, pl.beta, c0, (cs,), (1,))
            sh = (1, H, W, cs)
            em.load(X0, op.ins[0], n * st[0] + c0, sh, st)
            em.vec("norm", T(X0, sh), T(O0, sh), axes=(1, 2), eps=p["eps"], gamma=G0, beta=B0)
            em.store(O0, op.outs[0], n * st[0] + c0, sh, st)
