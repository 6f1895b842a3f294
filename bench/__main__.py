"""Run every benchmark: ``python -m bench`` (or ``make bench``); or one: ``python -m bench ipc``.

Each prints ratios against baselines measured in the same run; nothing here
asserts a time.  Record the figures in docs/PERFORMANCE.md with this command.

A benchmark named alone may take options (``python -m bench soak --seconds 60``);
its ``main(argv)`` gets them and its return value is the exit status.  ``LONG``
benchmarks take minutes and run only when named (``make soak``).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench

LONG = {"soak": "minutes of 64 clients; run `python -m bench soak` (make soak), figures in docs/RELIABILITY.md",
        "model_churn": "minutes of new models; run `python -m bench model_churn --trace`, docs/RELIABILITY.md",
        "faults": "a minute of kills and hangs; run `python -m bench faults`, figures in docs/RELIABILITY.md"}


def main(argv: list[str]) -> int:
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(bench.__path__)
                   if m.name.startswith("bench_"))
    if len(argv) > 1 and argv[0] in names and argv[1].startswith("-"):
        return importlib.import_module(f"bench.bench_{argv[0]}").main(argv[1:]) or 0
    chosen = argv or [name for name in names if name not in LONG]
    unknown = set(chosen) - set(names)
    if unknown:
        print(f"unknown benchmark(s) {', '.join(sorted(unknown))}; known: {', '.join(names)}", file=sys.stderr)
        return 2
    status = 0
    for name in chosen:
        rc = importlib.import_module(f"bench.bench_{name}").main() or 0
        status = status or rc
    if not argv:
        for name, why in LONG.items():
            print(f"(not run: {name} -- {why})")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
