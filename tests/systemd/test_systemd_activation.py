"""npud started the way systemd starts it: inherited sockets, $NOTIFY_SOCKET, watchdog.

The first tests hand npud its sockets from Python (what the service manager
does: fds 3.., $LISTEN_FDS/$LISTEN_PID/$LISTEN_FDNAMES), so they run anywhere;
the ``systemd-socket-activate`` ones skip where that binary is missing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

import numpy as np
import pytest
import zmq

import npu
from npud.ipc_schema import codec
from npu import protocol
from systemd_harness import (SSA, TIMEOUT_S, Notifications, child_env, listening_socket, start_with_fds,
                             stop)

needs_ssa = pytest.mark.skipif(SSA is None, reason="systemd-socket-activate is not installed "
                                                   "(Debian/Ubuntu: apt-get install systemd)")


@pytest.fixture
def rundir(tmp_path_factory):
    # Short: Unix socket paths are limited to 107 bytes.
    path = tmp_path_factory.mktemp("sd")
    yield str(path)


@pytest.fixture
def notify(rundir):
    n = Notifications(os.path.join(rundir, "notify"))
    yield n
    n.close()


def raw_request(endpoint: str, op: str, args: dict) -> zmq.Socket:
    """A bare DEALER that sends one request at once (no existence check, no waiting)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send(codec.encode_request(op, 7, args))
    return sock


def expect_reply(sock: zmq.Socket) -> dict:
    assert sock.poll(int(TIMEOUT_S * 1000)), "the request sent before READY=1 got no reply (lost)"
    reply = codec.decode_reply(sock.recv())
    assert reply.seq == 7 and reply.error is None, reply
    sock.close()
    return reply.result


def exercise(endpoint: str, attach_path: str) -> None:
    """A real client through the inherited sockets: a session, and a buffer mapped via fd passing."""
    with npu.connect(endpoint) as client:
        assert client.attached
        buf = client.alloc(1 << 16)
        view = buf.map(np.float32)
        view[:] = 2.5
        assert float(np.asarray(buf.map(np.float32)).sum()) == 2.5 * (1 << 14)
        assert client.status()["endpoint"] == endpoint
        clients = client.clients()
        assert sum(c["attached"] for c in clients) == 1  # ours (a raw early session may linger)
    assert os.path.exists(attach_path)


def check_lifecycle(notify: Notifications, process: subprocess.Popen) -> None:
    """WATCHDOG=1 pings keep coming, STATUS= is sent, STOPPING=1 comes on SIGTERM."""
    assert notify.wait_for("STATUS=", process).startswith("STATUS=serving ")
    assert "MAINPID=" + str(process.pid) in notify.assignments()
    pings = notify.assignments().count("WATCHDOG=1")
    time.sleep(0.6)  # WATCHDOG_USEC=200000: a ping every 0.1 s
    notify.drain()
    assert notify.assignments().count("WATCHDOG=1") >= pings + 3
    assert stop(process) == 0
    notify.drain(0.2)
    assert "STOPPING=1" in notify.assignments()


def test_systemd_adopts_both_inherited_sockets(rundir, notify):
    zpath, fpath = os.path.join(rundir, "npud.sock"), os.path.join(rundir, "npud.fds")
    zsock = listening_socket(zpath, socket.SOCK_STREAM)
    fsock = listening_socket(fpath, socket.SOCK_SEQPACKET)
    inode = os.stat(fpath).st_ino
    env = child_env(notify, WATCHDOG_USEC="200000")
    # The configured endpoint differs on purpose: the inherited socket wins.
    process = start_with_fds([zsock, fsock], ["npud", "npud-fds"],
                             ["--endpoint", f"ipc://{rundir}/elsewhere.sock", "--log-level", "warning"], env)
    try:
        early = raw_request(f"ipc://{zpath}", "version", {})
        notify.wait_for("READY=1", process)
        assert expect_reply(early)["protocol"]
        exercise(f"ipc://{zpath}", fpath)
        assert os.stat(fpath).st_ino == inode, "npud re-bound the companion socket instead of adopting it"
        assert not os.path.exists(os.path.join(rundir, "elsewhere.sock"))
        check_lifecycle(notify, process)
        # The socket files belong to the socket unit: npud leaves them, still listening.
        assert os.path.exists(zpath) and os.path.exists(fpath)
    finally:
        stop(process)
        zsock.close()
        fsock.close()


