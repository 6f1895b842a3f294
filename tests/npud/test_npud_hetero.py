"""Heterogeneous models (npud/hetero.py): a model with nodes npu-emu's target declines is ONE loaded
model, its partitions on the NPU and on a cpu device, a run a fence-chained series of jobs -- made
the way users make them (torch.onnx export, torchvision's nms, onnxruntime's quantize_static) and
matched against onnxruntime running the whole model."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest

import npu
from npu.local import LocalDaemon

import hetero_models
from daemons import npu_and_cpu

LIMITS = '[limits]\nmemory_quota = "8MiB"\n'


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = npu_and_cpu(tmp_path_factory.mktemp("hetero"), config=LIMITS)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    return {"topk": hetero_models.topk_model(), "nms": hetero_models.nms_model(), "qdq": hetero_models.qdq_model(tmp),
            "loop": hetero_models.loop_model(), "qop": hetero_models.qop_argmax_model(tmp),
            "mask": hetero_models.bool_mask_model()}


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
                                                  ("qdq", {"Sin"}, 0.0), ("loop", {"Loop"}, 1e-6),
                                                  ("qop", {"ArgMax"}, 0.0),
                                                  ("mask", {"TopK", "ScatterElements"}, 1e-6)])
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
        assert c.load(model, device=0).cached   # every partition from the compile cache, the plan kept
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
    # fallback never takes a node the NPU target supports: every node on cpu is one `check` names
    # (or a constant its partition reads), and every node on the NPU has no reason against it
    with npu.connect(daemon.endpoint) as c:
        problems = {p["node"] for p in c.check(model, device=0)}
    assert {r["node"] for r in placement if r["device"] == 1 and "constants" not in r["reason"]} <= problems
    assert all(r["reason"] for r in placement if r["device"] == 1)
    assert all(not r["reason"] for r in placement if r["device"] == 0)
    assert 0.0 < rep.npu_macs_share <= 1.0 and "placement:" in str(rep)


@pytest.mark.parametrize("name, crossing", [("qop", {"logits_quantized": "int8"}),
                                            ("mask", {"/Greater_output_0": "bool", "/ScatterElements_output_0": "bool"})])
def test_int8_and_bool_tensors_cross_devices_in_their_own_type(models, name, crossing):
    """The cut of a quantised model falls on int8 tensors, a mask's on bool ones: npu-emu holds them
    as the cpu device (onnxruntime) does -- one byte an element -- so both partitions agree on their
    size (they disagreed, int8 being float32 on npu-emu, before compiler 0.4.0)."""
    from npud.compiler_worker import worker
    from npud.emulator.config import make_config
    from npud.executable import Executable

    plan = worker.handle({"op": "partition", "model": models[name], "config": make_config("edge").to_dict(),
                          "options": {}, "target": "npu-emu", "fallback": "cpu"})
    assert {k: v["dtype"] for k, v in plan["tensors"].items() if k in crossing} == crossing
    io = {}
    for part in plan["partitions"]:
        if part["target"] == "npu-emu":
            reply = worker.handle({"op": "compile", "model": part["model"], "config": make_config("edge").to_dict(),
                                   "options": {}, "target": "npu-emu"})
            exe = Executable.from_bytes(reply["executable"])
            io.update({t["name"]: t["dtype"] for t in exe.inputs + exe.outputs})
    assert {k: v for k, v in io.items() if k in crossing} == crossing


def test_the_run_is_one_job_whose_stats_sum_its_partitions(daemon, models):
    feeds = _feeds(models["topk"], 4)
    with npu.connect(daemon.endpoint) as c:
        m = c.load(models["topk"], device=0)
        job = m.submit(feeds)
        job.result(timeout=30)
    parts = job.stats["partitions"]
    assert [p["device"] for p in parts] == [0, 1, 0]
    assert job.stats["cycles"] == sum(p["cycles"] for p in parts) and parts[-1]["job"] == job.id


def test_runs_in_flight_at_once_each_get_their_own_results(daemon, models):
    """Runs share the model's buffers between partitions: a run waits for the previous one's last
    partition, so overlapping runs never see each other's intermediate tensors."""
    model = models["topk"]
    with npu.connect(daemon.endpoint) as c:
        m = c.load(model, device=0)
        feeds = [_feeds(model, seed) for seed in range(4)]
        runs = [m.submit(f) for f in feeds]
        got = [run.result(timeout=30) for run in runs]
    for f, g in zip(feeds, got):
        want = _want(model, f)
        np.testing.assert_allclose(g["z"], want["z"], atol=1e-5, rtol=1e-5)


