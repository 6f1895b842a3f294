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
