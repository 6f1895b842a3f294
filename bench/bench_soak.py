"""The load soak (issue 9): many clients mixing compiles, jobs and buffer traffic for minutes.

Run: ``python -m bench soak [--seconds 300] [--clients 64] [--procs 8]`` (or ``make soak``).
Not part of the plain ``python -m bench`` run: it takes minutes.

A private daemon (``LocalDaemon``: ipc in a fresh temporary directory, one
"edge" device with two device processes, two compiler workers, a private
compile cache) and ``--clients`` sessions, spread over ``--procs`` load
generator processes of a few threads each: one process of 64 threads would be
held back by its own GIL before the daemon is, and the figures would measure
the generator.  Each session loops over a weighted mix (``MIX``):

- ``run``: its resident model (a tiny MLP of its own) on a fresh input;
- ``pipeline``: four runs submitted at once, waited for with one ``wait_jobs``;
- ``job``: a hand-built command stream ``dst += src`` on two fresh buffers
  (alloc, write, submit, wait, read, free);
- ``chain``: two such jobs, the second ``after`` the first and reading its
  output: wrong unless the fence ordered them;
- ``buffers``: alloc a buffer, check it reads as zeros, write, read back, free
  (half the sessions through mappings, half through write/read messages);
- ``compile``: a new model (fresh weights, random width) -- a real compile in
  a worker -- written to a file, loaded, run once, unloaded;
- ``load_cached``: one of a few models shared by all sessions, sent as bytes:
  a compile-cache hit;
- ``load_digest``: one of the session's earlier model files again: the client
  sends the digest only.

Every input is unique and every output is known (numpy computes it), so each
completion is checked (``soak_workload``).  ``soak_ledger`` counts lost, duplicated and wrong
completions, errors by code and latencies; ``soak_proc`` samples the daemon's
memory from /proc.  The exit status is nonzero if any completion was lost,
duplicated or wrong, a reply was duplicated or unasked for, or an error other
than EAGAIN (admission control, retried) occurred.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from bench import soak_probe, soak_report
from bench.soak_ledger import Tally
from bench.soak_proc import Sampler, loadavg, schedstat
from bench.soak_workload import MIX, SHARED_MODELS, Session, SessionPlan, tiny_mlp
from npud.compile_cache import MEMORY_BYTES

DAEMON_CONFIG = """\
compile_workers = 2
[limits]
max_sessions = 1024
[scheduling]
device_processes = 2
"""


# --- a load generator process ------------------------------------------------------------

def _generator(index: int, plans: list[SessionPlan], ready, go, stop_at, progress, results) -> None:
    """Run ``plans`` as threads; report ("ready", index) once all are connected, then the merged
    Tally and this process's CPU seconds while the clock ran."""
    shared = [tiny_mlp(10_000 + i, 16) for i in range(SHARED_MODELS)]
    tallies: list[Tally] = []
    sessions: list[Session | None] = [None] * len(plans)
    barrier = threading.Barrier(len(plans) + 1)
    lock = threading.Lock()

    def client_thread(k: int) -> None:
        session = None
        try:
            session = sessions[k] = Session(plans[k], shared)
        except BaseException as exc:   # reported with the tally: a client that cannot start is a finding
            failed = Tally()
            failed.error("connect", exc)
            with lock:
                tallies.append(failed)
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        go.wait()
        if session is None:
            return
        slot = plans[k].client_id
        deadline = stop_at.value
        while time.monotonic() < deadline:
            try:
                session.step()
            except Exception as exc:   # a bug in the workload or the library: count, keep going
                session.tally.error("step", exc)
            progress[slot] = session.ops_done
        try:
            session.finish()
        except Exception as exc:
            session.tally.error("finish", exc)
        with lock:
            tallies.append(session.tally)

    threads = [threading.Thread(target=client_thread, args=(k,), daemon=True) for k in range(len(plans))]
    for t in threads:
        t.start()
    barrier.wait()
    ready.put(("ready", index))
    go.wait()
    cpu0 = _own_cpu()
    while time.monotonic() < stop_at.value:
        time.sleep(0.05)
    cpu = _own_cpu() - cpu0
    for t in threads:
        t.join()
    total = Tally()
    for tally in tallies:
        total.merge(tally)
    results.put(("done", index, total, cpu))


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- the soak ----------------------------------------------------------------------------

