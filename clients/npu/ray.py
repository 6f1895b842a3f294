"""npu.ray: npud fleets on Ray (``pip install 'npud[ray]'``; docs/FLEET.md).

Each node runs its own npud; Ray schedules work onto nodes by the custom
resource ``npu`` (one unit per healthy device), exactly as it schedules GPUs.
Workers reach their node's daemon over ipc, found by the client's endpoint
search (``$NPUD_ENDPOINT``, else the user's or the system service's socket).

* ``resources()`` / ``npuctl ray-resources``: the ``--resources`` of ``ray start``.
* ``NpuBatchPredictor``: a callable class for ``Dataset.map_batches(...,
  concurrency=N, num_cpus=0, resources={"npu": 1})``.
* ``serve_deployment()``: a Ray Serve deployment with dynamic batching
  (``@serve.batch``), priorities as npud contexts, deadlines passed through.

The work is done by ``NpuRunner``: one session with the node's daemon, the model
loaded once (by digest when the daemon has it already), batches of any size
split into or padded to the model's batch dimension, and a lost daemon met by
reconnecting, reloading and running the interrupted batch again (its rows are
computed once into the output: nothing lost, nothing duplicated).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from npud.ipc_schema.digest import model_digest
from npud.ipc_schema.errors import ErrorCode
from npud.ipc_schema.schema import PRIORITY_NAMES

from .client import Client
from .errors import ConnectionLost, MissedDeadline, NpuError, PermissionDenied, error
from .model import model_bytes
from .tensor_types import check_dtype

log = logging.getLogger("npu.ray")

RESOURCE = "npu"
DEFAULT_DRIVER = "npu-emu"       # the daemon's devices do not name a driver yet: all are npu-emu's
RECOVER_S = 60.0                 # how long a runner waits for its daemon to come back
RETRIES = 3                      # reruns of a chunk whose job failed with a retryable error
BACKOFF_S = (0.05, 1.0)          # first and largest pause between reconnection attempts


# --- resources ---------------------------------------------------------------------------

def resources_of(devices: list[Any]) -> dict[str, float]:
    """Ray custom resources for these devices: ``npu`` (one unit per healthy device) and one
    ``npu:<driver>`` and ``npu:<preset>`` per healthy device.  A device that is not ``ok``
    (down, resetting) is not advertised: Ray places no work on it."""
    out: dict[str, float] = {RESOURCE: 0}
    for d in devices:
        if d.state != "ok":
            continue
        out[RESOURCE] += 1
        for kind in dict.fromkeys((d.info.get("driver") or DEFAULT_DRIVER, d.preset)):
            key = f"{RESOURCE}:{kind}"
            out[key] = out.get(key, 0) + 1
    return out


def resources(endpoint: str | None = None, client: Client | None = None) -> dict[str, float]:
    """This node's npud devices as Ray resources (``ray start --resources "$(npuctl ray-resources)"``)."""
    if client is not None:
        return resources_of(client.devices())
    with Client(endpoint, name="npu.ray") as c:
        return resources_of(c.devices())


# --- the runner -------------------------------------------------------------------------

@dataclass
class BatchStats:
    """What one batch cost: rows, model runs (chunks), padded rows, device and wall time,
    reruns after a retryable failure and reconnections to a daemon that went away."""

    rows: int = 0
    chunks: int = 0              # model runs that produced the outputs (reruns: ``retries``)
    padded_rows: int = 0
    device_ms: float = 0.0
    queue_ms: float = 0.0
    wall_ms: float = 0.0
    retries: int = 0
    reconnects: int = 0
    node: str = ""

    def add_job(self, stats: Mapping[str, Any]) -> None:
        self.device_ms += float(stats.get("wall_ms", 0.0))
        self.queue_ms += float(stats.get("queue_ms", 0.0))


@dataclass
class _Session:
    """What a runner holds in one daemon session: the client, the model, contexts and executions."""

    client: Client
    model: Any
    contexts: dict[str, Any] = field(default_factory=dict)
    executions: dict[tuple, Any] = field(default_factory=dict)


