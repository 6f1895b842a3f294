"""`run_model` with `wait_ms` (protocol 1.8, docs/PROTOCOL.md "Running a model" and "Order"): a run
and its wait in one round trip.  Its reply carries the job's outcome as `wait` gives it; while it
waits it holds up later requests of its session on its buffers only.  Frames go through a raw
DEALER, pipelined, as a client in any language may send them."""

from __future__ import annotations

import struct

import pytest

from npud.ipc_schema.schema import JOB_STATS, OPS
from npud_raw import RawPeer, error_of, session_peer
from sched_models import Builder, module_daemon_in_test_mode
from streams import A, B, O, add_stream

daemon = module_daemon_in_test_mode("run_wait", "")

X = struct.pack("<6f", 0, 1, 2, 3, 4, 5)       # [[0, 1, 2], [3, 4, 5]]
X_T = (0, 3, 1, 4, 2, 5)                       # its transpose, row by row


@pytest.fixture
def peer(daemon):
    with session_peer(daemon.endpoint) as p:
        yield p


def transpose_run(peer: RawPeer) -> dict:
    """A loaded 2x3 transpose and its two buffers (input filled with ``X``): run_model's args."""
    b = Builder()
    model = b.model([b.op("Transpose", [b.input("x", [2, 3])], perm=[1, 0])])
    loaded = peer.request("load", {"device": 0, "model": model}, timeout=60)["result"]
    x, y = (peer.request("alloc", {"device": 0, "size": 24})["result"]["handle"] for _ in range(2))
    assert peer.request("write", {"handle": x, "offset": 0, "data": X})["ok"]
    return {"model": loaded["model"], "inputs": [x], "outputs": [y]}


def other_buffers(peer: RawPeer, run: dict) -> dict:
    """The same run on a second pair of buffers (input filled with ``X``)."""
    x, y = (peer.request("alloc", {"device": 0, "size": 24})["result"]["handle"] for _ in range(2))
    assert peer.request("write", {"handle": x, "offset": 0, "data": X})["ok"]
    return {**run, "inputs": [x], "outputs": [y]}


def output(peer: RawPeer, run: dict) -> tuple:
    reply = peer.request("read", {"handle": run["outputs"][0], "offset": 0, "size": 24})
    return struct.unpack("<6f", reply["result"]["data"])


def slow(peer: RawPeer, ms: int = 1500) -> None:
    """The session's next job sleeps ``ms`` per layer segment (the transpose has one)."""
    assert peer.request("inject_fault", {"device": 0, "kind": "slow", "slow_ms": ms})["ok"]


def next_job_id(peer: RawPeer, run: dict) -> int:
    """The id the session's next job will get (ids follow the order sent): one past a plain run's."""
    job = peer.request("run_model", run)["result"]["job"]
    assert peer.request("wait", {"job": job, "timeout_ms": 20_000})["result"]["state"] == "done"
    return job + 1


def test_the_reply_has_the_jobs_outcome_as_wait_gives_it(peer):
    run = transpose_run(peer)
    reply = peer.request("run_model", {**run, "wait_ms": 20_000})
    result = reply["result"]
    assert set(result) == {"job", "context", "point", "state", "stats"}
    assert result["state"] == "done" and set(result["stats"]) >= set(JOB_STATS.fields) - {
        f for f, spec in JOB_STATS.fields.items() if spec.optional}
    assert output(peer, run) == X_T
    # the same as a wait of that job says
    waited = peer.request("wait", {"job": result["job"], "timeout_ms": 1000})["result"]
    assert waited == {k: result[k] for k in ("state", "stats")}
    # without wait_ms: the 1.7 reply, at once
    assert set(peer.request("run_model", run)["result"]) == {"job", "context", "point"}


def test_a_device_error_is_the_jobs_state_not_an_error_of_run_model(peer):
    run = transpose_run(peer)
    assert peer.request("inject_fault", {"device": 0, "kind": "crash"})["ok"]
    reply = peer.request("run_model", {**run, "wait_ms": 20_000}, timeout=30)
    assert reply["ok"], reply
    result = reply["result"]
    assert result["state"] == "failed" and result["stats"] == {}
    assert result["error"]["code"] == "EIO" and "crashed" in result["error"]["message"]
    assert peer.request("run_model", {**run, "wait_ms": 20_000}, timeout=30)["result"]["state"] == "done"


