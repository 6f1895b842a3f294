"""The MAC engine: batched matmul and 2-D convolution, SRAM to SRAM.

Every GEMM runs on float32 BLAS.  Integer GEMMs are still exact: an int8 or
uint8 activation times an int8 weight is at most 128*128 = 2**14 (from
-128*-128) or 255*128 = 32640 in magnitude, and every value a BLAS kernel
forms while summing K such products -- whatever its blocking, order or use of
FMA -- is a sum of a subset of them, so it is bounded by K times the largest
product.  float32 holds every integer of magnitude <= 2**24 exactly, so a
chunk of K <= 2**24 // max|product| (1024 for int8 x int8, 514 for
uint8 x int8) is computed exactly.  Chunks are summed in int64 and the total
wraps to the int32 accumulator, as 32-bit hardware accumulators do.

That numpy computation is the definition.  When oneDNN is installed and passes
its self-test (int_gemm.py), ungrouped integer convolutions and integer
matmuls instead run one exact u8 x s8 -> s32 GEMM on the 8-bit operands
themselves, and qconv2d runs whole (requantisation included) on oneDNN's int8
convolution primitive (onednn.py); the tests hold every path to the same bits.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..isa import FLAG_ACCUMULATE, FLAG_RELU, NONE_ADDR, WINDOW_BASE, DType
from . import int_gemm, onednn
from .common import _LIMITS
from .common import clip as _clip
from .common import scratch as _scratch
from .common import vec, view, weights

F32_EXACT = 1 << 24
IM2COL_ELEMENTS = 1 << 24   # largest im2col matrix built at once (64 MiB of float32)


def k_chunk(x_dtype: np.dtype) -> int:
    """Largest K whose float32 dot products of `x_dtype` x int8 are exact."""
    max_x = 128 if x_dtype == np.int8 else 255
    return F32_EXACT // (max_x * 128)


def gemm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w (numpy matmul broadcasting).  Float inputs -> float32 result;
    int8/uint8 x int8 -> the exact integer result, int64 (or int32 from the
    native GEMM, whose K bound keeps every sum within int32)."""
    if x.dtype.kind == "f":
        return np.matmul(x.astype(np.float32, copy=False), w.astype(np.float32, copy=False))
    native = int_gemm.get()
    if native is not None and 0 < x.shape[-1] <= int_gemm.MAX_K and x.size and w.size:
        return _gemm_native(x, w, native)
    xf = x.astype(np.float32)
    wf = w.astype(np.float32)
    k = x.shape[-1]
    step = k_chunk(x.dtype)
    if k <= step:
        return np.matmul(xf, wf).astype(np.int64)
    acc = None
    for k0 in range(0, k, step):
        part = np.matmul(xf[..., k0:k0 + step], wf[..., k0:k0 + step, :]).astype(np.int64)
        acc = part if acc is None else acc + part
    return acc


