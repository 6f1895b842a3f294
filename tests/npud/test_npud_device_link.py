"""The device link's schemas (npud/drivers/link.py): a malformed message on either side is refused
with a reason; the daemon resets a device that breaks the protocol instead of failing itself, and
a device process answers a malformed request with EPROTO and goes on serving."""

from __future__ import annotations

import socket
import subprocess
import sys

import msgpack
import pytest

from npud.drivers import link
from npud.emulator.config import make_config
from npud.ipc_schema.errors import ErrorCode
from npud.scheduler import Context
from npud.devices import SchedulingParams
from test_npud_device_host import (REAL, add_job, add_program_job, answering, fake_processes, finish, run_job,
                                   running_host)

RUN_OK = {"ok": True, "done": True, "next": 1, "segments": 1, "cycles": 10, "stats": {"cycles": 10},
          "wall_ms": 0.1}


@pytest.mark.parametrize("message, problem", [
    ([1, 2], "not a device request"),
    ({"op": "format_disk"}, "not a device request"),
    ({"op": "release"}, "bo: missing required field"),
    ({"op": "release", "bo": "one"}, "expected int"),
    ({"op": "run", "job": 1, "bindings": [[1, 4096]]}, "expected an array of 3 items"),
    ({"op": "run", "job": 1, "bindings": [], "fault": "melt"}, "fault"),
    ({"op": "load_program", "program": 1, "mappings": [[0, 4096]]}, "expected an array of 3 to 4 items"),
    ({"op": "load_program", "program": 1, "mappings": [[0, 4096, False, True, 1]]}, "3 to 4 items"),
    ({"op": "load_program", "program": 1, "mappings": [[0, 4096, False, "yes"]]}, r"mappings\[0\]\[3\]"),
])
def test_malformed_requests_are_refused_with_the_reason(message, problem):
    with pytest.raises(link.ProtocolError, match=problem):
        link.check_request(message)


@pytest.mark.parametrize("op, packet, problem", [
    ("run", b"\xc1", "undecodable"),
    ("run", msgpack.packb({"ok": True}), "done: missing required field"),
    ("run", msgpack.packb({**RUN_OK, "next": -1}), "next"),
    ("run", msgpack.packb({**RUN_OK, "stats": [1]}), "stats"),
    ("load_program", msgpack.packb({"ok": True, "segments": [[0]], "segment_cycles": [1]}), "segments"),
    ("load_program", msgpack.packb({"segments": [[0, 1]]}), "ok: missing required field"),
    ("load_program", msgpack.packb({"ok": True, "prepared_bytes": -1}), "prepared_bytes"),
    ("unload_program", msgpack.packb({"ok": True, "prepared_bytes": "1 MB"}), "prepared_bytes"),
    ("import", msgpack.packb({"ok": False, "error": {"message": "x"}}), "code: missing required field"),
    ("ready", msgpack.packb({"op": "steady"}), "op"),
])
def test_malformed_replies_are_refused_with_the_reason(op, packet, problem):
    with pytest.raises(link.ProtocolError, match=problem):
        link.check_reply(op, packet)


def test_fields_the_schema_does_not_name_pass_through():
    """Either side may be newer than the other's schema: extra fields are kept, not refused."""
    request = {"op": "release", "bo": 1, "newer": True}
    assert link.check_request(request) == request


def test_a_mapping_may_say_it_is_immutable():
    """load_program's mappings are [va, size, writable] or [va, size, writable, immutable]: a daemon
    that predates the flag is still understood."""
    for mappings in ([[0, 4096, False]], [[0, 4096, False, True], [4096, 4096, True, False]]):
        request = {"op": "load_program", "program": 1, "mappings": mappings}
        assert link.check_request(request) == request


def test_well_formed_replies_pass():
    assert link.check_reply("run", msgpack.packb({**RUN_OK, "vendor_extra": 1})) == {**RUN_OK, "vendor_extra": 1}
    failure = {"ok": False, "error": {"code": "EFAULT", "message": "page fault", "command": 3}}
    assert link.check_reply("run", msgpack.packb(failure)) == failure


