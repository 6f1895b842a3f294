"""The DMA engine: device memory <-> SRAM, strided up to 4-D, via the MMU."""

from __future__ import annotations

import math

import numpy as np

from ..errors import IndexFault
from ..isa import DType
from ..mmu import _Scatter
from .common import view


def _descriptor(job, cmd):
    a = cmd.args
    dt = DType(a.dtype).np
    n = math.prod(a.shape) * dt.itemsize
    sram = np.ndarray(a.shape, dt, buffer=job.sram[cmd.core], offset=a.sram)
    return a, dt, sram, n


def dma_load(job, cmd) -> None:
    a, dt, sram, _ = _descriptor(job, cmd)
    src = job.mmu.view(a.va, dt, a.shape, a.strides, write=False,
                       command_index=cmd.index, what=cmd.op.name)
    if isinstance(src, _Scatter):
        src = src.read()
    np.copyto(sram, src)


def dma_store(job, cmd) -> None:
    a, dt, sram, _ = _descriptor(job, cmd)
    dst = job.mmu.view(a.va, dt, a.shape, a.strides, write=True,
                       command_index=cmd.index, what=cmd.op.name)
    if isinstance(dst, _Scatter):
        dst.write(sram)
    else:
        np.copyto(dst, sram)


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


EXECUTORS = {"dma_load": dma_load, "dma_store": dma_store, "dma_gather": dma_gather}
