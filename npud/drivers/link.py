"""The device link: the messages between the daemon and a device process, as schemas.

Every driver's device process speaks it (docs/DRIVERS.md, "The device link"): one Unix
SOCK_SEQPACKET socket, one msgpack map per packet, memfds in SCM_RIGHTS.  The daemon checks
every reply against these schemas before it acts on one -- a device process is hardware, and
hardware (or a vendor's driver) can be wrong: a reply that breaks the protocol resets the
device, it never reaches the daemon's logic.  A device process checks every request the same
way and answers a malformed one with ``EPROTO`` instead of dying.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from npud.ipc_schema.types import Any_, Array, Bin, Bool, F, FieldError, Float, Int, MapOf, Str, Struct, Type

U64 = Int(0, 2**64 - 1)
COUNT = Int(0, 2**31 - 1)
MAX_ITEMS = 1 << 20


@dataclass(frozen=True)
class Tuple_(Type):
    """A fixed-length array whose items have types of their own (msgpack has no tuples)."""

    items: tuple

    def check(self, value, path, strict=True):
        if type(value) not in (list, tuple) or len(value) != len(self.items):
            raise FieldError(path, f"expected an array of {len(self.items)} items, got {value!r:.60}")
        return [t.check(v, f"{path}[{i}]", strict) for i, (t, v) in enumerate(zip(self.items, value))]

    def describe(self):
        return f"[{', '.join(t.describe() for t in self.items)}]"


@dataclass(frozen=True)
class OrNone(Type):
    """A value of ``type``, or nil."""

    type: Type

    def check(self, value, path, strict=True):
        return None if value is None else self.type.check(value, path, strict)

    def describe(self):
        return f"{self.type.describe()} or nil"


def _op(name: str) -> F:
    return F(Str(32, (name,)), "the request")


BINDING = Tuple_((U64, U64, Bool()))       # [bo, va, writable]
MAPPING = Tuple_((U64, U64, Bool()))       # [va, size, writable]
REQUESTS: dict[str, Struct] = {s.name: s for s in (
    Struct("import", {"op": _op("import"), "bo": F(U64, "the buffer object; its memfd rides along")}),
    Struct("release", {"op": _op("release"), "bo": F(U64, "the buffer object to forget")}),
    Struct("load_program", {
        "op": _op("load_program"), "program": F(U64, "its id"),
        "mappings": F(Array(MAPPING, MAX_ITEMS), "the address space it was validated for"),
        "boundaries": F(Array(COUNT, MAX_ITEMS), "proposed preemption points (command counts)", optional=True)}),
    Struct("unload_program", {"op": _op("unload_program"), "program": F(U64, "its id")}),
    Struct("run", {
        "op": _op("run"), "job": F(U64, "the job's id"),
        "bindings": F(Array(BINDING, MAX_ITEMS), "the buffers it maps"),
        "stream": F(Bin(1 << 26), "a raw command stream", optional=True),
        "program": F(U64, "a loaded program", optional=True),
        "from": F(COUNT, "the segment to start at", optional=True),
        "until": F(COUNT, "the segment to stop before", optional=True),
        "fault": F(Str(16, ("hang", "crash", "slow")), "test-mode fault injection", optional=True),
        "slow_ms": F(Int(0, 2**31 - 1), "for fault slow", optional=True)}),
    Struct("preempt", {"op": _op("preempt")}),
    Struct("shutdown", {"op": _op("shutdown")}),
)}

CARRIES_FD = ("import", "load_program")   # requests whose packet carries a memfd (SCM_RIGHTS)

ERROR = Struct("device_error", {
    "code": F(Str(32), "an npud error code name (EIO, EFAULT, ...)"),
    "message": F(Str(4096), "what went wrong, for a person"),
    "command": F(OrNone(COUNT), "the failing command's index, if one failed", optional=True),
    "retryable": F(OrNone(Bool()), "whether running it again may succeed", optional=True),
})
_FAILED = {"ok": F(Bool(), "false"), "error": F(ERROR, "why")}
READY = Struct("ready", {"op": _op("ready")})
REPLIES: dict[str, Struct] = {
    "import": Struct("import_reply", {"ok": F(Bool(), "true")}),
    "release": Struct("release_reply", {"ok": F(Bool(), "true")}),
    "unload_program": Struct("unload_program_reply", {"ok": F(Bool(), "true")}),
    "load_program": Struct("load_program_reply", {
        "ok": F(Bool(), "true"),
        "segments": F(Array(Tuple_((COUNT, COUNT)), MAX_ITEMS), "[first command, end] of each segment"),
        "segment_cycles": F(Array(Int(0, 2**63 - 1), MAX_ITEMS), "modeled cycles of each segment")}),
    "run": Struct("run_reply", {
        "ok": F(Bool(), "true"),
        "done": F(Bool(), "false: stopped at a preemption point"),
        "next": F(COUNT, "the segment to resume from"),
        "segments": F(COUNT, "segments run"),
        "cycles": F(Int(0, 2**63 - 1), "modeled cycles of the segments run"),
        "stats": F(MapOf(Any_(), 64), "the device's counters of the finished job ({} if not done)"),
        "wall_ms": F(Float(), "measured time of the run")}),
}


class ProtocolError(ValueError):
    """A message that breaks the device link; the message says how."""


def check_request(message: Any) -> dict:
    """A request as the device process may act on it, or ProtocolError."""
    if type(message) is not dict or type(message.get("op")) is not str or message["op"] not in REQUESTS:
        raise ProtocolError(f"not a device request: {message!r:.80}")
    try:
        return REQUESTS[message["op"]].check(message, message["op"])
    except FieldError as exc:
        raise ProtocolError(str(exc)) from None


def check_reply(op: str, packet: bytes) -> dict:
    """The device process's reply to request ``op`` (``"ready"``: its start), decoded and checked,
    or ProtocolError.  A failure reply ({"ok": false, "error": ...}) is valid for any request."""
    try:
        reply = msgpack.unpackb(packet, raw=False)
    except Exception as exc:   # msgpack raises several types for garbage
        raise ProtocolError(f"an undecodable reply to {op} ({type(exc).__name__})") from None
    schema = READY if op == "ready" else REPLIES.get(op)
    if type(reply) is dict and reply.get("ok") is False and op != "ready":
        schema = Struct(f"{op}_failure", _FAILED)
    try:
        return schema.check(reply, f"{op} reply", strict=False)
    except FieldError as exc:
        raise ProtocolError(str(exc)) from None
