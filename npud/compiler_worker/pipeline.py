"""The compiler driver: the pass list, run in order (like Vela's compiler
driver).  Each pass is a module under :mod:`npud.compiler_worker.passes` with a
``run(ctx)`` that reads and extends the :class:`CompileContext`.

The list is two named stages: ``FRONT_END`` (import with opset upgrade, folding, integer
rewrites, pattern recognition, canonicalisation -- what every target shares and what a support
query sees, npud/compiler_worker/frontend.py) and ``BACK_END`` (npu-emu's legalisation against
its support table, layout, tiling, memory planning and emission)."""

from __future__ import annotations

import time

from .passes import (canonicalize, emit, fold, health, import_onnx, integers, layout, legalize,
                     memory, patterns, tiling)

from .version import COMPILER_VERSION  # noqa: F401  (api.py imports it from here)

FRONT_END = [
    ("import", import_onnx.run),         # ONNX bytes -> IR, opset upgrade, shape inference, sanity checks
    ("fold", fold.run),                  # constant folding with numpy
    ("integers", integers.run),          # CumSum -> MatMul by a triangle, run-time MatMulInteger zero points
    ("patterns", patterns.run),          # decomposed LayerNorm -> LayerNormalization
    # canonicalisation (passes/canonicalize.py), one rewrite per pass:
    ("canonicalize.validate", canonicalize.validate),        # ONNX shape rules, every invalid node
    ("canonicalize.params", canonicalize.params),            # constant parameter inputs -> attrs
    ("canonicalize.quantized", canonicalize.quantized),      # DQ-op-Q -> int8 ops
    ("canonicalize.decompose", canonicalize.decompositions), # Resize, LRN, ConvTranspose, RNNs...
    ("canonicalize.gemm", canonicalize.gemm),                # Gemm -> MatMul (+ bias)
    ("canonicalize.batchnorm", canonicalize.batchnorm),      # BN folding
    ("canonicalize.epilogues", canonicalize.epilogues),      # bias/residual/activation fusion
]
BACK_END = [
    ("legalize", legalize.run),          # support table; every unsupported node reported
    ("layout", layout.run),              # NHWC for conv/pool; IR -> lowered ops
    ("tiling", tiling.run),              # tile/stripe every op to fit SRAM
    ("memory", memory.run),              # regions, liveness-based arena, weights blob
    ("emit", emit.run),                  # command stream + per-op report
]
PASSES = FRONT_END + BACK_END
GRAPH_PASSES = {name for name, _ in FRONT_END}   # the back end lowers the graph into LOps


class CompileContext:
    def __init__(self, model_bytes, config, options=None, check_only=False) -> None:
        self.model_bytes = model_bytes
        self.config = config
        self.options = dict(options or {})
        self.check_only = check_only
        self.graph = None
        self.errors = []
        self.timings: dict[str, float] = {}
        self.shapeless = None   # tensors the import left without a shape (passes/health.py)


def run_stage(ctx: CompileContext, stage: list) -> CompileContext:
    """Run one named stage's passes (``FRONT_END`` or ``BACK_END``) in order, checking the
    graph's health (passes/health.py) after each pass that rewrites the graph IR."""
    for name, fn in stage:
        t0 = time.perf_counter()
        fn(ctx)
        ctx.timings[name] = time.perf_counter() - t0
        if name in GRAPH_PASSES:
            ctx.shapeless = health.check(ctx.graph, name, ctx.shapeless)
    return ctx


def run(ctx: CompileContext, until: str | None = None) -> CompileContext:
    """Every pass, or those up to and including ``until``."""
    names = [n for n, _ in PASSES]
    return run_stage(ctx, PASSES[:names.index(until) + 1] if until else PASSES)


def run_from(ctx: CompileContext, start: str) -> CompileContext:
    """The passes from ``start`` on."""
    names = [n for n, _ in PASSES]
    return run_stage(ctx, PASSES[names.index(start):])
