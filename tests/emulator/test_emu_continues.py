"""A job run in parts (a model's layers, for preemption) keeps its SRAM between parts;
a new job never sees what the previous one left there."""

import mmap

import numpy as np

from npud.emulator.assembler import StreamBuilder, tile
from npud.emulator.config import make_config
from npud.emulator.device import Device
from npud.emulator.validator import validate

CFG = make_config("edge")
A, OUT = 0x10000, 0x20000
N = 256


def _program(ctx, build):
    sb = StreamBuilder(CFG)
    build(sb)
    sb.end()
    return validate(sb.build(), CFG, ctx.mappings())


def _setup():
    device = Device(CFG)
    ctx = device.create_context()
    a, out = mmap.mmap(-1, CFG.page_size), mmap.mmap(-1, CFG.page_size)
    np.frombuffer(a, np.float32)[:N] = np.arange(1, N + 1)
    ctx.map(A, a, writable=False)
    ctx.map(OUT, out, writable=True)
    return device, ctx, np.frombuffer(out, np.float32)[:N]


def test_a_continued_part_sees_the_sram_its_job_wrote():
    device, ctx, out = _setup()
    load = _program(ctx, lambda sb: sb.dma_load(0, A, "float32", (N,)))
    store = _program(ctx, lambda sb: sb.dma_store(0, OUT, "float32", (N,)))
    device.execute(ctx, load)
    device.execute(ctx, store, continues=True)
    np.testing.assert_array_equal(out, np.arange(1, N + 1))


def test_a_new_job_starts_with_zeroed_sram():
    device, ctx, out = _setup()
    load = _program(ctx, lambda sb: sb.dma_load(0, A, "float32", (N,)))
    store = _program(ctx, lambda sb: sb.dma_store(0, OUT, "float32", (N,)))
    device.execute(ctx, load)
    out[:] = -1
    device.execute(ctx, store)                     # not a continuation: SRAM cleared first
    np.testing.assert_array_equal(out, np.zeros(N, np.float32))


def test_continuations_widen_what_the_next_job_clears():
    device, ctx, out = _setup()
    high = 4 * N   # the first part dirties SRAM up to 2 KiB, its continuation only up to 1 KiB
    device.execute(ctx, _program(ctx, lambda sb: sb.fill(tile(high, "float32", (N,)), 7.0)))
    device.execute(ctx, _program(ctx, lambda sb: sb.dma_load(0, A, "float32", (N,))), continues=True)
    out[:] = -1
    device.execute(ctx, _program(ctx, lambda sb: sb.dma_store(high, OUT, "float32", (N,))))
    np.testing.assert_array_equal(out, np.zeros(N, np.float32))   # the 7s were cleared too


def test_segments_derived_from_a_program_are_prepared_apart():
    # The daemon cuts a program into segments with dataclasses.replace: each must run
    # its own commands, not the steps prepared for the program (or another segment).
    import dataclasses

    from emu_harness import Rig
    rig = Rig()
    src = rig.put(np.arange(16, dtype=np.int32))
    a, b = rig.alloc(64), rig.alloc(64)
    sb = rig.builder()
    sb.dma_load(0, src, "int32", (16,))
    sb.sync("dma", "dma")
    sb.dma_store(0, a, "int32", (16,))
    sb.sync("dma", "dma")
    sb.dma_store(0, b, "int32", (16,)).end()
    prog = validate(sb.build(), rig.cfg, rig.ctx.mappings())
    rig.dev.execute(rig.ctx, prog)          # prepares the whole program
    rig.bufs[a][:64] = bytes(64)
    rig.bufs[b][:64] = bytes(64)
    first = dataclasses.replace(prog, commands=prog.commands[:4])   # load, sync, store to a
    rig.dev.execute(rig.ctx, first)
    np.testing.assert_array_equal(rig.get(a, np.int32, (16,)), np.arange(16))
    np.testing.assert_array_equal(rig.get(b, np.int32, (16,)), 0)
