"""Pass 1: import.  ONNX bytes -> IR, with shape inference.

Reads plain ONNX bytes or a model container, and refuses references to external data files
before anything is decoded (npud/compiler_worker/external_data.py).  Refuses malformed bytes,
unsupported opsets (default domain 11..28 natively; older ones are upgraded first, passes/upgrade.py),
graphs with subgraph attributes, nodes that
break their ONNX schema (input/output counts, empty required inputs, missing, unknown or
mistyped attributes), unknown element types, cycles, non-static or absurd shapes, each with a
CompileError that says what is wrong.  Later passes rely on these checks:
they index a node's required inputs and read its attributes as the schema
types them.
"""

from __future__ import annotations

import re
import sys

import numpy as np
import onnx
from onnx import defs, helper, numpy_helper, shape_inference

from .. import external_data
from . import qoperator, resize, upgrade
from ..errors import CompileError
from ..ir import Graph, Node, Tensor
from ..numpy_ops import onnx_dtype_to_np

MIN_OPSET, MAX_OPSET = 11, 28   # 22..28 changed supported ops only by adding types (see tests)
MAX_ELEMENTS = 1 << 30          # per tensor: an absurd shape is refused, not allocated
SMALL_CONST = 4096              # constants this small go to shape inference with data


def run(ctx) -> None:
    ctx.graph = import_model(ctx.model_bytes, ctx.options)
    qoperator.run(ctx.graph)    # com.microsoft QOperator ops -> QDQ, which shape inference knows
    infer(ctx.graph)
    check_types(ctx.graph)


def import_model(model_bytes: bytes, options: dict) -> Graph:
    if not isinstance(model_bytes, (bytes, bytearray, memoryview)):
        raise CompileError(f"model must be bytes, not {type(model_bytes).__name__}")
    if len(model_bytes) == 0:
        raise CompileError("malformed model: empty input")
    model, container_data = external_data.parse(model_bytes)
    opset = _default_opset(model)
    # Before any tensor is decoded: onnx would open a named external file itself.  The main
    # graph's weights in a container stay there (a model past 2 GiB is not copied), unless
    # onnx's version converter must see them in the protobuf.
    views = external_data.resolve(model, container_data, keep=opset is None or opset >= MIN_OPSET)
    g = model.graph
    if len(g.node) == 0 and len(g.output) == 0:
        raise CompileError("malformed model: the graph has no nodes and no outputs")
    if opset is None:
        raise CompileError("malformed model: no opset import for the default ONNX domain")
    if upgrade.OLDEST_OPSET <= opset < MIN_OPSET:
        model = upgrade.upgrade(model, opset)
        g, opset = model.graph, upgrade.UPGRADE_TO
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise CompileError(f"unsupported opset {opset} (supported: {upgrade.OLDEST_OPSET}..{MAX_OPSET}; "
                           f"opsets before {MIN_OPSET} are upgraded to {upgrade.UPGRADE_TO})")

    check_names(g)
    tensors: dict[str, Tensor] = {}
    for init in g.initializer:
        arr = _initializer(init, views.get(init.name))
        tensors[init.name] = Tensor(init.name, tuple(arr.shape), arr.dtype, arr)
    overrides = dict((options or {}).get("input_shapes", {}) or {})
    inputs = []
    for vi in g.input:
        if vi.name in tensors:
            continue   # an initializer listed as input (IR < 4): a constant
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise CompileError(f"graph input {vi.name!r} is not a tensor")
        if not tt.elem_type:
            raise CompileError(f"graph input {vi.name!r} has no element type")
        dtype = _elem_type(tt.elem_type, f"graph input {vi.name!r}")
        if vi.name in overrides:
            shape = _override(vi, tuple(int(d) for d in overrides[vi.name]))
        else:
            if not tt.HasField("shape"):
                raise CompileError(f"graph input {vi.name!r} has no shape (give options"
                                   f"['input_shapes'])")
            shape = []
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    shape.append(int(d.dim_value))
                else:
                    shape.append(1)   # symbolic (batch) dims default to 1
            shape = tuple(shape)
        check_shape(shape, f"graph input {vi.name!r}")
        tensors[vi.name] = Tensor(vi.name, shape, dtype)
        inputs.append(vi.name)
    unknown = sorted(set(overrides) - set(inputs))
    if unknown:
        raise CompileError(f"options['input_shapes'] names {unknown}, which are not inputs of the graph "
                           f"(its inputs: {inputs})")
    nodes = []
    seen_names = set()
    produced = {o for n in g.node for o in n.output if o}
    for i, n in enumerate(g.node):
        name = n.name or f"{n.op_type}_{i}"
        while name in seen_names:
            name = f"{name}_{i}"
        seen_names.add(name)
        attrs = {}
        for a in n.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) and not _is_if(n):
                raise CompileError("control flow (subgraph attributes) is not supported; If is, "
                                   "when its condition is known at load", node=name, op=n.op_type)
        check_node_schema(n, name, opset)
        for a in n.attribute:
            attrs[a.name] = helper.get_attribute_value(a)
        node = Node(name, n.op_type, list(n.input) + _refs(n), list(n.output), attrs, n.domain)
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            tensors[n.output[0]] = _constant_tensor(node)
            continue
        nodes.append(node)
        for o in n.output:
            if o and o not in tensors:
                tensors[o] = Tensor(o)
        for x in list(n.input) + (outer_refs(n) if _is_if(n) else []):
            if x and x not in tensors and x not in produced:
                raise CompileError(f"input {x!r} is not a graph input, initializer or the "
                                   "output of any node", node=name, op=n.op_type)
    outputs = [o.name for o in g.output]
    if not outputs:
        raise CompileError("malformed model: the graph has no outputs")
    for o in outputs:
        if o not in tensors:
            raise CompileError(f"malformed model: graph output {o!r} is produced by nothing")
    graph = Graph(nodes, tensors, inputs, outputs, opset, name=g.name or "model")
    graph.meta["declared"] = {**{vi.name: declared_dims(vi, vi.name in overrides) for vi in g.input
                                 if vi.name in inputs},
                              **{vi.name: declared_dims(vi, True) for vi in g.output}}
    graph.toposort()
    graph.prune()
    return graph


