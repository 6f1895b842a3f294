"""Sessions: what one connected client holds, and the table that finds it.

A session is born with HELLO and keyed by the ZeroMQ routing id of the
connection that sent it.  Its names for buffers and jobs (handles) are its own:
handle 1 of one session and handle 1 of another are different objects, and no
request can name another session's.  A session ends with BYE, when its
companion socket closes (the client process is gone), or when it has neither a
companion socket nor sent anything for a lease period.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from .job_table import SessionJobs
from .jobs import BusyWindow, Job
from .memory import BufferObject
from .ordering import Sequencer
from .scheduler import Context

if TYPE_CHECKING:
    from .models import LoadedModel

USERS_TRACKED = 4096       # uids with usage totals of their own; jobs of any further uid count under -1
UTIL_WINDOW_S = 5.0        # as npud.devices.UTIL_WINDOW_S


@dataclass(eq=False)
class Session:
    id: str
    routing_id: bytes
    name: str
    claimed_pid: int
    token: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    created: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    uid: int = -1            # from the kernel (the ZAP handler's SO_PEERCRED), or a CURVE key's policy entry
    pid: int = 0
    gid: int = -1
    identity: Any = None     # npud.policy.Identity of the connection that sent HELLO
    user_id: str = ""        # its ZAP User-Id: every request of the session must carry the same
    attach: trio.socket.SocketType | None = None
    attach_lock: trio.Lock = field(default_factory=trio.Lock)
    attach_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    buffers: dict[int, BufferObject] = field(default_factory=dict)
    models: dict[int, "LoadedModel"] = field(default_factory=dict)
    memory: int = 0
    jobs: SessionJobs = field(init=False)   # by id: unfinished `Job`s, the last finished ones kept compact
    jobs_in_flight: int = 0
    jobs_submitted: int = 0
    jobs_completed: int = 0
    jobs_failed: int = 0
    busy_s: dict[int, float] = field(default_factory=dict)  # device -> core-seconds of its ended run segments
    modeled_cycles: int = 0      # modeled cycles of its completed jobs
    usage: dict[int, BusyWindow] = field(default_factory=dict)   # device -> its utilisation window there
    closed: bool = False
    contexts: dict[int, Context] = field(default_factory=dict)   # 0: the default context (normal)
    imported: dict[int, Job] = field(default_factory=dict)       # fence_import: other sessions' jobs
    faults: dict[int, list] = field(default_factory=dict)        # inject_fault (test mode): device -> faults
    compile_faults: dict[int, list] = field(default_factory=dict)  # slow_compile (test mode): device -> faults
    order: Sequencer = field(default_factory=Sequencer)  # its requests on one object run in the order sent
    _next_handle: int = 1
    _next_job: int = 1

    def __post_init__(self) -> None:
        self.jobs = SessionJobs(self.id, self.name)

    def new_handle(self) -> int:
        handle, self._next_handle = self._next_handle, self._next_handle + 1
        return handle

    def new_job_id(self) -> int:
        job_id, self._next_job = self._next_job, self._next_job + 1
        return job_id

    def remember_job(self, job: Job) -> None:
        self.jobs.add(job)

    def keep_finished(self, job: Job) -> None:
        """Keep a finished job as a compact record (npud/job_table.py); a job the session no
        longer keeps stays forgotten."""
        self.jobs.keep_finished(job)

    def command(self) -> str:
        """The client's command line as this daemon's PID namespace shows it."""
        if self.pid <= 0:
            return ""
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                return f.read(4096).replace(b"\0", b" ").decode("utf-8", "replace").strip()[:256]
        except OSError:
            return ""

    def charge_busy(self, device: int, seconds: float) -> None:
        """A run segment of one of its jobs on ``device`` ended after ``seconds`` of device time."""
        self.busy_s[device] = self.busy_s.get(device, 0.0) + seconds

    def busy_on(self, device, now: float) -> float:
        """Core-seconds its jobs took on ``device``, counting its running segments so far."""
        return self.busy_s.get(device.index, 0.0) + sum(
            device.running_s(now, lambda job: job.session_id == self.id))

    def window(self, device: int) -> BusyWindow:
        """Its utilisation window on ``device``: it was idle there from its start until the first sample."""
        if device not in self.usage:
            self.usage[device] = BusyWindow(UTIL_WINDOW_S, now=self.created, busy=0.0)
        return self.usage[device]

    def devices_used(self) -> set[int]:
        """Devices it ran jobs on or holds memory (buffers, models) on."""
        return (set(self.busy_s) | {bo.device for bo in self.buffers.values()}
                | {model.device for model in self.models.values()})

    def usage_info(self, now: float, devices) -> dict:
        """Busy time and utilisation per device it uses (npud/ipc_schema/usage.py) and their sums."""
        used = self.devices_used()
        per_device = []
        for device in devices:
            busy = self.busy_on(device, now)
            if device.index in used or busy > 0:
                per_device.append({"device": device.index, "busy_ms": busy * 1e3,
                                   "util_pct": self.window(device.index).pct(now, busy, len(device.cores))})
        return {"busy_ms": sum(d["busy_ms"] for d in per_device),
                "util_pct": sum(d["util_pct"] for d in per_device), "devices": per_device,
                "modeled_cycles": self.modeled_cycles, "jobs_in_flight": self.jobs_in_flight,
                "models": len(self.models)}

    def info(self) -> dict:
        return {
            "session": self.id, "pid": self.pid, "uid": self.uid, "name": self.name,
            "command": self.command(), "attached": self.attach is not None,
            "buffers": len(self.buffers), "memory": self.memory,
            "jobs_submitted": self.jobs_submitted, "jobs_completed": self.jobs_completed,
            "jobs_failed": self.jobs_failed, "connected_s": time.monotonic() - self.created,
        }


class SessionTable:
    def __init__(self):
        self._by_routing: dict[bytes, Session] = {}
        self._by_id: dict[str, Session] = {}
        self._per_uid: Counter[int] = Counter()
        self._counted_as: dict[str, int] = {}   # the uid each session is counted under (attach may learn it later)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self):
        return iter(list(self._by_id.values()))

    def create(self, routing_id: bytes, name: str, claimed_pid: int, identity=None) -> Session:
        session = Session(id=f"s{os.getpid():x}-{secrets.token_hex(6)}", routing_id=routing_id,
                          name=name, claimed_pid=claimed_pid)
        if identity is not None:   # what the kernel (or a CURVE key) says, not what HELLO claims
            session.identity, session.user_id = identity, identity.user_id()
            session.uid, session.gid, session.pid = identity.uid, identity.gid, identity.pid
        self._by_routing[routing_id] = session
        self._by_id[session.id] = session
        self._per_uid[session.uid] += 1
        self._counted_as[session.id] = session.uid
        return session

    def by_routing(self, routing_id: bytes) -> Session | None:
        return self._by_routing.get(routing_id)

    def by_id(self, session_id: str) -> Session | None:
        return self._by_id.get(session_id)

    def of_uid(self, uid: int) -> list[Session]:
        """Every session of a user (per-uid quotas add these up)."""
        return [s for s in self._by_id.values() if s.uid == uid]

    def count_of_uid(self, uid: int) -> int:
        """How many sessions a user has open (the per-uid session quota counts these)."""
        return self._per_uid[uid]

    def remove(self, session: Session) -> None:
        self._by_routing.pop(session.routing_id, None)
        if self._by_id.pop(session.id, None) is not None:
            uid = self._counted_as.pop(session.id)
            self._per_uid[uid] -= 1
            if not self._per_uid[uid]:
                del self._per_uid[uid]


class UsageByUid:
    """Each uid's finished jobs since the daemon started, its closed sessions' included: what a
    user has used, as counters that only grow (the open sessions' figures vanish with them).
    At most ``limit`` uids are told apart (a row is ~200 bytes); the rest are summed under -1."""

    def __init__(self, limit: int = USERS_TRACKED):
        self.limit = limit
        self._rows: dict[int, list] = {}   # uid -> [jobs_completed, jobs_failed, busy_s, modeled_cycles]

    def add(self, uid: int, job: Job) -> None:
        """Count a finished job of a session of ``uid``."""
        if uid not in self._rows and len(self._rows) >= self.limit:
            uid = -1
        row = self._rows.setdefault(uid, [0, 0, 0.0, 0])
        row[1 if job.error else 0] += 1
        row[2] += job.busy_s
        row[3] += int(job.stats.get("cycles", 0))

    def info(self) -> list[dict]:
        """The schema's `user_usage` rows, by uid."""
        return [{"uid": uid, "jobs_completed": done, "jobs_failed": failed, "busy_ms": busy * 1e3,
                 "modeled_cycles": cycles} for uid, (done, failed, busy, cycles) in sorted(self._rows.items())]
