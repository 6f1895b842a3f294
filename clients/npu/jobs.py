"""Jobs: what ``submit``, ``run_model`` and ``import_fence`` return.

A job is a fence point on its context's timeline.  ``JobRecord`` holds what the
daemon reported about it (state, stats, error) and its operations (waiting,
cancelling, exporting), written once; ``Job`` runs them blocking, the trio
client's ``AsyncJob`` awaited.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

import numpy as np

from npud.ipc_schema.errors import ErrorCode

from .core import Call, blocking
from .errors import NpuError, error, from_wire

if TYPE_CHECKING:
    from .client import Client


class JobRecord:
    """A job as the daemon reported it: id, fence point, state, stats and error, and its
    operations (``wait``, ``cancel``, ``export_fence``) as the clients' job classes run them."""

    def __init__(self, client: Any, job_id: int, context: int = 0, point: int = 0):
        self.client = client
        self.id = job_id
        self.state = "queued"
        self.stats: dict[str, Any] = {}
        self.fence = (context, point)   # (context id, point on its timeline)
        self._error: NpuError | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    @property
    def error(self) -> NpuError | None:
        """The job's error once it failed (None while it runs or if it succeeded)."""
        return self._error

    def _take(self, result: dict) -> bool:
        """Record a ``wait`` / ``wait_jobs`` result.  True when it finished the job; False while the
        job runs or if it had finished before."""
        if result["state"] not in ("done", "failed") or self.finished:
            return False
        self.state, self.stats = result["state"], result["stats"]
        if "error" in result:
            self._error = from_wire(result["error"])
        return True

    def _settle(self, result: dict):
        """Take a ``wait`` / ``wait_jobs`` result (an operation: a model run reads its outputs)."""
        self._take(result)
        yield from ()

    def _settle_reply(self, result: dict, wait_ms: int):
        """Take the reply of a ``run_model`` with ``wait_ms`` (its job's outcome, as ``wait`` gives
        it); Timeout, as ``wait``'s, if the job had not finished by then (it runs on)."""
        if result["state"] not in ("done", "failed"):
            raise error(ErrorCode.ETIMEDOUT, f"job {self.id} is still {result['state']} after {wait_ms} ms")
        yield from self._settle(result)

    def wait(self, timeout: float | None = None):
        """Until the job finishes; raises the job's error if it failed, Timeout if not done in time."""
        if not self.finished:
            timeout = self.client.timeout if timeout is None else timeout
            result = yield Call("wait", {"job": self.id, "timeout_ms": int(timeout * 1000)},
                                timeout=timeout + self.client.timeout)
            yield from self._settle(result)
        if self._error is not None:
            raise self._error
        return self

    def cancel(self):
        """Cancel: queued, it fails at once; running, at its next layer boundary.  Returns the state now."""
        return (yield Call("cancel", {"job": self.id}))["state"]

    def export_fence(self):
        """A token another client can ``import_fence`` to wait for this job or run after it."""
        return (yield Call("fence_export", {"job": self.id}))["token"]


class ModelRunRecord(JobRecord):
    """A run of a model: also the input/output buffer set it runs in, and its outputs once read.
    It is finished when its outputs are read (or it failed), not merely when the device is done."""

    def __init__(self, model: Any, job_id: int, io: Any, context: int = 0, point: int = 0):
        super().__init__(model.client, job_id, context, point)
        self.model = model
        self._io = io
        self._outputs: dict[str, np.ndarray] | None = None

    @property
    def finished(self) -> bool:
        return self._outputs is not None or self._error is not None


class Job(JobRecord):
    """A submitted command stream (or an imported fence): a fence point on its context's timeline."""

    client: "Client"
    if TYPE_CHECKING:   # the blocking methods' types (docstrings: JobRecord)
        def wait(self, timeout: float | None = None) -> Self: ...
        def cancel(self) -> str: ...
        def export_fence(self) -> str: ...
    else:
        wait = blocking(JobRecord.wait)
        cancel = blocking(JobRecord.cancel)
        export_fence = blocking(JobRecord.export_fence)
