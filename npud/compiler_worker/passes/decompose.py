"""Decompositions (part of canonicalisation): ops the device runs as a few
simpler ops, with every table (indices, weights, band matrices) computed at
compile time.

* ``Resize`` (nearest, linear, cubic) -> per resized axis a ``Gather`` with
  constant indices (nearest), or 2 (linear) / 4 (cubic) Gathers weighted by
  constant per-position coefficients (``Mul``) and summed (``Add``): the
  interpolation is separable (passes/resize.py).
* ``LRN`` -> ``x / (bias + alpha/size * sum_window(x^2))^beta``: the window sum
  over channels is a 1x1 ``Conv`` with a constant band matrix (on the MAC).
* ``ConvTranspose`` (2-D) -> zero insertion (``Reshape``/``Pad``/``Reshape``/
  ``Slice`` per strided axis: data movement only) and a ``Conv`` with the
  flipped, transposed weights and padding ``dilation*(k-1) - pad``.
* ``Conv`` and ``ConvTranspose`` 1-D -> 2-D ones with H = 1 (``Unsqueeze``/``Squeeze`` are
  aliases).
* ``Conv``, ``MaxPool``, ``AveragePool`` 3-D -> 2-D ones over depth slices, summed or
  combined over the depth window; global pools of other than 4-D inputs -> ReduceMean/Max
  (passes/conv3d.py).
* ``InstanceNormalization`` of other than 4-D inputs and ``GroupNormalization`` -> the 4-D
  InstanceNormalization between Reshapes (+ the per-channel affine) (passes/norms.py).
* ``Pad`` reflect/edge -> per padded axis a ``Concat`` of the input and one-element
  ``Slice``s of it (the mirrored or repeated border; data movement only).
* ``LSTM``, ``GRU``, ``RNN`` -> unrolled over the (fixed) sequence: MatMul/Add/Sigmoid/Tanh/Mul
  per time step (passes/recurrent.py).
* ``LayerNormalization`` with its optional Mean/InvStdDev outputs -> the
  normalisation itself plus ``ReduceMean``/``Sub``/``Mul``/``ReduceMean``/
  ``Add``/``Sqrt``/``Reciprocal`` for the two statistics.
"""

from __future__ import annotations

import numpy as np

from ..ir import Node
from . import conv3d, norms, recurrent, resize


def run(g) -> None:
    new = []
    for n in g.nodes:
        if n.domain not in ("", "ai.onnx"):
            new.append(n)
            continue
        fn = _DECOMPOSITIONS.get(n.op)
        out = fn(g, n) if fn else None
        new.extend([n] if out is None else out)
    g.nodes = new


def _s(v):
    return v.decode() if isinstance(v, bytes) else v


class _B:
    """Builds nodes of one decomposition with fresh, typed intermediate tensors."""

    def __init__(self, g, n):
        self.g, self.n, self.nodes, self.k = g, n, [], 0

    def t(self, shape, dtype=np.float32):
        name = self.g.fresh(f"{self.n.name}/t")
        self.g.tensors[name].shape = tuple(int(s) for s in shape)
        self.g.tensors[name].dtype = np.dtype(dtype)
        return name

    def c(self, value):
        return self.g.add_const(f"{self.n.name}/c", np.asarray(value))

    def op(self, op, ins, out, **attrs):
        self.k += 1
        self.nodes.append(Node(f"{self.n.name}/{op}{self.k}", op, list(ins), [out], attrs))
        return out


# --- LRN --------------------------------------------------------------------------------------
def _lrn(g, n):
    x, y = n.inputs[0], n.outputs[0]
    shape = g.tensors[x].shape
    if shape is None or len(shape) != 4:
        raise n.fail("LRN is supported on 4-D (NCHW) inputs")
    a = n.attrs
    alpha, beta = float(a.get("alpha", 1e-4)), float(a.get("beta", 0.75))
    bias, size = float(a.get("bias", 1.0)), int(a["size"])
    c = shape[1]
    band = np.zeros((c, c, 1, 1), np.float32)
    lo_off, hi_off = (size - 1) // 2, -(-(size - 1) // 2)
    for o in range(c):
        band[o, max(0, o - lo_off):min(c - 1, o + hi_off) + 1, 0, 0] = alpha / size
    b = _B(g, n)
    sq, den, pw = b.t(shape), b.t(shape), b.t(shape)
    b.op("Mul", [x, x], sq)
    b.op("Conv", [sq, b.c(band), b.c(np.full(c, bias, np.float32))], den,
         kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1])
    b.op("Pow", [den, b.c(np.array(beta, np.float32))], pw)
    b.op("Div", [x, pw], y)
    return b.nodes


