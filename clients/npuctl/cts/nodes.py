"""ONNX backend node tests: which op each test is about, and running one on a device.

The onnx package generates its backend node tests (a model, its inputs and the expected
outputs: ``onnx.backend.test.loader.load_model_tests(kind="node")``).  Two users share this
module: ``npuctl cts`` runs the tests of the ops a target claims, and the ONNX conformance
suite of npu-emu (tests/compiler_worker/conformance.py, docs/CONFORMANCE.md) selects its tests
by op with the same rule.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict

EXPANDED = re.compile(r"_expanded(_ver\d+)?$")


def node_ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def main_op(ops: list[str]) -> str | None:
    """The op a (non-expanded) node test is about: its first node other than Constant."""
    rest = [o for o in ops if o != "Constant"]
    return rest[0] if rest else (ops[0] if ops else None)


def op_of_tests(cases: dict) -> dict[str, str | None]:
    """{test name: the op it is about} for ``{name: model}`` of node tests.  An ``*_expanded``
    test (the op spelt as a subgraph of simpler ops) is about the op of the test it expands; one
    whose test is missing is left out."""
    out = {}
    for name, model in cases.items():
        base = EXPANDED.sub("", name)
        if base == name:
            out[name] = main_op(node_ops(model))
        elif base in cases:
            out[name] = main_op(node_ops(cases[base]))
    return out


def node_tests():
    """Every ONNX backend node test (``TestCase``: name, model, data_sets, rtol, atol)."""
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # the generators warn about their own casts
        return load_model_tests(kind="node")


def by_op(tests, limit: int, pattern: str | None = None) -> dict[str, list]:
    """{op: up to ``limit`` of its tests, in the order to try them}: the non-expanded ones (an
    expanded test is about the simpler ops it is made of), shortest name first (the plain case
    before its variants), optionally only those whose name matches ``pattern`` (a regular
    expression)."""
    ops = op_of_tests({t.name: t.model for t in tests})
    chosen: dict[str, list] = defaultdict(list)
    for t in sorted(tests, key=lambda t: (len(t.name), t.name)):
        op = ops.get(t.name)
        if op is None or EXPANDED.search(t.name) or (pattern and not re.search(pattern, t.name)):
            continue
        if len(chosen[op]) < limit:
            chosen[op].append(t)
    return dict(sorted(chosen.items()))


def tensor_data(case) -> tuple[list, list] | None:
    """The first data set's inputs and expected outputs, or None when one is not a tensor
    (sequences, optionals, maps: the npud client passes tensors only)."""
    import numpy as np

    if not case.data_sets:
        return None
    inputs, outputs = case.data_sets[0]
    if not all(isinstance(x, (np.ndarray, np.generic)) for x in [*inputs, *outputs]):
        return None
    return [np.asarray(x) for x in inputs], [np.asarray(x) for x in outputs]
