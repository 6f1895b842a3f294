"""The daemon's configuration: a TOML file, overridden by command-line flags.

Example (every key optional)::

    endpoint = "ipc:///run/npud/npud.sock"   # ZeroMQ endpoint to serve (default: $NPUD_ENDPOINT, else the user's)
    log_level = "info"                 # debug, info, warning, error
    shutdown_grace_s = 5.0             # on stop, how long running jobs may finish before ESHUTDOWN
    log_format = "text"                # text (the journal's native fields under systemd), json (a line each)

    cache_dir = "/var/cache/npud"      # compile cache (default: $CACHE_DIRECTORY, else ~/.cache/npud)
    cache_memory_bytes = "256MiB"      # parsed executables kept in the daemon's memory (0: none)
    compile_workers = 2                # compiler worker processes
    compile_timeout_s = 120            # a compile taking longer fails and its worker is replaced
    compile_memory_bytes = "4GiB"      # each worker's address-space limit (RLIMIT_AS) (0: none)
    compile_memory_scale = 3.0         # plus this many times the model's size, for models past 2 GiB
    compile_memory_max_bytes = 0       # no compile may take more (0: half the host's RAM, at least
                                       # compile_memory_bytes); a larger model is refused with ENOMEM
    device_memory_fraction = 0.25      # a device whose params do not set memory_bytes gets this share of the
                                       # host's RAM (MemTotal) if that is more than its preset's (0: the preset's)
    compile_fallback = "cpu"           # nodes the NPU target declines run on a cpu device ("none": refuse
                                       # the model); a load's `fallback` option overrides it

    policy = "/etc/npud/policy.toml"   # who may connect, quotas, admins, CURVE keys (npud/policy.py)
    tcp_endpoint = "tcp://127.0.0.1:7787"  # off unless set; CURVE-only (needs [curve])

    [limits]
    memory_quota = "2GiB"              # per session, bytes of buffer objects (a model being loaded
                                       # counts twice: its bytes in a staging buffer, then its weights)
    max_buffer_bytes = "1GiB"          # one allocation (a larger model is sent in several)
    max_sessions = 1024                # open at once, all users together
    admin_sessions = 16                # of max_sessions, kept for admins (who may kill_client)
    lease_ms = 10000                   # idle sessions without a companion socket expire
    max_jobs_in_flight = 256           # per session

    [scheduling]
    job_timeout_ms = 30000             # a job running longer is aborted and its device process reset;
                                       # also the deadline (>= 1 s) of a device's import, load, release
    ban_after_hangs = 3                # a context whose jobs hang (or crash the device) this often is banned
    starvation_ms = 1000               # a lower-priority job runnable this long runs next anyway
    max_queued_per_device = 4096       # more queued jobs are refused with EAGAIN and a retry hint
    max_contexts = 64                  # per session
    device_processes = 0               # per device, running jobs in parallel; 0: the preset's cores

    [curve]                            # the server's CURVE key pair, for tcp_endpoint
    secret_key_file = "/etc/npud/curve/server.key_secret"  # zmq.auth certificate (npud --generate-keys)

    [[devices]]
    name = "npu0"                      # [A-Za-z0-9_.-], unique (default: npu0, npu1, ...)
    driver = "npu-emu"                 # an installed driver (npud.drivers entry point; docs/DRIVERS.md)
    preset = "edge"                    # one of the driver's presets (npu-emu: npud.emulator.config.PRESETS)
    [devices.params]                   # overrides of the preset's parameters
    sram_bytes = 524288

A value that is wrong is reported with its key and what was expected; the
daemon refuses to start rather than guess.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, TypeVar

from npud.ipc_schema.endpoint import serve_endpoint
from npud.ipc_schema.schema import MAX_BUFFER_BYTES

from .log import LOG_FORMATS

LOG_LEVELS = ("debug", "info", "warning", "error")
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
T = TypeVar("T")
# The keys a config file may have: the top level, [curve] and each [[devices]] table ([limits] and
# [scheduling] are the fields of Limits and Scheduling).  npud/manpages.py documents each of them.
CONFIG_KEYS = ("endpoint", "log_level", "log_format", "shutdown_grace_s", "cache_dir", "cache_memory_bytes", "compile_workers",
               "compile_timeout_s", "compile_memory_bytes", "compile_memory_scale", "compile_memory_max_bytes", "compile_fallback", "device_memory_fraction", "policy",
               "tcp_endpoint", "limits", "scheduling",
               "curve", "devices")
CURVE_KEYS = ("secret_key_file",)
DEVICE_KEYS = ("name", "driver", "preset", "params")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


def parse_size(value: Any, key: str) -> int:
    """Bytes from an int or a string like "512MiB" / "1G"."""
    if type(value) is int and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return int(m.group(1)) * _UNITS[m.group(2)[:1].lower()]
    raise ConfigError(f"{key}: expected a size such as 1048576 or \"512MiB\", got {value!r}")


@dataclass(frozen=True)
class Limits:
    # A model larger than max_inline_bytes is sent in one staging buffer that is held while its
    # weights are loaded: these defaults let a VGG-19 (558-575 MB) load (docs/DEPLOY.md).
    memory_quota: int = 2 << 30
    max_buffer_bytes: int = 1 << 30
    max_sessions: int = 1024
    admin_sessions: int = 16     # of max_sessions, only admins may open (as Linux keeps pids for root)
    lease_ms: int = 10_000
    max_jobs_in_flight: int = 256


@dataclass(frozen=True)
class Scheduling:
    job_timeout_ms: int = 30_000
    ban_after_hangs: int = 3
    starvation_ms: int = 1000
    max_queued_per_device: int = 4096
    max_contexts: int = 64
    device_processes: int = 0


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    preset: str
    params: dict[str, Any] = field(default_factory=dict)
    driver: str = "npu-emu"   # an installed npud.drivers entry point (npud/drivers)


@dataclass(frozen=True)
class Config:
    endpoint: str = field(default_factory=serve_endpoint)
    log_level: str = "info"
    log_format: str = "text"
    limits: Limits = Limits()
    devices: tuple[DeviceSpec, ...] = (DeviceSpec("npu0", "edge"),)
    shutdown_grace_s: float = 5.0
    cache_dir: str = ""                    # "" = compile_cache.default_directory()
    cache_memory_bytes: int = 256 << 20    # compile_cache.MEMORY_BYTES: the in-memory cache's budget
    compile_workers: int = 2
    compile_timeout_s: float = 120.0
    compile_memory_bytes: int = 4 << 30    # each worker's RLIMIT_AS, plus compile_memory_scale x the model's size
    compile_memory_scale: float = 3.0      # (compile_memory_limit)
    compile_memory_max_bytes: int = 0      # 0 = compile_memory_cap's default
    device_memory_fraction: float = 0.25   # of MemTotal, for devices without params.memory_bytes (device_params)
    compile_fallback: str = "cpu"          # npud/hetero.py: "cpu" or "none"
    scheduling: Scheduling = Scheduling()
    test_mode: bool = False                # `npud --test-mode`: fault injection (inject_fault) allowed
    policy: str = ""                       # policy file (npud/policy.py); "" = the default policy
    tcp_endpoint: str = ""                 # "" = no tcp; else CURVE-only, needs curve_secret_key_file
    curve_secret_key_file: str = ""        # [curve] secret_key_file: the server's zmq.auth certificate


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _positive_int(value: Any, key: str) -> int:
    if type(value) is not int or value <= 0:
        raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
    return value


def from_dict(data: dict[str, Any]) -> Config:
    _check_keys(data, set(CONFIG_KEYS), "config")
    config = Config()
    if "endpoint" in data:
        if not isinstance(data["endpoint"], str) or "://" not in data["endpoint"]:
            raise ConfigError(f"endpoint: expected a ZeroMQ endpoint like ipc:///path, got {data['endpoint']!r}")
        config = replace(config, endpoint=data["endpoint"])
    if "log_level" in data:
        config = replace(config, log_level=_log_level(data["log_level"]))
    if "log_format" in data:
        if data["log_format"] not in LOG_FORMATS:
            raise ConfigError(f"log_format: expected one of {', '.join(LOG_FORMATS)}, "
                              f"got {data['log_format']!r}")
        config = replace(config, log_format=data["log_format"])
    if "shutdown_grace_s" in data:
        grace = data["shutdown_grace_s"]
        if type(grace) not in (int, float) or not 0 <= grace <= 600:
            raise ConfigError(f"shutdown_grace_s: expected seconds in [0, 600], got {grace!r}")
        config = replace(config, shutdown_grace_s=float(grace))
    if "cache_dir" in data:
        if not isinstance(data["cache_dir"], str) or not data["cache_dir"]:
            raise ConfigError(f"cache_dir: expected a directory path, got {data['cache_dir']!r}")
        config = replace(config, cache_dir=data["cache_dir"])
    if "cache_memory_bytes" in data:
        config = replace(config, cache_memory_bytes=parse_size(data["cache_memory_bytes"], "cache_memory_bytes"))
    if "compile_workers" in data:
        workers = data["compile_workers"]
        if type(workers) is not int or not 1 <= workers <= 64:
            raise ConfigError(f"compile_workers: expected 1 to 64 worker processes, got {workers!r}")
        config = replace(config, compile_workers=workers)
    if "compile_timeout_s" in data:
        timeout = data["compile_timeout_s"]
        if type(timeout) not in (int, float) or not 0 < timeout <= 86400:
            raise ConfigError(f"compile_timeout_s: expected seconds in (0, 86400], got {timeout!r}")
        config = replace(config, compile_timeout_s=float(timeout))
    if "compile_memory_bytes" in data:
        limit = parse_size(data["compile_memory_bytes"], "compile_memory_bytes")
        if limit and limit < 256 << 20:
            raise ConfigError("compile_memory_bytes: at least 256MiB (a worker must load Python and onnx), "
                              "or 0 for no limit")
        config = replace(config, compile_memory_bytes=limit)
    if "compile_memory_scale" in data:
        scale = data["compile_memory_scale"]
        if type(scale) not in (int, float) or not 0 <= scale <= 64:
            raise ConfigError(f"compile_memory_scale: expected a factor of the model's size in [0, 64], got {scale!r}")
        config = replace(config, compile_memory_scale=float(scale))
    if "compile_memory_max_bytes" in data:
        config = replace(config, compile_memory_max_bytes=parse_size(data["compile_memory_max_bytes"],
                                                                     "compile_memory_max_bytes"))
    if "device_memory_fraction" in data:
        share = data["device_memory_fraction"]
        if type(share) not in (int, float) or not 0 <= share <= 1:
            raise ConfigError(f"device_memory_fraction: expected a share of the host's RAM in [0, 1], got {share!r}")
        config = replace(config, device_memory_fraction=float(share))
    if "compile_fallback" in data:
        if data["compile_fallback"] not in ("cpu", "none"):
            raise ConfigError(f"compile_fallback: expected \"cpu\" or \"none\", got {data['compile_fallback']!r}")
        config = replace(config, compile_fallback=data["compile_fallback"])
    if "limits" in data:
        config = replace(config, limits=_limits(data["limits"]))
    if "devices" in data:
        config = replace(config, devices=parse_devices(data["devices"]))
    if "scheduling" in data:
        config = replace(config, scheduling=_scheduling(data["scheduling"]))
    config = _security(data, config)
    return config


def _security(data: dict[str, Any], config: Config) -> Config:
    """policy, tcp_endpoint and [curve]: the identity and policy keys (the files are read at start)."""
    if "policy" in data:
        if not isinstance(data["policy"], str) or not data["policy"]:
            raise ConfigError(f"policy: expected the path of a policy file, got {data['policy']!r}")
        config = replace(config, policy=data["policy"])
    if "curve" in data:
        curve = data["curve"]
        if not isinstance(curve, dict):
            raise ConfigError("curve: expected a table")
        _check_keys(curve, set(CURVE_KEYS), "curve")
        path = curve.get("secret_key_file")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"curve.secret_key_file: expected the path of the server's zmq.auth secret "
                              f"certificate, got {path!r}")
        config = replace(config, curve_secret_key_file=path)
    if "tcp_endpoint" in data:
        endpoint = data["tcp_endpoint"]
        if not isinstance(endpoint, str) or not re.fullmatch(r"tcp://[^\s/]+:\d{1,5}", endpoint):
            raise ConfigError(f"tcp_endpoint: expected tcp://HOST:PORT, got {endpoint!r}")
        if not config.curve_secret_key_file:
            raise ConfigError("tcp_endpoint: tcp is CURVE-only; set [curve] secret_key_file too "
                              "(keys: npud --generate-keys DIR)")
        config = replace(config, tcp_endpoint=endpoint)
    return config


def _scheduling(table: Any) -> Scheduling:
    if not isinstance(table, dict):
        raise ConfigError("scheduling: expected a table")
    _check_keys(table, set(Scheduling.__dataclass_fields__), "scheduling")
    out = {}
    for key, value in table.items():
        if key == "device_processes":
            if type(value) is not int or not 0 <= value <= 64:
                raise ConfigError(f"scheduling.device_processes: expected 0 (the preset's cores) to 64, got {value!r}")
            out[key] = value
        else:
            out[key] = _positive_int(value, f"scheduling.{key}")
    return Scheduling(**out)


def _log_level(value: Any) -> str:
    if value not in LOG_LEVELS:
        raise ConfigError(f"log_level: expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value


def _limits(table: Any) -> Limits:
    if not isinstance(table, dict):
        raise ConfigError("limits: expected a table")
    _check_keys(table, set(Limits.__dataclass_fields__), "limits")
    out = {}
    for key, value in table.items():
        if key in ("memory_quota", "max_buffer_bytes"):
            out[key] = parse_size(value, f"limits.{key}")
            if not 0 < out[key] <= MAX_BUFFER_BYTES:
                raise ConfigError(f"limits.{key}: must be between 1 byte and 1 TiB")
        elif key == "admin_sessions":
            if type(value) is not int or value < 0:
                raise ConfigError(f"limits.admin_sessions: expected 0 or a positive integer, got {value!r}")
            out[key] = value
        else:
            out[key] = _positive_int(value, f"limits.{key}")
    limits = Limits(**out)
    if limits.admin_sessions >= limits.max_sessions:
        raise ConfigError(f"limits.admin_sessions: {limits.admin_sessions} must be less than limits.max_sessions "
                          f"({limits.max_sessions}), or no one but admins could connect")
    return limits


def device_arg(value: str) -> dict[str, str]:
    """A ``--device`` value as a [[devices]] table: ``PRESET`` (of the default driver),
    ``DRIVER`` (its first preset) or ``DRIVER:PRESET``; parse_devices checks it."""
    from npud import drivers

    if ":" in value:
        driver, preset = value.split(":", 1)
        return {"driver": driver, "preset": preset} if preset else {"driver": driver}
    if value not in drivers.driver().presets() and value in drivers.installed():
        return {"driver": value}
    return {"preset": value}


def parse_devices(items: Any) -> tuple[DeviceSpec, ...]:
    from npud import drivers, plugins  # each driver owns its devices' parameters

    if not isinstance(items, list) or not items:
        raise ConfigError("devices: expected a non-empty array of [[devices]] tables")
    if len(items) > 16:
        raise ConfigError(f"devices: at most 16 devices, got {len(items)}")
    specs = []
    for i, item in enumerate(items):
        where = f"devices[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a table")
        _check_keys(item, set(DEVICE_KEYS), where)
        driver_name = item.get("driver", drivers.DEFAULT)
        try:
            driver = drivers.driver(driver_name) if isinstance(driver_name, str) else None
        except plugins.UnknownPlugin as exc:
            raise ConfigError(f"{where}.driver: {exc}") from None
        if driver is None:
            raise ConfigError(f"{where}.driver: expected a driver's name, got {driver_name!r}")
        preset = item.get("preset", driver.presets()[0])
        if preset not in driver.presets():
            raise ConfigError(f"{where}.preset: unknown preset {preset!r} of driver {driver.name} "
                              f"(known: {', '.join(driver.presets())})")
        params = item.get("params", {})
        if not isinstance(params, dict):
            raise ConfigError(f"{where}.params: expected a table")
        params = {k: parse_size(v, f"{where}.params.{k}") if isinstance(v, str) else v
                  for k, v in params.items()}
        try:
            driver.params(preset, params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}.params: {exc}") from None
        name = item.get("name", f"npu{i}")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ConfigError(f"{where}.name: expected 1-64 characters of [A-Za-z0-9_.-], got {name!r}")
        specs.append(DeviceSpec(name, preset, params, driver.name))
    if len({s.name for s in specs}) != len(specs):
        raise ConfigError("devices: device names must be unique")
    return tuple(specs)


def compile_memory_cap(config: "Config", host_bytes: int | None = None) -> int:
    """The most address space any compile may have: ``compile_memory_max_bytes``, or by default
    half the host's RAM, never less than ``compile_memory_bytes`` (0: no limit)."""
    if not config.compile_memory_bytes:
        return 0
    cap = config.compile_memory_max_bytes or (host_memory_bytes() if host_bytes is None else host_bytes) // 2
    return max(cap, config.compile_memory_bytes)


