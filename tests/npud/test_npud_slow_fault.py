"""The test-mode ``slow`` fault means one thing for every driver (docs/DRIVERS.md): the run sleeps
``slow_ms`` before each segment it executes (npud/drivers/link.py ``DeviceServer.before_segment``),
so its ``wall_ms`` is at least ``slow_ms`` times the ``segments`` its reply counts.  npu-emu cuts
a program at its safe layer boundaries; cpu runs a program whole, as one segment."""

from __future__ import annotations

import os
import socket

import pytest
from onnx import TensorProto, helper

from npud.drivers import link
from npud.drivers.cpu import CpuParams, pack_program
from npud.drivers.cpu_device import CpuDevice
from npud.emulator.assembler import StreamBuilder
from npud.emulator.config import make_config
from npud.emulator.device_process import DeviceProcess

A, OUT = 0x10000, 0x20000
SLOW_MS = 60
RUN = {"op": "run", "job": 1, "program": 1, "bindings": [[1, A, False], [2, OUT, True]]}


def memfd(data: bytes = b"", size: int = 4096) -> int:
    fd = os.memfd_create("test")
    os.ftruncate(fd, size)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def emulator(sock) -> tuple[link.DeviceServer, list[int], list[int]]:
    """npu-emu, and program 1 for it (its memfd, its boundaries): three layers copying A to OUT,
    each a safe segment."""
    device = DeviceProcess(sock, make_config("edge"))
    sb = StreamBuilder(device.device.config)
    for _ in range(3):
        sb.dma_load(0, A, "float32", (256,))
        sb.dma_store(0, OUT, "float32", (256,))
    sb.end()
    return device, [memfd(sb.build(), 0)], [2, 4]


def cpu(sock) -> tuple[link.DeviceServer, list[int], list[int]]:
    """cpu, and program 1 for it: a two-node model (Relu, Neg), which onnxruntime runs whole."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    tensor = {"dtype": "float32", "shape": [4], "size": 16}
    stream = pack_program(model, [{**tensor, "name": "x", "va": A}], [{**tensor, "name": "y", "va": OUT}])
    return CpuDevice(sock, CpuParams()), [memfd(stream, 0)], [1]


@pytest.mark.parametrize("make, segments", [(emulator, 3), (cpu, 1)], ids=["npu-emu", "cpu"])
def test_slow_sleeps_before_each_segment_on_every_driver(monkeypatch, make, segments):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        device, program_fds, boundaries = make(theirs)
        for bo in (1, 2):
            device._op_import({"bo": bo}, [memfd()])
        loaded = device._op_load_program({"program": 1, "mappings": [[A, 4096, False], [OUT, 4096, True]],
                                          "boundaries": boundaries}, program_fds)
        assert loaded["ok"], loaded
        calls = []
        slept = link.DeviceServer.before_segment
        monkeypatch.setattr(link.DeviceServer, "before_segment", staticmethod(lambda r: (calls.append(r), slept(r))))
        reply = device._op_run({**RUN, "fault": "slow", "slow_ms": SLOW_MS}, [])
        assert reply["ok"] and reply["done"] and reply["segments"] == segments, reply
        assert len(calls) == segments                      # the one meaning, through the one helper
        assert reply["wall_ms"] >= SLOW_MS * segments      # a lower bound: sleep never returns early
    finally:
        ours.close()
        theirs.close()