def _is_if(n: onnx.NodeProto) -> bool:
    return n.op_type == "If" and n.domain in ("", "ai.onnx")


def _refs(n: onnx.NodeProto, ren: dict | None = None) -> list[str]:
    """An If's outer references as extra IR inputs (after the condition), so pruning, ordering
    and liveness see what its branches read; empty for other nodes."""
    if not _is_if(n):
        return []
    ren = ren or {}
    return list(dict.fromkeys(ren.get(x, x) for x in outer_refs(n) if ren.get(x, x) not in n.input[:1]))


def outer_refs(n: onnx.NodeProto) -> list[str]:
    """Names an If's branches (and their nested Ifs) read from the enclosing graph."""
    refs = []
    for a in n.attribute:
        if a.type != onnx.AttributeProto.GRAPH:
            continue
        g = a.g
        local = {i.name for i in g.initializer} | {i.name for i in g.input}
        for m in g.node:
            for x in list(m.input) + (outer_refs(m) if _is_if(m) else []):
                if x and x not in local:
                    refs.append(x)
            local.update(o for o in m.output if o)
    return refs


def inline_branch(branch: onnx.GraphProto, prefix: str, outputs: list, opset: int,
                  tensors: dict) -> list[Node]:
    """The nodes of an If's chosen ``branch`` for the enclosing graph: names the branch defines
    get ``prefix`` (outer names stay), its initializers and Constants join ``tensors``, and an
    Identity per output hands the branch's results to the If's ``outputs``."""
    local = {i.name for i in branch.initializer} | {o for m in branch.node for o in m.output if o}
    ren = {x: f"{prefix}/{x}" for x in local}
    for init in branch.initializer:
        arr = _initializer(init)
        tensors[ren[init.name]] = Tensor(ren[init.name], tuple(arr.shape), arr.dtype, arr)
    nodes = []
    for i, m in enumerate(branch.node):
        name = f"{prefix}/{m.name or m.op_type + '_' + str(i)}"
        for a in m.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) and not _is_if(m):
                raise CompileError("control flow (subgraph attributes) is not supported",
                                   node=name, op=m.op_type)
        check_node_schema(m, name, opset)
        attrs = {a.name: helper.get_attribute_value(a) for a in m.attribute}
        if _is_if(m):
            attrs = {k: _renamed_graph(v, ren) for k, v in attrs.items()}
        node = Node(name, m.op_type, [ren.get(x, x) for x in m.input] + _refs(m, ren),
                    [ren.get(x, x) for x in m.output], attrs, m.domain)
        if m.op_type == "Constant" and m.domain in ("", "ai.onnx"):
            tensors[node.outputs[0]] = _constant_tensor(node)
            continue
        for o in node.outputs:
            if o:
                tensors.setdefault(o, Tensor(o))
        nodes.append(node)
    for src, dst in zip(branch.output, outputs):
        if dst:
            nodes.append(Node(f"{prefix}/{dst}", "Identity", [ren.get(src.name, src.name)], [dst]))
    return nodes


