"""Instance and group normalisation as torch.onnx exports them (InstanceNorm1d/2d/3d, GroupNorm:
InstanceNormalization over 3-D and 5-D tensors) and ONNX's GroupNormalization, compared with
onnxruntime."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from test_compiler_models import check


def export(module, shape, opset=13):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), f, dynamo=False, opset_version=opset, input_names=["x"])
    return f.getvalue(), {"x": x.numpy()}


def _affine(m):
    """Non-trivial scale and shift, so a dropped affine shows."""
    torch.manual_seed(2)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    return m


CASES = {
    "instancenorm1d": (lambda: _affine(torch.nn.InstanceNorm1d(4, affine=True)), (2, 4, 11)),
    "instancenorm2d": (lambda: _affine(torch.nn.InstanceNorm2d(3, affine=True)), (2, 3, 5, 6)),
    "instancenorm3d": (lambda: _affine(torch.nn.InstanceNorm3d(3, affine=True)), (1, 3, 4, 5, 6)),
    "groupnorm_2d": (lambda: _affine(torch.nn.GroupNorm(2, 6)), (2, 6, 5, 7)),
    "groupnorm_1d": (lambda: _affine(torch.nn.GroupNorm(4, 8)), (2, 8, 9)),
    "groupnorm_3d": (lambda: _affine(torch.nn.GroupNorm(3, 6)), (1, 6, 3, 4, 5)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_norms(case):
    make, shape = CASES[case]
    check(*export(make(), shape))


@pytest.mark.parametrize("shape", [(2, 6, 5, 4), (2, 6, 7)])
def test_onnx_group_normalization(shape):
    """GroupNormalization-21: per-channel scale and bias."""
    rng = np.random.default_rng(6)
    c = shape[1]
    node = helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"], num_groups=3, epsilon=1e-5)
    g = helper.make_graph([node], "gn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [helper.make_tensor("scale", TensorProto.FLOAT, [c], rng.uniform(0.5, 1.5, c)),
                           helper.make_tensor("bias", TensorProto.FLOAT, [c], rng.uniform(-1, 1, c))])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    check(model.SerializeToString(), {"x": rng.standard_normal(shape).astype(np.float32)})
