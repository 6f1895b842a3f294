"""Identity: what libzmq gives a ZAP handler, kernel uids through a real daemon, CURVE over tcp, tcp off
by default, and the companion socket's uid agreeing with the ZAP identity."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import zmq
import zmq.auth

import npu
from npud.ipc_schema import codec
from npu.local import LocalDaemon
from asuser import needs_root, npu_error, open_to_everyone, run_as
from npud_raw import RawPeer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- what libzmq really passes: the evidence the design rests on ------------------------------


@needs_root
def test_libzmq_passes_ipc_peer_credentials_to_zap():
    """Over ipc, the ZAP request's address is localhost:<uid>:<gid>:<pid> of the connecting process
    (libzmq reads SO_PEERCRED); the User-Id the handler returns rides on every message."""
    ctx = zmq.Context()
    zap = ctx.socket(zmq.ROUTER)
    zap.bind("inproc://zeromq.zap.01")
    seen = []

    def handler():
        frames = zap.recv_multipart()
        seen.append(frames)
        zap.send_multipart([frames[0], b"", b"1.0", frames[3], b"200", b"OK", b"who-zap-said", b""])
    thread = threading.Thread(target=handler, daemon=True)
    thread.start()
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.ZAP_DOMAIN, b"probe")
    tmp = tempfile.mkdtemp(prefix="zap-probe-")  # pytest's tmp_path is not reachable by other uids
    os.chmod(tmp, 0o711)
    server.bind(f"ipc://{tmp}/probe.sock")
    os.chmod(f"{tmp}/probe.sock", 0o666)

    def send_one(endpoint):
        c = zmq.Context()
        s = c.socket(zmq.DEALER)
        s.connect(endpoint)
        s.send(b"hello")
        time.sleep(0.5)
        s.close(0)
        c.term()
        return os.getpid()
    child_pid = run_as(65534, 65533, send_one, f"ipc://{tmp}/probe.sock")
    server.setsockopt(zmq.RCVTIMEO, 10_000)
    routing_id, message = server.recv_multipart(copy=False)
    shutil.rmtree(tmp, ignore_errors=True)
    version, _req, domain, address, _rid, mechanism = seen[0][2:8]
    assert (version, domain, mechanism) == (b"1.0", b"probe", b"NULL")
    assert address == f"localhost:65534:65533:{child_pid}".encode(), address
    assert message.get("User-Id") == "who-zap-said"
    assert message.get("Peer-Address") == address.decode()
    for s in (server, zap):
        s.close(0)
    ctx.term()


# --- kernel identity through a real daemon ---------------------------------------------------


@needs_root
def test_sessions_carry_the_kernel_identity_not_the_claim(daemon):
    open_to_everyone(daemon)
    raw = RawPeer(daemon.endpoint)
    try:
        assert raw.request("hello", {"protocol": [1, 1], "client_name": "liar", "pid": 1})["ok"]

        def as_nobody(endpoint):
            with npu.connect(endpoint, name="nobody") as c:
                return {"session": c.session, "pid": os.getpid(),
                        "clients": {x["session"]: [x["uid"], x["pid"]] for x in c.clients()}}
        out = run_as(65534, 65534, as_nobody, daemon.endpoint)
        assert out["clients"][out["session"]] == [65534, out["pid"]]
        with npu.connect(daemon.endpoint) as c:
            mine = {x["name"]: (x["uid"], x["pid"]) for x in c.clients()}
        assert mine["liar"] == (0, os.getpid()), "the claimed pid 1 must not be believed"
    finally:
        raw.close()


@needs_root
def test_companion_socket_of_another_uid_is_refused(daemon):
    open_to_everyone(daemon)
    raw = RawPeer(daemon.endpoint)
    try:
        hello = raw.hello()["result"]

        def attach_as_nobody(path, session, token):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(5)
            s.connect(path)
            s.send(codec.pack({"session": session, "token": token}))
            reply = codec.unpack(s.recv(4096))
            s.close()
            return reply
        reply = run_as(65534, 65534, attach_as_nobody, hello["attach_path"], hello["session"],
                       hello["attach_token"].hex())
        # (hex is the wrong token type: first check that the right token as the wrong uid is refused)
        assert reply["ok"] is False
        token = hello["attach_token"]

        def attach_right_token(path, session, token_hex):
            return attach_as_nobody(path, session, bytes.fromhex(token_hex))
        reply = run_as(65534, 65534, attach_right_token, hello["attach_path"], hello["session"], token.hex())
        assert reply["ok"] is False and reply["error"]["code"] == "EPERM", reply
        assert "uid 65534" in reply["error"]["message"] and "uid 0" in reply["error"]["message"]
        # the rightful owner still attaches
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(hello["attach_path"])
        s.send(codec.pack({"session": hello["session"], "token": token}))
        assert codec.unpack(s.recv(4096))["ok"] is True
        s.close()
    finally:
        raw.close()


def test_tcp_is_off_by_default(daemon):
    """No listening tcp socket among the daemon's fds, and status names only the ipc endpoint."""
    inodes = set()
    for fd in os.listdir(f"/proc/{daemon.process.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{daemon.process.pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    assert inodes, "the daemon has no sockets at all?"
    listening = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{daemon.process.pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    listening.add(fields[9])
    assert not inodes & listening, "npud listens on tcp without tcp_endpoint"
    with npu.connect(daemon.endpoint) as c:
        assert c.status()["endpoint"].startswith("ipc://")


# --- CURVE over tcp -------------------------------------------------------------------------------


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def curve_daemon(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys")
    out = subprocess.run([sys.executable, "-m", "npud.main", "--generate-keys", str(keys)],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert os.stat(keys / "server.key_secret").st_mode & 0o077 == 0, "the secret key is readable by others"
    zmq.auth.create_certificates(str(keys), "known")
    zmq.auth.create_certificates(str(keys), "stranger")
    policy = keys / "policy.toml"
    policy.write_text(f'[[curve_clients]]\nname = "ci-runner"\npublic_key_file = "{keys}/known.key"\n'
                      'user = 65534\n')
    port = free_port()
    config = keys / "npud.toml"
    config.write_text(f'tcp_endpoint = "tcp://127.0.0.1:{port}"\npolicy = "{policy}"\n'
                      f'[curve]\nsecret_key_file = "{keys}/server.key_secret"\n')
    d = LocalDaemon("--config", str(config))
    d.tcp = f"tcp://127.0.0.1:{port}"
    d.keys = keys
    yield d
    d.stop()


def test_curve_client_with_a_known_key_connects(curve_daemon):
    keys = curve_daemon.keys
    with npu.connect(curve_daemon.tcp, curve=npu.curve_keys(f"{keys}/known.key_secret",
                                                           f"{keys}/server.key")) as c:
        listed = {x["session"]: x for x in c.clients()}
        assert listed[c.session]["uid"] == 65534, "the key's identity comes from the policy"
        assert not listed[c.session]["attached"], "tcp sessions have no companion socket"
        buf = c.alloc(8192)
        buf.write(b"\x05" * 8192)
        assert buf.read(8) == b"\x05" * 8
        assert c.status()["devices"]
    # the ipc endpoint of the same daemon still serves local clients by kernel uid
    with npu.connect(curve_daemon.endpoint) as local:
        assert {x["session"]: x["uid"] for x in local.clients()}[local.session] == os.getuid()


def test_map_over_tcp_is_eopnotsupp_and_the_session_still_works(curve_daemon):
    """A tcp session has no companion socket: map is not supported there (EOPNOTSUPP, not ENOTCONN,
    which would tell the client its session is gone)."""
    keys = curve_daemon.keys
    with npu.connect(curve_daemon.tcp, curve=npu.curve_keys(f"{keys}/known.key_secret",
                                                           f"{keys}/server.key")) as c:
        buf = c.alloc(4096)
        err = npu_error(c._request, "map", {"handle": buf.handle})
        assert err is not None and err["code"] == "EOPNOTSUPP" and err["retryable"] is False, err
        assert "tcp" in err["message"] and "read and write" in err["message"]
        buf.write(b"\x09" * 16)
        assert buf.read(16) == b"\x09" * 16
        assert {x["session"] for x in c.clients()} >= {c.session}, "the session is alive"


def test_curve_unknown_key_no_key_and_wrong_server_key_are_refused(curve_daemon):
    keys = curve_daemon.keys
    server_public, _ = zmq.auth.load_certificate(f"{keys}/server.key")
    attempts = {
        "unknown key": npu.curve_keys(f"{keys}/stranger.key_secret", f"{keys}/server.key"),
        "no key": None,
        "wrong server key": (*zmq.auth.load_certificate(f"{keys}/known.key_secret"),
                             zmq.auth.load_certificate(f"{keys}/stranger.key")[0]),
    }
    for what, curve in attempts.items():
        # EPERM comes from the socket monitor; a missed refusal would end as ECONNREFUSED
        # ("no answer to hello") when the hello timeout runs out.
        with pytest.raises(npu.PermissionDenied) as info:
            npu.connect(curve_daemon.tcp, curve=curve, timeout=5)
        assert info.value.code == "EPERM", what
    with pytest.raises(npu.PermissionDenied) as info:
        npu.connect(curve_daemon.tcp, curve=attempts["unknown key"])
    assert "CURVE key" in info.value.message
    # refused peers never reached the dispatcher; the daemon is fine
    with npu.connect(curve_daemon.endpoint) as c:
        assert all(x["uid"] != 65534 for x in c.clients())
        assert server_public


@needs_root
async def test_trio_client_curve_accepted_and_refused(curve_daemon):
    keys = curve_daemon.keys
    known = npu.curve_keys(f"{keys}/known.key_secret", f"{keys}/server.key")
    async with npu.connect_async(curve_daemon.tcp, curve=known) as c:
        await c.ping()
        assert not c.attached      # tcp: no companion socket, data travels in messages
        buf = await c.alloc(1 << 17)
        await buf.write(b"\x07" * buf.size)
        assert await buf.read(4, offset=buf.size - 4) == b"\x07" * 4
    for curve in (npu.curve_keys(f"{keys}/stranger.key_secret", f"{keys}/server.key"), None):
        with pytest.raises(npu.PermissionDenied, match="CURVE"):
            async with npu.connect_async(curve_daemon.tcp, curve=curve, timeout=5):
                pass


def test_zap_refusal_is_logged_and_counted_in_the_daemon(curve_daemon):
    """A raw DEALER without CURVE on the tcp endpoint never gets a message through."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(curve_daemon.tcp)
    sock.send(codec.pack({"op": "version", "seq": 1, "args": {}}))
    assert not sock.poll(1000), "a peer without CURVE got an answer over tcp"
    sock.close(0)


def test_npuctl_over_tcp_with_curve_keys(curve_daemon, capsys):
    from npuctl.main import main as npuctl_main

    keys = curve_daemon.keys
    code = npuctl_main(["--endpoint", curve_daemon.tcp, "--curve-key", f"{keys}/known.key_secret",
                        "--server-key", f"{keys}/server.key", "status", "--json"])
    assert code == 0
    assert '"daemon_version"' in capsys.readouterr().out
    code = npuctl_main(["--endpoint", curve_daemon.tcp, "--curve-key", f"{keys}/stranger.key_secret",
                        "--server-key", f"{keys}/server.key", "status"])
    assert code != 0 and "refused this client's CURVE key" in capsys.readouterr().err
