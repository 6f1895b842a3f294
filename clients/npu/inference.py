"""``npu.InferenceSession``: onnxruntime's session API, run by npud.

Porting an onnxruntime program is a one-line change of its import::

    import npu as ort                     # was: import onnxruntime as ort
    sess = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
    (probs,) = sess.run(None, {sess.get_inputs()[0].name: x})

What is the same: ``run(output_names, input_feed)`` returns a list; ``get_inputs()`` /
``get_outputs()`` give ``NodeArg``s whose ``type`` is spelt as onnxruntime spells it
(``tensor(float)``) and whose ``shape`` has symbolic dimensions as strings (``None`` where the model
names none); ``get_modelmeta()``; ``get_providers()``; ``io_binding()``; a feed of the wrong type is
refused with onnxruntime's message ("Unexpected input data type. Actual: (tensor(double)) ,
expected: (tensor(float))").

What differs, by design:

* **Providers.**  Every model runs on an npud device (``NpuExecutionProvider``; its option
  ``device_id`` picks the device, default 0), which is all ``get_providers()`` lists.
  ``CPUExecutionProvider`` is accepted and ignored: onnxruntime keeps it as the fallback of
  every session anyway, and npud places every node itself.  Any other provider (CUDA, ...) is
  ignored with a warning, as onnxruntime does with a provider its build lacks.
* **Options.**  ``sess_options`` (an ``npu.SessionOptions`` or onnxruntime's own) is accepted;
  thread counts, optimisation levels and profiling do not apply (the daemon compiles and
  schedules); ``logid`` names the session in ``npuctl clients``.  ``run_options`` is accepted
  and ignored.
* **Shapes.**  A model is compiled for fixed shapes: symbolic dimensions are 1 at first and a
  run with other sizes compiles (once; the daemon's cache keeps it) for those, as
  ``Model.run`` does (clients/npu/shapes.py: the first signature and the last
  ``npu.shapes.SIGNATURES_KEPT`` others stay loaded; ``signatures()`` lists them).
* **Errors** are ``npu.NpuError``s (``npu.InvalidArgument`` for a bad feed), not
  onnxruntime's exception classes.
* **Which daemon.**  The session opens its own connection (``npu.connect()``: the endpoint
  search of npud/ipc_schema/endpoint.py), closed with the session; ``client=`` shares one instead.
"""

from __future__ import annotations

import enum
import os
import threading
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import onnx
from onnx import helper

from npud.ipc_schema.errors import ErrorCode

from .client import Client, connect
from .errors import error
from .execution import Execution
from .model import Model, Outputs
from .onnx_backend import _convert_output
from .tensor_types import check_dtype, feed_dict, ort_type

PROVIDER = "NpuExecutionProvider"
IGNORED_PROVIDERS = ("CPUExecutionProvider",)   # accepted without a word: see the module's docstring
LOAD_TIMEOUT_S = 120.0   # the session's own connection: a first compile of a large model takes a while

ModelSource = Union[str, "os.PathLike[str]", bytes, onnx.ModelProto]
Dim = Union[int, str, None]


def get_available_providers() -> list[str]:
    """The providers this library runs models with: npud's devices."""
    return [PROVIDER]


def get_all_providers() -> list[str]:
    """Every provider name ``InferenceSession`` accepts (the others are ignored with a warning)."""
    return [PROVIDER, *IGNORED_PROVIDERS]


def get_device() -> str:
    """What runs the models (onnxruntime says ``"CPU"`` or ``"GPU"``)."""
    return "NPU"


class GraphOptimizationLevel(enum.IntEnum):
    """onnxruntime's levels, accepted for ``SessionOptions.graph_optimization_level``; the compiler
    always runs all its passes."""

    ORT_DISABLE_ALL = 0
    ORT_ENABLE_BASIC = 1
    ORT_ENABLE_EXTENDED = 2
    ORT_ENABLE_ALL = 99


class ExecutionMode(enum.IntEnum):
    """onnxruntime's execution modes, accepted and ignored (the daemon schedules)."""

    ORT_SEQUENTIAL = 0
    ORT_PARALLEL = 1


