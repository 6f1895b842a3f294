"""One session's protocol state, without I/O: what the sync and the trio client share.

``Core`` numbers requests and matches replies to them by sequence number
*first*: a late reply to a request that timed out (or was cancelled) is
dropped, never checked against the schema of the op awaited now.  It files
the fds of the companion socket by tag, records the daemon's ``shutdown``
event and, once the companion socket or the connection closes, that the
session is gone -- so every waiting and later call raises ``ConnectionLost``
at once instead of timing out.

The API itself (``Client.alloc``, ``Model.submit``, ``Job.wait``, ...) is
written once, as generators that yield ``Call``s and receive their results:
``blocking`` turns one into a method of the sync client's classes (client.py
drives it with a blocking transport), ``awaitable`` into a coroutine method of
the trio client's (aio.py).  Neither transport holds any API logic, so a fix
lands in both.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from npud.ipc_schema import codec
from npud.ipc_schema.errors import ErrorCode, ErrorInfo, RequestError
from npud.ipc_schema.types import FieldError

from . import protocol
from .errors import NpuError, error


@dataclass(frozen=True)
class Call:
    """One request an operation needs answered.

    ``frame(seq) -> bytes`` is a pre-encoded request (Execution); ``fd`` asks for the
    memfd the daemon sends over the companion socket with the reply (``map``): the call
    then returns ``(fd_message, fd)``.  ``timeout`` defaults to the client's."""

    op: str
    args: dict | None = None
    timeout: float | None = None
    frame: Callable[[int], bytes] | None = None
    fd: bool = False


# An operation: yields Calls, is sent each one's result (or has its error thrown in), returns a value.
Operation = Generator[Call, Any, Any]


