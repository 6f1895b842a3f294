"""A ZeroMQ socket owned by one trio task.

pyzmq's ``FD`` is edge-triggered: it becomes readable when the socket's event
state *changes*, not while messages wait.  A task that sleeps on it without
first draining the socket and re-reading ``zmq.EVENTS`` can sleep forever with
messages queued.  ``OwnedSocket.run`` is the only code that touches the socket:
it drains everything readable, flushes everything queued for sending, re-checks
``EVENTS``, and only then sleeps.  Other tasks hand frames to it with ``send``
(never blocking) and it hands received frames to ``on_frames``.

A ROUTER's high-water mark counts messages, not bytes: ten thousand queued
16 MiB replies to a peer that stopped reading would hold 160 GiB.  So replies
of a ROUTER are also counted in bytes per peer (``queued_bytes``): frames of
``TRACK_BYTES`` or more are sent zero-copy and tracked until libzmq has
handed them to the kernel, so the owner of the socket can refuse work for a
peer that does not read (npud/server.py does).
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
# A ROUTER's frames from this size on are sent zero-copy and tracked (queued_bytes); what is
# not tracked is bounded by the high-water mark times this.  At this size tracking a frame
# costs about what copying it does (pyzmq 27, libzmq 4.3.5: 7-12 us either way).
TRACK_BYTES = 4096
_SWEEP_S = 1.0  # how often peers whose tracked frames are all gone are forgotten


class _Backlog:
    """A peer's reply bytes not yet handed to the kernel."""

    __slots__ = ("held", "tracked", "tracked_bytes")

    def __init__(self):
        self.held = 0                  # in ``_outgoing``: not given to libzmq yet
        self.tracked: collections.deque[tuple[zmq.MessageTracker, int]] = collections.deque()
        self.tracked_bytes = 0         # given to libzmq, not yet written to the peer's connection

    def prune(self) -> int:
        # A peer's pipe delivers in order, so its frames are released in order; one released
        # out of order is counted a little longer, which errs on the safe side.
        tracked = self.tracked
        while tracked and tracked[0][0].done:
            self.tracked_bytes -= tracked.popleft()[1]
        return self.held + self.tracked_bytes


class OwnedSocket:
    def __init__(self, sock: zmq.Socket, on_frames: Callable[[list], None], *, copy: bool = True):
        """``copy=False`` hands ``on_frames`` zmq.Frame objects, whose ``get()`` reads message
        properties such as the ``User-Id`` a ZAP handler gave the connection."""
        self._sock = sock
        self._copy = copy
        self._fd = sock.getsockopt(zmq.FD)
        self._router = sock.type == zmq.ROUTER
        self._on_frames = on_frames
        self._outgoing: collections.deque[tuple[Sequence, int]] = collections.deque()
        self._backlogs: dict[bytes, _Backlog] = {}   # ROUTER: by routing id, peers with big replies
        self._swept = 0.0
        self._sleeping: trio.CancelScope | None = None
        self.dropped = 0  # replies to peers that vanished or stopped reading

    def send(self, frames: Sequence) -> None:
        """Queue frames to send; wakes the owner task if it is asleep. Never blocks."""
        big = 0
        if self._router:
            for frame in frames[1:]:
                if len(frame) >= TRACK_BYTES:
                    big += len(frame)
            if big:
                self._backlog(frames[0]).held += big
        self._outgoing.append((frames, big))
        if self._sleeping is not None:
            self._sleeping.cancel()

    def queued_bytes(self, routing_id: bytes) -> int:
        """ROUTER: bytes of replies to this peer queued here or in libzmq, not yet written to
        its connection (frames under ``TRACK_BYTES`` are not counted)."""
        backlog = self._backlogs.get(routing_id)
        return 0 if backlog is None else backlog.prune()

    def _backlog(self, routing_id: bytes) -> _Backlog:
        backlog = self._backlogs.get(routing_id)
        if backlog is None:
            backlog = self._backlogs[routing_id] = _Backlog()
        return backlog

    def _send_now(self, frames: Sequence, big: int) -> None:
        send = self._sock.send
        last = len(frames) - 1
        if not big:
            for i, frame in enumerate(frames):
                send(frame, _NOBLOCK | (_SNDMORE if i < last else 0), copy=len(frame) < _COPY_THRESHOLD)
            return
        backlog = self._backlogs[frames[0]]
        for i, frame in enumerate(frames):
            flags = _NOBLOCK | (_SNDMORE if i < last else 0)
            if i and len(frame) >= TRACK_BYTES:
                backlog.tracked.append((send(frame, flags, copy=False, track=True), len(frame)))
                backlog.tracked_bytes += len(frame)
            else:
                send(frame, flags, copy=len(frame) < _COPY_THRESHOLD)

    def _sweep(self) -> None:
        """Forget peers with nothing queued (those that vanished, too: libzmq releases
        their frames when it drops the connection)."""
        for routing_id in [rid for rid, b in self._backlogs.items() if not b.prune()]:
            del self._backlogs[routing_id]

    def _flush(self) -> None:
        while self._outgoing:
            frames, big = self._outgoing[0]
            try:
                self._send_now(frames, big)
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
            if big:
                self._backlogs[frames[0]].held -= big

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
            if self._backlogs:
                now = trio.current_time()
                if now - self._swept > _SWEEP_S:
                    self._swept = now
                    self._sweep()
            with trio.CancelScope() as self._sleeping:
                if not self._outgoing:
                    await trio.lowlevel.wait_readable(self._fd)
            self._sleeping = None
