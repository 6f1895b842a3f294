"""The trio client: ``npu.connect_async()``.

    async with npu.connect_async() as client:
        model = await client.load("net.onnx")
        outputs = await model.run(x)

The same API as ``npu.Client`` with ``await`` in front -- the same operations,
in fact (core.py): this module is only the trio transport under them.  Any
number of tasks may issue requests concurrently; one background task owns the
DEALER socket (see npud.ipc_schema.trio_zmq) and routes each reply to the task
waiting for its seq, another reads the companion socket (fds, and its end: the
session's).  A session ends with the ``async with`` block; once it is lost
(``ConnectionLost``), open a new one.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Self

import numpy as np

import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from npud.ipc_schema.endpoint import resolve, searched
from npud.ipc_schema.errors import ErrorCode
from npud.ipc_schema.schema import HARD_FRAME_LIMIT
from npud.ipc_schema.trio_zmq import OwnedSocket

from . import protocol
from .buffer import BufferOps
from .client import DEFAULT_TIMEOUT_S, HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS, _program_name
from .core import Call, Core, Operation, awaitable
from .errors import NpuError
from .execution import ExecutionOps, ExecutionRun
from .jobs import JobRecord
from .model import LoadedModel, ModelRun, ModelSource, Outputs, Report
from .protocol import Device
from .session import ClientOps, Context

_RECOVER = "open a new session (npu.connect_async) and load models again"


class AsyncBuffer(BufferOps):
    """A buffer object, for trio code (see npu.Buffer): data moves through the mapping when the
    daemon is local, through messages otherwise."""

    client: "AsyncClient"
    if TYPE_CHECKING:   # the awaited methods' types (docstrings: BufferOps)
        async def map(self, dtype: Any = np.uint8, shape: tuple[int, ...] | None = None) -> np.ndarray[Any, Any]: ...
        async def write(self, data: Any, offset: int = 0) -> None: ...
        async def read(self, nbytes: int | None = None, offset: int = 0) -> memoryview: ...
        async def read_into(self, out: Any, offset: int = 0) -> None: ...
        async def free(self) -> None: ...
    else:
        map = awaitable(BufferOps.map)
        write = awaitable(BufferOps.write)
        read = awaitable(BufferOps.read)
        read_into = awaitable(BufferOps.read_into)
        free = awaitable(BufferOps.free)


class AsyncJob(JobRecord):
    """A submitted command stream (or an imported fence), for trio code (see npu.Job)."""

    client: "AsyncClient"
    if TYPE_CHECKING:   # the awaited methods' types (docstrings: JobRecord)
        async def wait(self, timeout: float | None = None) -> Self: ...
        async def cancel(self) -> str: ...
        async def export_fence(self) -> str: ...
    else:
        wait = awaitable(JobRecord.wait)
        cancel = awaitable(JobRecord.cancel)
        export_fence = awaitable(JobRecord.export_fence)


class AsyncModelJob(ModelRun, AsyncJob):
    """One run of a model: ``await wait()``, then ``await result()`` (outputs) and ``stats``."""

    if TYPE_CHECKING:
        async def result(self, timeout: float | None = None) -> Outputs: ...
    else:
        result = awaitable(ModelRun.result)


class AsyncModel(LoadedModel):
    """A model loaded on a device for this session, for trio code (see npu.Model)."""

    client: "AsyncClient"
    _job_class = AsyncModelJob
    if TYPE_CHECKING:   # the awaited methods' types (docstrings: LoadedModel)
        async def run(self, feeds: Any, timeout: float | None = None) -> Outputs: ...
        async def submit(self, feeds: Any, *, context: Any = None, after: Sequence[Any] = (),
                         deadline: float | None = None, timeout: float | None = None) -> AsyncModelJob: ...
        async def execution(self, context: Any = None, *, input_shapes: dict[str, Sequence[int]] | None = None,
                            after: Sequence[Any] = (), deadline: float | None = None,
                            timeout: float | None = None) -> AsyncExecution: ...
        async def specialise(self, input_shapes: dict[str, Sequence[int]]) -> AsyncModel: ...
        async def report(self) -> Report: ...
        async def unload(self) -> None: ...
    else:
        run = awaitable(LoadedModel.run)
        submit = awaitable(LoadedModel.submit)
        execution = awaitable(LoadedModel.execution)
        specialise = awaitable(LoadedModel.specialise)
        report = awaitable(LoadedModel.report)
        unload = awaitable(LoadedModel.unload)


class AsyncExecutionJob(ExecutionRun, AsyncModelJob):
    """One run of an AsyncExecution; its result is the execution's output views."""


