"""The compiler accepts opsets up to import_onnx.MAX_OPSET (beyond the 21 of the coverage
target) because, for every op it compiles or folds, the schema versions after 21 only add
element types: no input or output changed, and no attribute except Cast's round_mode
(float8 rounding; Cast compiles only to float32, bool, int32 and int64) and Range's stash_type
(float16 arithmetic; Range only folds).  This keeps that claim true."""

import onnx.defs
import pytest

from npud.compiler_worker.passes.import_onnx import MAX_OPSET
from npud.compiler_worker.support import SUPPORT

# attributes added after opset 21 that cannot change what the compiler accepts
HARMLESS = {"Cast": {"round_mode"},   # rounding into float8 types; Cast compiles to float32/bool/int32/int64
            "Range": {"stash_type"},  # float16/bfloat16 arithmetic; Range folds at load only
            # refused unless float32 (passes/quantize.py _check_qdq)
            "DequantizeLinear": {"output_dtype"}, "QuantizeLinear": {"precision"}}

FOLDED = ["Cast", "ConstantOfShape", "Dropout", "Flatten", "Identity", "Pad", "Reshape", "Shape",
          "Size", "Squeeze", "Transpose", "Unsqueeze", "Where", "Equal", "Less", "Greater"]


@pytest.mark.parametrize("op", sorted(set(SUPPORT) | set(FOLDED)))
def test_no_semantic_change_between_opset_21_and_max(op):
    old, new = onnx.defs.get_schema(op, 21), onnx.defs.get_schema(op, MAX_OPSET)
    assert set(new.attributes) - set(old.attributes) <= HARMLESS.get(op, set()), op
    assert set(old.attributes) <= set(new.attributes), op
    assert [i.name for i in old.inputs] == [i.name for i in new.inputs], op
    assert [o.name for o in old.outputs] == [o.name for o in new.outputs], op
