"""The command-stream validator: the daemon's gatekeeper.

:func:`validate` checks a stream the way a kernel driver checks a command
buffer before the hardware sees it -- header, then every record: known
opcode, operand ranges, SRAM bounds, tile shapes and dtypes, and DMA
descriptors that stay within the job's mappings with the right permission.
Anything wrong raises :class:`StreamError` with a reason naming the record
and operand.  No byte string makes it raise anything else.

It returns a :class:`Program`: the decoded commands plus the statically
computed timing, so executing it is only the arithmetic.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from . import isa
from .config import DeviceConfig
from .errors import StreamError
from .isa import (NONE_ADDR, BinaryFunc, Command, DType, Engine, PoolFunc,
                  ReduceFunc, Tile, UnaryFunc)
from .mmu import Mapping
from .timing import JobStats, schedule

__all__ = ["Mapping", "Program", "validate"]


@dataclass(frozen=True)
class Program:
    """A validated stream: run it with :meth:`npud.emulator.device.Device.execute`."""
    commands: tuple[Command, ...]
    target_hash: bytes
    stats: JobStats           # modeled cost; identical for every run
    footprints: tuple         # per command: ((core, lo, hi, is_write), ...) SRAM bytes
    sram_used: tuple          # per core: end of the highest SRAM byte any command writes
    # [va, end) of each immutable mapping: memory nothing writes while the program is loaded,
    # whose weights the MAC engine may keep pre-arranged from load to unload (Device.prepare)
    immutable: tuple = ()
    # The device that last ran it and its prepared steps (Device.prepare): decoded once, run
    # many.  Not an init field, so a program derived with dataclasses.replace (a segment)
    # starts with its own.
    prepared: dict = field(default_factory=dict, init=False, compare=False, repr=False)


def validate(stream: bytes, config: DeviceConfig, mappings: list[Mapping]) -> Program:
    """Decode and check `stream` for `config` against `mappings`; the result
    is safe to execute in a context with (at least) those mappings."""
    if not isinstance(stream, (bytes, bytearray, memoryview)):
        raise StreamError(f"stream must be bytes, not {type(stream).__name__}")
    stream = bytes(stream)
    try:
        version, flags, target, count = isa.decode_header(stream)
    except isa.DecodeError as e:
        raise StreamError(f"header: {e}") from None
    if version != isa.VERSION:
        raise StreamError(f"header: unsupported format version {version} (this device speaks {isa.VERSION})")
    if flags != 0:
        raise StreamError(f"header: reserved flags 0x{flags:04x} must be zero")
    if target != config.target_hash():
        raise StreamError(f"header: target hash {target.hex()} does not match this device "
                          f"({config.preset}, {config.target_hash().hex()})")
    v = _Checker(config, mappings)
    commands, footprints = [], []
    try:
        for cmd in isa.decode_records(stream):
            if commands and commands[-1].op.name == "end":
                raise StreamError(f"record {cmd.index} ({cmd.op.name}): records after end")
            footprints.append(v.check(cmd))
            commands.append(cmd)
    except isa.DecodeError as e:
        raise StreamError(str(e)) from None
    if not commands or commands[-1].op.name != "end":
        raise StreamError("stream does not finish with end")
    if count != len(commands):
        raise StreamError(f"header: record count {count} but the stream holds {len(commands)}")
    commands = tuple(commands)
    footprints = tuple(footprints)
    used = [0] * config.cores
    for fp in footprints:
        for core, lo, hi, write in fp:
            if write and hi > used[core] and lo < isa.WINDOW_BASE:   # windows are not SRAM
                used[core] = hi
    return Program(commands, target, schedule(commands, footprints, config), footprints,
                   tuple(used), _immutable(mappings))


def _immutable(mappings: list[Mapping]) -> tuple:
    """[va, end) of the immutable mappings; StreamError for one that is also writable."""
    for m in mappings:
        if m.immutable and m.writable:
            raise StreamError(f"mappings: the mapping at va 0x{m.va:x} is writable and immutable "
                              "(only read-only memory can be immutable)")
    return tuple((m.va, m.va + m.size) for m in mappings if m.immutable)


class _Checker:
    def __init__(self, config: DeviceConfig, mappings: list[Mapping]) -> None:
        self.config = config
        self.sram = config.sram_bytes
        self.pending = [0] * isa.NUM_SEMAPHORES
        # Coalesce adjacent mappings so a descriptor may cross BO boundaries.
        runs: list[list] = []
        for m in sorted(mappings, key=lambda m: m.va):
            runs.append([m.va, m.va + m.size, m.writable])
        self.read_runs = _coalesce([(a, b) for a, b, _ in runs])
        self.write_runs = _coalesce([(a, b) for a, b, w in runs if w])
        self.readonly_runs = _coalesce([(a, b) for a, b, w in runs if not w])
        # per core: weight window address -> bytes bound there by dma_map (stream order)
        self.windows = [{} for _ in range(config.cores)]
        self.cmd: Command | None = None
        self.fp: list = []

    def fail(self, why: str):
        c = self.cmd
        raise StreamError(f"record {c.index} ({c.op.name}): {why}", command_index=c.index)

    def check(self, cmd: Command):
        self.cmd, self.fp = cmd, []
        if cmd.core >= self.config.cores:
            self.fail(f"core {cmd.core} out of range (device has {self.config.cores})")
        getattr(self, "_" + cmd.op.name)(cmd.args)
        return tuple(self.fp)

    # --- operand helpers --------------------------------------------------------
    def dtype(self, name: str, code) -> DType:
        if not isinstance(code, DType):
            try:
                return DType(code)
            except ValueError:
                self.fail(f"{name}: unknown dtype code {code}")
        return code

    def tile(self, name: str, t: Tile, *, write: bool = False, allowed=None) -> Tile:
        dt = self.tile_dtype(name, t, allowed)
        self.sram_range(name, t.addr, math.prod(t.shape) * dt.size, dt.size, write)
        return Tile(t.addr, dt, t.shape)

    def tile_dtype(self, name: str, t: Tile, allowed) -> DType:
        """A tile's dtype, checked against `allowed`; its shape checked non-empty."""
        dt = self.dtype(name + ".dtype", t.dtype)
        if allowed is not None and dt not in allowed:
            self.fail(f"{name}: dtype {dt.name.lower()} not allowed here "
                      f"(allowed: {', '.join(d.name.lower() for d in allowed)})")
        if any(s == 0 for s in t.shape):
            self.fail(f"{name}: empty shape {list(t.shape)}")
        return dt

    def weights(self, name: str, t: Tile, allowed=None) -> Tile:
        """A MAC `w` operand: an SRAM tile, or one read in place from a weight
        window that an earlier dma_map of this core bound with at least its bytes."""
        if t.addr < isa.WINDOW_BASE:
            return self.tile(name, t, allowed=allowed)
        dt = self.tile_dtype(name, t, allowed)
        nbytes = math.prod(t.shape) * dt.size
        bound = self.windows[self.cmd.core].get(t.addr)
        if bound is None or bound < nbytes:
            self.fail(f"{name}: weight window 0x{t.addr:x} has no binding of {nbytes} bytes "
                      f"on core {self.cmd.core} (dma_map one first)")
        self.fp.append((self.cmd.core, t.addr, t.addr + nbytes, False))
        return Tile(t.addr, dt, t.shape)

    def sram_range(self, name: str, addr: int, nbytes: int, align: int, write: bool) -> None:
        if addr % align:
            self.fail(f"{name}: SRAM address 0x{addr:x} not aligned to {align}")
        if addr + nbytes > self.sram:
            self.fail(f"{name}: SRAM range 0x{addr:x}+{nbytes} exceeds SRAM size {self.sram}")
        self.fp.append((self.cmd.core, addr, addr + nbytes, write))

    def vector(self, name: str, addr: int, dt: DType, n: int) -> None:
        """An optional per-channel operand: `n` elements of `dt` at `addr`."""
        if addr != NONE_ADDR:
            self.sram_range(name, addr, n * dt.size, dt.size, False)

    def enum(self, name: str, cls, v):
        try:
            return cls(v)
        except ValueError:
            self.fail(f"{name}: unknown {cls.__name__} {v}")

    def flags(self, v: int, allowed: int) -> None:
        if v & ~allowed:
            self.fail(f"flags: reserved bits 0x{v & ~allowed:02x} set")

    def finite(self, name: str, x: float, *, allow_inf: bool = False) -> None:
        if math.isnan(x) or (not allow_inf and math.isinf(x)):
            self.fail(f"{name}: {x} is not a finite number")

    def same_shape(self, a: Tile, b: Tile, an: str = "a", bn: str = "out") -> None:
        if a.shape != b.shape:
            self.fail(f"{bn} shape {list(b.shape)} != {an} shape {list(a.shape)}")

    def same_class(self, a: DType, b: DType, an: str = "a", bn: str = "out") -> None:
        if a.is_float != b.is_float:
            self.fail(f"{an} is {a.name.lower()} but {bn} is {b.name.lower()}: "
                      "use requant or vunary copy to convert between integer and float")

    def broadcast_out(self, x: Tile, y: Tile, out: Tile) -> None:
        """``out`` has the shape ``x`` and ``y`` broadcast to (numpy's rule), or the command fails."""
        shape = []
        for d, (p, q) in enumerate(zip(x.shape, y.shape)):
            if p != q and 1 not in (p, q):
                self.fail(f"b: dim {d} ({q}) does not broadcast against a's ({p})")
            shape.append(max(p, q))
        if out.shape != tuple(shape):
            self.fail(f"out: shape {list(out.shape)}, expected the broadcast shape {shape}")

    def padded_limit(self, elements: int) -> None:
        # Padding is free in the encoding but not in the engine: a tiny tile
        # with 65535-element pads must not make the device allocate gigabytes.
        limit = isa.PADDED_INPUT_LIMIT * self.sram
        if elements > limit:
            self.fail(f"pad: padded input of {elements} elements exceeds {limit} "
                      f"({isa.PADDED_INPUT_LIMIT} x SRAM bytes)")

    def axes(self, mask: int) -> None:
        if mask == 0 or mask >> isa.MAX_RANK:
            self.fail(f"axes: bitmask 0x{mask:x} must name at least one of dims 0..3")

    # --- control ------------------------------------------------------------------
    def _nop(self, a) -> None:
        pass

    def _end(self, a) -> None:
        pass

    def _barrier(self, a) -> None:
        pass

    def _sync_operands(self, a) -> None:
        e = self.enum("engine", Engine, a.engine)
        if e == Engine.CTRL:
            self.fail("engine: ctrl is not a queue")
        if a.sem >= isa.NUM_SEMAPHORES:
            self.fail(f"sem: semaphore {a.sem} out of range (0..{isa.NUM_SEMAPHORES - 1})")

    def _signal(self, a) -> None:
        self._sync_operands(a)
        self.pending[a.sem] += 1

    def _wait(self, a) -> None:
        self._sync_operands(a)
        # Requiring a matching earlier signal makes every valid stream
        # deadlock-free whatever the engines' relative speeds.
        if self.pending[a.sem] == 0:
            self.fail(f"sem: wait on semaphore {a.sem} with no earlier unconsumed signal (deadlock)")
        self.pending[a.sem] -= 1

    # --- DMA ------------------------------------------------------------------------
    def _dma(self, a, write_memory: bool) -> None:
        dt = self.dtype("dtype", a.dtype)
        if any(s == 0 for s in a.shape):
            self.fail(f"shape: empty shape {list(a.shape)}")
        nbytes = math.prod(a.shape) * dt.size
        self.sram_range("sram", a.sram, nbytes, dt.size, not write_memory)
        span = dt.size + sum((n - 1) * s for n, s in zip(a.shape, a.strides))
        if a.va + span > 1 << isa.VA_BITS:
            self.fail(f"va: 0x{a.va:x}+{span} exceeds the {isa.VA_BITS}-bit address space")
        if write_memory:
            # Overlapping destination elements would make the result depend
            # on the order the hardware writes them in.
            extent = dt.size
            dims = sorted(((s, n) for n, s in zip(a.shape, a.strides) if n > 1))
            for s, n in dims:
                if s < extent:
                    self.fail(f"strides: destination elements overlap (stride {s} < extent {extent})")
                extent = s * (n - 1) + extent
        runs = self.write_runs if write_memory else self.read_runs
        if not _covered(runs, a.va, a.va + span):
            kind = "writable " if write_memory else ""
            self.fail(f"va: range 0x{a.va:x}..0x{a.va + span:x} is not within the job's "
                      f"{kind}mappings")

    def _dma_map(self, a) -> None:
        dt = self.dtype("dtype", a.dtype)
        if any(s == 0 for s in a.shape):
            self.fail(f"shape: empty shape {list(a.shape)}")
        nbytes = math.prod(a.shape) * dt.size
        dense, acc = [], dt.size
        for n in reversed(a.shape):
            dense.insert(0, acc)
            acc *= n
        if tuple(a.strides) != tuple(dense):
            self.fail(f"strides: a weight window is a dense region: expected {dense}, got "
                      f"{list(a.strides)}")
        if a.sram % dt.size:
            self.fail(f"sram: window address 0x{a.sram:x} not aligned to {dt.size}")
        if a.sram < isa.WINDOW_BASE or a.sram + nbytes > isa.WINDOW_END:
            self.fail(f"sram: window 0x{a.sram:x}+{nbytes} outside the weight windows "
                      f"0x{isa.WINDOW_BASE:x}..0x{isa.WINDOW_END:x}")
        if a.va + nbytes > 1 << isa.VA_BITS:
            self.fail(f"va: 0x{a.va:x}+{nbytes} exceeds the {isa.VA_BITS}-bit address space")
        # Read-only memory only: nothing in the job can change what the MAC reads in place.
        if not _covered(self.readonly_runs, a.va, a.va + nbytes):
            self.fail(f"va: range 0x{a.va:x}..0x{a.va + nbytes:x} is not within the job's "
                      "read-only mappings")
        bound = self.windows[self.cmd.core]
        for start in [s for s, n in bound.items() if s < a.sram + nbytes and a.sram < s + n]:
            del bound[start]            # a new binding replaces what it overlaps
        bound[a.sram] = nbytes
        self.fp.append((self.cmd.core, a.sram, a.sram + nbytes, True))

    def _dma_load(self, a) -> None:
        self._dma(a, False)

    def _dma_store(self, a) -> None:
        self._dma(a, True)

    def _dma_gather(self, a) -> None:
        dt = self.dtype("dtype", a.dtype)
        idx = self.tile("idx", a.idx, allowed=(DType.INT32,))
        n = math.prod(idx.shape)
        if 0 in (a.outer, a.rows, a.row):
            self.fail(f"outer/rows/row: {a.outer}/{a.rows}/{a.row} must be >= 1")
        self.sram_range("sram", a.sram, a.outer * n * a.row * dt.size, dt.size, True)
        span = dt.size * a.row + (a.outer - 1) * a.outer_stride + (a.rows - 1) * a.row_stride
        if a.va + span > 1 << isa.VA_BITS:
            self.fail(f"va: 0x{a.va:x}+{span} exceeds the {isa.VA_BITS}-bit address space")
        if not _covered(self.read_runs, a.va, a.va + span):
            self.fail(f"va: table 0x{a.va:x}..0x{a.va + span:x} is not within the job's mappings")

    # --- MAC -------------------------------------------------------------------------
    def mac_dtypes(self, x: Tile, w: Tile, out: Tile, xn: str) -> DType:
        """Check the operand dtype combination; returns the bias dtype."""
        if x.dtype in (DType.INT8, DType.UINT8):
            if w.dtype != DType.INT8 or out.dtype != DType.INT32:
                self.fail(f"{xn} is {x.dtype.name.lower()}: w must be int8 and out int32")
            return DType.INT32
        if x.dtype == DType.FP16:
            if w.dtype != DType.FP16 or out.dtype not in (DType.FP16, DType.FP32):
                self.fail(f"{xn} is fp16: w must be fp16 and out fp16 or fp32")
            return DType.FP32
        if x.dtype == DType.FP32:
            if w.dtype != DType.FP32 or out.dtype != DType.FP32:
                self.fail(f"{xn} is fp32: w and out must be fp32")
            return DType.FP32
        self.fail(f"{xn}: dtype {x.dtype.name.lower()} is not a MAC input type")

    def _matmul(self, a) -> None:
        x = self.tile("a", a.a)
        w = self.weights("w", a.w)
        out = self.tile("out", a.out, write=True)
        bias_dt = self.mac_dtypes(x, w, out, "a")
        self.flags(a.flags, isa.MATMUL_FLAGS)
        (b0, b1, m, k), (wb0, wb1, k2, n) = x.shape, w.shape
        if k != k2:
            self.fail(f"w: inner dimension {k2} != a's {k}")
        batch = []
        for d, (p, q) in enumerate(zip((b0, b1), (wb0, wb1))):
            if p != q and 1 not in (p, q):
                self.fail(f"w: batch dim {d} ({q}) does not broadcast against a's ({p})")
            batch.append(max(p, q))
        if out.shape != (*batch, m, n):
            self.fail(f"out: shape {list(out.shape)}, expected {[*batch, m, n]}")
        self.vector("bias", a.bias, bias_dt, n)

    def _conv2d(self, a) -> None:
        x = self.tile("x", a.x)
        w = self.weights("w", a.w)
        out = self.tile("out", a.out, write=True)
        bias_dt = self.mac_dtypes(x, w, out, "x")
        self.flags(a.flags, isa.CONV_FLAGS)
        self.conv_geometry(a, x, w, out)
        self.vector("bias", a.bias, bias_dt, out.shape[3])

    def _qconv2d(self, a) -> None:
        q8 = (DType.INT8, DType.UINT8)
        x = self.tile("x", a.x, allowed=q8)
        w = self.weights("w", a.w, allowed=(DType.INT8,))
        out = self.tile("out", a.out, write=True, allowed=q8)
        self.conv_geometry(a, x, w, out)
        self.vector("bias", a.bias, DType.INT32, out.shape[3])
        if a.scale_addr == NONE_ADDR:
            self.fail("scale_addr: the per-channel scale is required")
        self.vector("scale_addr", a.scale_addr, DType.FP32, out.shape[3])
        if a.lo > a.hi:
            self.fail(f"lo: clamp bounds [{a.lo}, {a.hi}] are empty")

    def conv_geometry(self, a, x: Tile, w: Tile, out: Tile) -> None:
        """Shapes, stride, dilation, groups, padding and x_zp of a convolution."""
        n, h, wd, cin = x.shape
        kh, kw, cg, cout = w.shape
        (sh, sw), (dh, dw), g = a.stride, a.dilation, a.groups
        if 0 in (sh, sw):
            self.fail(f"stride: {list(a.stride)} must be >= 1")
        if 0 in (dh, dw):
            self.fail(f"dilation: {list(a.dilation)} must be >= 1")
        if g == 0 or cin % g or cout % g:
            self.fail(f"groups: {g} must divide input channels {cin} and output channels {cout}")
        if cg != cin // g:
            self.fail(f"w: {cg} input channels per group, expected {cin // g} ({cin} / {g} groups)")
        pt, pb, pl, pr = a.pad
        oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
        if oh < 1 or ow < 1:
            self.fail(f"w: dilated kernel {kh}x{kw} larger than the padded input")
        if out.shape != (n, oh, ow, cout):
            self.fail(f"out: shape {list(out.shape)}, expected {[n, oh, ow, cout]}")
        self.padded_limit(n * (h + pt + pb) * (wd + pl + pr) * cin)
        if x.dtype.is_float:
            if a.x_zp != 0:
                self.fail("x_zp: must be 0 for float convolution")
        else:
            lo, hi = (-128, 127) if x.dtype == DType.INT8 else (0, 255)
            if not lo <= a.x_zp <= hi:
                self.fail(f"x_zp: {a.x_zp} outside the {x.dtype.name.lower()} range")

    # --- vector ------------------------------------------------------------------------
    def _vbinary(self, a) -> None:
        f = self.enum("func", BinaryFunc, a.func)
        x = self.tile("a", a.a)
        y = self.tile("b", a.b)
        out = self.tile("out", a.out, write=True)
        if x.dtype != y.dtype:
            self.fail(f"b dtype {y.dtype.name.lower()} != a dtype {x.dtype.name.lower()}")
        if f not in isa.COMPARE_BINARY:
            self.same_class(x.dtype, out.dtype)
        if not x.dtype.is_float and f not in isa.INTEGER_BINARY:
            self.fail(f"func: {f.name.lower()} needs float operands")
        self.broadcast_out(x, y, out)

    def _qbinary(self, a) -> None:
        f = self.enum("func", BinaryFunc, a.func)
        if f not in isa.QUANT_BINARY:
            self.fail(f"func: {f.name.lower()} is not one of qbinary's add, sub, mul, max, min")
        q8 = (DType.INT8, DType.UINT8)
        x = self.tile("a", a.a, allowed=q8)
        y = self.tile("b", a.b, allowed=q8)
        out = self.tile("out", a.out, write=True, allowed=q8)
        for name, scale, zp, t in (("a", a.a_scale, a.a_zp, x), ("b", a.b_scale, a.b_zp, y),
                                   ("y", a.y_scale, a.y_zp, out)):
            self.finite(f"{name}_scale", scale)
            if not scale > 0:
                self.fail(f"{name}_scale: {scale} is not positive")
            lo, hi = (-128, 127) if t.dtype == DType.INT8 else (0, 255)
            if not lo <= zp <= hi:
                self.fail(f"{name}_zp: {zp} outside the {t.dtype.name.lower()} range")
        if a.lo > a.hi:
            self.fail(f"lo: clamp bounds [{a.lo}, {a.hi}] are empty")
        self.broadcast_out(x, y, out)

    def _select(self, a) -> None:
        c = self.tile("cond", a.cond)
        x = self.tile("a", a.a)
        y = self.tile("b", a.b)
        out = self.tile("out", a.out, write=True)
        if x.dtype != y.dtype:
            self.fail(f"b dtype {y.dtype.name.lower()} != a dtype {x.dtype.name.lower()}")
        self.same_class(x.dtype, out.dtype)
        shape = []
        for d, dims in enumerate(zip(c.shape, x.shape, y.shape)):
            m = max(dims)
            if any(q not in (1, m) for q in dims):
                self.fail(f"cond/a/b: dim {d} ({', '.join(map(str, dims))}) does not broadcast")
            shape.append(m)
        if out.shape != tuple(shape):
            self.fail(f"out: shape {list(out.shape)}, expected the broadcast shape {shape}")

    def _vunary(self, a) -> None:
        f = self.enum("func", UnaryFunc, a.func)
        x = self.tile("a", a.a)
        out = self.tile("out", a.out, write=True)
        self.same_shape(x, out)
        self.finite("p0", a.p0, allow_inf=True)
        self.finite("p1", a.p1, allow_inf=True)
        if f == UnaryFunc.COPY:
            return
        self.same_class(x.dtype, out.dtype)
        if not x.dtype.is_float and f not in isa.INTEGER_UNARY:
            self.fail(f"func: {f.name.lower()} needs float operands")

    def _lut(self, a) -> None:
        bytes8 = (DType.INT8, DType.UINT8)
        x = self.tile("a", a.a, allowed=bytes8)
        out = self.tile("out", a.out, write=True, allowed=bytes8)
        self.same_shape(x, out)
        self.sram_range("table", a.table, 256, 1, False)

    def _reduce(self, a) -> None:
        self.enum("func", ReduceFunc, a.func)
        self.axes(a.axes)
        x = self.tile("a", a.a)
        out = self.tile("out", a.out, write=True)
        self.same_class(x.dtype, out.dtype)
        want = [1 if a.axes >> d & 1 else s for d, s in enumerate(x.shape)]
        if list(out.shape) != want:
            self.fail(f"out: shape {list(out.shape)}, expected {want}")

    def _softmax(self, a) -> None:
        if a.axis >= isa.MAX_RANK:
            self.fail(f"axis: {a.axis} out of range 0..3")
        floats = (DType.FP16, DType.FP32)
        x = self.tile("a", a.a, allowed=floats)
        out = self.tile("out", a.out, write=True, allowed=floats)
        self.same_shape(x, out)

    def _norm(self, a) -> None:
        self.axes(a.axes)
        floats = (DType.FP16, DType.FP32)
        x = self.tile("a", a.a, allowed=floats)
        out = self.tile("out", a.out, write=True, allowed=floats)
        self.same_shape(x, out)
        self.finite("eps", a.eps)
        if a.eps < 0:
            self.fail(f"eps: {a.eps} is negative")
        self.vector("gamma", a.gamma, DType.FP32, x.shape[3])
        self.vector("beta", a.beta, DType.FP32, x.shape[3])

    def _requant(self, a) -> None:
        x = self.tile("a", a.a)
        out = self.tile("out", a.out, write=True,
                        allowed=(DType.INT8, DType.UINT8, DType.INT32))
        self.same_shape(x, out)
        self.finite("scale", a.scale)
        c = x.shape[3]
        self.vector("scale_addr", a.scale_addr, DType.FP32, c)
        self.vector("zp_addr", a.zp_addr, DType.INT32, c)
        if a.lo > a.hi:
            self.fail(f"lo: clamp bounds [{a.lo}, {a.hi}] are empty")

    def _transpose(self, a) -> None:
        if sorted(a.perm) != [0, 1, 2, 3]:
            self.fail(f"perm: {list(a.perm)} is not a permutation of 0..3")
        x = self.tile("a", a.a)
        out = self.tile("out", a.out, write=True)
        if x.dtype != out.dtype:
            self.fail("out: dtype differs from a's")
        want = [x.shape[p] for p in a.perm]
        if list(out.shape) != want:
            self.fail(f"out: shape {list(out.shape)}, expected {want}")

    def _copy_region(self, a) -> None:
        x = self.tile("a", a.a)
        out = self.tile("out", a.out, write=True)
        if x.dtype != out.dtype:
            self.fail("out: dtype differs from a's")
        for d, (o, s, t) in enumerate(zip(a.offset, x.shape, out.shape)):
            if o + s > t:
                self.fail(f"offset: dim {d}: {o}+{s} exceeds out's {t}")

    def _fill(self, a) -> None:
        self.tile("out", a.out, write=True)
        self.finite("value", a.value, allow_inf=True)

    # --- pooling --------------------------------------------------------------------------
    def _pool(self, a) -> None:
        self.enum("func", PoolFunc, a.func)
        x = self.tile("x", a.x, allowed=(DType.INT8, DType.UINT8, DType.INT32, DType.FP16, DType.FP32))
        out = self.tile("out", a.out, write=True)
        if out.dtype != x.dtype:
            self.fail("out: dtype differs from x's")
        self.flags(a.flags, isa.POOL_FLAGS)
        (kh, kw), (sh, sw) = a.kernel, a.stride
        if 0 in (kh, kw) or 0 in (sh, sw):
            self.fail(f"kernel {list(a.kernel)} and stride {list(a.stride)} must be >= 1")
        pt, pb, pl, pr = a.pad
        if pt >= kh or pb >= kh or pl >= kw or pr >= kw:
            self.fail(f"pad: {list(a.pad)} must be smaller than the kernel {list(a.kernel)}")
        n, h, w, c = x.shape
        oh = (h + pt + pb - kh) // sh + 1
        ow = (w + pl + pr - kw) // sw + 1
        if oh < 1 or ow < 1:
            self.fail(f"kernel: {kh}x{kw} larger than the padded input")
        if out.shape != (n, oh, ow, c):
            self.fail(f"out: shape {list(out.shape)}, expected {[n, oh, ow, c]}")
        if (kh, kw) != (h, w) or any(a.pad):
            if kh * kw > isa.MAX_POOL_WINDOW:
                self.fail(f"kernel: {kh}x{kw} window exceeds {isa.MAX_POOL_WINDOW} elements "
                          "(only global pooling may be larger)")
            self.padded_limit(n * (h + pt + pb) * (w + pl + pr) * c)


def _coalesce(ranges):
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _covered(runs, lo: int, hi: int) -> bool:
    i = bisect.bisect_right(runs, [lo, float("inf")]) - 1
    return i >= 0 and runs[i][1] >= hi
