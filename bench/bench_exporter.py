"""`npuctl exporter`: a scrape of /metrics and of /healthz against the `status` request each one makes.

A private npud with one device and 20 client sessions; the exporter serves from a thread of this
process, and both the scrape (over HTTP) and the baseline (`status` through a client of its own)
are measured in interleaved rounds.  The difference is what the exporter adds: HTTP, building the
metric families and rendering them.  Goal: a scrape within 5x a bare `status` (both are milliseconds;
Prometheus scrapes every 15 s or so).  Run: python -m bench exporter
"""

from __future__ import annotations

import threading
import urllib.request

import npu
from npu.local import LocalDaemon
from npuctl import exporter

from .common import Ratio, compare, report

SESSIONS = 20


def run(n: int = 50) -> list[Ratio]:
    daemon = LocalDaemon()
    clients, server, link = [], None, None
    try:
        clients = [npu.connect(daemon.endpoint, name=f"bench{i}") for i in range(SESSIONS)]
        link = exporter.DaemonLink(lambda: npu.connect(daemon.endpoint, name="exporter"))
        server = exporter.make_http_server("127.0.0.1:0", link)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        status = clients[0].status
        ratios = []
        for path in ("/metrics", "/healthz"):
            scrape_s, status_s = compare(lambda: urllib.request.urlopen(base + path).read(), status, n=n)
            ratios.append(Ratio(f"GET {path} vs status request ({SESSIONS} sessions)", scrape_s, status_s,
                                "ms", 1e3, "<= 5x"))
        return ratios
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        if link is not None:
            link.close()
        for c in clients:
            c.close()
        daemon.stop()


def main() -> int:
    report("npuctl exporter: scrape cost", run())
    return 0


if __name__ == "__main__":
    main()
