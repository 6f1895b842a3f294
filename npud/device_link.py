"""The daemon's end of one device process's link (docs/DRIVERS.md, "The device link").

One ``DeviceLink`` per device process: it owns the SEQPACKET socket, waits for the process's
``ready`` before its first request, times every exchange, checks every reply against the link's
schemas (npud/drivers/link.py) and turns every way the process can fail into a ``DeviceFault``
saying whether the job at hand was delivered (blame) or not (run it again elsewhere).  The
process supervision (start, stop, restart) is npud/supervisor.py's, the scheduling npud/devices.py's.
"""

from __future__ import annotations

import array
import errno
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import msgpack
import trio

from npud.drivers import link

MAX_REPLY = 1 << 20
START_TIMEOUT_S = 60.0  # a new device process has this long to say it is ready (imports, on a loaded machine)


class DeviceFault(Exception):
    """The device process failed an exchange; its core must be reset.

    ``delivered`` is False when the job's run request never reached the process
    (it failed before: dead already, or silent while importing the job's buffers
    or loading its program), so the job is innocent and may simply be run again.
    """

    def __init__(self, message: str, *, delivered: bool = True):
        super().__init__(message)
        self.delivered = delivered


class DeviceLost(DeviceFault):
    """The device process exited or broke the protocol."""


class Hung(DeviceFault):
    """The device process did not answer in time: a run within the job's timeout, anything
    else within ``SchedulingParams.exchange_timeout_s``."""


@contextmanager
def undelivered() -> Iterator[None]:
    """Mark the DeviceFaults raised inside as not delivered: an exchange made before the job's run
    request left (an import of its buffers, a load of its program, a new process's ``ready``)
    cannot be the job's fault, so the job is innocent and may run again."""
    try:
        yield
    except DeviceFault as exc:
        exc.delivered = False
        raise


class HostLimit(Exception):
    """The host cannot carry this job to the device (a stream larger than one packet of the device
    socket, or no file descriptor left for its program).  The device is fine; only this job fails."""

    def __init__(self, message: str, code: str = "EINVAL", retryable: bool = False):
        super().__init__(message)
        self.code, self.retryable = code, retryable


class DeviceLink:
    """Requests to one device process and its checked replies.  One task at a time uses it (the
    core's runner); ``preempt`` and ``shutdown`` never block, so anyone may call them."""

    def __init__(self, sock: socket.socket, process: trio.Process, exchange_timeout_s: float):
        self._raw = sock                              # for the non-blocking preempt and shutdown
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._process = process
        self._exchange_timeout_s = exchange_timeout_s
        self._ready = False                           # the process has said it is ready
        self.kernels = ""                             # what its ready said: the kernels it runs
        self.threads: dict[str, int] = {}             # and its BLAS/OpenMP pools' thread counts

    async def call(self, request: dict, fd: int | None = None, *, before_job: bool = False) -> dict:
        """Send a request other than ``run`` and return its reply; Hung if it takes longer than
        ``exchange_timeout_s`` (a process stopped, or stuck, while the core was idle).
        ``before_job``: the request prepares a job's run, so its faults are not delivered."""
        if before_job:
            with undelivered():
                return await self.call(request, fd)
        await self.send(msgpack.packb(request, use_bin_type=True), request["op"], fd)
        limit = self._exchange_timeout_s
        reply = await self.reply_by(time.monotonic() + limit, request["op"])
        if reply is None:
            raise Hung(f"its process did not answer {request['op']} within {limit:g} s")
        return reply

    async def send(self, data: bytes, op: str, fd: int | None = None) -> None:
        """Send one packed request (``op`` names it in errors), with ``fd`` in SCM_RIGHTS."""
        if not self._ready:
            await self.greet()
        try:
            if fd is None:
                await self._sock.send(data)
            else:
                await self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise HostLimit(f"a {len(data)}-byte {op} request exceeds what this host's "
                                "device socket carries in one packet (raise net.core.wmem_max, "
                                "or submit a shorter command stream)") from None
            raise DeviceLost(f"device process connection failed: {exc}", delivered=False) from None

    async def reply_by(self, at: float, op: str) -> dict | None:
        """The process's reply to ``op``, or None if it sends none by ``at`` (``time.monotonic()``).

        The one way an exchange with a device process is timed: every wait for a reply ends."""
        with trio.move_on_after(max(0.0, at - time.monotonic())):
            return await self._recv(op)
        return None

    def preempt(self) -> bool:
        """Ask the process to stop its run at the next preemption point; whether the request left."""
        try:
            self._raw.send(msgpack.packb({"op": "preempt"}), socket.MSG_DONTWAIT)
            return True
        except OSError:
            return False  # the process is gone or its queue is full: the run ends anyway

    def shutdown(self) -> None:
        try:
            self._raw.send(msgpack.packb({"op": "shutdown"}), socket.MSG_DONTWAIT)
        except OSError:
            pass

    def close(self) -> None:
        self._sock.close()

    @property
    def ready(self) -> bool:
        """Whether the process has said it is ready (``greet`` has heard it)."""
        return self._ready

    async def greet(self) -> None:
        """Wait for a new process's ``ready``, so that no request's deadline pays for its start;
        DeviceLost or Hung (not delivered: nothing was asked of it) if it never says it."""
        with undelivered():   # nothing was sent to it: whatever job is at hand is innocent
            reply = await self.reply_by(time.monotonic() + START_TIMEOUT_S, "ready")
        if reply is None:
            raise Hung(f"its process did not start within {START_TIMEOUT_S:g} s", delivered=False)
        self._ready = True
        self.kernels = str(reply.get("kernels", ""))
        self.threads = dict(reply.get("threads", {}))

    async def _recv(self, op: str) -> dict:
        """The process's reply to ``op``, checked against the device link's schema: one that breaks
        the protocol is the device's failure (DeviceLost), never an exception in the daemon."""
        try:
            reply = await self._sock.recv(MAX_REPLY)
        except OSError as exc:
            raise DeviceLost(f"device process connection failed: {exc}") from None
        if not reply:
            await self._process.wait()
            raise DeviceLost(f"device process exited with status {self._process.returncode}")
        try:
            return link.check_reply(op, reply)
        except link.ProtocolError as exc:
            raise DeviceLost(f"its process broke the protocol: {exc}", delivered=op == "run") from None
