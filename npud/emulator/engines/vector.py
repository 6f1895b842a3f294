"""The vector engine: element-wise, table lookup, reductions, softmax,
normalisation, requantisation and layout moves, SRAM to SRAM.

Arithmetic rules (the ISA's, see docs/ISA.md): float tiles compute in fp32
(fp16 inputs are widened); integer tiles compute exactly in a wider type and
saturate to the output type; float -> integer conversion rounds half to even.
"""

from __future__ import annotations

from functools import lru_cache, partial

import numpy as np

from ..isa import BinaryFunc, ReduceFunc, UnaryFunc
from .common import _LIMITS as _RANGE
from .common import clip as _clip
from .common import scratch, store, vec, view

# Abramowitz & Stegun 7.1.26: |error| < 1.5e-7, below fp32 resolution near 1.
_P = 0.3275911
_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(x: np.ndarray) -> np.ndarray:
    """erf, to within 1.5e-7 absolute, computed in float64."""
    x = np.asarray(x, dtype=np.float64)
    s = np.sign(x)
    ax = np.abs(x)
    t = 1.0 / (1.0 + _P * ax)
    poly = t * (_A[0] + t * (_A[1] + t * (_A[2] + t * (_A[3] + t * _A[4]))))
    return s * (1.0 - poly * np.exp(-ax * ax))


