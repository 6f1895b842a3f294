"""Models through a real daemon, from the client's side: Client.load / check, Model.run / submit /
report / unload, compared with onnxruntime."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import npu
from npu.local import LocalDaemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "compiler_worker"))
from compiler_testmodels import Builder, mlp, small_cnn, transformer_block  # noqa: E402

RTOL, ATOL = 1e-3, 1e-4
MODELS = {"cnn": small_cnn, "mlp": mlp, "transformer": transformer_block}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = LocalDaemon("--cache-dir", str(tmp_path_factory.mktemp("cache")))
    yield d
    d.stop()


def reference(model: bytes, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def random_feeds(model: npu.Model, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in model.inputs}


def memory_used(client) -> int:
    return next(d for d in client.devices() if d.index == 0).memory_used


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_models_match_onnxruntime(client, kind):
    data = MODELS[kind]()
    model = client.load(data)
    proto = onnx.load_from_string(data)
    assert [t.name for t in model.inputs] == [i.name for i in proto.graph.input]
    assert [t.name for t in model.outputs] == [o.name for o in proto.graph.output]
    for t in (*model.inputs, *model.outputs):
        assert t.dtype == np.float32 and all(d > 0 for d in t.shape)
        assert t.size == 4 * int(np.prod(t.shape))
    feeds = random_feeds(model)
    want = reference(data, feeds)
    got = model.run(feeds)
    assert list(got) == [t.name for t in model.outputs]
    for t, w in zip(model.outputs, want):
        assert got[t.name].shape == t.shape == w.shape
        np.testing.assert_allclose(got[t.name], w, rtol=RTOL, atol=ATOL)
    model.unload()


def test_run_with_one_array_and_submit_stats(client):
    data = small_cnn()
    model = client.load(data)
    x = random_feeds(model)["x"]
    want = reference(data, {"x": x})[0]
    np.testing.assert_allclose(model.run(x)[model.outputs[0].name], want, rtol=RTOL, atol=ATOL)
    job = model.submit(x)
    assert job.wait(30) is job
    assert job.stats["cycles"] > 0 and job.stats["macs"] > 0 and job.stats["commands"] > 0
    np.testing.assert_allclose(job.result()[model.outputs[0].name], want, rtol=RTOL, atol=ATOL)
    # a result asked for twice is the same result
    assert job.result() is job.result()
    assert "x: float32[2, 3, 20, 20]" in repr(model)


def test_concurrent_submits_do_not_overwrite_each_other(client):
    data = mlp()
    model = client.load(data)
    xs = [np.random.default_rng(i).standard_normal((4, 32)).astype(np.float32) for i in range(8)]
    jobs = [model.submit(x) for x in xs]          # all in flight before any wait
    for x, job in reversed(list(zip(xs, jobs))):  # waited for out of order
        np.testing.assert_allclose(job.result()[model.outputs[0].name], reference(data, {"x": x})[0],
                                   rtol=RTOL, atol=ATOL)
    # and from several clients (each in a thread of its own: a Client belongs to one thread) at once
    results, errors = {}, []

    def worker(i):
        try:
            with npu.connect(client.endpoint) as c:
                m = c.load(data)
                jobs = [m.submit(xs[j]) for j in range(i, len(xs), 3)]
                for j, job in zip(range(i, len(xs), 3), jobs):
                    results[j] = job.result()[m.outputs[0].name]
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, x in enumerate(xs):
        np.testing.assert_allclose(results[i], reference(data, {"x": x})[0], rtol=RTOL, atol=ATOL)


def test_report_rows_and_table(client):
    model = client.load(small_cnn())
    rep = model.report()
    assert rep.rows and str(rep) == rep.table
    ops = {row["op"] for row in rep.rows}
    assert "Conv" in ops
    for row in rep.rows:
        assert {"node", "op", "macs", "cycles", "sram_bytes", "dma_bytes"} <= set(row)
    assert sum(row["macs"] for row in rep.rows) > 0
    assert "MACs" in rep.table and "cycles" in rep.table


def test_unload_frees_device_memory(make_client):
    c = make_client()
    before = memory_used(c)
    model = c.load(transformer_block())
    model.run(random_feeds(model))
    assert memory_used(c) > before
    assert model.weights_bytes > 0 and model.arena_bytes > 0
    model.unload()
    assert memory_used(c) == before
    model.unload()  # twice is harmless
    with pytest.raises(npu.NotFound):
        model.run(random_feeds(model))
    with pytest.raises(npu.NotFound):
        c._request("report", {"model": model.id})


def test_load_by_path_bytes_and_proto(client, tmp_path):
    data = mlp(seed=3)
    path = tmp_path / "mlp.onnx"
    path.write_bytes(data)
    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    want = reference(data, {"x": x})[0]
    for source in (str(path), path, data, bytearray(data), onnx.load_from_string(data)):
        model = client.load(source)
        np.testing.assert_allclose(model.run(x)[model.outputs[0].name], want, rtol=RTOL, atol=ATOL)
        model.unload()
    with pytest.raises(npu.InvalidArgument, match="cannot read model file"):
        client.load(tmp_path / "missing.onnx")
    with pytest.raises(npu.InvalidArgument, match="path, bytes or onnx.ModelProto"):
        client.load(12)


def big_model() -> bytes:
    """An MLP with ~18 MiB of weights: more than one message may carry inline."""
    b = Builder(seed=7)
    x = b.input("x", [2, 2048])
    y = b.op("Relu", [b.op("MatMul", [x, b.const((2048, 2304))])])
    return b.model([b.op("MatMul", [y, b.const((2304, 8))])])


def test_big_model_goes_through_a_buffer(client):
    data = big_model()
    assert len(data) > client.limits["max_inline_bytes"]
    model = client.load(data)
    x = np.random.default_rng(0).standard_normal((2, 2048)).astype(np.float32)
    np.testing.assert_allclose(model.run(x)[model.outputs[0].name], reference(data, {"x": x})[0],
                               rtol=RTOL, atol=ATOL)
    assert client.check(data) == []  # check takes the same route
    model.unload()


def unsupported_model() -> bytes:
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Hardmax", ["x"], ["h"], name="hard_max"),
             helper.make_node("Relu", ["h"], ["r"], name="ok_relu"),
             helper.make_node("ReduceLogSumExp", ["r"], ["c"], name="log_sum_exp", axes=[1]),
             helper.make_node("Det", ["c"], ["y"], name="determinant")]
    g = helper.make_graph(nodes, "bad", [inp], [out])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def test_check_lists_every_unsupported_node(client):
    assert client.check(mlp()) == []
    problems = client.check(unsupported_model())
    found = {(p["node"], p["op"]) for p in problems}
    assert {("hard_max", "Hardmax"), ("log_sum_exp", "ReduceLogSumExp"), ("determinant", "Det")} <= found
    assert "ok_relu" not in {p["node"] for p in problems}
    assert all(p["reason"] for p in problems)
    with pytest.raises(npu.InvalidArgument) as err:
        client.load(unsupported_model())
    for name in ("hard_max", "Hardmax"):
        assert name in err.value.message


def test_bad_feeds_are_invalid_arguments(client):
    model = client.load(mlp())
    good = np.zeros((4, 32), np.float32)
    for feeds, match in (({}, "missing"),
                         ({"x": good, "y": good}, "unknown"),
                         ({"y": good}, "missing"),
                         (np.zeros((4, 31), np.float32), "shape"),
                         (np.zeros((1, 4, 32), np.float32), "shape"),
                         (np.zeros((4, 32), np.complex64), "complex64"),
                         (np.array([["a"] * 32] * 4), r"Actual: \(tensor\(string\)\)")):
        with pytest.raises(npu.InvalidArgument, match=match):
            model.run(feeds)
    # the model still runs after the refusals (no buffer set was lost)
    np.testing.assert_allclose(model.run(good)[model.outputs[0].name],
                               reference(mlp(), {"x": good})[0], rtol=RTOL, atol=ATOL)


def test_multi_input_model_needs_a_dict(client):
    b = Builder(seed=1)
    x, y = b.input("x", [3, 5]), b.input("y", [3, 5])
    data = b.model([b.op("Mul", [b.op("Add", [x, y]), b.const((5,))])])
    model = client.load(data)
    assert [t.name for t in model.inputs] == ["x", "y"]
    with pytest.raises(npu.InvalidArgument, match="pass a dict"):
        model.run(np.zeros((3, 5), np.float32))
    feeds = {"x": np.arange(15, dtype=np.float32).reshape(3, 5), "y": np.ones((3, 5), np.float32)}
    want = reference(data, feeds)[0]
    np.testing.assert_allclose(model.run(feeds)[model.outputs[0].name], want, rtol=RTOL, atol=ATOL)


def test_unload_with_jobs_in_flight(make_client):
    c = make_client()
    before = memory_used(c)
    data = small_cnn(seed=4)
    model = c.load(data)
    xs = [np.random.default_rng(i).standard_normal((2, 3, 20, 20)).astype(np.float32) for i in range(4)]
    jobs = [model.submit(x) for x in xs]
    model.unload()  # the queued jobs still run: the model goes once they finish
    for x, job in zip(xs, jobs):
        np.testing.assert_allclose(job.result()[model.outputs[0].name], reference(data, {"x": x})[0],
                                   rtol=RTOL, atol=ATOL)
    assert memory_used(c) == before  # and every buffer of the model went with it
    c.ping()
