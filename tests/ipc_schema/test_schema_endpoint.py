"""Endpoint resolution rules (npud/ipc_schema/endpoint.py), shared by npud, npu and npuctl."""

from __future__ import annotations

import os

from npud.ipc_schema import endpoint


def test_explicit_endpoint_wins():
    env = {"NPUD_ENDPOINT": "ipc:///a.sock", "XDG_RUNTIME_DIR": "/run/user/5"}
    assert endpoint.resolve("ipc:///explicit.sock", env) == "ipc:///explicit.sock"


def test_npud_endpoint_env():
    env = {"NPUD_ENDPOINT": "ipc:///a.sock", "XDG_RUNTIME_DIR": "/run/user/5"}
    assert endpoint.resolve(None, env) == "ipc:///a.sock"
    assert endpoint.default_endpoint(env) == "ipc:///a.sock"


def only(*paths):
    """An ``exists`` for default_endpoint: these socket files exist, nothing else."""
    return lambda path: path in paths


USER, SYSTEM = "/run/user/5/npud/npud.sock", "/run/npud/npud.sock"
FALLBACK = f"ipc:///tmp/npud-{os.getuid()}/npud.sock"


def test_empty_npud_endpoint_is_ignored():
    env = {"NPUD_ENDPOINT": "", "XDG_RUNTIME_DIR": "/run/user/5"}
    assert endpoint.default_endpoint(env, only(USER)) == "ipc:///run/user/5/npud/npud.sock"


def test_search_order_user_then_system_then_fallback():
    env = {"XDG_RUNTIME_DIR": "/run/user/5"}
    assert endpoint.default_endpoint(env, only(USER, SYSTEM)) == "ipc:///run/user/5/npud/npud.sock"
    assert endpoint.default_endpoint(env, only(SYSTEM)) == endpoint.SYSTEM_ENDPOINT
    assert endpoint.default_endpoint(env, only()) == FALLBACK
    # without $XDG_RUNTIME_DIR: the system service, else the fallback
    assert endpoint.default_endpoint({}, only(SYSTEM, USER)) == endpoint.SYSTEM_ENDPOINT
    assert endpoint.default_endpoint({"XDG_RUNTIME_DIR": ""}, only()) == FALLBACK
    # $NPUD_ENDPOINT is taken as it is, even if nothing listens there yet
    assert endpoint.default_endpoint({"NPUD_ENDPOINT": "ipc:///a.sock", **env}, only(SYSTEM)) == "ipc:///a.sock"


def test_npud_serves_where_clients_look():
    assert endpoint.serve_endpoint({"XDG_RUNTIME_DIR": "/run/user/5"}) == "ipc://" + USER
    assert endpoint.serve_endpoint({}) == FALLBACK
    assert endpoint.serve_endpoint({"NPUD_ENDPOINT": "ipc:///a.sock"}) == "ipc:///a.sock"
    for env in ({"XDG_RUNTIME_DIR": "/run/user/5"}, {}):
        served = endpoint.ipc_path(endpoint.serve_endpoint(env))
        assert endpoint.default_endpoint(env, only(served)) == endpoint.serve_endpoint(env)
    from npud.config import Config
    assert Config().endpoint == endpoint.serve_endpoint()


def test_searched_names_every_place_looked():
    env = {"XDG_RUNTIME_DIR": "/run/user/5"}
    said = endpoint.searched(None, env)
    assert "ipc://" + USER in said and endpoint.SYSTEM_ENDPOINT in said and FALLBACK in said
    assert endpoint.searched("ipc:///x.sock", env) == ""
    assert endpoint.searched(None, {"NPUD_ENDPOINT": "ipc:///x.sock"}) == ""


def test_process_environment_used_by_default(monkeypatch, tmp_path):
    monkeypatch.setenv("NPUD_ENDPOINT", "ipc:///from/env.sock")
    assert endpoint.resolve(None) == "ipc:///from/env.sock"
    monkeypatch.delenv("NPUD_ENDPOINT")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "npud").mkdir()
    (tmp_path / "npud" / "npud.sock").touch()
    assert endpoint.resolve("") == f"ipc://{tmp_path}/npud/npud.sock"


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


def test_client_without_endpoint_says_where_it_looked(monkeypatch, tmp_path):
    import npu
    monkeypatch.delenv("NPUD_ENDPOINT", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    if os.path.exists(SYSTEM) or os.path.exists(endpoint.ipc_path(FALLBACK)):  # pragma: no cover
        return  # a daemon runs at a place the search looks: it would be found
        return
    try:
        npu.connect()
    except npu.ConnectionLost as exc:
        assert f"ipc://{tmp_path}/npud/npud.sock" in exc.message and endpoint.SYSTEM_ENDPOINT in exc.message
    else:  # pragma: no cover
        raise AssertionError("connect without a daemon succeeded")
