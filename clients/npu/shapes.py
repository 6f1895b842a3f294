"""Dynamic shapes: a model with symbolic dimensions, specialised per shape signature.

The daemon compiles a model for fixed shapes.  A load reply says which dimensions the model
declares symbolic (``tensor_info.symbolic``, protocol 1.7); a run whose feeds fit the declared
dimensions but not the loaded shapes loads, once, a specialisation compiled with
``input_shapes`` for them.  ``Specialisations`` keeps one model's loaded signatures: the one
the caller loaded (never evicted) and the last ``SIGNATURES_KEPT`` others, least recently run
evicted first (unloaded, with the executions made on them closed).  ``Model.run``/``submit``/
``execution`` and ``npu.InferenceSession`` all go through it, so both keep one record.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from npud.ipc_schema.errors import ErrorCode

from .errors import error

SIGNATURES_KEPT = 8
"""Specialisations kept loaded per model besides the one loaded first."""

Shapes = tuple[tuple[int, ...], ...]   # one shape per input, in the model's input order


@dataclass
class Signature:
    """One compiled shape signature of a model: its shapes, what loading it cost (``compile_ms``,
    ``cached``: whether the daemon's compile cache had it) and how many runs used it (``hits``)."""

    shapes: Shapes
    model: Any = field(repr=False)
    compile_ms: float
    cached: bool
    hits: int = 0
    executions: list = field(default_factory=list, repr=False)

    def as_dict(self, names: list[str]) -> dict[str, Any]:
        return {"shapes": {n: list(s) for n, s in zip(names, self.shapes)}, "compile_ms": self.compile_ms,
                "cached": self.cached, "hits": self.hits, "model": self.model.id}


class Specialisations:
    """One model's loaded shape signatures, and what it takes to load another: the model's
    source (a path, or its bytes), the daemon's digest of it and the load's other options."""

    def __init__(self, base: Any, source: Any, options: dict[str, Any], digest: bytes | None,
                 kept: int | None = None):
        self.base = base
        self.source = source
        self.options = {k: v for k, v in options.items() if k != "input_shapes"}
        self.digest = digest
        self.kept = SIGNATURES_KEPT if kept is None else kept
        self.names = [t.name for t in base.inputs]
        self.dims = [t.dims or t.shape for t in base.inputs]   # an input with no symbolic dims has none
        self.evicted = 0
        # Threads may share a model: the table's changes are made under this lock, never held
        # across a request (so a trio task never blocks the loop on it).
        self._lock = threading.Lock()
        self._loaded: OrderedDict[Shapes, Signature] = OrderedDict()
        self._loaded[base.signature] = Signature(base.signature, base, base.compile_ms, base.cached)

    def signature(self, shapes: dict[str, tuple[int, ...]]) -> Shapes:
        """The signature of feeds with these shapes: EINVAL, naming the input, the dimension and
        both sizes, if one contradicts a fixed dimension (or the rank) the model declares."""
        for name, dims in zip(self.names, self.dims):
            check_fits(name, dims, shapes[name])
        return tuple(tuple(int(d) for d in shapes[name]) for name in self.names)

    def get(self, shapes: Shapes, run: bool = True) -> Any:
        """The model loaded for ``shapes`` (a hit, if it is for a ``run``), or None."""
        with self._lock:
            entry = self._loaded.get(shapes)
            if entry is None:
                return None
            entry.hits += run
            if entry.model is not self.base:
                self._loaded.move_to_end(shapes)
            return entry.model

    def load_options(self, shapes: Shapes) -> dict[str, Any]:
        """The ``load`` options that compile the model for ``shapes``."""
        return {**self.options, "input_shapes": {n: list(s) for n, s in zip(self.names, shapes)}}

    def add(self, shapes: Shapes, model: Any, run: bool = True) -> tuple[Any, list[Signature]]:
        """Keep ``model``, just loaded for ``shapes``: returns the model to run (an earlier one if
        another thread or task loaded the same signature meanwhile) and the signatures to unload
        (``model`` itself then, or the least recently run beyond ``kept``)."""
        entry = Signature(shapes, model, model.compile_ms, model.cached, hits=int(run))
        with self._lock:
            known = self._loaded.get(shapes)
            if known is not None:
                known.hits += run
                return known.model, [entry]
            self._loaded[shapes] = entry
            others = [s for s, e in self._loaded.items() if e.model is not self.base]
            out = [self._loaded.pop(old) for old in others[:max(0, len(others) - self.kept)]]
            self.evicted += len(out)
            return model, out

    def attach(self, model: Any, execution: Any) -> None:
        """Close ``execution`` when ``model``'s signature is evicted."""
        with self._lock:
            for entry in self._loaded.values():
                if entry.model is model:   # (the closed ones dropped: a model may make many)
                    entry.executions[:] = [e for e in entry.executions if not e._closed] + [execution]

    def take_all(self) -> list[Signature]:
        """Every signature but the base's, forgotten (the base model is being unloaded)."""
        with self._lock:
            out = [e for e in self._loaded.values() if e.model is not self.base]
            self._loaded = OrderedDict((s, e) for s, e in self._loaded.items() if e.model is self.base)
            return out

    def report(self) -> list[dict[str, Any]]:
        """Every loaded signature, the base first then least to most recently run."""
        with self._lock:
            return [e.as_dict(self.names) for e in self._loaded.values()]


def check_fits(name: str, dims: tuple[int | str, ...], shape: tuple[int, ...]) -> None:
    """EINVAL unless ``shape`` fits declared ``dims`` (ints fixed, strings symbolic)."""
    if len(shape) != len(dims):
        raise error(ErrorCode.EINVAL, f"input {name!r} has {len(shape)} dimensions {list(shape)}; the model "
                                      f"declares {len(dims)}: {list(dims)}")
    for i, (want, got) in enumerate(zip(dims, shape)):
        if isinstance(want, int) and want != got:
            raise error(ErrorCode.EINVAL, f"input {name!r} dimension {i} is fixed at {want} by the model; "
                                          f"the feed has {got} (shape {list(shape)}; declared {list(dims)})")
