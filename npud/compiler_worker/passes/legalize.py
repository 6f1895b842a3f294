"""Pass 4: legalise every node: first against ONNX's own shape and attribute
rules for the ops the lowering reads closely (:func:`shape_problem`: Conv
weights and bias against the input, Gemm/MatMul dimensions, broadcasting,
axes in range...), then against the support table
(:mod:`npud.compiler_worker.support`).  Collects *every* violation:
``check_model`` returns them all, ``compile_model`` raises them together.

The ONNX rules run first of all at the start of canonicalisation
(:func:`validate`, on the graph as the user wrote it, before any rewrite
reads the shapes), so an invalid node is reported under its own name and op,
not as the Conv a ConvTranspose became; they run again here for the nodes
the rewrites created.
"""

from __future__ import annotations

import numpy as np

from ..errors import CompileError, CompileErrors
from ..support import SUPPORT

# bool tensors live on the device as float32 masks (1.0 true, 0.0 false)
DEVICE_DTYPES = (np.dtype(np.float32), np.dtype(np.bool_))
# the quantised path: int8/uint8 activations, int32 accumulators (ops with int8=True)
INT_DTYPES = (np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int32))
# index tensors (ops with ints=True): int32 on the device, int64 graph I/O narrowed/widened
INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def run(ctx) -> None:
    errors = collect(ctx.graph)
    ctx.errors = errors
    if errors and not ctx.check_only:
        raise CompileErrors(errors)


NO_STATIC_SHAPE = "has no static shape"
UNRESOLVED = "(shape inference could not resolve it)"


def collect(g) -> list[CompileError]:
    errors = []
    inferred = g.meta.get("inference_errors", {})   # recorded by fold, on the ONNX-form graph
    for n in g.nodes:
        why = _check(n, g)
        if why and NO_STATIC_SHAPE in why and n.name in inferred:
            why = why.replace(UNRESOLVED, f"(ONNX shape inference: {inferred[n.name]})")
        if why:
            errors.append(CompileError(why, node=n.name, op=n.op))
    for o in g.outputs:
        t = g.tensors[o]
        if t.shape is not None and 0 in t.shape:
            # Folding can leave an empty constant as an output, which no node checks.
            errors.append(CompileError(f"graph output {o!r} is empty (shape {list(t.shape)}); "
                                       "empty tensors are not supported"))
            continue
        if t.const is None and (t.dtype is None or np.dtype(t.dtype) not in DEVICE_DTYPES + INT_DTYPES
                                + INDEX_DTYPES):
            if not any(o in n.outputs for n in g.nodes):
                errors.append(CompileError(f"graph output {o!r} is not float32"))
    for i in g.inputs:
        t = g.tensors[i]
        if t.dtype is None or np.dtype(t.dtype) not in DEVICE_DTYPES + INT_DTYPES + INDEX_DTYPES:
            if any(i in n.inputs for n in g.nodes) or i in g.outputs:
                errors.append(CompileError(f"graph input {i!r} has dtype {t.dtype}; only float32 "
                                           "(and bool), int8, uint8, int32 and int64 inputs are supported"))
    return errors


def _check(n, g) -> str | None:
    if n.domain not in ("", "ai.onnx"):
        return f"operator domain {n.domain!r} is not supported"
    spec = SUPPORT.get(n.op)
    if spec is None:
        return f"operator {n.op} is not supported by the npu-emu backend"
    why = shape_problem(n, g)
    if why:
        return why
    if n.attrs.get("_nonconst"):
        return f"parameter(s) {', '.join(n.attrs['_nonconst'])} must be constant (dynamic shapes are not supported)"
    for i in spec.const_inputs:
        if n.input(i) and g.const(n.input(i)) is None:
            return f"input {i} ({n.input(i)!r}) must be constant"
    if spec.kernel == "const":   # folded-only ops: why they did not fold says more than their shapes
        why = _spec_checks(spec, n, g)
        if why:
            return why
    for name in list(n.inputs) + list(n.outputs):
        if not name:
            continue
        t = g.tensors.get(name)
        if t is None or t.const is not None:
            continue
        if t.shape is None:
            return f"tensor {name!r} {NO_STATIC_SHAPE} {UNRESOLVED}"
        if t.dtype is None or np.dtype(t.dtype) not in DEVICE_DTYPES:
            if n.op in ("Dropout",) and name in n.outputs[1:]:
                continue
            if spec.int8 and t.dtype is not None and np.dtype(t.dtype) in INT_DTYPES:
                continue
            if spec.ints and t.dtype is not None and np.dtype(t.dtype) in INDEX_DTYPES:
                continue
            return f"tensor {name!r} has dtype {t.dtype}; only float32 activations are supported" + \
                (" (and int8/uint8 on the quantised path)" if spec.int8 else "")
        if name in n.inputs[:1] and not spec.ranks[0] <= len(t.shape) <= spec.ranks[1]:
            return f"input rank {len(t.shape)} is outside the supported {spec.ranks}"
        if 0 in t.shape:
            return f"tensor {name!r} is empty (shape {list(t.shape)})"
    return None if spec.kernel == "const" else _spec_checks(spec, n, g)   # const: checked above


