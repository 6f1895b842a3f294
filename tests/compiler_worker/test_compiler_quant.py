"""Quantised models on the NPU's int8 path, against onnxruntime.

Models are quantised inside the test with onnxruntime.quantization.quantize_static
(QDQ, per-channel weights) and compared with onnxruntime's own run of the QDQ
model: at most one quantisation step apart on >= 99% of outputs, same argmax.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler_testmodels import Builder, mlp, quantize_qdq
from npud.compiler_worker import CompileError, compile_model, run_on_emulator
from npud.emulator.config import make_config


def ort_run(model_bytes, feeds):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def qcnn(seed=0, size=16, bn=False):
    """A small CNN (conv/relu, depthwise, residual add, pools, Gemm) to quantise."""
    b = Builder(seed)
    x = b.input("x", [4, 3, size, size])
    y = b.conv(x, 3, 16, 3, bn=bn, relu=True)
    y = b.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    y2 = b.conv(y, 16, 16, 3, group=16, relu=True)
    y2 = b.conv(y2, 16, 16, 1, bn=bn)
    y = b.op("Relu", [b.op("Add", [y, y2])])
    y = b.conv(y, 16, 32, 3, stride=2, relu=True)
    y = b.op("GlobalAveragePool", [y])
    y = b.op("Flatten", [y])
    y = b.op("Gemm", [y, b.const((10, 32)), b.const((10,), 0.1)], transB=1)
    return b.model([y])


def output_step(model_bytes):
    """Scale of the DequantizeLinear that produces the graph output."""
    m = onnx.load_from_string(model_bytes)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    out = m.graph.output[0].name
    for n in m.graph.node:
        if out in n.output and n.op_type == "DequantizeLinear":
            return float(np.asarray(inits[n.input[1]]).max())
    raise AssertionError("graph output is not dequantised")


def compare(qm, x, preset="edge"):
    cfg = make_config(preset)
    exe = compile_model(qm, cfg)
    ref = ort_run(qm, {"x": x})[0]
    out, stats = run_on_emulator(exe, {"x": x}, cfg)
    got = out[next(iter(out))]
    step = output_step(qm)
    steps = np.abs(got.astype(np.float64) - ref) / step
    within = np.mean(steps <= 1.0 + 1e-6)
    assert within >= 0.99, (within, steps.max())
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))
    return exe, stats, steps


def calib(shape, n=8, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("act", ["QUInt8", "QInt8"])
def test_qdq_cnn_per_channel_matches_onnxruntime(act):
    qm = quantize_qdq(qcnn(), calib((4, 3, 16, 16)), per_channel=True, activation_type=act)
    x = np.random.default_rng(5).standard_normal((4, 3, 16, 16)).astype(np.float32)
    exe, stats, steps = compare(qm, x)
    rows = exe.report().rows
    convs = [r for r in rows if r["op"] == "QLinearConv"]
    assert len(convs) == 4 and all(r["macs"] > 0 for r in convs)
    assert any(r["op"] == "QLinearMatMul" for r in rows)
    assert stats.macs == sum(r["macs"] for r in rows)


def test_qdq_cnn_with_batchnorm_float_islands():
    # BatchNormalization is not folded before quantisation: it stays a float
    # island (DQ -> Mul/Add -> Q) between int8 convolutions
    qm = quantize_qdq(qcnn(bn=True), calib((4, 3, 16, 16)), per_channel=True)
    x = np.random.default_rng(6).standard_normal((4, 3, 16, 16)).astype(np.float32)
    exe, _, _ = compare(qm, x)
    ops = {r["op"] for r in exe.report().rows}
    assert {"QLinearConv", "DequantizeLinear", "QuantizeLinear", "Mul"} <= ops


@pytest.mark.parametrize("per_channel", [True, False])
def test_qdq_mlp_matches_onnxruntime(per_channel):
    qm = quantize_qdq(mlp(), calib((4, 32)), per_channel=per_channel)
    x = np.random.default_rng(7).standard_normal((4, 32)).astype(np.float32)
    exe, _, steps = compare(qm, x)
    assert sum(r["op"] == "QLinearMatMul" for r in exe.report().rows) == 3


def test_int8_model_is_modeled_faster_than_fp32_twin():
    fm = qcnn(size=32)
    qm = quantize_qdq(fm, calib((4, 3, 32, 32)), per_channel=True)
    cfg = make_config("edge")
    x = np.random.default_rng(8).standard_normal((4, 3, 32, 32)).astype(np.float32)
    _, sf = run_on_emulator(compile_model(fm, cfg), {"x": x}, cfg)
    _, sq = run_on_emulator(compile_model(qm, cfg), {"x": x}, cfg)
    assert sq.engine_busy["mac"] * 2 < sf.engine_busy["mac"]
    assert sq.cycles < sf.cycles


# --- hand-built graphs: exactness, Relu folding, integer ops ------------------------------
def _qdq_conv_model(x_dtype=TensorProto.INT8, y_zp=-10, relu=True, per_channel=True, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (8, 4, 3, 3)).astype(np.int8)
    ws = (rng.random(8).astype(np.float32) * 0.01 + 0.001) if per_channel \
        else np.array(0.004, np.float32)
    b = rng.integers(-2000, 2000, 8).astype(np.int32)
    xs, ys = np.float32(0.05), np.float32(0.1)
    xz = np.array(3 if x_dtype == TensorProto.INT8 else 130,
                  np.int8 if x_dtype == TensorProto.INT8 else np.uint8)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(ws, "ws"),
             numpy_helper.from_array(np.zeros(8 if per_channel else (), np.int8), "wz"),
             numpy_helper.from_array(b, "b"), numpy_helper.from_array(xs * ws, "bs"),
             numpy_helper.from_array(np.array(xs), "xs"), numpy_helper.from_array(xz, "xz"),
             numpy_helper.from_array(np.array(ys), "ys"),
             numpy_helper.from_array(np.array(y_zp, np.int8), "yz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("DequantizeLinear", ["b", "bs"], ["bd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[1, 1, 1, 1])]
    last = "c"
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["r"]))
        last = "r"
    nodes += [helper.make_node("QuantizeLinear", [last, "ys", "yz"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    g = helper.make_graph(nodes, "qconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [2, 4, 9, 9])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


@pytest.mark.parametrize("x_dtype", [TensorProto.INT8, TensorProto.UINT8])
@pytest.mark.parametrize("relu", [True, False])
def test_qdq_conv_relu_folded_into_requant(x_dtype, relu):
    qm = _qdq_conv_model(x_dtype=x_dtype, relu=relu)
    cfg = make_config("edge")
    exe = compile_model(qm, cfg)
    rows = exe.report().rows
    assert [r["op"] for r in rows if r["macs"]] == ["QLinearConv"]
    assert not any(r["op"] == "Relu" for r in rows)          # folded into requant's lo bound
    x = np.random.default_rng(3).standard_normal((2, 4, 9, 9)).astype(np.float32) * 3
    got = run_on_emulator(exe, {"x": x}, cfg)[0]["y"]
    ref = ort_run(qm, {"x": x})[0]
    steps = np.rint(np.abs(got - ref) / np.float32(0.1))
    assert steps.max() <= 1 and np.mean(steps == 0) >= 0.99
    if relu:
        assert got.min() >= 0.0


def test_int8_conv_accumulation_is_exact_for_long_k():
    # K = 3*3*256 = 2304 > 514: the emulator's exact chunking, uint8 x int8
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (4, 256, 3, 3)).astype(np.uint8)
    nodes = [helper.make_node("ConvInteger", ["x", "w", "xz"], ["y"], pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "ci", [helper.make_tensor_value_info("x", TensorProto.UINT8,
                                                                      [1, 256, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
                          [numpy_helper.from_array(w, "w"),
                           numpy_helper.from_array(np.array(7, np.uint8), "xz")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    x = rng.integers(0, 256, (1, 256, 5, 5)).astype(np.uint8)
    cfg = make_config("edge")
    got = run_on_emulator(compile_model(m, cfg), {"x": x}, cfg)[0]["y"]
    ref = ort_run(m, {"x": x})[0]
    assert got.dtype == np.int32     # an int32 output is int32 in the I/O table: exact, not rounded to float32
    np.testing.assert_array_equal(got, ref)


# --- bad quantisation parameters are compile errors --------------------------------------------
def _dq_model(scale, zp, axis=1, shape=(1, 3, 2, 2), zp_type=np.uint8):
    inits = [numpy_helper.from_array(np.asarray(scale, np.float32), "s")]
    ins = ["x", "s"]
    if zp is not None:
        inits.append(numpy_helper.from_array(np.asarray(zp, zp_type), "z"))
        ins.append("z")
    g = helper.make_graph([helper.make_node("DequantizeLinear", ins, ["y"], axis=axis)], "dq",
                          [helper.make_tensor_value_info("x", TensorProto.UINT8, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("scale, zp, axis, zp_type, match", [
    (0.0, 0, 1, np.uint8, "scale 0.0 is invalid"),
    (-0.5, 0, 1, np.uint8, "scale -0.5 is invalid"),
    ([0.1, 0.0, 0.2], [0, 0, 0], 1, np.uint8, "scale 0.0 is invalid"),
    (0.1, 300, 1, np.int32, "zero point 300 is out of range for uint8"),
    (0.1, -1, 1, np.int32, "zero point -1 is out of range for uint8"),
    (0.1, 3, 1, np.int8, "zero point has type int8, expected uint8"),
    ([0.1, 0.2], [0, 0], 1, np.uint8, "mismatched axis"),
    ([0.1, 0.2, 0.3], [0, 0, 0], 2, np.uint8, "mismatched axis"),
    ([0.1, 0.2, 0.3], [0, 0, 0], 7, np.uint8, "mismatched axis"),
])
def test_bad_quantisation_parameters_are_compile_errors(scale, zp, axis, zp_type, match):
    m = _dq_model(scale, zp, axis, zp_type=zp_type)
    with pytest.raises(CompileError, match=match) as e:
        compile_model(m.SerializeToString(checks=False) if False else m.SerializeToString(),
                      make_config("edge"))
    assert e.value.op == "DequantizeLinear"


def test_bad_qdq_conv_weight_scale_is_a_compile_error():
    m = onnx.load_from_string(_qdq_conv_model())
    for init in m.graph.initializer:
        if init.name == "ws":
            v = numpy_helper.to_array(init).copy()
            v[3] = -v[3]
            init.CopyFrom(numpy_helper.from_array(v, "ws"))
    with pytest.raises(CompileError, match="weight scale .* is invalid"):
        compile_model(m.SerializeToString(), make_config("edge"))
