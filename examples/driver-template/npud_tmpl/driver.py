"""The daemon's side of ``tmpl-int8``: presets, parameters, program validation, the device process."""

from __future__ import annotations

from npud.drivers import Binding, ProgramInfo
from npud.drivers.npu_emu import NpuEmuDriver

from . import __version__
from .params import PRESETS, TmplParams


class TmplDriver(NpuEmuDriver):
    name = "tmpl-int8"
    version = __version__
    target = "tmpl-int8"
    # npu-emu's device process runs the programs: a real driver names its own module here, which
    # opens /dev/accel/accelN and serves the device link (npud/drivers/link.py: DeviceServer)
    device_process = "npud.emulator.device_process"
    preemption = True            # npu-emu's engines stop between layers when asked

    def presets(self) -> tuple[str, ...]:
        return tuple(PRESETS)

    def params(self, preset: str, overrides: dict) -> TmplParams:
        if preset not in PRESETS:
            raise ValueError(f"unknown tmpl-int8 preset {preset!r} (known: {', '.join(PRESETS)})")
        if "preset" in overrides:
            raise ValueError("unknown tmpl-int8 key 'preset' (the preset is chosen by `preset`)")
        return TmplParams.from_dict({**PRESETS[preset], **overrides, "preset": preset})

    def validate(self, stream: bytes, params: TmplParams, bindings: list[Binding]) -> ProgramInfo:
        """npu-emu's validator, against the array this device is (every address inside a binding,
        every engine operand inside SRAM)."""
        return super().validate(stream, params.emulator_config(), bindings)

    def process_args(self, params: TmplParams) -> list[str]:
        """The device process is npu-emu's: it takes npu-emu's configuration."""
        return super().process_args(params.emulator_config())
