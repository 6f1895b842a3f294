"""Helpers shared by the engines."""

from __future__ import annotations

import threading

import numpy as np

from ..isa import WINDOW_BASE, DType, Tile


_NP = {d: d.np for d in DType}

try:    # np.clip's own checks cost ~5 us per call: call the ufunc it wraps
    from numpy._core.umath import clip
except ImportError:     # numpy < 2
    clip = np.clip


def view(sram: np.ndarray, t: Tile) -> np.ndarray:
    """The SRAM bytes of tile `t` as a (writable) numpy array of its dtype and shape."""
    return np.ndarray(t.shape, _NP[t.dtype], buffer=sram, offset=t.addr)


def weights(job, core: int, t: Tile) -> np.ndarray:
    """A MAC `w` operand: its SRAM tile, or the device memory a weight window
    (an address from isa.WINDOW_BASE) is bound to, read in place."""
    if t.addr < WINDOW_BASE:
        return view(job.sram[core], t)
    return np.ndarray(t.shape, _NP[t.dtype], buffer=job.windows[core][t.addr])


def vec(sram: np.ndarray, addr: int, dtype, n: int) -> np.ndarray:
    return np.ndarray((n,), np.dtype(dtype), buffer=sram, offset=addr)


_LIMITS = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255),
           np.dtype(np.int32): (-(1 << 31), (1 << 31) - 1)}


def store(out: np.ndarray, value: np.ndarray) -> None:
    """Write `value` into `out`, converting the way the hardware does:
    floats -> integers round half to even and saturate; integers saturate;
    anything -> float is an IEEE conversion."""
    if out.dtype.kind == "f" or value.dtype == out.dtype:
        np.copyto(out, value, casting="unsafe")
        return
    lo, hi = _LIMITS[out.dtype]
    if value.dtype.kind == "f":
        value = np.rint(value)
        # NaN has no integer value; hardware converts it to 0.
        value = np.nan_to_num(value, nan=0.0, posinf=hi, neginf=lo)
    if value.dtype.kind == "f" or np.iinfo(value.dtype).min < lo or np.iinfo(value.dtype).max > hi:
        value = np.clip(value, lo, hi)
    np.copyto(out, value, casting="unsafe")


SCRATCH_MAX = 1 << 24       # largest work buffer kept between commands (elements)


class Scratch(threading.local):
    """float32 work buffers reused from command to command (fresh pages cost a page fault each)."""

    def __init__(self):
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        buf = self.buffers.get(name)
        if buf is None or buf.size < size:
            if size > SCRATCH_MAX:
                return np.empty(shape, np.float32)
            buf = self.buffers[name] = np.empty(max(size, 1 << 16), np.float32)
        return buf[:size].reshape(shape)

    def typed(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """Like :meth:`get`, an array of `dtype` (the float32 buffer's bytes)."""
        dtype = np.dtype(dtype)
        size = int(np.prod(shape))
        words = -(-size * dtype.itemsize // 4)
        return self.get(name, (words,)).view(dtype)[:size].reshape(shape)


scratch = Scratch()
