"""DeviceHost in-process, against fake device processes that misbehave in ways a real one cannot
be made to on cue."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgpack
import trio

from npud.emulator.assembler import StreamBuilder
from npud.emulator.config import make_config
from npud.ipc_schema.errors import ErrorCode
from npud import supervisor
from npud.devices import DeviceHost, SchedulingParams
from npud.jobs import Job
from npud.scheduler import Context
from streams import A, B, O, add_stream

REAL = "import sys\nfrom npud.emulator.device_process import main\nmain(sys.argv[1:])\n"
# Says it is ready, then never answers anything (as a process stopped right after its start).
SILENT = ("import msgpack, socket, sys, time\n"
          "sock = socket.socket(fileno=int(sys.argv[2]))\n"
          "sock.send(msgpack.packb({'op': 'ready'}))\n"
          "time.sleep(3600)\n")


def answering(reply: bytes) -> str:
    """A fake device process that says it is ready, then answers every request with ``reply``
    (closing any descriptors a request carried)."""
    return ("import os, socket, sys\n"
            "sock = socket.socket(fileno=int(sys.argv[2]))\n"
            f"sock.send({msgpack.packb({'op': 'ready'})!r})\n"
            "while True:\n"
            "    data, fds, _f, _a = socket.recv_fds(sock, 1 << 20, 4)\n"
            "    if not data:\n"
            "        break\n"
            "    for fd in fds:\n"
            "        os.close(fd)\n"
            f"    sock.send({reply!r})\n")


SLOW_START = "import time\ntime.sleep(2.5)\n" + REAL   # slower than every deadline, as on a loaded machine
DIES = "import sys\nsys.exit(3)\n"                      # as a process killed during its start


def fake_processes(*codes: str):
    """An ``open_process`` for DeviceHost whose n-th process runs ``codes[n]`` (the last one after)."""
    started = []

    async def open_process(module: str, args: list[str], pass_fds: tuple[int, ...] = (), env=None):
        code = codes[min(len(started), len(codes) - 1)]
        started.append(module)
        return await trio.lowlevel.open_process([sys.executable, "-c", code, *args], pass_fds=pass_fds)
    return open_process


@asynccontextmanager
async def running_host(monkeypatch, processes, params: SchedulingParams) -> AsyncIterator[DeviceHost]:
    """A one-core host whose device processes are ``processes``, running until the block ends."""
    monkeypatch.setattr(supervisor.lifeline, "open_process", processes)
    host = DeviceHost(0, "edge", "edge", make_config("edge"), lambda job: None, params)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        yield host
        nursery.cancel_scope.cancel()


async def finish(host: DeviceHost, job: Job) -> Job:
    """Submit ``job`` (its bindings (va, writable) get buffers of this host) and wait for its end."""
    job.bindings = [(host.memory.allocate(4096), va, w) for va, w in job.bindings]
    host.submit(job)
    with trio.fail_after(30):
        await job.done.wait()
    return job


async def run_job(monkeypatch, processes, job: Job, params: SchedulingParams) -> DeviceHost:
    """Run ``job`` on a one-core host whose device processes are ``processes``; the host, after."""
    async with running_host(monkeypatch, processes, params) as host:
        await finish(host, job)
    return host


def add_job(ctx: Context) -> Job:
    """A job adding two buffers; its bindings are (va, writable) until run_job allocates them."""
    return Job(1, "s", 0, add_stream(16), [(A, False), (B, False), (O, True)], context=ctx)


def add_program_job(host: DeviceHost, ctx: Context, program: int | None = None) -> Job:
    """``add_job`` as a loaded program's run: the program registered on ``host`` (unless given)
    and held by the job, as a submission holds it (npud/handlers.py)."""
    if program is None:
        program = host.programs.add(add_stream(16), [(A, 4096, False), (B, 4096, False), (O, 4096, True)], [])
    host.programs.retain(program)
    return Job(1, "s", 0, b"", [(A, False), (B, False), (O, True)], program=program, context=ctx)


async def test_a_device_silent_before_and_after_a_reset_fails_the_job_retryable_and_blames_nobody(monkeypatch):
    ctx = Context(1, "s")
    job = add_job(ctx)
    host = await run_job(monkeypatch, fake_processes(SILENT), job, SchedulingParams(job_timeout_s=0.2, cores=1))
    assert job.error.code == ErrorCode.ETIMEDOUT and job.error.retryable, job.error
    assert "again after a reset" in job.error.message and "import" in job.error.message
    assert host.resets == 2 and host.hangs == 0 and ctx.hangs == 0   # the device's fault, nobody's hang


async def test_a_slow_start_is_not_a_hang(monkeypatch):
    """No request's deadline pays for its process's start: the host waits for ``ready`` first."""
    job = add_job(Context(1, "s"))
    host = await run_job(monkeypatch, fake_processes(SLOW_START), job,
                         SchedulingParams(job_timeout_s=0.2, cores=1))    # deadlines of 1 s (the floor)
    assert job.error is None and host.resets == 0


def empty_stream() -> bytes:
    sb = StreamBuilder(make_config("edge"))
    sb.end()
    return sb.build()


async def test_a_job_that_finds_its_process_dead_before_ready_is_innocent(monkeypatch):
    """Even a job with nothing to import, whose first exchange is its run."""
    ctx = Context(1, "s")
    job = Job(1, "s", 0, empty_stream(), [], context=ctx)
    host = await run_job(monkeypatch, fake_processes(DIES, REAL), job, SchedulingParams(cores=1))
    assert job.error is None and ctx.hangs == 0 and host.resets == 1


async def test_a_process_lost_before_the_job_reaches_it_twice_blames_nobody(monkeypatch):
    """Dead before the run was sent, and again after the reset: the device's failure, not the
    job's -- it fails retryable and no context's hang count grows (it was counted as a crash
    of the job's, towards a ban)."""
    ctx = Context(1, "s")
    job = Job(1, "s", 0, empty_stream(), [], context=ctx)
    host = await run_job(monkeypatch, fake_processes(DIES), job, SchedulingParams(cores=1))
    assert job.error.code == ErrorCode.EIO and job.error.retryable, job.error
    assert "lost before the job reached it, again after a reset" in job.error.message, job.error
    assert host.hangs == 0 and ctx.hangs == 0


async def test_a_buffer_another_devices_process_imported_is_released_there_too(monkeypatch):
    """A heterogeneous model's buffers are imported by both devices' processes (npud/hetero.py): the
    owner's last release must reach the other device's process before the memory is freed."""
    monkeypatch.setattr(supervisor.lifeline, "open_process", fake_processes(REAL))
    owner = DeviceHost(0, "edge", "edge", make_config("edge"), lambda job: None, SchedulingParams())
    other = DeviceHost(1, "edge", "edge", make_config("edge"), lambda job: None, SchedulingParams())
    owner.peers = other.peers = [owner, other]
    async with trio.open_nursery() as nursery:
        await nursery.start(owner.run)
        await nursery.start(other.run)
        ctx = Context(1, "s")
        job = add_job(ctx)
        job.device = 1
        job.bindings = [(owner.memory.allocate(4096), va, w) for va, w in job.bindings]
        other.submit(job)   # the other device's process imports the owner's buffers
        with trio.fail_after(30):
            await job.done.wait()
        assert job.state == "done", job.error
        bo = job.bindings[0][0]
        assert bo.id in other.cores[0].proc.imported and bo.id not in owner.cores[0].proc.imported
        owner.refs.release(bo)   # its last reference
        with trio.fail_after(10):
            while bo.id in other.cores[0].proc.imported or not bo.released:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
