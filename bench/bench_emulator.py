"""Emulator speed, as ratios against numpy doing the same work in the same run.

    python -m bench.bench_emulator

Nothing here asserts a time: machines differ, ratios travel.
"""

from __future__ import annotations

import os
import time

import numpy as np
from numpy.lib.stride_tricks import as_strided

from npud.emulator.assembler import StreamBuilder
from npud.emulator.config import make_config
from npud.emulator.device import Device, _Job
from npud.emulator.engines import EXECUTORS
from npud.emulator.isa import tile
from npud.emulator.validator import validate

CFG = make_config("server", sram_bytes=16 * 1024 * 1024)  # room for large single tiles


def best(fn, repeat: int = 7, number: int = 1) -> float:
    """Best-of-`repeat` seconds per call."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t) / number)
    return min(times)


class Bench:
    def __init__(self) -> None:
        self.dev = Device(CFG)
        self.sram = self.dev._sram
        self.job = _Job(self.sram, None, [{}])
        self.addr = 0

    def place(self, arr: np.ndarray):
        """Put `arr` in core 0's SRAM; return its tile and an aliasing array."""
        t = tile(self.addr, arr.dtype, arr.shape)
        view = np.ndarray(arr.shape, arr.dtype, buffer=self.sram[0], offset=self.addr)
        view[...] = arr
        self.addr += -(-arr.nbytes // 4096) * 4096
        return t, view

    def out(self, dtype, shape):
        return self.place(np.zeros(shape, dtype))

    def command(self, build):
        """Validate a one-command stream; return a callable running just that command."""
        sb = StreamBuilder(CFG)
        build(sb)
        prog = validate(sb.end().build(), CFG, [])
        cmd = prog.commands[0]
        fn = EXECUTORS[cmd.op.name]
        return lambda: fn(self.job, cmd)


def ref_conv(x, w, pad):
    """Baseline: the textbook numpy convolution (pad, im2col view, one GEMM)."""
    n, h, wd, c = x.shape
    kh, kw, _, co = w.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    s = xp.strides
    oh, ow = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    win = as_strided(xp, (n, oh, ow, kh, kw, c), (s[0], s[1], s[2], s[1], s[2], s[3]))
    return win.reshape(n * oh * ow, -1) @ w.reshape(-1, co)


def row(name, t_emu, t_base, base_name):
    print(f"{name:<44s} {t_emu * 1e3:9.3f} ms  {t_base * 1e3:9.3f} ms  {t_emu / t_base:6.2f}x  (vs {base_name})")


def main() -> None:
    rng = np.random.default_rng(0)
    from npud.emulator.engines import int_gemm
    print(f"npu-emu benchmark; numpy {np.__version__}; config 'server' with 16 MiB SRAM")
    print(f"integer GEMM: {int_gemm.describe()}")
    print(f"{'case':<44s} {'emulator':>12s} {'baseline':>12s} {'ratio':>7s}")

    # --- matmul -----------------------------------------------------------------------
    for m, k, n in [(256, 512, 256), (512, 1024, 1024)]:
        b = Bench()
        a32 = rng.standard_normal((m, k)).astype(np.float32)
        w32 = rng.standard_normal((k, n)).astype(np.float32)
        ta, va = b.place(a32)
        tw, vw = b.place(w32)
        to, vo = b.out(np.float32, (m, n))
        run = b.command(lambda sb: sb.matmul(ta, tw, to))
        t_emu = best(run)
        t_np = best(lambda: np.matmul(va, vw))
        row(f"matmul fp32 {m}x{k}x{n}", t_emu, t_np, "np.matmul")
        a8 = rng.integers(-128, 128, (m, k), dtype=np.int8)
        w8 = rng.integers(-128, 128, (k, n), dtype=np.int8)
        ta8, _ = b.place(a8)
        tw8, _ = b.place(w8)
        to8, _ = b.out(np.int32, (m, n))
        run8 = b.command(lambda sb: sb.matmul(ta8, tw8, to8))
        row(f"matmul int8 {m}x{k}x{n} (exact)", best(run8), t_emu, "emulator fp32")
        if m * k * n <= 256 * 512 * 256:
            t_int = best(lambda: a8.astype(np.int32) @ w8.astype(np.int32), repeat=3)
            row("  numpy integer matmul, same shape", t_int, t_np, "np.matmul fp32")

    # --- conv ----------------------------------------------------------------------------
    for h, c, co, dt in [(56, 64, 64, np.float32), (28, 128, 128, np.float32),
                         (14, 256, 256, np.float32), (28, 128, 128, np.int8)]:
        b = Bench()
        if dt == np.float32:
            x = rng.standard_normal((1, h, h, c)).astype(dt)
            w = rng.standard_normal((3, 3, c, co)).astype(dt)
            out_dt = np.float32
        else:
            x = rng.integers(-128, 128, (1, h, h, c), dtype=dt)
            w = rng.integers(-128, 128, (3, 3, c, co), dtype=dt)
            out_dt = np.int32
        tx, vx = b.place(x)
        tw, vw = b.place(w)
        to, _ = b.out(out_dt, (1, h, h, co))
        run = b.command(lambda sb: sb.conv2d(tx, tw, to, pad=(1, 1, 1, 1)))
        xf, wf = vx.astype(np.float32), vw.astype(np.float32)
        t_np = best(lambda: ref_conv(xf, wf, 1))
        name = f"conv3x3 {dt.__name__} {h}x{h}x{c}->{co} pad 1"
        row(name, best(run), t_np, "numpy fp32 im2col")

    dw = Bench()
    x = rng.standard_normal((1, 56, 56, 128)).astype(np.float32)
    w = rng.standard_normal((3, 3, 1, 128)).astype(np.float32)
    tx, vx = dw.place(x)
    tw, vw = dw.place(w)
    to, _ = dw.out(np.float32, (1, 56, 56, 128))
    run = dw.command(lambda sb: sb.conv2d(tx, tw, to, pad=(1, 1, 1, 1), groups=128))

    def np_depthwise():
        xp = np.pad(vx, ((0, 0), (1, 1), (1, 1), (0, 0)))
        acc = np.zeros((1, 56, 56, 128), np.float32)
        for p in range(3):
            for q in range(3):
                acc += xp[:, p:p + 56, q:q + 56, :] * vw[p, q, 0]
        return acc
    row("depthwise3x3 fp32 56x56x128 pad 1", best(run), best(np_depthwise), "numpy shifted MAC")

    # --- per-command overhead -------------------------------------------------------------
    n_cmds = 2000
    dev = Device(CFG)
    ctx = dev.create_context()
    sb = StreamBuilder(CFG)
    a, bb, o = tile(0, "fp32", (16,)), tile(64, "fp32", (16,)), tile(128, "fp32", (16,))
    for _ in range(n_cmds):
        sb.add(a, bb, o)
    stream = sb.end().build()
    prog = validate(stream, CFG, [])
    t_exec = best(lambda: dev.execute(ctx, prog), repeat=5) / n_cmds
    t_val = best(lambda: validate(stream, CFG, []), repeat=3) / n_cmds
    x16 = np.zeros(16, np.float32)
    t_np = best(lambda: np.add(x16, x16, out=x16), number=10000)
    row("per-command execute (16-elem add)", t_exec, t_np, "np.add 16 elems")
    row("per-command validate+schedule", t_val, t_np, "np.add 16 elems")
    print(f"per-command overhead: execute {t_exec * 1e6:.2f} us, validate {t_val * 1e6:.2f} us")
    t_seg = segment_cost()
    print(f"per-segment overhead (device process, a run cut at layer boundaries): {t_seg * 1e6:.2f} us")


def segment_cost(layers: int = 200) -> float:
    """Seconds a layer boundary adds to a run in the device process: the same program of
    ``layers`` one-command layers run as one segment and as ``layers`` segments."""
    import socket

    from npud.emulator.device_process import DeviceProcess

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = DeviceProcess(theirs, CFG)
    sb = StreamBuilder(CFG)
    for _ in range(layers):
        sb.fill(tile(0, "fp32", (16,)), 1.0)   # writes SRAM only: every boundary is safe
    stream = sb.end().build()
    times = []
    try:
        for program, boundaries in ((1, []), (2, list(range(1, layers)))):
            fd = os.memfd_create("stream")
            os.write(fd, stream)
            os.lseek(fd, 0, os.SEEK_SET)
            reply = device._op_load_program({"program": program, "mappings": [],
                                             "boundaries": boundaries}, [fd])
            assert len(reply["segments"]) == (layers if boundaries else 1)
            times.append(best(lambda: device._op_run({"program": program, "bindings": []}, []), repeat=7))
    finally:
        ours.close()
        theirs.close()
    return (times[1] - times[0]) / (layers - 1)


if __name__ == "__main__":
    main()
