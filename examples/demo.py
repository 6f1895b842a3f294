"""The bundled example: `make demo`.

Starts a private npud with two devices -- the reference NPU (npu-emu) and a
`cpu` device (onnxruntime, the `npud[cpu]` extra) -- compiles a small CNN built
in this repository (examples/tiny_cnn.py) whose last node, a TopK, the NPU's
compiler declines, so that node runs on the cpu device in the same model; runs
it, checks the answer against a plain numpy computation of the same network,
prints the compiler's per-layer report, where each node ran and what `npuctl
status` shows, and stops the daemon.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import npu

from . import tiny_cnn


def main() -> int:
    x = np.random.default_rng(0).standard_normal(tiny_cnn.INPUT_SHAPE).astype(np.float32)
    with npu.local("--device", "edge", "--device", "cpu") as client:
        print(f"npud {client.daemon_version} at {client.endpoint}")
        npu_device, cpu_device = client.devices()
        print(f"device {npu_device.index}: {npu_device.name} (preset {npu_device.preset}), {npu_device.cores} core(s), "
              f"{npu_device.mac_rows}x{npu_device.mac_cols} MACs, {npu_device.sram_bytes // 1024} KiB SRAM")
        print(f"device {cpu_device.index}: {cpu_device.name} (driver {cpu_device.driver}): runs what the NPU declines\n")

        model = client.load(tiny_cnn.build(top_k=3), device=npu_device.index, name="tiny_cnn")
        how = "from the compile cache" if model.cached else "compiled by a worker"
        print(f"loaded {model} {how} in {model.compile_ms:.0f} ms")
        print(f"  weights {model.weights_bytes} B, activation arena {model.arena_bytes} B of device memory\n")
        print(model.report(), "\n")   # each partition's layers, then where each node runs

        job = model.submit(x)
        result = job.result(timeout=60)
        probs = result["probs"]
        expected = tiny_cnn.reference(x)
        top = np.argsort(expected[0])[::-1][:3]
        ok = (np.allclose(probs, expected, rtol=1e-3, atol=1e-5)
              and list(result["top_classes"][0]) == list(top)
              and np.allclose(result["top_probs"][0], expected[0, top], rtol=1e-3, atol=1e-5))
        print("class probabilities, top 3 (TopK on the cpu device): "
              + ", ".join(f"{c}: {p:.4f}" for c, p in zip(result["top_classes"][0], result["top_probs"][0])))
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
