"""The load soak (issue 9): many clients mixing compiles, jobs and buffer traffic for minutes.

Run: ``python -m bench soak [--seconds 300] [--clients 64] [--procs 8]`` (or ``make soak``).
Not part of the plain ``python -m bench`` run: it takes minutes.

A private daemon (``LocalDaemon``: ipc in a fresh temporary directory, one
"edge" device with two device processes, two compiler workers, a private
compile cache) and ``--clients`` sessions, spread over ``--procs`` load
generator processes of a few threads each: one process of 64 threads would be
held back by its own GIL before the daemon is, and the figures would measure
the generator.  Each session loops over a weighted mix (``MIX``):

- ``run``: its resident model (a tiny MLP of its own) on a fresh input;
- ``pipeline``: four runs submitted at once, waited for with one ``wait_jobs``;
- ``job``: a hand-built command stream ``dst += src`` on two fresh buffers
  (alloc, write, submit, wait, read, free);
- ``chain``: two such jobs, the second ``after`` the first and reading its
  output: wrong unless the fence ordered them;
- ``buffers``: alloc a buffer, check it reads as zeros, write, read back, free
  (half the sessions through mappings, half through write/read messages);
- ``compile``: a new model (fresh weights, random width) -- a real compile in
  a worker -- written to a file, loaded, run once, unloaded;
- ``load_cached``: one of a few models shared by all sessions, sent as bytes:
  a compile-cache hit;
- ``load_digest``: one of the session's earlier model files again: the client
  sends the digest only.

Every input is unique and every output is known (numpy computes it), so each
completion is checked.  ``soak_ledger`` counts lost, duplicated and wrong
completions, errors by code and latencies; ``soak_proc`` samples the daemon's
memory from /proc.  The exit status is nonzero if any completion was lost,
duplicated or wrong, a reply was duplicated or unasked for, or an error other
than EAGAIN (admission control, retried) occurred.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from bench.soak_ledger import Tally, TappedClient
from bench.soak_proc import Sampler, loadavg

MIX = {"run": 30, "pipeline": 8, "job": 20, "chain": 8, "buffers": 16, "compile": 4, "load_cached": 7,
       "load_digest": 7}
SHARED_MODELS = 4          # models every session loads as bytes (compile-cache hits)
KEPT_FILES = 4             # a session's most recent model files, for load_digest
VA_SRC, VA_DST = 0x10000, 0x40000
JOB_SIZES = (256, 1024, 4096)   # float32 elements of a hand-built job's buffers
DAEMON_CONFIG = """\
compile_workers = 2
[limits]
max_sessions = 1024
[scheduling]
device_processes = 2
"""


# --- the workload's models and streams ---------------------------------------------------

def tiny_mlp(seed: int, hidden: int) -> tuple[bytes, tuple[np.ndarray, ...]]:
    """An ONNX model ``y = relu(x @ w1 + b1) @ w2`` (x: 4x16 -> y: 4x8) with weights from ``seed``,
    and those weights (for ``mlp_reference``)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, hidden)) * 0.25).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((hidden, 8)) * 0.25).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, f"soak{seed}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
                              [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString(), (w1, b1, w2)


def mlp_reference(weights: tuple[np.ndarray, ...], x: np.ndarray) -> np.ndarray:
    w1, b1, w2 = weights
    return np.maximum(x @ w1 + b1, 0) @ w2


def outputs_match(got: np.ndarray, want: np.ndarray) -> bool:
    """Whether a model's output is the reference's, up to float32 summation order.  Another
    job's output (a different input) is off by far more than the tolerance."""
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=1e-4, atol=1e-5))


def accumulate_stream(n: int, preset: str) -> bytes:
    """A command stream: ``dst[:n] += src[:n]`` (float32), src bound at VA_SRC, dst at VA_DST.

    Running it twice would add ``src`` twice, so a job executed more than once is a wrong result.
    """
    from emulator.assembler import StreamBuilder, tile
    from emulator.config import make_config

    sb = StreamBuilder(make_config(preset))
    sb.dma_load(0, VA_SRC, "float32", (n,))
    sb.dma_load(n * 4, VA_DST, "float32", (n,))
    sb.sync("dma", "vector")
    sb.add(tile(0, "float32", (n,)), tile(n * 4, "float32", (n,)), tile(2 * n * 4, "float32", (n,)))
    sb.sync("vector", "dma")
    sb.dma_store(2 * n * 4, VA_DST, "float32", (n,))
    sb.end()
    return sb.build()


