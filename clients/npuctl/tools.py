"""`npuctl compile`, `run` and `disasm`: models through the daemon, and listings of command streams."""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

import npu


class UsageError(Exception):
    """Bad arguments or unreadable input files: exit status 2 (``usage``: the command's usage line)."""

    def __init__(self, message: str, usage: str = ""):
        super().__init__(message)
        self.usage = usage


def parse_shapes(specs: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise UsageError(f"bad --input-shape {spec!r}: NAME=DxDx... (e.g. x=1x3x224x224)") from None
    return shapes


def _modeled(rows: list[dict], device: dict) -> dict:
    cycles = sum(r["cycles"] for r in rows)
    return {"cycles": cycles, "modeled_ms": cycles / (device["params"]["clock_mhz"] * 1e3),
            "macs": sum(r["macs"] for r in rows)}


def _tensors(ts) -> list[dict]:
    return [{"name": t.name, "dtype": str(t.dtype), "shape": list(t.shape), "size": t.size,
             **({"declared": list(t.dims)} if t.symbolic else {}),
             **({"defaulted": list(t.defaulted)} if t.defaulted else {})} for t in ts]


def _defaulted_note(inputs: list[dict]) -> str:
    """What a user must know when symbolic dims were set to 1: the compile takes no other size."""
    said = [f"{t['name']} {t['declared']}" for t in inputs if t.get("defaulted")]
    if not said:
        return ""
    return (f"\n  note: symbolic dimensions set to 1 ({'; '.join(said)}): this compile takes only that size; "
            f"give --input-shape NAME=DxD... for others (npu.Model.run compiles each size it is fed)")


def _device(client, index: int) -> dict:
    for d in client._request("devices", {})["devices"]:
        if d["index"] == index:
            return d
    raise npu.NpuError("ENODEV", f"no device {index} (see `npuctl devices`)")


def compile_model(client, path: str, *, device: int, report: bool, check: bool, shapes: dict,
                  output: str | None = None) -> tuple[dict, int]:
    data = _read(path)
    if check:
        problems = client.check(data, device)
        return {"model": path, "device": device, "compiles": not problems, "problems": problems}, (1 if problems else 0)
    dev = _device(client, device)
    model = client.load(data, device, **({"input_shapes": shapes} if shapes else {}))
    try:
        rep = model.report()
    finally:
        model.unload()
    result = {"model": path, "device": device, "cached": model.cached, "compile_ms": round(model.compile_ms, 3),
              "weights_bytes": model.weights_bytes, "arena_bytes": model.arena_bytes,
              "inputs": _tensors(model.inputs), "outputs": _tensors(model.outputs), "ops": len(rep.rows),
              **_modeled(rep.rows, dev)}
    if rep.placement:   # partitions on more than one device: where each node runs
        result["placement"] = rep.placement
        result["npu_macs_share"] = rep.npu_macs_share
    if report:
        result["report"] = rep.rows
        result["report_table"] = rep.table
    if output:
        result["output"] = write_executable(data, dev, {"input_shapes": shapes} if shapes else {}, output)
    return result, 0


def write_executable(model: bytes, device: dict, options: dict, path: str) -> str:
    """Compile ``model`` here, for ``device``'s parameters as the daemon reports them, and write the
    executable to ``path``.  The same compiler the daemon's workers run, so the same stream; the daemon
    has no op that hands executables out (they can exceed a message), and a client may compile its own
    model in its own process."""
    from npud.compiler_worker.api import compile_model as compile_here
    from npud.compiler_worker.errors import CompileError
    from npud.emulator.config import DeviceConfig

    try:
        exe = compile_here(model, DeviceConfig.from_dict(device["params"]), options or None)
    except CompileError as exc:
        raise npu.NpuError("EINVAL", f"cannot compile: {exc}") from None
    try:
        with open(path, "wb") as f:
            f.write(exe.to_bytes())
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    return path


def compile_text(r: dict) -> str:
    if "problems" in r:
        if r["compiles"]:
            return f"{r['model']}: compiles for device {r['device']}"
        return f"{r['model']}: cannot compile for device {r['device']}:\n" + "\n".join(
            f"  {p['node'] or '(model)'} {p['op']}: {p['reason']}" for p in r["problems"])
    sig = "; ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in r["inputs"]) + " -> " + \
        "; ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in r["outputs"])
    text = (f"{r['model']}: {'from the compile cache' if r['cached'] else 'compiled'} in {r['compile_ms']:.1f} ms "
            f"for device {r['device']}\n  {sig}\n  {r['ops']} ops, {r['macs']:,} MACs, {r['cycles']:,} modeled "
            f"cycles ({r['modeled_ms']:.3f} ms modeled)\n  weights {r['weights_bytes']:,} B, arena "
            f"{r['arena_bytes']:,} B of device memory") + _defaulted_note(r["inputs"])
    if "placement" in r:
        text += "\n" + placement_text(r)
    if "report_table" in r:
        text += "\n\n" + r["report_table"]
    if "output" in r:
        text += f"\n  executable written to {r['output']}"
    return text


