"""The model zoo (issue 14): models made the way users make them, built at test time from code
(never downloaded) and compared with onnxruntime.

* torchvision architectures exported by ``torch.onnx`` (random weights, BatchNorm statistics
  recalibrated on random batches so activations have realistic ranges, small inputs);
* the same quantised by ``onnxruntime.quantization``: QDQ and QOperator (static, calibrated with
  a data reader) and dynamic;
* ``onnx.helper`` equivalents of the onnx package's classic architectures at their shipped
  opset 9 (upgraded by the compiler worker);
* 1-D audio convolutions with reflect/edge padding.

``compare`` compiles one model for a preset, runs it on the in-process emulator and on
onnxruntime (one thread) and returns a row of the zoo table; ``ZOO`` names every model, ``FAST``
the subset ``make test`` runs.  ``python tests/zoo/zoo_models.py`` (``make zoo``) runs them all
and prints the table recorded in docs/CONFORMANCE.md.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.common import ort_session   # the baseline every benchmark uses: one thread
from npud.compiler_worker import CompileError, compile_model, run_on_emulator
from npud.emulator.config import make_config

FP32_RTOL = 1e-3       # of the output's largest magnitude
INT8_STEPS = 3         # "within a few quantisation steps"


# --- running and comparing ---------------------------------------------------------------------

def _best_of(fn, repeats: int) -> tuple[float, object]:
    """(the fastest of up to `repeats` calls in seconds, the last result); a call over a
    second is not repeated (its noise is small next to it)."""
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        if best > 1.0:
            break
    return best, out


def _model_run_ms(client, model: bytes, feeds: dict, repeats: int) -> float:
    """Best-of-``repeats`` wall time of ``Model.run`` through the daemon, after one warm-up run."""
    loaded = client.load(model)
    try:
        loaded.run(feeds)
        return _best_of(lambda: loaded.run(feeds), max(repeats, 5))[0] * 1e3
    finally:
        loaded.unload()


def feeds_for(model: bytes, seed: int = 5) -> dict:
    """Standard-normal float32 inputs of the model's declared shapes (symbolic dims 1)."""
    rng = np.random.default_rng(seed)
    m = onnx.load_from_string(model)
    inits = {i.name for i in m.graph.initializer}
    return {i.name: rng.standard_normal([d.dim_value or 1 for d in i.type.tensor_type.shape.dim])
            .astype(np.float32) for i in m.graph.input if i.name not in inits}


def _output_step(model: bytes, name: str) -> float | None:
    """The scale of the DequantizeLinear producing graph output `name`, or None (float output)."""
    m = onnx.load_from_string(model)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    for n in m.graph.node:
        if name in n.output and n.op_type == "DequantizeLinear" and n.input[1] in inits:
            return float(np.max(inits[n.input[1]]))
    return None


