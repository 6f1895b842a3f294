"""ONNX's own backend test suite against npu.onnx_backend (through one private daemon).

Node tests of the ops in conformance.OPS (minus conformance.EXCLUDE) and the nine
light real models shipped in the onnx package; docs/CONFORMANCE.md is kept in sync.
"""

from __future__ import annotations

import os
import pathlib
import re
import tempfile
import warnings

import onnx.backend.test

import conformance
import npu.onnx_backend as backend

# BackendTest writes the light models' test data under $ONNX_HOME: keep it out of $HOME, and
# let the directory object's finaliser remove it when the test run ends.
_onnx_home = tempfile.TemporaryDirectory(prefix="npu-onnx-home-")
os.environ.setdefault("ONNX_HOME", _onnx_home.name)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")    # the node-test generators warn about their own casts
    _classes = conformance.classify(conformance.node_cases())
    backend_test = onnx.backend.test.BackendTest(backend, __name__)

for _op in conformance.OPS:
    for _name in _classes[_op]["selected"]:
        backend_test.include(f"^{re.escape(_name)}_cpu$")
for _model in conformance.REAL_MODELS:
    backend_test.include(f"^test_{_model}_cpu$")
for _pat in conformance.EXCLUDE:
    backend_test.exclude(f"^(?:{_pat})_cpu$")

globals().update(backend_test.test_cases)


def test_conformance_doc_is_in_sync():
    path = pathlib.Path(__file__).resolve().parents[2] / "docs" / "CONFORMANCE.md"
    assert path.read_text() == conformance.render_doc(_classes), \
        "docs/CONFORMANCE.md is stale: run .venv/bin/python tests/compiler_worker/conformance.py"


def test_every_exclusion_matches_a_test_of_a_covered_op():
    names = {n for c in _classes.values() for k in ("excluded",) for n in c[k]}
    for pat in conformance.EXCLUDE:
        assert any(re.fullmatch(pat, n) for n in names), f"exclusion {pat!r} matches no test"
