"""npuctl: inspect and administer npud, in the spirit of nvidia-smi.

Exit codes: 0 ok; 1 the daemon answered with an error, or is not running
(one line naming the endpoint tried and how to start npud), `compile
--check` found problems, or `disasm` was given something it cannot list;
2 usage error (bad options, unreadable files); 130 interrupted (Ctrl-C),
after printing what `run --bench` or `trace --duration` had so far.
Every command takes --json: the same fields as the text, machine-readable,
and errors as {"error": {"code", "message", "retryable"}} on stdout.
Reference and example output: docs/NPUCTL.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import npu

from . import cts, exporter, fields, monitor, render, tools, tracefmt, version

INTERRUPTED = 130   # 128 + SIGINT, as a shell reports a command Ctrl-C stopped


class _Parser(argparse.ArgumentParser):
    """Usage errors become tools.UsageError, so that main() can print them as JSON under --json."""

    def error(self, message):
        raise tools.UsageError(message, usage=self.format_usage())


def _common(defaults: bool) -> argparse.ArgumentParser:
    # Options may come before or after the command; the command's copy must not
    # overwrite a value given before it, so only the top level has defaults.
    common = argparse.ArgumentParser(add_help=False, argument_default=None if defaults else argparse.SUPPRESS)
    common.add_argument("--endpoint", help="daemon endpoint (default: $NPUD_ENDPOINT, else the first "
                                           "existing of ipc://$XDG_RUNTIME_DIR/npud/npud.sock and "
                                           "ipc:///run/npud/npud.sock, else ipc:///tmp/npud-$UID/npud.sock)")
    common.add_argument("--curve-key", metavar="FILE",
                        help="tcp endpoints: this client's zmq.auth secret certificate (NAME.key_secret)")
    common.add_argument("--server-key", metavar="FILE",
                        help="tcp endpoints: the daemon's public certificate (server.key)")
    common.add_argument("--json", action="store_true", help="machine-readable output, same fields",
                        **({"default": False} if defaults else {}))
    return common


def _interval(text: str) -> float:
    value = float(text)
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0.05 and 3600 seconds")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is less than 1")
    return value


def _stamp(text: str) -> str:
    if not text or set(text) - {"D", "T"}:
        raise argparse.ArgumentTypeError("D (date), T (time) or DT")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="npuctl", parents=[_common(True)], description="Inspect and administer npud.",
                     epilog="Exit codes: 0 ok, 1 error (daemon error or not running), 2 usage, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"npuctl {version()}")
    common = _common(False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, help_):
        return sub.add_parser(name, parents=[common], help=help_, description=help_)
    add("status", "daemon, devices and processes (default)")
    add("devices", "devices with their architecture parameters")
    add("clients", "connected processes")

    q = add("query", "selected fields as CSV, for scripts (stable names: --help-fields)")
    which = q.add_mutually_exclusive_group()
    which.add_argument("--device", metavar="FIELDS", help="comma-separated device fields, one row per device")
    which.add_argument("--clients", metavar="FIELDS", help="comma-separated client fields, one row per client")
    which.add_argument("--help-fields", action="store_true", help="list the fields and exit")
    q.add_argument("--format", default="csv", help="csv[,noheader][,nounits] (default csv)")
    q.add_argument("-i", "--id", metavar="ID[,ID...]",
                   help="only these devices (index, name or UUID); with --clients, the clients using them")
    q.add_argument("-l", "--loop", type=_interval, metavar="SECONDS",
                   help="print again every SECONDS until interrupted (the header once)")

    for name, help_ in (("dmon", "one line per device per interval"),
                        ("pmon", "one line per client per interval")):
        m = add(name, help_)
        m.add_argument("-d", "--delay", type=_interval, default=1.0, metavar="S", help="interval in seconds (1)")
        m.add_argument("-c", "--count", type=_positive, metavar="N", help="stop after N samples (default: run "
                                                                         "until interrupted)")
        m.add_argument("-o", "--options", type=_stamp, metavar="DT",
                       help="prefix lines with D: the date, T: the time")
        m.add_argument("--format", choices=["csv", "csv,noheader"], help="comma-separated values")

    t = add("top", "live, sortable view of devices and processes (keys: u m j f p n t sort, r reverse, q quit)")
    t.add_argument("-d", "--delay", type=_interval, default=1.0, metavar="S", help="refresh interval (1)")
    t.add_argument("-s", "--sort", choices=sorted(monitor.SORT_KEYS), default="u",
                   help="initial sort key: " + ", ".join(f"{k}={v[0]}" for k, v in monitor.SORT_KEYS.items()))
    t.add_argument("-n", "--iterations", type=_positive, metavar="N", help="quit after N frames")

    j = add("jobs", "recent and running jobs of every client")
    j.add_argument("--session", help="only this session")
    j.add_argument("--device", type=int, help="only this device")
    j.add_argument("--limit", type=_positive, default=50, help="most recent N (50)")

    mem = add("mem", "buffer objects per client and device: sizes, mapped or not")
    mem.add_argument("--session", help="only this session")
    mem.add_argument("--device", type=int, help="only this device")

    tr = add("trace", "job and per-layer timeline as Chrome trace-event JSON (Perfetto, chrome://tracing)")
    tr.add_argument("--duration", type=float, metavar="S",
                    help="record the next S seconds (default: the jobs the daemon's trace ring holds now)")
    tr.add_argument("-o", "--output", metavar="FILE", help="write the trace-event JSON here ('-': stdout)")
    tr.add_argument("--summary", action="store_true", help="print a per-device and per-client summary")

    c = add("compile", "compile a model for a device through the daemon (and its compile cache)")
    c.add_argument("model", metavar="MODEL", help="ONNX file")
    c.add_argument("--device", type=int, default=0)
    c.add_argument("--report", action="store_true", help="print the per-op report")
    c.add_argument("--check", action="store_true", help="only list what cannot compile (exit 1 if anything)")
    c.add_argument("--input-shape", action="append", default=[], metavar="NAME=DxD...",
                   help="shape of an input with symbolic dimensions")
    c.add_argument("-o", "--output", metavar="FILE.npux",
                   help="also write the executable (for `disasm`, or to ship it)")

    r = add("run", "load a model and run it (random inputs unless given); --bench for latency percentiles")
    r.add_argument("model", metavar="MODEL", help="ONNX file")
    r.add_argument("--device", type=int, default=0)
    r.add_argument("--inputs", nargs="+", default=[], metavar="[NAME=]FILE.npy", help="input tensors")
    r.add_argument("--bench", type=int, default=0, metavar="N", help="then run N more times and time them")
    r.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    r.add_argument("--save-outputs", metavar="DIR", help="write each output as DIR/NAME.npy")

    d = add("disasm", "list a raw command stream or the stream of a .npux executable (no daemon needed)")
    d.add_argument("file", metavar="FILE")

    ca = add("cache", "the daemon's compile cache")
    ca.add_argument("action", choices=["list", "clear"])

    k = add("kill-client", "admin: close a client's session (frees its memory, cancels its jobs)")
    k.add_argument("id", metavar="ID", help="session id, or pid (every session of that process)")
    rs = add("reset", "admin: restart a device's process")
    rs.add_argument("device", metavar="DEVICE", help="device index or name")
    exporter.add_parser(add)   # `npuctl exporter`: clients/npuctl/exporter.py
    cts.add_parser(sub)        # `npuctl cts`: clients/npuctl/cts/ (starts its own daemon)
    add("ray-resources", "this node's healthy devices as Ray custom resources: the JSON for "
                         "`ray start --resources` (docs/FLEET.md)")
    return parser


def _connect(args) -> npu.Client:
    curve_key, server_key = getattr(args, "curve_key", None), getattr(args, "server_key", None)
    if bool(curve_key) != bool(server_key):
        raise npu.InvalidArgument("EINVAL", "--curve-key and --server-key go together")
    curve = npu.curve_keys(curve_key, server_key) if curve_key else None
    return npu.connect(args.endpoint, name="npuctl", timeout=30.0, curve=curve)


def _status(client) -> dict:
    status = client.status()
    status["clients"] = [monitor.with_user(c) for c in status["clients"] if c["session"] != client.session]
    return status


def _others(client) -> list[dict]:
    return [monitor.with_user(c) for c in client.clients() if c["session"] != client.session]


def _emit(args, data, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=render.json_bytes) if args.json else text)


def _query(args, client) -> int:
    if args.help_fields:
        print(fields.help_text())
        return 0
    if args.device is None and args.clients is None:
        raise tools.UsageError("query needs --device=FIELDS, --clients=FIELDS or --help-fields")
    try:
        fmt = fields.parse_format(args.format)
        table = fields.DEVICE_FIELDS if args.device is not None else fields.CLIENT_FIELDS
        chosen = fields.parse_list(args.device if args.device is not None else args.clients, table)
    except fields.FieldListError as exc:
        raise tools.UsageError(str(exc)) from None
    header = fmt.pop("header")
    while True:
        entries = _query_entries(args, client)
        if args.json:  # a list per sample: indented once, one line each with --loop
            print(json.dumps([{f.name: f.get(e) for f in chosen} for e in entries],
                             indent=None if args.loop else 2))
        else:
            print("\n".join(fields.csv_lines(chosen, entries, header=header, **fmt)))
        sys.stdout.flush()
        if not args.loop:
            return 0
        header = False
        time.sleep(args.loop)


def _query_entries(args, client) -> list[dict]:
    """The devices (or clients) `query` reports, narrowed to those of --id."""
    if args.device is not None:
        devices = client._request("devices", {})["devices"]
        return _select_devices(devices, args.id) if args.id else devices
    clients = _others(client)
    if not args.id:
        return clients
    chosen = {d["index"] for d in _select_devices(client._request("devices", {})["devices"], args.id)}
    return [c for c in clients if chosen & {u["device"] for u in c.get("devices", [])}]


def _select_devices(devices: list[dict], ids: str) -> list[dict]:
    """Devices named by a comma-separated list of indices, names or UUIDs; ENODEV names an unknown one."""
    chosen = []
    for wanted in (i.strip() for i in ids.split(",") if i.strip()):
        match = [d for d in devices if wanted in (str(d["index"]), d["name"], d.get("uuid"))]
        if not match:
            raise npu.NpuError("ENODEV", f"no device {wanted!r} (see `npuctl devices`)")
        chosen += [d for d in match if d not in chosen]
    return chosen


def _mem(args, client) -> int:
    query = {k: v for k, v in (("session", args.session), ("device", args.device)) if v is not None}
    buffers = client._request("buffers", query)["buffers"]
    totals: dict = {}
    for b in buffers:
        t = totals.setdefault((b["session"], b["device"]), {
            "session": b["session"], "pid": b["pid"], "device": b["device"], "buffers": 0, "bytes": 0,
            "mapped_bytes": 0, "exported": 0})
        t["buffers"] += 1
        t["bytes"] += b["size"]
        t["mapped_bytes"] += b["mapped_size"]
        t["exported"] += b["exported"]
    data = {"buffers": buffers, "totals": list(totals.values())}
    _emit(args, data, render.mem_tables(data))
    return 0


class _Recording:
    """What `trace --duration` gathered: events, models, lost events, the daemon clock's window."""

    def __init__(self, client):
        self.client = client
        self.cursor = client._request("trace", {"since": 0, "limit": 0})["next"]
        self.start_s = self.end_s = client._request("status", {})["uptime_s"]
        self.events: list[dict] = []
        self.models: dict = {}
        self.dropped = 0
        self.interrupted = False

    def poll(self) -> None:
        """Collect the events finished since the last poll (several polls per ring's worth)."""
        reply = self.client._request("trace", {"since": self.cursor})
        self.events += reply["events"]
        self.models.update({(m["session"], m["model"], m["name"]): m for m in reply["models"]})
        self.dropped += reply["dropped"]
        self.cursor, self.end_s = reply["next"], reply["now_s"]

    def record(self, duration: float) -> None:
        """Poll for ``duration`` seconds, or until Ctrl-C: then once more, for what finished so far."""
        end_at = time.monotonic() + duration
        while not self.interrupted and time.monotonic() < end_at:
            try:
                time.sleep(max(0.0, min(0.5, end_at - time.monotonic())))
                self.poll()
            except KeyboardInterrupt:
                self.interrupted = True
        if self.interrupted:
            self.poll()


