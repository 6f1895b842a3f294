"""3-D convolution and pooling (``Conv``/``MaxPool``/``AveragePool`` over [N, C, D, H, W]) as
2-D ones over the depth slices (part of decomposition).

Depth is moved next to the batch (``Transpose`` to [N, D, C, H, W]) so that a set of depth
slices is one [N*d, C, H, W] tensor (a ``Reshape``, an alias) and each 2-D op covers all of them
in one command sequence:

* ``Conv``: the input is zero-padded along depth (``Pad``); for each of the kd depth taps j a
  ``Gather`` takes the slices every output depth reads at that tap (z*stride + j*dilation) and a
  2-D ``Conv`` applies the weights' j-th depth plane to them; the kd results are summed (``Add``,
  fused into the convolutions by canonicalisation); the bias goes with tap 0.
* ``MaxPool``/``AveragePool``: the 2-D pool over H x W of every depth slice, then the window over
  depth as kd weighted ``Gather``s combined by ``Max`` or ``Add`` (average: each output depth's
  taps weighted 1/kd, or 1/(taps inside the input) when padding is not counted; the average
  over a box is separable).

Refused, naming the node: auto_pad other than NOTSET, pooling dilations, non-constant weights.
"""

from __future__ import annotations

import numpy as np

from .resize import gather_taps


def _s(v):
    return v.decode() if isinstance(v, bytes) else v


def _geometry(n, k):
    """(pads [begin, end] per axis, strides, dilations) of a 3-D node with kernel ``k``."""
    a = n.attrs
    if _s(a.get("auto_pad", "NOTSET")) != "NOTSET":
        raise n.fail(f"3-D {n.op} with auto_pad={_s(a['auto_pad'])!r} is not supported (give pads)")
    p = list(a.get("pads", [0] * 6))
    return [(p[i], p[i + 3]) for i in range(3)], list(a.get("strides", [1, 1, 1])), list(a.get("dilations", [1, 1, 1]))


def _depth_major(b, x, shape):
    """[N, C, D, H, W] -> [N, D, C, H, W]."""
    n, c, d, h, w = shape
    return b.op("Transpose", [x], b.t((n, d, c, h, w)), perm=[0, 2, 1, 3, 4])


def _to_output(b, ydm, y, shape):
    """[N, D', C', H', W'] -> y [N, C', D', H', W']."""
    return b.op("Transpose", [ydm], y, perm=[0, 2, 1, 3, 4])


def conv(g, n, builder_cls):
    """Conv with constant 5-D weights as 2-D convolutions over depth slices, or None."""
    w = g.const(n.input(1))
    xs, ys = g.tensors[n.inputs[0]].shape, g.tensors[n.outputs[0]].shape
    if w is None or w.ndim != 5 or xs is None or ys is None:
        return None
    pads, strides, dil = _geometry(n, w.shape[2:])
    (pd0, pd1), (ph0, ph1), (pw0, pw1) = pads
    nb, c, d, h, wd = xs
    _, o, od, oh, ow = ys
    kd = w.shape[2]
    b = builder_cls(g, n)
    xdm = _depth_major(b, n.inputs[0], xs)
    if pd0 or pd1:
        xdm = b.op("Pad", [xdm], b.t((nb, d + pd0 + pd1, c, h, wd)), mode="constant", value=0.0,
                   pads=[0, pd0, 0, 0, 0, 0, pd1, 0, 0, 0])
    conv2d = dict(kernel_shape=list(w.shape[3:]), pads=[ph0, pw0, ph1, pw1], strides=strides[1:],
                  dilations=dil[1:], group=int(n.attrs.get("group", 1)))
    acc = None
    for j in range(kd):
        idx = np.arange(od) * strides[0] + j * dil[0]
        sl = b.op("Gather", [xdm, b.c(idx.astype(np.int64))], b.t((nb, od, c, h, wd)), axis=1)
        flat = b.op("Reshape", [sl], b.t((nb * od, c, h, wd)), shape=[nb * od, c, h, wd])
        ins = [flat, b.c(np.ascontiguousarray(w[:, :, j]))]
        if j == 0 and n.input(2):
            ins.append(n.inputs[2])
        part = b.op("Conv", ins, b.t((nb * od, o, oh, ow)), **conv2d)
        acc = part if acc is None else b.op("Add", [acc, part], b.t((nb * od, o, oh, ow)))
    ydm = b.op("Reshape", [acc], b.t((nb, od, o, oh, ow)), shape=[nb, od, o, oh, ow])
    _to_output(b, ydm, n.outputs[0], ys)
    return b.nodes


