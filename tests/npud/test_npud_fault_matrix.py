"""Fault matrix cells (docs/RELIABILITY.md), each with real processes: what the other clients see,
that nothing acknowledged is lost, and how long recovery takes.  Figures are printed as
``FAULTCELL name: k=v`` lines (run with ``-s`` to see them); no test asserts a time, only that
nothing hangs.  Cells covered elsewhere are listed in docs/RELIABILITY.md."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

import npu
from npud.ipc_schema.schema import PROTOCOL_VERSION
from npud.server import WAITING_PER_CONNECTION
from sched_models import (daemon_in_test_mode, deep_mlp, device_pids, feeds, module_daemon_in_test_mode,
                          reference)
from streams import A, B, O, add_stream

N = 1024
CONFIG = """
[scheduling]
job_timeout_ms = 8000
device_processes = 1
"""


def cell(name: str, **figures) -> None:
    print(f"\nFAULTCELL {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 1)


tdaemon = module_daemon_in_test_mode("matrix", CONFIG, name="tdaemon")


class AddJob:
    """out = x + 1 over N floats, as a raw job of one client; ``check`` proves its output."""

    def __init__(self, c, x: float):
        self.x = x
        self.bufs = [c.alloc(N * 4) for _ in range(3)]
        a, b, out = self.bufs
        a.write(np.full(N, x, np.float32))
        b.write(np.full(N, 1.0, np.float32))
        out.write(np.full(N, -1.0, np.float32))
        self.job = c.submit(add_stream(N), [(a, A, False), (b, B, False), (out, O, True)])

    def check(self, timeout: float = 15) -> None:
        self.job.wait(timeout)
        assert np.all(np.frombuffer(self.bufs[2].read(), np.float32) == self.x + 1.0)
        for buf in self.bufs:
            buf.free()


def add_once(c, x: float) -> float:
    t0 = time.perf_counter()
    AddJob(c, x).check()
    return time.perf_counter() - t0


def job_state(c, job_id: int) -> str:
    return next(j["state"] for j in c._request("jobs", {"session": c.session})["jobs"] if j["job"] == job_id)


def wait_state(c, job_id: int, states: tuple[str, ...], timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while (state := job_state(c, job_id)) not in states:
        assert time.monotonic() < deadline, f"job {job_id} still {state}"
        time.sleep(0.01)
    return state


def kill_device(daemon_pid: int) -> tuple[list[int], float]:
    """SIGKILL the (one) device process and wait until it is dead; returns its pids and when."""
    deadline = time.monotonic() + 10
    while len(pids := device_pids(daemon_pid)) != 1:     # a restart may be under way
        assert time.monotonic() < deadline, pids
        time.sleep(0.01)
    t0 = time.perf_counter()
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.002)
    return pids, t0


def device_info(c) -> dict:
    return c.devices()[0].info


# --- device process SIGKILL at three points of a job's life ----------------------------------


def test_device_sigkill_at_submit(tdaemon):
    """The device process dies just before a job is dispatched to it: the job never reached it, so
    it is innocent and runs on the restarted process; the job queued behind it runs too."""
    with npu.connect(tdaemon.endpoint) as victim, npu.connect(tdaemon.endpoint) as other:
        mo = other.load(deep_mlp(layers=3, seed=2))
        x = feeds(mo, 1)
        want = reference(x, model_seed=2, layers=3)
        before = mo.run(x)[mo.outputs[0].name]          # acknowledged before the fault
        resets = device_info(other)["resets"]
        pids, t0 = kill_device(tdaemon.process.pid)
        job = AddJob(victim, 3.0)                       # dispatched to the dead process
        queued = mo.submit(x)
        job.check()
        victim_done = time.perf_counter() - t0
        got = queued.result(15)[mo.outputs[0].name]
        other_done = time.perf_counter() - t0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(before, got)
        info = device_info(other)
        assert info["resets"] == resets + 1 and info["state"] == "ok"
        assert device_pids(tdaemon.process.pid) not in ([], pids)
        cell("device SIGKILL at submit", victim_job="completed, correct (run on the new process)",
             other_job="completed, correct", kill_to_victim_done_ms=ms(victim_done),
             kill_to_other_done_ms=ms(other_done))


def test_device_sigkill_mid_job(tdaemon):
    """The device process dies while a model job runs, between slow layers: that job fails with
    EIO saying so (never reported done), a resubmission completes correctly, the other client's
    queued job completes correctly."""
    with npu.connect(tdaemon.endpoint) as victim, npu.connect(tdaemon.endpoint) as other:
        mv, mo = victim.load(deep_mlp(layers=6)), other.load(deep_mlp(layers=3, seed=2))
        x, xv = feeds(mo, 1), feeds(mv, 2)
        before = mo.run(x)[mo.outputs[0].name]
        resets = device_info(other)["resets"]
        victim.inject_fault("slow", slow_ms=100, count=1)
        running = mv.submit(xv)
        wait_state(victim, running.id, ("running",))
        time.sleep(0.15)                                 # between its first layers
        queued = mo.submit(x)
        pids, t0 = kill_device(tdaemon.process.pid)
        with pytest.raises(npu.NpuError) as info:
            running.wait(15)
        failed = time.perf_counter() - t0
        got = queued.result(15)[mo.outputs[0].name]
        other_done = time.perf_counter() - t0
        err = info.value
        assert err.code == "EIO" and err.retryable and "crashed" in err.message, err
        assert job_state(victim, running.id) == "failed"
        np.testing.assert_allclose(got, reference(x, model_seed=2, layers=3), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(before, got)
        again = mv.run(xv)[mv.outputs[0].name]           # resubmitted: the victim's session works
        np.testing.assert_allclose(again, reference(xv, layers=6), rtol=1e-4, atol=1e-5)
        info = device_info(other)
        assert info["resets"] == resets + 1 and info["state"] == "ok"
        assert device_pids(tdaemon.process.pid) not in ([], pids)
        cell("device SIGKILL mid-job", victim_job=f"{err.code} (retryable), resubmission correct",
             other_job="completed, correct", kill_to_victim_error_ms=ms(failed),
             kill_to_other_done_ms=ms(other_done))


def test_device_sigkill_at_completion(tdaemon):
    """The device process dies right after it finished a job, before its client read the result:
    the result is already the daemon's (outputs live in shared buffer objects), so it reads back
    correctly.  The daemon restarts the idle core's process at once, not when the next job would
    find it dead, and the next job runs correctly."""
    with npu.connect(tdaemon.endpoint) as victim, npu.connect(tdaemon.endpoint) as other:
        mv, mo = victim.load(deep_mlp(layers=6)), other.load(deep_mlp(layers=3, seed=2))
        xv, x = feeds(mv, 3), feeds(mo, 1)
        resets = device_info(other)["resets"]
        finished = mv.submit(xv)
        wait_state(victim, finished.id, ("done", "failed"))
        pids, t0 = kill_device(tdaemon.process.pid)
        got_v = finished.result(15)[mv.outputs[0].name]
        np.testing.assert_allclose(got_v, reference(xv, layers=6), rtol=1e-4, atol=1e-5)
        deadline = time.monotonic() + 15
        while not (device_info(other)["resets"] == resets + 1 and device_info(other)["state"] == "ok"
                   and device_pids(tdaemon.process.pid) not in ([], pids)):
            assert time.monotonic() < deadline, "the idle core's dead process was not restarted"
            time.sleep(0.01)
        restarted = time.perf_counter() - t0
        got = mo.run(x)[mo.outputs[0].name]              # the next job on that device
        next_done = time.perf_counter() - t0
        np.testing.assert_allclose(got, reference(x, model_seed=2, layers=3), rtol=1e-4, atol=1e-5)
        assert device_info(other)["resets"] == resets + 1
        cell("device SIGKILL at completion", victim_job="done, result read back correct",
             other_job="completed, correct", kill_to_restarted_ms=ms(restarted),
             kill_to_next_job_done_ms=ms(next_done))


def test_device_sigkill_sweep_never_loses_or_corrupts(tdaemon):
    """SIGKILL at five points of a 4-layer job's life, from just after submit to about when it
    finishes: each time the job either completes with the right result or fails with EIO
    (retryable) -- never lost, never done with wrong data -- and the other client's queued job
    completes correctly."""
    outcomes = []
    with npu.connect(tdaemon.endpoint) as other:
        mo = other.load(deep_mlp(layers=3, seed=2))
        x = feeds(mo, 1)
        want = reference(x, model_seed=2, layers=3)
        model = deep_mlp(layers=4, seed=11)
        for i, delay in enumerate((0.0, 0.05, 0.12, 0.2, 0.3)):
            with npu.connect(tdaemon.endpoint) as victim:     # a fresh context: no ban builds up
                mv = victim.load(model)
                xv = feeds(mv, 20 + i)
                victim.inject_fault("slow", slow_ms=60, count=1)
                job = mv.submit(xv)
                queued = mo.submit(x)
                time.sleep(delay)
                kill_device(tdaemon.process.pid)
                try:
                    got = job.result(15)[mv.outputs[0].name]
                except npu.NpuError as exc:
                    assert exc.code == "EIO" and exc.retryable and "crashed" in exc.message, exc
                    outcomes.append(f"{delay}:EIO")
                else:
                    np.testing.assert_allclose(got, reference(xv, model_seed=11, layers=4), rtol=1e-4, atol=1e-5)
                    outcomes.append(f"{delay}:done")
                np.testing.assert_allclose(queued.result(15)[mo.outputs[0].name], want, rtol=1e-4, atol=1e-5)
        mo.run(x)
        assert device_info(other)["state"] == "ok"
    cell("device SIGKILL sweep", kills_at_s_outcome=" ".join(outcomes), other_jobs="all completed, correct")


# --- a client that stops reading, and one that floods ----------------------------------------

FLOODER = """
import os, sys, msgpack, zmq
sock = zmq.Context().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(sys.argv[1])
pack = msgpack.packb
sock.send(pack({"op": "hello", "seq": 1, "args": {"protocol": %r, "client_name": "flood", "pid": os.getpid()}}))
print("ready", flush=True)
ops = [("ping", {}), ("jobs", {}), ("devices", {}), ("wait", {"job": 1, "timeout_ms": 0}),
       ("read", {"handle": 1, "offset": 0, "size": 4096})]
