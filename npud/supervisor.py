"""The supervisor of one device core's process: its start, stop, restart and watch.

A ``CoreProcess`` per core of a device (npud/devices.py's ``DeviceHost`` makes them) owns:

* the device process (its driver's ``device_process``, started through npud/lifeline.py so it
  dies with the daemon) and the socket pair to it;
* its ``DeviceLink`` (npud/device_link.py): the process's end of every exchange, made with the
  process and closed with it;
* what that process holds of the device: the buffers it has mapped (``imported``) and the
  programs it has loaded (``loaded``).  A new process holds nothing, so both sets are cleared
  at every start, and a restart is the only way they are ever forgotten;
* the restart policy: a process that cannot start (descriptors or processes short) is retried
  every ``RESTART_RETRY_S`` until it does; a process that dies is reported (``on_death``) so
  that its runner, which alone talks to it, restarts it when that is its to do.

It knows nothing of jobs: whom a failure blames, and what happens to the job at hand, is the
host's (npud/devices.py).  One task at a time (the core's runner) calls its coroutines.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import trio

from npud import drivers, lifeline
from npud.drivers import DeviceParams, Driver

from .device_link import DeviceLink, HostLimit

log = logging.getLogger("npud.device")

CHANNEL_BYTES = 32 << 20  # the device process accepts packets up to this size
STOP_TIMEOUT_S = 2.0
RESTART_RETRY_S = 1.0   # a device process that cannot start is retried this often


class CoreProcess:
    """The process of one device core, its link and what it holds; started, stopped and restarted
    only here."""

    def __init__(self, device: int, index: int, driver: Driver, config: DeviceParams,
                 exchange_timeout_s: float, on_death: Callable[[str], None], label: str = ""):
        self.device = device
        self.index = index
        self._label = label                          # the device's name and preset, for the log
        self._driver = driver
        self._config = config
        self._exchange_timeout_s = exchange_timeout_s
        self._on_death = on_death
        self.process: trio.Process | None = None
        self.link: DeviceLink | None = None          # its process's end of the device link
        self.imported: set[int] = set()              # buffer ids its process has mapped
        self.loaded: set[int] = set()                # program ids its process has loaded
        self.prepared_bytes = 0                      # what its process keeps prepared for them (its last say)
        self.state = "down"
        self.restarts = 0
        self.nursery: trio.Nursery | None = None     # where its watcher runs (the host's runners')

    @property
    def alive(self) -> bool:
        """Whether its process is running (not yet seen to exit)."""
        return self.process is not None and self.process.returncode is None

    @property
    def awaiting_ready(self) -> bool:
        """Whether its process has started but not yet said ``ready``."""
        return self.link is not None and not self.link.ready

    async def greet(self) -> None:
        """Hear its new process's ``ready`` (DeviceLost or Hung, not delivered, if it never says it)."""
        await self.link.greet()

    def kill(self) -> None:
        """End its process now (never blocks); its runner finds the link lost."""
        if self.alive:
            self.process.kill()

    def _log_extra(self) -> dict:
        return {"device": self.device, "core": self.index}

    async def start(self) -> None:
        """Start a process with a new link; OSError if the host cannot start one now."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # One packet carries a whole command stream; the default buffer (~208 KiB)
        # caps packets far below the streams the protocol allows.  The kernel clamps
        # this to net.core.wmem_max; larger streams fail their job with EINVAL.
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * CHANNEL_BYTES)
        try:
            self.process = await lifeline.open_process(
                self._driver.device_process,
                ["--sock-fd", str(theirs.fileno()), *self._driver.process_args(self._config)],
                pass_fds=(theirs.fileno(),), env=drivers.ONE_COMPUTE_THREAD)
        except BaseException:
            ours.close()   # restart retries while descriptors are short: do not leak one per try
            raise
        finally:
            theirs.close()
        self.link = DeviceLink(ours, self.process, self._exchange_timeout_s)
        self.imported.clear()
        self.loaded.clear()
        self.prepared_bytes = 0
        self.state = "ok"
        self.watch()
        log.info("device %d (%s) core %d started as pid %d", self.device, self._label, self.index,
                 self.process.pid, extra=self._log_extra())

    def watch(self) -> None:
        """Watch its current process (once the host's runners have a nursery): its death is
        reported to ``on_death`` at once, not when the next request finds it."""
        if self.nursery is not None and self.process is not None:
            self.nursery.start_soon(self._watch, self.process)

    async def _watch(self, process: trio.Process) -> None:
        await process.wait()
        if self.process is process:   # not a process it has since replaced
            self._on_death(f"its process exited with status {process.returncode}")

    async def stop(self) -> None:
        """Ask its process to exit, kill it if it does not within STOP_TIMEOUT_S; close the link."""
        if self.process is None:
            return
        self.link.shutdown()
        with trio.move_on_after(STOP_TIMEOUT_S):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.link.close()
        self.process = None
        self.link = None
        self.state = "down"

    async def restart(self, why: str) -> None:
        """Kill its process and start another, retrying until the host can (``why`` is logged)."""
        log.error("device %d core %d: %s; restarting its process", self.device, self.index, why,
                  extra=self._log_extra())
        self.state = "resetting"
        self.restarts += 1
        self.kill()
        await self.stop()
        while True:
            try:
                await self.start()
                return
            except OSError as exc:   # out of descriptors or processes for now: the core waits, npud stays
                log.error("device %d core %d: cannot start its process (%s); retrying in %.0f s",
                          self.device, self.index, exc, RESTART_RETRY_S, extra=self._log_extra())
                await trio.sleep(RESTART_RETRY_S)

    # --- what its process holds --------------------------------------------------------

    async def import_buffer(self, bo) -> None:
        """Map buffer ``bo`` in its process unless it has already (before a job runs: a fault
        here is not the job's)."""
        if bo.id not in self.imported:
            await self.link.call({"op": "import", "bo": bo.id}, fd=bo.fd, before_job=True)
            self.imported.add(bo.id)

    async def release(self, bo) -> None:
        """Unmap buffer ``bo`` in its process if it mapped it."""
        if bo.id in self.imported:
            self.imported.discard(bo.id)
            await self.link.call({"op": "release", "bo": bo.id})

    async def load_program(self, program: int, stream: bytes, mappings: list, boundaries: list[int]) -> dict:
        """Load a program in its process (its stream passed in a memfd); the reply.  HostLimit
        (ENOMEM, retryable) if no descriptor is left for the memfd."""
        try:
            fd = os.memfd_create("npud-program", os.MFD_CLOEXEC)
        except OSError as exc:
            raise HostLimit(f"npud cannot pass the job's program to the device now ({exc.strerror}); "
                            "retry once buffers are freed", "ENOMEM", retryable=True) from None
        try:
            os.write(fd, stream)
            os.lseek(fd, 0, os.SEEK_SET)
            reply = await self.link.call({"op": "load_program", "program": program,
                                          "mappings": [list(m) for m in mappings],
                                          "boundaries": boundaries}, fd=fd, before_job=True)
        finally:
            os.close(fd)
        if reply["ok"]:
            self.loaded.add(program)
            self.prepared_bytes = int(reply.get("prepared_bytes", self.prepared_bytes))
        return reply

    async def unload_program(self, program: int) -> None:
        """Unload a program from its process if it loaded it."""
        if program in self.loaded:
            self.loaded.discard(program)
            reply = await self.link.call({"op": "unload_program", "program": program})
            self.prepared_bytes = int(reply.get("prepared_bytes", self.prepared_bytes))
