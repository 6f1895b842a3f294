"""Models in the daemon: compile errors, supervised compiler workers (killed, timed out, over their
memory limit), the compile cache (hits, misses, corruption, unwritable, restarts), run_model's
refusals and session teardown.  Real processes throughout."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import npu
from npu.local import LocalDaemon

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS / "compiler_worker"))
from compiler_testmodels import Builder, mlp, resnet, small_cnn  # noqa: E402

RTOL, ATOL = 1e-3, 1e-4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def daemon(cache_dir):
    """Two devices of different targets, and a compile cache of its own."""
    d = LocalDaemon("--device", "edge", "--device", "server", "--cache-dir", str(cache_dir))
    yield d
    d.stop()


# --- helpers ---------------------------------------------------------------------------


def reference(model: bytes, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def check_runs(model: npu.Model, data: bytes, seed: int = 0) -> None:
    """The model's output matches onnxruntime's: float sums may differ in order (docs/ISA.md), so
    the absolute tolerance scales with the output's magnitude (a ResNet's logits reach ~1000)."""
    x = np.random.default_rng(seed).standard_normal(model.inputs[0].shape).astype(np.float32)
    want = reference(data, x)
    np.testing.assert_allclose(model.run(x)[model.outputs[0].name], want,
                               rtol=RTOL, atol=ATOL * max(1.0, float(np.abs(want).max()) / 100))


def children(pid: int, module: str) -> list[int]:
    """Pids of ``pid``'s children running ``python -m module``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and module.encode() in cmdline:
            found.append(int(entry))
    return sorted(found)


def workers(d: LocalDaemon) -> list[int]:
    return children(d.process.pid, "npud.compiler_worker.worker")


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1
    return int(fields[11]) + int(fields[12])  # utime + stime


def memory_used(c, device: int = 0) -> int:
    return next(d for d in c.devices() if d.index == device).memory_used


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "npud.toml"
    path.write_text(text)
    return str(path)


def graph_model(nodes, inputs, outputs, inits=(), opset=13) -> bytes:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()


def vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def chain(n: int) -> bytes:
    """A long chain of small element-wise nodes: slow to compile, light on memory."""
    b = Builder(seed=0)
    x = b.input("x", [1, 64])
    for _ in range(n):
        x = b.op("Tanh", [b.op("Add", [x, b.const((64,))])])
    return b.model([x])


# --- compile errors ----------------------------------------------------------------------


def test_compile_errors_are_clear_and_harmless(daemon, client):
    good = mlp()
    client.load(good).unload()  # the workers are up
    before = workers(daemon)
    assert before

    unsupported = graph_model(
        [helper.make_node("Relu", ["x"], ["r"], name="first"),
         helper.make_node("Hardmax", ["r"], ["y"], name="the_culprit")],
        [vi("x", [2, 8])], [vi("y", None)])
    with pytest.raises(npu.InvalidArgument) as err:
        client.load(unsupported)
    assert "the_culprit" in err.value.message and "Hardmax" in err.value.message
    assert err.value.code == "EINVAL" and not err.value.retryable

    with pytest.raises(npu.InvalidArgument, match="compile error|cannot compile"):
        client.load(b"\x08\x07 certainly not a protobuf \xff\xff\xff")
    with pytest.raises(npu.InvalidArgument):
        client.load(b"")

    cyclic = graph_model(
        [helper.make_node("Add", ["x", "b"], ["a"], name="loop_add"),
         helper.make_node("Relu", ["a"], ["b"], name="loop_relu"),
         helper.make_node("Relu", ["b"], ["y"], name="out")],
        [vi("x", [4])], [vi("y", None)])
    with pytest.raises(npu.InvalidArgument, match="cycl"):
        client.load(cyclic)

    huge_input = graph_model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                             [vi("x", [1 << 16, 1 << 16])], [vi("y", None)])
    with pytest.raises(npu.InvalidArgument, match="absurd"):
        client.load(huge_input)

    def blowup(n):  # a constant that folding would make n floats big
        shape = numpy_helper.from_array(np.array([n], np.int64), "shape")
        value = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
        return graph_model([helper.make_node("ConstantOfShape", ["shape"], ["c"], value=value),
                            helper.make_node("Add", ["x", "c"], ["y"], name="add_big")],
                           [vi("x", [1])], [vi("y", None)], [shape])
    for n in (1 << 31, 1 << 40):
        with pytest.raises(npu.InvalidArgument, match="ConstantOfShape"):
            client.load(blowup(n))

    assert set(before) <= set(workers(daemon))  # refusals are answers, not crashes
    model = client.load(good)
    check_runs(model, good)


