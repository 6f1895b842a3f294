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
from .errors import NpuError, error
from .model import Model, model_bytes
from .protocol import Device

DEFAULT_TIMEOUT_S = 30.0


class Client:
    """A session with npud.  Use as a context manager, or call ``close()``."""

    def __init__(self, endpoint: str | None = None, *, name: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, map_io: bool = True):
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
        protocol.check_reachable(self.endpoint)
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
        self._rcvtimeo = -1
        self._sock.connect(self.endpoint)
        try:
            hello = self._request("hello", protocol.hello_args(name or _program_name()),
                                  timeout=protocol.HELLO_TIMEOUT_S, unreachable=True)
            protocol.check_hello(hello)
            self.session = hello["session"]
            self.limits = hello["limits"]
            self.daemon_version = hello["daemon_version"]
            if hello["attach_path"]:
                self._attach = _attach(hello["attach_path"], self.session, hello["attach_token"])
        except BaseException:
            self._sock.close()
            raise

    # --- plumbing --------------------------------------------------------------------

    def _request(self, op: str, args: dict, *, timeout: float | None = None,
                 unreachable: bool = False) -> dict:
        return self._await(op, self._send(op, args), timeout=timeout, unreachable=unreachable)

    def _send(self, op: str, args: dict) -> int:
        if self._closed:
            raise error(ErrorCode.ENOTCONN, "this client is closed")
        if self._daemon_stopping:  # the daemon said it is stopping: fail fast once it is gone
            protocol.check_reachable(self.endpoint)
        seq = next(self._seq)
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
            return protocol.result_or_raise(reply)

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
        return Model(self, device, self._with_model("load", model, {"device": device, "options": options}))

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

    def submit(self, stream: bytes, bindings: list[tuple[Buffer, int, bool]], device: int = 0) -> "Job":
        """Run a command stream with ``(buffer, va, writable)`` bindings; returns at once."""
        args = {"device": device, "stream": bytes(stream),
                "bindings": [{"handle": b.handle, "va": va, "writable": w} for b, va, w in bindings]}
        return Job(self, self._request("submit", args)["job"])

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


class Job:
    """A submitted command stream."""

    def __init__(self, client: Client, job_id: int):
        self.client = client
        self.id = job_id
        self.state = "queued"
        self.stats: dict[str, Any] = {}

    def wait(self, timeout: float | None = None) -> "Job":
        """Block until the job finishes; raises the job's error if it failed, Timeout if not done."""
        timeout = self.client.timeout if timeout is None else timeout
        result = self.client._request("wait", {"job": self.id, "timeout_ms": int(timeout * 1000)},
                                      timeout=timeout + self.client.timeout)
        self.state, self.stats = result["state"], result["stats"]
        if "error" in result:
            err = result["error"]
            raise error(err["code"], err["message"], err["retryable"])
        return self


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
    """Open a session with the daemon at ``endpoint`` (default: see ipc_schema.endpoint)."""
    return Client(endpoint, **kwargs)
