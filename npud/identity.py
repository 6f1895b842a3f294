"""Stable device identity: the UUID `devices`, `status` and `npuctl query` show.

An emulated NPU has no serial number to read, so its UUID is derived, not
stored: a name-based (version 5) UUID of the host's machine-id, the device's
configured name and its index.  Deriving it needs no writable state (a fresh
or wiped state directory, a read-only root, a restored backup on another
host all keep or change it correctly), is the same after every restart and
reinstall of the same configuration, and differs between hosts, so a fleet's
metrics can key on it.  A device renamed or moved to another index is another
configuration entry and gets another UUID.  Drivers for real hardware would
report the part's own identity instead.
"""

from __future__ import annotations

import socket
import uuid

MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
NAMESPACE = uuid.UUID("6b1c2f0e-7d3a-5e4b-9c8d-0a1b2c3d4e5f")   # npud's own: never changes


def machine_id(files=MACHINE_ID_FILES) -> str:
    """The host's machine-id (systemd's, else D-Bus's); the host name if neither exists (some containers)."""
    for path in files:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text:
            return text
    return "hostname:" + socket.gethostname()


def device_uuid(name: str, index: int, host: str | None = None) -> str:
    """``NPU-`` and the UUID of (host, name, index), nvidia-smi style (``GPU-...``)."""
    host = machine_id() if host is None else host
    return "NPU-" + str(uuid.uuid5(NAMESPACE, f"{host}/{name}/{index}"))
