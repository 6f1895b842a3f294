"""QDQ binary ops (DQ, DQ -> Add/Sub/Mul/Max/Min -> [Relu/Clip] -> Q) compile to
the NPU's qbinary: one pass over the int8 tensors instead of a float island.

The fusion must not change a single output bit: every model here is also
compiled with the fusion switched off (the float island: DQ, DQ, op, Q as
separate float commands) and the two results compared exactly, and against
onnxruntime's run of the QDQ model (its own integer kernels: within one step).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from npud.compiler_worker import CompileError, compile_model, run_on_emulator
from npud.compiler_worker.passes import quantize
from npud.emulator.config import make_config
from test_compiler_quant import calib, ort_run, qcnn, quantize_qdq

CFG = make_config("edge")


def run_both(model, feeds, monkeypatch):
    """(fused outputs, island outputs, fused executable)."""
    exe = compile_model(model, CFG)
    fused = run_on_emulator(exe, feeds, CFG)[0]
    with monkeypatch.context() as m:
        m.setattr(quantize, "_fuse_binary", lambda g: None)
        island = run_on_emulator(compile_model(model, CFG), feeds, CFG)[0]
    return fused, island, exe


def kinds(exe):
    return [r["kind"] for r in exe.report().rows]


@pytest.mark.parametrize("act", ["QUInt8", "QInt8"])
def test_qdq_residual_add_is_one_qbinary_and_bit_identical(act, monkeypatch):
    qm = quantize_qdq(qcnn(), calib((4, 3, 16, 16)), per_channel=True, activation_type=act)
    x = np.random.default_rng(5).standard_normal((4, 3, 16, 16)).astype(np.float32)
    fused, island, exe = run_both(qm, {"x": x}, monkeypatch)
    k = kinds(exe)
    assert k.count("qbinary") == 1 and "eltwise" not in k
    # left: the input's Q, GlobalAveragePool's island, the output's DQ
    assert k.count("dequant") == 2 and k.count("quant") == 2
    for name in fused:
        np.testing.assert_array_equal(fused[name], island[name])


def _binary_model(op, act=None, a_dt=TensorProto.UINT8, b_dt=TensorProto.INT8,
                  y_dt=TensorProto.UINT8, b_shape=(1, 6, 1, 1)):
    np_of = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}
    inits = [numpy_helper.from_array(np.array(v, np.float32), n)
             for n, v in (("as", 0.031), ("bs", 0.047), ("ys", 0.055))]
    inits += [numpy_helper.from_array(np.array(z, np_of[t]), n)
              for n, z, t in (("az", 120 if a_dt == TensorProto.UINT8 else -3, a_dt),
                              ("bz", 7 if b_dt == TensorProto.INT8 else 200, b_dt),
                              ("yz", 30 if y_dt == TensorProto.UINT8 else -20, y_dt))]
    if act == "Clip":
        inits += [numpy_helper.from_array(np.array(-1.0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(2.5, np.float32), "hi")]
    nodes = [helper.make_node("QuantizeLinear", ["a", "as", "az"], ["aq"]),
             helper.make_node("DequantizeLinear", ["aq", "as", "az"], ["ad"]),
             helper.make_node("QuantizeLinear", ["b", "bs", "bz"], ["bq"]),
             helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"]),
             helper.make_node(op, ["ad", "bd"], ["s"])]
    last = "s"
    if act:
        nodes.append(helper.make_node(act, ["s"] + (["lo", "hi"] if act == "Clip" else []), ["r"]))
        last = "r"
    nodes += [helper.make_node("QuantizeLinear", [last, "ys", "yz"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    g = helper.make_graph(nodes, "qbin", [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 6, 5, 7]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, list(b_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Max", "Min"])
@pytest.mark.parametrize("act", [None, "Relu", "Clip"])
def test_qdq_binary_ops_fuse_exactly(op, act, monkeypatch):
    m = _binary_model(op, act)
    rng = np.random.default_rng(11)
    feeds = {"a": rng.standard_normal((2, 6, 5, 7)).astype(np.float32) * 3,
             "b": rng.standard_normal((1, 6, 1, 1)).astype(np.float32) * 3}
    fused, island, exe = run_both(m, feeds, monkeypatch)
    assert kinds(exe).count("qbinary") == 1
    assert not {"Relu", "Clip"} & {r["op"] for r in exe.report().rows}
    np.testing.assert_array_equal(fused["y"], island["y"])
    ref = ort_run(m, feeds)[0]
    steps = np.rint(np.abs(fused["y"] - ref) / np.float32(0.055))
    assert steps.max() <= 1


@pytest.mark.parametrize("dts", [(TensorProto.INT8, TensorProto.INT8, TensorProto.INT8),
                                 (TensorProto.UINT8, TensorProto.UINT8, TensorProto.INT8)])
def test_qdq_add_same_shape_other_types(dts, monkeypatch):
    m = _binary_model("Add", "Relu", *dts, b_shape=(2, 6, 5, 7))
    rng = np.random.default_rng(12)
    feeds = {k: rng.standard_normal((2, 6, 5, 7)).astype(np.float32) * 4 for k in "ab"}
    fused, island, exe = run_both(m, feeds, monkeypatch)
    assert kinds(exe).count("qbinary") == 1
    np.testing.assert_array_equal(fused["y"], island["y"])


def test_integer_add_outside_qdq_is_a_compile_error():
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"]),
                           helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT)], "ia",
                          [helper.make_tensor_value_info(n, TensorProto.INT8, [4]) for n in "ab"],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)]).SerializeToString()
    with pytest.raises(CompileError, match="QDQ"):
        compile_model(m, CFG)