def test_a_failing_partition_fails_the_run_with_its_error(daemon, models):
    with npu.connect(daemon.endpoint) as c:
        m = c.load(models["topk"], device=0)
        c.inject_fault("crash", device=1)   # the cpu partition's device process dies under it
        with pytest.raises(npu.NpuError) as info:
            m.run(_feeds(models["topk"], 5))
        assert info.value.code == "EIO" and "partition 2 of 3" in str(info.value)
        feeds = _feeds(models["topk"], 5)
        np.testing.assert_allclose(m.run(feeds)["z"], _want(models["topk"], feeds)["z"], atol=1e-5, rtol=1e-5)


def test_cancelling_the_run_cancels_every_partition(daemon, models):
    with npu.connect(daemon.endpoint) as c:
        m = c.load(models["topk"], device=0)
        c.inject_fault("slow", device=0, slow_ms=300, count=2)   # the first partition waits behind another run
        first = m.submit(_feeds(models["topk"], 6))
        run = m.submit(_feeds(models["topk"], 6))
        run.cancel()
        with pytest.raises(npu.NpuError) as info:
            run.result(timeout=30)
        assert info.value.code == "ECANCELED"
        first.result(timeout=30)
        mine = [j for j in c._request("jobs", {})["jobs"] if j["pid"] == os.getpid() and first.id < j["job"] < run.id]
        assert mine and all(j["state"] == "failed" for j in mine), mine   # none of its partitions ran
        assert m.run(_feeds(models["topk"], 6))   # the model still runs


def test_a_run_past_its_deadline_fails_with_etime(daemon, models):
    with npu.connect(daemon.endpoint) as c:
        m = c.load(models["topk"], device=0)
        c.inject_fault("slow", device=1, slow_ms=600)   # the cpu partition outlives the run's deadline
        with pytest.raises(npu.NpuError) as info:
            m.submit(_feeds(models["topk"], 7), deadline=0.25).result(timeout=30)
        assert info.value.code == "ETIME"


def _memory(c) -> int:
    """The session's charged device memory, as `clients` reports it."""
    return next(s for s in c.clients() if s["pid"] == os.getpid())["memory"]


def test_a_load_that_fails_part_way_undoes_everything(daemon, models):
    """Partitions instantiated before the failure are unloaded: nothing stays charged or allocated."""
    with npu.connect(daemon.endpoint) as c:
        base = _memory(c)
        used = {d.index: d.info["memory_used"] for d in c.devices()}
        m = c.load(models["topk"], device=0)
        need = _memory(c) - base
        m.unload()
        quota = c.limits["memory_quota"]
        filler = c.alloc(quota - base - need + 4096)   # room for all but the last page of the model
        with pytest.raises(npu.NpuError) as info:
            c.load(models["topk"], device=0)
        assert info.value.code == "EDQUOT"
        assert _memory(c) == base + filler.size + (-filler.size) % 4096
        filler.free()
        assert _memory(c) == base
        assert {d.index: d.info["memory_used"] for d in c.devices()} == used
        c.load(models["topk"], device=0).unload()


def test_fallback_none_lists_the_declined_nodes_and_how_to_get_the_extra(daemon, models):
    with npu.connect(daemon.endpoint) as c:
        with pytest.raises(npu.NpuError, match=r"TopK '/TopK': operator TopK is not supported") as info:
            c.load(models["topk"], device=0, fallback="none")
        assert info.value.code == "EINVAL" and 'fallback = "none"' in str(info.value)


def test_without_a_cpu_device_the_error_says_how_to_get_one(tmp_path, models):
    d = LocalDaemon("--cache-dir", str(tmp_path / "cache"))
    try:
        with npu.connect(d.endpoint) as c:
            with pytest.raises(npu.NpuError, match=r"TopK '/TopK'.*pip install 'npud\[cpu\]'.*driver = \"cpu\"") as info:
                c.load(models["topk"], device=0)
            assert info.value.code == "EINVAL"
    finally:
        d.stop()


def test_npuctl_compile_shows_where_declined_nodes_run(capsys, daemon, models, tmp_path):
    from npuctl.main import main as npuctl_main

    path = tmp_path / "topk.onnx"
    path.write_bytes(models["topk"])
    capsys.readouterr()
    assert npuctl_main(["--endpoint", daemon.endpoint, "compile", str(path)]) == 0
    out = capsys.readouterr().out
    assert "partitioned: 1 node(s) on other devices" in out and "of the MACs on device 0" in out
    assert "TopK '/TopK' on device 1 (cpu): operator TopK is not supported" in out


def test_the_config_default_is_cpu_and_only_cpu_or_none_are_accepted():
    from npud.config import ConfigError, from_dict

    assert from_dict({}).compile_fallback == "cpu"
    assert from_dict({"compile_fallback": "none"}).compile_fallback == "none"
    with pytest.raises(ConfigError, match="compile_fallback"):
        from_dict({"compile_fallback": "gpu"})