def _renamed_graph(g: onnx.GraphProto, ren: dict) -> onnx.GraphProto:
    """A nested branch whose references to names the enclosing branch defines follow ``ren``."""
    g = onnx.GraphProto.FromString(g.SerializeToString())
    for m in g.node:
        m.input[:] = [ren.get(x, x) for x in m.input]
        for a in m.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                a.g.CopyFrom(_renamed_graph(a.g, ren))
    for o in g.output:
        o.name = ren.get(o.name, o.name)
    return g


# Element types whose raw_data is the values as numpy holds them on a little-endian machine
# (not packed below a byte): numpy_helper.to_array's frombuffer case, done here on the one read.
_PLAIN_RAW = frozenset(getattr(onnx.TensorProto, t) for t in (
    "FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16", "INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32",
    "INT64", "UINT64", "BOOL")) if sys.byteorder == "little" else frozenset()
_PACKED_4BIT = {getattr(onnx.TensorProto, t) for t in ("INT4", "UINT4", "FLOAT4E2M1")
                if hasattr(onnx.TensorProto, t)}


def declared_dims(vi, sized: bool) -> dict:
    """What the I/O table says of a graph input's or output's declared dimensions (protocol 1.7):
    ``symbolic``, per dimension the name of a symbolic one (``?`` if unnamed) and ``""`` for a
    fixed one; ``defaulted``, the symbolic dimensions this compile set to 1 because ``sized`` is
    false (no ``input_shapes`` entry): a caller must be told, not left to think the model takes
    any size.  Empty for a tensor whose every dimension is fixed (or whose shape is undeclared)."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return {}
    symbolic = ["" if d.HasField("dim_value") else (d.dim_param or "?")[:128] for d in tt.shape.dim]
    if not any(symbolic):
        return {}
    defaulted = [] if sized else [i for i, name in enumerate(symbolic) if name]
    return {"symbolic": symbolic, **({"defaulted": defaulted} if defaulted else {})}


def fix_input_shapes(graph: onnx.GraphProto, input_shapes: dict | None) -> None:
    """Give each graph input (not an initializer) a fixed shape, in place: ``input_shapes[name]``
    (refused as ``_override`` refuses it) or its declared one with symbolic dimensions 1 -- what
    every compile does first, whichever target (the cpu target and the partitioner share it)."""
    given = input_shapes or {}
    initialisers = {t.name for t in graph.initializer}
    for vi in graph.input:
        if vi.name in initialisers:
            continue
        dims = vi.type.tensor_type.shape.dim
        if vi.name in given:
            shape = _override(vi, tuple(int(d) for d in given[vi.name]))
        else:
            shape = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
        del dims[:]
        for n in shape:
            dims.add().dim_value = int(n)


def _override(vi, shape: tuple[int, ...]) -> tuple[int, ...]:
    """An ``input_shapes`` shape for graph input ``vi``: refused if it contradicts the rank or a
    fixed dimension the model declares (only symbolic dimensions are the caller's to choose)."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return shape
    declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    if len(declared) != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(declared, shape)):
        raise CompileError(f"options['input_shapes'] gives graph input {vi.name!r} the shape {list(shape)}, "
                           f"which contradicts its declared shape {declared} (only symbolic dimensions "
                           f"may be chosen)")
    return shape


