"""Recurrent layers (ONNX ``LSTM``, ``GRU``, ``RNN``) unrolled over time (part of decomposition).

The sequence length is fixed when the model compiles, so each layer becomes, per direction:

* one ``MatMul`` of the whole input sequence by the input weights (plus their bias): the input
  projection of every time step at once, on the MAC array in one large command;
* per time step, a ``Slice`` of that projection, a ``MatMul`` of the previous hidden state by
  the recurrent weights, ``Add``, the gate activations (``Sigmoid``/``Tanh``, fused into the
  producing ops by canonicalisation) and the state update (``Mul``/``Add``/``Sub``);
* ``Unsqueeze``/``Concat`` to assemble ``Y``, ``Y_h`` and ``Y_c`` in the requested layout.

Why unrolled and not a device loop: the ISA has no loop or branch command (a command stream is
straight-line, docs/ISA.md), so a loop would need an ISA change; and the per-step graph is made
of ops every other pass already tiles, fuses and schedules.  The cost is a stream that grows
with the sequence length (about ten commands per step and direction).

What is refused, naming the node: activations other than the defaults, ``clip``,
``input_forget``, per-batch ``sequence_lens`` shorter than the
sequence, and non-constant ``W``/``R``/``B``/``P``.  LSTM peepholes (``P``) are supported.
"""

from __future__ import annotations

import numpy as np

# (gates, default activations) per op; ONNX orders the gates iofc (LSTM), zrh (GRU), i (RNN).
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


def _s(v):
    return v.decode() if isinstance(v, bytes) else v


def _check(g, n):
    """The layer's constant weights, or CompileError naming what is not supported."""
    a = n.attrs
    acts = [_s(x) for x in a.get("activations", [])]
    nd = 2 if _s(a.get("direction", "forward")) == "bidirectional" else 1
    if acts and acts != DEFAULT_ACTS[n.op] * nd:
        raise n.fail(f"{n.op} activations {acts} are not supported (only the defaults "
                     f"{DEFAULT_ACTS[n.op]})")
    if a.get("clip") is not None:
        raise n.fail(f"{n.op} with clip is not supported")
    if a.get("input_forget", 0):
        raise n.fail("LSTM with input_forget=1 is not supported")
    w, r = g.const(n.input(1)), g.const(n.input(2))
    if w is None or r is None or (n.input(3) and g.const(n.input(3)) is None):
        raise n.fail(f"{n.op} weights W, R and B must be constant")
    if n.op == "LSTM" and n.input(7) and g.const(n.input(7)) is None:
        raise n.fail("LSTM peepholes (input P) must be constant")
    xs = g.tensors[n.inputs[0]].shape
    if xs is None or len(xs) != 3:
        raise n.fail(f"{n.op} needs a 3-D input of known shape")
    layout = int(a.get("layout", 0))
    seq = xs[1] if layout else xs[0]
    if n.input(4):
        lens = g.const(n.input(4))
        if lens is None or np.any(np.asarray(lens) != seq):
            raise n.fail(f"{n.op} sequence_lens must be constant and equal to the sequence length {seq}")
    return np.asarray(w, np.float32), np.asarray(r, np.float32)


def unroll(g, n, builder_cls):
    """Nodes computing recurrent node ``n`` step by step (see the module's docstring)."""
    w, r = _check(g, n)
    a = n.attrs
    direction = _s(a.get("direction", "forward"))
    layout = int(a.get("layout", 0))
    nd, gh, _in = w.shape
    hid = r.shape[-1]
    xs = g.tensors[n.inputs[0]].shape
    seq, batch = (xs[1], xs[0]) if layout else (xs[0], xs[1])
    bias = (np.asarray(g.const(n.input(3)), np.float32) if n.input(3)
            else np.zeros((nd, 2 * gh), np.float32))
    b = builder_cls(g, n)
    # time-major input [T, B, I]: the per-step slices are then contiguous
    x = n.inputs[0]
    if layout:
        x = b.op("Transpose", [x], b.t((seq, batch, _in)), perm=[1, 0, 2])
    finals_h, finals_c, per_dir = [], [], []
    for d in range(nd):
        reverse = direction == "reverse" or d == 1
        peep = g.const(n.input(7)) if n.op == "LSTM" and n.input(7) else None
        cell = _Cell(b, n.op, w[d], r[d], bias[d], hid, batch, seq, a,
                     None if peep is None or not np.any(peep[d]) else np.asarray(peep[d], np.float32))
        h = _initial(b, n.input(5), d, batch, hid, layout)
        c = _initial(b, n.input(6), d, batch, hid, layout) if n.op == "LSTM" else None
        proj = cell.project(x)
        steps = {}
        for t in (range(seq - 1, -1, -1) if reverse else range(seq)):
            h, c = cell.step(proj, t, h, c)
            steps[t] = h
        per_dir.append([steps[t] for t in range(seq)])
        finals_h.append(h)
        finals_c.append(c)
    outs = list(n.outputs) + [""] * (3 - len(n.outputs))
    if outs[0]:
        _assemble_y(b, per_dir, outs[0], seq, batch, hid, layout)
    if outs[1]:
        _stack_final(b, finals_h, outs[1], batch, hid, layout)
    if len(outs) > 2 and outs[2] and n.op == "LSTM":
        _stack_final(b, finals_c, outs[2], batch, hid, layout)
    return b.nodes


