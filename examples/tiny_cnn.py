"""A small image classifier built in code: the model the demo compiles and runs.

conv3x3(3->16) + BatchNorm + ReLU -> depthwise conv3x3 + ReLU -> conv1x1(16->32) + ReLU
-> GlobalAveragePool -> Flatten -> Gemm(32->10) -> Softmax, on a 1x3x32x32 input,
with fixed random weights.  ``reference`` computes the same thing with plain
numpy, so the demo can check the NPU's answer without onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

INPUT_SHAPE = (1, 3, 32, 32)
CLASSES = 10


def weights(seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)
    return {
        "c1_w": w(16, 3, 3, 3, scale=0.3), "c1_b": w(16, scale=0.1),
        "bn_scale": (1 + w(16, scale=0.1)), "bn_bias": w(16, scale=0.1),
        "bn_mean": w(16, scale=0.1), "bn_var": np.abs(1 + w(16, scale=0.1)),
        "dw_w": w(16, 1, 3, 3, scale=0.3), "dw_b": w(16, scale=0.1),
        "pw_w": w(32, 16, 1, 1, scale=0.3), "pw_b": w(32, scale=0.1),
        "fc_w": w(CLASSES, 32, scale=0.3), "fc_b": w(CLASSES, scale=0.1),
    }


def build(seed: int = 7, top_k: int = 0) -> onnx.ModelProto:
    """The classifier; with ``top_k``, also its ``top_k`` best classes (``top_probs``,
    ``top_classes``) by a TopK node, which npu-emu's target declines: the demo's model then
    runs on the NPU and, for that one node, on a cpu device."""
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "c1_w", "c1_b"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        n("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"], name="bn1"),
        n("Relu", ["bn"], ["r1"], name="relu1"),
        n("Conv", ["r1", "dw_w", "dw_b"], ["dw"], pads=[1, 1, 1, 1], group=16, name="dwconv"),
        n("Relu", ["dw"], ["r2"], name="relu2"),
        n("Conv", ["r2", "pw_w", "pw_b"], ["pw"], name="pwconv"),
        n("Relu", ["pw"], ["r3"], name="relu3"),
        n("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        n("Flatten", ["gap"], ["flat"], name="flatten"),
        n("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
        n("Softmax", ["logits"], ["probs"], axis=1, name="softmax"),
    ]
    outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, CLASSES])]
    initialisers = [numpy_helper.from_array(v, k) for k, v in weights(seed).items()]
    if top_k:
        nodes.append(n("TopK", ["probs", "k"], ["top_probs", "top_classes"], axis=1, name="top_k"))
        initialisers.append(numpy_helper.from_array(np.array([top_k], np.int64), "k"))
        outputs += [helper.make_tensor_value_info("top_probs", TensorProto.FLOAT, [1, top_k]),
                    helper.make_tensor_value_info("top_classes", TensorProto.INT64, [1, top_k])]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(INPUT_SHAPE))],
        outputs, initialisers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="npud-demo")
    onnx.checker.check_model(model)
    return model


def _conv(x, w, b, pad, groups=1):
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cout, cin_g, kh, kw = w.shape
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))      # n, c, h, w, kh, kw
    out = []
    for g in range(groups):
        xs = windows[:, g * cin_g:(g + 1) * cin_g]
        ws = w[g * (cout // groups):(g + 1) * (cout // groups)]
        out.append(np.einsum("nchwij,ocij->nohw", xs, ws))
    return np.concatenate(out, axis=1) + b[None, :, None, None]


def reference(x: np.ndarray, seed: int = 7) -> np.ndarray:
    p = {k: v.astype(np.float64) for k, v in weights(seed).items()}
    x = x.astype(np.float64)
    y = _conv(x, p["c1_w"], p["c1_b"], 1)
    y = (y - p["bn_mean"][None, :, None, None]) / np.sqrt(p["bn_var"][None, :, None, None] + 1e-5)
    y = np.maximum(y * p["bn_scale"][None, :, None, None] + p["bn_bias"][None, :, None, None], 0)
    y = np.maximum(_conv(y, p["dw_w"], p["dw_b"], 1, groups=16), 0)
    y = np.maximum(_conv(y, p["pw_w"], p["pw_b"], 0), 0)
    logits = y.mean(axis=(2, 3)) @ p["fc_w"].T + p["fc_b"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
