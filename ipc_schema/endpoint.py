"""Where the daemon listens: one set of rules shared by npud, the client library and npuctl.

1. an explicit endpoint (``--endpoint`` or ``npu.connect(endpoint)``);
2. ``$NPUD_ENDPOINT`` if set and non-empty;
3. ``ipc://$XDG_RUNTIME_DIR/npud/npud.sock`` if ``$XDG_RUNTIME_DIR`` is set;
4. ``ipc:///tmp/npud-$UID/npud.sock`` otherwise.

The system service listens on ``SYSTEM_ENDPOINT``; point clients at it with
``NPUD_ENDPOINT=ipc:///run/npud/npud.sock`` (or --endpoint).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

SYSTEM_ENDPOINT = "ipc:///run/npud/npud.sock"


def default_endpoint(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    if env.get("NPUD_ENDPOINT"):
        return env["NPUD_ENDPOINT"]
    if env.get("XDG_RUNTIME_DIR"):
        return f"ipc://{env['XDG_RUNTIME_DIR']}/npud/npud.sock"
    return f"ipc:///tmp/npud-{os.getuid()}/npud.sock"


def resolve(endpoint: str | None, env: Mapping[str, str] | None = None) -> str:
    return endpoint or default_endpoint(env)


def ipc_path(endpoint: str) -> str | None:
    """The filesystem path of an ``ipc://`` endpoint, or None for other transports."""
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


def attach_path_for(endpoint: str) -> str | None:
    """Where the companion (fd passing) socket of an ipc endpoint lives: beside it."""
    path = ipc_path(endpoint)
    if path is None:
        return None
    base = path[:-len(".sock")] if path.endswith(".sock") else path
    return base + ".fds"
