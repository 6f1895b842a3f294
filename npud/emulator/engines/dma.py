"""The DMA engine: device memory <-> SRAM, strided up to 4-D, via the MMU."""

from __future__ import annotations

import math

import numpy as np

from ..isa import DType
from ..mmu import _Scatter


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


EXECUTORS = {"dma_load": dma_load, "dma_store": dma_store}
