"""Shared helpers of the benchmarks: timing, interleaved comparison, reporting.

Benchmarks never assert absolute times.  Each compares a candidate with a
baseline measured in the same run, interleaving rounds of the two so that a
noisy neighbour hurts both alike, and reports the ratio of medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Ratio:
    name: str
    candidate_s: float
    baseline_s: float
    unit: str
    per: float
    goal: str
    higher_is_better: bool = False

    @property
    def ratio(self) -> float:
        """Time ratio (ours / baseline), or for throughput, bandwidth ratio (baseline / ours)."""
        if self.higher_is_better:
            return self.baseline_s / self.candidate_s
        return self.candidate_s / self.baseline_s

    def line(self) -> str:
        kind = "bandwidth" if self.higher_is_better else "time"
        return (f"{self.name:<46} {self.candidate_s * self.per:9.2f} {self.unit} vs baseline "
                f"{self.baseline_s * self.per:9.2f} {self.unit}  {kind} ratio {self.ratio:5.2f}x  "
                f"(goal {self.goal})")


def time_per_call(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def compare(candidate: Callable[[], object], baseline: Callable[[], object], *, n: int,
            rounds: int = 7, warmup: int = 1) -> tuple[float, float]:
    """Median seconds per call of candidate and baseline, measured in interleaved rounds."""
    for _ in range(warmup):
        time_per_call(candidate, max(1, n // 10))
        time_per_call(baseline, max(1, n // 10))
    cand, base = [], []
    for _ in range(rounds):
        cand.append(time_per_call(candidate, n))
        base.append(time_per_call(baseline, n))
    return statistics.median(cand), statistics.median(base)


def report(title: str, ratios: list[Ratio]) -> None:
    print(f"## {title}")
    for r in ratios:
        print(r.line())
    print()


def ort_session(model: bytes):
    """The onnxruntime baseline: one intra-op and one inter-op thread, CPU only."""
    import onnxruntime as ort  # a test-and-bench oracle, never a runtime dependency

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def daemon_of_tree(tree: str, *args: str):
    """A private daemon running the checkout at ``tree`` (another commit's code, for comparisons):
    started from inside that tree, because ``python -m`` puts the working directory first on the
    path, before PYTHONPATH -- started from this tree, it would run this tree's code."""
    from npu.local import LocalDaemon

    return LocalDaemon(*args, cwd=tree, env={"PYTHONPATH": f"{tree}:{tree}/clients"})