def _initial(b, name, d, batch, hid, layout):
    """Direction ``d``'s initial state [B, H] from ``initial_h``/``initial_c``, or None (zeros)."""
    if not name:
        return None
    const = b.g.const(name)
    if const is not None and not np.any(const):
        return None
    ax = 1 if layout else 0
    shape = [batch, 1, hid] if layout else [1, batch, hid]
    part = b.op("Slice", [name], b.t(shape), starts=[d], ends=[d + 1], axes=[ax], steps=[1])
    return b.op("Reshape", [part], b.t((batch, hid)), shape=[batch, hid])


def _assemble_y(b, per_dir, y, seq, batch, hid, layout):
    """Y: [T, D, B, H] (layout 0) or [B, T, D, H] (layout 1) from each step's [B, H]."""
    nd = len(per_dir)
    if layout:
        one = [batch, 1, 1, hid]
        steps = [b.op("Concat", [b.op("Reshape", [per_dir[d][t]], b.t(one), shape=one) for d in range(nd)],
                      b.t((batch, 1, nd, hid)), axis=2) if nd > 1 else
                 b.op("Reshape", [per_dir[0][t]], b.t(one), shape=one) for t in range(seq)]
        return b.op("Concat", steps, y, axis=1)
    one = [1, 1, batch, hid]
    steps = [b.op("Concat", [b.op("Reshape", [per_dir[d][t]], b.t(one), shape=one) for d in range(nd)],
                  b.t((1, nd, batch, hid)), axis=1) if nd > 1 else
             b.op("Reshape", [per_dir[0][t]], b.t(one), shape=one) for t in range(seq)]
    return b.op("Concat", steps, y, axis=0)


def _stack_final(b, finals, out, batch, hid, layout):
    """Y_h / Y_c: [D, B, H] (layout 0) or [B, D, H] (layout 1)."""
    one = [batch, 1, hid] if layout else [1, batch, hid]
    parts = [b.op("Reshape", [f if f is not None else b.c(np.zeros((batch, hid), np.float32))],
                  b.t(one), shape=one) for f in finals]
    return b.op("Concat", parts, out, axis=1 if layout else 0)


