"""Heterogeneous models (npud/hetero.py): a model with nodes npu-emu's target declines is ONE loaded
model, its partitions on the NPU and on a cpu device, a run a fence-chained series of jobs -- made
the way users make them (torch.onnx export, torchvision's nms, onnxruntime's quantize_static) and
matched against onnxruntime running the whole model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import npu
from npu.local import LocalDaemon

import hetero_models

CONFIG = """
[[devices]]
name = "npu0"

[[devices]]
name = "cpu0"
driver = "cpu"
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    path = tmp_path_factory.mktemp("hetero") / "npud.toml"
    path.write_text(CONFIG)
    d = LocalDaemon("--config", str(path), "--cache-dir", str(path.parent / "cache"))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    return {"topk": hetero_models.topk_model(), "nms": hetero_models.nms_model(), "qdq": hetero_models.qdq_model(tmp)}


def _feeds(model: bytes, seed: int) -> dict:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
            for i in session.get_inputs()}


def _want(model: bytes, feeds: dict) -> dict:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


@pytest.mark.parametrize("name, declined, atol", [("topk", {"TopK"}, 1e-5),
                                                  ("nms", {"NonMaxSuppression", "ScatterElements"}, 1e-5),
                                                  ("qdq", {"Sin"}, 0.0)])
def test_a_model_with_declined_nodes_runs_across_both_devices_and_matches_onnxruntime(daemon, models, name,
                                                                                       declined, atol):
    model = models[name]
    feeds = _feeds(model, 3)
    want = _want(model, feeds)
    with npu.connect(daemon.endpoint) as c:
        before = {d.index: d.info["jobs_completed"] for d in c.devices()}
        m = c.load(model, device=0)
        got = m.run(feeds)
        rep = m.report()
        after = {d.index: d.info["jobs_completed"] for d in c.devices()}
    for key, value in want.items():
        if atol:
            np.testing.assert_allclose(got[key], value, atol=atol, rtol=1e-5)
        else:
            np.testing.assert_array_equal(got[key], value)
    assert after[0] > before[0] and after[1] > before[1], "the run crossed devices"
    placement = rep.placement
    on_cpu = {r["op"] for r in placement if r["device"] == 1}
    assert declined <= on_cpu
    # fallback never takes a node the NPU target supports: every node on cpu has the NPU's reason
    assert all(r["reason"] for r in placement if r["device"] == 1 and r["op"] != "Constant")
    assert all(not r["reason"] for r in placement if r["device"] == 0)
    assert 0.0 < rep.npu_macs_share <= 1.0 and "placement:" in str(rep)


def test_the_run_is_one_job_whose_stats_sum_its_partitions(daemon, models):
    feeds = _feeds(models["topk"], 4)
    with npu.connect(daemon.endpoint) as c:
        m = c.load(models["topk"], device=0)
        job = m.submit(feeds)
        job.result(timeout=30)
        stats = c.wait(job.id)["stats"] if hasattr(c, "wait") else job.stats
    parts = stats["partitions"]
    assert [p["device"] for p in parts] == [0, 1, 0]
    assert stats["cycles"] == sum(p["cycles"] for p in parts)


def test_fallback_none_lists_the_declined_nodes_and_how_to_get_the_extra(daemon, models):
    with npu.connect(daemon.endpoint) as c:
        with pytest.raises(npu.NpuError, match=r"TopK '/TopK': operator TopK is not supported") as info:
            c.load(models["topk"], device=0, fallback="none")
        assert info.value.code == "EINVAL" and 'fallback = "none"' in str(info.value)
