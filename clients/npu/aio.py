"""The trio client: ``npu.connect_async()``.

    async with npu.connect_async() as client:
        model = await client.load("net.onnx")
        outputs = await model.run(x)

The same API as ``npu.Client`` with ``await`` in front: buffers, models, jobs,
contexts and fences.  Any number of tasks may issue requests concurrently; one
background task owns the DEALER socket (see ipc_schema.trio_zmq) and routes
each reply to the task waiting for its seq.  A session ends with the ``async
with`` block; after a daemon restart, open a new one.
"""

from __future__ import annotations

import itertools
import mmap
import os
import socket
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from ipc_schema.endpoint import resolve
from ipc_schema.errors import ErrorCode
from ipc_schema.schema import HARD_FRAME_LIMIT
from ipc_schema.trio_zmq import OwnedSocket

from . import protocol
from .buffer import check_range, writable_bytes
from .client import DEFAULT_TIMEOUT_S, Context, _program_name, job_options
from .errors import NotFound, NpuError, error
from .jobs import JobRecord, ModelRunRecord
from .model import LoadedModel, ModelDigests, Report, model_bytes
from .protocol import Device, as_bytes

_RECOVER = "open a new session (npu.connect_async) and load models again"


class AsyncClient:
    """A session with npud for trio code.  Create it with ``npu.connect_async``."""

    def __init__(self, endpoint: str, sock: zmq.Socket, timeout: float, map_io: bool = True):
        self.endpoint = endpoint
        self.timeout = timeout
        self.map_io = map_io
        self._sock = sock
        self._owned = OwnedSocket(sock, self._on_frames)
        self._seq = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list]] = {}
        self._attach: trio.socket.SocketType | None = None
        self._fd_lock = trio.Lock()
        self._fd_backlog: dict[int, tuple[dict, int]] = {}
        self._digests = ModelDigests()
        self.limits: dict[str, int] = {}
        self.session = ""
        self.daemon_version = ""
        self.closed = False

    @property
    def attached(self) -> bool:
        """True when the companion socket is up (a local daemon): buffers can be mapped."""
        return self._attach is not None

    def _on_frames(self, frames: list) -> None:
        try:
            reply = protocol.decode(frames[0], None)
        except NpuError:
            return  # not ours to understand; a request waiting on it will time out
        if isinstance(reply, tuple):
            return  # events: nothing to do yet
        slot = self._waiting.get(reply.seq)
        if slot is not None:
            slot[1].append(reply)
            slot[0].set()

    async def _request(self, op: str, args: dict, *, timeout: float | None = None,
                       seq: int | None = None) -> dict:
        if self.closed:
            raise error(ErrorCode.ENOTCONN, "this client is closed")
        seq = next(self._seq) if seq is None else seq
        limit = self.limits.get("max_message_bytes", protocol.MAX_MESSAGE_BYTES)
        frame = protocol.encode(op, seq, args, limit)
        event, box = trio.Event(), []
        self._waiting[seq] = (event, box)
        try:
            self._owned.send([frame])
            with trio.move_on_after(self.timeout if timeout is None else timeout):
                await event.wait()
        finally:
            del self._waiting[seq]
        if not box:
            raise error(ErrorCode.ETIMEDOUT, f"no reply to {op} within "
                                             f"{self.timeout if timeout is None else timeout:.1f} s")
        reply = box[0]
        if reply.error is None and reply.result is not None:
            reply = protocol.codec.Reply(reply.seq, protocol.codec.OPS[op].result.check(
                reply.result, f"{op}.result", strict=False), None)
        return protocol.result_or_raise(reply, op, self.endpoint, _RECOVER)

    # --- the API (mirrors npu.Client) ------------------------------------------------

    async def ping(self) -> None:
        await self._request("ping", {})

    async def version(self) -> dict[str, Any]:
        return await self._request("version", {})

    async def devices(self) -> list[Device]:
        return [Device.from_wire(d) for d in (await self._request("devices", {}))["devices"]]

    async def status(self) -> dict[str, Any]:
        return await self._request("status", {})

    async def clients(self) -> list[dict[str, Any]]:
        return (await self._request("clients", {}))["clients"]

    async def alloc(self, nbytes: int, device: int = 0) -> "AsyncBuffer":
        """A zero-filled buffer of ``nbytes`` bytes on ``device``."""
        result = await self._request("alloc", {"device": device, "size": nbytes})
        return AsyncBuffer(self, result["handle"], result["size"], device)

    async def load(self, model: Any, device: int = 0, **options) -> "AsyncModel":
        """Compile (or fetch from the daemon's compile cache) and load an ONNX model; see ``Client.load``."""
        args = {"device": device, "options": options}
        file = self._digests.lookup(model)
        if file.digest is not None:
            try:  # the daemon may still hold it compiled: then the bytes need not travel at all
                return AsyncModel(self, device, await self._request("load", {**args, "model_digest": file.digest}))
            except NotFound:
                self._digests.forget(file)
        info = await self._with_model("load", model, args)
        self._digests.remember(file, info)
        return AsyncModel(self, device, info)

    async def check(self, model: Any, device: int = 0) -> list[dict[str, str]]:
        """Every reason the model cannot compile for the device: [{node, op, reason}], empty if none."""
        return (await self._with_model("check", model, {"device": device}))["problems"]

    async def _with_model(self, op: str, model: Any, args: dict[str, Any]) -> dict[str, Any]:
        data = model_bytes(model)
        if len(data) <= self.limits["max_inline_bytes"]:
            return await self._request(op, {**args, "model": data})
        staging = await self.alloc(len(data), args["device"])  # too big for a message: hand it over in a buffer
        try:
            await staging.write(data)
            return await self._request(op, {**args, "model_buffer": staging.handle, "model_size": len(data)})
        finally:
            with trio.CancelScope(shield=True):
                await staging.free()

    async def submit(self, stream: bytes, bindings, device: int = 0, **options) -> "AsyncJob":
        """Run a command stream with ``(buffer, va, writable)`` bindings; returns at once.

        Options as for ``Client.submit``: ``context``, ``after``, ``deadline``, ``timeout``.
        """
        args = {"device": device, "stream": bytes(stream),
                "bindings": [{"handle": b.handle, "va": va, "writable": w} for b, va, w in bindings],
                **job_options(**options)}
        result = await self._request("submit", args)
        return AsyncJob(self, result["job"], result.get("context", 0), result.get("point", 0))

    async def context(self, priority: str = "normal", weight: int = 1) -> Context:
        """A new context for ``context=`` of submits: its priority class and fair-share weight."""
        result = await self._request("context_create", {"priority": priority, "weight": weight})
        return Context(self, result["context"], result["priority"], result["weight"])

    async def import_fence(self, token: str) -> "AsyncJob":
        """Another client's exported fence as a job to wait for or name in ``after``."""
        result = await self._request("fence_import", {"token": token})
        job = AsyncJob(self, result["job"])
        job.state = result["state"] if result["state"] in ("queued", "running") else "queued"
        return job

    async def inject_fault(self, kind: str, device: int = 0, *, slow_ms: int = 0, count: int = 1) -> None:
        """Test mode only (``npud --test-mode``); see ``Client.inject_fault``."""
        await self._request("inject_fault", {"device": device, "kind": kind, "slow_ms": slow_ms, "count": count})

    async def _map(self, handle: int) -> mmap.mmap:
        if self._attach is None:
            raise error(ErrorCode.ENOTCONN, "map needs a local daemon with the companion socket; "
                                            "use read()/write() instead")
        seq = next(self._seq)
        # The fd is sent before the reply; hold the lock so concurrent maps read in turn.
        await self._request("map", {"handle": handle}, seq=seq)
        async with self._fd_lock:
            while seq not in self._fd_backlog:
                data, ancdata, _flags, _addr = await self._attach.recvmsg(4096, socket.CMSG_SPACE(4))
                if not data:
                    raise error(ErrorCode.ENOTCONN, "the daemon closed the companion socket")
                fds = [fd for level, kind, raw in ancdata
                       if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                       for fd in np.frombuffer(raw[: len(raw) - len(raw) % 4], dtype=np.int32).tolist()]
                message = protocol.fd_message(data)
                if len(fds) != 1:
                    for fd in fds:
                        os.close(fd)
                    raise error(ErrorCode.EPROTO, "fd packet without exactly one file descriptor")
                self._fd_backlog[message["tag"]] = (message, fds[0])
            message, fd = self._fd_backlog.pop(seq)
        return protocol.map_fd(fd, message["size"])


