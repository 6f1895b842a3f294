"""Isolation: no session reaches another's jobs, fences, models or contexts by any handle, guessed or
replayed, and no job reads device memory or SRAM left over from another session's job.
(Buffers by handle: tests/npud/test_npud_buffers.py.)"""

from __future__ import annotations

import numpy as np
import pytest

import npu
from npud.emulator.assembler import StreamBuilder, tile
from npud.emulator.config import make_config
from sched_models import deep_mlp, feeds
from streams import A, B, O, add_stream

CFG = make_config("edge")
N = 1024
GUESSES = list(range(0, 40)) + [2**31, 2**32 - 1, 2**63]


def add_job(c, x=1.0, y=2.0):
    a, b, out = (c.alloc(N * 4) for _ in range(3))
    a.write(np.full(N, x, np.float32))
    b.write(np.full(N, y, np.float32))
    job = c.submit(add_stream(N), [(a, A, False), (b, B, False), (out, O, True)]).wait(10)
    return job, out


def refused(c, op, args, code="ENOENT"):
    with pytest.raises(npu.NpuError) as info:
        c._request(op, args)
    assert info.value.code == code, (op, args, info.value)
    return info.value


def test_jobs_cannot_be_named_by_another_session(make_client):
    owner, other = make_client(), make_client(map_io=False)
    job, out = add_job(owner)
    for guess in GUESSES:
        refused(other, "wait", {"job": guess, "timeout_ms": 0})
        refused(other, "cancel", {"job": guess})
        refused(other, "fence_export", {"job": guess})
        refused(other, "wait_jobs", {"jobs": [guess], "all": True, "timeout_ms": 0})
    mine, _ = add_job(other, 5.0, 6.0)
    assert mine.id == job.id            # job ids are per session: the same number is its own job
    assert np.all(np.frombuffer(out.read(), np.float32) == 3.0)
    assert owner._request("wait", {"job": job.id, "timeout_ms": 0})["state"] == "done"


def test_fence_tokens_cannot_be_guessed_or_replayed(make_client):
    owner, other = make_client(), make_client()
    job, _ = add_job(owner)
    token = job.export_fence()
    assert len(token) >= 16
    for guess in ["", "0", "1", token[:-1], token[:-1] + chr(ord(token[-1]) ^ 1), token.upper()
                  if token.upper() != token else token.lower()]:
        if guess != token:
            refused(other, "fence_import", {"token": guess})
    imported = other._request("fence_import", {"token": token})["job"]
    # An imported fence can be waited on, nothing more: no cancel, no re-export.
    assert other._request("wait", {"job": imported, "timeout_ms": 0})["state"] == "done"
    for op in ("cancel", "fence_export"):   # a known id, but not its own job
        assert "imported fence" in refused(other, op, {"job": imported}, code="EPERM").message
    owner.close()
    third = make_client()
    refused(third, "fence_import", {"token": token})   # replayed after its session closed


def test_cancel_by_imported_fence_cannot_stop_the_owners_job(make_client):
    owner, other = make_client(), make_client()
    m = owner.load(deep_mlp(layers=4))
    job = m.submit(feeds(m))
    token = job.export_fence()
    imported = other._request("fence_import", {"token": token})["job"]
    refused(other, "cancel", {"job": imported}, code="EPERM")
    job.wait(10)
    assert job.error is None


def test_models_and_contexts_cannot_be_named_by_another_session(make_client):
    owner, other = make_client(), make_client()
    m = owner.load(deep_mlp(layers=2))
    ctx = owner.context("high")
    buf = other.alloc(4096)
    for guess in [g for g in GUESSES if 1 <= g < 2**32]:
        refused(other, "report", {"model": guess})
        refused(other, "unload", {"model": guess})
        refused(other, "run_model", {"model": guess, "inputs": [buf.handle], "outputs": [buf.handle]})
    for guess in (ctx.id, ctx.id + 1, 2**20):
        err = refused(other, "submit", {"device": 0, "stream": add_stream(16), "bindings": [],
                                        "context": guess})
        assert "context" in err.message
    x = feeds(m)
    assert m.run(x)[m.outputs[0].name].shape == (8, 64)   # the owner's model is untouched


def sram_probe(n: int) -> bytes:
    """Store ``n`` float32s of SRAM (never written by this job) to the output binding."""
    sb = StreamBuilder(CFG)
    sb.dma_store(0, O, "float32", (n,))
    sb.end()
    return sb.build()


def test_sram_and_device_memory_are_zeroed_between_sessions(make_client):
    writer, reader = make_client(), make_client(map_io=False)
    # The writer leaves a pattern in SRAM (its job loads it there) and in device memory it frees.
    a, out = writer.alloc(N * 4), writer.alloc(N * 4)
    a.write(np.full(N, 7.5, np.float32))
    sb = StreamBuilder(CFG)
    sb.dma_load(0, A, "float32", (N,))
    sb.sync("dma", "vector")
    sb.add(tile(0, "float32", (N,)), tile(0, "float32", (N,)), tile(N * 4, "float32", (N,)))
    sb.sync("vector", "dma")
    sb.dma_store(N * 4, O, "float32", (N,))
    sb.end()
    writer.submit(sb.build(), [(a, A, False), (out, O, True)]).wait(10)
    assert np.all(np.frombuffer(out.read(), np.float32) == 15.0)
    a.free()
    out.free()
    # The reader's job reads SRAM it never wrote, and device memory it just allocated.
    probe = reader.alloc(2 * N * 4)
    reader.submit(sram_probe(2 * N), [(probe, O, True)]).wait(10)
    assert probe.read() == bytes(2 * N * 4), "SRAM left over from another session's job"
    fresh, copy = reader.alloc(N * 4), reader.alloc(N * 4)
    sb = StreamBuilder(CFG)
    sb.dma_load(0, A, "float32", (N,))
    sb.sync("dma", "dma")
    sb.dma_store(0, O, "float32", (N,))
    sb.end()
    reader.submit(sb.build(), [(fresh, A, False), (copy, O, True)]).wait(10)
    assert copy.read() == bytes(N * 4) and fresh.read() == bytes(N * 4)
