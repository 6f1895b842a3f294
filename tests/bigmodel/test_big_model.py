"""A real ONNX model past 2 GiB (external data), loaded through a private daemon and run once.

Heavy for a shared 2-core machine (it writes 2.2 GB, and the client, daemon, compiler worker and
device each hold the weights once), so it runs with ``make bigmodel`` (``NPUD_BIGMODEL=1``), not
``make test``; tests/npud/test_npud_model_buffers.py covers the same path at 20 MiB there.  It
prints the load time and the peak RSS of each process (docs/PERFORMANCE.md, "Models past 2 GiB").
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import npu
from npu.local import LocalDaemon

import big_model
from measure import PeakRss

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("NPUD_BIGMODEL") != "1",
                                 reason="writes and loads a 2.2 GB model: make bigmodel (NPUD_BIGMODEL=1)")]
GiB = 1 << 30


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bigmodel")
    started = time.perf_counter()
    made = big_model.write(str(directory))
    print(f"\nwrote the model in {time.perf_counter() - started:.1f} s")
    return made


def test_a_model_past_2_gib_loads_and_runs_on_a_server_device(big, tmp_path):
    path, feeds, expected = big
    assert os.path.getsize(path) + os.path.getsize(os.path.join(os.path.dirname(path), "model.data")) > 2 * GiB
    config = tmp_path / "npud.toml"
    # staging the model takes 2.2 GB of the session's quota, then its weights as much again
    config.write_text(f'compile_timeout_s = 600\n{os.environ.get("NPUD_BIGMODEL_CONFIG", "")}\n[limits]\nmemory_quota = "8GiB"\n'
                      '[[devices]]\nname = "npu0"\npreset = "server"\n')
    d = LocalDaemon("--config", str(config), "--cache-dir", str(tmp_path / "cache"))
    try:
        with PeakRss(d.process.pid) as peak, npu.connect(d.endpoint, timeout=900) as c:
            started = time.perf_counter()
            model = c.load(path)
            loaded = time.perf_counter()
            out = model.run(feeds)["y"]
            ran = time.perf_counter()
        np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())
        print(f"load {loaded - started:.1f} s, run {ran - loaded:.2f} s; peak RSS "
              + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in sorted(peak.by_kind.items()))
              + f", all {peak.total / GiB:.2f} GiB; peak address space "
              + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in sorted(peak.address_space.items())))
    finally:
        d.stop()
