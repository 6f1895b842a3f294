"""Which job a device core runs next: priorities, fair share, starvation guard.

Every session's work runs in *contexts* (``Context``): a priority class (low,
normal, high, realtime), a weight, a timeline of fence points and a hang
count.  A device keeps one run queue per context with runnable jobs (FIFO
within a context) and picks, whenever a core is free:

1. **Starvation guard.**  A job of a lower class that has been runnable for
   longer than ``starvation_ms`` runs next (the oldest such job), so strict
   priority never starves a class for good.
2. **Strict priority** between classes: the highest class with a runnable job.
3. **Weighted fair share** within the class: the context with the least
   *virtual time* (modeled device cycles it was charged, divided by its
   weight) -- start-time fair queueing.  A context that becomes runnable
   again starts at the class's virtual clock, so idling earns no credit.

Jobs of one loaded model share its arena (intermediate tensors), so while one
of them has run some layers and not finished (preempted), no other job of the
same program starts: ``owner`` holds the arena's current job.

Preemption itself happens in the device (npud/emulator/device_process.py): a model
job is a sequence of layer segments and the device stops at a boundary when
asked; the device host asks when a job of a higher class becomes runnable and
no core is free.  This module only orders work; it never waits.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from npud.ipc_schema.schema import PRIORITY_NAMES

# A context's class is an index into this tuple: a higher index runs first.
PRIORITIES = PRIORITY_NAMES
NORMAL = PRIORITIES.index("normal")
_context_ids = itertools.count(1)


@dataclass(eq=False)
class Context:
    """A hardware context of a session: where its jobs queue, and with what priority."""

    id: int                      # the session's handle for it
    session_id: str
    priority: int = NORMAL       # index into PRIORITIES
    weight: int = 1
    hangs: int = 0               # jobs of it that hung or crashed a device process
    banned: str = ""             # why it may no longer run jobs ("" if it may)
    issued: int = 0              # last timeline point handed out
    signalled: int = 0           # every point <= this has finished
    finished_points: set = field(default_factory=set)
    uid: int = field(default_factory=lambda: next(_context_ids))   # daemon-wide, for logs

    @property
    def priority_name(self) -> str:
        return PRIORITIES[self.priority]

    def next_point(self) -> int:
        self.issued += 1
        return self.issued

    def point_finished(self, point: int) -> None:
        """Advance the timeline: ``signalled`` is the highest point with every earlier one finished."""
        self.finished_points.add(point)
        while self.signalled + 1 in self.finished_points:
            self.signalled += 1
            self.finished_points.discard(self.signalled)

    def info(self) -> dict:
        return {"context": self.id, "priority": self.priority_name, "weight": self.weight,
                "hangs": self.hangs, "banned": bool(self.banned), "issued": self.issued,
                "signalled": self.signalled}


class Scheduler:
    """The run queues of one device (all its cores pick from here)."""

    def __init__(self, starvation_s: float):
        self.starvation_s = starvation_s
        self.queues: dict[Context, deque] = {}
        self.vtime: dict[Context, float] = {}
        self.clock = [0.0] * len(PRIORITIES)    # per class: virtual time of the last pick
        self.owner: dict[int, object] = {}      # program -> the job whose layers are in its arena
        self.starvation_picks = 0

    def __len__(self) -> int:
        return sum(1 for q in self.queues.values() for job in q if _live(job))

    def push(self, job, *, front: bool = False) -> None:
        """Make a job runnable (``front``: it ran before and keeps its place in its context)."""
        ctx = job.context
        queue = self.queues.get(ctx)
        if queue is None:
            queue = self.queues[ctx] = deque()
            self.vtime[ctx] = max(self.vtime.get(ctx, 0.0), self.clock[ctx.priority])
        job.ready_since = time.monotonic()
        if front:
            queue.appendleft(job)
        else:
            queue.append(job)

    def highest_waiting(self) -> int:
        """The highest priority class with a runnable job (-1 if none)."""
        best = -1
        for ctx, queue in self.queues.items():
            if ctx.priority > best and any(_live(j) for j in queue):
                best = ctx.priority
        return best

    def pick(self, now: float):
        """The next job to run on a free core, or None; the job leaves its queue."""
        heads = []
        for ctx in list(self.queues):
            queue = self.queues[ctx]
            while queue and not _live(queue[0]):
                queue.popleft()
            if not queue:
                del self.queues[ctx]
                continue
            job = queue[0]
            holder = self.owner.get(job.program) if job.program is not None else None
            if holder is not None and holder is not job:
                continue  # its model's arena holds another job's layers: FIFO within the context waits
            heads.append((ctx, job))
        if not heads:
            return None
        top = max(ctx.priority for ctx, _ in heads)
        starving = [(ctx, job) for ctx, job in heads
                    if ctx.priority < top and now - job.ready_since > self.starvation_s]
        if starving:
            ctx, job = min(starving, key=lambda cj: cj[1].ready_since)
            self.starvation_picks += 1
        else:
            ctx, job = min(((c, j) for c, j in heads if c.priority == top),
                           key=lambda cj: (self.vtime[cj[0]], cj[1].ready_since))
        self.queues[ctx].popleft()
        if not self.queues[ctx]:
            del self.queues[ctx]
        self.clock[ctx.priority] = max(self.clock[ctx.priority], self.vtime[ctx])
        if job.program is not None:
            self.owner[job.program] = job
        return job

    def charge(self, ctx: Context, cycles: int) -> None:
        """Account modeled device cycles a context's job used (its fair-share debt)."""
        self.vtime[ctx] = self.vtime.get(ctx, self.clock[ctx.priority]) + cycles / max(ctx.weight, 1)
        if len(self.vtime) > 4096:   # forget idle contexts (they restart at the class clock anyway)
            for stale in [c for c in self.vtime if c not in self.queues][:2048]:
                del self.vtime[stale]

    def finished(self, job) -> None:
        """A job left the device for good: its model's arena is free for the next job."""
        if job.program is not None and self.owner.get(job.program) is job:
            del self.owner[job.program]

    def forget(self, contexts) -> None:
        """Contexts whose session closed: drop their fair-share clocks (those with jobs still
        queued keep theirs until the jobs leave; ``charge`` bounds what remains)."""
        for ctx in contexts:
            if ctx not in self.queues:
                self.vtime.pop(ctx, None)

    def drop_context(self, ctx: Context) -> list:
        """Remove a context's queued jobs (it was banned); returns them."""
        queue = self.queues.pop(ctx, deque())
        return [job for job in queue if _live(job)]


def _live(job) -> bool:
    return job.state in ("queued", "running")
