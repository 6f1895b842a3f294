"""Run every benchmark: ``python -m bench`` (or ``make bench``); or one: ``python -m bench ipc``.

Each prints ratios against baselines measured in the same run; nothing here
asserts a time.  Record the figures in docs/PERFORMANCE.md with this command.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench


def main(argv: list[str]) -> int:
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(bench.__path__)
                   if m.name.startswith("bench_"))
    chosen = argv or names
    unknown = set(chosen) - set(names)
    if unknown:
        print(f"unknown benchmark(s) {', '.join(sorted(unknown))}; known: {', '.join(names)}", file=sys.stderr)
        return 2
    for name in chosen:
        importlib.import_module(f"bench.bench_{name}").main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
