"""A lifeline: the daemon's helper processes die with it, within milliseconds, even while busy.

npud's device processes and compiler workers must not outlive their daemon: a restarted
daemon must never find the old generation still computing or writing.  ``PR_SET_PDEATHSIG``
does not hold here: it fires when the *thread* that forked the child exits, and trio forks
from worker threads that retire when idle; nor does polling ``getppid`` from a process that
is busy in a long compile or a long job.

The lifeline is a pipe whose write end only the daemon holds (``os.pipe`` descriptors are
not inherited, and the daemon never writes to it).  Each child gets the read end and asks
the kernel for ``SIGIO`` on it (``O_ASYNC``).  When the daemon exits, however it exits, the
kernel closes the write end and signals every reader; ``SIGIO``'s default action ends the
process, in the kernel, whatever its main thread is doing (numpy, a sleep, a syscall).

``open_process(module, args)`` starts ``python -m npud.lifeline module args``: this
module arms the lifeline before it imports ``module`` and runs it as ``__main__``, because a
child's own imports (numpy, onnx) take a second or more on a loaded machine, and a child
still importing when the daemon died would live that long.  ``module`` needs no change.
"""

from __future__ import annotations

import fcntl
import os
import runpy
import select
import signal
import sys

ENV = "NPUD_LIFELINE_FD"
_pipe: tuple[int, int] | None = None   # (read end, write end), open for this process's lifetime


def _lifeline() -> int:
    """The read end of this process's lifeline, created on first use and kept for its lifetime."""
    global _pipe
    if _pipe is None:
        _pipe = os.pipe()
    return _pipe[0]


async def open_process(module: str, args: list[str], pass_fds: tuple[int, ...] = (),
                       env: dict[str, str] | None = None):
    """``python -m module *args`` as a trio process that dies with this one, with this process's
    environment plus ``env`` (which wins)."""
    import trio   # the children import this module too, and need no trio

    fd = _lifeline()
    return await trio.lowlevel.open_process([sys.executable, "-m", "npud.lifeline", module, *args],
                                            pass_fds=(*pass_fds, fd), env={**os.environ, **(env or {}), ENV: str(fd)})


def die_with_parent() -> None:
    """Make the kernel end this process as soon as the daemon that started it exits.

    A process started without a lifeline (by hand, for debugging) is left as it is.  If the
    daemon is already gone when this runs, the process exits here: no window is left open.
    ``main`` below calls it before anything else; it must run before a sandbox that forbids
    ``fcntl`` or ``/proc``.
    """
    value = os.environ.pop(ENV, None)
    if value is None:
        return
    inherited = int(value)
    # The signal's owner (F_SETOWN) belongs to the open file, and the inherited one is shared by
    # all of the daemon's children: the last to arm would take every signal.  Re-opening the
    # pipe through /proc gives this process an open file of its own.
    try:
        fd = os.open(f"/proc/self/fd/{inherited}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.close(inherited)
    except OSError:   # no /proc: the shared file still signals the last child that armed
        fd = inherited
    signal.signal(signal.SIGIO, signal.SIG_DFL)   # the default action ends the process
    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if poller.poll(0):   # hang-up: the daemon died before the signal was armed
        raise SystemExit("npud, which started this process, has exited")


def main(argv: list[str]) -> None:
    """``python -m npud.lifeline MODULE ARG...``: arm the lifeline, then run MODULE as
    ``python -m MODULE ARG...`` would (its exit status is the process's)."""
    die_with_parent()
    sys.argv = argv
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
