"""Jobs: what ``submit``, ``run_model`` and ``import_fence`` return.

A job is a fence point on its context's timeline.  ``JobRecord`` holds what the
daemon reported about it (state, stats, error); ``Job`` adds the synchronous
waiting, cancelling and exporting (the trio client's ``AsyncJob`` adds its own).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import NpuError, from_wire

if TYPE_CHECKING:
    from .client import Client


class JobRecord:
    """A job as the daemon reported it: id, fence point, state, stats and error.  The clients'
    job classes add waiting, cancelling and exporting, each in its own I/O style."""

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

    def _wait_args(self, timeout: float | None) -> tuple[dict, float]:
        """The ``wait`` request's arguments and how long to wait for its reply."""
        timeout = self.client.timeout if timeout is None else timeout
        return {"job": self.id, "timeout_ms": int(timeout * 1000)}, timeout + self.client.timeout


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

    def _settle(self, result: dict) -> None:
        self._take(result)

    def wait(self, timeout: float | None = None) -> "Job":
        """Block until the job finishes; raises the job's error if it failed, Timeout if not done."""
        if not self.finished:
            args, reply_timeout = self._wait_args(timeout)
            self._settle(self.client._request("wait", args, timeout=reply_timeout))
        if self._error is not None:
            raise self._error
        return self

    def cancel(self) -> str:
        """Cancel: queued, it fails at once; running, at its next layer boundary.  Returns the state now."""
        return self.client._request("cancel", {"job": self.id})["state"]

    def export_fence(self) -> str:
        """A token another client can ``import_fence`` to wait for this job or run after it."""
        return self.client._request("fence_export", {"job": self.id})["token"]