@dataclass
class SoakResult:
    clients: int
    procs: int
    seconds: float
    tally: Tally
    samples: list
    warmup_s: float
    cpu: dict[str, float] = field(default_factory=dict)   # CPU seconds during the run, by process kind
    load_before: tuple = ()
    load_after: tuple = ()
    cache_entries: int = 0
    cache_bytes: int = 0
    daemon_died: str = ""      # how and when the daemon ended before the soak did, if it did
    loop_run_s: float = 0.0    # the daemon's event-loop thread during the run: seconds on a CPU
    loop_wait_s: float = 0.0   # ... and seconds runnable but waiting for a CPU
    marks: list = field(default_factory=list)   # (label, soak_probe record) with --probe
    linger: list = field(default_factory=list)  # samples after every client closed, before any trim
    cache_budget: int = 0      # the daemon's in-memory compile-cache budget (cache_memory_bytes)

    def problems(self) -> list[str]:
        """``Tally.problems()``, plus the daemon's death: empty when the soak passed."""
        return ([self.daemon_died] if self.daemon_died else []) + self.tally.problems()


class DaemonDied(Exception):
    """The daemon exited while the soak was running."""


def run_soak(*, clients: int = 64, seconds: float = 300.0, procs: int = 8, wait_timeout: float = 60.0,
             sample_every: float = 1.0, seed: int = 0, mix: dict[str, int] | None = None,
             daemon_nofile: int = 0, daemon_args: tuple[str, ...] = (), probe: bool = False,
             trace: int = 0, linger_s: float = 0.0, cache_mib: int = 0) -> SoakResult:
    """Start a private daemon, run the soak for ``seconds`` after every client connected, and
    return what it saw.  If the daemon dies, the clients are stopped and the result says so
    (``daemon_died``) with whatever the clients had counted; raises only if a load generator
    process fails.

    ``daemon_nofile`` > 0 lowers the daemon's soft limit of open files to that (systemd gives
    services 1024 unless the unit says otherwise).

    ``cache_mib`` > 0 sets the daemon's in-memory compile-cache budget (``cache_memory_bytes``;
    default 256 MiB).  ``linger_s`` > 0: after every client closed, the daemon is left idle that long (sampled as
    ``linger``).  ``probe``: the daemon records its memory (``soak_probe``) at idle, after the
    clients connected, at half and 90 % of the run, after ``linger_s`` and after a
    ``malloc_trim(0)`` (``marks``); with ``trace`` > 0 under tracemalloc keeping that many frames, with a snapshot at each mark
    (the snapshots stay in ``probe_dir``, printed by ``render_probe``).
    """
    from npu.local import LocalDaemon

    tmp = tempfile.mkdtemp(prefix="npud-soak-")
    cfg = os.path.join(tmp, "npud.toml")
    with open(cfg, "w") as f:
        f.write(DAEMON_CONFIG.replace("[limits]", f"cache_memory_bytes = {cache_mib << 20}\n[limits]")
                if cache_mib else DAEMON_CONFIG)
    cache = os.path.join(tmp, "cache")
    load_before = loadavg()
    probe_dir = os.path.join(tmp, "probe")
    env = None
    if probe or trace:
        os.mkdir(probe_dir)
        env = soak_probe.probe_env(probe_dir, trace > 0, trace)
    daemon = LocalDaemon("--config", cfg, "--cache-dir", cache, *daemon_args, env=env)
    marks: list = []
    timers: list[threading.Timer] = []

    def mark(label: str) -> None:
        if env is not None and daemon.process.poll() is None:
            try:
                marks.append((label, soak_probe.mark(daemon.process.pid, probe_dir)))
            except (TimeoutError, ProcessLookupError) as exc:
                print(f"probe: no mark {label!r}: {exc}", file=sys.stderr)
    mark("idle")
    if daemon_nofile:
        hard = resource.prlimit(daemon.process.pid, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(daemon.process.pid, resource.RLIMIT_NOFILE, (daemon_nofile, hard))
    ctx = mp.get_context("spawn")     # fresh interpreters: no forked ZeroMQ state or threads
    procs = max(1, min(procs, clients))
    progress = ctx.RawArray("q", clients)
    sampler = Sampler(daemon.process.pid, sample_every, progress=lambda: sum(progress)).start()
    workers: list = []
    tally, gen_cpu, died, warmup_s, cpu0, cpu1, linger = Tally(), 0.0, "", 0.0, {}, {}, []
    sched0 = sched1 = (0.0, 0.0)
    stop_at = ctx.RawValue("d", 0.0)

    def alive() -> None:
        if daemon.process.poll() is not None:
            raise DaemonDied(f"the daemon exited with status {daemon.process.returncode} "
                             f"{time.monotonic() - sampler.t0:.0f} s after it started (its stderr is above)")
    try:
        import npu

        with npu.connect(daemon.endpoint) as probe:
            preset = probe.devices()[0].preset
        plans = [SessionPlan(i, daemon.endpoint, tmp, preset, map_io=i % 2 == 0, wait_timeout=wait_timeout,
                             seed=seed, mix=dict(mix or MIX)) for i in range(clients)]
        ready, results = ctx.Queue(), ctx.Queue()
        go = ctx.Event()
        for p in range(procs):
            worker = ctx.Process(target=_generator, args=(p, plans[p::procs], ready, go, stop_at, progress, results),
                                 name=f"soak-gen{p}", daemon=True)
            worker.start()
            workers.append(worker)
        _await_all(ready, procs, workers, 120.0 + clients, alive)
        warmup_s = time.monotonic() - sampler.t0
        cpu0, sched0 = sampler.cpu_by_kind(), schedstat(daemon.process.pid)
        mark("connected")
        stop_at.value = time.monotonic() + seconds
        go.set()
        if env is not None:
            timers = [threading.Timer(f * seconds, mark, args=(label,)) for f, label in
                      ((0.5, "half"), (0.9, "90%"))]
            for timer in timers:
                timer.daemon = True
                timer.start()
        for _, _index, part, cpu in _await_all(results, procs, workers, seconds + 2 * wait_timeout + 60, alive):
            tally.merge(part)
            gen_cpu += cpu
        for worker in workers:
            worker.join(10)
        sched1 = schedstat(daemon.process.pid)
        sampler.sample()
        cpu1 = sampler.cpu_by_kind()
        for timer in timers:
            timer.join()
        linger = _linger(sampler, linger_s)
        mark("closed")
        if env is not None:
            soak_probe.trim(daemon.process.pid, probe_dir)
            mark("trimmed")
    except DaemonDied as exc:
        died = str(exc)
        stop_at.value = time.monotonic()   # the clients stop; what they counted is lost with them
    finally:
        for timer in timers:
            timer.cancel()
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        sampler.stop()
        entries = [os.path.getsize(os.path.join(cache, name)) for name in os.listdir(cache)
                   if name.endswith(".npux")] if os.path.isdir(cache) else []
        daemon.stop()
        if trace and marks:
            print(render_probe(probe_dir, marks))
        shutil.rmtree(tmp, ignore_errors=True)
    cpu = {kind: cpu1.get(kind, 0.0) - cpu0.get(kind, 0.0) for kind in cpu1}
    cpu["generators"] = gen_cpu
    return SoakResult(clients, procs, seconds, tally, sampler.samples, warmup_s, cpu, load_before, loadavg(),
                      len(entries), sum(entries), died, sched1[0] - sched0[0], sched1[1] - sched0[1],
                      marks, linger, cache_budget=(cache_mib << 20) or MEMORY_BYTES)


def _linger(sampler: Sampler, seconds: float) -> list:
    """Samples of the idle daemon for ``seconds`` after the clients left (the sampler keeps going)."""
    start = len(sampler.samples)
    time.sleep(seconds)
    sampler.sample()
    return sampler.samples[start:]


def render_probe(directory: str, marks: list, top: int = 15) -> str:
    """What grew in the daemon's heap between the tracemalloc snapshots of ``marks``: idle ->
    the last mark under load, and idle -> after the clients left (and after the trim)."""
    n = {label: record["n"] for label, record in marks if "n" in record and "traced" in record}
    out = []
    under_load = "90%" if "90%" in n else "half"
    for a, b in (("idle", under_load), (under_load, "closed"), ("idle", "trimmed")):
        if a in n and b in n:
            out.append(f"tracemalloc, {a} -> {b} (by traceback, innermost frame first):")
            out.extend("  " + line for line in soak_probe.compare(directory, n[a], n[b], top))
    return "\n".join(out)


def _await_all(q, n: int, workers, timeout: float, alive) -> list:
    """``n`` messages from ``q``; raises if a generator process died first or time ran out, and
    whatever ``alive()`` raises (checked every second)."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        try:
            got.append(q.get(timeout=1.0))
        except queue.Empty:
            alive()
            dead = [w.name for w in workers if w.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"load generator process(es) {', '.join(dead)} died") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(got)} of {n} load generators answered in {timeout:.0f} s") from None
    return got


def render(r: "SoakResult", rows: int = 12) -> str:
    """The results as markdown-ready text (``soak_report``)."""
    return soak_report.render(r, MIX, rows)


def parse_mix(text: str) -> dict[str, int]:
    """``"run=3,job=1"`` -> {"run": 3, "job": 1}; names must be ops of ``MIX``."""
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in MIX or not weight.strip().isdigit():
            raise argparse.ArgumentTypeError(f"{part!r}: expected OP=WEIGHT with OP one of {', '.join(MIX)}")
        mix[name.strip()] = int(weight)
    return mix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="duration after warm-up (default 300)")
    parser.add_argument("--clients", type=int, default=64, help="client sessions (default 64)")
    parser.add_argument("--procs", type=int, default=8, help="load generator processes (default 8)")
    parser.add_argument("--wait-timeout", type=float, default=60.0,
                        help="seconds a job may take before it counts as lost (default 60)")
    parser.add_argument("--sample-every", type=float, default=1.0, help="seconds between /proc samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", type=parse_mix, default=None,
                        help="weights of the ops, e.g. run=1,compile=1 (default: " +
                             ",".join(f"{k}={v}" for k, v in MIX.items()) + ")")
    parser.add_argument("--daemon-nofile", type=int, default=0,
                        help="lower the daemon's soft limit of open files to this (systemd's default: 1024)")
    parser.add_argument("--cache-mib", type=int, default=0,
                        help="the daemon's in-memory compile-cache budget in MiB (default: its own, 256)")
    parser.add_argument("--linger", type=float, default=10.0,
                        help="seconds the daemon is watched idle after every client closed (default 10)")
    parser.add_argument("--probe", action="store_true",
                        help="the daemon records its memory and glibc's at marks, then malloc_trim(0) (soak_probe)")
    parser.add_argument("--trace", type=int, default=0, metavar="FRAMES",
                        help="--probe, with the daemon under tracemalloc keeping FRAMES frames: what grew, "
                             "by traceback (slow: the daemon runs several times slower)")
    parser.add_argument("--samples-csv", default="", help="write every /proc sample to this CSV file")
    args = parser.parse_args(argv or [])     # None: run by `python -m bench soak`, defaults
    result = run_soak(clients=args.clients, seconds=args.seconds, procs=args.procs,
                      wait_timeout=args.wait_timeout, sample_every=args.sample_every, seed=args.seed,
                      mix=args.mix, daemon_nofile=args.daemon_nofile, probe=args.probe or args.trace > 0,
                      trace=args.trace, linger_s=args.linger, cache_mib=args.cache_mib)
    print(render(result))
    if args.samples_csv:
        soak_report.write_csv(result, args.samples_csv)
    problems = result.problems()
    print()
    print("verdict: " + ("no lost, duplicated or wrong completions; no unexpected errors" if not problems
                         else "FAILED: " + "; ".join(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
