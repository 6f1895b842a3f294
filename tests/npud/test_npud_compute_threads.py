"""One compute thread per device process, whatever the daemon's environment asks, and
`devices` (with `npuctl devices`) says which kernels the device processes run."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import npu
from npu.local import LocalDaemon
from npuctl.main import main as npuctl_main


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for tid in os.listdir(f"/proc/{parent}/task"):
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                kids = []
            out += kids
            todo += kids
    return out


def _device_processes(daemon_pid: int) -> list[int]:
    found = []
    for pid in _children(daemon_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"npud.emulator.device_process" in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    # A daemon asked, by its environment, for four BLAS and OpenMP threads everywhere.
    d = LocalDaemon("--device", "server", "--cache-dir", str(tmp_path_factory.mktemp("cache")),
                    env={"OPENBLAS_NUM_THREADS": "4", "OMP_NUM_THREADS": "4"})
    yield d
    d.stop()


def test_every_device_process_reports_one_compute_thread_and_its_kernels(daemon):
    with npu.Client(daemon.endpoint) as client:
        for _ in range(1200):   # the processes report once they have started (slowly, on a busy host)
            device = client._request("devices", {})["devices"][0]
            if "kernels" in device:
                break
            time.sleep(0.05)
        assert device["kernels"].startswith(("onednn ", "numpy reference"))
        assert device["compute_threads"] == 1
        # One process per core.  A process being replaced (a reset: the old one is killed, a new
        # one started) is briefly counted twice, so wait for the count to settle; say if a reset
        # happened, since none should in this test.
        for _ in range(200):
            pids = _device_processes(daemon.process.pid)
            if len(pids) == device["cores"]:
                break
            time.sleep(0.1)
        resets = client._request("devices", {})["devices"][0]["resets"]
    assert len(pids) == device["cores"] == 4, f"{len(pids)} device processes, {resets} resets"
    for pid in pids:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        assert env[b"OPENBLAS_NUM_THREADS"] == env[b"OMP_NUM_THREADS"] == b"1"
        # The main thread alone: no BLAS or OpenMP pool threads waiting for work.
        assert _threads(pid) == 1, f"device process {pid} runs {_threads(pid)} threads"


def test_npuctl_devices_names_the_kernels(daemon, capsys):
    with npu.Client(daemon.endpoint) as client:
        kernels = client._request("devices", {})["devices"][0]["kernels"]
    assert npuctl_main(["--endpoint", daemon.endpoint, "devices"]) == 0
    out = capsys.readouterr().out
    assert f"kernels: {kernels}, 1 compute thread in each of 4 device processes" in out


def test_devices_report_the_prepared_weights_of_loaded_programs_and_their_release(daemon, capsys):
    """A loaded model's immutable conv weights are kept pre-tiled by the device processes that ran
    it (docs/ISA.md); `devices` and `npuctl devices` say how much, and an unload gives it back."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "compiler_worker"))
    from compiler_testmodels import small_cnn

    def prepared(client) -> int:
        return client._request("devices", {})["devices"][0]["prepared_bytes"]

    with npu.Client(daemon.endpoint) as client:
        before = prepared(client)
        model = client.load(small_cnn(seed=41))
        x = np.random.default_rng(0).standard_normal(model.inputs[0].shape).astype(np.float32)
        model.run(x)
        held = prepared(client)
        assert held > before
        assert npuctl_main(["--endpoint", daemon.endpoint, "devices"]) == 0
        assert "; prepared weights " in capsys.readouterr().out
        model.unload()
        for _ in range(100):   # the unload reaches the device processes after the call returns
            if prepared(client) == before:
                break
            time.sleep(0.05)
        assert prepared(client) == before
