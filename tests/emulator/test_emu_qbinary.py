"""qbinary: fused DequantizeLinear -> op -> QuantizeLinear on int8/uint8 tiles.

Its definition is the float32 chain ONNX specifies, so it must equal, bit for
bit, both a numpy transcription of that chain and the same chain run as
separate float commands on the emulator (what the compiler emitted before
the fusion).  Add is onnxruntime's QLinearAdd arithmetic instead (the kernel
it runs for every QDQ Add): float32 scale ratios, zero points folded into one
constant, two fused multiply-adds, rounding after the output zero point."""

import numpy as np
import pytest

from emu_harness import Rig, run_op
from npud.emulator.errors import StreamError
from npud.emulator.isa import tile

FUNCS = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "max": np.maximum,
         "min": np.minimum}
RANGE = {np.int8: (-128, 127), np.uint8: (0, 255)}


def fma(a, b, c):
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def ref(func, a, sa, za, b, sb, zb, sy, zy, out_dtype, lo=-(1 << 31), hi=(1 << 31) - 1):
    """ONNX: y = saturate(round_half_even(f(DQ(a), DQ(b)) / sy) + zy), all float32; Add as
    onnxruntime's QLinearAdd: round_half_even(a * (sa/sy) + b * (sb/sy) + zy - zero-point terms)."""
    f = np.float32
    if func == "add":
        ra, rb = f(f(sa) / f(sy)), f(f(sb) / f(sy))
        fixed = f(f(zy) - fma(ra, f(za), rb * f(zb)))
        q = np.rint(fma(a.astype(f), ra, fma(b.astype(f), rb, fixed))).astype(np.float64)
    else:
        da = (a.astype(f) - f(za)) * f(sa)
        db = (b.astype(f) - f(zb)) * f(sb)
        q = np.rint(FUNCS[func](da, db) / f(sy)).astype(np.float64) + zy
    tlo, thi = RANGE[out_dtype]
    return np.clip(q, max(tlo, lo), min(thi, hi)).astype(out_dtype)


def qbin(func, a, b, out_dtype, sa, za, sb, zb, sy, zy, **kw):
    shape = np.broadcast_shapes(a.shape, b.shape)
    return run_op("qbinary", [a, b], [(out_dtype, shape)], lambda s, i, o: s.qbinary(
        func, i[0], i[1], o[0], a_scale=sa, a_zp=za, b_scale=sb, b_zp=zb, y_scale=sy, y_zp=zy,
        **kw))[0].reshape(shape)


def island(func, a, b, out_dtype, sa, za, sb, zb, sy, zy):
    """The same computation as separate float commands: vunary copy, sub, mul
    (x2), the op, div and requant with scale 1 (the compiler's old float island)."""
    shape = np.broadcast_shapes(a.shape, b.shape)
    consts = [np.float32(za), np.float32(sa), np.float32(zb), np.float32(sb), np.float32(sy)]

    def emit(s, i, o):
        ta, tb, cza, csa, czb, csb, csy = i
        fa, fb, fr = o[1], o[2], o[3]
        for t, f, z, sc in ((ta, fa, cza, csa), (tb, fb, czb, csb)):
            s.vunary("copy", t, f)
            s.sub(f, tile(z.addr, "fp32", (1,)), f)
            s.mul(f, tile(sc.addr, "fp32", (1,)), f)
        s.vbinary(func, fa, fb, fr)
        s.vbinary("div", fr, tile(csy.addr, "fp32", (1,)), fr)
        s.requant(fr, o[0], scale=1.0, zp=zy)
    outs = [(out_dtype, shape), (np.float32, a.shape), (np.float32, b.shape), (np.float32, shape)]
    return run_op("qbinary", [a, b] + [np.array([c]) for c in consts], outs,
                  emit)[0].reshape(shape)


@pytest.mark.parametrize("func", sorted(FUNCS))
@pytest.mark.parametrize("dts", [(np.uint8, np.uint8, np.uint8), (np.int8, np.uint8, np.int8),
                                 (np.int8, np.int8, np.uint8)])
