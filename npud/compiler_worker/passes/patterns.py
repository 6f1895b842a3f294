"""Pass 2c: layers exporters write out op by op, recognised as the one op the NPU runs.

* LayerNorm below opset 17 (``torch.onnx`` writes it so): ``ReduceMean -> Sub -> Pow 2 ->
  ReduceMean -> Add eps -> Sqrt -> Div`` (``-> Mul gamma -> Add beta``) over trailing axes
  becomes one ``LayerNormalization`` (the ``norm`` command: one pass over the data instead of
  nine element-wise and reduction ops).  Only a chain whose intermediates nothing else reads
  is rewritten; population variance, as LayerNormalization defines it.
"""

from __future__ import annotations

import numpy as np

from ..ir import Node


def run(ctx) -> None:
    g = ctx.graph
    for n in list(g.nodes):
        if n.op == "ReduceMean" and n in g.nodes:
            _layernorm(g, n)
    g.prune()


def _axes(g, n) -> list | None:
    axes = n.attrs.get("axes")
    if axes is None and n.input(1):
        v = g.const(n.input(1))
        axes = None if v is None else [int(a) for a in np.asarray(v).reshape(-1)]
    return axes


def _trailing(g, n, rank: int) -> int | None:
    """k when ReduceMean ``n`` keeps dims and reduces exactly the last k of ``rank`` axes."""
    axes = _axes(g, n)
    if not axes or not n.attrs.get("keepdims", 1) or n.attrs.get("noop_with_empty_axes", 0):
        return None
    axes = sorted(a % rank for a in axes)
    return len(axes) if axes == list(range(rank - len(axes), rank)) else None


def _scalar(g, name) -> float | None:
    v = g.const(name)
    return float(np.asarray(v).reshape(-1)[0]) if v is not None and np.asarray(v).size == 1 else None


def _layernorm(g, mean) -> None:
    cons = g.consumers()
    x = mean.inputs[0]
    xt = g.tensors[x]
    if xt.shape is None or xt.dtype is None or np.dtype(xt.dtype) != np.float32:
        return
    rank = len(xt.shape)
    k = _trailing(g, mean, rank)

    def only(name, op):
        """The single consumer of ``name`` if it is an ``op`` and ``name`` is no graph output."""
        c = cons.get(name, [])
        return c[0] if len(c) == 1 and c[0].op == op and name not in g.outputs else None

    sub = only(mean.outputs[0], "Sub")
    if k is None or sub is None or sub.inputs != [x, mean.outputs[0]]:
        return
    d = sub.outputs[0]
    users = cons.get(d, [])
    if len(users) != 2 or d in g.outputs:
        return
    pow_ = next((u for u in users if u.op == "Pow" and u.inputs[0] == d), None)
    div = next((u for u in users if u.op == "Div" and u.inputs[0] == d), None)
    if pow_ is None or div is None or _scalar(g, pow_.inputs[1]) != 2.0:
        return
    var = only(pow_.outputs[0], "ReduceMean")
    add = var and _trailing(g, var, rank) == k and only(var.outputs[0], "Add")
    if not add:
        return
    eps = _scalar(g, add.inputs[1] if add.inputs[0] == var.outputs[0] else add.inputs[0])
    sqrt = only(add.outputs[0], "Sqrt")
    if eps is None or sqrt is None or div.inputs[1] != sqrt.outputs[0] or len(cons.get(sqrt.outputs[0], [])) != 1:
        return
    chain = [mean, sub, pow_, var, add, sqrt, div]
    trailing = tuple(xt.shape[rank - k:])
    gamma, beta, out = np.ones(trailing, np.float32), np.zeros(trailing, np.float32), div.outputs[0]
    for op, default in (("Mul", gamma), ("Add", beta)):
        nxt = only(out, op)
        other = nxt and (nxt.inputs[1] if nxt.inputs[0] == out else nxt.inputs[0])
        v = g.const(other) if nxt else None
        if v is None or np.asarray(v).ndim > k or any(s not in (1, t) for s, t in
                                                       zip(np.asarray(v).shape[::-1], trailing[::-1])):
            break
        if op == "Mul":
            gamma = np.broadcast_to(np.asarray(v, np.float32), trailing).copy()
        else:
            beta = np.broadcast_to(np.asarray(v, np.float32), trailing).copy()
        chain.append(nxt)
        out = nxt.outputs[0]
    ln = Node(f"{mean.name}/LayerNormalization", "LayerNormalization",
              [x, g.add_const(f"{mean.name}/gamma", gamma), g.add_const(f"{mean.name}/beta", beta)], [out],
              {"axis": rank - k, "epsilon": eps})
    at = g.nodes.index(chain[-1])
    g.nodes[at] = ln
    dead = {id(c) for c in chain[:-1]}
    g.nodes = [n for n in g.nodes if id(n) not in dead]
