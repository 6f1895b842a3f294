"""A session's jobs: the unfinished ones as `Job` objects, the last finished ones in columns.

A session keeps its last ``FINISHED_JOBS_KEPT`` finished jobs, so that a late ``wait``, the
``jobs`` listing, fences (``after``, ``fence_export``) and ``cancel`` still find them.  Kept as
an object each (even the compact `KeptJob`: itself, its bytes and its key, ~340 bytes in ~4
small objects), a busy session's thousand kept jobs were the largest population of small
objects made under load.  CPython returns a pymalloc arena only once every block in it is free,
and these were interleaved with the long-lived objects made at the same time (compile cache
entries): the 30-minute soak's daemon kept 16 MiB of arenas the busy period needed after every
client had left (docs/RELIABILITY.md).  Here they live in a few growing columns per session --
arrays and one bytearray, large blocks that are freed whole when the session closes -- and a
`KeptJob` is made only for the reader that asks for one.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .jobs import KeptJob

if TYPE_CHECKING:
    from .jobs import Job

FINISHED_JOBS_KEPT = 1024  # per session, so that `wait` after completion still answers

# One finished job's record: `KeptJob`'s packed head and stats, behind the length of both.
# Stats longer than a slot (none of today's devices writes that much) are kept beside it.
SLOT_BYTES = 256
_LENGTH = struct.Struct("<H")
_INLINE = SLOT_BYTES - _LENGTH.size
_FIRST_SLOTS = 16   # the columns start this long and double up to the bound


class SessionJobs:
    """The jobs of one session by id, as ``Session.jobs``: a mapping-like table whose values are
    the live `Job` of an unfinished job and a fresh `KeptJob` of a finished one.

    A job enters with `add` when it is submitted and moves to the finished columns with
    `keep_finished` once the daemon has ended it; beyond ``capacity`` the oldest finished job is
    forgotten (a `wait` on it is then ENOENT).  Holds no reference to its session."""

    __slots__ = ("session_id", "client", "capacity", "_live", "_ids", "_records", "_model_names", "_contexts",
                 "_errors", "_overflow", "_oldest", "_count")

    def __init__(self, session_id: str, client: str, capacity: int = FINISHED_JOBS_KEPT):
        self.session_id = session_id
        self.client = client                  # every job of a session carries its client's name
        self.capacity = capacity
        self._live: dict[int, Job] = {}       # submitted, not yet kept (in submission order)
        self._ids = array("q")                # finished: slot -> job id
        self._records = bytearray()           # slot -> length + KeptJob's packed numbers and stats
        self._model_names: list[str] = []     # slot -> references to shared objects, no new ones
        self._contexts: list = []
        self._errors: list = []
        self._overflow: dict[int, bytes] = {}  # slot -> a record longer than a slot
        self._oldest = 0                      # the slot to reuse next once the columns are full
        self._count = 0

    # --- the two transitions ---
    def add(self, job: Job) -> None:
        """A job the session has just submitted."""
        self._live[job.id] = job

    def keep_finished(self, job: Job) -> None:
        """Keep a finished job as a record, in place of the job object; a job this table does not
        hold (already forgotten, or another session's) is left alone."""
        if self._live.get(job.id) is not job:
            return
        del self._live[job.id]
        record = KeptJob.pack(job)
        slot = self._claim_slot()
        if slot == len(self._ids):
            self._ids.append(job.id)
            self._records.extend(bytes(SLOT_BYTES))
            self._model_names.append(job.model_name)
            self._contexts.append(job.context)
            self._errors.append(job.error)
        else:
            self._ids[slot] = job.id
            self._model_names[slot], self._contexts[slot] = job.model_name, job.context
            self._errors[slot] = job.error
        self._overflow.pop(slot, None)
        start = slot * SLOT_BYTES
        if len(record) <= _INLINE:
            _LENGTH.pack_into(self._records, start, len(record))
            self._records[start + _LENGTH.size:start + _LENGTH.size + len(record)] = record
        else:
            _LENGTH.pack_into(self._records, start, 0xFFFF)
            self._overflow[slot] = record

    def _claim_slot(self) -> int:
        """The slot for the next finished job: a new one while below capacity, else the oldest."""
        if self._count < self.capacity:
            self._count += 1
            return self._count - 1
        slot, self._oldest = self._oldest, (self._oldest + 1) % self.capacity
        return slot

    # --- reading, as a dict of id -> job ---
    def get(self, job_id: int, default=None):
        """The job with this id: its `Job` while unfinished, a `KeptJob` once kept."""
        job = self._live.get(job_id)
        if job is not None:
            return job
        slot = self._slot_of(job_id)
        return default if slot is None else self._kept(slot)

    def __getitem__(self, job_id: int):
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._live or (isinstance(job_id, int) and self._slot_of(job_id) is not None)

    def __len__(self) -> int:
        return len(self._live) + self._count

    def values(self) -> Iterator:
        """Every job: the kept ones from the oldest finished, then the unfinished ones."""
        for i in range(self._count):
            yield self._kept((self._oldest + i) % self._count)
        yield from self.unfinished()

    def unfinished(self) -> list[Job]:
        """The jobs not yet kept, in submission order (a copy: ending one may change the table)."""
        return list(self._live.values())

    @property
    def kept_count(self) -> int:
        return self._count

    def _slot_of(self, job_id: int) -> int | None:
        if job_id <= 0:
            return None   # a free slot's id is never a job's (ids start at 1)
        try:
            return self._ids.index(job_id)
        except ValueError:
            return None

    def _kept(self, slot: int) -> KeptJob:
        start = slot * SLOT_BYTES
        (length,) = _LENGTH.unpack_from(self._records, start)
        record = (self._overflow[slot] if length == 0xFFFF
                  else bytes(self._records[start + _LENGTH.size:start + _LENGTH.size + length]))
        return KeptJob.of(self._ids[slot], self.session_id, self.client, self._model_names[slot],
                          self._contexts[slot], self._errors[slot], record)
