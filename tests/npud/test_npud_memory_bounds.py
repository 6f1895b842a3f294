"""What the daemon keeps per session, per job and per model is bounded, and goes with its owner.

The soak (docs/RELIABILITY.md, "Load (soak)") showed the daemon's memory growing under load and
staying up after every client left; these pin the bounds that fixed it.
"""

from __future__ import annotations

import gc
import os
import time
import tracemalloc
import weakref

import numpy as np
import pytest
import trio

import npu
from bench import soak_probe
from examples import tiny_cnn
from npud.ipc_schema.errors import ErrorCode, ErrorInfo
from npu.local import LocalDaemon
from npud.jobs import FINISHED, RECENT_REPORTS, Job, KeptJob, TraceRing
from npud.server import Daemon
from npud.job_table import FINISHED_JOBS_KEPT
from npud.sessions import Session
from streams import A, B, O, add_stream


class Report(list):
    """A model's per-op report (a list the test can take a weak reference to)."""


def report(model: int) -> Report:
    return Report([{"node": f"m{model}/fc", "op": "Gemm", "cycles": 100 + model, "commands": 4,
                    "bytes": 1 << 20, "notes": "x" * 200}])


def test_trace_ring_holds_no_model_report_beyond_a_few_recent_ones():
    ring = TraceRing(1000)
    reports = [report(m) for m in range(RECENT_REPORTS * 3)]
    refs = [weakref.ref(r) for r in reports]
    for m, rows in enumerate(reports):
        for _ in range(3):   # events of one model share one compact copy of its layers
            ring.add({"session": "s1", "model": m, "model_name": "mlp", "layers": rows})
    del reports, rows
    assert ring.held_reports() <= RECENT_REPORTS
    assert sum(ref() is not None for ref in refs) <= RECENT_REPORTS   # the rest were freed
    events, dropped = ring.since(0, 10_000)
    assert dropped == 0 and len(events) == 3 * 3 * RECENT_REPORTS
    assert events[0]["layers"] == [{"node": "m0/fc", "op": "Gemm", "cycles": 100}]
    assert events[-1]["layers"] == [{"node": f"m{3 * RECENT_REPORTS - 1}/fc", "op": "Gemm",
                                     "cycles": 100 + 3 * RECENT_REPORTS - 1}]
    assert events[0]["session"] == "s1" and events[0]["seq"] == 1


def test_a_finished_job_keeps_its_stats_but_not_its_session_or_own_event():
    async def main():
        session = type("S", (), {})()
        job = Job(1, "s1", 0, b"stream", [], session=session)
        waiter_woken = trio.Event()

        async def waiter():
            await job.done.wait()
            waiter_woken.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            job.finish({"cycles": 42, "engine_busy": {"mac": 7}, "wall_ms": 1.5})
        assert waiter_woken.is_set()
        assert job.done is FINISHED and job.done.is_set()
        assert job.session is None
        assert job.stats == {"cycles": 42, "engine_busy": {"mac": 7}, "wall_ms": 1.5}
        failed = Job(2, "s1", 0, b"", [])
        assert failed.stats == {}
    import trio.testing  # noqa: F401  (wait_all_tasks_blocked)
    trio.run(main)


STATS = {"cycles": 123456, "wall_ms": 0.25, "engine_busy": {"mac": 100000, "dma": 20000, "vec": 3000}}


def _finished_job(session: Session, ok: bool = True) -> Job:
    """A model's job as the daemon finishes it (npud/server.py _job_done), kept by ``session``."""
    job = Job(session.new_job_id(), session.id, 0, b"\0" * 256, [(object(), 0x1000, True)], program=7,
              model=3, model_name="tiny_cnn", layers=[{"node": "fc", "op": "Gemm"}], pid=4242,
              client=session.name, session=session)
    session.jobs_in_flight += 1
    session.remember_job(job)
    job.state, job.started, job.preemptions = "running", time.monotonic(), 1
    job.finish(stats=STATS if ok else None,
               error=None if ok else ErrorInfo.of(ErrorCode.ECANCELED, "the session closed"))
    session.jobs_in_flight -= 1
    job.bindings, job.stream, job.layers = [], b"", None
    session.keep_finished(job)
    return job


