"""The programs registered on one device: loaded models' validated streams, run by id.

A program is registered at load (``add``), held by every job that runs it from the moment the job
is queued -- waiting on fences included -- until it ends (``retain``/``release``), and goes
once its model was unloaded (``remove``) and its last job ended; ``on_drop`` then has the device
processes that loaded it unload it.  It also keeps what the scheduler learns of each program: the
expected wall time of a run (measured, an exponentially weighted mean of uninterrupted runs).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

EWMA = 0.3            # weight of the newest run in a program's expected wall time


@dataclass(eq=False)
class Program:
    stream: bytes
    mappings: list                    # [(va, size, writable, immutable)] it was validated against
    boundaries: list[int]             # the command count at the end of each layer (preemption points)
    users: int = 0                    # jobs holding it
    removed: bool = False             # its model was unloaded: it goes with its last job
    wall_s: float | None = field(default=None)   # expected wall time of a run (None: none measured)


class ProgramRegistry:
    def __init__(self, on_drop: Callable[[int], None]):
        self._programs: dict[int, Program] = {}
        self._ids = itertools.count(1)
        self._on_drop = on_drop

    def __contains__(self, program: int) -> bool:
        return program in self._programs

    def __len__(self) -> int:
        return len(self._programs)

    def __getitem__(self, program: int) -> Program:
        return self._programs[program]

    def add(self, stream: bytes, mappings: list, boundaries: list[int] | None = None) -> int:
        """Register a validated stream; its id."""
        program = next(self._ids)
        self._programs[program] = Program(stream, mappings, list(boundaries or []))
        return program

    def remove(self, program: int) -> None:
        """Its model is unloaded: it goes now if no job holds it, else with the last one."""
        entry = self._programs.get(program)
        if entry is not None:
            entry.removed = True
            self._drop_if_unused(program, entry)

    def retain(self, program: int) -> None:
        """A job that runs it was queued."""
        self._programs[program].users += 1

    def release(self, program: int, wall_s: float | None = None) -> None:
        """A job that held it ended; ``wall_s``: its wall time, if it ran uninterrupted and succeeded."""
        entry = self._programs.get(program)
        if entry is None:
            return
        entry.users -= 1
        if wall_s is not None:
            entry.wall_s = wall_s if entry.wall_s is None else (1 - EWMA) * entry.wall_s + EWMA * wall_s
        self._drop_if_unused(program, entry)

    def expected_wall_s(self, program: int | None) -> float:
        entry = self._programs.get(program) if program is not None else None
        return entry.wall_s or 0.0 if entry is not None else 0.0

    def segments(self, program: int | None) -> int:
        """How many segments a run of it may stop between (1 for an unknown program)."""
        entry = self._programs.get(program) if program is not None else None
        # boundaries end each layer, the last one included: a layer is a segment
        return max(1, len(entry.boundaries)) if entry is not None else 1

    def _drop_if_unused(self, program: int, entry: Program) -> None:
        if entry.removed and entry.users <= 0:
            del self._programs[program]
            self._on_drop(program)
