"""The timing model: costs, overlap through signal/wait, stalls, hazards."""

import numpy as np

from npud.emulator.assembler import StreamBuilder
from npud.emulator.config import make_config
from npud.emulator.isa import tile
from npud.emulator.mmu import Mapping
from npud.emulator.timing import COMMAND_CYCLES
from npud.emulator.validator import validate

CFG = make_config("edge")
MAPS = [Mapping(0x100000, 1 << 20, True)]
F = lambda a, s: tile(a, "fp32", s)


def stats(sb):
    return validate(sb.build(), CFG, MAPS).stats


def test_dma_cost_latency_plus_bandwidth_and_bursts():
    sb = StreamBuilder(CFG)
    sb.dma_load(0, 0x100000, "fp32", (64, 64)).end()
    dense = stats(sb)
    assert dense.cycles == COMMAND_CYCLES + CFG.dma_latency_cycles + 64 * 64 * 4 // CFG.dma_bytes_per_cycle
    assert dense.dma_bytes_in == 64 * 64 * 4 and dense.engine_busy["dma"] == dense.cycles
    sb = StreamBuilder(CFG)
    sb.dma_load(0, 0x100000, "fp32", (64, 64), (1024, 8)).end()   # 4-byte bursts
    assert stats(sb).cycles == COMMAND_CYCLES + CFG.dma_latency_cycles + 64 * 64


def test_mac_cost_counts_array_tiles():
    sb = StreamBuilder(CFG)
    sb.matmul(tile(0, "int8", (32, 64)), tile(4096, "int8", (64, 16)), tile(8192, "int32", (32, 16))).end()
    s = stats(sb)
    assert s.macs == 32 * 64 * 16
    assert s.engine_busy["mac"] == COMMAND_CYCLES + 32 * 16 * 64 // 256 + 32
    sb = StreamBuilder(CFG)   # N = 1 wastes 15 of 16 columns
    sb.matmul(tile(0, "int8", (32, 64)), tile(4096, "int8", (64, 1)), tile(8192, "int32", (32, 1))).end()
    assert stats(sb).engine_busy["mac"] == COMMAND_CYCLES + 32 * 16 * 64 // 256 + 32
    sb = StreamBuilder(CFG)   # fp32 runs at 32 MACs/cycle
    sb.matmul(F(0, (32, 64)), F(16384, (64, 16)), F(32768, (32, 16))).end()
    assert stats(sb).engine_busy["mac"] == COMMAND_CYCLES + 32 * 16 * 64 // 32 + 32


def _pipeline(double_buffer: bool):
    """Load tile i+1 while computing on tile i (double buffering) or not."""
    sb = StreamBuilder(CFG)
    n = 4
    for i in range(n):
        buf = (i % 2 if double_buffer else 0) * 65536
        if i >= 2 and double_buffer:
            sb.sync("mac", "dma", sem=2 + i % 2)   # buffer free again
        elif i >= 1 and not double_buffer:
            sb.sync("mac", "dma", sem=2)
        sb.dma_load(buf, 0x100000, "fp32", (64, 64))
        sb.sync("dma", "mac", sem=i % 2)
        sb.matmul(F(buf, (64, 64)), F(buf, (64, 64)), F(131072 + buf // 4, (64, 64)))
    return stats(sb.end())


def test_double_buffering_overlaps_dma_and_compute():
    serial, overlapped = _pipeline(False), _pipeline(True)
    assert serial.hazards == overlapped.hazards == 0
    assert overlapped.cycles < serial.cycles
    busy = serial.engine_busy["dma"] + serial.engine_busy["mac"]
    assert serial.cycles == busy            # nothing overlaps
    assert overlapped.cycles < busy         # DMA hidden behind compute
    assert serial.stall_cycles > 0


def test_missing_sync_is_counted_as_a_hazard():
    sb = StreamBuilder(CFG)
    sb.dma_load(0, 0x100000, "fp32", (64,))
    sb.add(F(0, (64,)), F(0, (64,)), F(256, (64,)))   # reads what the DMA is still writing
    s = stats(sb.end())
    assert s.hazards == 1
    sb = StreamBuilder(CFG)
    sb.dma_load(0, 0x100000, "fp32", (64,))
    sb.add(F(1024, (64,)), F(1024, (64,)), F(2048, (64,)))  # independent data: no hazard
    s = stats(sb.end())
    assert s.hazards == 0 and s.cycles < s.engine_busy["dma"] + s.engine_busy["vector"]


def test_barrier_and_multicore():
    cfg = make_config("server")
    sb = StreamBuilder(cfg)
    for core in range(4):
        sb.dma_load(0, 0x100000, "fp32", (256,), core=core)
    sb.barrier()
    sb.dma_load(0, 0x100000, "fp32", (256,), core=0)
    s = validate(sb.end().build(), cfg, MAPS).stats
    one = COMMAND_CYCLES + cfg.dma_latency_cycles + 1024 // cfg.dma_bytes_per_cycle
    assert s.cycles == 2 * one       # the four cores load in parallel
    assert s.engine_busy["dma"] == 5 * one
    assert s.stall_cycles == 12 * one   # the 12 non-DMA queues idled at the barrier
    assert 0 < s.utilisation(4)["dma"] <= 1
    d = s.to_dict()
    assert set(d) >= {"cycles", "macs", "dma_bytes_in", "dma_bytes_out", "commands",
                      "stall_cycles", "engine_busy"}


def test_execute_returns_the_modeled_stats():
    from emu_harness import Rig
    rig = Rig()
    va = rig.put(np.ones(64, np.float32))
    sb = rig.builder()
    sb.dma_load(0, va, "fp32", (64,)).end()
    prog = validate(sb.build(), rig.cfg, rig.ctx.mappings())
    s1, s2 = rig.dev.execute(rig.ctx, prog), rig.dev.execute(rig.ctx, prog)
    assert s1 == s2 == prog.stats and s1 is not prog.stats
