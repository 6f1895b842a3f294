"""Malformed models (issue #9, found by the onnx fuzz target): each fault class is a
CompileError naming the node, its op and what is wrong -- never a Python exception reaching
the worker's catch-all.

Structural faults (input/output counts, empty names, attribute types, element types, text
that is not UTF-8) are refused by the importer; shape and attribute rules of single ops
(Conv weights and bias, Gemm/MatMul dimensions, broadcasting, axes) by legalisation.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from npud.compiler_worker import CompileError, check_model, compile_model
from npud.compiler_worker.worker import handle
from npud.emulator.config import make_config

CFG = make_config("edge")


def vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def const(name, shape):
    return numpy_helper.from_array(np.full(shape, 0.5, np.float32), name)


def model(nodes, inputs, outputs, inits=(), opset=13) -> bytes:
    g = helper.make_graph(nodes, "m", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()


def refused(mb: bytes, node=None, op=None) -> CompileError:
    """The CompileError compiling `mb` raises, checked to name `node` and `op`; check_model and
    the worker agree (a compile error reply, not the catch-all's "cannot compile this model")."""
    with pytest.raises(CompileError) as ei:
        compile_model(mb, CFG)
    e = ei.value
    assert (e.node, e.op) == (node, op), str(e)
    if node is not None:
        assert str(e).startswith(f"node {node!r} ({op}): ")
    assert [str(x) for x in check_model(mb, CFG)][:1] == [CompileError.__str__(e)]
    reply = handle({"id": 1, "op": "compile", "model": mb, "config": CFG.to_dict(), "options": {}})
    assert reply["ok"] is False and reply["error"]["message"].startswith("compile error: "), reply
    return e


def cnn(conv_inputs=("x", "w", "b"), w_shape=(4, 3, 3, 3), b_shape=(4,), x_shape=(1, 3, 8, 8),
        **conv_attrs) -> bytes:
    """x -> Conv('conv3') -> Relu -> y, with the given weight and bias shapes."""
    inits = [const("w", w_shape), const("b", b_shape)]
    nodes = [helper.make_node("Conv", list(conv_inputs), ["c"], name="conv3", **conv_attrs),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return model(nodes, [vi("x", list(x_shape))], [vi("y", None)], inits)


def mlp(gemm_inputs=("x", "w", "c"), x_shape=(2, 16), w_shape=(8, 16), c_shape=(8,), **attrs):
    inits = [const("w", w_shape), const("c", c_shape)]
    nodes = [helper.make_node("Gemm", list(gemm_inputs), ["y"], name="fc", **attrs)]
    return model(nodes, [vi("x", list(x_shape))], [vi("y", None)], inits)


def test_the_helpers_build_valid_models():
    compile_model(cnn(), CFG)
    compile_model(mlp(transB=1), CFG)


# --- import: graph structure ------------------------------------------------------------------

def test_too_few_inputs_names_the_schema():
    """Was IndexError: list index out of range (lower_gemm, fuse_epilogues)."""
    e = refused(mlp(gemm_inputs=("x",), transB=1), "fc", "Gemm")
    assert "has 1 input(s); Gemm-13 takes 2 to 3 input(s) (A, B, [C])" in e.reason
    e = refused(cnn(conv_inputs=("x",)), "conv3", "Conv")
    assert "has 1 input(s)" in e.reason and "(X, W, [B])" in e.reason


def test_too_many_outputs():
    mb = model([helper.make_node("Relu", ["x"], ["y", "z"], name="r")], [vi("x", [4])],
               [vi("y", None)])
    assert "has 2 output(s); Relu-" in refused(mb, "r", "Relu").reason


@pytest.mark.parametrize("build, node, op, which", [
    (lambda: mlp(gemm_inputs=("x", "", "c"), transB=1), "fc", "Gemm", "input 1 (B)"),
    (lambda: cnn(conv_inputs=("x", "", "b")), "conv3", "Conv", "input 1 (W)"),
    (lambda: model([helper.make_node("Add", ["x", ""], ["y"], name="add")], [vi("x", [4])],
                   [vi("y", None)]), "add", "Add", "input 1 (B)"),
])
def test_an_empty_required_input_name(build, node, op, which):
    """Was KeyError: '' (lower_gemm, fuse_epilogues): '' means "omitted", only for optional inputs."""
    e = refused(build(), node, op)
    assert f"{which} has an empty name" in e.reason and "is required" in e.reason


def test_an_omitted_optional_input_is_fine():
    compile_model(cnn(conv_inputs=("x", "w", "")), CFG)


def test_an_attribute_without_a_type():
    """Was TypeError: unsupported operand type(s) for %: 'NoneType' and 'int' (layout._softmax):
    an attribute whose type field is unset reads as None."""
    node = helper.make_node("Softmax", ["x"], ["y"], name="sm")
    node.attribute.add(name="axis", i=1)          # type left UNDEFINED
    e = refused(model([node], [vi("x", [4, 16])], [vi("y", None)]), "sm", "Softmax")
    assert e.reason == "attribute 'axis' has type UNDEFINED; Softmax expects INT"


def test_an_attribute_of_the_wrong_type():
    e = refused(cnn(group=1.0), "conv3", "Conv")
    assert e.reason == "attribute 'group' has type FLOAT; Conv expects INT"


def test_an_unknown_attribute():
    mb = model([helper.make_node("Relu", ["x"], ["y"], name="r", alpha=0.1)], [vi("x", [4])],
               [vi("y", None)])
    assert refused(mb, "r", "Relu").reason == "attribute 'alpha' is not defined for Relu-13"


def test_a_missing_required_attribute():
    mb = model([helper.make_node("MaxPool", ["x"], ["y"], name="pool")], [vi("x", [1, 3, 8, 8])],
               [vi("y", None)])
    assert refused(mb, "pool", "MaxPool").reason == "required attribute 'kernel_shape' is missing"


def test_an_unknown_element_type():
    """Was KeyError: 33 (numpy_ops.onnx_dtype_to_np)."""
    mb = model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [4], elem=33)], [vi("y", None)])
    e = refused(mb)
    assert e.reason == "graph input 'x' has unknown or unsupported element type 33"
    mb = model([helper.make_node("Cast", ["x"], ["y"], name="cast", to=33)], [vi("x", [4])],
               [vi("y", None)])
    assert refused(mb, "cast", "Cast").reason == "attribute to=33 is not an ONNX element type"


