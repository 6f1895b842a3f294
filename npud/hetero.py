"""Heterogeneous models: one loaded model whose partitions run on the NPU and on a ``cpu`` device.

When the NPU target declines nodes of a model (TopK, NonMaxSuppression, Loop, ...), ``load`` asks a
compiler worker to partition it (npud/compiler_worker/partition.py: supported nodes never leave the
NPU), compiles each partition through the normal path and compile cache of its own target, and
instantiates each on its device.  The result is one ``HeteroModel``, one handle:

* **Buffers.**  The model's inputs and outputs are the client's buffers, on the device it loaded the
  model for; the tensors that cross between partitions live in buffer objects the model owns
  (charged to the session).  A buffer object is a memfd: the device processes of both devices map
  the same pages -- no copies.  Their releases reach every device process that imported them
  (npud/devices.py ``forget``).
* **Runs.**  ``run_model`` queues one job per partition, each depending on the previous through the
  daemon's fences (npud/fences.py): no client round trip between partitions.  The client is given
  the last job; its stats are the chain's, summed, with one entry per partition.  A failing
  partition fails the run with its own error code; cancelling the run cancels the whole chain.
  Runs of one model share its intermediate buffers, so a run's first partition waits (for order
  only) for the previous run's last.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from npud.ipc_schema.errors import ErrorCode, RequestError

from .memory import BufferObject, round_up
from .models import LoadedModel, instantiate, tensor_info

if TYPE_CHECKING:
    from .jobs import Job

PARTITIONER = "cpu"   # the fallback target partitions are planned for (a load's `fallback` only allows it)
EXTRA_HINT = ("install the cpu extra (pip install 'npud[cpu]') and add a cpu device to npud's config "
              "([[devices]] name = \"cpu0\" driver = \"cpu\")")


@dataclass(eq=False)
class HeteroModel:
    """A model whose partitions are loaded on more than one device (see the module's doc)."""

    id: int
    device: int                      # the device it was loaded for: its I/O buffers live there
    parts: list[LoadedModel]
    inputs: list[dict]               # the whole model's inputs and outputs: {name, dtype, shape, size}
    outputs: list[dict]
    shared: dict[str, BufferObject]  # tensors that cross between partitions
    placement: list[dict]            # per node: node, op, target, device, reason, macs
    regions: dict[str, dict] = field(default_factory=dict)   # "input:x" -> {"size"}: what run_model checks
    name: str = ""
    tail: Any = None                 # the last job of the latest run (runs share `shared`)

    @property
    def fixed(self) -> list[tuple[BufferObject, int, bool]]:
        """Every buffer it owns (the partitions' weights and arenas, the shared tensors)."""
        return [f for part in self.parts for f in part.fixed] + [(bo, 0, True) for bo in self.shared.values()]

    def info(self, cached: bool, compile_ms: float) -> dict:
        infos = [part.info(cached, compile_ms) for part in self.parts]
        return {"model": self.id, "inputs": [tensor_info(e) for e in self.inputs],
                "outputs": [tensor_info(e) for e in self.outputs], "cached": cached, "compile_ms": compile_ms,
                "weights_bytes": sum(i["weights_bytes"] for i in infos),
                "arena_bytes": sum(i["arena_bytes"] for i in infos)
                + sum(bo.mapped_size for bo in self.shared.values())}

    def bindings(self, feeds: dict[str, BufferObject]) -> list[list[tuple[BufferObject, int, bool]]]:
        """Each partition's bindings, given the client's buffer for each model input and output."""
        tensors = {**self.shared, **feeds}
        return [list(part.fixed) + [(tensors[e["name"]], e["va"], False) for e in part.inputs]
                + [(tensors[e["name"]], e["va"], True) for e in part.outputs] for part in self.parts]

    def report(self) -> dict:
        """The per-op rows of every partition (each with its device and target), the placement of
        every node of the model and the share of its MACs on the NPU."""
        rows, table = [], []
        for part in self.parts:
            rep = part.exe.report()
            target = str(part.exe.meta.get("target", ""))
            rows += [{**r, "device": part.device, "target": target} for r in rep.rows]
            table.append(f"partition on device {part.device} ({target}):\n{rep.table}")
        share = npu_share(self.placement, self.device)
        table.append(placement_table(self.placement, share))
        return {"rows": rows, "table": "\n\n".join(table), "placement": self.placement, "npu_macs_share": share}


def npu_share(placement: list[dict], device: int) -> float:
    """The share of the model's MACs on ``device`` (1.0 for a model with none)."""
    total = sum(r["macs"] for r in placement)
    return sum(r["macs"] for r in placement if r["device"] == device) / total if total else 1.0


def placement_table(placement: list[dict], share: float) -> str:
    """Where each node runs, and why a node is not on the NPU, as text."""
    lines = [f"{r['op']:<20} {r['node'][:48]:<48} device {r['device']} ({r['target']})"
             + (f": {r['reason']}" if r["reason"] else "") for r in placement if r["op"] != "Constant"]
    return "\n".join(["placement:", *lines, f"MACs on the NPU: {share:.1%}"])


def refusal(nodes: list[dict], primary: str, why: str) -> RequestError:
    """EINVAL listing every node the NPU target declines (op, name, reason) and what would run them."""
    declined = [r for r in nodes if r["target"] != primary]
    listed = "; ".join(f"{r['op']} {r['node']!r}: {r['reason']}" for r in declined[:32])
    more = f" (and {len(declined) - 32} more)" if len(declined) > 32 else ""
    return RequestError(ErrorCode.EINVAL, f"the {primary} target cannot run {len(declined)} node(s) of this "
                                          f"model: {listed}{more}; {why}")


def fallback_device(daemon, fallback: str):
    """The device the fallback target runs on, or None (none configured, or onnxruntime missing)."""
    if fallback == "none" or importlib.util.find_spec("onnxruntime") is None:
        return None
    return next((d for d in daemon.devices if d.driver.target == fallback), None)


async def load(daemon, session, device, data: bytes, digest: bytes, options: dict, fallback: str,
               model_id: int, quota, declined: RequestError) -> tuple[HeteroModel, bool, float]:
    """(the heterogeneous model, every partition came from the cache, milliseconds); ``declined``
    (the whole model's compile error) is raised again if partitioning does not help.  Failed
    setup undoes everything: charges, buffers and programs."""
    plan = await daemon.loader.partition(data, options, device.config, device.target, PARTITIONER, digest)
    primary = device.target.name
    if not any(r["target"] != primary for r in plan["nodes"]):   # declined for another reason
        raise declined
    cpu = fallback_device(daemon, fallback)
    if cpu is None:
        why = ("the load asked for fallback = \"none\"" if fallback == "none" else
               "no cpu device can run them: " + EXTRA_HINT)
        raise refusal(plan["nodes"], primary, why)
    devices = {primary: device, cpu.target.name: cpu}
    parts: list[LoadedModel] = []
    shared: dict[str, BufferObject] = {}
    cached_all, total_ms = True, 0.0
    try:
        for i, part in enumerate(plan["partitions"]):
            dev = devices[part["target"]]
            named = {"name": f"{options['name']}.part{i}"} if "name" in options else {}
            exe, cached, ms = await daemon.loader.executable(part["model"], named, dev.config, target=dev.target)
            cached_all, total_ms = cached_all and cached, total_ms + ms
            parts.append(await instantiate(session, dev, exe, model_id, quota()))
        _share_tensors(session, plan, parts, shared, daemon, quota())
        declared = plan.get("declared", {})   # the model's symbolic dimensions (the partitions' are fixed)
        inputs = [{**_io(parts, name), **declared.get(name, {})} for name in plan["inputs"]]
        outputs = [{**_io(parts, name), **declared.get(name, {})} for name in plan["outputs"]]
        placement = [{**r, "device": devices[r["target"]].index} for r in plan["nodes"]]
    except BaseException as exc:
        _undo(daemon, session, parts, shared)
        if isinstance(exc, (KeyError, IndexError, TypeError, ValueError)):   # the worker's plan contradicts itself
            raise RequestError(ErrorCode.EIO, f"the compiler worker's partition plan is inconsistent ({exc!r}); "
                                              "retry, or report the model") from None
        raise
    regions = {f"{kind[:-1]}:{e['name']}": {"size": e.pop("region")} for kind, entries in
               (("inputs", inputs), ("outputs", outputs)) for e in entries}
    # the partitions' executables are named "<model>.part<i>" (the submodels' graph names)
    name = sys.intern(str(options.get("name") or parts[0].name.rsplit(".part", 1)[0])[:256])
    return (HeteroModel(model_id, device.index, parts, inputs, outputs, shared, placement, regions, name),
            cached_all, total_ms)


def _entries(parts: list[LoadedModel], name: str):
    """(partition, its I/O entry, its region) for each partition that reads or writes tensor ``name``."""
    for part in parts:
        for kind, entries in (("input", part.inputs), ("output", part.outputs)):
            for e in entries:
                if e["name"] == name:
                    yield part, e, part.regions[f"{kind}:{name}"]


def _io(parts: list[LoadedModel], name: str) -> dict:
    """The model's I/O entry for tensor ``name``: the largest size any partition needs of it, and the
    smallest region (so that one client buffer fits every partition's address space)."""
    found = list(_entries(parts, name))
    return {**found[0][1], "size": max(e["size"] for _p, e, _r in found),
            "region": min(r["size"] for _p, _e, r in found)}


def _share_tensors(session, plan, parts, shared, daemon, quota: int) -> None:
    """A buffer object for each tensor that crosses between partitions, on its producer's device,
    charged to the session (EDQUOT past ``quota``); EIO if the partitions disagree on its size."""
    outputs = set(plan["outputs"])
    crossing = {e["name"]: part for part in parts for e in part.outputs if e["name"] not in outputs}
    sizes = {}
    for name, part in crossing.items():
        tensor = plan["tensors"][name]
        sizes[name] = max(1, np.dtype(tensor["dtype"]).itemsize * int(np.prod(tensor["shape"], dtype=np.int64)))
    charge = sum(round_up(size, daemon.devices[crossing[name].device].config.page_size)
                 for name, size in sizes.items())
    if session.memory + charge > quota:
        raise RequestError(ErrorCode.EDQUOT, f"this model needs {charge} bytes of device memory for the tensors "
                                             f"between its partitions; the session holds {session.memory} of "
                                             f"its {quota}-byte quota")
    for name, part in crossing.items():
        device = daemon.devices[part.device]
        bo = shared[name] = device.memory.allocate(sizes[name])
        device.refs.charge(session, bo)
        for other, entry, region in _entries(parts, name):
            page = daemon.devices[other.device].config.page_size
            if entry["size"] > bo.size or bo.mapped_size > round_up(max(region["size"], 1), page):
                raise RequestError(ErrorCode.EIO, f"the partitions disagree on the size of tensor {name!r} "
                                                  f"({entry['size']} and {bo.size} bytes)")


def _undo(daemon, session, parts: list[LoadedModel], shared: dict[str, BufferObject]) -> None:
    """Release what a failed load had set up: the partitions and the shared tensors."""
    for part in parts:
        daemon.devices[part.device].unload_model(session, part)
    for bo in shared.values():
        daemon.devices[bo.device].refs.drop(session, bo)
    shared.clear()


def unload(daemon, session, model) -> None:
    """A loaded model goes, one device's or a heterogeneous one."""
    if isinstance(model, HeteroModel):
        _undo(daemon, session, model.parts, model.shared)
        model.parts = []
    else:
        daemon.devices[model.device].unload_model(session, model)


@dataclass(eq=False)
class RunChain:
    """The jobs of one run of a heterogeneous model, in order; ``after`` is the previous run's last
    job, which the first waits for only for order (its failure is not this run's)."""

    model: HeteroModel
    jobs: list["Job"] = field(default_factory=list)
    after: Any = None

    def combined_stats(self) -> dict:
        """The chain's stats: each counter summed over its partitions, and one entry per partition."""
        out: dict[str, Any] = {}
        parts = []
        for job in self.jobs:
            stats = job.stats
            parts.append({"job": job.id, "device": job.device, "wall_ms": float(stats.get("wall_ms", 0.0)),
                          "cycles": int(stats.get("cycles", 0))})
            for key, value in stats.items():
                if key == "engine_busy":
                    busy = out.setdefault(key, {})
                    for k, v in value.items():
                        busy[k] = busy.get(k, 0) + v
                elif key != "queue_ms" and isinstance(value, (int, float)):
                    out[key] = out.get(key, 0) + value
        if self.jobs:
            out["queue_ms"] = self.jobs[0].stats.get("queue_ms", 0.0)
        out["partitions"] = parts
        return out
