"""Layers exporters write op by op, recognised as one NPU op (passes/patterns.py), still
matching onnxruntime; chains something else reads are left alone."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from test_compiler_int import check, floats, model


def layernorm_nodes(opset: int, gamma: bool = True, beta: bool = True, axes=(-1,)) -> tuple[list, dict]:
    """torch.onnx's LayerNorm below opset 17, with ReduceMean's axes an attribute or (18+) an input."""
    inits = {"two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32)}

    def rmean(x, y):
        if opset >= 18:
            inits[f"{y}_axes"] = np.array(axes, np.int64)
            return helper.make_node("ReduceMean", [x, f"{y}_axes"], [y])
        return helper.make_node("ReduceMean", [x], [y], axes=list(axes))

    nodes = [rmean("x", "m"), helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["p"]), rmean("p", "v"),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["s"]),
             helper.make_node("Div", ["d", "s"], ["n"])]
    out = "n"
    if gamma:
        inits["gamma"] = floats((16,))
        nodes.append(helper.make_node("Mul", [out, "gamma"], ["g"]))
        out = "g"
        if beta:
            inits["beta"] = floats((16,))
            nodes.append(helper.make_node("Add", [out, "beta"], ["b"]))
            out = "b"
    nodes.append(helper.make_node("Relu", [out], ["y"]))
    return nodes, inits


@pytest.mark.parametrize("opset,gamma,beta", [(14, True, True), (18, True, True), (14, True, False),
                                              (14, False, False)])
def test_decomposed_layernorm_is_one_norm(opset, gamma, beta):
    nodes, inits = layernorm_nodes(opset, gamma, beta)
    mb = model(nodes, {"x": (np.float32, [2, 5, 16])}, {"y": np.float32}, inits, opset=opset)
    exe, _ = check(mb, {"x": floats((2, 5, 16)) * 3 + 1}, rtol=1e-4, atol=1e-5)
    kinds = [r["kind"] for r in exe.report().rows]
    assert kinds.count("norm") == 1 and "reduce" not in kinds, kinds


def test_layernorm_over_two_trailing_axes():
    nodes, inits = layernorm_nodes(14, gamma=False, beta=False, axes=(-2, -1))
    mb = model(nodes, {"x": (np.float32, [3, 4, 16])}, {"y": np.float32}, inits, opset=14)
    exe, _ = check(mb, {"x": floats((3, 4, 16))}, rtol=1e-4, atol=1e-5)
    assert [r["kind"] for r in exe.report().rows].count("norm") == 1


def test_chain_read_elsewhere_is_left_alone():
    nodes, inits = layernorm_nodes(14)
    mb = model(nodes, {"x": (np.float32, [2, 16])}, {"y": np.float32, "d": np.float32}, inits, opset=14)
    exe, _ = check(mb, {"x": floats((2, 16))}, rtol=1e-4, atol=1e-5)
    assert "norm" not in [r["kind"] for r in exe.report().rows]