def test_kept_finished_jobs_are_compact_and_hold_nothing_of_the_run():
    """A session's kept jobs live in a few columns, not in objects of their own: small objects made
    under load and freed only when their session closes kept pymalloc's arenas after a soak."""
    session = Session("s1", b"r", "client", 1)
    _finished_job(session)   # the table's columns exist; what follows only fills them
    bound = 450              # bytes per kept job (measured ~300; a KeptJob object each ~340, a kept Job ~690)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(2 * FINISHED_JOBS_KEPT):   # full, then every slot reused once
            _finished_job(session)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    diffs = after.compare_to(before, "filename")
    grown, blocks = sum(d.size_diff for d in diffs), sum(d.count_diff for d in diffs)
    assert len(session.jobs) == FINISHED_JOBS_KEPT
    assert all(type(k) is KeptJob for k in session.jobs.values())
    assert grown / FINISHED_JOBS_KEPT < bound, f"{grown / FINISHED_JOBS_KEPT:.0f} bytes per kept job"
    # ~4 objects per kept job as KeptJob objects (4,000 here); the columns are a few blocks in all
    assert blocks < 64, f"{blocks} blocks for {FINISHED_JOBS_KEPT} kept jobs"
    kept = next(iter(session.jobs.values()))
    held = gc.get_referents(kept)
    assert not any(isinstance(o, (list, Session, Job)) for o in held), held   # no bindings, stream, session
    assert kept.layers is None and kept.session is None and kept.dependents == ()


def test_a_session_keeps_its_last_finished_jobs_oldest_first():
    session = Session("s1", b"r", "client", 1)
    session.jobs.capacity = 8
    running = Job(session.new_job_id(), session.id, 0, b"", [], session=session)
    session.remember_job(running)
    ids = [_finished_job(session, ok=i % 3 != 0).id for i in range(13)]
    assert [j.id for j in session.jobs.values()] == ids[-8:] + [running.id]   # kept oldest first, then live
    assert all(i not in session.jobs and session.jobs.get(i) is None for i in ids[:5])
    assert session.jobs[running.id] is running and len(session.jobs) == 9
    assert [session.jobs[i].state for i in ids[-8:]] == ["done" if i % 3 != 0 else "failed" for i in range(5, 13)]
    assert session.jobs[ids[-1]].error is not None and session.jobs[ids[-2]].error is None
    assert 0 not in session.jobs and -1 not in session.jobs and "1" not in session.jobs


def test_a_kept_job_with_stats_longer_than_a_slot_reads_back_whole():
    session = Session("s1", b"r", "client", 1)
    job = Job(session.new_job_id(), session.id, 0, b"", [], session=session)
    session.remember_job(job)
    big = {"cycles": 1, "per_layer": list(range(200))}
    job.finish(stats=big)
    session.keep_finished(job)
    small = _finished_job(session)
    assert session.jobs[job.id].stats == big and session.jobs[small.id].stats == STATS


def test_a_kept_job_reads_like_the_finished_job_it_replaces():
    session = Session("s1", b"r", "client", 1)
    daemon = type("D", (), {"started": 0.0})()
    for ok in (True, False):
        job = _finished_job(session, ok)
        kept = session.jobs[job.id]
        assert type(kept) is KeptJob
        assert Daemon.job_record(daemon, kept) == Daemon.job_record(daemon, job)
        for name in ("id", "session_id", "state", "stats", "packed_stats", "error", "device", "pid", "model",
                     "model_name", "client", "submitted", "started", "finished", "preemptions", "context"):
            assert getattr(kept, name) == getattr(job, name), name
        assert kept.done is FINISHED and kept.done.is_set()


@pytest.fixture
def probed(tmp_path):
    """A daemon whose cyclic garbage collector is off (so only what reference counting frees is
    freed) and which counts its live objects on demand (bench/soak_probe.py)."""
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    d = LocalDaemon("--cache-dir", str(tmp_path / "cache"),
                    env=soak_probe.probe_env(str(probe_dir), trace=False, nogc=True))
    yield d, str(probe_dir)
    d.stop()


