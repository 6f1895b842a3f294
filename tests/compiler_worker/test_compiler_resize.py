"""Resize as torch.nn.functional.interpolate exports it (scale and size forms) and every
nearest_mode / coordinate_transformation_mode ONNX defines, compared with onnxruntime."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from test_compiler_models import check


class Interp(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, x):
        return F.interpolate(x, **self.kw)


def export(shape, opset=13, **kw):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Interp(**kw).eval(), (x,), f, dynamo=False, opset_version=opset, input_names=["x"])
    return f.getvalue(), {"x": x.numpy()}


TORCH_CASES = {
    "nearest_scale2": dict(scale_factor=2, mode="nearest"),
    "nearest_size": dict(size=(7, 13), mode="nearest"),
    "nearest_fractional_scale": dict(scale_factor=1.5, mode="nearest"),
    # 8 * 2.3 is 18.4 and 6 * 2.3 13.8 either way; 10 * 2.3 is where ONNX's shape inference
    # (22) and onnxruntime/torch (23) part: see test_output_size_as_onnxruntime_computes_it
    "bilinear_scale_2_3": dict(scale_factor=2.3, mode="bilinear", align_corners=False),
    # (mode="nearest-exact" has no TorchScript export; its ONNX form, half_pixel with
    # round_prefer_ceil... is covered by test_nearest_modes)
    "bilinear_scale": dict(scale_factor=2, mode="bilinear", align_corners=False),
    "bilinear_align_corners_size": dict(size=(9, 5), mode="bilinear", align_corners=True),
    "bilinear_downscale": dict(scale_factor=0.5, mode="bilinear", align_corners=False),
    "bicubic_scale": dict(scale_factor=2, mode="bicubic", align_corners=False),
    "bicubic_align_corners_size": dict(size=(11, 7), mode="bicubic", align_corners=True),
}


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_torch_interpolate_2d(case):
    check(*export((1, 3, 6, 8), **TORCH_CASES[case]), atol=2e-4)


@pytest.mark.parametrize("case", ["linear_size", "nearest_1d", "trilinear"])
def test_torch_interpolate_1d_and_3d(case):
    kw, shape = {"linear_size": (dict(size=12, mode="linear"), (2, 3, 7)),
                 "nearest_1d": (dict(scale_factor=3, mode="nearest"), (2, 3, 7)),
                 "trilinear": (dict(scale_factor=2, mode="trilinear"), (1, 2, 3, 4, 5))}[case]
    check(*export(shape, **kw))


def _onnx_resize(mode, ctm, nearest_mode="round_prefer_floor", scales=(1, 1, 1.7, 0.6), cubic_a=-0.75,
                 exclude_outside=0, shape=(1, 2, 5, 10)):
    attrs = dict(mode=mode, coordinate_transformation_mode=ctm)
    if mode == "nearest":
        attrs["nearest_mode"] = nearest_mode
    if mode == "cubic":
        attrs.update(cubic_coeff_a=cubic_a, exclude_outside=exclude_outside)
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], **attrs)
    g = helper.make_graph([node], "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [helper.make_tensor("scales", TensorProto.FLOAT, [4], list(scales))])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    return model.SerializeToString(), {"x": x}


CTMS = ["asymmetric", "half_pixel", "align_corners", "pytorch_half_pixel"]
NEAREST_MODES = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]


@pytest.mark.parametrize("ctm", CTMS)
@pytest.mark.parametrize("nearest_mode", NEAREST_MODES)
def test_nearest_modes(ctm, nearest_mode):
    check(*_onnx_resize("nearest", ctm, nearest_mode))


@pytest.mark.parametrize("ctm", CTMS)
@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_linear_and_cubic(ctm, mode):
    check(*_onnx_resize(mode, ctm))


@pytest.mark.parametrize("a,exclude", [(-0.5, 0), (-0.75, 1)])
def test_cubic_coefficient_and_exclude_outside(a, exclude):
    check(*_onnx_resize("cubic", "half_pixel", scales=(1, 1, 0.8, 2.5), cubic_a=a, exclude_outside=exclude))


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_output_size_as_onnxruntime_computes_it(mode):
    """torch's scale_factor=2.3 on 10 pixels: 23 in torch and onnxruntime, 22 by ONNX's shape
    inference (float64 floor of 10 * 2.3f); the scale still sets the source coordinates."""
    model, feeds = export((1, 2, 10, 10), scale_factor=2.3, mode=mode)
    exe, _stats = check(model, feeds, atol=2e-4)
    assert exe.outputs[0]["shape"] == [1, 2, 23, 23]
