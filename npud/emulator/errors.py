"""Errors raised by the emulated device and its command-stream validator.

Every error carries a POSIX-style ``code`` so the daemon can forward it to
clients unchanged: ``EFAULT`` for MMU faults, ``EINVAL`` for refused streams.
"""

from __future__ import annotations


class DeviceError(Exception):
    """A job failed on the device; the device itself stays usable."""

    code = "EIO"

    def __init__(self, message: str, *, code: str | None = None,
                 command_index: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.command_index = command_index

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class PageFault(DeviceError):
    """A DMA touched a virtual address that its context has not mapped
    (or has mapped without the permission the access needs)."""

    code = "EFAULT"

    def __init__(self, message: str, *, address: int, access: str,
                 command_index: int | None = None) -> None:
        super().__init__(message, command_index=command_index)
        self.address = address
        self.access = access


class IndexFault(DeviceError):
    """A gather index was outside its table: the job stops (like a page fault, the
    device and other contexts are unaffected)."""

    code = "EINVAL"


class StreamError(DeviceError):
    """The validator refused a command stream; ``message`` says why."""

    code = "EINVAL"
