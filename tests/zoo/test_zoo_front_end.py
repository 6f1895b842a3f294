"""QOperator int8 models (com.microsoft QLinearAdd/QLinearConcat/QLinearGlobalAveragePool/QGemm
next to QLinearConv), 1-D convolutions and transposed convolutions, and reflect/edge Pad compile
and match onnxruntime."""

import onnx
import pytest

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
