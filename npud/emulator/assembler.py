"""Build binary command streams.

:class:`StreamBuilder` has one method per opcode (named after the mnemonic
in :mod:`npud.emulator.isa`) plus a few readable aliases (``add``, ``relu``...).
It encodes operands exactly as given; checking them is the validator's job,
so the builder is also the tool for writing hostile streams in tests.
"""

from __future__ import annotations

from . import isa
from .config import DeviceConfig
from .isa import (BinaryFunc, DType, Engine, PoolFunc, ReduceFunc, Tile,
                  UnaryFunc, tile)

__all__ = ["StreamBuilder", "Tile", "tile", "contiguous_strides"]


def contiguous_strides(shape, dtype) -> tuple[int, ...]:
    """Byte strides of a dense row-major 4-D array (shape padded with leading 1s)."""
    shape = (1,) * (isa.MAX_RANK - len(shape)) + tuple(shape)
    try:
        acc = DType.parse(dtype).size
    except (KeyError, ValueError, TypeError):
        acc = 1   # an invalid dtype code, encoded on purpose
    strides = []
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def _dims(shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    return (1,) * (isa.MAX_RANK - len(shape)) + shape


def _strides(strides) -> tuple[int, ...]:
    strides = tuple(int(s) for s in strides)
    return (0,) * (isa.MAX_RANK - len(strides)) + strides


def _addr(a) -> int:
    return isa.NONE_ADDR if a is None else int(a)


class StreamBuilder:
    """Accumulates records for one target and emits the stream with :meth:`build`."""

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self._records: list[bytes] = []
        self._next_sem = 0

    def __len__(self) -> int:
        return len(self._records)

    def emit(self, name: str, *, core: int = 0, **args) -> "StreamBuilder":
        """Append one record of opcode `name`; every field must be given."""
        op = isa.BY_NAME[name]
        self._records.append(op.encode(core, args))
        return self

    def raw(self, record: bytes) -> "StreamBuilder":
        """Append arbitrary bytes as a record (for testing the validator)."""
        self._records.append(bytes(record))
        return self

    def build(self, *, target_hash: bytes | None = None) -> bytes:
        """The stream: header and records.  An ``end`` is *not* added for you."""
        th = self.config.target_hash() if target_hash is None else target_hash
        return isa.encode_header(th, len(self._records)) + b"".join(self._records)

    # --- control ------------------------------------------------------------
    def nop(self, *, core: int = 0):
        return self.emit("nop", core=core)

    def end(self):
        return self.emit("end")

    def barrier(self):
        return self.emit("barrier")

    def signal(self, engine, sem: int, *, core: int = 0):
        return self.emit("signal", core=core, engine=_engine(engine), sem=sem)

    def wait(self, engine, sem: int, *, core: int = 0):
        return self.emit("wait", core=core, engine=_engine(engine), sem=sem)

    def sync(self, producer, consumer, *, core: int = 0, sem: int | None = None):
        """Make later `consumer` commands wait for earlier `producer` commands
        (a signal/wait pair on a semaphore chosen round-robin)."""
        if sem is None:
            sem, self._next_sem = self._next_sem, (self._next_sem + 1) % isa.NUM_SEMAPHORES
        self.signal(producer, sem, core=core)
        return self.wait(consumer, sem, core=core)

    # --- DMA --------------------------------------------------------------
    def dma_load(self, sram: int, va: int, dtype, shape, strides=None, *, core: int = 0):
        """Device memory at `va` (byte `strides`, default dense) -> dense SRAM tile at `sram`."""
        strides = contiguous_strides(shape, dtype) if strides is None else strides
        return self.emit("dma_load", core=core, sram=sram, va=va, dtype=_dtype_code(dtype),
                         shape=_dims(shape), strides=_strides(strides))

    def dma_store(self, sram: int, va: int, dtype, shape, strides=None, *, core: int = 0):
        """Dense SRAM tile at `sram` -> device memory at `va` (byte `strides`, default dense)."""
        strides = contiguous_strides(shape, dtype) if strides is None else strides
        return self.emit("dma_store", core=core, sram=sram, va=va, dtype=_dtype_code(dtype),
                         shape=_dims(shape), strides=_strides(strides))

    def dma_map(self, window: int, va: int, dtype, shape, *, core: int = 0):
        """Bind the dense region of device memory at `va` to weight window address `window`
        (>= isa.WINDOW_BASE), for the MAC engine to read in place."""
        return self.emit("dma_map", core=core, sram=window, va=va, dtype=_dtype_code(dtype),
                         shape=_dims(shape), strides=_strides(contiguous_strides(shape, dtype)))
    def dma_gather(self, sram: int, va: int, dtype, idx, *, rows: int, row: int, row_stride: int,
                   outer: int = 1, outer_stride: int = 0, core: int = 0):
        """Rows `idx` (an int32 tile) of the table at `va` -> dense SRAM tile [outer, n, row] at
        `sram`; strides in bytes."""
        return self.emit("dma_gather", core=core, sram=sram, va=va, dtype=_dtype_code(dtype),
                         outer=outer, outer_stride=outer_stride, rows=rows, row_stride=row_stride,
                         row=row, idx=idx)

    # --- MAC ----------------------------------------------------------------
    def matmul(self, a, w, out, *, bias=None, accumulate=False, core: int = 0):
        return self.emit("matmul", core=core, a=a, w=w, out=out, bias=_addr(bias),
                         flags=isa.FLAG_ACCUMULATE if accumulate else 0)

    def conv2d(self, x, w, out, *, bias=None, stride=(1, 1), pad=(0, 0, 0, 0),
               dilation=(1, 1), groups=1, x_zp=0, accumulate=False, relu=False, core: int = 0):
        """`pad` is (top, bottom, left, right); `relu` fuses a ReLU after the bias and accumulation."""
        return self.emit("conv2d", core=core, x=x, w=w, out=out, bias=_addr(bias),
                         stride=tuple(stride), pad=tuple(pad), dilation=tuple(dilation),
                         groups=groups, x_zp=x_zp,
                         flags=(isa.FLAG_ACCUMULATE if accumulate else 0)
                         | (isa.FLAG_RELU if relu else 0))

    def qconv2d(self, x, w, out, *, scale_addr, bias=None, stride=(1, 1), pad=(0, 0, 0, 0),
                dilation=(1, 1), groups=1, x_zp=0, y_zp=0, lo: int = -(1 << 31),
                hi: int = (1 << 31) - 1, core: int = 0):
        """conv2d then requant (per-channel scale) in one command; `lo`/`hi` as for requant."""
        return self.emit("qconv2d", core=core, x=x, w=w, out=out, bias=_addr(bias),
                         stride=tuple(stride), pad=tuple(pad), dilation=tuple(dilation),
                         groups=groups, x_zp=x_zp, scale_addr=_addr(scale_addr), y_zp=y_zp,
                         lo=lo, hi=hi)

    # --- vector ---------------------------------------------------------------
    def vbinary(self, func, a, b, out, *, core: int = 0):
        return self.emit("vbinary", core=core, func=int(_enum(BinaryFunc, func)), a=a, b=b, out=out)

    def add(self, a, b, out, *, core: int = 0):
        return self.vbinary(BinaryFunc.ADD, a, b, out, core=core)

    def sub(self, a, b, out, *, core: int = 0):
        return self.vbinary(BinaryFunc.SUB, a, b, out, core=core)

    def mul(self, a, b, out, *, core: int = 0):
        return self.vbinary(BinaryFunc.MUL, a, b, out, core=core)

    def vunary(self, func, a, out, p0: float = 0.0, p1: float = 0.0, *, core: int = 0):
        return self.emit("vunary", core=core, func=int(_enum(UnaryFunc, func)), a=a, out=out,
                         p0=p0, p1=p1)

    def relu(self, a, out, *, core: int = 0):
        return self.vunary(UnaryFunc.RELU, a, out, core=core)

    def clip(self, a, out, lo: float, hi: float, *, core: int = 0):
        return self.vunary(UnaryFunc.CLIP, a, out, lo, hi, core=core)

    def lut(self, a, table: int, out, *, core: int = 0):
        return self.emit("lut", core=core, a=a, table=table, out=out)

    def reduce(self, func, axes, a, out, *, core: int = 0):
        """`axes`: an iterable of dims (0..3) or a ready bitmask int."""
        return self.emit("reduce", core=core, func=int(_enum(ReduceFunc, func)),
                         axes=_mask(axes), a=a, out=out)

    def softmax(self, a, out, *, axis: int = 3, core: int = 0):
        return self.emit("softmax", core=core, axis=axis, a=a, out=out)

    def norm(self, a, out, *, axes=(3,), eps: float = 1e-5, gamma=None, beta=None, core: int = 0):
        return self.emit("norm", core=core, axes=_mask(axes), eps=eps, a=a,
                         gamma=_addr(gamma), beta=_addr(beta), out=out)

    def requant(self, a, out, *, scale: float = 1.0, zp: int = 0, scale_addr=None,
                zp_addr=None, lo: int = -(1 << 31), hi: int = (1 << 31) - 1, core: int = 0):
        """`lo`/`hi`: clamp bounds in the output's integer domain (a fused
        Relu/Clip); the defaults clamp nothing beyond the output type."""
        return self.emit("requant", core=core, a=a, out=out, scale=scale, zp=zp,
                         scale_addr=_addr(scale_addr), zp_addr=_addr(zp_addr), lo=lo, hi=hi)

    def transpose(self, a, out, perm, *, core: int = 0):
        return self.emit("transpose", core=core, perm=tuple(perm), a=a, out=out)

    def copy_region(self, a, out, offset, *, core: int = 0):
        return self.emit("copy_region", core=core, a=a, out=out, offset=_dims(offset)
                         if len(tuple(offset)) == isa.MAX_RANK else
                         (0,) * (isa.MAX_RANK - len(tuple(offset))) + tuple(offset))

    def qbinary(self, func, a, b, out, *, a_scale: float, a_zp: int, b_scale: float, b_zp: int,
                y_scale: float, y_zp: int, lo: int = -(1 << 31), hi: int = (1 << 31) - 1,
                core: int = 0):
        """Quantised element-wise `func` (add, sub, mul, max, min) of int8/uint8
        tiles; `lo`/`hi` as for :meth:`requant`."""
        return self.emit("qbinary", core=core, func=int(_enum(BinaryFunc, func)), a=a, b=b,
                         out=out, a_scale=a_scale, a_zp=a_zp, b_scale=b_scale, b_zp=b_zp,
                         y_scale=y_scale, y_zp=y_zp, lo=lo, hi=hi)

    def select(self, cond, a, b, out, *, core: int = 0):
        return self.emit("select", core=core, cond=cond, a=a, b=b, out=out)

    def fill(self, out, value: float, *, core: int = 0):
        return self.emit("fill", core=core, out=out, value=value)

    # --- pooling ----------------------------------------------------------------
    def pool(self, func, x, out, *, kernel, stride=(1, 1), pad=(0, 0, 0, 0),
             count_include_pad=False, core: int = 0):
        return self.emit("pool", core=core, func=int(_enum(PoolFunc, func)), x=x, out=out,
                         kernel=tuple(kernel), stride=tuple(stride), pad=tuple(pad),
                         flags=isa.FLAG_COUNT_INCLUDE_PAD if count_include_pad else 0)

    def global_pool(self, func, x, out, *, core: int = 0):
        """Pool over all of H and W: `x` is NHWC, `out` is [N,1,1,C]."""
        t = x if isinstance(x, Tile) else tile(*x)
        return self.pool(func, t, out, kernel=t.shape[1:3], core=core)


def _enum(cls, v) -> int:
    # Integers pass through unchecked so tests can encode hostile operands.
    return cls[v.upper()] if isinstance(v, str) else int(v)


def _dtype_code(d) -> int:
    return int(d) if isinstance(d, int) else int(DType.parse(d))


def _engine(e) -> int:
    return int(_enum(Engine, e))


def _mask(axes) -> int:
    if isinstance(axes, int):
        return axes
    m = 0
    for a in axes:
        m |= 1 << a
    return m