# --- ConvTranspose --------------------------------------------------------------------------
def _conv_transpose(g, n):
    x, y = n.inputs[0], n.outputs[0]
    w = g.const(n.input(1))
    if w is None:
        raise n.fail("ConvTranspose weights must be constant")
    if w.ndim != 4:
        raise n.fail(f"only 1-D and 2-D ConvTranspose are supported (weights of rank {w.ndim})")
    xs, ys = g.tensors[x].shape, g.tensors[y].shape
    if xs is None or ys is None:
        return None
    a = n.attrs
    grp = int(a.get("group", 1))
    cin, cog, kh, kw = w.shape
    k = [kh, kw]
    s = list(a.get("strides", [1, 1]))
    d = list(a.get("dilations", [1, 1]))
    op_ = list(a.get("output_padding", [0, 0]))
    auto = _s(a.get("auto_pad", "NOTSET"))
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if "output_shape" in a or auto in ("SAME_UPPER", "SAME_LOWER"):
        oshape = list(a["output_shape"])[-2:] if "output_shape" in a else [xs[2] * s[0], xs[3] * s[1]]
        for i in range(2):
            total = s[i] * (xs[2 + i] - 1) + op_[i] + (k[i] - 1) * d[i] + 1 - oshape[i]
            if auto == "SAME_UPPER":
                pads[i], pads[i + 2] = total // 2, total - total // 2
            else:
                pads[i], pads[i + 2] = total - total // 2, total // 2
    elif auto == "VALID":
        pads = [0, 0, 0, 0]
    cpads = [d[0] * (kh - 1) - pads[0], d[1] * (kw - 1) - pads[1],
             d[0] * (kh - 1) - pads[2] + op_[0], d[1] * (kw - 1) - pads[3] + op_[1]]
    if min(cpads) < 0:
        raise n.fail(f"ConvTranspose pads {pads} larger than dilation*(kernel-1) are not supported")
    # flipped, transposed weights: [Cout, Cin/g, kh, kw]
    cig = cin // grp
    wt = np.empty((cog * grp, cig, kh, kw), np.float32)
    for gi in range(grp):
        blk = w[gi * cig:(gi + 1) * cig]                  # [cig, cog, kh, kw]
        wt[gi * cog:(gi + 1) * cog] = blk.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
    b = _B(g, n)
    cur, shape = x, list(xs)
    for ax in (2, 3):
        st = s[ax - 2]
        if st == 1:
            continue
        ln = shape[ax]
        s5 = shape[:ax + 1] + [1] + shape[ax + 1:]
        p5 = shape[:ax + 1] + [st] + shape[ax + 1:]
        flat = shape[:ax] + [ln * st] + shape[ax + 1:]
        cut = shape[:ax] + [(ln - 1) * st + 1] + shape[ax + 1:]
        r5, pd, fl, sl = b.t(s5), b.t(p5), b.t(flat), b.t(cut)
        b.op("Reshape", [cur], r5, shape=s5)
        padv = [0] * 10
        padv[5 + ax + 1] = st - 1
        b.op("Pad", [r5], pd, pads=padv, mode="constant", value=0.0)
        b.op("Reshape", [pd], fl, shape=flat)
        b.op("Slice", [fl], sl, starts=[0], ends=[(ln - 1) * st + 1], axes=[ax], steps=[1])
        cur, shape = sl, cut
    bias = g.const(n.input(2)) if n.input(2) else None
    ins = [cur, b.c(wt)] + ([b.c(np.asarray(bias, np.float32))] if bias is not None else [])
    b.op("Conv", ins, y, kernel_shape=[kh, kw], pads=cpads, strides=[1, 1], dilations=d, group=grp)
    return b.nodes


