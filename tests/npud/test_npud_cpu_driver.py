"""The cpu driver (npud/drivers/cpu.py): a second device, found through its entry point, that runs
ONNX models through onnxruntime in its own device process, behind the same queues and views."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import npu
from daemons import npu_and_cpu
from npud.drivers import Binding, ProgramRejected, driver
from npud.drivers.cpu import pack_program

def topk_model() -> bytes:
    """Relu then TopK: TopK is a node npu-emu's target declines; onnxruntime runs both."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("TopK", ["r", "k"], ["values", "indices"], name="topk", axis=1)],
        "topk", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("indices", TensorProto.INT64, None)],
        [onnx.numpy_helper.from_array(np.array([3], np.int64), "k")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = npu_and_cpu(tmp_path_factory.mktemp("cpu"))
    yield d
    d.stop()


def test_the_cpu_device_is_listed_with_its_driver(daemon):
    with npu.connect(daemon.endpoint) as c:
        devices = c.devices()
    assert [(d.name, d.info["driver"]) for d in devices] == [("npu0", "npu-emu"), ("cpu0", "cpu")]
    assert devices[1].threads == 1 and devices[1].state == "ok"


def test_a_model_npu_emu_declines_runs_on_cpu_and_matches_onnxruntime(daemon):
    model = topk_model()
    x = np.random.default_rng(7).standard_normal((4, 16)).astype(np.float32)
    want = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    with npu.connect(daemon.endpoint) as c:
        with pytest.raises(npu.NpuError, match="TopK"):   # (with fallback, the TopK would run on cpu0)
            c.load(model, device=0, input_shapes={"x": [4, 16]}, fallback="none")
        m = c.load(model, device=1, input_shapes={"x": [4, 16]})
        got = m.run({"x": x})
    np.testing.assert_array_equal(got["values"], want[0])
    np.testing.assert_array_equal(got["indices"], want[1])


def test_check_asks_each_devices_target(daemon):
    """`check` goes to the device's target in a compiler worker: npu-emu names TopK, cpu runs it all."""
    with npu.connect(daemon.endpoint) as c:
        problems = c.check(topk_model(), device=0)
        assert [p["op"] for p in problems] == ["TopK"] and problems[0]["reason"]
        assert c.check(topk_model(), device=1) == []


def test_the_driver_refuses_a_program_whose_tensors_leave_their_bindings():
    cpu = driver("cpu")
    params = cpu.params("host", {})
    stream = pack_program(b"model", [{"name": "x", "dtype": "float32", "shape": [4], "va": 4096, "size": 16}],
                          [{"name": "y", "dtype": "float32", "shape": [4], "va": 8192, "size": 16}])
    assert cpu.validate(stream, params, [Binding(4096, 4096, False), Binding(8192, 4096, True)]).cycles == 0
    with pytest.raises(ProgramRejected, match="output 'y'.*not inside a writable binding"):
        cpu.validate(stream, params, [Binding(4096, 4096, False), Binding(8192, 4096, False)])
    with pytest.raises(ProgramRejected, match="input 'x'"):
        cpu.validate(stream, params, [Binding(8192, 4096, True)])
    with pytest.raises(ProgramRejected, match="not a cpu program"):
        cpu.validate(b"NPUX" + stream, params, [])
    with pytest.raises(ValueError, match="threads"):
        cpu.params("host", {"threads": 0})


def _reads_a_file(location: str) -> bytes:
    """y = x + W, W's 16 bytes "in" the external file ``location`` (as save_as_external_data writes)."""
    w = onnx.numpy_helper.from_array(np.zeros(4, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        w.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"], name="add")], "leak",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def test_a_model_naming_an_external_file_is_refused_and_no_file_is_read(tmp_path, monkeypatch):
    """onnxruntime resolves external data relative to its working directory: the cpu target passed
    such a model through, and the cpu device process read the file with the daemon's permissions
    (a client got a secret's bytes back as the model's output)."""
    secret = np.array([1.5, 2.5, 3.5, 4.5], np.float32)
    (tmp_path / "secret.bin").write_bytes(secret.tobytes())
    monkeypatch.chdir(tmp_path)   # the daemon starts where the secret is
    d = npu_and_cpu(tmp_path)
    try:
        with npu.connect(d.endpoint) as c:
            for location in ("secret.bin", str(tmp_path / "secret.bin")):
                with pytest.raises(npu.InvalidArgument, match="external file"):
                    c.load(_reads_a_file(location), device=1)
                # `check` lists a whole-model problem as a problem (as npu-emu's does), not an error
                [problem] = c.check(_reads_a_file(location), device=1)
                assert problem["node"] == "" and "external file" in problem["reason"]
    finally:
        d.stop()


def test_the_cpu_device_refuses_a_program_that_names_an_external_file():
    from npud.drivers import cpu_device

    with pytest.raises(cpu_device.RunError, match="names an external file"):
        cpu_device._refuse_external_data(_reads_a_file("secret.bin"))
