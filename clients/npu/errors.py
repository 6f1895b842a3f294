"""Exceptions of the client library: one family per kind of failure.

Every exception carries the daemon's stable ``code``, its ``message`` and
whether ``retryable`` — so code can branch on the class, the code, or just
retry when told it may help.
"""

from __future__ import annotations

from npud.ipc_schema.errors import ErrorCode, ErrorInfo


class NpuError(Exception):
    """Base of every error the library raises."""

    def __init__(self, code: ErrorCode | str, message: str, retryable: bool | None = None,
                 retry_after: float | None = None):
        code = ErrorCode(code)
        super().__init__(f"{code.value}: {message}")
        self.code = code.value
        self.message = message
        self.retryable = code.retryable if retryable is None else retryable
        self.retry_after = retry_after   # seconds after which a retry is likely to succeed (a hint), or None

    def __reduce__(self):
        # Pickled whole (code, message, flags), so that it crosses processes -- a Ray task's
        # error reaches its caller -- as the same class with the same fields.
        return type(self), (self.code, self.message, self.retryable, self.retry_after)


class InvalidArgument(NpuError):
    """The request was malformed or out of range (EINVAL, EMSGSIZE), or the operation is not
    supported on this session (EOPNOTSUPP: ``map`` without a companion socket, e.g. over tcp)."""


class ProtocolMismatch(NpuError):
    """The daemon and the library cannot understand each other (EPROTO)."""


class NotFound(NpuError):
    """No such buffer, job or device in this session (ENOENT, ENODEV)."""


class PermissionDenied(NpuError):
    """Policy forbids it (EPERM)."""


class OutOfMemory(NpuError):
    """Device memory or the session's quota is exhausted (ENOMEM, EDQUOT)."""


class Busy(NpuError):
    """A limit is reached for now, or the object is in use (EAGAIN, EBUSY)."""


class Timeout(NpuError):
    """The operation did not finish in time (ETIMEDOUT)."""


class MissedDeadline(Timeout):
    """The job missed its deadline (ETIME): ``transient`` (retry may help) or persistent."""

    @property
    def transient(self) -> bool:
        return self.retryable


class DeviceFault(NpuError):
    """The device faulted or failed while running a job (EFAULT, EIO)."""


class ConnectionLost(NpuError):
    """No session with the daemon (ENOTCONN, ECONNREFUSED, ESHUTDOWN)."""


class Cancelled(NpuError):
    """The operation was cancelled (ECANCELED)."""


class InternalError(NpuError):
    """A bug in the daemon (EINTERNAL); the session is still usable."""


_FAMILY = {
    "EINVAL": InvalidArgument, "EMSGSIZE": InvalidArgument, "EPROTO": ProtocolMismatch,
    "ENOENT": NotFound, "ENODEV": NotFound, "EPERM": PermissionDenied,
    "ENOMEM": OutOfMemory, "EDQUOT": OutOfMemory, "EAGAIN": Busy, "EBUSY": Busy,
    "ETIMEDOUT": Timeout, "EOPNOTSUPP": InvalidArgument, "EFAULT": DeviceFault, "EIO": DeviceFault,
    "ENOTCONN": ConnectionLost, "ECONNREFUSED": ConnectionLost, "ESHUTDOWN": ConnectionLost,
    "ECANCELED": Cancelled, "EINTERNAL": InternalError, "ETIME": MissedDeadline,
}
assert set(_FAMILY) == set(ErrorCode.__members__), "every error code needs a family"


def error(code: ErrorCode | str, message: str, retryable: bool | None = None,
          retry_after_ms: int | None = None) -> NpuError:
    """The exception for an error code."""
    code = ErrorCode(code)
    return _FAMILY[code.value](code, message, retryable,
                               None if retry_after_ms is None else retry_after_ms / 1000)


def from_wire(err: dict) -> NpuError:
    """The exception for an error map as replies and job results carry it."""
    return error(err["code"], err["message"], err["retryable"], err.get("retry_after_ms"))


def from_info(info: ErrorInfo) -> NpuError:
    return error(info.code, info.message, info.retryable, info.retry_after_ms)
