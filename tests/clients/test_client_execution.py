"""Reusable executions (Model.execution): buffers bound once, inputs filled in place, output views,
rebinding to caller buffers, one run in flight, closed and wrong use refused."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnxruntime as ort
import pytest

import npu
from npu.local import LocalDaemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "compiler_worker"))
from compiler_testmodels import mlp, small_cnn  # noqa: E402

RTOL, ATOL = 1e-3, 1e-4


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = LocalDaemon("--test-mode", "--cache-dir", str(tmp_path_factory.mktemp("cache")))
    yield d
    d.stop()


def random_feeds(model, seed=0):
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in model.inputs}


def reference(data, feeds):
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("build", [mlp, small_cnn], ids=["mlp", "cnn"])
def test_results_equal_model_run_and_onnxruntime(client, build):
    data = build()
    model = client.load(data)
    with model.execution() as ex:
        assert set(ex.inputs) == {t.name for t in model.inputs}
        for seed in range(3):
            feeds = random_feeds(model, seed)
            got = ex.run(feeds)
            want = model.run(feeds)
            ref = reference(data, feeds)
            for t, r in zip(model.outputs, ref):
                np.testing.assert_array_equal(got[t.name], want[t.name])
                np.testing.assert_allclose(got[t.name], r, rtol=RTOL, atol=ATOL)


def test_inputs_filled_in_place_and_outputs_are_views(client):
    data = mlp()
    model = client.load(data)
    name, out = model.inputs[0].name, model.outputs[0].name
    with model.execution() as ex:
        a, b = random_feeds(model, 1)[name], random_feeds(model, 2)[name]
        view = ex.inputs[name]
        view[...] = a                       # in place: the mapped buffer itself
        first = ex.run()[out]
        assert first is ex.outputs[out]     # the view, not a copy
        np.testing.assert_allclose(first, reference(data, {name: a})[0], rtol=RTOL, atol=ATOL)
        kept = first.copy()
        ex.inputs[name][...] = b
        second = ex.run()[out]
        assert second is first              # same memory: the next run overwrote it
        np.testing.assert_allclose(first, reference(data, {name: b})[0], rtol=RTOL, atol=ATOL)
        assert not np.allclose(kept, first)
        job = ex.submit({name: a})          # feeds copy into the bound input
        np.testing.assert_array_equal(job.result(10)[out], kept)
        np.testing.assert_array_equal(ex.inputs[name], a)


def test_rebind_to_caller_buffers(client):
    data = mlp()
    model = client.load(data)
    tin, tout = model.inputs[0], model.outputs[0]
    x = random_feeds(model, 3)[tin.name]
    bin_, bout = client.alloc(tin.size), client.alloc(tout.size)
    with model.execution() as ex:
        ex.rebind(tin.name, bin_)
        ex.rebind(tout.name, bout)
        bin_.write(x)                       # the caller writes its own buffer
        ex.run()
        got = np.frombuffer(bout.read(tout.size), tout.dtype).reshape(tout.shape)
        np.testing.assert_allclose(got, reference(data, {tin.name: x})[0], rtol=RTOL, atol=ATOL)
        np.testing.assert_array_equal(ex.outputs[tout.name], got)    # the views follow the rebind
    assert bout.read(4) is not None         # closing did not free the caller's buffers
    bin_.free()
    bout.free()


def test_wrong_rebind_is_refused(client, make_client):
    model = client.load(mlp())
    tin, tout = model.inputs[0], model.outputs[0]
    other = make_client()
    with model.execution() as ex:
        small = client.alloc(max(tin.size // 2, 1))
        with pytest.raises(npu.InvalidArgument, match="needs"):
            ex.rebind(tin.name, small)
        with pytest.raises(npu.InvalidArgument, match="no input or output"):
            ex.rebind("nope", client.alloc(tin.size))
        with pytest.raises(npu.InvalidArgument, match="another client"):
            ex.rebind(tin.name, other.alloc(tin.size))
        with pytest.raises(npu.InvalidArgument, match="npu.Buffer"):
            ex.rebind(tin.name, np.zeros(tin.shape, tin.dtype))
        gone = client.alloc(tout.size)
        gone.free()
        with pytest.raises(npu.NotFound, match="freed"):
            ex.rebind(tout.name, gone)
        ex.run(random_feeds(model))         # still usable


def test_second_submit_in_flight_is_busy(client):
    model = client.load(mlp())
    client.inject_fault("slow", slow_ms=300)
    with model.execution() as ex:
        first = ex.submit(random_feeds(model))
        with pytest.raises(npu.Busy, match="in flight"):
            ex.submit()
        with pytest.raises(npu.Busy):
            ex.rebind(model.inputs[0].name, client.alloc(model.inputs[0].size))
        first.wait(10)
        ex.run()                            # free again once it finished


def test_closed_execution_is_refused(client):
    model = client.load(mlp())
    ex = model.execution()
    before = next(d for d in client.devices() if d.index == 0).memory_used
    ex.run(random_feeds(model))
    ex.close()
    ex.close()                              # idempotent
    assert next(d for d in client.devices() if d.index == 0).memory_used < before
    with pytest.raises(npu.NotFound, match="closed"):
        ex.run()
    with pytest.raises(npu.NotFound, match="closed"):
        ex.rebind(model.inputs[0].name, client.alloc(model.inputs[0].size))
    model.unload()
    with pytest.raises(npu.NotFound, match="unloaded"):
        model.execution()


def test_execution_with_context_and_without_mapping(daemon, monkeypatch):
    # A client that cannot map (as a remote one): plain arrays, copied around each run; same results.
    data = mlp()
    with npu.connect(daemon.endpoint) as c:
        monkeypatch.setattr(npu.Client, "attached", property(lambda self: False))
        model = c.load(data)
        ctx = c.context("high")
        with model.execution(ctx) as ex:
            name, out = model.inputs[0].name, model.outputs[0].name
            for seed in (5, 6):
                feeds = random_feeds(model, seed)
                ex.inputs[name][...] = feeds[name]
                got = ex.run()[out]
                assert got is ex.outputs[out]
                np.testing.assert_allclose(got, reference(data, feeds)[0], rtol=RTOL, atol=ATOL)
