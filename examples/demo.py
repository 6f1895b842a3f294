"""The bundled example: `make demo`.

Starts a private npud, compiles a small CNN built in this repository
(examples/tiny_cnn.py) for the reference NPU, runs it, checks the answer
against a plain numpy computation of the same network, prints the compiler's
per-layer report and what `npuctl status` shows, and stops the daemon.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import npu

from . import tiny_cnn


def main() -> int:
    x = np.random.default_rng(0).standard_normal(tiny_cnn.INPUT_SHAPE).astype(np.float32)
    with npu.local() as client:
        device = client.devices()[0]
        print(f"npud {client.daemon_version} at {client.endpoint}")
        print(f"device {device.index}: {device.name} (preset {device.preset}), {device.cores} core(s), "
              f"{device.mac_rows}x{device.mac_cols} MACs, {device.sram_bytes // 1024} KiB SRAM\n")

        model = client.load(tiny_cnn.build(), name="tiny_cnn")
        how = "from the compile cache" if model.cached else "compiled by a worker"
        print(f"loaded {model} {how} in {model.compile_ms:.0f} ms")
        print(f"  weights {model.weights_bytes} B, activation arena {model.arena_bytes} B of device memory\n")
        print(model.report(), "\n")

        job = model.submit(x)
        probs = job.result(timeout=60)["probs"]
        expected = tiny_cnn.reference(x)
        ok = np.allclose(probs, expected, rtol=1e-3, atol=1e-5)
        top = np.argsort(probs[0])[::-1][:3]
        print("class probabilities, top 3: " + ", ".join(f"{i}: {probs[0, i]:.4f}" for i in top))
        print(f"matches numpy's computation of the same network: {ok} "
              f"(max abs difference {np.abs(probs - expected).max():.2e})")
        print(f"modeled on the NPU: {job.stats['cycles']} cycles, {job.stats['macs']} MACs, "
              f"DMA {job.stats['dma_bytes_in']} B in / {job.stats['dma_bytes_out']} B out; "
              f"emulated in {job.stats['wall_ms']:.1f} ms\n")

        print("$ npuctl status")
        sys.stdout.flush()
        subprocess.run([sys.executable, "-m", "npuctl.main", "--endpoint", client.endpoint, "status"],
                       check=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
