"""The daemon<->compiler messages (npud/compilers.py): a worker parses untrusted models, so what it
sends back is checked before the daemon acts on it -- a malformed reply fails that compile with EIO,
and a message that is not even a map is logged and dropped, never an exception in the daemon."""

from __future__ import annotations

import shutil

import msgpack
import pytest

from npud import compilers
from npud.ipc_schema import bulk


@pytest.mark.parametrize("op, reply, problem", [
    ("compile", {"id": 1, "ok": True}, "executable: missing required field"),
    ("compile", {"id": 1, "ok": True, "executable": "text"}, "executable"),
    ("check", {"id": 1, "ok": True, "problems": [{"node": "n"}]}, "problems"),
    ("compile", {"id": 1, "ok": False, "error": "bad"}, "error"),
    ("compile", {"id": 1, "ok": "yes"}, "ok"),
    ("partition", {"id": 1, "ok": True, "nodes": [], "partitions": [], "tensors": {}, "inputs": []}, "outputs"),
    ("partition", {"id": 1, "ok": True, "nodes": [{"node": "n", "op": "TopK", "target": "cpu", "reason": "r"}],
                   "partitions": [], "tensors": {}, "inputs": [], "outputs": []}, "macs"),
    ("partition", {"id": 1, "ok": True, "nodes": [], "partitions": [{"target": "cpu", "model": "text",
                                                                    "inputs": [], "outputs": []}],
                   "tensors": {}, "inputs": [], "outputs": []}, "model"),
    ("partition", {"id": 1, "ok": True, "nodes": [], "partitions": [],
                   "tensors": {"t": {"dtype": "float32", "shape": [-1]}}, "inputs": [], "outputs": []}, "shape"),
])
def test_a_malformed_reply_fails_the_compile_with_eio(op, reply, problem):
    checked = compilers.checked_reply(op, reply)
    assert checked["ok"] is False and checked["error"]["code"] == "EIO"
    assert "malformed reply" in checked["error"]["message"] and problem in checked["error"]["message"]
    with pytest.raises(compilers.RequestError, match="malformed reply"):
        compilers.raise_for(checked)


def test_well_formed_replies_pass():
    ok = {"id": 1, "ok": True, "executable": b"NPUX", "seconds": 0.5}
    assert compilers.checked_reply("compile", ok) == ok
    failure = {"ok": False, "error": {"code": "EINVAL", "message": "node 'n' (TopK): unsupported",
                                      "node": "n", "op": "TopK"}}
    assert compilers.checked_reply("compile", failure) == failure
    problems = {"ok": True, "problems": [{"node": "n", "op": "TopK", "reason": "unsupported"}]}
    assert compilers.checked_reply("check", problems) == problems


def test_a_message_that_is_not_a_map_is_dropped_and_a_pending_compile_gets_eio():
    pool = compilers.CompilerPool(1, 0, 10.0)
    try:
        for payload in (msgpack.packb([1, 2]), b"\xc1", msgpack.packb("ready")):
            pool._on_frames([b"w1", payload])   # the socket's owner task must not raise
        pending = compilers._Pending({"id": 7, "op": "compile"}, 10.0)
        pool._waiting[b"w1"] = pending
        pool._on_frames([b"w1", msgpack.packb({"id": 7, "ok": True})])
        assert pending.done.is_set() and pending.reply["error"]["code"] == "EIO"
    finally:
        shutil.rmtree(pool._dir, ignore_errors=True)


def test_a_reply_with_its_executable_in_a_frame_of_its_own_completes_the_compile():
    pool = compilers.CompilerPool(1, 0, 10.0)
    try:
        pending = compilers._Pending({"id": 3, "op": "compile"}, 10.0)
        pool._waiting[b"w1"] = pending
        pool._on_frames([b"w1", *bulk.to_frames({"id": 3, "ok": True, "executable": b"NPUX" * 4}, "executable")])
        assert pending.done.is_set() and pending.reply["executable"] == b"NPUX" * 4
    finally:
        shutil.rmtree(pool._dir, ignore_errors=True)


