"""The target interface: what a compiler back end implements (docs/DRIVERS.md, "Targets").

The shared front end (import, opset upgrade, folding, canonicalisation, quantisation
recognition) runs first; a target then answers, per node, whether it supports it (and if not,
why), and lowers and emits what it supports into an executable container (npud/executable),
which the target's device checks again before running it.  Targets are found through the
``npud.targets`` entry-point group (npud/plugins.py); a driver names its target.

Compiles run in the compiler workers (npud/compilers.py starts ``worker_module``), never in the
daemon: the daemon only asks a target for ``fingerprint()`` (part of every cache key), which must
not import the compiler.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from npud import plugins

GROUP = "npud.targets"


@dataclass(frozen=True)
class NodeSupport:
    """Whether a target runs one node of a model: ``reason`` says why not, for a person."""

    node: str
    op: str
    supported: bool
    reason: str = ""


class Target(ABC):
    """A compiler back end for one kind of device."""

    name: str = ""                 # the entry point's name; drivers refer to it
    worker_module: str = ""        # the process that compiles for it (started through npud.lifeline)

    @abstractmethod
    def fingerprint(self) -> str:
        """The compiler's version and a digest of everything its output depends on: a changed
        compiler must not be served executables its predecessor built.  Cheap after the first
        call, and imports no compiler module (the daemon calls it)."""

    @abstractmethod
    def support(self, model: bytes, params: dict) -> list[NodeSupport]:
        """One entry per node of the model (after the front end), in graph order.  ``params``: the
        device's ``DeviceParams.to_dict()`` (targets run in compiler workers: plain data crosses)."""

    @abstractmethod
    def compile(self, model: bytes, params: dict, options: dict) -> bytes:
        """The executable container's bytes; a CompileError naming the node on failure."""


def source_fingerprint(version: str, paths) -> str:
    """``version+digest`` of the files ``paths`` (sorted by the caller): a fingerprint that changes
    whenever the code that produces a target's output does, read as files (nothing imported)."""
    import hashlib

    h = hashlib.sha256(version.encode())
    for name, path in paths:
        h.update(str(name).encode())
        h.update(path.read_bytes())
    return f"{version}+{h.hexdigest()[:16]}"


def target(name: str) -> Target:
    """The installed target ``name`` (plugins.UnknownPlugin naming the installed ones)."""
    return plugins.load(GROUP, name, "target")


def installed() -> list[str]:
    return sorted(plugins.installed(GROUP))
