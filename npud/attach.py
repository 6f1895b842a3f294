"""The companion socket: fd passing to clients, and knowing when a client is gone.

See npud/ipc_schema/schema.py (ATTACH_*) for the packets.  The client presents its
session id and secret token; the kernel tells us its uid and pid
(SO_PEERCRED), which must agree with the session's identity (the uid the ZAP
handler learned from the kernel on the ZeroMQ connection, npud/auth.py).  The connection then stays
open for the life of the session: when the client process exits, however it
exits, the kernel closes it and the session is closed at once.
"""

from __future__ import annotations

import array
import errno
import hmac
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING

import trio

from npud.ipc_schema import codec
from npud.ipc_schema.errors import ErrorCode, ErrorInfo, RequestError
from npud.ipc_schema.schema import ATTACH_HELLO, MAX_ATTACH_PACKET
from npud.ipc_schema.types import FieldError

if TYPE_CHECKING:
    from .memory import BufferObject
    from .server import Daemon
    from .sessions import Session

log = logging.getLogger("npud.attach")

HELLO_TIMEOUT_S = 5.0
ACCEPT_RETRY_S = 0.1
_RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def backlog_for(max_sessions: int) -> int:
    """A listen backlog that holds a burst of every session connecting at once (each has one
    companion connection) while npud accepts: 128 refused 21 of 150 rapid connections with
    EAGAIN.  The kernel caps it at net.core.somaxconn (4096 by default since Linux 5.4), as
    systemd's ``Backlog=`` default (SOMAXCONN) is for an inherited socket."""
    return max(socket.SOMAXCONN, max_sessions)


def listen(path: str, inherited: socket.socket | None = None, max_sessions: int = 0) -> socket.socket:
    """Bind the companion socket, or adopt the listening one socket activation passed.

    An inherited socket (``ListenSequentialPacket=`` in npud-fds.socket) is already
    bound and listening, with the mode, group and backlog its unit chose: it is used as is.
    """
    if inherited is not None:
        return inherited
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(path)
    os.chmod(path, 0o660)
    sock.listen(backlog_for(max_sessions))
    return sock


async def serve(daemon: "Daemon", listener: socket.socket) -> None:
    listener = trio.socket.from_stdlib_socket(listener)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                conn, _ = await listener.accept()
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRNOS:
                    raise
                # Out of descriptors (or memory): the client waits in the backlog, npud stays up.
                log.error("cannot accept a companion connection: %s; retrying in %.1f s", exc, ACCEPT_RETRY_S)
                await trio.sleep(ACCEPT_RETRY_S)
                continue
            nursery.start_soon(_attach, daemon, conn)


def _peer_credentials(conn) -> tuple[int, int]:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


async def _refuse(conn, error: ErrorInfo) -> None:
    try:
        await conn.send(codec.pack({"ok": False, "error": error.to_wire()}))
    except OSError:
        pass
    conn.close()


async def _attach(daemon: "Daemon", conn) -> None:
    with trio.move_on_after(HELLO_TIMEOUT_S) as timeout:
        packet = await conn.recv(MAX_ATTACH_PACKET)
    if timeout.cancelled_caught or not packet:
        conn.close()
        return
    try:
        hello = ATTACH_HELLO.check(codec.unpack(packet), "attach")
    except (RequestError, FieldError) as exc:
        await _refuse(conn, ErrorInfo.of(ErrorCode.EPROTO, f"bad attach packet: {exc}"))
        return
    session = daemon.sessions.by_id(hello["session"])
    if session is None or not hmac.compare_digest(session.token, hello["token"]):
        await _refuse(conn, ErrorInfo.of(ErrorCode.EPERM, "unknown session or wrong attach token"))
        return
    if session.attach is not None:
        await _refuse(conn, ErrorInfo.of(ErrorCode.EINVAL, "this session is already attached"))
        return
    pid, uid = _peer_credentials(conn)
    identity = session.identity
    if identity is not None and identity.kind != "ipc":
        await _refuse(conn, ErrorInfo.of(ErrorCode.EPERM, "the companion socket is for ipc sessions; "
                                         f"this session is {identity.describe()}"))
        return
    if session.uid >= 0 and uid != session.uid:
        # The ZAP handler's identity (SO_PEERCRED of the ZeroMQ connection) and this socket's
        # must agree: a token handed to another user does not carry the session over.
        await _refuse(conn, ErrorInfo.of(ErrorCode.EPERM, f"the companion socket's peer is uid {uid}, "
                                         f"but the session belongs to uid {session.uid}"))
        return
    if session.uid < 0:  # no ZAP identity (not expected): the kernel's word from this socket
        session.pid, session.uid = pid, uid
    session.attach = conn
    try:
        await conn.send(codec.pack({"ok": True}))
        with session.attach_scope:  # cancelled by close_session: this task owns conn
            # The client never speaks again; anything but EOF is ignored.
            while await conn.recv(MAX_ATTACH_PACKET):
                pass
    except OSError:
        pass
    finally:
        session.attach = None
        conn.close()
    daemon.close_session(session, "client went away (companion socket closed)")


async def send_fd(session: "Session", tag: int, handle: int, bo: "BufferObject") -> None:
    """Send a buffer's memfd to the session's client, tagged with the map request's seq."""
    packet = codec.pack({"tag": tag, "handle": handle, "size": bo.mapped_size})
    async with session.attach_lock:
        conn = session.attach
        if conn is None:
            raise RequestError(ErrorCode.ENOTCONN, "the companion socket closed")
        try:
            await conn.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [bo.fd]))])
        except OSError as exc:
            raise RequestError(ErrorCode.ENOTCONN, f"cannot pass the buffer's fd: {exc.strerror}") from None