def _spec_checks(spec, n, g) -> str | None:
    """The first reason the support table's checks give against node `n`, or None."""
    for desc, check in spec.checks:
        why = check(n, g)
        if why:
            return why
    return None


# --- ONNX shape and attribute rules ---------------------------------------------------------
#
# Shape inference runs in non-strict mode (a model with one op it cannot infer still
# compiles), so it does not refuse an inconsistent node; these rules do, for the ops whose
# lowering indexes shapes and attributes.  Each returns None or a reason naming the input.

def validate(g) -> None:
    """Raise CompileErrors listing every node that breaks its ONNX shape/attribute rule."""
    errors = [CompileError(why, node=n.name, op=n.op) for n in g.nodes
              for why in [shape_problem(n, g)] if why]
    if errors:
        raise CompileErrors(errors)


def shape_problem(n, g) -> str | None:
    """Why node `n` is invalid ONNX given its inputs' static shapes and its attributes, or None.
    Tensors of unknown shape are not judged (the support checks report those), nor nodes
    the quantiser rewrote (``_q``: their inputs are operands plus quantisation parameters)."""
    if n.domain not in ("", "ai.onnx") or "_q" in n.attrs:
        return None
    rule = SHAPE_RULES.get(n.op)
    return rule(n, g) if rule else None


def _shape(g, name):
    t = g.tensors.get(name) if name else None
    return None if t is None or t.shape is None else tuple(int(d) for d in t.shape)


def _desc(name, shape) -> str:
    return f"input {name!r} {list(shape)}"


def _broadcast(operands: list) -> str | None:
    """None if the (description, shape) pairs broadcast together (multidirectional, as numpy),
    else which two disagree on which dimension.  Unknown shapes (None) are skipped."""
    known = [(d, s) for d, s in operands if s is not None]
    for axis in range(1, max((len(s) for _, s in known), default=0) + 1):
        first = None
        for d, s in known:
            if len(s) < axis or s[-axis] == 1:
                continue
            if first is None:
                first = (d, s)
            elif s[-axis] != first[1][-axis]:
                return (f"{first[0]} and {d} cannot be broadcast together "
                        f"(dimension {-axis}: {first[1][-axis]} vs {s[-axis]})")
    return None


def _broadcasting(n, g) -> str | None:
    shapes = [(x, _shape(g, x)) for x in n.inputs if x]
    return _broadcast([(_desc(x, s) if s is not None else x, s) for x, s in shapes])


def _axis(n, g, name: str, extra: int = 0, default: int = 0) -> str | None:
    """Attribute `name` (default `default`) must be an axis of input 0, in [-r, r-1+extra]."""
    s = _shape(g, n.input(0))
    if s is None:
        return None
    a = n.attrs.get(name, default)
    r = len(s)
    if not isinstance(a, int) or not -r <= a <= r - 1 + extra:
        return (f"attribute {name}={a} is out of range for {_desc(n.input(0), s)} "
                f"(valid: {-r}..{r - 1 + extra})")
    return None


def _axis_rule(name: str, extra: int = 0, default=0):
    def rule(n, g):
        d = default(n, g) if callable(default) else default
        return _axis(n, g, name, extra, d)
    return rule


def _spatial_attrs(n, nsp: int, kernel=None) -> str | None:
    """Conv/pooling attributes: kernel_shape (matching `kernel` when weights give it), positive
    strides and dilations, non-negative pads, each with one entry per spatial axis."""
    k = n.attrs.get("kernel_shape")
    if k is not None:
        if len(k) != nsp or any(v < 1 for v in k):
            return f"kernel_shape {list(k)} must have {nsp} positive entries"
        if kernel is not None and tuple(k) != tuple(kernel):
            return f"kernel_shape {list(k)} does not match the weights' spatial shape {list(kernel)}"
    for name, lo, count in (("strides", 1, nsp), ("dilations", 1, nsp), ("pads", 0, 2 * nsp)):
        v = n.attrs.get(name)
        if v is None:
            continue
        if len(v) != count or any(x < lo for x in v):
            adj = "positive" if lo else "non-negative"
            return f"{name} {list(v)} must have {count} {adj} entries"
    return None


