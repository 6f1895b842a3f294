"""Convolution (float and int8; grouped, dilated, strided): bands of output rows x output-channel
blocks (x input-channel blocks that accumulate), chosen by a cost model; weights re-packed HWIO
one contiguous const per block and read in place through the weight window."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CompileError
from ..lowered import LOp, cstrides
from .base import (ALIGN, F32, I32, I8, T, Ctx, Emitter, Plan, al, band_rows, emit_epilogue,
                   epi_slots)


# --- convolution ----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ConvPlan(Plan):
    """Convolution: ``cb`` output channels x ``kb`` input channels (``gb`` groups) x ``ohb``
    output rows per tile; ``blocks`` the HWIO weight const per (output, input) channel block.
    Int8 only: ``rs`` (a non-zero weight zero point: window sums needed), ``scale``, ``zw``,
    ``ones`` consts.  ``geo`` and ``layout`` are the shapes and SRAM addresses the plan was made
    for, so emission reuses them."""
    cb: int
    kb: int
    gb: int
    ohb: int
    blocks: dict
    bias: str
    geo: "ConvGeometry"
    layout: "ConvLayout"
    rs: bool = False
    scale: str | None = None
    zw: str | None = None
    ones: str | None = None


def _subsampled(p, w) -> bool:
    return (w.shape[2] == 1 and w.shape[3] == 1 and not any(p["pads"])
            and tuple(p["stride"]) != (1, 1))


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's shapes as its kernels tile it (NHWC activations, OIHW weights ``w``).  A
    strided 1x1 convolution without padding is tiled as a stride-1 one over just the pixels it
    reads (``H, W`` its output's, ``xst`` the input strides that skip the others: DMA gathers
    them).  ``eb``: SRAM bytes per input/weight element; ``nres``: epilogue operand slots;
    ``rs``: an int8 weight zero point that is not zero (window sums needed)."""
    N: int
    H: int
    W: int
    C: int
    OH: int
    OW: int
    Cout: int
    g: int
    cg: int
    KH: int
    KW: int
    sh: int
    sw: int
    dh: int
    dw: int
    xst: tuple
    eb: int
    nres: int
    q: dict | None
    rs: bool

    def band_rows(self, ohb: int) -> int:
        """Input rows a band of ``ohb`` output rows reads."""
        return band_rows(ohb, self.sh, self.dh, self.KH)


def conv_geometry(op: LOp, pt: dict) -> ConvGeometry:
    """The geometry of conv LOp ``op`` over the physical tensors ``pt``."""
    p = op.p
    x = pt[p["x"]]
    N, H, W, C = x.shape
    _, OH, OW, Cout = pt[op.outs[0]].shape
    w = p["w"]                       # OIHW
    sh, sw = p["stride"]
    dh, dw = p["dil"]
    q = p.get("q")
    xst = cstrides(x.shape)
    if _subsampled(p, w):
        xst = (xst[0], xst[1] * sh, xst[2] * sw, 1)
        H, W, sh, sw = OH, OW, 1, 1
    return ConvGeometry(N=N, H=H, W=W, C=C, OH=OH, OW=OW, Cout=Cout, g=p["group"], cg=w.shape[1],
                        KH=w.shape[2], KW=w.shape[3], sh=sh, sw=sw, dh=dh, dw=dw, xst=xst,
                        eb=_xw_bytes(q), nres=epi_slots(p["epilogue"]), q=q,
                        rs=q is not None and bool(np.any(np.asarray(q["w_zp"]) != 0)))


@dataclass(frozen=True)
class ConvLayout:
    """SRAM addresses of one convolution tile's buffers: bias, input band ``x``, output tile
    ``out`` (the accumulator), epilogue operand ``epi``; int8 only: requantised output ``q8``,
    ``scale``, ``zw`` (weight zero points), ``ones`` kernel, window sums ``rs`` and their
    product ``tmp``.  ``sram``: the working set the plan reports and searches with (the buffers'
    sizes; the alignment padding after the output tiles, under 64 bytes each, lies in the
    margin every plan keeps below ``config.sram_bytes``)."""
    bias: int
    x: int
    out: int
    epi: int
    sram: int
    q8: int | None = None
    scale: int | None = None
    zw: int | None = None
    ones: int | None = None
    rs: int | None = None
    tmp: int | None = None


