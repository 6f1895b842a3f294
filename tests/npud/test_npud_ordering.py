"""Pipelined requests on one connection (docs/PROTOCOL.md, "Order"): requests that touch the same
object take effect in the order sent; independent requests still overlap.  Frames go through a raw
DEALER, many sent before any reply is read, as a client in any language may."""

from __future__ import annotations

import time

import pytest

from npud.emulator.assembler import StreamBuilder, tile
from npud.emulator.config import make_config
from npud.ipc_schema.schema import PROTOCOL_VERSION
from npud.ordering import Sequencer
from npud.server import WAITING_PER_CONNECTION
from npud_raw import RawPeer, error_of, session_peer
from sched_models import deep_mlp, module_daemon_in_test_mode

PAIRS = 1000
BIG = 1 << 20      # handlers copy this much off the event loop (npud.handlers.THREAD_THRESHOLD)


daemon = module_daemon_in_test_mode("ordering", "compile_workers = 1\n")


@pytest.fixture
def peer(daemon):
    with session_peer(daemon.endpoint) as p:
        yield p


def alloc(peer: RawPeer, size: int) -> int:
    reply = peer.request("alloc", {"device": 0, "size": size})
    assert reply["ok"], reply
    return reply["result"]["handle"]


def test_pipelined_write_read_pairs_read_back_the_new_value(peer):
    handle = alloc(peer, 4096)
    for i in range(PAIRS):
        value = i.to_bytes(4, "little")
        peer.send("write", seq=2 * i + 100, args={"handle": handle, "offset": 0, "data": value})
        peer.send("read", seq=2 * i + 101, args={"handle": handle, "offset": 0, "size": 4})
    by_seq = {r["seq"]: r for r in peer.replies(2 * PAIRS)}
    assert all(r["ok"] for r in by_seq.values()), [r for r in by_seq.values() if not r["ok"]][:3]
    stale = [i for i in range(PAIRS) if by_seq[2 * i + 101]["result"]["data"] != i.to_bytes(4, "little")]
    assert not stale, f"{len(stale)} of {PAIRS} reads saw an older value (first: pair {stale[0]})"


def test_large_writes_then_reads_and_free_keep_their_order(peer):
    """Large writes are copied on a thread; what follows them on the same buffer waits for the copy."""
    handle = alloc(peer, BIG)
    n = 12
    for i in range(n):
        peer.send("write", seq=1000 + 2 * i, args={"handle": handle, "offset": 0, "data": bytes([i + 1]) * BIG})
        peer.send("read", seq=1001 + 2 * i, args={"handle": handle, "offset": BIG - 8, "size": 8})
    peer.send("free", seq=2000, args={"handle": handle})
    by_seq = {r["seq"]: r for r in peer.replies(2 * n + 1)}
    assert all(r["ok"] for r in by_seq.values()), [r for r in by_seq.values() if not r["ok"]][:3]
    for i in range(n):
        assert by_seq[1001 + 2 * i]["result"]["data"] == bytes([i + 1]) * 8, f"pair {i}"
    assert error_of(peer.request("read", {"handle": handle, "offset": 0, "size": 1}))["code"] == "ENOENT"


def test_bye_waits_for_earlier_requests_and_hello_after_it_opens_a_new_session(peer):
    handle = alloc(peer, BIG)
    peer.send("write", seq=10, args={"handle": handle, "offset": 0, "data": b"\x07" * BIG})
    peer.send("bye", seq=11)
    peer.send("ping", seq=12)
    peer.send("hello", seq=13, args={"protocol": list(PROTOCOL_VERSION), "client_name": "again", "pid": 1})
    by_seq = {r["seq"]: r for r in peer.replies(4)}
    assert by_seq[10]["ok"], by_seq[10]
    assert by_seq[11]["ok"], by_seq[11]
    assert error_of(by_seq[12])["code"] == "ENOTCONN", "ping was sent after bye"
    assert by_seq[13]["ok"], by_seq[13]


def test_bye_does_not_wait_for_a_compile(peer):
    """A load of inline bytes touches none of the session's objects: bye (which frees everything)
    is answered at once, and the load then fails with ENOTCONN instead of loading into a closed
    session."""
    assert peer.request("inject_fault", {"device": 0, "kind": "slow_compile", "slow_ms": 1500})["ok"]
    peer.send("load", seq=20, args={"device": 0, "model": deep_mlp(layers=2, seed=4444)})
    peer.send("bye", seq=21)
    first, second = peer.replies(2)
    assert first["seq"] == 21 and first["ok"], first
    assert second["seq"] == 20 and error_of(second)["code"] == "ENOTCONN", second


# --- independence: what touches other objects is not held up --------------------------------------


def slow_stream(segments: int) -> bytes:
    sb = StreamBuilder(make_config("edge"))
    for _ in range(segments):
        sb.matmul(tile(0, "float32", (16, 16)), tile(1024, "float32", (16, 16)), tile(2048, "float32", (16, 16)))
        sb.barrier()
    sb.end()
    return sb.build()


