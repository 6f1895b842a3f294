"""Jobs: one command stream submitted by a session, its bindings, and its outcome."""

from __future__ import annotations

import bisect
import struct
import time
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from npud.ipc_schema.errors import ErrorInfo
from npud.ipc_schema.usage import util_pct

if TYPE_CHECKING:
    from .memory import BufferObject


class JobState(StrEnum):
    """queued -> running -> done | failed.  A str: the wire, `jobs` and `trace` carry its value."""

    QUEUED = "queued"        # waiting on fences, or in a run queue
    RUNNING = "running"      # on a core, or preempted between segments
    DONE = "done"
    FAILED = "failed"


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
    state: JobState = JobState.QUEUED
    packed_stats: bytes = b""    # its stats, msgpack-encoded (see `stats`)
    error: ErrorInfo | None = None
    submitted: float = field(default_factory=time.monotonic)
    finished: float = 0.0
    done: trio.Event = field(default_factory=trio.Event)
    started: float = 0.0         # time.monotonic() when the device began it (0: never ran)
    busy_s: float = 0.0          # device time it took (wall time of the device process)
    model: int = 0               # the session's id of the loaded model it runs (0: a raw stream)
    model_name: str = ""
    layers: bytes | list | None = None   # what `trace` shows of its model's layers (compact_layers; shared)
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
    chain: Any = None            # the run of a heterogeneous model it is part of (npud/hetero.py RunChain)

    @property
    def stats(self) -> dict[str, Any]:
        """The device's counters of the finished job ({} before it finished or if it failed).

        A session keeps its last 1024 finished jobs: as a dict (and a nested one) with keys
        of their own these took ~460 bytes a job, packed ~150."""
        return msgpack.unpackb(self.packed_stats) if self.packed_stats else {}

    def finish(self, stats: dict[str, Any] | None = None, error: ErrorInfo | None = None) -> None:
        """Record the outcome and wake every waiter.  The job's own event is then replaced by one
        shared, already set event: a kept job need not carry an event (~270 bytes) of its own.
        It lets go of its session (needed only while it may run): a session and its kept jobs
        referencing each other were a cycle, freed only by a full garbage collection, minutes
        after the session closed."""
        self.state = JobState.FAILED if error else JobState.DONE
        self.session = None
        self.packed_stats = msgpack.packb(stats) if stats else b""
        self.error = error
        self.finished = time.monotonic()
        self.done.set()
        self.done = FINISHED


FINISHED = trio.Event()   # the `done` of every finished job (set: waiting on it returns at once)
FINISHED.set()


# A kept job's numbers, packed ahead of its stats in one bytes object: failed, device, pid, model,
# preemptions, submitted, started, finished, busy_s.
_KEPT_HEAD = struct.Struct("<?iiqidddd")


class KeptJob:
    """A finished job as its session keeps it, for a late `wait`/`wait_jobs`, the `jobs` listing,
    fences (a job naming it in ``after``, ``fence_export``) and `cancel` (a no-op now).  The
    session's table (npud/job_table.py) stores its fields in columns and makes one of these for
    each reader that asks.  Holds no bindings, stream, session or per-op report; reads like the
    finished `Job` it was to every reader."""

    __slots__ = ("id", "session_id", "client", "model_name", "context", "error", "_packed")
    done = FINISHED            # finished: waiting returns at once
    dependents = ()            # a finished job gains no dependents (npud/fences.py depend)
    layers = None              # the trace ring keeps what `trace` shows of them
    session = None
    cancel = ""

    @staticmethod
    def pack(job: Job) -> bytes:
        """The finished job's numbers and stats, as `of` reads them back."""
        return _KEPT_HEAD.pack(job.state == "failed", job.device, job.pid, job.model, job.preemptions,
                               job.submitted, job.started, job.finished, job.busy_s) + job.packed_stats

    @classmethod
    def of(cls, job_id: int, session_id: str, client: str, model_name: str, context, error,
           packed: bytes) -> "KeptJob":
        """The kept job with these fields and `pack`'s bytes."""
        kept = cls.__new__(cls)
        kept.id, kept.session_id, kept.client = job_id, session_id, client
        kept.model_name, kept.context, kept.error, kept._packed = model_name, context, error, packed
        return kept

    def _head(self) -> tuple:
        return _KEPT_HEAD.unpack_from(self._packed)

    state = property(lambda self: JobState.FAILED if self._packed[0] else JobState.DONE)
    device = property(lambda self: self._head()[1])
    pid = property(lambda self: self._head()[2])
    model = property(lambda self: self._head()[3])
    preemptions = property(lambda self: self._head()[4])
    submitted = property(lambda self: self._head()[5])
    started = property(lambda self: self._head()[6])
    finished = property(lambda self: self._head()[7])
    busy_s = property(lambda self: self._head()[8])
    packed_stats = property(lambda self: self._packed[_KEPT_HEAD.size:])
    stats = Job.stats


