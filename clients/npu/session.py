"""The client's own operations, written once: ``npu.Client`` runs them blocking, ``npu.AsyncClient``
awaited (see core.py).  What differs between the two is only the transport under ``_run``."""

from __future__ import annotations

import os
from typing import Any

from .buffer import BufferOps
from .core import Call
from .errors import NotFound
from .model import ModelDigests, model_bytes
from .protocol import Device
from .shapes import Specialisations


STAGING_ALIGN = 1 << 16
"""Staging buffers but the last are whole multiples of this (any device's page size divides it)."""


def staging_parts(size: int, max_buffer_bytes: int) -> list[tuple[int, int]]:
    """(start, stop) of each staging buffer for a model of ``size`` bytes: one if it fits a
    buffer, else as few as fit the daemon's ``max_buffer_bytes`` (protocol 1.8's ``model_buffers``)."""
    step = max(STAGING_ALIGN, max_buffer_bytes // STAGING_ALIGN * STAGING_ALIGN)
    if size <= max_buffer_bytes:
        return [(0, size)]
    return [(start, min(start + step, size)) for start in range(0, size, step)]


class Context:
    """A context of this client's session: a priority and a fair-share weight for the jobs run in it."""

    def __init__(self, client: Any, context_id: int, priority: str, weight: int):
        self.client, self.id, self.priority, self.weight = client, context_id, priority, weight

    def __repr__(self) -> str:
        return f"<npu.Context {self.id} {self.priority} weight {self.weight}>"


def job_options(*, context: Any = None, after: Any = (), deadline: float | None = None,
                timeout: float | None = None) -> dict[str, Any]:
    """Wire fields of a submit: ``context`` (a Context or id), ``after`` (jobs that must finish first),
    ``deadline`` (seconds from now to finish, or fail with MissedDeadline), ``timeout`` (device
    seconds before the job is aborted as hung)."""
    out: dict[str, Any] = {}
    if context is not None:
        out["context"] = context if isinstance(context, int) else context.id
    if after:
        out["after"] = [j if isinstance(j, int) else j.id for j in after]
    if deadline is not None:
        out["deadline_ms"] = max(1, int(deadline * 1000))
    if timeout is not None:
        out["timeout_ms"] = max(1, int(timeout * 1000))
    return out


class ClientOps:
    """A session with npud: its operations.  Subclasses name their kinds of buffer, model, job and
    execution, and provide ``_run(operation)`` (the transport) and ``_attach`` (the companion socket)."""

    _buffer_class: type
    _model_class: type
    _job_class: type
    _execution_class: type
    _attach: Any = None

    def _init_ops(self) -> None:
        self._digests = ModelDigests()

    @property
    def attached(self) -> bool:
        """Whether buffers can be mapped (the daemon is local and the companion socket is up)."""
        return self._attach is not None

    @property
    def closed(self) -> bool:
        """Whether this client ended its session (``close()``, or the end of ``async with``)."""
        return self._core.closed

    @property
    def limits(self) -> dict[str, int]:
        """The daemon's limits for this session (``max_message_bytes``, ``max_inline_bytes``, ...)."""
        return self._core.limits

    @limits.setter
    def limits(self, value: dict[str, int]) -> None:
        self._core.limits = value

    def ping(self):
        """A round trip to the daemon."""
        yield Call("ping")

    def version(self):
        """``{"daemon_version": str, "protocol": [major, minor]}``."""
        return (yield Call("version"))

    def devices(self):
        """The daemon's devices."""
        return [Device.from_wire(d) for d in (yield Call("devices"))["devices"]]

    def status(self):
        """The daemon's status: uptime, devices, sessions, queues."""
        return (yield Call("status"))

    def clients(self):
        """The daemon's sessions (what ``npuctl clients`` lists)."""
        return (yield Call("clients"))["clients"]

    def alloc(self, nbytes: int, device: int = 0):
        """A zero-filled buffer of ``nbytes`` bytes on ``device``."""
        return (yield from self._alloc_op(nbytes, device))

    def _alloc_op(self, nbytes: int, device: int = 0):
        result = yield Call("alloc", {"device": device, "size": nbytes})
        return self._buffer_class(self, result["handle"], result["size"], device)

    def load(self, model: Any, device: int = 0, *, model_digest: bytes | None = None, **options):
        """Compile (or fetch from the daemon's compile cache) and load an ONNX model.

        ``model`` is a path, bytes or an ``onnx.ModelProto``.  Options:
        ``input_shapes={name: shape}`` for symbolic dimensions (else 1 at first), ``name``.  A
        model with symbolic dimensions keeps its source (the path, or its bytes) so that runs of
        other sizes can load a specialisation for them (shapes.py).  ``model_digest``: the
        model's digest (npud.ipc_schema.digest) if the caller has it: the load is tried by digest
        first, and the bytes travel only if the daemon no longer holds it compiled.
        """
        if not isinstance(model, (str, os.PathLike)):
            model = model_bytes(model)   # serialised once: they are what a specialisation reloads
        info = yield from self._load_op(model, device, options, model_digest)
        loaded = self._model_class(self, device, info)
        if any(t.symbolic for t in loaded.inputs):
            loaded._family = Specialisations(loaded, model, options, info.get("model_digest"))
        return loaded

    def _load_op(self, model: Any, device: int, options: dict, digest: bytes | None = None):
        """A load's reply: by digest (the file's, remembered, else ``digest``) while the daemon
        still holds the model compiled for ``options``, else with the model's bytes."""
        args = {"device": device, "options": options}
        file = self._digests.lookup(model)
        digest = file.digest or digest
        if digest is not None:
            try:  # the daemon may still hold it compiled: then the bytes need not travel at all
                return (yield Call("load", {**args, "model_digest": digest}))
            except NotFound:
                self._digests.forget(file)
        info = yield from self._with_model("load", model, args)
        self._digests.remember(file, info)
        return info

    def check(self, model: Any, device: int = 0):
        """Every reason the model cannot compile for the device: [{node, op, reason}], empty if none."""
        return (yield from self._with_model("check", model, {"device": device}))["problems"]

    def _with_model(self, op: str, model: Any, args: dict[str, Any]):
        data = model_bytes(model)
        if len(data) <= self.limits["max_inline_bytes"]:
            return (yield Call(op, {**args, "model": data}))
        # too big for a message: hand it over in staging buffers, several past one buffer's limit
        staging = []
        try:
            for start, stop in staging_parts(len(data), self.limits.get("max_buffer_bytes", len(data))):
                staging.append((yield from self._alloc_op(stop - start, args["device"])))
                yield from BufferOps.write(staging[-1], memoryview(data)[start:stop])
            source = ({"model_buffer": staging[0].handle} if len(staging) == 1
                      else {"model_buffers": [b.handle for b in staging]})
            return (yield Call(op, {**args, **source, "model_size": len(data)}))
        finally:
            for buffer in staging:
                yield from BufferOps.free(buffer)

    def submit(self, stream: bytes, bindings: list, device: int = 0, **options):
        """Run a command stream with ``(buffer, va, writable)`` bindings; returns at once.

        Options (as for ``Model.submit``): ``context``, ``after``, ``deadline``, ``timeout``.
        """
        args = {"device": device, "stream": bytes(stream),
                "bindings": [{"handle": b.handle, "va": va, "writable": w} for b, va, w in bindings],
                **job_options(**options)}
        result = yield Call("submit", args)
        return self._job_class(self, result["job"], result.get("context", 0), result.get("point", 0))

    def context(self, priority: str = "normal", weight: int = 1):
        """A new context: jobs submitted with ``context=`` it run at its priority and fair-share weight.

        Priorities: low, normal, high, realtime (realtime only where the daemon's policy allows).
        """
        result = yield Call("context_create", {"priority": priority, "weight": weight})
        return Context(self, result["context"], result["priority"], result["weight"])

    def import_fence(self, token: str):
        """Another client's exported fence (``job.export_fence()``) as a job to wait for or name in ``after``."""
        result = yield Call("fence_import", {"token": token})
        job = self._job_class(self, result["job"])
        job.state = result["state"] if result["state"] in ("queued", "running") else "queued"
        return job

    def inject_fault(self, kind: str, device: int = 0, *, slow_ms: int = 0, count: int = 1):
        """Test mode only (``npud --test-mode``): make this session's next job(s) hang, crash the
        device process, or run slowly (``slow_ms`` per layer); ``slow_compile``: its next compile(s)
        sleep ``slow_ms`` in the compiler worker first."""
        yield Call("inject_fault", {"device": device, "kind": kind, "slow_ms": slow_ms, "count": count})

    def _request_op(self, op: str, args: dict, timeout: float | None = None):
        """Any request, its result as the daemon sent it (tools such as npuctl use this)."""
        return (yield Call(op, args, timeout))

