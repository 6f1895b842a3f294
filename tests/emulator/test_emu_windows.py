"""Weight windows: dma_map binds read-only device memory that the MAC engine
reads in place; same results and modeled cost as a dma_load into SRAM."""

import numpy as np
import pytest

from npud.emulator import isa
from npud.emulator.assembler import StreamBuilder
from npud.emulator.config import make_config
from npud.emulator.errors import StreamError
from npud.emulator.isa import tile
from npud.emulator.mmu import Mapping
from npud.emulator.validator import validate
from emu_harness import Rig

WIN = isa.WINDOW_BASE


def _conv_job(rig, x, w, *, window: bool, relu=False, q=False):
    """x -> SRAM, w through SRAM or a window, conv2d (qconv2d if q), result out."""
    xdt = "int8" if q else "fp32"
    sb = rig.builder()
    xva, wva = rig.put(x), rig.put(w)
    out_shape = (1, x.shape[1] - w.shape[0] + 1, x.shape[2] - w.shape[1] + 1, w.shape[3])
    sb.dma_load(0, xva, xdt, x.shape)
    waddr = WIN if window else 4096
    if window:
        sb.dma_map(WIN, wva, w.dtype, w.shape)
    else:
        sb.dma_load(4096, wva, w.dtype, w.shape)
    sb.sync("dma", "mac")
    xt, wt = tile(0, xdt, x.shape), tile(waddr, w.dtype, w.shape)
    if q:
        scale = rig.put(np.full(w.shape[3], 0.01, np.float32))
        sb.dma_load(8192, scale, "fp32", (w.shape[3],))
        sb.sync("dma", "mac")
        sb.qconv2d(xt, wt, tile(16384, "int8", out_shape), scale_addr=8192, x_zp=3)
        odt = np.int8
    else:
        sb.conv2d(xt, wt, tile(16384, "fp32", out_shape), relu=relu)
        odt = np.float32
    sb.sync("mac", "dma")
    ova = rig.alloc(int(np.prod(out_shape)) * np.dtype(odt).itemsize)
    sb.dma_store(16384, ova, odt, out_shape).end()
    stats = rig.run(sb)
    return rig.get(ova, odt, out_shape), stats


@pytest.mark.parametrize("q", [False, True])
def test_window_weights_read_in_place_equal_sram_weights_and_cost_the_same(q):
    rng = np.random.default_rng(3)
    if q:
        x = rng.integers(-128, 128, (1, 6, 6, 8), dtype=np.int8)
        w = rng.integers(-128, 128, (3, 3, 8, 5), dtype=np.int8)
    else:
        x = rng.standard_normal((1, 6, 6, 8)).astype(np.float32)
        w = rng.standard_normal((3, 3, 8, 5)).astype(np.float32)
    got_sram, st_sram = _conv_job(Rig(), x, w, window=False, relu=True, q=q)
    got_win, st_win = _conv_job(Rig(), x, w, window=True, relu=True, q=q)
    np.testing.assert_array_equal(got_win, got_sram)
    # the same bytes stream from memory: the model charges a window what a load costs
    assert st_win.cycles == st_sram.cycles
    assert st_win.dma_bytes_in == st_sram.dma_bytes_in
    assert st_win.hazards == 0


def test_matmul_reads_window_weights():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((4, 6)).astype(np.float32)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    rig = Rig()
    sb = rig.builder()
    sb.dma_load(0, rig.put(a), "fp32", a.shape)
    sb.dma_map(WIN, rig.put(w), "fp32", w.shape)
    sb.sync("dma", "mac")
    sb.matmul(tile(0, "fp32", a.shape), tile(WIN, "fp32", w.shape), tile(256, "fp32", (4, 3)))
    sb.sync("mac", "dma")
    out = rig.alloc(48)
    sb.dma_store(256, out, "fp32", (4, 3)).end()
    rig.run(sb)
    np.testing.assert_allclose(rig.get(out, np.float32, (4, 3)), a @ w, rtol=1e-6)