def _work(c) -> None:
    """A model loaded and run, raw jobs on buffers: what a client leaves records of."""
    model = c.load(tiny_cnn.build())
    x = np.zeros(tiny_cnn.INPUT_SHAPE, np.float32)
    for _ in range(5):
        model.run(x)
    a, b, out = (c.alloc(4096) for _ in range(3))
    npu.wait([c.submit(add_stream(64), [(a, A, False), (b, B, False), (out, O, True)]) for _ in range(20)])


def test_a_closed_session_leaves_no_session_job_or_model_record(probed):
    daemon, probe_dir = probed
    with npu.connect(daemon.endpoint) as watcher:
        clients = [npu.connect(daemon.endpoint) for _ in range(3)]
        for c in clients:
            _work(c)
        during = soak_probe.mark(daemon.process.pid, probe_dir)["alive"]
        # each client's 5 runs and 20 jobs, finished and kept as npud.jobs.KeptJob
        assert during["Session"] == 4 and during["LoadedModel"] == 3 and during["KeptJob"] == 75
        for c in clients:
            c.close()
        deadline = time.monotonic() + 10
        while len(watcher.clients()) > 1:
            assert time.monotonic() < deadline, "the closed sessions are still listed"
            time.sleep(0.05)
        # The daemon's periodic loops (lease expiry, usage sampling: each second) may hold the
        # session they are looking at for their round, and the device processes unmap released
        # buffers asynchronously; nothing may hold a closed session's records longer.
        while True:
            after = soak_probe.mark(daemon.process.pid, probe_dir)["alive"]
            if (after["Session"] == 1 and after["BufferObject"] == 0) or time.monotonic() > deadline + 5:
                break
            time.sleep(0.25)
    assert after["Session"] == 1, str(after)   # the watcher's
    assert after["Job"] == 0 and after["KeptJob"] == 0, str(after)
    assert after["LoadedModel"] == 0, str(after)
    assert after["Context"] == 0, str(after)   # no fair-share clock or ban kept for a closed session
    assert after["BufferObject"] == 0, str(after)   # nor a cached executable its released weights


