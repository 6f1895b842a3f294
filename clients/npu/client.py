"""The synchronous client: ``npu.connect()``.

One ZeroMQ DEALER socket and, for local daemons, the companion Unix socket
(fd passing and liveness).  A ``Client`` belongs to the thread that uses it,
like the socket under it; use ``npu.connect_async`` from trio code.
"""

from __future__ import annotations

import itertools
import mmap
import os
import socket
import sys
import time
from typing import Any

import zmq

from ipc_schema.endpoint import resolve
from ipc_schema.errors import ErrorCode
from ipc_schema.schema import HARD_FRAME_LIMIT

from . import protocol
from .buffer import Buffer
from .errors import NotFound, NpuError, error
from .jobs import Job
from .model import Model, ModelDigests, model_bytes
from .protocol import Device

DEFAULT_TIMEOUT_S = 30.0


class Client:
    """A session with npud.  Use as a context manager, or call ``close()``."""

    def __init__(self, endpoint: str | None = None, *, name: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, map_io: bool = True, curve: tuple | None = None):
        self._init_args = {k: v for k, v in locals().items() if k not in ("self", "endpoint")}  # reconnect()
        self.endpoint = resolve(endpoint)
        self.timeout = timeout
        self._seq = itertools.count(1)
        self._closed = False
        self._fd_backlog: dict[int, tuple[dict, int]] = {}
        self._attach: socket.socket | None = None
        self._on_close: list = []
        self._daemon_stopping = False
        self.limits: dict[str, int] = {}
        self.map_io = map_io
        self._digests = ModelDigests()
        protocol.check_reachable(self.endpoint)
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
        self._rcvtimeo = -1
        monitor = None
        try:
            if curve is not None:
                protocol.set_curve(self._sock, curve)
            if not self.endpoint.startswith("ipc://"):  # tcp: learn of a refused handshake at once
                monitor = self._sock.get_monitor_socket(protocol.HANDSHAKE_EVENTS)
            self._sock.connect(self.endpoint)
            seq = self._send("hello", protocol.hello_args(name or _program_name()))
            if monitor is not None:
                protocol.wait_handshake(monitor, self.endpoint, curve is not None, protocol.HELLO_TIMEOUT_S)
            hello = self._await("hello", seq, timeout=protocol.HELLO_TIMEOUT_S, unreachable=True)
            protocol.check_hello(hello)
            self.session = hello["session"]
            self.limits = hello["limits"]
            self.daemon_version = hello["daemon_version"]
            if hello["attach_path"]:
                self._attach = _attach(hello["attach_path"], self.session, hello["attach_token"])
        except BaseException:
            if monitor is not None:
                monitor.close(linger=0)
            self._sock.close()
            raise
        if monitor is not None:
            self._sock.disable_monitor()
            monitor.close(linger=0)

    def reconnect(self) -> None:
        """Open a new session (after the daemon restarted, or the session was closed).

        Everything the old session held is gone: buffers, models, jobs, contexts.
        Load models again -- the daemon's compile cache makes that fast.
        """
        if not self._closed:
            try:
                self._request("bye", {}, timeout=0.5)
            except NpuError:
                pass
            self._sock.close()
            if self._attach is not None:
                self._attach.close()
            for _message, fd in self._fd_backlog.values():
                os.close(fd)
        on_close, daemon = self._on_close, getattr(self, "daemon", None)
        Client.__init__(self, self.endpoint, **self._init_args)
        self._on_close = on_close
        if daemon is not None:
            self.daemon = daemon

    # --- plumbing --------------------------------------------------------------------

    def _request(self, op: str, args: dict, *, timeout: float | None = None,
                 unreachable: bool = False) -> dict:
        return self._await(op, self._send(op, args), timeout=timeout, unreachable=unreachable)

    def _send(self, op: str, args: dict, frame=None) -> int:
        """Send a request; ``frame(seq) -> bytes``, if given, is its pre-encoded form (Execution)."""
        if self._closed:
            raise error(ErrorCode.ENOTCONN, "this client is closed")
        if self._daemon_stopping:  # the daemon said it is stopping: fail fast once it is gone
            protocol.check_reachable(self.endpoint)
        seq = next(self._seq)
        if frame is not None:
            self._sock.send(frame(seq), copy=False)
            return seq
        limit = self.limits["max_message_bytes"] if self.limits else protocol.MAX_MESSAGE_BYTES
        self._sock.send(protocol.encode(op, seq, args, limit), copy=False)
        return seq

    def _await(self, op: str, seq: int, *, timeout: float | None = None,
               unreachable: bool = False) -> dict:
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            # A blocking recv with RCVTIMEO costs one syscall less than poll + recv;
            # the option is only touched when the timeout changes.
            remaining_ms = max(int((deadline - time.monotonic()) * 1000), 0)
            if self._daemon_stopping:  # poll: the daemon may be gone for good
                remaining_ms = min(remaining_ms, 250)
            if abs(remaining_ms - self._rcvtimeo) > 100:
                self._rcvtimeo = remaining_ms
                self._sock.setsockopt(zmq.RCVTIMEO, remaining_ms)
            try:
                frame = self._sock.recv(copy=True)
            except zmq.Again:
                if self._daemon_stopping:
                    protocol.check_reachable(self.endpoint)  # ECONNREFUSED naming the endpoint
                if time.monotonic() < deadline:
                    continue
                if unreachable:
                    raise protocol.not_running(self.endpoint, " (no answer to hello)") from None
                raise error(ErrorCode.ETIMEDOUT, f"no reply to {op} within {timeout:.1f} s") from None
            reply = protocol.decode(frame, op)
            if isinstance(reply, tuple):  # an event
                if reply[0] == "shutdown":
                    self._daemon_stopping = True
                continue
            if reply.seq != seq:
                continue  # the late reply to a request that timed out earlier
            return protocol.result_or_raise(reply, op, self.endpoint)

    def _map(self, handle: int) -> mmap.mmap:
        seq = self._send("map", {"handle": handle})
        self._await("map", seq)
        message, fd = self._receive_fd(seq)
        return protocol.map_fd(fd, message["size"])

    def _receive_fd(self, tag: int) -> tuple[dict, int]:
        if tag in self._fd_backlog:
            return self._fd_backlog.pop(tag)
        while True:
            message, fd = protocol.recv_fd_packet(self._attach)
            if message["tag"] == tag:
                return message, fd
            self._fd_backlog[message["tag"]] = (message, fd)

    @property
    def attached(self) -> bool:
        """Whether buffers can be mapped (the daemon is local and the companion socket is up)."""
        return self._attach is not None

    # --- the API -----------------------------------------------------------------------

    def ping(self) -> None:
        self._request("ping", {})

    def version(self) -> dict[str, Any]:
        """``{"daemon_version": str, "protocol": [major, minor]}``."""
        return self._request("version", {})

    def devices(self) -> list[Device]:
        return [Device.from_wire(d) for d in self._request("devices", {})["devices"]]

    def status(self) -> dict[str, Any]:
        return self._request("status", {})

    def clients(self) -> list[dict[str, Any]]:
        return self._request("clients", {})["clients"]

    def alloc(self, nbytes: int, device: int = 0) -> Buffer:
        """A zero-filled buffer of ``nbytes`` bytes on ``device``."""
        result = self._request("alloc", {"device": device, "size": nbytes})
        return Buffer(self, result["handle"], result["size"], device)

    def load(self, model: Any, device: int = 0, **options) -> "Model":
        """Compile (or fetch from the daemon's compile cache) and load an ONNX model.

        ``model`` is a path, bytes or an ``onnx.ModelProto``.  Options:
        ``input_shapes={name: shape}`` for symbolic dimensions, ``name``.
        """
        args = {"device": device, "options": options}
        file = self._digests.lookup(model)
        if file.digest is not None:
            try:  # the daemon may still hold it compiled: then the bytes need not travel at all
                return Model(self, device, self._request("load", {**args, "model_digest": file.digest}))
            except NotFound:
                self._digests.forget(file)
        info = self._with_model("load", model, args)
        self._digests.remember(file, info)
        return Model(self, device, info)

    def check(self, model: Any, device: int = 0) -> list[dict[str, str]]:
        """Every reason the model cannot compile for the device: [{node, op, reason}], empty if none."""
        return self._with_model("check", model, {"device": device})["problems"]

    def _with_model(self, op: str, model: Any, args: dict[str, Any]) -> dict[str, Any]:
        data = model_bytes(model)
        if len(data) <= self.limits["max_inline_bytes"]:
            return self._request(op, {**args, "model": data})
        staging = self.alloc(len(data), args["device"])  # too big for a message: hand it over in a buffer
        try:
            staging.write(data)
            return self._request(op, {**args, "model_buffer": staging.handle, "model_size": len(data)})
        finally:
            staging.free()

    def submit(self, stream: bytes, bindings: list[tuple[Buffer, int, bool]], device: int = 0,
               **options) -> "Job":
        """Run a command stream with ``(buffer, va, writable)`` bindings; returns at once.

        Options (as for ``Model.submit``): ``context``, ``after``, ``deadline``, ``timeout``.
        """
        args = {"device": device, "stream": bytes(stream),
                "bindings": [{"handle": b.handle, "va": va, "writable": w} for b, va, w in bindings],
                **job_options(**options)}
        result = self._request("submit", args)
        return Job(self, result["job"], result.get("context", 0), result.get("point", 0))

    def context(self, priority: str = "normal", weight: int = 1) -> "Context":
        """A new context: jobs submitted with ``context=`` it run at its priority and fair-share weight.

        Priorities: low, normal, high, realtime (realtime only where the daemon's policy allows).
        """
        result = self._request("context_create", {"priority": priority, "weight": weight})
        return Context(self, result["context"], result["priority"], result["weight"])

    def import_fence(self, token: str) -> "Job":
        """Another client's exported fence (``job.export_fence()``) as a job to wait for or name in ``after``."""
        result = self._request("fence_import", {"token": token})
        job = Job(self, result["job"])
        job.state = result["state"] if result["state"] in ("queued", "running") else "queued"
        return job

    def inject_fault(self, kind: str, device: int = 0, *, slow_ms: int = 0, count: int = 1) -> None:
        """Test mode only (``npud --test-mode``): make this session's next job(s) hang, crash the
        device process, or run slowly (``slow_ms`` per layer); ``slow_compile``: its next compile(s)
        sleep ``slow_ms`` in the compiler worker first."""
        self._request("inject_fault", {"device": device, "kind": kind, "slow_ms": slow_ms, "count": count})

    def close(self) -> None:
        """End the session (its buffers are freed) and close the sockets."""
        if self._closed:
            return
        try:
            self._request("bye", {}, timeout=2.0)
        except NpuError:
            pass  # the daemon is gone or already forgot us: nothing left to free
        finally:
            self._closed = True
            self._sock.close()
            if self._attach is not None:
                self._attach.close()
            for _message, fd in self._fd_backlog.values():
                os.close(fd)
            for callback in self._on_close:
                callback()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Context:
    """A context of this client's session: a priority and a fair-share weight for the jobs run in it."""

    def __init__(self, client: Client, context_id: int, priority: str, weight: int):
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


