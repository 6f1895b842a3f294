"""Quantised graphs (run inside canonicalise, first): QDQ patterns and the
standard integer operators become int8 MAC work.

* ``DQ(x) -> Conv/MatMul/Gemm(DQ(w), [DQ(b)]) -> [Relu/Clip...] -> Q`` becomes
  one ``QLinearConv`` / ``QLinearMatMul`` node (what onnxruntime's QDQ
  transformer does): int8/uint8 activations x int8 weights -> int32
  accumulation, bias in int32, then a requantisation epilogue whose clamp
  bounds absorb the Relu/Clip.
* ``QLinearConv``, ``QLinearMatMul``, ``ConvInteger`` and ``MatMulInteger``
  are normalised to the same form (the *Integer ops keep their int32 output).
* ``DQ(x) -> MaxPool/Reshape/Flatten/Transpose/Squeeze/Unsqueeze/Concat/
  Slice/Split/Identity -> Q`` with the same (per-tensor) scale and zero point
  on both sides runs on the int8 tensor directly (these ops commute with
  quantisation).
* ``DQ(a), DQ(b) -> Add/Sub/Mul/Max/Min -> [Relu/Clip...] -> Q`` with per-tensor
  parameters (a QDQ residual Add) becomes one node of the same op carrying
  ``attrs['_q']``, lowered to the NPU's ``qbinary``: the float32 DQ/op/Q chain
  in one pass over the int8 tensors, bit-identical to the float island it
  replaces.  Its inputs are ``a, a_scale, a_zp, b, b_scale, b_zp, y_scale,
  y_zp`` (the QLinearAdd signature), so epilogue fusion, which absorbs only
  two-input binaries, never mistakes it for a float residual Add.
* ``DequantizeLinear`` of a constant becomes a float constant; every other
  ``DequantizeLinear``/``QuantizeLinear`` stays and is lowered on its own:
  the boundaries of the float islands, which run in float on the NPU.

The normalised parameters live in ``node.attrs['_q']`` (see :func:`_qnode`).
Bad quantisation parameters (non-constant, zero/negative/non-finite scales,
zero points out of range or of another type, per-axis parameters whose length
does not match the axis) are compile errors.
"""

from __future__ import annotations

import numpy as np

from ..errors import CompileError
from ..ir import Node

QTYPES = (np.dtype(np.int8), np.dtype(np.uint8))
PASSTHROUGH = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat",
               "Slice", "Split", "Identity", "GlobalMaxPool"}
INT_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
_RANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255),
          np.dtype(np.int32): (-(1 << 31), (1 << 31) - 1)}


def run(g) -> None:
    if not any(n.op in INT_OPS or n.op in ("QuantizeLinear", "DequantizeLinear",
                                           "DynamicQuantizeLinear") for n in g.nodes):
        return
    _fold_const_q(g)
    for n in g.nodes:
        if n.op in INT_OPS:
            _normalise_integer_op(g, n)
    _fuse_mac(g)
    _fuse_passthrough(g)
    _fuse_binary(g)
    _fold_const_dq(g)
    for n in g.nodes:
        if n.op in ("QuantizeLinear", "DequantizeLinear") and "_qp" not in n.attrs:
            _check_qdq(g, n)


