"""The npu-emu instruction set.

One declarative table (:data:`OPCODES`) says, for every opcode, its number,
mnemonic, engine and operand fields.  The encoder (assembler), decoder
(:func:`decode`), validator and disassembler all read this table; none of
them restate a record layout.

Stream layout (little-endian throughout)::

    header  : magic "NPUE" | u16 version | u16 flags (0) | 8-byte target hash | u32 record count
    record  : u8 opcode | u8 core | u16 length (whole record, bytes) | operand fields...

Every opcode has a fixed length, so ``length`` is redundant by design: it
lets a decoder refuse a truncated or padded record with a precise reason and
lets future versions append fields.
"""

from __future__ import annotations

import enum
import struct
from collections import namedtuple
from dataclasses import dataclass

import numpy as np

MAGIC = b"NPUE"
VERSION = 1
HEADER = struct.Struct("<4sHH8sI")
RECORD_HEADER = struct.Struct("<BBH")
NONE_ADDR = 0xFFFF_FFFF       # "no operand" for optional SRAM addresses
NUM_SEMAPHORES = 32
MAX_RANK = 4                  # tiles and DMA descriptors are 4-D (leading 1s)
VA_BITS = 48
PADDED_INPUT_LIMIT = 4        # conv2d/pool: padded input elements <= this x SRAM bytes
MAX_POOL_WINDOW = 4096        # pool: kernel elements, except global pooling
# Weight windows: addresses in [WINDOW_BASE, WINDOW_END) name device memory that `dma_map`
# bound for the MAC engine to read in place (`w` operands only), not SRAM.
WINDOW_BASE = 0x8000_0000
WINDOW_END = 0xC000_0000


class DType(enum.IntEnum):
    INT8 = 0
    UINT8 = 1
    INT32 = 2
    FP16 = 3
    FP32 = 4

    @property
    def np(self) -> np.dtype:
        return _NP[self]

    @property
    def size(self) -> int:
        return _NP[self].itemsize

    @property
    def is_float(self) -> bool:
        return self in (DType.FP16, DType.FP32)

    @classmethod
    def parse(cls, x) -> "DType":
        """Accept a DType, its value, its name ("int8", "fp32"), or a numpy dtype ("float32")."""
        if isinstance(x, DType):
            return x
        if isinstance(x, str) and x.upper() in cls.__members__:
            return cls[x.upper()]
        if isinstance(x, int):
            return cls(x)
        return _FROM_NP[np.dtype(x)]


_NP = {DType.INT8: np.dtype(np.int8), DType.UINT8: np.dtype(np.uint8),
       DType.INT32: np.dtype(np.int32), DType.FP16: np.dtype(np.float16),
       DType.FP32: np.dtype(np.float32)}
_FROM_NP = {v: k for k, v in _NP.items()}


class Engine(enum.IntEnum):
    """The parallel queues of one core.  CTRL commands are not queued."""
    DMA = 0
    MAC = 1
    VECTOR = 2
    POOL = 3
    CTRL = 255


class BinaryFunc(enum.IntEnum):
    ADD = 0
    SUB = 1
    MUL = 2
    DIV = 3
    MAX = 4
    MIN = 5
    POW = 6
    SQDIFF = 7    # (a - b)^2
    EQ = 8        # comparisons: 1 where true, 0 where false (in out's dtype)
    LT = 9
    GT = 10
    GE = 11
    LE = 12
    NE = 13
    MOD = 14      # floor modulo: the result takes the divisor's sign (ONNX Mod, fmod=0)
    FMOD = 15     # truncated modulo: the result takes the dividend's sign (C fmod)