# --- one client session ------------------------------------------------------------------

@dataclass
class SessionPlan:
    client_id: int
    endpoint: str
    workdir: str
    preset: str
    map_io: bool
    wait_timeout: float
    seed: int = 0
    mix: dict[str, int] = field(default_factory=lambda: dict(MIX))


class Session:
    """One client's loop: the ops of ``MIX``, each checked and timed into ``self.tally``."""

    def __init__(self, plan: SessionPlan, shared: list[tuple[bytes, tuple]]):
        self.plan = plan
        self.shared = shared
        self.rng = random.Random(plan.seed * 100_003 + plan.client_id)
        self.nprng = np.random.default_rng([plan.seed, plan.client_id])
        self.tally = Tally()
        self.client = TappedClient(plan.endpoint, name=f"soak{plan.client_id}", map_io=plan.map_io,
                                   timeout=min(30.0, plan.wait_timeout))
        self.streams = {n: accumulate_stream(n, plan.preset) for n in JOB_SIZES}
        self.models = 0
        self.files: list[tuple[str, tuple]] = []
        self.pending: list[tuple[str, object, object]] = []   # (kind, job, check) whose wait timed out
        data, self.weights = tiny_mlp(self._new_seed(), self.rng.choice((8, 16, 24, 32)))
        self.model = self.client.load(data)
        self.ops_done = 0

    def _new_seed(self) -> int:
        self.models += 1
        return (self.plan.seed * 1_000_003 + self.plan.client_id) * 1_000_003 + self.models

    def step(self) -> None:
        """One operation of the mix, chosen at random; its failures are counted, not raised."""
        from npu import NpuError

        kind = self.rng.choices(list(self.plan.mix), weights=list(self.plan.mix.values()))[0]
        self.tally.ops[kind] += 1
        t0 = time.perf_counter()
        try:
            getattr(self, f"op_{kind}")()
        except NpuError as exc:
            self.tally.error(kind, exc)
        else:
            self.tally.ops_ok[kind] += 1
            self.tally.took(kind, time.perf_counter() - t0)
        self.ops_done += 1

    # The ops.  Each job is waited for by exactly one request (the ledger's rule).

    def _retrying(self, submit):
        """``submit()``, retried while admission control answers EAGAIN."""
        from npu import Busy

        while True:
            try:
                return submit()
            except Busy as exc:
                if exc.code != "EAGAIN":
                    raise
                self.tally.retried += 1
                time.sleep(min(exc.retry_after or 0.005, 0.1))

    def _settle(self, kind: str, job, check) -> None:
        """Wait for one submitted job and check its outcome; a timeout leaves it pending."""
        from npu import NpuError, Timeout

        try:
            job.wait(self.plan.wait_timeout)
        except Timeout as exc:
            if job.finished:    # the job itself failed with ETIMEDOUT: the device gave up on it
                self.tally.failed[kind] += 1
                self.tally.error(kind, exc)
                return
            self.pending.append((kind, job, check))
            raise
        except NpuError as exc:
            self.tally.failed[kind] += 1
            self.tally.error(kind, exc)
            return
        if not job.finished:    # no error, yet not finished: the library broke its promise
            self.pending.append((kind, job, check))
            raise Timeout("ETIMEDOUT", f"wait for job {job.id} returned before it finished")
        check()

    def _run_check(self, kind: str, job, x: np.ndarray, weights) -> None:
        got = job.result()["y"]
        want = mlp_reference(weights, x)
        self.tally.check(kind, outputs_match(got, want),
                         f"max |got - want| = {float(np.max(np.abs(got - want))):.3g}")

    def _input(self) -> np.ndarray:
        return self.nprng.standard_normal((4, 16)).astype(np.float32)

    def _run_model(self, kind: str, model, weights) -> None:
        x = self._input()
        self.tally.jobs[kind] += 1
        job = self._retrying(lambda: model.submit(x))
        self._settle(kind, job, lambda: self._run_check(kind, job, x, weights))

    def op_run(self) -> None:
        self._run_model("run", self.model, self.weights)

    def op_pipeline(self) -> None:
        import npu

        runs = []
        for _ in range(4):
            x = self._input()
            self.tally.jobs["pipeline"] += 1
            runs.append((self._retrying(lambda x=x: self.model.submit(x)), x))
        try:
            npu.wait([job for job, _ in runs], timeout=self.plan.wait_timeout)
        except npu.Timeout:
            pass            # each unfinished run is settled (and left pending) below
        for job, x in runs:
            self._settle("pipeline", job, lambda job=job, x=x: self._run_check("pipeline", job, x, self.weights))

    def _buffers_for_job(self, n: int) -> tuple[object, object, np.ndarray, np.ndarray]:
        src, dst = self.client.alloc(n * 4), self.client.alloc(n * 4)
        a = self.nprng.standard_normal(n).astype(np.float32)
        b = self.nprng.standard_normal(n).astype(np.float32)
        src.write(a)
        dst.write(b)
        return src, dst, a, b

    def _read_f32(self, buf, n: int) -> np.ndarray:
        return np.frombuffer(buf.read(n * 4), dtype=np.float32)

    def op_job(self) -> None:
        n = self.rng.choice(JOB_SIZES)
        src, dst, a, b = self._buffers_for_job(n)
        try:
            self.tally.jobs["job"] += 1
            job = self._retrying(lambda: self.client.submit(self.streams[n], [(src, VA_SRC, False),
                                                                              (dst, VA_DST, True)]))

            def check():
                got = self._read_f32(dst, n)
                self.tally.check("job", np.array_equal(got, a + b),
                                 f"{int(np.sum(got != a + b))} of {n} floats differ")
            self._settle("job", job, check)
        finally:
            src.free()
            dst.free()

    def op_chain(self) -> None:
        import npu

        n = self.rng.choice(JOB_SIZES)
        src, mid, a, b = self._buffers_for_job(n)
        last = self.client.alloc(n * 4)
        c = self.nprng.standard_normal(n).astype(np.float32)
        try:
            last.write(c)
            self.tally.jobs["chain"] += 2
            first = self._retrying(lambda: self.client.submit(self.streams[n], [(src, VA_SRC, False),
                                                                                (mid, VA_DST, True)]))
            second = self._retrying(lambda: self.client.submit(self.streams[n], [(mid, VA_SRC, False),
                                                                                 (last, VA_DST, True)],
                                                               after=[first]))
            try:
                npu.wait([first, second], timeout=self.plan.wait_timeout)
            except npu.Timeout:
                pass

            def check_first():
                got = self._read_f32(mid, n)
                self.tally.check("chain", np.array_equal(got, a + b), "first job's sum differs")

            def check_second():
                got = self._read_f32(last, n)
                self.tally.check("chain", np.array_equal(got, c + (a + b)),
                                 "second job did not see the first one's output (fence broken?)")
            self._settle("chain", first, check_first)
            self._settle("chain", second, check_second)
        finally:
            for buf in (src, mid, last):
                buf.free()

    def op_buffers(self) -> None:
        size = self.rng.randrange(1, 256 << 10)
        buf = self.client.alloc(size)
        try:
            fresh = buf.read()
            self.tally.check("buffers", not any(fresh), "a fresh buffer was not zero-filled")
            data = self.nprng.bytes(size)
            buf.write(data)
            self.tally.check("buffers", buf.read() == data, "read back differs from what was written")
        finally:
            buf.free()

    def _load_run_unload(self, kind: str, model_source, weights) -> None:
        t0 = time.perf_counter()
        model = self.client.load(model_source)
        self.tally.took(f"{kind}: load", time.perf_counter() - t0)
        try:
            self._run_model(kind, model, weights)
        finally:
            model.unload()

    def op_compile(self) -> None:
        data, weights = tiny_mlp(self._new_seed(), self.rng.choice((8, 16, 24, 32)))
        path = os.path.join(self.plan.workdir, f"c{self.plan.client_id}-{self.models}.onnx")
        with open(path, "wb") as f:
            f.write(data)
        self.files.append((path, weights))
        if len(self.files) > KEPT_FILES:
            os.unlink(self.files.pop(0)[0])
        self._load_run_unload("compile", path, weights)

    def op_load_cached(self) -> None:
        data, weights = self.rng.choice(self.shared)
        self._load_run_unload("load_cached", data, weights)

    def op_load_digest(self) -> None:
        if not self.files:
            return self.op_compile()
        path, weights = self.rng.choice(self.files)
        self._load_run_unload("load_digest", path, weights)

    def finish(self) -> None:
        """Give jobs whose wait timed out one last look (late, or lost), then end the session."""
        from npu import NpuError

        for kind, job, check in self.pending:
            try:
                job.wait(10.0)
            except NpuError:
                if not job.finished:
                    self.tally.lost[kind] += 1
                    self.tally.samples.setdefault(f"lost {kind}", f"job {job.id} unfinished")
                    continue
            self.tally.late[kind] += 1
        self.tally.replies.update(self.client.ledger.counts)
        self.tally.per_client_ops.append(self.ops_done)
        self.client.close()