# --- parameters ------------------------------------------------------------------------------
def params(g, n, scale_name, zp_name, qtype, axis_dim=None, what="", allow_int32=False):
    """(scale float32 [C] or [1], zero point int64 [C] or [1]) of `n`'s
    quantisation parameters; CompileError on anything bad.  `axis_dim` is the
    size of the quantised axis (None: per-tensor only)."""
    qtype = np.dtype(qtype)
    allowed = QTYPES + ((np.dtype(np.int32),) if allow_int32 else ())
    if qtype not in allowed:
        raise n.fail(f"{what}quantised type {qtype} is not supported (the NPU's integer types "
                     f"are int8 and uint8{', and int32' if allow_int32 else ''})")
    s = g.const(scale_name) if scale_name else None
    if s is None:
        raise n.fail(f"{what}scale {scale_name!r} must be a constant")
    s = np.asarray(s)
    if s.dtype != np.float32:
        raise n.fail(f"{what}scale has type {s.dtype}; only float32 scales are supported")
    if s.ndim > 1:
        raise n.fail(f"{what}scale of shape {list(s.shape)}: blocked quantisation is not "
                     "supported (per-tensor or per-axis only)")
    s = s.reshape(-1)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        bad = s[~(np.isfinite(s) & (s > 0))][0]
        raise n.fail(f"{what}scale {float(bad)!r} is invalid: scales must be positive and finite")
    if zp_name:
        z = g.const(zp_name)
        if z is None:
            raise n.fail(f"{what}zero point {zp_name!r} must be a constant")
        z = np.asarray(z)
        lo, hi = _RANGE[qtype]
        zi = z.reshape(-1).astype(np.int64)
        if z.dtype.kind in "iu" and (np.any(zi < lo) or np.any(zi > hi)):
            raise n.fail(f"{what}zero point {int(zi[(zi < lo) | (zi > hi)][0])} is out of range "
                         f"for {qtype} [{lo}, {hi}]")
        if z.dtype != qtype:
            raise n.fail(f"{what}zero point has type {z.dtype}, expected {qtype} (the quantised type)")
        if z.ndim > 1:
            raise n.fail(f"{what}zero point of shape {list(z.shape)}: blocked quantisation is "
                         "not supported")
        z = z.reshape(-1).astype(np.int64)
        if z.size not in (1, s.size):
            raise n.fail(f"{what}zero point has {z.size} elements but the scale has {s.size}")
    else:
        z = np.zeros(1, np.int64)
    lo, hi = _RANGE[qtype]
    if np.any(z < lo) or np.any(z > hi):
        raise n.fail(f"{what}zero point {int(z[(z < lo) | (z > hi)][0])} is out of range for "
                     f"{qtype} [{lo}, {hi}]")
    c = max(s.size, z.size)
    if c > 1:
        if axis_dim is None:
            raise n.fail(f"{what}per-axis parameters ({c} values) but the axis is out of range "
                         "or only per-tensor quantisation is supported here (mismatched axis)")
        if c != axis_dim:
            raise n.fail(f"{what}per-axis parameters have {c} values but the quantised axis "
                         f"has {axis_dim} (mismatched axis)")
    return np.broadcast_to(s, (c,)).astype(np.float32), np.broadcast_to(z, (c,)).copy()


def _axis_info(g, n, data_name):
    shape = g.tensors[data_name].shape
    r = len(shape)
    axis = n.attrs.get("axis", 1)
    if n.attrs.get("block_size", 0):
        raise n.fail("blocked quantisation (block_size) is not supported")
    # the axis matters only for per-axis parameters; `params` refuses those
    # when the axis is out of range (axis_dim None)
    return (axis % r if -r <= axis < r else None), shape


def _check_qdq(g, n) -> None:
    """Validate a standalone Q/DQ and record its parameters in attrs['_qp']."""
    if n.attrs.get("output_dtype", 0) not in (0, 1) and n.op == "DequantizeLinear":
        raise n.fail("DequantizeLinear output_dtype other than float32 is not supported")
    if n.attrs.get("precision", 0) not in (0, 1):
        raise n.fail("QuantizeLinear precision other than float32 is not supported")
    if n.op == "QuantizeLinear":
        out_t = g.tensors[n.outputs[0]]
        qtype = out_t.dtype
        if n.attrs.get("output_dtype", 0) and qtype is None:
            from ..numpy_ops import onnx_dtype_to_np
            qtype = onnx_dtype_to_np(n.attrs["output_dtype"])
        if n.attrs.get("saturate", 1) == 0:
            pass    # only meaningful for float8 outputs
        if qtype is None:
            qtype = np.uint8
        data = n.inputs[0]
    else:
        data = n.inputs[0]
        qtype = g.tensors[data].dtype
    if g.tensors[data].shape is None:
        return
    axis, shape = _axis_info(g, n, data)
    s, z = params(g, n, n.input(1), n.input(2), qtype, None if axis is None else shape[axis],
                  allow_int32=n.op == "DequantizeLinear")
    n.attrs["_qp"] = {"scale": s, "zp": z, "axis": axis, "qtype": np.dtype(qtype).name}


def _dq_of(g, name, producers):
    p = producers.get(name)
    return p if p is not None and p.op == "DequantizeLinear" else None


def _per_tensor(g, n, qtype_name=None):
    """(scale float32 scalar, zp int, qtype) of a Q/DQ node, or None if per-axis."""
    data = n.inputs[0] if n.op == "DequantizeLinear" else n.outputs[0]
    qtype = g.tensors[data].dtype
    if qtype is None or np.dtype(qtype) not in QTYPES:
        return None
    s, z = params(g, n, n.input(1), n.input(2), qtype)
    return float(s[0]), int(z[0]), np.dtype(qtype)


