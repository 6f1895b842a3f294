"""Pass 5: layout.  IR nodes -> lowered ops over physical tensors.

Convolution and pooling work in NHWC (channels innermost, as the MAC and
pooling engines want); their outputs stay NHWC while they flow through
layout-agnostic ops (element-wise, activations, Concat/Split/Slice/Pad and
reductions with remapped axes).  Everything else (MatMul, Reshape, Softmax
of opset < 13, ...) sees the ONNX (logical) layout; a conversion is a
strided copy, or nothing at all when the bytes are already in order
(H*W == 1 or C == 1, e.g. after global pooling).  Graph inputs and outputs
are always in the ONNX layout.
"""

from __future__ import annotations

import numpy as np

from .. import lower_index
from ..errors import CompileError
from ..lowered import NHWC, LOp, PTensor, cstrides
from ..support import SUPPORT
from .canonicalize import ACTIVATIONS, BINARY

IDENT = None   # "logical" layout marker
BOOL_IO = "uint8"   # a bool graph input/output's bytes on the device (0/1; the I/O table says bool)


def run(ctx) -> None:
    lw = Lowerer(ctx.graph)
    lw.lower()
    ctx.ptensors = lw.pt
    ctx.lops = lw.ops
    ctx.io = lw.io


def _perm_for(rank, layout):
    return tuple(range(rank)) if layout is IDENT else layout