def _default_opset(model: onnx.ModelProto) -> int | None:
    """The model's opset of the default ONNX domain, None if it imports none."""
    opset = None
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = imp.version
    return opset


def _initializer(init: onnx.TensorProto, view: memoryview | None = None) -> np.ndarray:
    """An initializer's value; CompileError naming it when its type is unknown or its data does
    not hold the number of values its dims declare.  ``view``: its raw data, outside the
    protobuf (a model container's data section): the array is a read-only view of it."""
    what = f"initializer {init.name!r}"
    if view is not None:
        return _view_array(init, view, what)
    dtype = _elem_type(init.data_type, what)
    want = 1
    for d in init.dims:
        want *= int(d)
    have = raw = None
    if dtype.kind == "O":
        pass            # strings: onnx's own decoding judges them (external data is resolved at import)
    elif init.HasField("raw_data"):
        raw = init.raw_data     # each read of the field copies it: read once
        per_byte = 2 if init.data_type in _PACKED_4BIT else 1
        have = len(raw) * per_byte / dtype.itemsize
        held = f"{len(raw)} bytes of {dtype}"
        if per_byte == 2 and have == want + 1:
            have = want     # an odd count of 4-bit values pads the last byte
    elif dtype.kind in "fiub":   # typed storage: one entry per value (float16 in int32_data too)
        have = len(getattr(init, helper.tensor_dtype_to_field(init.data_type)))
        held = f"{have} {dtype} values"
    if have is not None and have != want:
        raise CompileError(f"malformed model: {what} has dims {list(init.dims)} ({want} "
                           f"values) but its data is {held}")
    if raw is not None and init.data_type in _PLAIN_RAW:
        # What numpy_helper.to_array makes of it, without reading (copying) the field again.
        return np.frombuffer(raw, dtype=helper.tensor_dtype_to_np_dtype(init.data_type)).reshape(tuple(init.dims))
    try:
        return numpy_helper.to_array(init)
    except Exception as e:  # noqa: BLE001 -- onnx's own decoding errors, reported as the cause
        raise CompileError(f"malformed model: {what} cannot be decoded: {e}") from None


def _view_array(init: onnx.TensorProto, view: memoryview, what: str) -> np.ndarray:
    """``init``'s value from its raw bytes in ``view``, not copied where numpy can read them as
    they are (little-endian numbers); else decoded by onnx as if inline."""
    dtype = _elem_type(init.data_type, what)
    if dtype.kind not in "fiub" or init.data_type in _PACKED_4BIT:
        init.raw_data = bytes(view)
        return _initializer(init)
    dims = tuple(int(d) for d in init.dims)
    want = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(view) != want:
        raise CompileError(f"malformed model: {what} has dims {list(dims)} ({want} bytes of {dtype}) "
                           f"but its data is {len(view)} bytes")
    return np.frombuffer(view, dtype.newbyteorder("<")).reshape(dims)


