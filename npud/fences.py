"""Fences: how jobs wait for each other, and how a failure travels.

Every job is a point on its context's timeline (``Context.issued``/``signalled``)
and carries its own completion fence (``Job.done``).  A job may name others in
``after``: it stays out of every run queue until they all finished, and if one
of them failed it fails too, with that cause -- never silently, never with
zero outputs.  The chain goes on through its own dependents.

Another session's job can be named once its owner exported a fence token
(``fence_export``) and the waiter imported it (``fence_import``): the token
is unguessable and dies with the exporting session.

Cancelling: a job not yet on a device core fails at once; one running on a
core stops at its next layer boundary (npud/devices.py).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import msgpack

from npud.ipc_schema.errors import ErrorCode, ErrorInfo

if TYPE_CHECKING:
    from .jobs import Job
    from .server import Daemon
    from .sessions import Session

MAX_TOKENS = 65536


def depend(daemon: "Daemon", job: "Job", deps: list["Job"]) -> ErrorInfo | None:
    """Make ``job`` wait for ``deps``; the error it must fail with if one already failed."""
    for dep in deps:
        if dep.state == "failed":
            return _cause(job, dep)
    for dep in deps:
        if dep.state != "done":
            dep.dependents.append(job)
            job.waiting_on += 1
    return None


def _cause(job: "Job", dep: "Job") -> ErrorInfo:
    err = dep.error
    if job.chain is not None and job.chain is getattr(dep, "chain", None):   # the same run's: its error is the run's
        return ErrorInfo.of(err.code, f"partition {job.chain.jobs.index(dep) + 1} of {len(job.chain.jobs)} "
                                      f"(job {dep.id}, device {dep.device}) failed: {err.message}", err.retryable)
    what = f"job {dep.id} of session {dep.session_id}" if dep.session_id != job.session_id else f"job {dep.id}"
    return ErrorInfo.of(ErrorCode.ECANCELED, f"job {job.id} did not run: {what}, which it depends on, failed: "
                                             f"{err.code.value}: {err.message}", err.retryable)


def job_finished(daemon: "Daemon", job: "Job") -> None:
    """A job finished (any outcome): signal its timeline and release or fail its dependents."""
    if job.context is not None and job.point:
        job.context.point_finished(job.point)
    dependents, job.dependents = job.dependents, ()   # a finished job gains no dependents (depend)
    if job.chain is not None and job.state == "done" and job is job.chain.jobs[-1]:
        # the run's last partition: its stats become the run's (the client was given this job; its
        # waiters wake only after this returns)
        job.packed_stats = msgpack.packb(job.chain.combined_stats())
    for dep in dependents:
        if dep.state != "queued":
            continue
        if job.state == "failed" and not (dep.chain is not None and dep.chain.after is job):
            # (a run waits for its model's previous run only for order: that run's failure is not its own)
            fail(daemon, dep, _cause(dep, job))
        else:
            dep.waiting_on -= 1
            if dep.waiting_on == 0:
                daemon.devices[dep.device].submit(dep)


def fail(daemon: "Daemon", job: "Job", error: ErrorInfo) -> bool:
    """Fail a job that is not on a device core now; False if it is (it stops at a boundary instead)."""
    device = daemon.devices[job.device]
    if job in device.running_jobs():
        job.cancel = job.cancel or error.message
        for core in device.cores:
            if core.job is job:
                core.preempt()
        return False
    device.complete(job, error=error)
    return True


def cancel_session(daemon: "Daemon", session: "Session", error: ErrorInfo) -> None:
    """A session closed: its jobs stop (queued ones at once), its exported fences die, and the
    devices forget its contexts (fair-share clocks, bans): nothing keyed by them outlives it."""
    for job in session.jobs.unfinished():
        if job.state == "queued":
            fail(daemon, job, error)
        elif job.state == "running":   # preempted, or on a core: it stops at its next layer boundary
            fail(daemon, job, ErrorInfo.of(ErrorCode.ECANCELED, "the session closed"))
    for token in [t for t, j in daemon.fence_tokens.items() if j.session_id == session.id]:
        del daemon.fence_tokens[token]
    session.imported.clear()
    contexts = list(session.contexts.values())
    for device in daemon.devices:
        device.sched.forget(contexts)
        device.banned.difference_update(contexts)


def export(daemon: "Daemon", job: "Job") -> str:
    for token, known in daemon.fence_tokens.items():
        if known.id == job.id and known.session_id == job.session_id:   # a Job, or its KeptJob since
            return token
    if len(daemon.fence_tokens) >= MAX_TOKENS:   # the oldest go first
        del daemon.fence_tokens[next(iter(daemon.fence_tokens))]
    token = secrets.token_urlsafe(24)
    daemon.fence_tokens[token] = job
    return token