class UnaryFunc(enum.IntEnum):
    COPY = 0      # also converts dtype (saturating for integers)
    RELU = 1
    CLIP = 2      # clip(x, p0, p1)
    LEAKY_RELU = 3  # x if x >= 0 else p0 * x
    SIGMOID = 4
    TANH = 5
    GELU = 6      # x * Phi(x), exact (erf) form
    ERF = 7
    EXP = 8
    LOG = 9
    SQRT = 10
    RSQRT = 11
    RECIPROCAL = 12
    NEG = 13
    ABS = 14
    HARDSWISH = 15
    HARDSIGMOID = 16  # clip(p0 * x + p1, 0, 1)
    GELU_TANH = 17    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    TRUNC = 18        # round toward zero (float only: ONNX Cast float -> integer)


# Functions defined for integer tiles (exactly, with saturation to the output
# type).  The rest are transcendental and need float tiles.
INTEGER_UNARY = frozenset({UnaryFunc.COPY, UnaryFunc.RELU, UnaryFunc.CLIP,
                           UnaryFunc.NEG, UnaryFunc.ABS})
INTEGER_BINARY = frozenset({BinaryFunc.ADD, BinaryFunc.SUB, BinaryFunc.MUL, BinaryFunc.DIV,
                            BinaryFunc.MAX, BinaryFunc.MIN, BinaryFunc.SQDIFF,
                            BinaryFunc.EQ, BinaryFunc.LT, BinaryFunc.GT, BinaryFunc.GE,
                            BinaryFunc.LE, BinaryFunc.NE, BinaryFunc.MOD, BinaryFunc.FMOD})
# Comparisons write 1 or 0, which every dtype holds: their out may be of any dtype.
COMPARE_BINARY = frozenset({BinaryFunc.EQ, BinaryFunc.LT, BinaryFunc.GT, BinaryFunc.GE,
                            BinaryFunc.LE, BinaryFunc.NE})
# Functions `qbinary` applies between its dequantised operands.
QUANT_BINARY = frozenset({BinaryFunc.ADD, BinaryFunc.SUB, BinaryFunc.MUL, BinaryFunc.MAX,
                          BinaryFunc.MIN})


class ReduceFunc(enum.IntEnum):
    SUM = 0
    MEAN = 1
    MAX = 2
    MIN = 3


class PoolFunc(enum.IntEnum):
    MAX = 0
    AVG = 1


# --- operand fields -----------------------------------------------------------

Tile = namedtuple("Tile", "addr dtype shape")
Tile.__doc__ = """A dense row-major tensor in SRAM: byte address, DType, 4-D shape."""


def tile(addr: int, dtype, shape) -> Tile:
    """Normalise a tile operand: dtype parsed, shape padded to 4-D with leading 1s."""
    shape = tuple(int(s) for s in shape)
    if len(shape) > MAX_RANK:
        raise ValueError(f"tile rank {len(shape)} > {MAX_RANK}")
    return Tile(int(addr), DType.parse(dtype), (1,) * (MAX_RANK - len(shape)) + shape)


@dataclass(frozen=True)
class Kind:
    """How one operand field is laid out: struct codes, plus how to turn the
    unpacked integers into a Python value and back."""
    name: str
    fmt: str

    @property
    def count(self) -> int:
        return len(self.fmt)

    def pack(self, value) -> tuple:
        if self.name == "tile":
            t = value if isinstance(value, Tile) else tile(*value)
            return (t.addr, int(t.dtype), *t.shape)
        if self.count == 1:
            return (value,)
        value = tuple(value)
        if len(value) != self.count:
            raise ValueError(f"{self.name} needs {self.count} values, got {len(value)}")
        return value

    def unpack(self, raw: tuple):
        if self.name == "tile":
            dtype = raw[1]
            # A bad dtype code is kept as the raw int; the validator refuses it.
            return Tile(raw[0], DType(dtype) if dtype in _DTYPE_CODES else dtype, tuple(raw[2:]))
        return raw[0] if self.count == 1 else tuple(raw)


_DTYPE_CODES = frozenset(int(d) for d in DType)