def pool(g, n, builder_cls):
    """MaxPool/AveragePool over a 5-D input as a 2-D pool and a weighted window over depth."""
    xs, ys = g.tensors[n.inputs[0]].shape, g.tensors[n.outputs[0]].shape
    if xs is None or ys is None or len(xs) != 5:
        return None
    if len(n.outputs) > 1 and n.outputs[1]:
        raise n.fail("3-D MaxPool's Indices output is not supported")
    k = list(n.attrs["kernel_shape"])
    pads, strides, dil = _geometry(n, k)
    (pd0, _pd1), (ph0, ph1), (pw0, pw1) = pads
    if any(x != 1 for x in dil):
        raise n.fail(f"3-D pooling dilations {dil} are not supported")
    nb, c, d, h, wd = xs
    _, _, od, oh, ow = ys
    b = builder_cls(g, n)
    xdm = _depth_major(b, n.inputs[0], xs)
    flat = b.op("Reshape", [xdm], b.t((nb * d, c, h, wd)), shape=[nb * d, c, h, wd])
    attrs2d = {key: v for key, v in n.attrs.items() if key in ("ceil_mode", "count_include_pad")}
    p2 = b.op(n.op, [flat], b.t((nb * d, c, oh, ow)), kernel_shape=k[1:], pads=[ph0, pw0, ph1, pw1],
              strides=strides[1:], **attrs2d)
    p5 = b.op("Reshape", [p2], b.t((nb, d, c, oh, ow)), shape=[nb, d, c, oh, ow])
    taps = _depth_taps(n.op, k[0], strides[0], pd0, d, od, int(n.attrs.get("count_include_pad", 0)))
    ydm = gather_taps(b, p5, b.t((nb, od, c, oh, ow)), 1, [nb, od, c, oh, ow], taps,
                      combine="Max" if n.op == "MaxPool" else "Add")
    _to_output(b, ydm, n.outputs[0], ys)
    return b.nodes


def _depth_taps(op, kd, stride, pad, d, od, count_pad):
    """(indices, weights or None) per depth tap j: the depth each output depth reads at tap j.
    A tap outside the input reads a valid depth of the same window (Max: a repeat changes
    nothing) with weight 0 (average)."""
    starts = np.arange(od) * stride - pad
    pos = [starts + j for j in range(kd)]
    valid = [(p >= 0) & (p < d) for p in pos]
    first_valid = np.clip(starts, 0, d - 1)
    idx = [np.where(v, p, first_valid).astype(np.int64) for p, v in zip(pos, valid)]
    if op == "MaxPool":
        return [(i, None) for i in idx]
    count = np.full(od, float(kd)) if count_pad else np.maximum(sum(v.astype(np.float64) for v in valid), 1)
    return [(i, (v / count).astype(np.float32)) for i, v in zip(idx, valid)]


def global_pool(g, n, builder_cls):
    """GlobalAveragePool/GlobalMaxPool over other than 4-D input: ReduceMean/ReduceMax over the
    spatial axes (the pool engine's 2-D form handles 4-D)."""
    xs = g.tensors[n.inputs[0]].shape
    if xs is None or len(xs) == 4:
        return None
    b = builder_cls(g, n)
    reduce = "ReduceMean" if n.op == "GlobalAveragePool" else "ReduceMax"
    b.op(reduce, [n.inputs[0]], n.outputs[0], axes=list(range(2, len(xs))), keepdims=1)
    return b.nodes
