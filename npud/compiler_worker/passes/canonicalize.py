"""Pass 3: canonicalise, as the passes pipeline.FRONT_END lists (``validate`` ... ``epilogues``).

* parameter inputs that are constant move into attributes (Reshape shape,
  Squeeze/Unsqueeze axes, Slice starts/ends/axes/steps, Clip bounds, Reduce
  axes, Split sizes, Pad pads/value), so later passes read one form for
  every opset;
* Identity/Dropout become aliases; BatchNormalization after a Conv is folded
  into its weights and bias, a lone one becomes Mul + Add by constants;
* Gemm becomes MatMul (+ bias), its transposes and alpha/beta applied to the
  constants at compile time;
* epilogues fuse: Conv/MatMul/element-wise nodes absorb a following per-channel
  bias Add, a same-shape (residual) Add/Mul/Sub, and activations
  (Relu, Clip, LeakyRelu, Sigmoid, Tanh, HardSigmoid, HardSwish, ...).  The
  fused node keeps its op and gets ``attrs['_epilogue']``.
"""

from __future__ import annotations

import numpy as np

from ..ir import Node
from . import decompose, legalize, quantize

# activation op -> (UnaryFunc name, p0, p1 from attrs)
ACTIVATIONS = {
    "Relu": lambda n: ("RELU", 0.0, 0.0),
    "LeakyRelu": lambda n: ("LEAKY_RELU", float(n.attrs.get("alpha", 0.01)), 0.0),
    "Sigmoid": lambda n: ("SIGMOID", 0.0, 0.0),
    "Tanh": lambda n: ("TANH", 0.0, 0.0),
    "HardSigmoid": lambda n: ("HARDSIGMOID", float(n.attrs.get("alpha", 0.2)),
                              float(n.attrs.get("beta", 0.5))),
    "HardSwish": lambda n: ("HARDSWISH", 0.0, 0.0),
    "Erf": lambda n: ("ERF", 0.0, 0.0),
    "Gelu": lambda n: (("GELU_TANH" if n.attrs.get("approximate", "none") in ("tanh", b"tanh")
                        else "GELU"), 0.0, 0.0),
    "Exp": lambda n: ("EXP", 0.0, 0.0),
    "Log": lambda n: ("LOG", 0.0, 0.0),
    "Sqrt": lambda n: ("SQRT", 0.0, 0.0),
    "Reciprocal": lambda n: ("RECIPROCAL", 0.0, 0.0),
    "Neg": lambda n: ("NEG", 0.0, 0.0),
    "Abs": lambda n: ("ABS", 0.0, 0.0),
    "Clip": lambda n: ("CLIP", float(n.attrs.get("min", -np.inf)), float(n.attrs.get("max", np.inf))),
}
BINARY = {"Add": "ADD", "Sub": "SUB", "Mul": "MUL", "Div": "DIV", "Pow": "POW",
          "Max": "MAX", "Min": "MIN", "Sum": "ADD", "Equal": "EQ", "Less": "LT", "Greater": "GT"}
ALIASES = {"Identity", "Dropout", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}

# inputs that must be constant, moved into attrs: op -> [(input index, attr name)]
PARAMS = {
    "Reshape": [(1, "shape")], "Squeeze": [(1, "axes")], "Unsqueeze": [(1, "axes")],
    "Slice": [(1, "starts"), (2, "ends"), (3, "axes"), (4, "steps")],
    "Clip": [(1, "min"), (2, "max")], "Split": [(1, "split")],
    "Pad": [(1, "pads"), (2, "value"), (3, "axes")],
    "ReduceSum": [(1, "axes")], "ReduceMean": [(1, "axes")], "ReduceMax": [(1, "axes")],
    "ReduceMin": [(1, "axes")], "Expand": [(1, "shape")], "Tile": [(1, "repeats")],
    "Dropout": [(1, "ratio"), (2, "training_mode")],
    "Resize": [(1, "roi"), (2, "scales"), (3, "sizes")],
    "Upsample": [(1, "scales")],
}


# The canonicalisation passes, in the order pipeline.FRONT_END runs them.
def validate(ctx) -> None:
    """ONNX's per-op shape rules on the graph as imported: every rewrite after it may assume
    nodes valid; every invalid node is reported at once."""
    legalize.validate(ctx.graph)


def params(ctx) -> None:
    """Constant parameter inputs become attributes (one form for every opset)."""
    normalise_params(ctx.graph)


def quantized(ctx) -> None:
    """Quantised graphs: DQ-op-Q islands -> int8 ops (passes/quantize.py)."""
    quantize.run(ctx.graph)


def decompositions(ctx) -> None:
    """Ops the device runs as a few simpler ones (passes/decompose.py)."""
    decompose.run(ctx.graph)


def gemm(ctx) -> None:
    """Gemm -> MatMul (+ bias)."""
    lower_gemm(ctx.graph)


def batchnorm(ctx) -> None:
    """BatchNormalization folded into its Conv, else Mul + Add by constants; what the fold
    leaves unread is pruned."""
    fold_batchnorm(ctx.graph)
    ctx.graph.prune()


