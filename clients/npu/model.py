"""Models: ``Client.load(model) -> Model``; ``Model.run(feeds) -> outputs``.

Inputs and outputs travel through buffer objects bound to the job, never in
messages: ``submit`` copies each feed into its input buffer (through the
mapping, for a local client) and the outputs are read back from theirs.  A
model keeps a pool of input/output buffer sets, so several jobs of one model
can be in flight at once without overwriting each other's tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ipc_schema.errors import ErrorCode

from .errors import error, from_wire

if TYPE_CHECKING:
    from .buffer import Buffer
    from .client import Client
    from .execution import Execution


@dataclass(frozen=True)
class TensorInfo:
    """One input or output: name, shape and dtype as the compiled model has them."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    size: int


@dataclass(frozen=True)
class Report:
    """A model's per-op report (like Vela's per-layer report); ``str()`` is the table."""

    rows: list[dict[str, Any]]
    table: str

    def __str__(self) -> str:
        return self.table


def model_bytes(model: Any) -> bytes:
    """The serialised ONNX model from a path, bytes or an ``onnx.ModelProto``."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model)
    if isinstance(model, (str, os.PathLike)):
        try:
            with open(model, "rb") as f:
                return f.read()
        except OSError as exc:
            raise error(ErrorCode.EINVAL, f"cannot read model file {model}: {exc.strerror}") from None
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString()
    raise error(ErrorCode.EINVAL, f"a model is a path, bytes or onnx.ModelProto, not {type(model).__name__}")


class Model:
    """A model loaded on a device for this session."""

    def __init__(self, client: "Client", device: int, info: dict):
        self.client = client
        self.device = device
        self.id = info["model"]
        self.inputs = [_tensor(t) for t in info["inputs"]]
        self.outputs = [_tensor(t) for t in info["outputs"]]
        self.cached = info["cached"]
        self.compile_ms = info["compile_ms"]
        self.weights_bytes = info["weights_bytes"]
        self.arena_bytes = info["arena_bytes"]
        self._idle_sets: list[tuple[list["Buffer"], list["Buffer"]]] = []
        self._unloaded = False

    def __repr__(self) -> str:
        def sig(ts):
            return ", ".join(f"{t.name}: {t.dtype}{list(t.shape)}" for t in ts)
        return f"<npu.Model {self.id} ({sig(self.inputs)}) -> ({sig(self.outputs)})>"

    def run(self, feeds: Any, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run once and return the outputs by name."""
        return self.submit(feeds).result(timeout)

    def submit(self, feeds: Any, **options) -> "ModelJob":
        """Start a run and return at once; ``feeds`` is a dict by input name, or one array.

        Options: ``context`` (``client.context(priority, weight)``: its priority and fair share),
        ``after`` (jobs, also imported fences, that must finish first; if one fails this run fails
        with its cause), ``deadline`` (seconds: finish by then or fail with ``MissedDeadline``),
        ``timeout`` (device seconds before the run is aborted as hung).
        """
        from .client import job_options

        wire = job_options(**options)
        if self._unloaded:
            raise error(ErrorCode.ENOENT, "this model was unloaded")
        feeds = self._normalise(feeds)
        inputs, outputs = self._idle_sets.pop() if self._idle_sets else self._new_set()
        try:
            for info, buf in zip(self.inputs, inputs):
                buf.write(feeds[info.name])
            result = self.client._request("run_model", {
                "model": self.id, "inputs": [b.handle for b in inputs],
                "outputs": [b.handle for b in outputs], **wire})
        except BaseException:
            self._idle_sets.append((inputs, outputs))
            raise
        job = ModelJob(self, result["job"], (inputs, outputs))
        job.fence = (result.get("context", 0), result.get("point", 0))
        return job

    def execution(self, context: Any = None, **options) -> "Execution":
        """A reusable execution: buffers bound and mapped once, the run request encoded once, inputs
        filled in place (``clients/npu/execution.py``).  Options as for ``submit``, fixed for its runs."""
        from .client import job_options
        from .execution import Execution

        wire = job_options(context=context, **options)
        if self._unloaded:
            raise error(ErrorCode.ENOENT, "this model was unloaded")
        return Execution(self, wire)

    def report(self) -> Report:
        """Per-op table: op, shapes, MACs, modeled cycles, SRAM and DMA bytes."""
        result = self.client._request("report", {"model": self.id})
        return Report(result["rows"], result["table"])

    def unload(self) -> None:
        """Free the model's device memory (weights, arena, I/O buffers)."""
        if self._unloaded:
            return
        self._unloaded = True
        for inputs, outputs in self._idle_sets:
            for buf in (*inputs, *outputs):
                buf.free()
        self._idle_sets.clear()
        self.client._request("unload", {"model": self.id})

    def _new_set(self):
        def alloc(infos):
            return [self.client.alloc(max(t.size, 1), self.device) for t in infos]
        return alloc(self.inputs), alloc(self.outputs)

    def _normalise(self, feeds: Any) -> dict[str, np.ndarray]:
        if not isinstance(feeds, dict):
            if len(self.inputs) != 1:
                raise error(ErrorCode.EINVAL, f"this model has {len(self.inputs)} inputs "
                                              f"({', '.join(t.name for t in self.inputs)}): pass a dict")
            feeds = {self.inputs[0].name: feeds}
        missing = [t.name for t in self.inputs if t.name not in feeds]
        extra = sorted(set(feeds) - {t.name for t in self.inputs})
        if missing or extra:
            raise error(ErrorCode.EINVAL, f"feeds do not match the model's inputs: missing {missing}, "
                                          f"unknown {extra}")
        out = {}
        for t in self.inputs:
            x = np.asarray(feeds[t.name])
            if x.shape != t.shape:
                raise error(ErrorCode.EINVAL, f"input {t.name!r} has shape {list(x.shape)}, the model "
                                              f"expects {list(t.shape)}")
            if not np.can_cast(x.dtype, t.dtype, casting="same_kind"):
                raise error(ErrorCode.EINVAL, f"input {t.name!r} is {x.dtype}, the model expects {t.dtype}")
            out[t.name] = np.ascontiguousarray(x, dtype=t.dtype)
        return out


