"""Where the daemon's memory goes while new models keep arriving (docs/RELIABILITY.md, "After
the fixes").

Run: ``python -m bench model_churn [--seconds 200] [--clients 4] [--cache-mib 16] [--trace]``.

A private npud (its in-memory compile cache capped at ``--cache-mib``, so that the cache is full
early and what grows past it shows) and ``--clients`` sessions, each loading a never-seen MLP,
running it once and unloading it, in a loop.  At a third, two thirds and the end of the run it
prints the daemon's RSS and the models loaded so far, hence the growth per new model.  With
``--trace`` the daemon runs under tracemalloc and the largest growths between the first and the
last mark are printed by allocating line (slower; the figures then include tracemalloc's own
memory).  Nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import npu

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "compiler_worker"))

# The daemon under test: npud.main (the cache cap is its config's cache_memory_bytes) and, with
# --trace, a SIGUSR1 handler that writes a tracemalloc snapshot (numbered) into the directory given.
DAEMON = """
import os, signal, sys, tracemalloc
snap_dir, trace = sys.argv[1], sys.argv[2] == "1"
if trace:
    tracemalloc.start(8)
marks = [0]
def snapshot(signum, frame):
    marks[0] += 1
    if trace:
        tracemalloc.take_snapshot().dump(os.path.join(snap_dir, f"snap{marks[0]}.bin"))
signal.signal(signal.SIGUSR1, snapshot)
from npud.main import main
sys.exit(main(sys.argv[3:]))
"""


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main(argv: list[str] | None = None) -> int:
    from compiler_testmodels import mlp

    p = argparse.ArgumentParser(prog="python -m bench model_churn")
    p.add_argument("--seconds", type=float, default=200)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--cache-mib", type=int, default=16)
    p.add_argument("--trace", action="store_true")
    args = p.parse_args(argv or [])
    work = tempfile.mkdtemp(prefix="npud-churn-")
    endpoint = f"ipc://{work}/npud.sock"
    config = os.path.join(work, "npud.toml")
    with open(config, "w") as f:
        f.write(f"cache_memory_bytes = {args.cache_mib << 20}\n")
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON, work, "1" if args.trace else "0",
                               "--config", config, "--endpoint", endpoint, "--cache-dir",
                               os.path.join(work, "cache"), "--log-level", "error"])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                npu.connect(endpoint, timeout=2).close()
                break
            except npu.NpuError:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("npud did not start")
                time.sleep(0.2)
        stop = time.monotonic() + args.seconds
        loaded = [0]

        def client(k: int) -> None:
            with npu.connect(endpoint) as c:
                seed = (k + 1) * 10_000_000
                while time.monotonic() < stop:
                    seed += 1
                    model = c.load(mlp(seed=seed))
                    model.run(np.zeros(model.inputs[0].shape, np.float32))
                    model.unload()
                    loaded[0] += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        t0, rows = time.monotonic(), []
        for fraction in (1 / 3, 2 / 3, 1.0):
            time.sleep(max(0.0, t0 + fraction * args.seconds - 1 - time.monotonic()))
            daemon.send_signal(signal.SIGUSR1)
            rows.append((time.monotonic() - t0, loaded[0], rss_mib(daemon.pid)))
            print(f"t {rows[-1][0]:6.1f} s  models {rows[-1][1]:7d}  daemon RSS {rows[-1][2]:7.1f} MiB",
                  flush=True)
        for t in threads:
            t.join()
        (_, m0, r0), (_, m1, r1) = rows[0], rows[-1]
        print(f"growth from the first mark: {r1 - r0:.1f} MiB over {m1 - m0} new models = "
              f"{(r1 - r0) * 1024 / max(1, m1 - m0):.1f} KiB per model")
        if args.trace:
            import tracemalloc

            time.sleep(1)   # the last snapshot is written by the daemon's signal handler
            first = tracemalloc.Snapshot.load(os.path.join(work, "snap1.bin"))
            last = tracemalloc.Snapshot.load(os.path.join(work, "snap3.bin"))
            for stat in last.compare_to(first, "traceback")[:6]:
                print(f"{stat.size_diff / 2**20:8.2f} MiB {stat.count_diff:8d} blocks  "
                      + " <- ".join(line.strip() for line in stat.traceback.format()[-6::2]))
    finally:
        daemon.terminate()
        daemon.wait(10)
        subprocess.run(["rm", "-rf", work])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
