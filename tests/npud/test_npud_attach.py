"""The companion socket's listen backlog: a burst of clients attaching at once is queued, not refused."""

from __future__ import annotations

import errno
import os
import socket


from npud.ipc_schema.endpoint import attach_path_for
from npud import attach

BURST = 600


def connect_burst(path: str, n: int) -> tuple[list[socket.socket], int]:
    """``n`` non-blocking connections to ``path`` as fast as possible: (the sockets, how many were
    refused with EAGAIN, which is what a Unix socket's full backlog answers)."""
    socks, refused = [], 0
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError as exc:
            assert exc.errno == errno.EAGAIN
            refused += 1
            s.close()
            continue
        socks.append(s)
    return socks, refused


def test_backlog_holds_a_burst_of_every_session(tmp_path):
    """Nothing accepts here: every connection must fit in the backlog (old: 128 of 600 did)."""
    path = str(tmp_path / "npud.fds")
    listener = attach.listen(path, max_sessions=BURST)
    try:
        socks, refused = connect_burst(path, BURST)
        assert refused == 0, f"{refused} of {BURST} connections refused with EAGAIN"
        for s in socks:
            s.close()
    finally:
        listener.close()
    assert attach.backlog_for(1024) >= 1024 and attach.backlog_for(10_000) == 10_000


def test_a_burst_of_companion_connections_to_the_daemon_is_not_refused(daemon):
    path = attach_path_for(daemon.endpoint)
    assert os.path.exists(path)
    socks, refused = connect_burst(path, 300)
    for s in socks:
        s.close()
    assert refused == 0, f"{refused} of 300 rapid connections refused with EAGAIN"
