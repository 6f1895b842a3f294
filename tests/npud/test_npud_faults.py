"""Faults, each contained to its cause, with real processes: a hung job (abort, reset, the innocent
client's job completes correctly), a banned context, a crashed device process, a killed client, a
daemon restart; fault injection only in test mode; malformed input for the new ops and fields."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

import npu
from npu.local import LocalDaemon

from npud_raw import RawPeer, error_of
from sched_models import deep_mlp, device_pids, feeds, module_daemon_in_test_mode, reference

CONFIG = """
[scheduling]
job_timeout_ms = 8000
ban_after_hangs = 2
device_processes = 1
"""


daemon = module_daemon_in_test_mode("faults", CONFIG)


def device0(c):
    return c.devices()[0].info


def test_hang_is_aborted_reset_and_the_innocent_job_completes(daemon):
    with npu.connect(daemon.endpoint, name="guilty") as bad, npu.connect(daemon.endpoint, name="innocent") as good:
        mb, mg = bad.load(deep_mlp(layers=3)), good.load(deep_mlp(layers=6, seed=4))
        before = device0(good)
        pids = device_pids(daemon.process.pid)
        bad.inject_fault("hang")
        hung = mb.submit(feeds(mb), timeout=0.4)
        time.sleep(0.05)
        x = feeds(mg, 5)
        innocent = mg.submit(x)                       # queued behind the hung job on the one core
        with pytest.raises(npu.Timeout) as info:
            hung.wait(10)
        assert "past its timeout" in info.value.message and not info.value.retryable
        out = innocent.result(10)[mg.outputs[0].name]
        np.testing.assert_allclose(out, reference(x, model_seed=4, layers=6), rtol=1e-4, atol=1e-5)
        after = device0(good)
        assert after["resets"] == before["resets"] + 1 and after["hangs"] == before["hangs"] + 1
        assert after["state"] == "ok" and device_pids(daemon.process.pid) != pids
        mb.run(feeds(mb))                              # one hang is not a ban


def test_repeated_hangs_ban_the_context_and_others_carry_on(daemon):
    with npu.connect(daemon.endpoint) as bad, npu.connect(daemon.endpoint) as good:
        ctx = bad.context("normal")
        mb, mg = bad.load(deep_mlp(layers=2)), good.load(deep_mlp(layers=2))
        bad.inject_fault("hang", count=2)
        for _ in range(2):
            with pytest.raises(npu.Timeout):
                mb.submit(feeds(mb), context=ctx, timeout=0.3).wait(10)
        with pytest.raises(npu.PermissionDenied) as info:
            mb.submit(feeds(mb), context=ctx)
        assert "banned" in info.value.message and "hang" in info.value.message
        assert device0(good)["banned_contexts"] >= 1
        me = next(c for c in good.clients() if c["session"] == bad.session)
        assert me["banned_contexts"] == 1
        x = feeds(mg, 9)
        np.testing.assert_allclose(mg.run(x)[mg.outputs[0].name], reference(x, layers=2), rtol=1e-4, atol=1e-5)
        mb.run(feeds(mb))      # the client's other (default) context still runs


def test_crashed_device_fails_the_guilty_job_and_recovers(daemon):
    with npu.connect(daemon.endpoint) as bad, npu.connect(daemon.endpoint) as good:
        mb, mg = bad.load(deep_mlp(layers=2)), good.load(deep_mlp(layers=2))
        resets = device0(good)["resets"]
        bad.inject_fault("crash")
        crashed = mb.submit(feeds(mb))
        queued = mg.submit(feeds(mg))
        with pytest.raises(npu.DeviceFault) as info:
            crashed.wait(10)
        assert info.value.code == "EIO" and "crashed" in info.value.message
        queued.wait(10)
        assert device0(good)["resets"] == resets + 1
        mb.run(feeds(mb))


def test_killed_client_has_its_jobs_cancelled_and_memory_freed(daemon):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = {sys.path!r}
        import npu
        from sched_models import deep_mlp, feeds
        c = npu.connect({daemon.endpoint!r}, name="victim")
        m = c.load(deep_mlp(layers=8))
        c.inject_fault("slow", slow_ms=100, count=20)
        jobs = [m.submit(feeds(m)) for _ in range(5)]
        print(c.session, flush=True)
        time.sleep(60)
    """)
    with npu.connect(daemon.endpoint) as watcher:
        used = device0(watcher)["memory_used"]
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            session = child.stdout.readline().strip()
            assert any(c["session"] == session for c in watcher.clients())
            time.sleep(0.2)   # its first job is running, layer by slow layer
            child.kill()
            child.wait()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                jobs = [j for j in watcher._request("jobs", {})["jobs"] if j["session"] == session]
                if not jobs and device0(watcher)["memory_used"] == used and not any(
                        c["session"] == session for c in watcher.clients()):
                    break
                time.sleep(0.05)
            assert device0(watcher)["memory_used"] == used
            events = [e for e in watcher._request("trace", {"since": 0})["events"] if e["session"] == session]
            assert len(events) == 5 and sum(e.get("error") == "ECANCELED" for e in events) >= 4
            assert device0(watcher)["jobs_queued"] == 0
        finally:
            if child.poll() is None:
                child.kill()


