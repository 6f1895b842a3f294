"""Integer tensors through a real daemon, from the client's side: the model declares int64 token
ids, the client's dtype checks and buffers carry int64 both ways, an out-of-range id fails the
run with EINVAL (not retryable) and the session keeps working."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import npu

VOCAB, DIM = 50, 16


def embedding_model() -> bytes:
    """ids (int64) -> embedding rows + a mask-derived int64 output (ids * mask)."""
    table = np.random.default_rng(0).standard_normal((VOCAB, DIM)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"]),
             helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "last"], ["mu"]),
             helper.make_node("Mul", ["emb", "mu"], ["y"]),
             helper.make_node("Mul", ["ids", "mask"], ["kept"])]
    g = helper.make_graph(nodes, "emb",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 6]),
                           helper.make_tensor_value_info("mask", TensorProto.INT64, [2, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("kept", TensorProto.INT64, None)],
                          [numpy_helper.from_array(table, "table"),
                           numpy_helper.from_array(np.array([-1], np.int64), "last")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def feeds(ids=None):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, (2, 6)).astype(np.int64) if ids is None else ids
    return {"ids": ids, "mask": np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.int64)}


def test_int64_inputs_and_outputs_through_the_daemon(client):
    model = client.load(embedding_model())
    assert {t.name: t.dtype for t in model.inputs} == {"ids": np.int64, "mask": np.int64}
    assert {t.name: t.dtype for t in model.outputs}["kept"] == np.int64
    f = feeds()
    out = model.run(f)
    ref = ort.InferenceSession(embedding_model(), providers=["CPUExecutionProvider"]).run(None, f)
    np.testing.assert_allclose(out["y"], ref[0], rtol=1e-6)
    assert out["kept"].dtype == np.int64
    np.testing.assert_array_equal(out["kept"], ref[1])
    with pytest.raises(npu.InvalidArgument, match="int64"):     # no silent conversion
        model.run({k: v.astype(np.int32) for k, v in f.items()})
    model.unload()


def test_out_of_range_token_id_fails_that_run_only(client):
    model = client.load(embedding_model())
    ids = feeds()["ids"]
    ids[1, 3] = VOCAB
    with pytest.raises(npu.NpuError) as e:
        model.run(feeds(ids))
    assert e.value.code == "EINVAL" and not e.value.retryable
    assert f"index {VOCAB}" in str(e.value)
    np.testing.assert_array_equal(model.run(feeds())["kept"], feeds()["ids"] * feeds()["mask"])
    model.unload()


def test_inference_session_takes_int64_feeds(daemon):
    with npu.connect(daemon.endpoint) as c:
        s = npu.InferenceSession(embedding_model(), client=c)
        f = feeds()
        y, kept = s.run(None, f)
        assert kept.dtype == np.int64
        np.testing.assert_array_equal(kept, f["ids"] * f["mask"])
        s.close()


def byte_model() -> bytes:
    """uint8 image (as a camera gives it) -> DequantizeLinear -> a bool mask of the bright pixels,
    the image's QuantizeLinear (int8) back, and the mask and image passed through."""
    nodes = [helper.make_node("DequantizeLinear", ["img", "s", "z"], ["f"]),
             helper.make_node("Greater", ["f", "half"], ["bright"]),
             helper.make_node("QuantizeLinear", ["f", "s8", "z8"], ["q"]),
             helper.make_node("Not", ["keep"], ["drop"])]
    g = helper.make_graph(nodes, "bytes",
                          [helper.make_tensor_value_info("img", TensorProto.UINT8, [2, 5]),
                           helper.make_tensor_value_info("keep", TensorProto.BOOL, [2, 5])],
                          [helper.make_tensor_value_info("bright", TensorProto.BOOL, None),
                           helper.make_tensor_value_info("q", TensorProto.INT8, None),
                           helper.make_tensor_value_info("drop", TensorProto.BOOL, None)],
                          [numpy_helper.from_array(np.array(1 / 255, np.float32), "s"),
                           numpy_helper.from_array(np.array(0, np.uint8), "z"),
                           numpy_helper.from_array(np.array(0.5, np.float32), "half"),
                           numpy_helper.from_array(np.array(1 / 127, np.float32), "s8"),
                           numpy_helper.from_array(np.array(0, np.int8), "z8")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def byte_feeds():
    rng = np.random.default_rng(2)
    return {"img": rng.integers(0, 256, (2, 5)).astype(np.uint8), "keep": rng.random((2, 5)) < 0.5}


def test_uint8_int8_and_bool_inputs_and_outputs_keep_their_dtype(client):
    """As onnxruntime: a uint8 or bool input takes that dtype (a float32 feed is EINVAL naming it),
    int8 and bool outputs come back as int8 and bool -- and so every API passes them."""
    model = client.load(byte_model())
    assert {t.name: t.dtype for t in model.inputs} == {"img": np.uint8, "keep": np.bool_}
    assert {t.name: t.dtype for t in model.outputs} == {"bright": np.bool_, "q": np.int8, "drop": np.bool_}
    assert [t.size for t in model.inputs + model.outputs] == [10] * 5   # one byte an element
    f = byte_feeds()
    want = dict(zip(["bright", "q", "drop"],
                    ort.InferenceSession(byte_model(), providers=["CPUExecutionProvider"]).run(None, f)))
    for name, got in model.run(f).items():
        assert got.dtype == want[name].dtype, name
        np.testing.assert_array_equal(got, want[name], err_msg=name)
    with pytest.raises(npu.InvalidArgument, match=r"input 'img'.*expected: \(tensor\(uint8\)\)"):
        model.run({**f, "img": f["img"].astype(np.float32)})
    with pytest.raises(npu.InvalidArgument, match=r"input 'keep'.*expected: \(tensor\(bool\)\)"):
        model.run({**f, "keep": f["keep"].astype(np.float32)})
    model.unload()


def test_inference_session_and_onnx_backend_take_and_return_bytes(daemon, monkeypatch):
    import onnx

    from npu import onnx_backend

    f = byte_feeds()
    want = ort.InferenceSession(byte_model(), providers=["CPUExecutionProvider"]).run(None, f)
    with npu.connect(daemon.endpoint) as c:
        s = npu.InferenceSession(byte_model(), client=c)
        got = s.run(None, f)
        with pytest.raises(npu.InvalidArgument, match=r"expected: \(tensor\(uint8\)\)"):
            s.run(None, {**f, "img": f["img"].astype(np.float32)})
        s.close()
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)
    onnx_backend.shutdown()
    monkeypatch.setenv("NPUD_ENDPOINT", daemon.endpoint)   # the backend's shared client: this daemon
    try:
        rep = onnx_backend.prepare(onnx.load_from_string(byte_model()))
        for g, w in zip(rep.run([f["img"], f["keep"]]), want):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)
    finally:
        onnx_backend.shutdown()
