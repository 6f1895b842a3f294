"""npu-emu's compiler target: today's pipeline (npud/compiler_worker), wrapped, not restructured.

Registered in npud's pyproject.toml under ``npud.targets``.  ``fingerprint`` reads the compiler's
and the ISA's sources as files: the daemon calls it for every cache key and must not import the
compiler (22 compiler modules and 29 of onnx's)."""

from __future__ import annotations

import functools
from importlib.util import find_spec
from pathlib import Path

from npud.compiler_worker.version import COMPILER_VERSION

from . import NodeSupport, Target, source_fingerprint


class NpuEmuTarget(Target):
    name = "npu-emu"
    worker_module = "npud.compiler_worker.worker"

    @functools.cache
    def fingerprint(self) -> str:
        files = []
        for package in ("npud.compiler_worker", "npud.emulator"):
            root = Path(find_spec(package).origin).parent
            files += [(path.relative_to(root), path) for path in sorted(root.rglob("*.py"))]
        return source_fingerprint(COMPILER_VERSION, files)

    def support(self, model: bytes, params) -> list[NodeSupport]:
        import onnx

        from npud.compiler_worker.api import check_model

        from npud.emulator.config import DeviceConfig

        refused = {}
        for err in check_model(model, DeviceConfig.from_dict(params)):
            if not err.node:   # a problem of the whole model: no node placement can help
                raise err
            refused.setdefault(err.node, err.reason)
        out = []
        for i, node in enumerate(onnx.load_from_string(bytes(model)).graph.node):
            name = node.name or f"{node.op_type}_{i}"
            reason = refused.get(node.name) if node.name in refused else refused.get(name)
            out.append(NodeSupport(name, node.op_type, reason is None, reason or ""))
        return out

    def compile(self, model: bytes, params, options: dict) -> bytes:
        from npud.compiler_worker.api import compile_model
        from npud.emulator.config import DeviceConfig

        return compile_model(model, DeviceConfig.from_dict(params), options).to_bytes()
