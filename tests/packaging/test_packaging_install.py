"""`make install DESTDIR=...`: a venv that runs on the target, its commands on PATH, nothing naming DESTDIR.

The staged install downloads npud's dependencies (pip's cache makes it quicker the second time)
and takes about 40 s here; it is marked slow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging_harness import REPO, copy_checkout

SYSTEM_PYTHON = Path("/usr/bin/python3")
PREFIX = "/opt/npud-test"
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def system_python_fits() -> bool:
    return SYSTEM_PYTHON.exists() and subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))"],
        capture_output=True).returncode == 0


def make(*args: str, cwd: Path = REPO, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "MAKEFLAGS")}
    return subprocess.run(["make", "-s", "-C", str(cwd), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def files_naming(root: Path, needle: str) -> list[str]:
    """Every file (text or binary) and symlink under root whose bytes or target contain needle."""
    found = []
    raw = needle.encode()
    for path in root.rglob("*"):
        if path.is_symlink():
            if needle in os.readlink(path):
                found.append(str(path))
        elif path.is_file() and raw in path.read_bytes():
            found.append(str(path))
    return found


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    """A `make install DESTDIR=...` tree, built from a copy of the checkout's files."""
    if not system_python_fits():
        pytest.skip(f"{SYSTEM_PYTHON} with venv and ensurepip, Python 3.11 or newer, is needed "
                    "(Debian: apt-get install python3-venv)")
    base = tmp_path_factory.mktemp("install")
    src, stage = base / "src", base / "stage"
    copy_checkout(src)
    result = make("install", f"DESTDIR={stage}", f"PREFIX={PREFIX}", cwd=src)
    assert result.returncode == 0, result.stdout + result.stderr
    return stage


@needs_make
@pytest.mark.slow
def test_packaging_staged_venv_runs_on_the_targets_python(staged):
    cfg = dict(line.split(" = ", 1) for line in (staged / PREFIX[1:] / "pyvenv.cfg").read_text().splitlines())
    assert cfg["home"] == "/usr/bin"
    assert cfg["include-system-site-packages"] == "false"
    assert os.readlink(staged / PREFIX[1:] / "bin/python3").startswith("/usr/bin/")


@needs_make
@pytest.mark.slow
def test_packaging_staged_tree_never_names_destdir_or_the_build_tree(staged):
    assert files_naming(staged, str(staged)) == []
    assert files_naming(staged, str(staged.parent / "src")) == []


@needs_make
@pytest.mark.slow
def test_packaging_commands_are_on_path_and_run(staged):
    venv = staged / PREFIX[1:]
    for command in ("npud", "npuctl"):
        link = staged / "usr/local/bin" / command
        assert os.readlink(link) == f"{PREFIX}/bin/{command}"
        script = venv / "bin" / command
        assert script.read_text().splitlines()[0] == f"#!{PREFIX}/bin/python"
        # The staged venv's own interpreter runs the entry-point script as the target's would.
        result = subprocess.run([str(venv / "bin/python"), str(script), "--help"], capture_output=True,
                                text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"})
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: {command}")


@needs_make
@pytest.mark.slow
def test_packaging_installs_man_pages_and_completions(staged):
    share = staged / "usr/local/share"
    assert sorted(p.name for p in (share / "man/man1").iterdir()) == ["npuctl.1", "npud.1"]
    assert [p.name for p in (share / "man/man5").iterdir()] == ["npud.toml.5"]
    assert sorted(p.name for p in (share / "bash-completion/completions").iterdir()) == ["npuctl", "npud"]
    assert sorted(p.name for p in (share / "zsh/site-functions").iterdir()) == ["_npuctl", "_npud"]


@needs_make
@pytest.mark.slow
def test_packaging_uninstall_removes_what_install_placed(staged):
    result = make("uninstall", f"DESTDIR={staged}", f"PREFIX={PREFIX}")
    assert result.returncode == 0, result.stderr
    left = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if not p.is_dir())
    assert left == ["etc/npud/npud.toml"]  # the config is kept unless PURGE=1


@needs_make
def test_packaging_install_user_builds_the_venv_it_points_the_units_at(tmp_path):
    # A clean checkout has no .venv: install-user must make it before writing units that run it.
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    result = make("-n", "install-user", f"USERUNITDIR={tmp_path / 'units'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "-m venv .venv" in result.stdout and "pip install --quiet -e '.[cpu]'" in result.stdout
