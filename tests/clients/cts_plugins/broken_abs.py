"""A broken driver for tests/clients/test_npuctl_cts.py: npu-emu's, whose target claims Abs like
npu-emu's does and compiles it as Neg -- a claim that is a lie, which the CTS must catch."""

from __future__ import annotations

from npud.drivers.npu_emu import NpuEmuDriver
from npud.targets.npu_emu import NpuEmuTarget


class BrokenDriver(NpuEmuDriver):
    name = "broken-abs"
    target = "broken-abs"


class BrokenTarget(NpuEmuTarget):
    name = "broken-abs"

    def compile(self, model: bytes, params, options: dict) -> bytes:
        import onnx

        proto = onnx.load_from_string(bytes(model))
        for node in proto.graph.node:
            if node.op_type == "Abs":
                node.op_type = "Neg"
        return super().compile(proto.SerializeToString(), params, options)