def check_names(g: onnx.GraphProto) -> None:
    """Refuse names the rest of the compiler cannot key on: graph inputs, outputs and
    initializers with an empty name (an empty name means "omitted" in a node's input list),
    and any name, op type or domain that is not valid UTF-8 (protobuf hands those over as
    bytes, not str)."""
    _utf8(g.name, "the graph's name")
    for what, items in (("graph input", g.input), ("graph output", g.output),
                        ("initializer", g.initializer)):
        for i, item in enumerate(items):
            _utf8(item.name, f"{what} {i}'s name")
            if not item.name:
                raise CompileError(f"malformed model: {what} {i} has an empty name")
    for i, n in enumerate(g.node):
        _utf8(n.name, f"node {i}'s name")
        where = f"node {i} ({n.name!r})" if n.name else f"node {i}"
        _utf8(n.op_type, f"{where}'s op type")
        _utf8(n.domain, f"{where}'s domain")
        for kind, names in (("input", n.input), ("output", n.output)):
            for j, x in enumerate(names):
                _utf8(x, f"{where}'s {kind} {j}")
        for a in n.attribute:
            _utf8(a.name, f"an attribute name of {where}")


def _utf8(value, what: str) -> None:
    if not isinstance(value, str):
        raise CompileError(f"malformed model: {what} is not valid UTF-8 ({bytes(value)[:40]!r})")


# The codes ONNX defines, listed once: DataType.values() builds the list afresh at each call
# (~35 ms of a ResNet-50 import, two calls per tensor).
_ELEM_TYPES = frozenset(onnx.TensorProto.DataType.values())


def _elem_type(code: int, what: str) -> np.dtype:
    """The numpy dtype of an ONNX element type code; CompileError naming `what` for a code ONNX
    does not define (UNDEFINED included)."""
    if code == onnx.TensorProto.UNDEFINED or code not in _ELEM_TYPES:
        raise CompileError(f"{what} has unknown or unsupported element type {code}")
    return onnx_dtype_to_np(code)


# attributes whose value is an element type code: checked like a graph input's type
DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
               "RandomNormalLike": "dtype", "RandomUniformLike": "dtype"}
_ATTR_TYPE = onnx.AttributeProto.AttributeType


def _schema(op_type: str, domain: str, opset: int):
    """The ONNX schema of a default-domain op at `opset`, or None (unknown ops and other domains
    are legalisation's to refuse, with the support table's message)."""
    if domain not in ("", "ai.onnx") or not op_type:
        return None
    try:
        return defs.get_schema(op_type, opset, "")
    except defs.SchemaError:
        return None


def _attr_type_name(code: int) -> str:
    return _ATTR_TYPE.Name(code) if code in _ATTR_TYPE.values() else str(code)


def _count(lo: int, hi: int, what: str) -> str:
    """'exactly 2 inputs', '2 to 3 inputs' or 'at least 1 inputs' (variadic: hi is INT_MAX)."""
    if lo == hi:
        return f"exactly {lo} {what}"
    if hi >= 1 << 30:
        return f"at least {lo} {what}"
    return f"{lo} to {hi} {what}"


