"""The zoo against onnxruntime: `make test` runs the fast subset (zoo_models.FAST); `make zoo`
(or NPUD_ZOO=1) runs every model and prints the table of docs/CONFORMANCE.md."""

import os

import pytest

from zoo_models import FAST, ZOO, compare

ALL = os.environ.get("NPUD_ZOO") == "1"


@pytest.mark.parametrize("name", [n for n in ZOO if ALL or n in FAST])
def test_zoo_model_matches_onnxruntime(name):
    row = compare(ZOO[name][0](), name=name)
    assert row["match"], row
    assert row["npu_mac_share"] == 1.0, row     # every MAC on the NPU: no op falls back