def test_a_graph_input_without_element_type():
    mb = model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [4], elem=0)], [vi("y", None)])
    assert refused(mb).reason == "graph input 'x' has no element type"


@pytest.mark.parametrize("data_type, reason", [
    (TensorProto.FLOAT, "malformed model: initializer 'w' has dims [8, 16] (128 values) but its "
                        "data is 256 bytes of float32"),
    (TensorProto.FLOAT8E4M3FN, "malformed model: initializer 'w' has dims [8, 16] (128 values) but "
                               "its data is 256 bytes of float8_e4m3fn"),
])
def test_initializer_data_that_does_not_fill_its_dims(data_type, reason):
    """Was numpy's "cannot reshape array of size N into shape ..." inside onnx's decoder."""
    init = numpy_helper.from_array(np.zeros((4, 16), np.float32), "w")
    init.dims[0] = 8
    init.data_type = data_type
    mb = model([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)],
               [vi("x", [2, 16])], [vi("y", None)], [init])
    assert refused(mb).reason == reason


@pytest.mark.parametrize("good, bad, what", [
    (b"Softmax", b"Sof\x80\x00ax", "node 2's op type"),
    (b"\x12\x01s", b"\x12\x01\xff", "node 0's output 0"),
])
def test_text_that_is_not_utf8(good, bad, what):
    """protobuf hands invalid UTF-8 strings over as bytes, which crashed onnx.defs and dict keys."""
    nodes = [helper.make_node("Add", ["x", "b"], ["s"]), helper.make_node("Tanh", ["s"], ["t"]),
             helper.make_node("Softmax", ["t"], ["y"], axis=-1)]
    mb = model(nodes, [vi("x", [4, 16])], [vi("y", None)], [const("b", (16,))])
    assert mb.count(good) == 1
    e = refused(mb.replace(good, bad))
    assert e.reason.startswith(f"malformed model: {what} is not valid UTF-8")


def test_an_empty_graph_input_name():
    mb = model([helper.make_node("Relu", [""], ["y"], name="r")], [vi("", [4])], [vi("y", None)])
    assert refused(mb).reason == "malformed model: graph input 0 has an empty name"


