"""Jobs: one command stream submitted by a session, its bindings, and its outcome."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ipc_schema.errors import ErrorInfo

if TYPE_CHECKING:
    from .memory import BufferObject


# Sessions keep their last FINISHED_JOBS_KEPT jobs, so a job's size is paid a thousand times per
# busy session: slots save the per-instance dict.
@dataclass(eq=False, slots=True)
class Job:
    id: int                      # the session's name for it
    session_id: str
    device: int
    stream: bytes                # empty when `program` names a loaded program
    bindings: list[tuple["BufferObject", int, bool]]   # (buffer, va, writable)
    program: int | None = None   # a model's program, validated once at load
    state: str = "queued"        # queued -> running -> done | failed
    stats: dict[str, Any] = field(default_factory=dict)
    error: ErrorInfo | None = None
    submitted: float = field(default_factory=time.monotonic)
    finished: float = 0.0
    done: trio.Event = field(default_factory=trio.Event)
    started: float = 0.0         # time.monotonic() when the device began it (0: never ran)
    busy_s: float = 0.0          # device time it took (wall time of the device process)
    model: int = 0               # the session's id of the loaded model it runs (0: a raw stream)
    model_name: str = ""
    layers: list | None = None   # the model's per-op report rows (shared, not copied)
    pid: int = 0                 # the submitting client, as npuctl shows it
    client: str = ""
    # --- scheduling (npud/scheduler.py) and fences (npud/fences.py) ---
    session: Any = None          # the Session object (its `closed` cancels the job at a boundary)
    context: Any = None          # the scheduler Context it runs in (priority, weight, bans)
    point: int = 0               # its point on the context's timeline
    segment: int = 0             # next segment of its program to run (preemption resumes here)
    preemptions: int = 0
    timeout_s: float = 0.0       # device time it may still take before it is aborted as hung
    deadline: float = 0.0        # time.monotonic() by which it must finish (0: none)
    estimate_s: float = 0.0      # expected device time on an idle device
    fault: dict | None = None    # test-mode fault injection for this job
    waiting_on: int = 0          # unfinished jobs it depends on
    dependents: list = field(default_factory=list)
    cancel: str = ""             # why it is to stop at its next layer boundary
    ready_since: float = 0.0     # when it last became runnable (the starvation guard's clock)
    cycles_run: int = 0          # modeled cycles of the segments it has run

    def finish(self, stats: dict[str, Any] | None = None, error: ErrorInfo | None = None) -> None:
        self.state = "failed" if error else "done"
        self.stats = stats or {}
        self.error = error
        self.finished = time.monotonic()
        self.done.set()


class BusyWindow:
    """Utilisation over a sliding window, from samples of a growing busy-seconds counter.

    ``sample(now, busy)`` is called periodically (the daemon does it every
    ``SAMPLE_PERIOD_S``); ``pct(now, busy_now)`` is the busy time since the oldest
    sample still in the window, over the time since then, in percent.
    """

    def __init__(self, window_s: float, now: float | None = None, busy: float = 0.0):
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()
        self.sample(time.monotonic() if now is None else now, busy)

    def sample(self, now: float, busy: float) -> None:
        self._samples.append((now, busy))
        while len(self._samples) > 1 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def pct(self, now: float, busy_now: float, ceiling: float = 100.0) -> float:
        t0, b0 = self._samples[0]
        if now - t0 <= 1e-3:
            return 0.0
        return max(0.0, min(ceiling, 100.0 * (busy_now - b0) / (now - t0)))


class TraceRing:
    """The last ``capacity`` finished jobs, for `npuctl trace`: bounded memory, numbered events.

    Each event is a small dict (the model's layer rows are shared references to
    the executable's report, not copies).  ``since(seq)`` returns the events
    after ``seq`` and how many of those were already overwritten.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._events: deque[dict] = deque(maxlen=capacity)
        self.last_seq = 0

    def add(self, event: dict) -> None:
        self.last_seq += 1
        event["seq"] = self.last_seq
        self._events.append(event)

    def since(self, seq: int, limit: int) -> tuple[list[dict], int]:
        first = self._events[0]["seq"] if self._events else self.last_seq + 1
        dropped = max(0, first - seq - 1) if seq < self.last_seq else 0
        out = [e for e in self._events if e["seq"] > seq][:limit]
        return out, dropped