def test_qbinary_equals_the_float_chain(func, dts):
    rng = np.random.default_rng(hash((func, dts)) % 2**32)
    ta, tb, to = dts
    a = rng.integers(*RANGE[ta], (2, 5, 6, 8), endpoint=True).astype(ta)
    b = rng.integers(*RANGE[tb], (1, 5, 1, 8), endpoint=True).astype(tb)   # broadcast
    sa, sb, sy = (np.float32(x) for x in rng.uniform(0.005, 0.1, 3))
    za = int(rng.integers(*RANGE[ta]))
    zb = int(rng.integers(*RANGE[tb]))
    zy = int(rng.integers(*RANGE[to]))
    want = ref(func, a, sa, za, b, sb, zb, sy, zy, to)
    np.testing.assert_array_equal(qbin(func, a, b, to, sa, za, sb, zb, sy, zy), want)
    if func != "add":       # add is onnxruntime's arithmetic, not the float chain's
        np.testing.assert_array_equal(island(func, a, b, to, sa, za, sb, zb, sy, zy), want)


def test_qbinary_ties_round_half_even_and_saturate():
    a = np.arange(0, 256, dtype=np.uint8).reshape(1, 1, 16, 16)
    b = np.full((1, 1, 1, 1), 3, np.uint8)
    # scales 0.5 and 1: every odd a gives an exact .5; onnxruntime's QLinearAdd rounds after
    # adding the output zero point, so the tie goes to the even result of a * 0.5 - 7
    got = qbin("add", a, b, np.int8, 0.5, 0, 1.0, 3, 1.0, -7)
    want = np.clip(np.rint(a.astype(np.float64) * 0.5 - 7), -128, 127).astype(np.int8)
    np.testing.assert_array_equal(got, want)
    assert got.min() == -7 and got.max() == 120        # 255 * 0.5 - 7 = 120.5 -> 120


def test_qbinary_clamp_bounds_fold_relu():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (1, 4, 4, 8), dtype=np.uint8)
    b = rng.integers(0, 256, (1, 4, 4, 8), dtype=np.uint8)
    got = qbin("sub", a, b, np.uint8, 0.02, 128, 0.03, 100, 0.04, 10, lo=10, hi=200)
    want = ref("sub", a, 0.02, 128, b, 0.03, 100, 0.04, 10, np.uint8, lo=10, hi=200)
    np.testing.assert_array_equal(got, want)
    assert got.min() == 10 and got.max() <= 200


def test_qbinary_huge_scales_give_no_nan():
    a = np.array([[[[0, 255]]]], np.uint8)
    b = np.array([[[[255, 0]]]], np.uint8)
    # 255 * 3e38 overflows float32: -inf and +inf saturate
    got = qbin("sub", a, b, np.int8, 3e38, 0, 3e38, 0, 1.0, 5)
    np.testing.assert_array_equal(got.ravel(), [-128, 127])
    # (0 - 255) * 3e38 + 255 * 3e38 = -inf + inf = NaN, which quantises to 0 (requant's
    # convention: not 0 + zp); the second element is 0 + 0 -> zp
    got = qbin("add", a, b, np.int8, 3e38, 255, 3e38, 0, 1.0, 5)
    np.testing.assert_array_equal(got.ravel(), [0, 5])
    np.testing.assert_array_equal(island("add", a, b, np.int8, 3e38, 255, 3e38, 0, 1.0, 5),
                                  [[[[0, 5]]]])


