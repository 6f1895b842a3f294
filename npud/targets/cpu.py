"""The cpu target: an ONNX model, its input shapes fixed, packed for the cpu driver.

A node is supported when onnxruntime's CPU provider runs it and npud can carry its tensors
(npud/targets/cpu_support.py); the compile fixes symbolic input
dimensions (``input_shapes``, else 1, as npu-emu's compiler does), infers the output shapes, lays
the inputs and outputs out in the job's address space (each at its own page) and writes the
executable container (npud/executable) whose stream is a cpu program (npud/drivers/cpu.py).
It runs in the compiler workers, like every compile: the daemon never parses a model.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from . import NodeSupport, Target, source_fingerprint

VERSION = "cpu-0.1.0"
KNOWN_OPTIONS = {"input_shapes", "name"}


def _round_up(n: int, multiple: int) -> int:
    # not npud.memory.round_up: this runs in the sandboxed compiler worker, which may not read
    # the daemon's modules (npud/compiler_worker/sandbox.py)
    return -(-n // multiple) * multiple


def _self_contained(model):
    """The ModelProto in ``model`` (plain ONNX or a model container) with every tensor's data in
    it: onnxruntime, in the cpu device process, would open the files an external reference
    names, with the daemon's permissions -- refused as npu-emu's compiler refuses them."""
    from npud.compiler_worker.external_data import parse, resolve

    proto, data = parse(model)
    resolve(proto, data)
    return proto


class CpuTarget(Target):
    name = "cpu"
    worker_module = "npud.compiler_worker.worker"

    @functools.cache
    def fingerprint(self) -> str:
        npud = Path(__file__).resolve().parent.parent
        sources = ("targets/cpu.py", "targets/cpu_support.py", "drivers/cpu.py", "compiler_worker/external_data.py",
                   "compiler_worker/passes/import_onnx.py",
                   "executable/__init__.py")
        return source_fingerprint(VERSION, [(p, npud / p) for p in sources])

    def support(self, model: bytes, params: dict) -> list[NodeSupport]:
        from .cpu_support import support

        proto = _self_contained(model)
        return [NodeSupport(n.name or f"{n.op_type}_{i}", n.op_type, ok, why)
                for i, (n, (ok, why)) in enumerate(zip(proto.graph.node, support(proto)))]

    def compile(self, model: bytes, params: dict, options: dict) -> bytes:
        import numpy as np
        import onnx
        from onnx import helper

        from npud.compiler_worker.errors import CompileError
        from npud.compiler_worker.passes.import_onnx import declared_dims, fix_input_shapes
        from npud.drivers.cpu import CpuParams, pack_program
        from npud.executable import Executable

        from .cpu_support import support

        options = dict(options or {})
        unknown = set(options) - KNOWN_OPTIONS
        if unknown:
            raise CompileError(f"unknown compile option(s): {', '.join(sorted(unknown))}")
        config = CpuParams.from_dict(params)
        proto = _self_contained(model)
        graph = proto.graph
        given = options.get("input_shapes") or {}
        initialisers = {t.name for t in graph.initializer}
        declared = {v.name: declared_dims(v, v.name in given) for v in (*graph.input, *graph.output)}
        fix_input_shapes(graph, given)
        for node, (ok, why) in zip(graph.node, support(proto)):
            if not ok:   # what `check` declines never loads: a claim is a promise (docs/CTS.md)
                raise CompileError(why, node=node.name, op=node.op_type)
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
        except Exception as exc:
            raise CompileError(f"shape inference failed: {exc}") from None
        page = config.page_size
        va = page
        tables = {"inputs": [], "outputs": []}
        regions = []
        for kind, values in (("input", [v for v in graph.input if v.name not in initialisers]),
                             ("output", inferred.graph.output)):
            for value in values:
                tensor = value.type.tensor_type
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
                if not tensor.HasField("shape") or min(dims, default=0) < 0:
                    raise CompileError(f"the shape of {kind} {value.name!r} is not known after shape inference")
                dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
                size = np.dtype(dtype).itemsize * int(np.prod(dims, dtype=np.int64))
                entry = {"name": value.name, "dtype": dtype, "shape": dims, "va": va, "size": size,
                         **declared.get(value.name, {})}
                tables[f"{kind}s"].append(entry)
                regions.append({"name": f"{kind}:{value.name}", "kind": kind, "va": va, "size": size,
                                "writable": kind == "output", "tensor": value.name})
                va += _round_up(max(size, 1), page)
        ops = [{"node": n.name or f"{n.op_type}_{i}", "op": n.op_type, "kind": "onnxruntime", "inputs": [],
                "outputs": [], "macs": 0, "cycles": 0, "sram_bytes": 0, "dma_bytes": 0, "commands": 0}
               for i, n in enumerate(graph.node)]
        fixed_model = proto.SerializeToString()
        meta = {"model_name": options.get("name") or graph.name, "target": "cpu", "target_config": config.to_dict(),
                "options": options, "model_sha256": hashlib.sha256(bytes(model)).hexdigest()}
        exe = Executable(pack_program(fixed_model, tables["inputs"], tables["outputs"]), b"", tables,
                         {"regions": regions, "arena_bytes": 0, "naive_bytes": 0, "weights_bytes": 0},
                         ops, meta, VERSION, config.target_hash())
        return exe.to_bytes()
