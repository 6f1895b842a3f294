"""Nothing outlives a SIGKILLed daemon: its device processes and compiler workers exit too."""

import os
import signal
import time

import msgpack

import npu
from examples import tiny_cnn
from npu.local import LocalDaemon

from npud_raw import RawPeer
from sched_models import daemon_in_test_mode, deep_mlp, feeds


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


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
    process would run its job to the end; the lifeline (emulator/lifeline.py) ends both."""
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
            kids = _children(daemon.process.pid)
            busy = {p: open(f"/proc/{p}/cmdline", "rb").read() for p in kids}
            assert any(b"compiler_worker.worker" in c for c in busy.values())
            assert any(b"emulator.device_process" in c for c in busy.values())
            daemon.process.send_signal(signal.SIGKILL)
            daemon.process.wait()
            survivors, taken = _gone_within(kids, 5.0)
            peer.close()
        print(f"\nFAULTCELL busy children gone {taken * 1e3:.0f} ms after the daemon's SIGKILL")
        assert not survivors, f"busy children outlived the daemon by 5 s: {survivors}"
    finally:
        daemon.stop()
