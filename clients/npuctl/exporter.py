"""`npuctl exporter`: npud's metrics for Prometheus, as DCGM's exporter is for GPUs.

An HTTP server (``prometheus-client``'s threading WSGI server) answers:

* ``/metrics``: the Prometheus text format (or OpenMetrics, when the scraper
  asks for it).  Every scrape sends one ``status`` request to npud, with a
  timeout, through ``DaemonCollector``: the numbers are the daemon's at that
  moment, and nothing polls between scrapes.
* ``/healthz``: the daemon's state as JSON; 200 while it answers and no device
  is down, 503 with a ``reason`` otherwise.

There is no event loop here: every HTTP request runs in a thread of the
server, and they share one session (``DaemonLink``) through the synchronous
client, which is thread-safe (one thread at a time pumps its socket; see
clients/npu/client.py).  When npud is down, ``npud_up`` is 0, ``/healthz`` says
why, and the exporter keeps serving; the next scrape after npud returns opens a
new session.  Metric names and their meaning: docs/DEPLOY.md.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import npu

from .monitor import user_name

try:   # an optional dependency (pip install 'npud[exporter]'): npuctl's other commands work without it
    from prometheus_client import CollectorRegistry, make_wsgi_app
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                        InfoMetricFamily)
    from prometheus_client.exposition import ThreadingWSGIServer
    from prometheus_client.utils import floatToGoString
except ImportError:   # pragma: no cover - the test extra installs it
    ThreadingWSGIServer = None

log = logging.getLogger("npuctl.exporter")

DEFAULT_LISTEN = "127.0.0.1:9400"   # the port DCGM's exporter uses is 9400 too: one per node either way
DEFAULT_TIMEOUT_S = 5.0             # well inside Prometheus's default scrape_timeout (10 s)
REQUEST_READ_TIMEOUT_S = 10.0       # an HTTP client that sends nothing does not hold a thread longer

# (metric, field of the daemon's `device`, scale, help).  Gauges are levels; counters only grow
# while the daemon runs (prometheus-client adds `_total` to a counter's name).
DEVICE_GAUGES = (
    ("npud_device_utilization_ratio", "util_pct", 0.01,
     "Fraction (0..1) of the last util_window_s seconds the device spent executing jobs (the daemon's util_pct)"),
    ("npud_device_memory_total_bytes", "memory_total", 1, "Bytes of device memory"),
    ("npud_device_memory_used_bytes", "memory_used", 1, "Bytes of device memory allocated in buffer objects"),
    ("npud_device_jobs_queued", "jobs_queued", 1, "Jobs waiting to run (queue depth)"),
    ("npud_device_jobs_running", "jobs_running", 1, "Jobs executing now"),
    ("npud_device_cores", "cores", 1, "Device processes running jobs in parallel"),
    ("npud_device_banned_contexts", "banned_contexts", 1, "Contexts banned on the device for hanging it"),
)
DEVICE_COUNTERS = (
    ("npud_device_jobs_completed", "jobs_completed", 1, "Jobs finished successfully"),
    ("npud_device_jobs_failed", "jobs_failed", 1, "Jobs that failed"),
    ("npud_device_busy_seconds", "busy_ms", 1e-3,
     "Time the device spent executing jobs, averaged over its cores (rate() of it is the utilisation)"),
    ("npud_device_resets", "resets", 1, "Device process restarts"),
    ("npud_device_hangs", "hangs", 1, "Jobs that hung or crashed a device process"),
    ("npud_device_modeled_cycles", "modeled_cycles", 1, "Modeled cycles of the completed jobs"),
)
DEVICE_HISTOGRAMS = (
    ("npud_device_job_latency_seconds", "latency_ms",
     "Submission to outcome of finished jobs (done or failed), queueing included"),
    ("npud_device_job_run_seconds", "run_ms", "Device time of the jobs that ran"),
)
DEVICE_STATES = ("ok", "resetting", "down")
# (metric, field of a `client`, scale, help): summed over the open sessions of each uid.
USER_GAUGES = (
    ("npud_user_sessions", None, 1, "Open sessions"),
    ("npud_user_memory_bytes", "memory", 1, "Bytes of buffer objects held by open sessions"),
    ("npud_user_buffers", "buffers", 1, "Buffer objects held by open sessions"),
    ("npud_user_models", "models", 1, "Models loaded by open sessions"),
    ("npud_user_jobs_in_flight", "jobs_in_flight", 1, "Jobs queued or running"),
    ("npud_user_utilization_ratio", "util_pct", 0.01,
     "Device time of the last 5 s spent on the user's jobs, in devices (1 = one device fully busy)"),
)
# (metric, field of a `user_usage`, scale, help): totals that outlive sessions.
USER_COUNTERS = (
    ("npud_user_jobs_completed", "jobs_completed", 1, "Jobs of the user's sessions that finished successfully"),
    ("npud_user_jobs_failed", "jobs_failed", 1, "Jobs of the user's sessions that failed"),
    ("npud_user_busy_seconds", "busy_ms", 1e-3, "Device time the user's finished jobs took"),
    ("npud_user_modeled_cycles", "modeled_cycles", 1, "Modeled cycles of the user's completed jobs"),
)
CACHE_COUNTERS = (
    ("npud_compile_cache_hits", "hits", "Loads served from the compile cache"),
    ("npud_compile_cache_misses", "misses", "Loads that had to compile"),
    ("npud_compile_cache_discarded", "discarded", "Corrupt compile cache entries deleted"),
)


class DaemonLink:
    """One session with npud, shared by every HTTP thread; opened when first needed and again after
    it is lost (the daemon restarted, or an admin closed it)."""

    def __init__(self, connect: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT_S):
        self._connect = connect
        self.timeout = timeout
        self._client: Any = None
        self._lock = threading.Lock()   # one scrape at a time: a second waits for the first's answer
        self._was_up: bool | None = None

    @property
    def session(self) -> str:
        """Our own session id ("" when not connected), left out of the per-user metrics."""
        client = self._client
        return client.session if client is not None else ""

    def status(self) -> dict:
        """The daemon's `status` reply, or ``npu.NpuError`` saying why it could not be had.

        A session that fails is closed; when it was an old one (its daemon may have restarted) a new
        one is opened and asked once more, so one scrape after npud returns already succeeds."""
        with self._lock:
            try:
                status = self._status_locked()
            except npu.NpuError as exc:
                self._note(False, exc.message)
                raise
            self._note(True, "")
            return status

    def _status_locked(self) -> dict:
        while True:
            fresh = self._client is None
            if fresh:
                self._client = self._open()
            try:
                return self._client._request("status", {}, timeout=self.timeout)
            except npu.NpuError:
                self._drop()
                if fresh:
                    raise

    def _open(self) -> Any:
        try:
            return self._connect()
        except OSError as exc:   # e.g. no descriptor left: as unreachable as a daemon that is down
            raise npu.NpuError("ECONNREFUSED", f"cannot connect to npud: {exc}", retryable=True) from None

    def _drop(self) -> None:
        client, self._client = self._client, None
        try:
            client.close()
        except (npu.NpuError, OSError):
            pass

    def _note(self, up: bool, why: str) -> None:
        """Log when the daemon goes away or comes back, not at every scrape."""
        if up != self._was_up:
            if up:
                log.info("npud answers (session %s)", self.session)
            else:
                log.warning("npud is not answering: %s", why)
        self._was_up = up

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._drop()


class DaemonCollector:
    """A prometheus-client collector that asks npud at scrape time (``collect``); ``labels`` (e.g.
    ``{"node": host}``) are added to every sample, so a fleet's nodes stay apart however scraped."""

    def __init__(self, link: DaemonLink, labels: dict[str, str] | None = None):
        self.link = link
        self.labels = labels or {}

    def collect(self) -> Iterator:
        for family in self._families():
            family.samples = [s._replace(labels={**self.labels, **s.labels}) for s in family.samples]
            yield family

    def _families(self) -> Iterator:
        started = time.monotonic()
        try:
            status = self.link.status()
        except npu.NpuError:
            status = None
        yield GaugeMetricFamily("npud_up", "1 if npud answered this scrape's status request, else 0",
                                value=0 if status is None else 1)
        if status is not None:
            yield from metric_families(status, self.link.session)
        yield GaugeMetricFamily("npud_exporter_scrape_duration_seconds", "Time this scrape spent asking npud",
                                value=time.monotonic() - started)


