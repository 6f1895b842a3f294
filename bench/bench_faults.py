"""Recovery times of the faults in docs/RELIABILITY.md's fault table ("Recovery times").

Run: ``python -m bench faults [--rounds 3]``.

Each fault is made for real against a private npud in test mode (one device process, one
compiler worker, ``job_timeout_ms`` = TIMEOUT_MS, which is also the deadline of every other
exchange with a device process) and timed from the moment it is made until the daemon has
recovered, as a client sees it.  Every figure is a median (min-max) over ``--rounds``, polled
every POLL_S, on a machine shared with other work: read them as orders of magnitude.  Nothing
here asserts anything (tests/npud/test_npud_orphans.py, test_npud_device_hangs.py and
test_npud_faults.py do).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np

import npu
from npu.local import LocalDaemon

from .soak_proc import alive, children, loadavg

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "compiler_worker"))

TIMEOUT_MS = 2000
POLL_S = 0.005
CONFIG = f"""
compile_workers = 1
[scheduling]
job_timeout_ms = {TIMEOUT_MS}
device_processes = 1
"""
_seeds = iter(range(1000, 10**6))   # every compile gets a model nobody compiled before


def model(seed: int | None = None) -> bytes:
    from compiler_testmodels import mlp   # a three-layer MLP: three segments for the slow fault

    return mlp(next(_seeds) if seed is None else seed)


def feeds(m) -> np.ndarray:
    return np.ones(m.inputs[0].shape, np.float32)


def until(ready: Callable[[], bool], bound_s: float = 60.0) -> float:
    """Seconds until ``ready()`` holds (polled); raises if it does not within ``bound_s``."""
    t0 = time.monotonic()
    while not ready():
        if time.monotonic() - t0 > bound_s:
            raise TimeoutError(f"not recovered within {bound_s:g} s")
        time.sleep(POLL_S)
    return time.monotonic() - t0


def start_daemon(workdir: str) -> LocalDaemon:
    config = os.path.join(workdir, "npud.toml")
    with open(config, "w") as f:
        f.write(CONFIG)
    return LocalDaemon("--test-mode", "--config", config, "--cache-dir", os.path.join(workdir, "cache"))


def kid(daemon: LocalDaemon, kind: str) -> int | None:
    """The pid of the daemon's (first) child of that kind ("device", "compiler"), if any."""
    return next((pid for pid, what in children(daemon.process.pid).items() if what == kind), None)


def device(c) -> dict:
    return c.devices()[0].info


# --- the faults: each returns {figure: seconds} ------------------------------------------------

CLIENT = """
import sys, time
sys.path[:0] = {path!r}
import numpy as np, npu
from compiler_testmodels import mlp
c = npu.connect({endpoint!r})
m = c.load(mlp(7))
c.inject_fault("slow", slow_ms=300, count=20)
jobs = [m.submit(np.ones(m.inputs[0].shape, np.float32)) for _ in range(5)]
print(c.session, flush=True)
time.sleep(600)
"""


def client_kill(d: LocalDaemon, c) -> dict:
    """A client with a running job and four queued is SIGKILLed."""
    used = device(c)["memory_used"]
    script = CLIENT.format(path=sys.path, endpoint=d.endpoint)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        session = child.stdout.readline().strip()
        time.sleep(0.2)                        # its first job is in its slow layers
        child.kill()
        t = until(lambda: not [j for j in c._request("jobs", {})["jobs"] if j["session"] == session]
                  and device(c)["memory_used"] == used)
    finally:
        child.kill()
        child.wait()
    return {"jobs cancelled, memory freed": t}


def worker_kill(d: LocalDaemon, c) -> dict:
    """The compiler worker is SIGKILLed mid-compile; the next compile needs a new worker."""
    c.load(model())                            # the worker is up
    worker = kid(d, "compiler")
    failed = {}
    with npu.connect(d.endpoint) as slow:      # a client belongs to one thread: this one to the loader
        slow.inject_fault("slow_compile", slow_ms=30_000)

        def load():
            try:
                slow.load(model())
            except npu.NpuError as exc:
                failed["at"], failed["code"] = time.monotonic(), exc.code

        thread = threading.Thread(target=load)
        thread.start()
        time.sleep(0.5)                        # it sleeps in the worker now
        t0 = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        thread.join(60)
        c.load(model())
        done = time.monotonic() - t0
    if failed.get("code") != "EIO":
        raise RuntimeError(f"the killed compile did not fail with EIO: {failed}")
    return {"that compile fails (EIO)": failed["at"] - t0, "next compile done (new worker)": done}


def device_kill(d: LocalDaemon, c) -> dict:
    """The idle device process is SIGKILLed: once with nothing to do, once with a job right after."""
    m = c.load(model(1))
    m.run(feeds(m))
    old = kid(d, "device")
    os.kill(old, signal.SIGKILL)
    restarted = until(lambda: kid(d, "device") not in (None, old) and device(c)["state"] == "ok")
    old = kid(d, "device")
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    m.run(feeds(m))
    return {"a new process, device ok": restarted, "a job submitted at once done": time.monotonic() - t0}


