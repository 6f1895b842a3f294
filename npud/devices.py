"""The daemon's side of one device: its device process, its memory and its job queue.

``DeviceHost`` starts the device process (emulator/device_process.py) and
supervises it: if the process dies, the job it was running fails with EIO
(retryable), the process is restarted and the reset counted.  One task, the
runner, owns the socket to the process; everything else reaches the device
by putting work in the runner's queue.
"""

from __future__ import annotations

import array
import errno
import itertools
import logging
import os
import socket
import sys
import time
from collections.abc import Callable

import msgpack
import trio

from emulator.config import DeviceConfig
from ipc_schema.errors import ErrorCode, ErrorInfo

from .jobs import BusyWindow, Job
from .memory import BufferObject, DeviceMemory

log = logging.getLogger("npud.device")

MAX_REPLY = 1 << 20
CHANNEL_BYTES = 32 << 20  # the device process accepts packets up to this size
STOP_TIMEOUT_S = 2.0
UTIL_WINDOW_S = 5.0   # util_pct is the busy share of (about) the last this many seconds


class DeviceLost(Exception):
    """The device process exited or broke the protocol.

    ``delivered`` is False when the request never reached the process (it was
    already dead), so the job being run is innocent and may simply be run again.
    """

    def __init__(self, message: str, *, delivered: bool = True):
        super().__init__(message)
        self.delivered = delivered


class ChannelLimit(Exception):
    """A request is larger than one packet of the device socket can carry on this host."""


