"""requant's definition is one IEEE double product per element; the engine
computes integer -> 8-bit requantisation in float32 and recomputes only
elements near a rounding tie.  These tests aim at exactly those elements."""

import numpy as np
import pytest

from emu_harness import run_op


def ref(x, scale, zp, dtype, lo=-(1 << 31), hi=(1 << 31) - 1):
    info = np.iinfo(dtype)
    q = np.rint(x.astype(np.float64) * np.asarray(scale, np.float32).astype(np.float64)) + zp
    return np.clip(q, max(info.min, lo), min(info.max, hi)).astype(dtype)


def requant(x, scale, zp, dtype, **kw):
    per_channel = np.ndim(scale) > 0
    ins = [x] + ([np.asarray(scale, np.float32)] if per_channel else [])
    return run_op("requant", ins, [(dtype, x.shape)], lambda sb, i, o: sb.requant(
        i[0], o[0], zp=zp, **({"scale_addr": i[1].addr} if per_channel else {"scale": scale}),
        **kw), preset="server")[0]


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_products_next_to_ties_round_as_the_double_product(dtype):
    # per channel, scales chosen so x * scale lands within float32's error of
    # k + 0.5: the float32 product alone would round some of these the other way
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


def test_accumulators_beyond_float32_integers_use_the_double_path():
    # |x| >= 2**24 is not exact in float32; such a tile takes the double path
    x = np.array([[[[(1 << 24) + 1, (1 << 30) + 3, -(1 << 31), 5, (1 << 24) - 1]]]], np.int32)
    scale = np.float32(2.0 ** -25)      # (2**24 + 1) * 2**-25 = 0.5 + 2**-25: rounds up
    np.testing.assert_array_equal(requant(x, scale, 0, np.int8), ref(x, scale, 0, np.int8))
    assert requant(x, scale, 0, np.int8)[0, 0, 0, 0] == 1


def test_extreme_scales_saturate_or_vanish():
    x = np.array([[[[-7, -1, 0, 1, 7, 1 << 20]]]], np.int32)
    for scale in (np.float32(3e38), np.float32(1e-45), np.float32(2.0 ** -126)):
        np.testing.assert_array_equal(requant(x, scale, 10, np.int8), ref(x, scale, 10, np.int8))
    x8 = np.arange(-128, 128, dtype=np.int8).reshape(1, 1, 16, 16)
    np.testing.assert_array_equal(requant(x8, np.float32(0.5), -1, np.int8),
                                  ref(x8, np.float32(0.5), -1, np.int8))
