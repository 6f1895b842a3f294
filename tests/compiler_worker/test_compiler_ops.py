"""One model per operator (and per interesting attribute), each compared with onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from compiler_testmodels import Builder
from test_compiler_models import check

R = np.random.default_rng(7)


def single(op, shapes, attrs=None, consts=(), opset=13, extra_inputs=(), n_out=1, positive=False):
    """A model with one `op` node; inputs 'x0'.. of `shapes`, then constant inputs."""
    b = Builder(1, opset=opset)
    ins = [b.input(f"x{i}", list(s)) for i, s in enumerate(shapes)]
    for c in consts:
        ins.append(b.const(None, value=np.asarray(c)) if c is not None else "")
    outs = b.op(op, ins, n_out=n_out, **(attrs or {}))
    outs = outs if isinstance(outs, list) else [outs]
    feeds = {f"x{i}": (np.abs(R.standard_normal(s)) + 0.1 if positive else R.standard_normal(s)).astype(np.float32)
             for i, s in enumerate(shapes)}
    return b.model(outs), feeds


def conv_model(cin, cout, k, stride=1, pads=(1, 1, 1, 1), group=1, dil=1, size=(9, 11), bias=True,
               auto_pad=None):
    b = Builder(2)
    x = b.input("x", [1, cin, *size])
    ins = [x, b.const((cout, cin // group, k, k))]
    if bias:
        ins.append(b.const((cout,), 0.1))
    attrs = dict(strides=[stride, stride], group=group, dilations=[dil, dil], kernel_shape=[k, k])
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads)
    y = b.op("Conv", ins, **attrs)
    return b.model([y]), {"x": R.standard_normal((1, cin, *size)).astype(np.float32)}


CONV_CASES = {
    "plain": dict(cin=4, cout=8, k=3),
    "stride2": dict(cin=4, cout=8, k=3, stride=2),
    "grouped": dict(cin=8, cout=12, k=3, group=4),
    "depthwise": dict(cin=8, cout=8, k=3, group=8),
    "depthwise_mult2": dict(cin=4, cout=8, k=3, group=4),
    "dilated": dict(cin=3, cout=5, k=3, dil=2, pads=(2, 2, 2, 2)),
    "asym_pads": dict(cin=3, cout=6, k=3, pads=(0, 1, 2, 0)),
    "pointwise_stride2": dict(cin=6, cout=10, k=1, stride=2, pads=(0, 0, 0, 0)),
    "no_bias_5x5": dict(cin=3, cout=4, k=5, pads=(2, 2, 2, 2), bias=False),
    "same_upper": dict(cin=3, cout=4, k=3, stride=2, auto_pad="SAME_UPPER", size=(10, 7)),
    "valid": dict(cin=3, cout=4, k=3, auto_pad="VALID"),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv(case):
    mb, feeds = conv_model(**CONV_CASES[case])
    check(mb, feeds)


def test_conv_tiled_big_on_edge():
    # weights 3x3x96x96 fp32 = 331 KB > edge SRAM: output-channel blocks and input-channel chunks
    mb, feeds = conv_model(96, 96, 3, size=(20, 20))
    exe, _ = check(mb, feeds, rtol=1e-3, atol=3e-4)
    conv = [r for r in exe.report().rows if r["op"] == "Conv"][0]
    assert conv["commands"] > 5 and conv["sram_bytes"] <= 256 * 1024


UNARY = ["Relu", "Sigmoid", "Tanh", "Exp", "Neg", "Abs", "Erf", "HardSwish"]


@pytest.mark.parametrize("op", UNARY)
def test_unary(op):
    check(*single(op, [(2, 3, 5, 7)], opset=14))


@pytest.mark.parametrize("op", ["Log", "Sqrt", "Reciprocal"])
def test_unary_positive(op):
    check(*single(op, [(3, 17)], positive=True))


@pytest.mark.parametrize("op,attrs", [("LeakyRelu", {"alpha": 0.2}), ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}),
                                      ("Gelu", {})])
def test_unary_attrs(op, attrs):
    check(*single(op, [(4, 33)], attrs, opset=20 if op == "Gelu" else 13))


def test_clip():
    check(*single("Clip", [(2, 8, 4, 4)], consts=[np.float32(-0.5), np.float32(0.7)]))
    check(*single("Clip", [(2, 8)], consts=[None, np.float32(0.2)]))


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min"])
@pytest.mark.parametrize("shapes", [[(2, 3, 4, 5), (2, 3, 4, 5)], [(2, 3, 4, 5), (3, 1, 1)],
                                    [(2, 1, 4, 1), (1, 3, 1, 5)], [(6,), (2, 3, 6)]])
def test_binary(op, shapes):
    mb, feeds = single(op, shapes)
    if op == "Div":
        feeds["x1"] = np.abs(feeds["x1"]) + np.float32(0.5)
    check(mb, feeds)


def test_binary_constant_operand_and_pow():
    check(*single("Add", [(2, 3, 4)], consts=[np.arange(4, dtype=np.float32)]))
    check(*single("Pow", [(2, 9)], consts=[np.float32(2.0)], positive=True))


def test_variadic_sum_min_max():
    for op in ("Sum", "Min", "Max"):
        check(*single(op, [(2, 5), (2, 5), (1, 5)]))


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[2, 3], strides=[2, 1])),
    ("GlobalAveragePool", {}), ("GlobalMaxPool", {}),
])
def test_pool(op, attrs):
    check(*single(op, [(2, 5, 9, 11)], attrs))


@pytest.mark.parametrize("a,b", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)),
                                 ((2, 1, 3, 4), (1, 5, 4, 2)), ((4,), (4, 3)), ((3, 4), (4,))])
def test_matmul(a, b):
    check(*single("MatMul", [a, b]))


def test_matmul_large_tiled_on_edge():
    check(*single("MatMul", [(100, 300), (300, 260)]), rtol=1e-3, atol=3e-4)


@pytest.mark.parametrize("attrs", [{}, {"transA": 1}, {"transB": 1, "alpha": 0.5, "beta": 2.0}])
def test_gemm(attrs):
    a = (5, 4) if attrs.get("transA") else (4, 5)
    bshape = (6, 5) if attrs.get("transB") else (5, 6)
    b = Builder(3)
    x = b.input("x", list(a))
    y = b.op("Gemm", [x, b.const(bshape), b.const((6,), 0.1)], **attrs)
    check(b.model([y]), {"x": R.standard_normal(a).astype(np.float32)})


def test_batchnorm_standalone():
    b = Builder(4)
    x = b.input("x", [2, 3, 4, 5])
    y = b.op("BatchNormalization", [x, b.const((3,), positive=True), b.const((3,)), b.const((3,)),
                                    b.const((3,), positive=True)], epsilon=1e-3)
    check(b.model([y]), {"x": R.standard_normal((2, 3, 4, 5)).astype(np.float32)})


@pytest.mark.parametrize("op,shape,attrs,consts", [
    ("Flatten", (2, 3, 4), {"axis": 2}, []),
    ("Reshape", (2, 3, 4), {}, [np.array([4, -1], np.int64)]),
    ("Transpose", (2, 3, 4, 5), {"perm": [0, 3, 1, 2]}, []),
    ("Transpose", (2, 3, 4, 5, 2), {"perm": [4, 2, 0, 3, 1]}, []),
    ("Identity", (3, 4), {}, []),
    ("Softmax", (2, 3, 7), {"axis": 1}, []),
    ("Softmax", (2, 3, 7), {}, []),
    ("LogSoftmax", (4, 9), {}, []),
    ("Squeeze", (2, 1, 3), {}, [np.array([1], np.int64)]),
    ("Unsqueeze", (2, 3), {}, [np.array([0, 3], np.int64)]),
    ("Slice", (6, 8), {}, [np.array([1, 2], np.int64), np.array([5, 100], np.int64),
                           np.array([0, 1], np.int64), np.array([2, 3], np.int64)]),
    ("Pad", (2, 3, 4), {}, [np.array([0, 1, 2, 0, 2, 1], np.int64), np.float32(1.5)]),
    ("Gather", (5, 4), {"axis": 0}, [np.array([4, 0, 1, 1], np.int64)]),
    ("Gather", (3, 6), {"axis": 1}, [np.array(2, np.int64)]),
    ("ReduceMean", (2, 3, 4), {"axes": [1], "keepdims": 1}, []),
    ("ReduceSum", (2, 3, 4), {"keepdims": 0}, [np.array([0, 2], np.int64)]),
    ("ReduceMax", (2, 3, 4), {"axes": [2], "keepdims": 0}, []),
    ("ReduceMin", (2, 3, 4), {"axes": [0, 1]}, []),
    ("Expand", (3, 1), {}, [np.array([2, 3, 4], np.int64)]),
    ("Dropout", (3, 4), {}, []),
])
def test_shape_ops(op, shape, attrs, consts):
    check(*single(op, [shape], attrs, consts=consts))


def test_concat_and_split():
    check(*single("Concat", [(2, 3, 4), (2, 5, 4), (2, 1, 4)], {"axis": 1}))
    check(*single("Split", [(2, 9)], {"axis": 1}, consts=[np.array([2, 3, 4], np.int64)], n_out=3))


def test_layernorm_and_instancenorm():
    b = Builder(5, opset=17)
    x = b.input("x", [2, 5, 12])
    y = b.op("LayerNormalization", [x, b.const((12,), positive=True), b.const((12,))], axis=-1, epsilon=1e-5)
    check(b.model([y]), {"x": R.standard_normal((2, 5, 12)).astype(np.float32)})
    b = Builder(6)
    x = b.input("x", [2, 3, 5, 6])
    y = b.op("InstanceNormalization", [x, b.const((3,), positive=True), b.const((3,))])
    check(b.model([y]), {"x": R.standard_normal((2, 3, 5, 6)).astype(np.float32)})


def test_layout_conversions_around_nhwc():
    """conv -> (NHWC) -> Concat/Softmax(axis 1)/ReduceMean/Transpose/Reshape in the ONNX layout."""
    b = Builder(8)
    x = b.input("x", [1, 3, 6, 6])
    c1 = b.conv(x, 3, 4, 3, relu=True)
    c2 = b.conv(x, 3, 2, 1, pad=0)
    cat = b.op("Concat", [c1, c2], axis=1)
    sm = b.op("Softmax", [cat], axis=1)
    rm = b.op("ReduceMean", [sm], axes=[2, 3], keepdims=0)
    tr = b.op("Transpose", [cat], perm=[0, 2, 3, 1])
    rs = b.op("Reshape", [cat, b.const(None, value=np.array([1, -1], np.int64))])
    check(b.model([sm, rm, tr, rs]), {"x": R.standard_normal((1, 3, 6, 6)).astype(np.float32)})


def test_constant_folding_shape_chain():
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape, ConstantOfShape and Constant nodes fold away."""
    b = Builder(9)
    x = b.input("x", [2, 3, 4])
    shp = b.op("Shape", [x])
    d0 = b.op("Gather", [shp, b.const(None, value=np.array(0, np.int64))], axis=0)
    d0u = b.op("Unsqueeze", [d0, b.const(None, value=np.array([0], np.int64))])
    newshape = b.op("Concat", [d0u, b.const(None, value=np.array([-1], np.int64))], axis=0)
    y = b.op("Reshape", [x, newshape])
    cos = b.op("ConstantOfShape", [b.const(None, value=np.array([2, 12], np.int64))],
               value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5]))
    k = b.op("Constant", [], value=helper.make_tensor("k", TensorProto.FLOAT, [], [2.0]))
    z = b.op("Mul", [b.op("Add", [y, cos]), k])
    mb = b.model([z])
    exe, _ = check(mb, {"x": R.standard_normal((2, 3, 4)).astype(np.float32)})
    assert {r["op"] for r in exe.report().rows} <= {"Add", "Mul"}


def test_graph_output_is_input_and_constant():
    b = Builder(10)
    x = b.input("x", [2, 3])
    y = b.op("Identity", [x])
    c = b.op("Identity", [b.const(None, value=np.ones((2, 2), np.float32))])
    check(b.model([y, c]), {"x": R.standard_normal((2, 3)).astype(np.float32)})


def test_opset_11_forms():
    """Attribute forms of old opsets: Squeeze axes, Clip min/max inputs, Softmax coercion."""
    b = Builder(11, opset=11)
    x = b.input("x", [2, 1, 3, 4])
    y = b.op("Squeeze", [x], axes=[1])
    y = b.op("Softmax", [y], axis=1)
    y = b.op("Clip", [y, b.const(None, value=np.float32(0.05)), b.const(None, value=np.float32(0.5))])
    check(b.model([y]), {"x": R.standard_normal((2, 1, 3, 4)).astype(np.float32)})
