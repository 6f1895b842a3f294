"""What the sync and async clients share: building requests, reading replies,
the companion socket's packets, and mapping memfds.  No I/O of its own."""

from __future__ import annotations

import mmap
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from npud.ipc_schema import codec
from npud.ipc_schema.endpoint import ipc_path
from npud.ipc_schema.errors import ErrorCode, RequestError
from npud.ipc_schema.schema import ATTACH_REPLY, FD_MESSAGE, MAX_MESSAGE_BYTES, PROTOCOL_VERSION
from npud.ipc_schema.types import FieldError

from .errors import NpuError, error, from_info

HELLO_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Device:
    """A device as the daemon describes it; ``params`` holds the architecture parameters."""

    index: int
    name: str
    preset: str
    state: str
    params: dict[str, Any]
    memory_total: int
    memory_used: int
    info: dict[str, Any]

    @classmethod
    def from_wire(cls, d: dict) -> "Device":
        return cls(d["index"], d["name"], d["preset"], d["state"], d["params"], d["memory_total"],
                   d["memory_used"], d)

    @property
    def driver(self) -> str:
        """The driver that runs it (npuctl devices' DRIVER column; daemons before protocol 1.6: npu-emu)."""
        return str(self.info.get("driver", "npu-emu"))

    def __getattr__(self, name: str) -> Any:
        # Parameters read as attributes too: device.cores, device.sram_bytes, ...
        try:
            return self.__dict__["params"][name]
        except KeyError:
            raise AttributeError(name) from None


def not_running(endpoint: str, detail: str = "") -> NpuError:
    return error(ErrorCode.ECONNREFUSED,
                 f"npud is not running at {endpoint}{detail}; start it with `npud --endpoint {endpoint}` "
                 "(or `systemctl start npud`), or set NPUD_ENDPOINT")


def check_reachable(endpoint: str, searched: str = "") -> None:
    """Fail fast, with a useful message, when nothing listens at an ipc endpoint: no socket file
    (the message adds ``searched``: where the default search looked), or one left behind by a
    daemon that was killed (connecting to it is refused)."""
    path = ipc_path(endpoint)
    if path is None:
        return
    if not os.path.exists(path):
        raise not_running(endpoint, searched)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        raise not_running(endpoint, " (its socket file is left from a daemon that exited)") from None
    except OSError:
        pass   # EAGAIN (a full backlog) and the like: something listens, hello will tell the rest
    finally:
        probe.close()


# The companion socket's listen backlog may be full for a moment (many clients connecting at
# once): connecting then fails with EAGAIN, and is retried after these pauses.
ATTACH_FIRST_RETRY_S = 0.001
ATTACH_MAX_RETRY_S = 0.1


def attach_retries(deadline: float):
    """The pauses before each retry of a companion-socket connect refused with EAGAIN: doubling
    from ATTACH_FIRST_RETRY_S to ATTACH_MAX_RETRY_S, until ``deadline`` (time.monotonic)."""
    delay = ATTACH_FIRST_RETRY_S
    while time.monotonic() + delay < deadline:
        yield delay
        delay = min(2 * delay, ATTACH_MAX_RETRY_S)


def attach_refused(path: str, exc: BaseException) -> NpuError:
    busy = " (its listen backlog stayed full)" if isinstance(exc, BlockingIOError) else ""
    return error(ErrorCode.ENOTCONN, f"cannot attach the companion socket {path}: {exc}{busy}")


HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def set_curve(sock: zmq.Socket, curve: tuple) -> None:
    """CURVE client keys on a socket: (client_public, client_secret, server_public), Z85."""
    try:
        client_public, client_secret, server_public = (k.encode("ascii") if isinstance(k, str) else bytes(k)
                                                       for k in curve)
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, client_public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, client_secret)
    except (TypeError, ValueError, zmq.ZMQError) as exc:
        raise error(ErrorCode.EINVAL, "curve: expected (client_public, client_secret, server_public) "
                                      f"as 40-character Z85 keys: {exc}") from None


