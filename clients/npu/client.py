"""The synchronous client: ``npu.connect()``.

One ZeroMQ DEALER socket and, for local daemons, the companion Unix socket
(fd passing and liveness).  The API's operations are written once (core.py,
session.py, buffer.py, model.py, jobs.py, execution.py); this module is the
blocking transport under them.

A ``Client`` may be shared between threads, as onnxruntime's
``InferenceSession.run`` may: a ZeroMQ socket must only ever be used by one
thread at a time, so whichever thread waits for a reply first becomes the
*pump* -- it alone sends and receives, files every reply under its sequence
number and wakes the threads waiting for theirs (a ``threading.Condition``);
other threads queue their requests for it and wake it through a pipe.  When
its own reply is in, another waiting thread takes over.

The session is known gone (``ConnectionLost``, at once, in every waiting
thread) when the companion socket reaches its end -- the kernel closes it
when the daemon dies, however it dies -- or, for a session without one (tcp),
when the connection closes (a socket monitor's ``EVENT_DISCONNECTED``; a
daemon host that vanishes without closing it is noticed by ZeroMQ heartbeats
within ``HEARTBEAT_TIMEOUT_MS``).  Use ``npu.connect_async`` from trio code.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from npud.ipc_schema.endpoint import resolve, searched
from npud.ipc_schema.errors import ErrorCode
from npud.ipc_schema.schema import HARD_FRAME_LIMIT

from . import protocol
from .buffer import Buffer
from .core import Call, Core, Operation, blocking
from .errors import NpuError, error
from .execution import Execution
from .jobs import Job
from .model import Model, ModelSource
from .protocol import Device
from .session import ClientOps, Context, job_options  # noqa: F401  (Context, job_options: public here)

DEFAULT_TIMEOUT_S = 30.0
# tcp: a daemon host that vanishes without closing the connection is noticed after this long
# without traffic (ZeroMQ heartbeats every HEARTBEAT_IVL_MS keep an idle session's connection checked).
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000
# Plain ints: pyzmq's flag enums cost microseconds per operation on the hot path.
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
# After the companion socket's end, replies the daemon sent just before it died are still taken.
LAST_REPLIES_MS = 50


class Client(ClientOps):
    """A session with npud.  Use as a context manager, or call ``close()``.  Threads may share it."""

    _buffer_class = Buffer
    _model_class = Model
    _job_class = Job
    _execution_class = Execution

    def __init__(self, endpoint: str | None = None, *, name: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, map_io: bool = True,
                 curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self._init_args = {k: v for k, v in locals().items() if k not in ("self", "endpoint")}  # reconnect()
        self.endpoint = resolve(endpoint)
        self.timeout = timeout
        self.map_io = map_io
        self._core = Core(self.endpoint, protocol.RECONNECT_HINT)
        self._init_ops()
        self._attach: socket.socket | None = None
        self._monitor: zmq.Socket | None = None
        self._on_close: list = []
        self._lock = threading.Lock()    # the session's state (and the socket, while nobody pumps)
        self._cv = threading.Condition(self._lock)
        self._sleepers = 0               # threads waiting on _cv
        self._outbox: list[bytes] = []   # frames of other threads, for the pump to send
        self._pumping = False            # a thread owns the sockets and receives for everyone
        protocol.check_reachable(self.endpoint, searched(endpoint))
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll_items = [(self._sock, _POLLIN), (self._wake_r, _POLLIN)]  # for zmq.zmq_poll
        try:
            self._hello(name, curve)
        except BaseException:
            self._close_sockets()
            raise

    def _hello(self, name: str | None, curve: tuple | None) -> None:
        """Connect, say hello, attach the companion socket; watch the connection if there is none."""
        tcp = not self.endpoint.startswith("ipc://")
        if curve is not None:
            protocol.set_curve(self._sock, curve)
        if tcp:
            self._sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self._monitor = self._sock.get_monitor_socket(protocol.HANDSHAKE_EVENTS | zmq.EVENT_DISCONNECTED)
        self._sock.connect(self.endpoint)
        with self._lock:
            seq, frame = self._core.start(Call("hello", protocol.hello_args(name or _program_name())))
            self._sock.send(frame)
        if tcp:  # learn of a refused handshake at once
            protocol.wait_handshake(self._monitor, self.endpoint, curve is not None, protocol.HELLO_TIMEOUT_S)
        try:
            hello = self._reply(seq, "hello", protocol.HELLO_TIMEOUT_S)
        except NpuError as exc:
            if exc.code == "ETIMEDOUT":
                raise protocol.not_running(self.endpoint, " (no answer to hello)") from None
            raise
        protocol.check_hello(hello)
        self.session = hello["session"]
        self.limits = hello["limits"]
        self.daemon_version = hello["daemon_version"]
        if hello["attach_path"]:
            self._attach = _attach(hello["attach_path"], self.session, hello["attach_token"])
            self._attach_fd = self._attach.fileno()
            self._poll_items.append((self._attach_fd, _POLLIN))
            self._sock.disable_monitor()   # the companion socket's end tells of the session's
            self._monitor.close(linger=0)
            self._monitor = None
        else:
            self._poll_items.append((self._monitor, _POLLIN))

    def reconnect(self) -> None:
        """Open a new session (after the daemon restarted, or the session was closed or lost).

        Everything the old session held is gone: buffers, models, jobs, contexts.
        Load models again -- the daemon's compile cache makes that fast, and a model
        file this client loaded before travels as its digest only.
        """
        if not self._core.closed:
            try:
                self._request("bye", {}, timeout=0.5)
            except NpuError:
                pass
            self._close_sockets()
        on_close, daemon, digests = self._on_close, getattr(self, "daemon", None), self._digests
        Client.__init__(self, self.endpoint, **self._init_args)
        self._on_close, self._digests = on_close, digests
        if daemon is not None:
            self.daemon = daemon

    # --- the transport: operations (core.py) run here ------------------------------------

    def _run(self, operation: Operation) -> Any:
        """Run an operation to its end: each Call it yields is sent and its result sent back in
        (or its error thrown in, so the operation can clean up)."""
        value, failure = None, None
        while True:
            try:
                call = operation.send(value) if failure is None else operation.throw(failure)
            except StopIteration as stop:
                return stop.value
            try:
                value, failure = self._call(call), None
            except BaseException as exc:   # KeyboardInterrupt too: the operation cleans up
                value, failure = None, exc

    def _call(self, call: Call) -> Any:
        """Send one request and wait for its reply (and its fd, for ``map``)."""
        timeout = self.timeout if call.timeout is None else call.timeout
        with self._lock:
            seq, frame = self._core.start(call)
            self._send_locked(frame)
        try:
            result = self._reply(seq, call.op, timeout)
            if not call.fd:
                return result
            self._wait_for(lambda: self._core.has_fd(seq), time.monotonic() + timeout)
            with self._lock:
                if not self._core.has_fd(seq):
                    raise self._core.give_up(seq, call.op, timeout)
                return self._core.take_fd(seq)
        except BaseException:
            with self._lock:
                self._core.abandon(seq)
            raise

    def _reply(self, seq: int, op: str, timeout: float) -> dict:
        self._wait_for(lambda: self._core.answered(seq), time.monotonic() + timeout)
        with self._lock:
            if not self._core.answered(seq):
                raise self._core.give_up(seq, op, timeout)
            return self._core.finish(seq)

    def _send_locked(self, frame: bytes) -> None:
        """Send now, or hand the frame to the pump (the only thread that may touch the socket then)."""
        if not self._pumping:
            self._sock.send(frame, copy=False)
            return
        self._outbox.append(frame)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the pump is awake anyway

    def _wait_for(self, ready, deadline: float) -> None:
        """Until ``ready()``, the session's loss or the deadline: pumping if no thread is."""
        with self._lock:
            while not ready() and self._core.lost is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                if self._pumping:
                    self._sleepers += 1
                    try:
                        self._cv.wait(remaining)
                    finally:
                        self._sleepers -= 1
                    continue
                self._pumping = True
                try:
                    self._lock.release()
                    try:
                        self._pump(ready, deadline)
                    finally:
                        self._lock.acquire()
                finally:
                    for frame in self._outbox:   # queued after the pump's last look
                        self._sock.send(frame, copy=False)
                    self._outbox.clear()
                    self._pumping = False
                    self._wake_sleepers()        # the next waiter becomes the pump

    def _pump(self, ready, deadline: float) -> None:
        """Own the sockets (this thread only): send what others queued, receive for everyone."""
        while True:
            with self._lock:
                if ready() or self._core.lost is not None:
                    return
                outbox, self._outbox = self._outbox, []
            for frame in outbox:
                self._sock.send(frame, copy=False)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            events = dict(zmq.zmq_poll(self._poll_items, int(remaining * 1000) + 1))
            with self._lock:
                self._take(events)
                self._wake_sleepers()

    def _wake_sleepers(self) -> None:
        if self._sleepers:   # (lock held) notify_all costs microseconds even with nobody waiting
            self._cv.notify_all()

    def _take(self, events: dict) -> None:
        """File what arrived (cv held, sockets owned): replies by seq, fds by tag, the session's end."""
        self._drain()
        if self._wake_r in events:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        if self._attach is not None and self._attach_fd in events:
            self._read_companion()
        if self._monitor is not None and self._monitor in events:
            while True:
                try:
                    event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if event["event"] == zmq.EVENT_DISCONNECTED:  # a new connection would be a new session
                    self._core.session_lost("the connection closed")
        if self._core.lost is not None and self._sock.poll(LAST_REPLIES_MS):
            self._drain()

    def _drain(self) -> None:
        sock, core = self._sock, self._core
        while sock.getsockopt(_EVENTS) & _POLLIN:
            core.feed(sock.recv(_NOBLOCK))

    def _read_companion(self) -> None:
        while self._core.lost is None:
            try:
                # (socket.recv_fds would drop the flag: Python 3.11 does not pass it on)
                data, ancdata, _flags, _addr = self._attach.recvmsg(4096, protocol.FD_SPACE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                self._core.session_lost(f"its companion socket failed: {exc}")
                return
            try:
                self._core.feed_fd(data, protocol.fds_of(ancdata))
            except NpuError as exc:
                self._core.session_lost(f"the companion socket broke the protocol: {exc.message}")
        # at its end it stays readable: stop polling it
        self._poll_items = [item for item in self._poll_items if item[0] != self._attach_fd]

    # --- plumbing kept for tools and tests ------------------------------------------------

    def _request(self, op: str, args: dict, *, timeout: float | None = None) -> dict:
        """Any request; its result (npuctl and tests use ops the API does not wrap)."""
        return self._run(self._request_op(op, args, timeout))

    def _send(self, op: str, args: dict) -> int:
        """Send a request without waiting for its reply; its seq."""
        with self._lock:
            seq, frame = self._core.start(Call(op, args))
            self._send_locked(frame)
        return seq

    @property
    def _closed(self) -> bool:
        return self._core.closed

    @_closed.setter
    def _closed(self, value: bool) -> None:
        self._core.closed = value

    # --- the API (session.py) ---------------------------------------------------------------

    if TYPE_CHECKING:   # the blocking methods' types (the operations' docstrings: session.py)
        def ping(self) -> None: ...
        def version(self) -> dict[str, Any]: ...
        def devices(self) -> list[Device]: ...
        def status(self) -> dict[str, Any]: ...
        def clients(self) -> list[dict[str, Any]]: ...
        def alloc(self, nbytes: int, device: int = 0) -> Buffer: ...
        def load(self, model: ModelSource, device: int = 0, *, model_digest: bytes | None = None,
                 **options: Any) -> Model: ...
        def check(self, model: ModelSource, device: int = 0) -> list[dict[str, Any]]: ...
        def submit(self, stream: bytes, bindings: list[tuple[Buffer, int, bool]], device: int = 0,
                   **options: Any) -> Job: ...
        def context(self, priority: str = "normal", weight: int = 1) -> Context: ...
        def import_fence(self, token: str) -> Job: ...
        def inject_fault(self, kind: str, device: int = 0, *, slow_ms: int = 0, count: int = 1) -> None: ...
    else:
        ping = blocking(ClientOps.ping)
        version = blocking(ClientOps.version)
        devices = blocking(ClientOps.devices)
        status = blocking(ClientOps.status)
        clients = blocking(ClientOps.clients)
        alloc = blocking(ClientOps.alloc)
        load = blocking(ClientOps.load)
        check = blocking(ClientOps.check)
        submit = blocking(ClientOps.submit)
        context = blocking(ClientOps.context)
        import_fence = blocking(ClientOps.import_fence)
        inject_fault = blocking(ClientOps.inject_fault)

    def close(self) -> None:
        """End the session (its buffers are freed) and close the sockets."""
        if self._core.closed:
            return
        try:
            self._request("bye", {}, timeout=2.0)
        except NpuError:
            pass  # the daemon is gone or already forgot us: nothing left to free
        finally:
            self._close_sockets()
            for callback in self._on_close:
                callback()

    def _close_sockets(self) -> None:
        self._core.close()
        self._sock.close()
        for sock in (self._attach, self._monitor):
            if sock is not None:
                sock.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _attach(path: str, session: str, token: bytes) -> socket.socket:
    """The companion socket, attached to ``session``; a full listen backlog is waited out."""
    deadline = time.monotonic() + protocol.HELLO_TIMEOUT_S
    retries = protocol.attach_retries(deadline)
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(protocol.HELLO_TIMEOUT_S)
            sock.connect(path)
            sock.send(protocol.codec.pack({"session": session, "token": token}))
            protocol.attach_reply(sock.recv(4096))
            sock.settimeout(None)
            return sock
        except BlockingIOError as exc:   # EAGAIN: the backlog is full for now
            sock.close()
            delay = next(retries, None)
            if delay is None:
                raise protocol.attach_refused(path, exc) from None
            time.sleep(delay)
        except OSError as exc:
            sock.close()
            raise protocol.attach_refused(path, exc) from None
        except BaseException:
            sock.close()
            raise


def _program_name() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def connect(endpoint: str | None = None, *, name: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
            map_io: bool = True, curve: tuple[bytes, bytes, bytes] | None = None) -> Client:
    """Open a session with the daemon at ``endpoint`` (default: see npud.ipc_schema.endpoint).

    Over tcp, npud accepts CURVE only: pass ``curve=(client_public, client_secret,
    server_public)`` (Z85 keys) or ``curve=npu.curve_keys(client_secret_file,
    server_public_file)``; a refused key raises PermissionDenied (EPERM).
    """
    return Client(endpoint, name=name, timeout=timeout, map_io=map_io, curve=curve)


def curve_keys(client_secret_file: str, server_public_file: str) -> tuple[bytes, bytes, bytes]:
    """``(client_public, client_secret, server_public)`` from zmq.auth certificate files
    (``npud --generate-keys DIR --key-name NAME`` writes them)."""
    import zmq.auth

    client_public, client_secret = zmq.auth.load_certificate(client_secret_file)
    server_public, _ = zmq.auth.load_certificate(server_public_file)
    if not client_secret:
        raise error(ErrorCode.EINVAL, f"{client_secret_file} holds no secret key (use the .key_secret file)")
    return client_public, client_secret, server_public