def _wide(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind == "f":
        return x if x.dtype == np.float32 else x.astype(np.float32)
    return x.astype(np.int64 if x.dtype == np.int32 else np.int32)


_BINARY = {
    BinaryFunc.ADD: np.add, BinaryFunc.SUB: np.subtract, BinaryFunc.MUL: np.multiply,
    BinaryFunc.DIV: np.divide, BinaryFunc.MAX: np.maximum, BinaryFunc.MIN: np.minimum,
    BinaryFunc.POW: np.power, BinaryFunc.SQDIFF: lambda a, b: np.square(_bounded(a - b)),
    BinaryFunc.EQ: np.equal, BinaryFunc.LT: np.less, BinaryFunc.GT: np.greater,
    BinaryFunc.GE: np.greater_equal, BinaryFunc.LE: np.less_equal, BinaryFunc.NE: np.not_equal,
    BinaryFunc.MOD: np.mod, BinaryFunc.FMOD: np.fmod,
}
_COMPARE = frozenset({BinaryFunc.EQ, BinaryFunc.LT, BinaryFunc.GT, BinaryFunc.GE, BinaryFunc.LE,
                      BinaryFunc.NE})


def _truncating_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer division rounding toward zero (C, ONNX); a division by zero gives 0."""
    q = np.abs(a) // np.where(b == 0, 1, np.abs(b))
    return np.where(b == 0, 0, np.where((a < 0) != (b < 0), -q, q))


def _bounded(d: np.ndarray) -> np.ndarray:
    # |int32 - int32| can reach 2**32, whose square overflows int64; any
    # |d| >= 2**31 saturates the int32 result anyway.
    return np.clip(d, -(1 << 31), 1 << 31) if d.dtype == np.int64 else d


def vbinary(job, cmd) -> None:
    a = cmd.args
    sram = job.sram[cmd.core]
    x, y, out = view(sram, a.a), view(sram, a.b), view(sram, a.out)
    func = BinaryFunc(a.func)
    f = _BINARY[func]
    if func in _COMPARE:   # compared in the operands' own type: exact for every dtype
        store(out, f(x, y).astype(np.uint8))
        return
    if func == BinaryFunc.DIV and x.dtype.kind != "f":
        store(out, _truncating_div(_wide(x), _wide(y)))
        return
    if x.dtype == np.float32 and out.dtype == np.float32 and f is not _BINARY[BinaryFunc.SQDIFF]:
        f(x, y, out=out)   # numpy resolves any aliasing between x, y and out
        return
    store(out, f(_wide(x), _wide(y)))


def _sigmoid(x):
    return 0.5 * (np.tanh(0.5 * x) + 1.0)   # no overflow for large |x|


def vunary(job, cmd) -> None:
    a = cmd.args
    sram = job.sram[cmd.core]
    x, out = view(sram, a.a), view(sram, a.out)
    f, p0, p1 = UnaryFunc(a.func), a.p0, a.p1
    if f == UnaryFunc.COPY:
        store(out, x)
        return
    if x.dtype.kind != "f":
        w = _wide(x)
        if f == UnaryFunc.RELU:
            r = np.maximum(w, 0)
        elif f == UnaryFunc.CLIP:
            lo = np.rint(max(p0, -2.0 ** 40))
            hi = np.rint(min(p1, 2.0 ** 40))
            r = np.clip(w, int(lo), int(hi)) if lo <= hi else np.full_like(w, int(hi))
        elif f == UnaryFunc.NEG:
            r = np.negative(w)
        else:
            r = np.abs(w)
        store(out, r)
        return
    if x.dtype == out.dtype == np.float32 and f in (UnaryFunc.RELU, UnaryFunc.CLIP):
        # in place, one pass: a separate ReLU6 after every conv is MobileNet's second largest
        # cost (numpy's clip ufunc is min(max(x, p0), p1), NaN propagating, 6x faster than the
        # two ufuncs; a -0.0 input stays -0.0, as IEEE's max/min of equal zeros allows)
        if f == UnaryFunc.RELU:
            np.maximum(x, np.float32(0), out=out)
        else:
            _clip(x, np.float32(p0), np.float32(p1), out=out)
        return
    w = _wide(x)
    if f == UnaryFunc.RELU:
        r = np.maximum(w, np.float32(0))
    elif f == UnaryFunc.CLIP:
        r = np.minimum(np.maximum(w, np.float32(p0)), np.float32(p1))
    elif f == UnaryFunc.LEAKY_RELU:
        r = np.where(w >= 0, w, w * np.float32(p0))
    elif f == UnaryFunc.SIGMOID:
        r = _sigmoid(w)
    elif f == UnaryFunc.TANH:
        r = np.tanh(w)
    elif f == UnaryFunc.GELU:
        r = (0.5 * w.astype(np.float64) * (1.0 + erf(w * np.sqrt(0.5))))
    elif f == UnaryFunc.ERF:
        r = erf(w)
    elif f == UnaryFunc.EXP:
        r = np.exp(w)
    elif f == UnaryFunc.LOG:
        r = np.log(w)
    elif f == UnaryFunc.SQRT:
        r = np.sqrt(w)
    elif f == UnaryFunc.RSQRT:
        r = np.float32(1) / np.sqrt(w)
    elif f == UnaryFunc.RECIPROCAL:
        r = np.float32(1) / w
    elif f == UnaryFunc.NEG:
        r = np.negative(w)
    elif f == UnaryFunc.ABS:
        r = np.abs(w)
    elif f == UnaryFunc.HARDSWISH:
        r = w * np.clip(w + np.float32(3), 0, 6) / np.float32(6)
    elif f == UnaryFunc.GELU_TANH:
        v = w.astype(np.float64)
        r = 0.5 * v * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v ** 3)))
    elif f == UnaryFunc.HARDSIGMOID:
        r = np.clip(np.float32(p0) * w + np.float32(p1), 0, 1)
    elif f == UnaryFunc.TRUNC:
        r = np.trunc(w)
    else:  # pragma: no cover - the validator admits only the functions above
        raise AssertionError(f)
    store(out, r)


def select(job, cmd) -> None:
    a = cmd.args
    sram = job.sram[cmd.core]
    c, x, y, out = view(sram, a.cond), view(sram, a.a), view(sram, a.b), view(sram, a.out)
    r = np.where(c != 0, x, y)       # reads every input before out is written
    store(out, r)


def lut(job, cmd) -> None:
    a = cmd.args
    sram = job.sram[cmd.core]
    x, out = view(sram, a.a), view(sram, a.out)
    table = vec(sram, a.table, out.dtype, 256)
    idx = x.view(np.uint8)
    if x.dtype == np.int8:
        idx = idx ^ np.uint8(0x80)   # two's complement -> offset binary: a + 128
    np.take(table, idx, out=out)


def _axes(mask: int) -> tuple[int, ...]:
    return tuple(d for d in range(4) if mask >> d & 1)


def reduce(job, cmd) -> None:
    a = cmd.args
    sram = job.sram[cmd.core]
    x, out = view(sram, a.a), view(sram, a.out)
    axes, f = _axes(a.axes), ReduceFunc(a.func)
    if f == ReduceFunc.MAX:
        r = x.max(axis=axes, keepdims=True)
    elif f == ReduceFunc.MIN:
        r = x.min(axis=axes, keepdims=True)
    elif x.dtype.kind == "f":
        r = x.sum(axis=axes, keepdims=True, dtype=np.float32)
        if f == ReduceFunc.MEAN:
            r = r / np.float32(x.size // r.size)
    else:
        r = x.sum(axis=axes, keepdims=True, dtype=np.int64)
        if f == ReduceFunc.MEAN:
            r = r / (x.size // r.size)   # float64: exact enough to round the quotient correctly
    store(out, r)


def softmax(job, cmd) -> None:
    a = cmd.args
    sram = job.sram[cmd.core]
    x = _wide(view(sram, a.a))
    e = np.exp(x - x.max(axis=a.axis, keepdims=True))
    e /= e.sum(axis=a.axis, keepdims=True)
    store(view(sram, a.out), e)


def norm(job, cmd) -> None:
    a = cmd.args
    sram = job.sram[cmd.core]
    x = _wide(view(sram, a.a))
    axes = _axes(a.axes)
    mean = x.mean(axis=axes, keepdims=True)
    d = x - mean
    var = np.mean(d * d, axis=axes, keepdims=True)
    r = d / np.sqrt(var + np.float32(a.eps))
    c = x.shape[3]
    if a.gamma != 0xFFFF_FFFF:
        r *= vec(sram, a.gamma, np.float32, c)
    if a.beta != 0xFFFF_FFFF:
        r += vec(sram, a.beta, np.float32, c)
    store(view(sram, a.out), r)


def requant(job, cmd) -> None:
    a = cmd.args
    sram = job.sram[cmd.core]
    x, out = view(sram, a.a), view(sram, a.out)
    c = x.shape[3]
    scale = (vec(sram, a.scale_addr, np.float32, c).copy()
             if a.scale_addr != 0xFFFF_FFFF else np.float32(a.scale))
    zp = vec(sram, a.zp_addr, np.int32, c).copy() if a.zp_addr != 0xFFFF_FFFF else a.zp
    lo, hi = _RANGE[out.dtype]
    lo, hi = max(lo, a.lo), min(hi, a.hi)
    if out.dtype.itemsize == 1:
        _requant8(x, out, scale, zp, lo, hi)
    else:
        requantize(x, out, scale.astype(np.float64), np.asarray(zp, np.float64), lo, hi)


_BLOCK = 1 << 15     # elements requantised at once: the float32 block stays in cache


def _requant8(x: np.ndarray, out: np.ndarray, scale, zp, lo: int, hi: int) -> None:
    """:func:`requantize` into an 8-bit `out`, in float32 blocks: the product is one
    IEEE single product of fp32(x) and the fp32 scale, as onnxruntime's int8 kernels
    compute it (MlasRequantizeOutput; a double product would round values within
    float32's error of a tie the other way, and a deep network, MobileNetV2,
    amplifies those steps to several percent of its output).  Every later step is
    exact in float32 or ends saturated (a rounded product beyond 2**24 is far
    outside [lo, hi])."""
    c = x.shape[-1]
    src, dst = x.reshape(-1, c), out.reshape(-1, c)
    rows = max(1, _BLOCK // c)
    buf = scratch.get("rq8", (min(rows, src.shape[0]), c))
    per_channel_zp = np.ndim(zp) > 0
    zp32 = np.asarray(zp, np.float32)
    for i in range(0, src.shape[0], rows):
        r = buf[:src[i:i + rows].shape[0]]
        np.multiply(src[i:i + rows], scale, out=r, dtype=np.float32)
        np.rint(r, out=r)
        if x.dtype.kind == "f" or per_channel_zp:
            r += zp32
            if x.dtype.kind == "f":    # NaN has no integer value: 0 (then clamped)
                np.copyto(r, 0, where=np.isnan(r, out=scratch.typed("rq8_nan", r.shape, bool)))
            _clip(r, np.float32(lo), np.float32(hi), out=r)
        else:   # clamp before adding the (integer) zero point: exact, whatever the product
            _clip(r, np.float32(lo - zp), np.float32(hi - zp), out=r)
            if zp:
                r += zp32
        np.copyto(dst[i:i + rows], r, casting="unsafe")


def requantize(x: np.ndarray, out: np.ndarray, scale, zp, lo: int, hi: int) -> None:
    """out = clamp(round_half_even(x * scale) + zp, lo, hi) into an int32 `out`: `scale`
    float64 (an fp32 value, scalar or per channel), `zp` float64 (an integer); the product
    is exact in double (8-bit outputs: :func:`_requant8`'s single product)."""
    r = np.multiply(x, scale, dtype=np.float64)
    np.rint(r, out=r)
    if x.dtype.kind == "f":
        r += zp
        np.nan_to_num(r, copy=False, nan=0.0)   # NaN has no integer value: 0 (then clamped)
        np.clip(r, lo, hi, out=r)
        np.copyto(out, r, casting="unsafe")
    elif np.ndim(zp):
        r += zp
        np.clip(r, lo, hi, out=r)
        np.copyto(out, r, casting="unsafe")
    else:   # clamp before adding the (integer) zero point: one pass fewer
        np.clip(r, lo - zp, hi - zp, out=r)
        np.add(r, zp, out=out, casting="unsafe")


# Dequantised magnitudes are at most 255 * scale; below this scale none can
# overflow float32, so no inf - inf (or 0 * inf) NaN can arise.
_NO_INF_SCALE = 2.0 ** 100


def _dequant(x: np.ndarray, scale: float, zp: int, out: np.ndarray) -> np.ndarray:
    """float32((x - zp) * scale): ONNX DequantizeLinear (the subtraction is exact)."""
    if zp:
        np.subtract(x, np.float32(zp), out=out, dtype=np.float32)
        return np.multiply(out, np.float32(scale), out=out)
    return np.multiply(x, np.float32(scale), out=out, dtype=np.float32)


def qbinary(job, cmd) -> None:
    """out = Q(func(DQ(a), DQ(b))), every step in float32 exactly as ONNX's
    DequantizeLinear -> op -> QuantizeLinear computes it (Q divides by its
    scale), so it is bit-identical to running the three as separate float
    commands; [lo, hi] clamps the result (a fused Relu/Clip)."""
    a = cmd.args
    sram = job.sram[cmd.core]
    x, y, out = view(sram, a.a), view(sram, a.b), view(sram, a.out)
    if x.shape == y.shape == out.shape:
        # element by element: blocks whose float32 intermediates stay in cache
        xs, ys, os_ = x.reshape(-1), y.reshape(-1), out.reshape(-1)
        for i in range(0, xs.size, _QBINARY_BLOCK):
            _qbinary(a, xs[i:i + _QBINARY_BLOCK], ys[i:i + _QBINARY_BLOCK],
                     os_[i:i + _QBINARY_BLOCK])
    else:
        _qbinary(a, x, y, out)


_QBINARY_BLOCK = 1 << 16
def _prepare_qbinary(cmd, sram: np.ndarray):
    """A qbinary step: a lookup in the table of its result for every pair of input bytes
    (:func:`_qbinary_table`: the command's own arithmetic, so the same bits; 0.2 ms to make,
    once per parameter set), three cheap passes instead of about ten in float, and 3 us
    instead of 35 for a small tile; the executor where out is not a and b broadcast."""
    a = cmd.args
    x, y, out = view(sram, a.a), view(sram, a.b), view(sram, a.out)
    if np.broadcast_shapes(x.shape, y.shape) != out.shape:
        return partial(qbinary, cmd=cmd)
    table = _qbinary_table(x.dtype, y.dtype, out.dtype, a._replace(a=None, b=None, out=None))
    xs, ys = x.view(np.uint8), y.view(np.uint8)

    def step(job) -> None:
        idx = scratch.typed("qb_idx", out.shape, np.uint16)
        np.left_shift(xs, 8, out=idx, dtype=np.uint16)
        np.bitwise_or(idx, ys, out=idx)      # (x byte, y byte): read before out is written
        np.take(table, idx, out=out, mode="clip")
    return step


@lru_cache(maxsize=256)
def _qbinary_table(x_dtype, y_dtype, out_dtype, args) -> np.ndarray:
    """qbinary's result for x byte i and y byte j at index ``i << 8 | j``."""
    everything = np.arange(256, dtype=np.uint8)
    xs = np.repeat(everything, 256).view(x_dtype)
    ys = np.tile(everything, 256).view(y_dtype)
    table = np.empty(1 << 16, out_dtype)
    with np.errstate(all="ignore"):     # as in a run: overflowing scales are defined (docs/ISA.md)
        _qbinary(args, xs, ys, table)
    return table


def _qbinary(a, x: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
    if a.func == BinaryFunc.ADD and max(a.a_scale, a.b_scale) < _NO_INF_SCALE:
        return _qadd(a, x, y, out)
    dx = _dequant(x, a.a_scale, a.a_zp, scratch.get("qb_a", x.shape))
    dy = _dequant(y, a.b_scale, a.b_zp, scratch.get("qb_b", y.shape))
    r = dx if dx.shape == out.shape else scratch.get("qb_r", out.shape)
    _BINARY[BinaryFunc(a.func)](dx, dy, out=r)
    np.divide(r, np.float32(a.y_scale), out=r)
    np.rint(r, out=r)
    lo, hi = _RANGE[out.dtype]
    lo, hi = max(lo, a.lo) - a.y_zp, min(hi, a.hi) - a.y_zp
    if max(a.a_scale, a.b_scale) >= _NO_INF_SCALE:
        # NaN has no integer value: 0 after the zero point is added, as requant maps it
        np.copyto(r, np.float32(-a.y_zp), where=np.isnan(r))
    # clamp, then add the (integer) zero point: clamp(round(v) + zp) in one pass fewer
    np.clip(r, lo, hi, out=r)
    np.add(r, np.float32(a.y_zp), out=out, casting="unsafe")


def _fma(a, b, c) -> np.ndarray:
    """float32 a * b + c with one rounding, as an FMA instruction computes it (the float32 product
    is exact in float64; the float64 sum of such magnitudes is exact but in rare cases)."""
    return np.add(np.multiply(a, b, dtype=np.float64), c, dtype=np.float64).astype(np.float32)


def _qadd(a, x: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
    """Quantised Add as onnxruntime's x86 kernel computes QLinearAdd (what it runs for every QDQ
    Add): float32 scale ratios a_scale/y_scale and b_scale/y_scale, the zero points folded into
    one constant, two fused multiply-adds, round half even.  Differently rounded sums one step
    apart at a tie are amplified by deep networks (MobileNetV2's residual adds)."""
    f = np.float32
    ra, rb = f(f(a.a_scale) / f(a.y_scale)), f(f(a.b_scale) / f(a.y_scale))
    fixed = f(f(a.y_zp) - _fma(ra, f(a.a_zp), rb * f(a.b_zp)))
    # the two fused multiply-adds of _fma, in reused buffers: 8-bit x float32 products are
    # exact in float64, each sum is rounded to float32 once
    shape = np.broadcast_shapes(x.shape, y.shape)
    t = scratch.typed("qadd64", shape, np.float64)
    r = scratch.get("qadd32", shape)
    np.multiply(y, np.float64(rb), out=t)
    t += np.float64(fixed)
    np.copyto(r, t, casting="unsafe")
    np.multiply(x, np.float64(ra), out=t)
    t += r
    np.copyto(r, t, casting="unsafe")
    np.rint(r, out=r)
    lo, hi = _RANGE[out.dtype]
    np.clip(r, max(lo, a.lo), min(hi, a.hi), out=r)
    np.copyto(out, np.broadcast_to(r, out.shape), casting="unsafe")


def transpose(job, cmd) -> None:
    a = cmd.args
    sram = job.sram[cmd.core]
    np.copyto(view(sram, a.out), view(sram, a.a).transpose(a.perm))


def copy_region(job, cmd) -> None:
    a = cmd.args
    sram = job.sram[cmd.core]
    x, out = view(sram, a.a), view(sram, a.out)
    window = tuple(slice(o, o + s) for o, s in zip(a.offset, x.shape))
    np.copyto(out[window], x)


def fill(job, cmd) -> None:
    a = cmd.args
    store(view(job.sram[cmd.core], a.out), np.asarray(a.value, dtype=np.float64))


EXECUTORS = {"vbinary": vbinary, "vunary": vunary, "lut": lut, "reduce": reduce,
             "softmax": softmax, "norm": norm, "requant": requant,
             "transpose": transpose, "copy_region": copy_region, "fill": fill,
             "select": select, "qbinary": qbinary}
PREPARE = {"qbinary": _prepare_qbinary}
