"""What the soak reads from /proc: memory and CPU of the daemon, its children and the load generators.

No psutil: ``/proc/<pid>/status`` for resident memory (``VmRSS`` and its
anonymous part ``RssAnon`` -- the Python heap, where a leak shows; buffer
objects are shared memfds and count as ``RssShmem``), ``/proc/<pid>/stat`` for
the parent pid and CPU time, ``/proc/<pid>/cmdline`` to tell a device process
from a compiler worker.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

TICK = os.sysconf("SC_CLK_TCK")


def status_kib(pid: int) -> dict[str, int]:
    """``VmRSS``, ``RssAnon``, ``RssShmem`` (KiB) of a live process; {} if it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssShmem"):
                    out[key] = int(rest.split()[0])
    except OSError:
        return {}
    return out


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()   # after the command name, which may hold spaces


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, 0.0 if it is gone."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / TICK if fields else 0.0


def schedstat(pid: int) -> tuple[float, float]:
    """Seconds the process's main thread spent on a CPU and waiting runnable for one (0, 0 if gone).

    Their sum over a wall-clock interval near 1 means the thread never went idle: for the
    daemon's event loop, that it was the bottleneck (and the wait part, that the machine was
    short of CPU for it).
    """
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            run_ns, wait_ns = f.read().split()[:2]
    except OSError:
        return 0.0, 0.0
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def alive(pid: int) -> bool:
    """Whether ``pid`` runs: it exists and is not a zombie (an orphan's reaper may be slow to reap)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def children(parent: int) -> dict[int, str]:
    """The direct children of ``parent``: pid -> "device", "compiler" or "other"."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields is None or int(fields[1]) != parent:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        out[int(entry)] = ("device" if b"npud.emulator.device_process" in cmd
                           else "compiler" if b"compiler_worker" in cmd else "other")
    return out


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def loadavg() -> tuple[float, float, float]:
    with open("/proc/loadavg") as f:
        one, five, fifteen = f.read().split()[:3]
    return float(one), float(five), float(fifteen)


@dataclass
class Sample:
    t: float                         # seconds since the sampler started
    daemon_kib: int
    daemon_anon_kib: int
    daemon_shmem_kib: int
    device_kib: int                  # all device processes, summed
    compiler_kib: int                # all compiler workers, summed
    daemon_fds: int
    ops: int                         # operations the clients finished so far (all of them)
    load1: float


@dataclass
class Sampler:
    """Samples the daemon every ``every`` seconds in a thread until ``stop()``.

    ``progress()`` returns the clients' finished-operation count, sampled with
    the memory so throughput can be read against it.  CPU time is taken per
    process as it is seen, so a child replaced mid-run still counts.
    """

    daemon_pid: int
    every: float = 1.0
    progress: object = None
    samples: list[Sample] = field(default_factory=list)
    _cpu: dict[int, tuple[str, float]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "Sampler":
        self.t0 = time.monotonic()
        self.sample()       # the daemon as it was before anything else happened
        self._thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> Sample:
        kids = children(self.daemon_pid)
        mine = status_kib(self.daemon_pid)
        per_kind = {"device": 0, "compiler": 0}
        for pid, kind in kids.items():
            per_kind[kind] = per_kind.get(kind, 0) + status_kib(pid).get("VmRSS", 0)
            self._cpu[pid] = (kind, cpu_seconds(pid))
        self._cpu[self.daemon_pid] = ("daemon", cpu_seconds(self.daemon_pid))
        s = Sample(time.monotonic() - self.t0, mine.get("VmRSS", 0), mine.get("RssAnon", 0),
                   mine.get("RssShmem", 0), per_kind["device"], per_kind["compiler"],
                   open_fds(self.daemon_pid), self.progress() if self.progress else 0, loadavg()[0])
        self.samples.append(s)
        return s

    def cpu_by_kind(self) -> dict[str, float]:
        """CPU seconds used so far by the daemon, its device processes and its compiler workers."""
        out: dict[str, float] = {}
        for kind, seconds in self._cpu.values():
            out[kind] = out.get(kind, 0.0) + seconds
        return out