def conv_layout(geo: ConvGeometry, cb: int, kb: int, ohb: int) -> ConvLayout:
    """The one SRAM layout of a convolution tile of ``cb`` output x ``kb`` input channels x
    ``ohb`` output rows: what plan_conv sizes tiles by and emit_conv addresses."""
    out_tile = ohb * geo.OW * cb * 4
    x = al(cb * 4)                   # weights are read in place from a window: no SRAM
    out = x + al(geo.band_rows(ohb) * geo.W * kb * geo.eb)
    epi = out + al(out_tile)
    sram = out + out_tile * (1 + geo.nres)
    if geo.q is None:
        return ConvLayout(bias=0, x=x, out=out, epi=epi, sram=sram)
    q8 = epi + al(out_tile) * geo.nres
    scale = q8 + al(ohb * geo.OW * cb)
    zw = scale + al(cb * 4)
    ones = zw + al(cb * 4)
    rs = ones + al(geo.KH * geo.KW * kb)
    tmp = rs + al(ohb * geo.OW * 4)
    # the requantised tile, scale and zero-point vectors; window-sum buffers if the weight zero
    # point is not zero
    sram += al(ohb * geo.OW * cb) + 2 * al(cb * 4) + ALIGN * 2
    if geo.rs:
        sram += al(geo.KH * geo.KW * kb) + al(ohb * geo.OW * 4) + al(out_tile)
    return ConvLayout(bias=0, x=x, out=out, epi=epi, sram=sram, q8=q8, scale=scale, zw=zw,
                      ones=ones, rs=rs, tmp=tmp)


