"""Looking inside the soak's daemon: tracemalloc snapshots and the C allocator's view, on signal.

``probe_env(directory, trace)`` returns the environment that makes a daemon started with it
(``LocalDaemon(env=...)``) import ``PROBE`` as its ``sitecustomize`` module.  Then, in the daemon:

- ``SIGUSR1`` writes ``mark-<n>.json`` into the directory: tracemalloc's traced bytes (if
  tracing), ``RssAnon``, and glibc's ``mallinfo2`` (bytes in use by malloc, bytes free inside
  its heap and arenas); with tracing also ``snap-<n>.bin``, a tracemalloc snapshot;
  with ``NPUD_PROBE_LONELY=1`` in the daemon's environment also ``lonely``: the types of the
  small objects alone in their pymalloc pools (what keeps pools and arenas after a busy period);
- ``SIGUSR2`` calls glibc's ``malloc_trim(0)`` and writes ``trim-<n>.json`` with ``RssAnon``
  before and after: how much of the freed memory the allocator held and could give back.

``mark(pid, directory)`` and ``trim(pid, directory)`` send the signal and wait for the file.
Signal handlers run on the daemon's main thread between bytecodes, so a mark under load
stalls its event loop for as long as the snapshot takes (~1 s): a diagnostic, not a monitor.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

PROBE = r'''
import ctypes, json, os, signal, sys, tracemalloc

_dir = os.environ["NPUD_PROBE_DIR"]
_count = {"mark": 0, "trim": 0}
if os.environ.get("NPUD_PROBE_NOGC") == "1":   # what reference counting alone frees
    import gc
    gc.disable()
if os.environ.get("NPUD_PROBE_TRACE") == "1":
    tracemalloc.start(int(os.environ.get("NPUD_PROBE_FRAMES", "10")))
try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:
    _libc = None


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


def _anon_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon"))


def _mallinfo():
    if _libc is None or not hasattr(_libc, "mallinfo2"):
        return {}
    _libc.mallinfo2.restype = _Mallinfo2
    info = _libc.mallinfo2()
    return {"heap": info.arena, "mmapped": info.hblkhd, "in_use": info.uordblks, "free": info.fordblks}


def _pymalloc():
    """pymalloc's arenas (Python objects of <= 512 bytes live there, not in malloc's heap):
    bytes mapped, and bytes in allocated blocks -- the rest is free inside pools and arenas
    that still hold a live block, so they cannot be returned."""
    path = os.path.join(_dir, ".mallocstats")
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.dup2(fd, 2)
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    out = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.rpartition("=")
            key = key.strip().lstrip("# ")
            if key in ("arenas allocated current", "bytes in allocated blocks", "bytes in available blocks",
                       "Total"):
                out.setdefault(key, int(value.strip().replace(",", "")))   # the first Total is pymalloc's
    return {"arenas": out.get("arenas allocated current", 0), "total": out.get("Total", 0),
            "in_blocks": out.get("bytes in allocated blocks", 0)}


def _alive():
    """Instances of the daemon's per-session and per-job classes the garbage collector tracks,
    reachable or not (nothing is collected to count them); ``KeptJob``: the finished jobs
    sessions keep (up to 1024 each, in their job tables' columns, freed with their session)."""
    import gc
    names = ("Session", "Job", "KeptJob", "LoadedModel", "Context", "BufferObject")
    counts = dict.fromkeys(names, 0)
    held = []
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in counts and type(obj).__module__.startswith("npud."):
            counts[name] += 1
            if name == "Session":
                held.append(obj)
                counts["KeptJob"] += obj.jobs.kept_count
    # What holds each session: the first thing to look at when one outlives its close.
    counts["session_holders"] = [sorted({_describe(r) for r in gc.get_referrers(s) if r is not held})
                                 for s in held]
    return counts


def _lonely(per_pool=8, top=20):
    """Which objects pin pymalloc's pools and arenas after a busy period: small objects
    (found from the collector's objects and what they refer to) grouped by their 16 KiB pool;
    those in pools holding at most ``per_pool`` of them, counted by type (str/bytes/tuple by
    length too).  A pool (and its arena) stays while one block in it lives."""
    import gc
    seen, pools = set(), {}
    for obj in gc.get_objects():
        for o in (obj, *gc.get_referents(obj)):
            if id(o) in seen:
                continue
            seen.add(id(o))
            try:
                if sys.getsizeof(o) > 512:
                    continue
            except TypeError:
                continue
            pools.setdefault(id(o) >> 14, []).append(o)
    counts = {}
    for objs in pools.values():
        if len(objs) <= per_pool:
            for o in objs:
                name = type(o).__module__ + "." + type(o).__qualname__
                if isinstance(o, (str, bytes, tuple)):
                    name += f"[{len(o)}]"
                counts[name] = counts.get(name, 0) + 1
    lonely_pools = sum(1 for objs in pools.values() if len(objs) <= per_pool)
    return {"pools": len(pools), "lonely_pools": lonely_pools,
            "types": sorted(counts.items(), key=lambda kv: -kv[1])[:top]}


def _describe(obj):
    if type(obj).__name__ == "frame":
        return f"frame {obj.f_code.co_filename.rsplit('/', 2)[-1]}:{obj.f_code.co_name}"
    if type(obj).__name__ == "coroutine":
        return f"coroutine {obj.cr_code.co_filename.rsplit('/', 2)[-1]}:{obj.cr_code.co_name}"
    if isinstance(obj, dict):
        keys = [k for k in list(obj)[:3] if isinstance(k, str)]
        return f"dict({','.join(keys)})"
    return type(obj).__module__ + "." + type(obj).__qualname__


def _write(name, record):
    tmp = os.path.join(_dir, "." + name)
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(_dir, name))


