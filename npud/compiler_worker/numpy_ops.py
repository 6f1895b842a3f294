"""numpy reference evaluation of ONNX nodes, used by constant folding.

Only what folding needs: shape arithmetic (Shape/Gather/Concat/...),
ConstantOfShape and element-wise maths on constant tensors.  Never
onnxruntime.  ``evaluate(node, values)`` returns the output arrays or raises
``NotImplementedError`` for an op it does not know.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import helper, numpy_helper

from .ir import Node


def param(node: Node, vals, idx: int, attr: str, default=None):
    """A parameter given as an attribute (old opsets) or an input (new ones)."""
    if attr in node.attrs:
        return node.attrs[attr]
    if idx < len(vals) and node.input(idx):
        v = vals[idx]
        if v is None:
            raise NotImplementedError("non-constant parameter")
        return v
    return default


def _axes_list(a):
    return None if a is None else [int(x) for x in np.asarray(a).reshape(-1)]


def onnx_dtype_to_np(code: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(int(code)))


def slice_params(node, vals, shape):
    """Per axis (start, stop, step) after ONNX clamping, as a tuple of slices."""
    starts = _axes_list(param(node, vals, 1, "starts"))
    ends = _axes_list(param(node, vals, 2, "ends"))
    axes = _axes_list(param(node, vals, 3, "axes"))
    steps = _axes_list(param(node, vals, 4, "steps"))
    r = len(shape)
    if axes is None:
        axes = list(range(len(starts)))
    if steps is None:
        steps = [1] * len(starts)
    sl = [slice(0, shape[i], 1) for i in range(r)]
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = a % r
        dim = shape[a]
        if st == 0:
            raise ValueError("Slice step 0")
        s = s + dim if s < 0 else s
        e = e + dim if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), dim), min(max(e, 0), dim)
        else:
            s, e = min(max(s, 0), dim - 1), min(max(e, -1), dim - 1)
        sl[a] = slice(s, e if e >= 0 else None, st)
    return tuple(sl)


def _reduce(fn):
    def f(node, vals):
        axes = _axes_list(param(node, vals, 1, "axes"))
        keep = bool(node.attrs.get("keepdims", 1))
        if axes is None or len(axes) == 0:
            if node.attrs.get("noop_with_empty_axes", 0) and axes is not None:
                return [vals[0]]
            axes = None
        else:
            axes = tuple(axes)
        return [np.asarray(fn(vals[0], axis=axes, keepdims=keep)).astype(vals[0].dtype)]
    return f


def _binary(fn):
    return lambda node, vals: [np.asarray(fn(vals[0], vals[1]))]


def _unary(fn):
    return lambda node, vals: [np.asarray(fn(vals[0])).astype(vals[0].dtype)]


def _erf(x):
    v = np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64))
    return v.astype(x.dtype)


def _gather(node, vals):
    axis = node.attrs.get("axis", 0)
    idx = vals[1].astype(np.int64)
    dim = vals[0].shape[axis]
    idx = np.where(idx < 0, idx + dim, idx)
    return [np.take(vals[0], idx, axis=axis)]


def _reshape(node, vals):
    shape = [int(x) for x in param(node, vals, 1, "shape")]
    src = vals[0].shape
    allowzero = node.attrs.get("allowzero", 0)
    out = [src[i] if (d == 0 and not allowzero) else d for i, d in enumerate(shape)]
    return [vals[0].reshape(out)]


def _squeeze(node, vals):
    axes = _axes_list(param(node, vals, 1, "axes"))
    x = vals[0]
    if axes is None:
        return [np.squeeze(x)]
    return [np.squeeze(x, axis=tuple(a % x.ndim for a in axes))]


def _unsqueeze(node, vals):
    axes = _axes_list(param(node, vals, 1, "axes"))
    x = vals[0]
    r = x.ndim + len(axes)
    for a in sorted(a % r for a in axes):
        x = np.expand_dims(x, a)
    return [x]


def _concat(node, vals):
    return [np.concatenate([v for v in vals if v is not None and v.size or v.ndim],
                           axis=node.attrs["axis"])]


def _cos(node, vals):
    shape = [int(x) for x in vals[0].reshape(-1)]
    val = node.attrs.get("value")
    if val is None:
        return [np.zeros(shape, np.float32)]
    arr = numpy_helper.to_array(val) if not isinstance(val, np.ndarray) else val
    return [np.full(shape, arr.reshape(-1)[0], dtype=arr.dtype)]


def _split(node, vals):
    x = vals[0]
    axis = node.attrs.get("axis", 0) % x.ndim
    split = _axes_list(param(node, vals, 1, "split"))
    n = len(node.outputs)
    if split is None:
        size = -(-x.shape[axis] // n)
        split = [min(size, x.shape[axis] - i * size) for i in range(n)]
    return np.split(x, np.cumsum(split)[:-1], axis=axis)


def _clip(node, vals):
    lo = param(node, vals, 1, "min", None)
    hi = param(node, vals, 2, "max", None)
    x = vals[0]
    if lo is not None:
        x = np.maximum(x, np.asarray(lo, x.dtype))
    if hi is not None:
        x = np.minimum(x, np.asarray(hi, x.dtype))
    return [x]


def _flatten(node, vals):
    x = vals[0]
    a = node.attrs.get("axis", 1) % (x.ndim + 1) if x.ndim else 0
    return [x.reshape(int(np.prod(x.shape[:a])), -1)]


def _matmul(node, vals):
    return [np.matmul(vals[0], vals[1]).astype(vals[0].dtype)]


def _gemm(node, vals):
    a, b = vals[0], vals[1]
    if node.attrs.get("transA", 0):
        a = a.T
    if node.attrs.get("transB", 0):
        b = b.T
    y = node.attrs.get("alpha", 1.0) * (a @ b)
    if len(vals) > 2 and vals[2] is not None:
        y = y + node.attrs.get("beta", 1.0) * vals[2]
    return [y.astype(a.dtype)]


def _range(node, vals):
    s, l, d = (np.asarray(v).reshape(()) for v in vals[:3])
    return [np.arange(s, l, d).astype(np.asarray(vals[0]).dtype)]


def _tile(node, vals):
    return [np.tile(vals[0], [int(r) for r in vals[1]])]


def _pad(node, vals):
    x = vals[0]
    pads = _axes_list(param(node, vals, 1, "pads"))
    mode = node.attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    value = param(node, vals, 2, "value", 0)
    value = 0 if value is None else np.asarray(value).reshape(-1)[0] if np.size(value) else 0
    r = x.ndim
    axes = _axes_list(param(node, vals, 3, "axes"))
    full = [(0, 0)] * r
    if axes is None:
        axes = list(range(r))
    for i, a in enumerate(axes):
        full[a % r] = (pads[i], pads[i + len(axes)])
    if mode == "constant":
        return [np.pad(x, full, mode="constant", constant_values=value)]
    return [np.pad(x, full, mode={"reflect": "reflect", "edge": "edge"}[mode])]


def _cast(node, vals):
    return [vals[0].astype(onnx_dtype_to_np(node.attrs["to"]))]


def _softmax(node, vals):
    x = vals[0]
    axis = node.attrs.get("axis", -1) % x.ndim
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return [(e / e.sum(axis=axis, keepdims=True)).astype(x.dtype)]


def _where(node, vals):
    return [np.where(vals[0], vals[1], vals[2])]


def _expand(node, vals):
    shape = [int(s) for s in vals[1]]
    return [vals[0] * np.ones(shape, dtype=vals[0].dtype)]


def _gather_elements(node, vals):
    x, idx = vals[0], vals[1].astype(np.int64)
    axis = node.attrs.get("axis", 0) % x.ndim
    dim = x.shape[axis]
    if np.any((idx < -dim) | (idx >= dim)):
        raise ValueError(f"GatherElements index out of range [-{dim}, {dim - 1}]")
    return [np.take_along_axis(x, np.where(idx < 0, idx + dim, idx), axis=axis)]


def _int_div(a, b):
    """ONNX integer Div truncates toward zero (C semantics), not numpy's floor."""
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -q, q).astype(np.result_type(a, b))


