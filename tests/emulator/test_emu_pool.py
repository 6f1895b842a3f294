"""Pooling engine against a plain-loop reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emu_harness import run_op


def ref_pool(x, func, kernel, stride, pad, count_include_pad):
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), (pt, pb, pl, pr) = kernel, stride, pad
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    out = np.zeros((n, oh, ow, c), np.float64)
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * sh - pt, j * sw - pl
            win = x[:, max(r0, 0):min(r0 + kh, h), max(c0, 0):min(c0 + kw, w), :].astype(np.float64)
            if func == "max":
                out[:, i, j] = win.max(axis=(1, 2))
            else:
                cnt = kh * kw if count_include_pad else win.shape[1] * win.shape[2]
                out[:, i, j] = win.sum(axis=(1, 2)) / cnt
    if x.dtype.kind != "f":
        info = np.iinfo(x.dtype)
        out = np.clip(np.rint(out), info.min, info.max)   # rint: half to even
    return out.astype(x.dtype)


def pool(x, func, kernel, stride=(1, 1), pad=(0, 0, 0, 0), cip=False):
    ref = ref_pool(x, func, kernel, stride, pad, cip)
    got = run_op("pool", [x], [(x.dtype, ref.shape)], lambda sb, i, o: sb.pool(
        func, i[0], o[0], kernel=kernel, stride=stride, pad=pad, count_include_pad=cip))[0]
    return got, ref


@pytest.mark.parametrize("func", ["max", "avg"])
@pytest.mark.parametrize("dtype", [np.float32, np.int8, np.uint8])
@pytest.mark.parametrize("geom", [
    dict(kernel=(2, 2), stride=(2, 2)),
    dict(kernel=(3, 3), stride=(2, 2), pad=(1, 1, 1, 1)),
    dict(kernel=(3, 2), stride=(1, 2), pad=(2, 0, 0, 1)),
    dict(kernel=(3, 3), stride=(1, 1), pad=(1, 1, 1, 1), cip=True),
])
def test_pool(func, dtype, geom):
    rng = np.random.default_rng(0)
    if dtype == np.float32:
        x = rng.standard_normal((2, 7, 6, 3)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max + 1, (2, 7, 6, 3), dtype=dtype)
    got, ref = pool(x, func, **geom)
    if dtype == np.float32:
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, ref)


def test_int_average_rounds_half_to_even():
    # windows of two: (1+2)/2 = 1.5 -> 2, (2+3)/2 = 2.5 -> 2, (-1-2)/2 = -1.5 -> -2, (-3 -2)/2 -> -2
    x = np.array([1, 2, 2, 3, -1, -2, -3, -2], np.int8).reshape(1, 1, 8, 1)
    got, ref = pool(x, "avg", (1, 2), (1, 2))
    np.testing.assert_array_equal(got.ravel(), [2, 2, -2, -2])
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("func", ["max", "avg"])
def test_global_pool(func):
    rng = np.random.default_rng(5)
    x = rng.integers(-128, 128, (2, 7, 7, 16), dtype=np.int8)
    got = run_op("pool", [x], [(np.int8, (2, 1, 1, 16))],
                 lambda sb, i, o: sb.global_pool(func, i[0], o[0]))[0]
    np.testing.assert_array_equal(got, ref_pool(x, func, (7, 7), (1, 1), (0, 0, 0, 0), False))


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_pool_property(data):
    d = data.draw
    kh, kw = d(st.integers(1, 3)), d(st.integers(1, 3))
    pad = (d(st.integers(0, kh - 1)), d(st.integers(0, kh - 1)),
           d(st.integers(0, kw - 1)), d(st.integers(0, kw - 1)))
    h, w = d(st.integers(kh, 7)), d(st.integers(kw, 7))
    x = np.random.default_rng(d(st.integers(0, 1000))).integers(-128, 128, (1, h, w, 2), dtype=np.int8)
    got, ref = pool(x, d(st.sampled_from(["max", "avg"])), (kh, kw),
                    (d(st.integers(1, 3)), d(st.integers(1, 3))), pad, d(st.booleans()))
    np.testing.assert_array_equal(got, ref)