class NpuRunner:
    """Runs batches of any size through one model on this node's npud; survives a daemon restart.

    ``model``: a path, bytes or ``onnx.ModelProto`` (read here once; a path need exist only where
    the runner is made).  Every input and output has the model's batch dimension first.
    ``endpoint``: the daemon (default: the client's endpoint search).  ``recover_s``: how long to
    wait for a daemon that went away before giving up with its error.
    """

    def __init__(self, model: Any, *, endpoint: str | None = None, device: int = 0,
                 input_shapes: dict[str, Any] | None = None, name: str = "npu.ray",
                 recover_s: float = RECOVER_S, retries: int = RETRIES):
        self.endpoint, self.device, self.name = endpoint, device, name
        self.recover_s, self.retries = recover_s, retries
        self._options = {"input_shapes": input_shapes} if input_shapes else {}
        self._model = model_bytes(model)
        self.digest = model_digest(self._model)
        self.node = _node_id()
        self.banned = ""            # why this runner's context may no longer run jobs
        self.reconnects = 0
        self.history: deque[BatchStats] = deque(maxlen=256)   # the last batches' stats
        self._client: Client | None = None
        try:
            self._session = self._open()
            self.inputs, self.outputs = self._session.model.inputs, self._session.model.outputs
            self.batch = self._batch_dimension()
        except BaseException:
            self.close()
            raise

    def _open(self) -> _Session:
        """A new session with the model loaded."""
        client = Client(self.endpoint, name=self.name)
        old, self._client = self._client, client
        if old is not None:
            old.close()
        model = self._load(client)
        log.info("%s: model %s loaded on device %d (%s, %.1f ms)", self.name, model.id, self.device,
                 "cached" if model.cached else "compiled", model.compile_ms)
        return _Session(client, model)

    def _load(self, client: Client) -> Any:
        """The model, by its digest when this daemon has it compiled for this user already (another
        actor on the node, or this one before a reconnect: 32 bytes instead of the model), else
        by its bytes (compiled, or found in the node's compile cache)."""
        return client.load(self._model, self.device, model_digest=self.digest, **self._options)

    def _batch_dimension(self) -> int:
        dims = {t.shape[0] if t.shape else -1 for t in (*self.inputs, *self.outputs)}
        if len(dims) != 1 or -1 in dims:
            raise error(ErrorCode.EINVAL, "npu.ray needs a model whose inputs and outputs all have the same "
                                          f"batch dimension first; this one has shapes "
                                          f"{[list(t.shape) for t in (*self.inputs, *self.outputs)]}")
        return dims.pop()

    def close(self) -> None:
        """End the session (the daemon frees what it held)."""
        if self._client is not None:
            self._client.close()

    # --- health ---------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``{"ok": bool, "reason": str, "device": state}``: not ok when the device is not ``ok`` or
        this runner's context was banned (its jobs hung the device)."""
        try:
            state = self._session.client.devices()[self.device].state
        except NpuError as exc:
            return {"ok": False, "reason": f"npud does not answer: {exc}", "device": "unknown"}
        reason = self.banned or ("" if state == "ok" else f"device {self.device} is {state}")
        return {"ok": not reason, "reason": reason, "device": state}

    def check_health(self) -> None:
        """Raise (a Serve replica's ``check_health``) if the device or this runner may not take work."""
        h = self.health()
        if not h["ok"]:
            raise error(ErrorCode.EIO, f"{self.name} on node {self.node[:12]}: {h['reason']}; take no work here")

    # --- running ----------------------------------------------------------------------------

    def run(self, feeds: Mapping[str, np.ndarray], *, priority: str = "normal", deadline: float | None = None,
            fixed_deadline: bool = True) -> tuple[dict[str, np.ndarray], BatchStats]:
        """Outputs for ``feeds`` (each with any number of rows), and what the batch cost.

        The rows go through the model ``self.batch`` at a time, the last chunk padded with zeros
        (its padding rows are dropped from the outputs).  ``deadline`` (seconds) is passed to npud:
        with ``fixed_deadline``, per model run, fixed in a reusable Execution per (priority,
        deadline); else for the whole batch, each run submitted with what is left of it.
        """
        started = time.perf_counter()
        due = None if fixed_deadline or deadline is None else time.monotonic() + deadline
        n = self._check(feeds)
        stats = BatchStats(rows=n, node=self.node)
        outs = {t.name: np.empty((n, *t.shape[1:]), t.dtype) for t in self.outputs}
        for start in range(0, n, self.batch):
            k = min(self.batch, n - start)
            chunk = {name: self._padded(x[start:start + k]) for name, x in feeds.items()}
            result = self._run_chunk(chunk, priority, deadline, due, stats)
            for name, out in outs.items():
                out[start:start + k] = result[name][:k]
            stats.chunks += 1
            stats.padded_rows += self.batch - k
        stats.wall_ms = (time.perf_counter() - started) * 1e3
        self.history.append(stats)
        log.debug("%s: batch %s", self.name, stats)
        return outs, stats

    def _check(self, feeds: Mapping[str, np.ndarray]) -> int:
        """The number of rows; every input present, of its exact dtype and row shape."""
        names = [t.name for t in self.inputs]
        if set(feeds) != set(names):
            raise error(ErrorCode.EINVAL, f"feeds {sorted(feeds)} do not match the model's inputs {names}")
        rows = set()
        for t in self.inputs:
            x = feeds[t.name]
            check_dtype(t.name, x, t.dtype)
            if x.shape[1:] != t.shape[1:]:
                raise error(ErrorCode.EINVAL, f"input {t.name!r}: rows of shape {list(x.shape[1:])}, the model "
                                              f"takes {list(t.shape[1:])} (batches of {self.batch})")
            rows.add(len(x))
        if len(rows) != 1:
            raise error(ErrorCode.EINVAL, f"the inputs have different numbers of rows: {sorted(rows)}")
        return rows.pop()

    def _padded(self, x: np.ndarray) -> np.ndarray:
        if len(x) == self.batch:
            return x
        out = np.zeros((self.batch, *x.shape[1:]), x.dtype)
        out[:len(x)] = x
        return out

    def _run_chunk(self, chunk: dict, priority: str, deadline: float | None, due: float | None,
                   stats: BatchStats) -> Mapping[str, np.ndarray]:
        """One model run; a lost daemon is reconnected to and the run repeated, and so is a run
        that failed with a retryable error (up to ``retries`` times)."""
        failures = 0
        while True:
            try:
                return self._run_once(chunk, priority, deadline, due, stats)
            except ConnectionLost as exc:
                log.warning("%s: npud went away (%s); reconnecting", self.name, exc)
                self._recover(exc)
                stats.reconnects += 1
            except PermissionDenied as exc:
                self.banned = exc.message
                raise
            except MissedDeadline:
                raise           # the caller's deadline has passed: running again cannot meet it
            except NpuError as exc:
                failures += 1
                if not exc.retryable or failures > self.retries:
                    raise
                log.warning("%s: run failed (%s); running it again", self.name, exc)
                time.sleep(exc.retry_after or BACKOFF_S[0])
            stats.retries += 1

    def _run_once(self, chunk: dict, priority: str, deadline: float | None, due: float | None,
                  stats: BatchStats) -> Mapping[str, np.ndarray]:
        """Run in the priority's context: in its Execution for a fixed ``deadline``, else submitted
        with what is left until ``due`` (a ``time.monotonic()`` instant; a rerun gets less)."""
        s = self._session
        context = s.contexts.get(priority)
        if context is None:
            context = s.contexts[priority] = s.client.context(priority)
        if due is None:
            key = (priority, deadline)
            execution = s.executions.get(key)
            if execution is None:
                execution = s.executions[key] = s.model.execution(context=context, deadline=deadline)
            job = execution.submit(chunk)
        else:
            left = due - time.monotonic()
            if left <= 0:
                raise error(ErrorCode.ETIME, "the deadline passed before this model run could start", False)
            job = s.model.submit(chunk, context=context, deadline=left)
        outputs = job.result()
        stats.add_job(job.stats)
        return outputs

    def _recover(self, cause: NpuError) -> None:
        """A new session and the model loaded again, waiting up to ``recover_s`` for the daemon."""
        give_up = time.monotonic() + self.recover_s
        pause = BACKOFF_S[0]
        while True:
            try:
                self._session = self._open()
                self.reconnects += 1
                return
            except NpuError as exc:
                if not exc.retryable:
                    raise   # the daemon is back but refuses the session or the model: waiting cannot help
                if time.monotonic() + pause > give_up:
                    raise error(exc.code, f"{self.name}: npud did not come back within {self.recover_s:g} s "
                                          f"({exc.message}); first: {cause}", exc.retryable) from exc
            time.sleep(pause)
            pause = min(pause * 2, BACKOFF_S[1])


