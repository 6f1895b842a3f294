"""The compiler's public API.

``compile_model(model_bytes, config, options)`` -> :class:`Executable`;
``check_model(model_bytes, config)`` -> every :class:`CompileError`.
Options: ``input_shapes`` ({input name: shape} for symbolic dims, which
otherwise default to 1), ``name`` (recorded in the metadata).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

from npud.emulator.config import DeviceConfig

from . import pipeline
from .errors import CompileError, CompileErrors, ExecutableFormatError
from npud.executable import Executable
from .pipeline import COMPILER_VERSION

__all__ = ["compile_model", "check_model", "CompileError", "CompileErrors",
           "ExecutableFormatError", "Executable", "COMPILER_VERSION"]

KNOWN_OPTIONS = {"input_shapes", "name"}


def _check_options(options):
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise CompileError(f"options must be a dict, not {type(options).__name__}")
    unknown = set(options) - KNOWN_OPTIONS
    if unknown:
        raise CompileError(f"unknown compile option(s): {', '.join(sorted(unknown))}")
    return options


def compile_model(model_bytes: bytes, config: DeviceConfig, options: dict | None = None) -> Executable:
    options = _check_options(options)
    ctx = pipeline.CompileContext(model_bytes, config, options)
    # The model's SHA-256 for META is hashed on another thread while the passes run (hashlib
    # releases the GIL): for a 100 MB model it was ~0.15-0.2 s of a cold compile, in series.
    with ThreadPoolExecutor(1) as hasher:
        try:
            sha256 = hasher.submit(hashlib.sha256, model_bytes)
        except RuntimeError:   # no thread under a tight memory limit (RLIMIT_AS): hashed below instead
            sha256 = None
        try:
            pipeline.run(ctx)
        except CompileError:
            raise
        except RecursionError:
            raise CompileError("model is too deeply nested") from None
        except MemoryError:
            raise CompileError("out of memory while compiling") from None
    meta = {
        "model_name": options.get("name") or (ctx.graph.name if ctx.graph else ""),
        "model_sha256": (sha256.result() if sha256 else hashlib.sha256(model_bytes)).hexdigest(),
        "target": config.preset, "target_config": config.to_dict(),
        "opset": ctx.graph.opset,
        "options": {k: v for k, v in options.items()},
        "pass_seconds": {k: round(v, 6) for k, v in ctx.timings.items()},
        "commands": sum(r["commands"] for r in ctx.report) + 1,
    }
    return Executable(ctx.stream, ctx.weights, ctx.io_table, ctx.memory, ctx.report, meta,
                      COMPILER_VERSION, config.target_hash())


def check_model(model_bytes: bytes, config: DeviceConfig) -> list[CompileError]:
    """Every problem that stops `model_bytes` compiling for `config`, not just
    the first: every unsupported node, or the one model-level error."""
    ctx = pipeline.CompileContext(model_bytes, config, check_only=True)
    try:
        pipeline.run(ctx, until="legalize")
    except CompileErrors as e:
        return list(e.errors)
    except CompileError as e:
        return [e]
    if ctx.errors:
        return list(ctx.errors)
    try:
        pipeline.run_from(ctx, "layout")
    except CompileError as e:
        return [e]
    return []
