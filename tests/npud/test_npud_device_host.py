"""DeviceHost in-process, against fake device processes that misbehave in ways a real one cannot
be made to on cue."""

from __future__ import annotations

import sys

import trio

from emulator.assembler import StreamBuilder
from emulator.config import make_config
from ipc_schema.errors import ErrorCode
from npud import devices
from npud.devices import DeviceHost, SchedulingParams
from npud.jobs import Job
from npud.scheduler import Context
from streams import A, B, O, add_stream

# Says it is ready, then never answers anything (as a process stopped right after its start).
SILENT = ("import msgpack, socket, sys, time\n"
          "sock = socket.socket(fileno=int(sys.argv[2]))\n"
          "sock.send(msgpack.packb({'op': 'ready'}))\n"
          "time.sleep(3600)\n")


async def silent_process(module: str, args: list[str], pass_fds: tuple[int, ...] = ()):
    return await trio.lowlevel.open_process([sys.executable, "-c", SILENT, *args], pass_fds=pass_fds)


async def test_a_device_silent_before_and_after_a_reset_fails_the_job_retryable_and_blames_nobody(monkeypatch):
    monkeypatch.setattr(devices.lifeline, "open_process", silent_process)
    host = DeviceHost(0, "edge", "edge", make_config("edge"), lambda job: None,
                      SchedulingParams(job_timeout_s=0.2, cores=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        ctx = Context(1, "s")
        job = Job(1, "s", 0, add_stream(16), [(host.memory.allocate(4096), A, False)], context=ctx)
        host.submit(job)
        with trio.fail_after(30):
            await job.done.wait()
        nursery.cancel_scope.cancel()
    assert job.error.code == ErrorCode.ETIMEDOUT and job.error.retryable, job.error
    assert "again after a reset" in job.error.message and "import" in job.error.message
    assert host.resets == 2 and host.hangs == 0 and ctx.hangs == 0   # the device's fault, nobody's hang


# The real device process, after a start slower than every deadline (as on a loaded machine).
SLOW_START = ("import sys, time\n"
              "time.sleep(2.5)\n"
              "from emulator.device_process import main\n"
              "main(sys.argv[1:])\n")


async def slow_starting_process(module: str, args: list[str], pass_fds: tuple[int, ...] = ()):
    return await trio.lowlevel.open_process([sys.executable, "-c", SLOW_START, *args], pass_fds=pass_fds)


async def test_a_slow_start_is_not_a_hang(monkeypatch):
    """No request's deadline pays for its process's start: the host waits for ``ready`` first."""
    monkeypatch.setattr(devices.lifeline, "open_process", slow_starting_process)
    host = DeviceHost(0, "edge", "edge", make_config("edge"), lambda job: None,
                      SchedulingParams(job_timeout_s=0.2, cores=1))    # deadlines of 1 s (the floor)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        bufs = [host.memory.allocate(4096) for _ in range(3)]
        job = Job(1, "s", 0, add_stream(16), list(zip(bufs, (A, B, O), (False, False, True))),
                  context=Context(1, "s"))
        host.submit(job)
        with trio.fail_after(30):
            await job.done.wait()
        nursery.cancel_scope.cancel()
    assert job.error is None and host.resets == 0


def empty_stream() -> bytes:
    sb = StreamBuilder(make_config("edge"))
    sb.end()
    return sb.build()


# Dies before it is ready (as a process killed during its start).
DIES = "import sys\nsys.exit(3)\n"


async def test_a_job_that_finds_its_process_dead_before_ready_is_innocent(monkeypatch):
    """Even a job with nothing to import, whose first exchange is its run."""
    starts = []

    async def dies_once(module: str, args: list[str], pass_fds: tuple[int, ...] = ()):
        code = DIES if not starts else "from emulator.device_process import main\nimport sys\nmain(sys.argv[1:])\n"
        starts.append(module)
        return await trio.lowlevel.open_process([sys.executable, "-c", code, *args], pass_fds=pass_fds)

    monkeypatch.setattr(devices.lifeline, "open_process", dies_once)
    host = DeviceHost(0, "edge", "edge", make_config("edge"), lambda job: None, SchedulingParams(cores=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        ctx = Context(1, "s")
        job = Job(1, "s", 0, empty_stream(), [], context=ctx)
        host.submit(job)
        with trio.fail_after(30):
            await job.done.wait()
        nursery.cancel_scope.cancel()
    assert job.error is None and ctx.hangs == 0 and host.resets == 1
