"""qconv2d is defined as conv2d followed by requant: it must equal, bit for bit,
the two commands run in sequence on the emulator, whatever path computes it
(the fused ungrouped path, the grouped/depthwise path, an output aliasing the
input, accumulators that could wrap)."""

import numpy as np
import pytest

from emu_harness import Rig, run_op
from npud.emulator.errors import StreamError
from npud.emulator.isa import tile


def two_commands(x, w, bias, scale, out_dtype, **kw):
    rq = {k: kw.pop(k) for k in ("y_zp", "lo", "hi") if k in kw}
    geom = dict(kw)

    def emit(sb, i, o):
        sb.conv2d(i[0], i[1], o[1], bias=i[2].addr, **geom)
        sb.sync("mac", "vector")
        sb.requant(o[1], o[0], scale_addr=i[3].addr, zp=rq.get("y_zp", 0),
                   **{k: v for k, v in rq.items() if k != "y_zp"})
        sb.sync("vector", "mac")
    shape = _out_shape(x, w, **geom)
    return run_op("conv2d", [x, w, bias, scale], [(out_dtype, shape), (np.int32, shape)],
                  emit, preset="server")[0]


def fused(x, w, bias, scale, out_dtype, **kw):
    shape = _out_shape(x, w, **{k: v for k, v in kw.items() if k not in ("y_zp", "lo", "hi")})
    return run_op("qconv2d", [x, w, bias, scale], [(out_dtype, shape)], lambda sb, i, o: sb.qconv2d(
        i[0], i[1], o[0], bias=i[2].addr, scale_addr=i[3].addr, **kw), preset="server")[0]


