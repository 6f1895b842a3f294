"""Device parameters: what a particular npu-emu instance looks like.

A :class:`DeviceConfig` is plain data.  It crosses process boundaries as a
dict (:meth:`DeviceConfig.to_dict` / :meth:`DeviceConfig.from_dict`) and is
summarised by :meth:`DeviceConfig.target_hash`, which compiled command
streams carry in their header so a stream built for one target is refused by
another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

MAC_DTYPES = ("int8", "fp16", "fp32")

# Parameters that change what a compiled stream may do or how long it takes.
# memory_bytes, max_buffer_bytes, hw_contexts and page_size are properties of how the daemon
# hosts the device, not of the stream, so they stay out of the target hash:
# a stream compiled for "edge" runs on every device built from "edge".
TARGET_KEYS = ("cores", "mac_rows", "mac_cols", "macs_per_cycle", "clock_mhz",
                "sram_bytes", "dma_bytes_per_cycle", "dma_latency_cycles")
TARGET_HASH_PREFIX = b"npu-emu/1:"   # names the recipe: a new one changes it


@dataclass(frozen=True)
class DeviceConfig:
    """Parameters of one emulated NPU.  Construct with :func:`make_config`."""

    preset: str
    cores: int
    mac_rows: int
    mac_cols: int
    macs_per_cycle: dict[str, int] = field(hash=False)
    clock_mhz: int
    sram_bytes: int
    dma_bytes_per_cycle: int
    dma_latency_cycles: int
    memory_bytes: int
    page_size: int
    hw_contexts: int
    # The largest buffer object the device maps (a DMA window, an IOMMU mapping): the compiler
    # splits a model's weights into regions no larger, which the daemon loads as separate buffers.
    max_buffer_bytes: int = 512 << 20

    def __post_init__(self) -> None:
        _check(self)

    def to_dict(self) -> dict:
        """Plain (msgpack-able) dict; ``from_dict(to_dict())`` round-trips."""
        d = dataclasses.asdict(self)
        d["macs_per_cycle"] = dict(self.macs_per_cycle)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceConfig":
        """Rebuild a config; raises ValueError naming any bad key or value."""
        if not isinstance(d, dict):
            raise ValueError(f"device config must be a dict, not {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(map(str, d)) - set(names))
        if unknown:
            raise ValueError(f"unknown device config key(s): {', '.join(unknown)}")
        optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        missing = [n for n in names if n not in d and n not in optional]
        if missing:
            raise ValueError(f"missing device config key(s): {', '.join(missing)}")
        return cls(**{n: d[n] for n in names if n in d})

    def target_hash(self) -> bytes:
        """Stable 8-byte digest of the stream-relevant parameters."""
        d = self.to_dict()
        canon = json.dumps({k: d[k] for k in TARGET_KEYS}, sort_keys=True,
                           separators=(",", ":"))
        return hashlib.blake2b(TARGET_HASH_PREFIX + canon.encode(), digest_size=8).digest()

    @property
    def vector_bytes_per_cycle(self) -> int:
        """Width of the vector and pooling engines' datapath (derived: one
        32-bit lane per MAC column)."""
        return 4 * self.mac_cols


def _check(c: DeviceConfig) -> None:
    def positive_int(name: str, value, limit: int = 1 << 48) -> None:
        if type(value) is not int or not 0 < value <= limit:
            raise ValueError(f"device config {name}={value!r}: must be an integer in 1..{limit}")

    if not isinstance(c.preset, str) or not c.preset:
        raise ValueError(f"device config preset={c.preset!r}: must be a non-empty string")
    positive_int("cores", c.cores, 64)
    positive_int("mac_rows", c.mac_rows, 1024)
    positive_int("mac_cols", c.mac_cols, 1024)
    positive_int("clock_mhz", c.clock_mhz, 100_000)
    positive_int("sram_bytes", c.sram_bytes, 1 << 30)
    positive_int("dma_bytes_per_cycle", c.dma_bytes_per_cycle, 1 << 16)
    if type(c.dma_latency_cycles) is not int or not 0 <= c.dma_latency_cycles <= 1 << 20:
        raise ValueError(f"device config dma_latency_cycles={c.dma_latency_cycles!r}: "
                         "must be an integer in 0..1048576")
    positive_int("memory_bytes", c.memory_bytes)
    positive_int("page_size", c.page_size, 1 << 30)
    if c.page_size < 4096 or c.page_size & (c.page_size - 1):
        raise ValueError(f"device config page_size={c.page_size!r}: must be a power of two >= 4096")
    positive_int("hw_contexts", c.hw_contexts, 4096)
    positive_int("max_buffer_bytes", c.max_buffer_bytes)
    if c.max_buffer_bytes % c.page_size:
        raise ValueError(f"device config max_buffer_bytes={c.max_buffer_bytes!r}: must be a multiple of "
                         f"page_size ({c.page_size})")
    if not isinstance(c.macs_per_cycle, dict) or set(c.macs_per_cycle) != set(MAC_DTYPES):
        raise ValueError(f"device config macs_per_cycle={c.macs_per_cycle!r}: "
                         f"must be a dict with exactly the keys {', '.join(MAC_DTYPES)}")
    for k, v in c.macs_per_cycle.items():
        positive_int(f"macs_per_cycle[{k!r}]", v, 1 << 24)


PRESETS: dict[str, DeviceConfig] = {
    # A phone/MCU-class accelerator: one core, 16x16 int8 array.
    "edge": DeviceConfig(
        preset="edge", cores=1, mac_rows=16, mac_cols=16,
        macs_per_cycle={"int8": 256, "fp16": 128, "fp32": 32},
        clock_mhz=800, sram_bytes=256 * 1024,
        dma_bytes_per_cycle=16, dma_latency_cycles=100,
        memory_bytes=512 * 1024 * 1024, page_size=4096, hw_contexts=4),
    # A datacentre-class part: four cores, 32x32 arrays, 2 MiB SRAM each.
    "server": DeviceConfig(
        preset="server", cores=4, mac_rows=32, mac_cols=32,
        macs_per_cycle={"int8": 1024, "fp16": 512, "fp32": 256},
        clock_mhz=1500, sram_bytes=2 * 1024 * 1024,
        dma_bytes_per_cycle=64, dma_latency_cycles=200,
        memory_bytes=4 * 1024 * 1024 * 1024, page_size=4096, hw_contexts=16,
        max_buffer_bytes=2 * 1024 * 1024 * 1024),
}


def make_config(preset: str, **overrides) -> DeviceConfig:
    """A preset with some parameters replaced; ValueError on unknown names."""
    try:
        base = PRESETS[preset]
    except (KeyError, TypeError):
        raise ValueError(f"unknown device preset {preset!r} (known: {', '.join(PRESETS)})") from None
    d = base.to_dict()
    for k, v in overrides.items():
        if k not in d or k == "preset":
            raise ValueError(f"unknown device config key {k!r}")
        d[k] = v
    return DeviceConfig.from_dict(d)
