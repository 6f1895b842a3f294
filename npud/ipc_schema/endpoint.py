"""Where the daemon listens: one set of rules shared by npud, the client library and npuctl.

A client (``npu.connect()``, ``npuctl``) looks, in this order, for:

1. an explicit endpoint (``--endpoint`` or ``npu.connect(endpoint)``);
2. ``$NPUD_ENDPOINT`` if set and non-empty;
3. the user's own daemon, ``ipc://$XDG_RUNTIME_DIR/npud/npud.sock``, if that socket exists;
4. the system service, ``ipc:///run/npud/npud.sock`` (``SYSTEM_ENDPOINT``), if that socket exists;
5. ``ipc:///tmp/npud-$UID/npud.sock`` otherwise (the per-uid fallback).

``npud`` started without ``--endpoint`` (or a config's ``endpoint``) serves where step 1-3 or 5
would find it: ``$NPUD_ENDPOINT``, else under ``$XDG_RUNTIME_DIR`` if that is set, else the per-uid
fallback (``serve_endpoint``).  The system service serves ``SYSTEM_ENDPOINT`` by its config.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

SYSTEM_ENDPOINT = "ipc:///run/npud/npud.sock"


def user_endpoint(env: Mapping[str, str]) -> str | None:
    """The user's own daemon's endpoint under ``$XDG_RUNTIME_DIR``; None if that is unset."""
    runtime = env.get("XDG_RUNTIME_DIR")
    return f"ipc://{runtime}/npud/npud.sock" if runtime else None


def fallback_endpoint() -> str:
    """The per-uid endpoint used when there is no ``$XDG_RUNTIME_DIR``."""
    return f"ipc:///tmp/npud-{os.getuid()}/npud.sock"


def serve_endpoint(env: Mapping[str, str] | None = None) -> str:
    """Where ``npud`` serves when not told: ``$NPUD_ENDPOINT``, else the user endpoint, else the
    per-uid fallback -- each a place ``default_endpoint`` looks."""
    env = os.environ if env is None else env
    return env.get("NPUD_ENDPOINT") or user_endpoint(env) or fallback_endpoint()


def candidates(env: Mapping[str, str] | None = None) -> list[str]:
    """The endpoints a client tries without an explicit one, in order (steps 2-5 above)."""
    env = os.environ if env is None else env
    if env.get("NPUD_ENDPOINT"):
        return [env["NPUD_ENDPOINT"]]
    user = user_endpoint(env)
    return [*([user] if user else []), SYSTEM_ENDPOINT, fallback_endpoint()]


def default_endpoint(env: Mapping[str, str] | None = None,
                     exists: Callable[[str], bool] = os.path.exists) -> str:
    """Where a client connects when not told: the first candidate whose socket exists, else the
    last (an ``$NPUD_ENDPOINT``, or the per-uid fallback)."""
    found = candidates(env)
    for endpoint in found[:-1]:
        path = ipc_path(endpoint)
        if path is not None and exists(path):
            return endpoint
    return found[-1]


def resolve(endpoint: str | None, env: Mapping[str, str] | None = None) -> str:
    """``endpoint`` if given, else ``default_endpoint``."""
    return endpoint or default_endpoint(env)


def searched(endpoint: str | None, env: Mapping[str, str] | None = None) -> str:
    """For an error about a daemon not found: where the search looked, if ``endpoint`` was
    found by it (not given, nor in ``$NPUD_ENDPOINT``); else ""."""
    found = candidates(env)
    if endpoint or len(found) == 1:
        return ""
    return " (looked for " + ", ".join(found) + ")"


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