# --- legalisation: per-op shape and attribute rules ---------------------------------------------

def test_conv_bias_of_the_wrong_length():
    """Was ValueError: cannot reshape array of size 108 into shape (4,) (layout._conv)."""
    e = refused(cnn(conv_inputs=("x", "w", "w")), "conv3", "Conv")
    assert e.reason == "bias 'w' has shape [4, 3, 3, 3]; Conv needs a 1-D bias of 4 (M) values"
    e = refused(cnn(b_shape=(5,)), "conv3", "Conv")
    assert "bias 'b' has shape [5]" in e.reason


def test_conv_weights_of_the_wrong_rank_or_channels():
    e = refused(cnn(w_shape=(4, 3, 3)), "conv3", "Conv")
    assert e.reason.startswith("input 'w' has rank 3, Conv of a rank-4 input needs rank-4 weights")
    e = refused(cnn(x_shape=(1, 5, 8, 8)), "conv3", "Conv")
    assert e.reason == ("weights 'w' [4, 3, 3, 3] expect 3 input channels (C/group=3, group=1) "
                        "but input 'x' [1, 5, 8, 8] has 5")
    e = refused(cnn(x_shape=(1, 6, 8, 8), group=4), "conv3", "Conv")
    assert "group=4 must be positive and divide the input channels (6)" in e.reason


def test_conv_attributes_that_do_not_fit_the_weights():
    assert "kernel_shape [2, 2] does not match the weights' spatial shape [3, 3]" in \
        refused(cnn(kernel_shape=[2, 2]), "conv3", "Conv").reason
    assert "strides [0, 1] must have 2 positive entries" in \
        refused(cnn(strides=[0, 1]), "conv3", "Conv").reason


def test_batchnorm_after_conv_with_parameters_of_the_wrong_length():
    """Folding the BatchNormalization into the Conv would broadcast 5 scales over 4 channels."""
    inits = [const("w", (4, 3, 3, 3)), const("s", (4,)), const("s5", (5,))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s5", "s", "s", "s"], ["y"], name="bn")]
    e = refused(model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", None)], inits),
                "bn", "BatchNormalization")
    assert e.reason == "scale 's5' has shape [5]; needs 4 values (C)"


def test_gemm_bias_that_does_not_broadcast():
    """Was ValueError: axes don't match array (layout.get of the lowered bias Add)."""
    e = refused(mlp(c_shape=(8, 3, 3, 3), transB=1), "fc", "Gemm")
    assert e.reason == "bias C 'c' [8, 3, 3, 3] does not broadcast to the output [2, 8]"


def test_gemm_and_matmul_inner_dimensions():
    e = refused(mlp(), "fc", "Gemm")       # B is [8, 16] without transB: K 16 vs 8
    assert e.reason.startswith("inner dimensions differ: A 'x' [2, 16] (transA=0) gives K=16, "
                               "B 'w' [8, 16] (transB=0) gives K=8")
    mb = model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", [2, 16])],
               [vi("y", None)], [const("w", (17, 3))])
    assert refused(mb, "mm", "MatMul").reason == \
        "inner dimensions differ: input 'x' [2, 16] has K=16, input 'w' [17, 3] has K=17"


def test_elementwise_operands_that_do_not_broadcast():
    mb = model([helper.make_node("Add", ["x", "b"], ["y"], name="add")], [vi("x", [4, 16])],
               [vi("y", None)], [const("b", (17,))])
    assert refused(mb, "add", "Add").reason == ("input 'x' [4, 16] and input 'b' [17] cannot be "
                                                "broadcast together (dimension -1: 16 vs 17)")


@pytest.mark.parametrize("op, attrs, reason", [
    ("Softmax", {"axis": 2}, "attribute axis=2 is out of range for input 'x' [4, 16] (valid: -2..1)"),
    ("Flatten", {"axis": -3}, "attribute axis=-3 is out of range for input 'x' [4, 16] (valid: -2..2)"),
    ("Transpose", {"perm": [0, 0]}, "perm [0, 0] is not a permutation of the 2 axes of input 'x' [4, 16]"),
])
def test_axes_out_of_range(op, attrs, reason):
    mb = model([helper.make_node(op, ["x"], ["y"], name="n", **attrs)], [vi("x", [4, 16])],
               [vi("y", None)])
    assert refused(mb, "n", op).reason == reason


