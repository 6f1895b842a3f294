"""Command streams the tests submit by hand: the smallest real job.

``add_stream``: out = a + b over ``n`` float32 values — DMA both inputs from
their bindings into SRAM, add on the vector engine, DMA the sum back.
"""

from __future__ import annotations

from npud.emulator.assembler import StreamBuilder, tile
from npud.emulator.config import DeviceConfig, make_config

A, B, O = 0x10000, 0x20000, 0x30000  # where tests bind the two inputs and the output


def add_stream(n: int, config: DeviceConfig | None = None, out_va: int = O) -> bytes:
    sb = StreamBuilder(config or make_config("edge"))
    sb.dma_load(0, A, "float32", (n,))
    sb.dma_load(n * 4, B, "float32", (n,))
    sb.sync("dma", "vector")
    sb.add(tile(0, "float32", (n,)), tile(n * 4, "float32", (n,)), tile(2 * n * 4, "float32", (n,)))
    sb.sync("vector", "dma")
    sb.dma_store(2 * n * 4, out_va, "float32", (n,))
    sb.end()
    return sb.build()
