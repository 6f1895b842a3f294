"""Run a function in a child process as another uid (the tests run as root here) and get its result."""

from __future__ import annotations

import json
import os
import traceback

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")


def open_to_everyone(daemon) -> None:
    """Let other uids reach a private daemon's sockets (its directory is 0700, sockets 0660)."""
    os.chmod(daemon.dir, 0o711)
    for name in os.listdir(daemon.dir):
        if name.endswith((".sock", ".fds")):
            os.chmod(os.path.join(daemon.dir, name), 0o666)


def run_as(uid: int, gid: int, fn, *args, timeout: float = 30.0):
    """``fn(*args)`` in a forked child running as ``uid``/``gid`` (no supplementary groups).

    Returns what it returned (JSON-able), or raises AssertionError with the child's traceback.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            try:
                out = {"ok": fn(*args)}
            except BaseException:
                out = {"error": traceback.format_exc()}
            os.write(write, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    out = json.loads(b"".join(chunks) or b'{"error": "the child died without a word"}')
    if "error" in out:
        raise AssertionError(f"child as uid {uid} failed:\n{out['error']}")
    return out["ok"]


def npu_error(fn, *args, **kwargs) -> dict | None:
    """Call fn; return the NpuError it raised as {code, message, retryable} (None if it did not)."""
    import npu

    try:
        fn(*args, **kwargs)
    except npu.NpuError as exc:
        return {"code": exc.code, "message": exc.message, "retryable": exc.retryable}
    return None