seq = 1
while True:                    # as fast as the daemon takes them; replies are never read
    for op, args in ops:
        seq += 1
        sock.send(pack({"op": op, "seq": seq, "args": args}))
""" % (list(PROTOCOL_VERSION),)

READS = 800
READ_BYTES = 1 << 20


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_slow_consumer_and_flooder_do_not_stall_others(tmp_path):
    """A client that sends 800 reads of 1 MiB and stops reading its socket, and another that
    floods cheap requests without reading replies: the daemon holds at most a bounded backlog for
    the first (the rest is refused with EAGAIN, retryable), and a third client's jobs complete
    correctly with bounded latency throughout.  When the slow client reads again, every request
    it sent has exactly one reply: the data of a read, or EAGAIN."""
    d = daemon_in_test_mode(tmp_path, CONFIG)
    flooder = None
    slow = zmq.Context.instance().socket(zmq.DEALER)
    try:
        slow.setsockopt(zmq.LINGER, 0)
        slow.setsockopt(zmq.RCVHWM, 1)        # stops reading: its own queue takes one message
        slow.connect(d.endpoint)

        def request(op, args, seq):
            slow.send(msgpack.packb({"op": op, "seq": seq, "args": args}))
            assert slow.poll(10_000), f"no reply to {op}"
            reply = msgpack.unpackb(slow.recv())
            assert reply["ok"], reply
            return reply["result"]

        request("hello", {"protocol": list(PROTOCOL_VERSION), "client_name": "slow", "pid": os.getpid()}, 1)
        handle = request("alloc", {"device": 0, "size": READ_BYTES}, 2)["handle"]
        pattern = (np.arange(READ_BYTES) % 251).astype(np.uint8).tobytes()
        request("write", {"handle": handle, "offset": 0, "data": pattern}, 3)

        with npu.connect(d.endpoint) as good:
            baseline = sorted(add_once(good, i) for i in range(10))
            rss0 = _peak_rss_mib(d.process.pid)
            flooder = subprocess.Popen([sys.executable, "-c", FLOODER, d.endpoint], stdout=subprocess.PIPE,
                                       text=True)
            assert flooder.stdout.readline().strip() == "ready"
            t0 = time.perf_counter()
            for i in range(READS):
                slow.send(msgpack.packb({"op": "read", "seq": 100 + i,
                                         "args": {"handle": handle, "offset": 0, "size": READ_BYTES}}))
            sent = time.perf_counter() - t0
            during = sorted(add_once(good, 20 + i) for i in range(12))
            assert device_info(good)["state"] == "ok"
            flooder.kill()
            flooder.wait()
            rss_growth = _peak_rss_mib(d.process.pid) - rss0

            # The slow client reads again: one reply per request, never a wrong byte.
            data = refused = 0
            seen = set()
            while len(seen) < READS:
                assert slow.poll(15_000), f"only {len(seen)} of {READS} replies"
                reply = msgpack.unpackb(slow.recv())
                assert reply["seq"] not in seen
                seen.add(reply["seq"])
                if reply["ok"]:
                    assert reply["result"]["data"] == pattern
                    data += 1
                else:
                    err = reply["error"]
                    assert err["code"] == "EAGAIN" and err["retryable"] and err["retry_after_ms"] > 0, err
                    assert "bytes held by npud" in err["message"]   # unread replies or in-flight reads
                    refused += 1
            assert not slow.poll(200)               # and nothing more
            assert good._request("ping", {}) == {}
            cell("slow consumer + flooder", slow_reads=READS, read_bytes=READ_BYTES, send_s=round(sent, 3),
                 slow_answered_with_data=data, slow_refused_eagain=refused,
                 daemon_peak_rss_growth_mib=round(rss_growth), others_job_p50_ms=ms(during[6]),
                 others_job_max_ms=ms(during[-1]), baseline_p50_ms=ms(baseline[5]))
            # Without the per-connection budget the daemon held every reply: READS MiB.
            assert refused > 0 and data >= 1
            assert rss_growth < READS * READ_BYTES / (1 << 20) / 2, rss_growth
        assert d.process.poll() is None
    finally:
        slow.close(0)
        if flooder is not None and flooder.poll() is None:
            flooder.kill()
            flooder.wait()
        d.stop()


WAITS = 3000
WAITING_CAP = WAITING_PER_CONNECTION


def test_waiting_requests_are_capped_per_connection(tdaemon):
    """A client sends 3000 waits for a job stuck behind another client's slow job, without reading:
    the daemon runs at most 1024 of them as tasks and refuses the rest with EAGAIN at once (no task,
    no memory); every request gets exactly one reply, the admitted waits answer when the job is
    done, and the other client is served meanwhile."""
    with npu.connect(tdaemon.endpoint) as other, npu.connect(tdaemon.endpoint) as flood:
        mo = other.load(deep_mlp(layers=8, seed=3))
        x = feeds(mo, 5)
        other.inject_fault("slow", slow_ms=250, count=1)
        slow = mo.submit(x)
        wait_state(other, slow.id, ("running",))
        stuck = AddJob(flood, 7.0)                       # queued behind it on the one core
        t0 = time.perf_counter()
        seqs = {flood._send("wait", {"job": stuck.job.id, "timeout_ms": 30_000}) for _ in range(WAITS)}
        marker = flood._send("ping", {})                 # answered once all the waits were judged
        replies, refused = {}, 0
        while marker not in replies:
            assert flood._sock.poll(15_000), "the daemon stopped answering"
            reply = msgpack.unpackb(flood._sock.recv())
            replies[reply["seq"]] = reply
        judged = time.perf_counter() - t0
        unfinished = job_state(flood, stuck.job.id) == "queued"
        t1 = time.perf_counter()
        assert other._request("ping", {}) == {}
        ping_ms = ms(time.perf_counter() - t1)
        for reply in replies.values():
            if not reply["ok"]:
                err = reply["error"]
                assert err["code"] == "EAGAIN" and err["retryable"] and "still being handled" in err["message"]
                refused += 1
        if unfinished:                                   # no wait could have finished: exactly the cap ran
            assert refused == WAITS - WAITING_CAP, refused
        assert refused > 0
        while len(replies) < WAITS + 1:
            assert flood._sock.poll(15_000), f"{len(replies)} of {WAITS + 1} replies"
            reply = msgpack.unpackb(flood._sock.recv())
            assert reply["seq"] not in replies
            replies[reply["seq"]] = reply
        assert set(replies) == seqs | {marker}
        done = [r for r in replies.values() if r["ok"] and r["seq"] != marker]
        assert len(done) == WAITS - refused and all(r["result"]["state"] == "done" for r in done)
        stuck.check()
        np.testing.assert_allclose(slow.result(15)[mo.outputs[0].name], reference(x, model_seed=3, layers=8),
                                   rtol=1e-4, atol=1e-5)
        cell("request flood (waits)", sent=WAITS, ran_as_tasks=WAITS - refused, refused_eagain=refused,
             judged_all_ms=ms(judged), other_ping_during_ms=ping_ms)


# --- the compile cache on a full disk ----------------------------------------------------------


def _can_mount_tmpfs() -> str:
    """'' if an unprivileged user namespace can mount a tmpfs here, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare(1)"
    with tempfile.TemporaryDirectory() as d:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', d],
                               capture_output=True, text=True)
    return "" if probe.returncode == 0 else f"unshare -rm cannot mount a tmpfs: {probe.stderr.strip()}"


