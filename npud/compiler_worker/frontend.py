"""The shared front end: the compiler stage every target sees the same graph through.

``run(model_bytes, options)`` imports the model (opset upgrade, external data, shape inference),
folds constants, rewrites integer idioms, recognises patterns and canonicalises
(``pipeline.FRONT_END``).  A target's support query and the partitioner
(npud/compiler_worker/partition.py) ask about the graph this returns, the same graph the npu-emu
back end (``pipeline.BACK_END``) legalises and lowers, so what a query accepts is what lowering
gets.  Runs in a compiler worker, never in the daemon.
"""

from __future__ import annotations

from . import pipeline


def run(model_bytes: bytes, options: dict | None = None, config=None) -> pipeline.CompileContext:
    """The front end's context for ``model_bytes``: ``ctx.graph`` is the canonical graph.
    ``config`` is the device's (passes read it, e.g. for the int8 path); a CompileError says why
    the model cannot even be read."""
    ctx = pipeline.CompileContext(model_bytes, config, options, check_only=True)
    return pipeline.run_stage(ctx, pipeline.FRONT_END)
