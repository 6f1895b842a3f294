"""Minor versions only add: requests are checked strictly, replies read leniently."""

import msgpack
import pytest

from npud.ipc_schema import codec
from npud.ipc_schema.errors import ErrorCode, RequestError
from npud.ipc_schema.schema import DEVICE, EVENTS, OPS, PROTOCOL_VERSION
from npud.ipc_schema.types import Array, Bool, Float, Int, MapOf, Str, Struct


def _sample(t):
    """The smallest valid value of a schema type."""
    if isinstance(t, Struct):
        return {name: _sample(f.type) for name, f in t.fields.items() if not f.optional}
    if isinstance(t, Int):
        return t.min
    if isinstance(t, Str):
        return t.choices[0] if t.choices else ""
    return {Float: 0.0, Bool: False, MapOf: {}, Array: []}.get(type(t))


def _device(**extra):
    return {**_sample(DEVICE), **extra}


def test_a_newer_daemons_extra_fields_are_dropped_not_refused():
    frame = codec.pack({"seq": 4, "ok": True, "trace_id": 9,
                        "result": {"devices": [_device(x_future_field=12.5)], "generation": 2}})
    reply = codec.decode_reply(frame, "devices")
    assert reply.seq == 4
    assert set(reply.result) == {"devices"}
    assert "x_future_field" not in reply.result["devices"][0]


def test_lenient_reading_still_refuses_missing_or_mistyped_fields():
    device = _device()
    del device["index"]
    with pytest.raises(RequestError) as err:
        codec.decode_reply(codec.pack({"seq": 1, "ok": True, "result": {"devices": [device]}}), "devices")
    assert err.value.info.code is ErrorCode.EPROTO and "index" in err.value.info.message
    with pytest.raises(RequestError):
        codec.decode_reply(codec.pack({"seq": 1, "ok": True,
                                       "result": {"devices": [_device(index="x")]}}), "devices")


def test_requests_with_unknown_fields_are_still_refused():
    frame = msgpack.packb({"op": "alloc", "seq": 2, "args": {"device": 0, "size": 8, "hint": 1}})
    with pytest.raises(RequestError) as err:
        codec.decode_request(frame)
    assert err.value.info.code is ErrorCode.EINVAL and "hint" in err.value.info.message


def _fields(t, seen=None):
    """Every (struct name, field name, F) reachable from a type."""
    seen = set() if seen is None else seen
    if isinstance(t, Struct) and t.name not in seen:
        seen.add(t.name)
        for name, f in t.fields.items():
            yield t.name, name, f
            yield from _fields(f.type, seen)
    elif isinstance(t, Array):
        yield from _fields(t.item, seen)
    elif isinstance(t, MapOf):
        yield from _fields(t.value, seen)


def test_fields_added_by_a_minor_version_are_optional():
    """PROTOCOL.md promises an older peer can leave out whatever a newer minor added."""
    roots = [s for op in OPS.values() for s in (op.args, op.result)] + list(EVENTS.values())
    added = [(s, n, f) for root in roots for s, n, f in _fields(root) if f.since is not None]
    assert added, "no field records its version: the walk is broken"
    assert [(s, n) for s, n, f in added if not f.optional] == []
    assert all(f.since <= PROTOCOL_VERSION for _, _, f in added)