def test_the_last_client_leaving_leaves_no_session_record(probed):
    """With no session left, the periodic loops' last look must not keep one alive (a loop
    variable in their coroutines did, with its kept jobs, until another client connected)."""
    daemon, probe_dir = probed
    with npu.connect(daemon.endpoint) as c:
        _work(c)
    deadline = time.monotonic() + 10
    while True:
        after = soak_probe.mark(daemon.process.pid, probe_dir)["alive"]
        if after["Session"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert after["Session"] == 0 and after["KeptJob"] == 0, str(after)


def test_the_in_memory_cache_budget_is_a_config_key():
    from npud import compile_cache
    from npud.config import ConfigError, from_dict

    assert from_dict({}).cache_memory_bytes == compile_cache.MEMORY_BYTES
    assert from_dict({"cache_memory_bytes": "16MiB"}).cache_memory_bytes == 16 << 20
    assert from_dict({"cache_memory_bytes": 0}).cache_memory_bytes == 0
    with pytest.raises(ConfigError, match="cache_memory_bytes"):
        from_dict({"cache_memory_bytes": "lots"})


def test_trace_ring_memory_is_allocated_once_not_per_event():
    import tracemalloc

    session, client = "s1234-abcdef012345", "soak client"
    tracemalloc.start()
    try:
        ring = TraceRing(10_000)
        before = tracemalloc.get_traced_memory()[0]
        for n in range(10_000):
            ring.add({"session": session, "pid": 4242, "client": client, "job": 100_000 + n, "device": 0,
                      "state": "done", "model": 0, "model_name": "", "submitted_s": n * 0.01,
                      "cycles": 123_456 + n, "started_s": n * 0.01 + 0.001, "finished_s": n * 0.01 + 0.002,
                      "wall_ms": 1.0 + n, "priority": "normal", "context": 0, "preemptions": 0})
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # Before: 6.6 MB (a dict per event).  Now the columns (allocated in TraceRing()) and up to
    # ~0.3 MB of CPython's free lists of small tuples, which fill as temporaries are freed.
    assert grown < 1 << 20, f"10,000 events grew the heap by {grown} bytes"
    event = ring.since(9_999, 1)[0][0]
    assert event["job"] == 109_999 and event["wall_ms"] == 10_000.0 and event["client"] == client


def test_heap_is_trimmed_once_per_idle_period_after_being_busy():
    from npud.memory import HeapTrimmer, _libc_malloc_trim

    calls = []
    heap = HeapTrimmer(idle_s=5.0, trim=calls.append, collect=lambda: calls.append("gc"),
                       release=lambda: calls.append("pools"))
    assert not heap.tick(0.0, busy=False) and not heap.tick(100.0, busy=False)   # never busy: nothing owed
    heap.tick(101.0, busy=True)
    assert not heap.tick(102.0, busy=False) and not heap.tick(106.9, busy=False)  # idle < 5 s
    assert heap.tick(107.0, busy=False) and calls == ["pools", "gc", 0]   # pools dropped, garbage collected, trimmed
    assert not heap.tick(200.0, busy=False) and calls == ["pools", "gc", 0]      # once per idle period
    heap.tick(201.0, busy=True)
    assert not heap.tick(202.0, busy=False)
    heap.tick(203.0, busy=True)          # busy again before 5 s idle: the clock restarts
    assert not heap.tick(207.5, busy=False) and heap.tick(212.5, busy=False) and calls == ["pools", "gc", 0] * 2
    assert _libc_malloc_trim() is not None   # glibc here: the daemon really trims


@pytest.fixture
def test_daemon(tmp_path):
    """A private npud with fault injection (``--test-mode``)."""
    d = LocalDaemon("--test-mode", "--cache-dir", str(tmp_path / "cache"))
    yield d
    d.stop()


def test_a_fence_is_one_token_before_and_after_its_job_is_kept(test_daemon):
    """A job exported while it runs and again once the session keeps it as a KeptJob: one fence,
    and jobs of either session can still name it."""
    with npu.connect(test_daemon.endpoint) as c, npu.connect(test_daemon.endpoint) as other:
        a, b, out = (c.alloc(4096) for _ in range(3))
        binds = [(a, A, False), (b, B, False), (out, O, True)]
        c.inject_fault("slow", slow_ms=300)
        job = c.submit(add_stream(64), binds)
        token = job.export_fence()
        imported = other.import_fence(token)
        job.wait(timeout=10)
        assert job.export_fence() == token
        assert other.import_fence(token).id == imported.id
        assert npu.wait([imported], timeout=5)
        after_mine = c.submit(add_stream(64), binds, after=[job])
        x, y, z = (other.alloc(4096) for _ in range(3))
        after_theirs = other.submit(add_stream(64), [(x, A, False), (y, B, False), (z, O, True)], after=[imported])
        assert after_mine.wait(timeout=10) and after_theirs.wait(timeout=10)
        assert job.wait(timeout=5) is job


def test_an_idle_daemon_closes_its_pooled_buffers(tmp_path):
    """Freed buffers are pooled for reuse under load; once no session is left (5 s), the pool
    goes: its memfds, their mappings and the records of them made under load."""
    d = LocalDaemon("--cache-dir", str(tmp_path / "cache"))
    try:
        fds = lambda: len(os.listdir(f"/proc/{d.process.pid}/fd"))   # noqa: E731
        idle = fds()
        with npu.connect(d.endpoint) as c:
            for b in [c.alloc(4096) for _ in range(40)]:
                b.free()
            c.devices()   # the frees were handled
            pooled = fds()
            time.sleep(2.5)   # the daemon notices a busy period by sampling (every 0.5 s)
        assert pooled >= idle + 40, (idle, pooled)   # 2 descriptors a pooled buffer
        deadline = time.monotonic() + 20
        while fds() > idle + 4 and time.monotonic() < deadline:
            time.sleep(0.25)
        assert fds() <= idle + 4, (idle, pooled, fds())
    finally:
        d.stop()
