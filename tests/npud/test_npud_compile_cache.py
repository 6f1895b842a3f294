"""The compile cache keeps entries packed (the file's bytes, metadata decoded on use), and its
in-memory bound counts what those entries hold."""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc

import pytest

from npud.compiler_worker.api import compile_model
from npud.compiler_worker.errors import ExecutableFormatError
from npud.executable import Executable
from npud.emulator.config import make_config
from npud.compile_cache import CachedExecutable, CompileCache, memory_cost

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "compiler_worker"))
from compiler_testmodels import mlp  # noqa: E402


def entry(seed: int) -> bytes:
    return compile_model(mlp(seed=seed), make_config("edge")).to_bytes()


def test_a_cached_entry_is_a_few_objects_about_its_file_size(tmp_path):
    # Parsed, the metadata of one of these MLPs was ~80 objects and ~6x its text: kept for the life
    # of the entry and made while other work came and went, they pinned pymalloc's arenas.
    files = [entry(seed) for seed in range(40)]
    cache = CompileCache(tmp_path)
    for i, data in enumerate(files):
        assert cache.put(f"k{i}", data) is not None
    cache._forget()
    gc.collect()
    tracemalloc.start()
    held = [cache.get(f"k{i}") for i in range(len(files))]
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    stats = snapshot.statistics("filename")
    blocks, size = sum(s.count for s in stats), sum(s.size for s in stats)
    assert all(held) and len(cache._memo) == len(files)
    assert blocks / len(files) <= 8
    assert size / len(files) <= max(map(len, files)) + 1024


def test_a_packed_entry_reads_as_the_parsed_executable():
    data = entry(3)
    parsed, packed = Executable.from_bytes(data), CachedExecutable.from_bytes(data)
    for name in ("io", "memory", "ops", "meta", "inputs", "outputs", "compiler_version", "format_version"):
        assert getattr(packed, name) == getattr(parsed, name), name
    assert packed.stream == parsed.stream and bytes(packed.weights) == parsed.weights
    assert bytes(packed.target_hash) == bytes(parsed.target_hash)
    assert packed.report().table == parsed.report().table and packed.to_bytes() == data
    assert packed.ops is not packed.ops   # decoded at each access: nothing kept parsed
    corrupt = bytearray(data)
    corrupt[100] ^= 1
    with pytest.raises(ExecutableFormatError):
        CachedExecutable.from_bytes(bytes(corrupt))


def test_a_validation_record_is_bytes_on_the_entry():
    packed = CachedExecutable.from_bytes(entry(4))
    a, b = b"a" * 16, b"b" * 16
    assert not packed.validated_for(a)
    packed.validated += a
    assert packed.validated_for(a) and not packed.validated_for(b) and isinstance(packed.validated, bytes)


def test_in_memory_entries_are_bounded_by_their_cost(tmp_path):
    entries = [(data, CachedExecutable.from_bytes(data)) for data in map(entry, range(5))]
    cost = max(memory_cost(exe) for _data, exe in entries)
    assert cost > max(len(data) for data, _exe in entries)
    cache = CompileCache(tmp_path, memory_bytes=3 * cost)
    for i, (data, exe) in enumerate(entries):
        assert cache.put(f"k{i}", data, exe) is not None
    assert len(cache._memo) == 3 and cache._memo_size <= cache.memory_bytes
    assert list(cache._memo) == ["k2", "k3", "k4"]   # the most recently used kept
    assert cache.get("k4") is entries[4][1]          # served from memory while its file is unchanged
    assert cache.get("k0") is not None               # still on disk


def test_counters_report_hits_and_misses(tmp_path):
    data = entry(1)
    cache = CompileCache(tmp_path)
    assert cache.get("k") is None
    cache.put("k", data, CachedExecutable.from_bytes(data))
    assert cache.get("k") is not None
    (tmp_path / "bad.npux").write_bytes(b"not an executable")
    cache.get("bad")
    assert cache.counters() == {"hits": 1, "misses": 2, "discarded": 1}


def test_an_entry_of_an_older_executable_format_is_deleted_and_compiled_again(tmp_path):
    """Format version 2 (a CRC-32 trailer): a version 1 entry left by an older daemon is a miss,
    deleted from the disk, and the entry stored after the recompile is served."""
    from test_compiler_executable import version_1

    data = entry(2)
    (tmp_path / "k.npux").write_bytes(version_1(data))
    cache = CompileCache(tmp_path)
    assert cache.get("k") is None and not (tmp_path / "k.npux").exists()
    assert cache.counters()["discarded"] == 1
    cache.put("k", data, CachedExecutable.from_bytes(data))
    assert cache.get("k").to_bytes() == data


def test_loads_of_one_cached_executable_share_its_trace_layers_and_weights():
    """Each load's jobs hand the trace ring the executable's one compact layers object (per load,
    they were objects of their own that the ring kept alive), and loads share the weights buffer."""
    import trio

    from npud.devices import DeviceHost
    from npud.jobs import compact_layers
    from npud.models import instantiate

    class Session:
        memory = 0

    config = make_config("edge")
    device = DeviceHost(0, "npu0", "edge", config, on_job_done=lambda job: None)
    exe = CachedExecutable.from_bytes(entry(5))

    async def two_loads():
        return [await instantiate(Session(), device, exe, i, 1 << 30) for i in (1, 2)]
    first, second = trio.run(two_loads)
    assert first.layers is second.layers is exe.trace_layers == compact_layers(exe.ops)
    assert first.cycles == second.cycles == sum(r["cycles"] for r in exe.ops) > 0
    assert first.fixed[0][0] is second.fixed[0][0] and not first.fixed[0][2]   # one read-only weights buffer
    assert exe.validated_for(exe.validated[:CachedExecutable.VALIDATION_KEY])
