"""The pass list (npud/compiler_worker/pipeline.py) shows every pass, and the graph-health check
run between the graph passes names a pass that leaves the IR inconsistent."""

from __future__ import annotations

import numpy as np
import pytest

from npud.compiler_worker import CompileError, compile_model, pipeline
from npud.compiler_worker.ir import Graph, Node, Tensor
from npud.compiler_worker.passes import health
from npud.emulator.config import make_config

from compiler_testmodels import small_cnn


def _graph():
    """x -> Relu -> r -> Neg -> y, with a constant c."""
    t = {"x": Tensor("x", (2,)), "r": Tensor("r", (2,)), "y": Tensor("y", (2,)),
         "c": Tensor("c", (2,), np.dtype(np.float32), np.ones(2, np.float32))}
    return Graph([Node("relu", "Relu", ["x"], ["r"]), Node("neg", "Neg", ["r"], ["y"])], t, ["x"], ["y"], 17)


def test_a_healthy_graph_passes_and_reports_what_has_no_shape():
    assert health.check(_graph(), "p") == set()


@pytest.mark.parametrize("break_it,fault", [
    (lambda g: g.nodes.append(Node("again", "Relu", ["x"], ["r"])), "produced twice"),
    (lambda g: g.nodes.append(Node("late", "Relu", ["c"], ["x"])), "both produced and a graph input"),
    (lambda g: g.nodes[1].inputs.__setitem__(0, "gone"), "reads tensor 'gone'"),
    (lambda g: g.outputs.append("nowhere"), "graph output 'nowhere'"),
    (lambda g: setattr(g.tensors["r"], "shape", None), "'r' lost its shape"),
])
def test_a_broken_graph_is_an_internal_error_naming_the_pass(break_it, fault):
    g = _graph()
    break_it(g)
    with pytest.raises(CompileError) as ei:
        health.check(g, "some_pass", shapeless=set())
    assert "internal: after pass 'some_pass'" in ei.value.reason and fault in ei.value.reason


def test_a_shape_the_import_could_not_infer_may_stay_unknown():
    g = _graph()
    g.tensors["r"].shape = None
    assert health.check(g, "import") == {"r"}
    assert health.check(g, "next", {"r"}) == {"r"}


def test_canonicalisation_is_listed_pass_by_pass_and_timed():
    names = [n for n, _ in pipeline.FRONT_END]
    assert "canonicalize" not in names
    assert [n for n in names if n.startswith("canonicalize.")] == [
        "canonicalize.validate", "canonicalize.params", "canonicalize.quantized", "canonicalize.decompose",
        "canonicalize.gemm", "canonicalize.batchnorm", "canonicalize.epilogues"]
    exe = compile_model(small_cnn(), make_config("edge"))
    assert list(exe.meta["pass_seconds"]) == [n for n, _ in pipeline.PASSES]


def test_a_pass_that_breaks_the_graph_is_named(monkeypatch):
    def bad(ctx):
        ctx.graph.nodes.append(Node("dup", "Relu", [ctx.graph.inputs[0]], [ctx.graph.nodes[0].outputs[0]]))
    stage = [(n, bad if n == "canonicalize.gemm" else fn) for n, fn in pipeline.FRONT_END]
    monkeypatch.setattr(pipeline, "FRONT_END", stage)
    monkeypatch.setattr(pipeline, "PASSES", stage + pipeline.BACK_END)
    with pytest.raises(CompileError, match="after pass 'canonicalize.gemm'"):
        compile_model(small_cnn(), make_config("edge"))
