"""Quantised (int8) ResNet-50 through the daemon vs its fp32 twin and vs onnxruntime.

Run: ``python -m bench quant`` (or ``python -m bench.bench_quant``).

The network is ``compiler_testmodels.resnet()`` (ResNet-50, 224x224, random
weights), BatchNormalization folded by onnxruntime's ``quant_pre_process``
(what its quantisation docs prescribe), then quantised with
``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights,
uint8 activations, 4 random calibration images).  The fp32 twin is the
pre-processed float model.  Same-run ratios, interleaved rounds:

* **int8 vs fp32 ``Model.run`` through npud** (private daemon, device
  ``server``): goal int8 no slower than fp32 (ratio <= 1.0).
* **int8 ``Model.run`` vs onnxruntime running the QDQ model** in this process
  (one thread; onnxruntime fuses the QDQ pairs into its own int8 kernels):
  goal <= 1.3x.
* Modeled device time (the timing model's cycles per job, at the server
  preset's clock) of int8 vs fp32, and the int8 vs onnxruntime agreement (in
  output quantisation steps).
* In process (``EmulatorSession``, no daemon): CPU time per inference of each
  model and per command kind (the emulator's engines), the steadiest view of
  where the int8 run's time goes on a shared machine.

Nothing here asserts a time.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import numpy as np

import npu
from npu.local import LocalDaemon

from .common import Ratio, compare, ort_session, report

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "compiler_worker"))


def models(seed: int = 0, size: int = 224, **shape) -> tuple[bytes, bytes]:
    """(fp32, int8 QDQ) ResNet-50 (or with ``shape``, ``resnet(**shape)``'s smaller twin)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from compiler_testmodels import quantize_qdq, resnet

    with tempfile.TemporaryDirectory() as d:
        src, pre = os.path.join(d, "f.onnx"), os.path.join(d, "p.onnx")
        with open(src, "wb") as f:
            f.write(resnet(seed=seed, size=size, **shape))
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        with open(pre, "rb") as f:
            fp32 = f.read()
    rng = np.random.default_rng(seed + 1)
    calib = [{"x": rng.standard_normal((1, 3, size, size)).astype(np.float32)} for _ in range(4)]
    return fp32, quantize_qdq(fp32, calib, per_channel=True)


def run(rounds: int = 5) -> list[Ratio]:
    import logging
    logging.getLogger().setLevel(logging.ERROR)     # quantize_static's pre-processing advice
    fp32, int8 = models()
    from npud.emulator.engines import int_gemm
    print(f"(integer GEMM: {int_gemm.describe()})")
    x = np.random.default_rng(7).standard_normal((1, 3, 224, 224)).astype(np.float32)
    cache = tempfile.mkdtemp(prefix="npud-bench-cache-")
    daemon = LocalDaemon("--device", "server", "--cache-dir", cache)
    ratios = []
    try:
        with npu.connect(daemon.endpoint, timeout=120) as client:
            mf, mq = client.load(fp32), client.load(int8)
            sq = ort_session(int8)
            ref = sq.run(None, {"x": x})[0]
            got = mq.run(x)[mq.outputs[0].name]
            from test_compiler_quant import output_step
            steps = np.abs(got.astype(np.float64) - ref) / output_step(int8)
            jf, jq = mf.submit(x), mq.submit(x)
            jf.result(), jq.result()
            cf, cq = jf.stats.get("cycles"), jq.stats.get("cycles")
            macs_q = sum(r["macs"] for r in mq.report().rows)
            q_s, f_s = compare(lambda: mq.run(x), lambda: mf.run(x), n=3, rounds=rounds)
            ratios.append(Ratio("ResNet-50 int8 vs fp32 Model.run (npud)", q_s, f_s, "ms", 1e3,
                                "<= 1.0x (int8 no slower)"))
            q_s2, o_s = compare(lambda: mq.run(x), lambda: sq.run(None, {"x": x}), n=3,
                                rounds=rounds)
            ratios.append(Ratio("ResNet-50 int8 Model.run vs ORT QDQ 1 thread", q_s2, o_s, "ms",
                                1e3, "<= 1.3x"))
            so_f = ort_session(fp32)
            of_s, _ = compare(lambda: so_f.run(None, {"x": x}), lambda: None, n=3, rounds=3)
            print(f"(modeled device time per run: int8 {cq:,} cycles vs fp32 {cf:,} cycles = "
                  f"{cq / cf:.2f}x; int8 MACs {macs_q:,}; ORT fp32 {of_s * 1e3:.1f} ms, ORT QDQ "
                  f"{o_s * 1e3:.1f} ms; int8 vs ORT: max {steps.max():.0f} output steps, "
                  f"{np.mean(steps <= 1 + 1e-6) * 100:.2f}% within one, same argmax "
                  f"{bool(got.argmax() == ref.argmax())})")
            mf.unload()
            mq.unload()
    finally:
        daemon.stop()
        shutil.rmtree(cache, ignore_errors=True)
    return ratios


def engine_profile(fp32: bytes, int8: bytes, rounds: int = 5, size: int = 224) -> None:
    """Median CPU (thread) time per inference in process, in total and per
    command kind, int8 against its fp32 twin in interleaved rounds."""
    import collections
    import statistics
    import time

    from npud.compiler_worker import EmulatorSession, compile_model
    from npud.emulator.config import make_config

    cfg = make_config("server")
    x = np.random.default_rng(7).standard_normal((1, 3, size, size)).astype(np.float32)
    sessions = {"fp32": EmulatorSession(compile_model(fp32, cfg), cfg),
                "int8": EmulatorSession(compile_model(int8, cfg), cfg)}
    spent: dict = {k: collections.defaultdict(list) for k in sessions}
    current: dict = {}

    def timed(name, step):
        def run_timed(job):
            t = time.thread_time()
            step(job)
            current[name] = current.get(name, 0.0) + time.thread_time() - t
        return run_timed

    try:
        for s in sessions.values():   # time each prepared step (Device.prepare), by opcode
            commands, steps = s.device.prepare(s.program)
            s.program.prepared["steps"] = (s.device._sram, commands, tuple(
                timed(c.op.name, step) for c, step in zip(commands, steps)))
            s.run({"x": x})
        for _ in range(rounds):
            for k, s in sessions.items():
                current.clear()
                t = time.thread_time()
                s.run({"x": x})
                spent[k]["total"].append(time.thread_time() - t)
                for name, v in current.items():
                    spent[k][name].append(v)
    finally:
        for s in sessions.values():
            s.close()
    med = {k: {n: statistics.median(v) * 1e3 for n, v in d.items()} for k, d in spent.items()}
    print(f"in process, CPU ms per inference (median of {rounds}): int8 {med['int8']['total']:.1f} "
          f"vs fp32 {med['fp32']['total']:.1f} = {med['int8']['total'] / med['fp32']['total']:.2f}x")
    for k in ("int8", "fp32"):
        parts = sorted(((v, n) for n, v in med[k].items() if n != "total" and v >= 0.05), reverse=True)
        print(f"  {k}: " + ", ".join(f"{n} {v:.1f}" for v, n in parts))


def main() -> None:
    report("Quantised (int8) ResNet-50 through the daemon", run())
    engine_profile(*models())


if __name__ == "__main__":
    main()
