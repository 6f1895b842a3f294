"""Jobs: one command stream submitted by a session, its bindings, and its outcome."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ipc_schema.errors import ErrorInfo

if TYPE_CHECKING:
    from .memory import BufferObject


@dataclass(eq=False)
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

    def finish(self, stats: dict[str, Any] | None = None, error: ErrorInfo | None = None) -> None:
        self.state = "failed" if error else "done"
        self.stats = stats or {}
        self.error = error
        self.finished = time.monotonic()
        self.done.set()
