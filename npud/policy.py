"""Who may do what: the one place admin operations are decided.

There is no policy file yet.  Until there is, admin operations (`kill_client`,
`reset_device`) are allowed to root and to the daemon's own uid, as the kernel
reports them (``Session.uid`` comes from SO_PEERCRED on the companion socket;
what a client claims in HELLO is never used).  A policy module replaces
``check_admin`` (or sets ``Daemon.policy``) without touching the handlers.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ipc_schema.errors import ErrorCode, RequestError

if TYPE_CHECKING:
    from .sessions import Session


def admin_refusal(session: "Session", op: str, daemon_uid: int | None = None) -> str | None:
    """Why ``session`` may not perform admin op ``op``, or None if it may."""
    daemon_uid = os.getuid() if daemon_uid is None else daemon_uid
    if session.uid < 0:
        return (f"{op} is an admin operation and this session's user is unknown: the daemon learns it "
                "from the kernel on the companion socket, which this client did not connect")
    if session.uid in (0, daemon_uid):
        return None
    return (f"{op} is an admin operation, allowed to root and to the daemon's user (uid {daemon_uid}); "
            f"this session's user is uid {session.uid}")


def check_admin(session: "Session", op: str) -> None:
    """Raise EPERM with the reason unless ``session`` may perform admin op ``op``."""
    reason = admin_refusal(session, op)
    if reason is not None:
        raise RequestError(ErrorCode.EPERM, reason)
