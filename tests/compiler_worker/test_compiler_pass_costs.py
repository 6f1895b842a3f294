"""The passes made cheaper for a cold compile (issue 15) compute what they computed before."""

from __future__ import annotations

import numpy as np
import pytest

from npud.compiler_worker.errors import CompileError
from npud.compiler_worker.passes import canonicalize, memory


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_batchnorm_scaling_is_bit_for_bit_the_float64_product(dtype):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 8, 3, 3)) * 7).astype(dtype)
    scale = rng.standard_normal((64, 1, 1, 1)) * 3.3
    got = canonicalize._scaled(w, scale)
    want = (w.astype(np.float64) * scale).astype(np.float32)
    assert got.dtype == np.float32 and got.view(np.uint32).tobytes() == want.view(np.uint32).tobytes()


class _T:
    def __init__(self, const, dtype=None, kind="const", alias=None):
        self.const, self.dtype, self.kind, self.alias = const, dtype or const.dtype, kind, alias


def _old_blob(pt, limit):
    """The weights blob as memory.py built it before it was written in place (its reference)."""
    blob, woff, parts = bytearray(), {}, [[0, 0]]
    for name, t in pt.items():
        if t.kind != "const" or t.alias:
            continue
        data = t.const.astype(np.dtype(t.dtype).newbyteorder("<"), copy=False).tobytes()
        start = parts[-1][0]
        if len(blob) + len(data) - start > limit:
            parts[-1][1] = len(blob)
            parts.append([len(blob), len(blob)])
            start = len(blob)
        woff[name] = (len(parts) - 1, len(blob) - start)
        blob += data
        blob += bytes(-len(blob) % memory.TENSOR_ALIGN)
    parts[-1][1] = len(blob)
    return blob, woff, [tuple(p) for p in parts]


def test_the_weights_blob_is_laid_out_as_before_whatever_the_types_and_parts():
    rng = np.random.default_rng(1)
    pt = {"w": _T(rng.standard_normal((5, 7)).astype(np.float32)),
          "act": _T(np.zeros(3, np.float32), kind="arena"),
          "q": _T(rng.integers(-128, 127, (33,)).astype(np.int8)),
          "wide": _T(rng.standard_normal(9), dtype=np.float32),        # a float64 constant stored as float32
          "empty": _T(np.zeros((0, 4), np.float32)),
          "scalar": _T(np.array(3, np.int64)),
          "view": _T(np.ones(4, np.float32), alias="w"),
          "b": _T(rng.standard_normal((2, 3, 4)).astype(np.float32)[:, ::2])}   # not contiguous
    for limit in (1 << 20, 200):
        assert memory._weights_blob(pt, limit) == _old_blob(pt, limit)
    with pytest.raises(CompileError, match="'w' is 140 bytes"):
        memory._weights_blob(pt, 100)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int8, np.uint8, np.int16, np.uint16,
                                   np.int32, np.uint32, np.int64, np.uint64, np.bool_])
def test_an_initializer_reads_its_raw_data_once_and_decodes_as_onnx_does(dtype, monkeypatch):
    import onnx
    from onnx import numpy_helper

    from npud.compiler_worker.passes import import_onnx

    value = (np.random.default_rng(2).standard_normal((3, 5)) * 50).astype(dtype)
    init = numpy_helper.from_array(value, "w")
    want = numpy_helper.to_array(init)
    monkeypatch.setattr(numpy_helper, "to_array", lambda *_: pytest.fail("decoded by reading the field again"))
    got = import_onnx._initializer(init)
    assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()
    assert init.data_type in import_onnx._PLAIN_RAW and isinstance(init, onnx.TensorProto)


def test_an_initializer_of_packed_4_bit_values_still_goes_through_onnx():
    import onnx
    from onnx import helper, numpy_helper

    from npud.compiler_worker.passes import import_onnx

    init = helper.make_tensor("q", onnx.TensorProto.INT4, [3], [1, -2, 3])
    np.testing.assert_array_equal(import_onnx._initializer(init), numpy_helper.to_array(init))


def test_a_model_in_a_read_only_buffer_compiles_as_its_bytes_do():
    """The worker hands the compiler the request's frame as it was received (a read-only
    memoryview), not a copy in bytes."""
    import sys

    from npud.compiler_worker.api import compile_model
    from npud.emulator.config import make_config

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from compiler_testmodels import small_cnn

    model = small_cnn()
    view = memoryview(model).toreadonly()
    config = make_config("edge")
    a, b = compile_model(view, config), compile_model(model, config)
    assert (a.stream, bytes(a.weights), a.io, a.memory) == (b.stream, bytes(b.weights), b.io, b.memory)
    with pytest.raises(CompileError, match="not an ONNX protobuf"):
        compile_model(view[:len(view) // 2], config)