def compare(model: bytes, preset: str = "edge", name: str = "", repeats: int = 1, client=None) -> dict:
    """One row of the zoo table: does npud match onnxruntime (fp32: every output within
    FP32_RTOL of its largest magnitude; int8: within INT8_STEPS quantisation steps and the same
    argmax), compile time, emulator wall time and modelled device time next to onnxruntime's,
    and the share of MACs that ran on the NPU (all of a compiled model: no op falls back).
    With ``client`` (connected to a daemon whose device 0 is ``preset``), also the steady-state
    ``Model.run`` time -- the model loaded once and run once before timing -- which is what a user
    sees, and what the performance goals compare with onnxruntime."""
    row = {"model": name, "match": False, "error": "", "compile_s": None, "npud_ms": None,
           "device_ms": None, "ort_ms": None, "macs": 0, "npu_mac_share": None, "worst": None,
           "run_ms": None}
    feeds = feeds_for(model)
    sess = ort_session(model)
    t, refs = _best_of(lambda: sess.run(None, feeds), repeats)
    row["ort_ms"] = t * 1e3
    cfg = make_config(preset)
    t0 = time.perf_counter()
    try:
        exe = compile_model(model, cfg)
    except CompileError as e:
        row["error"] = str(e)[:200]
        return row
    row["compile_s"] = time.perf_counter() - t0
    t, (out, stats) = _best_of(lambda: run_on_emulator(exe, feeds, cfg), repeats)
    row["npud_ms"] = t * 1e3
    if client is not None:
        import npu
        try:
            row["run_ms"] = _model_run_ms(client, model, feeds, repeats)
        except npu.NpuError as e:   # e.g. weights larger than the device (issue 14, large models)
            row["run_error"] = e.code
    rows = exe.report().rows
    row["kinds"], row["ops"] = {r["kind"] for r in rows}, {r["op"] for r in rows}
    row["macs"] = sum(r["macs"] for r in rows)
    row["npu_mac_share"] = 1.0 if row["macs"] else None
    row["device_ms"] = sum(r["cycles"] for r in rows) / (cfg.clock_mhz * 1e3)
    outs = [o.name for o in onnx.load_from_string(model).graph.output]
    ok, worst = True, []
    for o, ref in zip(outs, refs):
        got = np.asarray(out[o], np.float64)
        step = _output_step(model, o)
        if step is not None:
            steps = float(np.max(np.abs(got - ref))) / step
            same = np.array_equal(got.reshape(got.shape[0], -1).argmax(-1),
                                  np.asarray(ref).reshape(got.shape[0], -1).argmax(-1))
            ok &= steps <= INT8_STEPS + 1e-3 and same
            worst.append(f"{steps:.0f} steps" + ("" if same else ", argmax differs"))
        else:
            rel = float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30))
            ok &= rel <= FP32_RTOL
            worst.append(f"rel {rel:.1e}")
    row["match"], row["worst"] = bool(ok), "; ".join(worst)
    return row


def global_mean(channels: int = 1024, size: int = 7, opset: int = 13) -> bytes:
    """ShuffleNetV2's head: ReduceMean over H and W of a [1, C, 7, 7] map whose reduced extent
    times its channels fills most of `edge`'s SRAM."""
    b = _Net(4)
    y = b.op("Relu", ["x"])
    y = b.op("ReduceMean", [y], axes=[2, 3], keepdims=0)
    return b.model([1, channels, size, size], y, opset, ir_version=8, y_shape=(1, channels))


# --- onnx.helper models: the classics at their shipped opset --------------------------------------

