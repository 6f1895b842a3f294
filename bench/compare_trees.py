"""The daemon's request paths in this tree vs another checkout of npud, with the same client.

    git archive <commit> | tar -x -C /tmp/old && python -m bench.compare_trees /tmp/old

Starts one private daemon from each tree and times ping, small writes and reads (inline in the
daemon) and a 64 KiB write through ``Client._request`` (the message path), in interleaved rounds
(bench.common.compare): what a change to the daemon's dispatcher costs, with the noise of a shared
machine hurting both alike.  Not part of ``python -m bench``: it needs the other tree.
"""

from __future__ import annotations

import sys

import npu
from npu.local import LocalDaemon

from .common import Ratio, compare, daemon_of_tree, report


def run(other_tree: str, n: int = 2000) -> list[Ratio]:
    ours = LocalDaemon()
    theirs = daemon_of_tree(other_tree)
    try:
        with npu.connect(ours.endpoint) as a, npu.connect(theirs.endpoint) as b:
            buffers = {a: a.alloc(65536).handle, b: b.alloc(65536).handle}
            cases = {
                "ping": lambda c: c._request("ping", {}),
                "write 64 B": lambda c: c._request("write", {"handle": buffers[c], "offset": 0, "data": b"x" * 64}),
                "read 64 B": lambda c: c._request("read", {"handle": buffers[c], "offset": 0, "size": 64}),
                "write 64 KiB": lambda c: c._request("write", {"handle": buffers[c], "offset": 0,
                                                               "data": b"x" * 65536}),
            }
            return [Ratio(f"{name}: this tree vs {other_tree}", *compare(lambda: fn(a), lambda: fn(b), n=n),
                          "us", 1e6, "~1.0x") for name, fn in cases.items()]
    finally:
        ours.stop()
        theirs.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    report("Daemon request paths, this tree vs another", run(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