U8, U16, U32, U64 = Kind("u8", "B"), Kind("u16", "H"), Kind("u32", "I"), Kind("u64", "Q")
I32, F32 = Kind("i32", "i"), Kind("f32", "f")
DIMS4 = Kind("dims4", "IIII")       # element counts, outermost first
STRIDES4 = Kind("strides4", "IIII")  # byte strides, outermost first
PAD4 = Kind("pad4", "HHHH")         # top, bottom, left, right
PERM4 = Kind("perm4", "BBBB")
TILE = Kind("tile", "IB" + "IIII")  # addr, dtype, shape


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    enum: type | None = None   # for u8 sub-function / dtype selectors


@dataclass(frozen=True)
class OpSpec:
    """One opcode: its encoding and the engine queue it runs on."""
    code: int
    name: str
    engine: Engine
    fields: tuple[Field, ...]
    summary: str

    def __post_init__(self) -> None:
        fmt = "<" + "".join(f.kind.fmt for f in self.fields)
        object.__setattr__(self, "struct", struct.Struct(fmt))
        object.__setattr__(self, "Args", namedtuple(self.name, [f.name for f in self.fields]))

    @property
    def length(self) -> int:
        """Total record length in bytes, header included."""
        return RECORD_HEADER.size + self.struct.size

    def encode(self, core: int, args: dict) -> bytes:
        flat = []
        for f in self.fields:
            v = args[f.name]
            flat.extend(int(x) if f.kind.fmt[0] != "f" else float(x) for x in f.kind.pack(v))
        return RECORD_HEADER.pack(self.code, core, self.length) + self.struct.pack(*flat)

    def decode_args(self, body: bytes | memoryview):
        raw = self.struct.unpack(body)
        vals, i = [], 0
        for f in self.fields:
            vals.append(f.kind.unpack(raw[i:i + f.kind.count]))
            i += f.kind.count
        return self.Args(*vals)


def _op(code, name, engine, summary, *fields):
    return OpSpec(code, name, engine, tuple(Field(*f) for f in fields), summary)


