"""The daemon's side of one device: its device processes, its memory and its run queues.

A device has one device process (its driver's ``device_process``, npud/drivers;
npu-emu's is npud/emulator/device_process.py) per modeled core (``cores`` of its
preset): the cores run jobs in parallel, and all of them map the same buffer
objects.  Each core's process, its link and what it holds are its
``CoreProcess``'s (npud/supervisor.py: start, stop, restart, watch).
``DeviceHost`` keeps the queues, the scheduling, the admission and the one end of
a job (``complete``): one runner task per core owns that core's link, picks the
next job from the device's ``Scheduler`` (npud/scheduler.py: priorities, fair
share, starvation guard), runs it and maps the run's typed outcome
(npud/outcomes.py) onto the job.

* **Preemption.**  A model's job runs as layer segments; when a job of a
  higher class becomes runnable and no core is free, the host asks the core
  running the lowest-class job to stop at its next layer boundary.  The
  stopped job keeps its place (and its model's arena) and resumes there.
* **Watchdog.**  A job that runs past its timeout is aborted: its core's
  process is killed and restarted (a reset, counted), the job fails with
  ETIMEDOUT and its context's hang count grows; a context that reaches
  ``ban_after_hangs`` is banned: its jobs fail with EPERM, everyone else's run.
  A process that crashes is treated the same way (the job fails with EIO).
  Every other exchange (import, load, release, unload) has a deadline too
  (``exchange_timeout_s``): a process that stopped answering while idle is
  found by the next job, reset, and that job -- innocent -- runs on the new one.
  A new process is sent nothing before it says ``ready`` (npud/device_link.py), so
  no deadline pays for its start.
  Jobs that were not to blame -- queued, preempted, or running on a core an
  admin reset -- are run again.
* **Deadlines.**  A job that cannot finish by its deadline fails with ETIME:
  not retryable (persistent) if it cannot even on an idle device, retryable
  (transient) if the load made it miss.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import trio

from npud import drivers, targets
from npud.drivers import Binding, DeviceParams, Driver, ProgramInfo
from npud.ipc_schema.errors import ErrorCode, ErrorInfo

from .jobs import BusyWindow, Histogram, Job, JobState
from .fds import FdBudget
from .identity import device_uuid
from .memory import BufferObject, BufferRefs, DeviceMemory
from .programs import ProgramRegistry
from .device_link import DeviceFault, DeviceLost, HostLimit, Hung
from .outcomes import Failed, Finished, Outcome, Preempted, Requeue
from .scheduler import Scheduler
from .supervisor import CoreProcess

log = logging.getLogger("npud.device")

UTIL_WINDOW_S = 5.0   # util_pct is the busy share of (about) the last this many seconds
EXCHANGE_MIN_S = 1.0  # the least time a device process has to answer anything but a run


@dataclass(frozen=True)
class SchedulingParams:
    """The scheduling knobs of a device (npud/config.py [scheduling])."""

    job_timeout_s: float = 30.0
    ban_after_hangs: int = 3
    starvation_s: float = 1.0
    max_queued: int = 4096
    cores: int = 0            # device processes; 0: the preset's modeled cores
    test_mode: bool = False

    @property
    def exchange_timeout_s(self) -> float:
        """How long the device process may take over an import, a program load, a release or an
        unload before it counts as hung: the run watchdog's limit, and at least EXCHANGE_MIN_S.

        An import only maps a memfd (constant time, whatever the buffer's size: a 500 MB weights
        buffer costs what a page does) and a load reads and validates one command stream, linear
        in its length, so the watchdog's 30 s default is generous even on a loaded machine; the
        floor keeps a tight ``job_timeout_ms`` from resetting a device that is merely slow."""
        return max(self.job_timeout_s, EXCHANGE_MIN_S)


class Core:
    """One modeled core that runs one job at a time: its runner's state, and the supervisor of
    its device process (``proc``, npud/supervisor.py: its process, link, mapped buffers and
    loaded programs)."""

    proc: CoreProcess

    def __init__(self, index: int):
        self.index = index
        self.job: Job | None = None                  # running now
        self.run_since = 0.0                         # time.monotonic() its current run segment began
        self.in_run = False                          # a run request is in flight
        self.preempt_sent = False
        self.wakeup = trio.Event()
        self.control: list = []                      # ("release", bo) / ("unload", program)
        self.reset_pending = ""                      # a reset is due (an admin's, or its process died idle)

    def preempt(self) -> None:
        """Ask the device process to stop the running job at its next layer boundary."""
        link = self.proc.link
        if self.in_run and not self.preempt_sent and link is not None and link.preempt():
            self.preempt_sent = True

    def process_died(self, why: str) -> None:
        """Its process exited: restart it at once if idle, not when the next job finds it dead
        (that job would wait for the restart, and `devices` would say "ok" meanwhile).  A death
        during a job is the runner's to handle (it knows whom to blame)."""
        if self.job is None and not self.reset_pending:
            self.reset_pending = f"{why} while idle"
            self.wakeup.set()