class Lowerer:
    def __init__(self, g) -> None:
        self.g = g
        self.pt: dict[str, PTensor] = {}
        self.ops: list[LOp] = []
        self.layout: dict[str, tuple | None] = {}   # IR tensor -> layout of its primary PTensor
        self.cache: dict = {}
        self.io = {"inputs": [], "outputs": []}

    # --- tensors -------------------------------------------------------------------
    def shape(self, name):
        return tuple(self.g.tensors[name].shape)

    def new(self, name, shape, **kw) -> PTensor:
        base, i = name, 0
        while name in self.pt:
            i += 1
            name = f"{base}#{i}"
        t = self.pt[name] = PTensor(name, tuple(int(s) for s in shape), **kw)
        return t

    def dtype(self, name) -> str:
        """Device dtype of IR tensor `name`: int8/uint8/int32 on the quantised path,
        float32 otherwise (bool is a float32 mask)."""
        return lower_index.device_dtype(self.g.tensors[name].dtype)

    def define(self, name, layout, dtype=None) -> PTensor:
        """The primary PTensor for the IR output `name`, in `layout`."""
        lshape = self.shape(name)
        perm = _perm_for(len(lshape), layout)
        self.layout[name] = layout
        t = self.new(name, [lshape[p] for p in perm], logical=lshape,
                     dtype=dtype or self.dtype(name))
        self.cache[(name, layout, len(lshape))] = t.name
        return t

    def get(self, name, layout=IDENT, rank=None, dtype="float32") -> str:
        """PTensor name holding IR tensor `name` in `layout`, its shape left-padded
        with 1s to `rank` first (broadcasting operands).  Constants are
        materialised in `dtype`."""
        t = self.g.tensors[name]
        lshape = tuple(t.shape)
        rank = len(lshape) if rank is None else rank
        key = (name, layout, rank) if t.const is None or dtype == "float32" else \
            (name, layout, rank, dtype)
        if key in self.cache:
            return self.cache[key]
        padded = (1,) * (rank - len(lshape)) + lshape
        perm = _perm_for(rank, layout)
        pshape = [padded[p] for p in perm]
        if t.const is not None:
            val = lower_index.const_value(t.const, dtype).reshape(padded).transpose(perm)
            pt = self.new(f"{name}@c", pshape, kind="const", const=np.ascontiguousarray(val),
                          logical=padded, dtype=dtype)
        else:
            src_layout = self.layout[name]
            src = self.cache[(name, src_layout, len(lshape))]
            if src_layout == layout or (len(lshape) == 4 and rank == 4 and self._same_bytes(lshape)) \
                    or (rank != len(lshape) and src_layout is IDENT and layout is IDENT):
                pt = self.new(f"{name}@{rank}", pshape, alias=src, logical=padded,
                              dtype=self.pt[src].dtype)
            else:
                if rank != len(lshape):
                    src = self.get(name, src_layout)
                pt = self.new(f"{name}@{'nhwc' if layout == NHWC else 'nchw'}", pshape,
                              logical=padded, dtype=self.pt[src].dtype)
                sperm = _perm_for(rank, src_layout)
                st = cstrides(self.pt[src].shape)
                # out dim j holds logical axis perm[j], which is src dim sperm.index(perm[j])
                sst = [st[sperm.index(a)] for a in perm]
                self.ops.append(LOp("copy", f"{name}:layout", "LayoutConvert", [src], [pt.name],
                                    {"copies": [(src, 0, sst, pt.name, 0, cstrides(pshape), pshape)]}))
        self.cache[key] = pt.name
        return pt.name

    @staticmethod
    def _same_bytes(lshape) -> bool:
        n, c, h, w = lshape
        return h * w == 1 or c == 1

    # --- driver ------------------------------------------------------------------------
    def lower(self) -> None:
        g = self.g
        for name in g.inputs:
            if np.dtype(g.tensors[name].dtype) == np.int64:
                lower_index.int64_input(self, name)
                continue
            if np.dtype(g.tensors[name].dtype) == np.bool_:
                # a bool input is one byte per element (0/1) in its region, as onnxruntime
                # and the cpu device hold it; the device computes on a float32 mask
                src = self.new(name + "@in", self.shape(name), kind="input",
                               logical=self.shape(name), dtype=BOOL_IO)
                t = self.define(name, IDENT)
                self.ops.append(LOp("cvt", f"{name}:input", "Cast", [src.name], [t.name], {}))
                self.io["inputs"].append((name, src.name))
                continue
            t = self.define(name, IDENT)
            t.kind = "input"
            self.io["inputs"].append((name, t.name))
        for n in g.nodes:
            spec = SUPPORT[n.op]
            if lower_index.handles(self, n):
                lower_index.lower(self, n)
            else:
                getattr(self, "_" + spec.kernel)(n)
        # outputs: their own region, always in the ONNX layout
        claimed = set()
        for o in g.outputs:
            t = g.tensors[o]
            if np.dtype(t.dtype if t.const is None else t.const.dtype) == np.int64:
                lower_index.int64_output(self, o)
                continue
            is_bool = np.dtype(t.dtype if t.const is None else t.const.dtype) == np.bool_
            if t.const is None and is_bool:
                # a bool output: the float32 mask (0/1) converted to one byte per element
                src = self.get(o, IDENT)
                out = self.new(o + "@out", self.shape(o), kind="output", logical=self.shape(o),
                               dtype=BOOL_IO)
                self.ops.append(LOp("cvt", f"{o}:output", "Cast", [src], [out.name], {}))
                self.io["outputs"].append((o, out.name))
                continue
            if t.const is not None or o in g.inputs or o in claimed:
                dt = BOOL_IO if is_bool else self.dtype(o)
                src = self.get(o, IDENT, dtype=dt)
                out = self.new(o + "@out", self.shape(o) if t.shape is not None else t.const.shape,
                               kind="output", logical=tuple(t.shape), dtype=dt)
                self._copy_whole(src, out.name, n_name=f"{o}:output", op="Identity")
                self.io["outputs"].append((o, out.name))
                continue
            claimed.add(o)
            pname = self.get(o, IDENT)
            root = self._root(pname)
            rt = self.pt[root]
            if rt.kind in ("input", "const", "output") or root in [self._root(x) for _, x in
                                                                     self.io["outputs"]]:
                out = self.new(o + "@out", self.shape(o), kind="output", logical=self.shape(o),
                               dtype=self.pt[pname].dtype)
                self._copy_whole(pname, out.name, n_name=f"{o}:output", op="Identity")
                self.io["outputs"].append((o, out.name))
            else:
                rt.kind = "output"
                self.io["outputs"].append((o, pname))

    def _root(self, name):
        while self.pt[name].alias:
            name = self.pt[name].alias
        return name

    def _copy_whole(self, src, dst, n_name, op):
        shape = self.pt[dst].shape
        st = cstrides(shape)
        self.ops.append(LOp("copy", n_name, op, [src], [dst],
                            {"copies": [(src, 0, st, dst, 0, st, shape)]}))

    def acts(self, n):
        return [i for i in n.inputs if i and self.g.tensors[i].const is None]

    def follow_layout(self, names, out_rank=None):
        """NHWC if every activation among `names` is a rank-4 NHWC tensor."""
        acts = [x for x in names if x and self.g.tensors[x].const is None]
        if not acts:
            return IDENT
        lay = self.layout[acts[0]]
        if lay is IDENT:
            return IDENT
        for x in acts:
            if self.layout[x] != lay or len(self.shape(x)) != 4:
                return IDENT
        if out_rank is not None and out_rank != 4:
            return IDENT
        return lay

    def epilogue(self, n, layout, main_arity):
        steps = []
        for st in n.attrs.get("_epilogue", []):
            if st[0] == "act":
                steps.append(st)
            else:
                _, func, idx, swap = st
                steps.append(("bin", func, self.get(n.inputs[idx], layout), swap))
        return steps

    # --- kernels ------------------------------------------------------------------------
    def _decomposed(self, n):
        raise n.fail("operator survived decomposition")

    def _const(self, n):
        raise n.fail("constant node survived folding")

    def _alias(self, n):
        src = self.get(n.inputs[0], IDENT)
        o = n.outputs[0]
        lshape = self.shape(o)
        self.layout[o] = IDENT
        t = self.new(o, lshape, alias=src, logical=lshape, dtype=self.pt[src].dtype)
        self.cache[(o, IDENT, len(lshape))] = t.name
        if n.op == "Dropout" and len(n.outputs) > 1 and n.outputs[1]:
            # inference mode: the mask is all true (a 1.0 mask on the device)
            mask = self.define(n.outputs[1], IDENT)
            self.ops.append(LOp("fill", n.name, n.op, [], [mask.name], {"value": 1.0}))

    def _conv(self, n):
        x = self.get(n.inputs[0], NHWC)
        w = np.asarray(self.g.const(n.inputs[1]), np.float32)
        cout = w.shape[0]
        b = self.g.const(n.input(2)) if n.input(2) else None
        bias = np.zeros(cout, np.float32) if b is None else np.asarray(b, np.float32).reshape(cout)
        if "_bias_value" in n.attrs:
            bias = bias + n.attrs["_bias_value"]
        strides, dil, pads = self._conv_window(n, w.shape[2:4])
        out = self.define(n.outputs[0], NHWC)
        self.ops.append(LOp("conv", n.name, n.op, [x] + [s[2] for s in self.epilogue(n, NHWC, 3)
                                                          if s[0] == "bin"], [out.name], {
            "w": w, "bias": bias, "stride": strides, "dil": dil, "pads": pads,
            "group": int(n.attrs.get("group", 1)), "x": x,
            "epilogue": self.epilogue(n, NHWC, 3)}))

    def _conv_window(self, n, kernel) -> tuple[list[int], list[int], list[int]]:
        """A 2-D convolution's strides, dilations and resolved pads (auto_pad applied)."""
        strides = list(n.attrs.get("strides", [1, 1]))
        dil = list(n.attrs.get("dilations", [1, 1]))
        return strides, dil, _resolve_pads(n, self.shape(n.inputs[0])[2:], list(kernel), strides, dil)

    # --- quantised ------------------------------------------------------------------------
    def _qconv(self, n):
        q = dict(n.attrs["_q"])
        x = self.get(n.inputs[0], NHWC)
        w = q["w"]                                   # OIHW int8
        if w.ndim != 4:
            raise n.fail(f"only 2-D convolution is supported (weights of rank {w.ndim})")
        g = int(n.attrs.get("group", 1))
        if g > 1 and np.any(q["w_zp"] != 0):
            raise n.fail("a non-zero weight zero point with group > 1 is not supported")
        strides, dil, pads = self._conv_window(n, w.shape[2:4])
        out = self.define(n.outputs[0], NHWC)
        self.ops.append(LOp("conv", n.name, n.op, [x], [out.name], {
            "w": w, "bias": np.asarray(q["bias"], np.int64), "stride": strides, "dil": dil,
            "pads": pads, "group": g, "x": x, "epilogue": [], "q": q}))

    def _qmatmul(self, n):
        q = n.attrs["_q"]
        a = n.inputs[0]
        pa = self.get(a, IDENT)
        sa = self.shape(a)
        out = self.define(n.outputs[0], IDENT)
        w = q["w"]
        if w.ndim > 3 or (w.ndim == 3 and (len(sa) != 3 or sa[0] != w.shape[0])):
            raise n.fail(f"QLinearMatMul/MatMulInteger of {list(sa)} x {list(w.shape)}: "
                         "batched weights must match a rank-3 input's batch")
        self.ops.append(LOp("qmatmul", n.name, n.op, [pa], [out.name],
                            {"a_shape": (1,) + tuple(sa) if len(sa) == 1 else tuple(sa), "q": q}))

    def _qdq_operand(self, n, values, axis, shape, lay, dtype):
        """A constant broadcast along `axis` of a tensor of logical `shape`."""
        r = len(shape)
        bshape = [1] * r
        if values.size > 1:
            bshape[axis] = values.size
        name = self.g.add_const(f"{n.name}.q", np.asarray(values).reshape(bshape if r else ()))
        return self.get(name, lay, r, dtype=dtype)

    def _quant(self, n):
        qp = n.attrs["_qp"]
        x = n.inputs[0]
        shape = self.shape(x)
        lay = self.follow_layout([x], len(shape))
        src = self.get(x, lay)
        out = self.define(n.outputs[0], lay)
        ins = [src, self._qdq_operand(n, qp["scale"], qp["axis"], shape, lay, "float32")]
        per_axis_zp = qp["zp"].size > 1 and np.any(qp["zp"] != qp["zp"][0])
        if per_axis_zp:
            ins.append(self._qdq_operand(n, qp["zp"].astype(np.int32), qp["axis"], shape, lay,
                                         "int32"))
        self.ops.append(LOp("quant", n.name, n.op, ins, [out.name], {
            "nmain": len(ins), "zp": None if per_axis_zp else int(qp["zp"][0])}))

    def _dequant(self, n):
        qp = n.attrs["_qp"]
        x = n.inputs[0]
        shape = self.shape(x)
        lay = self.follow_layout([x], len(shape))
        src = self.get(x, lay)
        out = self.define(n.outputs[0], lay, "float32")
        ins = [src, self._qdq_operand(n, qp["zp"].astype(np.float32), qp["axis"], shape, lay,
                                      "float32"),
               self._qdq_operand(n, qp["scale"], qp["axis"], shape, lay, "float32")]
        self.ops.append(LOp("dequant", n.name, n.op, ins, [out.name], {"nmain": 3}))

    def _dynq(self, n):
        x = n.inputs[0]
        src = self.get(x, IDENT)
        outs = [self.define(o, IDENT).name for o in n.outputs]
        self.ops.append(LOp("dynq", n.name, n.op, [src], outs, {}))

    def _pool(self, n):
        x = self.get(n.inputs[0], NHWC)
        ls = self.shape(n.inputs[0])
        out = self.define(n.outputs[0], NHWC)
        if n.op.startswith("Global"):
            k, s, pads = [ls[2], ls[3]], [1, 1], [0, 0, 0, 0]
            ceil_extra = [0, 0]
        else:
            k = list(n.attrs["kernel_shape"])
            s = list(n.attrs.get("strides", [1, 1]))
            pads = _resolve_pads(n, ls[2:], k, s, [1, 1])
            os_ = self.shape(n.outputs[0])[2:]
            # ceil_mode: extra bottom/right padding so the last window exists
            ceil_extra = [max(0, (os_[i] - 1) * s[i] + k[i] - (ls[2 + i] + pads[i] + pads[i + 2]))
                          for i in range(2)]
        func = "MAX" if "Max" in n.op else "AVG"
        self.ops.append(LOp("pool", n.name, n.op, [x], [out.name], {
            "func": func, "kernel": k, "stride": s, "pads": pads, "extra": ceil_extra,
            "count_include_pad": int(n.attrs.get("count_include_pad", 0)),
            "global": n.op.startswith("Global")}))

    def _eltwise(self, n):
        if "_q" in n.attrs:
            return self._qbinary(n)
        op = n.op
        nbin = len([s for s in n.attrs.get("_epilogue", []) if s[0] == "bin"])
        arity = len(n.inputs) - nbin
        mains = n.inputs[:arity]
        oshape = self.shape(n.outputs[0])
        r = len(oshape)
        lay = self.follow_layout(mains + [x for x in n.inputs[arity:]], r)
        operands = [self.get(x, lay, r) for x in mains]
        ep = self.epilogue(n, lay, arity)
        out = self.define(n.outputs[0], lay)
        func = BINARY[op]
        if arity == 1:
            self.ops.append(LOp("unary", n.name, op, [operands[0]] + [s[2] for s in ep if s[0] == "bin"],
                                [out.name], {"func": "COPY", "p0": 0.0, "p1": 0.0, "epilogue": ep}))
            return
        cur = operands[0]
        for i in range(1, arity):
            last = i == arity - 1
            dst = out.name if last else self.new(f"{out.name}~{i}", out.shape).name
            steps = ep if last else []
            self.ops.append(LOp("eltwise", n.name, op, [cur, operands[i]] +
                                [s[2] for s in steps if s[0] == "bin"], [dst],
                                {"func": func, "epilogue": steps}))
            cur = dst

    def _qbinary(self, n):
        """A fused QDQ binary (passes/quantize.py): inputs a, a_scale, a_zp, b, ..."""
        if n.attrs.get("_epilogue"):
            raise n.fail("an activation or binary op applied directly to a quantised tensor "
                         "is not supported")
        a, b = n.inputs[0], n.inputs[3]
        r = len(self.shape(n.outputs[0]))
        lay = self.follow_layout([a, b], r)
        operands = [self.get(x, lay, r) for x in (a, b)]
        out = self.define(n.outputs[0], lay)
        self.ops.append(LOp("qbinary", n.name, n.op, operands, [out.name],
                            {"func": BINARY[n.op], "q": n.attrs["_q"]}))

    def _select(self, n):
        """Where(cond, a, b): one select per tile; the condition is a 0/1 mask."""
        oshape = self.shape(n.outputs[0])
        r = len(oshape)
        lay = self.follow_layout(n.inputs[:3], r)
        operands = [self.get(x, lay, r) for x in n.inputs[:3]]
        out = self.define(n.outputs[0], lay)
        self.ops.append(LOp("select", n.name, n.op, operands, [out.name], {"epilogue": []}))

    def _unary(self, n):
        x = n.inputs[0]
        lay = self.layout.get(x, IDENT) if self.g.tensors[x].const is None else IDENT
        src = self.get(x, lay)
        ep = self.epilogue(n, lay, 1)
        out = self.define(n.outputs[0], lay)
        func, p0, p1 = ACTIVATIONS[n.op](n)
        self.ops.append(LOp("unary", n.name, n.op, [src] + [s[2] for s in ep if s[0] == "bin"],
                            [out.name], {"func": func, "p0": p0, "p1": p1, "epilogue": ep}))

    def _matmul(self, n):
        a, b = n.inputs[0], n.inputs[1]
        pa, pb = self.get(a, IDENT), self.get(b, IDENT)
        sa, sb = self.shape(a), self.shape(b)
        if len(sa) == 1:
            sa = (1,) + sa
        if len(sb) == 1:
            sb = sb + (1,)
        ep = self.epilogue(n, IDENT, 2)
        out = self.define(n.outputs[0], IDENT)
        self.ops.append(LOp("matmul", n.name, n.op, [pa, pb] + [s[2] for s in ep if s[0] == "bin"],
                            [out.name], {"a_shape": sa, "b_shape": sb,
                                         "bias": n.attrs.get("_bias_value"), "epilogue": ep}))

    def _softmax(self, n):
        x = n.inputs[0]
        ls = self.shape(x)
        r = len(ls)
        axis = n.attrs.get("axis", -1 if self.g.opset >= 13 else 1) % max(r, 1)
        if self.g.opset < 13 and axis != r - 1:
            src = self.get(x, IDENT)
            pre = int(np.prod(ls[:axis]))
            shape, ax = (pre, int(np.prod(ls[axis:]))), 1
            lay = IDENT
        else:
            lay = self.follow_layout([x])
            src = self.get(x, lay)
            shape = self.pt[src].shape
            ax = _perm_for(r, lay).index(axis)
        out = self.define(n.outputs[0], lay)
        self.ops.append(LOp("softmax", n.name, n.op, [src], [out.name],
                            {"shape": tuple(shape), "axis": ax, "log": n.op == "LogSoftmax"}))

    def _reduce(self, n):
        x = n.inputs[0]
        ls = self.shape(x)
        r = len(ls)
        axes = n.attrs.get("axes")
        if axes is None or len(axes) == 0:
            if n.attrs.get("noop_with_empty_axes", 0):
                return self._alias(n)
            axes = list(range(r))
        axes = sorted(a % r for a in axes)
        keep = n.attrs.get("keepdims", 1)
        lay = self.follow_layout([x])
        if lay is not IDENT and not keep:
            rest = [p for p in lay if p not in axes]
            if rest != sorted(rest):
                lay = IDENT
        src = self.get(x, lay)
        perm = _perm_for(r, lay)
        paxes = [perm.index(a) for a in axes]
        if keep:
            out = self.define(n.outputs[0], lay)
        else:
            out = self.define(n.outputs[0], IDENT)
        func = n.op[len("Reduce"):].upper()
        self.ops.append(LOp("reduce", n.name, n.op, [src], [out.name],
                            {"func": func, "axes": paxes, "shape": self.pt[src].shape}))

    def _norm(self, n):
        x = n.inputs[0]
        ls = self.shape(x)
        r = len(ls)
        if n.op == "InstanceNormalization":
            src = self.get(x, NHWC)
            out = self.define(n.outputs[0], NHWC)
            c = ls[1]
            gamma = np.asarray(self.g.const(n.inputs[1]), np.float32).reshape(c)
            beta = np.asarray(self.g.const(n.inputs[2]), np.float32).reshape(c)
            self.ops.append(LOp("norm", n.name, n.op, [src], [out.name], {
                "mode": "instance", "eps": float(n.attrs.get("epsilon", 1e-5)),
                "gamma": gamma, "beta": beta}))
            return
        axis = n.attrs.get("axis", -1) % r
        src = self.get(x, IDENT)
        out = self.define(n.outputs[0], IDENT)
        d = int(np.prod(ls[axis:]))
        gamma = np.broadcast_to(np.asarray(self.g.const(n.inputs[1]), np.float32),
                                ls[axis:]).reshape(d)
        beta = (np.broadcast_to(np.asarray(self.g.const(n.inputs[2]), np.float32),
                                ls[axis:]).reshape(d) if n.input(2) else None)
        self.ops.append(LOp("norm", n.name, n.op, [src], [out.name], {
            "mode": "layer", "eps": float(n.attrs.get("epsilon", 1e-5)), "rows": int(np.prod(ls[:axis])),
            "d": d, "gamma": np.ascontiguousarray(gamma),
            "beta": None if beta is None else np.ascontiguousarray(beta)}))

    def _copy(self, n):
        getattr(self, "_copy_" + n.op)(n)

    def _copy_Transpose(self, n):
        x = n.inputs[0]
        ls = self.shape(x)
        r = len(ls)
        perm = list(n.attrs.get("perm", list(range(r))[::-1]))
        lay = self.layout.get(x, IDENT) if self.g.tensors[x].const is None else IDENT
        src = self.get(x, lay)
        sp = _perm_for(r, lay)
        st = cstrides(self.pt[src].shape)
        out = self.define(n.outputs[0], IDENT)
        sst = [st[sp.index(a)] for a in perm]
        self.ops.append(LOp("copy", n.name, n.op, [src], [out.name],
                            {"copies": [(src, 0, sst, out.name, 0, cstrides(out.shape), out.shape)]}))

    def _copy_Concat(self, n):
        ins = [i for i in n.inputs if i and 0 not in self.shape(i)]
        r = len(self.shape(n.outputs[0]))
        lay = self.follow_layout(ins, r)
        perm = _perm_for(r, lay)
        axis = perm.index(n.attrs["axis"] % r)
        out = self.define(n.outputs[0], lay)
        ost = cstrides(out.shape)
        copies, off = [], 0
        srcs = []
        for i in ins:
            s = self.get(i, lay)
            srcs.append(s)
            sh = self.pt[s].shape
            copies.append((s, 0, cstrides(sh), out.name, off * ost[axis], ost, sh))
            off += sh[axis]
        self.ops.append(LOp("copy", n.name, n.op, srcs, [out.name], {"copies": copies}))

    def _copy_Split(self, n):
        x = n.inputs[0]
        ls = self.shape(x)
        r = len(ls)
        lay = self.follow_layout([x])
        src = self.get(x, lay)
        perm = _perm_for(r, lay)
        axis_l = n.attrs.get("axis", 0) % r
        axis = perm.index(axis_l)
        sst = cstrides(self.pt[src].shape)
        off = 0
        for o in n.outputs:
            if not o:
                continue
            out = self.define(o, lay)
            self.ops.append(LOp("copy", n.name, n.op, [src], [out.name], {
                "copies": [(src, off * sst[axis], sst, out.name, 0, cstrides(out.shape), out.shape)]}))
            off += out.shape[axis]

    def _copy_Slice(self, n):
        from ..numpy_ops import slice_params
        x = n.inputs[0]
        ls = self.shape(x)
        r = len(ls)
        lay = self.follow_layout([x])
        src = self.get(x, lay)
        perm = _perm_for(r, lay)
        sl = slice_params(n, [None], ls)
        sst = cstrides(self.pt[src].shape)
        out = self.define(n.outputs[0], lay)
        off = 0
        st = []
        for j, a in enumerate(perm):
            off += sl[a].start * sst[j]
            st.append(sst[j] * sl[a].step)
        self.ops.append(LOp("copy", n.name, n.op, [src], [out.name], {
            "copies": [(src, off, st, out.name, 0, cstrides(out.shape), out.shape)]}))

    def _copy_Gather(self, n):
        x = n.inputs[0]
        ls = self.shape(x)
        r = len(ls)
        axis = n.attrs.get("axis", 0) % r
        idx = np.asarray(self.g.const(n.inputs[1])).astype(np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + ls[axis], idx)
        if np.any(idx < 0) or np.any(idx >= ls[axis]):
            raise n.fail(f"Gather index out of range for axis of size {ls[axis]}")
        src = self.get(x, IDENT)
        out = self.define(n.outputs[0], IDENT)
        # output viewed as [pre, len(idx), post]
        pre = int(np.prod(ls[:axis]))
        post = int(np.prod(ls[axis + 1:]))
        copies = []
        j = 0
        while j < len(idx):
            k = j
            while k + 1 < len(idx) and idx[k + 1] == idx[k] + 1:
                k += 1
            cnt = k - j + 1
            copies.append((src, int(idx[j]) * post, (ls[axis] * post, 1), out.name, j * post,
                           (len(idx) * post, 1), (pre, cnt * post)))
            j = k + 1
        self.ops.append(LOp("copy", n.name, n.op, [src], [out.name], {"copies": copies}))

    def _copy_Pad(self, n):
        x = n.inputs[0]
        ls = self.shape(x)
        r = len(ls)
        pads = list(n.attrs.get("pads"))
        axes = n.attrs.get("axes")
        full = [0] * (2 * r)
        if axes is None:
            full = pads
        else:
            for i, a in enumerate(axes):
                full[a % r] = pads[i]
                full[a % r + r] = pads[i + len(axes)]
        lay = self.follow_layout([x])
        src = self.get(x, lay)
        perm = _perm_for(r, lay)
        out = self.define(n.outputs[0], lay)
        ost = cstrides(out.shape)
        off = sum(full[a] * ost[j] for j, a in enumerate(perm))
        value = float(n.attrs.get("value", 0.0) or 0.0)
        self.ops.append(LOp("fill", n.name, n.op, [], [out.name], {"value": value}))
        sh = self.pt[src].shape
        self.ops.append(LOp("copy", n.name, n.op, [src, out.name], [out.name], {
            "copies": [(src, 0, cstrides(sh), out.name, off, ost, sh)]}))

    def _copy_Expand(self, n):
        x = n.inputs[0]
        oshape = self.shape(n.outputs[0])
        r = len(oshape)
        src = self.get(x, IDENT, r)
        sh = self.pt[src].shape
        st = [0 if s == 1 and o != 1 else c for s, o, c in zip(sh, oshape, cstrides(sh))]
        out = self.define(n.outputs[0], IDENT)
        self.ops.append(LOp("copy", n.name, n.op, [src], [out.name], {
            "copies": [(src, 0, st, out.name, 0, cstrides(oshape), oshape)]}))


def _resolve_pads(n, spatial, k, s, d):
    """ONNX pads [x1_begin, x2_begin, x1_end, x2_end] -> (top, left, bottom, right) list."""
    ap = n.attrs.get("auto_pad", "NOTSET")
    ap = ap.decode() if isinstance(ap, bytes) else ap
    if ap in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * 4
        for i in range(2):
            out = -(-spatial[i] // s[i])
            total = max(0, (out - 1) * s[i] + (k[i] - 1) * d[i] + 1 - spatial[i])
            lo = total // 2 if ap == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + 2] = lo, total - lo
        return pads
    if ap == "VALID":
        return [0, 0, 0, 0]
    p = list(n.attrs.get("pads", [0, 0, 0, 0]))
    if len(p) != 4:
        raise CompileError(f"pads {p} must have 4 entries for 2-D", node=n.name, op=n.op)
    return p