class ModelJob:
    """One run of a model: ``wait()``, then ``result()`` (outputs) and ``stats``."""

    def __init__(self, model: Model, job_id: int, io):
        self.model = model
        self.client = model.client
        self.id = job_id
        self.stats: dict[str, Any] = {}
        self.state = "queued"
        self.fence = (0, 0)    # (context id, point on its timeline)
        self._io = io
        self._outputs: dict[str, np.ndarray] | None = None
        self._error: Exception | None = None

    @property
    def finished(self) -> bool:
        return self._outputs is not None or self._error is not None

    @property
    def error(self) -> Exception | None:
        return self._error

    def cancel(self) -> str:
        """Cancel: queued, it fails at once; running, at its next layer boundary.  Returns the state now."""
        return self.client._request("cancel", {"job": self.id})["state"]

    def export_fence(self) -> str:
        """A token another client can ``import_fence`` to wait for this run or run after it."""
        return self.client._request("fence_export", {"job": self.id})["token"]

    def wait(self, timeout: float | None = None) -> "ModelJob":
        """Block until the run finishes; raises its error if it failed."""
        if not self.finished:
            client = self.model.client
            timeout = client.timeout if timeout is None else timeout
            self._settle(client._request("wait", {"job": self.id, "timeout_ms": int(timeout * 1000)},
                                         timeout=timeout + client.timeout))
        if self._error is not None:
            raise self._error
        return self

    def _settle(self, result: dict) -> None:
        """Take a finished job's outcome (from wait or wait_jobs): outputs, or its error."""
        if result["state"] not in ("done", "failed") or self.finished:
            return
        self.state = result["state"]
        self.stats = result["stats"]
        if "error" in result:
            self._error = from_wire(result["error"])
        else:
            self._outputs = self._collect()
        self._release()

    def _collect(self) -> dict[str, np.ndarray]:
        """The finished run's outputs (copies: the buffers serve the next run)."""
        outputs = {}
        for info, buf in zip(self.model.outputs, self._io[1]):
            out = np.empty(info.shape, info.dtype)
            buf.read_into(out)
            outputs[info.name] = out
        return outputs

    def _release(self) -> None:
        if self.model._unloaded:  # unloaded while this job ran: nothing will reuse them
            for buf in (*self._io[0], *self._io[1]):
                buf.free()
        else:
            self.model._idle_sets.append(self._io)  # the buffers may serve the next run

    def result(self, timeout: float | None = None) -> dict[str, np.ndarray]:
        return self.wait(timeout)._outputs


def _tensor(t: dict) -> TensorInfo:
    return TensorInfo(t["name"], tuple(t["shape"]), np.dtype(t["dtype"]), t["size"])