def _attach(path: str, session: str, token: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(protocol.HELLO_TIMEOUT_S)
        sock.connect(path)
        sock.send(protocol.codec.pack({"session": session, "token": token}))
        protocol.attach_reply(sock.recv(4096))
        sock.settimeout(None)
    except OSError as exc:
        sock.close()
        raise error(ErrorCode.ENOTCONN, f"cannot attach the companion socket {path}: {exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _program_name() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def connect(endpoint: str | None = None, **kwargs) -> Client:
    """Open a session with the daemon at ``endpoint`` (default: see ipc_schema.endpoint).

    Over tcp, npud accepts CURVE only: pass ``curve=(client_public, client_secret,
    server_public)`` (Z85 keys) or ``curve=npu.curve_keys(client_secret_file,
    server_public_file)``; a refused key raises PermissionDenied (EPERM).
    """
    return Client(endpoint, **kwargs)


def curve_keys(client_secret_file: str, server_public_file: str) -> tuple[bytes, bytes, bytes]:
    """``(client_public, client_secret, server_public)`` from zmq.auth certificate files
    (``npud --generate-keys DIR --key-name NAME`` writes them)."""
    import zmq.auth

    client_public, client_secret = zmq.auth.load_certificate(client_secret_file)
    server_public, _ = zmq.auth.load_certificate(server_public_file)
    if not client_secret:
        raise error(ErrorCode.EINVAL, f"{client_secret_file} holds no secret key (use the .key_secret file)")
    return client_public, client_secret, server_public
