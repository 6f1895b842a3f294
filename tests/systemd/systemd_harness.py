"""Helpers for tests/systemd: a notify socket, npud started with inherited sockets, npud's logging."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
SSA = shutil.which("systemd-socket-activate")
ANALYZE = shutil.which("systemd-analyze")
TIMEOUT_S = 30.0

# Execs npud with the listed fds renumbered to 3.. and LISTEN_PID set to its own
# pid (exec keeps it): what systemd does for a socket-activated service.
_ACTIVATE = r"""
import fcntl, os, sys
fds, names, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
fds = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 100) for fd in fds.split(",") if fd]  # out of the way of 3..
for i, fd in enumerate(fds):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=names)
os.execv(sys.executable, [sys.executable, "-m", "npud.main", *argv])
"""


class Notifications:
    """A $NOTIFY_SOCKET that records every datagram npud sends."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        self.messages: list[str] = []

    def drain(self, wait: float = 0.0) -> None:
        # At most ``wait`` for the first datagram (0: none).  (setblocking(True) would wait forever,
        # so a daemon that exits before READY=1 hung wait_for instead of failing it.)
        self.sock.settimeout(max(wait, 0.0))
        try:
            while True:
                self.messages.append(self.sock.recv(65536).decode())
                self.sock.setblocking(False)
        except (BlockingIOError, socket.timeout):
            pass

    def assignments(self) -> list[str]:
        return [line for message in self.messages for line in message.split("\n")]

    def wait_for(self, line_prefix: str, process: subprocess.Popen | None = None,
                 timeout: float = TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.assignments():
                if line.startswith(line_prefix):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no {line_prefix!r} within {timeout} s; got {self.assignments()}")
            if process is not None and process.poll() is not None:
                self.drain()
                if not any(line.startswith(line_prefix) for line in self.assignments()):
                    raise AssertionError(f"npud exited ({process.returncode}) before {line_prefix!r}")
            self.drain(0.1)

    def close(self) -> None:
        self.sock.close()


def listening_socket(path: str, kind: int, mode: int = 0o660) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(path)
    os.chmod(path, mode)
    sock.listen(64)
    return sock


def child_env(notify: Notifications, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NPUD_ENDPOINT", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "JOURNAL_STREAM",
                        "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["NOTIFY_SOCKET"] = notify.path
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "clients"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def start_with_fds(socks: list[socket.socket], names: list[str], npud_args: list[str],
                   env: dict[str, str]) -> subprocess.Popen:
    """npud with ``socks`` as its LISTEN_FDS, like systemd (no systemd needed)."""
    fds = [s.fileno() for s in socks]
    return subprocess.Popen([sys.executable, "-c", _ACTIVATE, ",".join(map(str, fds)), ":".join(names),
                             *npud_args], env=env, pass_fds=fds, cwd=REPO)


def stop(process: subprocess.Popen, timeout: float = TIMEOUT_S) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextmanager
def npud_logging(path: Path, env_for: Callable, fmt: str = "text") -> Iterator[logging.Logger]:
    """npud's logging (npud/log.py ``setup`` at debug, ``env_for(stream)`` its environment) into the
    file ``path``; yields a logger.  The root logger's handlers and level are restored after."""
    from npud import log as npud_log

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        with open(path, "w") as stream:
            npud_log.setup("debug", env_for(stream), stream, fmt=fmt)
            yield logging.getLogger("npud.test")
            for handler in root.handlers:
                handler.flush()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
