"""Utilisation as `status`, pmon's sampler and the trace summary report it, under a load that
saturates a 4-core device from three clients and a 1-core device from one (npud/ipc_schema/usage.py:
at most 100 % per device, and the clients' shares of a device add up to the device's).

Jobs sleep SLOW_MS per layer in the device process (npud --test-mode's `slow` fault), so their
length does not depend on how busy the CPUs are.  The load is also the one
tests/clients/test_npuctl_utilisation.py checks its bounds under.
Run: python -m bench.util_views
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np

import npu
from npu.local import LocalDaemon

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "compiler_worker"))

SLOW_MS = 8          # per layer: device time that sleeps
IN_FLIGHT = 4        # jobs each client keeps queued or running
SERVER, EDGE = 0, 1  # device indices in daemon()


def daemon(cache_dir: str) -> LocalDaemon:
    """A 4-core `server` device (0) and a 1-core `edge` device (1), with fault injection."""
    return LocalDaemon("--device", "server", "--device", "edge", "--test-mode", "--cache-dir", cache_dir)


class Load:
    """Clients that keep IN_FLIGHT slow jobs on their device until closed: three on the 4-core
    device (12 jobs for 4 cores: each client has about a third of it), one on the 1-core device."""

    def __init__(self, endpoint: str, model_path: str):
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.batches = [0] * 4
        self.clients = [npu.connect(endpoint, name=f"load{i}") for i in range(4)]
        self.threads = [threading.Thread(target=self._run, args=(i, c, SERVER if i < 3 else EDGE, model_path))
                        for i, c in enumerate(self.clients)]
        for t in self.threads:
            t.start()

    def _run(self, i: int, client, device: int, model_path: str) -> None:
        try:
            model = client.load(model_path, device)
            x = {model.inputs[0].name: np.ones(model.inputs[0].shape, np.float32)}
            while not self.stop.is_set():
                client.inject_fault("slow", device, slow_ms=SLOW_MS, count=IN_FLIGHT)
                for job in [model.submit(x) for _ in range(IN_FLIGHT)]:
                    job.wait(60)
                self.batches[i] += 1
        except BaseException as exc:  # reported by close()
            self.errors.append(exc)

    def steady(self, settle_s: float, timeout_s: float = 120.0) -> None:
        """Wait until every client has its jobs running, then ``settle_s`` more."""
        deadline = time.monotonic() + timeout_s
        while min(self.batches) < 1 and not self.errors and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(settle_s)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        for c in self.clients:
            c.close()
        assert not self.errors, self.errors


def _npuctl_json(endpoint: str, *args: str):
    from npuctl.main import main as npuctl_main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert npuctl_main(["--endpoint", endpoint, *args, "--json"]) == 0
    return json.loads(out.getvalue())


def main() -> None:
    from compiler_testmodels import mlp

    tmp = tempfile.mkdtemp(prefix="bench-util-")
    d = daemon(os.path.join(tmp, "cache"))
    try:
        path = os.path.join(tmp, "mlp.onnx")
        with open(path, "wb") as f:
            f.write(mlp())
        load = Load(d.endpoint, path)
        load.steady(6.0)   # the daemon's 5 s window holds only steady load
        s = _npuctl_json(d.endpoint, "status")
        print("status   devices", [round(x["util_pct"], 1) for x in s["devices"]],
              " clients", [(c["name"], round(c["util_pct"], 1)) for c in s["clients"] if c["name"][:4] == "load"])
        t = _npuctl_json(d.endpoint, "trace", "--duration", "1.5", "--summary")
        print("trace    devices", [x["util_pct"] for x in t["devices"]],
              " clients", sorted((c["client"], c["util_pct"]) for c in t["clients"] if c["client"][:4] == "load"))
        load.close()
    finally:
        d.stop()


if __name__ == "__main__":
    main()
