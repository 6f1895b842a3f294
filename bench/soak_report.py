"""The soak's report: markdown tables of operations, errors, latencies and memory over time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from bench.bench_soak import SoakResult


def _pct(values: list[float]) -> str:
    if not values:
        return f"{'-':>8} {'-':>8} {'-':>8} {'-':>8}"
    p50, p90, p99 = np.percentile(values, [50, 90, 99]) * 1e3
    return f"{p50:8.1f} {p90:8.1f} {p99:8.1f} {max(values) * 1e3:8.1f}"


def render(r: "SoakResult", kinds, rows: int = 12) -> str:
    """The results as markdown-ready text: operations, jobs, errors, latencies, memory over time."""
    t = r.tally
    out = [f"## Load soak: {r.clients} clients in {r.procs} processes, {r.seconds:.0f} s "
           f"(warm-up {r.warmup_s:.0f} s); load average before {r.load_before[0]:.2f}, "
           f"after {r.load_after[0]:.2f} (1 min)", ""]
    if r.daemon_died:
        out += [f"**The daemon died: {r.daemon_died}.**  The counts below are what clients had reported "
                "by then (those of unfinished generator processes are lost).", ""]
    out += ["| kind | ops | ops ok | jobs | correct | wrong | failed | lost | late |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind in kinds:
        out.append(f"| {kind} | {t.ops[kind]} | {t.ops_ok[kind]} | {t.jobs[kind]} | {t.correct[kind]} | "
                   f"{t.wrong[kind]} | {t.failed[kind]} | {t.lost[kind]} | {t.late[kind]} |")
    out.append(f"| **all** | {sum(t.ops.values())} | {sum(t.ops_ok.values())} | {sum(t.jobs.values())} | "
               f"{sum(t.correct.values())} | {sum(t.wrong.values())} | {sum(t.failed.values())} | "
               f"{sum(t.lost.values())} | {sum(t.late.values())} |")
    per_client = t.per_client_ops or [0]
    replies = t.replies
    out += ["", f"Throughput {sum(t.ops.values()) / r.seconds:.0f} ops/s, "
                f"{sum(t.jobs.values()) / r.seconds:.0f} jobs/s; ops per client {min(per_client)}..{max(per_client)}.  "
                f"Replies checked {replies['replies']}, completions {replies['completions']}; duplicate replies "
                f"{replies['duplicate_replies']}, unasked-for replies {replies['phantom_replies']}, duplicate "
                f"completions {replies['duplicate_completions']}, reused job ids {replies['reused_job_ids']}, "
                f"mismatched wait_jobs statuses {replies['mismatched_statuses']}.  EAGAIN retried: {t.retried}.",
            ""]
    out.append("Errors by code: " + (", ".join(f"{code} {n}" for code, n in sorted(t.errors.items()))
                                     if t.errors else "none") + ".")
    for key, text in sorted(t.samples.items()):
        out.append(f"- first {key}: {text}")
    out += ["", "| latency (ms) | n | p50 | p90 | p99 | max |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for kind in sorted(t.latency):
        values = t.latency[kind]
        p = _pct(values).split()
        out.append(f"| {kind} | {len(values)} | " + " | ".join(p) + " |")
    cpu = r.cpu
    wall = r.seconds
    out += ["", "CPU during the run (cores = CPU seconds / wall seconds): " +
            ", ".join(f"{kind} {cpu.get(kind, 0.0) / wall:.2f}" for kind in ("daemon", "device", "compiler",
                                                                           "generators")) +
            f" ({r.procs} generator processes: {cpu.get('generators', 0.0) / wall / r.procs:.2f} each, far from "
            f"the one core a GIL allows).  The daemon's event-loop thread was on a CPU "
            f"{100 * r.loop_run_s / wall:.0f} % of the time and runnable but waiting for one "
            f"{100 * r.loop_wait_s / wall:.0f} % (busy {100 * (r.loop_run_s + r.loop_wait_s) / wall:.0f} %)."]
    out += _memory_table(r, rows)
    out += _marks_table(r)
    return "\n".join(out)


def _marks_table(r: "SoakResult") -> list[str]:
    """The daemon's own view at each probe mark: anonymous memory; pymalloc's arenas (Python's
    small objects) and the bytes live in them; glibc's heap, in use and free but kept; and
    what tracemalloc traces (every live Python allocation), when tracing."""
    if not r.marks:
        return []
    out = ["", "| mark | daemon anon MiB | pymalloc arenas MiB | of which live MiB | malloc in use MiB | "
               "malloc free, kept MiB | malloc mmapped MiB | traced MiB | sessions | kept jobs |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, m in r.marks:
        info, py, alive = m.get("malloc", {}), m.get("pymalloc", {}), m.get("alive", {})
        traced = f"{m['traced'] / 2**20:.1f}" if "traced" in m else "-"
        mib = [f"{v / 2**20:.1f}" if v is not None else "-" for v in
               (py.get("total"), py.get("in_blocks"), info.get("in_use"), info.get("free"), info.get("mmapped"))]
        counts = " | ".join(str(alive.get(name, "-")) for name in ("Session", "KeptJob"))
        out.append(f"| {label} | {m['anon_kib'] / 1024:.1f} | " + " | ".join(mib) + f" | {traced} | {counts} |")
    return out


def _memory_table(r: "SoakResult", rows: int) -> list[str]:
    samples = r.samples
    if not samples:
        return []
    began, ended = r.warmup_s, r.warmup_s + r.seconds
    run = [s for s in samples if began <= s.t <= ended]
    pick = run[::max(1, len(run) // rows)]
    if run and pick[-1] is not run[-1]:
        pick.append(run[-1])
    out = ["", "| t (s) | ops/s | daemon RSS MiB | daemon anon MiB | daemon shmem MiB | device procs MiB | "
               "compilers MiB | daemon fds | load 1m |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def row(label: str, s, rate: str) -> str:
        return (f"| {label} | {rate} | {s.daemon_kib / 1024:.1f} | {s.daemon_anon_kib / 1024:.1f} | "
                f"{s.daemon_shmem_kib / 1024:.1f} | {s.device_kib / 1024:.1f} | {s.compiler_kib / 1024:.1f} | "
                f"{s.daemon_fds} | {s.load1:.2f} |")
    out.append(row("idle", samples[0], "-"))
    prev = None
    for s in pick:
        rate = f"{(s.ops - prev.ops) / (s.t - prev.t):.0f}" if prev and s.t > prev.t else "-"
        out.append(row(f"{s.t - began:.0f}", s, rate))
        prev = s
    for s in r.linger:
        out.append(row(f"closed +{s.t - ended:.0f}", s, "-"))
    if not r.linger:
        out.append(row("closed", samples[-1], "-"))
    if len(run) >= 4:
        quarter, end = run[len(run) // 4], run[-1]
        tail = run[len(run) // 2:]
        slope = np.polyfit([s.t for s in tail], [s.daemon_anon_kib for s in tail], 1)[0] * 60 / 1024
        out += ["", f"Rows: `idle` is the daemon before any client connected, `t` seconds since the clock "
                    f"started (after {r.warmup_s:.0f} s of connecting and first compiles), `closed` after every "
                    "client closed its session.",
                "", f"Daemon RSS from 25 % of the run (t = {quarter.t - began:.0f} s) to the end: "
                    f"{quarter.daemon_kib / 1024:.1f} -> {end.daemon_kib / 1024:.1f} MiB "
                    f"({(end.daemon_kib - quarter.daemon_kib) / 1024:+.1f} MiB); anonymous part "
                    f"{quarter.daemon_anon_kib / 1024:.1f} -> {end.daemon_anon_kib / 1024:.1f} MiB "
                    f"({(end.daemon_anon_kib - quarter.daemon_anon_kib) / 1024:+.1f} MiB; least-squares slope over "
                    f"the second half {slope:+.2f} MiB/min); device processes {quarter.device_kib / 1024:.1f} -> "
                    f"{end.device_kib / 1024:.1f} MiB; compiler workers {quarter.compiler_kib / 1024:.1f} -> "
                    f"{end.compiler_kib / 1024:.1f} MiB; daemon fds {quarter.daemon_fds} -> {end.daemon_fds}.  "
                    f"Compile cache at the end: {r.cache_entries} entries, {r.cache_bytes / 1024:.0f} KiB on disk "
                    f"(the daemon keeps up to {r.cache_budget / 2**20:.0f} MiB of them in memory)."]
    return out


def write_csv(r: "SoakResult", path: str) -> None:
    """Every /proc sample, one row each (t: seconds since the run's clock started)."""
    import csv
    import dataclasses

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        names = [fl.name for fl in dataclasses.fields(r.samples[0])] if r.samples else []
        writer.writerow(names)
        for s in r.samples:
            writer.writerow([round(getattr(s, n) - (r.warmup_s if n == "t" else 0), 2) if n == "t"
                             else getattr(s, n) for n in names])