# What a daemon SIGKILLed in the middle of storing an entry leaves: half of the tmpfs, an hour old.
LEFTOVER = ('head -c 131072 /dev/zero > "$0/.tmp-killed.npux" && '
            'touch -d "1 hour ago" "$0/.tmp-killed.npux"')


def _start_in_namespace(endpoint: str, cache: Path, size: str, log: Path) -> subprocess.Popen:
    """npud in a user + mount namespace whose cache directory is a tmpfs of ``size``, holding
    the temporary file of a writer that died."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("NPUD_ENDPOINT", None)
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs "$0" && {LEFTOVER} && exec "$@"',
             str(cache),
             sys.executable, "-m", "npud.main", "--endpoint", endpoint, "--log-level", "warning",
             "--cache-dir", str(cache)], env=env, stderr=err)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            npu.connect(endpoint, timeout=2).close()
            return proc
        except npu.NpuError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("npud did not start in its namespace")


def test_full_disk_costs_only_caching(tmp_path):
    """The cache directory is a 256 KiB tmpfs: an entry that does not fit, and later any entry
    once the disk is filled, is not stored -- the load still succeeds and runs correctly, the
    daemon logs why, no partial file is left, and other clients' cached models are untouched.
    The temporary file a killed writer left there is removed when the daemon starts."""
    why = _can_mount_tmpfs()
    if why:
        pytest.skip(why)
    sock_dir = tempfile.mkdtemp(prefix="npud-full-")
    endpoint = f"ipc://{sock_dir}/npud.sock"
    cache, log = tmp_path / "cache", tmp_path / "npud.log"
    cache.mkdir()
    proc = _start_in_namespace(endpoint, cache, "256k", log)
    seen = Path(f"/proc/{proc.pid}/root") / str(cache).lstrip("/")   # the daemon's view: its tmpfs

    def files() -> list[str]:
        return sorted(os.listdir(seen))

    def refusals() -> int:
        return log.read_text().count("cannot store compile cache entry")

    def until(what, timeout: float = 15) -> None:
        # Entries are stored after the load is answered (npud/models.py, _store).
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, (files(), log.read_text())
            time.sleep(0.02)

    try:
        with npu.connect(endpoint) as other, npu.connect(endpoint) as victim:
            assert files() == []                                 # the leftover is gone
            small = other.load(deep_mlp(layers=2, seed=5))
            assert not small.cached
            until(lambda: len(files()) == 1)                     # caching works on this tmpfs
            xs = feeds(small, 4)
            want_small = reference(xs, model_seed=5, layers=2)
            big_bytes = deep_mlp(layers=4, width=256, seed=6)    # 1 MiB of weights: does not fit
            t0 = time.perf_counter()
            big = victim.load(big_bytes)
            big_load = time.perf_counter() - t0
            assert not big.cached
            xb = feeds(big, 7)
            want_big = reference(xb, model_seed=6, layers=4, width=256)
            np.testing.assert_allclose(big.run(xb)[big.outputs[0].name], want_big, rtol=1e-4, atol=1e-5)
            until(lambda: refusals() == 1)
            assert len(files()) == 1, files()                    # no partial entry, no temporary file
            again = victim.load(big_bytes)                       # compiled again, still correct
            assert not again.cached
            np.testing.assert_allclose(again.run(xb)[again.outputs[0].name], want_big, rtol=1e-4, atol=1e-5)
            until(lambda: refusals() == 2)

            # Fill the disk: now not even a small entry fits.
            filler = seen / "filler"
            with open(filler, "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError:
                    pass
            third = victim.load(deep_mlp(layers=2, seed=8))
            assert not third.cached
            x3 = feeds(third, 9)
            np.testing.assert_allclose(third.run(x3)[third.outputs[0].name], reference(x3, model_seed=8, layers=2),
                                       rtol=1e-4, atol=1e-5)
            until(lambda: refusals() == 3)
            assert len(files()) == 2 and "filler" in files(), files()
            # The other client's cached model is untouched; with space back, caching is back.
            np.testing.assert_allclose(small.run(xs)[small.outputs[0].name], want_small, rtol=1e-4, atol=1e-5)
            assert other.load(deep_mlp(layers=2, seed=5)).cached
            filler.unlink()
            victim.load(deep_mlp(layers=2, seed=8))
            until(lambda: len(files()) == 2)
            assert victim.load(deep_mlp(layers=2, seed=8)).cached
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(sock_dir, ignore_errors=True)
    text = log.read_text()
    assert text.count("No space left on device") == 3, text
    assert "removed 1 temporary file(s)" in text, text
    cell("full disk for the cache", load="succeeds, uncached", stores_refused=text.count("cannot store compile"),
         partial_files_left=0, big_load_ms=ms(big_load), other_clients="cached models untouched")


# --- the daemon SIGKILLed and restarted ----------------------------------------------------------


def test_daemon_sigkill_and_restart():
    sock_dir = tempfile.mkdtemp(prefix="npud-kill-")
    endpoint = f"ipc://{sock_dir}/npud.sock"
    cache = os.path.join(sock_dir, "cache")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("NPUD_ENDPOINT", None)

    def start():
        proc = subprocess.Popen([sys.executable, "-m", "npud.main", "--endpoint", endpoint, "--log-level",
                                 "error", "--cache-dir", cache], env=env)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 30:
            try:
                npu.connect(endpoint, timeout=2).close()
                return proc, time.perf_counter() - t0
            except npu.NpuError:
                time.sleep(0.05)
        proc.kill()
        raise AssertionError("npud did not start")

    proc, _ = start()
    try:
        c = npu.connect(endpoint)
        m = c.load(deep_mlp(layers=3))
        x = feeds(m)
        first = m.run(x)[m.outputs[0].name]
        children = device_pids(proc.pid)
        proc.kill()
        proc.wait(10)
        t0 = time.perf_counter()
        proc, startup = start()
        with pytest.raises(npu.ConnectionLost):
            m.run(x)
        c.reconnect()
        m = c.load(deep_mlp(layers=3))
        np.testing.assert_allclose(m.run(x)[m.outputs[0].name], first)
        recovery = time.perf_counter() - t0
        # Orphans of the killed daemon: its device processes must not linger.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in children):
            time.sleep(0.05)
        orphans = [p for p in children if os.path.exists(f"/proc/{p}")
                   and b"Z" not in open(f"/proc/{p}/stat", "rb").read().split(b")")[-1][:3]]
        cell("daemon SIGKILL + restart", restart_to_first_connect_ms=ms(startup),
             restart_to_first_result_ms=ms(recovery), cache_hit_after=m.cached,
             orphaned_device_processes=len(orphans))
        assert m.cached and not orphans
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(sock_dir, ignore_errors=True)
