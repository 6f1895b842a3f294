"""Vector engine ops against plain numpy references."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emu_harness import run_op


def sat(x, dtype):
    info = np.iinfo(dtype)
    return np.clip(x, info.min, info.max).astype(dtype)


def binop(func, a, b, out_dtype):
    out_shape = np.broadcast_shapes(a.shape, b.shape)
    return run_op("vbinary", [a, b], [(out_dtype, out_shape)],
                  lambda sb, i, o: sb.vbinary(func, i[0], i[1], o[0]))[0].reshape(out_shape)


def test_add_fp32_broadcast():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    b = rng.standard_normal((1, 3, 1, 5)).astype(np.float32)
    np.testing.assert_array_equal(binop("add", a, b, np.float32), a + b)


def test_add_int8_saturates_and_widens():
    a = np.array([100, -100, 127, -128, 5], np.int8)
    b = np.array([100, -100, 1, -1, -7], np.int8)
    np.testing.assert_array_equal(binop("add", a, b, np.int8), [127, -128, 127, -128, -2])
    np.testing.assert_array_equal(binop("add", a, b, np.int32), [200, -200, 128, -129, -2])


def test_add_int32_saturates():
    a = np.array([2**31 - 1, -2**31, 10], np.int32)
    b = np.array([1, -1, -20], np.int32)
    np.testing.assert_array_equal(binop("add", a, b, np.int32), [2**31 - 1, -2**31, -10])


@pytest.mark.parametrize("func,ref", [
    ("sub", lambda a, b: a - b), ("mul", lambda a, b: a * b), ("div", lambda a, b: a / b),
    ("max", np.maximum), ("min", np.minimum), ("sqdiff", lambda a, b: (a - b) ** 2),
    ("pow", lambda a, b: np.abs(a) ** b),
])
def test_binary_float(func, ref):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 1, 4)).astype(np.float32)
    b = rng.standard_normal((1, 5, 4)).astype(np.float32)
    if func == "pow":
        a = np.abs(a)
    want = ref(a.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(binop(func, a, b, np.float32), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("func,ref", [
    ("sub", lambda a, b: a - b), ("mul", lambda a, b: a * b), ("max", np.maximum),
    ("min", np.minimum), ("sqdiff", lambda a, b: (a - b) ** 2),
])
@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32])
def test_binary_int_saturating(func, ref, dtype):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(2)
    a = rng.integers(info.min, info.max + 1, (4, 6), dtype=dtype)
    b = rng.integers(info.min, info.max + 1, (1, 6), dtype=dtype)
    a[0, 0], b[0, 0] = info.max, info.min
    want = ref(a.astype(object), b.astype(object))
    want = np.array([[min(max(int(v), info.min), info.max) for v in row] for row in want])
    np.testing.assert_array_equal(binop(func, a, b, dtype), want)


def unop(func, x, out_dtype=None, p0=0.0, p1=0.0):
    return run_op("vunary", [x], [(out_dtype or x.dtype, x.shape)],
                  lambda sb, i, o: sb.vunary(func, i[0], o[0], p0, p1))[0].reshape(x.shape)


_erf = np.vectorize(math.erf)
FLOAT_UNARY = {
    "relu": lambda x: np.maximum(x, 0),
    "clip": lambda x: np.clip(x, -0.5, 0.75),
    "leaky_relu": lambda x: np.where(x >= 0, x, 0.1 * x),
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "tanh": np.tanh,
    "gelu": lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
    "erf": _erf,
    "exp": np.exp,
    "log": lambda x: np.log(np.abs(x) + 0.1),
    "sqrt": lambda x: np.sqrt(np.abs(x)),
    "rsqrt": lambda x: 1 / np.sqrt(np.abs(x) + 0.1),
    "reciprocal": lambda x: 1 / x,
    "neg": lambda x: -x,
    "abs": np.abs,
    "hardswish": lambda x: x * np.clip(x + 3, 0, 6) / 6,
    "hardsigmoid": lambda x: np.clip(0.2 * x + 0.5, 0, 1),
}
PARAMS = {"clip": (-0.5, 0.75), "leaky_relu": (0.1, 0), "hardsigmoid": (0.2, 0.5)}


@pytest.mark.parametrize("func", sorted(FLOAT_UNARY))
def test_unary_float(func):
    x = np.linspace(-6, 6, 97, dtype=np.float32).reshape(1, 97)
    if func in ("log", "sqrt"):
        x = np.abs(x) + (0.1 if func == "log" else 0)
    if func == "rsqrt":
        x = np.abs(x) + np.float32(0.1)
    if func == "reciprocal":
        x = x + np.float32(0.05)
    ref = {"log": np.log, "sqrt": np.sqrt, "rsqrt": lambda v: 1 / np.sqrt(v)}.get(func, FLOAT_UNARY[func])
    got = unop(func, x, None, *PARAMS.get(func, (0, 0)))
    np.testing.assert_allclose(got, ref(x.astype(np.float64)), rtol=2e-6, atol=3e-7)


@pytest.mark.parametrize("p0,p1", [(0.0, 6.0), (-0.5, 0.75), (2.0, 1.0)])
def test_clip_and_relu_fp32_special_values(p0, p1):
    # NaN propagates, infinities clamp, p0 > p1 gives p1 (min(max(x, p0), p1)), in place too
    x = np.array([[np.nan, np.inf, -np.inf, -0.0, 0.0, 7.0, -1.0, 0.3, 3e38]], np.float32)
    with np.errstate(invalid="ignore"):
        want = np.minimum(np.maximum(x, np.float32(p0)), np.float32(p1))
    np.testing.assert_array_equal(unop("clip", x, None, p0, p1), want)
    np.testing.assert_array_equal(unop("relu", x), np.maximum(x, np.float32(0)))


def test_unary_sigmoid_extremes_and_fp16():
    x = np.array([-1000, -90, 0, 90, 1000], np.float32)
    np.testing.assert_allclose(unop("sigmoid", x), [0, 0, 0.5, 1, 1], atol=1e-30)
    h = np.linspace(-3, 3, 11).astype(np.float16)
    np.testing.assert_allclose(unop("tanh", h), np.tanh(h.astype(np.float64)), rtol=1e-3, atol=1e-3)


def test_unary_integer_and_conversions():
    x = np.array([-128, -5, 0, 7, 127], np.int8)
    np.testing.assert_array_equal(unop("relu", x), [0, 0, 0, 7, 127])
    np.testing.assert_array_equal(unop("clip", x, None, -6, 6.4), [-6, -5, 0, 6, 6])
    np.testing.assert_array_equal(unop("neg", x), [127, 5, 0, -7, -127])
    np.testing.assert_array_equal(unop("abs", x), [127, 5, 0, 7, 127])
    np.testing.assert_array_equal(unop("copy", x, np.float32), x.astype(np.float32))
    f = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 300.0, -1e9, 126.5], np.float32)
    np.testing.assert_array_equal(unop("copy", f, np.int8), [0, 2, 2, 0, -2, 127, -128, 126])
    np.testing.assert_array_equal(unop("copy", f, np.uint8), [0, 2, 2, 0, 0, 255, 0, 126])


def test_lut_int8_and_uint8():
    rng = np.random.default_rng(3)
    x = np.arange(-128, 128, dtype=np.int8)
    table = rng.integers(-128, 128, 256, dtype=np.int8)
    got = run_op("lut", [x, table], [(np.int8, x.shape)],
                 lambda sb, i, o: sb.lut(i[0], i[1].addr, o[0]))[0].ravel()
    np.testing.assert_array_equal(got, table[x.astype(np.int32) + 128])
    u = rng.integers(0, 256, 50, dtype=np.uint8)
    tu = rng.integers(0, 256, 256, dtype=np.uint8)
    got = run_op("lut", [u, tu], [(np.uint8, u.shape)],
                 lambda sb, i, o: sb.lut(i[0], i[1].addr, o[0]))[0].ravel()
    np.testing.assert_array_equal(got, tu[u])


@pytest.mark.parametrize("func", ["sum", "mean", "max", "min"])
@pytest.mark.parametrize("axes", [(3,), (1, 2), (0, 1, 2, 3)])
def test_reduce(func, axes):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    oshape = tuple(1 if d in axes else s for d, s in enumerate(x.shape))
    got = run_op("reduce", [x], [(np.float32, oshape)],
                 lambda sb, i, o: sb.reduce(func, axes, i[0], o[0]))[0]
    ref = getattr(np, func)(x.astype(np.float64), axis=axes, keepdims=True)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_reduce_int_mean_rounds_half_even_and_saturates():
    x = np.array([[1, 2], [2, 3], [-1, -2], [127, 127]], np.int8).reshape(1, 1, 4, 2)
    got = run_op("reduce", [x], [(np.int8, (1, 1, 4, 1))],
                 lambda sb, i, o: sb.reduce("mean", (3,), i[0], o[0]))[0].ravel()
    np.testing.assert_array_equal(got, [2, 2, -2, 127])
    got = run_op("reduce", [x], [(np.int8, (1, 1, 4, 1))],
                 lambda sb, i, o: sb.reduce("sum", (3,), i[0], o[0]))[0].ravel()
    np.testing.assert_array_equal(got, [3, 5, -3, 127])


@pytest.mark.parametrize("axis", [1, 3])
def test_softmax(axis):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 3, 4, 5)) * 30).astype(np.float32)
    got = run_op("softmax", [x], [(np.float32, x.shape)],
                 lambda sb, i, o: sb.softmax(i[0], o[0], axis=axis))[0]
    e = np.exp(x.astype(np.float64) - x.max(axis=axis, keepdims=True))
    np.testing.assert_allclose(got, e / e.sum(axis=axis, keepdims=True), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("axes,affine", [((3,), True), ((1, 2), True), ((1, 2, 3), False)])
def test_norm(axes, affine):
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((2, 3, 4, 6)) * 5 + 3).astype(np.float32)
    gamma = rng.standard_normal(6).astype(np.float32)
    beta = rng.standard_normal(6).astype(np.float32)
    got = run_op("norm", [x, gamma, beta], [(np.float32, x.shape)], lambda sb, i, o: sb.norm(
        i[0], o[0], axes=axes, eps=1e-3, gamma=i[1].addr if affine else None,
        beta=i[2].addr if affine else None))[0]
    xd = x.astype(np.float64)
    mean = xd.mean(axis=axes, keepdims=True)
    ref = (xd - mean) / np.sqrt(((xd - mean) ** 2).mean(axis=axes, keepdims=True) + np.float32(1e-3))
    if affine:
        ref = ref * gamma + beta
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def ref_requant(x, scale, zp, dtype):
    """docs/ISA.md's requant: into 8 bits the product is fp32(x) * the fp32 scale in float32."""
    info = np.iinfo(dtype)
    out = []
    for v, s, z in np.broadcast(x.astype(np.float64), np.float32(scale), zp):
        r = float(np.float32(v) * s) if info.bits == 8 else float(v) * float(s)
        fl = math.floor(r)
        rounded = fl + 1 if r - fl > 0.5 or (r - fl == 0.5 and fl % 2) else fl  # half to even
        out.append(min(max(rounded + int(z), info.min), info.max))
    return np.array(out).reshape(x.shape)


