"""Helpers for tests/packaging: a copy of the checkout to build from, and npud's wheel built from it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def copy_checkout(dst: Path) -> Path:
    """The checkout's tracked and new (not ignored) files, copied to ``dst``.

    Builds run there: pip and setuptools write build/ and *.egg-info into the tree they build.
    """
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    return dst


def build_wheel(base: Path) -> tuple[Path, str]:
    """npud's wheel, built as pip builds it for an install (isolated, so with PyPI's setuptools), and the log."""
    src, out = copy_checkout(base / "src"), base / "wheel"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(out), str(src)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return next(out.glob("npud-*.whl")), result.stdout + result.stderr