# --- supervised workers -----------------------------------------------------------------


def start_all_workers(d: LocalDaemon, n: int = 2, seed: int = 300) -> list[int]:
    """Workers start on first use, and a compile goes to a started idle worker first: keep n
    compiles (of models not compiled yet) in flight until n workers run."""
    def load(seed):
        with npu.connect(d.endpoint) as c:
            c.load(chain(seed))
    deadline = time.monotonic() + 20
    seeds = itertools.count(seed)
    while len(workers(d)) < n and time.monotonic() < deadline:
        threads = [threading.Thread(target=load, args=(next(seeds),)) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(workers(d)) == n
    return workers(d)


def test_worker_killed_mid_compile_fails_that_compile_only(daemon, client):
    pids = start_all_workers(daemon)
    ticks = {pid: cpu_ticks(pid) for pid in pids}
    big = resnet(width=48)  # ~0.5 s of compiling
    outcome = {}

    def load():
        try:
            with npu.connect(daemon.endpoint) as c:
                outcome["model"] = c.load(big)
        except npu.NpuError as exc:
            outcome["error"] = exc
    t = threading.Thread(target=load)
    t.start()
    victim = None
    deadline = time.monotonic() + 20
    while victim is None and time.monotonic() < deadline and t.is_alive():
        time.sleep(0.01)
        busy = [pid for pid in pids if cpu_ticks(pid) - ticks[pid] >= 10]  # 0.1 s of CPU into the compile
        victim = busy[0] if busy else None
    assert victim is not None, "no worker picked up the compile"
    os.kill(victim, signal.SIGKILL)
    t.join(30)
    assert "error" in outcome, "the compile survived its worker's death"
    err = outcome["error"]
    assert isinstance(err, npu.DeviceFault) and err.code == "EIO" and err.retryable
    assert "killed by signal 9" in err.message

    # the next compiles work; the worker that was killed is replaced when two compiles need both
    # (a compile goes to a started idle worker before another starts)
    data = small_cnn(seed=5)
    check_runs(client.load(data), data)
    client.load(mlp(seed=12)).unload()
    assert victim not in workers(daemon)
    assert len(start_all_workers(daemon, seed=400)) == len(pids)


def limited_daemon(tmp_path_factory, settings: str):
    tmp = tmp_path_factory.mktemp("limited")
    config = write_config(tmp, "compile_workers = 1\n" + settings)
    return LocalDaemon("--config", config, "--cache-dir", str(tmp / "cache"))


@pytest.fixture
def slow_limit(tmp_path_factory):
    d = limited_daemon(tmp_path_factory, "compile_timeout_s = 0.5\n")
    yield d
    d.stop()


@pytest.fixture
def memory_limit(tmp_path_factory):
    d = limited_daemon(tmp_path_factory, 'compile_memory_bytes = "300MiB"\ncompile_memory_scale = 0\n')
    yield d
    d.stop()


def test_compile_over_the_time_limit_times_out_and_the_worker_is_replaced(slow_limit):
    limited = slow_limit
    with npu.connect(limited.endpoint) as c:
        c.load(mlp()).unload()
        first = workers(limited)
        started = time.monotonic()
        with pytest.raises(npu.Timeout) as err:
            c.load(chain(8000))  # ~2 s of compiling
        assert time.monotonic() - started < 5
        assert err.value.code == "ETIMEDOUT" and "0.5 s limit" in err.value.message
        data = mlp(seed=1)
        check_runs(c.load(data), data)
        assert workers(limited) and workers(limited) != first


def test_compile_over_the_memory_limit_fails_clearly(memory_limit):
    # Where the limit bites varies from run to run: in the worker's Python (ENOMEM), or in
    # ZeroMQ's I/O thread receiving the model, which drops the connection (the worker exits: EIO;
    # tests/compiler_worker/test_compiler_worker_connection.py).  Either way the answer comes
    # well inside the client's timeout; the daemon's own limit (120 s) would be a regression.
    with npu.connect(memory_limit.endpoint, timeout=150) as c:
        with pytest.raises(npu.NpuError) as err:
            c.load(resnet())  # 100 MB of weights: several copies do not fit in 300 MiB
        assert err.value.code in ("EIO", "ENOMEM")
        assert "memory" in err.value.message
        if err.value.code == "EIO":  # the worker died of it, rather than catching MemoryError
            assert "300 MiB" in err.value.message and "compile_memory_bytes" in err.value.message
        data = mlp(seed=2)
        check_runs(c.load(data), data)


# --- the compile cache ------------------------------------------------------------------


def cache_entries(c) -> list[dict]:
    return c._request("cache_list", {})["entries"]


def test_cache_hits_and_misses(daemon, client, make_client, cache_dir):
    data = small_cnn(seed=21)
    cold = client.load(data)
    assert not cold.cached
    warm = client.load(data)
    assert warm.cached and warm.compile_ms < 1000
    check_runs(warm, data)
    # shared by sessions
    assert make_client().load(data).cached
    # the same options hit, different options or another target miss
    assert not client.load(data, name="other").cached
    assert client.load(data, name="other").cached
    on_server = client.load(data, device=1)
    assert not on_server.cached
    check_runs(on_server, data)
    assert client.load(data, device=1).cached
    listing = client._request("cache_list", {})
    assert listing["directory"] == str(cache_dir)
    keys = {e["key"] for e in listing["entries"]}
    assert len(keys) >= 3
    for e in listing["entries"]:
        assert (cache_dir / f"{e['key']}.npux").stat().st_size == e["size"] > 0
        assert e["age_s"] >= 0


def stored(path: Path, unlike: bytes | None = None, timeout: float = 60.0) -> bytes:
    """The cache entry at ``path`` once the daemon has written it (and, with ``unlike``, replaced
    those bytes).  The daemon stores entries after it replies to the load, so a test that reads
    the file at once can find it missing or old."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = path.read_bytes()
            if data and data != unlike:
                return data
        except FileNotFoundError:
            pass
        assert time.monotonic() < deadline, f"{path} was not (re)written within {timeout} s"
        time.sleep(0.02)


def test_corrupt_cache_entry_is_discarded_and_recompiled(client, cache_dir):
    client._request("cache_clear", {})
    data = mlp(seed=22)
    assert not client.load(data).cached
    (entry,) = cache_entries(client)
    path = cache_dir / f"{entry['key']}.npux"
    raw = bytearray(stored(path))
    raw[len(raw) // 2] ^= 0x40  # one flipped bit in the middle of the command stream or weights
    path.write_bytes(bytes(raw))
    model = client.load(data)
    assert not model.cached  # discarded, compiled again, never run
    check_runs(model, data)
    stored(path, unlike=bytes(raw))  # replaced by a good entry
    assert client.load(data).cached
    path.write_bytes(b"NPUX")  # truncated
    assert not client.load(data).cached
    assert client.load(data).cached


def test_cache_clear(client):
    data = mlp(seed=23)
    client.load(data)
    n = len(cache_entries(client))
    assert n >= 1
    assert client._request("cache_clear", {})["removed"] == n
    assert cache_entries(client) == []
    assert not client.load(data).cached
    assert len(cache_entries(client)) == 1


def test_unwritable_cache_only_costs_caching(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    d = LocalDaemon("--cache-dir", str(blocker / "cache"))  # cannot be created, even by root
    try:
        with npu.connect(d.endpoint) as c:
            data = mlp(seed=24)
            for _ in range(2):
                model = c.load(data)
                assert not model.cached
                check_runs(model, data)
            assert cache_entries(c) == []
            assert c._request("cache_clear", {})["removed"] == 0
    finally:
        d.stop()


def test_cache_survives_a_restart(tmp_path):
    data = small_cnn(seed=25)
    for expect_cached in (False, True):
        d = LocalDaemon("--cache-dir", str(tmp_path))
        try:
            with npu.connect(d.endpoint) as c:
                model = c.load(data)
                assert model.cached is expect_cached
                check_runs(model, data)
        finally:
            assert d.stop() == 0


# --- run_model refusals and teardown ----------------------------------------------------


def test_run_model_through_raw_requests(client):
    data = mlp(seed=31)
    model = client.load(data)
    x = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    inp = client.alloc(model.inputs[0].size)
    out = client.alloc(model.outputs[0].size)
    inp.write(x)
    job = client._request("run_model", {"model": model.id, "inputs": [inp.handle], "outputs": [out.handle]})
    result = client._request("wait", {"job": job["job"], "timeout_ms": 10000})
    assert result["state"] == "done" and result["stats"]["macs"] > 0
    got = np.frombuffer(out.read(), np.float32).reshape(model.outputs[0].shape)
    np.testing.assert_allclose(got, reference(data, x), rtol=RTOL, atol=ATOL)


def test_run_model_refuses_wrong_buffers(client, make_client):
    model = client.load(mlp(seed=32))
    n_in, n_out = model.inputs[0].size, model.outputs[0].size
    inp, out = client.alloc(n_in), client.alloc(n_out)
    small = client.alloc(n_in - 4)
    big = client.alloc(n_in + (1 << 20))
    elsewhere = client.alloc(n_in, device=1)
    other = make_client()
    foreign = other.alloc(n_in)

    def run(inputs, outputs, model_id=model.id):
        return client._request("run_model", {"model": model_id, "inputs": inputs, "outputs": outputs})
    with pytest.raises(npu.InvalidArgument, match="1 inputs, got 0"):
        run([], [out.handle])
    with pytest.raises(npu.InvalidArgument, match="1 inputs, got 2"):
        run([inp.handle, inp.handle], [out.handle])
    with pytest.raises(npu.InvalidArgument, match="1 outputs, got 0"):
        run([inp.handle], [])
    for wrong in (small, big, elsewhere):
        with pytest.raises(npu.InvalidArgument, match=f"needs a buffer of {n_in} bytes"):
            run([wrong.handle], [out.handle])
    with pytest.raises(npu.NotFound, match="no buffer"):
        run([foreign.handle if foreign.handle not in (inp.handle, out.handle) else 999_999], [out.handle])
    with pytest.raises(npu.NotFound, match="no buffer"):
        run([inp.handle], [model.id])  # a model's name is not a buffer's
    with pytest.raises(npu.NotFound, match="no loaded model"):
        run([inp.handle], [out.handle], model_id=inp.handle)
    with pytest.raises(npu.NotFound, match="no loaded model"):
        other._request("run_model", {"model": model.id, "inputs": [foreign.handle], "outputs": [foreign.handle]})
    # nothing leaked: the right buffers still work
    run([inp.handle], [out.handle])


CHILD = """
import sys, time
sys.path.insert(0, {models!r})
import npu
from compiler_testmodels import small_cnn
c = npu.connect({endpoint!r})
m = c.load(small_cnn(seed=41))
m.submit(__import__("numpy").zeros(m.inputs[0].shape, "float32"))
print("loaded", flush=True)
time.sleep(60)
"""


def test_killed_client_frees_its_models(daemon, client):
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(models=str(TESTS / "compiler_worker"),
                                                                  endpoint=daemon.endpoint)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "loaded"
        (session,) = [s for s in client.clients() if s["pid"] == child.pid]
        assert session["memory"] > 0
        peak = memory_used(client)
        child.send_signal(signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 10
        while memory_used(client) > peak - session["memory"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert memory_used(client) <= peak - session["memory"]
        assert all(s["pid"] != child.pid for s in client.clients())
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def test_session_closing_while_its_model_job_starts(daemon, client):
    """A job already picked up by the device runner keeps its program although the session goes."""
    data = small_cnn(seed=42)
    for i in range(12):
        c = npu.connect(daemon.endpoint)
        model = c.load(data)
        for _ in range(1 + i % 3):
            model.submit(np.zeros(model.inputs[0].shape, np.float32))
        c.close()
    check_runs(client.load(data), data)  # the daemon is still there


def test_loads_of_one_executable_share_their_weights(make_client):
    a, b = make_client(), make_client()
    data = small_cnn(seed=43)
    base = memory_used(a)
    first = a.load(data)
    one = memory_used(a) - base
    second = b.load(data)
    assert second.cached
    two = memory_used(a) - base
    assert two - one == one - first.weights_bytes  # the second load added its arena only
    first.unload()  # the weights stay while the other load uses them
    check_runs(second, data)
    assert b.clients() and [s["memory"] for s in b.clients() if s["session"] == b.session][0] >= \
        second.weights_bytes + second.arena_bytes  # each session is charged in full
    second.unload()
    assert memory_used(a) == base


def test_identical_loads_at_once_compile_once(daemon):
    data = chain(600)  # ~0.2 s of compiling: the loads overlap
    results, errors = [], []

    def load():
        try:
            with npu.connect(daemon.endpoint) as c:
                m = c.load(data)
                results.append(m.cached)
                x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
                np.testing.assert_allclose(m.run(x)[m.outputs[0].name], reference(data, x), rtol=RTOL, atol=ATOL)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == [False, True, True]  # one compile; the others waited for its entry
