"""compiler_worker: ONNX -> npu-emu executables (see docs/COMPILER.md)."""

from .api import (COMPILER_VERSION, CompileError, CompileErrors, Executable,
                  ExecutableFormatError, check_model, compile_model)
from .runner import EmulatorSession, run_on_emulator

__all__ = ["compile_model", "check_model", "CompileError", "CompileErrors", "Executable",
           "ExecutableFormatError", "COMPILER_VERSION", "run_on_emulator", "EmulatorSession"]
