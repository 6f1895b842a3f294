"""Pass 2b: integer rewrites, before canonicalisation.  Ops of the index family that become
other ops (the rest lower directly, npud/compiler_worker/lower_index.py):

* MatMulInteger whose input zero point is computed at run time (``quantize_dynamic``:
  DynamicQuantizeLinear's zero point) becomes MatMulInteger with a zero point of 0, minus
  ``int32(a_zp) * colsum(B - b_zp)`` (a constant vector times the run-time scalar): exactly
  ``(A - a_zp) @ (B - b_zp)``, on the integer vector path.
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
        elif n.op == "MatMulInteger" and n.domain in ("", "ai.onnx") and _runtime_zp(g, n):
            out.extend(runtime_zero_point(g, n))
        else:
            out.append(n)
    g.nodes = out


def _runtime_zp(g, n) -> bool:
    """MatMulInteger with constant 2-D weights and a one-element zero point computed at run time."""
    zp, w = n.input(2), g.tensors[n.inputs[1]]
    t = g.tensors.get(zp) if zp else None
    return (t is not None and t.const is None and t.shape is not None and int(np.prod(t.shape)) == 1
            and w.const is not None and w.const.ndim == 2 and g.tensors[n.outputs[0]].shape is not None
            and (not n.input(3) or g.const(n.input(3)) is not None))


def runtime_zero_point(g, n) -> list:
    """(A - a_zp) @ (B - b_zp) as MatMulInteger(A, B, 0, b_zp) - int32(a_zp) * colsum(B - b_zp)."""
    a, b, zp = n.inputs[0], n.inputs[1], n.inputs[2]
    y = n.outputs[0]
    w = g.const(b).astype(np.int64)
    bzp = np.asarray(g.const(n.input(3)), np.int64) if n.input(3) else np.zeros((), np.int64)
    colsum = (w - bzp.reshape(1, -1) if bzp.size > 1 else w - bzp).sum(axis=0).astype(np.int32)
    zero = g.add_const(f"{n.name}/a_zp0", np.zeros((), g.tensors[zp].dtype))
    yshape = g.tensors[y].shape
    raw = _tensor(g, f"{y}/raw", yshape, np.int32)
    zp32 = _tensor(g, f"{y}/a_zp", g.tensors[zp].shape, np.int32)
    corr = _tensor(g, f"{y}/zp_term", np.broadcast_shapes(g.tensors[zp].shape, colsum.shape), np.int32)
    return [Node(f"{n.name}/zp0", "MatMulInteger", [a, b, zero] + n.inputs[3:4], [raw], dict(n.attrs)),
            Node(f"{n.name}/zp_int32", "Cast", [zp], [zp32], {"to": 6}),
            Node(f"{n.name}/zp_term", "Mul", [zp32, g.add_const(f"{n.name}/colsum", colsum)], [corr]),
            Node(f"{n.name}/zp_sub", "Sub", [raw, corr], [y])]


def _static(g, n) -> bool:
    """A CumSum this pass can rewrite; any other stays for legalisation to name what is wrong."""
    t = g.tensors[n.inputs[0]]
    return (t.shape is not None and t.const is None and g.const(n.inputs[1]) is not None
            and t.dtype is not None and np.dtype(t.dtype) in (np.float32, np.int32, np.int64))


def _tensor(g, base: str, shape, dtype) -> str:
    """A fresh IR tensor of known shape and dtype (the rewrites run after shape inference)."""
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
