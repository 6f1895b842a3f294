"""npu.ray without a Ray cluster: the resources a node advertises (and `npuctl ray-resources`), the
runner that splits and pads batches to the model's batch, survives a daemon restart and reports a
banned context as unhealthy, the Serve body's priorities and deadlines, and the exporter's node label."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import npu
from npu.protocol import Device
from npu.ray import NpuBatchPredictor, NpuRunner, NpuServer, resources, resources_of

from examples.ray_batch import NodeDaemon, images, tiny_cnn_batched

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "npud"))
from sched_models import daemon_in_test_mode  # noqa: E402

BATCH = 8


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A node's daemon at a fixed endpoint, restartable."""
    d = NodeDaemon(str(tmp_path_factory.mktemp("node")))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def reference(node):
    """Each of 24 images run alone (padded to the model's batch): what any batching must reproduce."""
    x = images(np.arange(24))
    with npu.connect(node.endpoint) as c:
        m = c.load(tiny_cnn_batched(BATCH))
        rows = []
        for row in x:
            padded = np.zeros((BATCH, *row.shape), np.float32)
            padded[0] = row
            rows.append(m.run({"x": padded})["probs"][0])
    return x, np.stack(rows)


def fake_device(index: int, state: str, preset: str = "edge") -> Device:
    return Device.from_wire({"index": index, "name": f"npu{index}", "preset": preset, "state": state,
                             "params": {}, "memory_total": 1, "memory_used": 0})


def test_resources_count_healthy_devices_only():
    devices = [fake_device(0, "ok"), fake_device(1, "ok", "server"), fake_device(2, "down"),
               fake_device(3, "resetting", "server")]
    assert resources_of(devices) == {"npu": 2, "npu:npu-emu": 2, "npu:edge": 1, "npu:server": 1}
    assert resources_of([fake_device(0, "down")]) == {"npu": 0}


def test_npuctl_ray_resources_prints_the_json_for_ray_start():
    with npu.local("--device", "edge", "--device", "server") as c:
        proc = subprocess.run([sys.executable, "-m", "npuctl", "ray-resources", "--endpoint", c.endpoint],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == resources(c.endpoint) == {
            "npu": 2, "npu:npu-emu": 2, "npu:edge": 1, "npu:server": 1}


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 24])
def test_batches_of_any_size_are_split_and_padded_to_the_models_batch(node, reference, rows):
    x, expected = reference
    runner = NpuRunner(tiny_cnn_batched(BATCH), endpoint=node.endpoint)
    try:
        out, stats = runner.run({"x": x[:rows]})
    finally:
        runner.close()
    assert np.array_equal(out["probs"], expected[:rows])
    assert stats.rows == rows and stats.chunks == -(-rows // BATCH)
    assert stats.padded_rows == stats.chunks * BATCH - rows and stats.device_ms > 0


def test_the_predictor_maps_columns_and_passes_the_others_through(node, reference):
    x, expected = reference
    predictor = NpuBatchPredictor(tiny_cnn_batched(BATCH), endpoint=node.endpoint, input_columns={"x": "image"},
                                  output_columns={"probs": "p"}, stats_columns=True)
    out = predictor({"id": np.arange(10), "image": x[:10]})
    assert sorted(out) == ["id", "npu_device_ms", "npu_node", "npu_retries", "p"]
    assert np.array_equal(out["id"], np.arange(10)) and np.array_equal(out["p"], expected[:10])
    with pytest.raises(npu.InvalidArgument, match="no column"):
        predictor({"x": x[:2]})


def test_a_second_runner_on_a_node_loads_by_digest(node, reference, monkeypatch):
    x, expected = reference
    first = NpuRunner(tiny_cnn_batched(BATCH), endpoint=node.endpoint)
    try:
        with npu.connect(node.endpoint) as c:   # the runner's digest is the daemon's
            assert c._request("load", {"device": 0, "model": tiny_cnn_batched(BATCH).SerializeToString()}
                              )["model_digest"] == first.digest

        def send_bytes(*args, **kwargs):
            raise AssertionError("the model's bytes were sent again")
        monkeypatch.setattr(npu.session.ClientOps, "_with_model", send_bytes)   # where a load sends bytes
        second = NpuRunner(tiny_cnn_batched(BATCH), endpoint=node.endpoint)
        try:
            assert second._session.model.cached
            assert np.array_equal(second.run({"x": x[:9]})[0]["probs"], expected[:9])
        finally:
            second.close()
    finally:
        first.close()


def test_feeds_of_the_wrong_type_or_row_shape_are_refused(node):
    runner = NpuRunner(tiny_cnn_batched(BATCH), endpoint=node.endpoint)
    try:
        with pytest.raises(npu.InvalidArgument, match="tensor\\(double\\)"):
            runner.run({"x": np.zeros((3, 3, 32, 32))})
        with pytest.raises(npu.InvalidArgument, match="rows of shape"):
            runner.run({"x": np.zeros((3, 3, 16, 16), np.float32)})
        with pytest.raises(npu.InvalidArgument, match=r"feeds \['y'\] do not match the model's inputs \['x'\]"):
            runner.run({"y": np.zeros((3, 3, 32, 32), np.float32)})
    finally:
        runner.close()


def test_inputs_with_different_numbers_of_rows_are_refused(node):
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [BATCH, 4]) for n in ("a", "b")]
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "add", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    runner = NpuRunner(model, endpoint=node.endpoint)
    try:
        a, b = np.ones((3, 4), np.float32), np.full((3, 4), 2, np.float32)
        with pytest.raises(npu.InvalidArgument, match=r"different numbers of rows: \[2, 3\]"):
            runner.run({"a": a, "b": b[:2]})
        assert np.array_equal(runner.run({"a": a, "b": b})[0]["y"], np.full((3, 4), 3, np.float32))
    finally:
        runner.close()


