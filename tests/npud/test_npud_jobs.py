"""Jobs run in the device process: results, stats, refusals, and recovery from a dead device."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import npu
from npud.emulator.assembler import StreamBuilder, tile
from npud.emulator.config import make_config
from streams import A, B, O, add_stream

CFG = make_config("edge")


def run_add(c, n: int = 1024, seed: int = 0):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    a, b, out = (c.alloc(n * 4) for _ in range(3))
    a.write(x)
    b.write(y)
    job = c.submit(add_stream(n), [(a, A, False), (b, B, False), (out, O, True)])
    assert job.wait(10) is job
    got = np.frombuffer(out.read(), np.float32)
    assert np.array_equal(got, x + y)
    for buf in (a, b, out):
        buf.free()
    return job


def device0(c):
    return next(d for d in c.devices() if d.index == 0)


@pytest.mark.parametrize("map_io", [True, False])
def test_elementwise_add(make_client, map_io):
    c = make_client(map_io=map_io)
    before = device0(c).info["jobs_completed"]
    n = 2048
    job = run_add(c, n)
    assert job.state == "done"
    s = job.stats
    assert s["cycles"] > 0 and s["commands"] == 9
    assert s["dma_bytes_in"] == 2 * n * 4 and s["dma_bytes_out"] == n * 4
    assert s["wall_ms"] > 0
    assert device0(c).info["jobs_completed"] == before + 1
    me = next(x for x in c.clients() if x["session"] == c.session)
    assert me["jobs_submitted"] == 1 and me["jobs_completed"] == 1 and me["jobs_failed"] == 0


def test_wait_timeout_zero_on_finished_job_and_unknown_job(client):
    job = run_add(client, 64)
    assert npu.Job(client, job.id).wait(0).state == "done"  # finished jobs are remembered
    with pytest.raises(npu.NotFound) as info:
        npu.Job(client, 999).wait(0.1)
    assert info.value.code == "ENOENT" and "999" in info.value.message


def expect_refused(c, stream, bindings, *words, code="EINVAL"):
    with pytest.raises(npu.NpuError) as info:
        c.submit(stream, bindings)
    assert info.value.code == code, info.value
    for w in words:
        assert w in info.value.message, (w, info.value.message)
    run_add(c, 256, seed=len(words))  # the device keeps working
    return info.value


def test_invalid_stream_refused(client):
    buf = client.alloc(4096)
    e = expect_refused(client, b"\x00" * 64, [(buf, A, True)], "command stream refused", "header")
    assert e.retryable is False
    good = add_stream(16)
    expect_refused(client, good[:-8], [(buf, A, True)], "command stream refused")
    expect_refused(client, good + b"\x00" * 16, [(buf, A, True)], "command stream refused")


def test_dma_outside_bindings_refused(client):
    n = 1024
    a, b, out = (client.alloc(n * 4) for _ in range(3))
    # the store goes to an address no binding covers
    stream = add_stream(n, CFG, out_va=0x900000)
    expect_refused(client, stream, [(a, A, False), (b, B, False), (out, O, True)], "command stream refused")


def test_store_into_read_only_binding_refused(client):
    n = 1024
    a, b, out = (client.alloc(n * 4) for _ in range(3))
    expect_refused(client, add_stream(n), [(a, A, False), (b, B, False), (out, O, False)],
                   "command stream refused")
    assert out.read() == bytes(n * 4)


def test_binding_errors(client):
    n = 1024
    a, b, out = (client.alloc(n * 4) for _ in range(3))
    s = add_stream(n)
    expect_refused(client, s, [(a, A + 8, False), (b, B, False), (out, O, True)],
                   "bindings[0]", "page size")
    big = client.alloc(0x20000)
    expect_refused(client, s, [(big, A, False), (b, B, False), (out, O, True)], "overlaps")
    ghost = npu.Buffer(client, 4242, 4096, 0)
    expect_refused(client, s, [(a, A, False), (ghost, B, False), (out, O, True)], "4242", code="ENOENT")
    with pytest.raises(npu.NotFound) as info:
        client.submit(s, [(a, A, False)], device=3)
    assert info.value.code == "ENODEV"


def test_freed_buffer_stays_alive_for_its_job(client):
    run_add(client, 128)  # fine: buffers freed after the job
    me = next(x for x in client.clients() if x["session"] == client.session)
    assert me["buffers"] == 0 and me["memory"] == 0


def device_children(daemon_pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == daemon_pid and b"npud.emulator.device_process" in cmd:
            kids.append(int(entry))
    return kids


def test_killed_device_process_is_restarted(daemon, client):
    run_add(client, 256)
    resets = device0(client).info["resets"]
    [pid] = device_children(daemon.process.pid)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except (FileNotFoundError, ProcessLookupError):
            break   # already reaped: the daemon restarts an idle core's dead process at once
        time.sleep(0.01)
    # the next job is innocent: it runs, on a restarted device process
    run_add(client, 512, seed=7)
    info = device0(client).info
    assert info["resets"] == resets + 1 and info["state"] == "ok"
    [new_pid] = device_children(daemon.process.pid)
    assert new_pid != pid
    run_add(client, 512, seed=8)


def test_stream_larger_than_default_socket_buffer_runs(client):
    """A 1 MiB command stream is far below the protocol's limit and must reach the device
    (the device socket's default ~208 KiB packet limit once failed it with EIO and reset
    the device twice)."""
    resets = device0(client).info["resets"]
    sb = StreamBuilder(CFG)
    for _ in range(15000):
        sb.matmul(tile(0, "float32", (1, 8)), tile(64, "float32", (8, 8)), tile(512, "float32", (1, 8)))
    stream = sb.end().build()
    assert len(stream) > 1 << 20
    job = client.submit(stream, [])
    assert job.wait(30).state == "done" and job.stats["commands"] == 15001
    assert device0(client).info["resets"] == resets


def test_histogram_buckets_are_cumulative_with_an_implicit_inf_bucket():
    from npud.jobs import Histogram

    h = Histogram((1, 10))
    for ms in (0.5, 1.0, 3, 10, 11, -0.1):
        h.observe(ms)
    assert h.info() == {"bounds_ms": [1.0, 10.0], "counts": [3, 5], "count": 6, "sum_ms": 25.5}


def test_devices_report_job_latency_and_run_time_histograms(client):
    before = device0(client).info
    run_add(client, 256)
    after = device0(client).info
    for key in ("latency_ms", "run_ms"):
        h, old = after[key], before[key]
        assert h["count"] == old["count"] + 1 and h["sum_ms"] > old["sum_ms"]
        assert h["counts"] == sorted(h["counts"]) and h["counts"][-1] <= h["count"]
        assert len(h["counts"]) == len(h["bounds_ms"]) and h["bounds_ms"] == sorted(h["bounds_ms"])
    # the end-to-end time includes the device time
    assert after["latency_ms"]["sum_ms"] - before["latency_ms"]["sum_ms"] >= \
        after["run_ms"]["sum_ms"] - before["run_ms"]["sum_ms"]


def test_usage_by_uid_outlives_sessions(make_client):
    def mine(c):
        return next(u for u in c.status()["users"] if u["uid"] == os.getuid())
    observer = make_client()
    before = mine(observer) if any(u["uid"] == os.getuid() for u in observer.status()["users"]) else \
        {"jobs_completed": 0, "busy_ms": 0.0, "modeled_cycles": 0}
    gone = make_client()
    run_add(gone, 256)
    gone.close()
    after = mine(observer)
    assert after["jobs_completed"] == before["jobs_completed"] + 1
    assert after["busy_ms"] > before["busy_ms"] and after["modeled_cycles"] > before["modeled_cycles"]


def test_usage_by_uid_is_bounded():
    from types import SimpleNamespace

    from npud.sessions import UsageByUid

    usage = UsageByUid(limit=2)
    for uid in (10, 11, 12, 13, 10):
        usage.add(uid, SimpleNamespace(error=None, busy_s=0.5, stats={"cycles": 3}))
    usage.add(12, SimpleNamespace(error="EIO", busy_s=0.0, stats={}))
    assert usage.info() == [
        {"uid": -1, "jobs_completed": 2, "jobs_failed": 1, "busy_ms": 1000.0, "modeled_cycles": 6},
        {"uid": 10, "jobs_completed": 2, "jobs_failed": 0, "busy_ms": 1000.0, "modeled_cycles": 6},
        {"uid": 11, "jobs_completed": 1, "jobs_failed": 0, "busy_ms": 500.0, "modeled_cycles": 3}]