# --- LayerNormalization statistics ------------------------------------------------------------
def _layernorm_stats(g, n):
    outs = n.outputs
    if len(outs) < 2 or not any(outs[1:]):
        return None
    x = n.inputs[0]
    xs = g.tensors[x].shape
    if xs is None:
        return None
    r = len(xs)
    axis = n.attrs.get("axis", -1) % r
    if int(n.attrs.get("stash_type", 1)) != 1:
        raise n.fail("LayerNormalization stash_type other than float32 is not supported")
    axes = list(range(axis, r))
    sshape = list(xs[:axis]) + [1] * (r - axis)
    eps = float(n.attrs.get("epsilon", 1e-5))
    b = _B(g, n)
    main = Node(n.name, n.op, list(n.inputs), [outs[0]], dict(n.attrs))
    mean = outs[1] if outs[1] else b.t(sshape)
    b.op("ReduceMean", [x], mean, axes=axes, keepdims=1)
    if len(outs) > 2 and outs[2]:
        dv, sq, var, ve, sd = b.t(xs), b.t(xs), b.t(sshape), b.t(sshape), b.t(sshape)
        b.op("Sub", [x, mean], dv)
        b.op("Mul", [dv, dv], sq)
        b.op("ReduceMean", [sq], var, axes=axes, keepdims=1)
        b.op("Add", [var, b.c(np.array(eps, np.float32))], ve)
        b.op("Sqrt", [ve], sd)
        b.op("Reciprocal", [sd], outs[2])
    return [main] + b.nodes



# --- Conv / ConvTranspose 1-D ---------------------------------------------------------------------
def _attrs_2d(n, k: int) -> dict:
    """A 1-D convolution's attributes for the same convolution over [N, C, 1, L]."""
    a = dict(n.attrs)
    auto = _s(a.pop("auto_pad", "NOTSET"))
    if auto != "NOTSET":
        raise n.fail(f"1-D {n.op} with auto_pad={auto!r} is not supported (give pads)")
    a["kernel_shape"] = [1, k]
    for key, one in (("strides", 1), ("dilations", 1), ("output_padding", 0)):
        if key in a:
            a[key] = [one] + list(a[key])
    if "pads" in a:
        a["pads"] = [0, a["pads"][0], 0, a["pads"][1]]
    if "output_shape" in a:
        a["output_shape"] = [1] + list(a["output_shape"])[-1:]
    return a


def _as_2d(g, n, w, make):
    """`n` (a convolution with 3-D weights `w`) between an Unsqueeze of its input and a Squeeze
    of its output: ``make(b, x4, y4, w4, attrs)`` builds the 2-D form and returns its nodes;
    None when shapes are unknown."""
    x, y = n.inputs[0], n.outputs[0]
    xt, yt = g.tensors[x], g.tensors[y]
    if xt.shape is None or yt.shape is None:
        return None
    b = _B(g, n)
    x4 = b.op("Unsqueeze", [x], b.t(xt.shape[:2] + (1,) + xt.shape[2:], xt.dtype or np.float32), axes=[2])
    y4 = b.t(yt.shape[:2] + (1,) + yt.shape[2:], yt.dtype or np.float32)
    body = make(b, x4, y4, w[:, :, None, :], _attrs_2d(n, int(w.shape[2])))
    b.op("Squeeze", [y4], y, axes=[2])
    return b.nodes[:1] + body + b.nodes[1:]


def _conv1d(g, n):
    """Conv 1-D (float, constant 3-D weights [O, I, K]) as a 2-D Conv over [N, C, 1, L]; 3-D
    (5-D weights) as 2-D Convs over depth slices (passes/conv3d.py)."""
    w = g.const(n.input(1))
    if w is not None and w.ndim == 5:
        return conv3d.conv(g, n, _B)
    if w is None or w.ndim != 3:
        return None
    return _as_2d(g, n, w, lambda b, x4, y4, w4, a: [
        Node(n.name, "Conv", [x4, b.c(w4)] + n.inputs[2:], [y4], a)])


