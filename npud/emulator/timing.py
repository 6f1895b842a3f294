"""The timing model: modeled cycles and per-job counters.

Each core has four engine queues (DMA, MAC, vector, pool) that run in
parallel.  A queue runs its commands in stream order; queues are ordered
against each other only by ``signal``/``wait`` (semaphores, device-wide)
and ``barrier``.  Because every cost depends only on operand shapes, the
whole schedule is computed once, when the stream is validated; executing
the stream does not touch the model.  See docs/ISA.md, "Timing model".
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field, replace

from .isa import Command, DType, Engine, UnaryFunc

QUEUES = (Engine.DMA, Engine.MAC, Engine.VECTOR, Engine.POOL)
COMMAND_CYCLES = 8          # fixed decode/dispatch cost of every queued command
TRANSCENDENTAL_CYCLES = 4   # vector passes per element for exp/tanh/erf/... (a LUT + polynomial)
_CHEAP_UNARY = {UnaryFunc.COPY, UnaryFunc.RELU, UnaryFunc.CLIP, UnaryFunc.LEAKY_RELU,
                UnaryFunc.NEG, UnaryFunc.ABS}


@dataclass
class JobStats:
    """Counters of one job.  ``cycles`` is the modeled makespan;
    ``engine_busy`` sums every core's busy cycles per engine; ``stall_cycles``
    is time queues spent blocked in ``wait``/``barrier``; ``hazards`` counts
    SRAM accesses that the model lets overlap with a conflicting access on
    another engine (a missing signal/wait: the stream races on hardware)."""
    cycles: int = 0
    macs: int = 0
    dma_bytes_in: int = 0
    dma_bytes_out: int = 0
    commands: int = 0
    stall_cycles: int = 0
    engine_busy: dict[str, int] = field(default_factory=lambda: {e.name.lower(): 0 for e in QUEUES})
    hazards: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def copy(self) -> "JobStats":
        # Not through asdict: it deep-copies every field, and a run copies once per segment.
        return replace(self, engine_busy=dict(self.engine_busy))

    def utilisation(self, cores: int) -> dict[str, float]:
        """Fraction of the makespan each engine type was busy (averaged over cores)."""
        total = max(self.cycles, 1) * cores
        return {k: v / total for k, v in self.engine_busy.items()}


def _mac_key(dt: DType) -> str:
    return "int8" if dt in (DType.INT8, DType.UINT8) else dt.name.lower()


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def _array_cycles(config, dt: DType, batch: int, rows: int, cols: int, k: int) -> int:
    """Output-stationary array: `rows` (pixels) tile onto mac_rows, `cols`
    (output channels) onto mac_cols; partial tiles waste the array."""
    padded = batch * _ceil_to(rows, config.mac_rows) * _ceil_to(cols, config.mac_cols) * k
    fill = config.mac_rows + config.mac_cols  # pipeline fill/drain per command
    return -(-padded // config.macs_per_cycle[_mac_key(dt)]) + fill


def gather_bytes(a) -> int:
    """Bytes a dma_gather reads from device memory."""
    return a.outer * math.prod(a.idx.shape) * a.row * DType(a.dtype).size


def command_cost(cmd: Command, config) -> tuple[int, int]:
    """(cycles, MACs) of one queued command, excluding queueing."""
    a, name = cmd.args, cmd.op.name
    if name in ("dma_load", "dma_store", "dma_map"):   # a window streams its bytes as a load does
        esize = DType(a.dtype).size
        run = esize
        for n, s in zip(reversed(a.shape), reversed(a.strides)):
            if s != run:
                break
            run *= n
        total = math.prod(a.shape) * esize
        bursts = total // run
        return (COMMAND_CYCLES + config.dma_latency_cycles
                + bursts * -(-run // config.dma_bytes_per_cycle)), 0
    if name == "dma_gather":   # one burst per gathered row
        esize = DType(a.dtype).size
        bursts = a.outer * math.prod(a.idx.shape)
        return (COMMAND_CYCLES + config.dma_latency_cycles
                + bursts * -(-(a.row * esize) // config.dma_bytes_per_cycle)), 0
    if name == "matmul":
        b0, b1, m, n = a.out.shape
        k = a.a.shape[3]
        macs = b0 * b1 * m * n * k
        return COMMAND_CYCLES + _array_cycles(config, a.a.dtype, b0 * b1, m, n, k), macs
    if name in ("conv2d", "qconv2d"):   # qconv2d requantises in the array's output stage
        n, oh, ow, cout = a.out.shape
        kh, kw, cg, _ = a.w.shape
        g = a.groups
        macs = n * oh * ow * cout * kh * kw * cg
        if cg == 1 and cout == g:   # depthwise: channels across the columns
            cyc = _array_cycles(config, a.x.dtype, 1, n * oh * ow, cout, kh * kw)
        else:
            cyc = _array_cycles(config, a.x.dtype, g, n * oh * ow, cout // g, kh * kw * cg)
        return COMMAND_CYCLES + cyc, macs
    vb = config.vector_bytes_per_cycle
    if name == "pool":
        kh, kw = a.kernel
        work = math.prod(a.out.shape) * kh * kw * DType(a.x.dtype).size
        return COMMAND_CYCLES + -(-work // vb), 0
    if name == "fill":
        return COMMAND_CYCLES + -(-math.prod(a.out.shape) * DType(a.out.dtype).size // vb), 0
    # vector engine: one pass over the widest operand, more for heavy functions
    tiles = [t for t in a if hasattr(t, "addr") and hasattr(t, "shape")]
    work = max(math.prod(t.shape) * DType(t.dtype).size for t in tiles)
    passes = 1
    if name == "vunary" and a.func not in _CHEAP_UNARY:
        passes = TRANSCENDENTAL_CYCLES
    elif name in ("softmax", "norm"):
        passes = 3 + (TRANSCENDENTAL_CYCLES if name == "softmax" else 1)
    elif name == "vbinary" and a.func in (3, 6):  # div, pow
        passes = TRANSCENDENTAL_CYCLES
    elif name == "qbinary":   # two dequantisations, the op and a quantisation (a division)
        passes = TRANSCENDENTAL_CYCLES
    return COMMAND_CYCLES + passes * -(-work // vb), 0


def schedule(commands, footprints, config) -> JobStats:
    """Simulate the engine queues over a validated command list."""
    st = JobStats(commands=len(commands))
    free = {(c, e): 0 for c in range(config.cores) for e in QUEUES}
    sems = [deque() for _ in range(32)]
    # Per queue, its SRAM accesses in completion order (a queue finishes its
    # commands in order, so `end` only grows): a hazard check walks back only
    # over accesses still in flight.
    recent = {q: [] for q in free}
    for cmd, fp in zip(commands, footprints):
        op = cmd.op
        if op.engine == Engine.CTRL:
            if op.name == "signal":
                sems[cmd.args.sem].append(free[(cmd.core, Engine(cmd.args.engine))])
            elif op.name == "wait":
                q = (cmd.core, Engine(cmd.args.engine))
                t = sems[cmd.args.sem].popleft()
                if t > free[q]:
                    st.stall_cycles += t - free[q]
                    free[q] = t
            elif op.name == "barrier":
                t = max(free.values())
                for q in free:
                    st.stall_cycles += t - free[q]
                    free[q] = t
            continue
        q = (cmd.core, op.engine)
        start = free[q]
        cycles, macs = command_cost(cmd, config)
        end = start + cycles
        free[q] = end
        st.engine_busy[op.engine.name.lower()] += cycles
        st.macs += macs
        if op.name in ("dma_load", "dma_map"):
            st.dma_bytes_in += math.prod(cmd.args.shape) * DType(cmd.args.dtype).size
        elif op.name == "dma_gather":
            st.dma_bytes_in += gather_bytes(cmd.args)
        elif op.name == "dma_store":
            st.dma_bytes_out += math.prod(cmd.args.shape) * DType(cmd.args.dtype).size
        if _races(recent, fp, op.engine, start):
            st.hazards += 1
        recent[q].extend((end, core, lo, hi, write) for core, lo, hi, write in fp)
    st.cycles = max(free.values())
    return st


def _races(recent, footprint, engine, start: int) -> bool:
    """Does an access of this command overlap a conflicting access that
    another engine of the same SRAM has not finished by `start`?"""
    for core, lo, hi, write in footprint:
        for e in QUEUES:
            if e == engine:
                continue
            for f_end, _, f_lo, f_hi, f_write in reversed(recent[(core, e)]):
                if f_end <= start:
                    break
                if lo < f_hi and f_lo < hi and (write or f_write):
                    return True
    return False
