"""``npu.InferenceSession``: onnxruntime's API.  The parity tests run the SAME program (a function
taking the module) with ``onnxruntime`` and with ``npu`` and compare what each returns; the models
are real torch.onnx exports (the ones the onnx package ships) and a small CNN with a symbolic batch."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime
import pytest
from onnx import numpy_helper

import npu
import npu.inference
from examples import tiny_cnn

TORCH_EXPORTS = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "pytorch-converted")
RTOL, ATOL = 1e-3, 1e-4


@pytest.fixture(autouse=True)
def npud_endpoint(daemon, monkeypatch):
    """npu.InferenceSession connects as an ort program would: through the endpoint search."""
    monkeypatch.setenv("NPUD_ENDPOINT", daemon.endpoint)


def program(rt: Any, model: Any, batches: list[np.ndarray]) -> dict[str, Any]:
    """An onnxruntime program: everything it does, it does through ``rt`` (onnxruntime or npu)."""
    opts = rt.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = rt.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
    meta = sess.get_modelmeta()
    said: dict[str, Any] = {
        "inputs": [(a.name, a.shape, a.type) for a in sess.get_inputs()],
        "outputs": [(a.name, a.type) for a in sess.get_outputs()],
        "meta": (meta.producer_name, meta.graph_name, meta.domain, meta.description, meta.version,
                 meta.custom_metadata_map),
        "runs": [sess.run(None, {inp.name: x})[0] for x in batches],
        "named": sess.run([out.name], {inp.name: batches[0]}),
    }
    binding = sess.io_binding()
    said["bound"] = []
    for x in batches:
        binding.bind_cpu_input(inp.name, x)
        binding.bind_output(out.name)       # (onnxruntime keeps an output's first shape otherwise)
        sess.run_with_iobinding(binding)
        said["bound"].append(binding.copy_outputs_to_cpu()[0])
    try:
        sess.run(None, {inp.name: batches[0].astype(np.float64)})
    except Exception as exc:  # noqa: BLE001 -- each runtime raises its own class
        said["wrong_dtype"] = str(exc)
    return said


def compare(model: Any, batches: list[np.ndarray]) -> None:
    want = program(onnxruntime, model, batches)
    got = program(npu, model, batches)
    assert got["inputs"] == want["inputs"] and got["outputs"] == want["outputs"]
    assert got["meta"] == want["meta"]
    assert len(got["named"]) == 1 and isinstance(got["named"], list)
    for key in ("runs", "bound"):
        for g, w in zip(got[key], want[key], strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got["named"][0], want["named"][0], rtol=RTOL, atol=ATOL)
    words = "Unexpected input data type. Actual: (tensor(double)) , expected: (tensor(float))"
    assert words in want["wrong_dtype"] and words in got["wrong_dtype"]


def _test_data(name: str) -> tuple[str, np.ndarray]:
    folder = os.path.join(TORCH_EXPORTS, name)
    x = numpy_helper.to_array(onnx.load_tensor(os.path.join(folder, "test_data_set_0", "input_0.pb")))
    return os.path.join(folder, "model.onnx"), x


@pytest.mark.parametrize("name, opset", [("test_Conv2d", None), ("test_Conv2d_depthwise_padded", None),
                                         ("test_MaxPool2d", None), ("test_Linear", 13),
                                         ("test_BatchNorm2d_eval", 13), ("test_Softmax", 13), ("test_AvgPool2d", 13)])
def test_same_program_same_answers_on_torch_exports(name, opset, tmp_path):
    """As exported (opset 6: the compiler worker upgrades it to opset 13), or converted
    first where onnxruntime no longer runs the opset-6 operator."""
    path, x = _test_data(name)
    if opset is not None:
        converted = onnx.version_converter.convert_version(onnx.load(path), opset)
        path = str(tmp_path / "model.onnx")
        onnx.save(converted, path)
    rng = np.random.default_rng(1)
    compare(path, [x, rng.standard_normal(x.shape).astype(np.float32)])


def symbolic_cnn() -> onnx.ModelProto:
    """The demo's CNN with a symbolic batch, a description and custom metadata."""
    model = tiny_cnn.build()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.doc_string, model.model_version, model.domain = "a tiny CNN", 3, "org.npud.test"
    onnx.helper.set_model_props(model, {"author": "npud", "classes": "10"})
    return model