def test_a_model_sent_in_a_buffer_is_partitioned_too(daemon, models):
    """A model past max_inline_bytes travels in a buffer: the partitioner gets its own copy."""
    feeds = _feeds(models["topk"], 8)
    with npu.connect(daemon.endpoint) as c:
        c.limits = {**c.limits, "max_inline_bytes": 1024}   # the client sends the model in a buffer
        m = c.load(models["topk"], device=0, name="in-a-buffer")
        np.testing.assert_allclose(m.run(feeds)["z"], _want(models["topk"], feeds)["z"], atol=1e-5, rtol=1e-5)
        assert {r["device"] for r in m.report().placement} == {0, 1}


def test_an_inconsistent_partition_plan_fails_the_load_with_eio(monkeypatch):
    """The worker's plan is checked like any compiler output: a plan naming a model input no
    partition reads is EIO (not a daemon error), and nothing stays charged."""
    import trio
    from types import SimpleNamespace as NS

    from npud import hetero
    from npud.ipc_schema.errors import RequestError

    async def partition(*args):
        return {"nodes": [{"node": "t", "op": "TopK", "target": "cpu", "reason": "r", "macs": 0}],
                "partitions": [], "tensors": {}, "inputs": ["nowhere"], "outputs": []}

    cpu = NS(index=1, driver=NS(target="cpu"), target=NS(name="cpu"))
    daemon = NS(loader=NS(partition=partition), devices=[cpu])
    npu_device = NS(index=0, config=None, target=NS(name="npu-emu"))
    session = NS(memory=0)

    async def load():
        with pytest.raises(RequestError) as info:
            await hetero.load(daemon, session, npu_device, b"", b"", {}, "cpu", 1, lambda: 1 << 30, None)
        return info.value.info
    err = trio.run(load)
    assert err.code.value == "EIO" and "inconsistent" in err.message and session.memory == 0


def test_outputs_a_cpu_partition_writes_land_in_the_clients_buffers(daemon):
    """The last partition on cpu writes the model's outputs straight into the client's buffers,
    which live on the NPU device: the cpu device's process maps them too."""
    from test_npud_cpu_driver import topk_model

    model = topk_model()
    feeds = {"x": np.random.default_rng(9).standard_normal((4, 16)).astype(np.float32)}
    with npu.connect(daemon.endpoint) as c:
        m = c.load(model, device=0, input_shapes={"x": [4, 16]})
        run = m.submit(feeds)
        got = run.result(timeout=30)
    assert [p["device"] for p in run.stats["partitions"]] == [0, 1]
    want = _want(model, feeds)
    np.testing.assert_array_equal(got["values"], want["values"])
    np.testing.assert_array_equal(got["indices"], want["indices"])


def test_a_symbolic_dimension_is_reported_as_defaulted_as_for_a_one_device_model(daemon):
    """The partitions are compiled with fixed shapes; the model's own inputs still say which of
    their dimensions were symbolic and set to 1 (protocol 1.7), as a one-device load does."""
    from test_npud_cpu_driver import topk_model

    with npu.connect(daemon.endpoint) as c:
        m = c.load(topk_model(), device=0)
        sized = c.load(topk_model(), device=0, input_shapes={"x": [2, 16]})
    assert (m.inputs[0].dims, m.inputs[0].defaulted) == (("batch", 16), (0,))
    assert sized.inputs[0].shape == (2, 16) and sized.inputs[0].defaulted == ()


def test_unloading_while_a_run_waits_between_partitions_lets_the_run_finish(daemon, models):
    """The run's jobs hold the partitions' programs and the shared buffers: unloading the model
    meanwhile frees them only once the run is over, and the run still computes the right thing."""
    model = models["topk"]
    feeds = _feeds(model, 10)
    with npu.connect(daemon.endpoint) as c:
        base = _memory(c)
        m = c.load(model, device=0)
        c.inject_fault("slow", device=1, slow_ms=300)   # the run waits in its cpu partition
        run = m.submit(feeds)
        m.unload()
        got = run.result(timeout=30)
        np.testing.assert_allclose(got["z"], _want(model, feeds)["z"], atol=1e-5, rtol=1e-5)
        assert _memory(c) == base


def test_a_run_after_the_models_failed_previous_run_fails_with_its_cause(daemon):
    """A run waits for the model's previous run only for order, unless the client named it in `after`:
    then its failure is this run's (the usual `m.submit(x, after=[first])` was run regardless)."""
    model = hetero_models.topk_model()
    with npu.connect(daemon.endpoint) as c:
        m = c.load(model, device=0)
        c.inject_fault("slow", device=0, slow_ms=300)   # the first run's NPU partition is still running...
        c.inject_fault("crash", device=1)               # ...and its cpu partition will fail
        first = m.submit(_feeds(model, 1))
        second = m.submit(_feeds(model, 2), after=[first])
        with pytest.raises(npu.NpuError):
            first.result(timeout=30)
        with pytest.raises(npu.NpuError) as info:
            second.result(timeout=30)
        assert info.value.code == "ECANCELED"
        assert m.run(_feeds(model, 3))   # the model still runs