class _Net:
    """An onnx.helper graph under construction: fresh names, random weights."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.k = [], [], 0

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}{self.k}"

    def w(self, shape, scale=None, value=None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        arr = (value if value is not None else
               self.rng.standard_normal(shape) * (scale if scale is not None else math.sqrt(2 / fan_in)))
        n = self.name("w")
        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), n))
        return n

    def const(self, value) -> str:
        """An initializer of `value` as given (int64 shapes stay int64)."""
        n = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value), n))
        return n

    def op(self, op: str, ins: list, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    def conv(self, x, cin, cout, k, stride=1, pad=0, group=1, bn=True, relu=True) -> str:
        y = self.op("Conv", [x, self.w((cout, cin // group, k, k)), self.w((cout,), 0.1)],
                    kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group)
        if bn:
            y = self.op("BatchNormalization", [y, self.w((cout,), value=1 + 0.1 * self.rng.standard_normal(cout)),
                                               self.w((cout,), 0.1), self.w((cout,), 0.1),
                                               self.w((cout,), value=1 + self.rng.random(cout))], epsilon=1e-5)
        return self.op("Relu", [y]) if relu else y

    def model(self, x_shape, y, opset: int, ir_version: int = 4, y_shape=(1, 10)) -> bytes:
        g = helper.make_graph(self.nodes, "classic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, y_shape)], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = ir_version
        onnx.checker.check_model(m)
        return m.SerializeToString()


def _head(b: _Net, y: str, cin: int, classes: int = 10) -> str:
    y = b.op("GlobalAveragePool", [y])
    y = b.op("Flatten", [y], axis=1)
    y = b.op("Gemm", [y, b.w((classes, cin)), b.w((classes,), 0.1)], transB=1)
    return b.op("Softmax", [y], axis=1)


def classic_block(opset: int = 9) -> bytes:
    """The ops of the classic models at an old opset: Conv, BatchNormalization, Relu, MaxPool, LRN,
    AveragePool, Concat, Sum, Dropout, Reshape/Transpose (channel shuffle), Gemm, Softmax."""
    b = _Net(opset)
    y = b.conv("x", 3, 8, 3, pad=1)
    y = b.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("LRN", [y], size=3, alpha=1e-4, beta=0.75, bias=1.0)
    a = b.conv(y, 8, 8, 1)
    c = b.conv(y, 8, 8, 3, pad=1)
    y = b.op("Concat", [a, c], axis=1)
    y = b.op("Reshape", [y, b.const(np.array([1, 2, 8, 8, 8], np.int64))])
    y = b.op("Transpose", [y], perm=[0, 2, 1, 3, 4])
    y = b.op("Reshape", [y, b.const(np.array([1, 16, 8, 8], np.int64))])
    y = b.op("Sum", [y, b.conv(y, 16, 16, 3, pad=1, relu=False)])
    y = b.op("AveragePool", [y], kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("Dropout", [y], ratio=0.3)
    return b.model([1, 3, 16, 16], _head(b, y, 16), opset)


def audio_conv1d(opset: int = 13) -> bytes:
    """A 1-D audio front end: reflect and edge Pad, strided, dilated and grouped 1-D Convs,
    Relu, a mean over time and a classifier."""
    b = _Net(1)
    y = b.op("Pad", ["x", b.const(np.array([0, 0, 3, 0, 0, 3], np.int64))], mode="reflect")
    y = b.op("Conv", [y, b.w((16, 1, 7)), b.w((16,), 0.1)], kernel_shape=[7], strides=[2])
    y = b.op("Relu", [y])
    y = b.op("Pad", [y, b.const(np.array([0, 0, 1, 0, 0, 2], np.int64))], mode="edge")
    y = b.op("Conv", [y, b.w((32, 4, 3)), b.w((32,), 0.1)], kernel_shape=[3], dilations=[2], group=4)
    y = b.op("Relu", [y])
    y = b.op("Conv", [y, b.w((32, 32, 3))], kernel_shape=[3], pads=[1, 1], strides=[2])
    y = b.op("ReduceMean", [y], axes=[2], keepdims=0)
    y = b.op("Gemm", [y, b.w((10, 32)), b.w((10,), 0.1)], transB=1)
    return b.model([1, 1, 400], y, opset, ir_version=8)


def audio_decoder1d(opset: int = 13) -> bytes:
    """A 1-D decoder: strided ConvTranspose 1-D (with output_padding and pads), Relu, and a
    grouped one."""
    b = _Net(5)
    y = b.op("ConvTranspose", ["x", b.w((8, 16, 4)), b.w((16,), 0.1)], kernel_shape=[4], strides=[2],
             pads=[1, 1])
    y = b.op("Relu", [y])
    y = b.op("ConvTranspose", [y, b.w((16, 4, 3))], kernel_shape=[3], strides=[3], output_padding=[1],
             group=2)
    return b.model([1, 8, 50], y, opset, ir_version=8, y_shape=(1, 8, 301))


def pad_modes_2d(opset: int = 13) -> bytes:
    """Reflect and edge Pad of a 4-D tensor on H and W (the image models' ReflectionPad2d)."""
    b = _Net(2)
    y = b.op("Pad", ["x", b.const(np.array([0, 0, 2, 1, 0, 0, 1, 3], np.int64))], mode="reflect")
    y = b.conv(y, 3, 8, 3, bn=False)
    y = b.op("Pad", [y, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], mode="edge")
    return b.model([1, 3, 12, 10], y, opset, ir_version=8, y_shape=(1, 8, 15, 14))


def qcnn_float(opset: int = 13) -> bytes:
    """A small CNN with the ops onnxruntime's QOperator form turns into com.microsoft ops:
    residual Add, channel Concat, GlobalAveragePool, Gemm (QGemm)."""
    b = _Net(3)
    y = b.conv("x", 3, 16, 3, pad=1, bn=False)
    r = b.conv(y, 16, 16, 3, pad=1, bn=False, relu=False)
    y = b.op("Relu", [b.op("Add", [y, r])])
    y = b.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("Concat", [b.conv(y, 16, 8, 1, bn=False), b.conv(y, 16, 8, 3, pad=1, bn=False)], axis=1)
    return b.model([1, 3, 16, 16], _head(b, y, 16), opset, ir_version=8)


# --- onnxruntime.quantization ------------------------------------------------------------------

def quantize(model: bytes, form: str, calib: int = 4, per_channel: bool = True, seed: int = 1) -> bytes:
    """`model` quantised by onnxruntime.quantization: form "qdq" or "qop" (static, calibrated on
    `calib` standard-normal batches through a data reader) or "dynamic"."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    shapes = {k: v.shape for k, v in feeds_for(model).items()}
    rng = np.random.default_rng(seed)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
                            for _ in range(calib)])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        with open(src, "wb") as f:
            f.write(model)
        if form == "dynamic":
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        else:
            quantize_static(src, dst, Reader(), per_channel=per_channel,
                            quant_format=QuantFormat.QDQ if form == "qdq" else QuantFormat.QOperator,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        with open(dst, "rb") as f:
            return f.read()


# --- more classics (the onnx package's nine, as onnx.helper equivalents at opset 9) --------------

def classic_alexnet(opset: int = 9) -> bytes:
    """AlexNet/ZFNet's pattern: large strided first conv, LRN, overlapping max pools, grouped
    convs, Dropout and two Gemm layers."""
    b = _Net(11)
    y = b.conv("x", 3, 24, 11, stride=4, pad=2, bn=False)
    y = b.op("LRN", [y], size=5, alpha=1e-4, beta=0.75, bias=1.0)
    y = b.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2])
    y = b.conv(y, 24, 64, 5, pad=2, group=2, bn=False)
    y = b.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2])
    y = b.conv(y, 64, 96, 3, pad=1, bn=False)
    y = b.conv(y, 96, 64, 3, pad=1, group=2, bn=False)
    y = b.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2])
    y = b.op("Flatten", [y], axis=1)
    y = b.op("Dropout", [y], ratio=0.5)
    y = b.op("Relu", [b.op("Gemm", [y, b.w((256, 64 * 3 * 3)), b.w((256,), 0.1)], transB=1)])
    y = b.op("Gemm", [y, b.w((10, 256)), b.w((10,), 0.1)], transB=1)
    return b.model([1, 3, 127, 127], b.op("Softmax", [y], axis=1), opset)


def classic_squeezenet(opset: int = 9) -> bytes:
    """SqueezeNet's fire modules (1x1 squeeze, 1x1 and 3x3 expand, Concat) and a conv head."""
    b = _Net(12)
    y = b.conv("x", 3, 32, 3, stride=2, bn=False)
    y = b.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2])
    c = 32
    for sq, ex in ((8, 32), (8, 32), (16, 64)):
        s = b.conv(y, c, sq, 1, bn=False)
        y = b.op("Concat", [b.conv(s, sq, ex, 1, bn=False), b.conv(s, sq, ex, 3, pad=1, bn=False)], axis=1)
        c = 2 * ex
    y = b.op("Dropout", [y], ratio=0.5)
    y = b.conv(y, c, 10, 1, bn=False)
    y = b.op("Flatten", [b.op("GlobalAveragePool", [y])], axis=1)
    return b.model([1, 3, 64, 64], b.op("Softmax", [y], axis=1), opset)


