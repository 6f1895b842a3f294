"""QOperator int8 models (com.microsoft QLinearAdd/QLinearConcat/QLinearGlobalAveragePool/QGemm
next to QLinearConv), 1-D convolutions and transposed convolutions, and reflect/edge Pad compile
and match onnxruntime."""

import onnx
import pytest
from onnx import TensorProto, helper

from npud.compiler_worker import CompileError, compile_model
from npud.emulator.config import make_config
from zoo_models import audio_conv1d, audio_decoder1d, compare, pad_modes_2d, qcnn_float, quantize


def test_qoperator_model_compiles_on_the_int8_paths_and_matches():
    qm = quantize(qcnn_float(), "qop")
    ops = {(n.domain, n.op_type) for n in onnx.load_from_string(qm).graph.node}
    assert {("com.microsoft", "QLinearAdd"), ("com.microsoft", "QLinearConcat"),
            ("com.microsoft", "QLinearGlobalAveragePool"), ("com.microsoft", "QGemm")} <= ops
    row = compare(qm)
    assert row["match"], row
    # the adds and the Gemm run on the int8 paths QDQ models use, not dequantised to float
    assert {"conv", "qbinary", "qmatmul"} <= row["kinds"]


@pytest.mark.parametrize("build", [audio_conv1d, audio_decoder1d, pad_modes_2d])
def test_conv1d_convtranspose1d_and_border_pads_match(build):
    row = compare(build())
    assert row["match"], row


@pytest.mark.parametrize("form", ["qdq", "qop"])
def test_quantised_conv1d_runs_on_the_int8_path(form):
    # a QDQ Conv 1-D fused into a QLinearConv with 3-D weights crashed the layout pass (IndexError)
    row = compare(quantize(audio_conv1d(), form))
    assert row["match"], row
    assert "QLinearConv" in row["ops"] and "Conv" not in row["ops"], row


def test_an_unknown_com_microsoft_op_is_named_not_a_shape_inference_failure():
    fused = helper.make_node("FusedMatMul", ["a", "b"], ["y"], domain="com.microsoft", transB=1, name="fmm")
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["a"]), fused], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [4, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(CompileError, match="domain 'com.microsoft' is not supported") as ei:
        compile_model(m.SerializeToString(), make_config("edge"))
    assert (ei.value.node, ei.value.op) == ("fmm", "FusedMatMul")
