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
