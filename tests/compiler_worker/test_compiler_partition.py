"""Partitioning (npud/compiler_worker/partition.py): the NPU target's support query places nodes,
fallback takes only what it declines, and nodes group into as few partitions as a topological
order allows, each a self-contained ONNX submodel with static boundary tensors."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from npud.compiler_worker import partition, worker
from npud.emulator.config import make_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "npud"))
from hetero_models import loop_model, nms_model, topk_model  # noqa: E402

CONFIG = make_config("edge").to_dict()


def _model(nodes, inputs, outputs, inits=()) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _plan(model: bytes, **options) -> dict:
    reply = worker.handle({"op": "partition", "model": model, "config": CONFIG, "options": options,
                           "target": "npu-emu", "fallback": "cpu"})
    assert reply["ok"], reply
    return reply


K = numpy_helper.from_array(np.array([2], np.int64), "k")


def diamond() -> bytes:
    """relu -> (TopK on one branch, sigmoid on the other) -> add: the sigmoid joins the first NPU
    partition (it is ready with it), so the plan is NPU, cpu, NPU -- not four partitions."""
    return _model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                   helper.make_node("TopK", ["r", "k"], ["v", "i"], name="topk", axis=1),
                   helper.make_node("Sigmoid", ["r"], ["s"], name="sigmoid"),
                   helper.make_node("Slice", ["s", "st", "en", "ax"], ["s2"], name="slice"),
                   helper.make_node("Add", ["v", "s2"], ["y"], name="add")],
                  [vi("x", ["n", 8])], [vi("y", None)],
                  [K, *(numpy_helper.from_array(np.array([v], np.int64), n)
                        for n, v in (("st", 0), ("en", 2), ("ax", 1)))])


def test_nodes_group_into_as_few_partitions_as_a_topological_order_allows():
    plan = _plan(diamond(), input_shapes={"x": [3, 8]})
    assert [p["target"] for p in plan["partitions"]] == ["npu-emu", "cpu", "npu-emu"]
    first = onnx.load_from_string(plan["partitions"][0]["model"])
    assert {n.name for n in first.graph.node} == {"relu", "sigmoid", "slice"}
    assert plan["tensors"]["r"] == {"dtype": "float32", "shape": [3, 8]}   # fixed by input_shapes
    assert plan["inputs"] == ["x"] and plan["outputs"] == ["y"]
    assert plan["declared"] == {"x": {"symbolic": ["n", ""]}}   # sized by input_shapes: not defaulted
    assert _plan(diamond())["declared"]["x"] == {"symbolic": ["n", ""], "defaulted": [0]}


def test_independent_declined_nodes_share_one_cpu_partition():
    model = _model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                    helper.make_node("TopK", ["r", "k"], ["v1", "i1"], name="topk1", axis=1),
                    helper.make_node("TopK", ["x", "k"], ["v2", "i2"], name="topk2", axis=1),
                    helper.make_node("Add", ["v1", "v2"], ["y"], name="add")],
                   [vi("x", [1, 8])], [vi("y", None)], [K])
    plan = _plan(model)
    assert [p["target"] for p in plan["partitions"]] == ["npu-emu", "cpu", "npu-emu"]


@pytest.mark.parametrize("model", [diamond(), loop_model()])
def test_fallback_takes_exactly_the_nodes_the_npu_target_declines(model):
    """Fallback is a safety net: a node goes to cpu if and only if the support query declines it."""
    from npud import targets

    fixed = partition.fix_shapes(model, None)[0].SerializeToString()
    support = {s.node: s for s in targets.target("npu-emu").support(fixed, CONFIG)}
    plan = _plan(model)
    for row in plan["nodes"]:
        if row["reason"] == partition.CONSTANT_REASON:   # folded into the cpu partition that reads it
            continue
        assert (row["target"] == "cpu") == (not support[row["node"]].supported), row
        assert bool(row["reason"]) == (row["target"] == "cpu")


@pytest.mark.parametrize("model", [diamond()])
def test_the_partitions_chained_compute_what_the_model_does(model):
    plan = _plan(model)
    shape = [d.dim_value or 1 for d in onnx.load_from_string(model).graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    tensors = {"x": x}
    for part in plan["partitions"]:
        session = ort.InferenceSession(part["model"], providers=["CPUExecutionProvider"])
        tensors.update(zip(part["outputs"], session.run(part["outputs"], {n: tensors[n] for n in part["inputs"]})))
    want = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(tensors["y"], want)


def test_a_weights_dequantize_stays_with_its_conv():
    """Nodes computing only from constants (a QDQ weight's DequantizeLinear) are copied into each
    partition that reads them: no float weight crosses devices, the int8 pattern stays whole."""
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.int8), "w")
    ws = numpy_helper.from_array(np.array(0.5, np.float32), "ws")
    model = _model([helper.make_node("DequantizeLinear", ["w", "ws"], ["wf"], name="dq_w"),
                    helper.make_node("Sin", ["x"], ["s"], name="sin"),
                    helper.make_node("Conv", ["s", "wf"], ["y"], name="conv")],
                   [vi("x", [1, 2, 4, 4])], [vi("y", None)], [w, ws])
    plan = _plan(model)
    assert [p["target"] for p in plan["partitions"]] == ["cpu", "npu-emu"]
    assert "wf" not in plan["tensors"]
    last = onnx.load_from_string(plan["partitions"][1]["model"])
    assert [n.name for n in last.graph.node] == ["dq_w", "conv"]
    assert {r["node"]: r["target"] for r in plan["nodes"]}["dq_w"] == "npu-emu"


def test_a_model_the_npu_runs_whole_has_no_partitions():
    plan = _plan(_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", [4])], [vi("y", None)]))
    assert plan["partitions"] == [] and [r["target"] for r in plan["nodes"]] == ["npu-emu"]


def test_a_data_dependent_boundary_tensor_is_a_clear_compile_error():
    model = _model([helper.make_node("NonZero", ["x"], ["nz"], name="nonzero"),
                    helper.make_node("Cast", ["nz"], ["y"], name="cast", to=TensorProto.FLOAT)],
                   [vi("x", [4])], [vi("y", None)])
    reply = worker.handle({"op": "partition", "model": model, "config": CONFIG, "options": {},
                           "target": "npu-emu", "fallback": "cpu"})
    assert not reply["ok"] and "data-dependent" in reply["error"]["message"]


@pytest.mark.parametrize("request_, why", [
    ({"model": b"\x08\x07 not a protobuf"}, "malformed model"),
    ({"model": "text"}, ""),
    ({"fallback": None}, ""),
    ({"options": {"input_shapes": {"x": [1, 2, 3]}}}, "dimensions"),
])
def test_a_malformed_partition_request_is_an_error_reply_not_a_crash(request_, why):
    request = {"op": "partition", "model": diamond(), "config": CONFIG, "options": {}, "target": "npu-emu",
               "fallback": "cpu", **request_}
    request = {k: v for k, v in request.items() if v is not None}   # None: the field is missing
    reply = worker.handle(request)
    assert reply["ok"] is False and reply["error"]["code"] == "EINVAL" and why in reply["error"]["message"]


def test_a_loop_runs_on_cpu_with_the_outer_tensors_its_body_reads():
    model = loop_model()
    plan = _plan(model)
    assert [p["target"] for p in plan["partitions"]] == ["npu-emu", "cpu", "npu-emu"]
    assert plan["partitions"][1]["inputs"] == ["r"]   # read only inside the Loop's body
    test_the_partitions_chained_compute_what_the_model_does(model)


@pytest.mark.parametrize("build", [diamond, loop_model, topk_model, nms_model])
def test_every_cpu_partition_is_claimed_whole_by_the_cpu_target(build):
    """The plan is only as good as the fallback target's acceptance of its pieces: a partition the cpu
    target declines a node of fails the load (the Constants the partitioner copies in, and tensors
    inside a partition whose shapes depend on the data, were refused once)."""
    from npud import targets

    cpu = targets.target("cpu")
    parts = [p for p in _plan(build())["partitions"] if p["target"] == "cpu"]
    assert parts
    for part in parts:
        declined = [(s.node, s.reason) for s in cpu.support(part["model"], {}) if not s.supported]
        assert declined == [], declined
