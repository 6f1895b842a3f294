"""Utilisation has one definition (npud/ipc_schema/usage.py): busy core time / (wall time x cores), at most
100 % per device, in `status`, the per-client views (pmon's own interval) and the trace summary, with
several clients keeping a 4-core device busy at once. And devices keep their UUIDs across restarts."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time

import onnx
import pytest

import npu
from bench import util_views
from npud.ipc_schema.usage import util_pct
from npu.local import LocalDaemon
from npuctl.main import main as npuctl_main
from npud.identity import device_uuid, machine_id

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "compiler_worker"))
from compiler_testmodels import mlp  # noqa: E402

SKEW_PCT = 10.0      # the clients' shares and the device's are read a few ms apart


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = util_views.daemon(str(tmp_path_factory.mktemp("cache")))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def load(daemon, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "mlp.onnx"
    onnx.save(mlp(), str(path))
    load = util_views.Load(daemon.endpoint, str(path))
    load.steady(2.0)   # every client's jobs run; a few utilisation samples of steady load
    yield load
    load.close()


def ctl_json(capsys, daemon, *args):
    capsys.readouterr()
    code = npuctl_main(["--endpoint", daemon.endpoint, *args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def shares(clients: list[dict]) -> dict[int, float]:
    """Per device, the sum of the clients' shares of it."""
    total: dict[int, float] = {}
    for c in clients:
        for u in c["devices"]:
            total[u["device"]] = total.get(u["device"], 0.0) + u["util_pct"]
    return total


def check_bounded(devices: list[dict], clients: list[dict]) -> None:
    for d in devices:
        assert 0 <= d["util_pct"] <= 100, d
    for c in clients:
        assert all(0 <= u["util_pct"] <= 100 for u in c["devices"]), c
        assert c["util_pct"] == pytest.approx(sum(u["util_pct"] for u in c["devices"]))
    util = {d["index"]: d["util_pct"] for d in devices}
    for device, total in shares(clients).items():
        assert total <= util[device] + SKEW_PCT, (device, total, util)


def test_definition():
    assert util_pct(1.0, 1.0, 4) == 25.0 and util_pct(4.0, 1.0, 4) == 100.0
    assert util_pct(5.0, 1.0, 4) == 100.0 and util_pct(0.0, 0.0) == 0.0 and util_pct(-1.0, 1.0) == 0.0


def test_status_utilisation_never_exceeds_100_per_device(capsys, daemon, load):
    s = ctl_json(capsys, daemon, "status")
    loaders = [c for c in s["clients"] if c["name"].startswith("load")]
    assert len(loaders) == 4 and all(c["devices"] for c in loaders)
    check_bounded(s["devices"], loaders)
    on_server = [c for c in loaders if [u["device"] for u in c["devices"]] == [0]]
    assert len(on_server) == 3 and all(c["util_pct"] > 0 for c in on_server)
    # a client's busy_ms is its device time; the server's busy_ms is per core (the wire's definition)
    assert sum(c["busy_ms"] for c in on_server) <= s["devices"][0]["busy_ms"] * 4 * 1.05


def test_pmon_interval_utilisation_never_exceeds_100_per_device(capsys, daemon, load):
    """pmon and dmon compute their own interval's utilisation from the busy counters."""
    from npuctl.monitor import Sampler
    with npu.connect(daemon.endpoint, name="sampler") as c:
        sampler = Sampler(c, c.session)
        sampler.sample()
        time.sleep(1.0)
        s = sampler.sample()
    loaders = [c for c in s["clients"] if c["name"].startswith("load")]
    check_bounded(s["devices"], loaders)
    records = [json.loads(line) for line in _lines(capsys, daemon, "pmon", "-c", "2", "-d", "0.5", "--json")]
    assert records and all(0 <= r["util.pct"] <= 100 for r in records if r["devices"] != "-")


def _lines(capsys, daemon, *args) -> list[str]:
    capsys.readouterr()
    assert npuctl_main(["--endpoint", daemon.endpoint, *args]) == 0
    return capsys.readouterr()[0].splitlines()