@dataclass
class SessionOptions:
    """onnxruntime's session options, accepted so that programs that set them still run; only
    ``logid`` (the session's name in ``npuctl clients``) has an effect."""

    logid: str = ""
    intra_op_num_threads: int = 0
    inter_op_num_threads: int = 0
    graph_optimization_level: GraphOptimizationLevel = GraphOptimizationLevel.ORT_ENABLE_ALL
    execution_mode: ExecutionMode = ExecutionMode.ORT_SEQUENTIAL
    log_severity_level: int = 2
    log_verbosity_level: int = 0
    enable_profiling: bool = False
    optimized_model_filepath: str = ""
    enable_mem_pattern: bool = True
    enable_cpu_mem_arena: bool = True
    config_entries: dict[str, str] = field(default_factory=dict)

    def add_session_config_entry(self, key: str, value: str) -> None:
        self.config_entries[key] = value

    def get_session_config_entry(self, key: str) -> str:
        return self.config_entries[key]


@dataclass
class RunOptions:
    """onnxruntime's run options, accepted and ignored."""

    log_severity_level: int = 2
    log_verbosity_level: int = 0
    logid: str = ""
    terminate: bool = False


@dataclass(frozen=True)
class NodeArg:
    """An input or output as the ONNX model declares it: ``name``, ``shape`` (ints; symbolic
    dimensions as their names; None for an unnamed one), ``type`` (``tensor(float)``, ...)."""

    name: str
    shape: list[Dim]
    type: str


@dataclass(frozen=True)
class ModelMetadata:
    """The model's metadata, as onnxruntime's ``get_modelmeta()`` gives it."""

    producer_name: str
    graph_name: str
    domain: str
    description: str
    graph_description: str
    version: int
    custom_metadata_map: dict[str, str]


@dataclass(frozen=True)
class _Declared:
    """One graph input or output: its NodeArg and its numpy dtype (None if the model gives none)."""

    arg: NodeArg
    dtype: np.dtype[Any] | None


