"""Endpoint resolution rules (ipc_schema/endpoint.py), shared by npud, npu and npuctl."""

from __future__ import annotations

import os

from ipc_schema import endpoint


def test_explicit_endpoint_wins():
    env = {"NPUD_ENDPOINT": "ipc:///a.sock", "XDG_RUNTIME_DIR": "/run/user/5"}
    assert endpoint.resolve("ipc:///explicit.sock", env) == "ipc:///explicit.sock"


def test_npud_endpoint_env():
    env = {"NPUD_ENDPOINT": "ipc:///a.sock", "XDG_RUNTIME_DIR": "/run/user/5"}
    assert endpoint.resolve(None, env) == "ipc:///a.sock"
    assert endpoint.default_endpoint(env) == "ipc:///a.sock"


def test_empty_npud_endpoint_is_ignored():
    env = {"NPUD_ENDPOINT": "", "XDG_RUNTIME_DIR": "/run/user/5"}
    assert endpoint.resolve(None, env) == "ipc:///run/user/5/npud/npud.sock"


def test_xdg_runtime_dir():
    assert endpoint.default_endpoint({"XDG_RUNTIME_DIR": "/run/user/5"}) == "ipc:///run/user/5/npud/npud.sock"


def test_tmp_fallback_per_uid():
    assert endpoint.default_endpoint({}) == f"ipc:///tmp/npud-{os.getuid()}/npud.sock"
    assert endpoint.default_endpoint({"XDG_RUNTIME_DIR": ""}) == f"ipc:///tmp/npud-{os.getuid()}/npud.sock"


def test_process_environment_used_by_default(monkeypatch):
    monkeypatch.setenv("NPUD_ENDPOINT", "ipc:///from/env.sock")
    assert endpoint.resolve(None) == "ipc:///from/env.sock"
    monkeypatch.delenv("NPUD_ENDPOINT")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/xdg")
    assert endpoint.resolve("") == "ipc:///xdg/npud/npud.sock"


def test_ipc_and_attach_paths():
    assert endpoint.ipc_path("ipc:///run/npud/npud.sock") == "/run/npud/npud.sock"
    assert endpoint.ipc_path("tcp://127.0.0.1:5555") is None
    assert endpoint.attach_path_for("ipc:///run/npud/npud.sock") == "/run/npud/npud.fds"
    assert endpoint.attach_path_for("ipc:///x/daemon") == "/x/daemon.fds"
    assert endpoint.attach_path_for("tcp://127.0.0.1:1") is None
    assert endpoint.SYSTEM_ENDPOINT == "ipc:///run/npud/npud.sock"


def test_client_library_uses_the_same_rules(monkeypatch, tmp_path):
    import npu
    monkeypatch.setenv("NPUD_ENDPOINT", f"ipc://{tmp_path}/none.sock")
    assert npu.default_endpoint() == f"ipc://{tmp_path}/none.sock"
    try:
        npu.connect()
    except npu.ConnectionLost as exc:
        assert exc.code == "ECONNREFUSED" and f"ipc://{tmp_path}/none.sock" in exc.message
    else:  # pragma: no cover
        raise AssertionError("connect to a missing endpoint succeeded")
