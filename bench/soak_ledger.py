"""The soak's books: what every client sent, what came back, and whether it was right.

Two levels, because the client library hides one of them:

- ``ReplyLedger`` sees every frame a session receives, before the library
  drops what it does not expect.  The client's core (``npu/core.py``) drops a reply whose
  seq it is not waiting for (taking it for the late answer to a request that
  timed out), so a reply the daemon sent twice, or a completion it reported
  twice, never reaches the caller; only a tap on the socket can count them.
- ``Tally`` is what the workload itself observed: operations and jobs by kind,
  outputs checked against their known values, errors by code, latencies.

Both are plain data per client thread (a ``Client`` belongs to one thread), so
nothing here locks; ``Tally.merge`` adds them up across threads and processes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import npu
from npud.ipc_schema import codec
from npud.ipc_schema.errors import RequestError

TERMINAL = ("done", "failed")

# The only error the soak treats as the daemon's normal answer to load: admission control
# (too many jobs in flight or queued) says EAGAIN with a retry hint, and the client retries.
EXPECTED_CODES = frozenset({"EAGAIN"})


@dataclass
class Tally:
    """What one client (or, merged, the whole soak) saw.

    ``ops[kind]`` / ``jobs[kind]`` count operations started and device jobs
    submitted; ``correct``, ``wrong``, ``failed`` (the job or op raised),
    ``lost`` (no completion within the wait timeout, nor in a last look at the
    end) and ``late`` (completed only after the wait timeout) partition the
    jobs.  ``errors`` counts error codes of every failed request or job;
    ``retried`` counts EAGAIN answers that were retried.
    """

    ops: Counter = field(default_factory=Counter)
    ops_ok: Counter = field(default_factory=Counter)
    jobs: Counter = field(default_factory=Counter)
    correct: Counter = field(default_factory=Counter)
    wrong: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    lost: Counter = field(default_factory=Counter)
    late: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    retried: int = 0
    samples: dict[str, str] = field(default_factory=dict)   # the first message of each error code / wrong kind
    latency: dict[str, list[float]] = field(default_factory=dict)
    per_client_ops: list[int] = field(default_factory=list)
    replies: Counter = field(default_factory=Counter)       # the ledgers' counts, summed

    def error(self, kind: str, exc: BaseException) -> None:
        code = getattr(exc, "code", type(exc).__name__)
        self.errors[code] += 1
        self.samples.setdefault(code, f"{kind}: {exc}"[:300])

    def check(self, kind: str, ok: bool, detail: str = "") -> bool:
        """Count one completed job as correct or wrong; returns ``ok``."""
        (self.correct if ok else self.wrong)[kind] += 1
        if not ok:
            self.samples.setdefault(f"wrong {kind}", detail[:300])
        return ok

    def took(self, kind: str, seconds: float) -> None:
        self.latency.setdefault(kind, []).append(seconds)

    @property
    def unexpected_errors(self) -> Counter:
        return Counter({code: n for code, n in self.errors.items() if code not in EXPECTED_CODES})

    def merge(self, other: "Tally") -> None:
        for name in ("ops", "ops_ok", "jobs", "correct", "wrong", "failed", "lost", "late", "errors", "replies"):
            getattr(self, name).update(getattr(other, name))
        self.retried += other.retried
        for key, text in other.samples.items():
            self.samples.setdefault(key, text)
        for kind, values in other.latency.items():
            self.latency.setdefault(kind, []).extend(values)
        self.per_client_ops.extend(other.per_client_ops)

    def problems(self) -> list[str]:
        """Every way the soak failed: wrong, lost or duplicated completions, bad replies,
        unexpected error codes.  Empty when the daemon kept every promise."""
        out = []
        for name in ("wrong", "lost"):
            if sum(getattr(self, name).values()):
                out.append(f"{name} completions: {dict(getattr(self, name))}")
        for name in ("duplicate_replies", "phantom_replies", "duplicate_completions", "reused_job_ids",
                     "mismatched_statuses"):
            if self.replies[name]:
                out.append(f"{name.replace('_', ' ')}: {self.replies[name]}")
        if self.unexpected_errors:
            out.append(f"unexpected errors: {dict(self.unexpected_errors)}")
        return out


class ReplyLedger:
    """Checks the reply stream of one session.

    Counts (in ``counts``): ``duplicate_replies`` (a seq answered twice),
    ``phantom_replies`` (a seq never sent), ``duplicate_completions`` (a job
    reported finished by two replies), ``reused_job_ids`` (submit naming a job
    id the session was already given) and ``mismatched_statuses`` (a
    ``wait_jobs`` answer listing other jobs than were asked, in another order).
    """

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._pending: dict[int, tuple[str, Any]] = {}   # seq -> (op, job id(s) it is about)
        self._answered: set[int] = set()
        self._job_ids: set[int] = set()
        self._finished: set[int] = set()

    def sent(self, seq: int, op: str, args: dict) -> None:
        self._pending[seq] = (op, args.get("job", args.get("jobs")))

    def received(self, frame: bytes) -> None:
        try:
            reply = codec.decode_reply(frame)
        except RequestError:
            return          # the library raises ProtocolMismatch for it: the op fails and is counted
        if isinstance(reply, tuple):
            return          # an event, not an answer
        if reply.seq not in self._pending:
            self.counts["duplicate_replies" if reply.seq in self._answered else "phantom_replies"] += 1
            return
        op, about = self._pending.pop(reply.seq)
        self._answered.add(reply.seq)
        self.counts["replies"] += 1
        if reply.error is not None:
            return
        result = reply.result
        if op in ("submit", "run_model"):
            if result["job"] in self._job_ids:
                self.counts["reused_job_ids"] += 1
            self._job_ids.add(result["job"])
        elif op == "wait" and result.get("state") in TERMINAL:
            self._finish(about)
        elif op == "wait_jobs":
            statuses = result.get("jobs", [])
            if [s.get("job") for s in statuses] != list(about):
                self.counts["mismatched_statuses"] += 1
            for status in statuses:
                if status.get("state") in TERMINAL:
                    self._finish(status.get("job"))

    def _finish(self, job_id: int) -> None:
        if job_id in self._finished:
            self.counts["duplicate_completions"] += 1
        self._finished.add(job_id)
        self.counts["completions"] += 1


class _TappedSocket:
    """The client's DEALER socket, with every received frame shown to a ledger first."""

    def __init__(self, sock, ledger: ReplyLedger):
        self._sock, self._ledger = sock, ledger

    def recv(self, *args, **kwargs):
        frame = self._sock.recv(*args, **kwargs)
        self._ledger.received(frame if isinstance(frame, bytes) else frame.bytes)
        return frame

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class TappedClient(npu.Client):
    """An ``npu.Client`` whose requests and replies after ``hello`` pass through a ``ReplyLedger``.

    Each job must be waited for by exactly one request that sees it finish
    (``wait``, or one ``wait_jobs``); a second one would be counted as a
    duplicate completion.  The workload keeps to that.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ledger = ReplyLedger()
        self._sock = _TappedSocket(self._sock, self.ledger)
        start = self._core.start   # where every request of both clients gets its seq (npu/core.py)

        def tapped_start(call):
            seq, frame = start(call)
            self.ledger.sent(seq, call.op, call.args or {})
            return seq, frame
        self._core.start = tapped_start
