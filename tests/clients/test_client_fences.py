"""npu.wait, Job fences and contexts through the client library (a real daemon)."""

from __future__ import annotations

import pytest

import npu
from npud.emulator.assembler import StreamBuilder
from npud.emulator.config import make_config


def nop_stream() -> bytes:
    sb = StreamBuilder(make_config("edge"))
    sb.end()
    return sb.build()


def test_wait_of_nothing_is_nothing():
    assert npu.wait([]) == []


def test_jobs_carry_fence_points_and_wait_all_any(make_client):
    c = make_client()
    ctx = c.context("high", weight=3)
    assert (ctx.priority, ctx.weight) == ("high", 3)
    jobs = [c.submit(nop_stream(), [], context=ctx) for _ in range(3)]
    assert [j.fence for j in jobs] == [(ctx.id, 1), (ctx.id, 2), (ctx.id, 3)]
    assert npu.wait(jobs, all=True, timeout=5) == jobs
    assert all(j.state == "done" and j.error is None for j in jobs)
    assert npu.wait(jobs, all=False) == jobs     # already finished: no request
    after = c.submit(nop_stream(), [], after=jobs)
    assert after.wait(5).state == "done"


def test_wait_refuses_jobs_of_two_clients(make_client):
    a, b = make_client(), make_client()
    ja, jb = a.submit(nop_stream(), []), b.submit(nop_stream(), [])
    with pytest.raises(npu.InvalidArgument) as info:
        npu.wait([ja, jb])
    assert "import_fence" in info.value.message
    assert npu.wait([jb, b.import_fence(ja.export_fence())], timeout=5)


def test_unknown_priority_is_refused(make_client):
    with pytest.raises(npu.InvalidArgument):
        make_client().context("urgent")