def check_node_schema(n: onnx.NodeProto, name: str, opset: int) -> None:
    """Refuse a node that its ONNX schema at `opset` rejects: wrong number of inputs or outputs,
    an empty name for a required input, a required attribute missing, an attribute the op
    does not define, or one of the wrong type.  Nodes without a schema pass unchecked."""
    schema = _schema(n.op_type, n.domain, opset)
    if schema is None:
        return

    def fail(reason: str) -> CompileError:
        return CompileError(reason, node=name, op=n.op_type)

    formal = [f"{p.name}" if p.option != defs.OpSchema.FormalParameterOption.Optional
              else f"[{p.name}]" for p in schema.inputs]
    if not schema.min_input <= len(n.input) <= schema.max_input:
        raise fail(f"has {len(n.input)} input(s); {n.op_type}-{schema.since_version} takes "
                   f"{_count(schema.min_input, schema.max_input, 'input(s)')} "
                   f"({', '.join(formal)})")
    if not schema.min_output <= len(n.output) <= schema.max_output:
        raise fail(f"has {len(n.output)} output(s); {n.op_type}-{schema.since_version} produces "
                   f"{_count(schema.min_output, schema.max_output, 'output(s)')}")
    for i, x in enumerate(n.input):
        p = schema.inputs[min(i, len(schema.inputs) - 1)]
        if not x and p.option != defs.OpSchema.FormalParameterOption.Optional:
            raise fail(f"input {i} ({p.name}) has an empty name, but {p.name} is required")
    if n.output and not n.output[0] and schema.outputs[0].option != defs.OpSchema.FormalParameterOption.Optional:
        raise fail("output 0 has an empty name")
    given = {}
    for a in n.attribute:
        spec = schema.attributes.get(a.name)
        if spec is None:
            raise fail(f"attribute {a.name!r} is not defined for {n.op_type}-"
                       f"{schema.since_version}")
        if a.type != int(spec.type):
            raise fail(f"attribute {a.name!r} has type {_attr_type_name(a.type)}; "
                       f"{n.op_type} expects {_attr_type_name(int(spec.type))}")
        given[a.name] = a
    for attr_name, spec in schema.attributes.items():
        if spec.required and attr_name not in given:
            raise fail(f"required attribute {attr_name!r} is missing")
    dtype_attr = DTYPE_ATTRS.get(n.op_type)
    if dtype_attr in given:
        code = given[dtype_attr].i
        try:
            onnx_dtype_to_np(code)
        except (KeyError, TypeError, ValueError):
            raise fail(f"attribute {dtype_attr}={code} is not an ONNX element type") from None


def _type_str(dtype) -> str | None:
    """'tensor(float)' for float32 etc., as ONNX schemas spell types; None if ONNX has no name."""
    try:
        code = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        return f"tensor({onnx.TensorProto.DataType.Name(code).lower()})"
    except (KeyError, TypeError, ValueError):
        return None


# The quantiser (passes/quantize.py) checks these ops' scale/zero-point types itself, with
# messages in its own terms ("zero point has type int8, expected uint8").
OWN_TYPE_CHECKS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                   "QLinearMatMul", "ConvInteger", "MatMulInteger"}


def check_types(graph: Graph) -> None:
    """Refuse a node whose inputs have types its ONNX schema does not allow (Reshape's shape must
    be int64, Add's operands must have one type...), once shape inference has typed the
    activations.  Inputs of unknown type and nodes without a schema are not judged."""
    for n in graph.nodes:
        schema = _schema(n.op, n.domain, graph.opset)
        if schema is None or not schema.inputs or n.op in OWN_TYPE_CHECKS or n.op == "If":
            continue
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        bound: dict = {}
        for i, x in enumerate(n.inputs):
            t = graph.tensors.get(x) if x else None
            actual = _type_str(t.dtype) if t is not None and t.dtype is not None else None
            if actual is None:
                continue
            p = schema.inputs[min(i, len(schema.inputs) - 1)]
            ok = allowed.get(p.type_str, {p.type_str})
            if actual not in ok:
                raise n.fail(f"input {i} ({p.name}) {x!r} has type {actual}; {n.op} allows "
                             f"{', '.join(sorted(ok))}")
            if p.type_str in allowed and (p.option != defs.OpSchema.FormalParameterOption.Variadic
                                          or p.is_homogeneous):
                first = bound.setdefault(p.type_str, (x, actual))
                if first[1] != actual:
                    raise n.fail(f"inputs {first[0]!r} ({first[1]}) and {x!r} ({actual}) must "
                                 f"have the same type ({p.type_str})")


def _constant_tensor(node: Node) -> Tensor:
    a = node.attrs
    name = node.outputs[0]
    if "value" in a:
        arr = numpy_helper.to_array(a["value"])
    elif "value_float" in a:
        arr = np.array(a["value_float"], np.float32)
    elif "value_floats" in a:
        arr = np.array(a["value_floats"], np.float32)
    elif "value_int" in a:
        arr = np.array(a["value_int"], np.int64)
    elif "value_ints" in a:
        arr = np.array(a["value_ints"], np.int64)
    else:
        raise node.fail("Constant without a supported value attribute")
    return Tensor(name, tuple(arr.shape), arr.dtype, arr)


