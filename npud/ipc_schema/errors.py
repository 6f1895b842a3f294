"""Error codes: the stable vocabulary of everything that can go wrong.

Every failure that crosses the wire is an error value: a stable ``code`` (named
after the POSIX errno it resembles, so that C clients can map it), a message a
person can act on, and whether retrying the same request can help.  Codes are
part of the protocol: they are never renamed, only added.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ErrorCode(str, Enum):
    """Stable error codes with whether a retry of the same request can help."""

    def __new__(cls, value: str, retryable: bool, meaning: str):
        member = str.__new__(cls, value)
        member._value_ = value
        member.retryable = retryable
        member.meaning = meaning
        return member

    EINVAL = ("EINVAL", False, "the request is malformed or an argument is out of range")
    EPROTO = ("EPROTO", False, "the frame is not a valid protocol message or the versions are incompatible")
    EMSGSIZE = ("EMSGSIZE", False, "the message is larger than the daemon accepts")
    ENOENT = ("ENOENT", False, "the named object (buffer, job, device) does not exist for this session")
    EPERM = ("EPERM", False, "policy does not allow this caller to do this")
    ENOMEM = ("ENOMEM", True, "not enough device memory right now; retry after memory is freed")
    EDQUOT = ("EDQUOT", False, "a quota would be exceeded (memory of the session or its user, or the user's "
                               "sessions); free buffers or close sessions first")
    EAGAIN = ("EAGAIN", True, "a limit is reached for now; retry later")
    EBUSY = ("EBUSY", True, "the object is in use (for example by a running job)")
    ETIMEDOUT = ("ETIMEDOUT", True, "the operation did not finish within its timeout")
    EFAULT = ("EFAULT", False, "the device faulted while executing a job (bad address or permission)")
    EIO = ("EIO", True, "the device or a worker failed; the request may succeed on retry")
    ENODEV = ("ENODEV", False, "no such device")
    ENOTCONN = ("ENOTCONN", True, "no session: send HELLO first, or the session expired")
    ECONNREFUSED = ("ECONNREFUSED", True, "the daemon is not reachable at this endpoint")
    ECANCELED = ("ECANCELED", False, "the operation was cancelled")
    ESHUTDOWN = ("ESHUTDOWN", True, "the daemon is shutting down")
    EINTERNAL = ("EINTERNAL", False, "a bug in the daemon; the session is still usable, please report it")
    ETIME = ("ETIME", True, "the job missed its deadline: retryable if transient (the device was busy), "
                            "not if persistent (it cannot finish in that time even on an idle device)")
    EOPNOTSUPP = ("EOPNOTSUPP", False, "the operation is not supported on this session or endpoint")


@dataclass(frozen=True)
class ErrorInfo:
    """An error as it travels: code, message, and whether a retry can help."""

    code: ErrorCode
    message: str
    retryable: bool
    retry_after_ms: int | None = None   # a hint: when a retry is likely to succeed

    @classmethod
    def of(cls, code: ErrorCode, message: str, retryable: bool | None = None,
           retry_after_ms: int | None = None) -> "ErrorInfo":
        return cls(code, message, code.retryable if retryable is None else retryable, retry_after_ms)

    def to_wire(self) -> dict:
        wire = {"code": self.code.value, "message": self.message, "retryable": self.retryable}
        if self.retry_after_ms is not None:
            wire["retry_after_ms"] = self.retry_after_ms
        return wire


class RequestError(Exception):
    """Any failure that becomes an error reply: from decoding, validation or a handler.

    ``seq`` is the request's sequence number when it could be read, so that the
    error reply reaches the caller waiting for it.
    """

    def __init__(self, code: ErrorCode, message: str, *, seq: int | None = None,
                 retryable: bool | None = None, retry_after_ms: int | None = None):
        super().__init__(message)
        self.info = ErrorInfo.of(code, message, retryable, retry_after_ms)
        self.seq = seq
