"""systemd integration without libsystemd: notification, socket activation, watchdog.

* ``notify()`` speaks sd_notify(3): when started with ``Type=notify`` (or by
  anything that sets ``$NOTIFY_SOCKET``, such as ``npu.local()``), the daemon
  reports READY=1 once it serves, STATUS= lines, WATCHDOG=1 and STOPPING=1.
  Without ``$NOTIFY_SOCKET`` every call does nothing.
* ``listen_fds()`` is sd_listen_fds_with_names(3): the sockets a socket unit
  (or ``systemd-socket-activate``) passed as fds 3.. with ``$LISTEN_FDS``,
  ``$LISTEN_PID`` and ``$LISTEN_FDNAMES``.  ``activated_sockets()`` sorts them
  into the ZeroMQ listener (a ``SOCK_STREAM`` Unix socket, named ``npud``) and
  the companion listener (a ``SOCK_SEQPACKET`` Unix socket, named ``npud-fds``).
* ``watchdog_interval()`` reads ``$WATCHDOG_USEC``/``$WATCHDOG_PID``;
  ``run_watchdog()`` is the trio task that pings at half that period, so a
  stuck event loop stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import trio

log = logging.getLogger("npud.systemd")

SD_LISTEN_FDS_START = 3
ZMQ_FDNAME = "npud"
ATTACH_FDNAME = "npud-fds"
_ACTIVATION_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send newline-separated ``KEY=value`` assignments; return whether they were sent."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError:   # no descriptor left, or systemd gone: a missed status line is harmless
        return False
    return True


def listen_fds(env: MutableMapping[str, str] | None = None, *, unset: bool = True) -> list[tuple[int, str]]:
    """The ``(fd, name)`` pairs passed to this process by socket activation, or ``[]``.

    As sd_listen_fds(3): the fds are only ours when ``$LISTEN_PID`` is our pid;
    they are made close-on-exec so that no child inherits them, and (``unset``)
    the variables are removed so that no child mistakes them for its own.
    Names missing from ``$LISTEN_FDNAMES`` read as ``"unknown"``, like systemd's.
    """
    env = os.environ if env is None else env
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        count, pid = 0, -1
    names = env.get("LISTEN_FDNAMES", "")
    if unset:
        for var in _ACTIVATION_VARS:
            env.pop(var, None)
    if pid != os.getpid() or count <= 0:
        return []
    names = names.split(":") if names else []
    fds = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        fds.append((fd, names[i] if i < len(names) and names[i] else "unknown"))
    return fds


@dataclass
class ActivatedSockets:
    """What socket activation handed over: either part may be missing."""

    zmq_fd: int | None = None          # a listening SOCK_STREAM Unix socket for the ROUTER
    zmq_path: str | None = None
    attach: socket.socket | None = None  # a listening SOCK_SEQPACKET Unix socket
    attach_path: str | None = None


def _unix_path(sock: socket.socket) -> str | None:
    name = sock.getsockname()
    if isinstance(name, bytes):  # abstract or unnamed
        return None
    return name or None


def activated_sockets(env: MutableMapping[str, str] | None = None) -> ActivatedSockets:
    """Sort the inherited sockets into the ZeroMQ listener and the companion listener.

    Sockets are recognised by their type (a name of ``npud`` or ``npud-fds``
    is preferred when more than one fits); anything else passed is logged,
    closed and ignored, so a unit with an extra or odd socket still starts.
    """
    found = ActivatedSockets()
    candidates: dict[str, list[tuple[str, socket.socket]]] = {"zmq": [], "attach": []}
    for fd, name in listen_fds(env):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("ignoring inherited fd %d (%s): not a socket (%s)", fd, name, exc.strerror)
            continue
        path = _unix_path(sock) if sock.family == socket.AF_UNIX else None
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if path and listening and sock.type == socket.SOCK_STREAM:
            candidates["zmq"].append((name, sock))
        elif path and listening and sock.type == socket.SOCK_SEQPACKET:
            candidates["attach"].append((name, sock))
        else:
            log.warning("ignoring inherited socket fd %d (%s): expected a listening Unix stream socket "
                        "(ListenStream=) or seqpacket socket (ListenSequentialPacket=)", fd, name)
            sock.close()
    for kind, preferred in (("zmq", ZMQ_FDNAME), ("attach", ATTACH_FDNAME)):
        socks = sorted(candidates[kind], key=lambda item: item[0] != preferred)
        for name, extra in socks[1:]:
            log.warning("ignoring extra inherited socket %s (%s)", _unix_path(extra), name)
            extra.close()
        if not socks:
            continue
        sock = socks[0][1]
        if kind == "zmq":
            found.zmq_path = _unix_path(sock)
            found.zmq_fd = sock.detach()  # ZeroMQ takes it over (and closes it)
        else:
            found.attach, found.attach_path = sock, _unix_path(sock)
    return found


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None when off."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    if env.get("WATCHDOG_PID"):
        try:
            if int(env["WATCHDOG_PID"]) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1e6


async def run_watchdog(interval: float, env: Mapping[str, str] | None = None) -> None:
    """Ping the service manager every ``interval`` seconds, from the event loop itself."""
    while True:
        notify("WATCHDOG=1", env)
        await trio.sleep(interval)