def epilogues(ctx) -> None:
    """Bias, residual and activation nodes fused into their producer's epilogue."""
    g = ctx.graph
    fuse_epilogues(g)
    g.toposort()      # a fused residual operand may come from a later node
    g.prune()


def normalise_params(g) -> None:
    for n in g.nodes:
        spec = PARAMS.get(n.op)
        if not spec or n.domain not in ("", "ai.onnx"):
            continue
        last = 0
        for idx, attr in spec:
            name = n.input(idx)
            if not name:
                continue
            v = g.const(name)
            if v is None:
                n.attrs.setdefault("_nonconst", []).append(attr)
                last = max(last, idx + 1)
                continue
            v = np.asarray(v)
            if attr in ("min", "max", "value", "ratio"):
                n.attrs[attr] = v.reshape(-1)[0].item() if v.size else None
                if n.attrs[attr] is None:
                    del n.attrs[attr]
            elif attr == "training_mode":
                n.attrs[attr] = int(bool(v.reshape(-1)[0])) if v.size else 0
            elif attr in ("scales", "roi"):
                n.attrs[attr] = [float(x) for x in v.reshape(-1)]
            else:
                n.attrs[attr] = [int(x) for x in v.reshape(-1)]
        n.inputs = n.inputs[:max(1, last)]


def _single_consumer(g, name, consumers):
    if name in g.outputs:
        return None
    cs = consumers.get(name, [])
    return cs[0] if len(cs) == 1 else None


def lower_gemm(g) -> None:
    new = []
    for n in g.nodes:
        if n.op != "Gemm" or n.domain not in ("", "ai.onnx"):
            new.append(n)
            continue
        a, b = n.inputs[0], n.inputs[1]
        c = n.input(2)
        alpha = float(n.attrs.get("alpha", 1.0))
        beta = float(n.attrs.get("beta", 1.0))
        yt = g.tensors[n.outputs[0]]

        def fresh(base, shape):
            t = g.fresh(base)
            g.tensors[t].shape = tuple(shape) if shape is not None else None
            g.tensors[t].dtype = np.dtype(np.float32)
            return t
        if n.attrs.get("transA", 0):
            sa = g.tensors[a].shape
            t = fresh(n.name + "_At", sa[::-1] if sa else None)
            new.append(Node(n.name + "_transA", "Transpose", [a], [t], {"perm": [1, 0]}))
            a = t
        bv = g.const(b)
        if bv is not None:
            bv = bv.T if n.attrs.get("transB", 0) else bv
            if alpha != 1.0:
                bv = bv * np.asarray(alpha, bv.dtype)
            b = g.add_const(n.name + "_B", np.ascontiguousarray(bv))
            alpha = 1.0
        elif n.attrs.get("transB", 0):
            sb = g.tensors[b].shape
            t = fresh(n.name + "_Bt", sb[::-1] if sb else None)
            new.append(Node(n.name + "_transB", "Transpose", [b], [t], {"perm": [1, 0]}))
            b = t
        y = n.outputs[0]
        mm_out = y if (not c and alpha == 1.0) else fresh(n.name + "_mm", yt.shape)
        new.append(Node(n.name, "MatMul", [a, b], [mm_out], {"_from": "Gemm"}))
        cur = mm_out
        if alpha != 1.0:
            nxt = y if not c else fresh(n.name + "_alpha", yt.shape)
            k = g.add_const(n.name + "_alpha_c", np.array(alpha, np.float32))
            new.append(Node(n.name + "_alpha", "Mul", [cur, k], [nxt]))
            cur = nxt
        if c:
            cv = g.const(c)
            if cv is not None:
                c = g.add_const(n.name + "_C", (cv * np.float32(beta)).astype(np.float32))
            elif beta != 1.0:
                t = fresh(n.name + "_betaC", g.tensors[c].shape)
                k = g.add_const(n.name + "_beta_c", np.array(beta, np.float32))
                new.append(Node(n.name + "_beta", "Mul", [c, k], [t]))
                c = t
            new.append(Node(n.name + "_bias", "Add", [cur, c], [y]))
        for t in n.outputs:
            g.t(t)
    g.nodes = new


