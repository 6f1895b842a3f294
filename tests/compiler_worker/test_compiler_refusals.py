"""Refusals reached only by unusual models: each one a CompileError naming the node, with a reason
that says what to change."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from npud.compiler_worker import CompileError, check_model, compile_model
from npud.emulator.config import make_config

CFG = make_config("edge")


def _model(nodes, inputs, outputs, inits=(), opset=13, domains=()):
    g = helper.make_graph(nodes, "m", inputs, outputs, list(inits))
    imports = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(g, opset_imports=imports).SerializeToString()


def vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def refusal(model, cfg=CFG) -> CompileError:
    with pytest.raises(CompileError) as info:
        compile_model(model, cfg)
    return info.value


def test_reflect_pad_as_wide_as_the_dimension():
    pads = numpy_helper.from_array(np.array([0, 0, 0, 4, 0, 0, 0, 0], np.int64), "pads")
    model = _model([helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect", name="pad")],
                   [vi("x", [1, 1, 4, 4])], [vi("y", [1, 1, 4, 8])], [pads])
    err = refusal(model)
    assert err.node == "pad" and "smaller than the padded dimension (4)" in err.reason


def test_pad_mode_it_cannot_lower():
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    model = _model([helper.make_node("Pad", ["x", "pads"], ["y"], mode="wrap", name="pad")],
                   [vi("x", [1, 1, 4, 4])], [vi("y", [1, 1, 6, 6])], [pads], opset=19)
    err = refusal(model)
    assert err.node == "pad" and "Pad mode 'wrap' is not supported (supported: constant, reflect, edge)" in err.reason


def test_pad_with_run_time_pads():
    model = _model([helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect", name="pad")],
                   [vi("x", [1, 1, 4, 4]), vi("pads", [8], TensorProto.INT64)], [vi("y", None)])
    assert [(p.node, p.reason) for p in check_model(model, CFG)] == [
        ("pad", "parameter(s) pads must be constant (dynamic shapes are not supported)")]


def test_conv1d_with_auto_pad():
    w = numpy_helper.from_array(np.ones((2, 1, 3), np.float32), "w")
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", name="conv")],
                   [vi("x", [1, 1, 8])], [vi("y", [1, 2, 8])], [w])
    err = refusal(model)
    assert err.node == "conv" and "auto_pad='SAME_UPPER' is not supported (give pads)" in err.reason


def test_if_with_a_multi_element_condition():
    cond = numpy_helper.from_array(np.array([True, False]), "cond")
    def branch(name, op):
        return helper.make_graph([helper.make_node(op, ["x"], [f"{name}_out"])], name, [], [vi(f"{name}_out", [2])])
    model = _model([helper.make_node("If", ["cond"], ["y"], name="choose", then_branch=branch("then", "Relu"),
                                     else_branch=branch("else", "Neg"))],
                   [vi("x", [2])], [vi("y", [2])], [cond])
    err = refusal(model)
    assert err.node == "choose" and "If condition has 2 elements; it must have exactly one" in err.reason


def test_gathered_row_larger_than_sram():
    # one embedding row of 128 Ki float32 = 512 KiB > the edge preset's 256 KiB of SRAM
    table = numpy_helper.from_array(np.zeros((4, 128 * 1024), np.float32), "table")
    model = _model([helper.make_node("Gather", ["table", "ids"], ["y"], name="lookup")],
                   [vi("ids", [3], TensorProto.INT64)], [vi("y", [3, 128 * 1024])], [table])
    err = refusal(model)
    assert "gathered row of 131072 elements does not fit SRAM (262144 bytes)" in err.reason


def _qlinear_conv(**attrs):
    def q(name, value, dtype=np.uint8):
        return numpy_helper.from_array(np.array(value, dtype), name)
    inits = [q("s", 0.1, np.float32), q("z", 128), q("ws", 0.05, np.float32), q("wz", 0, np.int8),
             q("w", np.arange(6).reshape(2, 3, 1, 1) - 3, np.int8)]
    node = helper.make_node("QLinearConv", ["x", "s", "z", "w", "ws", "wz", "s", "z"], ["y"], name="qconv", **attrs)
    return _model([node], [vi("x", [1, 3, 4, 4], TensorProto.UINT8)], [vi("y", [1, 2, 4, 4], TensorProto.UINT8)],
                  inits, domains=("com.microsoft",))


def test_qoperator_channels_last():
    err = refusal(_qlinear_conv(domain="com.microsoft", channels_last=1))
    assert err.node == "qconv" and "channels_last=1 is not supported (NCHW only)" in err.reason
    pool = helper.make_node("QLinearGlobalAveragePool", ["x", "s", "z", "s", "z"], ["y"], name="qpool",
                            domain="com.microsoft", channels_last=1)
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z")]
    err = refusal(_model([pool], [vi("x", [1, 4, 4, 3], TensorProto.UINT8)], [vi("y", None, TensorProto.UINT8)], inits,
                         domains=("com.microsoft",)))
    assert err.node == "qpool" and "channels_last=1 is not supported (NCHW only)" in err.reason


def test_com_microsoft_qlinearconv_in_nchw_is_the_default_op():
    """onnxruntime's contrib QLinearConv with channels_last=0 means what the default-domain op does
    (it was refused with "output quantised type float64")."""
    from npud.executable import Executable

    ms = Executable.from_bytes(compile_model(_qlinear_conv(domain="com.microsoft"), CFG).to_bytes())
    default = Executable.from_bytes(compile_model(_qlinear_conv(), CFG).to_bytes())
    assert ms.stream == default.stream and ms.weights == default.weights
