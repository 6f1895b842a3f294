"""The client library: npu.local(), local size limits, and errors once the daemon is gone."""

from __future__ import annotations

import os

import numpy as np
import pytest

import npu
from npud.ipc_schema.endpoint import ipc_path
from npud.ipc_schema.schema import MAX_MESSAGE_BYTES, PROTOCOL_VERSION


def test_local_context_manager_stops_its_daemon():
    with npu.local() as c:
        daemon = c.daemon
        path = ipc_path(daemon.endpoint)
        assert daemon.process.poll() is None and os.path.exists(path)
        assert c.attached
        buf = c.alloc(16 * 4)
        buf.map(np.float32)[:] = 3.0
        assert np.frombuffer(buf.read(), np.float32).tolist() == [3.0] * 16
        v = c.version()
        assert v["protocol"] == list(PROTOCOL_VERSION) and v["daemon_version"] == c.daemon_version
        assert [d.name for d in c.devices()] == ["npu0"]
    assert daemon.process.returncode == 0
    assert not os.path.exists(path) and not os.path.exists(daemon.dir)
    with pytest.raises(npu.ConnectionLost) as info:
        c.ping()
    assert info.value.code == "ENOTCONN"
    c.close()  # idempotent


def test_local_passes_daemon_args_and_client_kwargs():
    with npu.local("--device", "edge", "--device", "server", name="tester", map_io=False) as c:
        assert [d.preset for d in c.devices()] == ["edge", "server"]
        assert c.devices()[1].cores == 4  # parameters read as attributes
        me = next(x for x in c.clients() if x["session"] == c.session)
        assert me["name"] == "tester" and me["pid"] == os.getpid()
        buf = c.alloc(4096, device=1)
        buf.write(b"abc")
        assert buf._mm is None and buf.read(3) == b"abc"


def test_client_refuses_oversize_frames_locally(client):
    ping_before = client.status()["clients"]
    with pytest.raises(npu.InvalidArgument) as info:
        client.submit(bytes(MAX_MESSAGE_BYTES), [])
    assert info.value.code == "EMSGSIZE" and str(MAX_MESSAGE_BYTES) in info.value.message
    assert info.value.retryable is False
    client.ping()
    assert len(client.status()["clients"]) == len(ping_before)


def test_message_path_write_chunks_to_stay_under_limit(make_client):
    c = make_client(map_io=False)
    buf = c.alloc(c.limits["max_inline_bytes"] + 10)
    buf.write(b"\x01" * buf.size)  # must not trip EMSGSIZE
    assert buf.read(10, offset=buf.size - 10) == b"\x01" * 10


def test_connect_to_missing_endpoint(tmp_path):
    ep = f"ipc://{tmp_path}/absent.sock"
    with pytest.raises(npu.ConnectionLost) as info:
        npu.connect(ep)
    assert info.value.code == "ECONNREFUSED" and ep in info.value.message and info.value.retryable


def test_closed_client_is_enotconn(make_client):
    c = make_client()
    c.close()
    with pytest.raises(npu.ConnectionLost) as info:
        c.alloc(1)
    assert info.value.code == "ENOTCONN"


def test_bye_frees_buffers(make_client, client):
    c = make_client(map_io=False)
    c.alloc(1 << 20)
    used = sum(d.memory_used for d in client.devices())
    c.close()
    assert sum(d.memory_used for d in client.devices()) == used - (1 << 20)
    assert c.session not in {x["session"] for x in client.clients()}


def _fake_daemon(endpoint: str, protocol_version: list[int], ready: "threading.Event") -> None:
    """Answer one hello the way a daemon speaking ``protocol_version`` would."""
    import secrets

    import zmq

    from npud.ipc_schema import codec
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    ready.set()
    try:
        if not sock.poll(5000):
            return
        routing_id, frame = sock.recv_multipart()
        request = codec.decode_request(frame)
        sock.send_multipart([routing_id, codec.encode_result(request.seq, {
            "session": "s-fake", "protocol": protocol_version, "daemon_version": "9.9",
            "lease_ms": 1000, "attach_path": "", "attach_token": secrets.token_bytes(32),
            "limits": {"max_message_bytes": MAX_MESSAGE_BYTES, "max_inline_bytes": 1 << 20,
                       "max_buffer_bytes": 1 << 20, "memory_quota": 1 << 20}})])
        sock.poll(500)  # let the reply go out (and swallow a bye)
    finally:
        sock.close()


@pytest.mark.parametrize("delta,ok", [((1, 0), False), ((0, 3), True)])
def test_client_refuses_daemon_of_another_major(tmp_path, delta, ok):
    import threading
    major, minor = PROTOCOL_VERSION
    theirs = [major + delta[0], minor + delta[1]]
    ep = f"ipc://{tmp_path}/fake.sock"
    ready = threading.Event()
    t = threading.Thread(target=_fake_daemon, args=(ep, theirs, ready))
    t.start()
    ready.wait(5)
    try:
        if ok:
            c = npu.connect(ep, timeout=2)
            assert c.session == "s-fake" and not c.attached
            c._closed = True  # nothing to say bye to
            c._sock.close()
        else:
            with pytest.raises(npu.ProtocolMismatch) as info:
                npu.connect(ep, timeout=2)
            assert info.value.code == "EPROTO"
            assert f"{theirs[0]}.{theirs[1]}" in info.value.message and f"{major}.{minor}" in info.value.message
    finally:
        t.join(10)