def _conv(n, g) -> str | None:
    x, w, b = (_shape(g, n.input(i)) for i in range(3))
    if x is None or w is None:
        return None
    if len(x) < 3:
        return f"{_desc(n.input(0), x)} has rank {len(x)}; Conv needs rank 3 or more (N, C, spatial...)"
    if len(w) != len(x):
        return (f"input {n.input(1)!r} has rank {len(w)}, Conv of a rank-{len(x)} input needs "
                f"rank-{len(x)} weights (M, C/group, kernel...)")
    group = n.attrs.get("group", 1)
    if not isinstance(group, int) or group < 1 or x[1] % group or w[0] % group:
        return (f"group={group} must be positive and divide the input channels ({x[1]}) and the "
                f"output channels ({w[0]})")
    if w[1] * group != x[1]:
        return (f"weights {n.input(1)!r} {list(w)} expect {w[1] * group} input channels "
                f"(C/group={w[1]}, group={group}) but {_desc(n.input(0), x)} has {x[1]}")
    if b is not None and b != (w[0],):
        return f"bias {n.input(2)!r} has shape {list(b)}; Conv needs a 1-D bias of {w[0]} (M) values"
    return _spatial_attrs(n, len(x) - 2, w[2:])


def _conv_transpose(n, g) -> str | None:
    x, w, b = (_shape(g, n.input(i)) for i in range(3))
    if x is None or w is None:
        return None
    if len(x) < 3 or len(w) != len(x):
        return (f"input {n.input(1)!r} has rank {len(w)}, ConvTranspose of {_desc(n.input(0), x)} "
                f"needs rank-{len(x)} weights (C, M/group, kernel...)")
    group = n.attrs.get("group", 1)
    if not isinstance(group, int) or group < 1 or x[1] % group:
        return f"group={group} must be positive and divide the input channels ({x[1]})"
    if w[0] != x[1]:
        return (f"weights {n.input(1)!r} {list(w)} expect {w[0]} input channels but "
                f"{_desc(n.input(0), x)} has {x[1]}")
    if b is not None and b != (w[1] * group,):
        return (f"bias {n.input(2)!r} has shape {list(b)}; ConvTranspose needs a 1-D bias of "
                f"{w[1] * group} (M) values")
    why = _spatial_attrs(n, len(x) - 2, w[2:])
    if why:
        return why
    nsp = len(x) - 2
    s, d = n.attrs.get("strides", [1] * nsp), n.attrs.get("dilations", [1] * nsp)
    op_ = n.attrs.get("output_padding", [0] * nsp)
    if len(op_) != nsp or any(not 0 <= p < max(si, di) for p, si, di in zip(op_, s, d)):
        return (f"output_padding {list(op_)} must have {nsp} entries, each smaller than its "
                f"stride or dilation")
    return None


def _lrn(n, g) -> str | None:
    size = n.attrs.get("size")
    return None if isinstance(size, int) and size >= 1 else f"size={size} must be a positive integer"


def _pool(n, g) -> str | None:
    x = _shape(g, n.input(0))
    if x is None or len(x) < 3:
        return None if x is None else \
            f"{_desc(n.input(0), x)} has rank {len(x)}; {n.op} needs rank 3 or more"
    return _spatial_attrs(n, len(x) - 2)


def _gemm(n, g) -> str | None:
    a, b, c = (_shape(g, n.input(i)) for i in range(3))
    for name, s in ((n.input(0), a), (n.input(1), b)):
        if s is not None and len(s) != 2:
            return f"{_desc(name, s)} has rank {len(s)}; Gemm needs rank-2 A and B"
    if a is None or b is None:
        return None
    m, ka = a[::-1] if n.attrs.get("transA", 0) else a
    kb, nn = b[::-1] if n.attrs.get("transB", 0) else b
    if ka != kb:
        return (f"inner dimensions differ: A {n.input(0)!r} {list(a)} (transA="
                f"{n.attrs.get('transA', 0)}) gives K={ka}, B {n.input(1)!r} {list(b)} (transB="
                f"{n.attrs.get('transB', 0)}) gives K={kb}")
    if c is not None and (len(c) > 2 or any(d not in (1, t) for d, t in zip(c[::-1], (nn, m)))):
        return f"bias C {n.input(2)!r} {list(c)} does not broadcast to the output [{m}, {nn}]"
    return None


