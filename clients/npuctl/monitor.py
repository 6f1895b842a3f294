"""Live views: `npuctl dmon` (a line per device per interval), `pmon` (per client) and `top`.

Utilisation over an interval is the daemon's definition (npud/ipc_schema/usage.py)
applied to the growth of its busy counters between two samples: busy core
time / (the time between them x the device's cores).  The first sample (no
previous one) shows the daemon's own ``util_pct``, over its last 5 s.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import sys
import time
from datetime import datetime

from npud.ipc_schema.usage import util_pct

from . import render
from .fields import CLIENT_FIELDS, DEVICE_FIELDS, _csv_cell, device_list


class Sampler:
    """Fetch status and turn busy counters into utilisation over the last interval."""

    def __init__(self, client, own_session: str):
        self.client = client
        self.own = own_session
        self._last: tuple[float, dict] | None = None

    def sample(self) -> dict:
        status = self.client.status()
        now = time.monotonic()
        status["clients"] = [with_user(c) for c in status["clients"] if c["session"] != self.own]
        cores = {d["index"]: d.get("cores", 1) for d in status["devices"]}
        busy = _busy_core_ms(status, cores)
        if self._last is not None:
            then, last = self._last

            def interval(key, device, old):
                return util_pct((busy[key] - last[key]) / 1e3, now - then, cores.get(device, 1)) \
                    if key in last else old
            for d in status["devices"]:
                d["util_pct"] = interval(d["index"], d["index"], d["util_pct"])
            for c in status["clients"]:
                for u in c.get("devices", []):
                    u["util_pct"] = interval((c["session"], u["device"]), u["device"], u["util_pct"])
                if "devices" in c:
                    c["util_pct"] = sum(u["util_pct"] for u in c["devices"])
        self._last = (now, busy)
        return status


def _busy_core_ms(status: dict, cores: dict) -> dict:
    """Busy core-milliseconds by device index and by (session, device)."""
    busy: dict = {d["index"]: d["busy_ms"] * cores[d["index"]] for d in status["devices"]}  # wire: per core
    for c in status["clients"]:
        busy.update({(c["session"], u["device"]): u["busy_ms"] for u in c.get("devices", [])})
    return busy


def with_user(c: dict) -> dict:
    return {**c, "user": user_name(c["uid"])}


def user_name(uid: int) -> str:
    if uid < 0:
        return "?"
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return str(uid)


def _stamp(opts: str, when: datetime) -> list[str]:
    out = []
    if "D" in opts:
        out.append(when.strftime("%Y%m%d"))
    if "T" in opts:
        out.append(when.strftime("%H:%M:%S"))
    return out


DMON_FIELDS = ["index", "name", "state", "util.pct", "memory.used", "memory.total", "jobs.queued",
               "jobs.running", "jobs.completed", "jobs.failed", "resets"]
DMON_TEXT = [("dev", "idx", 3), ("name", "", 8), ("state", "", 9), ("util", "%", 5), ("mem", "MiB", 9),
             ("total", "MiB", 9), ("queue", "", 5), ("run", "", 3), ("done", "", 8), ("fail", "", 6),
             ("reset", "", 5)]
PMON_FIELDS = ["pid", "user", "session", "devices", "name", "util.pct", "memory", "buffers", "models",
               "jobs.submitted", "jobs.completed", "jobs.failed", "jobs.inflight", "command"]
PMON_TEXT = [("pid", "", 7), ("user", "", 8), ("session", "", 18), ("dev", "idx", 3), ("name", "", 12),
             ("util", "%", 5), ("mem", "MiB", 9), ("bufs", "", 5), ("mdl", "", 3), ("sub", "", 7), ("done", "", 7),
             ("fail", "", 5), ("infl", "", 4), ("command", "", 0)]


def _text_values(kind: str, e: dict) -> list[str]:
    if kind == "dmon":
        return [str(e["index"]), e["name"], e["state"], f"{e['util_pct']:.0f}", f"{e['memory_used'] / 2**20:.1f}",
                f"{e['memory_total'] / 2**20:.0f}", str(e["jobs_queued"]), str(e["jobs_running"]),
                str(e["jobs_completed"]), str(e["jobs_failed"]), str(e["resets"])]
    return [str(e["pid"]), e["user"], e["session"], device_list(e), e["name"][:12], f"{e['util_pct']:.0f}",
            f"{e['memory'] / 2**20:.1f}", str(e["buffers"]), str(e["models"]), str(e["jobs_submitted"]),
            str(e["jobs_completed"]), str(e["jobs_failed"]), str(e["jobs_in_flight"]), e["command"][:60] or "-"]


def _line(cells: list[tuple[str, int]]) -> str:
    return "".join(" " + (v.rjust(w) if w else v) for v, w in cells).rstrip()


def monitor(client, own_session: str, kind: str, *, interval: float, count: int | None, stamp: str,
            fmt: str | None, as_json: bool, out=None) -> int:
    """dmon or pmon: print until ``count`` samples were shown (or forever)."""
    out = sys.stdout if out is None else out
    sampler = Sampler(client, own_session)
    fields = [(DEVICE_FIELDS if kind == "dmon" else CLIENT_FIELDS)[n] for n in
              (DMON_FIELDS if kind == "dmon" else PMON_FIELDS)]
    text_cols = DMON_TEXT if kind == "dmon" else PMON_TEXT
    stamp_names = [n for c, n in (("D", "date"), ("T", "time")) if c in stamp]
    csv = fmt is not None
    header = not (csv and "noheader" in fmt)
    if csv and header:
        print(", ".join(stamp_names + [f.name for f in fields]), file=out)
    elif not csv and not as_json:
        widths = [10 if n == "date" else 8 for n in stamp_names]
        print("#" + _line([(n, w) for n, w in zip(stamp_names, widths)]
                          + [(c[0], c[2]) for c in text_cols]), file=out)
        print("#" + _line([("YYYYMMDD" if n == "date" else "HH:MM:SS", w) for n, w in zip(stamp_names, widths)]
                          + [(c[1] or "", c[2]) for c in text_cols]), file=out)
    shown = 0
    next_at = time.monotonic()
    while count is None or shown < count:
        status = sampler.sample()
        when = datetime.now()
        stamps = _stamp(stamp, when)
        entries = status["devices"] if kind == "dmon" else status["clients"]
        for e in entries:
            if as_json:
                record = {"time": when.isoformat(timespec="seconds")} if stamp else {}
                record.update({f.name: f.get(e) for f in fields})
                print(json.dumps(record, sort_keys=True), file=out)
            elif csv:
                print(", ".join(stamps + [_csv_cell(f.get(e)) for f in fields]), file=out)
            else:
                widths = [10 if n == "date" else 8 for n in stamp_names]
                print(" " + _line(list(zip(stamps, widths))
                                  + list(zip(_text_values(kind, e), [c[2] for c in text_cols]))), file=out)
        if not entries and not csv and not as_json:
            print(" " + _line(list(zip(stamps, [10 if n == "date" else 8 for n in stamp_names])) + [("-", 0)]),
                  file=out)
        out.flush()
        shown += 1
        if count is not None and shown >= count:
            break
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    return 0


# --- top ---------------------------------------------------------------------------------

SORT_KEYS = {  # key: (label, sort key, descending by default)
    "u": ("util", lambda c: c["util_pct"], True),
    "m": ("memory", lambda c: c["memory"], True),
    "j": ("jobs", lambda c: c["jobs_submitted"], True),
    "f": ("failed", lambda c: c["jobs_failed"], True),
    "p": ("pid", lambda c: c["pid"], False),
    "n": ("name", lambda c: c["name"].lower(), False),
    "t": ("time", lambda c: c["connected_s"], True),
}


def top_frame(status: dict, sort: str, reverse: bool, width: int, height: int, interval: float) -> str:
    label, key, desc = SORT_KEYS[sort]
    clients = sorted(status["clients"], key=key, reverse=desc != reverse)
    lines = [f"npuctl top - npud {status['daemon_version']}  up {render.human_duration(status['uptime_s'])}  "
             f"{len(status['clients'])} client(s)  every {interval:g}s  {datetime.now():%H:%M:%S}", ""]
    for d in status["devices"]:
        bar_w = 20
        filled = int(round(d["util_pct"] / 100 * bar_w))
        lines.append(f"{d['index']:>2} {d['name']:<8} {d['preset']:<8} {d['state']:<9} "
                     f"[{'#' * filled}{'.' * (bar_w - filled)}] {d['util_pct']:5.1f}%  "
                     f"mem {render.human_bytes(d['memory_used'])} / {render.human_bytes(d['memory_total'])}  "
                     f"queued {d['jobs_queued']} running {d['jobs_running']} done {d['jobs_completed']} "
                     f"failed {d['jobs_failed']} resets {d['resets']}")
    lines += ["", f"sorted by {label}{' (reversed)' if reverse else ''}   keys: "
              + " ".join(f"{k}={v[0]}" for k, v in SORT_KEYS.items()) + "  r=reverse  q=quit",
              render.PROCESS_NOTE]
    lines += render.clients_table(clients).split("\n")
    lines = [line[:width] for line in lines[:max(height - 1, 5)]]
    return "\n".join(lines)


def _is_terminal(stream) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):   # io.StringIO and the like
        return False


def top_batch(client, own_session: str, *, interval: float, sort: str, iterations: int | None, out) -> int:
    """Frames one after another, whole and without escape codes or key handling, every ``interval``."""
    sampler = Sampler(client, own_session)
    shown = 0
    next_at = time.monotonic()
    while True:
        out.write(top_frame(sampler.sample(), sort, False, 1 << 20, 1 << 20, interval) + "\n\n")
        out.flush()
        shown += 1
        if iterations is not None and shown >= iterations:
            return 0
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))


def top(client, own_session: str, *, interval: float, sort: str, iterations: int | None,
        stdin=None, out=None) -> int:
    """The full-screen view on a terminal; batch mode (`top -b`) when stdout is not one."""
    stdin = sys.stdin if stdin is None else stdin
    out = sys.stdout if out is None else out
    if not _is_terminal(out):
        return top_batch(client, own_session, interval=interval, sort=sort, iterations=iterations, out=out)
    fd = stdin.fileno()
    is_tty = os.isatty(fd)
    saved = None
    if is_tty:
        import termios
        import tty
        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
    sampler = Sampler(client, own_session)
    reverse = False
    shown = 0
    out.write("\x1b[?1049h\x1b[?25l")  # alternate screen, hide the cursor
    try:
        status = sampler.sample()
        while True:
            size = shutil.get_terminal_size((120, 40))
            out.write("\x1b[H\x1b[2J" + top_frame(status, sort, reverse, size.columns, size.lines, interval)
                      .replace("\n", "\r\n" if is_tty else "\n") + ("\r\n" if is_tty else "\n"))
            out.flush()
            shown += 1
            if iterations is not None and shown >= iterations:
                return 0
            deadline = time.monotonic() + interval
            while True:
                remaining = deadline - time.monotonic()
                ready, _, _ = select.select([fd], [], [], max(0.0, remaining))
                if not ready:
                    break
                keys = os.read(fd, 64).decode("utf-8", "replace")
                if not keys:
                    return 0  # stdin closed
                redraw = False
                for k in keys:
                    if k in ("q", "Q", "\x03"):
                        return 0
                    if k in SORT_KEYS:
                        sort, redraw = k, True
                    elif k == "r":
                        reverse, redraw = not reverse, True
                if redraw:
                    break
            if time.monotonic() >= deadline:
                status = sampler.sample()
    finally:
        out.write("\x1b[?25h\x1b[?1049l")
        out.flush()
        if saved is not None:
            import termios
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
