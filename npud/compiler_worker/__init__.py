"""compiler_worker: ONNX -> npu-emu executables (see docs/COMPILER.md).

The names below load on first use: a worker process imports this package before it confines
itself (npud/compiler_worker/sandbox.py), and must start no thread (numpy's BLAS starts one) and
import no compiler module until it has.
"""

from importlib import import_module

_EXPORTS = {
    "compile_model": ".api", "check_model": ".api", "CompileError": ".api", "CompileErrors": ".api",
    "Executable": ".api", "ExecutableFormatError": ".api", "COMPILER_VERSION": ".api",
    "run_on_emulator": ".runner", "EmulatorSession": ".runner",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
