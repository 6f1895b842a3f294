"""Immutable mappings (a loaded model's weights): convolutions whose weights window is bound to
one keep the weights in oneDNN's blocked layout from the program's load to its unload --
reordered once, never compared, one copy per binding and layout, counted and bounded
(npud/emulator/engines/onednn.py `_Frozen`) -- and compute what the same program computes on
mutable memory."""

import os
import socket

import numpy as np
import pytest

from npud.emulator import isa
from npud.emulator.config import make_config
from npud.emulator.device import frozen_weights
from npud.emulator.device_process import DeviceProcess
from npud.emulator.engines import onednn
from npud.emulator.errors import StreamError
from npud.emulator.isa import tile
from npud.emulator.mmu import Mapping
from npud.emulator.validator import validate
from emu_harness import Rig
from test_emu_qconv import definition

pytestmark = pytest.mark.skipif(not onednn.available(), reason=onednn.describe())

WIN = isa.WINDOW_BASE
OUT = 1 << 20      # SRAM address of the output tile


def _conv_stream(rig, x, w, *, bands=1, pad=1, stride=1, q=False, relu=False):
    """x -> SRAM, w bound to a window, then one conv2d (qconv2d if q) per band of output rows
    (each band its own command reading the whole window), stored to one output buffer.
    (builder, output va, output shape, weights va)."""
    sb = rig.builder()
    xdt = "uint8" if q else "fp32"
    xva, wva = rig.put(x), rig.put(w)
    kh = w.shape[0]
    oh = (x.shape[1] + 2 * pad - kh) // stride + 1
    out_shape = (1, oh, oh, w.shape[3])
    odt = np.uint8 if q else np.float32
    sb.dma_load(0, xva, xdt, x.shape)
    sb.dma_map(WIN, wva, w.dtype, w.shape)
    if q:
        sb.dma_load(OUT - 4096, rig.put(np.full(w.shape[3], 2.0 ** -12, np.float32)), "fp32", (w.shape[3],))
    sb.sync("dma", "mac")
    rows = -(-oh // bands)
    item = np.dtype(odt).itemsize
    for r0 in range(0, oh, rows):
        r1 = min(oh, r0 + rows)
        # the input rows this band reads, with the padding rows it needs
        i0, i1 = r0 * stride - pad, (r1 - 1) * stride - pad + kh
        top, bottom = max(0, -i0), max(0, i1 - x.shape[1])
        band_x = tile(max(0, i0) * x.shape[2] * x.shape[3] * x.itemsize, xdt,
                      (1, min(i1, x.shape[1]) - max(0, i0), x.shape[2], x.shape[3]))
        band_out = tile(OUT + r0 * oh * w.shape[3] * item, "uint8" if q else "fp32",
                        (1, r1 - r0, oh, w.shape[3]))
        kw = dict(stride=(stride, stride), pad=(top, bottom, pad, pad))
        if q:
            sb.qconv2d(band_x, tile(WIN, "int8", w.shape), band_out, scale_addr=OUT - 4096, x_zp=3, y_zp=9, **kw)
        else:
            sb.conv2d(band_x, tile(WIN, "fp32", w.shape), band_out, relu=relu, **kw)
    sb.sync("mac", "dma")
    ova = rig.alloc(int(np.prod(out_shape)) * item)
    sb.dma_store(OUT, ova, odt, out_shape).end()
    return sb, ova, out_shape, wva


def _loaded(rig, sb, wva, *, immutable=True):
    """The stream validated as a loaded program whose weights mapping is immutable."""
    maps = [Mapping(m.va, m.size, m.writable, immutable and m.va == wva) for m in rig.ctx.mappings()]
    return validate(sb.build(), rig.cfg, maps)


def _case(seed, hw=9, cin=32, cout=48, k=3, q=False):
    rng = np.random.default_rng(seed)
    if q:
        return (rng.integers(0, 256, (1, hw, hw, cin)).astype(np.uint8),
                rng.integers(-128, 128, (k, k, cin, cout)).astype(np.int8))
    return (rng.standard_normal((1, hw, hw, cin)).astype(np.float32),
            rng.standard_normal((k, k, cin, cout)).astype(np.float32))


@pytest.mark.parametrize("hw, cin, cout, k, stride, pad, bands", [
    (9, 32, 48, 3, 1, 1, 1),
    (9, 32, 48, 3, 1, 1, 3),       # bands of unequal rows: two plans share the binding
    (14, 64, 128, 1, 1, 0, 1),
    (14, 64, 32, 1, 2, 0, 1),
    (16, 3, 16, 7, 2, 3, 1),       # a ResNet stem
    (7, 128, 128, 3, 1, 1, 2),
])
def test_frozen_float_convolutions_compute_what_mutable_ones_do(hw, cin, cout, k, stride, pad, bands):
    """The same program, its weights immutable (blocked, kept) or not (HWIO as they are): fp32 is
    defined up to summation order (docs/ISA.md), and oneDNN's blocked kernels may sum in
    another order than its plain-weights ones, so the two agree to float32 rounding."""
    x, w = _case(hw, hw, cin, cout, k)
    got = {}
    for immutable in (False, True):
        rig = Rig("server")
        sb, ova, shape, wva = _conv_stream(rig, x, w, bands=bands, pad=pad, stride=stride, relu=True)
        program = _loaded(rig, sb, wva, immutable=immutable)
        for _ in range(2):    # the second run reads the kept weights
            rig.dev.execute(rig.ctx, program)
        got[immutable] = rig.get(ova, np.float32, shape)
    np.testing.assert_allclose(got[True], got[False], rtol=1e-5, atol=1e-5 * np.abs(got[False]).max())


@pytest.mark.parametrize("bands", [1, 3])
def test_frozen_int8_convolutions_give_the_definitions_bits(bands):
    x, w = _case(5, q=True)
    rig = Rig("server")
    sb, ova, shape, wva = _conv_stream(rig, x, w, bands=bands, q=True)
    program = _loaded(rig, sb, wva)
    want = definition(x, w, np.zeros(w.shape[3], np.int32), np.full(w.shape[3], 2.0 ** -12, np.float32), np.uint8,
                      x_zp=3, y_zp=9, pad=(1, 1, 1, 1))
    for _ in range(2):
        rig.dev.execute(rig.ctx, program)
        np.testing.assert_array_equal(rig.get(ova, np.uint8, shape), want)


@pytest.fixture
def counted(monkeypatch):
    """Counts of weight reorders and of memcmp calls (the compare-and-reorder cache's check)."""
    counts = {"reorder": 0, "memcmp": 0}
    reorder, memcmp = onednn._BlockedWeights.reorder, onednn._libc.memcmp

    def counting_reorder(self, w, addr):
        counts["reorder"] += 1
        return reorder(self, w, addr)

    class CountingLibc:
        @staticmethod
        def memcmp(a, b, n):
            counts["memcmp"] += 1
            return memcmp(a, b, n)

    monkeypatch.setattr(onednn._BlockedWeights, "reorder", counting_reorder)
    monkeypatch.setattr(onednn, "_libc", CountingLibc)
    return counts


@pytest.mark.parametrize("q", [False, True])
def test_immutable_weights_are_reordered_once_and_never_compared(counted, q):
    x, w = _case(7, q=q)
    rig = Rig("server")
    sb, ova, shape, wva = _conv_stream(rig, x, w, bands=3, q=q)
    program = _loaded(rig, sb, wva)
    rig.dev.execute(rig.ctx, program)
    assert counted == {"reorder": 1, "memcmp": 0}     # three commands, two plans, one layout
    for _ in range(3):
        rig.dev.execute(rig.ctx, program)
    assert counted == {"reorder": 1, "memcmp": 0}


def test_mutable_window_weights_are_still_compared_and_follow_changes(counted):
    """A raw stream's weights (a client's buffer) may change between runs: int15's check stays."""
    x, w = _case(8, q=True)
    rig = Rig("server")
    sb, ova, shape, wva = _conv_stream(rig, x, w, q=True)
    stream = sb.build()
    rig.dev.execute(rig.ctx, stream)
    w2 = w.copy()
    w2[1, 1, 3, 5] ^= 0x7f
    rig.bufs[wva][:w2.nbytes] = w2.tobytes()
    rig.dev.execute(rig.ctx, stream)
    assert counted["memcmp"] >= 1 and counted["reorder"] == 2
    want = definition(x, w2, np.zeros(w.shape[3], np.int32), np.full(w.shape[3], 2.0 ** -12, np.float32), np.uint8,
                      x_zp=3, y_zp=9, pad=(1, 1, 1, 1))
    np.testing.assert_array_equal(rig.get(ova, np.uint8, shape), want)


def test_a_writable_mapping_cannot_be_immutable():
    rig = Rig("server")
    sb, _ova, _shape, _wva = _conv_stream(rig, *_case(1))
    maps = [Mapping(m.va, m.size, m.writable, True) for m in rig.ctx.mappings()]
    with pytest.raises(StreamError, match="writable and immutable"):
        validate(sb.build(), rig.cfg, maps)


def test_only_windows_bound_wholly_inside_immutable_memory_are_frozen():
    rig = Rig("server")
    sb, _ova, _shape, wva = _conv_stream(rig, *_case(1), bands=2)
    commands = validate(sb.build(), rig.cfg, rig.ctx.mappings()).commands
    size = 3 * 3 * 32 * 48 * 4
    frozen = frozen_weights(commands, ((wva, wva + size),))
    convs = [f for c, f in zip(commands, frozen) if c.op.name == "conv2d"]
    assert convs == [(wva, wva + size)] * 2
    assert not any(f for c, f in zip(commands, frozen) if c.op.name != "conv2d")
    # a binding that reaches past the immutable range is not frozen; nor is anything without one
    assert not any(frozen_weights(commands, ((wva, wva + size - 4),)))
    assert not any(frozen_weights(commands, ()))


def _device_with_conv(x, w, *, bands):
    """A device process with buffers imported and program 1 (a conv with window weights)
    loaded, its weights mapping immutable; (device, load reply, run request, output bo view)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.close()
    device = DeviceProcess(theirs, make_config("server"))
    rig = Rig("server")
    sb, ova, shape, wva = _conv_stream(rig, x, w, bands=bands)
    mappings, bindings = [], []
    for bo, m in enumerate(rig.ctx.mappings(), 1):
        fd = os.memfd_create("bo")
        os.write(fd, bytes(rig.bufs[m.va]))
        device._op_import({"bo": bo}, [fd])
        mappings.append([m.va, m.size, m.writable, m.va == wva])
        bindings.append([bo, m.va, m.writable])
    stream = os.memfd_create("stream")
    os.write(stream, sb.build())
    os.lseek(stream, 0, os.SEEK_SET)
    reply = device._op_load_program({"program": 1, "mappings": mappings}, [stream])
    out_bo = next(bo for bo, va, _w in bindings if va == ova)
    out = np.frombuffer(device.buffers[out_bo], np.float32, int(np.prod(shape))).reshape(shape)
    return device, reply, {"program": 1, "bindings": bindings}, out


def test_unloading_a_program_frees_its_prepared_weights():
    x, w = _case(3, hw=9, cin=64, cout=96)
    before = onednn.prepared_bytes()
    device, loaded, run, out = _device_with_conv(x, w, bands=3)
    try:
        assert loaded["ok"]
        # allocated at load (the bands share one copy), reported in the reply
        held = loaded["prepared_bytes"] - before
        assert w.nbytes <= held < 2 * w.nbytes
        assert device._op_run(run, [])["ok"] and device._op_run(run, [])["ok"]
        assert np.abs(out).max() > 0
        assert onednn.prepared_bytes() - before == held
        unloaded = device._op_unload_program({"program": 1}, [])
        assert unloaded == {"ok": True, "prepared_bytes": before}
        assert onednn.prepared_bytes() == before
    finally:
        device.sock.close()


def test_prepared_weights_are_bounded(monkeypatch, counted):
    """Past NPU_EMU_PREPARED_BYTES, immutable weights take the compare-and-reorder path: the
    same results, nothing more held."""
    x, w = _case(4, hw=9, cin=64, cout=96)
    device, loaded, run, out = _device_with_conv(x, w, bands=1)
    device._op_run(run, [])
    want = out.copy()
    device._op_unload_program({"program": 1}, [])
    device.sock.close()
    monkeypatch.setenv(onednn.PREPARED_ENV, str(onednn.prepared_bytes()))
    before = onednn.prepared_bytes()
    device, loaded, run, out = _device_with_conv(x, w, bands=1)
    try:
        assert loaded["prepared_bytes"] == before
        counted["memcmp"] = 0
        assert device._op_run(run, [])["ok"] and device._op_run(run, [])["ok"]
        assert counted["memcmp"] >= 1     # compared, as any memory's weights are
        np.testing.assert_array_equal(out, want)
    finally:
        device.sock.close()
