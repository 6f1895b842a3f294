"""Plain-text tables for npuctl: the same fields --json carries, for people."""

from __future__ import annotations

from collections.abc import Sequence


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


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
        ["IDX", "NAME", "PRESET", "STATE", "MEMORY USED / TOTAL", "QUEUED", "RUNNING", "DONE", "FAILED",
         "BUSY", "RESETS"],
        [[d["index"], d["name"], d["preset"], d["state"],
          f"{human_bytes(d['memory_used'])} / {human_bytes(d['memory_total'])}", d["jobs_queued"],
          d["jobs_running"], d["jobs_completed"], d["jobs_failed"], f"{d['busy_ms'] / 1000:.1f}s",
          d["resets"]] for d in devices])


def device_params(device: dict) -> str:
    p = device["params"]
    lines = [f"{k:>22}: {v}" for k, v in sorted(p.items())]
    return f"device {device['index']} ({device['name']}, preset {device['preset']})\n" + "\n".join(lines)


def clients_table(clients: list[dict]) -> str:
    return table(
        ["PID", "UID", "NAME", "SESSION", "BUFFERS", "MEMORY", "SUBMITTED", "DONE", "FAILED", "CONNECTED",
         "COMMAND"],
        [[c["pid"], c["uid"], c["name"], c["session"], c["buffers"], human_bytes(c["memory"]),
          c["jobs_submitted"], c["jobs_completed"], c["jobs_failed"], human_duration(c["connected_s"]),
          c["command"][:60]] for c in clients],
        empty="(no clients)")


def status(s: dict) -> str:
    header = (f"npud {s['daemon_version']} (protocol {s['protocol'][0]}.{s['protocol'][1]})  "
              f"pid {s['pid']}  up {human_duration(s['uptime_s'])}  endpoint {s['endpoint']}")
    return "\n\n".join([
        header, devices_table(s["devices"]),
        "Processes (pid and command as the daemon sees them; PID namespaces may differ)\n"
        + clients_table(s["clients"])])
