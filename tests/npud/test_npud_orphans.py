"""Nothing outlives a SIGKILLed daemon: its device processes and compiler workers exit too, even busy,
and the next daemon removes the compile endpoint directory it left."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import msgpack

import npu
from bench.soak_proc import alive as _alive, children
from examples import tiny_cnn
from npu.local import LocalDaemon
from npud.compilers import remove_stale_dirs

from npud_raw import RawPeer
from sched_models import daemon_in_test_mode, deep_mlp, feeds


def _children(pid: int) -> list[int]:
    return list(children(pid))


def test_workers_and_device_processes_exit_with_a_killed_daemon(tmp_path):
    daemon = LocalDaemon("--cache-dir", str(tmp_path))
    try:
        with npu.connect(daemon.endpoint) as client:
            client.load(tiny_cnn.build())   # starts a compiler worker
            kids = _children(daemon.process.pid)
            assert len(kids) >= 2           # a device process and a worker at least
            daemon.process.send_signal(signal.SIGKILL)
            daemon.process.wait()
        deadline = time.monotonic() + 10
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [k for k in kids if _alive(k)]
        for k in survivors:
            os.kill(k, signal.SIGKILL)      # do not leak them into the rest of the suite
        assert not survivors, f"children outlived the daemon: {survivors}"
    finally:
        daemon.stop()


def _gone_within(pids: list[int], bound_s: float) -> tuple[list[int], float]:
    """Wait up to ``bound_s`` for ``pids`` to exit; the survivors (killed here) and the time taken."""
    t0 = time.monotonic()
    while any(_alive(p) for p in pids) and time.monotonic() - t0 < bound_s:
        time.sleep(0.01)
    taken = time.monotonic() - t0
    survivors = [p for p in pids if _alive(p)]
    for p in survivors:
        os.kill(p, signal.SIGKILL)          # do not leak them into the rest of the suite
    return survivors, taken


def test_busy_worker_and_device_process_exit_within_a_second_of_a_killed_daemon(tmp_path):
    """Mid-compile and mid-job: the worker checks its parent only while idle and the device
    process would run its job to the end; the lifeline (npud/lifeline.py) ends both."""
    config = "compile_workers = 1\ncompile_timeout_s = 120\n[scheduling]\ndevice_processes = 1\n"
    daemon = daemon_in_test_mode(tmp_path, config)
    try:
        with npu.connect(daemon.endpoint) as client:
            model = client.load(deep_mlp(layers=20))              # the worker is up
            client.inject_fault("slow", slow_ms=1000, count=1)    # 20 layers x 1 s
            model.submit(feeds(model))
            peer = RawPeer(daemon.endpoint)
            peer.hello()
            peer.request("inject_fault", {"device": 0, "kind": "slow_compile", "slow_ms": 60_000, "count": 1})
            peer.send_frames(msgpack.packb({"op": "load", "seq": 99, "args": {
                "device": 0, "options": {}, "model": deep_mlp(layers=2, seed=7)}}, use_bin_type=True))
            time.sleep(1.0)                                        # both are busy now
            busy = children(daemon.process.pid)
            assert sorted(busy.values()) == ["compiler", "device"]
            kids = list(busy)
            daemon.process.send_signal(signal.SIGKILL)
            daemon.process.wait()
            survivors, taken = _gone_within(kids, 5.0)
            peer.close()
        print(f"\nFAULTCELL busy children gone {taken * 1e3:.0f} ms after the daemon's SIGKILL")
        assert not survivors, f"busy children outlived the daemon by 5 s: {survivors}"
    finally:
        daemon.stop()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_compile_dirs_are_removed_only_when_their_daemon_is_dead(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f"npud-compile-{dead}-abc_123"
    alive = tmp_path / f"npud-compile-{os.getpid()}-def"       # a daemon still running
    listening = tmp_path / f"npud-compile-{dead}-ghi"          # a pid of another namespace, serving
    legacy = tmp_path / "npud-compile-jkl"                      # no pid: cannot tell, kept
    for d in (stale, alive, listening, legacy):
        d.mkdir()
    (stale / "workers.sock").touch()
    (tmp_path / f"npud-compile-{dead}-file").touch()            # not a directory
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(listening / "workers.sock"))
    server.listen()
    try:
        assert remove_stale_dirs(str(tmp_path)) == [str(stale)]
    finally:
        server.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [alive.name, listening.name, legacy.name, f"npud-compile-{dead}-file"])


def test_a_restarted_daemon_removes_the_compile_dir_a_killed_one_left():
    tmpdir = tempfile.mkdtemp(prefix="npud-t-")          # short: the endpoint path must fit sun_path
    try:
        first = LocalDaemon(env={"TMPDIR": tmpdir})
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        first.stop()
        left = [p for p in os.listdir(tmpdir) if p.startswith(f"npud-compile-{first.process.pid}-")]
        assert len(left) == 1
        second = LocalDaemon(env={"TMPDIR": tmpdir})
        try:
            now = [p for p in os.listdir(tmpdir) if p.startswith("npud-compile-")]
            assert len(now) == 1 and now[0].startswith(f"npud-compile-{second.process.pid}-")
        finally:
            second.stop()
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
