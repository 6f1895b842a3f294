"""``npu.wait(jobs, all=True, timeout=None)``: wait for several jobs at once.

Jobs are ``Job``s (``client.submit``, ``client.import_fence``) or ``ModelJob``s
(``model.submit``) of one client.  The daemon answers one ``wait_jobs``
request when all (or, with ``all=False``, any) of them finished; a failed job
does not make ``wait`` raise -- its error is raised by its own ``wait()`` or
``result()``, and is in ``job.error``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ipc_schema.errors import ErrorCode

from .errors import error


def wait(jobs: Sequence[Any], all: bool = True, timeout: float | None = None) -> list[Any]:
    """Block until all (or any) of ``jobs`` finished; returns the finished ones, in the order given.

    Raises ``npu.Timeout`` if that does not happen within ``timeout`` seconds (default: the
    client's timeout).
    """
    jobs = list(jobs)
    if not jobs:
        return []
    client = jobs[0].client
    if any(job.client is not client for job in jobs):
        raise error(ErrorCode.EINVAL, "npu.wait takes jobs of one client; import other clients' fences "
                                      "with client.import_fence(token)")
    pending = [job for job in jobs if not job.finished]
    ready = all and not pending or (not all and len(pending) < len(jobs))
    if not ready:
        timeout = client.timeout if timeout is None else timeout
        result = client._request("wait_jobs", {"jobs": [job.id for job in pending], "all": all,
                                               "timeout_ms": int(timeout * 1000)},
                                 timeout=timeout + client.timeout)
        for job, status in zip(pending, result["jobs"]):
            job._settle(status)
        if not result["ready"]:
            left = sum(1 for job in jobs if not job.finished)
            raise error(ErrorCode.ETIMEDOUT, f"{left} of {len(jobs)} jobs still unfinished after {timeout:.3f} s"
                        if all else f"none of {len(jobs)} jobs finished within {timeout:.3f} s")
    return [job for job in jobs if job.finished]
