"""The emulated NPU: SRAM per core, hardware contexts with page tables, and
the command processor that runs validated programs on the engines."""

from __future__ import annotations

import itertools
import weakref

import numpy as np

from .config import DeviceConfig
from .engines import prepare
from .errors import DeviceError
from .isa import WINDOW_BASE, DType, Engine
from .mmu import Mapping, PageTable
from .timing import JobStats
from .validator import Program, validate

__all__ = ["Context", "Device", "JobStats", "Mapping"]


class Context:
    """A hardware context: one address space (page table) on one device."""

    def __init__(self, device: "Device", hw_id: int) -> None:
        self.device = device
        self.hw_id = hw_id
        self._pt = PageTable(device.config.page_size)
        self.closed = False
        # A context dropped without close() still returns its hardware slot.
        self._release = weakref.finalize(self, device._release_id, hw_id)

    def map(self, va: int, buffer, *, writable: bool) -> None:
        """Map a whole buffer (page-aligned length) at page-aligned `va`.
        ValueError on misalignment or overlap with an existing mapping."""
        self._check_open()
        self._pt.map(va, buffer, writable=writable)

    def unmap(self, va: int) -> None:
        """Remove the mapping starting at `va`; drops the emulator's reference to its buffer."""
        self._check_open()
        self._pt.unmap(va)

    def mappings(self) -> list[Mapping]:
        return self._pt.mappings()

    def close(self) -> None:
        """Release the hardware context and every mapping (idempotent)."""
        if not self.closed:
            self.closed = True
            self._pt = PageTable(self.device.config.page_size)
            self._release()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("context is closed")

    def __repr__(self) -> str:
        return f"<Context {self.hw_id} of {self.device.config.preset}>"


_preparations = itertools.count()


def frozen_weights(commands, immutable: tuple) -> list:
    """Per command: the ``(va, end)`` its weights come from if it is a MAC command whose ``w`` is
    a weight window that a ``dma_map`` earlier in `commands` (same core, same window address: the
    binding it reads when it runs) bound wholly inside one of the `immutable` [va, end) ranges,
    else None.  Such weights are the same bytes in every run while the program is loaded.  A
    window bound before `commands` (an earlier segment) counts as mutable: correct, only slower."""
    frozen, bound = [], {}
    for cmd in commands:
        a = cmd.args
        if immutable and cmd.op.name == "dma_map":
            end = a.va + DType(a.dtype).np.itemsize * int(np.prod(a.shape))
            inside = any(lo <= a.va and end <= hi for lo, hi in immutable)
            bound[cmd.core, a.sram] = (a.va, end) if inside else None
        w = getattr(a, "w", None) if cmd.op.engine == Engine.MAC else None
        frozen.append(bound.get((cmd.core, w.addr)) if w is not None and w.addr >= WINDOW_BASE else None)
    return frozen


class _Job:
    """What engines may touch while running one job: SRAM, the MMU, and per
    core the weight windows (address -> device memory view) dma_map bound."""
    __slots__ = ("sram", "mmu", "windows")

    def __init__(self, sram, mmu, windows) -> None:
        self.sram, self.mmu, self.windows = sram, mmu, windows


class Device:
    """One emulated NPU.  Devices share nothing: host as many as you like."""

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self._hash = config.target_hash()
        self._sram = [np.zeros(config.sram_bytes, dtype=np.uint8) for _ in range(config.cores)]
        self._free_ids = list(range(config.hw_contexts))
        self._dirty = [0] * config.cores   # SRAM bytes the last job may have written
        self._windows = [{} for _ in range(config.cores)]

    def create_context(self) -> Context:
        """A fresh context with an empty page table; DeviceError(EBUSY) when
        all ``hw_contexts`` are in use (close one first)."""
        if not self._free_ids:
            raise DeviceError(f"all {self.config.hw_contexts} hardware contexts are in use",
                              code="EBUSY")
        return Context(self, self._free_ids.pop(0))

    def _release_id(self, hw_id: int) -> None:
        self._free_ids.append(hw_id)
        self._free_ids.sort()

    def prepare(self, program: Program) -> tuple[tuple, tuple]:
        """(commands, steps): the program's queued commands and, for each, the
        step that runs it on this device, made once per program and device and
        reused by every run (views, DMA translations and kernel plans made at
        preparation).  Control commands are scheduling only: they have no step.

        A MAC command whose weights window is bound to immutable memory (see
        :func:`frozen_weights`) gets a step that keeps its weights pre-arranged
        for as long as the program's steps live: until :meth:`forget`."""
        cached = program.prepared.get("steps")
        if cached is None or cached[0] is not self._sram:
            commands = tuple(c for c in program.commands if c.op.engine != Engine.CTRL)
            # steps reading one immutable binding share one pre-arranged copy of this preparation
            this = next(_preparations)
            frozen = [f and (this, *f) for f in frozen_weights(commands, program.immutable)]
            cached = (self._sram, commands,
                      tuple(prepare(c, self._sram, frozen=f) for c, f in zip(commands, frozen)))
            program.prepared["steps"] = cached
        return cached[1], cached[2]

    @staticmethod
    def forget(program: Program) -> None:
        """Drop the program's prepared steps, and with them every weight they keep pre-arranged
        (the program is unloaded: its immutable memory may now change)."""
        program.prepared.clear()

    def execute(self, ctx: Context, program_or_stream, *, continues: bool = False) -> JobStats:
        """Run one job in `ctx`.  Bytes are validated first against
        ``ctx.mappings()`` (StreamError on refusal).  Returns the job's
        counters; raises PageFault (EFAULT) or DeviceError if the job fails,
        after which the device and every context remain usable.

        ``continues=True`` runs the next part of the job that the previous
        ``execute`` ran, in the same context (a model's layers, run one
        segment at a time so that they can be preempted): its SRAM is not
        cleared, because nothing of another job or context can be in it."""
        if not isinstance(ctx, Context) or ctx.device is not self or ctx.closed:
            raise DeviceError("context does not belong to this device or is closed", code="EINVAL")
        if isinstance(program_or_stream, Program):
            program = program_or_stream
            if program.target_hash != self._hash:
                raise DeviceError("program was validated for another target", code="EINVAL")
        else:
            program = validate(program_or_stream, self.config, ctx.mappings())
        # SRAM starts every job zeroed: nothing leaks between jobs or contexts.
        # Only what the previous job could have written needs clearing.
        if continues:
            self._dirty = [max(a, b) for a, b in zip(self._dirty, program.sram_used)]
        else:
            for core, s in enumerate(self._sram):
                if self._dirty[core]:
                    s[:self._dirty[core]] = 0
            self._dirty = list(program.sram_used)
            for bound in self._windows:     # as SRAM: no binding survives into another job
                bound.clear()
        job = _Job(self._sram, ctx._pt, self._windows)
        try:
            commands, steps = self.prepare(program)
        except Exception as e:  # as below: a bug (or a kernel library failing) fails the job
            raise DeviceError(f"internal error preparing the program: {type(e).__name__}: {e}",
                              code="EIO") from e
        i = 0
        try:
            with np.errstate(all="ignore"):
                for i, step in enumerate(steps):
                    step(job)
        except DeviceError:
            raise
        except Exception as e:  # an emulator bug must fail the job, not the device
            cmd = commands[i]
            raise DeviceError(f"internal error in command {cmd.index} ({cmd.op.name}): "
                              f"{type(e).__name__}: {e}", code="EIO",
                              command_index=cmd.index) from e
        return program.stats.copy()