# --- a load generator process ------------------------------------------------------------

def _generator(index: int, plans: list[SessionPlan], ready, go, stop_at, progress, results) -> None:
    """Run ``plans`` as threads; report ("ready", index) once all are connected, then the merged
    Tally and this process's CPU seconds while the clock ran."""
    shared = [tiny_mlp(10_000 + i, 16) for i in range(SHARED_MODELS)]
    tallies: list[Tally] = []
    sessions: list[Session | None] = [None] * len(plans)
    barrier = threading.Barrier(len(plans) + 1)
    lock = threading.Lock()

    def client_thread(k: int) -> None:
        session = None
        try:
            session = sessions[k] = Session(plans[k], shared)
        except BaseException as exc:   # reported with the tally: a client that cannot start is a finding
            failed = Tally()
            failed.error("connect", exc)
            with lock:
                tallies.append(failed)
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        go.wait()
        if session is None:
            return
        slot = plans[k].client_id
        deadline = stop_at.value
        while time.monotonic() < deadline:
            try:
                session.step()
            except Exception as exc:   # a bug in the workload or the library: count, keep going
                session.tally.error("step", exc)
            progress[slot] = session.ops_done
        try:
            session.finish()
        except Exception as exc:
            session.tally.error("finish", exc)
        with lock:
            tallies.append(session.tally)

    threads = [threading.Thread(target=client_thread, args=(k,), daemon=True) for k in range(len(plans))]
    for t in threads:
        t.start()
    barrier.wait()
    ready.put(("ready", index))
    go.wait()
    cpu0 = _own_cpu()
    while time.monotonic() < stop_at.value:
        time.sleep(0.05)
    cpu = _own_cpu() - cpu0
    for t in threads:
        t.join()
    total = Tally()
    for tally in tallies:
        total.merge(tally)
    results.put(("done", index, total, cpu))


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- the soak ----------------------------------------------------------------------------

