"""LSTM, GRU and RNN as torch.onnx exports them (1-2 layers, bidirectional, batch_first, initial
states), unrolled over time by the compiler and compared with onnxruntime on the emulator."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from npud.compiler_worker import CompileError, compile_model, run_on_emulator
from npud.emulator.config import make_config
from test_compiler_models import check, ort_run


class Seq(torch.nn.Module):
    """A recurrent layer returning its sequence output and final state(s)."""

    def __init__(self, kind, batch_first, with_state, **kw):
        super().__init__()
        self.rnn = getattr(torch.nn, kind)(batch_first=batch_first, **kw)
        self.kind, self.with_state = kind, with_state

    def forward(self, x, *state):
        if self.kind == "LSTM":
            y, (h, c) = self.rnn(x, tuple(state) if state else None)
            return y, h, c
        y, h = self.rnn(x, state[0] if state else None)
        return y, h


def export(kind, batch_first=False, with_state=False, seq=5, batch=2, inp=6, hidden=8, layers=1,
           bidirectional=False):
    torch.manual_seed(0)
    m = Seq(kind, batch_first, with_state, input_size=inp, hidden_size=hidden, num_layers=layers,
            bidirectional=bidirectional).eval()
    x = torch.randn((batch, seq, inp) if batch_first else (seq, batch, inp))
    nd = 2 if bidirectional else 1
    args = [x]
    if with_state:
        args += [torch.randn(layers * nd, batch, hidden) for _ in range(2 if kind == "LSTM" else 1)]
    names = ["x", "h0", "c0"][:len(args)]
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, tuple(args), f, dynamo=False, opset_version=14, input_names=names)
    return f.getvalue(), {k: v.numpy() for k, v in zip(names, args)}


CASES = {
    "lstm": dict(kind="LSTM"),
    "lstm_2layers_bidirectional": dict(kind="LSTM", layers=2, bidirectional=True),
    "lstm_batch_first_state": dict(kind="LSTM", batch_first=True, with_state=True),
    "lstm_bidirectional_state": dict(kind="LSTM", bidirectional=True, with_state=True),
    "gru": dict(kind="GRU"),
    "gru_2layers_batch_first": dict(kind="GRU", layers=2, batch_first=True),
    "gru_bidirectional_state": dict(kind="GRU", bidirectional=True, with_state=True),
    "rnn_tanh_bidirectional": dict(kind="RNN", bidirectional=True, with_state=True),
    "lstm_one_step_odd_sizes": dict(kind="LSTM", seq=1, batch=1, inp=3, hidden=5, with_state=True),
    "gru_odd_sizes": dict(kind="GRU", seq=7, batch=3, inp=5, hidden=13, bidirectional=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_recurrent_layers_match_onnxruntime(case):
    model, feeds = export(**CASES[case])
    exe, _stats = check(model, feeds, rtol=1e-3, atol=1e-4)
    assert not {"LSTM", "GRU", "RNN"} & {r["op"] for r in exe.report().rows}


def _onnx_gru(linear_before_reset, layout=0, direction="forward", hidden=4, seq=3, batch=2, inp=5):
    """A GRU node as onnx.helper writes it (torch always exports linear_before_reset=1)."""
    rng = np.random.default_rng(3)   # the same weights and input values for both layouts
    nd = 2 if direction == "bidirectional" else 1
    w = helper.make_tensor("W", TensorProto.FLOAT, [nd, 3 * hidden, inp], rng.standard_normal(nd * 3 * hidden * inp))
    r = helper.make_tensor("R", TensorProto.FLOAT, [nd, 3 * hidden, hidden],
                           rng.standard_normal(nd * 3 * hidden * hidden))
    b = helper.make_tensor("B", TensorProto.FLOAT, [nd, 6 * hidden], rng.standard_normal(nd * 6 * hidden))
    xshape = [batch, seq, inp] if layout else [seq, batch, inp]
    node = helper.make_node("GRU", ["x", "W", "R", "B"], ["y", "yh"], hidden_size=hidden, layout=layout,
                            linear_before_reset=linear_before_reset, direction=direction)
    g = helper.make_graph([node], "gru", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xshape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("yh", TensorProto.FLOAT, None)], [w, r, b])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    return model.SerializeToString(), {"x": rng.standard_normal(xshape).astype(np.float32)}


@pytest.mark.parametrize("lbr,direction", [(0, "forward"), (0, "reverse"), (1, "bidirectional")])
def test_onnx_gru_forms(lbr, direction):
    check(*_onnx_gru(lbr, 0, direction))


@pytest.mark.parametrize("lbr,direction", [(0, "reverse"), (1, "bidirectional")])
def test_onnx_gru_batch_major_layout(lbr, direction):
    """layout=1 (onnxruntime refuses it): checked against the layout-0 model, transposed."""
    model, feeds = _onnx_gru(lbr, 1, direction)
    ref_model, _ = _onnx_gru(lbr, 0, direction)
    cfg = make_config("edge")
    outs, _stats = run_on_emulator(compile_model(model, cfg), feeds, cfg)
    ref = ort_run(ref_model, {"x": feeds["x"].transpose(1, 0, 2)})
    np.testing.assert_allclose(outs["y"], ref["y"].transpose(2, 0, 1, 3), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(outs["yh"], ref["yh"].transpose(1, 0, 2), rtol=1e-3, atol=1e-4)


def test_unsupported_recurrent_attributes_are_refused_naming_the_node():
    model, _ = export("LSTM")
    import onnx
    m = onnx.load_from_string(model)
    lstm = next(n for n in m.graph.node if n.op_type == "LSTM")
    lstm.attribute.append(helper.make_attribute("clip", 3.0))
    with pytest.raises(CompileError, match="clip") as err:
        compile_model(m.SerializeToString(), make_config("edge"))
    assert err.value.node == lstm.name
