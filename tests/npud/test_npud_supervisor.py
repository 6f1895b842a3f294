"""The supervisor of a device core's process (npud/supervisor.py): its restart policy."""

from __future__ import annotations

import errno
import os

import trio

from npud import drivers, supervisor
from npud.devices import SchedulingParams
from npud.emulator.config import make_config
from npud.scheduler import Context
from test_npud_device_host import REAL, add_job, fake_processes, finish, running_host


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_start_that_fails_is_retried_until_it_succeeds_and_leaks_nothing(monkeypatch):
    """Out of descriptors or processes for now: the core waits and retries; each failed try
    closes its end of the socket pair."""
    real = fake_processes(REAL)
    failures = []

    async def short_then_real(module, args, pass_fds=(), env=None):
        if len(failures) < 3:
            failures.append(module)
            raise OSError(errno.EMFILE, "Too many open files")
        return await real(module, args, pass_fds, env)

    monkeypatch.setattr(supervisor, "RESTART_RETRY_S", 0.01)
    monkeypatch.setattr(supervisor.lifeline, "open_process", real)
    proc = supervisor.CoreProcess(0, 0, drivers.driver(), make_config("edge"), 5.0, lambda why: None)
    await proc.start()
    started_fds = open_fds()
    monkeypatch.setattr(supervisor.lifeline, "open_process", short_then_real)
    with trio.fail_after(30):
        await proc.restart("a test")
    try:
        assert len(failures) == 3 and proc.state == "ok" and proc.alive and proc.restarts == 1
        assert open_fds() == started_fds
    finally:
        await proc.stop()
    assert proc.state == "down" and proc.link is None


async def test_a_process_that_dies_while_idle_is_restarted_at_once(monkeypatch):
    """Not when the next job finds it dead: the device says "resetting", then "ok", and the next
    job runs on the new process, blamed on nobody."""
    ctx = Context(1, "s")
    async with running_host(monkeypatch, fake_processes(REAL), SchedulingParams(cores=1)) as host:
        first = host.cores[0].proc.process
        first.kill()
        with trio.fail_after(30):
            while host.resets < 1 or host.state != "ok":
                await trio.sleep(0.01)
        assert host.cores[0].proc.process is not first
        job = await finish(host, add_job(ctx))
    assert job.error is None and host.resets == 1 and ctx.hangs == 0
