"""External data in the compiler: a container's references resolve from the bytes sent; every
other reference is refused, naming the tensor, before anything touches the file system."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from npud.compiler_worker import CompileError, compile_model, run_on_emulator
from npud.emulator.config import make_config
from npud.ipc_schema import model_container

CONFIG = make_config("edge")


def matmul_model(w: np.ndarray) -> onnx.ModelProto:
    """y = x @ w, with w an initializer."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, w.shape[1]])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x], [y],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def with_external(model: onnx.ModelProto, location: str, name: str = "w") -> onnx.ModelProto:
    """``model`` with initializer ``name`` pointing at ``location`` instead of holding its data."""
    for t in model.graph.initializer:
        if t.name == name:
            n = len(t.raw_data)
            external_data_helper.set_external_data(t, location, 0, n)
            t.ClearField("raw_data")
    return model


@pytest.fixture
def no_file_access(monkeypatch):
    """Fail the test if onnx is asked to open an external data file."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"the compiler tried to open external data: {args}")
    monkeypatch.setattr(external_data_helper, "_open_external_data_fd", refuse)
    monkeypatch.setattr(external_data_helper, "load_external_data_for_tensor", refuse)


@pytest.mark.parametrize("location", [
    "etc/passwd", "/etc/passwd", "../../../../etc/passwd", "file:///etc/passwd", "weights.bin",
    model_container.CONTAINER_LOCATION,   # a container reference in a model that is not one
])
def test_every_external_file_reference_is_refused_naming_the_tensor(location, no_file_access):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    model = with_external(matmul_model(w), location).SerializeToString()
    with pytest.raises(CompileError) as e:
        compile_model(model, CONFIG)
    msg = str(e.value)
    assert "initializer 'w'" in msg and "never opens files" in msg
    assert "bytes" not in msg and "size" not in msg     # nothing about any file's size


def test_a_constant_nodes_external_tensor_is_refused(no_file_access):
    value = numpy_helper.from_array(np.ones(4, np.float32), "c")
    external_data_helper.set_external_data(value, "etc/shadow", 0, 16)
    value.ClearField("raw_data")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    g = helper.make_graph([helper.make_node("Constant", [], ["c"], name="const", value=value),
                           helper.make_node("Add", ["x", "c"], ["y"], name="add")], "g", [x], [y])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(CompileError, match="attribute tensor of node 'const'.*never opens files"):
        compile_model(model.SerializeToString(), CONFIG)


def container_of(model: onnx.ModelProto, names: set[str]) -> bytes:
    """A model container holding initializers ``names`` in its data section."""
    chunks, offset = [], 0
    for t in model.graph.initializer:
        if t.name in names:
            data = t.raw_data
            external_data_helper.set_external_data(t, model_container.CONTAINER_LOCATION, offset, len(data))
            t.ClearField("raw_data")
            chunks.append(data)
            offset += len(data)
    return model_container.pack(model.SerializeToString(), chunks)


def test_a_container_compiles_to_the_same_results_as_the_plain_model():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 5)).astype(np.float32)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    plain = compile_model(matmul_model(w).SerializeToString(), CONFIG)
    packed = container_of(matmul_model(w), {"w"})
    assert model_container.is_container(packed)
    exe = compile_model(packed, CONFIG)
    out = run_on_emulator(exe, {"x": x}, CONFIG)[0]["y"]
    np.testing.assert_allclose(out, x @ w, rtol=1e-5)
    np.testing.assert_array_equal(out, run_on_emulator(plain, {"x": x}, CONFIG)[0]["y"])


@pytest.mark.parametrize("damage, expect", [
    (lambda b: b[:10], "shorter than its"),
    (lambda b: b[:8] + (2).to_bytes(4, "little") + b[12:], "version 2"),
    (lambda b: b[:16] + (1 << 40).to_bytes(8, "little") + b[24:], "only"),
    (lambda b: b[:-4], "of a 92-byte container data section"),   # the last tensor runs past the end
])
def test_a_malformed_container_is_refused_clearly(damage, expect):
    w = np.ones((8, 3), np.float32)
    packed = container_of(matmul_model(w), {"w"})
    with pytest.raises(CompileError, match=expect):
        compile_model(damage(packed), CONFIG)


def test_a_containers_weights_are_read_where_they_arrived_not_copied():
    """A model past 2 GiB must not be copied in the worker: the weights of a container become
    arrays over its data section (the request's frame), not protobuf fields or new arrays."""
    from npud.compiler_worker.passes.import_onnx import import_model

    w = np.random.default_rng(3).standard_normal((64, 32)).astype(np.float32)
    packed = bytearray(container_of(matmul_model(w), {"w"}))
    graph = import_model(memoryview(packed), {})
    const = graph.tensors["w"].const
    np.testing.assert_array_equal(const, w)
    assert np.shares_memory(const, np.frombuffer(packed, np.uint8))


def test_a_container_weight_whose_size_contradicts_its_dims_is_refused():
    w = np.ones((8, 4), np.float32)
    model = matmul_model(w)
    model.graph.initializer[0].dims[:] = [8, 5]
    with pytest.raises(CompileError, match="initializer 'w' has dims \\[8, 5\\].*but its data is 128 bytes"):
        compile_model(container_of(model, {"w"}), CONFIG)
