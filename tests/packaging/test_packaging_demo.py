"""`make demo`'s program (examples/demo.py): the README's first command must keep working."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_runs_its_model_across_the_npu_and_the_cpu_device_and_matches():
    result = subprocess.run([sys.executable, "-m", "examples.demo"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "matches numpy's computation of the same network: True" in out
    assert "top_k" in out and "device 1 (cpu)" in out          # the declined node's placement
    assert "TopK on the cpu device" in out and "npuctl status" in out