@pytest.mark.parametrize("frames, problem", [
    ([msgpack.packb({"id": 1, "ok": True}), b"stray"], "bulk field None does not match the 1 frame"),
    ([msgpack.packb({"id": 1, "ok": True, "bulk": "executable"})], "bulk field 'executable' does not match the 0"),
    ([msgpack.packb({"id": 1, "bulk": 7}), b"x"], "bulk field 7"),
    ([msgpack.packb({"id": 1, "bulk": "id"}), b"x"], "bulk field 'id'"),
    ([msgpack.packb({"id": 1}), b"x", b"y"], "3 frames"),
    ([], "0 frames"),
    ([b"\xc1"], "not msgpack"),
])
def test_malformed_bulk_frames_are_named_and_dropped(frames, problem, caplog):
    with pytest.raises(bulk.MalformedFrames, match=problem):
        bulk.from_frames(frames)
    pool = compilers.CompilerPool(1, 0, 10.0)
    try:
        pending = compilers._Pending({"id": 1, "op": "compile"}, 10.0)
        pool._waiting[b"w1"] = pending
        pool._on_frames([b"w1", *frames])   # logged, never raised in the socket's owner task
        assert not pending.done.is_set()
        assert "malformed message" in caplog.text
    finally:
        shutil.rmtree(pool._dir, ignore_errors=True)


def test_to_frames_round_trips_with_and_without_the_bulk_field():
    big = bytes(range(256)) * 1000
    assert bulk.from_frames(bulk.to_frames({"op": "compile", "model": big, "id": 2}, "model")) == {
        "op": "compile", "model": big, "id": 2}
    assert len(bulk.to_frames({"op": "check", "id": 2}, "model")) == 1
    assert bulk.from_frames(bulk.to_frames({"op": "check", "id": 2}, "model")) == {"op": "check", "id": 2}


async def test_a_started_worker_takes_the_next_compile_before_an_idle_one_must_start():
    """Compiles one after another all go to the one worker already running: the pool has two, and
    the second started for the second compile (1-3 s of imports on a busy machine) before."""
    import trio

    from npud.emulator.config import make_config

    pool = compilers.CompilerPool(2, 0, 60.0)
    check = {"op": "check", "model": b"not a model", "config": make_config("edge").to_dict(), "target": "npu-emu"}
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        for _ in range(3):
            reply = await pool.compile(dict(check))
            assert reply["ok"] and reply["problems"], reply
        assert len(pool._ready) == 1 and pool.restarts == 0
        # two at once: both workers are used
        async with trio.open_nursery() as both:
            for _ in range(2):
                both.start_soon(pool.compile, dict(check))
        assert sorted(pool._ready) == [b"w0", b"w1"]
        nursery.cancel_scope.cancel()


async def test_a_large_reply_is_decoded_off_the_event_loop_and_checked(monkeypatch):
    """A partition plan carries every submodel inside its map: decoding it (~60 ms per 100 MB) must
    not stall the daemon's loop; it is still checked, and a wrong id or garbled frames are EIO."""
    import threading

    import trio

    big = b"\x01" * (compilers.LARGE_REPLY_BYTES + 10)
    on_loop = []
    real = compilers.bulk.from_frames

    def spy(frames):
        on_loop.append(threading.current_thread() is threading.main_thread())
        return real(frames)

    monkeypatch.setattr(compilers.bulk, "from_frames", spy)
    pool = compilers.CompilerPool(1, 0, 10.0)
    dispatched = []
    monkeypatch.setattr(pool, "_dispatch", dispatched.append)   # no workers: the test answers
    try:
        for reply, ok, problem in (({"ok": True, "problems": [], "pad": big}, True, ""),
                                   ({"ok": True, "problems": [], "pad": big, "id": -1}, False, "another request"),
                                   (b"\xc1" + big, False, "malformed reply")):
            async with trio.open_nursery() as nursery:
                got = []

                async def ask():
                    got.append(await pool.compile({"id": 4, "op": "check"}))
                nursery.start_soon(ask)
                await trio.testing.wait_all_tasks_blocked()
                pending = dispatched.pop()
                pool._waiting[b"w1"] = pending
                frames = [msgpack.packb({"id": 4, **reply})] if isinstance(reply, dict) else [reply]
                pool._on_frames([b"w1", *frames])
            del pool._waiting[b"w1"]
            assert got[0]["ok"] is ok, got
            assert problem in str(got[0].get("error", ""))
        assert on_loop and not any(on_loop)
    finally:
        shutil.rmtree(pool._dir, ignore_errors=True)
