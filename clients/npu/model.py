"""Models: ``Client.load(model) -> Model``; ``Model.run(feeds) -> outputs``.

Inputs and outputs travel through buffer objects bound to the job, never in
messages: ``submit`` copies each feed into its input buffer (through the
mapping, for a local client) and the outputs are read back from theirs.  A
model keeps a pool of input/output buffer sets, so several jobs of one model
can be in flight at once without overwriting each other's tensors (and several
threads can share one model).  The operations are written once (``LoadedModel``,
``ModelRun``); ``Model``/``ModelJob`` run them blocking, the trio client's
``AsyncModel``/``AsyncModelJob`` awaited.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from npud.ipc_schema.errors import ErrorCode

from . import model_source
from .buffer import BufferOps
from .core import Call, blocking
from .errors import NpuError, error
from .jobs import Job, JobRecord, ModelRunRecord
from .shapes import Shapes, Signature, Specialisations, check_fits
from .tensor_types import check_dtype, check_feeds, feed_dict, ort_calling_form

if TYPE_CHECKING:
    from .client import Client
    from .execution import Execution

ModelSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Any]
"""What ``load`` takes: a path, the model's bytes or an ``onnx.ModelProto`` (Any: onnx is not
imported for its type)."""


@dataclass(frozen=True)
class TensorInfo:
    """One input or output: name, shape and dtype as the compiled model has them; ``dims``, its
    dimensions as the model declares them (an int where fixed, the name where symbolic; empty
    from a daemon before protocol 1.7) and ``defaulted``, the symbolic ones this load set to 1."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    size: int
    dims: tuple[int | str, ...] = ()
    defaulted: tuple[int, ...] = ()

    @property
    def symbolic(self) -> bool:
        """Whether the model declares any dimension of it symbolic."""
        return any(isinstance(d, str) for d in self.dims)


class Outputs(dict[str, np.ndarray]):
    """A run's outputs by name, in the model's output order; ``outputs[i]`` is the i-th, as in the
    list onnxruntime's ``run`` returns.  An unknown name's KeyError lists the outputs."""

    def __getitem__(self, key: str | int) -> np.ndarray:   # type: ignore[override]
        if isinstance(key, int) and not isinstance(key, bool):
            values = list(self.values())
            if not -len(values) <= key < len(values):
                raise IndexError(f"output {key} of {len(values)} (outputs: {list(self)})")
            return values[key]
        try:
            return super().__getitem__(key)
        except KeyError:
            raise KeyError(f"no output {key!r}; the outputs are {list(self)} (or index them by position)") from None


@dataclass(frozen=True)
class Report:
    """A model's per-op report (like Vela's per-layer report); ``str()`` is the table.
    ``placement``: for a model whose partitions run on more than one device (the NPU target
    declined some nodes), each node's device, target, reason and MACs; ``npu_macs_share``: the
    share of its MACs on the device it was loaded for."""

    rows: list[dict[str, Any]]
    table: str
    placement: list[dict[str, Any]] = field(default_factory=list)
    npu_macs_share: float = 1.0

    def __str__(self) -> str:
        return self.table


def model_bytes(model: Any) -> bytes:
    """The serialised ONNX model from a path, bytes or an ``onnx.ModelProto``.  A path's external
    data is read here, next to the model, and sent with it (model_source.py): the daemon never
    opens a file a model names.  Bytes and ModelProtos are sent as they are."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model)
    if isinstance(model, (str, os.PathLike)):
        return model_source.read_model_file(model)
    if hasattr(model, "SerializeToString"):
        return model_source.serialise(model)
    raise error(ErrorCode.EINVAL, f"a model is a path, bytes or onnx.ModelProto, not {type(model).__name__}")


@dataclass(frozen=True)
class ModelFile:
    """A model given by path: which file (device, inode), which version of it (size, mtime), and
    the daemon's digest of that version if this client loaded it before."""

    key: tuple | None
    version: tuple | None
    digest: bytes | None = None


class ModelDigests:
    """The daemon's digests of model files this client loaded, so loading one again sends 32 bytes
    instead of the file (protocol 1.3).  A file changed since (size or mtime), or one of its
    external data files, is sent again."""

    def __init__(self):
        self._known: dict[tuple, tuple[tuple, bytes, tuple[str, ...]]] = {}

    def lookup(self, model: Any) -> ModelFile:
        if not isinstance(model, (str, os.PathLike)):
            return ModelFile(None, None)
        try:
            st = os.stat(model)
        except OSError:
            return ModelFile(None, None)
        key, version = (st.st_dev, st.st_ino), (st.st_size, st.st_mtime_ns)
        known = self._known.get(key)
        if known is None or known[0][:2] != version:
            return ModelFile(key, version)
        current = version + model_source.versions(known[2])
        return ModelFile(key, current, known[1] if known[0] == current else None)

    def remember(self, file: ModelFile, info: dict) -> None:
        """Note the digest a load of ``file`` returned."""
        if file.key is not None and "model_digest" in info:
            externals = model_source.external_files(file.key, file.version[:2])
            if externals is None:
                return  # read before this version was: do not vouch for it
            self._known[file.key] = (file.version[:2] + model_source.versions(externals),
                                     info["model_digest"], externals)

    def forget(self, file: ModelFile) -> None:
        """The daemon no longer knows the digest (evicted, or restarted)."""
        self._known.pop(file.key, None)


