"""Models and daemons for the scheduling and fault tests (tests/npud/test_npud_sched*.py, _faults*.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS / "compiler_worker"))
from compiler_testmodels import Builder  # noqa: E402


def deep_mlp(layers: int = 12, width: int = 64, batch: int = 8, seed: int = 0) -> bytes:
    """``layers`` MatMul+Relu layers: a model with many layer boundaries (preemption points)."""
    b = Builder(seed)
    y = b.input("x", [batch, width])
    for _ in range(layers):
        y = b.op("Relu", [b.op("MatMul", [y, b.const((width, width), scale=0.2)])])
    return b.model([y])


def reference(x: np.ndarray, model_seed: int = 0, layers: int = 12, width: int = 64) -> np.ndarray:
    import onnxruntime as ort

    data = deep_mlp(layers, width, x.shape[0], model_seed)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def write_config(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def daemon_in_test_mode(tmp: Path, config: str):
    """A private npud with fault injection (``--test-mode``), ``config`` as its npud.toml and its
    own compile cache, both under ``tmp``.  The caller stops it."""
    from npu.local import LocalDaemon

    return LocalDaemon("--test-mode", "--config", write_config(tmp / "npud.toml", config),
                       "--cache-dir", str(tmp / "cache"))


def module_daemon_in_test_mode(tag: str, config: str, name: str = "daemon"):
    """A module-scoped fixture called ``name``: one ``daemon_in_test_mode`` for the module's tests,
    stopped after them."""
    @pytest.fixture(scope="module", name=name)
    def fixture(tmp_path_factory):
        d = daemon_in_test_mode(tmp_path_factory.mktemp(tag), config)
        yield d
        d.stop()
    return fixture


def feeds(model, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(model.inputs[0].shape).astype(np.float32)


def device_pids(daemon_pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == daemon_pid and b"npud.emulator.device_process" in cmd:
            kids.append(int(entry))
    return sorted(kids)