def handshake_refusal(event: int, value: int, endpoint: str, with_curve: bool) -> NpuError | None:
    """The error for a failed ZeroMQ handshake (a socket monitor event), or None.

    A client without CURVE keys is told that the endpoint wants CURVE whichever way its
    handshake failed: libzmq reports a NULL client meeting a CURVE server as a protocol
    failure or, depending on timing, with no detail at all."""
    if event not in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                     zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
        return None
    if not with_curve or event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return error(ErrorCode.EPERM, f"the handshake with {endpoint} failed ({'CURVE' if with_curve else 'no'} "
                                      "security): npud's tcp endpoints accept CURVE clients only; pass "
                                      "curve=(client_public, client_secret, server_public)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return error(ErrorCode.EPERM, f"npud at {endpoint} refused this client's CURVE key (ZAP status "
                                      f"{value}): the key is not in its policy's [[curve_clients]]")
    return error(ErrorCode.EPERM, f"the CURVE handshake with {endpoint} failed: is the server's public "
                                  "key the right one?")


def wait_handshake(monitor: zmq.Socket, endpoint: str, with_curve: bool, timeout: float) -> None:
    """Block until the socket's handshake succeeds (return), fails (raise EPERM) or ``timeout``."""
    from zmq.utils.monitor import recv_monitor_message

    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if not monitor.poll(int(remaining * 1000) + 1):
            return
        event = recv_monitor_message(monitor)
        if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return
        refusal = handshake_refusal(event["event"], event["value"], endpoint, with_curve)
        if refusal is not None:
            raise refusal


def hello_args(name: str) -> dict:
    return {"protocol": list(PROTOCOL_VERSION), "client_name": name[:64], "pid": os.getpid()}


def check_hello(result: dict) -> None:
    try:
        codec.check_version(result["protocol"], side="the daemon")
    except RequestError as exc:
        raise from_info(exc.info) from None


def encode(op: str, seq: int, args: dict, limit: int = MAX_MESSAGE_BYTES) -> bytes:
    frame = codec.encode_request(op, seq, args)
    if len(frame) > limit:
        raise error(ErrorCode.EMSGSIZE, f"{op} request of {len(frame)} bytes exceeds the daemon's limit "
                                        f"of {limit}; use a mapped buffer for bulk data")
    return frame


def decode(frame: bytes, op: str | None):
    """A Reply or an ``(event, data)`` pair; a malformed frame raises ProtocolMismatch."""
    try:
        return codec.decode_reply(frame, op)
    except RequestError as exc:
        raise from_info(exc.info) from None


RECONNECT_HINT = "call client.reconnect() and load models again"


def result_or_raise(reply: codec.Reply, op: str, endpoint: str, recover: str = RECONNECT_HINT) -> dict:
    """The reply's result, or its error raised; a lost session says how to ``recover``."""
    if reply.error is None:
        return reply.result
    if reply.error.code == ErrorCode.ENOTCONN and op != "hello":
        raise error(ErrorCode.ENOTCONN, f"{op}: the session with npud at {endpoint} is gone (the daemon "
                                        f"restarted, or the session was closed or expired: "
                                        f"{reply.error.message}); {recover}")
    raise from_info(reply.error)


def attach_reply(packet: bytes) -> None:
    try:
        reply = ATTACH_REPLY.check(codec.unpack(packet), "attach")
    except (RequestError, FieldError) as exc:
        raise error(ErrorCode.EPROTO, f"bad companion-socket reply: {exc}") from None
    if not reply["ok"]:
        err = reply.get("error", {"code": "EPROTO", "message": "refused", "retryable": False})
        raise error(err["code"], f"companion socket refused: {err['message']}", err["retryable"])


def fd_message(packet: bytes) -> dict:
    try:
        return FD_MESSAGE.check(codec.unpack(packet), "fd")
    except (RequestError, FieldError) as exc:
        raise error(ErrorCode.EPROTO, f"bad fd packet: {exc}") from None


FD_SPACE = socket.CMSG_SPACE(4)   # ancillary room for the one fd of a companion-socket packet


def fds_of(ancdata: list) -> list[int]:
    """The file descriptors in a ``recvmsg``'s SCM_RIGHTS ancillary data."""
    return [fd for level, kind, raw in ancdata if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
            for fd in np.frombuffer(raw[: len(raw) - len(raw) % 4], dtype=np.int32).tolist()]


def map_fd(fd: int, size: int) -> mmap.mmap:
    """Map a buffer's memfd read-write, prefaulted, and close the fd."""
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def as_bytes(data: Any) -> memoryview:
    """A flat byte view of bytes, bytearray, memoryview or a (contiguous) numpy array."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data)
    return memoryview(data).cast("B")
