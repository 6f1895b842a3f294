"""Injected slow compiles (inject_fault slow_compile, test mode only): the compile timeout fails the
compile with ETIMEDOUT and replaces its worker, the next compile works, and a slow compile on one
worker does not hold up a compile on the other."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import npu
from npu.local import LocalDaemon

from npud_raw import RawPeer, error_of
from sched_models import deep_mlp, feeds, module_daemon_in_test_mode, reference

CONFIG = """
compile_workers = 2
compile_timeout_s = 3
"""
SLOW_MS = 2500   # an injected compile delay: under the time limit, far over a small compile


daemon = module_daemon_in_test_mode("compile-faults", CONFIG)


def worker_pids(daemon_pid: int) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == daemon_pid and b"npud.compiler_worker.worker" in cmd:
            pids.add(int(entry.name))
    return pids


def test_slow_compile_times_out_the_worker_is_replaced_and_the_next_compile_works(daemon):
    with npu.connect(daemon.endpoint) as c:
        c.load(deep_mlp(layers=1, seed=100))          # a worker is up (they start lazily)
        c.inject_fault("slow_compile", slow_ms=30_000)
        outcome = {}

        def load_slowly():
            started = time.monotonic()
            try:
                c.load(deep_mlp(layers=2, seed=101))
            except npu.NpuError as exc:
                outcome["error"] = exc
            outcome["took"] = time.monotonic() - started

        thread = threading.Thread(target=load_slowly)
        thread.start()
        time.sleep(1.0)
        during = worker_pids(daemon.process.pid)      # the sleeping worker among them
        assert during and all(b"--test-mode" in Path(f"/proc/{p}/cmdline").read_bytes() for p in during)
        thread.join(20)
        err = outcome["error"]
        assert isinstance(err, npu.Timeout) and err.code == "ETIMEDOUT" and "compile_timeout_s" in err.message
        assert 2.5 < outcome["took"] < 15
        gone = during - worker_pids(daemon.process.pid)
        assert len(gone) == 1                         # the slow worker was stopped
        model = c.load(deep_mlp(layers=2, seed=101))   # the fault was used up: this one compiles
        assert not model.cached
        x = feeds(model, 3)
        np.testing.assert_allclose(model.run(x)[model.outputs[0].name],
                                   reference(x, model_seed=101, layers=2), rtol=1e-4, atol=1e-5)
        c.inject_fault("slow_compile", slow_ms=500)   # hold one worker so the other is used too
        holder = threading.Thread(target=c.load, args=(deep_mlp(layers=1, seed=102),))
        holder.start()
        time.sleep(0.2)
        with npu.connect(daemon.endpoint) as other:
            other.load(deep_mlp(layers=1, seed=103))
        holder.join(20)
        now = worker_pids(daemon.process.pid)
        assert len(now) == 2 and not gone & now       # a fresh worker took its place


def test_a_slow_compile_does_not_hold_up_another(daemon):
    with npu.connect(daemon.endpoint) as slow, npu.connect(daemon.endpoint) as fast:
        slow.inject_fault("slow_compile", slow_ms=SLOW_MS)
        done = {}

        def load_slowly():
            start = time.monotonic()
            done["model"] = slow.load(deep_mlp(layers=2, seed=200))
            done["slow"] = time.monotonic() - start

        thread = threading.Thread(target=load_slowly)
        thread.start()
        time.sleep(0.2)                               # the slow compile is on one worker
        model = fast.load(deep_mlp(layers=2, seed=201))
        assert not model.cached and "model" not in done   # done on the other worker meanwhile
        thread.join(20)
        assert done["slow"] >= SLOW_MS / 1e3 and not done["model"].cached
        x = feeds(model)
        np.testing.assert_allclose(done["model"].run(x)[model.outputs[0].name],
                                   reference(x, model_seed=200, layers=2), rtol=1e-4, atol=1e-5)


def test_slow_compile_only_hits_this_session_and_a_cache_hit_keeps_it(daemon):
    with npu.connect(daemon.endpoint) as a, npu.connect(daemon.endpoint) as b:
        # Compared with the injected delay, which is long enough that a loaded machine's
        # ordinary compile never comes near it.
        a.inject_fault("slow_compile", slow_ms=SLOW_MS)
        start = time.monotonic()
        b.load(deep_mlp(layers=1, seed=300))          # b's compile is not slowed
        assert time.monotonic() - start < SLOW_MS / 1e3
        start = time.monotonic()
        assert a.load(deep_mlp(layers=1, seed=300)).cached   # no compile: the fault waits
        assert time.monotonic() - start < SLOW_MS / 1e3
        start = time.monotonic()
        a.load(deep_mlp(layers=1, seed=301))
        assert time.monotonic() - start >= SLOW_MS / 1e3


def test_slow_compile_needs_test_mode(tmp_path):
    d = LocalDaemon("--cache-dir", str(tmp_path / "cache"))
    try:
        with npu.connect(d.endpoint) as c:
            with pytest.raises(npu.PermissionDenied) as info:
                c.inject_fault("slow_compile", slow_ms=1000)
            assert "--test-mode" in info.value.message
            c.load(deep_mlp(layers=1, seed=400))       # its workers run without --test-mode
            assert not any(b"--test-mode" in Path(f"/proc/{p}/cmdline").read_bytes()
                           for p in worker_pids(d.process.pid))
    finally:
        d.stop()


@pytest.mark.parametrize("args,field", [
    ({"device": 0, "kind": "slow_compile"}, "slow_ms"),
    ({"device": 0, "kind": "slow_compile", "slow_ms": 0}, "slow_ms"),
    ({"device": 0, "kind": "slow_compile", "slow_ms": -1}, "slow_ms"),
    ({"device": 0, "kind": "slow_compile", "slow_ms": 60_001}, "slow_ms"),
    ({"device": 0, "kind": "slow_compile", "slow_ms": "5"}, "slow_ms"),
    ({"device": 0, "kind": "slow_compile", "slow_ms": 10, "count": 0}, "count"),
    ({"device": 0, "kind": "slow_compiles", "slow_ms": 10}, "kind"),
])
def test_malformed_slow_compile_is_einval(daemon, args, field):
    peer = RawPeer(daemon.endpoint)
    try:
        assert peer.hello()["ok"]
        err = error_of(peer.request("inject_fault", args))
        assert err["code"] == "EINVAL" and field in err["message"]
        assert peer.request("ping")["ok"]
        assert error_of(peer.request("inject_fault", {**args, "device": 9, "kind": "slow_compile",
                                                       "slow_ms": 5, "count": 1}))["code"] == "ENODEV"
    finally:
        peer.close()