def test_trace_summary_utilisation_never_exceeds_100_per_device(capsys, daemon, load):
    s = ctl_json(capsys, daemon, "trace", "--duration", "1.5", "--summary")
    assert s["events"] > 0 and not s["interrupted"]
    for d in s["devices"]:
        assert 0 < d["util_pct"] <= 100, d
    loaders = [c for c in s["clients"] if c["client"].startswith("load")]
    assert loaders and all(0 < c["util_pct"] <= 100 * len(c["devices"]) for c in loaders)
    server = [c["util_pct"] for c in loaders if c["devices"] == [0]]
    assert sum(server) <= s["devices"][0]["util_pct"] + 0.5   # the same events, split by client


# --- identity ---------------------------------------------------------------------------------


def test_uuid_is_derived_from_host_name_and_index():
    one = device_uuid("npu0", 0, host="a" * 32)
    assert re.fullmatch(r"NPU-[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", one)
    assert one == device_uuid("npu0", 0, host="a" * 32)
    assert len({one, device_uuid("npu1", 0, host="a" * 32), device_uuid("npu0", 1, host="a" * 32),
                device_uuid("npu0", 0, host="b" * 32)}) == 4
    assert machine_id(files=()).startswith("hostname:") and machine_id()


def test_uuid_survives_a_daemon_restart(capsys, tmp_path):
    args = ("--device", "edge", "--device", "server", "--cache-dir", str(tmp_path))
    seen = []
    for _ in range(2):
        d = LocalDaemon(*args)
        try:
            seen.append([dev["uuid"] for dev in ctl_json(capsys, d, "devices")])
            rows = _lines(capsys, d, "query", "--device=index,uuid", "--format=csv,noheader")
        finally:
            d.stop()
        assert rows == [f"{i}, {u}" for i, u in enumerate(seen[-1])]
    assert seen[0] == seen[1] and len(set(seen[0])) == 2 and all(u.startswith("NPU-") for u in seen[0])


# --- busy counters ------------------------------------------------------------------------------


def test_busy_counter_never_runs_ahead_of_the_clock_or_back_across_a_preemption(tmp_path):
    """A preempted job's wait for the more urgent one is not device time: a 1-core device's busy
    counter grows at most as fast as the clock, and never decreases, while a low-priority job is
    preempted, waits, and resumes."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "npud"))
    from sched_models import deep_mlp, feeds
    d = LocalDaemon("--device", "edge", "--test-mode", "--cache-dir", str(tmp_path))
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample():
        with npu.connect(d.endpoint, name="sampler") as c:
            while not stop.is_set():
                s = c._request("status", {})   # the daemon's clock and counter, read together
                samples.append((s["uptime_s"], s["devices"][0]["busy_ms"]))
                time.sleep(0.01)
    try:
        with npu.connect(d.endpoint, name="low") as low_c, npu.connect(d.endpoint, name="high") as high_c:
            low_model, high_model = low_c.load(deep_mlp(layers=8)), high_c.load(deep_mlp(layers=4))
            low_c.inject_fault("slow", slow_ms=60)
            high_c.inject_fault("slow", slow_ms=60)
            sampler = threading.Thread(target=sample)
            sampler.start()
            low = low_model.submit(feeds(low_model), context=low_c.context("low"))
            time.sleep(0.15)   # in its layers
            high = high_model.submit(feeds(high_model), context=high_c.context("high"))
            high.wait(30)
            low.wait(30)
            time.sleep(0.1)
            stop.set()
            sampler.join(30)
            assert low.stats["preemptions"] >= 1
    finally:
        stop.set()
        d.stop()
    assert len(samples) > 20
    for (t0, b0), (t1, b1) in zip(samples, samples[1:]):
        assert b1 >= b0 - 1e-6, (b0, b1)                        # never back
        assert b1 - b0 <= (t1 - t0) * 1e3 + 3.0, (t1 - t0, b1 - b0)   # one core: not faster than the clock


def test_retry_hint_is_the_mean_device_time_of_a_job_on_a_multicore_device():
    """A device's busy_s is core-seconds already: 10 jobs that took 1 core-second on a 4-core device
    took 100 ms each, not 400."""
    from types import SimpleNamespace

    from npud.handlers import _retry_hint
    device = SimpleNamespace(jobs_completed=8, jobs_failed=2, busy_s=1.0, cores=[None] * 4)
    assert _retry_hint(SimpleNamespace(devices=[device]), device) == 100