OPCODES: tuple[OpSpec, ...] = (
    # control / synchronisation
    _op(0x00, "nop", Engine.CTRL, "Do nothing."),
    _op(0x01, "end", Engine.CTRL, "End of stream; must be the last record."),
    _op(0x02, "barrier", Engine.CTRL,
        "Every engine of every core waits until all have drained."),
    _op(0x03, "signal", Engine.CTRL,
        "When every earlier command on `engine` (of this core) has finished, "
        "increment semaphore `sem`.",
        ("engine", U8, Engine), ("sem", U8)),
    _op(0x04, "wait", Engine.CTRL,
        "Later commands on `engine` (of this core) start only after semaphore "
        "`sem` is positive; decrement it.",
        ("engine", U8, Engine), ("sem", U8)),
    # DMA
    _op(0x10, "dma_load", Engine.DMA,
        "Copy a strided 4-D region of device memory (through the MMU) into a dense SRAM tile.",
        ("sram", U32), ("va", U64), ("dtype", U8, DType), ("shape", DIMS4), ("strides", STRIDES4)),
    _op(0x11, "dma_store", Engine.DMA,
        "Copy a dense SRAM tile into a strided 4-D region of device memory (through the MMU).",
        ("sram", U32), ("va", U64), ("dtype", U8, DType), ("shape", DIMS4), ("strides", STRIDES4)),
    _op(0x12, "dma_map", Engine.DMA,
        "Bind a dense, read-only region of device memory to a weight window (an address "
        "from WINDOW_BASE) that the MAC engine reads in place as a `w` operand: no SRAM copy.",
        ("sram", U32), ("va", U64), ("dtype", U8, DType), ("shape", DIMS4), ("strides", STRIDES4)),
    _op(0x13, "dma_gather", Engine.DMA,
        "Gather rows of a table in device memory into a dense SRAM tile [outer, n, row] by the "
        "n int32 indices of tile `idx` (negative ones count from the end; out of range fails the job).",
        ("sram", U32), ("va", U64), ("dtype", U8, DType), ("outer", U32), ("outer_stride", U32),
        ("rows", U32), ("row_stride", U32), ("row", U32), ("idx", TILE)),
    # MAC engine
    _op(0x20, "matmul", Engine.MAC,
        "Batched matrix product out[b] (+)= a[b] @ w[b] (+ bias).",
        ("a", TILE), ("w", TILE), ("out", TILE), ("bias", U32), ("flags", U8)),
    _op(0x21, "conv2d", Engine.MAC,
        "2-D convolution, NHWC input, HWIO weights (I = Cin/groups); flags: accumulate "
        "into out, then ReLU (fused epilogues: a residual Add is accumulate onto the residual).",
        ("x", TILE), ("w", TILE), ("out", TILE), ("bias", U32),
        ("stride", Kind("u16x2", "HH")), ("pad", PAD4), ("dilation", Kind("u16x2", "HH")),
        ("groups", U16), ("x_zp", I32), ("flags", U8)),
    _op(0x22, "qconv2d", Engine.MAC,
        "Quantised 2-D convolution: conv2d's int32 accumulator requantised to int8/uint8 "
        "in the MAC's output stage (per-channel scale at scale_addr, y_zp, [lo, hi]).",
        ("x", TILE), ("w", TILE), ("out", TILE), ("bias", U32),
        ("stride", Kind("u16x2", "HH")), ("pad", PAD4), ("dilation", Kind("u16x2", "HH")),
        ("groups", U16), ("x_zp", I32), ("scale_addr", U32), ("y_zp", I32), ("lo", I32),
        ("hi", I32)),
    # vector engine
    _op(0x30, "vbinary", Engine.VECTOR,
        "Element-wise out = func(a, b) with numpy broadcasting.",
        ("func", U8, BinaryFunc), ("a", TILE), ("b", TILE), ("out", TILE)),
    _op(0x31, "vunary", Engine.VECTOR,
        "Element-wise out = func(a; p0, p1).",
        ("func", U8, UnaryFunc), ("a", TILE), ("out", TILE), ("p0", F32), ("p1", F32)),
    _op(0x32, "lut", Engine.VECTOR,
        "8-bit table lookup: out = table[a] (int8 a indexes table[a + 128]).",
        ("a", TILE), ("table", U32), ("out", TILE)),
    _op(0x33, "reduce", Engine.VECTOR,
        "Reduce `a` over the axes in bitmask `axes` (bit i = dim i); out keeps them as 1.",
        ("func", U8, ReduceFunc), ("axes", U8), ("a", TILE), ("out", TILE)),
    _op(0x34, "softmax", Engine.VECTOR,
        "Softmax of `a` along `axis`.",
        ("axis", U8), ("a", TILE), ("out", TILE)),
    _op(0x35, "norm", Engine.VECTOR,
        "out = (a - mean) / sqrt(var + eps) * gamma + beta, statistics over bitmask "
        "`axes`, gamma/beta (fp32, optional) along the last dim.",
        ("axes", U8), ("eps", F32), ("a", TILE), ("gamma", U32), ("beta", U32), ("out", TILE)),
    _op(0x36, "requant", Engine.VECTOR,
        "out = saturate(clamp(round_half_even(a * scale) + zp, lo, hi)); scale/zp "
        "immediate or per channel (last dim) from SRAM; [lo, hi] folds Relu/Clip.",
        ("a", TILE), ("out", TILE), ("scale", F32), ("zp", I32),
        ("scale_addr", U32), ("zp_addr", U32), ("lo", I32), ("hi", I32)),
    _op(0x37, "transpose", Engine.VECTOR,
        "out = a.transpose(perm).",
        ("perm", PERM4), ("a", TILE), ("out", TILE)),
    _op(0x38, "copy_region", Engine.VECTOR,
        "Copy tile `a` into the window of tile `out` starting at `offset` "
        "(concatenation, padding, slicing in SRAM).",
        ("a", TILE), ("out", TILE), ("offset", DIMS4)),
    _op(0x39, "fill", Engine.VECTOR,
        "Set every element of `out` to `value` (converted, saturating).",
        ("out", TILE), ("value", F32)),
    _op(0x3A, "select", Engine.VECTOR,
        "Element-wise out = a where cond != 0 else b, numpy broadcasting of all three.",
        ("cond", TILE), ("a", TILE), ("b", TILE), ("out", TILE)),
    _op(0x3B, "qbinary", Engine.VECTOR,
        "Quantised element-wise out = Q(func(DQ(a), DQ(b))) with numpy broadcasting: "
        "ONNX's DequantizeLinear -> op -> QuantizeLinear in float32, fused; [lo, hi] folds Relu/Clip.",
        ("func", U8, BinaryFunc), ("a", TILE), ("b", TILE), ("out", TILE),
        ("a_scale", F32), ("a_zp", I32), ("b_scale", F32), ("b_zp", I32),
        ("y_scale", F32), ("y_zp", I32), ("lo", I32), ("hi", I32)),
    # pooling engine
    _op(0x40, "pool", Engine.POOL,
        "2-D max/average pooling over NHWC; global pooling is a window covering H x W.",
        ("func", U8, PoolFunc), ("x", TILE), ("out", TILE),
        ("kernel", Kind("u16x2", "HH")), ("stride", Kind("u16x2", "HH")), ("pad", PAD4),
        ("flags", U8)),
)

