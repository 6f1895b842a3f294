"""A compile's memory limit scales with its model: RLIMIT_AS = compile_memory_bytes +
compile_memory_scale x the model's size, up to compile_memory_max_bytes.

A fixed 4 GiB limit could never compile a 2 GiB model (the worker holds its request, the
laid-out weights and the executable: docs/PERFORMANCE.md); a limit sized for the largest model
would let a small model's compile take all of it.  Shown here at small sizes: a 300 MiB base.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import npu
from npu.local import LocalDaemon
from npud.config import ConfigError, compile_memory_cap, compile_memory_limit, from_dict

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS / "compiler_worker"))
sys.path.insert(0, str(TESTS / "npud"))
from compiler_testmodels import mlp, resnet  # noqa: E402
from test_npud_models import check_runs, workers  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30


def test_the_limit_scales_with_the_model_up_to_the_cap():
    assert compile_memory_limit(4 * GiB, 3.0, GiB) == 7 * GiB
    assert compile_memory_limit(0, 3.0, GiB) == 0            # no limit stays none
    config = from_dict({"compile_memory_bytes": "1GiB"})
    assert config.compile_memory_scale == 3.0
    assert compile_memory_cap(config, host_bytes=24 * GiB) == 12 * GiB   # half the host by default
    assert compile_memory_cap(config, host_bytes=GiB) == GiB            # never below the base
    assert compile_memory_cap(from_dict({"compile_memory_max_bytes": "6GiB"}), host_bytes=24 * GiB) == 6 * GiB
    assert compile_memory_cap(from_dict({"compile_memory_bytes": 0})) == 0
    with pytest.raises(ConfigError, match="compile_memory_scale"):
        from_dict({"compile_memory_scale": -1})


def _daemon(tmp_path, settings: str) -> LocalDaemon:
    config = tmp_path / "npud.toml"
    config.write_text('compile_workers = 1\ncompile_memory_bytes = "300MiB"\n' + settings)
    return LocalDaemon("--config", str(config), "--cache-dir", str(tmp_path / "cache"))


def test_a_model_too_large_for_the_base_limit_compiles_within_its_scaled_one(tmp_path):
    """resnet() (100 MB of weights) does not compile in 300 MiB (test_npud_models.py,
    test_compile_over_the_memory_limit_fails_clearly); with 6x its size on top it does."""
    d = _daemon(tmp_path, "compile_memory_scale = 6\n")   # its compile peaks at ~740 MiB: ~5.8x the model
    try:
        with npu.connect(d.endpoint, timeout=150) as c:
            data = resnet()
            check_runs(c.load(data), data)
    finally:
        d.stop()


def test_a_model_past_the_cap_is_refused_naming_the_keys_without_a_worker(tmp_path):
    d = _daemon(tmp_path, 'compile_memory_scale = 3\ncompile_memory_max_bytes = "400MiB"\n')
    try:
        with npu.connect(d.endpoint) as c:
            with pytest.raises(npu.NpuError) as err:
                c.load(bytes(40 * MiB))        # 300 MiB + 3 x 40 MiB > 400 MiB
            e = err.value
            assert e.code == "ENOMEM" and not e.retryable
            for words in ("40 MiB model", "420 MiB", "compile_memory_max_bytes (400 MiB)", "compile_memory_scale"):
                assert words in e.message, (words, e.message)
            assert workers(d) == []              # refused before any worker started
            data = mlp(seed=3)                   # a small model still compiles
            check_runs(c.load(data), data)
    finally:
        d.stop()


def test_the_worker_lowers_its_soft_limit_for_a_compile_and_raises_it_after():
    code = """
import resource
from npud.compiler_worker.worker import _address_space, _limit_resources
_limit_resources(8 << 30)
with _address_space(5 << 30):
    print(resource.getrlimit(resource.RLIMIT_AS))
print(resource.getrlimit(resource.RLIMIT_AS))
with _address_space(16 << 30):          # never past the hard limit
    print(resource.getrlimit(resource.RLIMIT_AS))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:3] == [f"({5 << 30}, {8 << 30})", f"({8 << 30}, {8 << 30})", f"({8 << 30}, {8 << 30})"]
