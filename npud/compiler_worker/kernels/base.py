"""What every kernel family shares: the :class:`Emitter` (a StreamBuilder that orders engines),
the planning :class:`Ctx`, the :class:`Plan` base, tile helpers and the fused epilogue.

Conventions: every activation is float32 unless a kernel says otherwise; SRAM tiles are dense and
64-byte aligned; each kernel loads operands with strided DMA straight from the tensors' physical
layout, computes in SRAM and stores the result, so a tile is ``dma_load``s -> compute -> epilogue
-> ``dma_store``.  Kernels prefer the largest tiles that fit (few commands: the emulator's
per-command overhead is what small tiles cost).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from npud.emulator.assembler import StreamBuilder
from npud.emulator.isa import WINDOW_BASE as WINDOW
from npud.emulator.isa import tile as mk_tile

from ..errors import CompileError
from ..lowered import PTensor

ALIGN = 64
F32 = "float32"
I8, I32 = "int8", "int32"


def al(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


def pad4(shape) -> tuple:
    shape = tuple(int(s) for s in shape)
    return (1,) * (4 - len(shape)) + shape


class Emitter:
    """A StreamBuilder that orders engines automatically: whenever the next
    command runs on a different queue than the previous one, it first
    signals/waits, so the stream is a correct sequential program with no
    SRAM hazards.  Tracks DMA bytes per LOp for the report."""

    def __init__(self, config, pt: dict) -> None:
        self.sb = StreamBuilder(config)
        self.config = config
        self.pt = pt
        self.last = None
        self.dma_bytes = 0

    def _q(self, eng: str) -> None:
        if self.last is not None and self.last != eng:
            self.sb.sync(self.last, eng)
        self.last = eng

    def va(self, name: str, elem_off: int = 0) -> int:
        t = self.pt[name]
        return t.va + elem_off * t.esize

    def load(self, sram: int, name: str, off: int, shape, strides) -> None:
        """DMA a strided region of tensor `name` (in its own dtype) into SRAM."""
        self._dma(self.sb.dma_load, sram, name, off, shape, strides)

    def store(self, sram: int, name: str, off: int, shape, strides) -> None:
        """DMA an SRAM tile out to a strided region of tensor `name`."""
        self._dma(self.sb.dma_store, sram, name, off, shape, strides)

    def _dma(self, emit, sram: int, name: str, off: int, shape, strides) -> None:
        self._q("dma")
        t = self.pt[name]
        es = t.esize
        shape = pad4(shape)
        st = (0,) * (4 - len(strides)) + tuple(int(s) * es for s in strides)
        self.dma_bytes += math.prod(shape) * es
        emit(sram, self.va(name, off), t.dtype, shape, st)

    def window(self, name: str, shape) -> int:
        """Bind the weight window to const tensor `name` (dense, `shape`): the MAC
        reads it in place from device memory, no SRAM copy.  Returns the window address."""
        self._q("dma")
        t = self.pt[name]
        shape = pad4(shape)
        self.dma_bytes += math.prod(shape) * t.esize
        self.sb.dma_map(WINDOW, self.va(name), t.dtype, shape)
        return WINDOW

    def mac(self, fn, *a, **k):
        self._q("mac")
        getattr(self.sb, fn)(*a, **k)

    def vec(self, fn, *a, **k):
        self._q("vector")
        getattr(self.sb, fn)(*a, **k)

    def pool(self, *a, **k):
        self._q("pool")
        self.sb.pool(*a, **k)

    def end(self) -> bytes:
        self.sb.end()
        return self.sb.build()


def T(addr, shape, dtype=F32):
    return mk_tile(addr, dtype, pad4(shape))


def tiles(shape, block):
    for origin in itertools.product(*[range(0, s, b) for s, b in zip(shape, block)]):
        yield origin, [min(b, s - o) for s, b, o in zip(shape, block, origin)]


def choose_block(shape, bpe: int, budget: int):
    """Largest tile of `shape` (only the innermost 4 dims > 1) whose
    elements cost `bpe` SRAM bytes each within `budget`."""
    r = len(shape)
    block = [1] * r
    inner = 1
    for d in reversed(range(r)):
        if r - d > 4:
            break
        if inner * shape[d] * bpe <= budget:
            block[d] = shape[d]
            inner *= shape[d]
        else:
            block[d] = max(1, budget // (inner * bpe))
            if inner * bpe > budget:
                raise CompileError(f"a single row of {inner} elements does not fit SRAM "
                                   f"({budget} bytes)")
            break
    return block


def collapse(shape, *stride_sets):
    """Drop size-1 dims and merge dims that are contiguous in every stride set."""
    dims = [(s, [st[i] for st in stride_sets]) for i, s in enumerate(shape) if s != 1]
    out = []
    for s, sts in dims:
        if out:
            ps, psts = out[-1]
            if all(p == c * s for p, c in zip(psts, sts)):
                out[-1] = (ps * s, sts)
                continue
        out.append((s, sts))
    if not out:
        out = [(1, [0 for _ in stride_sets])]
    shape = [s for s, _ in out]
    return shape, [[sts[k] for _, sts in out] for k in range(len(stride_sets))]


def sub4(v):
    return list(v)[-4:]


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A kernel's tiling decision: made by its ``plan_X`` in the tiling pass, read (never
    recomputed) by its ``emit_X``.  ``sram`` is the working set the tiling pass checks against
    the target's SRAM and the report shows."""
    sram: int


class Ctx:
    """What kernels may use while planning: the config, SRAM budget, tensors."""

    def __init__(self, config, pt) -> None:
        self.config = config
        self.S = config.sram_bytes
        self.pt = pt

    def add_const(self, name: str, value: np.ndarray, dtype="float32") -> str:
        base, i = name, 0
        while name in self.pt:
            i += 1
            name = f"{base}#{i}"
        # Not copied when it is of that type already (a view: conv weight blocks): the memory
        # pass copies every constant into the weights blob, whatever its strides.
        v = np.asarray(value, np.dtype(dtype))
        self.pt[name] = PTensor(name, tuple(v.shape), kind="const", const=v, logical=tuple(v.shape),
                                dtype=np.dtype(dtype).name)
        return name


# --- epilogue -----------------------------------------------------------------------------
def emit_epilogue(em: Emitter, steps, out_addr, tshape, slot, load_other):
    """Apply fused steps to the out tile in SRAM.  load_other(name, sram) loads
    the matching tile of a same-shape operand."""
    ot = T(out_addr, tshape)
    for st in steps:
        if st[0] == "act":
            _, func, p0, p1 = st
            em.vec("vunary", func, ot, ot, p0, p1)
        else:
            _, func, name, swap = st
            load_other(name, slot)
            o = T(slot, tshape)
            em.vec("vbinary", func, o if swap else ot, ot if swap else o, ot)


def epi_slots(steps) -> int:
    return 1 if any(s[0] == "bin" for s in steps) else 0


def band_rows(ohb: int, sh: int, dh: int, kh: int) -> int:
    """Input rows a band of ``ohb`` output rows reads (stride ``sh``, dilation ``dh``, kernel ``kh``)."""
    return (ohb - 1) * sh + dh * (kh - 1) + 1
