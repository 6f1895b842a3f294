"""The systemd notification protocol (sd_notify(3)), without libsystemd.

When started by systemd with Type=notify (or by anything that sets
``$NOTIFY_SOCKET``, such as ``npu.local()``), the daemon reports READY=1 once it
serves, STATUS= lines, and STOPPING=1 on shutdown.  Without ``$NOTIFY_SOCKET``
every call does nothing.
"""

from __future__ import annotations

import os
import socket


def notify(state: str, env: dict[str, str] | None = None) -> bool:
    """Send newline-separated ``KEY=value`` assignments; return whether they were sent."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            return False
    return True
