"""Pass 3b: integer rewrites.  Ops of the index family that become other ops before
legalisation (the rest lower directly, npud/compiler_worker/lower_index.py):

* CumSum becomes a MatMul by a constant triangular 0/1 matrix (inclusive or exclusive,
  forward or reverse), on the MAC array; an integer CumSum is cast to float32 around it,
  exact while every partial sum stays below 2^24 in magnitude.
"""

from __future__ import annotations

import numpy as np

from ..ir import Node


def run(ctx) -> None:
    g = ctx.graph
    out = []
    for n in g.nodes:
        if n.op == "CumSum" and n.domain in ("", "ai.onnx") and _static(g, n):
            out.extend(cumsum_as_matmul(g, n))
        else:
            out.append(n)
    g.nodes = out


def _static(g, n) -> bool:
    t = g.tensors[n.inputs[0]]
    return t.shape is not None and t.const is None and g.const(n.inputs[1]) is not None


def _tensor(g, base: str, shape, dtype) -> str:
    name = g.fresh(base)
    g.tensors[name].shape, g.tensors[name].dtype = tuple(shape), np.dtype(dtype)
    return name


def triangle(length: int, exclusive: bool, reverse: bool) -> np.ndarray:
    """M[i, j] = 1 where output i sums input j: j <= i (forward) or j >= i (reverse),
    strictly when exclusive."""
    i, j = np.indices((length, length))
    keep = (j >= i) if reverse else (j <= i)
    if exclusive:
        keep &= i != j
    return keep.astype(np.float32)


def cumsum_as_matmul(g, n) -> list:
    """CumSum(x, axis) -> [Cast] Reshape [pre, L, post] -> MatMul(M, .) -> Reshape [-> Cast]."""
    x, y = n.inputs[0], n.outputs[0]
    shape = tuple(g.tensors[x].shape)
    dtype = np.dtype(g.tensors[x].dtype)
    axis = int(np.asarray(g.const(n.inputs[1])).reshape(())) % len(shape)
    pre, length = int(np.prod(shape[:axis])), shape[axis]
    post = int(np.prod(shape[axis + 1:]))
    m = triangle(length, bool(n.attrs.get("exclusive", 0)), bool(n.attrs.get("reverse", 0)))
    nodes = []
    src = x
    if dtype != np.float32:
        src = _tensor(g, f"{y}/float", shape, np.float32)
        nodes.append(Node(f"{n.name}/to_float", "Cast", [x], [src], {"to": 1}))
    x3 = _tensor(g, f"{y}/3d", (pre, length, post), np.float32)
    nodes.append(Node(f"{n.name}/reshape_in", "Reshape", [src], [x3], {"shape": [pre, length, post]}))
    s3 = _tensor(g, f"{y}/sum3d", (pre, length, post), np.float32)
    nodes.append(Node(f"{n.name}/matmul", "MatMul", [g.add_const(f"{n.name}/triangle", m), x3], [s3]))
    if dtype == np.float32:
        nodes.append(Node(f"{n.name}/reshape_out", "Reshape", [s3], [y], {"shape": list(shape)}))
        return nodes
    sf = _tensor(g, f"{y}/sum", shape, np.float32)
    nodes.append(Node(f"{n.name}/reshape_out", "Reshape", [s3], [sf], {"shape": list(shape)}))
    nodes.append(Node(f"{n.name}/to_int", "Cast", [sf], [y],
                      {"to": int({np.dtype(np.int64): 7, np.dtype(np.int32): 6}.get(dtype, 1))}))
    return nodes