def _trace(args, client) -> int:
    devices = client._request("devices", {})["devices"]
    interrupted = False
    if args.duration is not None:
        if args.duration <= 0:
            raise tools.UsageError("--duration must be positive")
        rec = _Recording(client)
        rec.record(args.duration)
        events, models, dropped, interrupted = rec.events, list(rec.models.values()), rec.dropped, rec.interrupted
        start_s, end_s = rec.start_s, rec.end_s
    else:
        reply = client._request("trace", {"since": 0})
        events, models, dropped = reply["events"], reply["models"], reply["dropped"]
        end_s = reply["now_s"]
        start_s = min([e["started_s"] for e in events if "started_s" in e], default=end_s)
    meta = {"tool": "npuctl trace", "daemon_version": client.daemon_version, "endpoint": client.endpoint,
            "clock": "microseconds since the daemon started", "dropped_events": dropped,
            "layer_slices": "split of each job's measured time in proportion to the ops' modeled cycles",
            "interrupted": interrupted}
    if args.output:
        trace = tracefmt.chrome_trace(events, models, devices, meta)
        if args.output == "-":
            json.dump(trace, sys.stdout)
            print()
        else:
            with open(args.output, "w") as f:
                json.dump(trace, f)
    if args.summary or not args.output:
        s = tracefmt.summary(events, devices, start_s, end_s)
        s["dropped"] = dropped
        s["interrupted"] = interrupted
        if args.output and args.output != "-":
            s["output"] = args.output
        text = tracefmt.summary_text(s)
        if args.output and args.output != "-":
            text += f"\n\nwrote {len(events)} job(s) to {args.output} (open in https://ui.perfetto.dev)"
        if args.output == "-":
            print(text, file=sys.stderr)
        else:
            _emit(args, s, text)
    elif args.output != "-":
        print(f"wrote {len(events)} job(s) to {args.output} (open in https://ui.perfetto.dev)", file=sys.stderr)
    return INTERRUPTED if interrupted else 0


