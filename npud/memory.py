"""Buffer objects: sealed memfds owned by the daemon, like GEM objects on an integrated NPU.

A ``BufferObject`` is device memory.  The daemon maps it (for ``read``/``write``
requests), the device process maps it (to execute jobs), and its owning client
may map it (``map``: the fd travels over the companion socket).  Its size is
sealed, so no mapper can shrink it under another's feet.

``DeviceMemory`` accounts one device's memory and keeps a small pool of freed
memfds for reuse, because fresh pages cost as much as copying the data over a
socket.  A buffer that was ever handed to a client is never pooled: the client
may keep its mapping after ``free``, and a recycled buffer would then leak the
next owner's data to it.  Pooled buffers are zeroed before reuse.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import itertools
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from npud.ipc_schema.errors import ErrorCode, RequestError

from .fds import FdBudget

if TYPE_CHECKING:
    from .sessions import Session

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_ids = itertools.count(1)
POOL_MAX_BUFFER = 16 << 20  # larger buffers are rare and costly to zero on the event loop


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(eq=False)
class BufferObject:
    """One memfd of ``mapped_size`` bytes, of which the first ``size`` are the client's."""

    id: int
    device: int
    size: int
    mapped_size: int
    fd: int
    mm: mmap.mmap
    exported: bool = False   # its fd was sent to a client
    refs: int = 1            # the owner's handle + one per job that binds it
    released: bool = field(default=False, repr=False)
    uncharged: bool = field(default=False, repr=False)  # no longer counted in DeviceMemory.used

    def view(self) -> memoryview:
        return memoryview(self.mm)[: self.size]

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


