"""Weights larger than one buffer object: the compiler cuts them into several weights regions no
larger than the device's ``max_buffer_bytes``, and the daemon loads each as a buffer of its own.
The limit is set low here (a few hundred KiB) so the models stay small; VGG-11/VGG-19 in
tests/zoo are the real-size case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import npu
from npu.local import LocalDaemon
from npud.compiler_worker import CompileError, compile_model, run_on_emulator
from npud.config import DeviceSpec, device_params, from_dict
from npud.drivers import driver
from npud.emulator.config import make_config
from test_compiler_models import ort_run

LIMIT = 512 * 1024


class Tower(torch.nn.Module):
    """Four 256x256 layers: 1 MiB of float32 weights, two buffers' worth at LIMIT."""

    def __init__(self, width=256, depth=4):
        super().__init__()
        self.layers = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU())
                                            for _ in range(depth)])

    def forward(self, x):
        return self.layers(x)


def tower_model(tmp_path, width=256) -> tuple[bytes, dict]:
    torch.manual_seed(0)
    x = torch.randn(2, width)
    f = tmp_path / "tower.onnx"
    torch.onnx.export(Tower(width).eval(), (x,), str(f), dynamo=False)
    return f.read_bytes(), {f"{_input_name(f)}": x.numpy()}


def _input_name(path) -> str:
    import onnx
    return onnx.load(str(path)).graph.input[0].name


def test_weights_over_the_buffer_limit_are_cut_into_regions_that_each_fit(tmp_path):
    model, feeds = tower_model(tmp_path)
    cfg = make_config("edge", max_buffer_bytes=LIMIT)
    exe = compile_model(model, cfg)
    weights = [r for r in exe.memory["regions"] if r["kind"] == "weights"]
    assert len(weights) >= 2 and all(r["size"] <= LIMIT for r in weights)
    assert sum(r["size"] for r in weights) == len(exe.weights) > LIMIT
    outs, stats = run_on_emulator(exe, feeds, cfg)
    ref = ort_run(model, feeds)
    for k in ref:
        np.testing.assert_allclose(outs[k], ref[k], rtol=1e-3, atol=1e-4)
    assert stats.hazards == 0
    # the default limit keeps one region
    one = compile_model(model, make_config("edge"))
    assert [r["name"] for r in one.memory["regions"] if r["kind"] == "weights"] == ["weights"]


def test_a_single_constant_over_the_limit_is_refused_by_name(tmp_path):
    model, _feeds = tower_model(tmp_path, width=512)   # one 512x512 weight is 1 MiB
    with pytest.raises(CompileError, match="max_buffer_bytes") as err:
        compile_model(model, make_config("edge", max_buffer_bytes=LIMIT))
    assert "constant" in str(err.value)


def test_daemon_loads_several_weights_buffers_and_shares_them(tmp_path):
    model, feeds = tower_model(tmp_path)
    config = tmp_path / "npud.toml"
    config.write_text(f'[[devices]]\nname = "npu0"\npreset = "edge"\n[devices.params]\nmax_buffer_bytes = {LIMIT}\n')
    d = LocalDaemon("--config", str(config), "--cache-dir", str(tmp_path / "cache"))
    try:
        with npu.connect(d.endpoint) as c:
            m = c.load(model)
            assert m.weights_bytes > LIMIT
            out = m.run(feeds)
            ref = ort_run(model, feeds)
            for k in ref:
                np.testing.assert_allclose(out[k], ref[k], rtol=1e-3, atol=1e-4)
            used = c.devices()[0].memory_used
            again = c.load(model)            # a second load shares every weights buffer
            np.testing.assert_allclose(again.run(feeds)[next(iter(ref))], ref[next(iter(ref))], rtol=1e-3, atol=1e-4)
            assert c.devices()[0].memory_used - used < m.weights_bytes
    finally:
        d.stop()


def test_device_memory_is_sized_from_the_machine_unless_configured():
    edge = driver("npu-emu").params("edge", {})
    spec = DeviceSpec("npu0", "edge")
    sized = device_params(driver("npu-emu"), spec, 0.25, host_bytes=16 << 30)
    assert sized.memory_bytes == 4 << 30 > edge.memory_bytes
    assert device_params(driver("npu-emu"), spec, 0.25, host_bytes=1 << 30).memory_bytes == edge.memory_bytes
    assert device_params(driver("npu-emu"), spec, 0.0, host_bytes=16 << 30).memory_bytes == edge.memory_bytes
    fixed = DeviceSpec("npu0", "edge", {"memory_bytes": 1 << 20})
    assert device_params(driver("npu-emu"), fixed, 0.25, host_bytes=16 << 30).memory_bytes == 1 << 20
    assert from_dict({"device_memory_fraction": 0.5}).device_memory_fraction == 0.5
    with pytest.raises(ValueError, match="device_memory_fraction"):
        from_dict({"device_memory_fraction": 2})


def test_device_configs_written_before_the_buffer_limit_still_read():
    """Executables' target_config and configs sent by an older daemon have no max_buffer_bytes:
    they read as the default, and the limit must be page-aligned."""
    from npud.emulator.config import DeviceConfig
    old = {k: v for k, v in make_config("edge").to_dict().items() if k != "max_buffer_bytes"}
    assert DeviceConfig.from_dict(old).max_buffer_bytes == 512 << 20
    with pytest.raises(ValueError, match="max_buffer_bytes"):
        make_config("edge", max_buffer_bytes=LIMIT + 1)
