"""Versions: ``npu.__version__`` and ``npud --version`` say the installed distribution's version
(or, from a source tree that is not installed, its pyproject's); ``python -m npud`` runs npud."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import npu
import npud
from npud.ipc_schema import version

ROOT = Path(__file__).resolve().parents[2]


def test_npu_version_is_the_distributions():
    assert npu.__version__ == version.distribution_version() == npud.__version__
    try:
        assert npu.__version__ == metadata.version("npud")
    except metadata.PackageNotFoundError:   # running from a tree: its pyproject says
        assert npu.__version__ == version.tree_version(ROOT / "pyproject.toml")
    assert npu.__version__ != version.UNKNOWN


def test_fallback_when_not_installed(monkeypatch, tmp_path):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "version", not_installed)
    assert version.distribution_version() == version.tree_version(ROOT / "pyproject.toml") != version.UNKNOWN
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "npud"\nversion = "9.8.7"\n')
    assert version.tree_version(pyproject) == "9.8.7"
    pyproject.write_text('[project]\nname = "other"\nversion = "1.0"\n')
    assert version.tree_version(pyproject) == version.UNKNOWN
    pyproject.write_text("not [toml")
    assert version.tree_version(pyproject) == version.UNKNOWN
    assert version.tree_version(tmp_path / "missing.toml") == version.UNKNOWN


def test_python_m_npud_version():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "clients")])}
    for argv in (["-m", "npud", "--version"], ["-m", "npud.main", "--version"]):
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"npud {npu.__version__} (protocol ")


def test_python_m_npud_runs_the_daemon():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "clients")])}
    done = subprocess.run([sys.executable, "-m", "npud", "--device", "warp9"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2 and "warp9" in done.stderr   # main()'s own refusal: it ran