def check_shape(shape, what: str) -> None:
    n = 1
    for d in shape:
        if not isinstance(d, (int, np.integer)) or d < 0:
            raise CompileError(f"{what} has an invalid shape {list(shape)}")
        n *= int(d)
    if n > MAX_ELEMENTS:
        raise CompileError(f"{what} has an absurd shape {list(shape)} ({n} elements, "
                           f"limit {MAX_ELEMENTS})")


def to_model(graph: Graph) -> onnx.ModelProto:
    """The IR as an ONNX model for shape inference: big constants become
    typed graph inputs (no data copied), small ones initializers."""
    inits, ins = [], []
    used = {i for n in graph.nodes for i in n.inputs if i}
    for name in used:
        t = graph.tensors[name]
        if t.const is None:
            continue
        if t.const.size <= SMALL_CONST:
            inits.append(numpy_helper.from_array(np.asarray(t.const, order="C"), name))
        else:
            ins.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(t.const.dtype), list(t.const.shape)))
    for name in graph.inputs:
        t = graph.tensors[name]
        ins.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(t.dtype), list(t.shape)))
    nodes = [helper.make_node(n.op, n.inputs[:1] if n.op == "If" else n.inputs, n.outputs, name=n.name,
                              domain=n.domain or None, **n.attrs) for n in graph.nodes]
    outs = [helper.make_empty_tensor_value_info(o) for o in graph.outputs]
    g = helper.make_graph(nodes, graph.name, ins, outs, initializer=inits)
    # other domains (com.microsoft...) need an import, or inference fails on their ops instead of
    # leaving them to legalisation, which names the node
    others = sorted({n.domain for n in graph.nodes if n.domain not in ("", "ai.onnx")})
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", graph.opset)] +
                          [helper.make_opsetid(d, 1) for d in others])
    m.ir_version = 8
    return m


_INFERENCE_ERROR = re.compile(r"\(op_type:[^,]*, node name: (.*?)\): \[\w+\] (.*)")


def inference_errors(graph: Graph) -> dict[str, str]:
    """What ONNX shape inference in strict mode says is wrong, per node name.  For reasons only:
    compiling infers in non-strict mode (one op it cannot infer must not stop the rest), so a
    node it could not infer is merely left without shapes.  Errors that only repeat an
    upstream failure ("expected to have type but instead is null") are left out."""
    try:
        shape_inference.infer_shapes(to_model(graph), strict_mode=True, data_prop=True)
    except Exception as e:  # noqa: BLE001 -- the message is the product here
        found = {}
        for line in str(e).splitlines():
            m = _INFERENCE_ERROR.search(line)
            if m and "instead is null" not in m.group(2):
                found.setdefault(m.group(1), m.group(2).strip())
        return found
    return {}


def infer(graph: Graph) -> None:
    """Fill in tensor shapes and dtypes with ONNX shape inference."""
    if not graph.nodes:
        return
    try:
        m = shape_inference.infer_shapes(to_model(graph), strict_mode=False, data_prop=True)
    except MemoryError:
        raise
    except Exception as e:
        if "Failed to serialize proto" in str(e):
            # to_model's proto is small (no weights): protobuf failed to allocate, under the
            # worker's memory limit; say so (ENOMEM) rather than blame the model
            raise MemoryError(str(e)) from None
        raise CompileError(f"shape inference failed: {str(e).splitlines()[0][:300]}") from None
    infos = list(m.graph.value_info) + list(m.graph.output)
    for vi in infos:
        t = graph.tensors.get(vi.name)
        if t is None or t.const is not None:
            continue
        tt = vi.type.tensor_type
        if tt.elem_type and t.dtype is None:
            t.dtype = _elem_type(tt.elem_type, f"tensor {vi.name!r}")
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            t.shape = tuple(int(d.dim_value) for d in tt.shape.dim)
    if resize.pin_output_sizes(graph):   # onnxruntime's Resize output sizes, not inference's
        infer(graph)
