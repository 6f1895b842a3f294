"""Refusals: every one a CompileError with a clear reason (and node/op when there is one)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from compiler_testmodels import Builder
from npud.compiler_worker import CompileError, check_model, compile_model
from npud.emulator.config import make_config

CFG = make_config("edge")


def _model(nodes, inputs, outputs, inits=(), opset=13):
    g = helper.make_graph(nodes, "m", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()


def vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_unsupported_op_names_node_and_op():
    b = Builder()
    x = b.input("x", [2, 3])
    y = b.op("Relu", [x])
    z = b.op("Celu", [y], name="my_celu")
    w = b.op("Det", [b.op("Reshape", [z, b.const(None, value=np.array([1, 1, 6], np.int64))])], name="det")
    mb = b.model([w])
    with pytest.raises(CompileError) as ei:
        compile_model(mb, CFG)
    e = ei.value
    assert e.node == "my_celu" and e.op == "Celu" and "not supported" in e.reason
    assert str(e).startswith("node 'my_celu' (Celu): ")
    errs = check_model(mb, CFG)
    assert [(x.node, x.op) for x in errs] == [("my_celu", "Celu"), ("det", "Det")]


def test_check_model_clean_model_has_no_errors():
    b = Builder()
    x = b.input("x", [2, 3])
    assert check_model(b.model([b.op("Relu", [x])]), CFG) == []


@pytest.mark.parametrize("data", [b"", b"not a model at all \xff\xfe", b"\x08" * 7])
def test_malformed_bytes(data):
    with pytest.raises(CompileError, match="malformed|opset|no nodes"):
        compile_model(data, CFG)
    assert len(check_model(data, CFG)) == 1


def test_not_bytes():
    with pytest.raises(CompileError, match="bytes"):
        compile_model("model.onnx", CFG)


def test_cyclic_graph():
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="n1"),
             helper.make_node("Relu", ["a"], ["b"], name="n2")]
    mb = _model(nodes, [vi("x", [2])], [vi("b", [2])])
    with pytest.raises(CompileError, match="cycle"):
        compile_model(mb, CFG)


def test_absurd_shapes():
    mb = _model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [1 << 20, 1 << 20])], [vi("y", None)])
    with pytest.raises(CompileError, match="absurd"):
        compile_model(mb, CFG)
    shape = helper.make_tensor("s", TensorProto.INT64, [3], [1 << 20, 1 << 20, 1 << 10])
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["c"], name="cos"),
             helper.make_node("Add", ["x", "c"], ["y"])]
    mb = _model(nodes, [vi("x", [1])], [vi("y", None)], inits=[shape])
    with pytest.raises(CompileError, match="absurd") as ei:
        compile_model(mb, CFG)
    assert ei.value.node == "cos"


def test_unsupported_opset_and_dangling_input():
    mb = _model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", None)], opset=99)
    with pytest.raises(CompileError, match="opset 99"):
        compile_model(mb, CFG)
    mb = _model([helper.make_node("Add", ["x", "ghost"], ["y"], name="add")], [vi("x", [2])], [vi("y", None)])
    with pytest.raises(CompileError, match="ghost") as ei:
        compile_model(mb, CFG)
    assert ei.value.node == "add"


def test_dynamic_reshape_and_int_input_are_refused():
    nodes = [helper.make_node("Reshape", ["x", "s"], ["y"], name="dyn")]
    mb = _model(nodes, [vi("x", [2, 3]), helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
                [vi("y", None)])
    errs = check_model(mb, CFG)
    assert errs and any(e.node == "dyn" for e in errs)


def test_unsupported_attribute():
    b = Builder()
    x = b.input("x", [1, 2, 6, 6])
    y = b.op("MaxPool", [x], name="mp", kernel_shape=[2, 2], dilations=[2, 2])
    with pytest.raises(CompileError, match="dilations") as ei:
        compile_model(b.model([y]), CFG)
    assert (ei.value.node, ei.value.op) == ("mp", "MaxPool")


def test_unknown_option():
    b = Builder()
    x = b.input("x", [2])
    with pytest.raises(CompileError, match="unknown compile option"):
        compile_model(b.model([b.op("Relu", [x])]), CFG, {"bogus": 1})


def test_symbolic_batch_dim_and_input_shapes_option():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    mb = _model(nodes, [vi("x", ["N", 3])], [vi("y", None)])
    exe = compile_model(mb, CFG)
    assert exe.inputs[0]["shape"] == [1, 3]
    exe = compile_model(mb, CFG, {"input_shapes": {"x": [4, 3]}})
    assert exe.inputs[0]["shape"] == [4, 3] and exe.outputs[0]["shape"] == [4, 3]


def test_an_empty_graph_output_left_by_folding_is_a_compile_error_not_a_crash():
    # Shape with start > end folds to an empty constant output.
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["y"], start=3, end=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    with pytest.raises(CompileError, match="graph output 'y' is empty"):
        compile_model(model.SerializeToString(), make_config("edge"))
