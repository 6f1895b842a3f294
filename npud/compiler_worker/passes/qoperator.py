"""Front end, inside import and before shape inference: onnxruntime's QOperator int8 ops of the
``com.microsoft`` domain become the QDQ form they stand for (``DequantizeLinear`` -> float op ->
``QuantizeLinear``), which ONNX shape inference knows and :mod:`.quantize` lowers to the same
int8 paths as every QDQ model (``qbinary``, int8 data movement, ``QLinearMatMul``...).

``QLinearConv`` and ``QLinearMatMul`` are default-domain ops and compile as they are.  Each op's
semantics is its onnxruntime contrib-op definition: ``y = Q(op(DQ(a), DQ(b)))`` with every
scale and zero point per tensor (per channel for ``QGemm``'s B).
"""

from __future__ import annotations

import numpy as np

from ..ir import Node

MS = "com.microsoft"


def run(g) -> None:
    """Replace every supported com.microsoft QOperator node of `g` by its QDQ form; other
    nodes (and unknown com.microsoft ops, for legalisation to refuse) stay."""
    new = []
    for n in g.nodes:
        if n.domain == MS and n.op in _SAME_AS_DEFAULT:
            _as_default_domain(n)
        spec = _OPS.get(n.op) if n.domain == MS else None
        new.extend(_expand(g, n, *spec) if spec else [n])
    g.nodes = new
    g.toposort()


# com.microsoft ops that are the default-domain op of the same name plus a `channels_last` layout flag
_SAME_AS_DEFAULT = ("QLinearConv",)


def _as_default_domain(n: Node) -> None:
    """A com.microsoft QLinearConv (onnxruntime's NHWC-capable variant) in NCHW layout is the
    default-domain op; in NHWC layout it is refused."""
    if n.attrs.get("channels_last", 0):
        raise n.fail(f"{n.op} with channels_last=1 is not supported (NCHW only)")
    n.attrs.pop("channels_last", None)
    n.domain = ""


# op -> (float op, [(x, scale, zp) input index triples], (y_scale, y_zp) indices, attrs kept)
_POOL_ATTRS = ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides")
_OPS = {
    "QLinearAdd": ("Add", [(0, 1, 2), (3, 4, 5)], (6, 7), ()),
    "QLinearMul": ("Mul", [(0, 1, 2), (3, 4, 5)], (6, 7), ()),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", [(0, 1, 2)], (3, 4), ()),
    "QLinearAveragePool": ("AveragePool", [(0, 1, 2)], (3, 4), _POOL_ATTRS),
    "QLinearLeakyRelu": ("LeakyRelu", [(0, 1, 2)], (3, 4), ("alpha",)),
    "QLinearSigmoid": ("Sigmoid", [(0, 1, 2)], (3, 4), ()),
    "QLinearSoftmax": ("Softmax", [(0, 1, 2)], (3, 4), ("axis",)),
    "QLinearConcat": ("Concat", None, (0, 1), ("axis",)),       # triples from input 2 on
    "QGemm": ("Gemm", None, (7, 8), ("alpha", "transA", "transB")),
}


def _expand(g, n, op, triples, yq, kept) -> list:
    """`n` as DQ of each quantised input, the float op, and Q of its result (none if `n`'s
    output scale is absent: QGemm then outputs float)."""
    if n.attrs.get("channels_last", 0):
        raise n.fail(f"{n.op} with channels_last=1 is not supported (NCHW only)")
    if op == "Softmax" and (int(n.attrs.get("opset", g.opset)) < 13) != (g.opset < 13) \
            and n.attrs.get("axis", -1) != -1:
        raise n.fail(f"QLinearSoftmax of opset {n.attrs.get('opset')} semantics on axis "
                     f"{n.attrs.get('axis')} in an opset-{g.opset} graph is not supported")
    if triples is None:
        triples = ([(i, i + 1, i + 2) for i in range(2, len(n.inputs), 3)] if op == "Concat"
                   else [(0, 1, 2), (3, 4, 5)])
    nodes, floats = [], []
    for k, (x, s, z) in enumerate(triples):
        nodes.append(_dq(g, n, k, n.input(x), n.input(s), n.input(z), axis=_axis(g, n, k)))
        floats.append(nodes[-1].outputs[0])
    if op == "Gemm" and n.input(6):
        floats.append(_gemm_bias(g, n, nodes))
    y = n.outputs[0]
    attrs = {a: n.attrs[a] for a in kept if a in n.attrs}
    if not n.input(yq[0]):
        nodes.append(Node(f"{n.name}/{op}", op, floats, [y], attrs))
        return nodes
    yf = g.fresh(f"{y}/float")
    nodes.append(Node(f"{n.name}/{op}", op, floats, [yf], attrs))
    nodes.append(Node(f"{n.name}/Q", "QuantizeLinear",
                      [yf, n.input(yq[0])] + ([n.input(yq[1])] if n.input(yq[1]) else []), [y]))
    return nodes


def _dq(g, n, k, x, scale, zp, axis=None) -> Node:
    out = g.fresh(f"{n.name}/dq{k}")
    attrs = {} if axis is None else {"axis": axis}
    return Node(f"{n.name}/DQ{k}", "DequantizeLinear", [x, scale] + ([zp] if zp else []), [out], attrs)


def _axis(g, n, k):
    """QGemm's B may be per output channel: along axis 0 of a transposed B, else axis 1."""
    if n.op != "QGemm" or k != 1:
        return None
    s = g.const(n.input(4))
    if s is None or np.asarray(s).size <= 1:
        return None
    return 0 if n.attrs.get("transB", 0) else 1


def _gemm_bias(g, n, nodes) -> str:
    """QGemm's int32 bias C, dequantised with scale a_scale * b_scale and zero point 0."""
    sa, sb = g.const(n.input(1)), g.const(n.input(4))
    if sa is None or sb is None:
        raise n.fail("QGemm with a bias needs constant input scales")
    scale = (np.float32(np.asarray(sa).reshape(-1)[0]) * np.asarray(sb, np.float32).reshape(-1))
    scale = g.add_const(f"{n.name}/bias_scale", scale.astype(np.float32).reshape(-1)
                        if scale.size > 1 else np.float32(scale[0]))
    zp = g.add_const(f"{n.name}/bias_zp", np.zeros(np.shape(g.const(scale)), np.int32))
    nodes.append(_dq(g, n, "b", n.input(6), scale, zp, axis=0 if np.size(g.const(scale)) > 1 else None))
    return nodes[-1].outputs[0]