def test_a_cancel_sent_after_it_is_not_held_up_and_fails_the_run(peer):
    run = transpose_run(peer)
    job = next_job_id(peer, run)
    slow(peer, 5000)
    peer.send("run_model", {**run, "wait_ms": 60_000}, seq=500)
    peer.send("cancel", {"job": job}, seq=501)
    first, second = peer.replies(2)
    assert first["seq"] == 501 and first["ok"], first   # answered while the run waits
    assert second["seq"] == 500 and second["result"]["job"] == job
    assert second["result"]["state"] == "failed" and second["result"]["error"]["code"] == "ECANCELED"


def test_a_missed_deadline_is_etime_in_the_reply(peer):
    """Transient: it could make it on an idle device, but waits behind a slow run."""
    run = transpose_run(peer)
    slow(peer, 1000)
    assert peer.request("run_model", run)["ok"]
    late = {**other_buffers(peer, run), "wait_ms": 20_000, "deadline_ms": 200}
    result = peer.request("run_model", late, timeout=30)["result"]
    assert result["state"] == "failed" and result["error"]["code"] == "ETIME"
    assert result["error"]["retryable"] is True


def test_when_wait_ms_passes_first_it_answers_with_the_job_still_running(peer):
    run = transpose_run(peer)
    slow(peer, 1500)
    result = peer.request("run_model", {**run, "wait_ms": 50})["result"]
    assert result["state"] in ("queued", "running") and result["stats"] == {} and "error" not in result
    assert peer.request("wait", {"job": result["job"], "timeout_ms": 20_000})["result"]["state"] == "done"
    assert output(peer, run) == X_T


def test_a_write_of_its_input_sent_after_it_lands_once_the_run_is_done(peer):
    """The run reads X even though a write of other bytes was sent right behind it, and a read of
    the output sent behind that sees the run's result; both are answered after the run."""
    run = transpose_run(peer)
    slow(peer, 500)
    peer.send("run_model", {**run, "wait_ms": 20_000}, seq=600)
    peer.send("write", {"handle": run["inputs"][0], "offset": 0, "data": bytes(24)}, seq=601)
    peer.send("read", {"handle": run["outputs"][0], "offset": 0, "size": 24}, seq=602)
    got = peer.replies(3)
    assert [r["seq"] for r in got] == [600, 601, 602] and all(r["ok"] for r in got), got
    assert got[0]["result"]["state"] == "done"
    assert struct.unpack("<6f", got[2]["result"]["data"]) == X_T
    assert peer.request("read", {"handle": run["inputs"][0], "offset": 0, "size": 24})["result"]["data"] == bytes(24)


def test_a_pipelined_submit_and_other_buffers_are_not_held_up(peer):
    run = transpose_run(peer)
    slow(peer, 1500)
    other = peer.request("alloc", {"device": 0, "size": 1024})["result"]["handle"]
    handles = [peer.request("alloc", {"device": 0, "size": 1024})["result"]["handle"] for _ in range(3)]
    bindings = [{"handle": h, "va": va, "writable": va == O} for h, va in zip(handles, (A, B, O))]
    second = other_buffers(peer, run)
    peer.send("run_model", {**run, "wait_ms": 20_000}, seq=700)
    peer.send("submit", {"device": 0, "stream": add_stream(256), "bindings": bindings}, seq=701)
    peer.send("write", {"handle": other, "offset": 0, "data": b"x"}, seq=702)
    peer.send("run_model", second, seq=703)   # its model, not its buffers
    got = peer.replies(4)
    assert [r["seq"] for r in got][-1] == 700, got
    assert all(r["ok"] for r in got), got
    by_seq = {r["seq"]: r for r in got}
    assert by_seq[703]["result"]["job"] == by_seq[700]["result"]["job"] + 2   # ids in the order sent