class AsyncExecution(ExecutionOps):
    """A reusable execution for trio code (see npu.Execution): ``await model.execution()``."""

    _job_class = AsyncExecutionJob
    if TYPE_CHECKING:   # the awaited methods' types (docstrings: ExecutionOps)
        async def run(self, feeds: Any = None, timeout: float | None = None) -> Outputs: ...
        async def submit(self, feeds: Any = None) -> AsyncExecutionJob: ...
        async def rebind(self, name: str, buffer: BufferOps) -> None: ...
        async def close(self) -> None: ...
    else:
        run = awaitable(ExecutionOps.run)
        submit = awaitable(ExecutionOps.submit)
        rebind = awaitable(ExecutionOps.rebind)
        close = awaitable(ExecutionOps.close)

    async def __aenter__(self) -> "AsyncExecution":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncClient(ClientOps):
    """A session with npud for trio code.  Create it with ``npu.connect_async``."""

    _buffer_class = AsyncBuffer
    _model_class = AsyncModel
    _job_class = AsyncJob
    _execution_class = AsyncExecution

    def __init__(self, endpoint: str, sock: zmq.Socket, timeout: float, map_io: bool = True):
        self.endpoint = endpoint
        self.timeout = timeout
        self.map_io = map_io
        self._core = Core(endpoint, _RECOVER)
        self._init_ops()
        self._sock = sock
        self._owned = OwnedSocket(sock, self._on_frames)
        self._waiting: dict[int, trio.Event] = {}   # by seq: its reply (or, for map, its fd) came
        self._attach: trio.socket.SocketType | None = None
        self.session = ""
        self.daemon_version = ""

    # --- the transport: operations (core.py) run here ------------------------------------

    async def _run(self, operation: Operation) -> Any:
        """Run an operation to its end (see ``Client._run``).  Once the caller is cancelled, the
        operation's remaining calls (its clean-up: freeing a run's buffers, say) are shielded."""
        value, failure, shielded = None, None, False
        while True:
            try:
                call = operation.send(value) if failure is None else operation.throw(failure)
            except StopIteration as stop:
                return stop.value
            try:
                if shielded:
                    with trio.CancelScope(shield=True):
                        value = await self._call(call)
                else:
                    value = await self._call(call)
                failure = None
            except BaseException as exc:
                value, failure = None, exc
                shielded = shielded or not isinstance(exc, Exception)   # trio.Cancelled, KeyboardInterrupt

    async def _call(self, call: Call) -> Any:
        """Send one request and wait for its reply (and its fd, for ``map``)."""
        timeout = self.timeout if call.timeout is None else call.timeout
        core = self._core
        seq, frame = core.start(call)
        try:
            await self._wait(seq, core.answered, lambda: self._owned.send([frame]), timeout)
            if not core.answered(seq):
                raise core.give_up(seq, call.op, timeout)
            result = core.finish(seq)
            if not call.fd:
                return result
            await self._wait(seq, core.has_fd, None, timeout)
            if not core.has_fd(seq):
                raise core.give_up(seq, call.op, timeout)
            return core.take_fd(seq)
        except BaseException:
            core.abandon(seq)
            raise

    async def _wait(self, seq: int, ready, send, timeout: float) -> None:
        """Until ``ready(seq)``, the session's loss or ``timeout``; ``send()`` first, if given.
        (A map's reply and fd each wake its waiter: whichever came, the other may still be due.)"""
        try:
            with trio.move_on_after(timeout):
                while not ready(seq) and self._core.lost is None:
                    event = self._waiting[seq] = trio.Event()
                    if send is not None:
                        send()
                        send = None
                    await event.wait()
        finally:
            self._waiting.pop(seq, None)

    def _on_frames(self, frames: list) -> None:
        seq = self._core.feed(frames[0])
        if seq is not None and seq in self._waiting:
            self._waiting[seq].set()

    def _on_monitor(self, frames: list) -> None:
        """A session without a companion socket ends with its connection (a new one would be a
        new session): the socket monitor says when."""
        if parse_monitor_message(frames)["event"] == zmq.EVENT_DISCONNECTED:
            self._lost("the connection closed")

    def _lost(self, how: str) -> None:
        self._core.session_lost(how)
        for event in self._waiting.values():
            event.set()

    async def _read_companion(self) -> None:
        """Own the companion socket: file each fd under its tag; its end is the session's."""
        while self._core.lost is None:
            try:
                data, ancdata, _flags, _addr = await self._attach.recvmsg(4096, protocol.FD_SPACE)
            except OSError as exc:
                self._lost(f"its companion socket failed: {exc}")
                return
            try:
                tag = self._core.feed_fd(data, protocol.fds_of(ancdata))
            except NpuError as exc:
                self._lost(f"the companion socket broke the protocol: {exc.message}")
                return
            if tag is not None and tag in self._waiting:
                self._waiting[tag].set()
        self._lost("its companion socket closed")

    async def _request(self, op: str, args: dict, *, timeout: float | None = None) -> dict:
        """Any request; its result (tools and tests use ops the API does not wrap)."""
        return await self._run(self._request_op(op, args, timeout))

    # --- the API (session.py) ---------------------------------------------------------------

    if TYPE_CHECKING:   # the awaited methods' types (docstrings: session.py)
        async def ping(self) -> None: ...
        async def version(self) -> dict[str, Any]: ...
        async def devices(self) -> list[Device]: ...
        async def status(self) -> dict[str, Any]: ...
        async def clients(self) -> list[dict[str, Any]]: ...
        async def alloc(self, nbytes: int, device: int = 0) -> AsyncBuffer: ...
        async def load(self, model: ModelSource, device: int = 0, *, model_digest: bytes | None = None,
                       **options: Any) -> AsyncModel: ...
        async def check(self, model: ModelSource, device: int = 0) -> list[dict[str, Any]]: ...
        async def submit(self, stream: bytes, bindings: list[tuple[AsyncBuffer, int, bool]], device: int = 0,
                         **options: Any) -> AsyncJob: ...
        async def context(self, priority: str = "normal", weight: int = 1) -> Context: ...
        async def import_fence(self, token: str) -> AsyncJob: ...
        async def inject_fault(self, kind: str, device: int = 0, *, slow_ms: int = 0, count: int = 1) -> None: ...
    else:
        ping = awaitable(ClientOps.ping)
        version = awaitable(ClientOps.version)
        devices = awaitable(ClientOps.devices)
        status = awaitable(ClientOps.status)
        clients = awaitable(ClientOps.clients)
        alloc = awaitable(ClientOps.alloc)
        load = awaitable(ClientOps.load)
        check = awaitable(ClientOps.check)
        submit = awaitable(ClientOps.submit)
        context = awaitable(ClientOps.context)
        import_fence = awaitable(ClientOps.import_fence)
        inject_fault = awaitable(ClientOps.inject_fault)