def compile_memory_limit(base: int, scale: float, model_bytes: int) -> int:
    """A compile's address-space limit (RLIMIT_AS): ``compile_memory_bytes`` for the worker and
    its working memory, plus ``compile_memory_scale`` times the model's size for the copies of
    its weights a compile holds (the request, the laid-out weights, the executable: about 2.5 on
    a 2 GiB model, docs/PERFORMANCE.md).  0 (no limit) stays 0."""
    return base + int(scale * model_bytes) if base else 0


def host_memory_bytes(meminfo: str = "/proc/meminfo") -> int:
    """The host's RAM (MemTotal), or 0 when it cannot be read."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def device_params(driver, spec: DeviceSpec, fraction: float, host_bytes: int | None = None):
    """The parameters of the device ``spec`` describes.  Unless its params set memory_bytes, its
    memory is sized from the machine: an integrated NPU shares system RAM (and npu-emu's device
    memory is host memory), so a fixed preset size such as edge's 512 MiB refuses models (a VGG-19
    is 575 MB of weights) that the host could hold.  It gets ``fraction`` of the host's MemTotal,
    in whole pages, when that is more than its preset's; never less."""
    params = driver.params(spec.preset, spec.params)
    if "memory_bytes" in spec.params or not hasattr(params, "memory_bytes"):
        return params
    host = host_memory_bytes() if host_bytes is None else host_bytes
    sized = int(host * fraction) // params.page_size * params.page_size
    if sized <= params.memory_bytes:
        return params
    return driver.params(spec.preset, {**spec.params, "memory_bytes": sized})


def load(path: str | Path | None) -> Config:
    """Read a config file (or the defaults when path is None)."""
    if path is None:
        return Config()
    return load_toml(path, "config file", from_dict)


def load_toml(path: str | Path, what: str, parse: Callable[[dict], T]) -> T:
    """``parse`` applied to the TOML file at ``path``.

    Every failure, unreadable, not TOML or refused by ``parse``, is a ConfigError whose message
    starts with the file's name, so the operator knows which file to fix.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return parse(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