def test_requant_per_tensor_ties_and_saturation():
    x = np.array([5, 15, 25, -5, -15, 10000, -10000, 3], np.int32)
    got = run_op("requant", [x], [(np.int8, x.shape)],
                 lambda sb, i, o: sb.requant(i[0], o[0], scale=0.1, zp=0))[0].ravel()
    # 0.1 is not exact in fp32: 5*0.1f is 0.50000000745, but its float32 product is 0.5 and
    # rounds to even, as onnxruntime's does: compare to the documented (float32) product.
    np.testing.assert_array_equal(got, ref_requant(x, np.float32(0.1), 0, np.int8))
    x = np.array([1, 3, 5, -1, -3, -5, 7], np.int32)  # x * 0.5: exact ties
    got = run_op("requant", [x], [(np.int8, x.shape)],
                 lambda sb, i, o: sb.requant(i[0], o[0], scale=0.5, zp=10))[0].ravel()
    np.testing.assert_array_equal(got, np.array([0, 2, 2, 0, -2, -2, 4]) + 10)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_requant_per_channel(dtype):
    rng = np.random.default_rng(8)
    x = rng.integers(-2**20, 2**20, (2, 3, 3, 4), dtype=np.int32)
    scale = np.array([1e-4, 3.3e-5, 0.5, 2e-3], np.float32)
    zp = np.array([0, -3, 7, 100], np.int32)
    got = run_op("requant", [x, scale, zp], [(dtype, x.shape)], lambda sb, i, o: sb.requant(
        i[0], o[0], scale_addr=i[1].addr, zp_addr=i[2].addr))[0]
    np.testing.assert_array_equal(got, ref_requant(x, scale, zp, dtype))


