"""`npuctl trace`: the daemon's job events as Chrome trace-event JSON, and a text summary.

Layout in Perfetto / chrome://tracing: one *process* per device ("npu0 (edge)"),
one *thread* per client session on it ("pid 1234 app.py s..."), one complete
("X") slice per job from the moment the device began it to the moment it
finished, and, for jobs of a loaded model, one nested slice per layer.

Per-layer slices are not measured: the device runs a model's whole command
stream as one job.  The compiler's report gives each op's modeled cycles; a
job's measured [start, end] is split among its layers in proportion to those
cycles (args.modeled = true says so).  Jobs that never ran (cancelled while
queued) appear as instant events.  Timestamps are microseconds since the
daemon started.
"""

from __future__ import annotations

import statistics

from npud.ipc_schema.usage import util_pct


def _tid(threads: dict, event: dict) -> int:
    key = (event["device"], event["session"])
    if key not in threads:
        threads[key] = len(threads) + 1
    return threads[key]


def chrome_trace(events: list[dict], models: list[dict], devices: list[dict], meta: dict) -> dict:
    layers = {(m["session"], m["model"], m["name"]): m["layers"] for m in models}   # one per partition
    names = {d["index"]: f"{d['name']} ({d['preset']})" for d in devices}
    out: list[dict] = []
    threads: dict[tuple[int, str], int] = {}
    labels: dict[tuple[int, str], str] = {}
    used_devices = set()
    for e in events:
        pid = e["device"] + 1  # trace pids are track ids: device index + 1
        tid = _tid(threads, e)
        labels[(e["device"], e["session"])] = f"pid {e['pid']} {e['client']} [{e['session']}]"
        used_devices.add(e["device"])
        label = f"{e['model_name'] or 'model ' + str(e['model'])}" if e["model"] else "stream"
        args = {"session": e["session"], "pid": e["pid"], "client": e["client"], "job": e["job"],
                "state": e["state"], "cycles": e["cycles"], "model": e["model"]}
        if "error" in e:
            args["error"] = e["error"]
        if "started_s" not in e:
            out.append({"ph": "i", "s": "t", "name": f"job {e['job']} {e['state']} (never ran)",
                        "cat": "job", "pid": pid, "tid": tid, "ts": e["finished_s"] * 1e6, "args": args})
            continue
        start = e["started_s"] * 1e6
        dur = max(e["wall_ms"] * 1e3, 0.001)
        args["queued_us"] = round(start - e["submitted_s"] * 1e6, 3)
        out.append({"ph": "X", "name": f"{label} job {e['job']}", "cat": "job", "pid": pid, "tid": tid,
                    "ts": start, "dur": dur, "args": args})
        rows = layers.get((e["session"], e["model"], e["model_name"])) if e["model"] else None
        if rows:
            total = sum(r["cycles"] for r in rows)
            t = start
            for i, r in enumerate(rows):
                share = r["cycles"] / total if total else 1 / len(rows)
                d = dur * share
                out.append({"ph": "X", "name": f"{r['op']} {r['node']}", "cat": "layer", "pid": pid, "tid": tid,
                            "ts": t, "dur": d, "args": {"layer": i, "op": r["op"], "node": r["node"],
                                                        "cycles": r["cycles"], "modeled": True}})
                t += d
    for dev in sorted(used_devices | set(names)):
        out.append({"ph": "M", "name": "process_name", "pid": dev + 1,
                    "args": {"name": names.get(dev, f"device {dev}")}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": dev + 1, "args": {"sort_index": dev}})
    for (dev, session), tid in threads.items():
        out.append({"ph": "M", "name": "thread_name", "pid": dev + 1, "tid": tid,
                    "args": {"name": labels[(dev, session)]}})
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": meta}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def busy_in_window(e: dict, start_s: float, end_s: float) -> float:
    """Seconds of a job's device time inside [start_s, end_s]: its busy time (run segments only)
    times the share of its [started, finished] span that falls inside the window."""
    if "started_s" not in e or "finished_s" not in e:
        return 0.0
    busy = e.get("busy_ms", e.get("wall_ms", 0.0)) / 1e3
    span = e["finished_s"] - e["started_s"]
    if span <= 0:
        return busy if start_s <= e["started_s"] <= end_s else 0.0
    inside = max(0.0, min(end_s, e["finished_s"]) - max(start_s, e["started_s"]))
    return busy * inside / span


def summary(events: list[dict], devices: list[dict], start_s: float, end_s: float) -> dict:
    """Per device and per client over [start_s, end_s] (daemon clock): jobs, failures, busy time,
    utilisation as npud/ipc_schema/usage.py defines it (per client: summed over its devices), latency
    percentiles."""
    cores = {d["index"]: d.get("cores", 1) for d in devices}
    duration_s = end_s - start_s

    def group(key):
        groups: dict = {}
        for e in events:
            groups.setdefault(key(e), []).append(e)
        return groups

    def stats(es):
        walls = [e["wall_ms"] for e in es if "wall_ms" in e]
        busy = {}
        for e in es:
            busy[e["device"]] = busy.get(e["device"], 0.0) + busy_in_window(e, start_s, end_s)
        return {"jobs": len(es), "done": sum(e["state"] == "done" for e in es),
                "failed": sum(e["state"] == "failed" for e in es), "busy_ms": round(sum(busy.values()) * 1e3, 3),
                "util_pct": round(sum(util_pct(b, duration_s, cores.get(d, 1)) for d, b in busy.items()), 1),
                "wall_ms_p50": round(_pct(walls, 50), 3), "wall_ms_p99": round(_pct(walls, 99), 3),
                "wall_ms_mean": round(statistics.fmean(walls), 3) if walls else 0.0,
                "cycles": sum(e["cycles"] for e in es)}
    names = {d["index"]: d["name"] for d in devices}
    per_device = [{"device": dev, "name": names.get(dev, str(dev)), **stats(es)}
                  for dev, es in sorted(group(lambda e: e["device"]).items())]
    per_client = [{"session": s, "pid": es[0]["pid"], "client": es[0]["client"],
                   "devices": sorted({e["device"] for e in es}), **stats(es)}
                  for s, es in sorted(group(lambda e: e["session"]).items())]
    return {"duration_s": round(duration_s, 3), "events": len(events), "devices": per_device,
            "clients": per_client}


def summary_text(s: dict) -> str:
    from .render import table
    cols = ["JOBS", "DONE", "FAILED", "BUSY MS", "UTIL", "WALL P50 MS", "WALL P99 MS", "CYCLES"]

    def vals(x):
        return [x["jobs"], x["done"], x["failed"], x["busy_ms"], f"{x['util_pct']:.1f}%", x["wall_ms_p50"],
                x["wall_ms_p99"], x["cycles"]]
    stopped = " (interrupted: the jobs until Ctrl-C)" if s.get("interrupted") else ""
    return (f"trace: {s['events']} job(s) over {s['duration_s']:g} s{stopped}\n\nPer device\n"
            + table(["DEV", "NAME"] + cols, [[d["device"], d["name"]] + vals(d) for d in s["devices"]],
                    empty="(no jobs)")
            + "\n\nPer client\n"
            + table(["PID", "CLIENT", "SESSION", "DEV"] + cols,
                    [[c["pid"], c["client"], c["session"], ",".join(map(str, c["devices"]))] + vals(c)
                     for c in s["clients"]], empty="(no jobs)"))
