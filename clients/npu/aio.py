"""The trio client: ``npu.connect_async()``.

    async with npu.connect_async() as client:
        buf = await client.alloc(1 << 20)
        view = await buf.map(np.float32)

Any number of tasks may issue requests concurrently; one background task owns
the DEALER socket (see ipc_schema.trio_zmq) and routes each reply to the task
waiting for its seq.
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

from ipc_schema.endpoint import resolve
from ipc_schema.errors import ErrorCode
from ipc_schema.schema import HARD_FRAME_LIMIT
from ipc_schema.trio_zmq import OwnedSocket

from . import protocol
from .client import DEFAULT_TIMEOUT_S, _program_name
from .errors import NpuError, error
from .protocol import Device, as_bytes


class AsyncClient:
    """A session with npud for trio code.  Create it with ``npu.connect_async``."""

    def __init__(self, endpoint: str, sock: zmq.Socket, timeout: float):
        self.endpoint = endpoint
        self.timeout = timeout
        self._sock = sock
        self._owned = OwnedSocket(sock, self._on_frames)
        self._seq = itertools.count(1)
        self._waiting: dict[int, tuple[trio.Event, list]] = {}
        self._attach: trio.socket.SocketType | None = None
        self._fd_lock = trio.Lock()
        self._fd_backlog: dict[int, tuple[dict, int]] = {}
        self.limits: dict[str, int] = {}
        self.session = ""
        self.closed = False

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
        return protocol.result_or_raise(reply)

    # --- the API (mirrors npu.Client) ------------------------------------------------

    async def ping(self) -> None:
        await self._request("ping", {})

    async def version(self) -> dict[str, Any]:
        return await self._request("version", {})

    async def devices(self) -> list[Device]:
        return [Device.from_wire(d) for d in (await self._request("devices", {}))["devices"]]

    async def status(self) -> dict[str, Any]:
        return await self._request("status", {})

    async def alloc(self, nbytes: int, device: int = 0) -> "AsyncBuffer":
        result = await self._request("alloc", {"device": device, "size": nbytes})
        return AsyncBuffer(self, result["handle"], result["size"], device)

    async def submit(self, stream: bytes, bindings, device: int = 0) -> int:
        args = {"device": device, "stream": bytes(stream),
                "bindings": [{"handle": b.handle, "va": va, "writable": w} for b, va, w in bindings]}
        return (await self._request("submit", args))["job"]

    async def wait(self, job: int, timeout: float | None = None) -> dict[str, Any]:
        """Wait for a job; returns its stats, raises its error if it failed."""
        timeout = self.timeout if timeout is None else timeout
        result = await self._request("wait", {"job": job, "timeout_ms": int(timeout * 1000)},
                                     timeout=timeout + self.timeout)
        if "error" in result:
            err = result["error"]
            raise error(err["code"], err["message"], err["retryable"])
        return result["stats"]

    async def _map(self, handle: int) -> mmap.mmap:
        if self._attach is None:
            raise error(ErrorCode.ENOTCONN, "map needs a local daemon with the companion socket")
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
    """A buffer object, for trio code (see npu.Buffer)."""

    def __init__(self, client: AsyncClient, handle: int, size: int, device: int):
        self.client, self.handle, self.size, self.device = client, handle, size, device
        self._mm: mmap.mmap | None = None

    async def map(self, dtype: Any = np.uint8, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if self._mm is None:
            self._mm = await self.client._map(self.handle)
        array = np.frombuffer(self._mm, dtype=np.uint8, count=self.size).view(dtype)
        return array.reshape(shape) if shape is not None else array

    async def write(self, data: Any, offset: int = 0) -> None:
        view = as_bytes(data)
        chunk = self.client.limits["max_inline_bytes"]
        for start in range(0, view.nbytes, chunk) or [0]:
            await self.client._request("write", {"handle": self.handle, "offset": offset + start,
                                                 "data": bytes(view[start:start + chunk])})

    async def read(self, nbytes: int | None = None, offset: int = 0) -> bytes:
        nbytes = self.size - offset if nbytes is None else nbytes
        chunk = self.client.limits["max_inline_bytes"]
        parts = [(await self.client._request("read", {
            "handle": self.handle, "offset": offset + start, "size": min(chunk, nbytes - start)}))["data"]
            for start in range(0, nbytes, chunk)]
        return b"".join(parts)

    async def free(self) -> None:
        await self.client._request("free", {"handle": self.handle})
        self._mm = None


@asynccontextmanager
async def connect_async(endpoint: str | None = None, *, name: str | None = None,
                        timeout: float = DEFAULT_TIMEOUT_S, curve: tuple | None = None):
    """``async with npu.connect_async() as client:`` — a session for trio code.

    ``curve=(client_public, client_secret, server_public)``: as for ``npu.connect``
    (a refused key shows as no answer to hello here).
    """
    endpoint = resolve(endpoint)
    protocol.check_reachable(endpoint)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
    if curve is not None:
        try:
            protocol.set_curve(sock, curve)
        except BaseException:
            sock.close()
            raise
    sock.connect(endpoint)
    client = AsyncClient(endpoint, sock, timeout)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._owned.run)
            try:
                hello = await client._request("hello", protocol.hello_args(name or _program_name()),
                                              timeout=protocol.HELLO_TIMEOUT_S)
            except NpuError as exc:
                if exc.code == "ETIMEDOUT":
                    raise protocol.not_running(endpoint, " (no answer to hello)") from None
                raise
            protocol.check_hello(hello)
            client.session, client.limits = hello["session"], hello["limits"]
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
    finally:
        sock.close()
        if client._attach is not None:
            client._attach.close()
        for _message, fd in client._fd_backlog.values():
            os.close(fd)


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