def fold_batchnorm(g) -> None:
    producers = g.producers()
    consumers = g.consumers()
    new = []
    for n in g.nodes:
        if n.op != "BatchNormalization" or n.attrs.get("training_mode", 0):
            new.append(n)
            continue
        vals = [g.const(i) for i in n.inputs[1:5]]
        if any(v is None for v in vals) or len(n.outputs) > 1 and any(n.outputs[1:]):
            new.append(n)
            continue
        gamma, beta, mean, var = (v.astype(np.float64) for v in vals)
        eps = float(n.attrs.get("epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        x = n.inputs[0]
        p = producers.get(x)
        if (p is not None and p.op == "Conv" and _single_consumer(g, x, consumers) is n
                and g.const(p.inputs[1]) is not None and (len(p.inputs) < 3 or not p.inputs[2]
                                                          or g.const(p.inputs[2]) is not None)
                and "_epilogue" not in p.attrs):
            w = g.const(p.inputs[1])
            b = g.const(p.inputs[2]).astype(np.float64) if p.input(2) else np.zeros(w.shape[0])
            w2 = _scaled(w, scale.reshape(-1, *[1] * (w.ndim - 1)))
            b2 = (b * scale + shift).astype(np.float32)
            wn = g.add_const(p.name + "_wbn", w2)
            bn = g.add_const(p.name + "_bbn", b2)
            p.inputs = [p.inputs[0], wn, bn]
            p.outputs = [n.outputs[0]]
            continue
        # lone BatchNormalization: y = x * scale + shift, per channel (dim 1)
        rank = len(g.tensors[x].shape) if g.tensors[x].shape else 4
        shp = (-1,) + (1,) * max(0, rank - 2)
        s = g.add_const(n.name + "_scale", scale.astype(np.float32).reshape(shp))
        b = g.add_const(n.name + "_shift", shift.astype(np.float32).reshape(shp))
        mid = g.fresh(n.name + "_mul")
        g.tensors[mid].shape = g.tensors[x].shape
        g.tensors[mid].dtype = np.dtype(np.float32)
        new.append(Node(n.name, "Mul", [x, s], [mid]))
        new.append(Node(n.name + "_add", "Add", [mid, b], [n.outputs[0]]))
    g.nodes = new


def _scaled(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 ``w * scale`` computed in float64, bit for bit ``(w.astype(float64) * scale).astype(float32)``,
    without the float64 copies (a ResNet-50's weights are 100 MB as float32: the copies were
    ~0.3 s of a cold compile): the ufunc casts block by block into the float32 result."""
    out = np.empty(w.shape, np.float32)
    np.multiply(w, scale, out=out, dtype=np.float64, casting="same_kind")
    return out


def _per_channel(v: np.ndarray, out_shape, axis: int):
    """v as a vector along `axis` of out_shape if it broadcasts only there."""
    if v is None:
        return None
    r = len(out_shape)
    if v.ndim > r:
        return None
    shp = (1,) * (r - v.ndim) + tuple(v.shape)
    if any(s != 1 for i, s in enumerate(shp) if i != axis % r):
        return None
    c = shp[axis % r]
    if c not in (1, out_shape[axis % r]):
        return None
    return np.broadcast_to(v.reshape(-1), (out_shape[axis % r],)).astype(np.float32)


FUSE_HEADS = {"Conv", "MatMul", "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Pow"} | set(ACTIVATIONS)


def _float(g, name) -> bool:
    """Epilogues are float arithmetic: integer and mask tensors (lower_index.py) never fuse."""
    dt = g.tensors[name].dtype
    return dt is None or np.dtype(dt).kind == "f"


def fuse_epilogues(g) -> None:
    consumers = g.consumers()
    removed = set()
    for n in g.nodes:
        if id(n) in removed or n.domain not in ("", "ai.onnx") or n.op not in FUSE_HEADS \
                or not _float(g, n.outputs[0]):
            continue
        if n.op in ("Sum", "Max", "Min") and len(n.inputs) != 2:
            continue
        if n.op == "Conv" and (g.const(n.inputs[1]) is None
                               or (n.input(2) and g.const(n.input(2)) is None)):
            continue
        if n.op == "Conv":
            while len(n.inputs) < 3:
                n.inputs.append("")
        ep = n.attrs.setdefault("_epilogue", [])
        while True:
            out = n.outputs[0]
            t = g.tensors[out]
            c = _single_consumer(g, out, consumers)
            if c is None or id(c) in removed or c.domain not in ("", "ai.onnx") or t.shape is None \
                    or not _float(g, c.outputs[0]):
                break
            if c.op in ACTIVATIONS and (c.op != "Gelu" or c.attrs.get("approximate", "none")
                                        in ("none", b"none", "tanh", b"tanh")):
                if c.op == "Clip" and c.attrs.get("_nonconst"):
                    break
                ep.append(("act",) + ACTIVATIONS[c.op](c))
            elif c.op in ("Add", "Sub", "Mul", "Div", "Max", "Min") and len(c.inputs) == 2:
                other = c.inputs[1] if c.inputs[0] == out else c.inputs[0]
                if other == out:
                    break
                ot = g.tensors[other]
                ov = ot.const
                cout = g.tensors[c.outputs[0]]
                axis = 1 if n.op == "Conv" else -1
                pc = _per_channel(ov, t.shape, axis) if c.op == "Add" else None
                if (pc is not None and n.op in ("Conv", "MatMul") and not ep
                        and "_bias_value" not in n.attrs):
                    n.attrs["_bias_value"] = pc
                elif ot.shape is not None and tuple(ot.shape) == tuple(t.shape) \
                        and cout.shape == t.shape and ov is None:
                    n.inputs.append(other)
                    swap = c.inputs[0] == other
                    ep.append(("bin", BINARY[c.op], len(n.inputs) - 1, swap))
                else:
                    break
            else:
                break
            n.outputs = [c.outputs[0]]
            removed.add(id(c))
        if not ep:
            del n.attrs["_epilogue"]
    g.nodes = [n for n in g.nodes if id(n) not in removed]