def _as_u8(x: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """8-bit activations as the native GEMM's uint8 operand and the shift to add
    to their zero point: int8 is flipped (``x ^ 0x80 = x + 128``) into scratch."""
    if x.dtype == np.uint8:
        return x, 0
    u = _scratch.typed(name, x.shape, np.uint8)
    np.bitwise_xor(x.view(np.uint8), np.uint8(0x80), out=u)
    return u, 128


def _gemm_native(x: np.ndarray, w: np.ndarray, native) -> np.ndarray:
    """Integer x @ w with numpy's batch broadcasting, one native GEMM per batch."""
    xu, zp = _as_u8(x, "mm_u8")
    batch = np.broadcast_shapes(x.shape[:-2], w.shape[:-2])
    m, n = x.shape[-2], w.shape[-1]
    xb = np.broadcast_to(xu, batch + xu.shape[-2:])
    wb = np.broadcast_to(w, batch + w.shape[-2:])
    out = np.empty(batch + (m, n), np.int32)
    for idx in np.ndindex(*batch):
        native(xb[idx], wb[idx], out[idx], zp)
    return out


def _epilogue(job, cmd, out: np.ndarray, result: np.ndarray, n: int) -> None:
    """out (+)= result (+ bias), converting to out's dtype (int32 wraps)."""
    a = cmd.args
    sram = job.sram[cmd.core]
    if a.bias != NONE_ADDR:
        bias = vec(sram, a.bias, np.int32 if out.dtype == np.int32 else np.float32, n)
        result = result + bias
    if getattr(a, "flags", 0) & FLAG_ACCUMULATE:
        result = result + out
    np.copyto(out, result, casting="unsafe")


def matmul(job, cmd) -> None:
    a = cmd.args
    sram = job.sram[cmd.core]
    x, w, out = view(sram, a.a), weights(job, cmd.core, a.w), view(sram, a.out)
    if _matmul_sgemm(sram, a, x, w, out):
        return
    if (out.dtype == np.float32 and x.dtype == np.float32 and a.bias == NONE_ADDR
            and not a.flags & FLAG_ACCUMULATE):
        np.matmul(x, w, out=out)
        return
    _epilogue(job, cmd, out, gemm(x, w), out.shape[3])




def _matmul_sgemm(sram: np.ndarray, a, x: np.ndarray, w: np.ndarray, out: np.ndarray) -> bool:
    """A float32 matmul on oneDNN's sgemm, one GEMM per batch (accumulating in
    the GEMM), then the bias; False where oneDNN is absent or out overlaps x or w."""
    if not (x.dtype == w.dtype == out.dtype == np.float32) or not onednn.available():
        return False   # before any set-up: without oneDNN every float matmul comes here first
    if np.may_share_memory(out, x) or np.may_share_memory(out, w):
        return False
    bias = _bias_f32(sram, a, out)
    accumulate = bool(a.flags & FLAG_ACCUMULATE)
    xb, wb = np.broadcast_to(x, out.shape[:2] + x.shape[2:]), np.broadcast_to(w, out.shape[:2] + w.shape[2:])
    for idx in np.ndindex(*out.shape[:2]):
        if not onednn.sgemm(xb[idx], wb[idx], out[idx], accumulate):
            return False
    if bias is not None:
        out += bias
    return True


def conv2d(job, cmd) -> None:
    """The convolution, its bias and accumulation, then the fused ReLU (by
    definition in that order: docs/ISA.md); oneDNN runs all of it in one
    primitive where it can."""
    a = cmd.args
    sram = job.sram[cmd.core]
    x, w, out = view(sram, a.x), weights(job, cmd.core, a.w), view(sram, a.out)
    if _conv_onednn(sram, a, x, w, out):
        return
    _conv(job, cmd, x, w, out)
    if a.flags & FLAG_RELU:
        np.maximum(out, 0, out=out)


def _conv_onednn(sram: np.ndarray, a, x: np.ndarray, w: np.ndarray, out: np.ndarray) -> bool:
    """Run the conv2d on oneDNN's primitive if :func:`_onednn_plan` has one; False if not."""
    plan = _onednn_plan(a, x, out, w)
    if plan is None:
        return False
    plan(x, w, out, _bias_f32(sram, a, out))
    return True


def _onednn_plan(a, x: np.ndarray, out: np.ndarray, w: np.ndarray | None, frozen=None):
    """oneDNN's convolution primitive for a float32 conv2d (grouped and
    depthwise too), bias, accumulation and ReLU fused; None where there is no
    plan or ``out`` overlaps an operand the primitive reads while writing it
    (`w` None: read in place from a weight window, never SRAM).  `frozen`
    weights (a window on immutable memory) are read in oneDNN's blocked layout."""
    if not (x.dtype == out.dtype == np.float32 and a.w.dtype == DType.FP32):
        return None
    if np.may_share_memory(out, x) or (w is not None and np.may_share_memory(out, w)):
        return None
    return onednn.plan(x.shape, a.w.shape, out.shape, a.stride, a.pad, a.dilation,
                       bias=a.bias != NONE_ADDR, accumulate=bool(a.flags & FLAG_ACCUMULATE),
                       relu=bool(a.flags & FLAG_RELU), groups=a.groups, blocked=bool(frozen))


def _bias_f32(sram: np.ndarray, a, out: np.ndarray):
    """The float bias vector, a copy when it lies inside the output tile (it is
    read while the output is written), or None."""
    if a.bias == NONE_ADDR:
        return None
    bias = vec(sram, a.bias, np.float32, out.shape[3])
    return bias.copy() if np.may_share_memory(bias, out) else bias


def _prepare_conv2d(cmd, sram: np.ndarray, frozen=None):
    """A conv2d step: on oneDNN, its tile views and primitive made once;
    otherwise the executor.  `frozen` (a key, or None): its weights window
    holds the same bytes in every run (see :func:`_plan_step`)."""
    a = cmd.args
    x, out = view(sram, a.x), view(sram, a.out)
    w = None if a.w.addr >= WINDOW_BASE else view(sram, a.w)
    plan = _onednn_plan(a, x, out, w, frozen)
    if plan is None:
        return partial(conv2d, cmd=cmd)
    bias = vec(sram, a.bias, np.float32, out.shape[3]) if a.bias != NONE_ADDR else None
    return _plan_step(cmd, plan, x, w, out, bias, frozen=frozen)


def _plan_step(cmd, plan, x: np.ndarray, w, out: np.ndarray, *vectors, frozen=None):
    """The step running `plan` bound to prepared views: the weights looked up
    when it runs if in a window (`w` None), and the per-channel `vectors`
    (bias, scale; None: absent) copied every run if they lie inside the output
    tile (they must be read before the output is written).  `frozen` window
    weights are kept in the plan's blocked layout for the step's lifetime, one
    copy for the steps with the same key whose plans chose the same layout."""
    if any(v is not None and np.may_share_memory(v, out) for v in vectors):
        bound = plan.bind(x, out, frozen=frozen)

        def run(job, w):
            bound(w, *(None if v is None else v.copy() for v in vectors))
    else:
        bound = plan.bind(x, out, *vectors, frozen=frozen)

        def run(job, w):
            bound(w)
    if w is None:
        core, wt = cmd.core, cmd.args.w
        return lambda job: run(job, weights(job, core, wt))
    return lambda job: run(job, w)


def _prepare_qconv2d(cmd, sram: np.ndarray, frozen=None):
    """A qconv2d step: on oneDNN's int8 convolution primitive (requantisation
    as its post-ops, :func:`_qconv_plan`), views and primitive made once;
    otherwise the executor.  `frozen` as for :func:`_prepare_conv2d`."""
    a = cmd.args
    x, out = view(sram, a.x), view(sram, a.out)
    w = None if a.w.addr >= WINDOW_BASE else view(sram, a.w)
    plan = _qconv_plan(a, x, out, w)
    if plan is None:
        return partial(qconv2d, cmd=cmd)
    c = out.shape[3]
    bias = vec(sram, a.bias, np.int32, c) if a.bias != NONE_ADDR else None
    return _plan_step(cmd, plan, x, w, out, bias, vec(sram, a.scale_addr, np.float32, c), frozen=frozen)


def _qconv_plan(a, x: np.ndarray, out: np.ndarray, w: np.ndarray | None):
    """oneDNN's int8 convolution primitive computing :func:`qconv2d` bit for
    bit (any 8-bit input and zero point, grouped and depthwise too), or None:
    without oneDNN or a jit kernel for the shape, where ``out`` overlaps an
    operand, and where an accumulator could wrap (K x 255 x 128 >= 2**31:
    numpy wraps it as the ISA says, oneDNN's would not)."""
    k = a.w.shape[0] * a.w.shape[1] * a.w.shape[2]
    if k > int_gemm.MAX_K:
        return None
    if np.may_share_memory(out, x) or (w is not None and np.may_share_memory(out, w)):
        return None
    return onednn.plan(x.shape, a.w.shape, out.shape, a.stride, a.pad, a.dilation,
                       bias=a.bias != NONE_ADDR, groups=a.groups,
                       dtypes=(x.dtype.str, "|i1", out.dtype.str, "<i4"),
                       quant=(a.x_zp, a.y_zp, *_clamp(a, out), out.shape[3]))


def qconv2d(job, cmd) -> None:
    """The definition (docs/ISA.md): conv2d's int32 accumulator without the
    bias, then :func:`requant_acc` (the bias joins in fp32, then the
    per-channel scale)."""
    a = cmd.args
    sram = job.sram[cmd.core]
    x, w, out = view(sram, a.x), weights(job, cmd.core, a.w), view(sram, a.out)
    c = out.shape[3]
    scale = vec(sram, a.scale_addr, np.float32, c).copy()     # copies: out may alias them
    bias = vec(sram, a.bias, np.int32, c).copy() if a.bias != NONE_ADDR else None
    acc = _scratch.typed("qconv_acc", out.shape, np.int32)
    _conv(job, replace(cmd, args=a._replace(bias=NONE_ADDR)), x, w, acc)
    requant_acc(acc, bias, out, scale, a.y_zp, *_clamp(a, out))


def _clamp(a, out: np.ndarray) -> tuple[int, int]:
    """qconv2d's [lo, hi] within its output type."""
    lo, hi = _LIMITS[out.dtype]
    return max(lo, a.lo), min(hi, a.hi)


def requant_acc(acc: np.ndarray, bias, out: np.ndarray, scale: np.ndarray, zp: int,
                lo: int, hi: int) -> None:
    """qconv2d's output stage, every step one IEEE single operation:
    ``out = clamp(round_half_even(fl32(fl32(fl32(acc) + fl32(bias)) * scale)), lo - zp, hi - zp) + zp``
    (oneDNN's int8 convolution computes exactly this; onnxruntime adds the bias
    in int32, which is the same whenever |acc|, |bias| and |acc + bias| <= 2**24).
    A block of rows at a time, so the float32 block stays in cache."""
    c = out.shape[-1]
    src, dst = acc.reshape(-1, c), out.reshape(-1, c)
    rows = max(1, EPILOGUE_ELEMENTS // c)
    buf = _scratch.get("epi32", (min(rows, src.shape[0]), c))
    bias32 = None if bias is None else bias.astype(np.float32)
    for i in range(0, src.shape[0], rows):
        b = buf[:src[i:i + rows].shape[0]]
        np.copyto(b, src[i:i + rows], casting="unsafe")     # int32 -> fp32, rounding half to even
        if bias32 is not None:
            b += bias32
        b *= scale
        _clip(b, np.float32(lo - zp), np.float32(hi - zp), out=b)
        np.rint(b, out=b)
        if zp:
            b += np.float32(zp)
        np.copyto(dst[i:i + rows], b, casting="unsafe")


def _conv(job, cmd, x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    a = cmd.args
    if (x.dtype == w.dtype == out.dtype == np.float32 and a.groups == 1
            and not np.may_share_memory(out, x) and not np.may_share_memory(out, w)):
        _conv2d_f32(job, cmd, x, w, out)
        return
    if (x.dtype.kind in "iu" and out.dtype == np.int32 and a.groups == 1
            and not np.may_share_memory(out, x) and not np.may_share_memory(out, w)):
        _conv2d_int(job, cmd, x, w, out)
        return
    n, oh, ow, cout = out.shape
    kh, kw, cg, _ = w.shape
    g = a.groups
    (sh, sw), (dh, dw) = a.stride, a.dilation
    pt, pb, pl, pr = a.pad
    is_int = x.dtype.kind != "f"
    work = np.float32 if not is_int else np.float32
    if pt or pb or pl or pr:
        xp = np.full((n, x.shape[1] + pt + pb, x.shape[2] + pl + pr, x.shape[3]),
                     a.x_zp, dtype=work)
        xp[:, pt:pt + x.shape[1], pl:pl + x.shape[2], :] = x
    else:
        xp = x.astype(work, copy=False)
    s = xp.strides
    # windows[n, i, j, p, q, c] = xp[n, i*sh + p*dh, j*sw + q*dw, c]
    windows = as_strided(xp, (n, oh, ow, kh, kw, xp.shape[3]),
                         (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]), writeable=False)
    m = n * oh * ow
    if cg == 1 and g > 1:
        result = _depthwise(windows, w, g, cout, is_int)
    else:
        # im2col a band of output rows at a time, so the column matrix stays
        # bounded however large the kernel (a realistic tile is one band).
        k = kh * kw * cg * g
        rows = max(1, IM2COL_ELEMENTS // max(1, n * ow * k))
        bands = [_im2col_gemm(windows[:, i:i + rows], w, g, x.dtype) for i in range(0, oh, rows)]
        result = bands[0] if len(bands) == 1 else np.concatenate(
            [b.reshape(n, -1, ow, cout) for b in bands], axis=1).reshape(m, cout)
    if is_int and a.x_zp:
        # Padding held x_zp, so sum((x - zp) * w) = sum(x * w) - zp * sum(w).
        wsum = w.astype(np.int64).reshape(kh * kw * cg, g, cout // g).sum(axis=0)
        result = result - a.x_zp * wsum.reshape(cout)
    _epilogue(job, cmd, out, result.reshape(out.shape), cout)


def _conv2d_f32(job, cmd, x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """The float32, ungrouped fast path: GEMMs straight into the output tile.

    1x1 stride-1 unpadded convolutions are a plain GEMM on the input tile; the
    others copy their im2col matrix (one strided copy of a window view, which
    measured faster than a copy per kernel tap) into a reused scratch buffer.
    The GEMM writes ``out`` directly (through a scratch buffer when
    accumulating) and the bias is added in place: no temporaries the size of
    the output, no epilogue copies.
    """
    a = cmd.args
    n, oh, ow, cout = out.shape
    cin = x.shape[3]
    kh, kw = w.shape[0], w.shape[1]
    k = kh * kw * cin
    w2 = w.reshape(k, cout)
    accumulate = bool(a.flags & FLAG_ACCUMULATE)
    bias = vec(job.sram[cmd.core], a.bias, np.float32, cout) if a.bias != NONE_ADDR else None
    pointwise = kh == kw == 1 and a.stride == (1, 1) and not any(a.pad)
    rows = oh if pointwise else max(1, min(oh, IM2COL_ELEMENTS // max(1, ow * k)))
    windows = None if pointwise else _windows(x, a, oh, ow, kh, kw)
    for dst, cols, m in _tiles(x, windows, out, rows, pointwise, kh, kw):
        if accumulate:
            tmp = _scratch.get("acc", (m, cout))
            np.matmul(cols, w2, out=tmp)
            dst += tmp
        else:
            np.matmul(cols, w2, out=dst)
        if bias is not None:
            dst += bias


def _conv2d_int(job, cmd, x: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """The integer, ungrouped fast path (int8/uint8 x int8 -> int32): the same
    float32 im2col GEMM as :func:`_conv2d_f32`, exact by K-chunking (see the
    module docstring), written straight into the int32 output tile.

    uint8 inputs are centred (``x - 128``, padding ``x_zp - 128``) as they are
    converted to float32, so every activation is in the int8 range and the
    exact K-chunks are int8's (1024 long):
    ``sum((x - zp) w) = sum((x - 128) w) - (zp - 128) sum(w)``.  That correction and the bias are one int32 vector
    added per output pixel; int32 adds wrap, as the accumulator does."""
    a = cmd.args
    n, oh, ow, cout = out.shape
    cin = x.shape[3]
    kh, kw = w.shape[0], w.shape[1]
    k = kh * kw * cin
    native = int_gemm.get()
    if native is not None and 0 < k <= int_gemm.MAX_K and out.size:
        _conv2d_native(job, cmd, x, w, out, native)
        return
    wf, chunks = _convert(w)
    w2 = wf.reshape(k, cout)
    centre = 128 if x.dtype == np.uint8 else 0
    x_zp = a.x_zp - centre
    corr = np.zeros(cout, np.int64)
    if x_zp:
        corr -= x_zp * _column_sums(w2)
    if a.bias != NONE_ADDR:
        corr += vec(job.sram[cmd.core], a.bias, np.int32, cout)
    corr32 = corr.astype(np.int32)     # wraps modulo 2**32, as the accumulator does
    accumulate = bool(getattr(a, "flags", 0) & FLAG_ACCUMULATE)
    pointwise = kh == kw == 1 and a.stride == (1, 1) and not any(a.pad)
    rows = oh if pointwise else max(1, min(oh, IM2COL_ELEMENTS // max(1, ow * k)))
    src, windows = x, None
    if pointwise:
        src = _scratch.get("x_int", x.shape)  # float32: the GEMM operand itself
        np.subtract(x, np.float32(centre), out=src)
    else:
        windows = _windows(x, a, oh, ow, kh, kw, fill=x_zp, name="xpad_int", shift=centre)
    for dst, cols, m in _tiles(src, windows, out, rows, pointwise, kh, kw):
        tmp = _scratch.get("acc", (m, cout))
        for j, (k0, k1) in enumerate(chunks):
            np.matmul(cols[:, k0:k1], w2[k0:k1], out=tmp)
            if j == 0 and not accumulate:
                np.copyto(dst, tmp, casting="unsafe")     # exact: |tmp| <= 2**24
            else:
                dst += tmp.astype(np.int32)
        dst += corr32


def _conv2d_native(job, cmd, x: np.ndarray, w: np.ndarray, out: np.ndarray, native) -> None:
    """:func:`_conv2d_int` on the native exact GEMM: im2col of the 8-bit input
    itself (a quarter of float32's bytes; 1x1 stride-1 unpadded convolutions use
    the input tile as it is), one GEMM per tile into int32 with the input zero
    point as the GEMM's own offset (padding holds it, so it contributes zero),
    then the same epilogue: an int32 bias add (wrapping, as the accumulator
    does)."""
    a = cmd.args
    sram = job.sram[cmd.core]
    n, oh, ow, cout = out.shape
    cin = x.shape[3]
    kh, kw = w.shape[0], w.shape[1]
    k = kh * kw * cin
    w2 = w.reshape(k, cout)
    # A copy: the bias may lie inside the output tile this conv overwrites (the numpy path
    # copies it too, and both must give the same bits).
    bias = vec(sram, a.bias, np.int32, cout).copy() if a.bias != NONE_ADDR else None
    accumulate = bool(getattr(a, "flags", 0) & FLAG_ACCUMULATE)
    pointwise = kh == kw == 1 and a.stride == (1, 1) and not any(a.pad)
    rows = oh if pointwise else max(1, min(oh, IM2COL_ELEMENTS // max(1, ow * k)))
    if pointwise:
        src, shift = _as_u8(x, "x_u8")
        windows, zp = None, a.x_zp + shift
    else:
        src, windows, zp = x, *_windows_u8(x, a, oh, ow, kh, kw)
    for dst, cols, m in _tiles(src, windows, out, rows, pointwise, kh, kw, np.uint8):
        if accumulate:
            acc = _scratch.typed("acc_i32", (m, cout), np.int32)
            native(cols, w2, acc, zp)
            dst += acc
        else:
            native(cols, w2, dst, zp)
        if bias is not None:
            dst += bias


def _windows_u8(x: np.ndarray, a, oh: int, ow: int, kh: int, kw: int):
    """(windows, zp): the convolution windows of the padded input as uint8 (int8
    flipped by ``^ 0x80``), padding holding the input zero point, and that zero
    point in the same uint8 domain."""
    (sh, sw), (dh, dw) = a.stride, a.dilation
    pt, pb, pl, pr = a.pad
    n, h, wd, c = x.shape
    zp = a.x_zp + (128 if x.dtype == np.int8 else 0)
    if pt or pb or pl or pr or x.dtype != np.uint8:
        xp = _scratch.typed("xpad_u8", (n, h + pt + pb, wd + pl + pr, c), np.uint8)
        xp[:, :pt], xp[:, pt + h:] = zp, zp
        xp[:, :, :pl], xp[:, :, pl + wd:] = zp, zp
        inner = xp[:, pt:pt + h, pl:pl + wd, :]
        if x.dtype == np.int8:
            np.bitwise_xor(x.view(np.uint8), np.uint8(0x80), out=inner)
        else:
            np.copyto(inner, x)
    else:
        xp = x
    s = xp.strides
    return as_strided(xp, (n, oh, ow, kh, kw, c),
                      (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]), writeable=False), zp



EPILOGUE_ELEMENTS = 1 << 15   # requantised at once: the float32 block stays in cache


def _convert(w: np.ndarray) -> tuple[np.ndarray, tuple]:
    """int8 weights `w` seen as [K, N]: a float32 copy in reused scratch (hot in
    cache for the GEMM), and the K-chunks exact against activations of
    magnitude <= 128 (int8, or centred uint8): 1024 long."""
    wf = _scratch.get("w_int", w.shape)
    np.copyto(wf, w, casting="unsafe")
    k = w.size // w.shape[-1]
    step = F32_EXACT // (128 * 128)
    return wf, tuple((k0, min(k, k0 + step)) for k0 in range(0, k, step))


def _column_sums(w2: np.ndarray) -> np.ndarray:
    """int64 sums over K of float32-held int8 weights [K, N]: a GEMV, exact
    while every partial sum (at most 128 K) stays within 2**24."""
    k = w2.shape[0]
    if k <= F32_EXACT // 128:
        return (_ones(k) @ w2).astype(np.int64)
    return w2.sum(axis=0, dtype=np.float64).astype(np.int64)


_ONES = np.ones(1, np.float32)


def _ones(k: int) -> np.ndarray:
    global _ONES
    if _ONES.size < k:
        _ONES = np.ones(k, np.float32)
    return _ONES[:k]


def _tiles(src: np.ndarray, windows, out: np.ndarray, rows: int, pointwise: bool, kh: int, kw: int,
           dtype=np.float32):
    """The GEMM tiles of a convolution: ``(dst, cols, m)`` per band of ``rows`` output rows of each
    image, ``dst`` the (m, cout) slice of ``out`` to write and ``cols`` the (m, k) operand: the
    input itself for a pointwise convolution, else its windows copied into reused scratch
    (of `dtype`)."""
    n, oh, ow, cout = out.shape
    cin = src.shape[3]
    for b in range(n):
        for i0 in range(0, oh, rows):
            i1 = min(oh, i0 + rows)
            m = (i1 - i0) * ow
            dst = out[b, i0:i1].reshape(m, cout)
            if pointwise:
                yield dst, src[b, i0:i1].reshape(m, cin), m
            else:
                cols6 = _scratch.typed("cols", (i1 - i0, ow, kh, kw, cin), dtype)
                np.copyto(cols6, windows[b, i0:i1])
                yield dst, cols6.reshape(m, kh * kw * cin), m


def _windows(x: np.ndarray, a, oh: int, ow: int, kh: int, kw: int, fill=0,
             name=None, shift=0) -> np.ndarray:
    """windows[n, i, j, p, q, c] = padded (x - shift)[n, i*sh + p*dh, j*sw + q*dw, c]
    (padding holds `fill`), float32; `name`: pad into that reused scratch buffer."""
    (sh, sw), (dh, dw) = a.stride, a.dilation
    pt, pb, pl, pr = a.pad
    n, h, wd, c = x.shape
    if pt or pb or pl or pr or x.dtype != np.float32:
        shape = (n, h + pt + pb, wd + pl + pr, c)
        xp = np.zeros(shape, np.float32) if name is None else _scratch.get(name, shape)
        if pt or pb or pl or pr:
            if fill or name is not None:
                xp[:, :pt], xp[:, pt + h:] = fill, fill
                xp[:, :, :pl], xp[:, :, pl + wd:] = fill, fill
        if shift:
            np.subtract(x, np.float32(shift), out=xp[:, pt:pt + h, pl:pl + wd, :])
        else:
            np.copyto(xp[:, pt:pt + h, pl:pl + wd, :], x, casting="unsafe")
    else:
        xp = x
    s = xp.strides
    return as_strided(xp, (n, oh, ow, kh, kw, c),
                      (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]), writeable=False)


def _im2col_gemm(windows: np.ndarray, w: np.ndarray, g: int, x_dtype) -> np.ndarray:
    n, oh, ow, kh, kw, _ = windows.shape
    cg, cout = w.shape[2], w.shape[3]
    m = n * oh * ow
    if g == 1:
        return _gemm_prepared(windows.reshape(m, kh * kw * cg), w.reshape(kh * kw * cg, cout), x_dtype)
    cog = cout // g
    cols = windows.reshape(m, kh, kw, g, cg).transpose(3, 0, 1, 2, 4).reshape(g, m, kh * kw * cg)
    wk = w.reshape(kh, kw, cg, g, cog).transpose(3, 0, 1, 2, 4).reshape(g, kh * kw * cg, cog)
    return _gemm_prepared(cols, wk, x_dtype).transpose(1, 0, 2).reshape(m, cout)


def _gemm_prepared(cols: np.ndarray, wk: np.ndarray, x_dtype) -> np.ndarray:
    """GEMM of float32 im2col columns; exact int64 when the source was integer."""
    if x_dtype.kind == "f":
        return np.matmul(cols, wk.astype(np.float32, copy=False))
    wf = wk.astype(np.float32)
    k = cols.shape[-1]
    step = k_chunk(x_dtype)
    if k <= step:
        return np.matmul(cols, wf).astype(np.int64)
    acc = None
    for k0 in range(0, k, step):
        part = np.matmul(cols[..., k0:k0 + step], wf[..., k0:k0 + step, :]).astype(np.int64)
        acc = part if acc is None else acc + part
    return acc


def _depthwise(windows: np.ndarray, w: np.ndarray, g: int, cout: int, is_int: bool) -> np.ndarray:
    """Per-channel convolution (one input channel per group): a
    multiply-accumulate per kernel tap, no GEMM."""
    n, oh, ow, kh, kw, cin = windows.shape
    mult = cout // g
    acc_t = np.int64 if is_int else np.float32
    wt = w.reshape(kh, kw, cin, mult).astype(acc_t)
    acc = np.zeros((n, oh, ow, cin, mult), dtype=acc_t)
    for p in range(kh):
        for q in range(kw):
            tap = windows[:, :, :, p, q, :]
            if is_int:
                tap = tap.astype(np.int64)
            acc += tap[..., None] * wt[p, q]
    return acc.reshape(n * oh * ow, cout)


EXECUTORS = {"matmul": matmul, "conv2d": conv2d, "qconv2d": qconv2d}
PREPARE = {"conv2d": _prepare_conv2d, "qconv2d": _prepare_qconv2d}
