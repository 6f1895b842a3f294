"""A ZeroMQ socket owned by one trio task.

pyzmq's ``FD`` is edge-triggered: it becomes readable when the socket's event
state *changes*, not while messages wait.  A task that sleeps on it without
first draining the socket and re-reading ``zmq.EVENTS`` can sleep forever with
messages queued.  ``OwnedSocket.run`` is the only code that touches the socket:
it drains everything readable, flushes everything queued for sending, re-checks
``EVENTS``, and only then sleeps.  Other tasks hand frames to it with ``send``
(never blocking) and it hands received frames to ``on_frames``.

"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import trio
import zmq

# Receive at most this many messages per wakeup before flushing sends and
# yielding, so a flood from one peer cannot starve replies or other tasks.
RECV_BATCH = 64
# Plain ints: pyzmq's flag enums cost microseconds per operation on the hot path.
_EVENTS, _POLLIN, _POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)
_COPY_THRESHOLD = 65536  # below this, copying a frame is cheaper than tracking it


class OwnedSocket:
    def __init__(self, sock: zmq.Socket, on_frames: Callable[[list], None], *, copy: bool = True):
        """``copy=False`` hands ``on_frames`` zmq.Frame objects, whose ``get()`` reads message
        properties such as the ``User-Id`` a ZAP handler gave the connection."""
        self._sock = sock
        self._copy = copy
        self._fd = sock.getsockopt(zmq.FD)
        self._router = sock.type == zmq.ROUTER
        self._on_frames = on_frames
        self._outgoing: collections.deque[Sequence] = collections.deque()
        self._sleeping: trio.CancelScope | None = None
        self.dropped = 0  # replies to peers that vanished or stopped reading

    def send(self, frames: Sequence) -> None:
        """Queue frames to send; wakes the owner task if it is asleep. Never blocks."""
        self._outgoing.append(frames)
        if self._sleeping is not None:
            self._sleeping.cancel()

    def _send_now(self, frames: Sequence) -> None:
        send = self._sock.send
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            send(frame, _NOBLOCK | (_SNDMORE if i < last else 0), copy=len(frame) < _COPY_THRESHOLD)

    def _flush(self) -> None:
        while self._outgoing:
            try:
                self._send_now(self._outgoing[0])
            except zmq.Again:
                if not self._router:
                    return  # DEALER: the pipe is full, wait for POLLOUT
                # ROUTER with ROUTER_MANDATORY: this peer's pipe is full (a slow
                # consumer): drop its reply rather than stall everyone else.
                self.dropped += 1
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                self.dropped += 1  # the peer disconnected before its reply was ready
            self._outgoing.popleft()

    def _drain(self) -> int:
        # Asking EVENTS is cheaper than provoking zmq.Again, and it is also what
        # re-arms the edge-triggered FD.
        received = 0
        sock = self._sock
        while received < RECV_BATCH and sock.getsockopt(_EVENTS) & _POLLIN:
            self._on_frames(sock.recv_multipart(_NOBLOCK, copy=self._copy))
            received += 1
        return received

    async def run(self) -> None:
        """Own the socket until cancelled; what is queued then is still sent."""
        try:
            await self._run()
        finally:
            self._flush()

    async def _run(self) -> None:
        sock = self._sock
        while True:
            received = self._drain()
            self._flush()
            if received == RECV_BATCH:
                await trio.lowlevel.checkpoint()
                continue
            events = sock.getsockopt(_EVENTS)
            if events & _POLLIN or (self._outgoing and events & _POLLOUT):
                await trio.lowlevel.checkpoint()
                continue
            with trio.CancelScope() as self._sleeping:
                if not self._outgoing:
                    await trio.lowlevel.wait_readable(self._fd)
            self._sleeping = None