def placement_text(r: dict) -> str:
    """Which nodes of a heterogeneous model run off the device it was loaded for, and why."""
    away = [p for p in r["placement"] if p["device"] != r["device"] and "constants" not in p["reason"]]
    lines = [f"    {p['op']} {p['node']!r} on device {p['device']} ({p['target']}): {p['reason']}" for p in away]
    return "\n".join([f"  partitioned: {len(away)} node(s) on other devices, {r['npu_macs_share']:.1%} of the MACs "
                      f"on device {r['device']}", *lines])


def _inputs(model, specs: list[str], seed: int) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in specs:
        name, sep, path = spec.rpartition("=")
        if not sep:
            if len(model.inputs) != 1:
                raise UsageError(f"the model has {len(model.inputs)} inputs: give NAME=FILE.npy for each")
            name = model.inputs[0].name
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read input {path}: {exc}") from None
    rng = np.random.default_rng(seed)
    for t in model.inputs:
        if t.name not in feeds:  # random data of the right shape and type
            if np.issubdtype(t.dtype, np.integer):
                feeds[t.name] = rng.integers(0, 8, t.shape).astype(t.dtype)
            elif t.dtype == np.bool_:
                feeds[t.name] = rng.integers(0, 2, t.shape).astype(bool)
            else:
                feeds[t.name] = rng.standard_normal(t.shape).astype(t.dtype)
    return feeds


def _pcts(values: list[float]) -> dict:
    v = sorted(values)

    def p(q):
        return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]
    return {"min": v[0], "p50": p(50), "p90": p(90), "p99": p(99), "max": v[-1],
            "mean": statistics.fmean(v)}


def run_model(client, path: str, *, device: int, inputs: list[str], bench: int, seed: int,
              save: str | None) -> dict:
    data = _read(path)
    dev = _device(client, device)
    model = client.load(data, device)
    try:
        feeds = _inputs(model, inputs, seed)
        job = model.submit(feeds)
        outputs = job.result()
        result = {"model": path, "device": device, "cached": model.cached, "stats": job.stats,
                  "modeled_ms": job.stats.get("cycles", 0) / (dev["params"]["clock_mhz"] * 1e3),
                  "outputs": [{"name": k, "dtype": str(v.dtype), "shape": list(v.shape),
                               "min": float(v.min()) if v.size else 0.0, "max": float(v.max()) if v.size else 0.0,
                               "mean": float(v.mean()) if v.size else 0.0,
                               "head": [float(x) for x in v.reshape(-1)[:8]]} for k, v in outputs.items()]}
        if save:
            os.makedirs(save, exist_ok=True)
            for k, v in outputs.items():
                np.save(os.path.join(save, f"{k.replace('/', '_')}.npy"), v)
            result["saved"] = save
        if bench:
            latencies, walls = [], []
            try:
                for _ in range(bench):
                    t0 = time.perf_counter()
                    j = model.submit(feeds)
                    j.wait()
                    latencies.append((time.perf_counter() - t0) * 1e3)
                    walls.append(j.stats.get("wall_ms", 0.0))
            except KeyboardInterrupt:   # Ctrl-C: the runs so far are still worth showing
                result["interrupted"] = True
            if latencies:
                result["bench"] = {"runs": len(latencies), "requested": bench, "latency_ms": _pcts(latencies),
                                   "device_wall_ms": _pcts(walls), "cycles": job.stats.get("cycles", 0),
                                   "modeled_ms": result["modeled_ms"],
                                   "runs_per_s": len(latencies) / (sum(latencies) / 1e3)}
    finally:
        model.unload()
    return result