def test_daemon_restart_clear_error_reconnect_and_cache_intact(tmp_path):
    sock_dir = tempfile.mkdtemp(prefix="npud-restart-")
    endpoint = f"ipc://{sock_dir}/npud.sock"
    cache = tmp_path / "cache"

    def start():
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.Popen([sys.executable, "-m", "npud.main", "--endpoint", endpoint, "--log-level",
                                 "warning", "--cache-dir", str(cache)], env=env)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                npu.connect(endpoint, timeout=2).close()
                return proc
            except npu.ConnectionLost:
                time.sleep(0.1)
        raise AssertionError("npud did not start")

    proc = start()
    try:
        c = npu.connect(endpoint)
        model = c.load(deep_mlp(layers=3))
        assert not model.cached
        x = feeds(model)
        first = model.run(x)
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        proc = start()
        with pytest.raises(npu.ConnectionLost) as info:
            model.run(x)
        assert "reconnect()" in info.value.message
        c.reconnect()
        model = c.load(deep_mlp(layers=3))
        assert model.cached           # the compile cache survived the restart
        np.testing.assert_allclose(model.run(x)[model.outputs[0].name], first[model.outputs[0].name])
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_slow_fault_delays_a_raw_command_stream_too(daemon):
    """A raw stream is one segment: the injected sleep comes before it, as before each layer of a
    model.  (It used to be skipped, so tests holding raw jobs in flight with it raced instead.)"""
    from npud.emulator.assembler import StreamBuilder, tile
    from npud.emulator.config import make_config
    sb = StreamBuilder(make_config("edge"))
    sb.matmul(tile(0, "float32", (16, 16)), tile(1024, "float32", (16, 16)), tile(2048, "float32", (16, 16)))
    sb.end()
    with npu.connect(daemon.endpoint) as c:
        c.inject_fault("slow", slow_ms=400)
        slowed = c.submit(sb.build(), [(c.alloc(1 << 16), 0, True)]).wait(30)
        plain = c.submit(sb.build(), [(c.alloc(1 << 16), 0, True)]).wait(30)
    assert slowed.stats["wall_ms"] >= 400 > plain.stats["wall_ms"], (slowed.stats, plain.stats)


def test_fault_injection_needs_test_mode():
    d = LocalDaemon()
    try:
        with npu.connect(d.endpoint) as c:
            with pytest.raises(npu.PermissionDenied) as info:
                c.inject_fault("hang")
            assert "--test-mode" in info.value.message
    finally:
        d.stop()


@pytest.mark.parametrize("op,args,field", [
    ("context_create", {"priority": "urgent"}, "priority"),
    ("context_create", {"priority": "high", "weight": 0}, "weight"),
    ("context_create", {}, "priority"),
    ("wait_jobs", {"jobs": [], "all": True, "timeout_ms": 0}, "jobs"),
    ("wait_jobs", {"jobs": [1], "all": 1, "timeout_ms": 0}, "all"),
    ("wait_jobs", {"jobs": [1], "all": True, "timeout_ms": -1}, "timeout_ms"),
    ("cancel", {"job": "1"}, "job"),
    ("fence_export", {}, "job"),
    ("fence_import", {"token": 5}, "token"),
    ("fence_import", {"token": "x" * 65}, "token"),
    ("inject_fault", {"device": 0, "kind": "melt"}, "kind"),
    ("inject_fault", {"device": 0, "kind": "slow", "slow_ms": -5}, "slow_ms"),
    ("run_model", {"model": 1, "inputs": [], "outputs": [], "context": -1}, "context"),
    ("run_model", {"model": 1, "inputs": [], "outputs": [], "after": [1] * 257}, "after"),
    ("run_model", {"model": 1, "inputs": [], "outputs": [], "deadline_ms": 0}, "deadline_ms"),
    ("submit", {"device": 0, "stream": b"x", "bindings": [], "timeout_ms": "1"}, "timeout_ms"),
    ("submit", {"device": 0, "stream": b"x", "bindings": [], "bogus": 1}, "bogus"),
])
def test_malformed_new_fields_are_einval(daemon, op, args, field):
    peer = RawPeer(daemon.endpoint)
    try:
        assert peer.hello()["ok"]
        err = error_of(peer.request(op, args))
        assert err["code"] == "EINVAL" and field in err["message"]
        assert peer.request("ping")["ok"]   # the session is still usable
    finally:
        peer.close()


def test_unknown_names_are_enoent(daemon):
    peer = RawPeer(daemon.endpoint)
    try:
        peer.hello()
        for op, args in [("cancel", {"job": 999}), ("fence_export", {"job": 999}),
                         ("fence_import", {"token": "nope"}),
                         ("wait_jobs", {"jobs": [999], "all": True, "timeout_ms": 0})]:
            assert error_of(peer.request(op, args))["code"] == "ENOENT", op
        err = error_of(peer.request("submit", {"device": 0, "stream": b"x", "bindings": [], "context": 7}))
        assert err["code"] in ("ENOENT", "EINVAL")
        assert error_of(peer.request("inject_fault", {"device": 9, "kind": "hang"}))["code"] == "ENODEV"
    finally:
        peer.close()