class LoadedModel:
    """What the daemon said about a loaded model, the checks on feeds, and the model's operations
    (run, submit, execution, report, unload) as ``Model`` and ``AsyncModel`` run them."""

    _job_class: type          # the client's kind of ModelRun

    def __init__(self, client: Any, device: int, info: dict):
        self.client = client
        self.device = device
        self.id = info["model"]
        self.inputs = [_tensor(t) for t in info["inputs"]]
        self.outputs = [_tensor(t) for t in info["outputs"]]
        self.cached = info["cached"]
        self.compile_ms = info["compile_ms"]
        self.weights_bytes = info["weights_bytes"]
        self.arena_bytes = info["arena_bytes"]
        self.signature: Shapes = tuple(t.shape for t in self.inputs)
        self._family: Specialisations | None = None   # set by load for a model with symbolic dims
        self._idle_sets: list[tuple[list, list]] = []
        self._unloaded = False

    @property
    def signatures(self) -> list[dict[str, Any]]:
        """The shape signatures loaded for this model, each with its ``shapes`` by input,
        ``compile_ms``, ``cached`` (from the daemon's compile cache) and ``hits`` (runs): the
        loaded one first, then the specialisations runs of other sizes loaded, least recently
        run first (shapes.py)."""
        if self._family is None:
            return [{"shapes": {t.name: list(t.shape) for t in self.inputs}, "compile_ms": self.compile_ms,
                     "cached": self.cached, "hits": None, "model": self.id}]
        return self._family.report()

    def __repr__(self) -> str:
        def sig(ts):
            return ", ".join(f"{t.name}: {t.dtype}{list(t.shape)}" for t in ts)
        return f"<npu.{type(self).__name__} {self.id} ({sig(self.inputs)}) -> ({sig(self.outputs)})>"

    def _check_loaded(self) -> None:
        if self._unloaded:
            raise error(ErrorCode.ENOENT, "this model was unloaded")

    def _normalise(self, feeds: Any) -> dict[str, np.ndarray]:
        """``feeds`` (a dict by input name, or one array) checked against the inputs: names, shapes
        and exact dtypes (tensor_types.py); nothing is converted."""
        feeds = feed_dict(feeds, [t.name for t in self.inputs], "Model.run")
        checked = check_feeds(feeds, [(t.name, t.shape, t.dtype) for t in self.inputs])
        return {name: np.ascontiguousarray(x) for name, x in checked.items()}

    def _run_args(self, inputs: list, outputs: list, wire: dict) -> dict:
        return {"model": self.id, "inputs": [b.handle for b in inputs],
                "outputs": [b.handle for b in outputs], **wire}


    def run(self, feeds: Any, timeout: float | None = None):
        """Run once and return the outputs by name (``Outputs``: also by position)."""
        ort_calling_form(feeds, timeout, "Model.run")
        return (yield from run_once(self.client, lambda wire, call_timeout: LoadedModel._start(
            self, feeds, wire, call_timeout), timeout))

    def submit(self, feeds: Any, **options):
        """Start a run and return at once; ``feeds`` is a dict by input name, or one array.

        Options: ``context`` (``client.context(priority, weight)``: its priority and fair share),
        ``after`` (jobs, also imported fences, that must finish first; if one fails this run fails
        with its cause), ``deadline`` (seconds: finish by then or fail with ``MissedDeadline``),
        ``timeout`` (device seconds before the run is aborted as hung).
        """
        from .session import job_options

        return (yield from LoadedModel._start(self, feeds, job_options(**options)))[0]

    def _start(self, feeds: Any, wire: dict, call_timeout: float | None = None):
        """Write the feeds to an idle buffer set and send ``run_model`` with ``wire`` (job options,
        ``wait_ms``): the run and the request's reply."""
        self._check_loaded()
        model, feeds = yield from self._specialised_for(feeds)
        if model is not self:
            return (yield from LoadedModel._start(model, feeds, wire, call_timeout))
        feeds = self._normalise(feeds)
        io = yield from self._take_set()
        try:
            for info, buf in zip(self.inputs, io[0]):
                yield from BufferOps.write(buf, feeds[info.name])
        except BaseException:
            self._idle_sets.append(io)   # no job uses the set yet
            raise
        try:
            result = yield Call("run_model", self._run_args(*io, wire), call_timeout)
        except NpuError as exc:
            if exc.code != "ETIMEDOUT":   # the daemon answered: no job uses the set
                self._idle_sets.append(io)
                raise
            yield from self._discard(io)
            raise
        except BaseException:
            # Interrupted after the request left: a job may be running on these buffers, so they
            # must not serve another run (freeing is safe: the daemon keeps them for the job).
            yield from self._discard(io)
            raise
        return self._job_class(self, result["job"], io, result.get("context", 0), result.get("point", 0)), result

    def execution(self, context: Any = None, *, input_shapes: dict[str, Sequence[int]] | None = None,
                  **options):
        """A reusable execution: buffers bound and mapped once, the run request encoded once, inputs
        filled in place (``clients/npu/execution.py``).  Options as for ``submit``, fixed for its runs;
        ``input_shapes`` ({input: shape}, for a model with symbolic dimensions) binds it to the
        specialisation for those shapes (closed if that is evicted: shapes.py)."""
        from .session import job_options

        wire = job_options(context=context, **options)
        self._check_loaded()
        model = self if input_shapes is None else (yield from LoadedModel.specialise(self, input_shapes))
        execution = self.client._execution_class(model, wire)
        yield from execution._open()
        if self._family is not None:
            self._family.attach(model, execution)
        return execution

    def report(self):
        """Per-op table: op, shapes, MACs, modeled cycles, SRAM and DMA bytes."""
        result = yield Call("report", {"model": self.id})
        return Report(result["rows"], result["table"], result.get("placement", []),
                      result.get("npu_macs_share", 1.0))

    def unload(self):
        """Free the model's device memory (weights, arena, I/O buffers)."""
        if self._unloaded:
            return
        self._unloaded = True
        sets, self._idle_sets = self._idle_sets, []
        try:
            for entry in (self._family.take_all() if self._family is not None else ()):
                yield from _drop(entry)
            for io in sets:
                yield from self._discard(io)
        finally:  # even when interrupted: half an unload would leak the model in the daemon
            yield Call("unload", {"model": self.id})

    def specialise(self, input_shapes: dict[str, Sequence[int]]):
        """The model loaded for these input shapes ({input: shape}; an input not named keeps its
        shape): this one, or a specialisation for a model with symbolic dimensions (loaded now if it
        is not yet: shapes.py).  EINVAL, naming the input, the dimension and both sizes, if a shape
        contradicts a dimension the model fixes."""
        self._check_loaded()
        shapes = {t.name: tuple(input_shapes.get(t.name, t.shape)) for t in self.inputs}
        if self._family is None:   # fixed shapes (or a daemon before protocol 1.7)
            for t in self.inputs:
                check_fits(t.name, t.shape, shapes[t.name])
            return self
        return (yield from self._specialisation(self._family.signature(shapes), run=False))

    def _specialised_for(self, feeds: Any):
        """The model to run ``feeds`` on, and the feeds by name: this one, or, for a model with
        symbolic dimensions fed other sizes, the specialisation for their shapes (loaded now if it
        is not yet).  Feeds that contradict a fixed dimension are EINVAL here."""
        feeds = feed_dict(feeds, [t.name for t in self.inputs], "Model.run")
        family = self._family
        if family is None or any(t.name not in feeds for t in self.inputs):
            return self, feeds   # fixed shapes, or an input missing: _normalise says what is wrong
        for t in self.inputs:   # before a load: a feed of the wrong type must not cost a compile
            check_dtype(t.name, np.asarray(feeds[t.name]), t.dtype)
        shapes = family.signature({t.name: np.shape(feeds[t.name]) for t in self.inputs})
        return (yield from self._specialisation(shapes)), feeds

    def _specialisation(self, shapes: Shapes, run: bool = True):
        """The model loaded for ``shapes``: kept, or loaded now (compiled once: the daemon's cache
        keeps it), evicting the least recently run specialisation beyond the bound.  ``run``:
        counted as a run of that signature."""
        family = self._family
        model = family.get(shapes, run)
        if model is not None:
            return model
        info = yield from self.client._load_op(family.source, self.device, family.load_options(shapes),
                                               family.digest)
        model, dropped = family.add(shapes, self.client._model_class(self.client, self.device, info), run)
        for entry in dropped:
            yield from _drop(entry)
        return model

    def _take_set(self):
        """An idle input/output set, or a new one."""
        try:
            return self._idle_sets.pop()   # atomic: threads sharing the model never get one set twice
        except IndexError:
            pass
        made: list = []
        try:
            for t in (*self.inputs, *self.outputs):
                made.append((yield from self.client._alloc_op(max(t.size, 1), self.device)))
        except BaseException:
            yield from self._discard((made, []))
            raise
        return made[:len(self.inputs)], made[len(self.inputs):]

    def _discard(self, io):
        """Free an input/output set that must not serve another run (the daemon keeps the
        buffers for any job still using them)."""
        for buf in (*io[0], *io[1]):
            try:
                yield from BufferOps.free(buf)
            except NpuError:
                pass   # the session is gone, and its buffers with it