def metric_families(status: dict, own_session: str = "") -> Iterator:
    """The metric families of one `status` reply (the exporter's own session left out)."""
    yield InfoMetricFamily("npud", "npud release and protocol version", value={
        "version": status["daemon_version"], "protocol": ".".join(map(str, status["protocol"]))})
    yield GaugeMetricFamily("npud_uptime_seconds", "Seconds since npud started", value=status["uptime_s"])
    clients = [c for c in status["clients"] if c["session"] != own_session]
    yield GaugeMetricFamily("npud_sessions", "Open sessions (clients)", value=len(clients))
    yield from _device_families(status["devices"])
    yield from _user_families(clients, status.get("users", []))
    cache = status.get("compile_cache")
    if cache is not None:
        for name, key, help_ in CACHE_COUNTERS:
            yield CounterMetricFamily(name, help_, value=cache[key])


def _device_families(devices: list[dict]) -> Iterator:
    labels = ["device", "name"]

    def per_device(family, key, scale):
        for d in devices:
            if key in d:   # optional fields of older daemons are left out, not reported as 0
                family.add_metric([str(d["index"]), d["name"]], d[key] * scale)
        return family

    info = InfoMetricFamily("npud_device", "Device names and presets", labels=labels)
    state = GaugeMetricFamily("npud_device_state", "1 for the device's state (ok, resetting, down), 0 for "
                                                   "the others", labels=[*labels, "state"])
    for d in devices:
        info.add_metric([str(d["index"]), d["name"]], {"preset": d["preset"]})
        for s in DEVICE_STATES:
            state.add_metric([str(d["index"]), d["name"], s], 1 if d["state"] == s else 0)
    yield info
    yield state
    for name, key, scale, help_ in DEVICE_GAUGES:
        yield per_device(GaugeMetricFamily(name, help_, labels=labels), key, scale)
    for name, key, scale, help_ in DEVICE_COUNTERS:
        yield per_device(CounterMetricFamily(name, help_, labels=labels), key, scale)
    for name, key, help_ in DEVICE_HISTOGRAMS:
        yield _histogram_family(name, help_, labels, devices, key)


