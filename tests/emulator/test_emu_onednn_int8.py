"""oneDNN's int8 convolution plans (npud/emulator/engines/onednn.py) read their weights
in a blocked layout kept between runs: weights changed in place, weights at an address
reused with other bytes, and a thread past its budget of kept weights must all still
give the definition's bits (tests/emulator/test_emu_qconv.py's `definition`)."""

import numpy as np
import pytest

from npud.emulator.engines import onednn
from test_emu_qconv import definition

pytestmark = pytest.mark.skipif(not onednn.available(), reason=onednn.describe())


def _case(seed, k=3, cin=24, cout=40):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (1, 9, 8, cin)).astype(np.uint8)
    w = rng.integers(-128, 128, (k, k, cin, cout)).astype(np.int8)
    bias = rng.integers(-5000, 5000, cout).astype(np.int32)
    scale = (2.0 ** rng.uniform(-14, -9, cout)).astype(np.float32)
    return x, w, bias, scale


def _run(x, w, bias, scale, x_zp=5, y_zp=7):
    shape = (1, x.shape[1], x.shape[2], w.shape[3])
    plan = onednn.plan(x.shape, w.shape, shape, (1, 1), (1, 1, 1, 1), (1, 1), bias=True,
                       dtypes=("|u1", "|i1", "|u1", "<i4"), quant=(x_zp, y_zp, 0, 255, w.shape[3]))
    assert plan is not None and not plan.impl.startswith("ref")
    out = np.zeros(shape, np.uint8)
    plan(x, w, out, bias, scale)
    want = definition(x, w, bias, scale, np.uint8, x_zp=x_zp, y_zp=y_zp, pad=(1, 1, 1, 1))
    np.testing.assert_array_equal(out, want)
    return out


def test_weights_changed_in_place_are_reordered_again():
    x, w, bias, scale = _case(1)
    first = _run(x, w, bias, scale)
    _run(x, w, bias, scale)               # kept: the same bits
    w[1, 1, 3, 5] ^= 0x7f                 # one weight changed at the same address
    second = _run(x, w, bias, scale)
    assert not np.array_equal(first, second)


def test_an_address_reused_by_other_weights():
    x, w, bias, scale = _case(2)
    _run(x, w, bias, scale)
    w[...] = np.random.default_rng(3).integers(-128, 128, w.shape).astype(np.int8)
    _run(x, w, bias, scale)


def test_past_the_budget_weights_are_reordered_every_run(monkeypatch):
    monkeypatch.setattr(onednn, "BLOCKED_CACHE_BYTES", 0)
    onednn.reset()
    try:
        x, w, bias, scale = _case(4, cout=24)
        _run(x, w, bias, scale)
        w[0, 0, 0] = -w[0, 0, 0] - 1     # not kept: reordered again all the same
        _run(x, w, bias, scale)
    finally:
        onednn.reset()


@pytest.mark.parametrize("dtype,w_dtype", [(np.float32, "fp32"), (np.uint8, "int8")])
def test_depthwise_convolutions_get_a_jit_plan(dtype, w_dtype):
    # MobileNet's depthwise layers: a oneDNN depthwise kernel, not the numpy path
    from types import SimpleNamespace

    from npud.emulator.engines import mac
    from npud.emulator.isa import NONE_ADDR, tile

    x, out = np.zeros((1, 28, 28, 144), dtype), np.zeros((1, 14, 14, 144), dtype)
    a = SimpleNamespace(w=tile(0x8000_0000, w_dtype, (3, 3, 1, 144)), stride=(2, 2), pad=(0, 1, 0, 1),
                        dilation=(1, 1), groups=144, bias=NONE_ADDR, flags=0, x_zp=0, y_zp=0,
                        lo=0, hi=255)
    plan = (mac._onednn_plan if dtype == np.float32 else mac._qconv_plan)(a, x, out, None)
    assert plan is not None and not plan.impl.startswith("ref"), plan and plan.impl
