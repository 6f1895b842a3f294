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


def models(seed: int = 0) -> tuple[bytes, bytes]:
    """(fp32, int8 QDQ) ResNet-50."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from compiler_testmodels import quantize_qdq, resnet

    with tempfile.TemporaryDirectory() as d:
        src, pre = os.path.join(d, "f.onnx"), os.path.join(d, "p.onnx")
        with open(src, "wb") as f:
            f.write(resnet(seed=seed))
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        with open(pre, "rb") as f:
            fp32 = f.read()
    rng = np.random.default_rng(seed + 1)
    calib = [{"x": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(4)]
    return fp32, quantize_qdq(fp32, calib, per_channel=True)


def run(rounds: int = 5) -> list[Ratio]:
    import logging
    logging.getLogger().setLevel(logging.ERROR)     # quantize_static's pre-processing advice
    fp32, int8 = models()
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


def main() -> None:
    report("Quantised (int8) ResNet-50 through the daemon", run())


if __name__ == "__main__":
    main()
