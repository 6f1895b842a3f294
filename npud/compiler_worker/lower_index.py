"""Lowering of the index family: integer tensors, masks and the ops that make them.

Device types: int64 and int32 tensors (token ids, positions, indices, shapes computed at run
time) are int32 on the device, bool tensors are 0/1 float32 masks (as everywhere on this
target).  An int64 graph input arrives as int64 (the I/O table says so) and is narrowed on
the device by a strided copy of each value's low word; an int64 output is widened the same
way with its sign word.  Values outside the int32 range therefore wrap on input and
arithmetic saturates, where ONNX would compute in 64 bits: docs/ISA.md's integer rules.

:func:`lower` turns one IR node into lowered ops on :class:`~.passes.layout.Lowerer` ``lw``;
every operand is taken in the logical (ONNX) layout.
"""

from __future__ import annotations

import numpy as np

from .lowered import LOp, cstrides

F32, I32 = "float32", "int32"
INT32_RANGE = (-(1 << 31), (1 << 31) - 1)
COMPARE = {"Equal": "EQ", "Less": "LT", "Greater": "GT", "GreaterOrEqual": "GE",
           "LessOrEqual": "LE"}
# masks are 0/1 floats: And is min, Or max, Xor "not equal"
LOGIC = {"And": "MIN", "Or": "MAX", "Xor": "NE"}
ARITH = {"Add": "ADD", "Sub": "SUB", "Mul": "MUL", "Div": "DIV", "Max": "MAX", "Min": "MIN", "Sum": "ADD"}
GATHER_COPY_MAX = 1024   # more constant indices than this: one dma_gather, not a copy per run
INT_UNARY = {"Neg": "NEG", "Abs": "ABS", "Relu": "RELU"}


def device_dtype(dtype) -> str:
    """The device type of a tensor of numpy ``dtype``: int32 for int64/int32, the 8-bit types
    as they are, float32 for floats and bool (a mask)."""
    dt = np.dtype(dtype) if dtype is not None else np.dtype(np.float32)
    if dt in (np.dtype(np.int64), np.dtype(np.int32)):
        return I32
    if dt in (np.dtype(np.int8), np.dtype(np.uint8)):
        return dt.name
    return F32


def io_dtype(dtype) -> str:
    """The element type of a graph input or output in the I/O table: the model's own type for
    int64, int32, int8, uint8 and bool (one byte, 0/1, converted on the device to and from its
    float32 mask), float32 for the floats -- so a heterogeneous model's partitions agree on a
    boundary tensor's bytes with the cpu device, and a client feeds what onnxruntime takes."""
    dt = np.dtype(dtype) if dtype is not None else np.dtype(np.float32)
    return dt.name if dt.name in ("int64", "int32", "int8", "uint8", "bool") else F32


def const_value(value: np.ndarray, dtype: str) -> np.ndarray:
    """A constant as the device holds it: int64 values saturate to the int32 range."""
    value = np.asarray(value)
    if dtype == I32 and value.dtype.kind in "iu":
        value = np.clip(value, *INT32_RANGE)
    return np.asarray(value, dtype)


def is_int(lw, name: str) -> bool:
    return device_dtype(lw.g.tensors[name].dtype) == I32


def handles(lw, n) -> bool:
    """Whether ``n`` belongs to the index family (else its usual kernel lowers it)."""
    if n.op in COMPARE or n.op in LOGIC or n.op in ("Not", "Cast", "IsNaN", "IsInf", "Mod", "GatherElements"):
        return True
    if n.op == "Gather":   # constant indices in few runs are strided copies (layout.py)
        idx = lw.g.const(n.inputs[1])
        return idx is None or idx.size > GATHER_COPY_MAX
    if n.op == "Where":
        return is_int(lw, n.outputs[0])
    return (n.op in ARITH or n.op in INT_UNARY) and "_q" not in n.attrs and is_int(lw, n.outputs[0])