@asynccontextmanager
async def connect_async(endpoint: str | None = None, *, name: str | None = None,
                        timeout: float = DEFAULT_TIMEOUT_S, map_io: bool = True,
                        curve: tuple[bytes, bytes, bytes] | None = None) -> AsyncIterator[AsyncClient]:
    """``async with npu.connect_async() as client:`` -- a session for trio code.

    ``curve=(client_public, client_secret, server_public)``: as for ``npu.connect``; a refused
    key raises PermissionDenied (EPERM).
    """
    given, endpoint = endpoint, resolve(endpoint)
    protocol.check_reachable(endpoint, searched(given))
    tcp = not endpoint.startswith("ipc://")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
    monitor = None
    try:
        if curve is not None:
            protocol.set_curve(sock, curve)
        if tcp:
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        monitor = sock.get_monitor_socket(protocol.HANDSHAKE_EVENTS | zmq.EVENT_DISCONNECTED)
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
            hello = await _hello(client, name, monitor if tcp else None, curve is not None)
            protocol.check_hello(hello)
            client.session, client.limits = hello["session"], hello["limits"]
            client.daemon_version = hello["daemon_version"]
            if hello["attach_path"]:
                client._attach = await _attach(hello["attach_path"], client.session, hello["attach_token"])
                nursery.start_soon(client._read_companion)
                sock.disable_monitor()   # the companion socket's end tells of the session's
                monitor.close(linger=0)
                monitor = None
            else:
                nursery.start_soon(OwnedSocket(monitor, client._on_monitor).run)
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await client._request("bye", {})
                    except NpuError:
                        pass
                client._core.close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The socket's task does not raise, so a single exception is the caller's own (from the
        # body of ``async with``, or hello): give it back as raised, not wrapped in a group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        client._core.close()
        if monitor is not None:
            monitor.close(linger=0)
        sock.close()
        if client._attach is not None:
            client._attach.close()


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
    """The companion socket, attached to ``session``; a full listen backlog is waited out."""
    retries = protocol.attach_retries(time.monotonic() + protocol.HELLO_TIMEOUT_S)
    while True:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with trio.fail_after(protocol.HELLO_TIMEOUT_S):
                await sock.connect(path)
                await sock.send(protocol.codec.pack({"session": session, "token": token}))
                protocol.attach_reply(await sock.recv(4096))
            return sock
        except BlockingIOError as exc:   # EAGAIN: the backlog is full for now
            sock.close()
            delay = next(retries, None)
            if delay is None:
                raise protocol.attach_refused(path, exc) from None
            await trio.sleep(delay)
        except (OSError, trio.TooSlowError) as exc:
            sock.close()
            raise protocol.attach_refused(path, exc) from None
        except BaseException:
            sock.close()
            raise
