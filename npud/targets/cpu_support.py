"""What the cpu target claims: the nodes onnxruntime's CPU provider runs, and npud can carry.

``npuctl cts --driver cpu`` found the cpu target claiming every node, onnxruntime then refusing
or mis-computing some.  A claim must be a promise (docs/CTS.md), so a node is supported only if

* every tensor it reads or writes is a tensor (not a sequence, optional or map) of a type npud's
  buffers carry and, if it is a model input or output (a buffer), with a shape known before it
  runs and no zero-sized dimension (ONNX shape inference: a data-dependent shape, as NonZero's
  or Unique's, is not known);
* onnxruntime's CPU provider has a kernel for its op, at the version the model's opset selects,
  for the element types it is given (onnxruntime's own kernel registry says so); and
* it is not a known deviation (``DEVIATIONS``: a random op, or one whose onnxruntime results
  differ from the ONNX reference beyond the tolerance of the ONNX node tests).

Runs in the compiler workers, like every target: it imports onnxruntime there only to read its
kernel registry, and without onnxruntime (no ``npud[cpu]`` extra) it claims nothing.
"""

from __future__ import annotations

import contextlib
import functools
import os

# element types npud's tensor_info carries (npud/ipc_schema: tensor_info.dtype)
CARRIED = {"float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"}
# op -> why onnxruntime's answer is not the ONNX reference's (a claim would be a false promise)
DEVIATIONS = {
    "Bernoulli": "random output (nothing to check it against)",
    "RandomNormal": "random output (nothing to check it against)",
    "RandomNormalLike": "random output (nothing to check it against)",
    "RandomUniform": "random output (nothing to check it against)",
    "RandomUniformLike": "random output (nothing to check it against)",
    "DFT": "onnxruntime's FFT differs from the ONNX reference by up to ~1e-4 where the node tests allow 1e-7",
    "STFT": "onnxruntime's FFT differs from the ONNX reference by up to ~1e-4 where the node tests allow 1e-7",
    "MaxUnpool": "onnxruntime places the values differently from the ONNX reference when output_shape is given",
}
INT_MAX = 2**31 - 1
NO_ORT = "onnxruntime is not installed where npud compiles (install the extra: pip install 'npud[cpu]')"


def support(proto) -> list[tuple[bool, str]]:
    """(supported, reason) for each node of the ONNX model ``proto``, in graph order."""
    import onnx

    kernels = _kernels()
    if kernels is None:
        return [(False, NO_ORT)] * len(proto.graph.node)
    try:   # strict, as the compile's: a model it fails on cannot load
        inferred = onnx.shape_inference.infer_shapes(_inputs_fixed(proto), strict_mode=True)
    except Exception as exc:
        why = f"ONNX shape inference fails on the model: {' '.join(str(exc).split())[:200]}"
        return [(False, why)] * len(proto.graph.node)
    tensors = _tensors(inferred.graph)
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    buffers = {v.name for v in [*proto.graph.input, *proto.graph.output]}
    out = []
    for node in proto.graph.node:
        why = _tensor_problem(node, tensors, buffers) or _kernel_problem(node, tensors, opsets, kernels) \
            or _deviation(node, tensors)
        out.append((not why, why))
    return out


def _inputs_fixed(proto):
    """A copy of ``proto`` whose symbolic input dimensions are 1: the compile fixes them (from
    ``input_shapes``, else 1) before anything runs, so only a shape that depends on the data
    stays unknown after shape inference."""
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    for value in fixed.graph.input:
        for d in value.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.dim_value = 1
    return fixed


def _deviation(node, tensors: dict) -> str:
    op = node.op_type
    if op == "Dropout" and len(node.input) > 2 and node.input[2]:
        return "Dropout in training mode: random output (nothing to check it against)"
    if op == "MaxUnpool" and len(node.input) < 3:
        return ""
    if op == "ConvInteger" and len(node.input) > 3 and node.input[3]:
        shape = tensors.get(node.input[3], (None, None))[1] or []
        if len(shape) > 1 or (shape and shape[0] > 1):
            return "onnxruntime's ConvInteger takes a per-tensor weight zero point only"
    return DEVIATIONS.get(op, "")


@functools.cache
def _kernels() -> dict | None:
    """{(domain, op): [(first version, last version, {type param: {"tensor(float)", ...}})]} of
    onnxruntime's CPU provider; None without onnxruntime."""
    with _stderr_discarded():
        try:
            from onnxruntime.capi import _pybind_state as ort
        except ImportError:
            return None
        definitions = ort.get_all_opkernel_def()
    table: dict = {}
    for k in definitions:
        if k.provider == "CPUExecutionProvider":
            table.setdefault((k.domain or "ai.onnx", k.op_name), []).append(
                (k.version_range[0], k.version_range[1], {n: set(t) for n, t in k.type_constraints.items()}))
    return table


