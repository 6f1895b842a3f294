"""MAC engine: matmul and conv2d against plain-loop numpy references."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npud.emulator.engines import onednn
from npud.emulator.engines.mac import k_chunk
from emu_harness import run_op


def ref_conv(x, w, stride, pad, dilation, groups, x_zp=0):
    """Direct definition: out[n,i,j,o] = sum over taps and the group's input
    channels of (x - x_zp)[n, i*sh + p*dh - pt, j*sw + q*dw - pl, c] * w[p,q,c,o]."""
    n, h, wd, cin = x.shape
    kh, kw, cg, cout = w.shape
    sh, sw = stride
    dh, dw = dilation
    pt, pb, pl, pr = pad
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    is_int = x.dtype.kind != "f"
    acc_t = np.int64 if is_int else np.float64
    xs = x.astype(acc_t) - (x_zp if is_int else 0)
    ws = w.astype(acc_t)
    out = np.zeros((n, oh, ow, cout), acc_t)
    cog = cout // groups
    for i in range(oh):
        for j in range(ow):
            for p in range(kh):
                for q in range(kw):
                    r, c = i * sh + p * dh - pt, j * sw + q * dw - pl
                    if not (0 <= r < h and 0 <= c < wd):
                        continue
                    for gi in range(groups):
                        xin = xs[:, r, c, gi * cg:(gi + 1) * cg]
                        out[:, i, j, gi * cog:(gi + 1) * cog] += xin @ ws[p, q, :, gi * cog:(gi + 1) * cog]
    return out


def conv(x, w, *, stride=(1, 1), pad=(0, 0, 0, 0), dilation=(1, 1), groups=1, x_zp=0,
         bias=None, out_dtype=None, init=None, preset="edge", relu=False):
    ref = ref_conv(x, w, stride, pad, dilation, groups, x_zp)
    out_dtype = out_dtype or (np.int32 if x.dtype.kind != "f" else np.float32)
    inputs = [x, w] + ([bias] if bias is not None else [])
    outs = [init if init is not None else (out_dtype, ref.shape)]
    got = run_op("conv2d", inputs, outs, lambda sb, i, o: sb.conv2d(
        i[0], i[1], o[0], bias=i[2].addr if bias is not None else None, stride=stride, pad=pad,
        dilation=dilation, groups=groups, x_zp=x_zp, accumulate=init is not None, relu=relu),
        preset=preset)
    return got[0], ref


@pytest.mark.parametrize("kw", [
    dict(),
    dict(stride=(2, 2)),
    dict(stride=(2, 1), pad=(1, 1, 1, 1)),
    dict(pad=(2, 0, 1, 3)),
    dict(dilation=(2, 2), pad=(2, 2, 2, 2)),
    dict(dilation=(1, 3), stride=(1, 2)),
])
def test_conv_fp32_geometry(kw):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 10, 6)).astype(np.float32)
    w = rng.standard_normal((3, 3, 6, 5)).astype(np.float32)
    got, ref = conv(x, w, **kw)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("groups,cin,cout", [(2, 4, 6), (3, 6, 3), (4, 4, 4), (4, 4, 8)])
def test_conv_groups_and_depthwise(groups, cin, cout):
    rng = np.random.default_rng(groups)
    x = rng.standard_normal((1, 7, 7, cin)).astype(np.float32)
    w = rng.standard_normal((3, 3, cin // groups, cout)).astype(np.float32)
    got, ref = conv(x, w, groups=groups, pad=(1, 1, 1, 1), stride=(2, 2))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("groups,cin,cout", [(1, 5, 7), (8, 8, 8), (2, 4, 4)])
def test_conv_int8_exact_with_zero_point_and_bias(groups, cin, cout):
    rng = np.random.default_rng(7)
    x = rng.integers(-128, 128, (1, 6, 5, cin), dtype=np.int8)
    w = rng.integers(-128, 128, (3, 3, cin // groups, cout), dtype=np.int8)
    bias = rng.integers(-1000, 1000, cout, dtype=np.int32)
    got, ref = conv(x, w, groups=groups, pad=(1, 1, 1, 1), x_zp=-5, bias=bias)
    np.testing.assert_array_equal(got, ref + bias)


def test_conv_uint8_input():
    rng = np.random.default_rng(8)
    x = rng.integers(0, 256, (1, 5, 5, 3), dtype=np.uint8)
    w = rng.integers(-128, 128, (2, 2, 3, 4), dtype=np.int8)
    got, ref = conv(x, w, x_zp=128, pad=(1, 0, 1, 0))
    np.testing.assert_array_equal(got, ref)


def test_conv_int8_large_k_is_exact_at_extremes():
    # Every product is -128*-128 = 2**14 and K = 3*3*256 = 2304 > 1024 forces
    # K-chunking; a single float32 GEMM would round (sum = 2**14 * 2304).
    x = np.full((1, 3, 3, 256), -128, np.int8)
    w = np.full((3, 3, 256, 2), -128, np.int8)
    got, ref = conv(x, w, preset="server")
    assert ref[0, 0, 0, 0] == 2**14 * 2304
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("x_zp,pad,kh", [(0, (1, 1, 1, 1), 3), (255, (1, 1, 1, 1), 3),
                                         (0, (0, 0, 0, 0), 1), (97, (0, 0, 0, 0), 1)])
def test_conv_uint8_large_k_is_exact_at_extremes(x_zp, pad, kh):
    # uint8 activations are centred to x - 128 for the GEMM; at the extremes
    # (255 and 0 against -128 and 127) with K = 2304 (3x3) or 2048 (1x1) the
    # chunks, the centring correction and the zero point must all stay exact.
    cin = 2304 // 9 if kh == 3 else 2048
    x = np.full((1, 3, 3, cin), 255, np.uint8)
    x[0, 1] = 0
    w = np.full((kh, kh, cin, 3), -128, np.int8)
    w[..., 1] = 127
    w[:, :, 1::2, 2] = 127
    got, ref = conv(x, w, x_zp=x_zp, pad=pad, preset="server")
    np.testing.assert_array_equal(got, ref)
    assert np.abs(ref).max() > 2**24


def test_conv_accumulate_and_fp16():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 5, 5, 4)).astype(np.float16)
    w = rng.standard_normal((3, 3, 4, 4)).astype(np.float16)
    init = rng.standard_normal((1, 3, 3, 4)).astype(np.float32)
    got, ref = conv(x, w, init=init)
    np.testing.assert_allclose(got, ref + init, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype,groups", [(np.float32, 1), (np.float32, 2), (np.int8, 1)])
def test_conv_relu_flag_after_bias_and_accumulate(dtype, groups):
    # ReLU is applied once the sum, the bias and the accumulated tile are all in:
    # a residual Add + Relu is accumulate onto the residual with this flag.
    rng = np.random.default_rng(12)
    if dtype == np.int8:
        x = rng.integers(-128, 128, (1, 6, 6, 4), dtype=np.int8)
        w = rng.integers(-128, 128, (3, 3, 4 // groups, 6), dtype=np.int8)
        bias = rng.integers(-3000, 3000, 6, dtype=np.int32)
        init = rng.integers(-30000, 30000, (1, 6, 6, 6), dtype=np.int32)
    else:
        x = rng.standard_normal((1, 6, 6, 4)).astype(dtype)
        w = rng.standard_normal((3, 3, 4 // groups, 6)).astype(dtype)
        bias = rng.standard_normal(6).astype(np.float32)
        init = rng.standard_normal((1, 6, 6, 6)).astype(np.float32)
    got, ref = conv(x, w, pad=(1, 1, 1, 1), groups=groups, bias=bias, init=init, relu=True)
    want = np.maximum(ref + bias + init, 0)
    assert (want == 0).any() and (want > 0).any()
    if dtype == np.int8:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    got, ref = conv(x, w, pad=(1, 1, 1, 1), groups=groups, relu=True)
    np.testing.assert_allclose(got, np.maximum(ref, 0), rtol=1e-5, atol=1e-4)


def _onednn_loaded():
    """oneDNN's loaded state, whichever path this module's run pinned (conftest)."""
    saved = onednn._state
    onednn._state = None
    try:
        return onednn._load()
    finally:
        onednn._state = saved


@pytest.mark.skipif(onednn.describe().startswith("numpy"), reason="oneDNN not installed")
@settings(max_examples=30, deadline=None)
@given(st.data())
def test_conv_fp32_onednn_primitive_matches_numpy(data):
    # The same conv2d command on oneDNN's convolution primitive (bias, accumulate
    # and ReLU as post-ops) and on the numpy reference: equal up to summation order.
    d = data.draw
    kh, kw = d(st.integers(1, 3)), d(st.integers(1, 3))
    sh, sw, dh, dw = (d(st.integers(1, 2)) for _ in range(4))
    pad = tuple(d(st.integers(0, 2)) for _ in range(4))
    h, wd = d(st.integers(dh * (kh - 1) + 1, 9)), d(st.integers(dw * (kw - 1) + 1, 9))
    cin, cout = d(st.integers(1, 20)), d(st.integers(1, 20))
    rng = np.random.default_rng(d(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((d(st.integers(1, 2)), h, wd, cin)).astype(np.float32)
    w = rng.standard_normal((kh, kw, cin, cout)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32) if d(st.booleans()) else None
    relu = d(st.booleans())
    ref = ref_conv(x, w, (sh, sw), pad, (dh, dw), 1)
    init = rng.standard_normal(ref.shape).astype(np.float32) if d(st.booleans()) else None
    saved = onednn._state
    results = []
    try:
        for state in (_onednn_loaded(), (None, "numpy (test)")):
            onednn._state = state
            results.append(conv(x, w, stride=(sh, sw), pad=pad, dilation=(dh, dw), bias=bias,
                                init=init, relu=relu)[0])
    finally:
        onednn._state = saved
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_onednn_plan_is_built_once_per_shape():
    if onednn.describe().startswith("numpy"):
        pytest.skip("oneDNN not installed")
    args = ((1, 14, 14, 256), (3, 3, 256, 256), (1, 14, 14, 256), (1, 1), (1, 1, 1, 1), (1, 1))
    first = onednn.plan(*args, bias=True, accumulate=True, relu=True)
    assert first is not None and not first.impl.startswith("ref")
    assert onednn.plan(*args, bias=True, accumulate=True, relu=True) is first
    assert onednn.plan(*args, bias=True, accumulate=False, relu=True) is not first


def mm(a, w, out_dtype, *, bias=None, init=None, preset="edge"):
    ba, bw = a.shape[:-2], w.shape[:-2]
    out_shape = (*np.broadcast_shapes(ba, bw), a.shape[-2], w.shape[-1])
    inputs = [a, w] + ([bias] if bias is not None else [])
    outs = [init if init is not None else (out_dtype, out_shape)]
    return run_op("matmul", inputs, outs, lambda sb, i, o: sb.matmul(
        i[0], i[1], o[0], bias=i[2].addr if bias is not None else None,
        accumulate=init is not None), preset=preset)[0].reshape(out_shape)


def ref_mm(a, w):
    """Plain triple sum in exact integers / float64."""
    acc = np.int64 if a.dtype.kind != "f" else np.float64
    a, w = a.astype(acc), w.astype(acc)
    return (a[..., :, :, None] * w[..., None, :, :]).sum(axis=-2)


def test_matmul_fp32_batched_broadcast_bias():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 5, 7)).astype(np.float32)
    w = rng.standard_normal((1, 7, 4)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    np.testing.assert_allclose(mm(a, w, np.float32, bias=bias), ref_mm(a, w) + bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mm(a, w, np.float32), ref_mm(a, w), rtol=1e-5, atol=1e-5)


def test_matmul_int8_exact_chunked_and_wrapping_accumulate():
    assert k_chunk(np.dtype(np.int8)) == 1024 and 1024 * 128 * 128 == 2**24
    assert k_chunk(np.dtype(np.uint8)) == 514
    rng = np.random.default_rng(3)
    a = rng.integers(-128, 128, (9, 3000), dtype=np.int8)
    a[0] = -128
    w = rng.integers(-128, 128, (3000, 5), dtype=np.int8)
    w[:, 0] = -128
    np.testing.assert_array_equal(mm(a, w, np.int32, preset="server"), ref_mm(a, w))
    # The int32 accumulator wraps like hardware.
    init = np.full((9, 5), 2**31 - 1, np.int32)
    a2, w2 = np.ones((9, 1), np.int8), np.ones((1, 5), np.int8)
    np.testing.assert_array_equal(mm(a2, w2, np.int32, init=init), np.full((9, 5), -2**31))


def test_matmul_uint8_and_fp16():
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (4, 1200), dtype=np.uint8)
    a[0] = 255
    w = np.full((1200, 3), -128, np.int8)
    np.testing.assert_array_equal(mm(a, w, np.int32, preset="server"), ref_mm(a, w))
    a16 = rng.standard_normal((4, 8)).astype(np.float16)
    w16 = rng.standard_normal((8, 3)).astype(np.float16)
    np.testing.assert_allclose(mm(a16, w16, np.float16), ref_mm(a16, w16), rtol=2e-3, atol=2e-3)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_conv_property_random_shapes(data):
    d = data.draw
    groups = d(st.sampled_from([1, 1, 2, 3]))
    cg, cog = d(st.integers(1, 3)), d(st.integers(1, 3))
    kh, kw = d(st.integers(1, 3)), d(st.integers(1, 3))
    sh, sw, dh, dw = (d(st.integers(1, 2)) for _ in range(4))
    pad = tuple(d(st.integers(0, 2)) for _ in range(4))
    h = d(st.integers(dh * (kh - 1) + 1, 8))
    wd = d(st.integers(dw * (kw - 1) + 1, 8))
    int8 = d(st.booleans())
    rng = np.random.default_rng(d(st.integers(0, 2**32 - 1)))
    if int8:
        x = rng.integers(-128, 128, (d(st.integers(1, 2)), h, wd, cg * groups), dtype=np.int8)
        w = rng.integers(-128, 128, (kh, kw, cg, cog * groups), dtype=np.int8)
        zp = d(st.integers(-128, 127))
    else:
        x = rng.standard_normal((d(st.integers(1, 2)), h, wd, cg * groups)).astype(np.float32)
        w = rng.standard_normal((kh, kw, cg, cog * groups)).astype(np.float32)
        zp = 0
    got, ref = conv(x, w, stride=(sh, sw), pad=pad, dilation=(dh, dw), groups=groups, x_zp=zp)
    if int8:
        np.testing.assert_array_equal(got, ref)
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 40), st.integers(1, 9), st.booleans(),
       st.integers(0, 2**32 - 1))
def test_matmul_property(b, m, k, n, int8, seed):
    rng = np.random.default_rng(seed)
    if int8:
        a = rng.integers(-128, 128, (b, m, k), dtype=np.int8)
        w = rng.integers(-128, 128, (b, k, n), dtype=np.int8)
        np.testing.assert_array_equal(mm(a, w, np.int32), ref_mm(a, w))
    else:
        a = rng.standard_normal((b, m, k)).astype(np.float32)
        w = rng.standard_normal((b, k, n)).astype(np.float32)
        np.testing.assert_allclose(mm(a, w, np.float32), ref_mm(a, w), rtol=1e-4, atol=1e-4)


def test_conv_im2col_in_bands_matches(monkeypatch):
    import npud.emulator.engines.mac as mac
    monkeypatch.setattr(mac, "IM2COL_ELEMENTS", 60)   # force one output row per band
    rng = np.random.default_rng(11)
    for g, cin, cout in [(1, 3, 4), (2, 4, 6)]:
        x = rng.integers(-128, 128, (2, 7, 6, cin), dtype=np.int8)
        w = rng.integers(-128, 128, (3, 3, cin // g, cout), dtype=np.int8)
        got, ref = conv(x, w, groups=g, pad=(1, 1, 1, 1), stride=(2, 1), x_zp=-7)
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("cin", [2047, 2048, 2049, 4100])
def test_conv_chunks_from_weight_magnitudes_are_exact(cin):
    # centred uint8 against weights whose sums pass 2**24 around K = 2048,
    # with odd totals: chunk boundaries, their int64 sum and the correction
    w = np.full((1, 1, cin, 3), 64, np.int8)
    w[:, :, ::3, 1] = -65
    w[:, :, 1::7, 2] = 127
    x = np.full((1, 2, 3, cin), 255, np.uint8)
    x[0, 1, :, ::2] = 0
    got, ref = conv(x, w, x_zp=1, preset="server")
    np.testing.assert_array_equal(got, ref)
    assert np.abs(ref).max() > 2**24


@pytest.mark.skipif(onednn.describe().startswith("numpy"), reason="oneDNN not installed")
@pytest.mark.parametrize("m,n", [(1, 250), (1, 1000), (2, 17), (3, 1001)])
def test_matmul_fp32_columns_are_computed_alike(m, n):
    # Equal weight columns give equal output columns wherever they lie (OpenBLAS's
    # tail columns differ in the last bits, which decides a softmax of huge logits,
    # as in onnx's light models with constant weights).
    saved = onednn._state
    onednn._state = _onednn_loaded()
    try:
        x = (np.float32(8.1234567e17) * (1 + np.arange(256, dtype=np.float32) * 1e-3))
        x = np.ascontiguousarray(np.broadcast_to(x, (m, 256)))
        got = mm(x, np.full((256, n), 0.02, np.float32), np.float32, preset="server")
    finally:
        onednn._state = saved
    assert len(np.unique(got[0])) == 1
