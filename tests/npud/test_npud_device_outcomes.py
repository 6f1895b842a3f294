"""Every outcome of a run (npud/outcomes.py) and how DeviceHost maps it onto the job: finished,
failed (by the device, by a fault, by a limit of the host), preempted, run again; and the
classification of device faults (whose they are) at the edges the daemon cannot see from a
real device process."""

from __future__ import annotations

import errno
import time

import trio

from npud import supervisor
from npud.devices import DeviceHost, SchedulingParams
from npud.emulator.config import make_config
from npud.ipc_schema.errors import ErrorCode, ErrorInfo
from npud.jobs import Job, JobState
from npud.outcomes import Failed, Finished, Preempted, Requeue
from npud.scheduler import Context
from streams import add_stream
from test_npud_device_host import REAL, add_job, add_program_job, answering, fake_processes, finish, running_host

ONE_CORE = SchedulingParams(cores=1)
# Says it is ready, then answers every request with a byte that is no msgpack at all.
GARBLED = answering(b"\xc1")


# --- mapping each outcome onto its job (no device process needed) -------------------------

def picked_job(host: DeviceHost, **fields) -> Job:
    """A job as the runner holds it: submitted, picked, running."""
    job = Job(1, "s", 0, add_stream(16), [], context=Context(1, "s"), **fields)
    host.submit(job)
    assert host.sched.pick(time.monotonic()) is job
    job.state, job.started = JobState.RUNNING, time.monotonic()
    return job


def idle_host() -> DeviceHost:
    return DeviceHost(0, "edge", "edge", make_config("edge"), lambda job: None, ONE_CORE)


def test_finished_completes_the_job_with_the_device_stats_and_the_hosts():
    host = idle_host()
    job = picked_job(host)
    host._settle(job, Finished({"cycles": 7}))
    assert job.state == JobState.DONE and job.error is None
    assert job.stats["cycles"] == 7 and {"wall_ms", "queue_ms", "preemptions"} <= job.stats.keys()
    assert host.jobs_completed == 1 and host.modeled_cycles == 7 and len(host.sched) == 0


def test_failed_completes_the_job_with_its_error():
    host = idle_host()
    job = picked_job(host)
    error = ErrorInfo.of(ErrorCode.EFAULT, "page fault")
    host._settle(job, Failed(error))
    assert job.state == JobState.FAILED and job.error is error and host.jobs_failed == 1


def test_preempted_resumes_at_its_segment_in_front_of_its_context():
    host = idle_host()
    job = picked_job(host)
    host._settle(job, Preempted(3))
    assert (job.state, job.segment, job.preemptions) == (JobState.RUNNING, 3, 1)
    assert host.sched.pick(time.monotonic()) is job


def test_preempted_but_cancelled_or_late_ends_there():
    host = idle_host()
    cancelled = picked_job(host, cancel="the client cancelled it")
    host._settle(cancelled, Preempted(1))
    assert cancelled.error.code == ErrorCode.ECANCELED and "cancelled it" in cancelled.error.message
    late = picked_job(host, deadline=time.monotonic() - 1)
    host._settle(late, Preempted(1))
    assert late.error.code == ErrorCode.ETIME and late.error.retryable and "after 1 layer segment" in late.error.message
    assert len(host.sched) == 0


def test_requeue_runs_the_job_again_from_its_start():
    host = idle_host()
    job = picked_job(host, segment=2)
    host._settle(job, Requeue("an admin reset"))
    assert job.state == JobState.RUNNING and job.segment == 0 and job.error is None
    assert host.sched.pick(time.monotonic()) is job


# --- outcomes end to end, against real and fake device processes -------------------------

async def test_a_stream_larger_than_one_packet_fails_that_job_only(monkeypatch):
    """HostLimit: EINVAL, not retryable; the device was not at fault, so it is not reset and the
    next job runs on the same process."""
    monkeypatch.setattr(supervisor, "CHANNEL_BYTES", 32 << 10)   # packets of at most ~128 KiB here
    ctx = Context(1, "s")
    async with running_host(monkeypatch, fake_processes(REAL), ONE_CORE) as host:
        big = await finish(host, Job(1, "s", 0, add_stream(16) + bytes(1 << 20), [], context=ctx))
        after = await finish(host, add_job(ctx))
    assert big.error.code == ErrorCode.EINVAL and not big.error.retryable, big.error
    assert "exceeds what this host's device socket carries" in big.error.message
    assert after.error is None and host.resets == 0 and ctx.hangs == 0


async def test_no_descriptor_for_a_programs_memfd_fails_that_job_retryable(monkeypatch):
    """HostLimit: ENOMEM, retryable; the same job submitted again once descriptors are back runs."""
    ctx = Context(1, "s")

    def no_fds(name, flags=0):
        raise OSError(errno.EMFILE, "Too many open files")

    async with running_host(monkeypatch, fake_processes(REAL), ONE_CORE) as host:
        short = add_program_job(host, ctx)
        short.bindings = [(host.memory.allocate(4096), va, w) for va, w in short.bindings]
        with monkeypatch.context() as patch:
            patch.setattr(supervisor.os, "memfd_create", no_fds)
            host.submit(short)
            with trio.fail_after(30):
                await short.done.wait()
        again = await finish(host, add_program_job(host, ctx, short.program))
    assert short.error.code == ErrorCode.ENOMEM and short.error.retryable, short.error
    assert "Too many open files" in short.error.message and "retry" in short.error.message
    assert again.error is None and host.resets == 0 and ctx.hangs == 0


async def test_a_garbled_reply_before_the_run_is_not_the_jobs_fault(monkeypatch):
    """A reply that breaks the link's schema while the job's buffers are imported: DeviceLost, not
    delivered; the core is reset and the innocent job runs on the new process."""
    ctx = Context(1, "s")
    job = add_job(ctx)
    async with running_host(monkeypatch, fake_processes(GARBLED, REAL), ONE_CORE) as host:
        await finish(host, job)
    assert job.error is None and host.resets == 1 and ctx.hangs == 0 and host.hangs == 0


async def test_an_admin_reset_during_a_run_runs_the_job_again(monkeypatch):
    """Requeue: the job was innocent; it runs again from its start on the new process."""
    ctx = Context(1, "s")
    job = add_job(ctx)
    job.fault = {"fault": "slow", "slow_ms": 1500}
    async with running_host(monkeypatch, fake_processes(REAL), ONE_CORE) as host:
        job.bindings = [(host.memory.allocate(4096), va, w) for va, w in job.bindings]
        host.submit(job)
        with trio.fail_after(30):
            while not host.cores[0].in_run:
                await trio.sleep(0.01)
            await host.reset_now("an admin asked")
            await job.done.wait()
    assert job.error is None and host.resets == 1 and ctx.hangs == 0 and host.hangs == 0
