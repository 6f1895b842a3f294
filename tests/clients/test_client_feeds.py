"""What a run accepts: feeds are checked (names, shapes, exact dtypes), never converted; the calling
forms of onnxruntime that Model.run does not take are refused with the fix; outputs by name or
position; ``input_shapes=`` that names no input or contradicts a fixed dimension is refused."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper

import npu

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "compiler_worker"))
from compiler_testmodels import mlp  # noqa: E402

X = np.zeros((4, 32), np.float32)


@pytest.fixture
def model(client):
    m = client.load(mlp())
    yield m
    m.unload()


@pytest.mark.parametrize("dtype, ort_name", [(np.float64, "double"), (np.int32, "int32"),
                                             (np.float16, "float16")])
def test_a_wrong_dtype_is_refused_in_onnxruntime_words(model, dtype, ort_name):
    want = f"Unexpected input data type. Actual: (tensor({ort_name})) , expected: (tensor(float))"
    for run in (model.run, lambda feeds: model.execution().run(feeds)):
        with pytest.raises(npu.InvalidArgument) as err:
            run({"x": X.astype(dtype)})
        assert err.value.code == "EINVAL" and not err.value.retryable
        assert want in err.value.message and "'x'" in err.value.message


def test_a_refused_feed_leaves_the_execution_inputs_alone(model):
    with model.execution() as ex:
        ex.inputs["x"][:] = 7.0
        with pytest.raises(npu.InvalidArgument, match="Unexpected input data type"):
            ex.run({"x": np.ones((4, 32), np.float64)})
        assert (ex.inputs["x"] == 7.0).all()
        with pytest.raises(npu.InvalidArgument, match="unknown"):
            ex.run({"x": X, "nope": X})
        assert (ex.inputs["x"] == 7.0).all()


def test_lists_are_refused_with_the_remedy(model):
    with pytest.raises(npu.InvalidArgument, match=r"np.asarray\(x, dtype=np.float32\)"):
        model.run({"x": X.tolist()})


@pytest.mark.parametrize("feeds", [None, [X], (X,), "x", b"x"])
def test_feeds_of_a_wrong_type_are_refused(model, feeds):
    with pytest.raises(npu.InvalidArgument, match="dict by input name"):
        model.run(feeds)


def test_feed_keys_must_be_input_names(model):
    with pytest.raises(npu.InvalidArgument, match="keyed by input name"):
        model.run({0: X})


def test_onnxruntime_calling_form_names_the_fix(model):
    for run in (model.run, model.execution().run):
        with pytest.raises(npu.InvalidArgument, match="InferenceSession") as err:
            run(None, {"x": X})
        assert err.value.code == "EINVAL"
        with pytest.raises(npu.InvalidArgument, match="InferenceSession"):
            run(["y"], {"x": X})


def test_outputs_by_name_or_position(model):
    out = model.run(X)
    name = model.outputs[0].name
    assert out[0] is out[name] and out[-1] is out[name]
    with pytest.raises(IndexError, match="outputs"):
        out[1]
    with pytest.raises(KeyError, match=name):
        out["not_an_output"]
    with model.execution() as ex:
        views = ex.run(X)
        assert views[0] is ex.outputs[name]


def _symbolic_relu():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_input_shapes_for_a_symbolic_dimension(client):
    m = client.load(_symbolic_relu(), input_shapes={"x": [5, 3]})
    assert m.inputs[0].shape == (5, 3)


@pytest.mark.parametrize("shapes, match", [({"X": [5, 3]}, r"\['X'\].*not inputs.*\['x'\]"),
                                           ({"x": [5, 4]}, r"contradicts its declared shape \['N', 3\]"),
                                           ({"x": [5, 3, 1]}, "contradicts"),
                                           ({"x": [5, 3], "y": [1, 1]}, r"\['y'\]")])
def test_input_shapes_that_do_not_fit_are_refused(client, shapes, match):
    with pytest.raises(npu.InvalidArgument, match=match) as err:
        client.load(_symbolic_relu(), input_shapes=shapes)
    assert err.value.code == "EINVAL" and not err.value.retryable