BY_CODE: dict[int, OpSpec] = {op.code: op for op in OPCODES}
BY_NAME: dict[str, OpSpec] = {op.name: op for op in OPCODES}

# flag bits
FLAG_ACCUMULATE = 0x01          # matmul/conv2d: out += result
FLAG_RELU = 0x02                # conv2d: out = max(out, 0) after the bias and accumulation
FLAG_COUNT_INCLUDE_PAD = 0x01   # pool AVG: padding counts in the divisor
MATMUL_FLAGS = FLAG_ACCUMULATE
CONV_FLAGS = FLAG_ACCUMULATE | FLAG_RELU
POOL_FLAGS = FLAG_COUNT_INCLUDE_PAD

assert len(BY_CODE) == len(OPCODES) and len(BY_NAME) == len(OPCODES)


@dataclass(frozen=True)
class Command:
    """One decoded record: position in the stream, opcode, core, operands."""
    index: int
    op: OpSpec
    core: int
    args: tuple


class DecodeError(Exception):
    """The byte string is not a well-formed stream (structure only)."""


def decode_header(stream: bytes) -> tuple[int, int, bytes, int]:
    """(version, flags, target hash, record count); DecodeError if too short or bad magic."""
    if len(stream) < HEADER.size:
        raise DecodeError(f"stream of {len(stream)} bytes is shorter than the "
                          f"{HEADER.size}-byte header")
    magic, version, flags, target, count = HEADER.unpack_from(stream)
    if magic != MAGIC:
        raise DecodeError(f"bad magic {magic!r} (expected {MAGIC!r})")
    return version, flags, target, count


def decode_records(stream: bytes):
    """Yield Commands for every record after the header, structurally checked
    (known opcode, exact length, no trailing bytes).  Raises DecodeError."""
    view = memoryview(stream)
    pos, index = HEADER.size, 0
    while pos < len(view):
        if len(view) - pos < RECORD_HEADER.size:
            raise DecodeError(f"record {index} at byte {pos}: truncated record header")
        code, core, length = RECORD_HEADER.unpack_from(view, pos)
        op = BY_CODE.get(code)
        if op is None:
            raise DecodeError(f"record {index} at byte {pos}: unknown opcode 0x{code:02x}")
        if length != op.length:
            raise DecodeError(f"record {index} at byte {pos} ({op.name}): length {length}, "
                              f"expected {op.length}")
        if pos + length > len(view):
            raise DecodeError(f"record {index} at byte {pos} ({op.name}): truncated "
                              f"({len(view) - pos} of {length} bytes)")
        args = op.decode_args(view[pos + RECORD_HEADER.size:pos + length])
        yield Command(index, op, core, args)
        pos += length
        index += 1


def encode_header(target_hash: bytes, count: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, 0, target_hash, count)
