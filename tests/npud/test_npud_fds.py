"""Running out of file descriptors: every buffer holds two in the daemon, so a client allocating
small buffers could once make npud exit (found by the soak, docs/RELIABILITY.md).  Now buffers
get a share of the open-file limit and each session a share of that, and what fails is the
request, never the daemon."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import npu
from npud.fds import BUFFER_SHARE, FDS_PER_BUFFER, SESSION_SHARE, FdBudget, raise_soft_limit
from sched_models import deep_mlp, feeds, reference

NOFILE = 320   # soft = hard, as a service might be given: npud cannot raise it


def test_budget_shares():
    b = FdBudget(1024)
    assert b.max_buffers == int(1024 * BUFFER_SHARE) // FDS_PER_BUFFER == 384
    assert b.max_per_session == int(384 * SESSION_SHARE)
    assert not b.full
    b.buffers = b.max_buffers
    assert b.full


def test_buffers_pooled_on_one_device_make_room_for_another():
    from npud.memory import DeviceMemory

    budget = FdBudget(40)
    dev0 = DeviceMemory(0, 1 << 30, 4096, fds=budget)
    dev1 = DeviceMemory(1, 1 << 30, 4096, fds=budget)
    for bo in [dev1.allocate(4096) for _ in range(budget.max_buffers)]:
        dev1.release(bo)   # pooled (but the first: released while the budget was full, closed)
    assert budget.buffers == budget.max_buffers - 1     # no buffer in use, the pool holds them
    held = [dev0.allocate(4096) for _ in range(budget.max_buffers)]   # the pool gives way
    assert budget.buffers == budget.max_buffers
    from npud.ipc_schema.errors import RequestError
    with pytest.raises(RequestError, match="open-file limit"):
        dev0.allocate(4096)                 # now every buffer is in use: refused
    for bo in held:
        dev0.release(bo)
    dev0.close()
    dev1.close()
    assert budget.buffers == 0


def raised(soft: str, hard: str) -> subprocess.CompletedProcess:
    """raise_soft_limit() in a child whose limits are first set to (soft, hard) (Python
    expressions): it prints what it returned, then the soft and hard limits after it."""
    script = ("import resource\n"
              f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
              "from npud.fds import raise_soft_limit\n"
              "print(raise_soft_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_soft_limit_is_raised_to_the_hard_one():
    out = raised("256", "512")
    assert out.stdout.split() == ["512", "512", "512"], out.stderr
    assert raise_soft_limit() == resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_an_infinite_hard_limit_is_kept_and_the_soft_one_goes_to_nr_open(monkeypatch):
    # Faked: only a process allowed past fs.nr_open can have an infinite hard limit for real.
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (256, resource.RLIM_INFINITY))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    nr_open = int(open("/proc/sys/fs/nr_open").read())
    assert raise_soft_limit() == nr_open
    assert calls == [(nr_open, resource.RLIM_INFINITY)]     # the hard limit is left as it was


@pytest.fixture
def small_daemon():
    """npud whose open-file limit is NOFILE, soft and hard."""
    sock_dir = tempfile.mkdtemp(prefix="npud-fds-")
    endpoint = f"ipc://{sock_dir}/npud.sock"
    script = ("import os, resource, sys\n"
              f"resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE}))\n"
              "os.execv(sys.executable, [sys.executable, '-m', 'npud.main'] + sys.argv[1:])\n")
    proc = subprocess.Popen([sys.executable, "-c", script, "--endpoint", endpoint, "--log-level", "error",
                             "--cache-dir", os.path.join(sock_dir, "cache")],
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                npu.connect(endpoint, timeout=2).close()
                break
            except npu.ConnectionLost:
                assert proc.poll() is None and time.monotonic() < deadline, "npud did not start"
                time.sleep(0.1)
        proc.endpoint = endpoint
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
        subprocess.run(["rm", "-rf", sock_dir])


def hog(client, limit: int = 10_000) -> tuple[list, npu.NpuError]:
    """Allocate 4 KiB buffers until the daemon refuses; the buffers and the refusal."""
    bufs = []
    while len(bufs) < limit:
        try:
            bufs.append(client.alloc(4096))
        except npu.NpuError as exc:
            return bufs, exc
    raise AssertionError(f"{limit} buffers and no refusal")


def retrying(call, timeout: float = 20.0):
    """``call()``, retried while it fails with a retryable ENOMEM: the devices unmap a closed
    session's buffers asynchronously, so their descriptors come back a moment later."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except npu.OutOfMemory as exc:
            assert exc.retryable and time.monotonic() < deadline, exc
            time.sleep(0.05)


def test_buffer_hogs_get_errors_and_the_daemon_and_others_go_on(small_daemon):
    budget = FdBudget(NOFILE)
    with npu.connect(small_daemon.endpoint) as bystander:
        model = bystander.load(deep_mlp(layers=2))
        x = feeds(model)
        model.run(x)                  # its input/output buffers exist from here on
        first = npu.connect(small_daemon.endpoint, map_io=False)
        bufs1, refusal = hog(first)
        assert refusal.code == "EDQUOT" and "open-file limit" in refusal.message
        assert len(bufs1) == budget.max_per_session
        second = npu.connect(small_daemon.endpoint, map_io=False)
        bufs2, refusal = hog(second)
        assert refusal.code == "ENOMEM" and refusal.retryable and "open-file limit" in refusal.message
        # Every buffer the daemon holds counts: the bystander's model took some before the hogs.
        assert len(bufs1) + len(bufs2) < budget.max_buffers
        with pytest.raises(npu.OutOfMemory, match="open-file limit"):
            bystander.load(deep_mlp(layers=3))       # a new model's buffers: refused, not fatal
        np.testing.assert_allclose(model.run(x)[model.outputs[0].name], reference(x, layers=2),
                                   rtol=1e-4, atol=1e-5)  # what was loaded still runs
        second.close()                                # its buffers are freed with its session
        other = retrying(lambda: bystander.load(deep_mlp(layers=3)))
        y = feeds(other)
        np.testing.assert_allclose(retrying(lambda: other.run(y))[other.outputs[0].name], reference(y, layers=3),
                                   rtol=1e-4, atol=1e-5)
        first.close()
    assert small_daemon.poll() is None


async def test_a_compiler_worker_that_cannot_start_fails_that_compile_only(monkeypatch, tmp_path):
    """Out of descriptors (or processes) when a worker starts: that compile gets EIO naming the
    log, and the pool goes on (it retries the start on the next compile)."""
    import trio

    from npud import compilers

    async def no_process(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(compilers.trio.lowlevel, "open_process", no_process)
    pool = compilers.CompilerPool(1, 1 << 30, 30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        for _ in range(2):
            reply = await pool.compile({"op": "compile", "model": b"", "config": {}, "options": {}})
            assert reply["ok"] is False and reply["error"]["code"] == "EIO", reply
            assert "did not start" in reply["error"]["message"]
        nursery.cancel_scope.cancel()