class DeviceHost:
    def __init__(self, index: int, name: str, preset: str, config: DeviceConfig,
                 on_job_done: Callable[[Job], None]):
        self.index = index
        self.name = name
        self.preset = preset
        self.config = config
        self.memory = DeviceMemory(index, config.memory_bytes, config.page_size)
        self.state = "down"
        self.resets = 0
        self.jobs_completed = 0
        self.jobs_failed = 0
        self.busy_s = 0.0
        self.modeled_cycles = 0      # modeled cycles of the jobs completed since start
        self.usage = BusyWindow(UTIL_WINDOW_S)
        self.running: Job | None = None
        self._reset_requested: str | None = None   # an admin asked for a reset (reset_device)
        self._reset_done = trio.Event()
        self._on_job_done = on_job_done
        self._send, self._recv = trio.open_memory_channel[Job | BufferObject](float("inf"))
        self._queued = 0
        self._process: trio.Process | None = None
        self._sock: trio.socket.SocketType | None = None
        self._imported: set[int] = set()
        self.programs: dict[int, tuple[bytes, list]] = {}
        self._loaded: set[int] = set()     # programs the current device process holds
        self._program_ids = itertools.count(1)

    # --- what the rest of the daemon calls -------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job (its buffers already referenced); never blocks."""
        self._queued += 1
        self._send.send_nowait(job)

    def add_program(self, stream: bytes, mappings: list[tuple[int, int, bool]]) -> int:
        """Register a validated stream (a model's) for jobs to run by id."""
        program = next(self._program_ids)
        self.programs[program] = (stream, mappings)
        return program

    def remove_program(self, program: int) -> None:
        # The runner drops it in queue order: jobs queued before the unload still run it.
        self._send.send_nowait(("unload_program", program))

    def forget(self, bo: BufferObject) -> None:
        """A buffer's last reference is gone: unmap it in the device, then free it."""
        self.memory.uncharge(bo)  # its memory is available again now, not once the runner gets to it
        self._send.send_nowait(bo)

    @property
    def jobs_queued(self) -> int:
        return self._queued

    def busy_now(self, now: float) -> float:
        """Seconds spent executing jobs, counting the running job's time so far."""
        running = self.running
        return self.busy_s + (now - running.started if running is not None and running.started else 0.0)

    def modeled_busy_ms(self) -> float:
        """The completed jobs' modeled cycles at this device's clock."""
        return self.modeled_cycles / (self.config.clock_mhz * 1e3)

    async def reset_now(self, why: str) -> None:
        """Restart the device process (admin reset); returns once it is back.

        A running job fails with EIO (retryable), as on any reset; queued jobs run
        on the new process.  Any reset that happens meanwhile satisfies the request.
        """
        if self._reset_requested is None:
            self._reset_requested = why
            self._reset_done = trio.Event()
        done = self._reset_done
        if self.running is not None and self._process is not None and self._process.returncode is None:
            self._process.kill()   # the runner sees the device lost, fails the job and resets
        else:
            self._send.send_nowait(("reset", why))  # wakes an idle runner
        await done.wait()

    def info(self) -> dict:
        return {
            "index": self.index, "name": self.name, "preset": self.preset, "state": self.state,
            "params": self.config.to_dict(), "memory_total": self.memory.total,
            "memory_used": self.memory.used, "jobs_queued": self._queued,
            "jobs_running": int(self.running is not None), "jobs_completed": self.jobs_completed,
            "jobs_failed": self.jobs_failed, "busy_ms": self.busy_now(time.monotonic()) * 1e3,
            "resets": self.resets,
            **self.usage_info(time.monotonic()),
        }

    def usage_info(self, now: float) -> dict:
        return {"util_pct": self.usage.pct(now, self.busy_now(now)), "util_window_s": UTIL_WINDOW_S,
                "modeled_cycles": self.modeled_cycles, "modeled_busy_ms": self.modeled_busy_ms()}

    # --- the runner --------------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the device process until cancelled; reports started once it is up."""
        await self._start_process()
        task_status.started()
        try:
            async for item in self._recv:
                if self._reset_requested is not None:
                    await self._reset(self._reset_requested)
                if isinstance(item, tuple) and item[0] == "reset":
                    continue
                if isinstance(item, Job):
                    self._queued -= 1
                    await self._run_job(item)
                elif isinstance(item, tuple):
                    await self._unload_program(item[1])
                else:
                    await self._release(item)
        finally:
            with trio.CancelScope(shield=True):
                await self._stop_process()
                self.memory.close()

    async def _start_process(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # One packet carries a whole command stream; the default buffer (~208 KiB)
        # caps packets far below the streams the protocol allows.  The kernel clamps
        # this to net.core.wmem_max; larger streams fail their job with EINVAL.
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * CHANNEL_BYTES)
        config_hex = msgpack.packb(self.config.to_dict()).hex()
        try:
            self._process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "emulator.device_process", "--sock-fd", str(theirs.fileno()),
                 "--config", config_hex],
                pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        self._sock = trio.socket.from_stdlib_socket(ours)
        self._imported.clear()
        self._loaded.clear()
        self.state = "ok"
        log.info("device %d (%s, preset %s) started as pid %d", self.index, self.name,
                 self.preset, self._process.pid)

    async def _stop_process(self) -> None:
        if self._process is None:
            return
        try:
            await self._sock.send(msgpack.packb({"op": "shutdown"}))
        except OSError:
            pass
        with trio.move_on_after(STOP_TIMEOUT_S):
            await self._process.wait()
        if self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
        self._sock.close()
        self._process = None
        self.state = "down"

    async def _reset(self, why: str) -> None:
        log.error("device %d: %s; restarting its process", self.index, why)
        self.state = "resetting"
        self.resets += 1
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
        await self._stop_process()
        await self._start_process()
        self._reset_requested = None
        self._reset_done.set()

    async def _call(self, request: dict, fd: int | None = None) -> dict:
        data = msgpack.packb(request, use_bin_type=True)
        try:
            if fd is None:
                await self._sock.send(data)
            else:
                await self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   array.array("i", [fd]))])
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise ChannelLimit(f"a {len(data)}-byte {request['op']} request exceeds what this host's "
                                   "device socket carries in one packet (raise net.core.wmem_max, "
                                   "or submit a shorter command stream)") from None
            raise DeviceLost(f"device process connection failed: {exc}", delivered=False) from None
        try:
            reply = await self._sock.recv(MAX_REPLY)
        except OSError as exc:
            raise DeviceLost(f"device process connection failed: {exc}") from None
        if not reply:
            await self._process.wait()
            raise DeviceLost(f"device process exited with status {self._process.returncode}")
        return msgpack.unpackb(reply, raw=False)

    async def _run_job(self, job: Job) -> None:
        if job.state != "queued":
            return  # cancelled while queued (its session closed)
        job.state = "running"
        job.started = time.monotonic()
        self.running = job
        started = time.perf_counter()
        try:
            try:
                reply = await self._execute(job)
            except DeviceLost as exc:
                if exc.delivered:
                    raise
                # The process died before this job reached it (e.g. killed while idle):
                # the job is innocent, so restart the device and run it there.
                await self._reset(str(exc))
                reply = await self._execute(job)
        except DeviceLost as exc:
            reply = {"ok": False, "error": {"code": "EIO", "retryable": True,
                                            "message": f"{exc}; the job was lost, submit it again"}}
            await self._reset(str(exc))
        except ChannelLimit as exc:  # the device is fine: only this job cannot reach it
            reply = {"ok": False, "error": {"code": "EINVAL", "retryable": False, "message": str(exc)}}
        finally:
            job.busy_s = time.perf_counter() - started
            self.busy_s += job.busy_s
            self.running = None
        if reply["ok"]:
            self.jobs_completed += 1
            self.modeled_cycles += int(reply["stats"].get("cycles", 0))
            job.finish(stats={**reply["stats"], "wall_ms": reply["wall_ms"]})
        else:
            self.jobs_failed += 1
            err = reply["error"]
            code = ErrorCode(err["code"]) if err["code"] in ErrorCode.__members__ else ErrorCode.EIO
            where = f" (command {err['command']})" if err.get("command") is not None else ""
            job.finish(error=ErrorInfo.of(code, f"job {job.id} failed{where}: {err['message']}",
                                          err.get("retryable")))
        self._on_job_done(job)

    async def _execute(self, job: Job) -> dict:
        for bo, _va, _w in job.bindings:
            if bo.id not in self._imported:
                try:
                    await self._call({"op": "import", "bo": bo.id}, fd=bo.fd)
                except DeviceLost as exc:
                    exc.delivered = False  # the job itself never started
                    raise
                self._imported.add(bo.id)
        run = {"op": "run", "job": job.id,
               "bindings": [[bo.id, va, writable] for bo, va, writable in job.bindings]}
        if job.program is None:
            run["stream"] = job.stream
        else:
            if job.program not in self._loaded:
                reply = await self._load_program(job.program)
                if not reply["ok"]:
                    return reply
            run["program"] = job.program
        return await self._call(run)

    async def _load_program(self, program: int) -> dict:
        stream, mappings = self.programs[program]
        fd = os.memfd_create("npud-program", os.MFD_CLOEXEC)
        try:
            os.write(fd, stream)
            os.lseek(fd, 0, os.SEEK_SET)
            try:
                reply = await self._call({"op": "load_program", "program": program,
                                          "mappings": [list(m) for m in mappings]}, fd=fd)
            except DeviceLost as exc:
                exc.delivered = False  # no job ran
                raise
        finally:
            os.close(fd)
        if reply["ok"]:
            self._loaded.add(program)
        return reply

    async def _unload_program(self, program: int) -> None:
        self.programs.pop(program, None)
        if program in self._loaded:
            self._loaded.discard(program)
            try:
                await self._call({"op": "unload_program", "program": program})
            except DeviceLost as exc:
                await self._reset(str(exc))

    async def _release(self, bo: BufferObject) -> None:
        if bo.id in self._imported:
            self._imported.discard(bo.id)
            try:
                await self._call({"op": "release", "bo": bo.id})
            except DeviceLost as exc:
                await self._reset(str(exc))
        self.memory.release(bo)
