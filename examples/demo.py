"""The bundled example: `make demo`.

Starts a private npud, runs a job end to end on the reference NPU, checks the
result against numpy, and shows what `npuctl status` sees while it runs.

The job: out = relu(a + b) over a 64x256 float32 tensor, as a command stream
for the reference NPU: DMA both inputs into SRAM, add and relu on the vector
engine, DMA the result back.  The inputs and the output are buffer objects the
demo writes and reads in place through their mappings.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import npu
from emulator.assembler import StreamBuilder, tile
from emulator.config import DeviceConfig

SHAPE = (64, 256)
VA_A, VA_B, VA_OUT = 0x10000, 0x20000, 0x30000


def relu_add_stream(config) -> bytes:
    nbytes = int(np.prod(SHAPE)) * 4
    a, b, out = (tile(i * nbytes, "float32", SHAPE) for i in range(3))
    sb = StreamBuilder(config)
    sb.dma_load(a.addr, VA_A, "float32", SHAPE)
    sb.dma_load(b.addr, VA_B, "float32", SHAPE)
    sb.sync("dma", "vector")
    sb.add(a, b, out)
    sb.relu(out, out)
    sb.sync("vector", "dma")
    sb.dma_store(out.addr, VA_OUT, "float32", SHAPE)
    sb.end()
    return sb.build()


def main() -> int:
    rng = np.random.default_rng(0)
    a_host = rng.standard_normal(SHAPE, dtype=np.float32)
    b_host = rng.standard_normal(SHAPE, dtype=np.float32)
    with npu.local() as client:
        device = client.devices()[0]
        print(f"npud {client.daemon_version} at {client.endpoint}")
        print(f"device {device.index}: {device.name} (preset {device.preset}), {device.cores} core(s), "
              f"{device.mac_rows}x{device.mac_cols} MACs, {device.sram_bytes // 1024} KiB SRAM\n")

        nbytes = a_host.nbytes
        a, b, out = (client.alloc(nbytes) for _ in range(3))
        a.map(np.float32, SHAPE)[:] = a_host          # written in place: no copies
        b.map(np.float32, SHAPE)[:] = b_host
        stream = relu_add_stream(DeviceConfig.from_dict(device.params))
        job = client.submit(stream, [(a, VA_A, False), (b, VA_B, False), (out, VA_OUT, True)])
        job.wait(timeout=30)

        result = out.map(np.float32, SHAPE)
        expected = np.maximum(a_host + b_host, 0)
        ok = np.array_equal(result, expected)
        print(f"job {job.id}: out = relu(a + b), {SHAPE[0]}x{SHAPE[1]} float32")
        print(f"  result matches numpy: {ok}")
        print(f"  out[0, :6] = {np.array2string(result[0, :6], precision=3)}")
        print(f"  modeled cycles {job.stats['cycles']}, DMA in {job.stats['dma_bytes_in']} B, "
              f"out {job.stats['dma_bytes_out']} B, {job.stats['commands']} commands, "
              f"wall {job.stats['wall_ms']:.2f} ms\n")

        print("$ npuctl status")
        sys.stdout.flush()
        subprocess.run([sys.executable, "-m", "npuctl.main", "--endpoint", client.endpoint, "status"],
                       check=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
