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


class OwnedSocket:
    def __init__(self, sock: zmq.Socket, on_frames: Callable[[list], None]):
        self._sock = sock
        self._fd = sock.getsockopt(zmq.FD)
        self._on_frames = on_frames
        self._outgoing: collections.deque[Sequence] = collections.deque()
        self._sleeping: trio.CancelScope | None = None
        self.dropped = 0  # replies to peers that vanished (ROUTER_MANDATORY refused them)

    def send(self, frames: Sequence) -> None:
        """Queue frames to send; wakes the owner task if it is asleep. Never blocks."""
        self._outgoing.append(frames)
        if self._sleeping is not None:
            self._sleeping.cancel()

    def _flush(self) -> bool:
        sock = self._sock
        while self._outgoing:
            frames = self._outgoing[0]
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=len(frames[-1]) < 65536)
            except zmq.Again:
                if sock.type == zmq.ROUTER:
                    # With ROUTER_MANDATORY, EAGAIN means this peer's pipe is full (a
                    # slow consumer): drop its reply rather than stall everyone else.
                    self._outgoing.popleft()
                    self.dropped += 1
                    continue
                return False  # DEALER: the pipe is full, wait for POLLOUT
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                self.dropped += 1  # the peer disconnected before its reply was ready
            self._outgoing.popleft()
        return True

    def _drain(self) -> int:
        received = 0
        sock = self._sock
        while received < RECV_BATCH:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            received += 1
            self._on_frames(frames)
        return received

    async def run(self) -> None:
        """Own the socket until cancelled."""
        sock = self._sock
        while True:
            received = self._drain()
            self._flush()
            if received == RECV_BATCH:
                await trio.lowlevel.checkpoint()
                continue
            events = sock.getsockopt(zmq.EVENTS)
            if events & zmq.POLLIN or (self._outgoing and events & zmq.POLLOUT):
                await trio.lowlevel.checkpoint()
                continue
            with trio.CancelScope() as self._sleeping:
                if not self._outgoing:
                    await trio.lowlevel.wait_readable(self._fd)
            self._sleeping = None
