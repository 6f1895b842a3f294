"""The compile cache's in-memory bound counts what parsed entries hold, not their file size."""

from __future__ import annotations

import os
import sys
import tracemalloc

from npud.compiler_worker.api import compile_model
from npud.compiler_worker.executable import Executable
from npud.emulator.config import make_config
from npud.compile_cache import CompileCache, memory_cost

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "compiler_worker"))
from compiler_testmodels import mlp  # noqa: E402


def entry(seed: int) -> tuple[bytes, Executable]:
    data = compile_model(mlp(seed=seed), make_config("edge")).to_bytes()
    return data, Executable.from_bytes(data)


def test_memory_cost_is_near_what_a_parsed_entry_allocates_not_its_file_size():
    # Within 20 %: allocator overheads vary between Python builds; the file size is ~30 % low.
    data, exe = entry(1)
    tracemalloc.start()
    parsed = [Executable.from_bytes(data) for _ in range(50)]
    held, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert parsed and memory_cost(exe, len(data)) >= 0.8 * held / 50 > len(data)


def test_in_memory_entries_are_bounded_by_their_cost(tmp_path):
    entries = [entry(seed) for seed in range(5)]
    cost = max(memory_cost(exe, len(data)) for data, exe in entries)
    cache = CompileCache(tmp_path, memory_bytes=3 * cost)
    assert sum(len(data) for data, _ in entries[1:]) <= 3 * cost   # counted by file bytes, four fit
    for i, (data, exe) in enumerate(entries):
        assert cache.put(f"k{i}", data, exe) is not None
    assert len(cache._memo) == 3 and cache._memo_size <= cache.memory_bytes
    assert list(cache._memo) == ["k2", "k3", "k4"]   # the most recently used kept
    assert cache.get("k0") is not None               # still on disk


def test_counters_report_hits_and_misses(tmp_path):
    data, exe = entry(1)
    cache = CompileCache(tmp_path)
    assert cache.get("k") is None
    cache.put("k", data, exe)
    assert cache.get("k") is not None
    (tmp_path / "bad.npux").write_bytes(b"not an executable")
    cache.get("bad")
    assert cache.counters() == {"hits": 1, "misses": 2, "discarded": 1}