# --- integer operators ------------------------------------------------------------------------
def _weights_int8(n, w: np.ndarray, wzp: np.ndarray):
    """int8 weights and (int64) zero points with the same (w - zp) products: uint8
    weights above 127 shift by 128 (w - 128 fits int8, zp - 128 follows)."""
    if w.dtype == np.uint8 and w.size and w.max() > 127:
        return (w.astype(np.int16) - 128).astype(np.int8), wzp - 128
    return w.astype(np.int8), wzp


def _qnode(n, kind, x, out, q, attrs=None) -> Node:
    node = Node(n.name, kind, [x], [out], dict(attrs or {}))
    node.attrs["_q"] = q
    return node


def _normalise_integer_op(g, n) -> None:
    ins = list(n.inputs) + [""] * 9
    if n.op == "QLinearConv":
        x, xs, xz, w, ws, wz, ys, yz, b = ins[:9]
    elif n.op == "QLinearMatMul":
        x, xs, xz, w, ws, wz, ys, yz = ins[:8]
        b = ""
    elif n.op == "ConvInteger":
        x, w, xz, wz = ins[:4]
        xs = ws = ys = yz = b = ""
    else:  # MatMulInteger
        x, w, xz, wz = ins[:4]
        xs = ws = ys = yz = b = ""
    conv = "Conv" in n.op
    xt = g.tensors[x]
    if xt.const is not None:
        raise n.fail("the quantised activation input must not be a constant")
    wv = g.const(w)
    if wv is None:
        raise n.fail(f"weights {w!r} must be constant")
    if wv.dtype not in QTYPES or xt.dtype is None or np.dtype(xt.dtype) not in QTYPES:
        raise n.fail(f"{n.op} of {xt.dtype} x {wv.dtype} is not supported (int8/uint8 only)")
    cout = wv.shape[0] if conv else wv.shape[-1]
    if n.op.startswith("QLinear"):
        sx, zx = params(g, n, xs, xz, xt.dtype, what="input ")
        sw, zw = params(g, n, ws, wz, wv.dtype, cout, what="weight ")
        out_t = g.tensors[n.outputs[0]]
        sy, zy = params(g, n, ys, yz, out_t.dtype, what="output ")
        scale = (np.float32(sx[0]) * sw / np.float32(sy[0])).astype(np.float32)
        scale = np.broadcast_to(scale, (cout,)).copy()
        ydt = np.dtype(out_t.dtype)
        lo, hi = _RANGE[ydt]
        y = {"scale": scale, "y_zp": int(zy[0]), "lo": lo, "hi": hi, "out_dtype": ydt.name}
    else:
        zx = _int_zp(g, n, xz, xt.dtype, 1, "input ")
        zw = _int_zp(g, n, wz, wv.dtype, cout, "weight ")
        y = {"scale": None, "out_dtype": "int32"}
    bias = np.zeros(cout, np.int64)
    if b:
        bv = g.const(b)
        if bv is None or bv.dtype != np.int32:
            raise n.fail("QLinearConv bias must be a constant int32 tensor")
        bias = bv.reshape(-1).astype(np.int64)
    w8, zw8 = _weights_int8(n, wv, np.broadcast_to(zw, (cout,)).astype(np.int64))
    q = {"x_zp": int(zx[0]), "x_dtype": np.dtype(xt.dtype).name, "w": w8, "w_zp": zw8,
         "bias": bias, **y}
    attrs = {k: v for k, v in n.attrs.items() if k in ("strides", "pads", "dilations", "group",
                                                           "auto_pad", "kernel_shape")}
    new = _qnode(n, "QLinearConv" if conv else "QLinearMatMul", x, n.outputs[0], q, attrs)
    n.op, n.inputs, n.attrs = new.op, new.inputs, new.attrs


def _int_zp(g, n, name, dtype, c, what):
    if not name:
        return np.zeros(1, np.int64)
    z = g.const(name)
    if z is None:
        raise n.fail(f"{what}zero point {name!r} must be a constant")
    z = np.asarray(z)
    if z.dtype != np.dtype(dtype):
        raise n.fail(f"{what}zero point has type {z.dtype}, expected {np.dtype(dtype)}")
    z = z.reshape(-1).astype(np.int64)
    if z.size not in (1, c):
        raise n.fail(f"{what}zero point has {z.size} values for an axis of {c} (mismatched axis)")
    return z


