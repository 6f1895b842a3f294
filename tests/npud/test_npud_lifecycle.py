"""Sessions and daemons coming and going: killed clients, expired leases, SIGTERM, a second
daemon on the same endpoint, and configuration errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import npu
from npud.emulator.assembler import StreamBuilder, tile
from npud.emulator.config import make_config
from npud.ipc_schema.endpoint import attach_path_for, ipc_path
from npu.local import LocalDaemon
from npud_raw import RawPeer, error_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def eventually(predicate, timeout: float = 5.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def memory_used(c) -> int:
    return sum(d.memory_used for d in c.devices())


def child_pids(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except OSError:
                pass
    return out


CLIENT_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, npu
    c = npu.connect(sys.argv[1], name="doomed")
    bufs = [c.alloc(1 << 20) for _ in range(3)] + [c.alloc(5000)]
    for b in bufs:
        b.map(np.uint8)[:] = 7
    small = npu.connect(sys.argv[1], map_io=False, name="doomed")
    small.alloc(8192).write(b"x" * 8192)
    print(c.session, small.session, flush=True)
    sys.stdin.read()
""")


def test_sigkilled_client_resources_are_freed(client, daemon):
    before = memory_used(client)
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, daemon.endpoint],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
    try:
        sessions = proc.stdout.readline().decode().split()
        assert len(sessions) == 2, "client subprocess failed"
        listed = {c["session"]: c for c in client.clients()}
        assert all(s in listed for s in sessions)
        assert listed[sessions[0]]["pid"] == proc.pid and listed[sessions[0]]["attached"]
        assert listed[sessions[0]]["buffers"] == 4
        assert memory_used(client) > before
    finally:
        proc.kill()
        proc.wait()
    assert eventually(lambda: not {c["session"] for c in client.status()["clients"]} & set(sessions)), \
        "killed client still listed"
    assert eventually(lambda: memory_used(client) == before), "device memory not returned"


def test_session_without_companion_socket_expires_after_lease(tmp_path):
    cfg = tmp_path / "lease.toml"
    cfg.write_text("[limits]\nlease_ms = 300\n")
    d = LocalDaemon("--config", str(cfg))
    try:
        raw = RawPeer(d.endpoint)
        hello = raw.hello()["result"]
        assert hello["lease_ms"] == 300
        raw.request("alloc", {"device": 0, "size": 1 << 20})
        with npu.connect(d.endpoint) as watcher:  # attached: never expires, however idle
            assert hello["session"] in {c["session"] for c in watcher.clients()}
            assert eventually(lambda: hello["session"] not in {c["session"] for c in watcher.clients()},
                              timeout=3), "idle raw session was not expired"
            assert memory_used(watcher) == 0
            time.sleep(0.4)  # longer than the lease: the attached watcher survives
            watcher.ping()
        err = error_of(raw.request("ping"))
        assert err["code"] == "ENOTCONN" and "expired" in err["message"]
        # a client library whose session expired gets ConnectionLost at once, not a timeout
        lib = npu.connect(d.endpoint, map_io=False, timeout=20)
        lib._attach.close()  # drop the companion socket: the session is closed with it
        t0 = time.monotonic()
        eventually(lambda: False, timeout=0.3)
        with pytest.raises(npu.ConnectionLost) as info:
            lib.ping()
        assert info.value.code == "ENOTCONN" and time.monotonic() - t0 < 5
        lib._attach = None
        lib.close()
        raw.close()
    finally:
        assert d.stop() == 0


def long_stream(cfg, n: int = 2000) -> bytes:
    sb = StreamBuilder(cfg)
    for _ in range(n):
        sb.matmul(tile(0, "float32", (64, 128)), tile(64 * 128 * 4, "float32", (128, 128)),
                  tile(64 * 128 * 4 + 128 * 128 * 4, "float32", (64, 128)))
    sb.end()
    return sb.build()