def _mark(signum, frame):
    _count["mark"] += 1
    n = _count["mark"]
    record = {"anon_kib": _anon_kib(), "malloc": _mallinfo(), "pymalloc": _pymalloc(), "alive": _alive()}
    if os.environ.get("NPUD_PROBE_LONELY") == "1":
        record["lonely"] = _lonely()
    if tracemalloc.is_tracing():
        record["traced"], record["traced_peak"] = tracemalloc.get_traced_memory()
        tracemalloc.take_snapshot().dump(os.path.join(_dir, f"snap-{n}.bin"))
    _write(f"mark-{n}.json", record)


def _trim(signum, frame):
    _count["trim"] += 1
    before = _anon_kib()
    released = _libc.malloc_trim(0) if _libc is not None else -1
    _write(f"trim-{_count['trim']}.json", {"before_kib": before, "after_kib": _anon_kib(),
                                           "released": released, "malloc": _mallinfo()})


signal.signal(signal.SIGUSR1, _mark)
signal.signal(signal.SIGUSR2, _trim)
'''


def probe_env(directory: str, trace: bool, frames: int = 10, nogc: bool = False) -> dict[str, str]:
    """The environment that loads ``PROBE`` into a daemon (writes its ``sitecustomize.py``);
    ``nogc``: the daemon runs with the cyclic garbage collector disabled."""
    with open(os.path.join(directory, "sitecustomize.py"), "w") as f:
        f.write(PROBE)
    path = os.pathsep.join([directory, *filter(None, [os.environ.get("PYTHONPATH", "")])])
    return {"PYTHONPATH": path, "NPUD_PROBE_DIR": directory, "NPUD_PROBE_TRACE": "1" if trace else "0",
            "NPUD_PROBE_FRAMES": str(frames), "NPUD_PROBE_NOGC": "1" if nogc else "0"}


def _signal_and_read(pid: int, directory: str, signum: int, name: str, timeout: float) -> dict:
    done = sorted(f for f in os.listdir(directory) if f.startswith(name + "-") and f.endswith(".json"))
    path = os.path.join(directory, f"{name}-{len(done) + 1}.json")
    os.kill(pid, signum)
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the daemon wrote no {path} in {timeout:.0f} s")
        time.sleep(0.05)
    with open(path) as f:
        record = json.load(f)
    record["n"] = len(done) + 1
    return record


def mark(pid: int, directory: str, timeout: float = 120.0) -> dict:
    """Have the daemon record its memory (and a snapshot, if tracing); the record, with ``n``."""
    return _signal_and_read(pid, directory, signal.SIGUSR1, "mark", timeout)


def trim(pid: int, directory: str, timeout: float = 30.0) -> dict:
    """Have the daemon call ``malloc_trim(0)``; its anonymous memory before and after."""
    return _signal_and_read(pid, directory, signal.SIGUSR2, "trim", timeout)


def compare(directory: str, first: int, second: int, top: int = 12, frames: int = 4) -> list[str]:
    """The largest growths from snapshot ``first`` to ``second``, grouped by traceback."""
    import tracemalloc

    old = tracemalloc.Snapshot.load(os.path.join(directory, f"snap-{first}.bin"))
    new = tracemalloc.Snapshot.load(os.path.join(directory, f"snap-{second}.bin"))
    noise = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *>")]
    old, new = old.filter_traces(noise), new.filter_traces(noise)
    lines = []
    for stat in new.compare_to(old, "traceback")[:top]:
        inner_first = list(stat.traceback)[::-1]
        ours = [fr for fr in inner_first[1:] if _ours(fr.filename)][:frames - 1]
        where = " <- ".join(_where(fr) for fr in [inner_first[0], *ours])
        lines.append(f"{stat.size_diff / 2**20:+8.2f} MiB {stat.count_diff:+9d} blocks  {where}")
    return lines


def _ours(filename: str) -> bool:
    return any(f"{os.sep}{pkg}{os.sep}" in filename for pkg in ("npud", "compiler_worker", "emulator", "ipc_schema"))


def _where(frame) -> str:
    parts = frame.filename.split(os.sep)
    return f"{os.sep.join(parts[-2:])}:{frame.lineno}"


if __name__ == "__main__":   # python -m bench.soak_probe DIR FIRST SECOND: compare two snapshots
    print("\n".join(compare(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
