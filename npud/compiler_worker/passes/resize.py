"""``Resize`` (and opset-9 ``Upsample`` upgraded to it) decomposed into ops the device runs,
every table computed at compile time (part of decomposition).

Nearest, linear and cubic interpolation are separable: each resized axis is one pass over the
tensor.  A pass reads ``taps`` source positions per output position (nearest 1, linear 2, cubic
4) with constant weights: per tap a ``Gather`` along the axis with constant indices, a ``Mul``
by the tap's per-position weights, and an ``Add`` of the taps (nearest: the one ``Gather``).

Source coordinates follow onnxruntime's CPU kernel, which torch's interpolate agrees with: in
float32, and ``align_corners`` divides by the integer output length less one (the ONNX
reference divides by ``in * scale - 1``, which differs when that product is not an integer).
"""

from __future__ import annotations

import numpy as np

from ..ir import Node

F = np.float32


def _s(v):
    return v.decode() if isinstance(v, bytes) else v


def source_coord(x, scale, in_len, out_len, mode):
    """Each output position's coordinate in the input (float32, as onnxruntime computes it)."""
    x, scale = x.astype(F), F(scale)
    half = F(0.5)
    if mode == "half_pixel":
        return (x + half) / scale - half
    if mode == "half_pixel_symmetric":
        adjustment = F(out_len) / (scale * F(in_len))
        offset = F(in_len / 2) * (F(1) - adjustment)
        return offset + (x + half) / scale - half
    if mode == "pytorch_half_pixel":
        return (x + half) / scale - half if out_len > 1 else np.zeros_like(x)
    if mode == "align_corners":
        return x * F(in_len - 1) / F(out_len - 1) if out_len > 1 else np.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nearest":
        return (x + half) / scale
    raise ValueError(mode)


def _nearest(xo, mode):
    if mode == "round_prefer_floor":
        return np.where(xo - np.floor(xo) == 0.5, np.floor(xo), np.round(xo))
    if mode == "round_prefer_ceil":
        return np.where(xo - np.floor(xo) == 0.5, np.ceil(xo), np.round(xo))
    if mode == "floor":
        return np.floor(xo)
    if mode == "ceil":
        return np.ceil(xo)
    raise ValueError(mode)


def _cubic_coeffs(s, a):
    """The four Keys cubic weights of taps -1, 0, 1, 2 at fractional offset ``s``."""
    s = s.astype(np.float64)
    return [((a * (s + 1) - 5 * a) * (s + 1) + 8 * a) * (s + 1) - 4 * a,
            ((a + 2) * s - (a + 3)) * s * s + 1,
            ((a + 2) * (1 - s) - (a + 3)) * (1 - s) * (1 - s) + 1,
            ((a * (2 - s) - 5 * a) * (2 - s) + 8 * a) * (2 - s) - 4 * a]


