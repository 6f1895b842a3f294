"""requant's definition into 8 bits is one IEEE single product per element, fp32(a) * the fp32
scale, as onnxruntime's int8 kernels compute it (int32 results: one double product).  These
tests aim at the elements where the two products round differently: next to a rounding tie."""

import numpy as np
import pytest

from emu_harness import run_op


def ref(x, scale, zp, dtype, lo=-(1 << 31), hi=(1 << 31) - 1):
    info = np.iinfo(dtype)
    if np.dtype(dtype).itemsize == 1:
        with np.errstate(over="ignore"):     # an overflowing product saturates
            q = np.rint(x.astype(np.float32) * np.asarray(scale, np.float32)).astype(np.float64)
        q += zp
    else:
        q = np.rint(x.astype(np.float64) * np.asarray(scale, np.float32).astype(np.float64)) + zp
    return np.clip(q, max(info.min, lo), min(info.max, hi)).astype(dtype)


def requant(x, scale, zp, dtype, **kw):
    per_channel = np.ndim(scale) > 0
    ins = [x] + ([np.asarray(scale, np.float32)] if per_channel else [])
    return run_op("requant", ins, [(dtype, x.shape)], lambda sb, i, o: sb.requant(
        i[0], o[0], zp=zp, **({"scale_addr": i[1].addr} if per_channel else {"scale": scale}),
        **kw), preset="server")[0]


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_products_next_to_ties_round_as_the_float32_product(dtype):
    # per channel, scales chosen so x * scale lands within float32's error of
    # k + 0.5: the double product would round some of these the other way
    rng = np.random.default_rng(1)
    c = 64
    x = rng.integers(-(1 << 24) + 1, 1 << 24, (1, 64, 32, c), dtype=np.int32)
    x[0, 0, 0] = (1 << 24) - 1
    k = rng.integers(-140, 140, c) + 0.5
    scale = (k / x[0, 0, 1].astype(np.float64)).astype(np.float32)
    scale = np.abs(scale) + np.float32(1e-30)
    x[0, :, 1] = x[0, 0, 1]             # a whole row per tie
    zp = 3 if dtype == np.int8 else 128
    np.testing.assert_array_equal(requant(x, scale, zp, dtype), ref(x, scale, zp, dtype))


def test_random_scales_and_clamps():
    rng = np.random.default_rng(2)
    x = rng.integers(-(1 << 20), 1 << 20, (2, 33, 17, 24), dtype=np.int32)
    scale = (2.0 ** rng.uniform(-22, -8, 24)).astype(np.float32)
    got = requant(x, scale, -5, np.int8, lo=-5, hi=90)
    np.testing.assert_array_equal(got, ref(x, scale, -5, np.int8, lo=-5, hi=90))
    got = requant(x, np.float32(3.1e-5), 7, np.uint8)
    np.testing.assert_array_equal(got, ref(x, np.float32(3.1e-5), 7, np.uint8))


def test_accumulators_beyond_float32_integers_round_as_float32():
    # |x| >= 2**24 is not exact in float32: fp32(2**24 + 1) = 2**24, as onnxruntime converts it
    x = np.array([[[[(1 << 24) + 1, (1 << 30) + 3, -(1 << 31), 5, (1 << 24) - 1]]]], np.int32)
    scale = np.float32(2.0 ** -25)      # 2**24 * 2**-25 = 0.5: rounds to even
    np.testing.assert_array_equal(requant(x, scale, 0, np.int8), ref(x, scale, 0, np.int8))
    assert requant(x, scale, 0, np.int8)[0, 0, 0, 0] == 0
    # into int32 the product stays exact: (2**24 + 1) * 2**-25 = 0.5 + 2**-25 rounds up
    assert requant(x, scale, 0, np.int32)[0, 0, 0, 0] == 1


def test_extreme_scales_saturate_or_vanish():
    x = np.array([[[[-7, -1, 0, 1, 7, 1 << 20]]]], np.int32)
    for scale in (np.float32(3e38), np.float32(1e-45), np.float32(2.0 ** -126)):
        np.testing.assert_array_equal(requant(x, scale, 10, np.int8), ref(x, scale, 10, np.int8))
    x8 = np.arange(-128, 128, dtype=np.int8).reshape(1, 1, 16, 16)
    np.testing.assert_array_equal(requant(x8, np.float32(0.5), -1, np.int8),
                                  ref(x8, np.float32(0.5), -1, np.int8))


@pytest.mark.parametrize("dtype,zp,lo,hi", [(np.uint8, 7, -(1 << 31), (1 << 31) - 1),
                                            (np.int8, -3, -100, 50), (np.uint8, 0, 5, 200)])
def test_quantising_floats_nan_and_infinities(dtype, zp, lo, hi):
    # NaN has no integer value: 0 in the output domain, then clamped; infinities saturate
    x = np.array([[[[np.nan, np.inf, -np.inf, 3e38, -3e38, 0.49, -2.5, 1e9]]]], np.float32)
    got = requant(x, np.float32(1.5), zp, dtype, lo=lo, hi=hi)
    info = np.iinfo(dtype)
    lo, hi = max(lo, info.min), min(hi, info.max)
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.rint(x * np.float32(1.5)).astype(np.float64) + zp
    q[0, 0, 0, 0] = 0
    np.testing.assert_array_equal(got, np.clip(q, lo, hi).astype(dtype))