RUN_WAIT = (1, 8)   # run_model's wait_ms: a run and its wait in one round trip
MAX_WAIT_MS = 24 * 3600 * 1000


def run_once(client: Any, start: Callable[[dict, float | None], Any], timeout: float | None):
    """One run's outputs: in one round trip (``run_model`` with ``wait_ms``) if the daemon speaks
    protocol 1.8, else ``run_model`` then ``wait``.  ``start(wire, call_timeout)`` is the operation
    that starts the run: ``(job, run_model reply)``."""
    if not client._core.speaks(RUN_WAIT):
        job, _reply = yield from start({}, None)
        return (yield from ModelRun.result(job, timeout))
    timeout = client.timeout if timeout is None else timeout
    wait_ms = min(int(timeout * 1000), MAX_WAIT_MS)
    job, reply = yield from start({"wait_ms": wait_ms}, timeout + client.timeout)
    yield from job._settle_reply(reply, wait_ms)
    return (yield from ModelRun.result(job))


class ModelRun(ModelRunRecord):
    """One run of a model, its operations: ``wait()``, then ``result()`` (outputs) and ``stats``."""

    def _settle(self, result: dict):
        """Take a finished job's outcome (from wait or wait_jobs): outputs, or its error.

        Until the outputs are read the job keeps its buffer set: a read interrupted half-way
        leaves the job unfinished, and the next wait() reads again from the same set."""
        if not self._take(result):
            return
        if self._error is None:
            self._outputs = yield from self._collect()
        yield from self._release()

    def _collect(self):
        """The finished run's outputs (copies: the buffers serve the next run)."""
        outputs = Outputs()
        for info, buf in zip(self.model.outputs, self._io[1]):
            out = np.empty(info.shape, info.dtype)
            yield from BufferOps.read_into(buf, out)
            outputs[info.name] = out
        return outputs

    def _release(self):
        io, self._io = self._io, None
        if io is None:
            return
        if self.model._unloaded:  # unloaded while this job ran: nothing will reuse them
            yield from self.model._discard(io)
        else:
            self.model._idle_sets.append(io)  # the buffers may serve the next run

    def result(self, timeout: float | None = None):
        """Wait for the run and return its outputs by name (raises its error if it failed)."""
        yield from JobRecord.wait(self, timeout)
        return self._outputs


