"""int8 "resnetish" in process: npud's int8 against onnxruntime QDQ and against npud's own fp32.

Run: ``python -m bench int8`` (``python -m bench int8 --profile`` adds a cProfile of the
int8 run's Python functions; ``--rounds N``).

The network is bench_load's "resnetish" (``resnet(blocks=(1, 1, 1, 1), size=112,
width=32)``: every ResNet-50 layer kind, a few ms per run), pre-processed and quantised as
``bench quant`` does (QDQ, per-channel int8 weights, uint8 activations).  CPU (thread)
time per inference of one ``EmulatorSession`` on the ``server`` preset, in interleaved
rounds with onnxruntime (one intra-op thread) on the same QDQ model and with npud running
the fp32 twin.  Goals (issue 15): int8 vs onnxruntime QDQ <= 1.0x; int8 vs npud fp32
<= 0.6x.  Then the per-command-kind breakdown of both npud runs.

Nothing here asserts a time; the machine is shared, so compare ratios within a run.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from .bench_kernels import _cpu_medians, _session
from .bench_quant import engine_profile, models
from .common import Ratio, ort_session, report

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "compiler_worker"))

SHAPE = {"blocks": (1, 1, 1, 1), "size": 112, "width": 32}


def run(rounds: int = 15, profile: bool = False) -> list[Ratio]:
    from npud.emulator.engines import int_gemm, onednn

    print(f"(convolution: {onednn.describe()}; integer GEMM: {int_gemm.describe()})")
    fp32, int8 = models(**SHAPE)
    x = np.random.default_rng(7).standard_normal((1, 3, SHAPE["size"], SHAPE["size"]))
    feeds = {"x": x.astype(np.float32)}
    s8, s32, ort8 = _session(int8, "server"), _session(fp32, "server"), ort_session(int8)
    try:
        ref, got = ort8.run(None, feeds)[0], next(iter(s8.run(feeds)[0].values()))
        print(f"(int8 vs ORT QDQ: max |difference| {np.abs(got - ref).max():.3g}, "
              f"bit-exact {np.array_equal(got, ref)})")
        med = _cpu_medians({"int8": lambda: s8.run(feeds), "fp32": lambda: s32.run(feeds),
                            "ort8": lambda: ort8.run(None, feeds)}, rounds)
        if profile:
            _profile(lambda: s8.run(feeds))
    finally:
        s8.close()
        s32.close()
    return [Ratio("resnetish int8 vs ORT QDQ 1 thread (CPU)", med["int8"], med["ort8"], "ms", 1e3,
                  "<= 1.0x"),
            Ratio("resnetish int8 vs npud fp32 (CPU)", med["int8"], med["fp32"], "ms", 1e3,
                  "<= 0.6x")], (fp32, int8)


def _profile(fn, runs: int = 20) -> None:
    """cProfile of `runs` calls: the functions with the most own time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(runs):
        fn()
    prof.disable()
    print(f"## cProfile of {runs} int8 runs (own time)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench int8", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--profile", action="store_true", help="print a cProfile of the int8 run")
    args = p.parse_args(argv or [])
    ratios, (fp32, int8) = run(args.rounds, args.profile)
    report("int8 resnetish in process (CPU time per inference)", ratios)
    engine_profile(fp32, int8, rounds=args.rounds, size=SHAPE["size"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
