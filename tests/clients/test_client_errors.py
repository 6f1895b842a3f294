"""Errors are values: every stable code maps to one npu exception family with code, message
and retryable."""

from __future__ import annotations

import pytest

import npu
from npud.ipc_schema.errors import ErrorCode, ErrorInfo, RequestError
from npu.errors import error, from_info

FAMILY = {
    "EINVAL": npu.InvalidArgument, "EMSGSIZE": npu.InvalidArgument, "EPROTO": npu.ProtocolMismatch,
    "ENOENT": npu.NotFound, "ENODEV": npu.NotFound, "EPERM": npu.PermissionDenied,
    "ENOMEM": npu.OutOfMemory, "EDQUOT": npu.OutOfMemory, "EAGAIN": npu.Busy, "EBUSY": npu.Busy,
    "ETIMEDOUT": npu.Timeout, "EFAULT": npu.DeviceFault, "EIO": npu.DeviceFault,
    "ENOTCONN": npu.ConnectionLost, "ECONNREFUSED": npu.ConnectionLost, "ESHUTDOWN": npu.ConnectionLost,
    "ECANCELED": npu.Cancelled, "EINTERNAL": npu.InternalError, "ETIME": npu.MissedDeadline,
    "EOPNOTSUPP": npu.InvalidArgument,
}
RETRYABLE = {"ENOMEM", "EAGAIN", "EBUSY", "ETIMEDOUT", "EIO", "ENOTCONN", "ECONNREFUSED", "ESHUTDOWN", "ETIME"}


def test_table_covers_every_code():
    assert set(FAMILY) == set(ErrorCode.__members__)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_has_a_family(code):
    exc = error(code, f"something about {code.value}")
    assert type(exc) is FAMILY[code.value]
    assert isinstance(exc, npu.NpuError) and isinstance(exc, Exception)
    assert exc.code == code.value and isinstance(exc.code, str)
    assert exc.message == f"something about {code.value}"
    assert exc.retryable is (code.value in RETRYABLE) is code.retryable
    assert str(exc) == f"{code.value}: something about {code.value}"
    assert code.meaning


@pytest.mark.parametrize("code", list(ErrorCode))
def test_retryable_override_and_round_trip_through_info(code):
    exc = from_info(ErrorInfo(code, "m", not code.retryable))
    assert type(exc) is FAMILY[code.value] and exc.retryable is (not code.retryable)
    assert error(code.value, "m").code == code.value  # accepts the string form too


def test_request_error_carries_info():
    exc = RequestError(ErrorCode.EBUSY, "in use", seq=4)
    assert exc.seq == 4 and exc.info == ErrorInfo(ErrorCode.EBUSY, "in use", True)
    assert exc.info.to_wire() == {"code": "EBUSY", "message": "in use", "retryable": True}
    assert RequestError(ErrorCode.EBUSY, "x", retryable=False).info.retryable is False


def test_unknown_code_is_refused():
    with pytest.raises(ValueError):
        error("EWHATEVER", "m")


def test_daemon_errors_arrive_as_families(client):
    with pytest.raises(npu.NotFound) as info:
        client._request("free", {"handle": 77})
    assert info.value.code == "ENOENT" and "77" in info.value.message and info.value.retryable is False
    from npud.emulator.assembler import StreamBuilder, tile
    from npud.emulator.config import make_config
    sb = StreamBuilder(make_config("edge"))
    for _ in range(600):  # a couple of hundred milliseconds of work
        sb.matmul(tile(0, "float32", (64, 128)), tile(32768, "float32", (128, 128)),
                  tile(98304, "float32", (64, 128)))
    job = client.submit(sb.end().build(), [])
    with pytest.raises(npu.Timeout) as info:
        job.wait(0)
    assert info.value.code == "ETIMEDOUT" and info.value.retryable is True
    assert f"job {job.id}" in info.value.message
    assert job.wait(30).state == "done"


@pytest.mark.parametrize("event", ["HANDSHAKE_FAILED_PROTOCOL", "HANDSHAKE_FAILED_NO_DETAIL",
                                   "HANDSHAKE_FAILED_AUTH"])
def test_a_client_without_curve_is_told_the_endpoint_wants_curve(event):
    """However libzmq reports a NULL client meeting a CURVE server, the advice is to use CURVE,
    not to check the server's key (which this client never set)."""
    import zmq

    from npu.protocol import handshake_refusal
    refusal = handshake_refusal(getattr(zmq, "EVENT_" + event), 0, "tcp://h:1", with_curve=False)
    assert isinstance(refusal, npu.PermissionDenied)
    assert "accept CURVE clients only" in refusal.message and "public key" not in refusal.message


def test_a_client_without_curve_against_a_curve_server_says_so_every_time():
    """A real CURVE server (a bare ROUTER, no daemon): three tries, three right answers."""
    import zmq

    ctx = zmq.Context.instance()
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    public, secret = zmq.curve_keypair()
    server.setsockopt(zmq.CURVE_SERVER, 1)
    server.setsockopt(zmq.CURVE_SECRETKEY, secret)
    try:
        port = server.bind_to_random_port("tcp://127.0.0.1")
        for _ in range(3):
            with pytest.raises(npu.PermissionDenied) as info:
                npu.connect(f"tcp://127.0.0.1:{port}", timeout=5)
            assert "accept CURVE clients only" in info.value.message
    finally:
        server.close(linger=0)
