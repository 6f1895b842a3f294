"""``npu.onnx_backend``: the ONNX backend API (``onnx.backend.base.Backend``) over npud.

    import npu.onnx_backend as backend
    rep = backend.prepare(model, device="NPU")      # compiles through the daemon
    outputs = rep.run([x])                          # tuple, in graph output order
    outputs = backend.run_model(model, [x])

Every model compiles in the daemon's compiler workers and runs as a command
stream on the device; nothing here evaluates an operator.  The backend talks
to one shared daemon: ``$NPUD_ENDPOINT`` if set, else a private ``npu.local()``
daemon (one ``server`` device, its own temporary compile cache) started on
first use and stopped at interpreter exit.

Devices: ``supports_device`` accepts ``"NPU"`` (device 0 of the daemon) and
``"CPU"``.  ``"CPU"`` is accepted only because ONNX's backend test suite
names its default device so (it generates ``*_cpu`` tests and calls
``prepare(model, "CPU")``); it selects the same NPU device 0 - no operator
ever runs on the host.  ``"CUDA"`` and anything else are refused.

What the backend does on the host, and nothing more:

* **Parameter inputs are specialised.**  A graph input that feeds only
  parameter slots (Reshape's shape, Slice's starts/ends/axes/steps, Pad's
  pads, Clip's bounds, Resize's scales/sizes, Reduce/Squeeze/Unsqueeze axes,
  Expand's shape, Split's sizes, ConstantOfShape's shape, Dropout's ratio)
  or weight slots (Conv/ConvTranspose weights and bias, BatchNormalization,
  LayerNormalization and InstanceNormalization parameters, quantisation scales
  and zero points, QLinearConv/QLinearMatMul/ConvInteger/MatMulInteger
  weights) is baked into the model as an initializer with the value given to
  ``run``, and the specialised model is compiled (once per distinct value;
  the daemon's compile cache makes repeats cheap).  The compiler only
  accepts such parameters and weights as constants (as NPU compilers do:
  weights are packed into the executable).
* **Old opsets.**  Models older than opset 11 are sent as they are: the compiler
  worker upgrades them with ``onnx.version_converter`` (passes/upgrade.py).
* **Symbolic dimensions** are resolved from the shapes of the arrays given
  to ``run`` (``input_shapes`` option), one compile per shape signature.
* **dtypes at the boundary.**  Feeds are converted to the dtype the ONNX
  model declares, then to the one the compiled model declares, and outputs
  come back in the dtype the ONNX model declares.  npu-emu's I/O table keeps
  the model's own types (float32, int8, uint8, int32, int64, bool), so
  nothing is converted there; a compiled model with float32 I/O for an
  integer or bool tensor (another vendor's compiler) is converted, and an
  integer output whose float32 value is not an exact integer is an error
  rather than a silent rounding.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import weakref
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.backend.base import Backend, BackendRep, Device, DeviceType, namedtupledict

from .client import Client
from .local import local

# op type -> input indices that are parameters (the compiler needs them constant)
PARAMETER_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Slice": (1, 2, 3, 4), "Pad": (1, 2, 3), "Clip": (1, 2),
    "Resize": (1, 2, 3), "Upsample": (1,), "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,),
    "ReduceMin": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "Expand": (1,), "Split": (1,),
    "ConstantOfShape": (0,), "Dropout": (1, 2), "Tile": (1,),
    # shapes and control known at load: the compiler folds Range and If, and CumSum's axis
    "Range": (0, 1, 2), "If": (0,), "CumSum": (1,),
    # weights: the compiler folds them into the executable's weights blob
    "Conv": (1, 2), "ConvTranspose": (1, 2), "BatchNormalization": (1, 2, 3, 4),
    "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2), "GroupNormalization": (1, 2),
    "LSTM": (1, 2, 3, 4, 7), "GRU": (1, 2, 3, 4), "RNN": (1, 2, 3, 4),
    # quantisation parameters (scales, zero points) and integer weights
    "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2),
    "QLinearConv": (1, 2, 3, 4, 5, 6, 7, 8), "QLinearMatMul": (1, 2, 3, 4, 5, 6, 7),
    "ConvInteger": (1, 2, 3), "MatMulInteger": (1, 2, 3),
}
DAEMON_DEVICE = "server"       # the private daemon's device preset

_lock = threading.Lock()
_client: Client | None = None
_cache_dir: str | None = None
_retired: list = []      # models of collected reps, unloaded before the next load


def _retire(compiled: dict) -> None:
    # runs when a rep is garbage collected, possibly inside another request: only queue
    _retired.extend(compiled.values())


def _unload_retired() -> None:
    while _retired:
        m = _retired.pop()
        try:
            m.unload()
        except Exception:   # the session may be gone already; nothing to free then
            pass


def shared_client() -> Client:
    """The one client all prepared models use (started on first use)."""
    global _client, _cache_dir
    with _lock:
        if _client is None:
            endpoint = os.environ.get("NPUD_ENDPOINT")
            if endpoint:
                _client = Client(endpoint, name="npu.onnx_backend", timeout=120.0)
            else:
                _cache_dir = tempfile.mkdtemp(prefix="npu-onnx-backend-cache-")
                _client = local("--device", DAEMON_DEVICE, "--cache-dir", _cache_dir,
                                name="npu.onnx_backend", timeout=120.0)
            atexit.register(shutdown)
        return _client


def shutdown() -> None:
    """Close the shared client (stopping the private daemon, if it is ours)."""
    global _client, _cache_dir
    with _lock:
        if _client is not None:
            try:
                _client.close()
            finally:
                _client = None
        if _cache_dir is not None:
            shutil.rmtree(_cache_dir, ignore_errors=True)
            _cache_dir = None


def _np_dtype(elem_type: int) -> np.dtype | None:
    if not elem_type:
        return None
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


class NpuRep(BackendRep):
    """A prepared model: compiled lazily per (parameter values, input shapes)."""

    def __init__(self, model: onnx.ModelProto, device: str, options: dict) -> None:
        self.model = model
        self.device = device
        self.options = options
        g = model.graph
        inits = {i.name for i in g.initializer}
        self.inputs = [vi for vi in g.input if vi.name not in inits]
        self.output_names = [o.name for o in g.output]
        self.output_dtypes = [_np_dtype(o.type.tensor_type.elem_type) for o in g.output]
        consumers: dict[str, list[tuple[str, int]]] = {}
        for n in g.node:
            for k, name in enumerate(n.input):
                if name:
                    consumers.setdefault(name, []).append((n.op_type, k))
        outputs = set(self.output_names)
        # graph inputs that only ever feed parameter slots
        self.params = {vi.name for vi in self.inputs
                       if vi.name in consumers and vi.name not in outputs
                       and all(k in PARAMETER_INPUTS.get(op, ()) for op, k in consumers[vi.name])}
        self.symbolic = any(not d.HasField("dim_value") for vi in self.inputs
                            for d in vi.type.tensor_type.shape.dim)
        self._compiled: dict[Any, Any] = {}
        weakref.finalize(self, _retire, self._compiled)   # free device memory with the rep
        if not self.params and not self.symbolic:
            self._model_for({}, {})     # compile now: errors surface in prepare

    def _model_for(self, params: dict[str, np.ndarray], shapes: dict[str, tuple]):
        key = (tuple((k, v.dtype.str, v.shape, v.tobytes()) for k, v in sorted(params.items())),
               tuple(sorted(shapes.items())))
        m = self._compiled.get(key)
        if m is None:
            proto = self.model
            if params:
                proto = onnx.ModelProto()
                proto.CopyFrom(self.model)
                keep = [vi for vi in proto.graph.input if vi.name not in params]
                del proto.graph.input[:]
                proto.graph.input.extend(keep)
                proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in params.items())
            options = dict(self.options)
            if shapes:
                options["input_shapes"] = {k: list(v) for k, v in shapes.items()}
            m = self._compiled[key] = self._load(proto, options)
        return m

    def _load(self, proto: onnx.ModelProto, options: dict):
        """Load one specialised model (``npuctl cts`` loads on the device under test instead)."""
        client = shared_client()
        _unload_retired()
        return client.load(proto, **options)

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        if isinstance(inputs, dict):
            feeds = {k: np.asarray(v) for k, v in inputs.items()}
        else:
            if isinstance(inputs, np.ndarray) or not isinstance(inputs, (list, tuple)):
                inputs = [inputs]
            if len(inputs) > len(self.inputs):
                raise ValueError(f"{len(inputs)} inputs given, the model has {len(self.inputs)}")
            feeds = {vi.name: np.asarray(x) for vi, x in zip(self.inputs, inputs)}
        declared = {vi.name: _np_dtype(vi.type.tensor_type.elem_type) for vi in self.inputs}
        for name, x in feeds.items():   # the model's own input types, as ONNX runtimes require
            if declared.get(name) is not None and x.dtype != declared[name]:
                feeds[name] = x.astype(declared[name])
        params = {k: np.array(feeds.pop(k), order="C") for k in self.params if k in feeds}
        shapes = {k: tuple(int(s) for s in v.shape) for k, v in feeds.items()} if self.symbolic else {}
        model = self._model_for(params, shapes)
        run_feeds = {}
        for t in model.inputs:
            if t.name not in feeds:
                raise ValueError(f"missing input {t.name!r}")
            run_feeds[t.name] = np.asarray(feeds[t.name], dtype=t.dtype)
        result = model.run(run_feeds)
        outs = []
        for name, dtype in zip(self.output_names, self.output_dtypes):
            y = result[name]
            if dtype is not None and y.dtype != dtype:
                y = _convert_output(name, y, dtype)
            outs.append(y)
        return namedtupledict("Outputs", self.output_names)(*outs)


def _convert_output(name: str, y: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype == np.bool_:
        return y != 0
    if dtype.kind in "iu":
        r = np.rint(y)
        if not np.array_equal(r, y) or (y.size and (r.min() < np.iinfo(dtype).min
                                                   or r.max() > np.iinfo(dtype).max)):
            raise ValueError(f"output {name!r}: the device's float32 values are not exact {dtype} values")
        return r.astype(dtype)
    return y.astype(dtype)


class NpuBackend(Backend):
    """``onnx.backend.base.Backend`` for npud devices."""

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device in ("NPU", "CPU")

    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "NPU", **kwargs: Any) -> bool:
        return cls.supports_device(device)

    @classmethod
    def prepare(cls, model: Any, device: str = "NPU", **kwargs: Any) -> NpuRep:
        if not cls.supports_device(device):
            raise ValueError(f"device {device!r} is not supported (use 'NPU')")
        if isinstance(model, (bytes, bytearray)):
            model = onnx.load_from_string(bytes(model))
        elif isinstance(model, (str, os.PathLike)):
            model = onnx.load(model)
        options = {k: v for k, v in kwargs.items() if k in ("name", "input_shapes")}
        # older opsets are the compiler worker's to upgrade (passes/upgrade.py), never the client's
        return NpuRep(model, device, options)

    @classmethod
    def run_model(cls, model: Any, inputs: Any, device: str = "NPU", **kwargs: Any) -> tuple[Any, ...]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node: onnx.NodeProto, inputs: Any, device: str = "NPU",
                 outputs_info: Any = None, **kwargs: Any) -> tuple[Any, ...]:
        """Run one node: wrapped in a single-node model (float32 I/O) and compiled."""
        opset = kwargs.get("opset_version", onnx.defs.onnx_opset_version())
        opset = min(opset, 21)
        ins = [np.asarray(x) for x in inputs]
        vis = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(x.dtype), list(x.shape))
               for name, x in zip(node.input, ins)]
        outs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
        if outputs_info:
            outs = [helper.make_tensor_value_info(o, helper.np_dtype_to_tensor_dtype(np.dtype(dt)), list(sh))
                    for o, (dt, sh) in zip(node.output, outputs_info)]
        graph = helper.make_graph([node], "run_node", vis, outs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model = onnx.shape_inference.infer_shapes(model)
        return cls.run_model(model, ins, device, **kwargs)


# module-level functions: ``import npu.onnx_backend as backend; backend.prepare(...)``
prepare = NpuBackend.prepare
run_model = NpuBackend.run_model
run_node = NpuBackend.run_node
supports_device = NpuBackend.supports_device
is_compatible = NpuBackend.is_compatible

__all__ = ["NpuBackend", "NpuRep", "prepare", "run_model", "run_node", "supports_device",
           "is_compatible", "shared_client", "shutdown", "Device", "DeviceType", "TensorProto"]