@dataclass
class SoakResult:
    clients: int
    procs: int
    seconds: float
    tally: Tally
    samples: list
    warmup_s: float
    cpu: dict[str, float] = field(default_factory=dict)   # CPU seconds during the run, by process kind
    load_before: tuple = ()
    load_after: tuple = ()
    cache_entries: int = 0
    cache_bytes: int = 0
    daemon_died: str = ""      # how and when the daemon ended before the soak did, if it did

    def problems(self) -> list[str]:
        """``Tally.problems()``, plus the daemon's death: empty when the soak passed."""
        return ([self.daemon_died] if self.daemon_died else []) + self.tally.problems()


class DaemonDied(Exception):
    """The daemon exited while the soak was running."""


def run_soak(*, clients: int = 64, seconds: float = 300.0, procs: int = 8, wait_timeout: float = 60.0,
             sample_every: float = 1.0, seed: int = 0, mix: dict[str, int] | None = None,
             daemon_nofile: int = 0, daemon_args: tuple[str, ...] = ()) -> SoakResult:
    """Start a private daemon, run the soak for ``seconds`` after every client connected, and
    return what it saw.  If the daemon dies, the clients are stopped and the result says so
    (``daemon_died``) with whatever the clients had counted; raises only if a load generator
    process fails.

    ``daemon_nofile`` > 0 lowers the daemon's soft limit of open files to that (systemd gives
    services 1024 unless the unit says otherwise).
    """
    from npu.local import LocalDaemon

    tmp = tempfile.mkdtemp(prefix="npud-soak-")
    cfg = os.path.join(tmp, "npud.toml")
    with open(cfg, "w") as f:
        f.write(DAEMON_CONFIG)
    cache = os.path.join(tmp, "cache")
    load_before = loadavg()
    daemon = LocalDaemon("--config", cfg, "--cache-dir", cache, *daemon_args)
    if daemon_nofile:
        hard = resource.prlimit(daemon.process.pid, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(daemon.process.pid, resource.RLIMIT_NOFILE, (daemon_nofile, hard))
    ctx = mp.get_context("spawn")     # fresh interpreters: no forked ZeroMQ state or threads
    procs = max(1, min(procs, clients))
    progress = ctx.RawArray("q", clients)
    sampler = Sampler(daemon.process.pid, sample_every, progress=lambda: sum(progress)).start()
    workers: list = []
    tally, gen_cpu, died, warmup_s, cpu0, cpu1 = Tally(), 0.0, "", 0.0, {}, {}
    stop_at = ctx.RawValue("d", 0.0)

    def alive() -> None:
        if daemon.process.poll() is not None:
            raise DaemonDied(f"the daemon exited with status {daemon.process.returncode} "
                             f"{time.monotonic() - sampler.t0:.0f} s after it started (its stderr is above)")
    try:
        import npu

        with npu.connect(daemon.endpoint) as probe:
            preset = probe.devices()[0].preset
        plans = [SessionPlan(i, daemon.endpoint, tmp, preset, map_io=i % 2 == 0, wait_timeout=wait_timeout,
                             seed=seed, mix=dict(mix or MIX)) for i in range(clients)]
        ready, results = ctx.Queue(), ctx.Queue()
        go = ctx.Event()
        for p in range(procs):
            worker = ctx.Process(target=_generator, args=(p, plans[p::procs], ready, go, stop_at, progress, results),
                                 name=f"soak-gen{p}", daemon=True)
            worker.start()
            workers.append(worker)
        _await_all(ready, procs, workers, 120.0 + clients, alive)
        warmup_s = time.monotonic() - sampler.t0
        cpu0 = sampler.cpu_by_kind()
        stop_at.value = time.monotonic() + seconds
        go.set()
        for _, _index, part, cpu in _await_all(results, procs, workers, seconds + 2 * wait_timeout + 60, alive):
            tally.merge(part)
            gen_cpu += cpu
        for worker in workers:
            worker.join(10)
        sampler.sample()
        cpu1 = sampler.cpu_by_kind()
    except DaemonDied as exc:
        died = str(exc)
        stop_at.value = time.monotonic()   # the clients stop; what they counted is lost with them
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        sampler.stop()
        entries = [os.path.getsize(os.path.join(cache, name)) for name in os.listdir(cache)
                   if name.endswith(".npux")] if os.path.isdir(cache) else []
        daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    cpu = {kind: cpu1.get(kind, 0.0) - cpu0.get(kind, 0.0) for kind in cpu1}
    cpu["generators"] = gen_cpu
    return SoakResult(clients, procs, seconds, tally, sampler.samples, warmup_s, cpu, load_before, loadavg(),
                      len(entries), sum(entries), died)


def _await_all(q, n: int, workers, timeout: float, alive) -> list:
    """``n`` messages from ``q``; raises if a generator process died first or time ran out, and
    whatever ``alive()`` raises (checked every second)."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        try:
            got.append(q.get(timeout=1.0))
        except queue.Empty:
            alive()
            dead = [w.name for w in workers if w.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"load generator process(es) {', '.join(dead)} died") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(got)} of {n} load generators answered in {timeout:.0f} s") from None
    return got


# --- the report ----------------------------------------------------------------------------

def _pct(values: list[float]) -> str:
    if not values:
        return f"{'-':>8} {'-':>8} {'-':>8} {'-':>8}"
    p50, p90, p99 = np.percentile(values, [50, 90, 99]) * 1e3
    return f"{p50:8.1f} {p90:8.1f} {p99:8.1f} {max(values) * 1e3:8.1f}"


def render(r: SoakResult, rows: int = 12) -> str:
    """The results as markdown-ready text: operations, jobs, errors, latencies, memory over time."""
    t = r.tally
    out = [f"## Load soak: {r.clients} clients in {r.procs} processes, {r.seconds:.0f} s "
           f"(warm-up {r.warmup_s:.0f} s); load average before {r.load_before[0]:.2f}, "
           f"after {r.load_after[0]:.2f} (1 min)", ""]
    if r.daemon_died:
        out += [f"**The daemon died: {r.daemon_died}.**  The counts below are what clients had reported "
                "by then (those of unfinished generator processes are lost).", ""]
    out += ["| kind | ops | ops ok | jobs | correct | wrong | failed | lost | late |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind in MIX:
        out.append(f"| {kind} | {t.ops[kind]} | {t.ops_ok[kind]} | {t.jobs[kind]} | {t.correct[kind]} | "
                   f"{t.wrong[kind]} | {t.failed[kind]} | {t.lost[kind]} | {t.late[kind]} |")
    out.append(f"| **all** | {sum(t.ops.values())} | {sum(t.ops_ok.values())} | {sum(t.jobs.values())} | "
               f"{sum(t.correct.values())} | {sum(t.wrong.values())} | {sum(t.failed.values())} | "
               f"{sum(t.lost.values())} | {sum(t.late.values())} |")
    per_client = t.per_client_ops or [0]
    replies = t.replies
    out += ["", f"Throughput {sum(t.ops.values()) / r.seconds:.0f} ops/s, "
                f"{sum(t.jobs.values()) / r.seconds:.0f} jobs/s; ops per client {min(per_client)}..{max(per_client)}.  "
                f"Replies checked {replies['replies']}, completions {replies['completions']}; duplicate replies "
                f"{replies['duplicate_replies']}, unasked-for replies {replies['phantom_replies']}, duplicate "
                f"completions {replies['duplicate_completions']}, reused job ids {replies['reused_job_ids']}, "
                f"mismatched wait_jobs statuses {replies['mismatched_statuses']}.  EAGAIN retried: {t.retried}.",
            ""]
    out.append("Errors by code: " + (", ".join(f"{code} {n}" for code, n in sorted(t.errors.items()))
                                     if t.errors else "none") + ".")
    for key, text in sorted(t.samples.items()):
        out.append(f"- first {key}: {text}")
    out += ["", "| latency (ms) | n | p50 | p90 | p99 | max |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for kind in sorted(t.latency):
        values = t.latency[kind]
        p = _pct(values).split()
        out.append(f"| {kind} | {len(values)} | " + " | ".join(p) + " |")
    cpu = r.cpu
    wall = r.seconds
    out += ["", "CPU during the run (cores = CPU seconds / wall seconds): " +
            ", ".join(f"{kind} {cpu.get(kind, 0.0) / wall:.2f}" for kind in ("daemon", "device", "compiler",
                                                                           "generators")) + "."]
    out += _memory_table(r, rows)
    return "\n".join(out)


def _memory_table(r: SoakResult, rows: int) -> list[str]:
    samples = r.samples
    if not samples:
        return []
    began, ended = r.warmup_s, r.warmup_s + r.seconds
    run = [s for s in samples if began <= s.t <= ended]
    pick = run[::max(1, len(run) // rows)]
    if run and pick[-1] is not run[-1]:
        pick.append(run[-1])
    out = ["", "| t (s) | ops/s | daemon RSS MiB | daemon anon MiB | daemon shmem MiB | device procs MiB | "
               "compilers MiB | daemon fds | load 1m |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def row(label: str, s, rate: str) -> str:
        return (f"| {label} | {rate} | {s.daemon_kib / 1024:.1f} | {s.daemon_anon_kib / 1024:.1f} | "
                f"{s.daemon_shmem_kib / 1024:.1f} | {s.device_kib / 1024:.1f} | {s.compiler_kib / 1024:.1f} | "
                f"{s.daemon_fds} | {s.load1:.2f} |")
    out.append(row("idle", samples[0], "-"))
    prev = None
    for s in pick:
        rate = f"{(s.ops - prev.ops) / (s.t - prev.t):.0f}" if prev and s.t > prev.t else "-"
        out.append(row(f"{s.t - began:.0f}", s, rate))
        prev = s
    out.append(row("closed", samples[-1], "-"))
    if len(run) >= 4:
        quarter, end = run[len(run) // 4], run[-1]
        tail = run[len(run) // 2:]
        slope = np.polyfit([s.t for s in tail], [s.daemon_anon_kib for s in tail], 1)[0] * 60 / 1024
        out += ["", f"Rows: `idle` is the daemon before any client connected, `t` seconds since the clock "
                    f"started (after {r.warmup_s:.0f} s of connecting and first compiles), `closed` after every "
                    "client closed its session.",
                "", f"Daemon RSS from 25 % of the run (t = {quarter.t - began:.0f} s) to the end: "
                    f"{quarter.daemon_kib / 1024:.1f} -> {end.daemon_kib / 1024:.1f} MiB "
                    f"({(end.daemon_kib - quarter.daemon_kib) / 1024:+.1f} MiB); anonymous part "
                    f"{quarter.daemon_anon_kib / 1024:.1f} -> {end.daemon_anon_kib / 1024:.1f} MiB "
                    f"({(end.daemon_anon_kib - quarter.daemon_anon_kib) / 1024:+.1f} MiB; least-squares slope over "
                    f"the second half {slope:+.2f} MiB/min); device processes {quarter.device_kib / 1024:.1f} -> "
                    f"{end.device_kib / 1024:.1f} MiB; compiler workers {quarter.compiler_kib / 1024:.1f} -> "
                    f"{end.compiler_kib / 1024:.1f} MiB; daemon fds {quarter.daemon_fds} -> {end.daemon_fds}.  "
                    f"Compile cache at the end: {r.cache_entries} entries, {r.cache_bytes / 1024:.0f} KiB on disk "
                    "(the daemon keeps up to 256 MiB of them in memory)."]
    return out


def parse_mix(text: str) -> dict[str, int]:
    """``"run=3,job=1"`` -> {"run": 3, "job": 1}; names must be ops of ``MIX``."""
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in MIX or not weight.strip().isdigit():
            raise argparse.ArgumentTypeError(f"{part!r}: expected OP=WEIGHT with OP one of {', '.join(MIX)}")
        mix[name.strip()] = int(weight)
    return mix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="duration after warm-up (default 300)")
    parser.add_argument("--clients", type=int, default=64, help="client sessions (default 64)")
    parser.add_argument("--procs", type=int, default=8, help="load generator processes (default 8)")
    parser.add_argument("--wait-timeout", type=float, default=60.0,
                        help="seconds a job may take before it counts as lost (default 60)")
    parser.add_argument("--sample-every", type=float, default=1.0, help="seconds between /proc samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", type=parse_mix, default=None,
                        help="weights of the ops, e.g. run=1,compile=1 (default: " +
                             ",".join(f"{k}={v}" for k, v in MIX.items()) + ")")
    parser.add_argument("--daemon-nofile", type=int, default=0,
                        help="lower the daemon's soft limit of open files to this (systemd's default: 1024)")
    args = parser.parse_args(argv or [])     # None: run by `python -m bench soak`, defaults
    result = run_soak(clients=args.clients, seconds=args.seconds, procs=args.procs,
                      wait_timeout=args.wait_timeout, sample_every=args.sample_every, seed=args.seed,
                      mix=args.mix, daemon_nofile=args.daemon_nofile)
    print(render(result))
    problems = result.problems()
    print()
    print("verdict: " + ("no lost, duplicated or wrong completions; no unexpected errors" if not problems
                         else "FAILED: " + "; ".join(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
