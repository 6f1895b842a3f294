"""Run an executable on the in-process emulator (tests now; the daemon mirrors it).

:class:`EmulatorSession` maps the executable's regions once (page-aligned
anonymous memory; weights read-only, arena and outputs read-write, inputs
read-only), validates the stream once, then runs any number of times.
:func:`run_on_emulator` is the one-shot form.
"""

from __future__ import annotations

import mmap
from dataclasses import replace

import numpy as np

from npud.emulator.config import DeviceConfig
from npud.emulator.device import Device, JobStats
from npud.emulator.validator import validate

from npud.executable import Executable, weights_part


class EmulatorSession:
    def __init__(self, exe: Executable, config: DeviceConfig, device: Device | None = None) -> None:
        if bytes(exe.target_hash) != config.target_hash():
            raise ValueError(f"executable was compiled for target {bytes(exe.target_hash).hex()}, "
                             f"not {config.preset} ({config.target_hash().hex()})")
        self.exe = exe
        self.device = device or Device(config)
        self.ctx = self.device.create_context()
        ps = config.page_size
        self.mem: dict[str, np.ndarray] = {}
        self._maps = []
        for r in exe.memory["regions"]:
            size = max(ps, -(-r["size"] // ps) * ps)
            buf = mmap.mmap(-1, size)
            self._maps.append(buf)
            arr = np.frombuffer(buf, dtype=np.uint8)
            self.mem[r["name"]] = arr
            if r["kind"] == "weights":
                part = weights_part(exe.weights, r)
                arr[:len(part)] = np.frombuffer(part, dtype=np.uint8)
            self.ctx.map(r["va"], arr, writable=bool(r["writable"]))
        # the weights are written once, above, as the daemon writes a loaded model's: immutable
        weights = {r["va"] for r in exe.memory["regions"] if r["kind"] == "weights" and not r["writable"]}
        self.program = validate(exe.stream, config, [replace(m, immutable=m.va in weights)
                                                     for m in self.ctx.mappings()])

    def run(self, feeds: dict) -> tuple[dict, JobStats]:
        for e in self.exe.inputs:
            if e["name"] not in feeds:
                raise KeyError(f"missing input {e['name']!r}")
            x = np.asarray(feeds[e["name"]])
            if tuple(x.shape) != tuple(e["shape"]):
                raise ValueError(f"input {e['name']!r}: shape {list(x.shape)}, expected {e['shape']}")
            dst = self.mem[f"input:{e['name']}"][:e["size"]].view(e["dtype"])
            np.copyto(dst, x.reshape(-1), casting="same_kind")
        stats = self.device.execute(self.ctx, self.program)
        outs = {}
        for e in self.exe.outputs:
            src = self.mem[f"output:{e['name']}"][:e["size"]].view(e["dtype"])
            outs[e["name"]] = src.reshape(e["shape"]).copy()
        return outs, stats

    def close(self) -> None:
        self.ctx.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def run_on_emulator(exe: Executable, feeds: dict, config: DeviceConfig) -> tuple[dict, JobStats]:
    with EmulatorSession(exe, config) as s:
        return s.run(feeds)
