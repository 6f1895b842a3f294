"""Instance and group normalisation of any rank as the 4-D ``InstanceNormalization`` the
``norm`` command runs (part of decomposition).

* ``InstanceNormalization`` over [N, C, *S] with S not two axes: ``Reshape`` (an alias) to
  [N, C, 1, prod(S)], normalise, ``Reshape`` back; the statistics are over the same elements.
* ``GroupNormalization`` (and torch's GroupNorm, which exports as an InstanceNormalization over
  [N, G, -1] followed by the affine): ``Reshape`` to [N, G, 1, (C/G) * prod(S)], an
  InstanceNormalization with unit scale and zero shift, ``Reshape`` back, then the per-channel
  scale and bias (``Mul``/``Add`` by constants, fused as an epilogue).  Opset 18's per-group
  scale and bias are repeated over each group's channels.
"""

from __future__ import annotations

import numpy as np


def _flat(b, x, shape, rows):
    """``x`` as [N, rows, 1, L] (a Reshape: an alias, no data movement)."""
    n = shape[0]
    length = int(np.prod(shape[1:])) // rows
    return b.op("Reshape", [x], b.t((n, rows, 1, length)), shape=[n, rows, 1, length])


def instance_norm(g, n, builder_cls):
    """InstanceNormalization of other than 4-D input, or None (4-D, unknown shape)."""
    xs = g.tensors[n.inputs[0]].shape
    if xs is None or len(xs) == 4 or len(xs) < 3:
        return None
    b = builder_cls(g, n)
    flat = _flat(b, n.inputs[0], xs, xs[1])
    normed = b.op("InstanceNormalization", [flat] + n.inputs[1:3], b.t(g.tensors[flat].shape),
                  epsilon=float(n.attrs.get("epsilon", 1e-5)))
    b.op("Reshape", [normed], n.outputs[0], shape=list(xs))
    return b.nodes


def group_norm(g, n, builder_cls):
    """GroupNormalization as an InstanceNormalization over groups and a per-channel affine."""
    xs = g.tensors[n.inputs[0]].shape
    scale, bias = g.const(n.input(1)), g.const(n.input(2))
    if scale is None or bias is None:
        raise n.fail("GroupNormalization scale and bias must be constant")
    if xs is None or len(xs) < 3:
        raise n.fail("GroupNormalization needs an input of known shape and rank >= 3")
    groups, c = int(n.attrs["num_groups"]), xs[1]
    if c % groups:
        raise n.fail(f"GroupNormalization: {c} channels are not divisible into {groups} groups")
    scale, bias = (np.repeat(np.asarray(v, np.float32).reshape(-1), c // groups) if np.size(v) == groups != c
                   else np.asarray(v, np.float32).reshape(-1) for v in (scale, bias))
    y = g.tensors[n.outputs[0]]
    if y.shape is None:    # onnx's shape inference leaves GroupNormalization's output unknown
        y.shape, y.dtype = tuple(xs), np.dtype(np.float32)
    b = builder_cls(g, n)
    flat = _flat(b, n.inputs[0], xs, groups)
    normed = b.op("InstanceNormalization", [flat, b.c(np.ones(groups, np.float32)), b.c(np.zeros(groups, np.float32))],
                  b.t(g.tensors[flat].shape), epsilon=float(n.attrs.get("epsilon", 1e-5)))
    back = b.op("Reshape", [normed], b.t(xs), shape=list(xs))
    per_channel = (c,) + (1,) * (len(xs) - 2)
    scaled = b.op("Mul", [back, b.c(scale.reshape(per_channel))], b.t(xs))
    b.op("Add", [scaled, b.c(bias.reshape(per_channel))], n.outputs[0])
    return b.nodes
