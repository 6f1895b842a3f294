"""Turning frames into validated messages and back.

``decode_request`` is the daemon's gate: whatever bytes arrive, it either
returns a fully validated ``Request`` or raises ``RequestError`` carrying the
error to send back.  No handler ever sees an unchecked value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import ErrorCode, ErrorInfo, RequestError
from .schema import (DTYPE_SIZES, EVENTS, MAX_MESSAGE_BYTES, MAX_SEQ, OPS, PROTOCOL_VERSION,
                     REPLY, REQUEST, TENSOR, Op)
from .types import FieldError


@dataclass(frozen=True)
class Request:
    op: Op
    seq: int
    args: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    seq: int
    result: dict[str, Any] | None
    error: ErrorInfo | None


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(frame: bytes) -> Any:
    """Decode one msgpack object; any malformation becomes EPROTO."""
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo: ExtraData, StackError, ValueError, ...
        raise RequestError(ErrorCode.EPROTO, f"frame is not a single msgpack object: {exc}") from None


def encode_request(op: str, seq: int, args: dict[str, Any]) -> bytes:
    return pack({"op": op, "seq": seq, "args": args})


def decode_request(frame: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Request:
    """Validate a request frame completely, or raise RequestError saying what is wrong."""
    if len(frame) > max_bytes:
        raise RequestError(ErrorCode.EMSGSIZE,
                           f"request of {len(frame)} bytes exceeds the limit of {max_bytes}; "
                           "move bulk data through a mapped buffer")
    message = unpack(frame)
    if type(message) is not dict:
        raise RequestError(ErrorCode.EPROTO, f"request must be a msgpack map, got {type(message).__name__}")
    seq = message.get("seq")
    seq = seq if type(seq) is int and 0 <= seq <= MAX_SEQ else None
    name, args = message.get("op"), message.get("args")
    # The common case is checked inline; anything unusual goes through the
    # schema, which names exactly what is wrong.
    if not (len(message) == 3 and seq is not None and type(name) is str and type(args) is dict):
        try:
            REQUEST.check(message, "request")
        except FieldError as exc:
            raise RequestError(ErrorCode.EPROTO if seq is None else ErrorCode.EINVAL,
                               f"bad request envelope: {exc}", seq=seq) from None
    op = OPS.get(name)
    if op is None:
        raise RequestError(ErrorCode.EINVAL, f"unknown op {name[:32]!r}", seq=seq)
    try:
        args = op.args.check(args, "args")
    except FieldError as exc:
        raise RequestError(ErrorCode.EINVAL, f"{op.name}: {exc}", seq=seq) from None
    return Request(op, seq, args)


def encode_result(seq: int, result: dict[str, Any]) -> bytes:
    return pack({"seq": seq, "ok": True, "result": result})


def encode_error(seq: int | None, error: ErrorInfo) -> bytes:
    return pack({"seq": seq or 0, "ok": False, "error": error.to_wire()})


def encode_event(name: str, data: dict[str, Any]) -> bytes:
    EVENTS[name].check(data, name)
    return pack({"event": name, "data": data})


def decode_reply(frame: bytes, op: str | None = None) -> Reply | tuple[str, dict]:
    """Decode a daemon frame: a Reply, or ``(event_name, data)`` for an event.

    With ``op`` given, a successful result is checked against that op's schema,
    so a client never acts on a reply the protocol does not allow; fields it
    does not know (from a daemon of a newer minor version) are dropped.
    """
    message = unpack(frame)
    if type(message) is dict and "event" in message:
        name, data = message.get("event"), message.get("data")
        if name not in EVENTS or type(data) is not dict:
            raise RequestError(ErrorCode.EPROTO, f"malformed event from daemon: {message!r:.200}")
        return name, EVENTS[name].check(data, name, strict=False)
    try:
        reply = REPLY.check(message, "reply", strict=False)
        if reply["ok"]:
            result = reply.get("result", {})
            if op is not None:
                result = OPS[op].result.check(result, f"{op}.result", strict=False)
            return Reply(reply["seq"], result, None)
        err = reply.get("error")
        if err is None:
            raise FieldError("reply.error", "missing on a failed reply")
        code = ErrorCode(err["code"]) if err["code"] in ErrorCode.__members__ else ErrorCode.EINTERNAL
        return Reply(reply["seq"], None, ErrorInfo(code, err["message"], err["retryable"],
                                                   err.get("retry_after_ms")))
    except FieldError as exc:
        raise RequestError(ErrorCode.EPROTO, f"malformed reply from daemon: {exc}") from None


def check_version(theirs: list[int] | tuple[int, int], *, side: str) -> None:
    """Refuse an incompatible major version, naming both versions."""
    ours = PROTOCOL_VERSION
    if theirs[0] != ours[0]:
        raise RequestError(
            ErrorCode.EPROTO,
            f"protocol version mismatch: {side} speaks {theirs[0]}.{theirs[1]}, "
            f"this side speaks {ours[0]}.{ours[1]}; upgrade the older of the two")


def check_tensor(value: Any, path: str = "tensor") -> dict[str, Any]:
    """Validate a tensor map: schema, exactly one storage form, and a consistent size."""
    tensor = TENSOR.check(value, path)
    inline, by_ref = "data" in tensor, "buffer" in tensor
    if inline == by_ref:
        raise FieldError(path, "exactly one of 'data' or 'buffer' must be present")
    if "offset" in tensor and not by_ref:
        raise FieldError(f"{path}.offset", "only allowed with 'buffer'")
    nbytes = math.prod(tensor["shape"]) * DTYPE_SIZES[tensor["dtype"]]
    if inline and len(tensor["data"]) != nbytes:
        raise FieldError(f"{path}.data", f"{len(tensor['data'])} bytes but shape {tensor['shape']} "
                                         f"of {tensor['dtype']} needs {nbytes}")
    return tensor
