"""Test rig: a device, a context, buffer objects, and a one-op job runner.

Inputs reach SRAM through real DMA loads and results leave through real DMA
stores, so every op test also exercises the stream format, the validator,
the MMU and the DMA engine.
"""

from __future__ import annotations

import mmap

import numpy as np

from npud.emulator.assembler import StreamBuilder
from npud.emulator.config import make_config
from npud.emulator.device import Device
from npud.emulator.isa import BY_NAME, DType, tile


class Rig:
    def __init__(self, preset: str = "edge", **overrides) -> None:
        self.cfg = make_config(preset, **overrides)
        self.dev = Device(self.cfg)
        self.ctx = self.dev.create_context()
        self.next_va = 0x100000
        self.bufs: dict[int, mmap.mmap] = {}

    def bo(self, nbytes: int) -> mmap.mmap:
        ps = self.cfg.page_size
        return mmap.mmap(-1, max(ps, -(-nbytes // ps) * ps))

    def map(self, buf, *, writable: bool = True, va: int | None = None) -> int:
        if va is None:
            va = self.next_va
            self.next_va += len(buf) + self.cfg.page_size  # leave a guard page
        self.ctx.map(va, buf, writable=writable)
        self.bufs[va] = buf
        return va

    def put(self, arr: np.ndarray, *, writable: bool = False) -> int:
        arr = np.ascontiguousarray(arr)
        buf = self.bo(arr.nbytes)
        buf[:arr.nbytes] = arr.tobytes()
        return self.map(buf, writable=writable)

    def alloc(self, nbytes: int) -> int:
        return self.map(self.bo(nbytes), writable=True)

    def get(self, va: int, dtype, shape) -> np.ndarray:
        dt = np.dtype(dtype)
        n = int(np.prod(shape)) * dt.itemsize
        return np.frombuffer(self.bufs[va][:n], dtype=dt).reshape(shape).copy()

    def builder(self) -> StreamBuilder:
        return StreamBuilder(self.cfg)

    def run(self, sb: StreamBuilder):
        return self.dev.execute(self.ctx, sb.build())


def run_op(op: str, inputs, outputs, emit, *, rig: Rig | None = None, preset: str = "edge"):
    """Run one compute op.  `inputs`: arrays loaded to SRAM; `outputs`: arrays
    (initial contents) or (dtype, shape) pairs; `emit(sb, ins, outs)` emits the
    op given SRAM tiles.  Returns the output arrays (or (outputs, stats))."""
    rig = rig or Rig(preset)
    sb = rig.builder()
    engine = BY_NAME[op].engine.name.lower()
    addr = 0
    ins, outs, stores = [], [], []

    def place(arr: np.ndarray):
        nonlocal addr
        t = tile(addr, DType.parse(arr.dtype), arr.shape if arr.ndim else (1,))
        va = rig.put(arr)
        sb.dma_load(addr, va, arr.dtype, t.shape)
        addr += -(-max(arr.nbytes, 1) // 64) * 64
        return t

    for x in inputs:
        ins.append(place(np.asarray(x)))
    for o in outputs:
        if isinstance(o, np.ndarray):
            t = place(o)
        else:
            dt, shape = o
            t = tile(addr, dt, shape)
            addr += -(-int(np.prod(shape)) * np.dtype(dt).itemsize // 64) * 64
        outs.append(t)
    sb.sync("dma", engine)
    emit(sb, ins, outs)
    sb.sync(engine, "dma")
    results = []
    for t in outs:
        dt = DType(t.dtype).np
        va = rig.alloc(int(np.prod(t.shape)) * dt.itemsize)
        sb.dma_store(t.addr, va, dt, t.shape)
        results.append((va, dt, t.shape))
    sb.end()
    stats = rig.run(sb)
    got = [rig.get(va, dt, shape) for va, dt, shape in results]
    run_op.last_stats = stats
    return got


def pad4(shape):
    return (1,) * (4 - len(shape)) + tuple(shape)