class _Cell:
    """One direction of one recurrent layer: its weights arranged for ``MatMul`` (transposed, so
    the gates are the columns) and its per-step equations."""

    def __init__(self, b, op, w, r, bias, hid, batch, seq, attrs, peep=None):
        self.b, self.op, self.hid, self.batch, self.seq = b, op, hid, batch, seq
        self.peep = peep          # LSTM peepholes [3H] (i, o, f), or None
        gh = w.shape[0]
        wb, rb = bias[:gh], bias[gh:]
        self.lbr = op == "GRU" and int(attrs.get("linear_before_reset", 0))
        if op == "GRU":
            # z and r take both biases with the input projection; h's recurrent bias stays with
            # the recurrent product (inside r * (...) when linear_before_reset, else after it)
            xb = wb + np.concatenate([rb[:2 * hid], np.zeros(hid, np.float32)])
            self.rb_h = rb[2 * hid:]
        else:
            xb = wb + rb
        self.wt = np.ascontiguousarray(w.T)      # [I, G*H]
        self.rt = np.ascontiguousarray(r.T)      # [H, G*H]
        self.xb = xb.astype(np.float32)
        # Without peepholes, one Sigmoid over all four LSTM gates (fused into the recurrent
        # MatMul) replaces four activations: the cell candidate's pre-activation is doubled
        # here, in the weights and bias, and tanh(x) = 2 * sigmoid(2x) - 1 recovers it.
        self.one_sigmoid = op == "LSTM" and peep is None
        if self.one_sigmoid:
            for m in (self.wt, self.rt, self.xb[None]):
                m[:, 3 * hid:] *= 2

    def project(self, x):
        """X [T, B, I] @ W^T + bias -> [T, B, G*H]: every step's input projection at once."""
        b = self.b
        gh = self.wt.shape[1]
        xw = b.op("MatMul", [x, b.c(self.wt)], b.t((self.seq, self.batch, gh)))
        return b.op("Add", [xw, b.c(self.xb)], b.t((self.seq, self.batch, gh)))

    def _cols(self, src, k, n_gates=1):
        """Gate columns [k*H, (k+n)*H) of a [B, G*H] tensor."""
        h = self.hid
        return self.b.op("Slice", [src], self.b.t((self.batch, n_gates * h)), starts=[k * h],
                         ends=[(k + n_gates) * h], axes=[1], steps=[1])

    def _rec(self, h, k0, k1):
        """h @ R^T's gate columns [k0, k1), or None when h is zero."""
        if h is None:
            return None
        rt = self.rt[:, k0 * self.hid:k1 * self.hid]
        return self.b.op("MatMul", [h, self.b.c(np.ascontiguousarray(rt))], self.b.t((self.batch, rt.shape[1])))

    def _add(self, p, q):
        return p if q is None else self.b.op("Add", [p, q], self.b.t(self.b.g.tensors[p].shape))

    def _act(self, op, x):
        return self.b.op(op, [x], self.b.t(self.b.g.tensors[x].shape))

    def _mul(self, p, q):
        return self.b.op("Mul", [p, q], self.b.t((self.batch, self.hid)))

    def step(self, proj, t, h, c):
        """(h, c) after time step ``t`` from the previous (None: zeros)."""
        b = self.b
        gh = self.wt.shape[1]
        xt = b.op("Slice", [proj], b.t((1, self.batch, gh)), starts=[t], ends=[t + 1], axes=[0], steps=[1])
        xt = b.op("Reshape", [xt], b.t((self.batch, gh)), shape=[self.batch, gh])
        if self.op == "RNN":
            return self._act("Tanh", self._add(xt, self._rec(h, 0, 1))), None
        if self.op == "LSTM" and self.one_sigmoid:
            gates = self._act("Sigmoid", self._add(xt, self._rec(h, 0, 4)))
            i, o, f, cs = (self._cols(gates, k) for k in range(4))
            cand = b.op("Sub", [b.op("Mul", [cs, b.c(np.float32(2))], b.t((self.batch, self.hid))),
                                b.c(np.float32(1))], b.t((self.batch, self.hid)))
            c_new = self._mul(i, cand) if c is None else self._add(self._mul(f, c), self._mul(i, cand))
            return self._mul(o, self._act("Tanh", c_new)), c_new
        if self.op == "LSTM":
            gates = self._add(xt, self._rec(h, 0, 4))
            i = self._act("Sigmoid", self._peephole(self._cols(gates, 0), 0, c))
            f = self._act("Sigmoid", self._peephole(self._cols(gates, 2), 2, c))
            cand = self._act("Tanh", self._cols(gates, 3))
            c_new = self._mul(i, cand) if c is None else self._add(self._mul(f, c), self._mul(i, cand))
            o = self._act("Sigmoid", self._peephole(self._cols(gates, 1), 1, c_new))
            return self._mul(o, self._act("Tanh", c_new)), c_new
        return self._gru(xt, h), None

    def _peephole(self, pre, k, c):
        """An LSTM gate's pre-activation plus its peephole term P[k] * c (none when c is zero)."""
        if self.peep is None or c is None:
            return pre
        pk = self.b.c(self.peep[k * self.hid:(k + 1) * self.hid])
        return self._add(pre, self._mul(pk, c))

    def _gru(self, xt, h):
        b = self.b
        zr = self._act("Sigmoid", self._add(self._cols(xt, 0, 2), self._rec(h, 0, 2)))
        z, r = self._cols(zr, 0), self._cols(zr, 1)
        xh = self._cols(xt, 2)
        rb_h = b.c(self.rb_h)
        if h is None:       # r * (0 @ R + Rb) and (r * 0) @ R + Rb
            rec = self._mul(r, rb_h) if self.lbr else rb_h
        elif self.lbr:
            rec = self._mul(r, self._add(self._rec(h, 2, 3), rb_h))
        else:
            rh = self.b.op("MatMul", [self._mul(r, h), b.c(np.ascontiguousarray(self.rt[:, 2 * self.hid:]))],
                           b.t((self.batch, self.hid)))
            rec = self._add(rh, rb_h)
        cand = self._act("Tanh", self._add(xh, rec))
        if h is None:       # (1 - z) * cand
            return self._mul(cand, b.op("Sub", [b.c(np.float32(1)), z], b.t((self.batch, self.hid))))
        # (1 - z) * cand + z * h = cand + z * (h - cand)
        diff = b.op("Sub", [h, cand], b.t((self.batch, self.hid)))
        return self._add(cand, self._mul(z, diff))
