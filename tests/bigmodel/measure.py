"""Peak resident memory of a process tree (a daemon, its compiler workers and device processes),
sampled from /proc while a test runs: what docs/PERFORMANCE.md records for the 2 GiB model."""

from __future__ import annotations

import os
import threading


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _sizes_and_name(pid: int) -> tuple[int, int, str]:
    """(RSS, peak address space (what RLIMIT_AS bounds), command line) of ``pid``."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmPeak"].split()[0]) * 1024, cmd
    except (OSError, KeyError, ValueError):
        return 0, 0, ""


def kind(cmd: str) -> str:
    """Which part of npud a command line is."""
    for part in ("compiler_worker", "device", "emulator"):
        if part in cmd:
            return "worker" if part == "compiler_worker" else "device"
    return "daemon"


class PeakRss:
    """``with PeakRss(pid) as peak:`` samples the tree under ``pid`` every ``interval`` seconds;
    ``peak.by_kind`` is then the largest RSS seen of one process of each kind (daemon, worker,
    device), ``peak.address_space`` the largest VmPeak of each kind, and ``peak.total`` the
    largest RSS summed over the tree."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval = pid, interval
        self.by_kind: dict[str, int] = {}
        self.address_space: dict[str, int] = {}
        self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            pids, todo = [], [self.pid]
            while todo:
                p = todo.pop()
                pids.append(p)
                todo.extend(_children(p))
            total = 0
            for p in pids:
                rss, vm_peak, cmd = _sizes_and_name(p)
                total += rss
                k = kind(cmd) if p != self.pid else "daemon"
                self.by_kind[k] = max(self.by_kind.get(k, 0), rss)
                self.address_space[k] = max(self.address_space.get(k, 0), vm_peak)
            self.total = max(self.total, total)
