"""Buffers: device memory a client owns, read and written in place when mapped."""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING, Any

import numpy as np

from npud.ipc_schema.errors import ErrorCode

from .core import Call, blocking
from .errors import error
from .protocol import as_bytes, map_fd

if TYPE_CHECKING:
    from .client import Client


def check_range(verb: str, offset: int, nbytes: int, size: int) -> None:
    """EINVAL unless ``nbytes`` bytes at ``offset`` lie inside a ``size``-byte buffer."""
    if offset < 0 or nbytes < 0 or offset + nbytes > size:
        raise error(ErrorCode.EINVAL, f"{verb} of {nbytes} bytes at offset {offset} runs past the "
                                      f"end of the {size}-byte buffer")


def writable_bytes(out: Any) -> memoryview:
    """A flat byte view of ``out`` to copy into (read_into), or EINVAL if it is read-only."""
    target = as_bytes(out)
    if target.readonly:
        raise error(ErrorCode.EINVAL, "read_into needs a writable buffer")
    return target


class BufferOps:
    """A buffer object on a device; ``handle`` is this session's name for it.  Its operations,
    written once; ``Buffer`` runs them blocking, ``npu.AsyncBuffer`` awaited."""

    def __init__(self, client: Any, handle: int, size: int, device: int):
        self.client = client
        self.handle = handle
        self.size = size
        self.device = device
        self._mm: mmap.mmap | None = None
        self._freed = False

    def __repr__(self) -> str:
        return f"<npu.{type(self).__name__} handle={self.handle} size={self.size} device={self.device}>"

    def map(self, dtype: Any = np.uint8, shape: tuple[int, ...] | None = None):
        """A writable numpy view of the buffer's memory itself: no copies.

        Needs a local daemon (the memfd arrives over the companion socket); otherwise
        InvalidArgument (EOPNOTSUPP).  The view stays valid after ``free()``, but then no
        longer reaches the device.
        """
        self._check()
        if self._mm is None:
            if not self.client.attached:
                raise error(ErrorCode.EOPNOTSUPP, "map needs a local daemon with the companion socket "
                                                  "(this session has none, e.g. over tcp); use read()/write() "
                                                  "instead")
            message, fd = yield Call("map", {"handle": self.handle}, fd=True)
            self._mm = map_fd(fd, message["size"])
        array = np.frombuffer(self._mm, dtype=np.uint8, count=self.size)
        array = array.view(dtype) if np.dtype(dtype) != np.uint8 else array
        return array.reshape(shape) if shape is not None else array

    def write(self, data: Any, offset: int = 0):
        """Copy bytes (or a numpy array's bytes) into the buffer at ``offset``."""
        self._check()
        view = as_bytes(data)
        check_range("write", offset, view.nbytes, self.size)
        if (yield from self._mapped_io()):
            self._mm[offset:offset + view.nbytes] = view
            return
        chunk = self.client.limits["max_inline_bytes"]
        for start in range(0, view.nbytes, chunk) or [0]:
            yield Call("write", {"handle": self.handle, "offset": offset + start,
                                 "data": bytes(view[start:start + chunk])})

    def read(self, nbytes: int | None = None, offset: int = 0):
        """Copy ``nbytes`` (default: to the end) out of the buffer from ``offset``: a read-only
        memoryview of bytes (format ``B``) that compares equal to the same ``bytes``.

        Its memory comes from numpy's allocator, which asks for huge pages for large blocks:
        fresh memory costs a page fault per page, and a 64 MiB ``bytes`` result took 10x the
        time of its copy in faults (docs/PERFORMANCE.md).  Code that reads often reuses an
        array with :meth:`read_into` instead."""
        self._check()
        nbytes = self.size - offset if nbytes is None else nbytes
        check_range("read", offset, nbytes, self.size)
        mapped = yield from self._mapped_io()
        out = memoryview(np.empty(nbytes, np.uint8))
        if mapped:
            out[:] = memoryview(self._mm)[offset:offset + nbytes]
        else:
            yield from self._read_messages(out, offset)
        return out.toreadonly()

    def read_into(self, out: Any, offset: int = 0):
        """Copy ``len(out)`` bytes from ``offset`` into a writable buffer or array: no allocation."""
        self._check()
        target = writable_bytes(out)
        check_range("read", offset, target.nbytes, self.size)
        if (yield from self._mapped_io()):
            target[:] = memoryview(self._mm)[offset:offset + target.nbytes]
            return
        yield from self._read_messages(target, offset)

    def free(self):
        """Release the buffer.  Jobs still using it keep it alive until they finish."""
        if self._freed:
            return
        yield Call("free", {"handle": self.handle})
        self._freed = True
        self._mm = None

    def _read_messages(self, target: memoryview, offset: int):
        chunk = self.client.limits["max_inline_bytes"]
        for start in range(0, target.nbytes, chunk):
            n = min(chunk, target.nbytes - start)
            target[start:start + n] = (yield Call("read", {"handle": self.handle, "offset": offset + start,
                                                          "size": n}))["data"]

    def _mapped_io(self):
        # A local client moves data through the mapping: one memcpy instead of
        # three socket copies (and no message size limit).
        if self._mm is None and self.client.attached and self.client.map_io:
            yield from BufferOps.map(self)
        return self._mm is not None

    def _check(self) -> None:
        if self._freed:
            raise error(ErrorCode.ENOENT, f"buffer {self.handle} was freed")


class Buffer(BufferOps):
    """A buffer object on a device.  ``handle`` is this session's name for it."""

    client: "Client"
    if TYPE_CHECKING:   # the blocking methods' types (docstrings: BufferOps)
        def map(self, dtype: Any = np.uint8, shape: tuple[int, ...] | None = None) -> np.ndarray[Any, Any]: ...
        def write(self, data: Any, offset: int = 0) -> None: ...
        def read(self, nbytes: int | None = None, offset: int = 0) -> memoryview: ...
        def read_into(self, out: Any, offset: int = 0) -> None: ...
        def free(self) -> None: ...
    else:
        map = blocking(BufferOps.map)
        write = blocking(BufferOps.write)
        read = blocking(BufferOps.read)
        read_into = blocking(BufferOps.read_into)
        free = blocking(BufferOps.free)