class Model(LoadedModel):
    """A model loaded on a device for this session."""

    client: "Client"
    if TYPE_CHECKING:   # the blocking methods' types (docstrings: LoadedModel)
        def run(self, feeds: Any, timeout: float | None = None) -> Outputs: ...
        def submit(self, feeds: Any, *, context: Any = None, after: Sequence[Any] = (),
                   deadline: float | None = None, timeout: float | None = None) -> ModelJob: ...
        def execution(self, context: Any = None, *, input_shapes: dict[str, Sequence[int]] | None = None,
                      after: Sequence[Any] = (), deadline: float | None = None,
                      timeout: float | None = None) -> Execution: ...
        def specialise(self, input_shapes: dict[str, Sequence[int]]) -> Model: ...
        def report(self) -> Report: ...
        def unload(self) -> None: ...
    else:
        run = blocking(LoadedModel.run)
        submit = blocking(LoadedModel.submit)
        execution = blocking(LoadedModel.execution)
        specialise = blocking(LoadedModel.specialise)
        report = blocking(LoadedModel.report)
        unload = blocking(LoadedModel.unload)


class ModelJob(ModelRun, Job):
    """One run of a model: ``wait()``, then ``result()`` (outputs) and ``stats``."""

    if TYPE_CHECKING:
        def result(self, timeout: float | None = None) -> Outputs: ...
    else:
        result = blocking(ModelRun.result)


Model._job_class = ModelJob


def _drop(entry: Signature):
    """Unload an evicted specialisation, closing the executions made on it first."""
    from .execution import ExecutionOps

    for execution in entry.executions:
        yield from ExecutionOps.close(execution)
    yield from LoadedModel.unload(entry.model)


def _tensor(t: dict) -> TensorInfo:
    symbolic = t.get("symbolic") or ()
    if len(symbolic) != len(t["shape"]):
        symbolic = ()   # a declaration that does not match the shape is not one: keep the shape fixed
    dims = tuple(name if name else size for name, size in zip(symbolic, t["shape"])) if symbolic else ()
    return TensorInfo(t["name"], tuple(t["shape"]), np.dtype(t["dtype"]), t["size"], dims,
                      tuple(t.get("defaulted", ())))
