"""Heterogeneous models: a model split across npu-emu and a cpu device, against the alternatives.

Run: ``python -m bench hetero``.

The model is tests/npud/hetero_models.topk_model (a torch export: conv, TopK, conv and a gather;
npu-emu's target declines the TopK): three partitions, npu-emu -> cpu -> npu-emu, chained by fences
inside the daemon.  Measured in this run, interleaved:

* ``Model.run`` of the split model, against the same model whole on the cpu device (one job) and
  against onnxruntime in this process (one thread): what a partition boundary costs;
* a warm reload (the compile cache and the kept partition plan answer) against a cache-hit load of
  the same model whole on the cpu device.

Nothing here asserts a time.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

import npu
from npu.local import LocalDaemon

from .common import Ratio, compare, ort_session, report

CONFIG = '[[devices]]\nname = "npu0"\n\n[[devices]]\nname = "cpu0"\ndriver = "cpu"\n'


def run(n: int = 50, rounds: int = 5) -> list[Ratio]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "npud"))
    import hetero_models

    model = hetero_models.topk_model()
    directory = tempfile.mkdtemp(prefix="npud-bench-hetero-")
    config = os.path.join(directory, "npud.toml")
    Path(config).write_text(CONFIG)
    daemon = LocalDaemon("--config", config, "--cache-dir", os.path.join(directory, "cache"))
    try:
        with npu.connect(daemon.endpoint, timeout=120) as c:
            split, whole = c.load(model, device=0), c.load(model, device=1)
            x = np.random.default_rng(0).standard_normal(tuple(split.inputs[0].shape)).astype(np.float32)
            feeds = {split.inputs[0].name: x}
            ort = ort_session(model)
            split.run(feeds), whole.run(feeds), ort.run(None, feeds)   # warm
            split_s, whole_s = compare(lambda: split.run(feeds), lambda: whole.run(feeds), n=n, rounds=rounds)
            _, ort_s = compare(lambda: split.run(feeds), lambda: ort.run(None, feeds), n=n, rounds=rounds)

            def reload(device):
                return lambda: c.load(model, device=device).unload()
            reload_split_s, reload_whole_s = compare(reload(0), reload(1), n=5, rounds=rounds)
    finally:
        daemon.stop()
    return [Ratio("split model Model.run vs whole on the cpu device", split_s, whole_s, "ms", 1e3,
                  "none: each partition is one more device job"),
            Ratio("split model Model.run vs onnxruntime in process", split_s, ort_s, "ms", 1e3, "none"),
            Ratio("split model warm reload vs whole on cpu", reload_split_s, reload_whole_s, "ms", 1e3,
                  "none: plans are kept, no failing whole-model compile")]


def main(argv: list[str] | None = None) -> int:
    report("Heterogeneous models (npu-emu + cpu)", run())
    return 0
