"""dma_gather (table rows by int32 indices, out-of-range indices fail the job), the
comparisons ge/le/ne writing any dtype, mod/fmod and trunc: against numpy."""

import numpy as np
import pytest

from emu_harness import Rig, run_op
from npud.emulator.errors import IndexFault, StreamError
from npud.emulator.isa import tile


def gather(table, idx, axis=0, rig=None):
    """Run one dma_gather of `table` (float32, in device memory) along `axis` by `idx`."""
    rig = rig or Rig()
    outer = int(np.prod(table.shape[:axis]))
    rows = table.shape[axis]
    row = int(np.prod(table.shape[axis + 1:]))
    va = rig.put(table)
    idx = np.asarray(idx, np.int32)
    iva = rig.put(idx)
    out_va = rig.alloc(outer * idx.size * row * 4)
    sb = rig.builder()
    sb.dma_load(0, iva, np.int32, idx.shape)
    it = tile(0, np.int32, (idx.size,))
    sb.dma_gather(4096, va, np.float32, it, rows=rows, row=row, row_stride=row * 4,
                  outer=outer, outer_stride=rows * row * 4)
    sb.dma_store(4096, out_va, np.float32, (outer * idx.size * row,))
    sb.end()
    stats = rig.run(sb)
    got = rig.get(out_va, np.float32, table.shape[:axis] + idx.shape + table.shape[axis + 1:])
    return got, stats


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_gather_rows_any_axis_negative_indices(axis):
    table = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32)
    dim = table.shape[axis]
    idx = np.array([[0, dim - 1], [-1, -dim], [1, 1]])
    got, stats = gather(table, idx, axis)
    np.testing.assert_array_equal(got, np.take(table, np.where(idx < 0, idx + dim, idx), axis=axis))
    assert stats.dma_bytes_in > 0


@pytest.mark.parametrize("bad", [5, -6, 2**31 - 1])
def test_gather_out_of_range_fails_the_job_naming_the_index(bad):
    rig = Rig()
    table = np.arange(20, dtype=np.float32).reshape(5, 4)
    with pytest.raises(IndexFault) as e:
        gather(table, [0, bad, 1], rig=rig)
    assert e.value.code == "EINVAL" and f"index {bad} at position 1" in str(e.value)
    got, _ = gather(table, [4, 0], rig=rig)     # the device is fine afterwards
    np.testing.assert_array_equal(got, table[[4, 0]])


def test_gather_table_outside_mappings_is_refused():
    rig = Rig()
    va = rig.put(np.zeros((4, 4), np.float32))
    sb = rig.builder()
    sb.dma_gather(64, va, np.float32, tile(0, np.int32, (2,)), rows=4000, row=4, row_stride=16)
    sb.end()
    with pytest.raises(StreamError, match="not within the job's mappings"):
        rig.run(sb)


@pytest.mark.parametrize("func,ref", [("ge", np.greater_equal), ("le", np.less_equal),
                                      ("ne", np.not_equal)])
@pytest.mark.parametrize("dtype,out", [(np.int32, np.float32), (np.float32, np.float32),
                                       (np.float32, np.int32)])
def test_comparisons_write_any_dtype(func, ref, dtype, out):
    a = np.array([[1, 2, 3, -4]], dtype)
    b = np.array([[2, 2, 2, -4]], dtype)
    got = run_op("vbinary", [a, b], [(out, a.shape)],
                 lambda sb, i, o: sb.vbinary(func, i[0], i[1], o[0]))[0].reshape(a.shape)
    np.testing.assert_array_equal(got, ref(a, b).astype(out))


@pytest.mark.parametrize("func,ref", [("mod", np.mod), ("fmod", np.fmod)])
@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_mod_signs(func, ref, dtype):
    a = np.array([7, -7, 7, -7, 5], dtype)
    b = np.array([3, 3, -3, -3, 5], dtype)
    got = run_op("vbinary", [a, b], [(dtype, a.shape)],
                 lambda sb, i, o: sb.vbinary(func, i[0], i[1], o[0]))[0].reshape(a.shape)
    np.testing.assert_array_equal(got, ref(a, b))


@pytest.mark.parametrize("func", ["mod", "fmod"])
@pytest.mark.parametrize("dtype,expect", [(np.int32, 0), (np.float32, np.nan)])
def test_a_modulo_by_zero_is_zero_for_integers_and_nan_for_floats(func, dtype, expect):
    a = np.array([7, -7, 0], dtype)
    b = np.zeros(3, dtype)
    got = run_op("vbinary", [a, b], [(dtype, a.shape)],
                 lambda sb, i, o: sb.vbinary(func, i[0], i[1], o[0]))[0].reshape(a.shape)
    np.testing.assert_array_equal(got, np.full(3, expect, dtype))


def test_trunc_rounds_toward_zero():
    a = np.array([2.7, -2.7, 2.5, -0.5, 3.0], np.float32)
    got = run_op("vunary", [a], [(np.float32, a.shape)],
                 lambda sb, i, o: sb.vunary("trunc", i[0], o[0]))[0].reshape(a.shape)
    np.testing.assert_array_equal(got, np.trunc(a))


def test_integer_div_truncates_toward_zero_and_by_zero_gives_zero():
    a = np.array([7, -7, 7, -7, 5, -(2**31)], np.int32)
    b = np.array([2, 2, -2, -2, 0, -1], np.int32)
    got = run_op("vbinary", [a, b], [(np.int32, a.shape)],
                 lambda sb, i, o: sb.vbinary("div", i[0], i[1], o[0]))[0].reshape(a.shape)
    np.testing.assert_array_equal(got, [3, -3, -3, 3, 0, 2**31 - 1])   # the last saturates
