"""3-D convolution and pooling as torch.onnx exports them (Conv3d, MaxPool3d, AvgPool3d, a tiny
video net), decomposed into 2-D ops over depth slices and compared with onnxruntime."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from test_compiler_models import check


def export(module, shape):
    torch.manual_seed(0)
    module = module.eval()
    x = torch.randn(*shape)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), f, dynamo=False, opset_version=13, input_names=["x"])
    return f.getvalue(), {"x": x.numpy()}


def _seeded(make):
    torch.manual_seed(1)
    return make()


CASES = {
    "conv3d": lambda: torch.nn.Conv3d(3, 4, 3, padding=1),
    "conv3d_stride_nopad": lambda: torch.nn.Conv3d(3, 5, (3, 2, 2), stride=(2, 1, 2)),
    "conv3d_dilated_grouped": lambda: torch.nn.Conv3d(4, 6, 3, padding=(2, 1, 1), dilation=(2, 1, 1), groups=2),
    "conv3d_1x1x1_no_bias": lambda: torch.nn.Conv3d(3, 4, 1, bias=False),
    "maxpool3d": lambda: torch.nn.MaxPool3d(2),
    "maxpool3d_pad_stride": lambda: torch.nn.MaxPool3d(3, stride=2, padding=1),
    "maxpool3d_ceil": lambda: torch.nn.MaxPool3d((2, 3, 3), stride=2, ceil_mode=True),
    "avgpool3d": lambda: torch.nn.AvgPool3d(2),
    "avgpool3d_pad_counted": lambda: torch.nn.AvgPool3d(3, stride=1, padding=1),
    "avgpool3d_pad_not_counted": lambda: torch.nn.AvgPool3d(3, stride=2, padding=1, count_include_pad=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_3d_layers(case):
    check(*export(_seeded(CASES[case]), (2, CASES[case]().__dict__.get("in_channels", 3), 5, 7, 6)))


class TinyVideoNet(torch.nn.Module):
    """A C3D-style clip classifier: Conv3d/BN/ReLU, pooling over space then time, a head."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv3d(3, 8, 3, padding=1), torch.nn.BatchNorm3d(8), torch.nn.ReLU(),
            torch.nn.MaxPool3d((1, 2, 2)),
            torch.nn.Conv3d(8, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool3d(2),
            torch.nn.AdaptiveAvgPool3d(1))
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_tiny_video_net():
    check(*export(_seeded(TinyVideoNet), (2, 3, 8, 16, 16)))