def _out_shape(x, w, stride=(1, 1), pad=(0, 0, 0, 0), dilation=(1, 1), groups=1, x_zp=0):
    n, h, wd, _ = x.shape
    kh, kw, _, cout = w.shape
    oh = (h + pad[0] + pad[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + pad[2] + pad[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return (n, oh, ow, cout)


CASES = [
    dict(pad=(1, 1, 1, 1)),                                  # 3x3 im2col
    dict(k=1),                                               # pointwise GEMM
    dict(k=1, stride=(2, 2)),
    dict(pad=(0, 2, 1, 0), dilation=(2, 1), stride=(1, 2)),
    dict(groups=4, pad=(1, 1, 1, 1)),                        # grouped: the general path
    dict(groups=16, cout=16, pad=(1, 1, 1, 1)),              # depthwise
    dict(cin=160, k=3, pad=(1, 1, 1, 1)),                    # K = 1440: several exact chunks
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dts", [(np.uint8, np.uint8), (np.int8, np.int8), (np.uint8, np.int8)])
def test_qconv2d_equals_conv2d_then_requant(case, dts):
    case = dict(case)
    rng = np.random.default_rng(len(str(case)) * 7 + dts[0]().itemsize)
    xdt, odt = dts
    k, cin, cout, g = case.pop("k", 3), case.pop("cin", 16), case.pop("cout", 24), case.get("groups", 1)
    cout = cout - cout % g if cout % g else cout
    lo_x, hi_x = (0, 256) if xdt == np.uint8 else (-128, 128)
    x = rng.integers(lo_x, hi_x, (2, 9, 8, cin)).astype(xdt)
    w = rng.integers(-128, 128, (k, k, cin // g, cout)).astype(np.int8)
    bias = rng.integers(-50000, 50000, cout).astype(np.int32)
    scale = (2.0 ** rng.uniform(-14, -9, cout)).astype(np.float32)
    zp = int(rng.integers(0, 256)) if odt == np.uint8 else int(rng.integers(-128, 128))
    x_zp = int(rng.integers(lo_x, hi_x))
    kw = dict(case, x_zp=x_zp, y_zp=zp)
    want = two_commands(x, w, bias, scale, odt, **kw)
    np.testing.assert_array_equal(fused(x, w, bias, scale, odt, **kw), want)
    lo, hi = (zp + 3, zp + 40) if odt == np.uint8 and zp < 200 else (-100, 0)
    want = two_commands(x, w, bias, scale, odt, **kw, lo=lo, hi=hi)
    np.testing.assert_array_equal(fused(x, w, bias, scale, odt, **kw, lo=lo, hi=hi), want)


def test_qconv2d_near_ties_and_possible_wrap():
    # scales of 2**-k make exact .5 ties; a huge bias puts the accumulator
    # where it could wrap, which takes the int32 path (and must still agree)
    x = np.full((1, 4, 4, 32), 255, np.uint8)
    x[0, 1] = 0
    w = np.full((3, 3, 32, 4), -128, np.int8)
    w[..., 1] = 127
    for bias in (np.array([0, 1, -1, 3], np.int32), np.array([2**31 - 1, -2**31, 2**30, 7], np.int32)):
        scale = np.array([2.0 ** -10, 2.0 ** -11, 0.5, 2.0 ** -20], np.float32)
        kw = dict(pad=(1, 1, 1, 1), x_zp=3, y_zp=-2)
        np.testing.assert_array_equal(fused(x, w, bias, scale, np.int8, **kw),
                                      two_commands(x, w, bias, scale, np.int8, **kw))


def test_qconv2d_output_may_alias_its_input():
    rig = Rig("server")
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (1, 6, 6, 8)).astype(np.uint8)
    w = rng.integers(-128, 128, (3, 3, 8, 8)).astype(np.int8)
    bias, scale = np.zeros(8, np.int32), np.full(8, 0.01, np.float32)
    want = two_commands(x, w, bias, scale, np.uint8, pad=(1, 1, 1, 1), x_zp=0, y_zp=0)
    sb = rig.builder()
    xa, wa, ba, sa = (rig.put(v) for v in (x, w, bias, scale))
    sb.dma_load(0, xa, "uint8", x.shape)
    sb.dma_load(1024, wa, "int8", w.shape)
    sb.dma_load(2048, ba, "int32", bias.shape)
    sb.dma_load(2112, sa, "fp32", scale.shape)
    sb.sync("dma", "mac")
    sb.qconv2d(tile(0, "uint8", x.shape), tile(1024, "int8", w.shape), tile(0, "uint8", x.shape),
               bias=2048, scale_addr=2112, pad=(1, 1, 1, 1))
    sb.sync("mac", "dma")
    out = rig.alloc(x.size)
    sb.dma_store(0, out, "uint8", x.shape)
    rig.run(sb.end())
    np.testing.assert_array_equal(rig.get(out, np.uint8, x.shape), want)


@pytest.mark.parametrize("change,match", [
    (dict(x=("fp32", (1, 4, 4, 8))), "dtype"),
    (dict(out=("int32", (1, 2, 2, 8))), "dtype"),
    (dict(scale_addr=None), "scale"),
    (dict(lo=3, hi=2), "clamp bounds"),
    (dict(out=("uint8", (1, 3, 3, 8))), "shape"),
    (dict(x_zp=300), "x_zp"),
])
def test_qconv2d_validation(change, match):
    rig = Rig("server")
    x = tile(0, *change.get("x", ("uint8", (1, 4, 4, 8))))
    w = tile(1024, "int8", (3, 3, 8, 8))
    o = tile(2048, *change.get("out", ("uint8", (1, 2, 2, 8))))
    kw = dict(scale_addr=4096, lo=-(1 << 31), hi=(1 << 31) - 1, x_zp=0)
    kw.update({k: v for k, v in change.items() if k in kw})
    sb = rig.builder()
    sb.qconv2d(x, w, o, **kw)
    with pytest.raises(StreamError, match=match):
        rig.run(sb.end())


def test_qconv2d_epilogue_in_row_blocks(monkeypatch):
    # the requantisation runs a block of rows at a time: several blocks, a partial last one
    from npud.emulator.engines import mac
    monkeypatch.setattr(mac, "EPILOGUE_ELEMENTS", 24 * 5)
    rng = np.random.default_rng(9)
    x = rng.integers(0, 256, (1, 7, 9, 16)).astype(np.uint8)
    w = rng.integers(-128, 128, (3, 3, 16, 24)).astype(np.int8)
    bias = rng.integers(-5000, 5000, 24).astype(np.int32)
    scale = (2.0 ** rng.uniform(-13, -10, 24)).astype(np.float32)
    for k, kw in ((3, dict(pad=(1, 1, 1, 1))), (1, {})):
        wk = w[:k, :k]
        kw = dict(kw, x_zp=5, y_zp=9)
        np.testing.assert_array_equal(fused(x, wk, bias, scale, np.uint8, **kw),
                                      two_commands(x, wk, bias, scale, np.uint8, **kw))
