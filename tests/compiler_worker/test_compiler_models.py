"""Whole models: compiled, run on the in-process emulator, compared with onnxruntime."""

from __future__ import annotations


import numpy as np
import onnxruntime as ort
import pytest

from compiler_testmodels import mlp, resnet, small_cnn, transformer_block
from npud.compiler_worker import EmulatorSession, compile_model, run_on_emulator
from npud.emulator.config import make_config


def ort_run(model_bytes, feeds):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(None, feeds)))


def check(model_bytes, feeds, preset="edge", rtol=1e-3, atol=1e-4):
    cfg = make_config(preset)
    exe = compile_model(model_bytes, cfg)
    outs, stats = run_on_emulator(exe, feeds, cfg)
    ref = ort_run(model_bytes, feeds)
    assert set(outs) == set(ref)
    for k in ref:
        np.testing.assert_allclose(outs[k], ref[k], rtol=rtol, atol=atol, err_msg=k)
    assert stats.hazards == 0
    return exe, stats


@pytest.mark.parametrize("preset", ["edge", "server"])
def test_small_cnn(preset):
    x = np.random.default_rng(0).standard_normal((2, 3, 20, 20)).astype(np.float32)
    exe, stats = check(small_cnn(), {"x": x}, preset)
    assert stats.macs > 0
    ops = {r["op"] for r in exe.report().rows}
    assert "BatchNormalization" not in ops          # folded into the convolutions
    assert exe.memory["arena_bytes"] <= exe.memory["naive_bytes"]


@pytest.mark.parametrize("preset", ["edge", "server"])
def test_mlp(preset):
    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    check(mlp(), {"x": x}, preset)


@pytest.mark.parametrize("preset", ["edge", "server"])
def test_transformer_block(preset):
    x = np.random.default_rng(2).standard_normal((1, 16, 32)).astype(np.float32)
    check(transformer_block(), {"x": x}, preset)


def test_resnet_small_tiles_on_edge():
    """A ResNet-shaped network at 64x64 on the 256 KiB edge SRAM: every conv is
    tiled (bands, channel blocks, input-channel chunks)."""
    mb = resnet(blocks=(1, 1, 1, 1), size=64, width=16, classes=10)
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
    exe, stats = check(mb, {"x": x}, "edge", rtol=2e-3, atol=2e-4)
    assert exe.memory["arena_bytes"] < exe.memory["naive_bytes"]


def test_resnet50_compiles_and_a_session_runs_it_twice():
    # Its compile time is a benchmark figure (python -m bench models), not asserted here.
    mb = resnet()
    cfg = make_config("server")
    exe = compile_model(mb, cfg)
    rows = exe.report().rows
    assert sum(r["macs"] for r in rows) == pytest.approx(4.1e9, rel=0.05)
    x = np.random.default_rng(4).standard_normal((1, 3, 224, 224)).astype(np.float32)
    ref = ort_run(mb, {"x": x})
    with EmulatorSession(exe, cfg) as s:
        for _ in range(2):     # the session validates once and runs many times
            outs, stats = s.run({"x": x})
            (k, v), = outs.items()
            np.testing.assert_allclose(v, ref[k], rtol=1e-3, atol=2e-3)
    assert stats.hazards == 0
