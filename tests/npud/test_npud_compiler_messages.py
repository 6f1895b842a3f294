"""The daemon<->compiler messages (npud/compilers.py): a worker parses untrusted models, so what it
sends back is checked before the daemon acts on it -- a malformed reply fails that compile with EIO,
and a message that is not even a map is logged and dropped, never an exception in the daemon."""

from __future__ import annotations

import shutil

import msgpack
import pytest

from npud import compilers


@pytest.mark.parametrize("op, reply, problem", [
    ("compile", {"id": 1, "ok": True}, "executable: missing required field"),
    ("compile", {"id": 1, "ok": True, "executable": "text"}, "executable"),
    ("check", {"id": 1, "ok": True, "problems": [{"node": "n"}]}, "problems"),
    ("compile", {"id": 1, "ok": False, "error": "bad"}, "error"),
    ("compile", {"id": 1, "ok": "yes"}, "ok"),
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