# --- QDQ patterns -------------------------------------------------------------------------------
def _single(g, name, consumers):
    if name in g.outputs:
        return None
    cs = consumers.get(name, [])
    return cs[0] if len(cs) == 1 else None


def _fuse_mac(g) -> None:
    producers, consumers = g.producers(), g.consumers()
    removed, replace = set(), {}
    for q in g.nodes:
        if q.op != "QuantizeLinear" or id(q) in removed:
            continue
        chain = []
        cur = producers.get(q.inputs[0])
        while cur is not None and cur.op in ("Relu", "Clip") and \
                _single(g, cur.outputs[0], consumers) is not None:
            chain.insert(0, cur)
            cur = producers.get(cur.inputs[0])
        p = cur
        if p is None or p.op not in ("Conv", "MatMul", "Gemm") or id(p) in removed:
            continue
        nxt = chain[0] if chain else q
        if _single(g, p.outputs[0], consumers) is not nxt:
            continue
        if any(_single(g, c.outputs[0], consumers) is not (chain[i + 1] if i + 1 < len(chain) else q)
               for i, c in enumerate(chain)):
            continue
        fused = _fuse_one(g, p, chain, q, producers)
        if fused is None:
            continue
        removed.update({id(p), id(q)} | {id(c) for c in chain})
        replace[id(q)] = fused
    if replace:
        g.nodes = [replace.get(id(n), n) for n in g.nodes if id(n) not in removed or id(n) in replace]
        g.prune()


def _fuse_one(g, p, chain, q, producers):
    xdq = _dq_of(g, p.inputs[0], producers)
    wdq = _dq_of(g, p.inputs[1], producers)
    if xdq is None or wdq is None or g.const(xdq.inputs[0]) is not None:
        return None
    wv = g.const(wdq.inputs[0])
    x = xdq.inputs[0]
    xt = g.tensors[x]
    yt = g.tensors[q.outputs[0]]
    if wv is None or xt.dtype is None or np.dtype(xt.dtype) not in QTYPES or wv.dtype not in QTYPES \
            or yt.dtype is None or np.dtype(yt.dtype) not in QTYPES:
        return None
    if p.op == "Gemm" and (p.attrs.get("transA", 0) or float(p.attrs.get("alpha", 1.0)) != 1.0
                           or float(p.attrs.get("beta", 1.0)) != 1.0 or wv.ndim != 2):
        return None
    if p.op == "MatMul" and wv.ndim != 2:
        return None
    conv = p.op == "Conv"
    if p.op == "Gemm" and p.attrs.get("transB", 0):
        wv = wv.T
        waxis = 0
    else:
        waxis = 0 if conv else 1
    cout = wv.shape[0] if conv else wv.shape[1]
    sx, zx = params(g, xdq, xdq.input(1), xdq.input(2), xt.dtype, what="input ")
    wax = wdq.attrs.get("axis", 1)
    wax = wax % wv.ndim
    wdim = g.tensors[wdq.inputs[0]].shape[wax]
    sw, zw = params(g, wdq, wdq.input(1), wdq.input(2), wv.dtype, wdim, what="weight ")
    if sw.size > 1:
        orig_axis = (0 if conv else (0 if p.op == "Gemm" and p.attrs.get("transB", 0) else 1))
        if wax != orig_axis:
            return None      # per-axis along the reduction axis: not a per-channel requant
    sy, zy = params(g, q, q.input(1), q.input(2), yt.dtype, what="output ")
    sw = np.broadcast_to(sw, (cout,)).astype(np.float32)
    zw = np.broadcast_to(zw, (cout,)).astype(np.int64)
    acc_scale = (np.float32(sx[0]) * sw).astype(np.float32)
    bias = np.zeros(cout, np.int64)
    bname = p.input(2)
    if bname:
        bdq = _dq_of(g, bname, producers)
        if bdq is not None and g.const(bdq.inputs[0]) is not None and \
                g.const(bdq.inputs[0]).dtype == np.int32:
            bias = np.asarray(g.const(bdq.inputs[0])).reshape(-1).astype(np.int64)
        else:
            bf = g.const(bname) if bdq is None else None
            if bf is None:
                return None
            bias = np.rint(np.asarray(bf, np.float64).reshape(-1) / acc_scale).astype(np.int64)
        if bias.size != cout:
            bias = np.broadcast_to(bias, (cout,)).copy()
    scale = (acc_scale / np.float32(sy[0])).astype(np.float32)
    ydt = np.dtype(yt.dtype)
    lo, hi = _RANGE[ydt]
    for c in chain:
        if c.op == "Relu":
            a, b = 0.0, np.inf
        else:
            if c.attrs.get("_nonconst"):
                return None
            a = float(c.attrs.get("min", -np.inf))
            b = float(c.attrs.get("max", np.inf))
        if np.isfinite(a):
            lo = max(lo, int(np.rint(np.float32(a) / np.float32(sy[0]))) + int(zy[0]))
        if np.isfinite(b):
            hi = min(hi, int(np.rint(np.float32(b) / np.float32(sy[0]))) + int(zy[0]))
    if lo > hi:
        lo = hi
    if conv:
        w_oihw = wv
    else:
        w_oihw = wv          # [K, N]
    w8, zw8 = _weights_int8(p, w_oihw, zw)
    q_ = {"x_zp": int(zx[0]), "x_dtype": np.dtype(xt.dtype).name, "w": w8, "w_zp": zw8,
          "bias": bias, "scale": scale, "y_zp": int(zy[0]), "lo": int(lo), "hi": int(hi),
          "out_dtype": ydt.name}
    attrs = {k: v for k, v in p.attrs.items() if k in ("strides", "pads", "dilations", "group",
                                                           "auto_pad", "kernel_shape")}
    node = _qnode(p, "QLinearConv" if conv else "QLinearMatMul", x, q.outputs[0], q_, attrs)
    node.attrs["_from"] = f"QDQ {p.op}" + "".join(f"+{c.op}" for c in chain)
    return node