class DeviceHost:
    def __init__(self, index: int, name: str, preset: str, config: DeviceParams,
                 on_job_done: Callable[[Job], None], params: SchedulingParams | None = None,
                 fds: FdBudget | None = None, driver: Driver | None = None):
        self.index = index
        self.driver = driver or drivers.driver()
        self.name = name
        self.preset = preset
        self.uuid = device_uuid(name, index)
        self.config = config
        self.params = params or SchedulingParams()
        self.memory = DeviceMemory(index, config.memory_bytes, config.page_size, fds=fds)
        self.refs = BufferRefs(self.forget)   # every retain/release and session charge of its buffers
        # (executable, region) -> the read-only weights buffer its loads on this device share (npud/models.py);
        # an entry goes with its buffer, so a cached executable keeps no record of a released one.
        self.shared_weights: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.hangs = 0
        self.banned: set = set()                    # contexts banned on this device
        self.jobs_completed = 0
        self.jobs_failed = 0
        self.busy_s = 0.0
        self.modeled_cycles = 0      # modeled cycles of the jobs completed since start
        self.usage = BusyWindow(UTIL_WINDOW_S)
        self.latency = Histogram()   # submission to outcome of every finished job: what clients wait
        self.run_time = Histogram()  # device time of the jobs that ran
        self.sched = Scheduler(self.params.starvation_s)
        self.cores = [self._new_core(i) for i in range(self.params.cores or config.cores)]
        self._reset_done = trio.Event()
        self._reset_done.set()
        self._on_job_done = on_job_done
        self.programs = ProgramRegistry(self._unload_everywhere)   # loaded models' streams, by id
        self._release_pending: dict[int, int] = {}  # bo id -> cores still to unmap it
        # Every device of the daemon, by index (Daemon sets it): a heterogeneous model's buffers are
        # imported by other devices' processes too, and the owner's release must reach them.
        self.peers: list[DeviceHost] = [self]

    def _new_core(self, index: int) -> Core:
        core = Core(index)
        core.proc = CoreProcess(self.index, index, self.driver, self.config, self.params.exchange_timeout_s,
                                core.process_died, label=f"{self.name}, preset {self.preset}")
        return core

    # --- what the rest of the daemon calls -------------------------------------------

    @property
    def target(self) -> targets.Target:
        """The compiler target of this device's driver (loaded on first use: a load's cache key)."""
        return targets.target(self.driver.target)

    def validate(self, stream: bytes, bindings: list[Binding]) -> ProgramInfo:
        """The driver's check of a program for this device (drivers.ProgramRejected says why not)."""
        return self.driver.validate(stream, self.config, bindings)

    @property
    def resets(self) -> int:
        """How many times its cores' processes were restarted."""
        return sum(core.proc.restarts for core in self.cores)

    @property
    def state(self) -> str:
        states = {core.proc.state for core in self.cores}
        return "ok" if states == {"ok"} else "resetting" if "resetting" in states else "down" \
            if states == {"down"} else "resetting"

    @property
    def running(self) -> Job | None:
        """A running job (the first core's), for code that predates several cores."""
        return next((core.job for core in self.cores if core.job is not None), None)

    def running_jobs(self) -> list[Job]:
        return [core.job for core in self.cores if core.job is not None]

    def submit(self, job: Job) -> None:
        """Make a job runnable (its buffers and program held since it was queued, its dependencies
        done); never blocks."""
        job.device = self.index
        self.sched.push(job)
        self._kick(job)

    def unload_model(self, session, model) -> None:
        """A loaded model goes: its weights and arena are refunded to ``session`` and released (jobs
        still running keep them alive), and its program goes once those jobs end."""
        self.refs.drop_all(session, model.fixed)
        model.fixed = []
        self.programs.remove(model.program)

    def forget(self, bo: BufferObject) -> None:
        """A buffer's last reference is gone: unmap it in the device processes, then free it."""
        self.memory.uncharge(bo)  # its memory is available again now, not once the runners get to it
        holders = [core for device in self.peers for core in device.cores if bo.id in core.proc.imported]
        if not holders:
            self.memory.release(bo)
            return
        self._release_pending[bo.id] = len(holders)
        for core in holders:
            core.control.append(("release", bo))
            core.wakeup.set()

    @property
    def jobs_queued(self) -> int:
        return len(self.sched)

    def estimate_s(self, job: Job) -> float:
        """Device time a job is expected to take on an idle device (measured, else modeled)."""
        return self.expected_s(job.program, job.estimate_s)

    def expected_s(self, program: int | None, modeled_s: float) -> float:
        """Device time a run of ``program`` (None: a raw stream) is expected to take on an idle
        device: the measured time of earlier runs, or the modeled time if longer."""
        return max(modeled_s, self.programs.expected_wall_s(program))

    def busy_now(self, now: float) -> float:
        """Core-seconds spent executing jobs, counting the running segments' time so far.

        Never decreases: a running segment counts from ``run_since``, the instant its time
        in ``busy_s`` is measured from once it ends (so a resumed preempted job's time
        waiting in the queue is not device time)."""
        return self.busy_s + sum(self.running_s(now, lambda job: True))

    def running_s(self, now: float, which: Callable[[Job], bool]) -> list[float]:
        """Seconds so far of the running segments of the jobs ``which`` accepts."""
        return [now - core.run_since for core in self.cores if core.job is not None and which(core.job)]

    def modeled_busy_ms(self) -> float:
        """The completed jobs' modeled cycles at this device's clock."""
        return self.modeled_cycles / (self.config.clock_mhz * 1e3)

    async def reset_now(self, why: str) -> None:
        """Restart every device process (admin reset); returns once they are back.

        Jobs running on them are innocent: they run again from their start.
        """
        self._reset_done = trio.Event()
        for core in self.cores:
            core.reset_pending = why
            if core.in_run:
                core.proc.kill()   # the runner sees the device lost, requeues the job and resets
            core.wakeup.set()
        await self._reset_done.wait()

    def info(self) -> dict:
        now = time.monotonic()
        return {
            "index": self.index, "name": self.name, "uuid": self.uuid, "preset": self.preset, "state": self.state,
            "driver": self.driver.name, "driver_version": self.driver.version,
            "params": self.config.to_dict(), "memory_total": self.memory.total,
            "memory_used": self.memory.used, "jobs_queued": self.jobs_queued,
            "jobs_running": len(self.running_jobs()), "jobs_completed": self.jobs_completed,
            "jobs_failed": self.jobs_failed, "busy_ms": self.busy_now(now) / len(self.cores) * 1e3,
            "resets": self.resets, "cores": len(self.cores), "hangs": self.hangs,
            "banned_contexts": len(self.banned),
            **self.compute_info(),
            "latency_ms": self.latency.info(), "run_ms": self.run_time.info(),
            **self.usage_info(now),
        }

    def compute_info(self) -> dict:
        """The kernels its device processes run and the most threads any of their pools uses,
        once a process has said (in its ``ready``)."""
        started = [core.proc.link for core in self.cores if core.proc.link is not None and core.proc.link.kernels]
        if not started:
            return {}
        return {"kernels": "; ".join(sorted({link.kernels for link in started})),
                "compute_threads": max((n for link in started for n in link.threads.values()), default=1),
                "prepared_bytes": sum(core.proc.prepared_bytes for core in self.cores)}

    def usage_info(self, now: float) -> dict:
        return {"util_pct": self.usage.pct(now, self.busy_now(now), len(self.cores)),
                "util_window_s": UTIL_WINDOW_S, "modeled_cycles": self.modeled_cycles,
                "modeled_busy_ms": self.modeled_busy_ms()}

    # --- scheduling ------------------------------------------------------------------

    def _kick(self, job: Job) -> None:
        """A job became runnable: wake an idle core, else preempt a lower-priority one."""
        idle = [core for core in self.cores if core.job is None]
        if idle:
            waiting = [core for core in idle if not core.wakeup.is_set()]
            (waiting or idle)[0].wakeup.set()
            return
        victims = [core for core in self.cores if core.job is not None and core.in_run
                   and core.job.program is not None and not core.preempt_sent
                   and core.job.context.priority < job.context.priority]
        if victims:
            min(victims, key=lambda c: c.job.context.priority).preempt()

    def complete(self, job: Job, *, stats: dict | None = None, error: ErrorInfo | None = None) -> None:
        """The one way a job of this device ends, whatever it got to: done (``stats``) or failed
        (``error``), run or not.  Wakes its waiters and fences and releases its buffers
        (``on_job_done``); a job that was made runnable also leaves the scheduler, its program's
        count of users and the device's counters.  A job already finished is left as it is."""
        if job.state not in ("queued", "running"):
            return
        if job.program is not None:   # held since it was queued (run or not)
            uninterrupted = error is None and job.preemptions == 0 and job.started
            self.programs.release(job.program, job.busy_s if uninterrupted else None)
        if not job.ready_since:   # never runnable (waiting for, or failed by, its dependencies)
            job.finish(stats=stats, error=error)
            self._on_job_done(job)
            return
        self.sched.finished(job)
        if error is None:
            self.jobs_completed += 1
            self.modeled_cycles += int((stats or {}).get("cycles", 0))
        else:
            self.jobs_failed += 1
        job.finish(stats=stats, error=error)
        self.latency.observe((job.finished - job.submitted) * 1e3)
        if job.started:
            self.run_time.observe(job.busy_s * 1e3)
        self._on_job_done(job)

    def _unload_everywhere(self, program: int) -> None:
        """A program is gone from the registry: the cores that loaded it unload it."""
        for core in self.cores:
            if program in core.proc.loaded:
                core.control.append(("unload", program))
                core.wakeup.set()

    def ban(self, ctx, why: str) -> None:
        if ctx.banned:
            return
        ctx.banned = why
        self.banned.add(ctx)
        log.error("device %d: context %d of session %s banned: %s", self.index, ctx.id, ctx.session_id, why,
                  extra={"device": self.index, "session": ctx.session_id, "context": ctx.id})
        for job in self.sched.drop_context(ctx):
            self.complete(job, error=_banned_error(job, ctx))

    # --- the runners -------------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the device processes until cancelled; reports started once they are up."""
        try:
            for core in self.cores:
                await core.proc.start()
            async with trio.open_nursery() as nursery:
                for core in self.cores:
                    core.proc.nursery = nursery
                    core.proc.watch()
                    nursery.start_soon(self._core_loop, core)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                for core in self.cores:
                    core.proc.nursery = None
                    await core.proc.stop()
                self.memory.close()

    async def _core_loop(self, core: Core) -> None:
        while True:
            core.wakeup = trio.Event()
            if core.reset_pending:
                await self._reset(core, core.reset_pending)
                continue
            if core.control:
                await self._do_control(core, core.control.pop(0))
                continue
            job = self.sched.pick(time.monotonic())
            if job is None:
                if core.proc.awaiting_ready:   # idle: hear its ready now, so `devices` can tell its kernels
                    await self._greet(core)
                    continue
                await core.wakeup.wait()
                continue
            await self._run_job(core, job)

    async def _greet(self, core: Core) -> None:
        """Wait for a new idle process's ``ready`` (a process that never says it is reset)."""
        try:
            await core.proc.greet()
        except DeviceFault as exc:
            await self._reset(core, str(exc))

    async def _do_control(self, core: Core, item) -> None:
        kind, what = item
        try:
            if kind == "release":
                await core.proc.release(what)
            else:
                await core.proc.unload_program(what)
        except DeviceFault as exc:
            await self._reset(core, str(exc))
        finally:
            if kind == "release":
                self._owner(what)._core_released(what)

    def _owner(self, bo: BufferObject) -> "DeviceHost":
        """The device whose memory ``bo`` is (this one's processes may have imported another's)."""
        return self.peers[bo.device] if bo.device < len(self.peers) else self

    def _core_released(self, bo: BufferObject) -> None:
        """One core (of any device) has unmapped ``bo``; the memory goes once every core has."""
        left = self._release_pending.get(bo.id, 1) - 1
        if left <= 0:
            self._release_pending.pop(bo.id, None)
            self.memory.release(bo)
        else:
            self._release_pending[bo.id] = left

    async def _run_job(self, core: Core, job: Job) -> None:
        """Run (or resume) ``job`` on ``core`` unless it may not run now, and settle its outcome."""
        now = time.monotonic()
        refusal = self._refusal(job, now)
        if refusal is not None:
            return self.complete(job, error=refusal)
        if job.state == JobState.QUEUED:
            job.state = JobState.RUNNING
            job.started = now
        core.job = job
        core.run_since = time.monotonic()
        try:
            outcome = await self._attempt(core, job)
        finally:
            wall = time.monotonic() - core.run_since
            job.busy_s += wall
            self.busy_s += wall
            if job.session is not None:
                job.session.charge_busy(self.index, wall)
            core.job = None
            core.in_run = False
            core.preempt_sent = False
        self._settle(job, outcome)

    def _refusal(self, job: Job, now: float) -> ErrorInfo | None:
        """Why ``job`` may not run (any more): banned, cancelled, or unable to make its deadline."""
        if job.context.banned:
            return _banned_error(job, job.context)
        if job.cancel or (job.session is not None and job.session.closed):
            return ErrorInfo.of(ErrorCode.ECANCELED, job.cancel or "the session closed")
        if job.deadline:
            left = self.estimate_s(job) * (1 - job.segment / self.programs.segments(job.program))
            if now + left > job.deadline:
                return ErrorInfo.of(
                    ErrorCode.ETIME, f"job {job.id} missed its deadline: {max(0.0, job.deadline - now) * 1e3:.1f} ms "
                    f"were left and it needs about {left * 1e3:.1f} ms (transient: the device was busy; "
                    "retry, or give it a later deadline or a higher priority)", True)
        return None

    def _settle(self, job: Job, outcome: Outcome) -> None:
        """Map a run's outcome onto its job: the one place a run decides whether the job ends
        (``complete``), runs again from its start, or resumes at a layer boundary."""
        match outcome:
            case Requeue():
                job.segment = 0
                self.sched.push(job, front=True)
            case Preempted(next_segment):
                job.segment = next_segment
                job.preemptions += 1
                if job.cancel or (job.session is not None and job.session.closed):
                    return self.complete(job, error=ErrorInfo.of(ErrorCode.ECANCELED,
                                                                job.cancel or "the session closed"))
                if job.deadline and time.monotonic() > job.deadline:
                    return self.complete(job, error=ErrorInfo.of(
                        ErrorCode.ETIME, f"job {job.id} missed its deadline after {job.segment} layer segment(s) "
                        "(transient: the device was busy; retry, or give it a later deadline or a higher priority)",
                        True))
                self.sched.push(job, front=True)
                self._kick(job)
            case Finished(stats):
                self.complete(job, stats={**stats, "wall_ms": job.busy_s * 1e3, "preemptions": job.preemptions,
                                          "queue_ms": (job.started - job.submitted) * 1e3})
            case Failed(error):
                self.complete(job, error=error)

    async def _attempt(self, core: Core, job: Job) -> Outcome:
        """One run of ``job`` on ``core``, whatever happens to it, as an outcome.  A process found
        dead or silent before the job reached it is restarted and the job run there."""
        try:
            try:
                return await self._execute(core, job)
            except DeviceFault as exc:
                if exc.delivered:
                    raise
                # The process died or hung before this job reached it (e.g. killed or stopped
                # while idle): the job is innocent, so restart the process and run it there.
                await self._reset(core, str(exc))
                return await self._execute(core, job)
        except DeviceFault as exc:
            return await self._device_fault(core, job, exc)
        except HostLimit as exc:  # the device is fine: only this job cannot reach it
            return Failed(_job_error(job, exc.code, str(exc), exc.retryable))

    async def _device_fault(self, core: Core, job: Job, exc: DeviceFault) -> Outcome:
        """The one classification of a device fault during a job: whose it is (the job's, blamed
        towards a ban, or nobody's), what the job gets, and the core's reset."""
        why = str(exc)
        if isinstance(exc, DeviceLost) and core.reset_pending:   # an admin reset killed it: the job is innocent
            why = core.reset_pending
            outcome = Requeue(why)
        elif not exc.delivered:   # twice, on two processes, before the job ran: the device, not the job
            hung = isinstance(exc, Hung)
            what = "did not answer while the job was being prepared" if hung else "was lost before the job reached it"
            outcome = _fault(job, f"device {self.index}'s process {what}, again after a reset ({exc})",
                             "ETIMEDOUT" if hung else "EIO", retryable=True)
        elif isinstance(exc, DeviceLost):
            outcome = _fault(job, f"the device process crashed while running it ({exc})", "EIO")
            self._blame(job, f"crashed device {self.index}'s process")
        else:   # Hung running it
            outcome = _fault(job, f"it ran past its timeout and was aborted; device {self.index}'s "
                                  "process was reset", "ETIMEDOUT", retryable=False)
            self._blame(job, f"hung device {self.index} (ran past its timeout)")
            why = f"job {job.id} of session {job.session_id} hung"
        await self._reset(core, why)
        return outcome

    def _blame(self, job: Job, what: str) -> None:
        ctx = job.context
        ctx.hangs += 1
        self.hangs += 1
        if ctx.hangs >= self.params.ban_after_hangs:
            self.ban(ctx, f"its jobs {what} {ctx.hangs} times (ban_after_hangs = {self.params.ban_after_hangs})")

    async def _execute(self, core: Core, job: Job) -> Outcome:
        """Import the job's buffers and load its program where the core's process lacks them, send
        its run and wait for the reply (preempting it at its deadline); the reply as an outcome."""
        for bo, _va, _w in job.bindings:
            await core.proc.import_buffer(bo)
        run = {"op": "run", "job": job.id,
               "bindings": [[bo.id, va, writable] for bo, va, writable in job.bindings]}
        if job.program is None:
            run["stream"] = job.stream
        else:
            if job.program not in core.proc.loaded:
                entry = self.programs[job.program]
                reply = await core.proc.load_program(job.program, entry.stream, entry.mappings,
                                                     entry.boundaries[:-1])
                if not reply["ok"]:
                    return _reply_failure(job, reply["error"])
            run["program"] = job.program
            run["from"] = job.segment
        if job.fault:
            run.update(job.fault)
            if job.fault["fault"] != "slow":
                job.fault = None   # a hang or crash hits one run; slow lasts for all its layers
        reply = await self._run_request(core, job, msgpack.packb(run, use_bin_type=True))
        spent = reply.get("wall_ms", 0.0) / 1e3
        if job.timeout_s:
            job.timeout_s = max(job.timeout_s - spent, 1e-3)
        cycles = int(reply.get("cycles", 0))
        job.cycles_run += cycles
        self.sched.charge(job.context, cycles)
        if not reply["ok"]:
            return _reply_failure(job, reply["error"])
        if not reply.get("done", True):   # preempted at a layer boundary
            return Preempted(reply["next"])
        return Finished(reply["stats"])

    async def _run_request(self, core: Core, job: Job, data: bytes) -> dict:
        """Send a packed run request and wait for its reply: Hung past the job's timeout; at the
        job's deadline (or when someone more urgent waits) the run is asked to stop at a boundary."""
        link = core.proc.link
        await link.send(data, "run")
        core.in_run = True
        core.preempt_sent = False
        if self.sched.highest_waiting() > job.context.priority and job.program is not None:
            core.preempt()   # someone more urgent arrived while we were getting ready
        timeout_at = time.monotonic() + (job.timeout_s or self.params.job_timeout_s)
        while True:
            wake_at = timeout_at
            if job.deadline and not core.preempt_sent and job.program is not None:
                wake_at = min(wake_at, job.deadline)
            reply = await link.reply_by(wake_at, "run")
            if reply is not None:
                core.in_run = False
                return reply
            if time.monotonic() >= timeout_at:
                raise Hung(f"job {job.id} ran past its timeout")
            core.preempt()   # the deadline passed: stop at the next boundary

    # --- device processes --------------------------------------------------------------

    async def _reset(self, core: Core, why: str) -> None:
        """Restart a core's process (counted), then drop what waited on the old one: buffers
        waiting for it to unmap them are unmapped now."""
        await core.proc.restart(why)
        for kind, what in core.control:
            if kind == "release":
                self._owner(what)._core_released(what)
        core.control.clear()
        core.reset_pending = ""
        if not any(c.reset_pending for c in self.cores):
            self._reset_done.set()


def _job_error(job: Job, code: str, message: str, retryable: bool | None, command: int | None = None) -> ErrorInfo:
    """A job's failure as the client sees it (a code the daemon does not know is EIO)."""
    known = ErrorCode(code) if code in ErrorCode.__members__ else ErrorCode.EIO
    where = f" (command {command})" if command is not None else ""
    return ErrorInfo.of(known, f"job {job.id} failed{where}: {message}", retryable)


def _reply_failure(job: Job, error: dict) -> Failed:
    """A device process's refusal of a job (its reply's ``error``)."""
    return Failed(_job_error(job, error["code"], error["message"], error.get("retryable"), error.get("command")))


def _fault(job: Job, what: str, code: str, retryable: bool | None = None) -> Failed:
    """A job failed by a device fault."""
    return Failed(_job_error(job, code, f"{what}; submit it again if it is not to blame", retryable))


def _banned_error(job: Job, ctx) -> ErrorInfo:
    return ErrorInfo.of(ErrorCode.EPERM, f"job {job.id} cannot run: context {ctx.id} of this session was banned "
                                         f"because {ctx.banned}; create a new context, and fix the jobs that hang")