def test_the_device_process_answers_malformed_requests_with_eproto_and_goes_on():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    config = msgpack.packb(make_config("edge").to_dict()).hex()
    process = subprocess.Popen([sys.executable, "-m", "npud.emulator.device_process", "--sock-fd",
                                str(theirs.fileno()), "--config", config], pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        ours.settimeout(60)
        assert msgpack.unpackb(ours.recv(1 << 16))["op"] == "ready"
        for bad in (b"\xc1", msgpack.packb({"op": "nope"}), msgpack.packb({"op": "release"}),
                    msgpack.packb({"op": "import", "bo": 1})):   # an import without its memfd
            ours.send(bad)
            reply = msgpack.unpackb(ours.recv(1 << 16))
            assert reply["ok"] is False and reply["error"]["code"] == "EPROTO", reply
        ours.send(msgpack.packb({"op": "release", "bo": 1}))
        assert msgpack.unpackb(ours.recv(1 << 16)) == {"ok": True}
        ours.send(msgpack.packb({"op": "shutdown"}))
        assert process.wait(30) == 0
    finally:
        process.kill()
        ours.close()


# Says it is ready, then answers every request {"ok": true}: for a run that is a broken reply.
BROKEN_REPLIES = answering(msgpack.packb({"ok": True}))


async def test_a_device_that_breaks_the_protocol_is_reset_and_the_daemon_carries_on(monkeypatch):
    ctx = Context(1, "s")
    job = add_job(ctx)
    host = await run_job(monkeypatch, fake_processes(BROKEN_REPLIES, REAL), job, SchedulingParams(cores=1))
    assert job.error is not None and job.error.code == ErrorCode.EIO, job.error
    assert "broke the protocol" in job.error.message and "done: missing required field" in job.error.message
    assert host.resets == 1


def breaking(method: str, body: str) -> str:
    """A real npu-emu device process whose ``method`` is replaced by ``body`` (its arguments:
    ``self``, and ``request, fds`` for an ``_op_``): a reply that breaks the link's schema."""
    args = "self" if method == "ready_info" else "self, request, fds"
    return ("import os, sys\n"
            "from npud.emulator.device_process import DeviceProcess, main\n"
            f"def broken({args}):\n"
            f"    {body}\n"
            f"DeviceProcess.{method} = broken\n"
            "main(sys.argv[1:])\n")


@pytest.mark.parametrize("method, body, problem", [
    ("ready_info", "return {'kernels': 5}", "kernels"),
    ("_op_import", "[os.close(fd) for fd in fds]; return {'ok': 'yes'}", "ok"),
    ("_op_load_program", "[os.close(fd) for fd in fds]; return {'ok': True, 'segments': [[0]]}", "segments"),
], ids=["ready", "import", "load_program"])
async def test_a_broken_reply_before_the_run_resets_the_device_and_the_job_runs(monkeypatch, method, body,
                                                                                 problem, caplog):
    """Checked against the schema like a run's reply, but no job was delivered: the core is
    reset (the log names the field) and the innocent job runs on the new process."""
    ctx = Context(1, "s")
    async with running_host(monkeypatch, fake_processes(breaking(method, body), REAL),
                            SchedulingParams(cores=1)) as host:
        job = await finish(host, add_program_job(host, ctx))
    assert job.error is None, job.error
    assert host.resets == 1 and ctx.hangs == 0 and host.hangs == 0
    resets = [r.getMessage() for r in caplog.records if "restarting its process" in r.getMessage()]
    assert len(resets) == 1 and "broke the protocol" in resets[0] and problem in resets[0], resets


def test_a_loaded_models_read_only_weights_are_immutable_and_nothing_else_is():
    """instantiate marks the weights regions it wrote (read-only, the daemon's own buffers) immutable
    in the program's mappings, which load_program sends as they are; the arena and I/O are not."""
    import os
    import sys

    import trio

    from npud.compile_cache import CachedExecutable
    from npud.compiler_worker.api import compile_model
    from npud.devices import DeviceHost
    from npud.models import instantiate
    from npud.sessions import Session

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "compiler_worker"))
    from compiler_testmodels import mlp

    config = make_config("edge")
    exe = CachedExecutable.from_bytes(compile_model(mlp(seed=3), config).to_bytes())
    device = DeviceHost(0, "npu0", "edge", config, on_job_done=lambda job: None)
    model = trio.run(instantiate, Session("s1", b"r", "t", 1), device, exe, 1, 1 << 30)
    kinds = {r["va"]: (r["kind"], r["writable"]) for r in exe.memory["regions"]}
    mappings = device.programs[model.program].mappings
    assert all(len(m) == 4 for m in mappings)
    immutable = {va for va, _size, _w, frozen in mappings if frozen}
    assert immutable == {va for va, (kind, writable) in kinds.items() if kind == "weights" and not writable}
    assert immutable, "the MLP has weights"
    link.check_request({"op": "load_program", "program": model.program, "mappings": [list(m) for m in mappings]})
