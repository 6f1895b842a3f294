"""Transformers as exporters write them (tests/zoo/transformer_models.py): npud's in-process
emulator vs onnxruntime, per model.

Run: ``python -m bench transformers``.

For every model of ``transformer_models.MODELS`` (BERT, DistilBERT, GPT-2, ViT at small random
configurations, torch.onnx exports at opsets 14-20, one quantised by ``quantize_dynamic``, two
with symbolic axes): compile seconds (target ``edge``), then ``EmulatorSession.run`` against
onnxruntime (one thread) in interleaved rounds (median ms per inference, goal <= 1.5x), the
stream's command count and modeled cycles (exact, unlike the wall times), and the largest
difference to onnxruntime.  Nothing here asserts a time.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from .common import Ratio, compare, ort_session, report

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "zoo"))


def run() -> list[Ratio]:
    import transformer_models as tm

    from npud.compiler_worker import EmulatorSession, compile_model
    from npud.emulator.config import make_config

    cfg = make_config("edge")
    ratios = []
    for name in sorted(tm.MODELS):
        mb, feeds = tm.export(name)
        t0 = time.perf_counter()
        exe = compile_model(mb, cfg, options={"input_shapes": tm.input_shapes(feeds)})
        compile_s = time.perf_counter() - t0
        s = ort_session(mb)
        with EmulatorSession(exe, cfg) as es:
            outs, stats = es.run(feeds)
            ref = s.run(None, feeds)[0]
            ours, theirs = compare(lambda: es.run(feeds), lambda: s.run(None, feeds), n=20)
        err = float(np.abs(outs["last_hidden_state"] - ref).max())
        print(f"{name:28s} compile {compile_s:6.2f} s  {stats.commands:5d} commands  "
              f"{stats.cycles:7d} modeled cycles  max |diff| {err:.1e}")
        ratios.append(Ratio(f"{name} (emulator vs onnxruntime)", ours, theirs, "ms", 1e3, "<= 1.5x"))
    return ratios


def main(argv=None) -> int:
    report("Transformers: npud emulator vs onnxruntime, 1 thread", run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
