"""The policy file through real daemons: who may connect, per-uid quotas, admin ops; and every way the
policy file and the new config keys can be wrong."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import npu
from npud.emulator.assembler import StreamBuilder, tile
from npud.emulator.config import make_config
from npu.local import LocalDaemon
from npud import policy as policy_mod
from npud.config import ConfigError
from asuser import needs_root, npu_error, open_to_everyone, run_as
from npud_raw import RawPeer, error_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def daemon_with(tmp_path, policy: str, config: str = "", *args: str) -> LocalDaemon:
    (tmp_path / "policy.toml").write_text(policy)
    (tmp_path / "npud.toml").write_text(f'policy = "{tmp_path}/policy.toml"\n{config}')
    d = LocalDaemon("--config", str(tmp_path / "npud.toml"), *args)
    open_to_everyone(d)
    return d


# --- who may connect -----------------------------------------------------------------------------


@needs_root
def test_denied_uid_gets_eperm_with_a_reason(tmp_path):
    d = daemon_with(tmp_path, "[connect]\nusers = [65533]\ngroups = [4242]\n")
    try:
        def try_connect(endpoint):
            out = {"connect": npu_error(npu.connect, endpoint)}
            raw = RawPeer(endpoint)
            out["version"] = raw.request("version")
            raw.close()
            return out
        out = run_as(65534, 65534, try_connect, d.endpoint)
        assert out["connect"]["code"] == "EPERM" and "uid 65534" in out["connect"]["message"]
        assert "[connect]" in out["connect"]["message"]
        assert error_of(out["version"])["code"] == "EPERM", "every request is authorised, not only hello"

        def connect_ok(endpoint):
            with npu.connect(endpoint) as c:
                return {x["session"]: x["uid"] for x in c.clients()}[c.session]
        assert run_as(65533, 65533, connect_ok, d.endpoint) == 65533          # a listed user
        assert run_as(65532, 4242, connect_ok, d.endpoint) == 65532           # a member of a listed group
        with npu.connect(d.endpoint) as c:                                     # root always may
            c.ping()
    finally:
        d.stop()


# --- per-uid quotas --------------------------------------------------------------------------------


def long_stream(n: int) -> bytes:
    sb = StreamBuilder(make_config("edge"))
    for _ in range(n):
        sb.matmul(tile(0, "float32", (64, 128)), tile(64 * 128 * 4, "float32", (128, 128)),
                  tile(64 * 128 * 4 + 128 * 128 * 4, "float32", (64, 128)))
    sb.end()
    return sb.build()


def test_per_uid_quotas_memory_edquot_and_jobs_eagain(tmp_path):
    uid = os.getuid()
    d = daemon_with(tmp_path, f'[quotas.default]\nmemory = "64MiB"\n'
                              f'[quotas.users."{uid}"]\nmemory = "1MiB"\njobs_in_flight = 2\n',
                    "", "--test-mode")
    try:
        with npu.connect(d.endpoint) as a, npu.connect(d.endpoint) as b:
            assert a.limits["memory_quota"] == 1 << 20
            a.alloc(768 << 10)
            with pytest.raises(npu.OutOfMemory) as info:
                b.alloc(512 << 10)   # another session of the same uid: the quota is the user's
            assert info.value.code == "EDQUOT" and f"uid {uid}" in info.value.message
            assert "quota" in info.value.message and not info.value.retryable
            b.alloc(256 << 10)       # what is left fits
            # jobs in flight: two slow jobs from two sessions, the third is refused for now.  The
            # slowness is injected (a sleep), not computed: a loaded machine cannot finish them early.
            stream = long_stream(1)
            for session in (a, b):
                session.inject_fault("slow", slow_ms=1000, count=1)
            jobs = [a.submit(stream, []), b.submit(stream, [])]
            with pytest.raises(npu.Busy) as info:
                a.submit(stream, [])
            assert info.value.code == "EAGAIN" and info.value.retryable
            assert f"uid {uid}" in info.value.message and "retry in about" in info.value.message
            for job in jobs:
                job.wait(60)
            a.submit(long_stream(1), []).wait(30)   # room again
    finally:
        d.stop()


def test_priority_ceiling_and_share_through_the_daemon(tmp_path):
    uid = os.getuid()
    d = daemon_with(tmp_path, f'[quotas.users."{uid}"]\npriority_ceiling = "normal"\nshare = 3\n')
    try:
        with npu.connect(d.endpoint) as c:
            with pytest.raises(npu.PermissionDenied) as info:
                c.context("high")
            assert info.value.code == "EPERM" and "ceiling" in info.value.message
            ctx = c._request("context_create", {"priority": "normal", "weight": 2})
            assert ctx["weight"] == 6, "the context's weight is the asked weight times the user's share"
    finally:
        d.stop()


def test_policy_priority_ceiling_and_share_decisions():
    p = policy_mod.from_dict({"quotas": {"default": {"priority_ceiling": "normal", "share": 2},
                                         "users": {"1000": {"priority_ceiling": "realtime", "share": 5}}}})
    assert p.priority_ceiling(1000) == policy_mod.PRIORITIES.index("realtime") and p.share(1000) == 5
    assert p.priority_ceiling(1001) == policy_mod.PRIORITIES.index("normal") and p.share(1001) == 2
    assert p.quota_for(1000).memory is None   # unset keys: the default's (no per-uid memory limit)

    class S:
        uid, gid = 1001, -1
    with pytest.raises(Exception) as info:
        policy_mod.check_priority(S(), "high", p)
    assert "ceiling" in str(info.value)
    policy_mod.check_priority(S(), "normal", p)
    assert policy_mod.weight_for(S(), 3, p) == 6


# --- admin ops ---------------------------------------------------------------------------------------


@needs_root
def test_admin_ops_allowed_and_denied_per_policy(tmp_path):
    d = daemon_with(tmp_path, "[admin]\nusers = [65534]\n[admin.cache_clear]\nusers = [65533]\n")
    try:
        with npu.connect(d.endpoint) as victim1, npu.connect(d.endpoint) as victim2:
            def admin_ops(endpoint, victim):
                with npu.connect(endpoint) as c:
                    return {"kill": npu_error(c._request, "kill_client", {"session": victim}),
                            "reset": npu_error(c._request, "reset_device", {"device": 0}),
                            "cache": npu_error(c._request, "cache_clear", {})}
            granted = run_as(65534, 65534, admin_ops, d.endpoint, victim1.session)
            assert granted == {"kill": None, "reset": None, "cache": None}, granted
            partial = run_as(65533, 65533, admin_ops, d.endpoint, victim2.session)
            assert partial["cache"] is None, partial
            for op in ("kill", "reset"):
                assert partial[op]["code"] == "EPERM", partial
                assert "uid 65533" in partial[op]["message"] and "[admin" in partial[op]["message"]
            with pytest.raises(npu.ConnectionLost):
                victim1.ping()   # killed by the admin
            victim2.ping()       # not killed
            assert npu_error(victim2._request, "cache_clear", {}) is None   # root always may
    finally:
        d.stop()


# --- sessions: a per-uid quota, and slots kept for admins -------------------------------------------

SESSION_LIMITS = "[limits]\nmax_sessions = 24\nadmin_sessions = 4\nlease_ms = 600000\n"


def open_sessions(endpoint: str, at_most: int) -> dict:
    """Open raw sessions (no companion socket: they outlive this process until their lease ends)
    until one is refused; how many opened and the refusal."""
    opened, refusal = 0, None
    for _ in range(at_most):
        peer = RawPeer(endpoint)
        reply = peer.hello(name="hog")
        peer.close()
        if not reply["ok"]:
            refusal = reply["error"]
            break
        opened += 1
    return {"opened": opened, "refusal": refusal}


@needs_root
def test_one_uid_cannot_lock_out_the_admin_who_would_end_it(tmp_path):
    """No policy file: uid 65534 gets the default session quota (a quarter of max_sessions) and then
    EDQUOT, not retryable, naming the quota and what to do; root still connects, lists and kills its
    sessions, and the user can then open one again."""
    (tmp_path / "npud.toml").write_text(SESSION_LIMITS)
    d = LocalDaemon("--config", str(tmp_path / "npud.toml"))
    open_to_everyone(d)
    try:
        hog = run_as(65534, 65534, open_sessions, d.endpoint, 30)
        assert hog["opened"] == 24 // 4, hog
        err = hog["refusal"]
        assert err["code"] == "EDQUOT" and err["retryable"] is False, err
        for words in ("uid 65534", "6 sessions", "quota", "max_sessions", "close", "npuctl clients"):
            assert words in err["message"], (words, err["message"])
        with npu.connect(d.endpoint) as admin:
            hogs = [x["session"] for x in admin.clients() if x["uid"] == 65534]
            assert len(hogs) == 6
            admin._request("kill_client", {"session": hogs[0]})
            assert len([x for x in admin.clients() if x["uid"] == 65534]) == 5
        again = run_as(65534, 65534, open_sessions, d.endpoint, 2)
        assert again["opened"] == 1 and again["refusal"]["code"] == "EDQUOT", again
    finally:
        d.stop()


@needs_root
def test_the_last_sessions_are_kept_for_admins(tmp_path):
    """With a quota as large as the daemon, one user fills every slot but the four kept for admins
    (EAGAIN, retryable: others' sessions end); a policy [admin] user and root still get in."""
    d = daemon_with(tmp_path, "[quotas.default]\nsessions = 1000\n[admin]\nusers = [65533]\n", SESSION_LIMITS)
    try:
        hog = run_as(65534, 65534, open_sessions, d.endpoint, 30)
        assert hog["opened"] == 24 - 4, hog
        err = hog["refusal"]
        assert err["code"] == "EAGAIN" and err["retryable"] is True, err
        assert "kept for admins" in err["message"] and "admin_sessions" in err["message"], err
        assert run_as(65532, 65532, open_sessions, d.endpoint, 1)["refusal"]["code"] == "EAGAIN"
        assert run_as(65533, 65533, open_sessions, d.endpoint, 1) == {"opened": 1, "refusal": None}
        with npu.connect(d.endpoint) as admin:
            hogs = [x["session"] for x in admin.clients() if x["uid"] == 65534]
            assert len(hogs) == 20
            admin._request("kill_client", {"session": hogs[0]})
        full = run_as(65533, 65533, open_sessions, d.endpoint, 10)   # 19 of the hog's, 1 of its own
        assert full["opened"] == 4 and full["refusal"]["code"] == "EAGAIN", full
        assert "all are open" in full["refusal"]["message"], full
    finally:
        d.stop()


def test_session_quota_decisions():
    policy = policy_mod.from_dict({"quotas": {"default": {"sessions": 8}, "users": {"65533": {"sessions": 2},
                                                                                       "0": {"memory": "1GiB"}}}})
    assert policy.session_quota(65534, 1024) == 8
    assert policy.session_quota(65533, 1024) == 2
    assert policy.session_quota(0, 1024) == 8, "root's own table inherits the default's quota"
    assert policy_mod.DEFAULT.session_quota(65534, 1024) == 256, "default: a quarter of max_sessions"
    assert policy_mod.DEFAULT.session_quota(0, 1024) is None, "root has no per-uid cap by default"


@needs_root
def test_without_a_policy_cache_clear_is_admin_only(daemon):
    open_to_everyone(daemon)

    def clear(endpoint):
        with npu.connect(endpoint) as c:
            return npu_error(c._request, "cache_clear", {})
    err = run_as(65534, 65534, clear, daemon.endpoint)
    assert err["code"] == "EPERM" and "cache_clear" in err["message"] and "uid 65534" in err["message"]


# --- malformed input: the policy file and the new config keys ------------------------------------


@pytest.mark.parametrize("data,words", [
    ({"connekt": {}}, ["connekt", "unknown key"]),
    ({"connect": {"users": [1], "hosts": []}}, ["connect", "hosts"]),
    ({"connect": {"users": 1000}}, ["connect.users", "array"]),
    ({"connect": {"users": [-1]}}, ["connect.users[0]", "out of range"]),
    ({"connect": {"users": [2**32]}}, ["connect.users[0]", "out of range"]),
    ({"connect": {"users": ["no-such-user-npud"]}}, ["connect.users[0]", "no-such-user-npud"]),
    ({"connect": {"users": [True]}}, ["connect.users[0]"]),
    ({"connect": {"users": [1.5]}}, ["connect.users[0]"]),
    ({"connect": {"groups": ["no-such-group-npud"]}}, ["connect.groups[0]", "no-such-group-npud"]),
    ({"connect": {"groups": [-5]}}, ["connect.groups[0]", "out of range"]),
    ({"connect": []}, ["connect", "table"]),
    ({"admin": {"users": [0], "format_disk": {}}}, ["admin", "format_disk"]),
    ({"admin": {"kill_client": {"users": ["no-such-user-npud"]}}}, ["admin.kill_client.users[0]"]),
    ({"quotas": {"defaults": {}}}, ["quotas", "defaults"]),
    ({"quotas": {"default": {"memory": -1}}}, ["quotas.default.memory"]),
    ({"quotas": {"default": {"memory": "-1MiB"}}}, ["quotas.default.memory"]),
    ({"quotas": {"default": {"memory": 0}}}, ["quotas.default.memory", "at least"]),
    ({"quotas": {"default": {"jobs_in_flight": -3}}}, ["quotas.default.jobs_in_flight"]),
    ({"quotas": {"default": {"jobs_in_flight": 0}}}, ["quotas.default.jobs_in_flight"]),
    ({"quotas": {"default": {"share": 0}}}, ["quotas.default.share"]),
    ({"quotas": {"default": {"share": 1.5}}}, ["quotas.default.share"]),
    ({"quotas": {"default": {"priority_ceiling": "ludicrous"}}}, ["quotas.default.priority_ceiling"]),
    ({"quotas": {"default": {"cpu": 1}}}, ["quotas.default", "cpu"]),
    ({"quotas": {"users": {"no-such-user-npud": {"memory": 1}}}}, ["quotas.users.no-such-user-npud"]),
    ({"quotas": {"users": {"1000": {"memory": "lots"}}}}, ["quotas.users.1000.memory", "lots"]),
    ({"quotas": {"users": {"0": {}, "root": {}}}}, ["quotas.users", "two tables"]),
    ({"curve_clients": {"name": "x"}}, ["curve_clients", "array"]),
    ({"curve_clients": [{"name": "x", "user": 0}]}, ["curve_clients[0]", "public_key"]),
    ({"curve_clients": [{"name": "x", "user": 0, "public_key": "short"}]}, ["curve_clients[0].public_key"]),
    ({"curve_clients": [{"name": "bad name!", "user": 0, "public_key": "A" * 40}]}, ["curve_clients[0].name"]),
    ({"curve_clients": [{"name": "x", "public_key": "A" * 40}]}, ["curve_clients[0].user", "missing"]),
    ({"curve_clients": [{"name": "x", "user": -2, "public_key": "A" * 40}]}, ["curve_clients[0].user"]),
    ({"curve_clients": [{"name": "x", "user": 0, "public_key": "A" * 40, "public_key_file": "/k"}]},
     ["curve_clients[0]", "exactly one"]),
    ({"curve_clients": [{"name": "x", "user": 0, "public_key_file": "/nonexistent/k.key"}]},
     ["curve_clients[0].public_key_file"]),
    ({"curve_clients": [{"name": "x", "user": 0, "public_key": "A" * 40},
                        {"name": "y", "user": 0, "public_key": "A" * 40}]}, ["curve_clients[1]", "same key"]),
    ({"curve_clients": [{"name": "x", "user": 0, "public_key": "A" * 40},
                        {"name": "x", "user": 0, "public_key": "B" * 40}]}, ["curve_clients[1].name", "twice"]),
    ({"curve_clients": [{"name": "x", "user": 0, "public_key": "A" * 40, "uid": 5}]}, ["curve_clients[0]", "uid"]),
    ({"quotas": {"default": {"sessions": 0}}}, ["quotas.default.sessions", "positive"]),
    ({"quotas": {"users": {"65534": {"sessions": "many"}}}}, ["quotas.users.65534.sessions"]),
])
def test_policy_file_errors_name_the_key(data, words):
    with pytest.raises(ConfigError) as info:
        policy_mod.from_dict(data)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize("config,policy,words", [
    ('policy = 5\n', None, ["policy", "path"]),
    ('policy = "{dir}/missing.toml"\n', None, ["policy", "missing.toml"]),
    ('policy = "{dir}/policy.toml"\n', "not toml [\n", ["policy", "TOML"]),
    ('policy = "{dir}/policy.toml"\n', "[quotas.default]\nmemory = -4\n", ["policy", "quotas.default.memory"]),
    ('policy = "{dir}/policy.toml"\n', "colour = 1\n", ["policy", "colour"]),
    ('[limits]\nmax_sessions = 8\nadmin_sessions = 8\n', None, ["limits.admin_sessions", "less than"]),
    ('[limits]\nadmin_sessions = -1\n', None, ["limits.admin_sessions"]),
    ('tcp_endpoint = "udp://127.0.0.1:5"\n[curve]\nsecret_key_file = "/x"\n', None, ["tcp_endpoint"]),
    ('tcp_endpoint = "tcp://127.0.0.1:5"\n', None, ["tcp_endpoint", "CURVE", "[curve]"]),
    ('tcp_endpoint = 5\n', None, ["tcp_endpoint"]),
    ('[curve]\nsecret_key = "x"\n', None, ["curve", "secret_key"]),
    ('[curve]\nsecret_key_file = 3\n', None, ["curve.secret_key_file"]),
    ('curve = 3\n', None, ["curve", "table"]),
    ('tcp_endpoint = "tcp://127.0.0.1:5"\n[curve]\nsecret_key_file = "{dir}/nope.key_secret"\n', None,
     ["curve.secret_key_file", "nope.key_secret"]),
    ('tcp_endpoint = "tcp://127.0.0.1:5"\n[curve]\nsecret_key_file = "{dir}/pub.key"\n', None,
     ["curve.secret_key_file", "no secret-key"]),
])
def test_config_errors_exit_2_naming_the_key(tmp_path, config, policy, words):
    import zmq.auth

    zmq.auth.create_certificates(str(tmp_path), "pub")
    if policy is not None:
        (tmp_path / "policy.toml").write_text(policy)
    (tmp_path / "bad.toml").write_text(config.replace("{dir}", str(tmp_path)))
    proc = subprocess.run([sys.executable, "-m", "npud.main", "--config", str(tmp_path / "bad.toml"),
                           "--endpoint", f"ipc://{tmp_path}/x.sock"], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    for w in words:
        assert w in proc.stderr, (w, proc.stderr)
    assert not os.path.exists(tmp_path / "x.sock")


def test_policy_flag_overrides_and_sample_policy_loads(tmp_path):
    """The shipped sample policy is valid (its users may not exist here: only its shape is checked)."""
    import tomllib

    with open(os.path.join(ROOT, "systemd", "npud-policy.toml")) as f:
        text = f.read()
    for group in ("npu", "wheel"):  # groups an installation has (npud.sysusers makes npu); not this machine
        text = text.replace(f'"{group}"', '"root"')
    data = tomllib.loads(text)
    p = policy_mod.from_dict(data)
    assert p.connect is not None and p.default_quota.memory
    (tmp_path / "p.toml").write_text("bogus = 1\n")
    proc = subprocess.run([sys.executable, "-m", "npud.main", "--policy", str(tmp_path / "p.toml"),
                           "--endpoint", f"ipc://{tmp_path}/x.sock"], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    assert proc.returncode == 2 and "bogus" in proc.stderr