def test_sigterm_is_clean(tmp_path):
    cfg = tmp_path / "grace.toml"
    cfg.write_text("shutdown_grace_s = 0.3\n")
    d = LocalDaemon("--config", str(cfg))
    path, fds = ipc_path(d.endpoint), attach_path_for(d.endpoint)
    try:
        assert os.path.exists(path) and os.path.exists(fds)
        devices = child_pids(d.process.pid)
        assert devices, "no device process"
        edge = make_config("edge")
        running_client = npu.connect(d.endpoint, timeout=30)
        queued_client = npu.connect(d.endpoint, timeout=30)
        idle = npu.connect(d.endpoint, timeout=30)
        running = running_client.submit(long_stream(edge, 30000), [])  # over a second of work
        queued = queued_client.submit(long_stream(edge, 10), [])      # stuck behind it
        outcome = {}

        def waiter(name, job):
            try:
                outcome[name] = job.wait(60)
            except npu.NpuError as exc:
                outcome[name] = exc
        threads = [threading.Thread(target=waiter, args=("running", running)),
                   threading.Thread(target=waiter, args=("queued", queued))]
        for t in threads:
            t.start()
        time.sleep(0.3)  # both waits are blocked in the daemon now
        t0 = time.monotonic()
        d.process.send_signal(signal.SIGTERM)
        assert d.process.wait(15) == 0
        for t in threads:
            t.join(10)
            assert not t.is_alive(), "a client blocked in wait hangs after SIGTERM"
        assert time.monotonic() - t0 < 10
        for name in ("running", "queued"):
            got = outcome[name]
            if isinstance(got, npu.NpuError):  # the daemon's error reply, not a client-side timeout
                assert got.code == "ESHUTDOWN" and got.retryable is True, (name, got)
            else:
                assert got.state == "done", (name, got)
        assert isinstance(outcome["queued"], npu.NpuError) or isinstance(outcome["running"], npu.NpuError), \
            "the test's jobs were too short to be interrupted"
        assert not os.path.exists(path) and not os.path.exists(fds)
        assert all(not os.path.exists(f"/proc/{pid}") for pid in devices), "device process survived"
        # afterwards: a clear error naming the endpoint
        with pytest.raises(npu.ConnectionLost) as info:
            npu.connect(d.endpoint)
        assert info.value.code == "ECONNREFUSED" and d.endpoint in info.value.message
        for lib in (running_client, idle):  # one saw the shutdown event already, one has it queued
            t1 = time.monotonic()
            with pytest.raises(npu.ConnectionLost) as info:
                lib.ping()
            assert info.value.code == "ECONNREFUSED" and d.endpoint in info.value.message
            assert time.monotonic() - t1 < 3, "the client waited for its timeout"
        for lib in (running_client, queued_client, idle):
            lib.close()
    finally:
        d.stop()


def test_second_daemon_on_same_endpoint_refuses(daemon):
    proc = subprocess.run([sys.executable, "-m", "npud.main", "--endpoint", daemon.endpoint],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 1
    assert "already" in proc.stderr and daemon.endpoint in proc.stderr
    # the first one is unharmed, sockets included
    with npu.connect(daemon.endpoint) as c:
        buf = c.alloc(4096)
        buf.map()[:4] = 1
        assert buf.read(4) == b"\x01" * 4


@pytest.mark.parametrize("toml,words", [
    ("colour = 1\n", ["colour", "unknown key"]),
    ("[limits]\nmemory_quota = \"lots\"\n", ["limits.memory_quota", "lots"]),
    ("[limits]\nmemory_kwota = 5\n", ["memory_kwota"]),
    ("[limits]\nlease_ms = 0\n", ["limits.lease_ms"]),
    ("[[devices]]\npreset = \"warp9\"\n", ["devices[0].preset", "warp9"]),
    ("[[devices]]\npreset = \"edge\"\n[devices.params]\nflux = 1\n", ["devices[0].params", "flux"]),
    ("log_level = \"loud\"\n", ["log_level"]),
    ("not toml [\n", ["TOML"]),
])
def test_config_errors_exit_2_naming_the_key(tmp_path, toml, words):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    proc = subprocess.run([sys.executable, "-m", "npud.main", "--config", str(cfg), "--endpoint",
                           f"ipc://{tmp_path}/x.sock"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    for w in words:
        assert w in proc.stderr, (w, proc.stderr)
    assert not os.path.exists(tmp_path / "x.sock")


def test_missing_config_file_and_bad_device_flag(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "npud.main", "--config", str(tmp_path / "nope.toml")],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 2 and "nope.toml" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "npud.main", "--device", "warp9", "--endpoint",
                           f"ipc://{tmp_path}/x.sock"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 2 and "warp9" in proc.stderr
