"""Moving 64 MiB through buffer objects vs numpy's own copy, in the same run.

- write+read: Buffer.write then Buffer.read_into (and read(), which allocates)
  of 64 MiB, against two np.copyto of 64 MiB between warm arrays.  Local
  clients move data through the mapping; the message path (map_io=False, for
  clients that cannot map) is measured too.  Goal: >= 0.7x memcpy bandwidth.
- read() alone, which allocates its result, against numpy's ``copy()`` of a warm array, which
  allocates too.  Goal: >= 0.9x.
- mapped: np.copyto into Buffer.map()'s view vs into a plain array.  Goal:
  memcpy speed (1.0x).
Ratios here are of bandwidth: higher is better.
Run: python -m bench.bench_buffers
"""

from __future__ import annotations

import numpy as np

import npu

from .common import Ratio, compare, report

SIZE = 64 << 20


def run(rounds: int = 5) -> list[Ratio]:
    src = np.random.default_rng(0).integers(0, 255, SIZE, dtype=np.uint8)
    dst = np.empty_like(src)
    back = np.empty_like(src)
    dst[:] = 1
    back[:] = 1

    def memcpy_pair():  # what write+read moves: the bytes in, and back out
        np.copyto(dst, src)
        np.copyto(back, dst)

    results = []
    with npu.local() as client:
        buf = client.alloc(SIZE)

        def write_read_into():
            buf.write(src)
            buf.read_into(back)

        def write_read():
            buf.write(src)
            buf.read()

        view = buf.map()

        def mapped():
            np.copyto(view, src)

        def plain():
            np.copyto(dst, src)

        buf.write(src)

        def read_alloc():      # what a user who wants the bytes and has no array writes
            buf.read()

        def numpy_copy():      # the same, from an array: numpy allocates the copy
            src.copy()

        for name, fn, base, goal in [
            ("64 MiB write+read_into (mapped path)", write_read_into, memcpy_pair, ">= 0.7x"),
            ("64 MiB write+read() (allocates result)", write_read, memcpy_pair, ">= 0.7x"),
            ("64 MiB read() vs numpy copy() (both allocate)", read_alloc, numpy_copy, ">= 0.9x"),
            ("64 MiB copy into Buffer.map() view", mapped, plain, "1.0x"),
        ]:
            cand, baseline = compare(fn, base, n=3, rounds=rounds)
            results.append(Ratio(name, cand, baseline, "ms", 1e3, goal, higher_is_better=True))

        with npu.connect(client.endpoint, map_io=False) as remote_like:
            rbuf = remote_like.alloc(SIZE)

            def message_path():
                rbuf.write(src)
                rbuf.read_into(back)
            cand, baseline = compare(message_path, memcpy_pair, n=1, rounds=3)
            results.append(Ratio("64 MiB write+read_into (message path)", cand, baseline, "ms", 1e3,
                                 "none: for clients that cannot map", higher_is_better=True))
            rbuf.free()
        buf.free()
    return results


def main() -> None:
    report("Buffer objects vs numpy copyto (same bytes moved)", run())


if __name__ == "__main__":
    main()