def run_text(r: dict) -> str:
    lines = [f"{r['model']} on device {r['device']}: {r['stats'].get('cycles', 0):,} modeled cycles "
             f"({r['modeled_ms']:.3f} ms modeled), device wall {r['stats'].get('wall_ms', 0):.3f} ms"]
    for o in r["outputs"]:
        head = ", ".join(f"{x:.4g}" for x in o["head"])
        lines.append(f"  {o['name']} {o['dtype']}{o['shape']}: min {o['min']:.4g} max {o['max']:.4g} "
                     f"mean {o['mean']:.4g}  [{head}{', ...' if len(o['head']) == 8 else ''}]")
    if "saved" in r:
        lines.append(f"  outputs saved in {r['saved']}")
    if "bench" in r:
        b = r["bench"]

        def fmt(p):
            return "  ".join(f"{k} {p[k]:.3f}" for k in ("min", "p50", "p90", "p99", "max", "mean"))
        of = f" of {b['requested']} runs (interrupted)" if b["runs"] < b["requested"] else " runs"
        lines += [f"bench: {b['runs']}{of}, {b['runs_per_s']:.1f} runs/s",
                  f"  latency ms      {fmt(b['latency_ms'])}",
                  f"  device wall ms  {fmt(b['device_wall_ms'])}",
                  f"  modeled         {b['cycles']:,} cycles = {b['modeled_ms']:.3f} ms per run"]
    if r.get("interrupted") and "bench" not in r:
        lines.append("bench: interrupted before its first run")
    return "\n".join(lines)


def disasm(path: str) -> dict:
    """The listing of a .npux executable's stream (with its header and I/O table) or of a raw stream.
    EINVAL if the file is neither; ``error`` says where a stream stops decoding."""
    from npud.compiler_worker.errors import ExecutableFormatError
    from npud.executable import MAGIC, Executable

    data = _read(path)
    if data[:4] == MAGIC:
        try:
            exe = Executable.from_bytes(data)
        except ExecutableFormatError as exc:
            raise npu.NpuError("EINVAL", f"{path}: {exc}") from None
        header = [f"; npux executable format v{exe.format_version}, compiler {exe.compiler_version}, "
                  f"target {bytes(exe.target_hash).hex()}, model {exe.meta.get('model_name', '')!r}",
                  *(f"; input  {t['name']} {t['dtype']}{list(t['shape'])} @ 0x{t['va']:x}" for t in exe.inputs),
                  *(f"; output {t['name']} {t['dtype']}{list(t['shape'])} @ 0x{t['va']:x}" for t in exe.outputs),
                  f"; weights {len(exe.weights)} bytes, stream {len(exe.stream)} bytes"]
        return {"file": path, "kind": "executable", "header": header, **_listing(path, exe.stream)}
    return {"file": path, "kind": "stream", "header": [], **_listing(path, data)}


def _listing(path: str, stream: bytes) -> dict:
    from npud.emulator.disasm import disassemble

    listing = disassemble(stream).splitlines()
    errors = [line.removeprefix("; error: ") for line in listing if line.startswith("; error:")]
    if errors and len(listing) == 1:   # not even a stream header
        raise npu.NpuError("EINVAL", f"{path}: neither an npux executable nor a command stream ({errors[0]})")
    return {"listing": listing, **({"error": errors[0]} if errors else {})}


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