def test_same_program_same_answers_with_a_symbolic_batch():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((n, 3, 32, 32)).astype(np.float32) for n in (1, 3, 1)]
    data = symbolic_cnn().SerializeToString()
    compare(data, batches)


def test_node_args_as_onnxruntime_spells_them():
    sess = npu.InferenceSession(symbolic_cnn())
    (x,), (probs,) = sess.get_inputs(), sess.get_outputs()
    assert (x.name, x.shape, x.type) == ("x", ["batch", 3, 32, 32], "tensor(float)")
    assert (probs.name, probs.shape, probs.type) == ("probs", ["batch", 10], "tensor(float)")
    model = symbolic_cnn()
    model.graph.input[0].type.tensor_type.shape.dim[0].ClearField("dim_param")
    assert npu.InferenceSession(model).get_inputs()[0].shape == [None, 3, 32, 32]
    assert sess.get_providers() == ["NpuExecutionProvider"] == npu.get_available_providers()
    assert sess.get_provider_options() == {"NpuExecutionProvider": {"device_id": "0"}}
    assert sess.get_overridable_initializers() == []


@pytest.fixture
def sess():
    with npu.InferenceSession(tiny_cnn.build()) as s:
        yield s


X = np.zeros(tiny_cnn.INPUT_SHAPE, np.float32)


@pytest.mark.parametrize("output_names, match", [("probs", "list of output names"),
                                                 ([0], "list of output names"),
                                                 (["logits"], "Invalid output name: logits")])
def test_bad_output_names(sess, output_names, match):
    with pytest.raises(npu.InvalidArgument, match=match) as err:
        sess.run(output_names, {"x": X})
    assert err.value.code == "EINVAL" and not err.value.retryable


@pytest.mark.parametrize("feeds, match", [
    ([X], "dict by input name"), (None, "dict by input name"),
    ({}, r"Required inputs \(\['x'\]\) are missing"),
    ({"x": X, "y": X}, "Invalid input name: y"),
    ({"X": X}, "missing"),
    ({"x": X.astype(np.float16)}, r"Actual: \(tensor\(float16\)\) , expected: \(tensor\(float\)\)"),
    ({"x": X.astype(np.int32)}, r"Actual: \(tensor\(int32\)\)"),
    ({"x": X[0]}, "Invalid rank for input: x Got: 3 Expected: 4"),
    ({"x": np.zeros((1, 3, 32, 31), np.float32)}, "index: 3 Got: 31 Expected: 32"),
])
def test_bad_feeds(sess, feeds, match):
    with pytest.raises(npu.InvalidArgument, match=match) as err:
        sess.run(None, feeds)
    assert err.value.code == "EINVAL" and not err.value.retryable


def test_providers_rule():
    model = tiny_cnn.build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # the CPU provider is ignored without a word
        npu.InferenceSession(model, providers=["NpuExecutionProvider", "CPUExecutionProvider"]).close()
        npu.InferenceSession(model, providers=[("NpuExecutionProvider", {"device_id": 0})]).close()
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        npu.InferenceSession(model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]).close()
    with pytest.raises(npu.NotFound):
        npu.InferenceSession(model, providers=["NpuExecutionProvider"], provider_options=[{"device_id": 7}])
    for providers in ("NpuExecutionProvider", [3], [("NpuExecutionProvider", {"threads": 2})],
                      [("NpuExecutionProvider", {"device_id": "first"})]):
        with pytest.raises(npu.InvalidArgument):
            npu.InferenceSession(model, providers=providers)
    with pytest.raises(npu.InvalidArgument, match="unexpected keyword"):
        npu.InferenceSession(model, provider="NpuExecutionProvider")
    with pytest.raises(npu.InvalidArgument, match="path, bytes or onnx.ModelProto"):
        npu.InferenceSession(42)
    with pytest.raises(npu.InvalidArgument, match="not an ONNX model"):
        npu.InferenceSession(b"\xff\xffnot onnx")