def _qconv1d(g, n):
    """A quantised Conv 1-D (QLinearConv or a fused QDQ Conv; int8 weights in its ``_q``) as a 2-D
    one: Unsqueeze/Squeeze of int8 tensors are aliases too."""
    q = n.attrs.get("_q") or {}
    w = q.get("w")
    if w is None or np.ndim(w) != 3:
        return None
    return _as_2d(g, n, w, lambda b, x4, y4, w4, a: [
        Node(n.name, n.op, [x4] + n.inputs[1:], [y4], {**a, "_q": {**q, "w": w4}})])


def _conv_transpose_nd(g, n):
    """ConvTranspose 2-D as below; 1-D as a 2-D one over [N, C, 1, L]."""
    w = g.const(n.input(1))
    if w is None or w.ndim != 3:
        return _conv_transpose(g, n)

    def make(b, x4, y4, w4, a):
        conv = Node(n.name, n.op, [x4, b.c(w4)] + n.inputs[2:], [y4], a)
        return _conv_transpose(g, conv) or [conv]
    return _as_2d(g, n, w, make)


# --- Pad reflect / edge -----------------------------------------------------------------------
def _pad_border(g, n):
    """Pad in reflect or edge mode: per padded axis, Concat(border slices..., x, ...)."""
    mode = _s(n.attrs.get("mode", "constant"))
    pads = n.attrs.get("pads")
    xs = g.tensors[n.inputs[0]].shape
    if mode not in ("reflect", "edge") or pads is None or xs is None or n.attrs.get("_nonconst"):
        return None
    r = len(xs)
    axes = [int(ax) % r for ax in n.attrs.get("axes", range(r))]
    k = len(axes)
    if any(p < 0 for p in pads):
        return None      # legalisation refuses negative pads
    b = _B(g, n)
    cur, shape = n.inputs[0], list(xs)
    todo = [(ax, int(pads[i]), int(pads[i + k])) for i, ax in enumerate(axes) if pads[i] or pads[i + k]]
    if not todo:
        return None
    for j, (ax, before, after) in enumerate(todo):
        length = shape[ax]
        if mode == "reflect" and max(before, after) >= length:
            raise n.fail(f"reflect pads {pads} must be smaller than the padded dimension ({length})")
        src = ([before - i for i in range(before)], [length - 2 - i for i in range(after)]) \
            if mode == "reflect" else ([0] * before, [length - 1] * after)
        one = shape[:ax] + [1] + shape[ax + 1:]
        parts = [b.op("Slice", [cur], b.t(one), starts=[i], ends=[i + 1], axes=[ax], steps=[1])
                 for i in src[0]] + [cur]
        parts += [b.op("Slice", [cur], b.t(one), starts=[i], ends=[i + 1], axes=[ax], steps=[1])
                  for i in src[1]]
        shape[ax] = length + before + after
        out = n.outputs[0] if j == len(todo) - 1 else b.t(shape)
        cur = b.op("Concat", parts, out, axis=ax)
    return b.nodes


def _built(decompose):
    """``decompose(g, n, _B)`` as a decomposition of node ``n`` (the modules that decompose a family
    of their own -- 3-D pooling, norms, Resize, recurrent layers -- take this module's builder)."""
    return lambda g, n: decompose(g, n, _B)


_DECOMPOSITIONS = {
    "Resize": _built(resize.decompose), "LRN": _lrn, "ConvTranspose": _conv_transpose_nd,
    "LayerNormalization": _layernorm_stats, "Conv": _conv1d, "QLinearConv": _qconv1d, "Pad": _pad_border,
    "LSTM": _built(recurrent.unroll), "GRU": _built(recurrent.unroll), "RNN": _built(recurrent.unroll),
    "MaxPool": _built(conv3d.pool), "AveragePool": _built(conv3d.pool),
    "GlobalAveragePool": _built(conv3d.global_pool), "GlobalMaxPool": _built(conv3d.global_pool),
    "InstanceNormalization": _built(norms.instance_norm), "GroupNormalization": _built(norms.group_norm),
}