def _create_memfd(device: int, mapped_size: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create(f"npud-bo-dev{device}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, mapped_size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        mm = mmap.mmap(fd, mapped_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd, mm


class DeviceMemory:
    """Allocation and accounting of one device's memory."""

    def __init__(self, device: int, total: int, page_size: int, pool_bytes: int = 256 << 20,
                 fds: FdBudget | None = None):
        self.device = device
        self.fds = fds if fds is not None else FdBudget()  # shared by the daemon's devices
        self.fds.register(self)
        self.total = total
        self.page_size = page_size
        self.used = 0
        self._pool: dict[int, list[tuple[int, mmap.mmap]]] = {}
        self._pool_bytes = 0
        self._pool_limit = pool_bytes

    def allocate(self, size: int) -> BufferObject:
        """A zero-filled buffer of ``size`` bytes, or ENOMEM when the device is full."""
        mapped = round_up(size, self.page_size)
        if self.used + mapped > self.total:
            raise RequestError(
                ErrorCode.ENOMEM,
                f"device {self.device} has {self.total - self.used} bytes free of {self.total}; "
                f"cannot allocate {mapped}")
        pooled = self._pool.get(mapped)
        if pooled:
            fd, mm = pooled.pop()
            self._pool_bytes -= mapped
        else:
            if self.fds.full:
                self.fds.make_room()
            if self.fds.full:
                raise RequestError(
                    ErrorCode.ENOMEM, f"npud holds {self.fds.buffers} buffers, as many as its open-file limit "
                    f"({self.fds.nofile}) allows; retry after buffers are freed (or raise LimitNOFILE)")
            try:
                fd, mm = _create_memfd(self.device, mapped)
            except OSError as exc:
                raise RequestError(ErrorCode.ENOMEM, f"host cannot back {mapped} bytes: {exc.strerror}") from None
            self.fds.buffers += 1
        self.used += mapped
        return BufferObject(next(_ids), self.device, size, mapped, fd, mm)

    def uncharge(self, bo: BufferObject) -> None:
        """Stop counting a buffer whose last reference is gone, before its (asynchronous)
        release, so that memory freed by ``free`` can be allocated again at once."""
        if not bo.uncharged:
            bo.uncharged = True
            self.used -= bo.mapped_size

    def release(self, bo: BufferObject) -> None:
        """Return a buffer's memory; called once its last reference is dropped."""
        if bo.released:
            return
        bo.released = True
        self.uncharge(bo)
        if (bo.exported or bo.mapped_size > POOL_MAX_BUFFER or self.fds.full
                or self._pool_bytes + bo.mapped_size > self._pool_limit):
            bo.close()
            self.fds.buffers -= 1
            return
        # Zero now, while the pages are hot, so that reuse can never show old data.
        np.frombuffer(bo.mm, dtype=np.uint8)[:] = 0
        self._pool.setdefault(bo.mapped_size, []).append((bo.fd, bo.mm))
        self._pool_bytes += bo.mapped_size

    def close(self) -> None:
        self.shrink_pool()

    def shrink_pool(self) -> None:
        """Close every pooled memfd: their descriptors are wanted for new buffers."""
        for entries in self._pool.values():
            for fd, mm in entries:
                mm.close()
                os.close(fd)
                self.fds.buffers -= 1
        self._pool.clear()
        self._pool_bytes = 0


class BufferRefs:
    """The one owner of a device's buffer-object references and of what sessions are charged for
    them (as IREE's HAL retains and releases in pairs): nothing else changes ``refs`` or
    ``Session.memory``.

    A buffer is born with one reference, its owner's: a session's handle, or a loaded model's
    weights or arena.  ``charge`` bills a session for that reference and ``drop`` refunds it and
    releases it; every job that binds a buffer, and every copy off the event loop, holds one more
    (``retain``/``release``, or ``held``).  The last release hands the buffer to ``forget``, which
    unmaps it in the device processes and then frees it."""

    def __init__(self, forget: Callable[[BufferObject], None]):
        self._forget = forget

    def retain(self, bo: BufferObject) -> BufferObject:
        bo.refs += 1
        return bo

    def release(self, bo: BufferObject) -> None:
        bo.refs -= 1
        if bo.refs == 0:
            self._forget(bo)

    @contextlib.contextmanager
    def held(self, bo: BufferObject) -> Iterator[BufferObject]:
        """A reference for the duration of a block: a concurrent ``free`` or a session closing
        meanwhile cannot unmap the buffer under a copy or a hash."""
        self.retain(bo)
        try:
            yield bo
        finally:
            self.release(bo)

    def charge(self, session: "Session", bo: BufferObject) -> None:
        """Bill ``session`` for the owner's reference of ``bo`` (its handle's, or its model's)."""
        session.memory += bo.mapped_size

    def drop(self, session: "Session", bo: BufferObject) -> None:
        """The owner lets go: refund ``session`` and release the owner's reference."""
        session.memory -= bo.mapped_size
        self.release(bo)

    def drop_all(self, session: "Session", fixed: list[tuple[BufferObject, int, bool]]) -> None:
        """``drop`` each buffer of a model's (buffer, va, writable) list."""
        for bo, _va, _w in fixed:
            self.drop(session, bo)


def _libc_malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, or no ctypes)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (ImportError, OSError, AttributeError):
        return None


class HeapTrimmer:
    """Gives the C heap's free pages back to the kernel once the daemon has been idle a while.

    glibc keeps memory that was freed in its heap for reuse; after a busy period the daemon
    holds tens of MiB that way (the 30-minute soak: 18 MiB of 142 above idle, docs/RELIABILITY.md).
    ``tick(now, busy)`` is called periodically; after ``idle_s`` without a session it runs a full
    garbage collection and then ``malloc_trim(0)``, once, and again only after the next busy
    period.  The collection first: cyclic garbage of the busy period that no collection of the
    oldest generation has reached yet still holds its blocks, and pymalloc returns an arena
    only once every block in it is free.  Before both, ``release()`` (if given) drops what is
    kept only for reuse under load: the devices' pools of freed buffers (each a memfd, its
    mapping and the small objects recording them, made under load and pinning arenas).
    """

    def __init__(self, idle_s: float = 5.0, trim=None, collect=gc.collect, release=None):
        self.idle_s = idle_s
        self._release = release
        self._collect = collect
        self._trim = trim if trim is not None else _libc_malloc_trim()
        self._idle_since: float | None = None
        self._owed = False       # busy since the last trim
        self.trims = 0

    def tick(self, now: float, busy: bool) -> bool:
        """Note whether the daemon is busy; trim if it has been idle long enough.  Whether it trimmed."""
        if busy:
            self._idle_since, self._owed = None, True
            return False
        if not self._owed or self._trim is None:
            return False
        if self._idle_since is None:
            self._idle_since = now
        if now - self._idle_since < self.idle_s:
            return False
        self._owed = False
        if self._release is not None:
            self._release()
        self._collect()
        self._trim(0)
        self.trims += 1
        return True
