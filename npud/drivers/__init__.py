"""The driver interface: what an NPU implements to be served by npud (docs/DRIVERS.md).

A driver has two halves, because npud runs every device in a process of its own (a hung or
crashed device is reset by killing that process, and the daemon carries on):

* ``Driver`` -- imported by the daemon when a configured device names it: which devices and
  parameters it offers, which compiler target (``npud.targets``) builds its programs, how to
  check a program before any of it reaches the device (the daemon trusts no compiler), and
  which module runs as its device process.
* the device process -- a subclass of ``link.DeviceServer`` (npud/drivers/link.py), which owns
  the message loop, the ``ready`` handshake, the preemption check and buffer objects imported as
  shared mappings; the driver adds ``_op_load_program``, ``_op_unload_program``, ``_op_run``
  (execute a job from a preemption point, with stats: modeled ``cycles``, measured ``wall_ms``)
  and, if it likes, ``ready_info``.  The daemon speaks to it over the device link (one SEQPACKET
  socket, msgpack packets, memfds in SCM_RIGHTS; npud/device_link.py); reset is the daemon
  killing and restarting the process.  Buffer objects arrive as memfds; on real hardware the
  process turns one into a device buffer without a copy: ``UDMABUF_CREATE`` on /dev/udmabuf
  makes a dma-buf of the memfd's pages, ``DRM_IOCTL_PRIME_FD_TO_HANDLE`` on the accel node
  imports it as a GEM handle, and the driver's own ioctl maps that handle at a device address.

Drivers are found through the ``npud.drivers`` entry-point group (npud/plugins.py); a config's
``[[devices]] driver = "NAME"`` picks one per device (default ``npu-emu``).  This module imports
no driver: the daemon core names none.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from npud import plugins

GROUP = "npud.drivers"
DEFAULT = "npu-emu"

# Every device process starts with one compute thread per thread pool: parallelism is across
# device processes, never inside one (a second OpenBLAS/OpenMP thread spin-waits against
# every other process on a loaded host; docs/PERFORMANCE.md).  Set before numpy or oneDNN loads;
# a driver's runtime also pins the pools it loads through their own APIs (npud/emulator/threads.py).
ONE_COMPUTE_THREAD = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    # an idle OpenMP thread sleeps at once instead of spinning (none should exist with one thread,
    # but a library that ignores the count then still does not spin)
    "OMP_WAIT_POLICY": "PASSIVE",
}


@runtime_checkable
class DeviceParams(Protocol):
    """A device's parameters, as the daemon core reads them.  Plain data: ``to_dict()`` is
    msgpack-able (it is shown by `devices` and handed to the device process and the target), and
    ``target_hash()`` names what a compiled program depends on (an executable built for another
    hash is refused)."""

    preset: str
    cores: int            # device processes the daemon starts (one job each at a time)
    clock_mhz: int        # turns modeled cycles into modeled time
    memory_bytes: int     # device memory the daemon may allocate for it
    page_size: int        # buffer objects and bindings are multiples of it

    def to_dict(self) -> dict: ...

    def target_hash(self) -> bytes: ...


class PlainParams:
    """For a driver's parameters as a frozen dataclass of a ``preset`` name and positive integers
    (the cpu driver's, the driver template's): ``to_dict``/``from_dict`` and the checks, with
    errors naming the device kind (``LABEL``) and the key."""

    LABEL = "device"

    @classmethod
    def preset_names(cls) -> tuple[str, ...]:
        raise NotImplementedError

    def check_fields(self) -> None:
        """ValueError unless ``preset`` is one of ``preset_names()`` and every other field a
        positive integer; call it from ``__post_init__``."""
        import dataclasses

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "preset":
                if value not in self.preset_names():
                    raise ValueError(f"unknown {self.LABEL} preset {value!r} (known: {', '.join(self.preset_names())})")
            elif type(value) is not int or value <= 0:
                raise ValueError(f"{self.LABEL} device {f.name}={value!r}: must be a positive integer")

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """The parameters ``d`` names; ValueError naming any key the dataclass has not."""
        import dataclasses

        unknown = sorted(set(map(str, d)) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.LABEL} device key(s): {', '.join(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class Binding:
    """Where a buffer object appears in a job's address space."""

    va: int
    size: int
    writable: bool


@dataclass(frozen=True)
class ProgramInfo:
    """What the daemon learns from a validated program: its modeled cost of one whole run."""

    cycles: int


class ProgramRejected(Exception):
    """A program (command stream) the device must not run; the message says why, for a person."""


class Driver(ABC):
    """The daemon's side of one kind of device.  One instance serves every device of its kind.

    Subclasses set the class attributes and implement the abstract methods; nothing here may
    block for long (the daemon calls ``validate`` on a worker thread for large programs)."""

    name: str = ""               # the entry point's name, as configs and `npuctl devices` show it
    version: str = ""            # the driver's own version (its package's)
    target: str = ""             # the npud.targets entry point that compiles for it
    device_process: str = ""     # module run (through npud.lifeline) as each device process
    preemption: bool = True      # runs stop at preemption points when asked (False: a job holds its
                                 # device until it ends; `npuctl cts` then reports "not supported")

    @abstractmethod
    def presets(self) -> tuple[str, ...]:
        """The named device configurations this driver offers (the first is the default)."""

    @abstractmethod
    def params(self, preset: str, overrides: dict) -> DeviceParams:
        """A preset's parameters with ``overrides`` applied; ValueError naming a bad key or value."""

    def enumerate(self) -> list[DeviceParams]:
        """The devices this driver can serve, with their parameters.  A driver of real hardware
        lists what it finds (its /dev/accel nodes); an emulated one offers each preset."""
        return [self.params(preset, {}) for preset in self.presets()]

    @abstractmethod
    def validate(self, stream: bytes, params: DeviceParams, bindings: list[Binding]) -> ProgramInfo:
        """Check a program completely against ``params`` and the address space ``bindings``
        describe: after this returns, no run of it can touch memory outside them or wedge the
        device.  ProgramRejected says why not."""

    def process_args(self, params: DeviceParams) -> list[str]:
        """Arguments of ``device_process`` after ``--sock-fd N``: by default the parameters."""
        import msgpack

        return ["--config", msgpack.packb(params.to_dict()).hex()]


def driver(name: str = DEFAULT) -> Driver:
    """The installed driver ``name`` (plugins.UnknownPlugin naming the installed ones)."""
    return plugins.load(GROUP, name, "driver")


def installed() -> list[str]:
    return sorted(plugins.installed(GROUP))