def test_iobinding_reuses_one_execution_and_reads_inputs_at_run(sess):
    binding = sess.io_binding()
    x = np.random.default_rng(2).standard_normal(tiny_cnn.INPUT_SHAPE).astype(np.float32)
    binding.bind_cpu_input("x", x)
    binding.bind_output("probs")
    sess.run_with_iobinding(binding)
    first = binding.copy_outputs_to_cpu()[0]
    np.testing.assert_allclose(first, tiny_cnn.reference(x), rtol=RTOL, atol=ATOL)
    x[:] = 0.0     # bound, not copied: the next run reads it
    sess.run_with_iobinding(binding)
    np.testing.assert_allclose(binding.get_outputs()[0], tiny_cnn.reference(x), rtol=RTOL, atol=ATOL)
    assert len(sess._executions) == 1
    with pytest.raises(npu.InvalidArgument, match="bind_output"):
        binding.bind_output("probs", "cuda")
    with pytest.raises(npu.InvalidArgument, match="Unexpected input data type"):
        binding.bind_cpu_input("x", x.astype(np.float64))
    binding.clear_binding_inputs()
    with pytest.raises(npu.InvalidArgument, match="missing"):
        sess.run_with_iobinding(binding)
    with pytest.raises(npu.InvalidArgument, match="IOBinding"):
        sess.run_with_iobinding(object())


def test_close_frees_the_session_models_on_a_shared_client(client):
    sess = npu.InferenceSession(tiny_cnn.build(), client=client)
    sess.run(None, {"x": X})
    (model,) = sess._models
    sess.close()
    assert model._unloaded and not client.closed
    own = npu.InferenceSession(tiny_cnn.build())
    own.close()
    assert own.client.closed


def test_only_the_last_shapes_stay_loaded(monkeypatch):
    monkeypatch.setattr(npu.shapes, "SIGNATURES_KEPT", 1)
    rng = np.random.default_rng(3)
    with npu.InferenceSession(symbolic_cnn()) as sess:
        binding = sess.io_binding()
        binding.bind_output("probs")
        (first,) = sess._models
        loaded, executions = {}, {}
        for n in (2, 3, 1):
            x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
            binding.bind_cpu_input("x", x)
            sess.run_with_iobinding(binding)
            loaded[n] = first.specialise({"x": x.shape})
            executions[n] = next(e for e in sess._executions if e.model is loaded[n])
            np.testing.assert_allclose(sess.run(None, {"x": x})[0], tiny_cnn.reference(x), rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(binding.get_outputs()[0], tiny_cnn.reference(x), rtol=RTOL, atol=ATOL)
        # the first (batch 1) stays; batch 2 was evicted for batch 3, its IOBinding execution closed
        assert loaded[1] is first and not first._unloaded and loaded[2]._unloaded and not loaded[3]._unloaded
        assert [s["shapes"]["x"][0] for s in sess.signatures()] == [1, 3]
        assert executions[2]._closed and not executions[3]._closed and not executions[1]._closed


def test_threads_share_a_session():
    import threading
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((n, 3, 32, 32)).astype(np.float32) for n in (1, 2, 1, 2, 1, 2)]
    got: dict[int, np.ndarray] = {}
    with npu.InferenceSession(symbolic_cnn()) as sess:
        def run(i: int) -> None:
            got[i] = sess.run(None, {"x": xs[i]})[0]
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(sess.signatures()) == 2    # one load per shape, however many threads asked
    for i, x in enumerate(xs):
        np.testing.assert_allclose(got[i], tiny_cnn.reference(x), rtol=RTOL, atol=ATOL)


def test_a_collected_session_leaves_a_shared_client_alone(client):
    import gc
    sess = npu.InferenceSession(tiny_cnn.build(), client=client)
    (model,) = sess._models
    del sess
    gc.collect()
    assert not model._unloaded      # no call from a collection: it may run inside another call
    model.unload()
