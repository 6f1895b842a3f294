"""The device's parameters: what the daemon, the compiler and the device process know of one.

An Ethos-U55 is configured with 32 to 256 int8 MACs per cycle, up to a few hundred KiB of SRAM
and a clock of a few hundred MHz, and computes int8 (and int16) only; these presets follow it.
``emulator_config`` says how the template runs on npu-emu's engines: a real driver has no such
method -- its device process drives the hardware the parameters describe.
"""

from __future__ import annotations

from dataclasses import dataclass

from npud.drivers import PlainParams
from npud.emulator.config import DeviceConfig


@dataclass(frozen=True)
class TmplParams(PlainParams):
    """The device's parameters (npud.drivers.DeviceParams): an Ethos-U55-like int8 array."""

    preset: str = "u55-256"
    cores: int = 1                    # device processes (jobs in parallel): one NPU
    macs: int = 256                   # int8 MACs per cycle
    sram_bytes: int = 256 * 1024      # on-chip SRAM
    clock_mhz: int = 500
    dma_bytes_per_cycle: int = 8
    memory_bytes: int = 256 << 20     # the device memory npud may allocate for it
    page_size: int = 4096

    LABEL = "tmpl-int8"

    @classmethod
    def preset_names(cls) -> tuple[str, ...]:
        return tuple(PRESETS)

    def __post_init__(self) -> None:
        self.check_fields()   # npud.drivers.PlainParams: a known preset, positive integers
        if self.macs % 16:
            raise ValueError(f"tmpl-int8 macs={self.macs}: must be a multiple of 16 (the array is 16 wide)")

    def emulator_config(self) -> DeviceConfig:
        """npu-emu's configuration of this device: a 16-wide int8 MAC array; float rates of one MAC
        a cycle, never used (the target claims no float node)."""
        return DeviceConfig(preset=self.preset, cores=self.cores, mac_rows=self.macs // 16, mac_cols=16,
                            macs_per_cycle={"int8": self.macs, "fp16": 1, "fp32": 1}, clock_mhz=self.clock_mhz,
                            sram_bytes=self.sram_bytes, dma_bytes_per_cycle=self.dma_bytes_per_cycle,
                            dma_latency_cycles=64, memory_bytes=self.memory_bytes, page_size=self.page_size,
                            hw_contexts=2)

    def target_hash(self) -> bytes:
        """What a compiled program depends on: the emulated array it was built for."""
        return self.emulator_config().target_hash()


PRESETS = {
    "u55-256": {},
    "u55-128": {"macs": 128, "sram_bytes": 128 * 1024},
}
