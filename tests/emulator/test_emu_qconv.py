"""qconv2d is conv2d's int32 accumulator (without the bias) requantised in
fp32: ``(fl32(acc) + fl32(bias)) * scale``, clamped, rounded half to even,
plus the zero point (docs/ISA.md; what oneDNN's int8 convolution computes).
Whatever path computes it (oneDNN's primitive, the numpy reference, grouped
and depthwise, an output aliasing the input, accumulators that could wrap)
it must equal that definition in plain numpy bit for bit, and, wherever
|acc|, |bias| and |acc + bias| stay within 2**24 (every realistic layer),
conv2d then requant run as two commands."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emu_harness import Rig, run_op
from npud.emulator.errors import StreamError
from npud.emulator.isa import tile
from test_emu_mac import ref_conv


def definition(x, w, bias, scale, out_dtype, *, x_zp=0, y_zp=0, lo=None, hi=None,
               stride=(1, 1), pad=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    """qconv2d as docs/ISA.md defines it, in plain numpy."""
    acc = ref_conv(x, w, stride, pad, dilation, groups, x_zp).astype(np.int32)   # wraps
    p = acc.astype(np.float32) + bias.astype(np.float32)
    p *= scale.astype(np.float32)
    info = np.iinfo(out_dtype)
    lo = info.min if lo is None else max(lo, info.min)
    hi = info.max if hi is None else min(hi, info.max)
    return (np.rint(np.clip(p, np.float32(lo - y_zp), np.float32(hi - y_zp))) + y_zp).astype(out_dtype)


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
    # where it could wrap, which takes the int32 path (and must still agree with the definition)
    x = np.full((1, 4, 4, 32), 255, np.uint8)
    x[0, 1] = 0
    w = np.full((3, 3, 32, 4), -128, np.int8)
    w[..., 1] = 127
    for bias in (np.array([0, 1, -1, 3], np.int32), np.array([2**31 - 1, -2**31, 2**30, 7], np.int32)):
        scale = np.array([2.0 ** -10, 2.0 ** -11, 0.5, 2.0 ** -20], np.float32)
        kw = dict(pad=(1, 1, 1, 1), x_zp=3, y_zp=-2)
        np.testing.assert_array_equal(fused(x, w, bias, scale, np.int8, **kw),
                                      definition(x, w, bias, scale, np.int8, **kw))


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


def test_bias_joins_the_accumulator_in_float32():
    # acc = 2**25 + 2**17 + 2, beyond float32's integers: fl32(acc) rounds (a tie, to even) to
    # 2**25 + 2**17, and + 1 stays there: 128.5 at a scale of 2**-18, rounded to even, 128.  The
    # int32 sum acc + 1 would round up to 2**25 + 2**17 + 4 instead, and to 129.
    x = np.full((1, 4, 4, 1041), 255, np.uint8)
    x[..., 1040] = 222
    w = np.full((1, 1, 1041, 2), 127, np.int8)
    w[0, 0, 1040] = 23                   # 1040 * 255 * 127 + 222 * 23 = 2**25 + 2**17 + 2
    bias = np.array([1, 0], np.int32)
    scale = np.full(2, 2.0 ** -18, np.float32)
    got = fused(x, w, bias, scale, np.uint8)
    np.testing.assert_array_equal(got, definition(x, w, bias, scale, np.uint8))
    assert (got[..., 0] == 128).all() and (got[..., 1] == 128).all()


@st.composite
def qconv_cases(draw):
    """Random qconv2d commands: shapes, geometry, groups (depthwise too), 8-bit types,
    zero points, biases, scales (powers of two make exact ties), clamps, extremes."""
    groups = draw(st.sampled_from([1, 1, 1, 2, "dw"]))
    cg = draw(st.integers(1, 24)) if groups == 1 else draw(st.integers(1, 4))
    if groups == "dw":
        groups, cg = draw(st.integers(2, 24)), 1
    cin = cg * groups
    cout = groups * (draw(st.integers(1, 24)) // groups + 1) if groups > 1 else draw(st.integers(1, 40))
    k = draw(st.sampled_from([1, 3, 5]))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), 1)
    pad = tuple(draw(st.integers(0, k // 2)) for _ in range(4))
    h = draw(st.integers(dilation[0] * (k - 1) + 1, 10))
    wd = draw(st.integers(k, 10))
    xdt, odt = draw(st.sampled_from([np.uint8, np.int8])), draw(st.sampled_from([np.uint8, np.int8]))
    xi, oi = np.iinfo(xdt), np.iinfo(odt)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.integers(xi.min, xi.max + 1, (1, h, wd, cin)).astype(xdt)
    w = rng.integers(-128, 128, (k, k, cg, cout)).astype(np.int8)
    if draw(st.booleans()):       # extremes: the largest products, saturated outputs
        x.flat[::2] = xi.max if draw(st.booleans()) else xi.min
        w.flat[::3] = -128
    bias = rng.integers(-2**draw(st.integers(0, 30)), 2**20, cout).astype(np.int32)
    if draw(st.booleans()):
        scale = (2.0 ** -rng.integers(0, 16, cout)).astype(np.float32)
    else:
        scale = (2.0 ** rng.uniform(-20, -6, cout)).astype(np.float32)
    kw = dict(x_zp=draw(st.integers(int(xi.min), int(xi.max))),
              y_zp=draw(st.integers(int(oi.min), int(oi.max))), stride=stride, pad=pad,
              dilation=dilation, groups=groups)
    if draw(st.booleans()):
        lo = draw(st.integers(int(oi.min), int(oi.max)))
        kw.update(lo=lo, hi=draw(st.integers(lo, int(oi.max))))
    return x, w, bias, scale, odt, kw


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(qconv_cases())
def test_qconv2d_is_its_definition(case):
    x, w, bias, scale, odt, kw = case
    np.testing.assert_array_equal(fused(x, w, bias, scale, odt, **kw),
                                  definition(x, w, bias, scale, odt, **kw))


def test_bias_and_scale_inside_the_output_tile():
    # the output overwrites its own bias and scale: they are read (copied) before it is written,
    # on every run of the same prepared program
    rig = Rig("server")
    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, (1, 6, 6, 8)).astype(np.uint8)
    w = rng.integers(-128, 128, (3, 3, 8, 16)).astype(np.int8)
    bias = rng.integers(-3000, 3000, 16).astype(np.int32)
    scale = (2.0 ** rng.uniform(-12, -9, 16)).astype(np.float32)
    kw = dict(pad=(1, 1, 1, 1), x_zp=4, y_zp=3)
    want = definition(x, w, bias, scale, np.uint8, **kw)
    sb = rig.builder()
    xa, wa, ba, sa = (rig.put(v) for v in (x, w, bias, scale))
    out_addr = 4096                          # 576 bytes of output, over the bias and scale
    sb.dma_load(0, xa, "uint8", x.shape)
    sb.dma_load(1024, wa, "int8", w.shape)
    sb.dma_load(out_addr + 64, ba, "int32", bias.shape)
    sb.dma_load(out_addr + 192, sa, "fp32", scale.shape)
    sb.sync("dma", "mac")
    sb.qconv2d(tile(0, "uint8", x.shape), tile(1024, "int8", w.shape),
               tile(out_addr, "uint8", want.shape), bias=out_addr + 64, scale_addr=out_addr + 192, **kw)
    sb.sync("mac", "dma")
    out = rig.alloc(want.size)
    sb.dma_store(out_addr, out, "uint8", want.shape)
    program = sb.end()
    for _ in range(2):
        rig.run(program)
        np.testing.assert_array_equal(rig.get(out, np.uint8, want.shape), want)
