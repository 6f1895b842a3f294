"""The graph-health check the pipeline runs between graph passes: a pass that leaves the IR
inconsistent is named at once, not found later as a confusing failure of another pass.

Healthy: every tensor is produced once (by one node, and never also a graph input or a
constant), every tensor a node or the graph's outputs read exists (a graph input, a constant or
some node's output), and no pass loses a shape: a tensor whose shape the import could not infer
(an op shape inference does not know, which legalize then refuses) may stay unknown, but any
other tensor without a shape is a pass's fault."""

from __future__ import annotations

from ..errors import CompileError


def check(g, after: str, shapeless: set | None = None) -> set:
    """CompileError ("internal: after pass X: ...") naming the first fault of graph ``g``.
    ``shapeless``: the tensors allowed to have no shape (None: any); returns those without one."""
    def fail(reason, node=None):
        raise CompileError(f"internal: after pass {after!r}: {reason}",
                           node=None if node is None else node.name, op=None if node is None else node.op)

    def is_const(name):
        t = g.tensors.get(name)
        return t is not None and t.const is not None

    inputs = set(g.inputs)
    produced = {}
    for n in g.nodes:
        for o in n.outputs:
            if not o:
                continue
            if o in produced:
                fail(f"tensor {o!r} is produced twice (also by node {produced[o].name!r})", n)
            if o in inputs or is_const(o):
                fail(f"tensor {o!r} is both produced and a graph input or constant", n)
            produced[o] = n
    for n in g.nodes:
        for i in n.inputs:
            if i and i not in produced and i not in inputs and not is_const(i):
                fail(f"reads tensor {i!r}, which no node, input or constant provides", n)
    for o in g.outputs:
        if o not in produced and o not in inputs and not is_const(o):
            fail(f"graph output {o!r} is not provided by any node, input or constant")
    unknown = set()
    for name in (*inputs, *produced):
        t = g.tensors.get(name)
        if t is None or t.shape is None:
            if shapeless is not None and name not in shapeless:
                fail(f"tensor {name!r} lost its shape", produced.get(name))
            unknown.add(name)
    return unknown
