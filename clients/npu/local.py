"""``npu.local()``: a private daemon for one program (tests, notebooks, demos).

The daemon runs as a child process on an endpoint in a fresh temporary
directory.  Readiness is learned the way systemd learns it: the child is given
a ``$NOTIFY_SOCKET`` and reports ``READY=1`` once it serves.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from npud.ipc_schema.errors import ErrorCode

from .client import Client
from .errors import error

START_TIMEOUT_S = 30.0


class LocalDaemon:
    """A daemon child process; ``stop()`` sends SIGTERM and waits for a clean exit."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, log_level: str = "warning",
                 cwd: str | None = None):
        self.dir = tempfile.mkdtemp(prefix="npud-local-")
        self.endpoint = f"ipc://{self.dir}/npud.sock"
        notify_path = os.path.join(self.dir, "notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify.bind(notify_path)
        child_env = {**os.environ, **(env or {}), "NOTIFY_SOCKET": notify_path}
        child_env.pop("NPUD_ENDPOINT", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "npud.main", "--endpoint", self.endpoint, "--log-level", log_level,
             *args], env=child_env, cwd=cwd)
        try:
            self._wait_ready(notify)
        except BaseException:
            self.stop()
            raise
        finally:
            notify.close()

    def _wait_ready(self, notify: socket.socket) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            notify.settimeout(0.1)
            try:
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    return
            except socket.timeout:
                pass
            if self.process.poll() is not None:
                raise error(ErrorCode.ECONNREFUSED,
                            f"the private npud exited with status {self.process.returncode} before it was ready")
        raise error(ErrorCode.ETIMEDOUT, f"the private npud did not become ready in {START_TIMEOUT_S:.0f} s")

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        return self.process.returncode


def local(*daemon_args: str, **client_kwargs: Any) -> Client:
    """Start a private npud and return a client connected to it; closing the client stops it.

    ``daemon_args`` are passed to ``npud`` (e.g. ``"--device", "server"``).
    """
    daemon = LocalDaemon(*daemon_args)
    try:
        client = Client(daemon.endpoint, **client_kwargs)
    except BaseException:
        daemon.stop()
        raise
    client.daemon = daemon
    client._on_close.append(daemon.stop)
    return client