@contextlib.contextmanager
def _stderr_discarded():
    """Loading onnxruntime in a compiler worker writes to fd 2 that the sandbox hides /proc/cpuinfo
    and /sys from it: expected (only its kernel registry is read here), and noise in npud's log.
    A pipe, not /dev/null: the sandbox lets the worker open no file."""
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)   # a full pipe drops the rest instead of blocking the worker
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(read_end)


def _tensors(graph) -> dict:
    """{name: (element type name or None if not a tensor, shape as a list of ints/None)}."""
    from onnx import helper

    out = {}
    for t in graph.initializer:
        out[t.name] = (helper.tensor_dtype_to_np_dtype(t.data_type).name, list(t.dims))
    for v in [*graph.input, *graph.value_info, *graph.output]:
        if not v.type.HasField("tensor_type"):
            out[v.name] = (None, None)
            continue
        tt = v.type.tensor_type
        try:
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else None
        except (KeyError, ValueError):
            dtype = helper.tensor_dtype_to_string(tt.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] \
            if tt.HasField("shape") else None
        out[v.name] = (dtype, shape)
    return out


def _tensor_problem(node, tensors: dict, buffers: set) -> str:
    """Why a tensor of ``node`` cannot be carried ('' if none can't).  Only the model's inputs and
    outputs (``buffers``) become npud buffers, sized at load: a tensor inside the model (NMS's
    selected indices, in a cpu partition that scatters them into a fixed-size mask) may have a
    data-dependent or empty shape, as onnxruntime allows."""
    for name in [*node.input, *node.output]:
        if not name:
            continue
        if name not in tensors:
            return f"the type and shape of {name!r} are not known after shape inference"
        dtype, shape = tensors[name]
        if dtype is None:
            return f"{name!r} is not a tensor (a sequence, optional or map): npud passes tensors"
        if dtype not in CARRIED:
            return f"{name!r} is {dtype}: npud's buffers carry {', '.join(sorted(CARRIED))}"
        if name not in buffers:
            continue
        if shape is None or None in shape:
            return f"the shape of {name!r} is not known before the run (it depends on the data)"
        if 0 in shape:
            return f"{name!r} is empty (a zero-sized dimension): npud's buffers are never empty"
    return ""


ORT_TYPE = {"float32": "float", "float16": "float16", "int8": "int8", "uint8": "uint8", "int16": "int16",
            "int32": "int32", "int64": "int64", "bool": "bool"}


def _kernel_problem(node, tensors: dict, opsets: dict, kernels: dict) -> str:
    import onnx

    domain = node.domain or "ai.onnx"
    if domain == "ai.onnx" and node.op_type == "Constant":
        return ""   # no kernel needed: onnxruntime's graph turns Constant nodes into initializers at load
    try:
        schema = onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), node.domain)
    except onnx.defs.SchemaError:
        return f"no ONNX schema for {domain}:{node.op_type} at opset {opsets.get(domain)}"
    version = schema.since_version
    # onnxruntime's rule (kernel_registry.cc, VerifyVersion): a kernel registered without an end
    # version serves only its first version -- a later version of the op may mean what it cannot do
    candidates = [k for k in kernels.get((domain, node.op_type), [])
                  if k[0] == version or (k[1] != INT_MAX and k[0] <= version <= k[1])]
    if not candidates:
        return f"onnxruntime's CPU provider has no kernel for {node.op_type}-{version}"
    bound = _type_bindings(node, schema, tensors)
    for _first, _last, constraints in candidates:
        if all(f"tensor({ORT_TYPE[t]})" in constraints[p] for p, t in bound.items() if p in constraints):
            return ""
    types = ", ".join(f"{p}={t}" for p, t in sorted(bound.items()))
    return f"onnxruntime's CPU provider has no {node.op_type}-{version} kernel for {types}"


def _type_bindings(node, schema, tensors: dict) -> dict:
    """{type parameter ("T", "T1"...): element type} of the node's tensors, per its schema."""
    bound = {}
    for names, formals in ((node.input, schema.inputs), (node.output, schema.outputs)):
        for i, name in enumerate(names):
            if not name or not formals:
                continue
            formal = formals[min(i, len(formals) - 1)]   # the last formal may be variadic
            if i >= len(formals) and formal.option != onnx_variadic():
                continue
            dtype = tensors.get(name, (None, None))[0]
            if dtype in ORT_TYPE:
                bound.setdefault(formal.type_str, dtype)
    return bound


def onnx_variadic():
    import onnx

    return onnx.defs.OpSchema.FormalParameterOption.Variadic
