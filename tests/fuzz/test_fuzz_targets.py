"""The short profile of the fuzz harnesses (fuzz/): each input class for a few seconds, derandomised.

`make fuzz FUZZ_SECONDS=N` runs the same targets for a time budget, plus atheris; figures in
docs/RELIABILITY.md.  A failure here prints the input; add it to the regressions below.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npud.compiler_worker.errors import ExecutableFormatError
from npud.executable import Executable
from fuzz import targets

SHORT = settings(derandomize=True, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))


def case(name: str, seed: int):
    _fn, seeds_of, make = targets.TARGETS[name]
    return make(random.Random(f"{name}:{seed}"), seeds_of())


@settings(SHORT, max_examples=3000)
@given(st.integers(0, 2**32))
def test_decoder_mutated_real_frames(seed):
    targets.decode_frame(*case("decoder", seed))


@settings(SHORT, max_examples=3000)
@given(st.integers(0, 2**32))
def test_executable_loader_mutated_resigned_executables(seed):
    targets.load_executable(*case("executable", seed))


@settings(SHORT, max_examples=1500)
@given(st.integers(0, 2**32))
def test_stream_validator_and_emulator_mutated_real_streams(seed):
    targets.validate_stream(*case("stream", seed))


@settings(SHORT, max_examples=600)
@given(st.integers(0, 2**32))
def test_onnx_import_in_worker_mutated_real_models(seed):
    reply = targets.import_onnx(*case("onnx", seed), seconds=20)
    # A raw Python exception reaching the worker's catch-all is a compiler bug now (they were
    # driven to zero: docs/RELIABILITY.md), not a note.
    assert "unexpected" not in reply, reply["unexpected"]


def test_seeds_are_accepted():
    """Mutating from seeds that were already refused would fuzz only the first check."""
    for f in targets.frame_seeds():
        targets.decode_frame(f)
    for e in targets.executables():
        Executable.from_bytes(e)
    for stream, maps in targets.stream_seeds():
        targets.validate_stream(stream, maps)
    for m in targets.onnx_models():
        assert targets.import_onnx(m)["ok"] is True


# --- regressions: every finding of the fuzzers ----------------------------------------------

def test_regression_non_ascii_compiler_version_is_a_format_error():
    """Found by fuzz.run (executable): a re-signed executable whose compiler-version field held
    non-ASCII bytes loaded (decoded with 'replace') and then failed to serialise again."""
    body = bytearray(targets.executables()[0][:-targets.DIGEST])
    body[12:14] = b"\xff\xfe"          # inside compiler_version[16], which starts at byte 8
    with pytest.raises(ExecutableFormatError, match="not ASCII"):
        Executable.from_bytes(targets.resign(bytes(body)))
