"""The DMA engine: device memory <-> SRAM, strided up to 4-D, via the MMU."""

from __future__ import annotations


import numpy as np

from ..errors import IndexFault
from ..isa import DType
from ..mmu import _Scatter, footprint
from .common import view


def _local(cmd, sram: np.ndarray) -> np.ndarray:
    """The SRAM side of a DMA descriptor, as a dense array of its dtype and shape."""
    a = cmd.args
    return np.ndarray(a.shape, DType(a.dtype).np, buffer=sram, offset=a.sram)


def _transfer(mem, local: np.ndarray, write: bool) -> None:
    """Copy SRAM -> device memory (`write`) or back; `mem` a view or a _Scatter."""
    if isinstance(mem, _Scatter):
        if write:
            mem.write(local)
        else:
            np.copyto(local, mem.read())
    elif write:
        np.copyto(mem, local)
    else:
        np.copyto(local, mem)


def _run(job, cmd, write: bool) -> None:
    a = cmd.args
    local = _local(cmd, job.sram[cmd.core])
    mem = job.mmu.view(a.va, local.dtype, a.shape, a.strides, write=write,
                       command_index=cmd.index, what=cmd.op.name)
    _transfer(mem, local, write)


def dma_load(job, cmd) -> None:
    _run(job, cmd, False)


def _bind(job, cmd, mem) -> None:
    """Bind weight window ``cmd.args.sram`` to device memory `mem` (a view, read in place;
    a region crossing buffer objects is gathered once)."""
    if isinstance(mem, _Scatter):
        mem = mem.read()
    job.windows[cmd.core][cmd.args.sram] = mem


def dma_map(job, cmd) -> None:
    a = cmd.args
    dt = DType(a.dtype).np
    _bind(job, cmd, job.mmu.view(a.va, dt, a.shape, a.strides, write=False,
                                 command_index=cmd.index, what=cmd.op.name))


def dma_store(job, cmd) -> None:
    _run(job, cmd, True)


def dma_gather(job, cmd) -> None:
    """sram[o, j, :] = table[o, idx[j], :] over the strided table at va; IndexFault (EINVAL)
    naming the first index outside [-rows, rows) before anything is written."""
    a = cmd.args
    dt = DType(a.dtype).np
    idx = view(job.sram[cmd.core], a.idx).reshape(-1).astype(np.int64)
    bad = (idx < -a.rows) | (idx >= a.rows)
    if bad.any():
        j = int(np.argmax(bad))
        raise IndexFault(f"gather index {int(idx[j])} at position {j} is out of range for "
                         f"{a.rows} rows (valid: {-a.rows}..{a.rows - 1}) in command {cmd.index} "
                         f"(dma_gather)", command_index=cmd.index)
    idx = np.where(idx < 0, idx + a.rows, idx)
    table = job.mmu.view(a.va, dt, (a.outer, a.rows, a.row), (a.outer_stride, a.row_stride, dt.itemsize),
                         write=False, command_index=cmd.index, what=cmd.op.name)
    if isinstance(table, _Scatter):
        table = table.read()
    out = np.ndarray((a.outer, len(idx), a.row), dt, buffer=job.sram[cmd.core], offset=a.sram)
    np.take(table, idx, axis=1, out=out)


def _prepare(cmd, sram: np.ndarray, write: bool):
    """A step running one DMA command, its SRAM view made once.  Its device-memory side is
    translated at each run: the daemon gives every run a context (and page table) of its own."""
    a = cmd.args
    local = _local(cmd, sram)
    span = footprint(local.dtype, a.shape, a.strides)

    def step(job) -> None:
        mem = job.mmu.view(a.va, local.dtype, a.shape, a.strides, write=write,
                           command_index=cmd.index, what=cmd.op.name, span=span)
        _transfer(mem, local, write)
    return step


EXECUTORS = {"dma_load": dma_load, "dma_store": dma_store, "dma_map": dma_map, "dma_gather": dma_gather}
PREPARE = {"dma_load": lambda cmd, sram: _prepare(cmd, sram, False),
           "dma_store": lambda cmd, sram: _prepare(cmd, sram, True)}
