"""``npu.wait(jobs, all=True, timeout=None)``: wait for several jobs at once (``npu.wait_async``
for the trio client's).

Jobs are ``Job``s (``client.submit``, ``client.import_fence``) or ``ModelJob``s
(``model.submit``) of one client.  The daemon answers one ``wait_jobs``
request when all (or, with ``all=False``, any) of them finished; a failed job
does not make ``wait`` raise -- its error is raised by its own ``wait()`` or
``result()``, and is in ``job.error``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from npud.ipc_schema.errors import ErrorCode

from .core import Call
from .errors import error


def wait(jobs: Sequence[Any], all: bool = True, timeout: float | None = None) -> list[Any]:
    """Block until all (or any) of ``jobs`` finished; returns the finished ones, in the order given.

    Raises ``npu.Timeout`` if that does not happen within ``timeout`` seconds (default: the
    client's timeout).
    """
    jobs = list(jobs)
    return jobs[0].client._run(_wait(jobs, all, timeout)) if jobs else []


async def wait_async(jobs: Sequence[Any], all: bool = True, timeout: float | None = None) -> list[Any]:
    """``npu.wait`` for the trio client's jobs (``AsyncJob``, ``AsyncModelJob``): one ``wait_jobs``
    request however many jobs there are."""
    jobs = list(jobs)
    return (await jobs[0].client._run(_wait(jobs, all, timeout))) if jobs else []


def _wait(jobs: list, all: bool, timeout: float | None):
    """The operation of both: one ``wait_jobs`` request, if one is needed at all."""
    jobs, pending, request = _plan(jobs, all, timeout)
    if request is not None:
        args, reply_timeout = request
        result = yield Call("wait_jobs", args, timeout=reply_timeout)
        for job, status in zip(pending, result["jobs"]):
            yield from job._settle(status)
        _check_ready(jobs, result, all, args)
    return [job for job in jobs if job.finished]


def _plan(jobs: Sequence[Any], all: bool, timeout: float | None):
    """The jobs as a list, the unfinished ones, and the ``wait_jobs`` request (arguments and reply
    timeout) if one is needed at all."""
    jobs = list(jobs)
    if not jobs:
        return jobs, [], None
    client = jobs[0].client
    if any(job.client is not client for job in jobs):
        raise error(ErrorCode.EINVAL, "npu.wait takes jobs of one client; import other clients' fences "
                                      "with client.import_fence(token)")
    pending = [job for job in jobs if not job.finished]
    if (all and not pending) or (not all and len(pending) < len(jobs)):
        return jobs, pending, None
    timeout = client.timeout if timeout is None else timeout
    args = {"jobs": [job.id for job in pending], "all": all, "timeout_ms": int(timeout * 1000)}
    return jobs, pending, (args, timeout + client.timeout)


def _check_ready(jobs: list, result: dict, all: bool, args: dict) -> None:
    if not result["ready"]:
        timeout = args["timeout_ms"] / 1000
        left = sum(1 for job in jobs if not job.finished)
        raise error(ErrorCode.ETIMEDOUT, f"{left} of {len(jobs)} jobs still unfinished after {timeout:.3f} s"
                    if all else f"none of {len(jobs)} jobs finished within {timeout:.3f} s")