def classic_inception(opset: int = 9) -> bytes:
    """GoogLeNet/Inception's modules: four branches (1x1, 1x1-3x3, 1x1-5x5, pool-1x1), Concat,
    BatchNormalization (inception_v2), average pooling."""
    b = _Net(13)
    y = b.conv("x", 3, 32, 7, stride=2, pad=3)
    y = b.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c = 32
    for _ in range(2):
        br = [b.conv(y, c, 16, 1), b.conv(b.conv(y, c, 16, 1), 16, 24, 3, pad=1),
              b.conv(b.conv(y, c, 8, 1), 8, 8, 5, pad=2),
              b.conv(b.op("MaxPool", [y], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]), c, 8, 1)]
        y, c = b.op("Concat", br, axis=1), 56
    y = b.op("AveragePool", [y], kernel_shape=[2, 2], strides=[2, 2])
    return b.model([1, 3, 64, 64], _head(b, y, c), opset)


def classic_resnet(opset: int = 9) -> bytes:
    """ResNet/DenseNet's patterns: residual Sum of conv-BN-relu blocks, strided downsampling
    with a projection, and a dense Concat of a block's input and output."""
    b = _Net(14)
    y = b.conv("x", 3, 16, 3, stride=2, pad=1)
    c = 16
    for cout, stride in ((16, 1), (32, 2), (32, 1)):
        r = b.conv(b.conv(y, c, cout, 3, stride=stride, pad=1), cout, cout, 3, pad=1, relu=False)
        sc = y if (stride, c) == (1, cout) else b.conv(y, c, cout, 1, stride=stride, relu=False)
        y, c = b.op("Relu", [b.op("Sum", [r, sc])]), cout
    y, c = b.op("Concat", [y, b.conv(y, c, 16, 3, pad=1)], axis=1), c + 16
    return b.model([1, 3, 64, 64], _head(b, y, c), opset)