def test_another_sessions_requests_are_not_held_up(daemon, peer):
    run = transpose_run(peer)
    slow(peer, 1500)
    peer.send("run_model", {**run, "wait_ms": 20_000}, seq=800)
    with session_peer(daemon.endpoint) as other:
        run2 = transpose_run(other)
        assert other.request("run_model", {**run2, "wait_ms": 1000})["result"]["state"] in (
            "done", "queued", "running")
        assert output(other, run2) in (X_T, (0.0,) * 6)
        assert other.request("ping")["ok"]
        assert not peer.sock.poll(0), "the other session was answered after the slow run"
    assert peer.replies(1)[0]["result"]["state"] == "done"


@pytest.mark.parametrize("args, words", [
    ({"wait_ms": -1}, ["args.wait_ms", "out of range"]),
    ({"wait_ms": 24 * 3600 * 1000 + 1}, ["args.wait_ms", "out of range"]),
    ({"wait_ms": "1000"}, ["args.wait_ms", "expected int, got str"]),
    ({"wait_ms": None}, ["args.wait_ms", "got nil"]),
    ({"wait": True}, ["args", "'wait'"]),
])
def test_malformed_wait_ms_is_einval_naming_the_field(peer, args, words):
    reply = peer.request("run_model", {"model": 1, "inputs": [], "outputs": [], **args})
    err = error_of(reply)
    assert err["code"] == "EINVAL" and err["retryable"] is False
    assert all(w in err["message"] for w in ["run_model", *words]), err["message"]
    assert peer.request("ping")["ok"]


def test_a_refused_run_is_an_error_and_holds_nothing(peer):
    run = transpose_run(peer)
    err = error_of(peer.request("run_model", {**run, "outputs": [], "wait_ms": 1000}))
    assert err["code"] == "EINVAL" and "outputs" in err["message"]
    assert peer.request("write", {"handle": run["inputs"][0], "offset": 0, "data": X})["ok"]


def test_the_schema_marks_wait_ms_and_the_outcome_fields_as_1_8():
    op = OPS["run_model"]
    assert op.args.fields["wait_ms"].since == (1, 8) and op.args.fields["wait_ms"].optional
    assert all(op.result.fields[f].since == (1, 8) and op.result.fields[f].optional
               for f in ("state", "stats", "error"))


def test_sequencer_release_frees_all_but_the_kept_keys():
    """The sequencer alone: a ticket that releases some keys lets requests on those run, holds
    those on the kept keys until it leaves, and a later release or leave is harmless."""
    from npud.ordering import Sequencer

    order, log = Sequencer(), []

    def launch(name, leave=True):
        def go(ticket):
            log.append(name)
            if leave:
                order.leave(ticket)
        return go
    run = order.enter([("jobs",), ("h", 1), ("h", 2), ("h", 3)], launch("run", leave=False))
    order.enter([("jobs",)], launch("submit"))
    order.enter([("h", 2)], launch("write input"))
    order.enter([("h", 1)], launch("report model"))
    assert log == ["run"]
    order.release(run, [("h", 2), ("h", 3)])
    assert log == ["run", "submit", "report model"]
    assert order.must_wait([("h", 3)]) and not order.must_wait([("jobs",)])
    order.leave(run)
    assert log == ["run", "submit", "report model", "write input"]
    order.leave(run)
    assert not order.must_wait([("h", 2)]) and not order.must_wait([("h", 3)])


def test_bye_does_not_wait_for_a_waiting_run_and_cancels_its_job(daemon):
    # another session's slow job holds the device's core, so the run is still queued when bye
    # arrives (a run already on the device finishes its segment first: a race under load)
    with session_peer(daemon.endpoint) as other, session_peer(daemon.endpoint) as peer:
        busy = transpose_run(other)
        slow(other, 5_000)
        other.send("run_model", busy, seq=800)
        run = transpose_run(peer)
        peer.send("run_model", {**run, "wait_ms": 60_000}, seq=900)
        peer.send("bye", seq=901)
        got = {r["seq"]: r for r in peer.replies(2, timeout=10)}
        assert got[901]["ok"], got
        assert got[900]["ok"] and got[900]["result"]["state"] == "failed", got[900]
        assert got[900]["result"]["error"]["code"] in ("ECANCELED", "ENOTCONN", "ESHUTDOWN")