def conv_wall_seconds(geo: ConvGeometry, padded: bool, cb: int, kb: int, gb: int, ohb: int) -> float:
    """Modeled emulator wall time (seconds) of the convolution tiled in ``cb`` output x ``kb``
    input channels (``gb`` groups) x ``ohb`` rows: command overhead, im2col copies (redone per
    output-channel block), GEMM at a rate that drops for narrow or shallow GEMMs, partial-sum
    accumulation, DMA copies.  What tiling minimises; it models the host running the emulator,
    not the device cycles of npud.emulator.timing that the report shows."""
    N, H, W, C, OH, OW, Cout = geo.N, geo.H, geo.W, geo.C, geo.OH, geo.OW, geo.Cout
    g, cg, KH, KW = geo.g, geo.cg, geo.KH, geo.KW
    ncb = -(-Cout // cb)
    nkb = -(-(C if g == 1 else g) // (kb if g == 1 else gb))
    nb = -(-OH // ohb)
    in_rows = min(nb * geo.band_rows(ohb), H + (nb - 1) * KH)
    w_size = Cout * cg * KH * KW
    dma = (ncb * N * in_rows * W * C + w_size * (1 if nkb == 1 else N * nb)) * geo.eb
    cmds = ncb * N * nb * (2 * nkb + 3)
    pointwise = KH == 1 and KW == 1 and not padded
    im2col = 0 if pointwise else ncb * N * OH * OW * KH * KW * C
    kk = KH * KW * (kb if g == 1 else cg)
    eff = min(1.0, cb / 128) ** 0.5 * min(1.0, kk / 256) ** 0.5 if g == 1 else 0.5
    flops = N * OH * OW * Cout * KH * KW * cg * 2
    acc = (nkb - 1) * N * OH * OW * Cout if g == 1 else 0
    return cmds * 6e-6 + im2col * 0.7e-9 + flops / (130e9 * eff) + acc * 1e-9 + dma * 0.15e-9


def plan_conv(op: LOp, cx: Ctx):
    p = op.p
    geo = conv_geometry(op, cx.pt)
    C, OH, Cout, g, cg, KH, KW = geo.C, geo.OH, geo.Cout, geo.g, geo.cg, geo.KH, geo.KW
    w = p["w"]                       # OIHW
    cog = Cout // g
    S = cx.S - ALIGN * 8
    q, rs = geo.q, geo.rs
    cands = []
    if g == 1:
        cbs = sorted({max(1, -(-Cout // d)) for d in (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256, 512)},
                     reverse=True)
        kbs = sorted({max(1, -(-C // d)) for d in (1, 2, 4, 8, 16, 32, 64)}, reverse=True)
        for cb in cbs:
            for kb in kbs:
                cands.append((cb, kb, 1))
    else:
        for d in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
            gb = max(1, -(-g // d))
            cands.append((gb * cog, gb * cg, gb))
    best = None
    for cb, kb, gb in cands:
        ohb = 0
        lo, hi = 1, OH
        while lo <= hi:
            mid = (lo + hi) // 2
            if conv_layout(geo, cb, kb, mid).sram + ALIGN * 2 <= S:
                ohb, lo = mid, mid + 1
            else:
                hi = mid - 1
        if ohb == 0:
            continue
        score = conv_wall_seconds(geo, any(p["pads"]), cb, kb, gb, ohb)
        if best is None or score < best[0]:
            best = (score, cb, kb, gb, ohb)
    if best is None:
        raise CompileError(f"convolution does not fit SRAM ({cx.S} bytes) even with the "
                           "smallest tiles", node=op.node, op=op.op)
    _, cb, kb, gb, ohb = best
    # [KH,KW,cg,Cout], a view: the weights are copied once, into the weights blob
    whwio = w.transpose(2, 3, 1, 0)
    wdt = I8 if q is not None else F32
    blocks = {}
    for co in range(0, Cout, cb):
        ce = min(Cout, co + cb)
        if g == 1:
            for ci in range(0, C, kb):
                blocks[(co, ci)] = cx.add_const(f"{op.node}.w[{co}:{ce},{ci}]",
                                                whwio[:, :, ci:ci + kb, co:ce], wdt)
        else:
            blocks[(co, 0)] = cx.add_const(f"{op.node}.w[{co}:{ce}]", whwio[:, :, :, co:ce], wdt)
    layout = conv_layout(geo, cb, kb, ohb)
    if q is None:
        bias = cx.add_const(op.node + ".bias", p["bias"])
        op.plan = ConvPlan(cb=cb, kb=kb, gb=gb, ohb=ohb, blocks=blocks, bias=bias, geo=geo,
                           layout=layout, sram=layout.sram)
        return
    b32 = np.asarray(p["bias"], np.int64)
    if np.any(np.abs(b32) >= 1 << 31):
        raise CompileError("int32 bias overflows", node=op.node, op=op.op)
    op.plan = ConvPlan(
        cb=cb, kb=kb, gb=gb, ohb=ohb, blocks=blocks, rs=rs, geo=geo, layout=layout,
        bias=cx.add_const(op.node + ".bias32", b32.astype(np.int32), I32),
        scale=None if q["scale"] is None else cx.add_const(op.node + ".scale", q["scale"]),
        zw=cx.add_const(op.node + ".zw", np.asarray(q["w_zp"], np.int32), I32) if rs else None,
        ones=cx.add_const(op.node + ".ones", np.ones(KH * KW * kb, np.int8), I8) if rs else None,
        sram=layout.sram)


def _xw_bytes(q) -> int:
    """SRAM bytes per input and weight element: float32, or int8/uint8 for a
    quantised convolution (whose accumulator is still 4 bytes)."""
    return 4 if q is None else 1


def _fused_conv_epilogue(steps) -> tuple[str | None, bool]:
    """(residual tensor or None, relu): a float conv2d's epilogue run in the
    MAC's output stage, when it is Relu, Add of a same-shape tensor, or Add
    then Relu (the output tile is loaded with the residual and the convolution
    accumulates onto it; the ReLU flag follows).  (None, False): the epilogue
    stays on the vector engine."""
    kinds = [(st[0], st[1]) for st in steps]
    if kinds == [("act", "RELU")]:
        return None, True
    if kinds in ([("bin", "ADD")], [("bin", "ADD"), ("act", "RELU")]):
        return steps[0][2], len(kinds) == 2
    return None, False


def emit_conv(op: LOp, em: Emitter):
    p, pl = op.p, op.plan
    geo, lay = pl.geo, pl.layout
    N, H, W, C, OH, OW, Cout = geo.N, geo.H, geo.W, geo.C, geo.OH, geo.OW, geo.Cout
    g, cg, KH, KW, sh, sw, dh, dw = geo.g, geo.cg, geo.KH, geo.KW, geo.sh, geo.sw, geo.dh, geo.dw
    pt_, pl_, pb_, pr_ = p["pads"]
    cb, kb, ohb = pl.cb, pl.kb, pl.ohb
    xst = geo.xst
    ost = cstrides((N, OH, OW, Cout))
    BIAS, X0, O0, EP = lay.bias, lay.x, lay.out, lay.epi
    steps = p["epilogue"]
    nk = len(range(0, C, kb)) if g == 1 else 1
    q = geo.q
    if q is not None:     # int8: x int8/uint8 (x_zp), w int8, out int32 -> requant
        xdt, odt, adt, x_zp = em.pt[p["x"]].dtype, em.pt[op.outs[0]].dtype, I32, int(q["x_zp"])
        Q8, SC, ZW, ONES, RS, TMP = lay.q8, lay.scale, lay.zw, lay.ones, lay.rs, lay.tmp
    else:
        xdt, adt, x_zp = F32, F32, 0
    # one K block, a requant and no weight zero point: qconv2d, conv + requant in one command
    fused = q is not None and nk == 1 and pl.scale is not None and not pl.rs
    residual, relu = _fused_conv_epilogue(steps) if q is None else (None, False)
    if residual is not None or relu:
        steps = []
    for co in range(0, Cout, cb):
        cs = min(cb, Cout - co)
        em.load(BIAS, pl.bias, co, (cs,), (1,))
        if q is not None and pl.scale:
            em.load(SC, pl.scale, co, (cs,), (1,))
        if q is not None and pl.rs:
            em.load(ZW, pl.zw, co, (cs,), (1,))
        if g == 1:
            ci_list = [(ci, min(kb, C - ci)) for ci in range(0, C, kb)]
            groups_here = 1
        else:
            groups_here = cs // (Cout // g)
            ci_list = [((co // (Cout // g)) * cg, groups_here * cg)]
        if nk == 1:
            wn = pl.blocks[(co, ci_list[0][0] if g == 1 else 0)]
            W0 = em.window(wn, (KH, KW, cg if g > 1 else ci_list[0][1], cs))
        for n in range(N):
            for o0 in range(0, OH, ohb):
                o1 = min(OH, o0 + ohb)
                r0 = o0 * sh - pt_
                r1 = (o1 - 1) * sh - pt_ + dh * (KH - 1) + 1
                lo, hi = max(r0, 0), min(r1, H)
                ptop, pbot = lo - r0, r1 - hi
                otile = T(O0, (1, o1 - o0, OW, cs), adt)
                ooff = n * ost[0] + o0 * ost[1] + co
                tsh = (1, o1 - o0, OW, cs)
                if residual is not None:
                    em.load(O0, residual, ooff, tsh, ost)
                for j, (ci, ks) in enumerate(ci_list):
                    if nk > 1:
                        W0 = em.window(pl.blocks[(co, ci)], (KH, KW, ks, cs))
                    xs = (1, hi - lo, W, ks)
                    if hi > lo:
                        em.load(X0, p["x"], n * xst[0] + lo * xst[1] + ci, xs, xst)
                        xt = T(X0, xs, xdt)
                        pads = (ptop, pbot, pl_, pr_)
                    else:   # the band lies entirely in padding: a 1-row tile of the zero point
                        em.vec("fill", T(X0, (1, 1, W, ks), xdt), float(x_zp))
                        xt = T(X0, (1, 1, W, ks), xdt)
                        pads = (ptop, r1 - r0 - 1 - ptop, pl_, pr_)
                    wt = T(W0, (KH, KW, cg if g > 1 else ks, cs), I8 if q is not None else F32)
                    if fused:    # requantised in the MAC's output stage: no int32 tile
                        em.mac("qconv2d", xt, wt, T(Q8, (1, o1 - o0, OW, cs), odt), bias=BIAS,
                               scale_addr=SC, stride=(sh, sw), pad=pads, dilation=(dh, dw),
                               groups=groups_here if g > 1 else 1, x_zp=x_zp, y_zp=q["y_zp"],
                               lo=q["lo"], hi=q["hi"])
                        continue
                    em.mac("conv2d", xt, wt, otile, bias=BIAS if j == 0 else None,
                           stride=(sh, sw), pad=pads, dilation=(dh, dw),
                           groups=groups_here if g > 1 else 1, x_zp=x_zp,
                           accumulate=j > 0 or residual is not None,
                           relu=relu and j == len(ci_list) - 1)
                    if q is not None and pl.rs:   # window sums of (x - x_zp)
                        em.load(ONES, pl.ones, 0, (KH, KW, ks, 1), cstrides((KH, KW, ks, 1)))
                        em.mac("conv2d", xt, T(ONES, (KH, KW, ks, 1), I8),
                               T(RS, (1, o1 - o0, OW, 1), I32), stride=(sh, sw), pad=pads,
                               dilation=(dh, dw), x_zp=x_zp, accumulate=j > 0)
                if fused:
                    em.store(Q8, op.outs[0], ooff, tsh, ost)
                    continue
                if q is not None:
                    if pl.rs:   # - w_zp[o] * sum over the window of (x - x_zp)
                        em.vec("vbinary", "MUL", T(RS, (1, o1 - o0, OW, 1), I32),
                               T(ZW, (1, 1, 1, cs), I32), T(TMP, tsh, I32))
                        em.vec("vbinary", "SUB", otile, T(TMP, tsh, I32), otile)
                    if pl.scale is None:           # ConvInteger: the int32 accumulator
                        em.store(O0, op.outs[0], ooff, tsh, ost)
                    else:
                        em.vec("requant", otile, T(Q8, tsh, odt), scale_addr=SC, zp=q["y_zp"],
                               lo=q["lo"], hi=q["hi"])
                        em.store(Q8, op.outs[0], ooff, tsh, ost)
                    continue
                emit_epilogue(em, steps, O0, tsh, EP,
                              lambda name, sl: em.load(sl, name, ooff, tsh, ost))
                em.store(O0, op.outs[0], ooff, tsh, ost)