class Core:
    """Requests in flight, their replies, fds by tag, and whether the session still exists."""

    def __init__(self, endpoint: str, recover: str):
        self.endpoint = endpoint
        self.recover = recover            # what to do once the session is gone (in the error)
        self.limits: dict[str, int] = {}
        self.protocol: tuple[int, int] = (1, 0)   # the daemon's, from its hello reply
        self._seq = itertools.count(1)
        self._pending: dict[int, str] = {}                 # seq -> op, until finished or abandoned
        self._replies: dict[int, codec.Reply] = {}
        self._fd_wanted: set[int] = set()
        self._fds: dict[int, tuple[dict, int]] = {}
        self.stopping: str | None = None   # the reason of the daemon's shutdown event
        self.lost: str | None = None       # why the session is gone, once it is
        self.closed = False
        self.stale = 0                     # replies dropped: their request timed out or was cancelled

    # --- requests -------------------------------------------------------------------

    def start(self, call: Call) -> tuple[int, bytes]:
        """A new request: its seq and frame.  Raises if the session is closed or gone."""
        self.check_open(call.op)
        seq = next(self._seq)
        if call.frame is not None:
            frame = call.frame(seq)
        else:
            frame = protocol.encode(call.op, seq, {} if call.args is None else call.args,
                                    self.limits.get("max_message_bytes", protocol.MAX_MESSAGE_BYTES))
        self._pending[seq] = call.op
        if call.fd:
            self._fd_wanted.add(seq)
        return seq, frame

    def check_open(self, op: str) -> None:
        if self.closed:
            raise error(ErrorCode.ENOTCONN, "this client is closed")
        if self.lost is not None:
            raise self.lost_error(op)

    def answered(self, seq: int) -> bool:
        return seq in self._replies

    def finish(self, seq: int) -> dict:
        """The answered request's result, or its error raised."""
        op = self._pending.pop(seq)
        result = protocol.result_or_raise(self._replies.pop(seq), op, self.endpoint, self.recover)
        if op == "hello":   # the version the session speaks: the ops and fields the daemon knows
            self.protocol = min(tuple(result["protocol"]), protocol.PROTOCOL_VERSION)
        return result

    def speaks(self, version: tuple[int, int]) -> bool:
        """Whether the session's protocol has what ``version`` added."""
        return self.protocol >= version

    def give_up(self, seq: int, op: str, timeout: float) -> NpuError:
        """The error for a request with no reply (or fd) in time, or none ever: the session is
        gone.  A reply that still comes is dropped as stale."""
        self.abandon(seq)
        if self.lost is not None:
            return self.lost_error(op)
        return error(ErrorCode.ETIMEDOUT, f"no reply to {op} within {timeout:.1f} s")

    def abandon(self, seq: int) -> None:
        """Forget a request (timed out, cancelled): its reply and fd are dropped when they come."""
        self._pending.pop(seq, None)
        self._replies.pop(seq, None)
        self._fd_wanted.discard(seq)
        entry = self._fds.pop(seq, None)
        if entry is not None:
            os.close(entry[1])

    # --- what arrives ---------------------------------------------------------------

    def feed(self, frame: bytes) -> int | None:
        """A frame from the DEALER socket: the seq it answers, or None (an event, a stale reply,
        or a frame too broken to name its seq)."""
        try:
            reply = codec.decode_reply(frame, None)
        except RequestError:
            self.stale += 1
            return None
        if isinstance(reply, tuple):
            if reply[0] == "shutdown":
                self.stopping = reply[1]["reason"]
            return None
        op = self._pending.get(reply.seq)
        if op is None or reply.seq in self._replies:
            self.stale += 1
            return None
        if reply.error is None:  # only now, knowing which op it answers, check the result
            try:
                reply = codec.Reply(reply.seq, codec.OPS[op].result.check(reply.result, f"{op}.result",
                                                                          strict=False), None)
            except (FieldError, RequestError) as exc:
                reply = codec.Reply(reply.seq, None, ErrorInfo.of(
                    ErrorCode.EPROTO, f"malformed reply from daemon: {exc}"))
        self._replies[reply.seq] = reply
        return reply.seq

    def feed_fd(self, data: bytes, fds: list[int]) -> int | None:
        """A packet from the companion socket: files its fd under its tag (the map's seq).
        Empty data is the socket's end: the session is gone.  Returns the tag, or None."""
        if not data:
            self.session_lost("its companion socket closed")
            return None
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise error(ErrorCode.EPROTO, "fd packet without exactly one file descriptor")
        try:
            message = protocol.fd_message(data)
        except NpuError:
            os.close(fds[0])
            raise
        tag = message["tag"]
        if tag not in self._fd_wanted:
            os.close(fds[0])   # for a map that timed out or was cancelled
            return None
        self._fds[tag] = (message, fds[0])
        return tag

    def has_fd(self, tag: int) -> bool:
        return tag in self._fds

    def take_fd(self, tag: int) -> tuple[dict, int]:
        self._fd_wanted.discard(tag)
        return self._fds.pop(tag)

    def session_lost(self, how: str) -> None:
        """The companion socket or the connection closed: the session is gone for good."""
        if self.lost is None:
            self.lost = how

    def lost_error(self, op: str) -> NpuError:
        if self.stopping is not None:  # it said so: not running now (ECONNREFUSED, as for a new connect)
            return error(ErrorCode.ECONNREFUSED, f"{op}: npud at {self.endpoint} stopped ({self.stopping}) "
                                                 f"and the session with it; once it runs again, {self.recover}")
        return error(ErrorCode.ENOTCONN, f"{op}: the session with npud at {self.endpoint} is gone (the "
                                         f"daemon died or closed the session: {self.lost}); {self.recover}")

    def close(self) -> None:
        """No more requests; fds that arrived for nobody are closed."""
        self.closed = True
        for _message, fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# --- one implementation, two styles --------------------------------------------------

def client_of(obj: Any) -> Any:
    """The client whose transport runs ``obj``'s operations (a client runs its own)."""
    return obj.__dict__.get("client", obj)


def blocking(operation: Callable[..., Operation]) -> Callable[..., Any]:
    """The synchronous method of an operation: runs it to its end on the client's transport."""
    @functools.wraps(operation)
    def method(self, *args, **kwargs):
        return client_of(self)._run(operation(self, *args, **kwargs))
    return method


def awaitable(operation: Callable[..., Operation]) -> Callable[..., Any]:
    """The trio method of an operation: ``await``-ed, it runs on the client's trio transport."""
    @functools.wraps(operation)
    async def method(self, *args, **kwargs):
        return await client_of(self)._run(operation(self, *args, **kwargs))
    return method
