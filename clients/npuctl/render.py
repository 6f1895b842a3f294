"""Plain-text tables for npuctl: the same fields --json carries, for people."""

from __future__ import annotations

from collections.abc import Sequence

from .fields import device_list


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def json_bytes(value):
    """``json.dumps``'s default: JSON has no bytes, so binary fields (a device's `target_hash`)
    print as hex strings."""
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {seconds}s"
    return f"{minutes}m {seconds}s" if minutes else f"{seconds}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, empty: str = "(none)") -> str:
    """Columns padded to fit; numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) if rows else False
               for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells] if cells else [empty]
    return "\n".join(out)


def devices_table(devices: list[dict]) -> str:
    return table(
        ["IDX", "NAME", "DRIVER", "PRESET", "STATE", "UTIL", "MEMORY USED / TOTAL", "QUEUED", "RUNNING", "DONE",
         "FAILED", "BUSY", "RESETS", "BANNED"],
        [[d["index"], d["name"], _driver(d), d["preset"], d["state"], f"{d['util_pct']:.0f}%",
          f"{human_bytes(d['memory_used'])} / {human_bytes(d['memory_total'])}", d["jobs_queued"],
          d["jobs_running"], d["jobs_completed"], d["jobs_failed"], f"{d['busy_ms'] / 1000:.1f}s",
          d["resets"], d.get("banned_contexts", 0)] for d in devices])


def _driver(device: dict) -> str:
    """``name version`` of the device's driver (a daemon before drivers: npu-emu, unversioned)."""
    return f"{device.get('driver', 'npu-emu')} {device.get('driver_version', '')}".strip()


def device_params(device: dict) -> str:
    p = device["params"]
    lines = [f"{k:>22}: {v}" for k, v in sorted(p.items())]
    uuid = f", {device['uuid']}" if device.get("uuid") else ""
    return (f"device {device['index']} ({device['name']}, driver {_driver(device)}, preset {device['preset']}{uuid})\n"
            + f"{device_kernels(device)}\n" + "\n".join(lines))


def device_kernels(device: dict) -> str:
    """Which kernels its device processes run, and on how many threads each (protocol 1.6)."""
    if "kernels" not in device:
        return f"{'kernels':>22}: (not reported: no device process has started, or npud is older than 1.6)"
    threads = device.get("compute_threads", 1)
    prepared = f"; prepared weights {human_bytes(device['prepared_bytes'])}" if "prepared_bytes" in device else ""
    return (f"{'kernels':>22}: {device['kernels']}, {threads} compute thread{'s' if threads != 1 else ''} "
            f"in each of {device.get('cores', 1)} device process{'es' if device.get('cores', 1) != 1 else ''}"
            + prepared)


def clients_table(clients: list[dict]) -> str:
    return table(
        ["PID", "USER", "NAME", "SESSION", "DEV", "PRIO", "MEMORY", "BUFS", "UTIL", "SUBMITTED", "DONE", "FAILED",
         "CONNECTED", "COMMAND"],
        [[c["pid"], c["user"], c["name"], c["session"], device_list(c), _priority(c), human_bytes(c["memory"]),
          c["buffers"], f"{c['util_pct']:.0f}%", c["jobs_submitted"], c["jobs_completed"], c["jobs_failed"],
          human_duration(c["connected_s"]), c["command"][:60]] for c in clients],
        empty="(no clients)")


def _priority(c: dict) -> str:
    """The default context's priority; `+N` more contexts, `!N` of them banned."""
    text = c.get("priority", "normal")
    if c.get("contexts"):
        text += f"+{c['contexts']}"
    if c.get("banned_contexts"):
        text += f"!{c['banned_contexts']}"
    return text


PROCESS_NOTE = "Processes (pid and command as the daemon sees them; PID namespaces may differ)"


def status(s: dict) -> str:
    header = (f"npud {s['daemon_version']} (protocol {s['protocol'][0]}.{s['protocol'][1]})  "
              f"pid {s['pid']}  up {human_duration(s['uptime_s'])}  endpoint {s['endpoint']}")
    window = s["devices"][0]["util_window_s"] if s["devices"] else 5
    return "\n\n".join([
        header, f"Devices (UTIL: busy time of its cores / (wall time x cores) over the last {window:g} s)\n"
        + devices_table(s["devices"]), PROCESS_NOTE + "\n" + clients_table(s["clients"])])


def jobs_table(result: dict) -> str:
    now = result["now_s"]
    rows = []
    for j in result["jobs"]:
        queued = (j.get("started_s", j.get("finished_s", now)) - j["submitted_s"]) * 1e3
        rows.append([j["pid"], j["client"], j["session"], j["job"], j["device"], j["state"],
                     f"{j['model']} {j['model_name']}".strip() if j["model"] else "-",
                     f"{now - j['submitted_s']:.1f}s ago", f"{queued:.2f}",
                     f"{j['wall_ms']:.2f}" if "wall_ms" in j else "-", j["cycles"], j.get("error", "")])
    return table(["PID", "CLIENT", "SESSION", "JOB", "DEV", "STATE", "MODEL", "SUBMITTED", "QUEUE MS",
                  "WALL MS", "CYCLES", "ERROR"], rows, empty="(no jobs)")


def mem_tables(data: dict) -> str:
    rows = [[b["pid"], b["session"], b["device"], b["handle"] or "-", b["kind"], b["model"] or "-",
             b["size"], b["mapped_size"], "yes" if b["exported"] else "no", b["jobs"]] for b in data["buffers"]]
    totals = [[t["pid"], t["session"], t["device"], t["buffers"], human_bytes(t["bytes"]),
               human_bytes(t["mapped_bytes"]), t["exported"]] for t in data["totals"]]
    return ("Buffer objects (EXPORTED: its memfd was sent to the client, which may have it mapped)\n"
            + table(["PID", "SESSION", "DEV", "HANDLE", "KIND", "MODEL", "SIZE", "MAPPED SIZE", "EXPORTED",
                     "JOBS"], rows, empty="(no buffers)")
            + "\n\nPer client and device\n"
            + table(["PID", "SESSION", "DEV", "BUFFERS", "BYTES", "DEVICE MEMORY", "EXPORTED"], totals,
                    empty="(none)"))


def cache_table(data: dict) -> str:
    rows = [[e["key"][:16], e.get("model_name") or "-", human_bytes(e["size"]), human_duration(e["age_s"])]
            for e in data["entries"]]
    return f"compile cache {data['directory']}\n" + table(["KEY", "MODEL", "SIZE", "AGE"], rows, empty="(empty)")