class BusyWindow:
    """Utilisation over a sliding window, from samples of a growing busy core-seconds counter.

    ``sample(now, busy)`` is called periodically (the daemon does it every
    ``SAMPLE_PERIOD_S``); ``pct(now, busy_now, cores)`` is the busy time since the
    oldest sample still in the window, as npud/ipc_schema/usage.py defines utilisation.
    """

    def __init__(self, window_s: float, now: float | None = None, busy: float = 0.0):
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()
        self.sample(time.monotonic() if now is None else now, busy)

    def sample(self, now: float, busy: float) -> None:
        self._samples.append((now, busy))
        while len(self._samples) > 1 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def pct(self, now: float, busy_now: float, cores: int = 1) -> float:
        t0, b0 = self._samples[0]
        if now - t0 <= 1e-3:
            return 0.0
        return util_pct(busy_now - b0, now - t0, cores)



# Upper bounds of the job-time histograms, in ms: from a tiny command stream (~0.1 ms) to the
# watchdog's default 30 s; slower jobs fall in the implicit +Inf bucket.
LATENCY_BOUNDS_MS = (0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)


class Histogram:
    """Counts of durations in fixed buckets since the daemon started: constant memory and O(log buckets)
    per observation, whatever the job rate, so Prometheus can compute percentiles from it."""

    def __init__(self, bounds_ms: tuple = LATENCY_BOUNDS_MS):
        self.bounds_ms = tuple(float(b) for b in bounds_ms)
        self._counts = [0] * len(self.bounds_ms)   # per bucket (not cumulative); +Inf is count - sum
        self.count = 0
        self.sum_ms = 0.0

    def observe(self, ms: float) -> None:
        """Count one duration (negative clock noise counts as 0)."""
        ms = max(0.0, ms)
        self.count += 1
        self.sum_ms += ms
        i = bisect.bisect_left(self.bounds_ms, ms)   # the first bound >= ms
        if i < len(self._counts):
            self._counts[i] += 1

    def info(self) -> dict:
        """The schema's `histogram`: cumulative counts per upper bound, as Prometheus buckets are."""
        cumulative, total = [], 0
        for n in self._counts:
            total += n
            cumulative.append(total)
        return {"bounds_ms": list(self.bounds_ms), "counts": cumulative, "count": self.count,
                "sum_ms": self.sum_ms}

# What `trace` shows of a layer (npud/handlers.py trace); the rest of a model's per-op report
# stays with the executable.
LAYER_NODE_CHARS = 1024
LAYER_OP_CHARS = 256
RECENT_REPORTS = 64   # per-op reports whose compact form the ring remembers (events of one model share it)


def compact_layers(rows) -> bytes:
    """A per-op report as ``trace`` shows it: (node, op, cycles) per layer, msgpack-encoded in one
    object.  Holds no reference to the report, so the ring does not keep an unloaded model's
    report (or its strings) alive."""
    return msgpack.packb([(str(r.get("node", ""))[:LAYER_NODE_CHARS], str(r.get("op", ""))[:LAYER_OP_CHARS],
                           int(r.get("cycles", 0))) for r in rows])


# Room per event in the ring's columns; an event with more values of a kind is kept as a dict.
RING_FLOATS, RING_INTS, RING_OBJECTS = 6, 10, 10
_INT64 = (-(1 << 63), 1 << 63)