class InferenceSession:
    """An ONNX model loaded on an npud device, with onnxruntime's ``InferenceSession`` API."""

    def __init__(self, path_or_bytes: ModelSource, sess_options: Any = None,
                 providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
                 provider_options: Sequence[dict[str, Any]] | None = None, *,
                 client: Client | None = None, input_shapes: Mapping[str, Sequence[int]] | None = None,
                 **kwargs: Any) -> None:
        """Compile and load the model (a path, bytes or an onnx.ModelProto).  ``client`` shares a
        connection (default: a new ``npu.connect()``); ``input_shapes`` picks the sizes of symbolic
        dimensions for the first compile (default 1).  Other keyword arguments of onnxruntime's
        (``disabled_optimizers``) are accepted and ignored."""
        unknown = sorted(set(kwargs) - {"disabled_optimizers"})
        if unknown:
            raise error(ErrorCode.EINVAL, f"InferenceSession got unexpected keyword arguments {unknown}")
        self._options = sess_options if sess_options is not None else SessionOptions()
        self._device = _device_of(providers, provider_options)
        proto, self._source = _model(path_or_bytes)
        self._meta = _metadata(proto)
        initializers = {i.name for i in proto.graph.initializer}
        self._inputs = [_declared(v) for v in proto.graph.input if v.name not in initializers]
        self._outputs = [_declared(v) for v in proto.graph.output]
        self._owns_client = client is None
        self._client = client if client is not None else connect(
            name=getattr(self._options, "logid", "") or "npu.InferenceSession", timeout=LOAD_TIMEOUT_S)
        self._models: list[Model] = []   # the model loaded first; it loads and keeps the other shapes
        self._lock = threading.Lock()   # threads may share a session, as onnxruntime's: one load per shape
        self._executions: list[Execution] = []
        self._closing = [False]    # set by close(): only then are a shared client's models unloaded
        self._finalizer = weakref.finalize(self, _release, self._client, self._owns_client, self._closing,
                                           self._models, self._executions)
        try:
            options: dict[str, Any] = {"input_shapes": {k: list(v) for k, v in input_shapes.items()}} \
                if input_shapes else {}
            first = self._client.load(self._source, self._device, **options)
        except BaseException:
            self.close()
            raise
        self._models.append(first)

    # --- onnxruntime's API ---------------------------------------------------------------

    def get_inputs(self) -> list[NodeArg]:
        return [d.arg for d in self._inputs]

    def get_outputs(self) -> list[NodeArg]:
        return [d.arg for d in self._outputs]

    def get_overridable_initializers(self) -> list[NodeArg]:
        """None: the compiler packs every initializer into the executable's weights."""
        return []

    def get_modelmeta(self) -> ModelMetadata:
        return self._meta

    def get_providers(self) -> list[str]:
        return [PROVIDER]

    def get_provider_options(self) -> dict[str, dict[str, str]]:
        return {PROVIDER: {"device_id": str(self._device)}}

    def get_session_options(self) -> Any:
        return self._options

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any],
            run_options: Any = None) -> list[np.ndarray[Any, Any]]:
        """The outputs named (all, in the model's order, for None) as a list of arrays."""
        names = self._output_names(output_names)
        feeds = self._check_feeds(input_feed)
        self._model_for(feeds)   # loaded under the lock: one load per shape, however many threads ask
        model = self._models[0]     # which runs the feeds on the signature for their shapes (a hit)
        outputs = model.run(_device_feeds(model, feeds))
        return [self._declared_output(outputs, name) for name in names]

    def io_binding(self) -> "IOBinding":
        """Inputs and outputs bound once and reused across runs (``run_with_iobinding``)."""
        return IOBinding(self)

    def run_with_iobinding(self, iobinding: "IOBinding", run_options: Any = None) -> None:
        """Run with the inputs bound to ``iobinding``; its bound outputs then hold the results."""
        if not isinstance(iobinding, IOBinding) or iobinding._session is not self:
            raise error(ErrorCode.EINVAL, "run_with_iobinding takes an IOBinding made by this session's io_binding()")
        iobinding._run()

    # --- npu's own ---------------------------------------------------------------------

    def signatures(self) -> list[dict[str, Any]]:
        """The shape signatures loaded for the model (``Model.signatures``): shapes by input,
        ``compile_ms``, ``cached`` and ``hits``."""
        return self._models[0].signatures

    @property
    def client(self) -> Client:
        """The connection the session runs on."""
        return self._client

    def close(self) -> None:
        """Unload the model (and close the connection, if the session opened it).  A session that is
        collected without ``close()`` closes its own connection, but leaves a shared ``client``'s
        models loaded until that client closes: a collection may run inside another call on it."""
        self._closing[0] = True
        self._finalizer()

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -----------------------------------------------------------------------

    def _output_names(self, output_names: Any) -> list[str]:
        known = [d.arg.name for d in self._outputs]
        if output_names is None:
            return known
        if isinstance(output_names, str) or not isinstance(output_names, Sequence) \
                or not all(isinstance(n, str) for n in output_names):
            raise error(ErrorCode.EINVAL, f"output_names is a list of output names (of {known}) or None, "
                                          f"not {output_names!r}")
        bad = [n for n in output_names if n not in known]
        if bad:
            raise error(ErrorCode.EINVAL, f"Invalid output name: {bad[0]} (the outputs are {known})")
        return list(output_names)

    def _check_feeds(self, input_feed: Any, *, partial: bool = False) -> dict[str, np.ndarray[Any, Any]]:
        """Every input fed (unless ``partial``), none unknown, each of its declared type and of a
        shape that fits the declared one (symbolic dimensions take any size)."""
        names = [d.arg.name for d in self._inputs]
        feeds = feed_dict(input_feed, names, "InferenceSession.run")
        missing = [] if partial else [n for n in names if n not in feeds]
        if missing:
            raise error(ErrorCode.EINVAL, f"Required inputs ({missing}) are missing from input feed ({list(feeds)})")
        extra = [n for n in feeds if n not in names]
        if extra:
            raise error(ErrorCode.EINVAL, f"Invalid input name: {extra[0]} (the inputs are {names})")
        out = {}
        for d in self._inputs:
            if d.arg.name not in feeds:
                continue
            x = np.asarray(feeds[d.arg.name])
            if d.dtype is not None:
                check_dtype(d.arg.name, x, d.dtype)
            _check_dims(d.arg, x.shape)
            out[d.arg.name] = x
        return out

    def _model_for(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> Model:
        """The model compiled for the feeds' shapes (``Model.specialise``): loaded now if it is
        not yet, by one thread while the others wait for it."""
        with self._lock:
            return self._models[0].specialise({d.arg.name: feeds[d.arg.name].shape for d in self._inputs})

    def _declared_output(self, outputs: Outputs, name: str) -> np.ndarray[Any, Any]:
        """Output ``name`` in the dtype the model declares (converted if the compiled model
        declares another, e.g. a vendor compiler's float32 for a bool output)."""
        y = outputs[name]
        dtype = next(d.dtype for d in self._outputs if d.arg.name == name)
        return y if dtype is None or y.dtype == dtype else _convert_output(name, y, dtype)


class IOBinding:
    """onnxruntime's IOBinding over an ``npu.Execution``: the device buffers are bound and mapped
    once per input shape, each run copies the bound CPU inputs into them and leaves the outputs
    in place.  Only CPU arrays bind (``bind_cpu_input``; ``bind_output(name)`` with
    ``device_type="cpu"``): outputs always live in the execution's own buffers."""

    def __init__(self, session: InferenceSession) -> None:
        self._session = session
        self._inputs: dict[str, np.ndarray[Any, Any]] = {}
        self._outputs: list[str] = []
        self._results: list[np.ndarray[Any, Any]] = []

    def bind_cpu_input(self, name: str, arr_on_cpu: np.ndarray[Any, Any]) -> None:
        """Bind an array to input ``name`` (checked now; read at each run, so changes to it show)."""
        self._inputs.update(self._session._check_feeds({name: arr_on_cpu}, partial=True))

    def bind_output(self, name: str, device_type: str = "cpu", device_id: int = 0, element_type: Any = None,
                    shape: Sequence[int] | None = None, buffer_ptr: int | None = None) -> None:
        """Bind output ``name``: the run leaves it in the execution's buffer (``get_outputs``)."""
        if device_type.lower() != "cpu" or buffer_ptr is not None:
            raise error(ErrorCode.EOPNOTSUPP, "npu binds outputs to its own buffers: call bind_output(name) "
                                              "and read them with copy_outputs_to_cpu()")
        self._session._output_names([name])
        if name not in self._outputs:
            self._outputs.append(name)

    def clear_binding_inputs(self) -> None:
        self._inputs.clear()

    def clear_binding_outputs(self) -> None:
        self._outputs.clear()
        self._results = []

    def synchronize_inputs(self) -> None:
        """Nothing to wait for: inputs are copied when the run starts."""

    def synchronize_outputs(self) -> None:
        """Nothing to wait for: ``run_with_iobinding`` returns once the run finished."""

    def get_outputs(self) -> list[np.ndarray[Any, Any]]:
        """The bound outputs of the last run, in bind order: views of the execution's buffers where
        the dtypes agree, overwritten by the next run."""
        return list(self._results)

    def copy_outputs_to_cpu(self) -> list[np.ndarray[Any, Any]]:
        """Copies of the bound outputs of the last run, in bind order."""
        return [y.copy() for y in self._results]

    def _run(self) -> None:
        session = self._session
        feeds = session._check_feeds(self._inputs)   # every input bound
        model = session._model_for(feeds)
        # an execution whose specialisation was evicted was closed with it (shapes.py)
        session._executions[:] = [e for e in session._executions if not e._closed]
        execution = next((e for e in session._executions if e.model is model), None)
        if execution is None:
            execution = session._models[0].execution(input_shapes={k: v.shape for k, v in feeds.items()})
            session._executions.append(execution)
        outputs = execution.run(_device_feeds(model, feeds))
        self._results = [session._declared_output(outputs, name) for name in self._outputs]


# --- the model, as the ONNX file declares it --------------------------------------------------

def _model(source: Any) -> tuple[onnx.ModelProto, Any]:
    """The model's proto (its declarations) and what to load: a path or bytes as given (a path
    keeps the client's digest memo and its external data), a proto as it is (the
    compiler worker upgrades old opsets)."""
    if isinstance(source, (str, os.PathLike)):
        try:
            proto = onnx.load(source, load_external_data=False)
        except OSError as exc:
            raise error(ErrorCode.EINVAL, f"cannot read model file {source}: {exc.strerror}") from None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        source = bytes(source)
        proto = _parse(source)
    elif isinstance(source, onnx.ModelProto):
        proto = source
    else:
        raise error(ErrorCode.EINVAL, f"InferenceSession takes a path, bytes or onnx.ModelProto, "
                                      f"not {type(source).__name__}")
    return proto, source


def _parse(data: bytes) -> onnx.ModelProto:
    try:
        return onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 -- protobuf's DecodeError and friends
        raise error(ErrorCode.EINVAL, f"the bytes are not an ONNX model: {exc}") from None


def _declared(value: onnx.ValueInfoProto) -> _Declared:
    tt = value.type.tensor_type
    dims: list[Dim] = [int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None)
                       for d in tt.shape.dim]
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else None
    return _Declared(NodeArg(value.name, dims, ort_type(dtype) if dtype is not None else "tensor(undefined)"),
                     dtype)


