"""Errors are values: every stable code maps to one npu exception family with code, message
and retryable."""

from __future__ import annotations

import pytest

import npu
from ipc_schema.errors import ErrorCode, ErrorInfo, RequestError
from npu.errors import error, from_info

FAMILY = {
    "EINVAL": npu.InvalidArgument, "EMSGSIZE": npu.InvalidArgument, "EPROTO": npu.ProtocolMismatch,
    "ENOENT": npu.NotFound, "ENODEV": npu.NotFound, "EPERM": npu.PermissionDenied,
    "ENOMEM": npu.OutOfMemory, "EDQUOT": npu.OutOfMemory, "EAGAIN": npu.Busy, "EBUSY": npu.Busy,
    "ETIMEDOUT": npu.Timeout, "EFAULT": npu.DeviceFault, "EIO": npu.DeviceFault,
    "ENOTCONN": npu.ConnectionLost, "ECONNREFUSED": npu.ConnectionLost, "ESHUTDOWN": npu.ConnectionLost,
    "ECANCELED": npu.Cancelled, "EINTERNAL": npu.InternalError, "ETIME": npu.MissedDeadline,
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
    from emulator.assembler import StreamBuilder, tile
    from emulator.config import make_config
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
