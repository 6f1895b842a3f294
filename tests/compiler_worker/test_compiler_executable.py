"""The executable container: round trip, integrity, layout, report."""

from __future__ import annotations

import numpy as np
import pytest

from compiler_testmodels import small_cnn
from npud.compiler_worker import (COMPILER_VERSION, EmulatorSession, Executable, ExecutableFormatError,
                             compile_model, run_on_emulator)
from npud.emulator.config import make_config

CFG = make_config("edge")


@pytest.fixture(scope="module")
def exe():
    return compile_model(small_cnn(), CFG, {"name": "cnn"})


def test_round_trip(exe):
    data = exe.to_bytes()
    assert data[:4] == b"NPUX"
    back = Executable.from_bytes(data)
    assert back.stream == exe.stream and back.weights == exe.weights
    assert back.io == exe.io and back.memory == exe.memory and back.ops == exe.ops
    assert back.compiler_version == COMPILER_VERSION and back.target_hash == CFG.target_hash()
    assert back.meta["model_name"] == "cnn" and back.to_bytes() == data
    x = np.random.default_rng(0).standard_normal((2, 3, 20, 20)).astype(np.float32)
    a, _ = run_on_emulator(exe, {"x": x}, CFG)
    b, _ = run_on_emulator(back, {"x": x}, CFG)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_read_meta_reads_only_the_meta_section(exe):
    """For listings (`npuctl cache list`): the META section without loading or checking the rest."""
    import io

    from npud.executable import DIGEST, read_meta
    data = exe.to_bytes()
    assert read_meta(io.BytesIO(data)) == exe.meta and read_meta(io.BytesIO(data))["model_name"] == "cnn"
    assert read_meta(io.BytesIO(data[:-DIGEST] + bytes(DIGEST))) == exe.meta   # the digest is not checked
    for junk in (b"", b"NPUX", b"not an executable at all", data[:30]):
        assert read_meta(io.BytesIO(junk)) == {}


@pytest.mark.parametrize("where", [0, 5, 100, -40, -1])
def test_corruption_is_detected(exe, where):
    data = bytearray(exe.to_bytes())
    data[where] ^= 0x40
    with pytest.raises(ExecutableFormatError, match="magic|corrupt|version"):
        Executable.from_bytes(bytes(data))


def version_1(data: bytes) -> bytes:
    """``data`` (an executable) as format version 1 wrote it: the same sections, version 1 in the
    header and a BLAKE2b-256 trailer."""
    import hashlib

    from npud.executable import DIGEST
    body = bytearray(data[:-DIGEST])
    body[4:6] = (1).to_bytes(2, "little")
    return bytes(body) + hashlib.blake2b(bytes(body), digest_size=32).digest()


def test_a_version_1_file_is_refused_as_unsupported(exe):
    """Version 2 changed the trailer (CRC-32 for BLAKE2b-256): an old file is refused by name,
    not misread as corrupt or, worse, accepted with a trailer nobody checked."""
    with pytest.raises(ExecutableFormatError, match="unsupported executable format version 1"):
        Executable.from_bytes(version_1(exe.to_bytes()))


def test_the_trailer_is_the_crc32_of_the_bytes_before_it(exe):
    import zlib
    data = exe.to_bytes()
    assert int.from_bytes(data[-4:], "little") == zlib.crc32(data[:-4])


def test_truncation_is_detected(exe):
    data = exe.to_bytes()
    for n in (0, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(ExecutableFormatError):
            Executable.from_bytes(data[:n])


def test_memory_layout(exe):
    regions = exe.memory["regions"]
    kinds = [r["kind"] for r in regions]
    assert kinds[:2] == ["weights", "arena"] and "input" in kinds and "output" in kinds
    ps = CFG.page_size
    spans = sorted((r["va"], r["va"] + r["size"]) for r in regions)
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        assert a1 <= b0
    for r in regions:
        assert r["va"] % ps == 0
        assert r["writable"] == (r["kind"] in ("arena", "output"))
    io = exe.inputs[0]
    assert io["name"] == "x" and io["dtype"] == "float32" and io["shape"] == [2, 3, 20, 20]
    assert io["size"] == 2 * 3 * 20 * 20 * 4
    assert exe.memory["arena_bytes"] < exe.memory["naive_bytes"]


def test_report(exe):
    rep = exe.report()
    assert rep.rows and {"op", "node", "inputs", "outputs", "macs", "cycles", "sram_bytes",
                         "dma_bytes", "commands"} <= set(rep.rows[0])
    conv = [r for r in rep.rows if r["op"] == "Conv"]
    assert conv[0]["macs"] == 2 * 20 * 20 * 16 * 27
    assert all(r["sram_bytes"] <= CFG.sram_bytes for r in rep.rows)
    assert "TOTAL" in rep.table and "arena" in str(rep)
    x = np.random.default_rng(0).standard_normal((2, 3, 20, 20)).astype(np.float32)
    _, stats = run_on_emulator(exe, {"x": x}, CFG)
    assert stats.macs == sum(r["macs"] for r in rep.rows)
    assert stats.dma_bytes_in + stats.dma_bytes_out == sum(r["dma_bytes"] for r in rep.rows)


def test_target_mismatch_and_bad_feeds(exe):
    with pytest.raises(ValueError, match="compiled for target"):
        EmulatorSession(exe, make_config("server"))
    with EmulatorSession(exe, CFG) as s:
        with pytest.raises(KeyError):
            s.run({})
        with pytest.raises(ValueError, match="shape"):
            s.run({"x": np.zeros((1, 3, 20, 20), np.float32)})


def test_checking_and_writing_an_executable_copy_its_weights_at_most_once(exe):
    """A ResNet-50 executable is 100 MB: the daemon checks each one the compiler sends, so the
    check allocates no copy of it, and writing one builds the file once (it made three copies)."""
    import tracemalloc

    from npud.executable import PackedExecutable

    big = Executable(exe.stream, bytes(8 << 20), exe.io, exe.memory, exe.ops, exe.meta,
                     exe.compiler_version, exe.target_hash)
    tracemalloc.start()
    try:
        data = big.to_bytes()
        written = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        packed = PackedExecutable.from_bytes(data)
        checked = tracemalloc.get_traced_memory()[1] - len(data)
    finally:
        tracemalloc.stop()
    assert written < 1.5 * len(data), written
    assert checked < len(data) // 8, checked
    assert packed.data is data and bytes(packed.weights) == bytes(8 << 20)


def test_the_emulator_session_declares_the_weights_immutable(exe):
    """As the daemon does for a loaded model (the device may keep them pre-tiled, docs/ISA.md), so
    that the in-process benchmarks measure the path a daemon's runs take."""
    session = EmulatorSession(exe, make_config("edge"))
    weights = [(r["va"], r["va"] + r["size"]) for r in exe.memory["regions"] if r["kind"] == "weights"]
    assert weights and len(session.program.immutable) == len(weights)
    for (start, end), (va, stop) in zip(sorted(session.program.immutable), sorted(weights)):
        assert start == va and end >= stop   # the region, page-rounded
