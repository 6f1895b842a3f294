"""Every default-domain opset from 7 to the newest compiles (older ones too: torch's opset-6
exports run in tests/clients/test_client_inference.py): older models are upgraded inside the
compiler worker (passes/upgrade.py), never by the client; a node the upgrade cannot convert is
named.  The models are the classic architectures' ops at their shipped opset (onnx.helper)."""

import pytest
from onnx import TensorProto, helper

from npud.compiler_worker import CompileError, compile_model
from npud.emulator.config import make_config
from zoo_models import classic_block, compare


@pytest.mark.parametrize("opset", [7, 8, 9, 10])   # onnxruntime runs no opset-6 BatchNormalization
def test_classic_ops_at_old_opsets_are_upgraded_and_match(opset):
    row = compare(classic_block(opset), "edge")
    assert row["match"], row


def test_old_opset_upgrade_failure_names_the_node():
    scan = helper.make_node("Scan", ["x"], ["y"], num_scan_inputs=1, name="scan1")
    g = helper.make_graph([scan], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 8)])
    with pytest.raises(CompileError, match="cannot be upgraded from opset 8") as ei:
        compile_model(m.SerializeToString(), make_config("edge"))
    assert (ei.value.node, ei.value.op) == ("scan1", "Scan")
