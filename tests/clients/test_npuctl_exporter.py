"""`npuctl exporter`: scraped over HTTP and parsed with prometheus-client's own parsers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import npu  # noqa: E402
from npu.local import LocalDaemon  # noqa: E402
from npuctl import exporter  # noqa: E402
from streams import A, B, O, add_stream  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "compiler_worker"))
from compiler_testmodels import mlp  # noqa: E402

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-npud.json"


@contextmanager
def serving(endpoint: str, timeout: float = 5.0):
    """An exporter for ``endpoint`` on a free port, in a thread; yields its base URL."""
    link = exporter.DaemonLink(lambda: npu.connect(endpoint, name="exporter-test"), timeout)
    server = exporter.make_http_server("127.0.0.1:0", link)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
        link.close()


def get(url: str, accept: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(base: str) -> dict[str, list]:
    """Samples of /metrics by name (``_total``, ``_bucket`` ... included)."""
    code, text = get(base + "/metrics")
    assert code == 200, text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict, metric: str, **labels) -> float:
    found = [s.value for s in samples.get(metric, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (metric, labels, samples.get(metric))
    return found[0]


@pytest.fixture(scope="module")
def busy(daemon):
    """The module's daemon after a model was loaded twice (a compile, then a cache hit) and a job ran
    in a session since closed, with one session left open holding a 1 MiB buffer."""
    c = npu.connect(daemon.endpoint, name="busy")
    model = mlp(seed=int.from_bytes(os.urandom(4), "little"))   # new weights: not in the cache yet
    c.load(model).unload()
    c.load(model).unload()
    with npu.connect(daemon.endpoint, name="gone") as gone:   # its job counts for its user after it closes
        a, b, out = (gone.alloc(256 * 4) for _ in range(3))
        job = gone.submit(add_stream(256), [(a, A, False), (b, B, False), (out, O, True)])
        assert job.wait(30).state == "done"
    c.alloc(1 << 20)
    yield c
    c.close()


@pytest.fixture(scope="module")
def scraped(daemon, busy):
    with serving(daemon.endpoint) as base:
        yield base, scrape(base)


def test_scrape_reports_the_daemon_its_devices_and_its_users(scraped, busy):
    _base, samples = scraped
    assert value(samples, "npud_up") == 1
    assert value(samples, "npud_sessions") == 1                # the exporter's own session is left out
    assert value(samples, "npud_info", version=busy.daemon_version) == 1
    dev = {"device": "0", "name": "npu0"}
    assert value(samples, "npud_device_state", state="ok", **dev) == 1
    assert value(samples, "npud_device_state", state="down", **dev) == 0
    assert value(samples, "npud_device_info", preset="edge", **dev) == 1
    assert value(samples, "npud_device_jobs_completed_total", **dev) >= 1
    assert value(samples, "npud_device_jobs_failed_total", **dev) == 0
    assert value(samples, "npud_device_jobs_queued", **dev) == 0
    assert 0 <= value(samples, "npud_device_utilization_ratio", **dev) <= 1
    assert value(samples, "npud_device_memory_used_bytes", **dev) >= 1 << 20
    assert value(samples, "npud_device_resets_total", **dev) == 0
    assert value(samples, "npud_compile_cache_misses_total") >= 1
    assert value(samples, "npud_compile_cache_hits_total") >= 1
    mine = {"uid": str(os.getuid())}
    own = next(c for c in busy.clients() if c["session"] == busy.session)
    assert value(samples, "npud_user_sessions", **mine) == 1
    assert value(samples, "npud_user_memory_bytes", **mine) == own["memory"] >= 1 << 20
    assert value(samples, "npud_user_jobs_in_flight", **mine) == 0
    # Totals outlive sessions: the job ran in a session that has closed.
    assert value(samples, "npud_user_jobs_completed_total", **mine) >= 1 and own["jobs_completed"] == 0
    assert value(samples, "npud_user_busy_seconds_total", **mine) > 0


@pytest.mark.parametrize("metric", ["npud_device_job_latency_seconds", "npud_device_job_run_seconds"])
def test_job_times_are_histograms_in_seconds(scraped, metric):
    _base, samples = scraped
    dev = {"device": "0", "name": "npu0"}
    count = value(samples, f"{metric}_count", **dev)
    assert count >= 1 and value(samples, f"{metric}_sum", **dev) > 0
    buckets = sorted(((float(s.labels["le"]), s.value) for s in samples[f"{metric}_bucket"]))
    assert buckets[-1] == (float("inf"), count)
    assert [v for _le, v in buckets] == sorted(v for _le, v in buckets)      # cumulative
    assert buckets[0][0] == 0.0005 and buckets[-2][0] == 30.0                 # ms bounds, in seconds


def test_openmetrics_is_served_to_scrapers_that_ask(scraped):
    base, _samples = scraped
    code, text = get(base + "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert code == 200 and text.endswith("# EOF\n")
    names = {f.name for f in parse_openmetrics(text)}
    assert {"npud_up", "npud_device_jobs_completed", "npud_device_job_latency_seconds"} <= names


def test_healthz_reports_ok_and_other_paths_are_not_found(scraped):
    base, _samples = scraped
    code, body = get(base + "/healthz")
    assert code == 200 and json.loads(body)["status"] == "ok" and json.loads(body)["devices"] == {"npu0": "ok"}
    assert get(base + "/nope")[0] == 404


def test_an_older_daemon_without_the_optional_fields_still_exports(daemon, busy):
    status = busy.status()
    del status["compile_cache"]
    for d in status["devices"]:
        for key in ("latency_ms", "run_ms", "cores", "hangs", "banned_contexts"):
            d.pop(key, None)
    text = "".join(f.name + "\n" for f in exporter.metric_families(status, busy.session))
    assert "npud_device_jobs_queued" in text and "npud_compile_cache_hits" not in text
    from prometheus_client import CollectorRegistry, generate_latest

    class Fixed:
        def collect(self):
            return exporter.metric_families(status, busy.session)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())
    samples = {s.name for f in text_string_to_metric_families(generate_latest(registry).decode())
               for s in f.samples}
    assert "npud_device_job_latency_seconds_count" not in samples and "npud_device_hangs_total" not in samples


def test_dashboard_queries_name_exported_metrics(scraped):
    _base, samples = scraped
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert dashboard["title"] and len(exprs) >= 10
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    for expr in exprs:
        names = re.findall(r"\bnpud_[a-z_]+\b", expr)
        assert names, expr
        for name in names:
            assert name in samples, f"{name} in {expr!r} is not an exported metric"


# --- npud going away and coming back -------------------------------------------------------

def test_exporter_reports_a_daemon_down_and_recovers_when_it_returns(tmp_path):
    endpoint = f"ipc://{tmp_path}/npud.sock"
    daemon = LocalDaemon("--endpoint", endpoint)
    try:
        with serving(endpoint) as base:
            assert value(scrape(base), "npud_up") == 1
            daemon.stop()
            samples = scrape(base)
            assert value(samples, "npud_up") == 0 and "npud_device_jobs_queued" not in samples
            code, body = get(base + "/healthz")
            assert code == 503 and json.loads(body)["status"] == "down"
            assert endpoint in json.loads(body)["reason"] and json.loads(body)["code"] == "ECONNREFUSED"
            daemon = LocalDaemon("--endpoint", endpoint)
            assert value(scrape(base), "npud_up") == 1       # the first scrape after it returns
            code, body = get(base + "/healthz")
            assert code == 200 and json.loads(body)["status"] == "ok"
    finally:
        daemon.stop()


def test_hangs_resets_bans_and_failures_are_exported(tmp_path):
    (tmp_path / "npud.toml").write_text("[scheduling]\nban_after_hangs = 2\ndevice_processes = 1\n")
    daemon = LocalDaemon("--test-mode", "--config", str(tmp_path / "npud.toml"))
    try:
        with npu.connect(daemon.endpoint, name="hangs") as c, serving(daemon.endpoint) as base:
            ctx = c.context("normal")
            a, b, out = (c.alloc(256 * 4) for _ in range(3))
            c.inject_fault("hang", count=2)
            for _ in range(2):
                with pytest.raises(npu.Timeout):
                    c.submit(add_stream(256), [(a, A, False), (b, B, False), (out, O, True)], context=ctx,
                             timeout=0.3).wait(30)
            samples = scrape(base)
    finally:
        daemon.stop()
    dev = {"device": "0", "name": "npu0"}
    assert value(samples, "npud_device_resets_total", **dev) >= 2
    assert value(samples, "npud_device_hangs_total", **dev) == 2
    assert value(samples, "npud_device_banned_contexts", **dev) == 1
    assert value(samples, "npud_device_jobs_failed_total", **dev) == 2
    assert value(samples, "npud_device_job_latency_seconds_count", **dev) == 2     # failed jobs count too
    assert value(samples, "npud_user_jobs_failed_total", uid=str(os.getuid())) == 2


class FixedLink:
    """A DaemonLink stand-in that answers with a given status (or error)."""

    def __init__(self, status):
        self._status = status

    def status(self):
        if isinstance(self._status, Exception):
            raise self._status
        return self._status


def fake_status(*states: str) -> dict:
    return {"daemon_version": "0", "uptime_s": 1.0,
            "devices": [{"name": f"npu{i}", "state": s} for i, s in enumerate(states)]}


def test_healthz_is_503_when_a_device_is_down_and_200_while_one_resets():
    assert exporter.health(FixedLink(fake_status("ok", "ok")))[0] == 200
    code, body = exporter.health(FixedLink(fake_status("ok", "resetting")))
    assert code == 200 and body["status"] == "degraded" and "npu1" in body["reason"]
    code, body = exporter.health(FixedLink(fake_status("down", "resetting")))
    assert code == 503 and body["status"] == "failing" and "npu0" in body["reason"]
    code, body = exporter.health(FixedLink(npu.NpuError("ETIMEDOUT", "no answer in 5 s")))
    assert code == 503 and body == {"status": "down", "reason": "no answer in 5 s", "code": "ETIMEDOUT"}


# --- the command line --------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("127.0.0.1:9400", ("127.0.0.1", 9400)), ("[::1]:0", ("::1", 0)),
                                            (":9400", ("0.0.0.0", 9400)), ("localhost:80", ("localhost", 80))])
def test_parse_listen(text, expected):
    assert exporter.parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9400", "host:", "host:70000", "host:port"])
def test_parse_listen_refuses_what_is_not_host_port(text):
    with pytest.raises(ValueError, match="HOST:PORT"):
        exporter.parse_listen(text)


def npuctl(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "npuctl.main", *args], stderr=subprocess.PIPE, text=True)


def test_npuctl_exporter_serves_without_a_daemon_and_stops_on_sigterm(tmp_path):
    proc = npuctl("exporter", "--listen", "127.0.0.1:0", "--endpoint", f"ipc://{tmp_path}/none.sock")
    try:
        line = proc.stderr.readline()
        port = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
        assert port, line
        base = f"http://127.0.0.1:{port.group(1)}"
        assert value(scrape(base), "npud_up") == 0
        assert get(base + "/healthz")[0] == 503
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


@pytest.mark.parametrize("args, message", [(["--listen", "nowhere"], "HOST:PORT"),
                                           (["--timeout", "0"], "--timeout")])
def test_npuctl_exporter_refuses_bad_options(args, message):
    proc = npuctl("exporter", *args)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and message in err, err