def lower(lw, n) -> None:
    """Lower node ``n`` of the index family."""
    if n.op == "Gather":
        return _gather(lw, n)
    if n.op == "GatherElements":
        return _gather_elements(lw, n)
    if n.op == "Cast":
        return _cast(lw, n)
    if n.op in INT_UNARY:
        return _unary(lw, n, INT_UNARY[n.op], n.inputs[0])
    if n.op == "Not":
        return _binary(lw, n, "EQ", n.inputs[0], _scalar(lw, n, 0, F32))
    if n.op == "IsNaN":
        return _binary(lw, n, "NE", n.inputs[0], n.inputs[0])
    if n.op == "IsInf":
        return _isinf(lw, n)
    if n.op == "Where":
        return _where(lw, n)
    if n.op == "Mod":
        return _binary(lw, n, "FMOD" if n.attrs.get("fmod", 0) else "MOD", *n.inputs[:2])
    func = COMPARE.get(n.op) or LOGIC.get(n.op) or ARITH[n.op]
    _chain(lw, n, func, n.inputs)


# --- helpers -------------------------------------------------------------------------------
def operand(lw, name: str, rank: int | None = None) -> str:
    """The PTensor holding IR tensor ``name`` in the logical layout, constants in their
    device type (int64 saturated to int32)."""
    t = lw.g.tensors[name]
    # Lowerer.get saturates the constant (const_value) and caches it per dtype: each constant is
    # stored once however many nodes read it.
    return lw.get(name, None, rank, dtype=device_dtype(t.dtype if t.const is None else t.const.dtype))


def _scalar(lw, n, value, dtype: str) -> str:
    return lw.g.add_const(f"{n.name}.k", np.asarray(value, dtype))


def _emit_elt(lw, n, kind: str, p: dict, ins: list, out) -> None:
    lw.ops.append(LOp(kind, n.name, n.op, ins, [out.name], {**p, "epilogue": [], "native": True}))


def _binary(lw, n, func: str, a: str, b: str) -> None:
    _chain(lw, n, func, [a, b])


def _chain(lw, n, func: str, names: list) -> None:
    """``func`` over IR tensors ``names`` (two, or a variadic Max/Min/Sum's chain) into node
    output 0: operands in one device type, a comparison's result a float32 mask."""
    if len(names) == 1:          # Sum/Max/Min of one tensor: that tensor
        return lw._alias(n)
    oshape = lw.shape(n.outputs[0])
    r = len(oshape)
    cur = operand(lw, names[0], r)
    for i, x in enumerate(names[1:], 1):
        pa, pb = _same_type(lw, n, cur, operand(lw, x, r))
        dtype = F32 if func in ("EQ", "LT", "GT", "GE", "LE", "NE") else lw.pt[pa].dtype
        if i == len(names) - 1:
            o = lw.define(n.outputs[0], None, dtype)
        else:
            o = lw.new(f"{n.outputs[0]}~{i}", oshape, logical=oshape, dtype=dtype)
        _emit_elt(lw, n, "eltwise", {"func": func}, [pa, pb], o)
        cur = o.name


def _same_type(lw, n, pa: str, pb: str) -> tuple[str, str]:
    """Operands converted to one device type (a float32 mask against an int32 tensor: both
    int32, the mask's 0/1 exact)."""
    da, db = lw.pt[pa].dtype, lw.pt[pb].dtype
    if da == db:
        return pa, pb
    return (_convert(lw, n, pa, I32), pb) if db == I32 else (pa, _convert(lw, n, pb, I32))


def _convert(lw, n, src: str, dtype: str, func: str = "COPY") -> str:
    """A new PTensor: ``src`` through vunary ``func`` into ``dtype`` (copy converts)."""
    s = lw.pt[src]
    t = lw.new(f"{src}~{dtype}", s.shape, logical=s.logical, dtype=dtype)
    _emit_elt(lw, n, "unary", {"func": func, "p0": 0.0, "p1": 0.0}, [src], t)
    return t.name


def _unary(lw, n, func: str, x: str) -> None:
    o = lw.define(n.outputs[0], None)
    _emit_elt(lw, n, "unary", {"func": func, "p0": 0.0, "p1": 0.0}, [operand(lw, x)], o)


