"""systemd/npud-exporter.service: `systemd-analyze verify` clean, sandboxed, and what it runs."""

from __future__ import annotations

import re
import shlex
import sys

from systemd_harness import UNITS
from test_systemd_units import MAX_EXPOSURE, analyze, copy_units, needs_analyze, unit_keys

from npuctl.main import _parser

UNIT = UNITS / "npud-exporter.service"


def exporter_unit(tmp_path):
    """The exporter unit next to npud's (it names npud.socket), ExecStart= pointed at an executable."""
    copy_units(UNITS, tmp_path, exec_start=sys.executable)
    text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={sys.executable}", UNIT.read_text())
    (tmp_path / UNIT.name).write_text(text)
    return str(tmp_path / UNIT.name)


@needs_analyze
def test_exporter_unit_verifies_without_any_warning(tmp_path):
    result = analyze("verify", exporter_unit(tmp_path), cwd=tmp_path)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@needs_analyze
def test_exporter_unit_security_exposure(tmp_path):
    result = analyze("security", "--offline=yes", exporter_unit(tmp_path), cwd=tmp_path)
    match = re.search(r"Overall exposure level for npud-exporter\.service: (\d+\.\d+)", result.stdout + result.stderr)
    assert match and float(match.group(1)) <= MAX_EXPOSURE, result.stdout + result.stderr


def test_exporter_unit_runs_npuctl_exporter_as_the_npu_group_and_outlives_npud():
    keys = unit_keys(UNIT)
    argv = shlex.split(keys["ExecStart"][0])
    assert argv[0] == "/opt/npud/bin/npuctl" and argv[1] == "exporter"
    args = _parser().parse_args(argv[1:])          # the options exist and parse
    assert args.endpoint == "ipc:///run/npud/npud.sock" and args.listen == "127.0.0.1:9400"
    assert args.node == "%H"   # every metric carries node=<host name>: a fleet's series stay apart (docs/FLEET.md)
    # The policy admits the npu group by the peer's gid (SO_PEERCRED): the primary group.
    assert keys["Group"] == ["npu"] and keys["DynamicUser"] == ["yes"]
    assert "Requires" not in keys and "BindsTo" not in keys   # it serves npud_up 0 while npud is down