def _fuse_passthrough(g) -> None:
    """DQ -> data-movement op -> Q with identical per-tensor parameters: the op
    runs on the integer tensor (exact: these ops commute with quantisation)."""
    producers, consumers = g.producers(), g.consumers()
    removed = set()
    for n in g.nodes:
        if n.op not in PASSTHROUGH or len([o for o in n.outputs if o]) != 1:
            continue
        acts = [i for i in (n.inputs if n.op == "Concat" else n.inputs[:1]) if i]
        dqs = [_dq_of(g, a, producers) for a in acts]
        if any(d is None or g.const(d.inputs[0]) is not None for d in dqs):
            continue
        qn = _single(g, n.outputs[0], consumers)
        if qn is None or qn.op != "QuantizeLinear" or id(qn) in removed:
            continue
        try:
            pq = _per_tensor(g, qn)
            pds = [_per_tensor(g, d) for d in dqs]
        except CompileError:
            continue
        if pq is None or any(pd != pq for pd in pds):
            continue
        n.inputs = [d.inputs[0] for d in dqs] + (n.inputs[1:] if n.op != "Concat" else [])
        yt = g.tensors[qn.outputs[0]]
        n.outputs = [qn.outputs[0]]
        yt.dtype = pq[2]
        removed.add(id(qn))
    if removed:
        g.nodes = [n for n in g.nodes if id(n) not in removed]
        g.prune()


QBINARY = ("Add", "Sub", "Mul", "Max", "Min")


def _clamp_chain(g, q, producers, consumers):
    """(the node before the Relu/Clip chain that ends at Q `q`, the chain), every
    link single-consumer; None if a Clip bound is not constant."""
    chain = []
    cur = producers.get(q.inputs[0])
    while cur is not None and cur.op in ("Relu", "Clip") and \
            _single(g, cur.outputs[0], consumers) is not None:
        if cur.op == "Clip" and cur.attrs.get("_nonconst"):
            return None, []
        chain.insert(0, cur)
        cur = producers.get(cur.inputs[0])
    return cur, chain


def _clamp_bounds(chain, sy: float, zy: int, lo: int, hi: int) -> tuple[int, int]:
    """Relu/Clip between an op and its Q as bounds in the quantised domain:
    round(bound / y_scale) + y_zp, the float32 division ONNX's Q does."""
    for c in chain:
        a, b = (0.0, np.inf) if c.op == "Relu" else (float(c.attrs.get("min", -np.inf)),
                                                      float(c.attrs.get("max", np.inf)))
        if np.isfinite(a):
            lo = max(lo, int(np.rint(np.float32(a) / np.float32(sy))) + zy)
        if np.isfinite(b):
            hi = min(hi, int(np.rint(np.float32(b) / np.float32(sy))) + zy)
    return min(lo, hi), hi