def test_concat_inputs_that_disagree_off_the_axis():
    mb = model([helper.make_node("Concat", ["x", "b"], ["y"], name="cat", axis=0)],
               [vi("x", [4, 16])], [vi("y", None)], [const("b", (2, 15))])
    assert refused(mb, "cat", "Concat").reason == \
        "input 'b' [2, 15] does not match input 'x' [4, 16] outside the concatenation axis 0"


def test_a_reshape_that_changes_the_number_of_values():
    """Non-strict shape inference takes the requested shape as given: this compiled, to an
    alias whose output region was smaller than its input."""
    mb = model([helper.make_node("Reshape", ["x", "s"], ["y"], name="rs")], [vi("x", [4, 16])],
               [vi("y", None)], [numpy_helper.from_array(np.array([5, 5], np.int64), "s")])
    assert refused(mb, "rs", "Reshape").reason == \
        "cannot reshape input 'x' [4, 16] (64 values) into [5, 5] (25 values)"


def test_instance_normalization_parameters_of_the_wrong_length():
    """Was ValueError: cannot reshape array of size 3 into shape (4,) (layout._norm)."""
    mb = model([helper.make_node("InstanceNormalization", ["x", "g", "b"], ["y"], name="in")],
               [vi("x", [1, 4, 8, 8])], [vi("y", None)], [const("g", (3,)), const("b", (4,))])
    assert refused(mb, "in", "InstanceNormalization").reason == \
        "scale 'g' has shape [3]; needs 4 values (C)"


def test_an_unresolved_shape_says_why_in_onnx_words():
    mb = model([helper.make_node("Split", ["x", "s"], ["y", "z"], name="sp", axis=1)],
               [vi("x", [4, 16])], [vi("y", None), vi("z", None)],
               [numpy_helper.from_array(np.array([5, 5], np.int64), "s")])
    assert refused(mb, "sp", "Split").reason == (
        "tensor 'y' has no static shape (ONNX shape inference: Mismatch between the sum of "
        "'split' (10) and the split dimension of the input (16))")


def test_the_type_constraints_of_the_schema():
    mb = model([helper.make_node("Reshape", ["x", "s"], ["y"], name="rs")], [vi("x", [4, 16])],
               [vi("y", None)], [const("s", (2,))])
    assert refused(mb, "rs", "Reshape").reason == \
        "input 1 (shape) 's' has type tensor(float); Reshape allows tensor(int64)"
    mb = model([helper.make_node("Add", ["x", "b"], ["y"], name="add")], [vi("x", [4])],
               [vi("y", None)], [numpy_helper.from_array(np.ones(4, np.int64), "b")])
    assert refused(mb, "add", "Add").reason == \
        "inputs 'x' (tensor(float)) and 'b' (tensor(int64)) must have the same type (T)"


def test_conv_transpose_is_reported_as_written_not_as_its_decomposition():
    """Once decomposed it would be a Conv named 'up/Conv1' with a bias named 'up/c_1'."""
    mb = model([helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="up")],
               [vi("x", [1, 4, 8, 8])], [vi("y", None)], [const("w", (4, 2, 3, 3)), const("b", (5,))])
    assert refused(mb, "up", "ConvTranspose").reason == \
        "bias 'b' has shape [5]; ConvTranspose needs a 1-D bias of 2 (M) values"


def test_lrn_size_zero():
    """Was ZeroDivisionError in the LRN decomposition (alpha / size)."""
    mb = model([helper.make_node("LRN", ["x"], ["y"], name="lrn", size=0)], [vi("x", [1, 4, 8, 8])],
               [vi("y", None)])
    assert refused(mb, "lrn", "LRN").reason == "size=0 must be a positive integer"


def test_every_invalid_node_is_listed_by_check_model():
    nodes = [helper.make_node("Add", ["x", "b"], ["s"], name="add"),
             helper.make_node("Softmax", ["x"], ["t"], name="sm", axis=3),
             helper.make_node("Concat", ["s", "t"], ["y"], name="cat", axis=0)]
    mb = model(nodes, [vi("x", [4, 16])], [vi("y", None)], [const("b", (17,))])
    assert [(e.node, e.op) for e in check_model(mb, CFG)] == [("add", "Add"), ("sm", "Softmax")]