def _histogram_family(name: str, help_: str, labels: list[str], devices: list[dict], key: str):
    """The daemon's `histogram` (ms) as a Prometheus one (seconds)."""
    family = HistogramMetricFamily(name, help_, labels=labels)
    for d in devices:
        h = d.get(key)
        if h is None:
            continue
        buckets = [(floatToGoString(bound / 1e3), count) for bound, count in zip(h["bounds_ms"], h["counts"])]
        family.add_metric([str(d["index"]), d["name"]], [*buckets, ("+Inf", h["count"])], h["sum_ms"] / 1e3)
    return family


def _user_families(clients: list[dict], usage: list[dict]) -> Iterator:
    """Levels of each uid's open sessions (summed), then each uid's totals since npud started."""
    users: dict[int, list[dict]] = {}
    for c in clients:
        users.setdefault(c["uid"], []).append(c)
    labels = ["uid", "user"]
    for name, key, scale, help_ in USER_GAUGES:
        family = GaugeMetricFamily(name, help_, labels=labels)
        for uid, sessions in sorted(users.items()):
            value = len(sessions) if key is None else sum(c[key] for c in sessions) * scale
            family.add_metric([str(uid), user_name(uid)], value)
        yield family
    for name, key, scale, help_ in USER_COUNTERS:
        family = CounterMetricFamily(name, help_, labels=labels)
        for row in usage:
            family.add_metric([str(row["uid"]), user_name(row["uid"])], row[key] * scale)
        yield family


