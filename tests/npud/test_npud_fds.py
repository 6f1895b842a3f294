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
    from ipc_schema.errors import RequestError
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