# --- ops -----------------------------------------------------------------------------------
def _gather(lw, n) -> None:
    """Gather with run-time indices: one dma_gather per tile (kernels/index.py).  An index
    outside the axis fails the job with EINVAL naming it."""
    x = n.inputs[0]
    ls = lw.shape(x)
    axis = n.attrs.get("axis", 0) % len(ls)
    src = operand(lw, x)
    idx = operand(lw, n.inputs[1])
    if lw.pt[idx].dtype != I32:
        idx = _convert(lw, n, idx, I32)
    out = lw.define(n.outputs[0], None, lw.pt[src].dtype)
    lw.ops.append(LOp("gather", n.name, n.op, [src, idx], [out.name], {
        "outer": int(np.prod(ls[:axis])), "rows": int(ls[axis]), "row": int(np.prod(ls[axis + 1:])),
        "n": int(np.prod(lw.shape(n.inputs[1])))}))


def _gather_elements(lw, n) -> None:
    """GatherElements with run-time indices: flat positions ``norm(idx) * stride + base`` (base, a
    constant, holds every other coordinate's offset) gathered one element each by dma_gather
    from the flattened data.  An index outside ``[-dim, dim)`` is replaced by a position past
    the data, so the run fails with EINVAL as Gather's does (the message names that flattened
    position)."""
    x, i = n.inputs[0], n.inputs[1]
    xs, ishape = lw.shape(x), lw.shape(i)
    r = len(xs)
    axis = n.attrs.get("axis", 0) % r
    dim, numel = int(xs[axis]), int(np.prod(xs))
    strides = cstrides(xs)
    base = sum(np.arange(s).reshape([-1 if d == k else 1 for k in range(r)]) * strides[d]
               for d, s in enumerate(ishape) if d != axis)
    src, idx = operand(lw, x), operand(lw, i)

    def k(value, dtype=I32):
        return operand(lw, _scalar(lw, n, value, dtype), r)

    neg = _pt_binary(lw, n, "LT", idx, k(0), I32)
    norm = _pt_binary(lw, n, "ADD", idx, _pt_binary(lw, n, "MUL", neg, k(dim), I32), I32)
    ok = _pt_binary(lw, n, "MIN", _pt_binary(lw, n, "GE", idx, k(-dim), F32),
                    _pt_binary(lw, n, "LT", idx, k(dim), F32), F32)
    flat = _pt_binary(lw, n, "ADD", _pt_binary(lw, n, "MUL", norm, k(strides[axis]), I32),
                      operand(lw, lw.g.add_const(f"{n.name}.base", np.broadcast_to(base, ishape).astype(np.int32)), r),
                      I32)
    safe = lw.new(f"{n.outputs[0]}~pos", ishape, logical=ishape, dtype=I32)
    _emit_elt(lw, n, "select", {}, [ok, flat, k(numel)], safe)
    out = lw.define(n.outputs[0], None, lw.pt[src].dtype)
    lw.ops.append(LOp("gather", n.name, n.op, [src, safe.name], [out.name], {
        "outer": 1, "rows": numel, "row": 1, "n": int(np.prod(ishape))}))


def _pt_binary(lw, n, func: str, pa: str, pb: str, dtype: str) -> str:
    """``func`` of two PTensors into a new intermediate of node ``n``'s index shape."""
    shape = lw.pt[pa].logical or lw.pt[pa].shape
    t = lw.new(f"{n.outputs[0]}~{func.lower()}", shape, logical=shape, dtype=dtype)
    _emit_elt(lw, n, "eltwise", {"func": func}, [pa, pb], t)
    return t.name