def taps(xo, in_len, mode, attrs) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(source indices, weights or None for 1) per tap, for output coordinates ``xo``."""
    if mode == "nearest":
        idx = _nearest(xo, _s(attrs.get("nearest_mode", "round_prefer_floor")))
        return [(np.clip(idx, 0, in_len - 1).astype(np.int64), None)]
    if mode == "linear":
        xc = np.clip(xo, 0, in_len - 1)
        i0 = np.floor(xc)
        w1 = (xc - i0).astype(F)
        return [(i0.astype(np.int64), F(1) - w1), (np.minimum(i0 + 1, in_len - 1).astype(np.int64), w1)]
    a = float(attrs.get("cubic_coeff_a", -0.75))
    i0 = np.floor(xo)
    pos = [i0 + k for k in (-1, 0, 1, 2)]
    coeffs = _cubic_coeffs(xo - i0, a)
    if int(attrs.get("exclude_outside", 0)):
        coeffs = [np.where((p >= 0) & (p <= in_len - 1), c, 0.0) for p, c in zip(pos, coeffs)]
        total = sum(coeffs)
        coeffs = [c / total for c in coeffs]
    return [(np.clip(p, 0, in_len - 1).astype(np.int64), c.astype(F)) for p, c in zip(pos, coeffs)]


PINNED = "resize_scales"   # graph.meta key: {node name: the scales a pinned Resize was given}


def pin_output_sizes(g) -> bool:
    """Give every Resize whose constant ``scales`` ONNX's shape inference turns into another
    output size than onnxruntime and torch do the sizes they compute instead; True if any
    changed (infer shapes again).  ONNX's inference floors ``in * scale`` in float64, where
    onnxruntime truncates the float32 product: torch's ``scale_factor=2.3`` on 10 pixels is 23
    pixels in torch and onnxruntime, 22 by inference.  The given scales are kept in
    ``g.meta[PINNED]``: the source coordinates still use them, as onnxruntime does."""
    changed = False
    for n in g.nodes:
        if n.op != "Resize" or n.domain not in ("", "ai.onnx") or len(n.inputs) < 3 or n.input(3):
            continue
        scales, xs, ys = g.const(n.input(2)), g.tensors[n.inputs[0]].shape, g.tensors[n.outputs[0]].shape
        if scales is None or xs is None or ys is None or np.size(scales) != len(xs) or "axes" in n.attrs:
            continue
        sizes = [int(F(s) * F(d)) for s, d in zip(np.asarray(scales).reshape(-1), xs)]
        if list(ys) != sizes:
            g.meta.setdefault(PINNED, {})[n.name] = [float(F(s)) for s in np.asarray(scales).reshape(-1)]
            n.inputs = [n.inputs[0], n.input(1), "", g.add_const(f"{n.name}/sizes", np.array(sizes, np.int64))]
            changed = True
    return changed


def _scales(g, n, ins, axes):
    a = n.attrs
    scales = [1.0] * len(ins)
    if n.name in g.meta.get(PINNED, {}):
        return list(g.meta[PINNED][n.name])
    if a.get("scales"):
        for ax, s in zip(axes, a["scales"]):
            scales[ax] = float(F(s))
    elif a.get("sizes"):
        sizes = dict(zip(axes, a["sizes"]))
        policy = _s(a.get("keep_aspect_ratio_policy", "stretch"))
        ratios = {ax: float(F(sizes[ax]) / F(ins[ax])) for ax in axes}
        if policy == "not_larger":
            ratios = {ax: min(ratios.values()) for ax in axes}
        elif policy == "not_smaller":
            ratios = {ax: max(ratios.values()) for ax in axes}
        scales = [ratios.get(ax, 1.0) for ax in range(len(ins))]
    else:
        raise n.fail("Resize needs scales or sizes")
    return scales


def decompose(g, n, builder_cls):
    """Nodes computing Resize node ``n`` (see the module's docstring), or None to leave it to
    legalisation (non-constant parameters, unknown shapes)."""
    a = n.attrs
    mode = _s(a.get("mode", "nearest"))
    ctm = _s(a.get("coordinate_transformation_mode", "half_pixel"))
    if mode not in ("nearest", "linear", "cubic"):
        raise n.fail(f"Resize mode {mode!r} is not supported (nearest, linear, cubic)")
    if a.get("antialias", 0):
        raise n.fail("Resize with antialias is not supported")
    if ctm == "tf_crop_and_resize":
        raise n.fail("Resize coordinate_transformation_mode 'tf_crop_and_resize' is not supported")
    if a.get("_nonconst"):
        return None      # legalisation reports the dynamic parameters
    x, y = n.inputs[0], n.outputs[0]
    ins, outs = g.tensors[x].shape, g.tensors[y].shape
    if ins is None or outs is None:
        return None
    r = len(ins)
    scales = _scales(g, n, ins, [ax % r for ax in a.get("axes", range(r))])
    b = builder_cls(g, n)
    todo = [ax for ax in range(r) if not (outs[ax] == ins[ax] and scales[ax] == 1.0)]
    if not todo:
        return [Node(n.name, "Identity", [x], [y])]
    cur, shape = x, list(ins)
    for i, ax in enumerate(todo):
        xo = source_coord(np.arange(outs[ax]), scales[ax], ins[ax], outs[ax], ctm)
        shape[ax] = outs[ax]
        dst = y if i == len(todo) - 1 else b.t(shape)
        cur = gather_taps(b, cur, dst, ax, shape, taps(xo, ins[ax], mode, a))
    return b.nodes


def gather_taps(b, src, dst, ax, shape, tap_list, combine="Add"):
    """``dst`` = ``combine`` (Add or Max) over taps of Gather(src, indices, axis ``ax``), each
    times its weights (broadcast along ``ax``; None: no Mul).  ``shape`` is dst's shape."""
    bshape = [1] * len(shape)
    bshape[ax] = shape[ax]
    acc = None
    for k, (idx, w) in enumerate(tap_list):
        last = k == len(tap_list) - 1
        term = b.op("Gather", [src, b.c(idx)], dst if last and acc is None else b.t(shape), axis=ax)
        if w is not None:
            term = b.op("Mul", [term, b.c(w.reshape(bshape))], dst if last and acc is None else b.t(shape))
        acc = term if acc is None else b.op(combine, [acc, term], dst if last else b.t(shape))
    return acc