def test_systemd_names_are_optional_types_decide(rundir, notify):
    """Reversed order and no names: the daemon still tells the sockets apart by type."""
    zpath, fpath = os.path.join(rundir, "a.sock"), os.path.join(rundir, "b.fds")
    zsock = listening_socket(zpath, socket.SOCK_STREAM)
    fsock = listening_socket(fpath, socket.SOCK_SEQPACKET)
    process = start_with_fds([fsock, zsock], [], ["--log-level", "warning"], child_env(notify))
    try:
        notify.wait_for("READY=1", process)
        exercise(f"ipc://{zpath}", fpath)
    finally:
        assert stop(process) == 0
        zsock.close()
        fsock.close()


def test_systemd_only_zmq_socket_inherited_binds_companion(rundir, notify):
    zpath = os.path.join(rundir, "npud.sock")
    zsock = listening_socket(zpath, socket.SOCK_STREAM)
    process = start_with_fds([zsock], ["npud"], ["--log-level", "warning"], child_env(notify))
    try:
        notify.wait_for("READY=1", process)
        exercise(f"ipc://{zpath}", os.path.join(rundir, "npud.fds"))
    finally:
        assert stop(process) == 0
        zsock.close()
    assert not os.path.exists(os.path.join(rundir, "npud.fds")), "npud's own companion socket left behind"
    assert os.path.exists(zpath)


def test_systemd_without_activation_binds_its_own(rundir, notify):
    endpoint = f"ipc://{rundir}/own.sock"
    process = subprocess.Popen([*protocol_cmd(), "--endpoint", endpoint, "--log-level", "warning"],
                               env=child_env(notify, LISTEN_PID="1", LISTEN_FDS="2"))
    try:
        notify.wait_for("READY=1", process)
        exercise(endpoint, os.path.join(rundir, "own.fds"))
    finally:
        assert stop(process) == 0
    assert not os.path.exists(os.path.join(rundir, "own.sock"))
    assert "WATCHDOG=1" not in notify.assignments()  # no WATCHDOG_USEC: no pings


def protocol_cmd() -> list[str]:
    import sys
    return [sys.executable, "-m", "npud.main"]


@needs_ssa
def test_systemd_socket_activate_both_sockets(rundir, notify):
    """systemd-socket-activate passes one socket type per invocation, so two are chained.

    The outer one listens on the ZeroMQ socket and waits for a connection: the
    raw request below is what starts npud, and it must be answered.  The inner
    one adds the companion socket (--seqpacket); --fdname names all fds in order.
    """
    zpath, fpath = os.path.join(rundir, "npud.sock"), os.path.join(rundir, "npud.fds")
    env = child_env(notify, WATCHDOG_USEC="200000")
    keep = ["-E", "NOTIFY_SOCKET", "-E", "WATCHDOG_USEC", "-E", "PYTHONPATH"]  # it passes only these
    process = subprocess.Popen(
        [SSA, *keep, "-l", zpath, "--fdname", "npud",
         SSA, *keep, "--seqpacket", "-l", fpath, "--fdname", "npud:npud-fds",
         *protocol_cmd(), "--log-level", "warning"],
        env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not os.path.exists(zpath):
            assert time.monotonic() < deadline and process.poll() is None, "no socket from systemd-socket-activate"
            time.sleep(0.01)
        early = raw_request(f"ipc://{zpath}", "hello", protocol.hello_args("early-bird"))
        ready = notify.wait_for("READY=1", process)
        assert ready == "READY=1"
        result = expect_reply(early)
        assert result["attach_path"] == fpath
        inode = os.stat(fpath).st_ino
        exercise(f"ipc://{zpath}", fpath)
        assert os.stat(fpath).st_ino == inode
        check_lifecycle(notify, process)
    finally:
        stop(process)


@needs_ssa
def test_systemd_socket_activate_zmq_socket_only(rundir, notify):
    zpath = os.path.join(rundir, "npud.sock")
    process = subprocess.Popen(
        [SSA, "-E", "NOTIFY_SOCKET", "-E", "PYTHONPATH", "-l", zpath, "--fdname", "npud",
         *protocol_cmd(), "--log-level", "warning"], env=child_env(notify), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not os.path.exists(zpath):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.01)
        early = raw_request(f"ipc://{zpath}", "version", {})
        notify.wait_for("READY=1", process)
        expect_reply(early)
        exercise(f"ipc://{zpath}", os.path.join(rundir, "npud.fds"))
    finally:
        assert stop(process) == 0
    notify.drain(0.2)
    assert "STOPPING=1" in notify.assignments()
