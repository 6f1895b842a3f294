"""Models made the way users make them, each with nodes npu-emu's target declines: exported from
torch (TopK in the middle, torchvision's NonMaxSuppression) and quantised by onnxruntime's
quantize_static with a float-only op left in the middle; and a small Loop written with onnx's
helpers.  Shared by the heterogeneous and partitioning tests."""

from __future__ import annotations

import io

import numpy as np


def _export(module, args, names_in, names_out, opset=17) -> bytes:
    import torch

    buf = io.BytesIO()
    module.eval()
    with torch.no_grad():
        torch.onnx.export(module, args, buf, input_names=names_in, output_names=names_out, opset_version=opset,
                          dynamo=False)
    return buf.getvalue()


def topk_model() -> bytes:
    """conv -> relu -> TopK over each channel's pixels -> conv on the top values, and a Gather of the
    conv's activations at the top indices: TopK is on cpu, the convs and the gather on the NPU."""
    import torch
    from torch import nn

    class TopKNet(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = torch.relu(self.conv1(x)).flatten(2)           # [1, 8, 64]
            values, indices = torch.topk(y, k=16, dim=2)       # [1, 8, 16]
            z = self.conv2(values.unsqueeze(-1))               # [1, 4, 16, 1]
            picked = torch.gather(y, 2, indices)               # [1, 8, 16]
            return z, picked * 2.0

    return _export(TopKNet(), (torch.zeros(1, 3, 8, 8),), ["x"], ["z", "picked"])


def nms_model() -> bytes:
    """A small detection head: conv features -> boxes and scores -> torchvision's nms (NonMaxSuppression)
    -> the kept boxes and scores, the others zeroed (fixed-size outputs, as a deployed head has).
    The head is on the NPU; nms, and the scatter of its data-dependent count of indices, on cpu."""
    import torch
    import torchvision
    from torch import nn

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.conv = nn.Conv2d(3, 5, 1)

        def forward(self, x):
            out = self.conv(x).flatten(2).transpose(1, 2)[0]   # [64, 5]
            xy = out[:, :2] * 4.0
            wh = torch.sigmoid(out[:, 2:4]) * 8.0 + 1.0
            boxes = torch.cat([xy, xy + wh], dim=1)             # [64, 4]
            scores = torch.sigmoid(out[:, 4])
            keep = torchvision.ops.nms(boxes, scores, 0.3)
            mask = torch.zeros_like(scores).scatter(0, keep, torch.ones_like(keep, dtype=scores.dtype))
            return boxes * mask[:, None], scores * mask

    return _export(Head(), (torch.zeros(1, 3, 8, 8),), ["x"], ["boxes", "scores"], opset=17)


def qdq_model(tmp_dir) -> bytes:
    """quantize_static of conv -> relu -> sin -> conv: the convs are QDQ (the NPU's int8 path), Sin has
    no quantised form and stays float between a DequantizeLinear and a QuantizeLinear -- on cpu."""
    import torch
    from torch import nn
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.conv2(torch.sin(torch.relu(self.conv1(x))))

    float_path, qdq_path = tmp_dir / "float.onnx", tmp_dir / "qdq.onnx"
    float_path.write_bytes(_export(Net(), (torch.zeros(1, 3, 8, 8),), ["x"], ["y"], opset=17))

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(float_path), str(qdq_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return qdq_path.read_bytes()


def loop_model() -> bytes:
    """relu -> Loop (3 trips adding the relu's output, read from the outer scope inside the body)
    -> relu: the Loop goes to cpu, and the tensor its body reads from outside crosses to it."""
    from onnx import TensorProto, helper, numpy_helper

    def vi(name, shape, elem=TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, elem, shape)

    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "r"], ["acc_out"], name="body_add"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body", [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("acc_in", [1, 4])],
        [vi("cond_out", [], TensorProto.BOOL), vi("acc_out", [1, 4])])
    inits = [numpy_helper.from_array(np.array(3, np.int64), "trips"), numpy_helper.from_array(np.array(True), "cond"),
             numpy_helper.from_array(np.zeros((1, 4), np.float32), "zero")]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                               helper.make_node("Loop", ["trips", "cond", "zero"], ["acc"], name="loop", body=body),
                               helper.make_node("Relu", ["acc"], ["y"], name="relu2")],
                              "loop", [vi("x", [1, 4])], [vi("y", [1, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _calibrate(float_model: bytes, tmp_dir, fmt) -> bytes:
    """``float_model`` quantised by onnxruntime's quantize_static (int8 activations and weights, in
    format ``fmt``), calibrated on four random batches of its one input."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    float_path, q_path = tmp_dir / f"float-{fmt}.onnx", tmp_dir / f"quant-{fmt}.onnx"
    float_path.write_bytes(float_model)
    x = onnx.load_from_string(float_model).graph.input[0]
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{x.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(float_path), str(q_path), Reader(), quant_format=fmt,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return q_path.read_bytes()


def qop_argmax_model(tmp_dir) -> bytes:
    """A segmentation head quantised by quantize_static in QOperator format: QuantizeLinear ->
    QLinearConv -> QLinearConv -> (DequantizeLinear to the float logits, ArgMax to the labels).
    ArgMax reads the int8 logits directly and npu-emu declines it: the cut falls on an int8 tensor
    (the second QLinearConv's output), which both devices must hold as int8."""
    import torch
    from onnxruntime.quantization import QuantFormat
    from torch import nn

    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(4)
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 5, 1)

        def forward(self, x):
            logits = self.conv2(torch.relu(self.conv1(x)))
            return logits, torch.argmax(logits, dim=1)

    model = _export(Seg(), (torch.zeros(1, 3, 8, 8),), ["x"], ["logits", "labels"])
    return _calibrate(model, tmp_dir, QuantFormat.QOperator)


def bool_mask_model() -> bytes:
    """Confident pixels other than the top 8: a comparison (NPU) makes a bool mask, ScatterElements
    (cpu: npu-emu declines it) clears the top-8 positions TopK (cpu) found, Where (NPU) applies it --
    bool tensors cross both ways."""
    import torch
    from torch import nn

    class Mask(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(5)
            self.conv = nn.Conv2d(3, 1, 3, padding=1)

        def forward(self, x):
            s = torch.sigmoid(self.conv(x)).flatten()          # [64]
            confident = s > 0.5
            top = torch.topk(s, k=8).indices
            rest = confident.scatter(0, top, torch.zeros(8, dtype=torch.bool))
            return torch.where(rest, s, torch.zeros_like(s))

    return _export(Mask(), (torch.zeros(1, 3, 8, 8),), ["x"], ["y"])
