"""int8 "resnetish" in process: npud's int8 against onnxruntime QDQ and against npud's own fp32.

Run: ``python -m bench int8`` (``python -m bench int8 --profile`` adds a cProfile of the
int8 run's Python functions; ``--rounds N``; ``--mobilenet`` adds MobileNetV2).

The network is bench_load's "resnetish" (``resnet(blocks=(1, 1, 1, 1), size=112,
width=32)``: every ResNet-50 layer kind, a few ms per run), pre-processed and quantised as
``bench quant`` does (QDQ, per-channel int8 weights, uint8 activations).  CPU (thread)
time per inference of one ``EmulatorSession`` on the ``server`` preset, in interleaved
rounds with onnxruntime (one intra-op thread) on the same QDQ model and with npud running
the fp32 twin.  Goals (issue 15): int8 vs onnxruntime QDQ <= 1.0x; int8 vs npud fp32
<= 0.6x.  Then the per-command-kind breakdown of both npud runs.  With ``--mobilenet``,
the same three on torchvision's MobileNetV2 at 224 px (tests/zoo's "tv mobilenet_v2 224px
QDQ", random weights): depthwise-heavy, where npud lost most.

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
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "zoo"))

SHAPE = {"blocks": (1, 1, 1, 1), "size": 112, "width": 32}


def run(rounds: int = 15, profile: bool = False) -> list[Ratio]:
    from npud.emulator.engines import int_gemm, onednn

    print(f"(convolution: {onednn.describe()}; integer GEMM: {int_gemm.describe()})")
    fp32, int8 = models(**SHAPE)
    return compare_three("resnetish", fp32, int8, rounds, profile), (fp32, int8)


def compare_three(name: str, fp32: bytes, int8: bytes, rounds: int, profile: bool = False) -> list[Ratio]:
    """npud int8 vs onnxruntime QDQ (one thread) and vs npud fp32, CPU time in interleaved rounds."""
    from zoo_models import feeds_for

    feeds = feeds_for(fp32)
    s8, s32, ort8 = _session(int8, "server"), _session(fp32, "server"), ort_session(int8)
    try:
        ref, got = ort8.run(None, feeds)[0], next(iter(s8.run(feeds)[0].values()))
        print(f"({name} int8 vs ORT QDQ: max |difference| {np.abs(got - ref).max():.3g}, "
              f"bit-exact {np.array_equal(got, ref)})")
        med = _cpu_medians({"int8": lambda: s8.run(feeds), "fp32": lambda: s32.run(feeds),
                            "ort8": lambda: ort8.run(None, feeds)}, rounds)
        if profile:
            _profile(lambda: s8.run(feeds))
    finally:
        s8.close()
        s32.close()
    return [Ratio(f"{name} int8 vs ORT QDQ 1 thread (CPU)", med["int8"], med["ort8"], "ms", 1e3,
                  "<= 1.0x"),
            Ratio(f"{name} int8 vs npud fp32 (CPU)", med["int8"], med["fp32"], "ms", 1e3,
                  "<= 0.6x")]


def mobilenet(rounds: int) -> list[Ratio]:
    """The three on MobileNetV2 (224 px, random weights) and its QDQ twin."""
    import onnxruntime

    from zoo_models import quantize, torchvision_model

    onnxruntime.set_default_logger_severity(3)    # the quantiser's unused-initializer warnings
    fp32 = torchvision_model("mobilenet_v2", 224)
    ratios = compare_three("MobileNetV2", fp32, quantize(fp32, "qdq"), rounds)
    ort32 = ort_session(fp32)
    s32 = _session(fp32, "server")
    from zoo_models import feeds_for
    feeds = feeds_for(fp32)
    try:
        med = _cpu_medians({"npud": lambda: s32.run(feeds), "ort": lambda: ort32.run(None, feeds)},
                           rounds)
    finally:
        s32.close()
    return ratios + [Ratio("MobileNetV2 fp32 vs ORT 1 thread (CPU)", med["npud"], med["ort"], "ms",
                           1e3, "(depthwise on oneDNN)")]


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
    p.add_argument("--mobilenet", action="store_true", help="also MobileNetV2 at 224 px")
    args = p.parse_args(argv or [])
    ratios, (fp32, int8) = run(args.rounds, args.profile)
    report("int8 resnetish in process (CPU time per inference)", ratios)
    engine_profile(fp32, int8, rounds=args.rounds, size=SHAPE["size"])
    if args.mobilenet:
        report("MobileNetV2 224px in process (CPU time per inference)", mobilenet(args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