def test_ping_and_unrelated_read_overtake_a_slow_load(peer):
    handle = alloc(peer, 4096)
    assert peer.request("inject_fault", {"device": 0, "kind": "slow_compile", "slow_ms": 1500})["ok"]
    peer.send("load", seq=50, args={"device": 0, "model": deep_mlp(layers=2, seed=4242)})
    peer.send("ping", seq=51)
    peer.send("read", seq=52, args={"handle": handle, "offset": 0, "size": 4})
    started = time.monotonic()
    order = [r["seq"] for r in peer.replies(3)]
    assert order.index(51) < order.index(50) and order.index(52) < order.index(50), order
    assert time.monotonic() - started > 1.0, "the load was not slow: the test proves nothing"


def test_wait_does_not_hold_up_a_write_of_another_buffer_nor_a_cancel_of_its_job(peer):
    handle = alloc(peer, 1 << 16)
    assert peer.request("inject_fault", {"device": 0, "kind": "slow", "slow_ms": 1500})["ok"]
    sub = peer.request("submit", {"device": 0, "stream": slow_stream(4),
                                  "bindings": [{"handle": handle, "va": 0, "writable": True}]})
    assert sub["ok"], sub
    job = sub["result"]["job"]
    other = alloc(peer, 4096)
    peer.send("wait", seq=60, args={"job": job, "timeout_ms": 20_000})
    peer.send("write", seq=61, args={"handle": other, "offset": 0, "data": b"abcd"})
    peer.send("cancel", seq=62, args={"job": job})
    first = peer.replies(2)
    assert sorted(r["seq"] for r in first) == [61, 62], first
    wait = peer.replies(1, timeout=10)[0]
    assert wait["seq"] == 60 and wait["ok"] and wait["result"]["state"] in ("done", "failed"), wait


def test_requests_queued_behind_a_slow_one_count_against_the_connection_cap(peer):
    """A load from a buffer holds that buffer for the whole (slowed) compile; 1100 reads of it sent
    meanwhile queue behind it, up to the connection's cap of requests in progress (the load is
    one), and the rest are refused at once with EAGAIN.  A ping is not held up by any of it."""
    model = deep_mlp(layers=2, seed=4343)
    handle = alloc(peer, len(model))
    assert peer.request("write", {"handle": handle, "offset": 0, "data": model})["ok"]
    assert peer.request("inject_fault", {"device": 0, "kind": "slow_compile", "slow_ms": 1500})["ok"]
    peer.send("load", seq=3000, args={"device": 0, "model_buffer": handle})
    for i in range(1100):
        peer.send("read", seq=3001 + i, args={"handle": handle, "offset": 0, "size": 8})
    peer.send("ping", seq=5000)
    got = peer.replies(1102)
    by_seq = {r["seq"]: r for r in got}
    refused = [r for r in got if not r["ok"]]
    assert by_seq[5000]["ok"] and [r["seq"] for r in got].index(5000) < [r["seq"] for r in got].index(3000)
    assert by_seq[3000]["ok"], by_seq[3000]
    assert len(refused) == 1100 - (WAITING_PER_CONNECTION - 1), len(refused)
    assert all(r["error"]["code"] == "EAGAIN" and r["error"]["retryable"] for r in refused)
    assert all(by_seq[3001 + i]["result"]["data"] == model[:8] for i in range(1100) if by_seq[3001 + i]["ok"])


# --- the sequencer alone -----------------------------------------------------------------------


def recorder(order: Sequencer, log: list, *, leave_at_once: bool = True):
    """A launch callback that logs the request's name and, like an inline handler, leaves at once."""
    def launch_of(name: str):
        def launch(ticket):
            log.append(name)
            if leave_at_once:
                order.leave(ticket)
        return launch
    return launch_of


def test_sequencer_orders_shared_keys_and_lets_others_pass():
    order, log = Sequencer(), []
    launch = recorder(order, log, leave_at_once=False)
    first = order.enter([("h", 1)], launch("write 1"))
    order.enter([("h", 1), ("h", 2)], launch("copy 1->2"))
    order.enter([("h", 2)], launch("read 2"))
    order.enter([("h", 3)], launch("write 3"))
    assert log == ["write 1", "write 3"], "only what shares no key with a running request starts"
    assert order.must_wait([("h", 2)]) and not order.must_wait([("h", 4)])
    order.leave(first)
    assert log == ["write 1", "write 3", "copy 1->2"]


def test_sequencer_runs_a_long_chain_of_inline_requests_without_recursion():
    order, log = Sequencer(), []
    blocker = order.enter([("h", 1)], lambda ticket: None)
    launch = recorder(order, log)
    for i in range(5000):
        order.enter([("h", 1)], launch(i))
    order.leave(blocker)
    assert log == list(range(5000))
    assert not order.must_wait([("h", 1)])


def test_sequencer_barrier_waits_for_earlier_and_holds_later():
    order, log = Sequencer(), []
    running = order.enter([("h", 1)], lambda ticket: log.append("write"))
    order.enter([], recorder(order, log)("bye"), barrier=True)
    assert order.barrier_pending and log == ["write"]
    order.hold(lambda: log.append("ping (dispatched again)"))
    order.leave(running)
    assert log == ["write", "bye", "ping (dispatched again)"] and not order.barrier_pending
