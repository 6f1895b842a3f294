"""The declarative support table: which ONNX ops the npu-emu backend
compiles, with which dtypes, ranks and attributes.

Each entry names the lowering (``kernel``) and a tuple of checks; a check
is ``(description, predicate)`` where ``predicate(node, graph)`` returns
``None`` when the node is fine or a reason string.  ``legalise`` reports
every violation (see :mod:`npud.compiler_worker.passes.legalize`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OpSupport:
    op: str
    kernel: str
    group: int
    ranks: tuple = (0, 8)           # rank range of the activation inputs
    checks: tuple = ()
    const_inputs: tuple = ()        # input indices that must be constant
    note: str = ""
    int8: bool = False              # may carry int8/uint8 (and int32) tensors
    ints: bool = False              # may carry int64/int32 index tensors (int32 on the device)


def _attr_in(name, allowed, default):
    def check(n, g):
        v = n.attrs.get(name, default)
        if isinstance(v, bytes):
            v = v.decode()
        return None if v in allowed else f"attribute {name}={v!r} is not supported (supported: {allowed})"
    return (f"{name} in {allowed}", check)


def _rank(i, ranks):
    def check(n, g):
        t = g.tensors.get(n.input(i))
        if t is None or t.shape is None:
            return None
        return None if len(t.shape) in ranks else f"input {i} has rank {len(t.shape)}; supported ranks: {ranks}"
    return (f"input {i} rank in {ranks}", check)


def _pads_lt_kernel(n, g):
    k = n.attrs.get("kernel_shape", [])
    p = n.attrs.get("pads", [0] * 2 * len(k))
    for i, kk in enumerate(k):
        if p[i] >= kk or p[i + len(k)] >= kk:
            return f"pads {p} must be smaller than the kernel {k}"
    return None


def _no_dilation(n, g):
    d = n.attrs.get("dilations", [1, 1])
    return None if all(x == 1 for x in d) else f"pooling dilations {d} are not supported"


def _no_ceil_with_pad_count(n, g):
    if n.attrs.get("ceil_mode", 0) and n.attrs.get("count_include_pad", 0):
        return "ceil_mode together with count_include_pad is not supported"
    return None


def _positive_steps(n, g):
    steps = n.attrs.get("steps")
    if steps and any(s <= 0 for s in steps):
        return f"negative Slice steps {steps} are not supported"
    return None


def _pad_constant(n, g):
    mode = n.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode in ("reflect", "edge"):   # left here only when decompose could not turn it into Slices and a Concat
        return (f"Pad mode {mode!r} needs pads and an input shape known at compile time "
                "(give input_shapes, or make the pads a constant)")
    if mode != "constant":
        return f"Pad mode {mode!r} is not supported (supported: constant, reflect, edge)"
    if any(p < 0 for p in n.attrs.get("pads", [])):
        return "negative pads are not supported"
    return None


def _cast_float(n, g):
    from .numpy_ops import onnx_dtype_to_np
    to = onnx_dtype_to_np(n.attrs.get("to", 1))
    return None if to in (np.float32, np.bool_, np.int32, np.int64) else \
        f"Cast of an activation to {to} is not supported (float32, bool, int32 and int64 are)"


def _gelu(n, g):
    a = n.attrs.get("approximate", "none")
    a = a.decode() if isinstance(a, bytes) else a
    return None if a in ("none", "tanh") else f"Gelu approximate={a!r} is not supported"


def _float_operands(n, g):
    for name in n.inputs[1:] if n.op == "Where" else n.inputs:
        t = g.tensors.get(name)
        if t is not None and t.dtype is not None and np.dtype(t.dtype) not in _INDEX_TYPES:
            return f"{n.op} of {t.dtype} operands is not supported (float32, bool, int32, int64)"
    return None


_INDEX_TYPES = (np.dtype(np.float32), np.dtype(np.bool_), np.dtype(np.int32), np.dtype(np.int64))


def _known_at_load(*idx):
    def check(n, g):
        bad = [n.input(i) for i in idx if n.input(i) and g.const(n.input(i)) is None]
        return None if not bad else (f"{n.op}'s input(s) {bad} must be known at load (computed only "
                                     f"from constants and static shapes): its output depends on them")
    return (f"inputs {idx} known at load", check)


def _softmax_axis(n, g):
    return None


def _layernorm_stash(n, g):
    return None if len([o for o in n.outputs if o]) == 1 else \
        "LayerNormalization's optional Mean/InvStdDev outputs are not supported"   # decomposed before


def _dropout_eval(n, g):
    return None if not n.attrs.get("training_mode", 0) else "Dropout in training mode is not supported"


def _bn_inference(n, g):
    if n.attrs.get("training_mode", 0):
        return "BatchNormalization in training mode is not supported"
    return None


def _conv_2d(n, g):
    w = g.tensors.get(n.input(1))
    if w is None or w.const is None:
        return "Conv weights must be constant"
    if w.const.ndim != 4:
        return f"only 1-D and 2-D convolution are supported (weights of rank {w.const.ndim})"
    return None


def _gather_const(n, g):
    t = g.tensors.get(n.input(1))
    if t is None or t.const is None:
        return None      # run-time indices: dma_gather (kernels/index.py)
    x = g.tensors.get(n.input(0))
    dim = x.shape[n.attrs.get("axis", 0) % len(x.shape)] if x is not None and x.shape else None
    idx = t.const.astype(np.int64)
    if dim is not None and idx.size and (idx.min() < -dim or idx.max() >= dim):
        return f"Gather index {int(idx.min() if idx.min() < -dim else idx.max())} is out of range for an axis of {dim}"
    return None


def _ew(op, kernel="eltwise", group=1, **kw):
    return OpSupport(op, kernel, group, **kw)


_POOL = (_pads_lt_kernel, _no_dilation, _no_ceil_with_pad_count)

SUPPORT: dict[str, OpSupport] = {s.op: s for s in [
    # group 1
    OpSupport("Conv", "conv", 1, checks=(("2-D, constant weights", _conv_2d),
                                         _rank(0, (4,)))),
    OpSupport("MatMul", "matmul", 1, ranks=(1, 6)),
    OpSupport("Gemm", "matmul", 1, note="lowered to MatMul + bias"),
    _ew("Add"), _ew("Sub"), _ew("Mul"), _ew("Div"),
    _ew("Relu", "unary"), _ew("Clip", "unary"), _ew("Sigmoid", "unary"), _ew("Tanh", "unary"),
    OpSupport("MaxPool", "pool", 1, checks=tuple((f.__name__, f) for f in _POOL) + (
        _rank(0, (4,)), ("single output", lambda n, g: None if len([o for o in n.outputs if o]) == 1
                         else "MaxPool's Indices output is not supported"))),
    OpSupport("AveragePool", "pool", 1, checks=tuple((f.__name__, f) for f in _POOL) + (_rank(0, (4,)),)),
    OpSupport("GlobalAveragePool", "pool", 1, checks=(_rank(0, (4,)),)),
    OpSupport("BatchNormalization", "eltwise", 1, checks=(("inference mode", _bn_inference),),
              const_inputs=(1, 2, 3, 4), note="folded into the preceding Conv, else Mul+Add"),
    OpSupport("Flatten", "alias", 1), OpSupport("Reshape", "alias", 1),
    OpSupport("Transpose", "copy", 1),
    OpSupport("Concat", "copy", 1),
    OpSupport("Softmax", "softmax", 1),
    OpSupport("Identity", "alias", 1),
    OpSupport("Dropout", "alias", 1, checks=(("inference mode", _dropout_eval),)),
    OpSupport("Constant", "const", 1),
    # group 2
    _ew("LeakyRelu", "unary", 2), _ew("HardSigmoid", "unary", 2), _ew("HardSwish", "unary", 2),
    _ew("Erf", "unary", 2), OpSupport("Gelu", "unary", 2, checks=(("exact or tanh form", _gelu),)),
    _ew("Exp", "unary", 2), _ew("Log", "unary", 2), _ew("Sqrt", "unary", 2),
    _ew("Reciprocal", "unary", 2), _ew("Neg", "unary", 2), _ew("Abs", "unary", 2),
    _ew("Pow", group=2),
    OpSupport("LayerNormalization", "norm", 2, checks=(("one output", _layernorm_stash),),
              const_inputs=(1, 2)),
    OpSupport("ReduceMean", "reduce", 2), OpSupport("ReduceSum", "reduce", 2),
    OpSupport("ReduceMax", "reduce", 2), OpSupport("ReduceMin", "reduce", 2),
    OpSupport("Split", "copy", 2), OpSupport("Slice", "copy", 2, checks=(("positive steps", _positive_steps),)),
    OpSupport("Gather", "copy", 2, checks=(("constant indices in range", _gather_const),)),
    OpSupport("Squeeze", "alias", 2), OpSupport("Unsqueeze", "alias", 2),
    OpSupport("Pad", "copy", 2, checks=(("constant mode", _pad_constant),)),
    OpSupport("Shape", "const", 2, note="folded"), OpSupport("ConstantOfShape", "const", 2, note="folded"),
    OpSupport("Cast", "alias", 2, checks=(("to float32", _cast_float),)),
    _ew("Sum", group=2), _ew("Min", group=2), _ew("Max", group=2),
    OpSupport("GlobalMaxPool", "pool", 2, checks=(_rank(0, (4,)),)),
    OpSupport("LogSoftmax", "softmax", 2),
    # group 3
    OpSupport("InstanceNormalization", "norm", 3, checks=(_rank(0, (4,)),), const_inputs=(1, 2),
              note="other ranks: the 4-D form between Reshapes (passes/norms.py)"),
    OpSupport("GroupNormalization", "decomposed", 3, note="InstanceNormalization over [N, G, 1, -1] and a "
              "per-channel Mul/Add (passes/norms.py)"),
    OpSupport("Expand", "copy", 3),
    OpSupport("Resize", "decomposed", 3, note="nearest/linear/cubic: Gathers with constant indices, "
              "constant weights (passes/resize.py)"),
    OpSupport("LRN", "decomposed", 3, note="Mul, 1x1 Conv with a band matrix, Pow, Div"),
    OpSupport("LSTM", "decomposed", 3, note="unrolled over time: MatMul/Add/Sigmoid/Tanh/Mul per step "
              "(passes/recurrent.py); default activations, no clip, peepholes or input_forget"),
    OpSupport("GRU", "decomposed", 3, note="unrolled over time (passes/recurrent.py); both "
              "linear_before_reset forms; default activations, no clip"),
    OpSupport("RNN", "decomposed", 3, note="unrolled over time (passes/recurrent.py); Tanh, no clip"),
    OpSupport("ConvTranspose", "decomposed", 3, note="1-D/2-D: zero insertion (data movement) + Conv"),
    OpSupport("Equal", "eltwise", 3, checks=(("float32 operands", _float_operands),),
              note="vbinary eq; the bool result is a 0/1 float32 mask"),
    OpSupport("Less", "eltwise", 3, checks=(("float32 operands", _float_operands),),
              note="vbinary lt"),
    OpSupport("Greater", "eltwise", 3, checks=(("float32 operands", _float_operands),),
              note="vbinary gt"),
    OpSupport("Where", "select", 3, checks=(("float32 operands", _float_operands),),
              note="select; the condition is a mask"),
    # integer tensors and masks (lower_index.py): int64/int32 are int32 on the device
    OpSupport("GreaterOrEqual", "eltwise", 3, note="vbinary ge into a 0/1 float32 mask"),
    OpSupport("LessOrEqual", "eltwise", 3, note="vbinary le into a 0/1 float32 mask"),
    OpSupport("And", "eltwise", 3, note="min of two masks"), OpSupport("Or", "eltwise", 3, note="max of two masks"),
    OpSupport("Xor", "eltwise", 3, note="vbinary ne of two masks"), OpSupport("Not", "eltwise", 3, note="mask == 0"),
    OpSupport("IsNaN", "eltwise", 3, note="vbinary ne(x, x)"), OpSupport("IsInf", "eltwise", 3, note="|x| == inf"),
    OpSupport("Mod", "eltwise", 3, note="vbinary mod (fmod=0) or fmod (fmod=1)"),
    OpSupport("CumSum", "decomposed", 3, note="MatMul by a triangular 0/1 matrix (integers exact below "
              "2^24)"),
    OpSupport("GatherElements", "index", 3, note="flat positions on the vector engine, then a "
              "one-element-per-row dma_gather; folded when its inputs are known at load"),
    OpSupport("Range", "const", 3, checks=(_known_at_load(0, 1, 2),), note="folded at load"),
    OpSupport("Trilu", "const", 3, checks=(_known_at_load(0, 1),), note="folded at load"),
    OpSupport("If", "const", 3, checks=(_known_at_load(0),),
              note="folded at load: the branch its condition picks is inlined"),
    # quantised (issue 5): int8/uint8 tensors, int32 accumulation
    OpSupport("QuantizeLinear", "quant", 4, int8=True,
              note="float32 -> int8/uint8, per-tensor or per-axis: vbinary div + requant"),
    OpSupport("DequantizeLinear", "dequant", 4, int8=True,
              note="int8/uint8/int32 -> float32, per-tensor or per-axis (a constant one is folded)"),
    OpSupport("QLinearConv", "qconv", 4, int8=True,
              note="int8 MAC, int32 accumulator and bias, per-channel requant epilogue; also "
                   "every QDQ Conv (+Relu/Clip folded into the requant bounds)"),
    OpSupport("ConvInteger", "qconv", 4, int8=True, note="int8 MAC, int32 output"),
    OpSupport("QLinearMatMul", "qmatmul", 4, int8=True,
              note="int8 MAC + requant; also every QDQ MatMul/Gemm (+Relu/Clip)"),
    OpSupport("MatMulInteger", "qmatmul", 4, int8=True, note="int8 MAC, int32 output"),
    OpSupport("DynamicQuantizeLinear", "dynq", 4, int8=True,
              note="min/max reductions, scale and zero point computed on the device"),
]}

# data movement that commutes with quantisation: runs on int8 tensors as well
for _op in ("MaxPool", "GlobalMaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
            "Concat", "Slice", "Split", "Identity"):
    SUPPORT[_op] = OpSupport(**{**SUPPORT[_op].__dict__, "int8": True})


_BYTES = (np.dtype(np.int8), np.dtype(np.uint8))


def _qdq_only(n, g):
    """Integer operands only as a fused QDQ pattern (passes/quantize.py): the
    device's integer adds saturate where ONNX's wrap."""
    if "_q" in n.attrs:
        return None
    for i in n.inputs:
        t = g.tensors.get(i) if i else None
        if t is not None and t.const is None and t.dtype is not None and np.dtype(t.dtype) in _BYTES:
            return (f"{n.op} of integer tensors is supported only between DequantizeLinear and "
                    "QuantizeLinear (a QDQ pattern)")
    return None


# ops that carry int64/int32 tensors (indices, positions, shapes, masks computed at run time)
for _op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Concat", "Slice", "Split",
            "Transpose", "Expand", "Gather", "Cast", "Equal", "Less", "Greater", "GreaterOrEqual",
            "LessOrEqual", "Where", "Mod", "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Neg", "Abs",
            "Relu", "CumSum", "Dropout", "Range", "GatherElements", "Trilu"):
    SUPPORT[_op] = OpSupport(**{**SUPPORT[_op].__dict__, "ints": True})
# a run-time zero point (DynamicQuantizeLinear's uint8) cast to int32 (passes/integers.py), and
# quantize_dynamic's uint8 embedding tables looked up by Gather (dma_gather copies bytes)
for _op in ("Cast", "Gather"):
    SUPPORT[_op] = OpSupport(**{**SUPPORT[_op].__dict__, "int8": True})


# binary ops between DequantizeLinear and QuantizeLinear: qbinary on the int8 tensors
for _op in ("Add", "Sub", "Mul", "Max", "Min"):
    _s = SUPPORT[_op]
    SUPPORT[_op] = OpSupport(**{**_s.__dict__, "int8": True,
                                "checks": _s.checks + (("integer only as QDQ", _qdq_only),),
                                "note": "int8: a QDQ pattern becomes `qbinary`"})


def table_rows() -> list[tuple]:
    """(op, group, kernel, checks, note) for docs and `npuctl`."""
    return [(s.op, s.group, s.kernel, ", ".join(c[0] for c in s.checks), s.note)
            for s in sorted(SUPPORT.values(), key=lambda s: (s.group, s.op))]