def _kill(args, client) -> int:
    if args.id.isdigit():
        targets = [c["session"] for c in _others(client) if c["pid"] == int(args.id)]
        if not targets:
            raise npu.NpuError("ENOENT", f"no client with pid {args.id} (see `npuctl clients`)")
    else:
        targets = [args.id]
    results = [client._request("kill_client", {"session": s}) for s in targets]
    _emit(args, results, "\n".join(f"closed session {r['session']} (pid {r['pid']}): {r['buffers']} buffer(s), "
                                   f"{render.human_bytes(r['memory'])} freed" for r in results))
    return 0


def _reset(args, client) -> int:
    match = _select_devices(client._request("devices", {})["devices"], args.device)
    result = client._request("reset_device", {"device": match[0]["index"]}, timeout=60.0)
    _emit(args, result, f"device {result['device']} ({match[0]['name']}) reset: state {result['state']}, "
                        f"{result['resets']} reset(s) since the daemon started")
    return 0


def _dispatch(args) -> int:
    cmd = args.command
    if cmd == "disasm":
        data = tools.disasm(args.file)
        _emit(args, data, "\n".join(data["header"] + data["listing"]))
        return 1 if data.get("error") else 0
    if cmd == "query" and args.help_fields:
        return _query(args, None)
    if cmd == "exporter":   # connects at each scrape, and serves while npud is down
        return exporter.serve(args, lambda: _connect(args))
    if cmd == "cts":        # starts and stops a private daemon of its own
        return cts.main(args)
    with _connect(args) as client:
        if cmd == "status":
            data = _status(client)
            _emit(args, data, render.status(data))
        elif cmd == "devices":
            data = client._request("devices", {})["devices"]
            _emit(args, data, render.devices_table(data) + "\n\n"
                  + "\n\n".join(render.device_params(d) for d in data))
        elif cmd == "clients":
            data = _others(client)
            _emit(args, data, render.PROCESS_NOTE + "\n" + render.clients_table(data))
        elif cmd == "query":
            return _query(args, client)
        elif cmd in ("dmon", "pmon"):
            return monitor.monitor(client, client.session, cmd, interval=args.delay, count=args.count,
                                   stamp=args.options or "", fmt=args.format, as_json=args.json)
        elif cmd == "top":
            if args.json:  # one snapshot, the fields top shows
                print(json.dumps(monitor.Sampler(client, client.session).sample(), indent=2, sort_keys=True,
                                 default=render.json_bytes))
                return 0
            return monitor.top(client, client.session, interval=args.delay, sort=args.sort,
                               iterations=args.iterations)
        elif cmd == "jobs":
            query = {k: v for k, v in (("session", args.session), ("device", args.device),
                                       ("limit", args.limit)) if v is not None}
            data = client._request("jobs", query)
            _emit(args, data, render.jobs_table(data))
        elif cmd == "mem":
            return _mem(args, client)
        elif cmd == "trace":
            return _trace(args, client)
        elif cmd == "compile":
            data, code = tools.compile_model(client, args.model, device=args.device, report=args.report,
                                             check=args.check, shapes=tools.parse_shapes(args.input_shape),
                                             output=args.output)
            _emit(args, data, tools.compile_text(data))
            return code
        elif cmd == "run":
            if args.bench < 0:
                raise tools.UsageError("--bench must be 0 or more")
            data = tools.run_model(client, args.model, device=args.device, inputs=args.inputs,
                                   bench=args.bench, seed=args.seed, save=args.save_outputs)
            _emit(args, data, tools.run_text(data))
            return INTERRUPTED if data.get("interrupted") else 0
        elif cmd == "cache":
            if args.action == "list":
                data = client._request("cache_list", {})
                _emit(args, data, render.cache_table(data))
            else:
                data = client._request("cache_clear", {})
                _emit(args, data, f"removed {data['removed']} compile cache entr"
                                  f"{'y' if data['removed'] == 1 else 'ies'}")
        elif cmd == "kill-client":
            return _kill(args, client)
        elif cmd == "reset":
            return _reset(args, client)
        elif cmd == "ray-resources":   # one line of JSON either way: what `ray start --resources` takes
            from npu.ray import resources   # (npu.ray imports Ray only for what needs it)
            print(json.dumps(resources(client=client), sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    as_json = "--json" in argv   # known before parsing, so that usage errors are JSON too
    try:
        args = _parser().parse_args(argv)
        args.command = args.command or "status"
        return _dispatch(args)
    except SystemExit as exc:   # --help, --version
        return int(exc.code or 0)
    except tools.UsageError as exc:
        return _fail(as_json, "EINVAL", str(exc), False, 2, usage=exc.usage)
    except npu.NpuError as exc:
        return _fail(as_json, exc.code, exc.message, exc.retryable, 1)
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:
        return 0


def _fail(as_json: bool, code: str, message: str, retryable: bool, status: int, usage: str = "") -> int:
    """Report an error: one line on stderr, or under --json an error object on stdout; the exit status."""
    if as_json:
        print(json.dumps({"error": {"code": code, "message": message, "retryable": retryable}}))
    else:
        print(f"{usage}npuctl: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
