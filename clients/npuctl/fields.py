"""The stable field names of `npuctl query` (and of dmon/pmon --format csv).

Each field is ``name -> (unit, description, getter)``; the getter reads a
device or client entry as the daemon's `status` op returns it (plus ``user``,
which npuctl adds).  Names never change meaning; new ones may be added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Field:
    name: str
    unit: str          # "" for none
    doc: str
    get: Callable[[dict], object]


def _f(name, unit, doc, get) -> Field:
    return Field(name, unit, doc, get)


DEVICE_FIELDS: dict[str, Field] = {f.name: f for f in [
    _f("index", "", "device number used in requests and by --device", lambda d: d["index"]),
    _f("name", "", "configured name, e.g. npu0", lambda d: d["name"]),
    _f("uuid", "", "stable identity (NPU-...), the same across daemon restarts", lambda d: d.get("uuid", "")),
    _f("preset", "", "the parameter set it was created from", lambda d: d["preset"]),
    _f("state", "", "device process health: ok, resetting or down", lambda d: d["state"]),
    _f("util.pct", "%", "utilisation over the last util.window seconds: busy time of its cores / "
                        "(wall time x cores), at most 100", lambda d: round(d["util_pct"], 1)),
    _f("util.window", "s", "the window util.pct covers", lambda d: d["util_window_s"]),
    _f("memory.total", "B", "bytes of device memory", lambda d: d["memory_total"]),
    _f("memory.used", "B", "bytes allocated in buffer objects (client buffers and model weights/arenas)",
       lambda d: d["memory_used"]),
    _f("memory.free", "B", "memory.total - memory.used", lambda d: d["memory_total"] - d["memory_used"]),
    _f("jobs.queued", "", "jobs waiting to run", lambda d: d["jobs_queued"]),
    _f("jobs.running", "", "jobs executing now (at most one per core)", lambda d: d["jobs_running"]),
    _f("jobs.completed", "", "jobs finished successfully since the daemon started",
       lambda d: d["jobs_completed"]),
    _f("jobs.failed", "", "jobs that failed since the daemon started", lambda d: d["jobs_failed"]),
    _f("resets", "", "device process restarts", lambda d: d["resets"]),
    _f("busy.ms", "ms", "wall time spent executing jobs since start (including the running job)",
       lambda d: round(d["busy_ms"], 3)),
    _f("modeled.cycles", "", "modeled cycles of the completed jobs", lambda d: d["modeled_cycles"]),
    _f("modeled.busy.ms", "ms", "modeled.cycles at the device clock", lambda d: round(d["modeled_busy_ms"], 6)),
    _f("clock.mhz", "MHz", "modeled clock", lambda d: d["params"].get("clock_mhz", 0)),
    _f("cores", "", "modeled cores", lambda d: d["params"].get("cores", 0)),
    _f("processes", "", "device processes running jobs in parallel", lambda d: d.get("cores", 1)),
    _f("hangs", "", "jobs that hung or crashed a device process since start", lambda d: d.get("hangs", 0)),
    _f("contexts.banned", "", "contexts banned for hanging the device repeatedly",
       lambda d: d.get("banned_contexts", 0)),
]}

CLIENT_FIELDS: dict[str, Field] = {f.name: f for f in [
    _f("pid", "", "process id as the daemon sees it (0 if unknown; PID namespaces differ)", lambda c: c["pid"]),
    _f("uid", "", "user id from the kernel (-1 if unknown)", lambda c: c["uid"]),
    _f("user", "", "user name of uid (the uid if it has none)", lambda c: c["user"]),
    _f("name", "", "name the client gave when it connected", lambda c: c["name"]),
    _f("session", "", "session id (for kill-client)", lambda c: c["session"]),
    _f("devices", "", "indices of the devices it ran jobs on or holds memory on, e.g. 0 or 0,1 (- if none)",
       lambda c: device_list(c)),
    _f("command", "", "command line as the daemon reads it from /proc", lambda c: c["command"]),
    _f("attached", "", "whether the companion socket is connected (yes/no)",
       lambda c: "yes" if c["attached"] else "no"),
    _f("buffers", "", "buffer objects held", lambda c: c["buffers"]),
    _f("models", "", "models loaded", lambda c: c["models"]),
    _f("memory", "B", "bytes of device memory held (buffers and model weights/arenas, page-rounded)",
       lambda c: c["memory"]),
    _f("util.pct", "%", "its share of its devices over the last 5 s: its jobs' busy core time / (wall time "
                        "x cores), summed over devices (at most 100 per device)", lambda c: round(c["util_pct"], 1)),
    _f("busy.ms", "ms", "device time its jobs took since it connected", lambda c: round(c["busy_ms"], 3)),
    _f("modeled.cycles", "", "modeled cycles of its completed jobs", lambda c: c["modeled_cycles"]),
    _f("jobs.submitted", "", "jobs submitted", lambda c: c["jobs_submitted"]),
    _f("jobs.completed", "", "jobs completed", lambda c: c["jobs_completed"]),
    _f("jobs.failed", "", "jobs failed (including cancelled)", lambda c: c["jobs_failed"]),
    _f("jobs.inflight", "", "jobs queued or running now", lambda c: c["jobs_in_flight"]),
    _f("connected.s", "s", "seconds since it connected", lambda c: round(c["connected_s"], 1)),
    _f("priority", "", "priority of its default context: low, normal, high or realtime",
       lambda c: c.get("priority", "normal")),
    _f("contexts", "", "contexts it created besides its default one", lambda c: c.get("contexts", 0)),
    _f("contexts.banned", "", "of its contexts, those banned for hanging a device",
       lambda c: c.get("banned_contexts", 0)),
]}


def device_list(client: dict) -> str:
    """The devices a client uses, as `0` or `0,1`; `-` if none."""
    return ",".join(str(d["device"]) for d in client.get("devices", [])) or "-"


class FieldListError(ValueError):
    pass


def parse_list(spec: str, table: dict[str, Field]) -> list[Field]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise FieldListError("no fields given")
    unknown = [n for n in names if n not in table]
    if unknown:
        raise FieldListError(f"unknown field {unknown[0]!r}; see `npuctl query --help-fields`")
    return [table[n] for n in names]


def parse_format(spec: str) -> dict[str, bool]:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or parts[0] != "csv" or any(p not in ("noheader", "nounits") for p in parts[1:]):
        raise FieldListError(f"bad --format {spec!r}: csv[,noheader][,nounits]")
    return {"header": "noheader" not in parts, "units": "nounits" not in parts}


def _csv_cell(value) -> str:
    text = str(value)
    if any(ch in text for ch in ',"\n'):
        text = '"' + text.replace('"', '""') + '"'
    return text


def csv_lines(fields: list[Field], entries: list[dict], *, header: bool, units: bool) -> list[str]:
    out = []
    if header:
        out.append(", ".join(f.name + (f" [{f.unit}]" if units and f.unit else "") for f in fields))
    for e in entries:
        out.append(", ".join(_csv_cell(f"{f.get(e)} {f.unit}" if units and f.unit else f.get(e))
                             for f in fields))
    return out


def help_text() -> str:
    def section(title, table):
        width = max(len(n) for n in table)
        return title + "\n" + "\n".join(
            f"  {f.name:<{width}}  {('[' + f.unit + ']') if f.unit else '':<6}  {f.doc}" for f in table.values())
    return (section("Device fields (--device=FIELD,...):", DEVICE_FIELDS) + "\n\n"
            + section("Client fields (--clients=FIELD,...):", CLIENT_FIELDS) + "\n\n"
            + "Formats: --format=csv[,noheader][,nounits]; with units, a value carries its unit "
              "(\"4096 B\") and a header its unit in brackets.  --json gives a list of maps keyed by "
              "field name, values without units.")