# --- torchvision ------------------------------------------------------------------------------------

def torchvision_model(arch: str, size: int = 64, classes: int = 10, seed: int = 0, **kw) -> bytes:
    """torchvision's `arch` with random weights, BatchNorm statistics recalibrated on two random
    batches (as shipped, running stats 0/1 make activations vanish), exported by torch.onnx
    (opset 13, the TorchScript exporter)."""
    import torch
    import torchvision
    torch.manual_seed(seed)
    m = getattr(torchvision.models, arch)(num_classes=classes, **kw)
    norms = [x for x in m.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.momentum = None                   # cumulative average over the calibration batches
    m.train()
    with torch.no_grad():
        for _ in range(2 if norms else 0):
            m(torch.randn(4, 3, size, size))
    m.eval()
    f = io.BytesIO()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, torch.randn(1, 3, size, size), f, dynamo=False, opset_version=13,
                          input_names=["x"], output_names=["y"])
    return f.getvalue()


def torch_mlp() -> bytes:
    """A Linear/GELU/LayerNorm stack (a transformer's feed-forward), for dynamic quantisation."""
    import torch
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64),
                            torch.nn.LayerNorm(64), torch.nn.Linear(64, 10)).eval()
    f = io.BytesIO()
    torch.onnx.export(m, torch.randn(4, 64), f, dynamo=False, opset_version=13, input_names=["x"],
                      output_names=["y"])
    return f.getvalue()


def torch_recurrent(kind: str = "LSTM", seq: int = 20) -> bytes:
    """A speech-style tagger: a 2-layer bidirectional ``kind`` (LSTM/GRU) over 40 features,
    batch_first, then a Linear per frame."""
    import torch

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(torch.nn, kind)(40, 64, num_layers=2, bidirectional=True, batch_first=True)
            self.out = torch.nn.Linear(128, 10)

        def forward(self, x):
            return self.out(self.rnn(x)[0])

    torch.manual_seed(0)
    f = io.BytesIO()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Tagger().eval(), torch.randn(2, seq, 40), f, dynamo=False, opset_version=14,
                          input_names=["x"], output_names=["y"])
    return f.getvalue()


def torch_video() -> bytes:
    """A C3D-style clip classifier (Conv3d/BatchNorm3d/ReLU, MaxPool3d, AdaptiveAvgPool3d, Linear)
    over 8 frames of 32x32."""
    import torch

    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv3d(3, 16, 3, padding=1), torch.nn.BatchNorm3d(16), torch.nn.ReLU(),
        torch.nn.MaxPool3d((1, 2, 2)),
        torch.nn.Conv3d(16, 32, 3, padding=1), torch.nn.BatchNorm3d(32), torch.nn.ReLU(),
        torch.nn.MaxPool3d(2),
        torch.nn.Conv3d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool3d(2),
        torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))
    m.train()
    with torch.no_grad():
        m(torch.randn(2, 3, 8, 32, 32))     # BatchNorm statistics from a batch, as torchvision_model
    m.eval()
    f = io.BytesIO()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, torch.randn(1, 3, 8, 32, 32), f, dynamo=False, opset_version=13,
                          input_names=["x"], output_names=["y"])
    return f.getvalue()


