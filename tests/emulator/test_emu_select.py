"""Comparisons (vbinary eq/lt/gt), select and gelu_tanh against plain numpy references."""

import numpy as np
import pytest

from emu_harness import Rig, run_op
from npud.emulator.errors import StreamError
from npud.emulator.isa import tile
from npud.emulator.validator import validate

REFS = {"eq": np.equal, "lt": np.less, "gt": np.greater}


@pytest.mark.parametrize("func", sorted(REFS))
def test_compare_float_broadcast_gives_one_or_zero(func):
    rng = np.random.default_rng(3)
    a = rng.integers(-2, 3, (2, 3, 4)).astype(np.float32)
    b = rng.integers(-2, 3, (1, 3, 1)).astype(np.float32)
    a[0, 0, 0], b[0, 0, 0] = np.nan, 0.0      # NaN compares false, even to itself
    shape = np.broadcast_shapes(a.shape, b.shape)
    got = run_op("vbinary", [a, b], [(np.float32, shape)],
                 lambda sb, i, o: sb.vbinary(func, i[0], i[1], o[0]))[0].reshape(shape)
    np.testing.assert_array_equal(got, REFS[func](a, b).astype(np.float32))


@pytest.mark.parametrize("func", sorted(REFS))
@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32])
def test_compare_integer_exact(func, dtype):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(4)
    a = rng.integers(info.min, info.max + 1, (5, 7), dtype=dtype)
    b = a.copy()
    b[::2] = rng.integers(info.min, info.max + 1, (3, 7), dtype=dtype)
    a[0, 0], b[0, 0] = info.max, info.max - 1   # differs by one at the top of the range
    got = run_op("vbinary", [a, b], [(dtype, a.shape)],
                 lambda sb, i, o: sb.vbinary(func, i[0], i[1], o[0]))[0].reshape(a.shape)
    np.testing.assert_array_equal(got, REFS[func](a, b).astype(dtype))


def test_select_broadcasts_all_three():
    rng = np.random.default_rng(5)
    cond = (rng.random((2, 1, 4)) > 0.5).astype(np.float32)
    a = rng.standard_normal((1, 3, 4)).astype(np.float32)
    b = rng.standard_normal((2, 3, 1)).astype(np.float32)
    shape = (2, 3, 4)
    got = run_op("select", [cond, a, b], [(np.float32, shape)],
                 lambda sb, i, o: sb.select(i[0], i[1], i[2], o[0]))[0].reshape(shape)
    np.testing.assert_array_equal(got, np.where(cond != 0, a, b))


def test_select_uint8_mask_and_int8_values_in_place():
    cond = np.array([0, 1, 2, 0, 255], np.uint8)
    a = np.array([1, 2, 3, 4, 5], np.int8)
    b = np.array([-1, -2, -3, -4, -5], np.int8)
    # out aliases a: every input is read before out is written
    got = run_op("select", [cond, a, b], [],
                 lambda sb, i, o: sb.select(i[0], i[1], i[2], i[1]))
    assert got == []
    got = run_op("select", [cond, a, b], [(np.int8, (5,))],
                 lambda sb, i, o: sb.select(i[0], i[1], i[2], o[0]))[0].reshape(5)
    np.testing.assert_array_equal(got, [-1, 2, 3, -4, 5])


def test_gelu_tanh():
    x = np.linspace(-6, 6, 97, dtype=np.float32)
    got = run_op("vunary", [x], [(np.float32, x.shape)],
                 lambda sb, i, o: sb.vunary("gelu_tanh", i[0], o[0]))[0].reshape(x.shape)
    v = x.astype(np.float64)
    want = 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shapes,why", [
    (((2, 4), (3, 4), (1, 4), (3, 4)), "does not broadcast"),
    (((1, 4), (3, 4), (3, 4), (3, 5)), "expected the broadcast shape"),
])
def test_select_validator_refuses_bad_shapes(shapes, why):
    rig = Rig()
    sb = rig.builder()
    addr = 0
    tiles = []
    for s in shapes:
        tiles.append(tile(addr, "fp32", s))
        addr += 4096
    sb.select(*tiles)
    sb.end()
    with pytest.raises(StreamError, match=why):
        validate(sb.build(), rig.cfg, [])


def test_select_validator_refuses_mixed_value_dtypes():
    rig = Rig()
    sb = rig.builder()
    sb.select(tile(0, "fp32", (4,)), tile(64, "fp32", (4,)), tile(128, "int8", (4,)),
              tile(192, "fp32", (4,)))
    sb.end()
    with pytest.raises(StreamError, match="dtype"):
        validate(sb.build(), rig.cfg, [])