def device_hang_busy(d: LocalDaemon, c) -> dict:
    """A job hangs in the device (injected); another client's job is queued behind it."""
    with npu.connect(d.endpoint) as bad:       # a fresh context each round: hangs count to a ban
        mb, mg = bad.load(model(2)), c.load(model(3))
        bad.inject_fault("hang")
        t0 = time.monotonic()
        hung = mb.submit(feeds(mb))
        innocent = mg.submit(feeds(mg))
        try:
            hung.wait(60)
            raise RuntimeError("the injected hang did not fail its job")
        except npu.Timeout:
            failed = time.monotonic() - t0
        innocent.wait(60)
        done = time.monotonic() - t0
    return {f"hung job fails (ETIMEDOUT; watchdog {TIMEOUT_MS} ms)": failed, "queued innocent job done": done}


def device_hang_idle(d: LocalDaemon, c) -> dict:
    """The idle device process is SIGSTOPped; a job of a model it never saw is submitted."""
    m = c.load(model(4))
    stopped = kid(d, "device")
    os.kill(stopped, signal.SIGSTOP)
    t0 = time.monotonic()
    m.run(feeds(m), timeout=60)
    return {f"that job done (exchange deadline {TIMEOUT_MS} ms)": time.monotonic() - t0}


BUSY = """
import sys, time
sys.path[:0] = {path!r}
import numpy as np, npu
from compiler_testmodels import mlp
c = npu.connect({endpoint!r})
c.load(mlp({seed}))                     # a fresh compile: the worker is up (they start lazily)
m = c.load(mlp(5))
c.inject_fault("slow", slow_ms=5000)
m.submit(np.ones(m.inputs[0].shape, np.float32))
c.inject_fault("slow_compile", slow_ms=60_000)
print("busy", flush=True)
c.load(mlp({slow_seed}))
"""


def daemon_kill(workdir: str) -> dict:
    """A daemon whose device process runs a long job and whose worker runs a long compile is
    SIGKILLed, then started again on the same compile cache."""
    d = start_daemon(workdir)
    busy = subprocess.Popen([sys.executable, "-c", BUSY.format(path=sys.path, endpoint=d.endpoint,
                                                               seed=next(_seeds), slow_seed=next(_seeds))],
                            stdout=subprocess.PIPE, text=True)
    try:
        busy.stdout.readline()
        time.sleep(0.5)
        kids = children(d.process.pid)
        if sorted(kids.values()) != ["compiler", "device"]:
            raise RuntimeError(f"expected a busy device process and compiler worker, found {kids}")
        d.process.kill()
        d.process.wait()
        gone = until(lambda: not any(alive(k) for k in kids), 30)
    finally:
        busy.kill()
        busy.wait()
        d.stop()
    t0 = time.monotonic()
    d = start_daemon(workdir)
    try:
        ready = time.monotonic() - t0
        with npu.connect(d.endpoint) as c:
            m = c.load(model(5))
            m.run(feeds(m))
            result = time.monotonic() - t0
            cached = m.cached
    finally:
        d.stop()
    return {"its busy worker and device process gone": gone, "restart to ready": ready,
            "restart to a cached model's first result" + ("" if cached else " (NOT a cache hit)"): result}


FAULTS = [("client SIGKILL", client_kill), ("compiler worker SIGKILL", worker_kill),
          ("device process SIGKILL (idle)", device_kill), ("device hang while busy", device_hang_busy),
          ("device hang while idle (SIGSTOP)", device_hang_idle)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench faults")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv or [])
    workdir = tempfile.mkdtemp(prefix="npud-faults-")
    figures: dict[tuple[str, str], list[float]] = {}
    load_before = loadavg()[0]
    try:
        d = start_daemon(workdir)
        try:
            with npu.connect(d.endpoint) as c:
                for _ in range(args.rounds):
                    for name, fault in FAULTS:
                        for what, seconds in fault(d, c).items():
                            figures.setdefault((name, what), []).append(seconds)
        finally:
            d.stop()
        for _ in range(args.rounds):
            for what, seconds in daemon_kill(workdir).items():
                figures.setdefault(("daemon SIGKILL + restart", what), []).append(seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"## faults: recovery times, ms, median (min-max) of {args.rounds} "
          f"(load average {load_before:.1f} -> {loadavg()[0]:.1f})")
    print("| fault | recovered when | ms |\n| --- | --- | --- |")
    for (name, what), values in figures.items():
        ms = [v * 1e3 for v in values]
        print(f"| {name} | {what} | {statistics.median(ms):.0f} ({min(ms):.0f}-{max(ms):.0f}) |")
    print()
    return 0
