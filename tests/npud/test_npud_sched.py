"""Scheduling through a real daemon and real clients: priorities, fair share, preemption at layer
boundaries, parallel cores, deadlines, admission limits, fences and cancellation."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import npu
from npu.local import LocalDaemon

from sched_models import deep_mlp, feeds, module_daemon_in_test_mode, reference, write_config

CONFIG = """
[limits]
max_jobs_in_flight = 16

[scheduling]
job_timeout_ms = 5000
starvation_ms = 400
device_processes = 1
"""


daemon = module_daemon_in_test_mode("sched", CONFIG)


@pytest.fixture
def clients(daemon):
    opened = []

    def make(**kw):
        c = npu.connect(daemon.endpoint, **kw)
        opened.append(c)
        return c
    yield make
    for c in opened:
        c.close()


def test_model_job_has_a_fence_point_and_correct_results(clients):
    c = clients()
    model = c.load(deep_mlp())
    x = feeds(model)
    jobs = [model.submit(x) for _ in range(3)]
    assert [j.fence for j in jobs] == [(0, 1), (0, 2), (0, 3)]
    assert npu.wait(jobs, all=True, timeout=10) == jobs
    for j in jobs:
        np.testing.assert_allclose(j.result()[model.outputs[0].name], reference(x), rtol=1e-4, atol=1e-5)


def test_priorities_strict_between_classes(clients):
    low_c, high_c = clients(name="low"), clients(name="high")
    low_ctx, high_ctx = low_c.context("low"), high_c.context("high")
    assert (low_ctx.priority, high_ctx.priority) == ("low", "high")
    low_model, high_model = low_c.load(deep_mlp()), high_c.load(deep_mlp())
    low_c.inject_fault("slow", slow_ms=5, count=6)   # every layer of the first 6 low jobs takes >= 5 ms
    low_jobs = [low_model.submit(feeds(low_model), context=low_ctx) for _ in range(6)]
    time.sleep(0.05)
    high = high_model.submit(feeds(high_model), context=high_ctx)
    high.wait(10)
    done_before_high = sum(1 for j in npu.wait(low_jobs, all=False, timeout=10) if j.finished)
    npu.wait(low_jobs, timeout=20)
    # The high job ran as soon as the running low job reached a layer boundary, not after the queue.
    finished_low = [j for j in low_jobs if j.stats.get("wall_ms")]
    assert len(finished_low) == 6
    assert done_before_high <= 2
    jobs = {j["job"]: j for j in high_c._request("jobs", {"session": high_c.session})["jobs"]}
    assert jobs[high.id]["priority"] == "high"


def test_preemption_waits_at_most_one_layer(clients):
    low_c, high_c = clients(name="low"), clients(name="high")
    low_ctx, high_ctx = low_c.context("low"), high_c.context("high")
    low_model = low_c.load(deep_mlp(layers=16))
    high_model = high_c.load(deep_mlp(layers=2))
    layer_ms = 40
    low_c.inject_fault("slow", slow_ms=layer_ms)
    x = feeds(low_model, 3)
    low = low_model.submit(x, context=low_ctx)
    time.sleep(0.15)                                     # it is in its layers now
    high = high_model.submit(feeds(high_model), context=high_ctx)
    high.wait(10)
    low.wait(10)
    assert low.stats["preemptions"] >= 1
    # waited at most the rest of one low layer (plus scheduling overhead), far less than the low job
    assert high.stats["queue_ms"] < layer_ms + 60, high.stats
    assert low.stats["wall_ms"] > 15 * layer_ms
    np.testing.assert_allclose(low.result()[low_model.outputs[0].name], reference(x, layers=16),
                               rtol=1e-4, atol=1e-5)   # resumed where it stopped: same result


def _saturate(model, ctx, stop: threading.Event, done: list, depth: int = 4) -> None:
    x = feeds(model)
    in_flight = [model.submit(x, context=ctx) for _ in range(depth)]
    while in_flight:
        job = in_flight.pop(0)
        job.wait(30)
        done.append((time.monotonic(), job.stats["cycles"]))
        if not stop.is_set():
            in_flight.append(model.submit(x, context=ctx))


def _share(weights: tuple[int, int], clients) -> float:
    cs = [clients(name=f"fair{i}") for i in range(2)]
    models = [c.load(deep_mlp(layers=4, width=128, batch=16)) for c in cs]
    ctxs = [c.context("normal", weight=w) for c, w in zip(cs, weights)]
    # The device must be the bottleneck, or each client gets what it can submit and the split says
    # nothing about the scheduler: a few ms of injected sleep per layer keeps it busy even when a
    # loaded machine slows the client threads down.
    for c in cs:
        c.inject_fault("slow", slow_ms=3, count=1000)
    stop, done = threading.Event(), ([], [])
    # Each client saturates from its own thread (a Client belongs to one thread).
    threads = [threading.Thread(target=_saturate, args=(m, ctx, stop, d)) for m, ctx, d in zip(models, ctxs, done)]
    for t in threads:
        t.start()
    time.sleep(2.5)
    stop.set()
    for t in threads:
        t.join(30)
    # Modeled device time over the window in which both were saturating (drop the tails).
    end = min(d[-1][0] for d in done)
    start = max(d[0][0] for d in done)
    cycles = [sum(c for t, c in d if start <= t <= end) for d in done]
    return cycles[0] / sum(cycles)


def test_fair_share_between_equal_contexts(clients):
    share = _share((1, 1), clients)
    assert 0.4 <= share <= 0.6, share


def test_weights_change_the_split(clients):
    share = _share((3, 1), clients)
    assert 0.65 <= share <= 0.85, share


def test_starvation_guard_lets_low_run(clients):
    low_c, high_c = clients(), clients()
    low_ctx, high_ctx = low_c.context("low"), high_c.context("high")
    low_model, high_model = low_c.load(deep_mlp(layers=2)), high_c.load(deep_mlp(layers=2))
    high_c.inject_fault("slow", slow_ms=20, count=100)
    stop = threading.Event()
    done: list = []
    t = threading.Thread(target=_saturate, args=(high_model, high_ctx, stop, done, 3))
    t.start()
    try:
        time.sleep(0.2)
        started = time.monotonic()
        low_model.submit(feeds(low_model), context=low_ctx).wait(10)
        waited = time.monotonic() - started
    finally:
        stop.set()
        t.join(30)
    assert waited < 2.0   # starvation_ms = 400: it ran although high kept the device busy


def test_realtime_needs_policy(clients, daemon):
    c = clients()
    # The daemon's own user may (the default policy); the check itself is npud/policy.py's.
    assert c.context("realtime").priority == "realtime"


def test_deadlines_persistent_and_transient(clients):
    p, t, busy_c = clients(), clients(), clients()
    slow_model = p.load(deep_mlp(layers=8))
    p.inject_fault("slow", slow_ms=40)
    slow_model.run(feeds(slow_model))            # measured: ~320 ms of device time
    with pytest.raises(npu.MissedDeadline) as persistent:
        slow_model.submit(feeds(slow_model), deadline=0.1)
    assert persistent.value.code == "ETIME" and not persistent.value.transient
    assert "persistent" in persistent.value.message
    # transient: fast enough alone, but the device is busy with a long job of the same priority
    model = t.load(deep_mlp(layers=8, seed=1))
    model.run(feeds(model))
    busy_model = busy_c.load(deep_mlp(layers=8, seed=2))
    busy_c.inject_fault("slow", slow_ms=60)
    busy = busy_model.submit(feeds(busy_model))
    time.sleep(0.05)
    late = model.submit(feeds(model), deadline=0.2)
    with pytest.raises(npu.MissedDeadline) as transient:
        late.wait(10)
    assert transient.value.transient and "transient" in transient.value.message
    busy.wait(10)
    model.submit(feeds(model), deadline=5).wait(10)   # and with room, it makes it


def test_admission_limit_is_transient_with_a_retry_hint(clients):
    c = clients()
    model = c.load(deep_mlp(layers=2))
    # One slow job (an injected sleep, which a loaded machine cannot shorten) holds the device
    # while the other fifteen queue behind it: all sixteen stay in flight.
    c.inject_fault("slow", slow_ms=1000, count=1)
    jobs = [model.submit(feeds(model)) for _ in range(16)]
    with pytest.raises(npu.Busy) as info:
        model.submit(feeds(model))
    assert info.value.code == "EAGAIN" and info.value.retryable
    assert info.value.retry_after is not None and 0 < info.value.retry_after < 60
    assert "max_jobs_in_flight" in info.value.message
    npu.wait(jobs, timeout=20)
    model.run(feeds(model))     # room again


def test_dependencies_and_failure_propagation(clients):
    a, b = clients(name="producer"), clients(name="consumer")
    ma, mb = a.load(deep_mlp(layers=3)), b.load(deep_mlp(layers=3))
    a.inject_fault("slow", slow_ms=30)
    first = ma.submit(feeds(ma))
    second = ma.submit(feeds(ma), after=[first])
    token = second.export_fence()
    fence = b.import_fence(token)
    third = mb.submit(feeds(mb), after=[fence])
    third.wait(10)
    records = {(j["session"], j["job"]): j for j in b._request("jobs", {})["jobs"]}
    rec = [records[(a.session, first.id)], records[(a.session, second.id)], records[(b.session, third.id)]]
    assert rec[0]["finished_s"] <= rec[1]["started_s"] and rec[1]["finished_s"] <= rec[2]["started_s"]
    assert npu.wait([fence], timeout=1) == [fence]
    # a failure travels down the chain with its cause
    a.inject_fault("crash")
    doomed = ma.submit(feeds(ma))
    child = ma.submit(feeds(ma), after=[doomed])
    grandchild = mb.submit(feeds(mb), after=[b.import_fence(child.export_fence())])
    with pytest.raises(npu.DeviceFault):
        doomed.wait(10)
    for job in (child, grandchild):
        with pytest.raises(npu.Cancelled) as info:
            job.wait(10)
        assert "EIO" in info.value.message and "depends on" in info.value.message
    # after a failed job, a new dependent fails at once
    with pytest.raises(npu.Cancelled):
        ma.submit(feeds(ma), after=[doomed]).wait(10)


def test_wait_any_all_and_cancel(clients):
    c = clients()
    model = c.load(deep_mlp(layers=4))
    c.inject_fault("slow", slow_ms=100, count=1)
    slow = model.submit(feeds(model))
    quick = model.submit(feeds(model))
    queued = model.submit(feeds(model), after=[slow])
    with pytest.raises(npu.Timeout):
        npu.wait([slow, queued], all=True, timeout=0.05)
    assert queued.cancel() == "failed"
    with pytest.raises(npu.Cancelled):
        queued.wait(5)
    assert npu.wait([slow, quick], all=False, timeout=10)
    npu.wait([slow, quick], timeout=10)
    # cancelling a running model job stops it at a layer boundary
    c.inject_fault("slow", slow_ms=50, count=1)
    running = model.submit(feeds(model))
    time.sleep(0.08)
    running.cancel()
    with pytest.raises(npu.Cancelled):
        running.wait(5)
    model.run(feeds(model))   # the arena is free again


def test_two_cores_run_jobs_in_parallel(tmp_path):
    cfg = write_config(tmp_path / "npud.toml", "[scheduling]\ndevice_processes = 2\n")
    d = LocalDaemon("--test-mode", "--config", cfg, "--cache-dir", str(tmp_path / "cache"))
    try:
        with npu.connect(d.endpoint) as a, npu.connect(d.endpoint) as b:
            assert a.devices()[0].info["cores"] == 2
            ma, mb = a.load(deep_mlp(layers=4)), b.load(deep_mlp(layers=4))
            a.inject_fault("slow", slow_ms=75)
            b.inject_fault("slow", slow_ms=75)
            ja, jb = ma.submit(feeds(ma)), mb.submit(feeds(mb))
            ja.wait(10), jb.wait(10)
            # Parallel means their device intervals overlap (serially, one starts after the other ends).
            spans = {(e["session"], e["job"]): (e["started_s"], e["finished_s"])
                     for e in a._request("trace", {"since": 0})["events"]}
            (a0, a1), (b0, b1) = spans[(a.session, ja.id)], spans[(b.session, jb.id)]
            assert a0 < b1 and b0 < a1, ((a0, a1), (b0, b1))
            np.testing.assert_allclose(ja.result()[ma.outputs[0].name], reference(feeds(ma), layers=4),
                                       rtol=1e-4, atol=1e-5)
    finally:
        d.stop()