def _cast(lw, n) -> None:
    """Cast between the device types: to bool is ``x != 0``, float to integer rounds toward
    zero (trunc, then a saturating copy), between integers or floats of one device type (and
    from a bool mask to float) an alias, the rest a converting copy."""
    x = n.inputs[0]
    to = np.dtype(lw.g.tensors[n.outputs[0]].dtype)
    from_bool = lw.g.tensors[x].dtype == np.bool_
    src = operand(lw, x)
    sdt, ddt = lw.pt[src].dtype, device_dtype(to)
    if to == np.bool_ and not from_bool:
        return _binary(lw, n, "NE", x, _scalar(lw, n, 0, lw.g.tensors[x].dtype))
    if sdt == ddt and lw.g.tensors[x].const is None:
        return lw._alias(n)     # the same bytes: no command
    if sdt == F32 and ddt != F32 and not from_bool:
        src = _convert(lw, n, src, F32, "TRUNC")
    o = lw.define(n.outputs[0], None, ddt)
    _emit_elt(lw, n, "unary", {"func": "COPY", "p0": 0.0, "p1": 0.0}, [src], o)


def _isinf(lw, n) -> None:
    """IsInf: ``|x| == inf`` or one sign of it (detect_positive/detect_negative)."""
    x = n.inputs[0]
    pos, neg = n.attrs.get("detect_positive", 1), n.attrs.get("detect_negative", 1)
    if pos and neg:
        r = len(lw.shape(x))
        ax = _convert(lw, n, operand(lw, x), F32, "ABS")
        inf = operand(lw, _scalar(lw, n, np.inf, F32), r)
        _emit_elt(lw, n, "eltwise", {"func": "EQ"}, [ax, inf], lw.define(n.outputs[0], None, F32))
        return
    _binary(lw, n, "EQ", x, _scalar(lw, n, np.inf if pos else (-np.inf if neg else np.nan), F32))


def _where(lw, n) -> None:
    """Where with integer values: select on int32 tiles, the condition a float32 mask."""
    r = len(lw.shape(n.outputs[0]))
    c = operand(lw, n.inputs[0], r)
    a, b = _same_type(lw, n, operand(lw, n.inputs[1], r), operand(lw, n.inputs[2], r))
    _emit_elt(lw, n, "select", {}, [c, a, b], lw.define(n.outputs[0], None, lw.pt[a].dtype))


# --- graph I/O -----------------------------------------------------------------------------
def int64_input(lw, name: str) -> None:
    """An int64 graph input: its region holds int64 values (viewed as int32 pairs); the
    device tensor is each value's low word, copied with a stride of two."""
    ls = lw.shape(name)
    src = lw.new(name + "@in", ls + (2,), kind="input", logical=ls, dtype=I32)
    t = lw.define(name, None, I32)
    lw.ops.append(LOp("copy", f"{name}:input", "Cast", [src.name], [t.name], {
        "copies": [(src.name, 0, [2 * s for s in cstrides(ls)], t.name, 0, cstrides(ls), ls)]}))
    lw.io["inputs"].append((name, src.name))


def int64_output(lw, name: str) -> None:
    """An int64 graph output: the int32 value as the low word, its sign (``-(x < 0)``) as the
    high word, each copied into the int64 region with a stride of two."""
    ls = tuple(lw.g.tensors[name].shape)
    x = operand(lw, name)
    r = len(ls)
    zero = operand(lw, lw.g.add_const(f"{name}.zero", np.zeros((), np.int32)), r)
    neg = lw.new(f"{name}~neg", ls, logical=ls, dtype=I32)
    lw.ops.append(LOp("eltwise", f"{name}:output", "Cast", [x, zero], [neg.name],
                      {"func": "LT", "epilogue": [], "native": True}))
    hi = lw.new(f"{name}~hi", ls, logical=ls, dtype=I32)
    lw.ops.append(LOp("unary", f"{name}:output", "Cast", [neg.name], [hi.name],
                      {"func": "NEG", "p0": 0.0, "p1": 0.0, "epilogue": [], "native": True}))
    out = lw.new(name + "@out", ls + (2,), kind="output", logical=ls, dtype=I32)
    st, wide = cstrides(ls), [2 * s for s in cstrides(ls)]
    lw.ops.append(LOp("copy", f"{name}:output", "Cast", [x, hi.name], [out.name], {
        "copies": [(x, 0, st, out.name, 0, wide, ls), (hi.name, 0, st, out.name, 1, wide, ls)]}))
    lw.io["outputs"].append((name, out.name))
