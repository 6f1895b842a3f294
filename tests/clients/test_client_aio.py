"""The trio client (``npu.connect_async``) against a real daemon: the same API as ``npu.Client``,
awaited, with many tasks sharing one session."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import trio

import npu
from examples import tiny_cnn
from streams import A, B, O, add_stream

N = 256


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "cnn.onnx"
    onnx.save(tiny_cnn.build(), path)
    return path


async def add_job(client, x: float, **options):
    """A submitted add_stream job computing ``x + 1`` and its output buffer."""
    a, b, out = [await client.alloc(N * 4) for _ in range(3)]
    await a.write(np.full(N, x, np.float32))
    await b.write(np.ones(N, np.float32))
    job = await client.submit(add_stream(N), [(a, A, False), (b, B, False), (out, O, True)], **options)
    return job, out


@pytest.mark.parametrize("map_io", [True, False])
async def test_buffers_round_trip_mapped_and_by_message(daemon, map_io):
    async with npu.connect_async(daemon.endpoint, map_io=map_io) as c:
        assert c.attached
        buf = await c.alloc(3 * 65536 + 5)          # more than one inline message when not mapped
        data = np.random.default_rng(0).integers(0, 256, buf.size, np.uint8)
        await buf.write(data)
        assert await buf.read() == data.tobytes()
        into = np.empty(100, np.uint8)
        await buf.read_into(into, offset=70000)
        assert np.array_equal(into, data[70000:70100])
        with pytest.raises(npu.InvalidArgument, match="runs past the end"):
            await buf.write(b"xx", offset=buf.size - 1)
        with pytest.raises(npu.InvalidArgument, match="writable"):
            await buf.read_into(b"read-only")
        await buf.free()
        with pytest.raises(npu.NotFound, match="freed"):
            await buf.read()


async def test_mapped_view_is_the_buffer_itself(daemon):
    async with npu.connect_async(daemon.endpoint) as c:
        buf = await c.alloc(N * 4)
        view = await buf.map(np.float32)
        view[:] = 2.5
        async with npu.connect_async(daemon.endpoint, map_io=False) as other:
            assert other.session != c.session
        assert np.all(np.frombuffer(await buf.read(), np.float32) == 2.5)


async def test_jobs_from_many_tasks_complete_with_their_own_results(daemon):
    async with npu.connect_async(daemon.endpoint) as c:
        results = {}

        async def one(i):
            job, out = await add_job(c, float(i))
            await job.wait()
            assert job.state == "done" and job.stats["cycles"] > 0
            results[i] = np.frombuffer(await out.read(), np.float32)

        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(one, i)
        assert sorted(results) == list(range(16))
        for i, got in results.items():
            assert np.all(got == i + 1.0)


async def test_failed_job_raises_its_error_and_the_session_goes_on(daemon):
    async with npu.connect_async(daemon.endpoint) as c:
        a = await c.alloc(N * 4)
        with pytest.raises(npu.InvalidArgument):       # the stream stores to an unbound address
            await c.submit(add_stream(N), [(a, A, False)])
        job, out = await add_job(c, 1.0)
        await job.wait()
        assert np.all(np.frombuffer(await out.read(), np.float32) == 2.0)


async def test_model_load_run_report_and_unload(daemon, cnn_path):
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with npu.connect(daemon.endpoint) as sync:
        expected = sync.load(cnn_path).run(x)
    async with npu.connect_async(daemon.endpoint) as c:
        model = await c.load(cnn_path)
        assert isinstance(model, npu.AsyncModel) and model.inputs[0].shape == (1, 3, 32, 32)
        again = await c.load(cnn_path)                # by digest this time: same compiled model
        assert again.cached
        outputs = {}

        async def run(i):
            outputs[i] = await model.run(x)   # concurrent runs: each takes its own buffer set

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(run, i)
        for got in outputs.values():
            for name, value in expected.items():
                np.testing.assert_array_equal(got[name], value)
        report = await model.report()
        assert report.rows and "conv" in str(report).lower()
        with pytest.raises(npu.InvalidArgument, match="shape"):
            await model.submit(np.zeros((2, 2), np.float32))
        await model.unload()
        with pytest.raises(npu.NotFound, match="unloaded"):
            await model.run(x)
        assert await c.check(cnn_path) == []


async def test_unloading_while_a_run_is_in_flight_frees_its_buffers(daemon, cnn_path):
    async with npu.connect_async(daemon.endpoint) as c:
        model = await c.load(cnn_path)
        used = sum(d.memory_used for d in await c.devices())
        job = await model.submit(np.zeros((1, 3, 32, 32), np.float32))
        await model.unload()
        await job.wait()                # finishes (the daemon holds what the job uses)
        assert sum(d.memory_used for d in await c.devices()) < used


async def test_contexts_fences_and_cancel(daemon):
    async with npu.connect_async(daemon.endpoint) as c:
        ctx = await c.context("high", weight=3)
        assert (ctx.priority, ctx.weight) == ("high", 3)
        with pytest.raises(npu.InvalidArgument, match="priority"):
            await c.context("urgent")
        first, _out = await add_job(c, 1.0, context=ctx)
        second, out = await add_job(c, 2.0, after=[first])
        token = await second.export_fence()
        with npu.connect(daemon.endpoint) as other:       # a fence crosses sessions and client kinds
            imported = other.import_fence(token)
            imported.wait(10)
        await second.wait()
        assert (await first.wait()).state == "done" and np.all(np.frombuffer(await out.read(), np.float32) == 3.0)
        with npu.connect(daemon.endpoint) as other:
            job = other.submit(add_stream(N), [(b, v, w) for b, v, w in _bound(other)])
            fenced = await c.import_fence(job.export_fence())
            await fenced.wait()
            assert fenced.finished
        late, _ = await add_job(c, 0.0)
        assert await late.cancel() in ("done", "failed", "queued", "running")
        with pytest.raises(npu.NotFound):
            await c.import_fence("not-a-token")


def _bound(client):
    bufs = [client.alloc(N * 4) for _ in range(3)]
    return [(bufs[0], A, False), (bufs[1], B, False), (bufs[2], O, True)]


async def test_wait_async_waits_for_all_or_any_in_one_request(daemon, cnn_path):
    async with npu.connect_async(daemon.endpoint) as c:
        model = await c.load(cnn_path)
        x = np.zeros((1, 3, 32, 32), np.float32)
        runs = [await model.submit(x) for _ in range(3)]
        job, out = await add_job(c, 4.0)
        done = await npu.wait_async([*runs, job], all=True, timeout=30)
        assert done == [*runs, job] and all(j.finished for j in done)
        for r in runs:
            assert (await r.result()).keys() == {t.name for t in model.outputs}
        assert np.all(np.frombuffer(await out.read(), np.float32) == 5.0)
        assert await npu.wait_async(done, all=False) == done          # already finished: no request
        assert await npu.wait_async([]) == []
        with npu.connect(daemon.endpoint) as other:
            with pytest.raises(npu.InvalidArgument, match="one client"):
                await npu.wait_async([job, other.submit(add_stream(N), _bound(other))])
        more = [await model.submit(x) for _ in range(2)]
        first = await npu.wait_async(more, all=False, timeout=30)
        assert first and all(j.finished for j in first)


async def test_lost_session_says_to_open_a_new_one(daemon):
    async with npu.connect_async(daemon.endpoint) as c:
        with npu.connect(daemon.endpoint) as admin:
            admin._request("kill_client", {"session": c.session})
        with pytest.raises(npu.ConnectionLost, match="connect_async"):
            await c.ping()


async def test_errors_leave_the_session_block_unwrapped(daemon):
    with pytest.raises(npu.NotFound):
        async with npu.connect_async(daemon.endpoint) as c:
            await c.import_fence("not-a-token")


async def test_no_answer_to_hello_is_a_plain_npu_error(monkeypatch):
    import zmq

    from npu import protocol
    monkeypatch.setattr(protocol, "HELLO_TIMEOUT_S", 0.5)
    silent = zmq.Context.instance().socket(zmq.ROUTER)   # accepts connections, never answers
    try:
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        with pytest.raises(npu.ConnectionLost, match="no answer to hello"):
            async with npu.connect_async(f"tcp://127.0.0.1:{port}", timeout=0.5):
                pass
    finally:
        silent.close(linger=0)


async def test_a_cancelled_result_keeps_the_buffer_set_until_it_is_read():
    """A read cancelled half-way must not return the run's buffers to the pool (twice, or while
    the next wait still reads them)."""
    class Output:
        name, shape, dtype = "y", (4,), np.dtype(np.float32)

    class Client:
        """The trio transport's driver over a fake daemon whose first read never answers."""
        timeout, attached, map_io, limits = 1.0, False, False, {"max_inline_bytes": 1 << 20}
        reads = 0
        _run = npu.AsyncClient._run

        async def _call(self, call):
            if call.op == "read":
                Client.reads += 1
                if Client.reads == 1:
                    await trio.sleep_forever()
                return {"data": np.full(4, 7, np.float32).tobytes()}
            return {"state": "done", "stats": {}}

    class Model:
        client, outputs, _unloaded = Client(), [Output()], False

        def __init__(self):
            self._idle_sets = []

    model = Model()
    io = ([npu.AsyncBuffer(model.client, 1, 16, 0)], [npu.AsyncBuffer(model.client, 2, 16, 0)])
    job = npu.AsyncModelJob(model, 1, io)
    with trio.move_on_after(0.05):
        await job.result()
    assert not job.finished and model._idle_sets == []
    assert (await job.result())["y"].tolist() == [7.0] * 4
    assert model._idle_sets == [io]
    await job.result()                      # finished: nothing read or returned again
    assert model._idle_sets == [io] and Client.reads == 2


async def test_closed_client_refuses_requests(daemon):
    async with npu.connect_async(daemon.endpoint) as c:
        pass
    with pytest.raises(npu.ConnectionLost, match="closed"):
        await c.ping()
