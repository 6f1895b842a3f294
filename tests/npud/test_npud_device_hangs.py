"""A device process that stops answering while idle is found at the next exchange: every exchange
with it (import, load, release, unload -- not only run) has a deadline, and missing it resets the
core.  The job that found the hang is innocent (it never reached the device) and runs again."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import npu
from bench.soak_proc import alive
from npud.emulator.config import DeviceConfig
from streams import A, B, O, add_stream

from sched_models import deep_mlp, device_pids, feeds, module_daemon_in_test_mode, reference

TIMEOUT_MS = 1500   # the run watchdog, and so the deadline of every other exchange
CONFIG = f"""
[scheduling]
job_timeout_ms = {TIMEOUT_MS}
device_processes = 1
"""


daemon = module_daemon_in_test_mode("hangs", CONFIG)


def _stop_the_idle_device(daemon, c) -> int:
    """SIGSTOP the device process once it has started (a job ran on it) and is idle."""
    n = 16
    bufs = [c.alloc(4 * n) for _ in range(3)]
    c.submit(add_stream(n, DeviceConfig.from_dict(c.devices()[0].params)),
             list(zip(bufs, (A, B, O), (False, False, True)))).wait(60)
    (pid,) = device_pids(daemon.process.pid)
    os.kill(pid, signal.SIGSTOP)
    return pid


def _wait_gone(pid: int, bound_s: float = 5.0) -> bool:
    deadline = time.monotonic() + bound_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


def test_stopped_idle_device_is_reset_and_a_job_on_new_buffers_completes(daemon):
    n = 256
    with npu.connect(daemon.endpoint) as c:
        before = c.devices()[0].info
        stopped = _stop_the_idle_device(daemon, c)
        a, b, out = (c.alloc(4 * n) for _ in range(3))          # new buffers: the job imports them
        a.map(np.float32)[:] = np.arange(n)
        b.map(np.float32)[:] = 2
        t0 = time.monotonic()
        job = c.submit(add_stream(n, DeviceConfig.from_dict(c.devices()[0].params)),
                       [(a, A, False), (b, B, False), (out, O, True)])
        job.wait(TIMEOUT_MS / 1000 * 6)
        print(f"\nFAULTCELL idle hang (SIGSTOP) to the job done on a new process: {(time.monotonic() - t0) * 1e3:.0f} ms"
              f" (exchange deadline {TIMEOUT_MS} ms)")
        assert np.array_equal(out.map(np.float32), np.arange(n) + 2)
        after = c.devices()[0].info
        assert after["state"] == "ok" and after["resets"] == before["resets"] + 1
        assert after["hangs"] == before["hangs"]                  # nobody is blamed for it
        assert _wait_gone(stopped) and device_pids(daemon.process.pid) != [stopped]


def test_stopped_idle_device_is_reset_before_a_model_job(daemon):
    with npu.connect(daemon.endpoint) as c:
        model = c.load(deep_mlp(layers=3, seed=11))
        resets = c.devices()[0].info["resets"]
        stopped = _stop_the_idle_device(daemon, c)
        x = feeds(model, 3)
        out = model.run(x, timeout=TIMEOUT_MS / 1000 * 6)[model.outputs[0].name]
        np.testing.assert_allclose(out, reference(x, model_seed=11, layers=3), rtol=1e-4, atol=1e-5)
        assert c.devices()[0].info["resets"] == resets + 1 and _wait_gone(stopped)


def test_stopped_idle_device_is_reset_when_a_buffer_is_released(daemon):
    with npu.connect(daemon.endpoint) as c:
        model = c.load(deep_mlp(layers=2, seed=12))
        model.run(feeds(model))                   # the device maps the model's buffers
        resets = c.devices()[0].info["resets"]
        stopped = _stop_the_idle_device(daemon, c)
        model.unload()                            # its buffers are released in the device process
        assert _wait_gone(stopped, TIMEOUT_MS / 1000 * 6)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and c.devices()[0].info["state"] != "ok":
            time.sleep(0.05)
        info = c.devices()[0].info
        assert info["state"] == "ok" and info["resets"] == resets + 1

