"""Pass 4: legalise every node against the support table
(:mod:`compiler_worker.support`).  Collects *every* violation: ``check_model``
returns them all, ``compile_model`` raises them together."""

from __future__ import annotations

import numpy as np

from ..errors import CompileError, CompileErrors
from ..support import SUPPORT

# bool tensors live on the device as float32 masks (1.0 true, 0.0 false)
DEVICE_DTYPES = (np.dtype(np.float32), np.dtype(np.bool_))
# the quantised path: int8/uint8 activations, int32 accumulators (ops with int8=True)
INT_DTYPES = (np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int32))


def run(ctx) -> None:
    errors = collect(ctx.graph)
    ctx.errors = errors
    if errors and not ctx.check_only:
        raise CompileErrors(errors)


def collect(g) -> list[CompileError]:
    errors = []
    for n in g.nodes:
        why = _check(n, g)
        if why:
            errors.append(CompileError(why, node=n.name, op=n.op))
    for o in g.outputs:
        t = g.tensors[o]
        if t.shape is not None and 0 in t.shape:
            # Folding can leave an empty constant as an output, which no node checks.
            errors.append(CompileError(f"graph output {o!r} is empty (shape {list(t.shape)}); "
                                       "empty tensors are not supported"))
            continue
        if t.const is None and (t.dtype is None or np.dtype(t.dtype) not in DEVICE_DTYPES + INT_DTYPES):
            if not any(o in n.outputs for n in g.nodes):
                errors.append(CompileError(f"graph output {o!r} is not float32"))
    for i in g.inputs:
        t = g.tensors[i]
        if t.dtype is None or np.dtype(t.dtype) not in DEVICE_DTYPES + INT_DTYPES:
            if any(i in n.inputs for n in g.nodes) or i in g.outputs:
                errors.append(CompileError(f"graph input {i!r} has dtype {t.dtype}; only float32 "
                                           "(and bool), int8, uint8 and int32 inputs are supported"))
    return errors


def _check(n, g) -> str | None:
    if n.domain not in ("", "ai.onnx"):
        return f"operator domain {n.domain!r} is not supported"
    spec = SUPPORT.get(n.op)
    if spec is None:
        return f"operator {n.op} is not supported by the npu-emu backend"
    if n.attrs.get("_nonconst"):
        return f"parameter(s) {', '.join(n.attrs['_nonconst'])} must be constant (dynamic shapes are not supported)"
    for i in spec.const_inputs:
        if n.input(i) and g.const(n.input(i)) is None:
            return f"input {i} ({n.input(i)!r}) must be constant"
    for name in list(n.inputs) + list(n.outputs):
        if not name:
            continue
        t = g.tensors.get(name)
        if t is None or t.const is not None:
            continue
        if t.shape is None:
            return f"tensor {name!r} has no static shape (shape inference could not resolve it)"
        if t.dtype is None or np.dtype(t.dtype) not in DEVICE_DTYPES:
            if n.op in ("Dropout",) and name in n.outputs[1:]:
                continue
            if spec.int8 and t.dtype is not None and np.dtype(t.dtype) in INT_DTYPES:
                continue
            return f"tensor {name!r} has dtype {t.dtype}; only float32 activations are supported" + \
                (" (and int8/uint8 on the quantised path)" if spec.int8 else "")
        if name in n.inputs[:1] and not spec.ranks[0] <= len(t.shape) <= spec.ranks[1]:
            return f"input rank {len(t.shape)} is outside the supported {spec.ranks}"
        if 0 in t.shape:
            return f"tensor {name!r} is empty (shape {list(t.shape)})"
    for desc, check in spec.checks:
        why = check(n, g)
        if why:
            return why
    return None