def health(link: DaemonLink) -> tuple[int, dict]:
    """``/healthz``: (HTTP status, body).  503 when npud does not answer or a device is down; a
    device being reset is "degraded" but healthy (it comes back by itself)."""
    try:
        status = link.status()
    except npu.NpuError as exc:
        return 503, {"status": "down", "reason": exc.message, "code": exc.code}
    devices = {d["name"]: d["state"] for d in status["devices"]}
    body = {"status": "ok", "daemon_version": status["daemon_version"], "uptime_s": status["uptime_s"],
            "devices": devices}
    down = sorted(name for name, state in devices.items() if state == "down")
    resetting = sorted(name for name, state in devices.items() if state == "resetting")
    if down:
        return 503, {**body, "status": "failing",
                     "reason": f"device(s) down: {', '.join(down)} (their device processes do not start; "
                               "see the npud log)"}
    if resetting:
        return 200, {**body, "status": "degraded", "reason": f"device(s) being reset: {', '.join(resetting)}"}
    return 200, body


def make_app(link: DaemonLink, labels: dict[str, str] | None = None) -> Callable:
    """The WSGI application: /metrics (``labels`` on every sample), /healthz, and a short index at /."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(link, labels))
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/healthz":
            code, body = health(link)
            return _reply(start_response, code, "application/json", json.dumps(body, sort_keys=True) + "\n")
        if path == "/":
            return _reply(start_response, 200, "text/plain; charset=utf-8",
                          "npuctl exporter: npud's metrics at /metrics, its health at /healthz\n")
        return _reply(start_response, 404, "text/plain; charset=utf-8", f"no {path} here: try /metrics\n")
    return app


def _reply(start_response, code: int, content_type: str, text: str) -> list[bytes]:
    reasons = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}
    data = text.encode()
    start_response(f"{code} {reasons[code]}", [("Content-Type", content_type), ("Content-Length", str(len(data)))])
    return [data]


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6; an empty host means every interface) as (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN} or [::1]:9400")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


class _QuietHandler(WSGIRequestHandler):
    """No access log (a scrape every 15 s would fill it); a silent client is dropped."""

    timeout = REQUEST_READ_TIMEOUT_S

    def log_message(self, format, *args):
        pass


def make_http_server(listen: str, link: DaemonLink, labels: dict[str, str] | None = None):
    """A threading WSGI server bound to ``listen`` (port 0: any free port; see ``server_address``)."""
    host, port = parse_listen(listen)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("ExporterServer", (ThreadingWSGIServer,), {"address_family": family})
    return make_server(host, port, make_app(link, labels), server_class, handler_class=_QuietHandler)


def add_parser(add: Callable) -> None:
    """Register `npuctl exporter` (``add`` is npuctl's subcommand factory)."""
    p = add("exporter", "serve npud's metrics to Prometheus (/metrics) and its health (/healthz)")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"address to serve HTTP on (default {DEFAULT_LISTEN}; [::1]:PORT for IPv6)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"how long a scrape waits for npud (default {DEFAULT_TIMEOUT_S:g} s; keep it under "
                        "Prometheus's scrape_timeout)")
    p.add_argument("--node", metavar="NAME", help="add the label node=NAME to every metric (a fleet's "
                                                  "nodes; in the unit, --node %%H is the host name)")


def serve(args, connect: Callable[[], Any]) -> int:
    """Run until SIGTERM or SIGINT; 2 if the address cannot be served (bad, or in use)."""
    logging.basicConfig(level=logging.INFO, format="npuctl exporter: %(message)s")
    if ThreadingWSGIServer is None:
        log.error("prometheus-client is not installed: pip install 'npud[exporter]' (or prometheus-client)")
        return 2
    if not 0 < args.timeout <= 300:
        log.error("--timeout: expected seconds in (0, 300], got %s", args.timeout)
        return 2
    link = DaemonLink(connect, args.timeout)
    try:
        server = make_http_server(args.listen, link, {"node": args.node} if args.node else None)
    except (ValueError, OSError) as exc:
        log.error("cannot serve %s: %s", args.listen, exc)
        return 2
    signal.signal(signal.SIGTERM, _stop)
    host, port = server.server_address[:2]
    log.info("serving http://%s:%d/metrics and /healthz for npud at %s", host if ":" not in host else f"[{host}]",
             port, getattr(args, "endpoint", None) or "the default endpoint")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        link.close()
    return 0


def _stop(signum, frame):
    raise KeyboardInterrupt   # serve_forever returns in the main thread; the link closes its session
