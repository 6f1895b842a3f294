"""Pass 1: import.  ONNX bytes -> IR, with shape inference.

Refuses malformed bytes, unsupported opsets (default domain 11..25), graphs
with subgraph attributes, cycles, non-static or absurd shapes, each with a
CompileError that says what is wrong.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from ..errors import CompileError
from ..ir import Graph, Node, Tensor
from ..numpy_ops import onnx_dtype_to_np

MIN_OPSET, MAX_OPSET = 11, 28   # 22..28 changed supported ops only by adding types (see tests)
MAX_ELEMENTS = 1 << 30          # per tensor: an absurd shape is refused, not allocated
SMALL_CONST = 4096              # constants this small go to shape inference with data


def run(ctx) -> None:
    ctx.graph = import_model(ctx.model_bytes, ctx.options)
    infer(ctx.graph)


def import_model(model_bytes: bytes, options: dict) -> Graph:
    if not isinstance(model_bytes, (bytes, bytearray, memoryview)):
        raise CompileError(f"model must be bytes, not {type(model_bytes).__name__}")
    if len(model_bytes) == 0:
        raise CompileError("malformed model: empty input")
    try:
        model = onnx.load_from_string(bytes(model_bytes))
    except Exception as e:  # protobuf DecodeError and friends
        raise CompileError(f"malformed model: not an ONNX protobuf ({type(e).__name__}: {e})") from None
    g = model.graph
    if len(g.node) == 0 and len(g.output) == 0:
        raise CompileError("malformed model: the graph has no nodes and no outputs")
    opset = None
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = imp.version
    if opset is None:
        raise CompileError("malformed model: no opset import for the default ONNX domain")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise CompileError(f"unsupported opset {opset} (supported: {MIN_OPSET}..{MAX_OPSET})")

    tensors: dict[str, Tensor] = {}
    for init in g.initializer:
        try:
            arr = numpy_helper.to_array(init)
        except Exception as e:
            raise CompileError(f"malformed model: initializer {init.name!r}: {e}") from None
        tensors[init.name] = Tensor(init.name, tuple(arr.shape), arr.dtype, arr)
    overrides = dict((options or {}).get("input_shapes", {}) or {})
    inputs = []
    for vi in g.input:
        if vi.name in tensors:
            continue   # an initializer listed as input (IR < 4): a constant
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise CompileError(f"graph input {vi.name!r} is not a tensor")
        dtype = onnx_dtype_to_np(tt.elem_type) if tt.elem_type else None
        if vi.name in overrides:
            shape = tuple(int(d) for d in overrides[vi.name])
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
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise CompileError("control flow (subgraph attributes) is not supported",
                                   node=name, op=n.op_type)
            attrs[a.name] = helper.get_attribute_value(a)
        node = Node(name, n.op_type, list(n.input), list(n.output), attrs, n.domain)
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            tensors[n.output[0]] = _constant_tensor(node)
            continue
        nodes.append(node)
        for o in n.output:
            if o and o not in tensors:
                tensors[o] = Tensor(o)
        for x in n.input:
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
    graph.toposort()
    graph.prune()
    return graph


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
    nodes = [helper.make_node(n.op, n.inputs, n.outputs, name=n.name, domain=n.domain or None,
                              **n.attrs) for n in graph.nodes]
    outs = [helper.make_empty_tensor_value_info(o) for o in graph.outputs]
    g = helper.make_graph(nodes, graph.name, ins, outs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", graph.opset)])
    m.ir_version = 8
    return m


def infer(graph: Graph) -> None:
    """Fill in tensor shapes and dtypes with ONNX shape inference."""
    if not graph.nodes:
        return
    try:
        m = shape_inference.infer_shapes(to_model(graph), strict_mode=False, data_prop=True)
    except Exception as e:
        raise CompileError(f"shape inference failed: {str(e).splitlines()[0][:300]}") from None
    infos = list(m.graph.value_info) + list(m.graph.output)
    for vi in infos:
        t = graph.tensors.get(vi.name)
        if t is None or t.const is not None:
            continue
        tt = vi.type.tensor_type
        if tt.elem_type and t.dtype is None:
            t.dtype = onnx_dtype_to_np(tt.elem_type)
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            t.shape = tuple(int(d.dim_value) for d in tt.shape.dim)
