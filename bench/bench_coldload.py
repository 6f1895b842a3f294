"""Where a ResNet-50 cold compile's time goes: ``python -m bench coldload`` (issue 15).

Two parts, measured in one run:

* **Through the daemon**: ``Client.load`` of the 100 MB ResNet-50
  (``compiler_testmodels.resnet()``) after ``cache_clear``, three times (the figure the
  ``models`` benchmark reports), split into the loader's part (``compile_ms`` of the reply: the
  model's digests, the worker's compile, the reply's check) and the rest (the client's staging
  buffer, the handler's digest of the buffer, ``instantiate``).  Goal <= 1.5 s.
* **Step by step, in this process**: each step the daemon, the worker and the client take on that
  path, run here on the same bytes with the same functions, so that the steps that dominate can
  be named: the client's staging buffer (allocate, write, free, through the daemon), the model
  digest of the buffer, the private copy hashed again on a miss, the compiler's passes, the
  worker's ``Executable.to_bytes``, the daemon's ``CachedExecutable.from_bytes``, the weights copy
  into a buffer object and the stream's validation at ``instantiate``, and the cache's disk write
  (off the critical path, but on the same two cores).

Nothing here asserts a time; the machine's load changes every figure (print ``uptime`` with them).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import npu
from npu.local import LocalDaemon

from .common import Ratio, report

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "compiler_worker"))

GOAL_S = 1.5
PRESET = "server"


def _timed(fn):
    """(seconds fn took, its result)."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def steps(model: bytes, client=None) -> list[tuple[str, float]]:
    """(step, seconds) for each step of a cold load, run once here on ``model``."""
    from npud.compile_cache import CachedExecutable, CompileCache, model_digest
    from npud.compiler_worker.api import compile_model
    from npud.drivers import Binding
    from npud.drivers.npu_emu import NpuEmuDriver
    from npud.emulator.config import make_config
    from npud.executable import weights_part
    from npud.memory import round_up

    config = make_config(PRESET)
    out = []
    if client is not None:
        def staging():
            buf = client.alloc(len(model))
            buf.write(model)
            buf.free()
        out.append(("client: staging buffer (alloc, write, free)", _timed(staging)[0]))
    out.append(("daemon: model digest of the buffer", _timed(lambda: model_digest(model))[0]))
    copy = bytearray(len(model))
    out.append(("daemon: private copy + digest (a miss)", _timed(lambda: model_digest(model, copy))[0]))
    seconds, exe = _timed(lambda: compile_model(copy, config))
    passes = exe.meta["pass_seconds"]
    out.append(("worker: compile (all passes, + META)", seconds))
    out += [(f"worker:   pass {name}", s) for name, s in passes.items()]
    out.append(("worker:   META and the rest", seconds - sum(passes.values())))
    seconds, data = _timed(exe.to_bytes)
    out.append(("worker: Executable.to_bytes", seconds))
    seconds, cached = _timed(lambda: CachedExecutable.from_bytes(data))
    out.append(("daemon: CachedExecutable.from_bytes", seconds))
    regions = [r for r in cached.memory["regions"] if r["kind"] == "weights"]

    def copy_weights():
        for r in regions:
            dst = bytearray(max(r["size"], 1))   # fresh pages, as a new buffer object's are
            part = weights_part(cached.weights, r)
            memoryview(dst)[:len(part)] = part
    out.append(("daemon: instantiate, weights copy", _timed(copy_weights)[0]))
    page = config.page_size
    bindings = [Binding(r["va"], round_up(max(r["size"], 1), page), bool(r["writable"]))
                for r in cached.memory["regions"]]
    out.append(("daemon: instantiate, stream validation",
                _timed(lambda: NpuEmuDriver().validate(cached.stream, config, bindings))[0]))
    directory = tempfile.mkdtemp(prefix="npud-bench-coldload-")
    try:
        cache = CompileCache(Path(directory))
        out.append(("daemon: cache store (off the critical path)", _timed(lambda: cache.put("0" * 64, data))[0]))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return out


def cold_loads(client, model: bytes, n: int = 3) -> list[tuple[float, float]]:
    """(seconds of ``Client.load`` after ``cache_clear``, the loader's compile_ms / 1e3), ``n`` times."""
    loads = []
    for _ in range(n):
        client._request("cache_clear", {})
        seconds, loaded = _timed(lambda: client.load(model))
        assert not loaded.cached
        loads.append((seconds, loaded.compile_ms / 1e3))
        loaded.unload()
    return loads


def run() -> list[Ratio]:
    from compiler_testmodels import resnet

    model = resnet()
    cache = tempfile.mkdtemp(prefix="npud-bench-cache-")
    daemon = LocalDaemon("--device", PRESET, "--cache-dir", cache)
    try:
        with npu.connect(daemon.endpoint, timeout=120) as client:
            client.load(model).unload()   # a started compiler worker, as after the first load
            loads = cold_loads(client, model)
            breakdown = steps(model, client)
    finally:
        daemon.stop()
        shutil.rmtree(cache, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; ResNet-50 {len(model) / 1e6:.0f} MB")
    print("cold Client.load through the daemon (total / loader's compile_ms / rest):")
    for total, loader in loads:
        print(f"  {total * 1e3:7.0f} ms / {loader * 1e3:7.0f} ms / {(total - loader) * 1e3:7.0f} ms")
    print("the steps, one at a time in this process:")
    for name, seconds in breakdown:
        print(f"  {name:<46} {seconds * 1e3:8.1f} ms")
    total = statistics.median(t for t, _ in loads)
    return [Ratio("ResNet-50 cold compile (Client.load) vs goal", total, GOAL_S, "ms", 1e3,
                  f"<= 1.0x: {GOAL_S * 1e3:.0f} ms")]


def main() -> None:
    report("Cold compile breakdown", run())


if __name__ == "__main__":
    main()