class TraceRing:
    """The last ``capacity`` finished jobs, for `npuctl trace`: bounded memory, numbered events.

    The events live in columns allocated once: floats and integers in arrays, other values
    (strings the daemon holds anyway, a model's ``compact_layers``) as references in a list, and
    each event's keys as a tuple shared by every event of that shape.  So recording an event
    allocates nothing that outlives it: long-lived small objects made under load were what kept
    the allocator's arenas from being returned once the clients left.  A model's layers are never
    its own report.  ``since(seq)`` returns the events after ``seq`` as dicts (layers as a list of
    {node, op, cycles}) and how many of those were already overwritten.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._seq = array("q", bytes(8 * capacity))
        self._floats = array("d", bytes(8 * RING_FLOATS * capacity))
        self._ints = array("q", bytes(8 * RING_INTS * capacity))
        self._objects: list = [None] * (RING_OBJECTS * capacity)
        self._shapes: list = [None] * capacity                 # per slot: its event's shape
        self._known: dict[tuple, tuple] = {}                   # shapes seen, shared
        # id(report) -> (report, its compact form), newest last: an id is reused only after its
        # report is freed, and the entry holds the report, so a hit is that very report.
        self._recent: OrderedDict[int, tuple[object, bytes]] = OrderedDict()
        self.last_seq = 0

    def add(self, event: dict) -> None:
        self.last_seq += 1
        slot = (self.last_seq - 1) % self.capacity
        self._seq[slot] = self.last_seq
        if "layers" in event:
            event = {**event, "layers": self._compact(event["layers"])}
        shape = tuple((key, _kind(value)) for key, value in event.items())
        counts = [sum(1 for _k, kind in shape if kind == want) for want in "fio"]
        if counts[0] > RING_FLOATS or counts[1] > RING_INTS or counts[2] > RING_OBJECTS:
            self._shapes[slot] = dict(event)    # an odd event: kept as it is
            return
        shape = self._known.setdefault(shape, shape)
        if len(self._known) > 256:   # shapes are few; never let odd ones pile up
            self._known = {shape: shape}
        self._shapes[slot] = shape
        f, i, o = slot * RING_FLOATS, slot * RING_INTS, slot * RING_OBJECTS
        for (key, kind), value in zip(shape, event.values()):
            if kind == "f":
                self._floats[f] = value
                f += 1
            elif kind == "i":
                self._ints[i] = value
                i += 1
            else:
                self._objects[o] = value
                o += 1
        end = (slot + 1) * RING_OBJECTS
        while o < end and self._objects[o] is not None:   # what an earlier event left in the slot
            self._objects[o] = None
            o += 1

    def _compact(self, layers) -> bytes:
        if isinstance(layers, bytes):
            return layers
        hit = self._recent.get(id(layers))
        if hit is not None and hit[0] is layers:
            self._recent.move_to_end(id(layers))
            return hit[1]
        compact = compact_layers(layers)
        self._recent[id(layers)] = (layers, compact)
        if len(self._recent) > RECENT_REPORTS:
            self._recent.popitem(last=False)
        return compact

    def _event(self, slot: int) -> dict:
        shape = self._shapes[slot]
        if isinstance(shape, dict):
            event = dict(shape)
        else:
            f, i, o = slot * RING_FLOATS, slot * RING_INTS, slot * RING_OBJECTS
            event = {}
            for key, kind in shape:
                if kind == "f":
                    event[key], f = self._floats[f], f + 1
                elif kind == "i":
                    event[key], i = self._ints[i], i + 1
                else:
                    event[key], o = self._objects[o], o + 1
        if "layers" in event:
            event["layers"] = [{"node": node, "op": op, "cycles": cycles}
                               for node, op, cycles in msgpack.unpackb(event["layers"])]
        event["seq"] = self._seq[slot]
        return event

    def since(self, seq: int, limit: int) -> tuple[list[dict], int]:
        first = max(1, self.last_seq - self.capacity + 1)
        dropped = max(0, first - seq - 1) if seq < self.last_seq else 0
        start = max(seq + 1, first)
        stop = min(self.last_seq, start + max(0, limit) - 1)
        return [self._event((n - 1) % self.capacity) for n in range(start, stop + 1)], dropped

    def held_reports(self) -> int:
        """How many models' own per-op reports the ring keeps alive (at most ``RECENT_REPORTS``)."""
        return len(self._recent)


def _kind(value) -> str:
    """The column a value goes to: "f" (a float), "i" (a 64-bit integer) or "o" (a reference)."""
    if type(value) is float:
        return "f"
    if type(value) is int and _INT64[0] <= value < _INT64[1]:
        return "i"
    return "o"