def _mod(node, vals):
    a, b = vals[0], vals[1]
    if node.attrs.get("fmod", 0):
        return [np.fmod(a, b)]
    return [np.mod(a, b)]


def _cumsum(node, vals):
    x = vals[0]
    axis = int(np.asarray(vals[1]).reshape(())) % x.ndim
    if node.attrs.get("reverse", 0):
        x = np.flip(x, axis)
    y = np.cumsum(x, axis=axis, dtype=x.dtype)
    if node.attrs.get("exclusive", 0):
        y = y - x
    if node.attrs.get("reverse", 0):
        y = np.flip(y, axis)
    return [y]


def _trilu(node, vals):
    k = int(np.asarray(vals[1]).reshape(())) if len(vals) > 1 and vals[1] is not None else 0
    fn = np.triu if node.attrs.get("upper", 1) else np.tril
    return [fn(vals[0], k)]


EVAL = {
    "GatherElements": _gather_elements, "Mod": _mod, "CumSum": _cumsum, "Trilu": _trilu,
    "GreaterOrEqual": _binary(np.greater_equal), "LessOrEqual": _binary(np.less_equal),
    "And": _binary(np.logical_and), "Or": _binary(np.logical_or), "Xor": _binary(np.logical_xor),
    "IsNaN": lambda n, v: [np.isnan(v[0])],
    "IsInf": lambda n, v: [(np.isposinf(v[0]) & bool(n.attrs.get("detect_positive", 1))) |
                           (np.isneginf(v[0]) & bool(n.attrs.get("detect_negative", 1)))],
    "Identity": lambda n, v: [v[0]],
    "Dropout": lambda n, v: [v[0]] + ([np.ones(v[0].shape, bool)] if len(n.outputs) > 1 else []),
    "Cast": _cast,
    "Shape": lambda n, v: [np.array(v[0].shape[n.attrs.get("start", 0):n.attrs.get("end", None)],
                                    dtype=np.int64)],
    "Size": lambda n, v: [np.array(v[0].size, dtype=np.int64)],
    "Gather": _gather,
    "Concat": _concat,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Transpose": lambda n, v: [np.transpose(v[0], n.attrs.get("perm"))],
    "Slice": lambda n, v: [v[0][slice_params(n, v, v[0].shape)]],
    "ConstantOfShape": _cos,
    "Range": _range,
    "Tile": _tile,
    "Expand": _expand,
    "Where": _where,
    "Split": _split,
    "Pad": _pad,
    "Add": _binary(np.add), "Sub": _binary(np.subtract), "Mul": _binary(np.multiply),
    "Div": lambda n, v: [_int_div(v[0], v[1]) if v[0].dtype.kind in "iu" else np.divide(v[0], v[1])],
    "Pow": lambda n, v: [np.power(v[0], v[1]).astype(v[0].dtype)],
    "Equal": _binary(np.equal), "Less": _binary(np.less), "Greater": _binary(np.greater),
    "Not": _unary(np.logical_not),
    "Min": lambda n, v: [np.minimum.reduce(np.broadcast_arrays(*v))],
    "Max": lambda n, v: [np.maximum.reduce(np.broadcast_arrays(*v))],
    "Sum": lambda n, v: [np.add.reduce(np.broadcast_arrays(*v))],
    "Neg": _unary(np.negative), "Abs": _unary(np.abs), "Sqrt": _unary(np.sqrt),
    "Exp": _unary(np.exp), "Log": _unary(np.log), "Floor": _unary(np.floor),
    "Ceil": _unary(np.ceil), "Reciprocal": _unary(np.reciprocal),
    "Relu": _unary(lambda x: np.maximum(x, 0)), "Tanh": _unary(np.tanh),
    "Sigmoid": _unary(lambda x: 1 / (1 + np.exp(-x))), "Erf": _unary(_erf),
    "Clip": _clip,
    "MatMul": _matmul, "Gemm": _gemm,
    "Softmax": _softmax,
    "ReduceSum": _reduce(np.sum), "ReduceMean": _reduce(np.mean),
    "ReduceMax": _reduce(np.max), "ReduceMin": _reduce(np.min), "ReduceProd": _reduce(np.prod),
}


def evaluate(node: Node, vals: list) -> list:
    fn = EVAL.get(node.op)
    if fn is None or node.domain not in ("", "ai.onnx"):
        raise NotImplementedError(node.op)
    with np.errstate(all="ignore"):
        return [np.asarray(x) for x in fn(node, vals)]
