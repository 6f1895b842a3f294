"""The protocol as docs/PROTOCOL.md states it, over the wire: every malformed request gets the
documented error reply and the session that sent it stays usable; values, versions, the target
hash, jobs, model buffers and the companion socket behave as documented.  Frames are sent with a
plain DEALER (and packets with a plain socket), not the library."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import time

import msgpack
import pytest
import zmq

import npu
from npud.ipc_schema.schema import (DEVICE_PARAMS, ENGINE_BUSY, HARD_FRAME_LIMIT, JOB_STATS, MACS_PER_CYCLE,
                                    MAX_MESSAGE_BYTES, PROTOCOL_VERSION, REPORT_ROW)
from npud.attach import HELLO_TIMEOUT_S
from npud.server import HELD_BYTES_PER_CONNECTION as HELD
from npud_raw import RawPeer, error_of, session_peer
from sched_models import Builder, module_daemon_in_test_mode
from streams import A, B, O, add_stream


@pytest.fixture
def peer(daemon):
    with session_peer(daemon.endpoint) as p:
        yield p


def still_usable(peer: RawPeer) -> None:
    reply = peer.request("ping")
    assert reply["ok"] is True and reply["result"] == {}
    reply = peer.request("alloc", {"device": 0, "size": 4096})
    assert reply["ok"], reply
    assert peer.request("free", {"handle": reply["result"]["handle"]})["ok"]


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def expect_error(peer, frame: bytes, code: str, *, seq: int, words=()) -> dict:
    peer.send_frames(frame)
    reply = peer.recv()
    assert reply["seq"] == seq
    err = error_of(reply)
    assert err["code"] == code, err
    assert err["retryable"] is False
    for w in words:
        assert w in err["message"], (w, err["message"])
    still_usable(peer)
    return err


def test_not_msgpack(peer):
    expect_error(peer, b"\xc1\xc1garbage", "EPROTO", seq=0, words=["msgpack"])


def test_not_a_map(peer):
    expect_error(peer, pack(["ping", 1, {}]), "EPROTO", seq=0, words=["map"])


def test_missing_seq(peer):
    expect_error(peer, pack({"op": "ping", "args": {}}), "EPROTO", seq=0, words=["seq"])


def test_unknown_op(peer):
    expect_error(peer, pack({"op": "reboot", "seq": 11, "args": {}}), "EINVAL", seq=11, words=["reboot"])


@pytest.mark.parametrize("op,args,words", [
    ("alloc", {"device": 0}, ["args.size", "missing"]),
    ("alloc", {"device": 0, "size": 64, "color": "red"}, ["args", "color"]),
    ("alloc", {"device": 0, "size": True}, ["args.size", "bool"]),
    ("alloc", {"device": "0", "size": 64}, ["args.device", "str"]),
    ("write", {"handle": 1, "offset": 0, "data": "text"}, ["args.data", "expected bin, got str"]),
    ("alloc", {"device": 0, "size": 0}, ["args.size", "out of range"]),
    ("alloc", {"device": 0, "size": 2**41}, ["args.size", "out of range"]),
    ("read", {"handle": 0, "offset": 0, "size": 1}, ["args.handle", "out of range"]),
    ("wait", {"job": 1, "timeout_ms": -1}, ["args.timeout_ms", "out of range"]),
    ("submit", {"device": 0, "stream": b"", "bindings": []}, ["args.stream"]),
    ("ping", {"x": 1}, ["args", "'x'"]),
    ("submit", {"device": 0, "stream": b"x", "bindings": [{"handle": 1, "va": 0, "writable": 1}]},
     ["args.bindings[0].writable", "expected bool, got int"]),
    ("jobs", {"limit": None}, ["args.limit", "got nil"]),
    ("alloc", {"device": 0, "size": msgpack.ExtType(1, b"\x40")}, ["args.size", "expected int"]),
])
def test_field_errors_name_the_field(peer, op, args, words):
    expect_error(peer, pack({"op": op, "seq": 21, "args": args}), "EINVAL", seq=21, words=[op, *words])


def test_trailing_bytes(peer):
    expect_error(peer, pack({"op": "ping", "seq": 4, "args": {}}) + b"\x00", "EPROTO", seq=0)


def test_seq_out_of_range(peer):
    expect_error(peer, pack({"op": "ping", "seq": 2**32, "args": {}}), "EPROTO", seq=0, words=["seq"])


def test_envelope_without_op_but_with_seq_echoes_it(peer):
    expect_error(peer, pack({"seq": 6, "args": {}}), "EINVAL", seq=6, words=["op"])


def test_any_integer_family_is_accepted(peer):
    """The range counts, not the encoding: 0 as int8 and 4096 as uint64 (msgpack-python would
    pick fixint and uint16)."""
    args = b"\x82" + pack("device") + b"\xd0\x00" + pack("size") + b"\xcf" + (4096).to_bytes(8, "big")
    frame = (b"\x83" + pack("op") + pack("alloc") + pack("seq") + b"\xce" + (9).to_bytes(4, "big")
             + pack("args") + args)
    peer.send_frames(frame)
    reply = peer.recv()
    assert reply["seq"] == 9 and reply["ok"], reply
    assert peer.request("free", {"handle": reply["result"]["handle"]})["ok"]


def test_replies_write_float64_and_the_smallest_integer_family(peer):
    peer.send("devices", seq=12)
    frame = peer.sock.recv()
    assert b"\xa7busy_ms\xcb" in frame     # float 64, even for 0.0
    assert b"\xa5index\x00" in frame       # device 0 as a positive fixint


def test_envelope_extra_field(peer):
    expect_error(peer, pack({"op": "ping", "seq": 5, "args": {}, "trace": 1}), "EINVAL", seq=5,
                 words=["trace"])


def test_multi_frame_request(peer):
    peer.send_frames(pack({"op": "ping", "seq": 3, "args": {}}), b"second")
    reply = peer.recv()
    assert reply["seq"] == 0
    err = error_of(reply)
    assert err["code"] == "EPROTO" and "one frame" in err["message"]
    still_usable(peer)


def test_oversize_frame_gets_emsgsize(peer):
    frame = pack({"op": "write", "seq": 8, "args": {"handle": 1, "offset": 0,
                                                    "data": bytes(MAX_MESSAGE_BYTES)}})
    assert MAX_MESSAGE_BYTES < len(frame) < HARD_FRAME_LIMIT
    peer.send_frames(frame)
    reply = peer.recv(timeout=10)
    assert reply["seq"] == 0
    err = error_of(reply)
    assert err["code"] == "EMSGSIZE" and str(MAX_MESSAGE_BYTES) in err["message"]
    still_usable(peer)


def test_frame_above_hard_limit_drops_only_that_connection(daemon, peer):
    other = npu.connect(daemon.endpoint)
    try:
        buf = other.alloc(4096)
        buf.write(b"still here")
        peer.send_frames(bytes(HARD_FRAME_LIMIT + 1))
        with pytest.raises(TimeoutError):
            peer.recv(timeout=0.5)  # libzmq dropped the connection: no reply at all
        assert daemon.process.poll() is None
        other.ping()
        assert buf.read(10) == b"still here"
        # a fresh connection works too
        fresh = RawPeer(daemon.endpoint)
        assert fresh.hello()["ok"]
        fresh.close()
    finally:
        other.close()


def test_client_library_refuses_oversize_locally(client):
    with pytest.raises(npu.InvalidArgument) as info:
        client._request("write", {"handle": 1, "offset": 0, "data": bytes(MAX_MESSAGE_BYTES)})
    assert info.value.code == "EMSGSIZE" and str(MAX_MESSAGE_BYTES) in info.value.message
    client.ping()


# --- HELLO ----------------------------------------------------------------------------

def test_requests_before_hello_are_enotconn(daemon):
    p = RawPeer(daemon.endpoint)
    try:
        for op, args in [("ping", {}), ("alloc", {"device": 0, "size": 1}), ("status", {})]:
            err = error_of(p.request(op, args))
            assert err["code"] == "ENOTCONN" and "hello" in err["message"] and err["retryable"] is True
        # version needs no session
        assert p.request("version")["result"]["protocol"] == list(PROTOCOL_VERSION)
        assert p.hello()["ok"]
        assert p.request("ping")["ok"]
    finally:
        p.close()


def test_second_hello_is_einval(peer):
    err = error_of(peer.hello())
    assert err["code"] == "EINVAL" and "already has session" in err["message"]
    still_usable(peer)


def test_hello_other_major_refused_naming_both_versions(daemon):
    major, minor = PROTOCOL_VERSION
    p = RawPeer(daemon.endpoint)
    try:
        err = error_of(p.hello(version=(major + 1, 0)))
        assert err["code"] == "EPROTO"
        assert f"{major + 1}.0" in err["message"] and f"{major}.{minor}" in err["message"]
        # no session was opened
        assert error_of(p.request("ping"))["code"] == "ENOTCONN"
        # a different minor is accepted
        reply = p.hello(version=(major, minor + 7))
        assert reply["ok"] and reply["result"]["protocol"] == [major, minor]
    finally:
        p.close()


def test_hello_result_shape(daemon):
    p = RawPeer(daemon.endpoint)
    try:
        r = p.hello()["result"]
        assert r["attach_path"].endswith(".fds") and len(r["attach_token"]) == 32
        assert r["limits"]["max_message_bytes"] == MAX_MESSAGE_BYTES
        assert r["lease_ms"] > 0
        sessions = [c["session"] for c in p.request("clients")["result"]["clients"]]
        assert r["session"] in sessions
        assert p.request("bye")["ok"]
        assert error_of(p.request("ping"))["code"] == "ENOTCONN"
    finally:
        p.close()


# --- the transport: DEALER, not REQ ----------------------------------------------------

def test_req_socket_gets_eproto_seq_0_and_never_sees_it(daemon):
    """What PROTOCOL.md says of REQ: its empty delimiter frame makes a two-frame request,
    answered with EPROTO and seq 0, and the REQ socket drops that reply (no delimiter)."""
    req = zmq.Context.instance().socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(daemon.endpoint)
    raw = RawPeer(daemon.endpoint)
    try:
        req.send(pack({"op": "version", "seq": 1, "args": {}}))
        assert req.poll(1000) == 0   # the reply came and REQ discarded it
        raw.send_frames(b"", pack({"op": "version", "seq": 1, "args": {}}))  # what REQ sends
        reply = raw.recv()
        assert reply["seq"] == 0 and error_of(reply)["code"] == "EPROTO"
    finally:
        req.close(0)
        raw.close()


# --- the target hash --------------------------------------------------------------------

def recipe_target_hash(params: dict) -> bytes:
    """PROTOCOL.md's recipe, written from the document alone."""
    keys = ("clock_mhz", "cores", "dma_bytes_per_cycle", "dma_latency_cycles", "mac_cols", "mac_rows",
            "macs_per_cycle", "sram_bytes")
    canon = json.dumps({k: params[k] for k in keys}, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(b"npu-emu/1:" + canon.encode("ascii"), digest_size=8).digest()


def submit_add(peer, stream: bytes | None = None, n: int = 256) -> dict:
    """Submit the add stream (`streams.add_stream`) over fresh buffers; the submit reply."""
    handles = [peer.request("alloc", {"device": 0, "size": n * 4})["result"]["handle"] for _ in range(3)]
    bindings = [{"handle": h, "va": va, "writable": va == O} for h, va in zip(handles, (A, B, O))]
    return peer.request("submit", {"device": 0, "stream": stream or add_stream(n), "bindings": bindings})


def test_target_hash_recipe_matches_devices_and_the_device(peer):
    device = peer.request("devices")["result"]["devices"][0]
    target = recipe_target_hash(device["params"])
    assert device["target_hash"] == target
    stream = add_stream(256)
    job = submit_add(peer, stream[:8] + target + stream[16:])["result"]["job"]
    assert peer.request("wait", {"job": job, "timeout_ms": 10_000})["result"]["state"] == "done"
    err = error_of(submit_add(peer, stream[:8] + bytes(8) + stream[16:]))
    assert err["code"] == "EINVAL" and "target hash" in err["message"] and target.hex() in err["message"]


def test_device_params_and_job_stats_have_the_documented_keys(peer):
    params = peer.request("devices")["result"]["devices"][0]["params"]
    # an npu-emu device: every field but the cpu driver's
    assert set(params) == set(DEVICE_PARAMS.fields) - {"threads"}
    assert set(params["macs_per_cycle"]) == set(MACS_PER_CYCLE.fields)
    job = submit_add(peer)["result"]["job"]
    stats = peer.request("wait", {"job": job, "timeout_ms": 10_000})["result"]["stats"]
    assert set(stats) == set(JOB_STATS.fields) - {"partitions"}   # (a heterogeneous model's runs only)
    assert set(stats["engine_busy"]) == set(ENGINE_BUSY.fields)
    statuses = peer.request("wait_jobs", {"jobs": [job], "all": True, "timeout_ms": 0})["result"]["jobs"]
    assert statuses == [{"job": job, "state": "done", "stats": stats}]


def test_a_newer_minor_is_answered_with_the_daemons_version(daemon):
    p = RawPeer(daemon.endpoint)
    try:
        reply = p.hello(version=(PROTOCOL_VERSION[0], 99))
        assert reply["result"]["protocol"] == list(PROTOCOL_VERSION)
        assert p.request("ping")["ok"]
    finally:
        p.close()


# --- the companion socket ---------------------------------------------------------------

def attach(hello: dict, packet: bytes | None = None) -> tuple[socket.socket, dict]:
    """Connect to the companion socket, send ``packet`` (default: a valid attach.hello), and read
    the reply; the socket stays open for the caller."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(5)
    sock.connect(hello["attach_path"])
    sock.send(pack({"session": hello["session"], "token": hello["attach_token"]}) if packet is None else packet)
    return sock, msgpack.unpackb(sock.recv(4096), raw=False)


def refused_attach(hello: dict, packet: bytes | None, code: str) -> None:
    sock, reply = attach(hello, packet)
    try:
        assert reply["ok"] is False and reply["error"]["code"] == code, reply
        assert sock.recv(4096) == b""    # then the daemon closes the socket
    finally:
        sock.close()


def test_companion_socket_refusals_and_fd_packets(daemon):
    peer = RawPeer(daemon.endpoint)
    try:
        hello = peer.hello()["result"]
        refused_attach(hello, b"\xc1not msgpack", "EPROTO")
        refused_attach(hello, pack({"session": hello["session"]}), "EPROTO")
        refused_attach(hello, pack({"session": hello["session"], "token": bytes(32)}), "EPERM")
        sock, reply = attach(hello)
        assert reply == {"ok": True}
        refused_attach(hello, None, "EINVAL")     # already attached
        handle = peer.request("alloc", {"device": 0, "size": 100})["result"]["handle"]
        seq = peer.send("map", {"handle": handle})
        data, fds, _flags, _addr = socket.recv_fds(sock, 4096, 4)
        assert msgpack.unpackb(data, raw=False) == {"tag": seq, "handle": handle, "size": 4096}
        assert len(fds) == 1 and os.fstat(fds[0]).st_size == 4096
        os.close(fds[0])
        assert peer.recv()["result"] == {"size": 100, "mapped_size": 4096}
        assert peer.request("ping")["ok"]   # the refusals left the session alone
        sock.close()                        # closing it ends the session
        deadline = time.monotonic() + 5
        while (reply := peer.request("ping"))["ok"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert error_of(reply)["code"] == "ENOTCONN"
    finally:
        peer.close()


# --- jobs: a wait that times out; a model's buffers ------------------------------------

test_daemon = module_daemon_in_test_mode("protocol", "", name="test_daemon")


def test_wait_timing_out_is_etimedout_and_leaves_the_job_running(test_daemon):
    with session_peer(test_daemon.endpoint) as peer:
        assert peer.request("inject_fault", {"device": 0, "kind": "slow", "slow_ms": 1500})["ok"]
        job = submit_add(peer)["result"]["job"]
        err = error_of(peer.request("wait", {"job": job, "timeout_ms": 50}))
        assert err["code"] == "ETIMEDOUT" and err["retryable"] is True and str(job) in err["message"]
        reply = peer.request("wait_jobs", {"jobs": [job], "all": True, "timeout_ms": 50})
        assert reply["ok"] and reply["result"]["ready"] is False
        assert reply["result"]["jobs"][0]["state"] in ("queued", "running")
        assert peer.request("wait", {"job": job, "timeout_ms": 20_000})["result"]["state"] == "done"


def transpose_model() -> bytes:
    b = Builder()
    return b.model([b.op("Transpose", [b.input("x", [2, 3])], perm=[1, 0])])


def test_run_model_buffers_hold_dense_little_endian_c_order_tensors(peer):
    loaded = peer.request("load", {"device": 0, "model": transpose_model()}, timeout=60)["result"]
    (x,), (y,) = loaded["inputs"], loaded["outputs"]
    assert (x["shape"], x["size"], y["shape"], y["size"]) == ([2, 3], 24, [3, 2], 24)
    handles = {n: peer.request("alloc", {"device": 0, "size": size})["result"]["handle"]
               for n, size in (("x", 24), ("y", 24), ("big", 4097))}
    x_bytes = struct.pack("<6f", 0, 1, 2, 3, 4, 5)     # [[0, 1, 2], [3, 4, 5]] row by row
    assert peer.request("write", {"handle": handles["x"], "offset": 0, "data": x_bytes})["ok"]
    run = {"model": loaded["model"], "inputs": [handles["x"]], "outputs": [handles["y"]]}
    job = peer.request("run_model", run)["result"]["job"]
    assert peer.request("wait", {"job": job, "timeout_ms": 20_000})["result"]["state"] == "done"
    y_bytes = peer.request("read", {"handle": handles["y"], "offset": 0, "size": 24})["result"]["data"]
    assert struct.unpack("<6f", y_bytes) == (0, 3, 1, 4, 2, 5)
    err = error_of(peer.request("run_model", {**run, "outputs": [handles["big"]]}))  # two pages: refused
    assert err["code"] == "EINVAL" and "24 bytes" in err["message"]
    rows = peer.request("report", {"model": loaded["model"]})["result"]["rows"]
    # (`device` and `target` are a heterogeneous model's)
    assert rows and all(set(row) == set(REPORT_ROW.fields) - {"device", "target"} for row in rows)


def test_past_the_connections_byte_budget_reads_get_eagain_but_free_does_not(peer):
    size = 16 << 20
    big = peer.request("alloc", {"device": 0, "size": size})["result"]["handle"]
    small = peer.request("alloc", {"device": 0, "size": 4096})["result"]["handle"]
    reads = [peer.send("read", {"handle": big, "offset": 0, "size": size}) for _ in range(2 * HELD // size)]
    freed = peer.send("free", {"handle": small})
    replies = {}
    while len(replies) < len(reads) + 1:
        reply = peer.recv(timeout=30)
        replies[reply["seq"]] = reply
    assert replies[freed]["ok"]
    refused = [replies[s]["error"] for s in reads if not replies[s]["ok"]]
    assert replies[reads[0]]["ok"] and refused
    assert all(e["code"] == "EAGAIN" and e["retryable"] and e["retry_after_ms"] > 0 for e in refused)
    assert peer.request("free", {"handle": big})["ok"]


def test_string_limits_count_characters_not_bytes(daemon):
    p = RawPeer(daemon.endpoint)
    try:
        err = error_of(p.hello(name="é" * 65))
        assert err["code"] == "EINVAL" and "client_name" in err["message"]
        assert p.hello(name="é" * 64)["ok"]          # 128 bytes of UTF-8, 64 characters
    finally:
        p.close()


def test_the_daemon_does_not_check_that_seqs_differ(peer):
    peer.send("ping", seq=5)
    peer.send("ping", seq=5)
    assert [peer.recv()["seq"], peer.recv()["seq"]] == [5, 5]


def test_a_silent_companion_connection_is_closed(daemon):
    peer = RawPeer(daemon.endpoint)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(HELLO_TIMEOUT_S * 3)
            sock.connect(peer.hello()["result"]["attach_path"])
            started = time.monotonic()
            assert sock.recv(4096) == b""                # closed without a word
            assert time.monotonic() - started >= HELLO_TIMEOUT_S * 0.8
    finally:
        peer.close()