UNSET_VERSION = 2**63 - 1
"""The ``version`` onnxruntime reports for a model that sets no ``model_version``."""


def _metadata(proto: onnx.ModelProto) -> ModelMetadata:
    version = int(proto.model_version) if proto.HasField("model_version") else UNSET_VERSION
    return ModelMetadata(proto.producer_name, proto.graph.name, proto.domain, proto.doc_string,
                         proto.graph.doc_string, version, {p.key: p.value for p in proto.metadata_props})


def _device_feeds(model: Model, feeds: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
    """The (checked) feeds in the dtypes the compiled model takes: the same on npu-emu, whose
    I/O table keeps the model's types; converted for a compiler that declares other ones."""
    dtypes = {t.name: t.dtype for t in model.inputs}
    return {k: v if dtypes[k] == v.dtype else v.astype(dtypes[k]) for k, v in feeds.items()}


def _check_dims(arg: NodeArg, shape: tuple[int, ...]) -> None:
    """EINVAL, as onnxruntime words it, unless ``shape`` fits the declared one."""
    if len(shape) != len(arg.shape):
        raise error(ErrorCode.EINVAL, f"Invalid rank for input: {arg.name} Got: {len(shape)} Expected: "
                                      f"{len(arg.shape)} Please fix either the inputs/outputs or the model.")
    wrong = [(i, got, want) for i, (got, want) in enumerate(zip(shape, arg.shape))
             if isinstance(want, int) and got != want]
    if wrong:
        said = "\n".join(f" index: {i} Got: {got} Expected: {want}" for i, got, want in wrong)
        raise error(ErrorCode.EINVAL, f"Got invalid dimensions for input: {arg.name} for the following "
                                      f"indices\n{said}\n Please fix either the inputs/outputs or the model.")


def _device_of(providers: Any, provider_options: Any) -> int:
    """The device the providers pick: ``NpuExecutionProvider``'s ``device_id`` (default 0).  The
    CPU provider is ignored quietly, others with a warning; a malformed list is EINVAL."""
    if providers is None:
        return 0
    if isinstance(providers, str) or not isinstance(providers, Sequence):
        raise error(ErrorCode.EINVAL, f"providers is a list of provider names, not {providers!r}")
    if provider_options is not None and len(provider_options) != len(providers):
        raise error(ErrorCode.EINVAL, "provider_options needs one dict per provider")
    device = 0
    for i, entry in enumerate(providers):
        name, options = entry if isinstance(entry, tuple) and len(entry) == 2 else (entry, {})
        if provider_options is not None:
            options = {**options, **provider_options[i]}
        if not isinstance(name, str) or not isinstance(options, Mapping):
            raise error(ErrorCode.EINVAL, f"a provider is a name or a (name, options dict) pair, not {entry!r}")
        if name == PROVIDER:
            device = _device_id(options)
        elif name not in IGNORED_PROVIDERS:
            warnings.warn(f"Specified provider '{name}' is not in available provider names. Available "
                          f"providers: '{PROVIDER}' (npu runs every model on an npud device)", stacklevel=3)
    return device


def _device_id(options: Mapping[str, Any]) -> int:
    unknown = sorted(set(options) - {"device_id"})
    if unknown:
        raise error(ErrorCode.EINVAL, f"{PROVIDER} has one option, device_id; not {unknown}")
    try:
        return int(options.get("device_id", 0))
    except (TypeError, ValueError):
        raise error(ErrorCode.EINVAL, f"{PROVIDER}'s device_id is a device index, "
                                      f"not {options['device_id']!r}") from None


def _release(client: Client, owned: bool, closing: list[bool], models: list[Model],
             executions: list[Execution]) -> None:
    """The session's end: its connection closed if it opened it (freeing everything there), else,
    on ``close()``, its executions closed and its models unloaded."""
    try:
        if owned:
            client.close()
            return
        if not closing[0]:
            return   # collected: calls on the shared client could deadlock the call that collected
        for execution in executions:
            execution.close()
        for model in models:
            model.unload()   # and the specialisations it loaded
    except Exception:  # noqa: BLE001 -- the daemon or session may be gone: nothing left to free
        pass
    finally:
        executions.clear()
        models.clear()