def test_a_restarted_daemon_is_reconnected_to_and_the_batch_completes(node, reference):
    x, expected = reference
    runner = NpuRunner(tiny_cnn_batched(BATCH), endpoint=node.endpoint)
    try:
        runner.run({"x": x[:8]})
        node.kill()
        node.start()
        out, stats = runner.run({"x": x})
        assert stats.reconnects == 1 and runner.reconnects == 1
        assert runner._session.model.cached, "the restarted daemon's compile cache should serve the reload"
        assert np.array_equal(out["probs"], expected)
    finally:
        runner.close()


def test_a_daemon_that_stays_down_fails_the_batch_after_recover_s(tmp_path, reference):
    x, _ = reference
    d = NodeDaemon(str(tmp_path))
    runner = NpuRunner(tiny_cnn_batched(BATCH), endpoint=d.endpoint, recover_s=0.5)
    try:
        d.kill()
        started = time.monotonic()
        with pytest.raises(npu.ConnectionLost, match="did not come back within 0.5 s"):
            runner.run({"x": x[:8]})
        assert time.monotonic() - started < 10
    finally:
        runner.close()
        d.stop()


def test_a_banned_context_makes_the_runner_unhealthy(tmp_path, reference):
    x, _ = reference
    d = daemon_in_test_mode(tmp_path, "[scheduling]\njob_timeout_ms = 500\nban_after_hangs = 2\n")
    runner = NpuRunner(tiny_cnn_batched(BATCH), endpoint=d.endpoint)
    try:
        assert runner.health()["ok"]
        runner.check_health()
        runner._session.client.inject_fault("hang", count=2)
        for _ in range(2):
            with pytest.raises(npu.Timeout):
                runner.run({"x": x[:8]})
        with pytest.raises(npu.PermissionDenied):
            runner.run({"x": x[:8]})
        health = runner.health()
        assert not health["ok"] and "banned" in health["reason"]
        with pytest.raises(npu.DeviceFault, match="take no work here"):
            runner.check_health()
    finally:
        runner.close()
        d.stop()