def _node_id() -> str:
    """This Ray node's id, or "" outside Ray."""
    try:
        import ray
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:   # an old or partial Ray: the id only labels stats
        return ""


# --- Ray Data ---------------------------------------------------------------------------

class NpuBatchPredictor:
    """A callable class for ``ds.map_batches(NpuBatchPredictor, fn_constructor_kwargs={"model": ...},
    concurrency=N, num_cpus=0, resources={"npu": 1}, batch_format="numpy")``.

    Each actor runs an ``NpuRunner`` on its node's npud.  A batch's columns named after the model's
    inputs (or mapped by ``input_columns={input: column}``) are its feeds; the outputs come back
    as columns named after the model's outputs (or ``output_columns={output: column}``), the
    other columns pass through.  ``stats_columns=True`` adds per-row copies of the batch's stats
    (``npu_node``, ``npu_device_ms``, ``npu_retries``); ``self.runner.history`` keeps them too.
    """

    def __init__(self, model: Any, *, input_columns: Mapping[str, str] | None = None,
                 output_columns: Mapping[str, str] | None = None, priority: str = "normal",
                 deadline: float | None = None, stats_columns: bool = False, **runner_options: Any):
        self.runner = NpuRunner(model, name=runner_options.pop("name", "npu.ray.data"), **runner_options)
        self.input_columns = dict(input_columns or {t.name: t.name for t in self.runner.inputs})
        self.output_columns = dict(output_columns or {t.name: t.name for t in self.runner.outputs})
        self.priority, self.deadline, self.stats_columns = priority, deadline, stats_columns

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [c for c in self.input_columns.values() if c not in batch]
        if missing:
            raise error(ErrorCode.EINVAL, f"the batch has no column {missing} (columns: {sorted(batch)}); "
                                          "map the model's inputs with input_columns={input: column}")
        feeds = {name: np.ascontiguousarray(batch[col]) for name, col in self.input_columns.items()}
        outs, stats = self.runner.run(feeds, priority=self.priority, deadline=self.deadline)
        result = {k: v for k, v in batch.items() if k not in self.input_columns.values()}
        result.update({self.output_columns[name]: v for name, v in outs.items()})
        if self.stats_columns:
            result["npu_node"] = np.full(stats.rows, stats.node)
            result["npu_device_ms"] = np.full(stats.rows, stats.device_ms / max(stats.rows, 1))
            result["npu_retries"] = np.full(stats.rows, stats.retries)
        return result

    def __del__(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()


# --- Ray Serve --------------------------------------------------------------------------

class NpuServer:
    """The body of the Serve deployment (``serve_deployment``), usable without Serve for tests:
    ``run_requests`` answers a batch of single-row requests, grouped by priority."""

    def __init__(self, model: Any, **runner_options: Any):
        self.runner = NpuRunner(model, name=runner_options.pop("name", "npu.ray.serve"), **runner_options)

    def run_requests(self, xs: list[Any], priorities: list[str],
                     deadlines: list[float | None]) -> list[tuple[bool, Any]]:
        """``(True, outputs)`` or ``(False, error)`` per request.  ``xs[i]`` is one row: an array
        (one-input models) or a dict by input name; ``deadlines[i]`` is a ``time.monotonic()``
        instant or None.  Requests of one priority run together, with the earliest deadline."""
        answers: list[tuple[bool, Any]] = [(False, None)] * len(xs)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(priorities):
            _check_priority(p)
            groups.setdefault(p, []).append(i)
        for priority in sorted(groups, key=_PRIORITY_ORDER.index):
            idx = groups[priority]
            for i, answer in zip(idx, self._run_group([xs[i] for i in idx], priority,
                                                      [deadlines[i] for i in idx])):
                answers[i] = answer
        return answers

    def _run_group(self, xs: list[Any], priority: str, deadlines: list[float | None]) -> list[tuple[bool, Any]]:
        known = [d for d in deadlines if d is not None]
        deadline = None if not known else min(known) - time.monotonic()
        try:
            if deadline is not None and deadline <= 0:
                raise error(ErrorCode.ETIME, "the request's deadline passed before it reached the NPU", False)
            names = [t.name for t in self.runner.inputs]
            rows = [x if isinstance(x, Mapping) else {names[0]: x} for x in xs]
            feeds = {n: np.stack([np.asarray(r[n]) for r in rows]) for n in names}
            outs, _ = self.runner.run(feeds, priority=priority, deadline=deadline, fixed_deadline=deadline is None)
        except NpuError as exc:
            return [(False, exc)] * len(xs)
        return [(True, {name: v[i] for name, v in outs.items()}) for i in range(len(xs))]


_PRIORITY_ORDER = PRIORITY_NAMES[::-1]   # the most urgent group runs first


def _check_priority(priority: str) -> None:
    if priority not in _PRIORITY_ORDER:
        raise error(ErrorCode.EINVAL, f"priority {priority!r}: one of {list(PRIORITY_NAMES)}")


def serve_deployment(model: Any, *, max_batch_size: int | None = None, batch_wait_timeout_s: float = 0.002,
                     num_replicas: int = 1, name: str = "NpuModel", **runner_options: Any) -> Any:
    """A bound Ray Serve application: ``serve.run(serve_deployment(model))``, then
    ``handle.remote(x, priority="high", deadline=0.05).result()`` -> outputs by name for row ``x``.

    Each replica takes one ``npu`` resource (its node's NPU); ``@serve.batch`` gathers up to
    ``max_batch_size`` requests (default: the model's batch dimension, found at the first batch)
    for ``batch_wait_timeout_s``.  ``priority`` (low, normal, high, realtime) selects the npud
    context the request's batch runs in; ``deadline`` (seconds from arrival) is passed to npud,
    and a request that misses it fails with ``npu.MissedDeadline``.  A replica whose device is
    not ok, or whose context was banned, fails Serve's health check and is replaced.
    """
    from ray import serve

    @serve.deployment(name=name, num_replicas=num_replicas,
                      ray_actor_options={"num_cpus": 0, "resources": {RESOURCE: 1}})
    class NpuDeployment:
        def __init__(self, model: Any, options: dict[str, Any]):
            self.server = NpuServer(model, **options)
            self._batched.set_max_batch_size(max_batch_size or self.server.runner.batch)

        async def __call__(self, x: Any, priority: str = "normal", deadline: float | None = None) -> Any:
            _check_priority(priority)   # before batching: one bad request must not fail its batch
            at = None if deadline is None else time.monotonic() + deadline
            ok, value = await self._batched(x, priority, at)
            if not ok:
                raise value
            return value

        @serve.batch(max_batch_size=max_batch_size or 8, batch_wait_timeout_s=batch_wait_timeout_s)
        async def _batched(self, xs: list[Any], priorities: list[str], deadlines: list[Any]) -> list[Any]:
            # The blocking client runs in a thread: the replica's event loop keeps gathering requests.
            return await asyncio.to_thread(self.server.run_requests, xs, priorities, deadlines)

        def check_health(self) -> None:
            self.server.runner.check_health()

        def stats(self) -> list[dict[str, Any]]:
            return [asdict(s) for s in self.server.runner.history]

    return NpuDeployment.bind(model_bytes(model), runner_options)
