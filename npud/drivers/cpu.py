"""The ``cpu`` driver: a device that runs ONNX (sub)graphs on the host CPU through onnxruntime --
npud's llvmpipe (docs/DRIVERS.md, "The cpu driver").

It is a device like npu-emu: its own device process (npud/drivers/cpu_device.py) behind the same
device link, queues, contexts, priorities, fences, watchdog, stats and npuctl views.  Its
program is a small container (``pack_program``): the ONNX model and where each input and
output lives in the job's address space.  This module, which the daemon imports, checks a
program without onnx or onnxruntime: it only decodes the container and checks that every
tensor lies inside a binding (outputs inside writable ones).  onnxruntime is needed only in the
device process: the optional extra ``npud[cpu]``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import msgpack

from npud import __version__

from . import Binding, Driver, PlainParams, ProgramInfo, ProgramRejected

MAGIC = b"NPUCPU\x00\x01"          # the container, version 1
TARGET_HASH_PREFIX = b"cpu/1:"
MAX_TENSORS = 4096


@dataclass(frozen=True)
class CpuParams(PlainParams):
    """The host CPU as an npud device."""

    preset: str = "host"
    cores: int = 1                  # device processes (jobs in parallel)
    threads: int = 1                # onnxruntime intra-op threads per device process
    clock_mhz: int = 1000           # a run's measured time is reported as cycles at this clock
    memory_bytes: int = 1 << 30
    page_size: int = 4096

    LABEL = "cpu"

    @classmethod
    def preset_names(cls) -> tuple[str, ...]:
        return PRESETS

    def __post_init__(self) -> None:
        self.check_fields()
        if self.page_size < 4096 or self.page_size & (self.page_size - 1):
            raise ValueError(f"cpu device page_size={self.page_size!r}: must be a power of two >= 4096")

    def target_hash(self) -> bytes:
        """A program for the cpu target runs on any cpu device: nothing but the recipe counts."""
        return hashlib.blake2b(TARGET_HASH_PREFIX, digest_size=8).digest()


PRESETS = ("host",)


def pack_program(model: bytes, inputs: list[dict], outputs: list[dict]) -> bytes:
    """The cpu program container: the ONNX model and its tensors ({name, dtype, shape, va, size})."""
    return MAGIC + msgpack.packb({"model": bytes(model), "inputs": inputs, "outputs": outputs},
                                 use_bin_type=True)


def unpack_program(stream: bytes) -> dict:
    """A container's contents, checked for shape (not the model: onnxruntime parses that, in the
    device process); ProgramRejected says what is wrong."""
    stream = bytes(stream)
    if not stream.startswith(MAGIC):
        raise ProgramRejected(f"not a cpu program (magic {stream[:8]!r}, expected {MAGIC!r})")
    try:
        program = msgpack.unpackb(stream[len(MAGIC):], raw=False)
    except Exception as exc:
        raise ProgramRejected(f"cpu program is corrupt ({type(exc).__name__})") from None
    if type(program) is not dict or type(program.get("model")) is not bytes:
        raise ProgramRejected("cpu program has no model")
    for kind in ("inputs", "outputs"):
        tensors = program.get(kind)
        if type(tensors) is not list or len(tensors) > MAX_TENSORS:
            raise ProgramRejected(f"cpu program: {kind} must be a list of at most {MAX_TENSORS} tensors")
        for t in tensors:
            if not (type(t) is dict and type(t.get("name")) is str and type(t.get("dtype")) is str
                    and type(t.get("shape")) is list and all(type(d) is int and d >= 0 for d in t["shape"])
                    and type(t.get("va")) is int and type(t.get("size")) is int and t["va"] >= 0
                    and t["size"] >= 0):
                raise ProgramRejected(f"cpu program: malformed {kind[:-1]} {json.dumps(t, default=str)[:200]}")
    return program


def _inside(t: dict, bindings: list[Binding], writable: bool) -> bool:
    return any(b.va <= t["va"] and t["va"] + t["size"] <= b.va + b.size and (b.writable or not writable)
               for b in bindings)


class CpuDriver(Driver):
    name = "cpu"
    version = __version__
    target = "cpu"
    device_process = "npud.drivers.cpu_device"
    preemption = False       # one onnxruntime call per run: no point to stop at

    def presets(self) -> tuple[str, ...]:
        return PRESETS

    def params(self, preset: str, overrides: dict) -> CpuParams:
        if "preset" in overrides:
            raise ValueError("unknown cpu device key 'preset' (the preset is chosen by `preset`)")
        return CpuParams.from_dict({**overrides, "preset": preset})

    def validate(self, stream: bytes, params: CpuParams, bindings: list[Binding]) -> ProgramInfo:
        program = unpack_program(stream)
        for kind, writable in (("inputs", False), ("outputs", True)):
            for t in program[kind]:
                if not _inside(t, bindings, writable):
                    raise ProgramRejected(f"{kind[:-1]} {t['name']!r} ({t['size']} bytes at va {t['va']:#x}) "
                                          f"is not inside a{' writable' if writable else ''} binding")
        return ProgramInfo(cycles=0)   # no model of its cost: measured times take over after a run