def test_requant_clamp_bounds_fold_relu_and_clip():
    x = np.array([-300, -40, -1, 0, 1, 37, 90, 2000], np.int32)
    # a fused Relu: lo = zp; a fused Clip(0, 6) with scale 0.1, zp -5: [-5, 55]
    got = run_op("requant", [x], [(np.int8, x.shape)], lambda sb, i, o: sb.requant(
        i[0], o[0], scale=0.5, zp=-5, lo=-5, hi=55))[0].ravel()
    want = np.clip(ref_requant(x, np.float32(0.5), -5, np.int8), -5, 55)
    np.testing.assert_array_equal(got, want)
    # bounds wider than the type still saturate to the type
    got = run_op("requant", [x], [(np.uint8, x.shape)], lambda sb, i, o: sb.requant(
        i[0], o[0], scale=1.0, zp=3, lo=-1000, hi=1000))[0].ravel()
    np.testing.assert_array_equal(got, ref_requant(x, np.float32(1.0), 3, np.uint8))


def test_transpose_copy_region_fill():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.int32).reshape(2, 3, 4, 5)
    perm = (0, 3, 1, 2)
    got = run_op("transpose", [x], [(np.int32, (2, 5, 3, 4))],
                 lambda sb, i, o: sb.transpose(i[0], o[0], perm))[0]
    np.testing.assert_array_equal(got, x.transpose(perm))
    base = np.zeros((2, 4, 6, 5), np.int32)
    want = base.copy()
    want[:, 1:4, 2:6, :] = x
    got = run_op("copy_region", [x], [base], lambda sb, i, o: sb.copy_region(i[0], o[0], (0, 1, 2, 0)))[0]
    np.testing.assert_array_equal(got, want)
    got = run_op("fill", [], [(np.int8, (3, 3))], lambda sb, i, o: sb.fill(o[0], -300.0))[0].reshape(3, 3)
    np.testing.assert_array_equal(got, np.full((3, 3), -128))
    got = run_op("fill", [], [(np.float16, (2,))], lambda sb, i, o: sb.fill(o[0], 1.5))[0].ravel()
    np.testing.assert_array_equal(got, [1.5, 1.5])


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_binary_broadcast_property(data):
    d = data.draw
    shape = tuple(d(st.integers(1, 4)) for _ in range(4))
    bshape = tuple(s if d(st.booleans()) else 1 for s in shape)
    if d(st.booleans()):
        shape, bshape = bshape, shape
    dtype = d(st.sampled_from([np.int8, np.int32, np.float32]))
    rng = np.random.default_rng(d(st.integers(0, 1000)))
    if dtype == np.float32:
        a, b = (rng.standard_normal(s).astype(dtype) for s in (shape, bshape))
    else:
        info = np.iinfo(dtype)
        a, b = (rng.integers(info.min, info.max + 1, s, dtype=dtype) for s in (shape, bshape))
    want = a.astype(np.float64) + b.astype(np.float64)
    if dtype != np.float32:
        want = sat(want, dtype)
    np.testing.assert_array_equal(binop("add", a, b, dtype), want.astype(dtype))