def _matmul(n, g) -> str | None:
    a, b = _shape(g, n.input(0)), _shape(g, n.input(1))
    if a is None or b is None:
        return None
    for name, s in ((n.input(0), a), (n.input(1), b)):
        if len(s) == 0:
            return f"{_desc(name, s)} is a scalar; MatMul needs rank 1 or more"
    ka, kb = a[-1], (b[0] if len(b) == 1 else b[-2])
    if ka != kb:
        return (f"inner dimensions differ: {_desc(n.input(0), a)} has K={ka}, "
                f"{_desc(n.input(1), b)} has K={kb}")
    return _broadcast([(f"the batch dimensions {list(a[:-2])} of {_desc(n.input(0), a)}", a[:-2]),
                       (f"those {list(b[:-2])} of {_desc(n.input(1), b)}", b[:-2])])


def _per_channel(*params):
    """A rule: inputs 1.. (named `params`) hold one value per channel (dim 1) of input 0."""
    def rule(n, g) -> str | None:
        return _channel_params(n, g, params)
    return rule


def _channel_params(n, g, params) -> str | None:
    x = _shape(g, n.input(0))
    if x is None or len(x) < 2:
        return None if x is None else f"{_desc(n.input(0), x)} has rank {len(x)}; needs (N, C, ...)"
    for i, what in enumerate(params, start=1):
        s = _shape(g, n.input(i))
        if s is not None and s != (x[1],):
            return f"{what} {n.input(i)!r} has shape {list(s)}; needs {x[1]} values (C)"
    return None


def _concat(n, g) -> str | None:
    why = _axis(n, g, "axis")
    if why:
        return why
    ins = [(x, _shape(g, x)) for x in n.inputs if x]
    if any(s is None for _, s in ins):
        return None
    (x0, s0), r = ins[0], len(ins[0][1])
    ax = n.attrs.get("axis", 0) % max(r, 1)
    for x, s in ins[1:]:
        if len(s) != r or any(d != e for i, (d, e) in enumerate(zip(s, s0)) if i != ax):
            return (f"{_desc(x, s)} does not match {_desc(x0, s0)} outside the concatenation "
                    f"axis {ax}")
    return None


def _transpose(n, g) -> str | None:
    s = _shape(g, n.input(0))
    perm = n.attrs.get("perm")
    if s is None or perm is None:
        return None
    if sorted(perm) != list(range(len(s))):
        return f"perm {list(perm)} is not a permutation of the {len(s)} axes of {_desc(n.input(0), s)}"
    return None


def _reshape(n, g) -> str | None:
    s = _shape(g, n.input(1))
    if s is not None and len(s) != 1:
        return f"shape {n.input(1)!r} has rank {len(s)}; Reshape needs a 1-D shape tensor"
    x, y = _shape(g, n.input(0)), _shape(g, n.outputs[0])
    if x is not None and y is not None and int(np.prod(x)) != int(np.prod(y)):
        # non-strict inference takes the requested shape as given; an alias must not lie
        return (f"cannot reshape {_desc(n.input(0), x)} ({int(np.prod(x))} values) into "
                f"{list(y)} ({int(np.prod(y))} values)")
    return None


def _softmax_default(n, g):
    return -1 if g.opset >= 13 else 1


_BROADCASTING = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Equal", "Less",
                 "Greater", "LessOrEqual", "GreaterOrEqual", "Where", "And", "Or", "Xor", "PRelu", "Mod")

SHAPE_RULES = {
    **{op: _broadcasting for op in _BROADCASTING},
    "Conv": _conv, "ConvTranspose": _conv_transpose, "LRN": _lrn, "Gemm": _gemm, "MatMul": _matmul, "BatchNormalization": _per_channel("scale", "B", "mean", "var"),
    "InstanceNormalization": _per_channel("scale", "B"),
    "MaxPool": _pool, "AveragePool": _pool, "LpPool": _pool,
    "Concat": _concat, "Transpose": _transpose, "Reshape": _reshape,
    "Softmax": _axis_rule("axis", default=_softmax_default),
    "LogSoftmax": _axis_rule("axis", default=_softmax_default),
    "Split": _axis_rule("axis"), "Gather": _axis_rule("axis"),
    "Flatten": _axis_rule("axis", extra=1, default=1),
    "LayerNormalization": _axis_rule("axis", default=-1),
}
