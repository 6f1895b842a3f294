"""Pass 2: constant folding.

Any node whose inputs are all constant is evaluated with numpy
(:mod:`npud.compiler_worker.numpy_ops`), Shape/Size of a statically shaped tensor
become constants, so Shape -> Gather -> Concat -> Reshape chains and
ConstantOfShape disappear.  Shape inference is re-run after a round that
changed something, since folded shapes unlock more static shapes.
"""

from __future__ import annotations

import numpy as np

from ..errors import CompileError
from ..numpy_ops import evaluate
from .import_onnx import MAX_ELEMENTS, check_shape, infer, inference_errors, inline_branch
from .legalize import shape_problem

MAX_ROUNDS = 4


def run(ctx) -> None:
    g = ctx.graph
    for _ in range(MAX_ROUNDS):
        if not fold_once(g):
            break
        g.prune()
        infer(g)
    for t in g.tensors.values():
        if t.shape is not None and t.const is None:
            check_shape(t.shape, f"tensor {t.name!r}")
    if any(g.tensors[o].shape is None for n in g.nodes for o in n.outputs if o):
        # the last graph that is still plain ONNX: why inference gave up, for legalisation's
        # "no static shape" errors (canonicalisation rewrites nodes out of ONNX form)
        g.meta["inference_errors"] = inference_errors(g)


def fold_once(g) -> bool:
    changed = False
    keep = []
    for n in g.nodes:
        vals = [g.const(i) if i else None for i in n.inputs]
        out = None
        if n.op == "If" and n.domain in ("", "ai.onnx"):
            if vals[0] is None:
                keep.append(n)
            else:   # the condition is known at load: the branch it picks replaces the If
                keep.extend(_inline_if(g, n, vals[0]))
                changed = True
            continue
        if n.op in ("Shape", "Size") and n.domain in ("", "ai.onnx"):
            t = g.tensors[n.inputs[0]]
            if t.shape is not None:
                out = evaluate(n, [np.empty(t.shape, np.uint8) if t.const is None else t.const])
        elif all(v is not None for i, v in zip(n.inputs, vals) if i) and n.op not in ("RandomNormal",
                                                                                      "RandomUniform"):
            why = shape_problem(n, g)
            if why:   # numpy would fail with its own words, or worse, broadcast its way through
                raise CompileError(why, node=n.name, op=n.op)
            if n.op in ("ConstantOfShape", "Expand", "Tile", "Range"):
                _check_size(n, vals)
            try:
                out = evaluate(n, vals)
            except NotImplementedError:
                out = None
            except MemoryError:
                raise CompileError("constant folding needs too much memory",
                                   node=n.name, op=n.op) from None
            except Exception as e:
                raise CompileError(f"constant folding failed: {type(e).__name__}: {e}",
                                   node=n.name, op=n.op) from None
        if out is None:
            keep.append(n)
            continue
        for name, v in zip(n.outputs, out):
            if not name:
                continue
            if v.size > MAX_ELEMENTS:
                raise CompileError(f"folded constant {name!r} has an absurd shape "
                                   f"{list(v.shape)}", node=n.name, op=n.op)
            t = g.t(name)
            t.const = np.asarray(v, order="C")
            t.shape = tuple(v.shape)
            t.dtype = v.dtype
        changed = True
    g.nodes = keep
    return changed


def _inline_if(g, n, cond) -> list:
    """The nodes of the branch a constant condition picks (ONNX: a one-element tensor)."""
    if cond.size != 1:
        raise CompileError(f"If condition has {cond.size} elements; it must have exactly one",
                           node=n.name, op=n.op)
    branch = n.attrs["then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"]
    if len(branch.output) != len(n.outputs):
        raise CompileError(f"the branch has {len(branch.output)} outputs but the If has "
                           f"{len(n.outputs)}", node=n.name, op=n.op)
    return inline_branch(branch, n.name, n.outputs, g.opset, g.tensors)


def _check_size(n, vals) -> None:
    """Refuse a fold whose result would be absurdly large before allocating it."""
    try:
        if n.op == "ConstantOfShape":
            shape = [int(x) for x in vals[0].reshape(-1)]
        elif n.op == "Expand":
            shape = list(np.broadcast_shapes(vals[0].shape, tuple(int(x) for x in vals[1])))
        elif n.op == "Tile":
            shape = [a * int(b) for a, b in zip(vals[0].shape, vals[1])]
        else:
            start, limit, delta = (float(np.asarray(v).reshape(())) for v in vals[:3])
            shape = [max(0, int(np.ceil((limit - start) / delta))) if delta else 1 << 62]
    except Exception as e:
        raise CompileError(f"invalid parameters: {e}", node=n.name, op=n.op) from None
    if any(d < 0 for d in shape):
        raise CompileError(f"negative dimension in shape {shape}", node=n.name, op=n.op)
    total = 1
    for d in shape:
        total *= d
    if total > MAX_ELEMENTS:
        raise CompileError(f"output has an absurd shape {shape} ({total} elements)",
                           node=n.name, op=n.op)
