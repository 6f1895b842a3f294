"""Nothing outlives a SIGKILLed daemon: its device processes and compiler workers exit too."""

import os
import signal
import time

import npu
from examples import tiny_cnn
from npu.local import LocalDaemon


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
