"""The compiler's output is byte-identical to the recorded golden digests
(tests/compiler_worker/golden_streams.py): a refactor of the lowering must not change any
executable's stream, weights, I/O table, memory plan or report.  If a change is meant to alter
the output, regenerate with ``python tests/compiler_worker/golden_streams.py --write`` and say why
in the commit."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import golden_streams  # noqa: E402

GOLDEN = golden_streams.load()
NAMES = sorted({k.rsplit("/", 2)[0] for k in GOLDEN})


@pytest.mark.parametrize("name", NAMES)
def test_compiled_output_matches_the_golden_digests(name):
    want = {k: v for k, v in GOLDEN.items() if k.rsplit("/", 2)[0] == name}
    assert golden_streams.compute({name}) == want
