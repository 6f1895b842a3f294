"""Sharing the NPU: throughput and latency with 1, 8 and 64 concurrent clients.

Run: ``python -m bench sharing``.

A private daemon with one device of two device processes (``scheduling.
device_processes = 2``: two modeled cores running jobs in parallel).  Each
client is a session of its own in a thread of its own (a ``Client`` belongs to
one thread; the threads wait in ZeroMQ, outside the GIL), loads the same small
model (the test suite's 4x32 MLP; a compile-cache hit after the first) and runs
it in a loop for a fixed time: ``Model.run`` = write the input, ``run_model``,
``wait``, read the output.  Reported per client count: jobs per second (all
clients), p50 and p99 submit-to-completion latency, and the ratio against the
single-client figures of the same run.

Goals (issue 6): aggregate throughput with 8 clients >= 1.5x one client on 2
cores; p99 with 64 clients <= 10x its p50.  Nothing here asserts a time.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

import npu
from npu.local import LocalDaemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "compiler_worker"))

DURATION_S = 3.0
CLIENTS = (1, 8, 64)


def _client_loop(endpoint: str, model_bytes: bytes, start: threading.Barrier, go: threading.Event,
                 stop_at: list, out: list, errors: list) -> None:
    try:
        with npu.connect(endpoint, name="bench") as c:
            model = c.load(model_bytes)
            x = np.random.default_rng(0).standard_normal(model.inputs[0].shape).astype(np.float32)
            model.run(x)                      # warm: buffers allocated, program loaded on a core
            start.wait()
            go.wait()
            lat = []
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                model.run(x)
                lat.append(time.perf_counter() - t0)
            out.append(lat)
    except Exception as exc:   # reported, not raised: one failure must not hang the barrier
        errors.append(exc)
        start.abort()
        go.set()


def measure(endpoint: str, model_bytes: bytes, n: int, duration: float = DURATION_S) -> dict:
    start = threading.Barrier(n + 1)
    go = threading.Event()
    stop_at = [0.0]
    out: list = []
    errors: list = []
    threads = [threading.Thread(target=_client_loop, args=(endpoint, model_bytes, start, go, stop_at, out, errors))
               for _ in range(n)]
    for t in threads:
        t.start()
    start.wait()                      # every client is connected, loaded and warm
    began = time.perf_counter()
    stop_at[0] = began + duration
    go.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    elapsed = max(time.perf_counter() - began, duration)
    lat = sorted(x for client in out for x in client)
    return {"clients": n, "jobs": len(lat), "jobs_per_s": len(lat) / elapsed,
            "p50_ms": statistics.median(lat) * 1e3, "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
            "fair": [len(c) for c in out]}


def main() -> None:
    from compiler_testmodels import mlp

    tmp = tempfile.mkdtemp(prefix="bench-sharing-")
    cfg = os.path.join(tmp, "npud.toml")
    with open(cfg, "w") as f:
        f.write("[limits]\nmax_sessions = 256\n\n[scheduling]\ndevice_processes = 2\n")
    daemon = LocalDaemon("--config", cfg, "--cache-dir", os.path.join(tmp, "cache"))
    try:
        model = mlp()
        rows = [measure(daemon.endpoint, model, n) for n in CLIENTS]
    finally:
        daemon.stop()
    base = rows[0]
    print("## Sharing the NPU (one device, 2 device processes; small MLP; "
          f"{DURATION_S:.0f} s per point)")
    print(f"{'clients':>8} {'jobs/s':>9} {'vs 1':>6} {'p50 ms':>8} {'p99 ms':>8} {'p99/p50':>8} "
          f"{'jobs per client min..max':>26}")
    for r in rows:
        fair = r["fair"]
        print(f"{r['clients']:>8} {r['jobs_per_s']:>9.0f} {r['jobs_per_s'] / base['jobs_per_s']:>5.2f}x "
              f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['p99_ms'] / r['p50_ms']:>7.1f}x "
              f"{min(fair):>12}..{max(fair)}")
    eight, many = rows[1], rows[2]
    print(f"goal: 8 clients >= 1.5x one client: {eight['jobs_per_s'] / base['jobs_per_s']:.2f}x "
          f"({'met' if eight['jobs_per_s'] >= 1.5 * base['jobs_per_s'] else 'not met'}); "
          f"64 clients p99 <= 10x p50: {many['p99_ms'] / many['p50_ms']:.1f}x "
          f"({'met' if many['p99_ms'] <= 10 * many['p50_ms'] else 'not met'})")
    print()


if __name__ == "__main__":
    main()