def test_serve_requests_run_by_priority_and_deadline(node, reference):
    x, expected = reference
    server = NpuServer(tiny_cnn_batched(BATCH), endpoint=node.endpoint)
    try:
        now = time.monotonic()
        priorities = ["low", "high", "normal", "high", "low"]
        deadlines = [None, now + 30, None, now + 30, now - 1]   # the last one's deadline has passed
        answers = server.run_requests(list(x[:5]), priorities, deadlines)
        for i in (1, 3):
            assert answers[i][0] and np.array_equal(answers[i][1]["probs"], expected[i])
        assert answers[2][0] and np.array_equal(answers[2][1]["probs"], expected[2])
        # the two low requests run together, with the earlier (passed) deadline: both missed it
        for i in (0, 4):
            assert not answers[i][0] and isinstance(answers[i][1], npu.MissedDeadline)
        contexts = server.runner._session.contexts
        assert {p: c.priority for p, c in contexts.items()} == {"high": "high", "normal": "normal"}
    finally:
        server.runner.close()


def test_an_unknown_priority_is_refused_before_anything_runs(node, reference):
    x, _ = reference
    server = NpuServer(tiny_cnn_batched(BATCH), endpoint=node.endpoint)
    try:
        with pytest.raises(npu.InvalidArgument, match="'urgent'.*low.*realtime"):
            server.run_requests(list(x[:2]), ["high", "urgent"], [None, None])
        assert server.runner._session.contexts == {}   # the valid one did not run either
    finally:
        server.runner.close()


def test_the_exporter_labels_every_sample_with_the_node(node):
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from npuctl import exporter

    link = exporter.DaemonLink(lambda: npu.connect(node.endpoint, name="exporter-test"))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter.DaemonCollector(link, {"node": "node-7"}))
    try:
        samples = [s for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples]
    finally:
        link.close()
    assert len(samples) > 10 and all(s.labels.get("node") == "node-7" for s in samples)
    assert any(s.name == "npud_device_jobs_completed_total" and s.labels.get("device") == "0" for s in samples)


def test_npu_errors_cross_processes_whole():
    """Ray hands a replica's or actor's exception to its caller by pickling it."""
    import pickle

    late = pickle.loads(pickle.dumps(npu.errors.error("ETIME", "too late", False, retry_after_ms=250)))
    assert type(late) is npu.MissedDeadline and late.code == "ETIME" and late.message == "too late"
    assert late.retryable is False and late.retry_after == 0.25 and str(late) == "ETIME: too late"


def test_a_model_without_a_common_batch_dimension_is_refused(node):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0])], "t",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(npu.InvalidArgument, match="same batch dimension first"):
        NpuRunner(model, endpoint=node.endpoint)


def test_a_batch_deadline_covers_all_its_runs_and_counts_down(node, reference, monkeypatch):
    """Submitted runs get what is left of the batch's deadline; a rerun after a failure gets less."""
    x, expected = reference
    runner = NpuRunner(tiny_cnn_batched(BATCH), endpoint=node.endpoint)
    given: list[float] = []
    submit = npu.Model.submit

    def recording(self, feeds, **options):
        given.append(options["deadline"])
        return submit(self, feeds, **options)
    monkeypatch.setattr(npu.Model, "submit", recording)
    try:
        out, stats = runner.run({"x": x[:17]}, deadline=30, fixed_deadline=False)
        assert np.array_equal(out["probs"], expected[:17]) and stats.chunks == 3
        assert len(given) == 3 and 30 >= given[0] > given[1] > given[2] > 20
        with pytest.raises(npu.MissedDeadline, match="deadline passed"):
            runner.run({"x": x[:17]}, deadline=1e-9, fixed_deadline=False)
    finally:
        runner.close()
