"""The native exact integer GEMM (oneDNN, npud/emulator/engines/int_gemm.py) against
the numpy reference path, bit for bit, on every route the MAC engine gives it:
conv2d (int32 out, bias, accumulate), qconv2d, matmul; each case also against
the plain int64 definition.  Every test runs on both paths; only the oneDNN
half is skipped (with the reason) when the library is absent or refused."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest

from npud.emulator.engines import int_gemm
from test_emu_mac import conv, mm, ref_mm
from test_emu_qconv import definition, fused, two_commands

NATIVE = int_gemm.get()


@contextlib.contextmanager
def numpy_path():
    saved = int_gemm._state
    int_gemm._state = (None, "numpy reference (test)")
    try:
        yield
    finally:
        int_gemm._state = saved


@pytest.fixture(params=["numpy", "onednn"])
def path(request, monkeypatch):
    if request.param == "onednn":
        if NATIVE is None:
            pytest.skip(f"oneDNN half only: {int_gemm.describe()}")
        monkeypatch.setattr(int_gemm, "_state", (NATIVE, "oneDNN (test)"))
    else:
        monkeypatch.setattr(int_gemm, "_state", (None, "numpy reference (test)"))
    return request.param


def same_as_reference(run):
    """run() on the current path, then on the numpy reference path: equal bits."""
    got = run()
    with numpy_path():
        ref = run()
    np.testing.assert_array_equal(got, ref)
    return got


GEOMETRIES = [
    dict(pad=(1, 1, 1, 1)),                                     # 3x3 im2col, zero-point fill
    dict(k=1),                                                  # pointwise: the input tile itself
    dict(k=1, stride=(2, 2)),                                   # 1x1 strided: im2col
    dict(k=7, stride=(2, 2), pad=(3, 3, 3, 3), h=15),           # ResNet's stem
    dict(pad=(0, 2, 1, 0), dilation=(2, 1), stride=(1, 2)),     # asymmetric, dilated
    dict(groups=2, pad=(1, 1, 1, 1)),                           # grouped: the numpy path
    dict(groups=8, cout=8, pad=(1, 1, 1, 1)),                   # depthwise: the numpy path
]

DTYPES_ZP = [(np.uint8, 0), (np.uint8, 255), (np.uint8, 131), (np.int8, 0), (np.int8, -128),
             (np.int8, 127), (np.int8, -3)]


def _operands(rng, xdt, geom, n=2):
    geom = dict(geom)
    k, h, cin, cout = geom.pop("k", 3), geom.pop("h", 9), geom.pop("cin", 8), geom.pop("cout", 12)
    lo, hi = (0, 256) if xdt == np.uint8 else (-128, 128)
    # a third of the values at the extremes: the products that break inexact kernels
    x = rng.integers(lo, hi, (n, h, h + 1, cin)).astype(xdt)
    x.flat[::3] = hi - 1
    x.flat[1::5] = lo
    w = rng.integers(-128, 128, (k, k, cin // geom.get("groups", 1), cout)).astype(np.int8)
    w.flat[::4] = -128
    w.flat[2::7] = 127
    return x, w, geom


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("xdt,x_zp", DTYPES_ZP)
def test_conv2d_bit_identical(path, geom, xdt, x_zp):
    rng = np.random.default_rng(abs(x_zp) + len(str(geom)))
    x, w, geom = _operands(rng, xdt, geom)
    bias = rng.integers(-2**20, 2**20, w.shape[3]).astype(np.int32)
    got = same_as_reference(lambda: conv(x, w, x_zp=x_zp, bias=bias, preset="server", **geom)[0])
    ref = conv(x, w, x_zp=x_zp, preset="server", **geom)[1] + bias
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("geom", [GEOMETRIES[0], GEOMETRIES[1]])
def test_conv2d_accumulate_wraps_like_the_reference(path, geom):
    rng = np.random.default_rng(5)
    x, w, geom = _operands(rng, np.uint8, geom)
    _, ref = conv(x, w, x_zp=7, **geom)
    init = np.full(ref.shape, 2**31 - 1000, np.int32)        # the sum wraps past int32
    got = same_as_reference(lambda: conv(x, w, x_zp=7, init=init, preset="server", **geom)[0])
    np.testing.assert_array_equal(got, (ref + init.astype(np.int64)).astype(np.int32))


@pytest.mark.parametrize("xdt,xv,x_zp,wv", [(np.uint8, 255, 0, -128), (np.uint8, 0, 255, -128),
                                            (np.uint8, 255, 0, 127), (np.int8, -128, 127, -128),
                                            (np.int8, 127, -128, -128), (np.int8, -128, 0, -128)])
def test_conv2d_extremes_long_k(path, xdt, xv, x_zp, wv):
    # K = 3*3*512 = 4608, ResNet's longest; every product at its largest magnitude
    x = np.full((1, 3, 4, 512), xv, xdt)
    w = np.full((3, 3, 512, 5), wv, np.int8)
    w[..., 1] = -1 - wv if wv < 0 else -wv      # the other sign
    got = same_as_reference(lambda: conv(x, w, x_zp=x_zp, pad=(1, 1, 1, 1), preset="server")[0])
    _, ref = conv(x, w, x_zp=x_zp, pad=(1, 1, 1, 1), preset="server")
    np.testing.assert_array_equal(got, ref)
    assert np.abs(ref).max() >= 4 * 512 * 127 * 127


@pytest.mark.parametrize("cin", [int_gemm.MAX_K, int_gemm.MAX_K + 1])
def test_conv2d_at_the_native_k_limit(path, cin):
    # MAX_K is the longest K whose worst case fits int32: the native GEMM takes it;
    # one more and the numpy path's wrapping int32 accumulator must still be met
    x = np.zeros((1, 1, 2, cin), np.uint8)
    x[0, 0, 1] = 255
    w = np.full((1, 1, cin, 2), -128, np.int8)
    w[..., 1] = 127
    got = same_as_reference(lambda: conv(x, w, x_zp=255, preset="server")[0])
    _, ref = conv(x, w, x_zp=255, preset="server")
    np.testing.assert_array_equal(got, ref.astype(np.int32))
    assert (ref.max() > 2**31 - 1) == (cin > int_gemm.MAX_K)


@pytest.mark.parametrize("geom", [g for g in GEOMETRIES if "groups" not in g])
@pytest.mark.parametrize("xdt,x_zp,odt", [(np.uint8, 3, np.uint8), (np.int8, -5, np.int8),
                                          (np.uint8, 255, np.int8), (np.int8, 127, np.uint8)])
def test_qconv2d_bit_identical(path, geom, xdt, x_zp, odt):
    rng = np.random.default_rng(11 + x_zp)
    x, w, geom = _operands(rng, xdt, geom, n=1)
    cout = w.shape[3]
    bias = rng.integers(-50000, 50000, cout).astype(np.int32)
    scale = (2.0 ** rng.uniform(-17, -12, cout)).astype(np.float32)
    scale[0] = 0.5 ** 14                  # exact ties: round half to even must agree
    kw = dict(x_zp=x_zp, y_zp=9 if odt == np.uint8 else -4, **geom)
    got = same_as_reference(lambda: fused(x, w, bias, scale, odt, **kw))
    np.testing.assert_array_equal(got, two_commands(x, w, bias, scale, odt, **kw))


def test_qconv2d_largest_bias_the_fused_epilogue_takes(path):
    # the bias goes into the native GEMM (its column offset) only when no sum can
    # leave int32: here exactly at that bound, with the extremes driving the sums to it
    rng = np.random.default_rng(4)
    x, w, geom = _operands(rng, np.uint8, GEOMETRIES[0], n=1)
    k = w.shape[0] * w.shape[1] * w.shape[2]
    bias = np.full(w.shape[3], 2**31 - 1 - k * int_gemm.MAX_PRODUCT, np.int32)
    bias[1::2] *= -1
    scale = np.full(w.shape[3], 2.0 ** -25, np.float32)
    kw = dict(x_zp=0, y_zp=100, **geom)
    got = same_as_reference(lambda: fused(x, w, bias, scale, np.uint8, **kw))
    np.testing.assert_array_equal(got, two_commands(x, w, bias, scale, np.uint8, **kw))
    assert 0 < got.min() and got.max() < 255


def test_qconv2d_accumulator_that_could_wrap(path):
    # |bias| near 2**31: acc + bias would leave int32, but the bias joins the accumulator in fp32
    rng = np.random.default_rng(3)
    x, w, geom = _operands(rng, np.uint8, GEOMETRIES[0], n=1)
    bias = np.full(w.shape[3], 2**31 - 50, np.int32)
    bias[1::2] = -2**31 + 50
    scale = np.full(w.shape[3], 2.0 ** -24, np.float32)
    kw = dict(x_zp=200, y_zp=1, **geom)
    got = same_as_reference(lambda: fused(x, w, bias, scale, np.uint8, **kw))
    np.testing.assert_array_equal(got, definition(x, w, bias, scale, np.uint8, **kw))


@pytest.mark.parametrize("adt", [np.int8, np.uint8])
@pytest.mark.parametrize("a_shape,w_shape", [((2, 3, 17, 40), (1, 1, 40, 9)),   # broadcast weights
                                              ((1, 1, 1, 1), (1, 1, 1, 1)),
                                              ((1, 3, 1, 64), (2, 1, 64, 1)),     # both broadcast
                                              ((1, 1, 5, 4608), (1, 1, 4608, 3))])
def test_matmul_bit_identical(path, adt, a_shape, w_shape):
    rng = np.random.default_rng(a_shape[-1])
    lo, hi = (0, 256) if adt == np.uint8 else (-128, 128)
    a = rng.choice(np.array([lo, hi - 1, 1], np.int64), a_shape).astype(adt)
    w = rng.choice(np.array([-128, 127, -1], np.int64), w_shape).astype(np.int8)
    n = w_shape[-1]
    bias = rng.integers(-1000, 1000, n).astype(np.int32)
    out_shape = np.broadcast_shapes(a_shape[:2], w_shape[:2]) + (a_shape[2], n)
    init = np.full(out_shape, 2**31 - 7, np.int32)
    got = same_as_reference(lambda: mm(a, w, np.int32, bias=bias, init=init, preset="server"))
    expect = ref_mm(a.astype(np.int64), w.astype(np.int64)) + bias + init.astype(np.int64)
    np.testing.assert_array_equal(got, expect.astype(np.int32))


# --- the self-test that admits a library -----------------------------------------------

def _exact(a, b, c, a_zp=0, co=None):
    c[...] = int_gemm.reference(a, b, a_zp, co)


def _saturating(a, b, c, a_zp=0, co=None):
    # what a non-VNNI kernel does: int16-saturated pair sums (vpmaddubsw)
    x = a.astype(np.int64) - a_zp
    if x.shape[1] % 2:
        x = np.pad(x, ((0, 0), (0, 1)))
        b = np.pad(b, ((0, 1), (0, 0)))
    p = x[:, :, None] * b.astype(np.int64)[None]
    pairs = np.clip(p[:, 0::2] + p[:, 1::2], -2**15, 2**15 - 1)
    c[...] = np.clip(pairs.sum(axis=1) + (0 if co is None else co), -2**31, 2**31 - 1)


def _wrong_at_long_k(a, b, c, a_zp=0, co=None):
    _exact(a, b, c, a_zp, co)
    if a.shape[1] > 4096:
        c.flat[-1] += 1


def _ignores_the_offset(a, b, c, a_zp=0, co=None):
    _exact(a, b, c, a_zp)


def _writes_outside(a, b, c, a_zp=0, co=None):
    _exact(a, b, c, a_zp, co)
    if c.base is not None and c.base.shape != c.shape:     # c is a column block of a wider matrix
        c.base[..., 0] += 1


def _raises(a, b, c, a_zp=0, co=None):
    raise RuntimeError("oneDNN integer GEMM failed with status 2")


def test_self_test_accepts_an_exact_gemm():
    assert int_gemm.self_test(_exact) is None


@pytest.mark.parametrize("fake", [_saturating, _wrong_at_long_k, _ignores_the_offset,
                                  _writes_outside])
def test_self_test_refuses_an_inexact_gemm(fake):
    assert "differs" in int_gemm.self_test(fake)


@pytest.mark.parametrize("fake,why", [(_saturating, "differs"), (_raises, "status 2")])
def test_a_refused_library_leaves_the_numpy_path(monkeypatch, fake, why):
    class Lib:
        version = "9.9.9"
        __call__ = staticmethod(fake)
    monkeypatch.delenv(int_gemm.ENV, raising=False)
    monkeypatch.setattr(int_gemm, "_open", lambda: (Lib(), "/fake/libdnnl.so.3"))
    monkeypatch.setattr(int_gemm, "_state", None)
    assert int_gemm.get() is None
    assert "refused" in int_gemm.describe() and why in int_gemm.describe()
    # and the MAC engine still computes, on the reference path
    x = np.full((1, 3, 3, 300), 255, np.uint8)
    w = np.full((3, 3, 300, 2), -128, np.int8)
    got, ref = conv(x, w, pad=(1, 1, 1, 1), preset="server")
    np.testing.assert_array_equal(got, ref)


def test_absent_library_and_forced_numpy(monkeypatch):
    monkeypatch.setattr(int_gemm, "_open", lambda: (None, "libdnnl not found"))
    monkeypatch.setattr(int_gemm, "_state", None)
    monkeypatch.delenv(int_gemm.ENV, raising=False)
    assert int_gemm.get() is None and "not found" in int_gemm.describe()
    monkeypatch.setattr(int_gemm, "_open", lambda: pytest.fail("opened despite the override"))
    monkeypatch.setattr(int_gemm, "_state", None)
    monkeypatch.setenv(int_gemm.ENV, "numpy")
    assert int_gemm.get() is None and int_gemm.ENV in int_gemm.describe()


def test_limits_follow_from_int32():
    assert int_gemm.MAX_K * int_gemm.MAX_PRODUCT <= 2**31 - 1
    assert (int_gemm.MAX_K + 1) * int_gemm.MAX_PRODUCT > 2**31 - 1


@pytest.mark.skipif(NATIVE is None, reason=f"oneDNN half only: {int_gemm.describe()}")
@pytest.mark.parametrize("isa", ["AVX2", "AVX512_CORE"])
def test_real_library_without_vnni_is_refused_or_exact(isa):
    # oneDNN's pre-VNNI int8 kernels saturate int16 pair sums; capped to such an
    # ISA the library must be refused, unless it computes every case exactly.
    code = ("from npud.emulator.engines import int_gemm as g\n"
            "import numpy as np\n"
            "f = g.get(); print(g.describe())\n"
            "if f is not None:\n"
            "    a = np.full((3, g.MAX_K), 255, np.uint8); b = np.full((g.MAX_K, 4), 127, np.int8)\n"
            "    c = np.empty((3, 4), np.int32); f(a, b, c, 0)\n"
            "    assert (c == g.MAX_K * 255 * 127).all(), c\n")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa)
    env.pop(int_gemm.ENV, None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "exact (self-tested)" in r.stdout or "refused" in r.stdout, r.stdout


@pytest.mark.skipif(NATIVE is None, reason=f"oneDNN half only: {int_gemm.describe()}")
def test_the_native_gemm_is_the_one_used(monkeypatch):
    # the bit-identity tests above prove nothing if the MAC engine never calls it
    calls = []

    def counting(a, b, c, a_zp=0, co=None):
        calls.append(a.shape)
        NATIVE(a, b, c, a_zp, co)
    monkeypatch.setattr(int_gemm, "_state", (counting, "counting (test)"))
    rng = np.random.default_rng(0)
    for geom, taken in ((GEOMETRIES[0], True), (GEOMETRIES[1], True), (GEOMETRIES[5], False)):
        x, w, g = _operands(rng, np.uint8, geom)
        calls.clear()
        conv(x, w, x_zp=1, preset="server", **g)
        assert bool(calls) == taken, geom
    calls.clear()
    mm(np.ones((1, 1, 4, 8), np.int8), np.ones((1, 1, 8, 2), np.int8), np.int32)
    assert calls


def test_conv2d_bias_inside_its_own_output_tile(path):
    """The bias may lie in the output tile the conv overwrites: both paths read it before."""
    from emu_harness import run_op

    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (2, 4, 4, 8)).astype(np.int8)
    w = rng.integers(-128, 128, (1, 1, 8, 16)).astype(np.int8)
    out0 = rng.integers(-1000, 1000, (2, 4, 4, 16)).astype(np.int32)   # its first row is the bias

    def emit(sb, i, o):
        sb.conv2d(i[0], i[1], o[0], bias=o[0].addr, x_zp=3)

    got = same_as_reference(lambda: run_op("conv2d", [x, w], [out0.copy()], emit, preset="server")[0])
    expected = np.einsum("nhwc,co->nhwo", x.astype(np.int64) - 3, w[0, 0].astype(np.int64)) + out0[0, 0, 0]
    np.testing.assert_array_equal(got, expected.astype(np.int32))


@pytest.mark.skipif(NATIVE is None, reason=f"oneDNN only: {int_gemm.describe()}")
@pytest.mark.parametrize("a, b, c, a_zp, why", [
    (np.ones((4, 8), np.uint8), np.ones((3, 5), np.int8), np.zeros((4, 5), np.int32), 0, "do not make"),
    (np.ones((4, 8), np.uint8), np.ones((8, 5), np.int8), np.zeros((2, 5), np.int32), 0, "do not make"),
    (np.ones((4, 0), np.uint8), np.ones((0, 5), np.int8), np.zeros((4, 5), np.int32), 0, "do not make"),
    (np.ones((4, 8), np.uint8), np.ones((8, 5), np.int8), np.zeros((4, 5), np.int32), 300, "zero point"),
    (np.ones((2, 4, 8), np.uint8), np.ones((8, 5), np.int8), np.zeros((4, 5), np.int32), 0, "2-D"),
    (np.ones((4, 8), np.int8), np.ones((8, 5), np.int8), np.zeros((4, 5), np.int32), 0, "uint8 x int8"),
])
def test_the_native_gemm_refuses_what_would_reach_past_its_arrays(a, b, c, a_zp, why):
    with pytest.raises((ValueError, TypeError), match=why):
        NATIVE(a, b, c, a_zp)


@pytest.mark.skipif(NATIVE is None, reason=f"oneDNN only: {int_gemm.describe()}")
def test_the_native_gemm_refuses_a_read_only_output():
    c = np.zeros((4, 5), np.int32)
    c.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        NATIVE(np.ones((4, 8), np.uint8), np.ones((8, 5), np.int8), c)
