"""ONNX models built with onnx.helper for the compiler tests (random weights)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


class Builder:
    def __init__(self, seed=0, opset=13):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.inputs = [], [], []
        self.opset = opset
        self.n = 0

    def name(self, base):
        self.n += 1
        return f"{base}{self.n}"

    def const(self, shape, scale=None, positive=False, value=None):
        nm = self.name("c")
        if value is None:
            fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            s = scale if scale is not None else 1.0 / np.sqrt(max(fan, 1))
            value = self.rng.standard_normal(shape).astype(np.float32) * np.float32(s)
            if positive:
                value = np.abs(value) + np.float32(0.5)
        self.inits.append(numpy_helper.from_array(np.asarray(value), nm))
        return nm

    def input(self, name, shape):
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        return name

    def op(self, op, inputs, n_out=1, name=None, **attrs):
        name = name or self.name(op.lower())
        outs = [f"{name}_o{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, cin, cout, k, stride=1, pad=None, group=1, bias=True, bn=False, relu=False,
             name=None, dilation=1):
        pad = k // 2 * dilation if pad is None else pad
        pads = pad if isinstance(pad, list) else [pad] * 4
        ins = [x, self.const((cout, cin // group, k, k))]
        if bias:
            ins.append(self.const((cout,), 0.1))
        y = self.op("Conv", ins, name=name, pads=pads, strides=[stride, stride], group=group,
                    kernel_shape=[k, k], dilations=[dilation, dilation])
        if bn:
            y = self.op("BatchNormalization", [y, self.const((cout,), positive=True),
                                               self.const((cout,), 0.1), self.const((cout,), 0.1),
                                               self.const((cout,), positive=True)])
        if relu:
            y = self.op("Relu", [y])
        return y

    def model(self, outputs, ir_version=8):
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        g = helper.make_graph(self.nodes, "test", self.inputs, outs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = ir_version
        return m.SerializeToString()


def resnet(blocks=(3, 4, 6, 3), size=224, width=64, classes=1000, seed=0):
    """ResNet-50-shaped (bottleneck) network; blocks=(3,4,6,3) is ResNet-50."""
    b = Builder(seed)
    x = b.input("x", [1, 3, size, size])
    y = b.conv(x, 3, width, 7, stride=2, pad=3, bias=False, bn=True, relu=True)
    y = b.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = width
    for stage, n in enumerate(blocks):
        mid = width * 2 ** stage
        cout = mid * 4
        for i in range(n):
            stride = 2 if (i == 0 and stage > 0) else 1
            h = b.conv(y, cin, mid, 1, bias=False, bn=True, relu=True)
            h = b.conv(h, mid, mid, 3, stride=stride, bias=False, bn=True, relu=True)
            h = b.conv(h, mid, cout, 1, bias=False, bn=True)
            sc = y if (i > 0) else b.conv(y, cin, cout, 1, stride=stride, pad=0, bias=False, bn=True)
            y = b.op("Relu", [b.op("Add", [h, sc])])
            cin = cout
    y = b.op("GlobalAveragePool", [y])
    y = b.op("Flatten", [y])
    y = b.op("Gemm", [y, b.const((classes, cin)), b.const((classes,), 0.1)], transB=1)
    return b.model([y])


def small_cnn(seed=0):
    b = Builder(seed)
    x = b.input("x", [2, 3, 20, 20])
    y = b.conv(x, 3, 16, 3, bn=True, relu=True)
    y = b.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    y2 = b.conv(y, 16, 16, 3, group=16, relu=True)             # depthwise
    y2 = b.conv(y2, 16, 16, 1, bn=True)
    y = b.op("Relu", [b.op("Add", [y, y2])])
    y = b.op("AveragePool", [y], kernel_shape=[2, 2], strides=[2, 2])
    y = b.op("Flatten", [y])
    y = b.op("Gemm", [y, b.const((64, 16 * 5 * 5)), b.const((64,), 0.1)], transB=1)
    y = b.op("Relu", [y])
    y = b.op("Gemm", [y, b.const((64, 10)), b.const((10,), 0.1)])
    return b.model([b.op("Softmax", [y], axis=1)])


def mlp(seed=0):
    b = Builder(seed)
    x = b.input("x", [4, 32])
    y = b.op("Relu", [b.op("Add", [b.op("MatMul", [x, b.const((32, 64))]), b.const((64,), 0.1)])])
    y = b.op("Tanh", [b.op("Gemm", [y, b.const((64, 48)), b.const((48,), 0.1)])])
    y = b.op("Sigmoid", [b.op("MatMul", [y, b.const((48, 10))])])
    return b.model([y])


def transformer_block(seq=16, d=32, heads=4, seed=0):
    b = Builder(seed, opset=17)
    x = b.input("x", [1, seq, d])
    dh = d // heads

    def proj(t):
        return b.op("Add", [b.op("MatMul", [t, b.const((d, d))]), b.const((d,), 0.1)])

    def split_heads(t):
        t = b.op("Reshape", [t, b.const(None, value=np.array([1, seq, heads, dh], np.int64))])
        return b.op("Transpose", [t], perm=[0, 2, 1, 3])

    ln1 = b.op("LayerNormalization", [x, b.const((d,), positive=True), b.const((d,), 0.1)], axis=-1)
    q, k, v = (split_heads(proj(ln1)) for _ in range(3))
    kt = b.op("Transpose", [k], perm=[0, 1, 3, 2])
    s = b.op("Mul", [b.op("MatMul", [q, kt]), b.const(None, value=np.array(1 / np.sqrt(dh), np.float32))])
    p = b.op("Softmax", [s], axis=-1)
    o = b.op("MatMul", [p, v])
    o = b.op("Transpose", [o], perm=[0, 2, 1, 3])
    o = b.op("Reshape", [o, b.const(None, value=np.array([1, seq, d], np.int64))])
    x2 = b.op("Add", [x, proj(o)])
    ln2 = b.op("LayerNormalization", [x2, b.const((d,), positive=True), b.const((d,), 0.1)], axis=-1)
    h = b.op("Gelu", [b.op("Add", [b.op("MatMul", [ln2, b.const((d, 4 * d))]), b.const((4 * d,), 0.1)])]) \
        if False else b.op("Relu", [b.op("Add", [b.op("MatMul", [ln2, b.const((d, 4 * d))]),
                                                 b.const((4 * d,), 0.1)])])
    h = b.op("Add", [b.op("MatMul", [h, b.const((4 * d, d))]), b.const((d,), 0.1)])
    return b.model([b.op("Add", [x2, h])])


def quantize_qdq(model_bytes, calib, per_channel=True, activation_type="QUInt8",
                 weight_type="QInt8", **extra):
    """QDQ model bytes from onnxruntime.quantization.quantize_static, calibrated
    on `calib` (a list of feed dicts)."""
    import os
    import tempfile

    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        m = onnx.load_from_string(model_bytes)
        onnx.save(m, src)
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=getattr(QuantType, activation_type),
                        weight_type=getattr(QuantType, weight_type), extra_options=extra or None)
        with open(dst, "rb") as f:
            return f.read()