def test_a_run_needs_room_for_every_partition_in_the_sessions_jobs_in_flight(tmp_path):
    d = npu_and_cpu(tmp_path, config=LIMITS + "max_jobs_in_flight = 2\n")
    model = hetero_models.topk_model()
    try:
        with npu.connect(d.endpoint) as c:
            m = c.load(model, device=0)
            assert str(m.report()).count("partition on device") == 3
            with pytest.raises(npu.NpuError, match="limits.max_jobs_in_flight") as info:
                m.run(_feeds(model, 1))   # three partitions, two jobs allowed
            assert info.value.code == "EAGAIN"
    finally:
        d.stop()


def test_the_trace_has_each_partitions_own_layers(daemon):
    """The partitions' jobs share the model's id: the trace's layer tables are told apart by the
    partition's name (each job's layers used to be read against the first partition's table)."""
    from npuctl.tracefmt import chrome_trace

    model = hetero_models.topk_model()
    with npu.connect(daemon.endpoint) as c:
        since = c._request("trace", {"since": 0})["next"]
        m = c.load(model, device=0)
        m.run(_feeds(model, 1))
        reply = c._request("trace", {"since": since})
    tables = [t for t in reply["models"] if t["model"] == m.id]
    assert len(tables) == 3 and len({t["name"] for t in tables}) == 3
    on_cpu = [e for e in reply["events"] if e["model"] == m.id and e["device"] == 1]
    assert on_cpu
    [cpu_table] = [t for t in tables if t["name"] == on_cpu[0]["model_name"]]
    assert {r["op"] for r in cpu_table["layers"]} <= {"TopK", "Constant"}
    layers = [ev for ev in chrome_trace(reply["events"], reply["models"], [], {})["traceEvents"]
              if ev.get("cat") == "layer" and ev["pid"] == 2]   # device 1's track
    assert layers and all(ev["args"]["op"] in {"TopK", "Constant"} for ev in layers)


def test_a_heterogeneous_model_reloads_by_its_digest_alone(daemon):
    """A client that loaded the model once sends 32 bytes the next time (protocol 1.3), as for a
    one-device model: the daemon answers from its kept partition plan and compile cache.  It got
    ENOENT and the bytes travelled again (review)."""
    model = hetero_models.topk_model()
    with npu.connect(daemon.endpoint) as c:
        first = c._request("load", {"device": 0, "model": model})
        c._request("unload", {"model": first["model"]})
        again = c._request("load", {"device": 0, "model_digest": first["model_digest"]})
        assert again["model_digest"] == first["model_digest"] and again["cached"]
        report = c._request("report", {"model": again["model"]})
        assert {r["device"] for r in report["placement"]} == {0, 1}
        with pytest.raises(npu.NotFound):
            c._request("load", {"device": 0, "model_digest": bytes(32)})


def test_a_heterogeneous_model_sent_in_a_buffer_reloads_without_the_whole_model_compile(daemon):
    """A model too big to send inline comes in a buffer; its reload used to compile the whole model
    again, only for the target to decline it again (seconds, for a big model) before the kept plan
    was used.  A slow compile injected before the reload would hold it 20 s if it compiled."""
    import time

    model = hetero_models.topk_model()
    with npu.connect(daemon.endpoint) as c:
        staging = c.alloc(len(model))
        staging.write(model)
        args = {"device": 0, "model_buffer": staging.handle, "model_size": len(model)}
        first = c._request("load", args, timeout=120)
        c._request("unload", {"model": first["model"]})
        c.inject_fault("slow_compile", slow_ms=20_000)
        started = time.monotonic()
        again = c._request("load", args, timeout=120)
        assert time.monotonic() - started < 10    # generous: a whole-model compile would sleep 20 s
        assert again["model_digest"] == first["model_digest"]
        report = c._request("report", {"model": again["model"]})
        assert {r["device"] for r in report["placement"]} == {0, 1}


@pytest.mark.parametrize("fallback", ["gpu", "", 3, None])
def test_a_load_naming_an_unknown_fallback_is_refused_naming_the_option(daemon, fallback):
    with npu.connect(daemon.endpoint) as c:
        with pytest.raises(npu.InvalidArgument, match="fallback"):
            c._request("load", {"device": 0, "model": hetero_models.topk_model(), "options": {"fallback": fallback}})
        assert c.devices()   # the session is still usable