def test_window_reads_memory_in_place_each_run_and_takes_no_sram():
    rig = Rig()
    x = np.ones((1, 3, 3, 2), np.float32)
    wva = rig.put(np.ones((3, 3, 2, 1), np.float32))
    sb = rig.builder()
    sb.dma_load(0, rig.put(x), "fp32", x.shape)
    sb.dma_map(WIN, wva, "fp32", (3, 3, 2, 1))
    sb.sync("dma", "mac")
    sb.conv2d(tile(0, "fp32", x.shape), tile(WIN, "fp32", (3, 3, 2, 1)), tile(256, "fp32", (1, 1, 1, 1)))
    sb.sync("mac", "dma")
    out = rig.alloc(4)
    sb.dma_store(256, out, "fp32", (1, 1, 1, 1)).end()
    prog = validate(sb.build(), rig.cfg, rig.ctx.mappings())
    assert prog.sram_used == (260,)     # x and the output: the window is not SRAM
    rig.dev.execute(rig.ctx, prog)
    assert rig.get(out, np.float32, (1,)).item() == 18
    rig.bufs[wva][:72] = np.full(18, 2, np.float32).tobytes()   # the host updates the weights
    rig.dev.execute(rig.ctx, prog)
    assert rig.get(out, np.float32, (1,)).item() == 36


CFG = make_config("edge")
RO, RW = Mapping(0x10000, 0x10000, False), Mapping(0x20000, 0x10000, True)
F = lambda addr, shape: tile(addr, "fp32", shape)


def _window_stream(cfg, *, map_va=0x10000, window=WIN, shape=(3, 3, 1, 1), strides=None,
                   use=WIN, use_shape=(3, 3, 1, 1)):
    sb = StreamBuilder(cfg)
    if strides is None:
        sb.dma_map(window, map_va, "fp32", shape)
    else:
        sb.emit("dma_map", core=0, sram=window, va=map_va, dtype=int(isa.DType.FP32),
                shape=shape, strides=strides)
    sb.sync("dma", "mac")
    sb.conv2d(F(0, (1, 4, 4, 1)), F(use, use_shape), F(256, (1, 5 - use_shape[0], 5 - use_shape[1], 1)))
    return sb.end().build()


@pytest.mark.parametrize("kw,match", [
    (dict(use=WIN + 64), "no binding"),
    (dict(shape=(2, 2, 1, 1)), "no binding of 36 bytes"),
    (dict(map_va=0x20000), "read-only mappings"),
    (dict(map_va=0x30000), "read-only mappings"),
    (dict(window=WIN - 64, use=WIN - 64), "outside the weight windows|exceeds SRAM"),
    (dict(window=isa.WINDOW_END - 16, use=isa.WINDOW_END - 16), "outside the weight windows"),
    (dict(window=WIN + 2, use=WIN + 2), "not aligned"),
    (dict(strides=(0, 12, 4, 8)), "dense region"),
])
def test_validator_refuses_bad_windows(kw, match):
    with pytest.raises(StreamError, match=match) as e:
        validate(_window_stream(CFG, **kw), CFG, [RO, RW])
    assert e.value.code == "EINVAL"


def test_binding_is_per_core():
    cfg = make_config("server")
    sb = StreamBuilder(cfg)
    sb.dma_map(WIN, 0x10000, "fp32", (3, 3, 1, 1), core=0)
    sb.sync("dma", "mac")
    sb.conv2d(F(0, (1, 4, 4, 1)), F(WIN, (3, 3, 1, 1)), F(256, (1, 2, 2, 1)), core=1)
    with pytest.raises(StreamError, match="on core 1"):
        validate(sb.end().build(), cfg, [RO])


def test_a_window_is_only_a_weight_operand():
    sb = StreamBuilder(CFG)
    sb.dma_map(WIN, 0x10000, "fp32", (1, 1, 4, 4))
    sb.sync("dma", "mac")
    sb.conv2d(F(WIN, (1, 4, 4, 1)), F(0, (3, 3, 1, 1)), F(256, (1, 2, 2, 1)))
    with pytest.raises(StreamError, match="exceeds SRAM"):
        validate(sb.end().build(), CFG, [RO])
