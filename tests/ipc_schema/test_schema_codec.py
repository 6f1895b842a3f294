"""npud/ipc_schema/codec.py: encoding, the daemon's validation gate, replies and versions."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npud.ipc_schema import codec
from npud.ipc_schema.errors import ErrorCode, ErrorInfo, RequestError
from npud.ipc_schema.schema import MAX_MESSAGE_BYTES, OPS, PROTOCOL_VERSION


def refused(frame, **kw) -> RequestError:
    with pytest.raises(RequestError) as info:
        codec.decode_request(frame, **kw)
    return info.value


def raw(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# --- requests ---------------------------------------------------------------------------

def test_request_round_trip():
    frame = codec.encode_request("write", 7, {"handle": 3, "offset": 16, "data": b"\x00\xff"})
    req = codec.decode_request(frame)
    assert req.op is OPS["write"] and req.seq == 7
    assert req.args == {"handle": 3, "offset": 16, "data": b"\x00\xff"}


def test_every_op_decodes_with_valid_args():
    samples = {
        "hello": {"protocol": [1, 0], "client_name": "t", "pid": 1},
        "alloc": {"device": 0, "size": 1}, "free": {"handle": 1},
        "write": {"handle": 1, "offset": 0, "data": b""}, "read": {"handle": 1, "offset": 0, "size": 0},
        "map": {"handle": 1}, "submit": {"device": 0, "stream": b"x", "bindings": []},
        "wait": {"job": 1, "timeout_ms": 0},
        "load": {"device": 0, "model": b"onnx", "options": {"input_shapes": {"x": [1, 3]}}},
        "check": {"device": 0, "model_buffer": 1, "model_size": 10},
        "run_model": {"model": 1, "inputs": [2], "outputs": [3]},
        "report": {"model": 1}, "unload": {"model": 1},
        "trace": {"since": 0}, "kill_client": {"session": "s1"}, "reset_device": {"device": 0},
        "context_create": {"priority": "high", "weight": 2},
        "wait_jobs": {"jobs": [1, 2], "all": False, "timeout_ms": 0}, "cancel": {"job": 1},
        "fence_export": {"job": 1}, "fence_import": {"token": "t"},
        "inject_fault": {"device": 0, "kind": "hang"},
    }
    for name in OPS:
        req = codec.decode_request(codec.encode_request(name, 1, samples.get(name, {})))
        assert req.op.name == name


def test_not_msgpack_is_eproto():
    err = refused(b"\xc1")  # 0xc1 is never used in msgpack
    assert err.info.code is ErrorCode.EPROTO and "msgpack" in err.info.message
    assert err.seq is None


def test_trailing_garbage_is_eproto():
    err = refused(raw({"op": "ping", "seq": 1, "args": {}}) + b"\x00")
    assert err.info.code is ErrorCode.EPROTO


@pytest.mark.parametrize("obj,kind", [([1, 2], "list"), (5, "int"), ("ping", "str"), (None, "NoneType")])
def test_not_a_map_is_eproto(obj, kind):
    err = refused(raw(obj))
    assert err.info.code is ErrorCode.EPROTO and "must be a msgpack map" in err.info.message
    assert kind in err.info.message


def test_missing_seq_is_eproto_naming_seq():
    err = refused(raw({"op": "ping", "args": {}}))
    assert err.info.code is ErrorCode.EPROTO and "seq" in err.info.message and err.seq is None


def test_bad_envelope_with_seq_is_einval_with_seq():
    err = refused(raw({"op": "ping", "seq": 9}))
    assert err.info.code is ErrorCode.EINVAL and err.seq == 9 and "args" in err.info.message
    err = refused(raw({"op": "ping", "seq": 9, "args": {}, "extra": 1}))
    assert err.info.code is ErrorCode.EINVAL and "extra" in err.info.message


def test_unknown_op():
    err = refused(raw({"op": "format_disk", "seq": 3, "args": {}}))
    assert err.info.code is ErrorCode.EINVAL and "format_disk" in err.info.message and err.seq == 3
    assert err.info.retryable is False


@pytest.mark.parametrize("args,field,problem", [
    ({"device": 0}, "args.size", "missing required field"),
    ({"device": 0, "size": 8, "flags": 1}, "args", "unknown field 'flags'"),
    ({"device": 0, "size": True}, "args.size", "expected int, got bool"),
    ({"device": 0, "size": "8"}, "args.size", "expected int, got str"),
    ({"device": 0, "size": 0}, "args.size", "out of range"),
    ({"device": 256, "size": 8}, "args.device", "out of range"),
    ({"device": -1, "size": 8}, "args.device", "out of range"),
])
def test_alloc_arg_errors_name_the_field(args, field, problem):
    err = refused(codec.encode_request("alloc", 4, args))
    assert err.info.code is ErrorCode.EINVAL and err.seq == 4
    assert err.info.message.startswith(f"alloc: {field}") and problem in err.info.message


def test_str_where_bin_expected():
    err = refused(codec.encode_request("write", 5, {"handle": 1, "offset": 0, "data": "text"}))
    assert err.info.code is ErrorCode.EINVAL and "args.data" in err.info.message
    assert "expected bin, got str" in err.info.message


def test_oversize_frame_is_emsgsize_before_parsing():
    err = refused(b"\xc1" * (MAX_MESSAGE_BYTES + 1))
    assert err.info.code is ErrorCode.EMSGSIZE and str(MAX_MESSAGE_BYTES) in err.info.message
    err = refused(raw({"op": "ping", "seq": 1, "args": {}}), max_bytes=4)
    assert err.info.code is ErrorCode.EMSGSIZE


def test_seq_out_of_range_is_not_echoed():
    err = refused(raw({"op": "ping", "seq": 2**32, "args": {}}))
    assert err.info.code is ErrorCode.EPROTO and err.seq is None


def test_non_string_map_keys_are_eproto():
    err = refused(raw({1: "ping"}))
    assert err.info.code is ErrorCode.EPROTO


# --- hypothesis: the gate never raises anything but RequestError ---------------------

msgpackable = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.text(max_size=8) | st.integers(0, 5), children, max_size=4),
    max_leaves=20)


def _gate(frame: bytes) -> None:
    try:
        codec.decode_request(frame)
    except RequestError as exc:
        assert isinstance(exc.info.code, ErrorCode) and exc.info.message
    # anything else propagates and fails the test


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_request_error(frame):
    _gate(frame)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(msgpackable)
def test_arbitrary_objects_only_raise_request_error(obj):
    _gate(raw(obj))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(OPS)), st.integers(-5, 2**33), st.dictionaries(
    st.sampled_from(["handle", "offset", "size", "data", "device", "job", "timeout_ms", "stream",
                     "bindings", "protocol", "client_name", "pid", "x"]), msgpackable, max_size=4))
def test_near_valid_requests_only_raise_request_error(op, seq, args):
    _gate(raw({"op": op, "seq": seq, "args": args}))


# --- replies, events, versions --------------------------------------------------------

def test_result_round_trip_checked_against_op():
    frame = codec.encode_result(3, {"handle": 2, "size": 10})
    reply = codec.decode_reply(frame, "alloc")
    assert reply == codec.Reply(3, {"handle": 2, "size": 10}, None)
    with pytest.raises(RequestError) as info:
        codec.decode_reply(codec.encode_result(3, {"handle": 2}), "alloc")
    assert info.value.info.code is ErrorCode.EPROTO and "alloc.result.size" in info.value.info.message


def test_error_round_trip():
    info = ErrorInfo.of(ErrorCode.ENOMEM, "full")
    reply = codec.decode_reply(codec.encode_error(5, info))
    assert reply.seq == 5 and reply.result is None and reply.error == info
    assert reply.error.retryable is True
    # unreadable seq is sent as 0
    assert codec.decode_reply(codec.encode_error(None, info)).seq == 0


def test_unknown_error_code_from_newer_daemon_becomes_einternal():
    frame = raw({"seq": 1, "ok": False, "error": {"code": "ENEWTHING", "message": "m", "retryable": True}})
    reply = codec.decode_reply(frame)
    assert reply.error.code is ErrorCode.EINTERNAL and reply.error.message == "m"


@pytest.mark.parametrize("obj", [
    {"seq": 1, "ok": False},
    {"seq": 1},
    {"seq": 1, "ok": "yes", "result": {}},
    [1, True],
    {"event": "nope", "data": {}},
    {"event": "shutdown", "data": "x"},
])
def test_malformed_replies_are_eproto(obj):
    with pytest.raises(RequestError) as info:
        codec.decode_reply(raw(obj))
    assert info.value.info.code is ErrorCode.EPROTO


def test_event_round_trip():
    assert codec.decode_reply(codec.encode_event("shutdown", {"reason": "bye"})) == ("shutdown", {"reason": "bye"})


def test_check_version_major_mismatch_names_both_versions():
    major, minor = PROTOCOL_VERSION
    with pytest.raises(RequestError) as info:
        codec.check_version([major + 1, 3], side="the daemon")
    msg = info.value.info.message
    assert info.value.info.code is ErrorCode.EPROTO
    assert f"{major + 1}.3" in msg and f"{major}.{minor}" in msg and "the daemon" in msg
    codec.check_version([major, minor + 5], side="the daemon")  # minor differences are fine


def test_decode_reply_of_hello_from_other_major_is_refused_by_client_check():
    from npu import ProtocolMismatch
    from npu.protocol import check_hello
    major, minor = PROTOCOL_VERSION
    with pytest.raises(ProtocolMismatch) as info:
        check_hello({"protocol": [major + 1, 0]})
    assert info.value.code == "EPROTO" and f"{major + 1}.0" in info.value.message
    check_hello({"protocol": [major, minor + 1]})
