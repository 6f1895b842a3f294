"""``Model.run``, ``Execution.run`` and ``InferenceSession.run`` (sync and trio) in one round trip:
``run_model`` with ``wait_ms`` when the daemon speaks protocol 1.8, ``run_model`` then ``wait``
with an older one; the outcome, errors and timeouts the same either way."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from onnx import TensorProto, helper

import npu
from daemons import npu_and_cpu

@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = npu_and_cpu(tmp_path_factory.mktemp("run_wait"))
    yield d
    d.stop()


def relu_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


X = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)


@contextlib.contextmanager
def sent(client):
    """The (op, args) of every request ``client`` sends meanwhile."""
    log: list[tuple[str, dict]] = []
    start = client._core.start

    def spy(call):
        log.append((call.op, call.args))
        return start(call)
    client._core.start = spy
    try:
        yield log
    finally:
        client._core.start = start


@contextlib.contextmanager
def speaking(client, version):
    spoken, client._core.protocol = client._core.protocol, version
    try:
        yield
    finally:
        client._core.protocol = spoken


def job_ops(log) -> list[str]:
    return [op for op, _args in log if op in ("run_model", "wait")]


def test_model_and_execution_run_in_one_request_with_a_1_8_daemon_and_two_with_1_7(daemon):
    with npu.connect(daemon.endpoint) as c:
        assert c._core.protocol == (1, 8)
        model = c.load(relu_model())
        execution = model.execution()
        model.run(X)   # the first run allocates its buffer set
        for run in (lambda: model.run(X)["y"], lambda: execution.run({"x": X})["y"].copy()):
            with sent(c) as new:
                y_new = run()
            with speaking(c, (1, 7)), sent(c) as old:
                y_old = run()
            assert job_ops(new) == ["run_model"] and job_ops(old) == ["run_model", "wait"]
            np.testing.assert_array_equal(y_new, np.maximum(X, 0))
            np.testing.assert_array_equal(y_old, y_new)


def test_the_execution_request_with_wait_ms_is_encoded_once_per_timeout(daemon):
    with npu.connect(daemon.endpoint) as c:
        execution = c.load(relu_model()).execution()
        for _ in range(3):
            execution.run({"x": X}, timeout=5)
        execution.run({"x": X}, timeout=7)
        assert set(execution._frames) == {5000, 7000}
        np.testing.assert_array_equal(execution.run({"x": X})["y"], np.maximum(X, 0))


def test_inference_session_runs_in_one_request(daemon):
    with npu.connect(daemon.endpoint) as c:
        session = npu.InferenceSession(relu_model(), client=c)
        session.run(None, {"x": X})
        binding = session.io_binding()
        binding.bind_cpu_input("x", X)
        binding.bind_output("y")
        session.run_with_iobinding(binding)
        with sent(c) as log:
            (y,) = session.run(None, {"x": X})
            session.run_with_iobinding(binding)
        assert job_ops(log) == ["run_model", "run_model"]
        np.testing.assert_array_equal(y, np.maximum(X, 0))
        np.testing.assert_array_equal(binding.copy_outputs_to_cpu()[0], np.maximum(X, 0))


def test_a_failed_run_raises_its_error_either_way(daemon):
    with npu.connect(daemon.endpoint) as c:
        model = c.load(relu_model())
        for version in ((1, 8), (1, 7)):
            with speaking(c, version):
                c.inject_fault("crash")
                with pytest.raises(npu.DeviceFault) as info:
                    model.run(X)
                assert info.value.code == "EIO"
                np.testing.assert_array_equal(model.run(X)["y"], np.maximum(X, 0))   # the set is reused


def test_a_run_that_outlasts_its_timeout_raises_timeout_and_the_execution_stays_busy(daemon):
    with npu.connect(daemon.endpoint) as c:
        model = c.load(relu_model())
        execution = model.execution()
        c.inject_fault("slow", slow_ms=1500)
        with pytest.raises(npu.Timeout) as info:
            model.run(X, timeout=0.05)
        assert info.value.code == "ETIMEDOUT" and "after 50 ms" in info.value.message
        c.inject_fault("slow", slow_ms=1500)
        with pytest.raises(npu.Timeout):
            execution.run({"x": X}, timeout=0.05)
        with pytest.raises(npu.Busy):   # the daemon named the job: the execution knows it still runs
            execution.submit()
        execution._job.wait(30)
        np.testing.assert_array_equal(execution.run({"x": X})["y"], np.maximum(X, 0))


def test_a_heterogeneous_model_runs_its_chain_in_one_request(daemon):
    """TopK declined by the NPU target: a job on npu0 then one on cpu0; the reply is the last's."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])
    values = helper.make_tensor_value_info("values", TensorProto.FLOAT, [4, 3])
    indices = helper.make_tensor_value_info("indices", TensorProto.INT64, [4, 3])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]),
                               helper.make_node("TopK", ["r", "k"], ["values", "indices"])],
                              "topk", [x], [values, indices], [k])
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    feed = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    want = np.sort(np.maximum(feed, 0), axis=1)[:, ::-1][:, :3]
    with npu.connect(daemon.endpoint) as c:
        model = c.load(onnx_model, device=0)
        model.run(feed)
        with sent(c) as log:
            got = model.run(feed)
        assert job_ops(log) == ["run_model"]
        np.testing.assert_allclose(got["values"], want, rtol=1e-6)
        job = model.submit(feed)
        job.result(30)
        assert [p["device"] for p in job.stats["partitions"]] == [0, 1]
        c.inject_fault("crash", device=1)   # its cpu partition fails: so does the run
        with pytest.raises(npu.DeviceFault):
            model.run(feed)


async def test_the_trio_client_runs_in_one_request_too(daemon):
    async with npu.connect_async(daemon.endpoint) as c:
        model = await c.load(relu_model())
        execution = await model.execution()
        await model.run(X)
        with sent(c) as log:
            y = (await model.run(X))["y"]
            y2 = (await execution.run({"x": X}))["y"]
        assert job_ops(log) == ["run_model", "run_model"]
        np.testing.assert_array_equal(y, np.maximum(X, 0))
        np.testing.assert_array_equal(y2, np.maximum(X, 0))
        with speaking(c, (1, 7)), sent(c) as log:
            await model.run(X)
        assert job_ops(log) == ["run_model", "wait"]
