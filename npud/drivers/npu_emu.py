"""npu-emu as a driver: the reference emulated NPU (npud/emulator, docs/ISA.md).

Registered in npud's pyproject.toml under ``npud.drivers`` like any vendor's driver; this is
the only daemon-side module that imports the emulator."""

from __future__ import annotations

from npud import __version__
from npud.emulator.config import PRESETS, DeviceConfig, make_config
from npud.emulator.errors import StreamError
from npud.emulator.validator import Mapping, validate

from . import Binding, Driver, ProgramInfo, ProgramRejected


class NpuEmuDriver(Driver):
    name = "npu-emu"
    version = __version__
    target = "npu-emu"
    device_process = "npud.emulator.device_process"

    def presets(self) -> tuple[str, ...]:
        return tuple(PRESETS)

    def params(self, preset: str, overrides: dict) -> DeviceConfig:
        return make_config(preset, **overrides)

    def validate(self, stream: bytes, params: DeviceConfig, bindings: list[Binding]) -> ProgramInfo:
        try:
            program = validate(stream, params, [Mapping(b.va, b.size, b.writable) for b in bindings])
        except StreamError as exc:
            raise ProgramRejected(exc.message) from None
        return ProgramInfo(cycles=program.stats.cycles)
