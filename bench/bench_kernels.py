"""The emulator's kernels on whole models, in process: CPU time per inference against onnxruntime.

Run: ``python -m bench kernels`` (or ``python -m bench.bench_kernels``).

No daemon: each model is compiled and run by ``EmulatorSession`` in this
process, and onnxruntime (one intra-op thread) runs the same model in this
process, in interleaved rounds.  Times are **CPU time of this thread**
(``time.thread_time``): on a shared machine wall time mostly measures the
neighbours, while both the emulator (oneDNN and BLAS on one thread) and
onnxruntime with one thread compute on the calling thread.  Cases:

* ResNet-50 fp32 (``compiler_testmodels.resnet()``) on the ``edge`` and
  ``server`` presets vs onnxruntime fp32;
* the quantised twin (bench_quant's QDQ model) on ``server`` vs onnxruntime
  running the QDQ model, and vs npud's own fp32 twin.

The daemon's share (IPC, buffers, segments) is bench_models' and bench_quant's.
Nothing here asserts a time.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

from .common import Ratio, ort_session, report

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "compiler_worker"))


def _cpu_medians(fns: dict, rounds: int) -> dict:
    """Median CPU seconds per call of each function, measured in interleaved rounds."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.thread_time()
            fn()
            times[k].append(time.thread_time() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _session(model: bytes, preset: str):
    from npud.compiler_worker import EmulatorSession, compile_model
    from npud.emulator.config import make_config

    cfg = make_config(preset)
    return EmulatorSession(compile_model(model, cfg), cfg)


def run(rounds: int = 7) -> list[Ratio]:
    from compiler_testmodels import resnet

    from npud.emulator.engines import int_gemm, onednn

    from .bench_quant import models

    print(f"(convolution: {onednn.describe()}; integer GEMM: {int_gemm.describe()})")
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    feeds = {"x": x}
    ratios = []
    resnet50 = resnet()
    ort = ort_session(resnet50)
    for preset in ("edge", "server"):
        s = _session(resnet50, preset)
        med = _cpu_medians({"npud": lambda: s.run(feeds), "ort": lambda: ort.run(None, feeds)}, rounds)
        s.close()
        ratios.append(Ratio(f"ResNet-50 fp32 {preset} vs ORT 1 thread (CPU)", med["npud"], med["ort"],
                            "ms", 1e3, "<= 1.1x"))
    fp32, int8 = models()
    s8, s32 = _session(int8, "server"), _session(fp32, "server")
    ort8 = ort_session(int8)
    med = _cpu_medians({"int8": lambda: s8.run(feeds), "fp32": lambda: s32.run(feeds),
                        "ort8": lambda: ort8.run(None, feeds)}, rounds)
    s8.close()
    s32.close()
    ratios.append(Ratio("ResNet-50 int8 server vs ORT QDQ 1 thread (CPU)", med["int8"], med["ort8"],
                        "ms", 1e3, "<= 1.0x"))
    ratios.append(Ratio("ResNet-50 int8 vs npud fp32, server (CPU)", med["int8"], med["fp32"],
                        "ms", 1e3, "<= 0.6x"))
    return ratios


def main() -> None:
    report("Kernels in process (CPU time per inference)", run())


if __name__ == "__main__":
    main()
