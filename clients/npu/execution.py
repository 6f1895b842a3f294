"""Reusable executions: ``model.execution() -> Execution``, bound once, run many times.

Like an NNAPI burst or an IREE binding table: the input and output buffers are
allocated and mapped once, ``execution.inputs[name]`` / ``execution.outputs[name]``
are numpy views of them (fill the inputs in place: no copies at all), and the
``run_model`` request is encoded once -- each run only splices in its sequence
number.  Per run there is no allocation, no mapping and no request building.

``run()`` returns the output *views*, not copies: zero-copy, but the next run of
the same execution overwrites them (``.copy()`` what must outlive it).  One run
is in flight per execution at a time; a second ``submit`` before the first
finished raises ``npu.Busy`` (make a second execution to overlap runs).

Without a local daemon (no companion socket, so no mapping) the views are plain
arrays the execution copies to and from its buffers around each run.

The operations are written once (``ExecutionOps``); ``Execution`` runs them
blocking, the trio client's ``AsyncExecution`` awaited.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from npud.ipc_schema import codec
from npud.ipc_schema.errors import ErrorCode

from .buffer import BufferOps
from .core import Call, blocking
from .errors import NpuError, error
from .jobs import JobRecord
from .model import ModelJob, ModelRun, Outputs, run_once
from .tensor_types import check_feeds, feed_dict, ort_calling_form

if TYPE_CHECKING:
    from .model import LoadedModel, TensorInfo

_PREFIX = b"\x83" + codec.pack("op") + codec.pack("run_model") + codec.pack("seq")


class ExecutionOps:
    """One model's bound input/output buffers and pre-encoded run request, and its operations."""

    _job_class: type   # the client's kind of ExecutionRun

    def __init__(self, model: "LoadedModel", wire: dict[str, Any]):
        self.model = model
        self.client = model.client
        self._wire = wire
        self._closed = False
        self._job: ExecutionRun | None = None
        self._mapped = self.client.attached
        self._infos = {t.name: t for t in (*model.inputs, *model.outputs)}
        self._kinds = {**{t.name: "input" for t in model.inputs}, **{t.name: "output" for t in model.outputs}}
        self._frames: dict[int | None, Callable[[int], bytes]] = {}   # the run request, by wait_ms
        self._buffers: dict[str, BufferOps] = {}
        self._owned: dict[str, BufferOps] = {}   # allocated here: freed by rebind() and close()
        self.inputs: dict[str, np.ndarray] = {}
        self.outputs: dict[str, np.ndarray] = {}

    def _open(self):
        """Allocate, map and bind a buffer per input and output; encode the request."""
        try:
            for name, info in self._infos.items():
                buf = yield from self.client._alloc_op(max(info.size, 1), self.model.device)
                self._owned[name] = buf
                yield from self._bind(name, buf)
        except BaseException:
            yield from self._free_owned()
            raise
        self._encode()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self.busy else "idle"
        return f"<npu.{type(self).__name__} of model {self.model.id} ({state})>"

    @property
    def busy(self) -> bool:
        """Whether a run is in flight (as far as this client knows without asking)."""
        return self._job is not None and not self._job.finished

    def run(self, feeds: Any = None, timeout: float | None = None):
        """Run once (``feeds``, if given, are copied into the bound inputs first) and return the
        output views by name: overwritten by this execution's next run."""
        ort_calling_form(feeds, timeout, "Execution.run")
        return (yield from run_once(self.client, lambda wire, call_timeout: ExecutionOps._start(
            self, feeds, wire.get("wait_ms"), call_timeout), timeout))

    def submit(self, feeds: Any = None):
        """Start a run and return at once: ``job.wait()``, ``job.result()`` (the output views)."""
        return (yield from ExecutionOps._start(self, feeds))[0]

    def _start(self, feeds: Any, wait_ms: int | None = None, call_timeout: float | None = None):
        """Feed the inputs and send the pre-encoded ``run_model`` (with ``wait_ms``, if given):
        the run and the request's reply."""
        self._check()
        yield from self._check_idle("submit")
        if feeds is not None:
            self._feed(feeds)
        if not self._mapped:
            for t in self.model.inputs:
                yield from BufferOps.write(self._buffers[t.name], self.inputs[t.name])
        result = yield Call("run_model", timeout=call_timeout, frame=self._frame(wait_ms))
        job = self._job_class(self, result["job"])
        job.fence = (result.get("context", 0), result.get("point", 0))
        self._job = job
        return job, result

    def rebind(self, name: str, buffer: BufferOps):
        """Bind a caller-owned buffer (same client, the model's device, large enough) to an input or
        output; ``inputs[name]`` / ``outputs[name]`` then view it.  The caller keeps owning it."""
        self._check()
        if name not in self._infos:
            raise error(ErrorCode.EINVAL, f"the model has no input or output {name!r} (inputs "
                                          f"{[t.name for t in self.model.inputs]}, outputs "
                                          f"{[t.name for t in self.model.outputs]})")
        if not isinstance(buffer, BufferOps):
            raise error(ErrorCode.EINVAL, f"rebind takes an npu.Buffer, not {type(buffer).__name__}")
        info = self._infos[name]
        if buffer.client is not self.client:
            raise error(ErrorCode.EINVAL, f"buffer {buffer.handle} belongs to another client")
        if buffer._freed:
            raise error(ErrorCode.ENOENT, f"buffer {buffer.handle} was freed")
        if buffer.device != self.model.device:
            raise error(ErrorCode.EINVAL, f"{self._kinds[name]} {name!r} needs a buffer on device "
                                          f"{self.model.device}; buffer {buffer.handle} is on device {buffer.device}")
        if buffer.size < info.size:
            raise error(ErrorCode.EINVAL, f"{self._kinds[name]} {name!r} needs {info.size} bytes "
                                          f"({info.dtype}{list(info.shape)}); buffer {buffer.handle} has {buffer.size}")
        yield from self._check_idle("rebind")
        yield from self._bind(name, buffer)
        owned = self._owned.pop(name, None)
        if owned is not None and owned is not buffer:
            yield from BufferOps.free(owned)
        self._encode()

    def close(self):
        """Free the buffers this execution allocated (a run in flight keeps them until it ends)."""
        if self._closed:
            return
        self._closed = True
        yield from self._free_owned()

    # --- internals ----------------------------------------------------------------

    def _bind(self, name: str, buf: BufferOps):
        info: TensorInfo = self._infos[name]
        if self._mapped:
            view = (yield from BufferOps.map(buf))[:info.size].view(info.dtype).reshape(info.shape)
        else:
            view = np.zeros(info.shape, info.dtype)
        self._buffers[name] = buf
        (self.inputs if self._kinds[name] == "input" else self.outputs)[name] = view

    def _encode(self) -> None:
        args = self.model._run_args([self._buffers[t.name] for t in self.model.inputs],
                                    [self._buffers[t.name] for t in self.model.outputs], self._wire)
        self._args = args
        self._frames.clear()

    def _frame(self, wait_ms: int | None) -> Callable[[int], bytes]:
        """The run request, encoded once per ``wait_ms`` (a run's timeout is usually the same each
        time): each run only splices in its seq."""
        frame = self._frames.get(wait_ms)
        if frame is None:
            if len(self._frames) >= 4:   # timeouts that vary from run to run: keep a few
                self._frames.clear()
            args = self._args if wait_ms is None else {**self._args, "wait_ms": wait_ms}
            suffix = codec.pack("args") + codec.pack(args)
            frame = self._frames[wait_ms] = lambda seq: b"".join((_PREFIX, codec.pack(seq), suffix))
        return frame

    def _feed(self, feeds: Any) -> None:
        """Copy ``feeds`` (some or all inputs, by name; or one array) into the bound inputs, after
        checking every one: a refused feed leaves the inputs as they were."""
        names = [t.name for t in self.model.inputs]
        feeds = feed_dict(feeds, names, "Execution.run")
        checked = check_feeds(feeds, [(t.name, t.shape, t.dtype) for t in self.model.inputs], partial=True)
        for name, value in checked.items():
            np.copyto(self.inputs[name], value)

    def _collect(self):
        if not self._mapped:
            for t in self.model.outputs:
                yield from BufferOps.read_into(self._buffers[t.name], self.outputs[t.name])
        return Outputs(self.outputs)

    def _check(self) -> None:
        if self._closed:
            raise error(ErrorCode.ENOENT, "this execution was closed")
        if self.model._unloaded:
            raise error(ErrorCode.ENOENT, "this execution's model was unloaded")

    def _check_idle(self, what: str):
        job = self._job
        if job is None or job.finished:
            return
        try:
            yield from JobRecord.wait(job, 0)    # maybe it finished and nobody asked yet: one poll
        except NpuError:
            pass
        if not job.finished:
            raise error(ErrorCode.EBUSY, f"cannot {what}: this execution's run (job {job.id}) is still in "
                                         "flight; wait for it, or use another execution to overlap runs")

    def _free_owned(self):
        owned, self._owned = list(self._owned.values()), {}
        for buf in owned:
            try:
                yield from BufferOps.free(buf)
            except NpuError:
                pass   # the session is gone, and its buffers with it


class ExecutionRun(ModelRun):
    """One run of an execution; its result is the execution's output views."""

    def __init__(self, execution: ExecutionOps, job_id: int):
        super().__init__(execution.model, job_id, None)
        self.execution = execution

    def _collect(self):
        return (yield from self.execution._collect())  # the bound output views, overwritten by the next run

    def _release(self):
        yield from ()  # the execution owns its buffers for all its runs


class ExecutionJob(ExecutionRun, ModelJob):
    """One run of an Execution; its result is the execution's output views."""


class Execution(ExecutionOps):
    """One model's bound input/output buffers and pre-encoded run request."""

    _job_class = ExecutionJob
    if TYPE_CHECKING:   # the blocking methods' types (docstrings: ExecutionOps)
        def run(self, feeds: Any = None, timeout: float | None = None) -> Outputs: ...
        def submit(self, feeds: Any = None) -> ExecutionJob: ...
        def rebind(self, name: str, buffer: BufferOps) -> None: ...
        def close(self) -> None: ...
    else:
        run = blocking(ExecutionOps.run)
        submit = blocking(ExecutionOps.submit)
        rebind = blocking(ExecutionOps.rebind)
        close = blocking(ExecutionOps.close)

    def __enter__(self) -> "Execution":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
