"""What the distribution installs: npud (with the emulator, compiler workers and wire protocol as
its subpackages), npu and npuctl; no generic top-level names, and not the examples."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from packaging_harness import REPO


@pytest.mark.slow
def test_packaging_wheel_installs_only_npud_npu_and_npuctl(wheel):
    path, _ = wheel
    with zipfile.ZipFile(path) as whl:
        names = [n for n in whl.namelist() if ".dist-info/" not in n]
    assert {n.split("/")[0] for n in names} == {"npud", "npu", "npuctl"}
    for package in ("emulator", "ipc_schema", "compiler_worker", "compiler_worker/passes", "emulator/engines"):
        assert f"npud/{package}/__init__.py" in names


def test_packaging_examples_run_from_the_tree():
    # `make demo` runs `python -m examples.demo` from the checkout, which is not installed.
    result = subprocess.run([sys.executable, "-c", "import examples.demo, examples.tiny_cnn"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
