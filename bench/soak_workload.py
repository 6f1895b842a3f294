"""The soak's workload: its models, command streams, and one client session's loop of checked ops.

``MIX`` names the ops and their weights; ``Session`` runs them against a daemon (see
bench/bench_soak.py for what each op does), checking every completion against an output it
knows in advance and counting everything into a ``soak_ledger.Tally``.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field

import numpy as np

from bench.soak_ledger import Tally, TappedClient

MIX = {"run": 30, "pipeline": 8, "job": 20, "chain": 8, "buffers": 16, "compile": 4, "load_cached": 7,
       "load_digest": 7}
SHARED_MODELS = 4          # models every session loads as bytes (compile-cache hits)
KEPT_FILES = 4             # a session's most recent model files, for load_digest
VA_SRC, VA_DST = 0x10000, 0x40000
JOB_SIZES = (256, 1024, 4096)   # float32 elements of a hand-built job's buffers


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
    from npud.emulator.assembler import StreamBuilder, tile
    from npud.emulator.config import make_config

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
