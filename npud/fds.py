"""How many file descriptors npud's buffers may hold.

Every buffer object holds two descriptors in the daemon (its memfd, and the
duplicate CPython's ``mmap`` keeps), so buffers are what can run the daemon out
of them, and a daemon that cannot open a descriptor cannot start a compiler
worker, load a program or accept a client.  So at start the soft
``RLIMIT_NOFILE`` is raised to the hard limit (systemd's advice for services
that need many descriptors: the soft 1024 exists for ``select()``, which npud
does not use), and buffers may hold at most ``BUFFER_SHARE`` of it.  The rest is
for sessions, compiler workers, device processes and program streams.  One
session may hold at most ``SESSION_SHARE`` of the buffers, so a single client
cannot take them all.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("npud")

FDS_PER_BUFFER = 2
BUFFER_SHARE = 0.75
SESSION_SHARE = 0.5


def raise_soft_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit where allowed; returns the soft limit now.

    An infinite hard limit is kept as it is (children inherit it); the soft one then goes to the
    kernel's per-process ceiling, fs.nr_open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _nr_open() if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft >= target:
        return soft
    if soft == resource.RLIM_INFINITY:
        return target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft
    return target


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20   # Linux's default fs.nr_open


def soft_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class FdBudget:
    """The count of buffer objects open in the daemon (in use or pooled) against their share
    of the open-file limit: ``nofile``, or the process's soft limit read at each check (one
    syscall, next to the memfd_create it guards), so that a limit lowered from outside
    (``prlimit``) is honoured too."""

    def __init__(self, nofile: int | None = None):
        self._nofile = nofile
        self.buffers = 0
        self._pools: list = []   # the DeviceMemory objects whose reuse pools hold descriptors

    def register(self, memory) -> None:
        self._pools.append(memory)

    def make_room(self) -> None:
        """Close every device's pooled buffers: descriptors are wanted for new ones, on any device."""
        for memory in self._pools:
            memory.shrink_pool()

    @property
    def nofile(self) -> int:
        return self._nofile if self._nofile is not None else soft_limit()

    @property
    def max_buffers(self) -> int:
        return max(1, int(self.nofile * BUFFER_SHARE) // FDS_PER_BUFFER)

    @property
    def max_per_session(self) -> int:
        return max(1, int(self.max_buffers * SESSION_SHARE))

    @property
    def full(self) -> bool:
        return self.buffers >= self.max_buffers
