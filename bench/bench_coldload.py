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

``python -m bench coldload --against TREE`` alternates cold loads through this tree's daemon and
one started from another checkout (``git archive <commit> | tar -x -C TREE``), and compares their
wall time and the CPU time of all processes (daemon, compiler worker, client).

Nothing here asserts a time; the machine's load changes every figure (print ``uptime`` with them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import npu
from npu.local import LocalDaemon

from .common import Ratio, daemon_of_tree, report

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "compiler_worker"))

GOAL_S = 1.5
PRESET = "server"


def _timed(fn):
    """(seconds fn took, its result)."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


class _Steps(list):
    """(step, wall seconds, CPU seconds of this process's threads or None) in the order run."""

    def run(self, name: str, fn):
        """``fn()``, timed as step ``name``; CPU time moves less than wall time on a loaded machine."""
        cpu = time.process_time()
        seconds, result = _timed(fn)
        self.append((name, seconds, time.process_time() - cpu))
        return result


def steps(model: bytes, client=None) -> list[tuple[str, float, float | None]]:
    """(step, wall seconds, CPU seconds) for each step of a cold load, run once here on ``model``."""
    from npud.compile_cache import CachedExecutable, CompileCache, model_digest
    from npud.compiler_worker.api import compile_model
    from npud.drivers import Binding
    from npud.drivers.npu_emu import NpuEmuDriver
    from npud.emulator.config import make_config
    from npud.executable import weights_part
    from npud.memory import round_up

    config = make_config(PRESET)
    out = _Steps()
    if client is not None:
        def staging():
            buf = client.alloc(len(model))
            buf.write(model)
            buf.free()
        out.run("client: staging buffer (alloc, write, free)", staging)
    out.run("daemon: model digest of the buffer", lambda: model_digest(model))
    copy = bytearray(len(model))
    out.run("daemon: private copy + digest (a miss)", lambda: model_digest(model, copy))
    exe = out.run("worker: compile (all passes, + META)", lambda: compile_model(copy, config))
    passes = exe.meta["pass_seconds"]
    out += [(f"worker:   pass {name}", s, None) for name, s in passes.items()]
    out.append(("worker:   META and the rest", out[-len(passes) - 1][1] - sum(passes.values()), None))
    data = out.run("worker: Executable.to_bytes", exe.to_bytes)
    cached = out.run("daemon: CachedExecutable.from_bytes", lambda: CachedExecutable.from_bytes(data))
    regions = [r for r in cached.memory["regions"] if r["kind"] == "weights"]

    def copy_weights():
        for r in regions:
            dst = bytearray(max(r["size"], 1))   # fresh pages, as a new buffer object's are
            part = weights_part(cached.weights, r)
            memoryview(dst)[:len(part)] = part
    out.run("daemon: instantiate, weights copy", copy_weights)
    page = config.page_size
    bindings = [Binding(r["va"], round_up(max(r["size"], 1), page), bool(r["writable"]))
                for r in cached.memory["regions"]]
    out.run("daemon: instantiate, stream validation", lambda: NpuEmuDriver().validate(cached.stream, config, bindings))
    directory = tempfile.mkdtemp(prefix="npud-bench-coldload-")
    try:
        cache = CompileCache(Path(directory))
        out.run("daemon: cache store (off the critical path)", lambda: cache.put("0" * 64, data))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return out


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its living descendants
    (the daemon, its compiler worker, its device processes): a cold load's cost in CPU, which a
    loaded machine inflates far less than its wall time."""
    parents, cpu = {}, {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total = 0.0
    for p in cpu:
        q = p
        while q > 1 and q != pid:
            q = parents.get(q, 0)
        if q == pid:
            total += cpu[p]
    return total


class Load:
    """One cold ``Client.load``: wall seconds, the loader's part (its ``compile_ms``), and CPU
    seconds of the daemon's process tree and of this (the client's) process."""

    def __init__(self, client, daemon: LocalDaemon, model: bytes):
        client._request("cache_clear", {})
        before = tree_cpu_s(daemon.process.pid), time.process_time()
        self.wall, loaded = _timed(lambda: client.load(model))
        self.daemon_cpu = tree_cpu_s(daemon.process.pid) - before[0]
        self.client_cpu = time.process_time() - before[1]
        assert not loaded.cached
        self.loader = loaded.compile_ms / 1e3
        loaded.unload()

    def line(self) -> str:
        return (f"  {self.wall * 1e3:7.0f} ms  (loader {self.loader * 1e3:5.0f} ms, the rest "
                f"{(self.wall - self.loader) * 1e3:5.0f} ms; CPU: daemon and worker {self.daemon_cpu * 1e3:5.0f} ms, "
                f"client {self.client_cpu * 1e3:4.0f} ms)")


def _daemon(cache: str, tree: str | None = None) -> LocalDaemon:
    """A private daemon of this tree, or of the checkout at ``tree``."""
    if tree is None:
        return LocalDaemon("--device", PRESET, "--cache-dir", cache)
    return daemon_of_tree(tree, "--device", PRESET, "--cache-dir", cache)


def run(rounds: int = 3, against: str | None = None) -> list[Ratio]:
    """Cold loads through this tree's daemon (and, ``against`` another checkout, through its
    daemon too, alternating), then the steps one by one."""
    from compiler_testmodels import resnet

    model = resnet()
    trees = [None] + ([against] if against else [])
    caches = [tempfile.mkdtemp(prefix="npud-bench-cache-") for _ in trees]
    daemons, loads = [], {tree: [] for tree in trees}
    try:
        daemons = [_daemon(cache, tree) for cache, tree in zip(caches, trees)]
        clients = [npu.connect(d.endpoint, timeout=120) for d in daemons]
        for client in clients:
            client.load(model).unload()   # a started compiler worker, as after the first load
        for _ in range(rounds):
            for tree, client, daemon in zip(trees, clients, daemons):
                loads[tree].append(Load(client, daemon, model))
        breakdown = steps(model, clients[0])
        for client in clients:
            client.close()
    finally:
        for daemon in daemons:
            daemon.stop()
        for cache in caches:
            shutil.rmtree(cache, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; ResNet-50 {len(model) / 1e6:.0f} MB")
    for tree in trees:
        print(f"cold Client.load through the daemon of {tree or 'this tree'}:")
        for load in loads[tree]:
            print(load.line())
    print("the steps, one at a time in this process (wall ms, CPU ms of all its threads):")
    for name, seconds, cpu in breakdown:
        print(f"  {name:<46} {seconds * 1e3:8.1f} ms {'' if cpu is None else f'{cpu * 1e3:8.1f} ms CPU'}")
    median = {tree: statistics.median(load.wall for load in loads[tree]) for tree in trees}
    cpu = {tree: statistics.median(load.daemon_cpu + load.client_cpu for load in loads[tree]) for tree in trees}
    ratios = [Ratio("ResNet-50 cold compile (Client.load) vs goal", median[None], GOAL_S, "ms", 1e3,
                    f"<= 1.0x: {GOAL_S * 1e3:.0f} ms")]
    if against:
        ratios += [Ratio(f"cold compile, this tree vs {against}", median[None], median[against], "ms", 1e3,
                         "< 1x"),
                   Ratio(f"cold compile CPU (all processes), this tree vs {against}", cpu[None], cpu[against],
                         "ms", 1e3, "< 1x")]
    return ratios


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench coldload", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="cold loads per daemon")
    parser.add_argument("--against", metavar="TREE",
                        help="another checkout of npud (git archive <commit> | tar -x -C TREE) to alternate with")
    args = parser.parse_args(argv or [])
    report("Cold compile breakdown", run(args.rounds, args.against))


if __name__ == "__main__":
    main(sys.argv[1:])