def _fuse_binary(g) -> None:
    """DQ(a), DQ(b) -> Add/Sub/Mul/Max/Min -> [Relu/Clip...] -> Q, all per-tensor:
    one node of the op with attrs['_q'] (lowered to qbinary)."""
    producers, consumers = g.producers(), g.consumers()
    removed, replace = set(), {}
    for q in g.nodes:
        if q.op != "QuantizeLinear" or id(q) in removed:
            continue
        p, chain = _clamp_chain(g, q, producers, consumers)
        if p is None or p.op not in QBINARY or len(p.inputs) != 2 or id(p) in removed:
            continue
        if _single(g, p.outputs[0], consumers) is not (chain[0] if chain else q):
            continue
        dqs = [_dq_of(g, x, producers) for x in p.inputs]
        if any(d is None or g.const(d.inputs[0]) is not None for d in dqs):
            continue
        try:
            pq = _per_tensor(g, q)
            pa, pb = (_per_tensor(g, d) for d in dqs)
        except CompileError:
            continue        # reported when the Q/DQ are lowered on their own
        if pq is None or pa is None or pb is None:
            continue
        sy, zy, ydt = pq
        lo, hi = _clamp_bounds(chain, sy, zy, *_RANGE[ydt])
        node = Node(p.name, p.op, [dqs[0].inputs[0], dqs[0].input(1), dqs[0].input(2),
                                   dqs[1].inputs[0], dqs[1].input(1), dqs[1].input(2),
                                   q.input(1), q.input(2)], [q.outputs[0]])
        node.attrs["_q"] = {"a_scale": pa[0], "a_zp": pa[1], "b_scale": pb[0], "b_zp": pb[1],
                            "y_scale": sy, "y_zp": zy, "lo": lo, "hi": hi}
        node.attrs["_from"] = f"QDQ {p.op}" + "".join(f"+{c.op}" for c in chain)
        removed.update({id(p), id(q)} | {id(c) for c in chain})
        replace[id(q)] = node
    if replace:
        g.nodes = [replace.get(id(n), n) for n in g.nodes if id(n) not in removed or id(n) in replace]
        g.prune()


def _fold_const_q(g) -> None:
    """QuantizeLinear of a constant (float weights quantised in the graph) -> an
    integer constant, computed as ONNX does (float32 division, half-even)."""
    keep = []
    for n in g.nodes:
        if n.op == "QuantizeLinear" and g.const(n.inputs[0]) is not None:
            _check_qdq(g, n)
            qp = n.attrs["_qp"]
            x = np.asarray(g.const(n.inputs[0]), np.float32)
            bshape = [1] * x.ndim
            if qp["scale"].size > 1:
                bshape[qp["axis"]] = qp["scale"].size
            s = qp["scale"].reshape(bshape) if x.ndim else qp["scale"].reshape(())
            z = qp["zp"].reshape(bshape) if x.ndim else qp["zp"].reshape(())
            lo, hi = _RANGE[np.dtype(qp["qtype"])]
            val = np.clip(np.rint(x / s) + z, lo, hi).astype(qp["qtype"])
            t = g.t(n.outputs[0])
            t.const, t.shape, t.dtype = np.ascontiguousarray(val), tuple(val.shape), val.dtype
            continue
        keep.append(n)
    g.nodes = keep


def _fold_const_dq(g) -> None:
    keep = []
    for n in g.nodes:
        if n.op == "DequantizeLinear" and g.const(n.inputs[0]) is not None:
            x = np.asarray(g.const(n.inputs[0]))
            axis, shape = _axis_info(g, n, n.inputs[0])
            s, z = params(g, n, n.input(1), n.input(2), x.dtype,
                          None if axis is None else shape[axis], allow_int32=True)
            bshape = [1] * x.ndim
            if s.size > 1:
                bshape[axis] = s.size
            val = ((x.astype(np.int64) - z.reshape(bshape if s.size > 1 or z.size > 1 else ()))
                   .astype(np.float32) * s.reshape(bshape if s.size > 1 else ()))
            t = g.t(n.outputs[0])
            t.const = np.ascontiguousarray(val.astype(np.float32))
            t.shape = tuple(val.shape)
            t.dtype = np.dtype(np.float32)
            continue
        keep.append(n)
    g.nodes = keep