@pytest.mark.parametrize("kw,match", [
    (dict(func="div"), "func"),
    (dict(a_scale=0.0), "a_scale"),
    (dict(y_scale=float("inf")), "y_scale"),
    (dict(b_zp=-1), "b_zp"),
    (dict(y_zp=300), "y_zp"),
    (dict(lo=5, hi=4), "clamp bounds"),
    (dict(a_dtype="int32"), "dtype"),
    (dict(out_dtype="fp32"), "dtype"),
    (dict(b_shape=(1, 1, 3, 8)), "broadcast"),
])
def test_qbinary_validation(kw, match):
    rig = Rig()
    args = dict(func="add", a_scale=0.1, a_zp=0, b_scale=0.1, b_zp=0, y_scale=0.1, y_zp=0,
                lo=-(1 << 31), hi=(1 << 31) - 1)
    args.update({k: v for k, v in kw.items() if k in args})
    a = tile(0, kw.get("a_dtype", "uint8"), (1, 1, 4, 8))
    b = tile(256, "uint8", kw.get("b_shape", (1, 1, 4, 8)))
    o = tile(512, kw.get("out_dtype", "uint8"), (1, 1, 4, 8))
    sb = rig.builder()
    sb.qbinary(args.pop("func"), a, b, o, **args)
    with pytest.raises(StreamError, match=match):
        rig.run(sb.end())


def test_qbinary_in_blocks(monkeypatch):
    # same-shape operands run a block of elements at a time, the last block partial
    from npud.emulator.engines import vector
    monkeypatch.setattr(vector, "_QBINARY_BLOCK", 100)
    rng = np.random.default_rng(21)
    a = rng.integers(0, 256, (1, 7, 9, 13)).astype(np.uint8)
    b = rng.integers(-128, 128, (1, 7, 9, 13)).astype(np.int8)
    kw = (0.02, 3, 0.07, -4, 0.05, 100)
    np.testing.assert_array_equal(qbin("add", a, b, np.uint8, *kw, lo=100),
                                  ref("add", a, kw[0], kw[1], b, kw[2], kw[3], kw[4], kw[5],
                                      np.uint8, lo=100))


@pytest.mark.parametrize("func", sorted(FUNCS))
@pytest.mark.parametrize("dts", [(np.uint8, np.uint8, np.uint8), (np.int8, np.uint8, np.int8),
                                 (np.uint8, np.int8, np.uint8)])
def test_every_pair_of_input_bytes(func, dts):
    # a tile of all 65536 (a, b) pairs: each looked up in the command's 256 x 256 table
    da, db, do = dts
    every = np.arange(256, dtype=np.uint8)
    a = np.repeat(every, 256).view(da).reshape(1, 16, 16, 256)
    b = np.tile(every, 256).view(db).reshape(1, 16, 16, 256)
    params = (0.037, 5 if da == np.uint8 else -3, 0.041, 130 if db == np.uint8 else 7, 0.052,
              11 if do == np.uint8 else -9)
    got = qbin(func, a, b, do, *params, lo=3 if do == np.uint8 else -100, hi=250)
    np.testing.assert_array_equal(got, ref(func, a, *params[:2], b, *params[2:], do,
                                           lo=3 if do == np.uint8 else -100, hi=250))


def test_table_step_output_may_alias_an_input():
    rig = Rig("edge")
    every = np.arange(256, dtype=np.uint8)
    a = np.repeat(every, 256).reshape(1, 1, 256, 256)
    b = np.tile(every, 256).reshape(1, 1, 256, 256)
    params = dict(a_scale=0.03, a_zp=100, b_scale=0.05, b_zp=20, y_scale=0.06, y_zp=7)
    want = ref("add", a, 0.03, 100, b, 0.05, 20, 0.06, 7, np.uint8)
    sb = rig.builder()
    aa, ba = rig.put(a), rig.put(b)
    sb.dma_load(0, aa, "uint8", a.shape)
    sb.dma_load(a.size, ba, "uint8", b.shape)
    sb.sync("dma", "vector")
    t = tile(0, "uint8", a.shape)
    sb.qbinary("add", t, tile(a.size, "uint8", b.shape), t, **params)   # out is a
    sb.sync("vector", "dma")
    out = rig.alloc(a.size)
    sb.dma_store(0, out, "uint8", a.shape)
    rig.run(sb.end())
    np.testing.assert_array_equal(rig.get(out, np.uint8, a.shape), want)