# --- the zoo ----------------------------------------------------------------------------------------

def _tv(arch, size=64, **kw):
    return lambda: torchvision_model(arch, size, **kw)


def _q(build, form, **kw):
    return lambda: quantize(build(), form, **kw)


# name -> (builder, in `make test`'s fast subset)
ZOO = {
    "classic block (opset 7)": (lambda: classic_block(7), True),
    "classic block (opset 9)": (lambda: classic_block(9), True),
    "classic AlexNet-like (opset 9)": (classic_alexnet, False),
    "classic SqueezeNet-like (opset 9)": (classic_squeezenet, True),
    "classic Inception-like (opset 9)": (classic_inception, False),
    "classic ResNet/DenseNet-like (opset 9)": (classic_resnet, True),
    "audio Conv1d + reflect/edge Pad": (audio_conv1d, True),
    "Pad reflect/edge 2-D": (pad_modes_2d, True),
    "audio ConvTranspose1d decoder": (audio_decoder1d, True),
    "audio Conv1d QDQ static": (_q(audio_conv1d, "qdq"), True),
    "audio Conv1d QOperator static": (_q(audio_conv1d, "qop"), True),
    "small CNN QOperator static": (_q(qcnn_float, "qop"), True),
    "small CNN QDQ static": (_q(qcnn_float, "qdq"), True),
    "tv resnet18 64px": (_tv("resnet18"), False),   # importing torch alone costs seconds
    "tv mobilenet_v2 64px": (_tv("mobilenet_v2"), False),
    "tv mobilenet_v3_small 64px": (_tv("mobilenet_v3_small"), False),
    "tv squeezenet1_1 64px": (_tv("squeezenet1_1"), False),
    "tv shufflenet_v2_x0_5 64px": (_tv("shufflenet_v2_x0_5"), False),
    "tv shufflenet_v2_x1_0 224px": (_tv("shufflenet_v2_x1_0", 224), False),
    "tv mnasnet0_5 64px": (_tv("mnasnet0_5"), False),
    "tv efficientnet_b0 64px": (_tv("efficientnet_b0"), False),
    "tv regnet_x_400mf 64px": (_tv("regnet_x_400mf"), False),
    "tv googlenet 64px": (_tv("googlenet", aux_logits=False, init_weights=True), False),
    "tv densenet121 64px": (_tv("densenet121"), False),
    "tv alexnet 224px": (_tv("alexnet", 224), False),     # its adaptive pool needs 6x6 features
    "tv vgg11 224px": (_tv("vgg11", 224), False),
    "tv vgg19 224px (weights over one buffer)": (_tv("vgg19", 224), False),   # 558 MB > 512 MiB: two weights buffers
    "tv mobilenet_v2 224px QDQ (issue 14's 8%)": (_q(_tv("mobilenet_v2", 224), "qdq"), False),
    "tv resnet18 64px QDQ": (_q(_tv("resnet18"), "qdq"), False),
    "tv mobilenet_v3_small 64px QDQ": (_q(_tv("mobilenet_v3_small"), "qdq"), False),
    "tv efficientnet_b0 64px QDQ": (_q(_tv("efficientnet_b0"), "qdq"), False),
    "tv resnet18 64px QOperator": (_q(_tv("resnet18"), "qop"), False),
    "tv mobilenet_v2 64px QOperator": (_q(_tv("mobilenet_v2"), "qop"), False),
    "torch MLP dynamic (quantize_dynamic)": (_q(torch_mlp, "dynamic"), False),
    "torch video net Conv3d/MaxPool3d/AvgPool3d 8x32x32": (torch_video, False),
    "torch LSTM 2-layer bidirectional (seq 20)": (lambda: torch_recurrent("LSTM"), False),
    "torch GRU 2-layer bidirectional (seq 20)": (lambda: torch_recurrent("GRU"), False),
}
FAST = [name for name, (_, fast) in ZOO.items() if fast]


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    """The markdown table of `rows` (compare's dicts)."""
    out = ["| Model | Match | Worst difference | Compile (s) | npud emulator (ms) | npud Model.run (ms) "
           "| modelled device (ms) | onnxruntime 1 thread (ms) | Model.run / onnxruntime | MACs | MACs on the NPU |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        match = "yes" if r["match"] else ("refused: " + r["error"].replace("|", "/") if r["error"] else "no")
        share = "-" if r["npu_mac_share"] is None else f"{100 * r['npu_mac_share']:.0f}%"
        run_ms, ratio = r.get("run_error") or _fmt(r.get("run_ms"), ".2f"), _ratio(r)
        out.append(f"| {r['model']} | {match} | {r['worst'] or '-'} | {_fmt(r['compile_s'], '.2f')} | "
                   f"{_fmt(r['npud_ms'], '.1f')} | {run_ms} | {_fmt(r['device_ms'], '.2f')} | "
                   f"{_fmt(r['ort_ms'], '.2f')} | {_fmt(ratio, '.1f')} | {r['macs'] / 1e6:.1f}M | {share} |")
    return "\n".join(out)


def _ratio(row: dict) -> float | None:
    """Steady-state Model.run time over onnxruntime's (one thread), if both were measured."""
    return row["run_ms"] / row["ort_ms"] if row.get("run_ms") and row.get("ort_ms") else None


def summary(rows: list[dict]) -> str:
    """The geometric mean and the worst of the Model.run / onnxruntime ratios (issue 14's goals:
    <= 1.5x and no model worse than 3x)."""
    ratios = [(r["model"], _ratio(r)) for r in rows if _ratio(r)]
    if not ratios:
        return "Model.run / onnxruntime: not measured"
    geo = math.exp(sum(math.log(v) for _, v in ratios) / len(ratios))
    worst = max(ratios, key=lambda t: t[1])
    return (f"Model.run / onnxruntime over {len(ratios)} models: geometric mean {geo:.1f}x, "
            f"worst {worst[1]:.1f}x ({worst[0]})")


@contextlib.contextmanager
def _daemon_client(preset: str):
    """A private daemon with one ``preset`` device and a client connected to it."""
    import npu
    from npu.local import LocalDaemon

    cache = tempfile.mkdtemp(prefix="npud-zoo-cache-")
    daemon = LocalDaemon("--device", preset, "--cache-dir", cache)
    try:
        with npu.connect(daemon.endpoint, timeout=300) as client:
            yield client
    finally:
        daemon.stop()
        shutil.rmtree(cache, ignore_errors=True)


TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zoo_table.md")


def main(argv: list[str]) -> int:
    """Run every zoo model (or those whose names contain an argument), print the table and with
    --write store it in zoo_table.md (docs/CONFORMANCE.md includes it); exit 1 if any differs."""
    write = "--write" in argv
    argv = [a for a in argv if a != "--write"]
    names = [n for n in ZOO if not argv or any(a in n for a in argv)]
    rows = []
    with _daemon_client("edge") as client:
        for name in names:
            try:
                row = compare(ZOO[name][0](), name=name, repeats=3, client=client)
            except Exception as e:  # noqa: BLE001 -- a builder or oracle failure is a row too
                row = {"model": name, "match": False, "error": f"{type(e).__name__}: {e}"[:200], "worst": None,
                       "compile_s": None, "npud_ms": None, "device_ms": None, "ort_ms": None, "macs": 0,
                       "npu_mac_share": None, "run_ms": None}
            rows.append(row)
            print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows))
    print(summary(rows))
    if write:
        with open(TABLE, "w") as f:
            f.write(table(rows) + "\n\n" + summary(rows) + "\n")
    return 0 if all(r["match"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
