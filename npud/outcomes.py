"""What one run of a job on a device core came to: the typed outcome npud/devices.py's runner maps
onto the job (``DeviceHost._settle``), the one place a run's result decides the job's fate."""

from __future__ import annotations

from dataclasses import dataclass

from npud.ipc_schema.errors import ErrorInfo


@dataclass(frozen=True)
class Finished:
    """The job ran to its end; ``stats`` are the device process's (the host adds its own)."""
    stats: dict


@dataclass(frozen=True)
class Failed:
    """The job ends with ``error``: the device refused or faulted it, or the host could not carry it."""
    error: ErrorInfo


@dataclass(frozen=True)
class Preempted:
    """The job stopped at a layer boundary; it resumes at segment ``next_segment``."""
    next_segment: int


@dataclass(frozen=True)
class Requeue:
    """The job was not to blame for losing its run (an admin reset): it runs again from its start."""
    why: str


Outcome = Finished | Failed | Preempted | Requeue
