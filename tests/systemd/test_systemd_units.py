"""The unit files: `systemd-analyze verify` clean, security exposure, install layout, config.

The checks that run systemd tools skip where those are missing (they work
without a running systemd: systemd 252 measured).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from npud.ipc_schema.endpoint import SYSTEM_ENDPOINT, attach_path_for, ipc_path, serve_endpoint
from npud.config import load
from systemd_harness import ANALYZE, REPO, UNITS

UNIT_NAMES = ("npud.socket", "npud-fds.socket", "npud.service")
MAX_EXPOSURE = 1.5

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed "
                                                           "(Debian/Ubuntu: apt-get install systemd)")


def unit_keys(path: Path) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def copy_units(src: Path, dst: Path, exec_start: str | None = None) -> list[str]:
    """The three units in ``dst``, ExecStart= pointed at an executable that exists."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in UNIT_NAMES:
        text = (src / name).read_text()
        if exec_start is not None:
            text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={exec_start}", text)
        (dst / name).write_text(text)
    return [str(dst / name) for name in UNIT_NAMES]


def analyze(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", **(env or {})}
    return subprocess.run([ANALYZE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def user_env(tmp_path: Path) -> dict[str, str]:
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return {"XDG_RUNTIME_DIR": str(runtime)}


# --- systemd-analyze -------------------------------------------------------------------

@needs_analyze
def test_systemd_verify_system_units_without_any_warning(tmp_path):
    units = copy_units(UNITS, tmp_path, exec_start=sys.executable)
    result = analyze("verify", *units, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@needs_analyze
def test_systemd_verify_user_units_without_any_warning(tmp_path):
    units = copy_units(UNITS / "user", tmp_path / "user", exec_start=sys.executable)
    result = analyze("--user", "verify", *units, cwd=tmp_path, env=user_env(tmp_path))
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@needs_analyze
def test_systemd_verify_would_see_a_bad_key(tmp_path):
    """The check above is not vacuous: verify reports (but exits 0 on) an unknown key."""
    units = copy_units(UNITS, tmp_path, exec_start=sys.executable)
    with open(units[2], "a") as f:
        f.write("\n[Service]\nNoSuchKey=1\n")
    result = analyze("verify", *units, cwd=tmp_path)
    assert "NoSuchKey" in result.stdout + result.stderr


@needs_analyze
def test_systemd_security_exposure(tmp_path):
    units = copy_units(UNITS, tmp_path, exec_start=sys.executable)
    result = analyze("security", "--offline=yes", units[2], cwd=tmp_path)
    match = re.search(r"Overall exposure level for npud\.service: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout


# --- what the units say ------------------------------------------------------------------

def test_systemd_units_agree_with_the_endpoint_rules():
    sock, fds = unit_keys(UNITS / "npud.socket"), unit_keys(UNITS / "npud-fds.socket")
    assert sock["ListenStream"] == [ipc_path(SYSTEM_ENDPOINT)]
    assert fds["ListenSequentialPacket"] == [attach_path_for(SYSTEM_ENDPOINT)]
    assert sock["FileDescriptorName"] == ["npud"] and fds["FileDescriptorName"] == ["npud-fds"]
    for keys in (sock, fds):
        assert keys["SocketMode"] == ["0660"] and keys["SocketGroup"] == ["npu"]
        assert keys["RemoveOnStop"] == ["yes"] and keys["Service"] == ["npud.service"]
    user_sock, user_fds = unit_keys(UNITS / "user/npud.socket"), unit_keys(UNITS / "user/npud-fds.socket")
    runtime = "/run/user/1000"
    expected = serve_endpoint({"XDG_RUNTIME_DIR": runtime})
    assert user_sock["ListenStream"][0].replace("%t", runtime) == ipc_path(expected)
    assert user_fds["ListenSequentialPacket"][0].replace("%t", runtime) == attach_path_for(expected)


@pytest.mark.parametrize("unit", ["npud.service", "user/npud.service"])
def test_systemd_service_is_notify_with_watchdog(unit):
    keys = unit_keys(UNITS / unit)
    assert keys["Type"] == ["notify"]
    assert keys["WatchdogSec"] and keys["Sockets"] == ["npud.socket npud-fds.socket"]
    assert keys.get("PrivateUsers", ["no"]) == ["no"], "PrivateUsers= hides peers' uids from npud"


def test_systemd_service_hardening():
    keys = unit_keys(UNITS / "npud.service")
    assert keys["DynamicUser"] == ["yes"]
    assert keys["ProtectSystem"] == ["strict"]
    for key in ("RuntimeDirectory", "StateDirectory", "CacheDirectory"):
        assert keys[key]
    assert keys["ExecStart"][0].startswith("/opt/npud/bin/npud --config /etc/npud/npud.toml")


def test_systemd_default_config_loads():
    config = load(UNITS / "npud.toml")
    assert config.endpoint == SYSTEM_ENDPOINT
    assert config.devices


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-sysusers") is None,
                    reason="needs root and systemd-sysusers")
def test_systemd_sysusers_creates_the_npu_group(tmp_path):
    (tmp_path / "etc").mkdir()
    result = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "npud.sysusers")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"(?m)^npu:x:\d+:", (tmp_path / "etc/group").read_text())


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-tmpfiles") is None,
                    reason="needs root and systemd-tmpfiles")
def test_systemd_tmpfiles_creates_the_runtime_directory(tmp_path):
    result = subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(UNITS / "npud.tmpfiles")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert (tmp_path / "run/npud").is_dir()
    assert (tmp_path / "run/npud").stat().st_mode & 0o777 == 0o755


# --- make install ------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_systemd_make_install_units_stages_a_tree(tmp_path):
    stage = tmp_path / "stage"
    result = subprocess.run(["make", "-s", "-C", str(REPO), "install-units", f"DESTDIR={stage}",
                             "PREFIX=/opt/npu-test", "SYSCONFDIR=/etc/x"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    system = stage / "usr/local/lib/systemd/system"
    assert sorted(p.name for p in system.iterdir()) == sorted((*UNIT_NAMES, "npud-exporter.service"))
    assert sorted(p.name for p in (stage / "usr/local/lib/systemd/user").iterdir()) == sorted(UNIT_NAMES)
    assert unit_keys(system / "npud-exporter.service")["ExecStart"][0].startswith("/opt/npu-test/bin/npuctl exporter")
    assert unit_keys(system / "npud.service")["ExecStart"] == [
        "/opt/npu-test/bin/npud --config /etc/x/npud/npud.toml"]
    assert (stage / "etc/x/npud/npud.toml").read_text() == (UNITS / "npud.toml").read_text()
    assert (stage / "usr/local/lib/sysusers.d/npud.conf").exists()
    assert (stage / "usr/local/lib/tmpfiles.d/npud.conf").exists()
    # An admin's edited config survives a reinstall (an upgrade).
    (stage / "etc/x/npud/npud.toml").write_text('log_level = "debug"\n')
    subprocess.run(["make", "-s", "-C", str(REPO), "install-units", f"DESTDIR={stage}", "SYSCONFDIR=/etc/x"],
                   check=True, capture_output=True, timeout=120)
    assert (stage / "etc/x/npud/npud.toml").read_text() == 'log_level = "debug"\n'
    if ANALYZE is not None:
        units = copy_units(system, tmp_path / "check", exec_start=sys.executable)
        result = analyze("verify", *units, cwd=tmp_path)
        assert result.stdout + result.stderr == ""
    result = subprocess.run(["make", "-s", "-C", str(REPO), "uninstall", f"DESTDIR={stage}",
                             "PREFIX=/opt/npu-test", "SYSCONFDIR=/etc/x"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert not any(system.iterdir())
    assert (stage / "etc/x/npud/npud.toml").exists()  # config is kept unless PURGE=1