class AsyncBuffer:
    """A buffer object, for trio code (see npu.Buffer): data moves through the mapping when the
    daemon is local, through messages otherwise."""

    def __init__(self, client: AsyncClient, handle: int, size: int, device: int):
        self.client, self.handle, self.size, self.device = client, handle, size, device
        self._mm: mmap.mmap | None = None
        self._freed = False

    def __repr__(self) -> str:
        return f"<npu.AsyncBuffer handle={self.handle} size={self.size} device={self.device}>"

    async def map(self, dtype: Any = np.uint8, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A writable numpy view of the buffer's memory itself (a local daemon only)."""
        self._check()
        if self._mm is None:
            self._mm = await self.client._map(self.handle)
        array = np.frombuffer(self._mm, dtype=np.uint8, count=self.size).view(dtype)
        return array.reshape(shape) if shape is not None else array

    async def write(self, data: Any, offset: int = 0) -> None:
        """Copy bytes (or a numpy array's bytes) into the buffer at ``offset``."""
        self._check()
        view = as_bytes(data)
        check_range("write", offset, view.nbytes, self.size)
        if await self._mapped_io():
            self._mm[offset:offset + view.nbytes] = view
            return
        chunk = self.client.limits["max_inline_bytes"]
        for start in range(0, view.nbytes, chunk) or [0]:
            await self.client._request("write", {"handle": self.handle, "offset": offset + start,
                                                 "data": bytes(view[start:start + chunk])})

    async def read(self, nbytes: int | None = None, offset: int = 0) -> bytes:
        """Copy ``nbytes`` (default: to the end) out of the buffer from ``offset``."""
        self._check()
        nbytes = self.size - offset if nbytes is None else nbytes
        check_range("read", offset, nbytes, self.size)
        if await self._mapped_io():
            return self._mm[offset:offset + nbytes]
        out = bytearray(nbytes)
        await self._read_messages(memoryview(out), offset)
        return bytes(out)

    async def read_into(self, out: Any, offset: int = 0) -> None:
        """Copy ``len(out)`` bytes from ``offset`` into a writable buffer or array: no allocation."""
        self._check()
        target = writable_bytes(out)
        check_range("read", offset, target.nbytes, self.size)
        if await self._mapped_io():
            target[:] = memoryview(self._mm)[offset:offset + target.nbytes]
            return
        await self._read_messages(target, offset)

    async def free(self) -> None:
        """Release the buffer.  Jobs still using it keep it alive until they finish."""
        if self._freed:
            return
        await self.client._request("free", {"handle": self.handle})
        self._freed = True
        self._mm = None

    async def _read_messages(self, target: memoryview, offset: int) -> None:
        chunk = self.client.limits["max_inline_bytes"]
        for start in range(0, target.nbytes, chunk):
            n = min(chunk, target.nbytes - start)
            target[start:start + n] = (await self.client._request(
                "read", {"handle": self.handle, "offset": offset + start, "size": n}))["data"]

    async def _mapped_io(self) -> bool:
        if self._mm is None and self.client.attached and self.client.map_io:
            await self.map()
        return self._mm is not None

    def _check(self) -> None:
        if self._freed:
            raise error(ErrorCode.ENOENT, f"buffer {self.handle} was freed")


class AsyncJob(JobRecord):
    """A submitted command stream (or an imported fence), for trio code (see npu.Job)."""

    client: AsyncClient

    async def wait(self, timeout: float | None = None) -> "AsyncJob":
        """Until the job finishes; raises the job's error if it failed, Timeout if not done in time."""
        if not self.finished:
            args, reply_timeout = self._wait_args(timeout)
            await self._settle(await self.client._request("wait", args, timeout=reply_timeout))
        if self._error is not None:
            raise self._error
        return self

    async def cancel(self) -> str:
        """Cancel: queued, it fails at once; running, at its next layer boundary.  Returns the state now."""
        return (await self.client._request("cancel", {"job": self.id}))["state"]

    async def export_fence(self) -> str:
        """A token another client can ``import_fence`` to wait for this job or run after it."""
        return (await self.client._request("fence_export", {"job": self.id}))["token"]

    async def _settle(self, result: dict) -> None:
        self._take(result)


class AsyncModel(LoadedModel):
    """A model loaded on a device for this session, for trio code (see npu.Model)."""

    client: AsyncClient

    async def run(self, feeds: Any, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run once and return the outputs by name."""
        job = await self.submit(feeds)
        return await job.result(timeout)

    async def submit(self, feeds: Any, **options) -> "AsyncModelJob":
        """Start a run and return at once; ``feeds`` and options as for ``Model.submit``."""
        wire = job_options(**options)
        self._check_loaded()
        feeds = self._normalise(feeds)
        inputs, outputs = self._idle_sets.pop() if self._idle_sets else await self._new_set()
        try:
            for info, buf in zip(self.inputs, inputs):
                await buf.write(feeds[info.name])
        except BaseException:
            self._idle_sets.append((inputs, outputs))
            raise
        try:
            result = await self.client._request("run_model", self._run_args(inputs, outputs, wire))
        except NpuError as exc:
            if exc.code != "ETIMEDOUT":   # the daemon answered: no job uses the set
                self._idle_sets.append((inputs, outputs))
                raise
            await self._discard((inputs, outputs))
            raise
        except BaseException:
            # Cancelled after the request left: a job may be running on these buffers, so they
            # must not serve another run (freeing is safe: the daemon keeps them for the job).
            await self._discard((inputs, outputs))
            raise
        return AsyncModelJob(self, result["job"], (inputs, outputs), result.get("context", 0),
                             result.get("point", 0))

    async def report(self) -> Report:
        """Per-op table: op, shapes, MACs, modeled cycles, SRAM and DMA bytes."""
        result = await self.client._request("report", {"model": self.id})
        return Report(result["rows"], result["table"])

    async def unload(self) -> None:
        """Free the model's device memory (weights, arena, I/O buffers)."""
        if self._unloaded:
            return
        with trio.CancelScope(shield=True):   # half an unload would leak the model in the daemon
            self._unloaded = True
            sets, self._idle_sets = self._idle_sets, []
            for io in sets:
                await self._discard(io)
            await self.client._request("unload", {"model": self.id})

    async def _new_set(self) -> tuple[list[AsyncBuffer], list[AsyncBuffer]]:
        made: list[AsyncBuffer] = []
        try:
            for t in (*self.inputs, *self.outputs):
                made.append(await self.client.alloc(max(t.size, 1), self.device))
        except BaseException:
            await self._discard((made, []))
            raise
        return made[:len(self.inputs)], made[len(self.inputs):]

    async def _discard(self, io) -> None:
        """Free an input/output set (shielded: it must not leak when the caller is cancelled)."""
        with trio.CancelScope(shield=True):
            for buf in (*io[0], *io[1]):
                try:
                    await buf.free()
                except NpuError:
                    pass   # the session is gone, and its buffers with it


class AsyncModelJob(ModelRunRecord, AsyncJob):
    """One run of a model: ``await wait()``, then ``await result()`` (outputs) and ``stats``."""

    async def result(self, timeout: float | None = None) -> dict[str, np.ndarray]:
        await self.wait(timeout)
        return self._outputs

    async def _settle(self, result: dict) -> None:
        # Until the outputs are read the job keeps its buffer set: a read cancelled half-way
        # leaves the job unfinished, and the next wait() reads again from the same set.
        if not self._take(result):
            return
        if self._error is None:
            outputs = {}
            for info, buf in zip(self.model.outputs, self._io[1]):
                outputs[info.name] = np.empty(info.shape, info.dtype)
                await buf.read_into(outputs[info.name])
            self._outputs = outputs
        io, self._io = self._io, None
        if self.model._unloaded:  # unloaded while this job ran: nothing will reuse the buffers
            await self.model._discard(io)
        else:
            self.model._idle_sets.append(io)


@asynccontextmanager
async def connect_async(endpoint: str | None = None, *, name: str | None = None,
                        timeout: float = DEFAULT_TIMEOUT_S, map_io: bool = True, curve: tuple | None = None):
    """``async with npu.connect_async() as client:`` -- a session for trio code.

    ``curve=(client_public, client_secret, server_public)``: as for ``npu.connect``; a refused
    key raises PermissionDenied (EPERM).
    """
    endpoint = resolve(endpoint)
    protocol.check_reachable(endpoint)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
    monitor = None
    try:
        if curve is not None:
            protocol.set_curve(sock, curve)
        if not endpoint.startswith("ipc://"):  # tcp: learn of a refused handshake at once
            monitor = sock.get_monitor_socket(protocol.HANDSHAKE_EVENTS)
        sock.connect(endpoint)
    except BaseException:
        if monitor is not None:
            monitor.close(linger=0)
        sock.close()
        raise
    client = AsyncClient(endpoint, sock, timeout, map_io)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._owned.run)
            hello = await _hello(client, name, monitor, curve is not None)
            if monitor is not None:
                sock.disable_monitor()
                monitor.close(linger=0)
                monitor = None
            protocol.check_hello(hello)
            client.session, client.limits = hello["session"], hello["limits"]
            client.daemon_version = hello["daemon_version"]
            if hello["attach_path"]:
                client._attach = await _attach(hello["attach_path"], client.session, hello["attach_token"])
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await client._request("bye", {})
                    except NpuError:
                        pass
                client.closed = True
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The socket's task does not raise, so a single exception is the caller's own (from the
        # body of ``async with``, or hello): give it back as raised, not wrapped in a group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        if monitor is not None:
            monitor.close(linger=0)
        sock.close()
        if client._attach is not None:
            client._attach.close()
        for _message, fd in client._fd_backlog.values():
            os.close(fd)


async def _hello(client: AsyncClient, name: str | None, monitor: zmq.Socket | None, with_curve: bool) -> dict:
    """The hello reply; EPERM as soon as the socket monitor reports a refused handshake."""
    refusals: list[NpuError] = []
    failure: list[NpuError] = []
    hello = None
    async with trio.open_nursery() as nursery:
        if monitor is not None:
            def on_event(frames: list) -> None:
                event = parse_monitor_message(frames)
                refusal = protocol.handshake_refusal(event["event"], event["value"], client.endpoint, with_curve)
                if refusal is not None:
                    refusals.append(refusal)
                    nursery.cancel_scope.cancel()
            nursery.start_soon(OwnedSocket(monitor, on_event).run)
        try:
            hello = await client._request("hello", protocol.hello_args(name or _program_name()),
                                          timeout=protocol.HELLO_TIMEOUT_S)
        except NpuError as exc:   # raised below, outside this nursery, so not wrapped in a group
            failure.append(protocol.not_running(client.endpoint, " (no answer to hello)")
                           if exc.code == "ETIMEDOUT" else exc)
        nursery.cancel_scope.cancel()
    if refusals:
        raise refusals[0]
    if failure:
        raise failure[0]
    return hello


async def _attach(path: str, session: str, token: bytes) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with trio.fail_after(protocol.HELLO_TIMEOUT_S):
            await sock.connect(path)
            await sock.send(protocol.codec.pack({"session": session, "token": token}))
            protocol.attach_reply(await sock.recv(4096))
    except (OSError, trio.TooSlowError) as exc:
        sock.close()
        raise error(ErrorCode.ENOTCONN, f"cannot attach the companion socket {path}: {exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock
