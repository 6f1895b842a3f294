"""Partitioning: a model the NPU target cannot run whole, cut into submodels for two targets.

The NPU target's per-node support query (``Target.support``, which sees the graph through the
shared front end) decides placement: every node it supports stays on the NPU -- fallback never
takes one -- and every node it declines goes to the fallback target (``cpu``).  Nodes are grouped
into as few partitions as a topological order allows, as TFLite delegates, Mesa's Teflon and
onnxruntime's GetCapability do: repeatedly take every node whose producers are all placed and that
belongs to the current target, then switch targets.  Each partition is an ONNX submodel whose
inputs and outputs are its boundary tensors, their shapes fixed by shape inference on the whole
model (given ``input_shapes``; symbolic dimensions default to 1, as the compilers do).

Runs in a compiler worker (request op ``partition``, npud/compiler_worker/worker.py): the daemon
never parses a model.  It then compiles each partition through the normal compile path (and
compile cache) of its own target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import CompileError

CONSTANT_REASON = "computes only from constants: copied into the partition that reads it"
RANDOM_OPS = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
              "Bernoulli")
MAC_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "ConvInteger", "MatMulInteger", "QLinearConv",
           "QLinearMatMul")


@dataclass
class Partition:
    target: str
    nodes: list[int] = field(default_factory=list)     # indices into the model's node list


def node_name(node, index: int) -> str:
    """A node's name as targets report it (``op_index`` for an unnamed node)."""
    return node.name or f"{node.op_type}_{index}"


def fix_shapes(model_bytes: bytes, input_shapes: dict | None):
    """(the model with its input shapes fixed, the same shape-inferred, what the model declares of
    its inputs' and outputs' dimensions (``import_onnx.declared_dims``, by name)): symbolic
    dimensions take ``input_shapes`` or 1."""
    import onnx

    from .passes.import_onnx import declared_dims, fix_input_shapes

    try:
        proto = onnx.load_from_string(bytes(model_bytes))
    except MemoryError:
        raise                   # the worker's memory limit, not the model's fault (worker._error)
    except Exception as exc:
        raise CompileError(f"malformed model: {exc}") from None
    given = input_shapes or {}
    initialisers = {t.name for t in proto.graph.initializer}
    declared = {**{v.name: declared_dims(v, v.name in given) for v in proto.graph.input if v.name not in initialisers},
                **{v.name: declared_dims(v, True) for v in proto.graph.output}}
    fix_input_shapes(proto.graph, given)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except MemoryError:
        raise
    except Exception as exc:
        raise CompileError(f"shape inference failed: {exc}") from None
    return proto, inferred, declared


def _tensor_types(inferred) -> dict:
    """name -> (elem_type, dims or None when not static)."""
    out = {}
    g = inferred.graph
    for value in (*g.input, *g.value_info, *g.output):
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim] \
            if tensor.HasField("shape") else None
        out[value.name] = (tensor.elem_type, None if dims is None or min(dims, default=0) < 0 else dims)
    for t in g.initializer:
        out[t.name] = (t.data_type, list(t.dims))
    for node in g.node:
        if node.op_type == "Loop":
            _loop_carried(node, out)
    return out


def _loop_carried(node, types: dict) -> None:
    """Shapes ONNX's inference leaves out: a Loop's loop-carried outputs keep their initial value's
    static shape when the body declares that same shape for them."""
    body = next(a.g for a in node.attribute if a.name == "body")
    for k, (initial, output) in enumerate(zip(node.input[2:], node.output)):
        declared = body.output[k + 1].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in declared.shape.dim]
        elem, start = types.get(initial, (0, None))
        if types.get(output, (0, None))[1] is None and start is not None and declared.HasField("shape") \
                and dims == start:
            types[output] = (elem, start)


def _uses(node) -> set[str]:
    """Every tensor ``node`` reads, including outer-scope names its subgraphs (Loop, If, Scan) read."""
    import onnx

    names = {i for i in node.input if i}
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in graphs:
            inner = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for n in sub.node:
                inner |= set(n.output)
            for n in sub.node:
                names |= {u for u in _uses(n) if u not in inner}
    return names


def macs(node, types: dict) -> int:
    """Multiply-accumulates of a conv or matmul node from its inferred shapes (0 for other ops,
    or when a shape is not known): what the report's share of MACs on the NPU counts."""
    import numpy as np

    if node.op_type not in MAC_OPS or not node.output:
        return 0
    out = types.get(node.output[0], (0, None))[1]
    weight = types.get(node.input[3] if node.op_type == "QLinearConv" else
                       node.input[1] if len(node.input) > 1 else "", (0, None))[1]
    if out is None or weight is None:
        return 0
    if "Conv" in node.op_type:   # out elements x (in channels / group) x kernel
        return int(np.prod(out, dtype=np.int64) * np.prod(weight[1:], dtype=np.int64))
    inner = weight[0] if len(weight) >= 1 else 1
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        inner = weight[1]
    return int(np.prod(out, dtype=np.int64) * inner)


def _constant_nodes(nodes, initialisers: set[str]) -> set[int]:
    """Indices of the nodes that compute only from constants (Constant, and e.g. a weight's
    DequantizeLinear): their values are known at load, so they are not placed on their own."""
    known, out = set(initialisers), set()
    for i, node in enumerate(nodes):
        reads = _uses(node)
        if node.op_type == "Constant" or (reads and reads <= known and node.op_type not in RANDOM_OPS):
            out.add(i)
            known.update(o for o in node.output if o)
    return out


def group(nodes, placement: list[str], primary: str) -> list[Partition]:
    """Nodes (in topological order) grouped into as few single-target partitions as a
    topological order allows: each round takes every ready node of one target, preferring the
    primary target whenever it has a ready node."""
    producer = {}
    for i, node in enumerate(nodes):
        for o in node.output:
            if o:
                producer[o] = i
    preds = [{producer[u] for u in _uses(n) if u in producer} for n in nodes]
    succs: list[list[int]] = [[] for _ in nodes]
    for i, p in enumerate(preds):
        for j in p:
            succs[j].append(i)
    missing = [len(p) for p in preds]
    ready: dict[str, list[int]] = {t: [] for t in placement}
    for i, m in enumerate(missing):
        if m == 0:
            ready[placement[i]].append(i)
    partitions: list[Partition] = []
    while any(ready.values()):
        current = primary if ready.get(primary) else min(t for t, r in ready.items() if r)
        part = Partition(current)
        queue, ready[current] = ready[current], []
        while queue:   # every node of this target that becomes ready joins it (Kahn's order)
            i = queue.pop()
            part.nodes.append(i)
            for j in succs[i]:
                missing[j] -= 1
                if missing[j] == 0:
                    (queue if placement[j] == current else ready[placement[j]]).append(j)
        part.nodes.sort()
        partitions.append(part)
    return partitions


def partition(model_bytes: bytes, support: list, options: dict | None, primary: str, fallback: str) -> dict:
    """The partition plan of a model: ``{"nodes": [...], "partitions": [...], "tensors": {...}}``.

    ``support``: the primary target's ``NodeSupport`` list for the shape-fixed model (``fix_shapes``).
    ``nodes``: one placement row per node of the model: node, op, target, reason (why not on the
    primary target), macs.  ``partitions``: in run order, each ``{"target", "model" (ONNX bytes),
    "inputs", "outputs"}`` with its boundary tensors' names.  ``tensors``: the dtype and shape of
    every boundary tensor.  A boundary tensor whose shape is data-dependent is a CompileError
    naming it (the daemon sizes every buffer at load)."""
    import onnx

    proto, inferred, _declared = fix_shapes(model_bytes, (options or {}).get("input_shapes"))
    types = _tensor_types(inferred)
    graph = proto.graph
    refused = {s.node: s.reason for s in support if not s.supported}
    nodes = list(graph.node)
    initialisers = {t.name: t for t in graph.initializer}
    if not refused:   # the primary target runs it all: nothing to cut
        return {"nodes": [_row(n, i, primary, "", types) for i, n in enumerate(nodes)], "partitions": [],
                "tensors": {}, "inputs": [], "outputs": []}
    constants = _constant_nodes(nodes, set(initialisers))
    placement = [fallback if node_name(n, i) in refused else primary for i, n in enumerate(nodes)]
    # A constant node goes with its consumers: each partition that reads one carries its own copy
    # (a QDQ weight's DequantizeLinear must stay next to its Conv for the int8 path to see it).
    movable = [i for i in range(len(nodes)) if i not in constants]
    parts = group([nodes[i] for i in movable], [placement[i] for i in movable], primary)
    for part in parts:
        part.nodes = [movable[i] for i in part.nodes]
    const_of = {o: i for i in constants for o in nodes[i].output}
    produced_by = {}
    for p, part in enumerate(parts):
        for i in part.nodes:
            for o in nodes[i].output:
                produced_by[o] = p
    reads = [set().union(*(_uses(nodes[i]) for i in part.nodes)) for part in parts]
    needs = [_constants_read(r, const_of, nodes) for r in reads]
    for i in constants:   # placed with their first consumer, for the report
        placement[i] = next((parts[p].target for p, need in enumerate(needs) if i in need), primary)
        if placement[i] != primary:
            refused.setdefault(node_name(nodes[i], i), CONSTANT_REASON)
    graph_inputs = {v.name for v in graph.input if v.name not in initialisers}
    graph_outputs = {v.name for v in graph.output}
    out_parts, boundary = [], {}
    for p, part in enumerate(parts):
        inputs = [u for u in sorted(reads[p]) if produced_by.get(u, p) != p or u in graph_inputs]
        later = set().union(*reads[p + 1:])
        outputs = [o for i in part.nodes for o in nodes[i].output if o and (o in later or o in graph_outputs)]
        for name in inputs + outputs:
            boundary[name] = _static(name, types)
        used = reads[p].union(*(_uses(nodes[i]) for i in needs[p]))
        out_parts.append({"target": part.target, "inputs": inputs, "outputs": outputs,
                          "model": _submodel(proto, [nodes[i] for i in sorted(needs[p]) + part.nodes], p,
                                             inputs, outputs, boundary,
                                             [initialisers[u] for u in sorted(used) if u in initialisers])})
    rows = [_row(n, i, placement[i], refused.get(node_name(n, i), ""), types) for i, n in enumerate(nodes)]
    tensors = {name: {"dtype": onnx.helper.tensor_dtype_to_np_dtype(elem).name, "shape": dims}
               for name, (elem, dims) in boundary.items()}
    read = set().union(*reads)
    return {"nodes": rows, "partitions": out_parts, "tensors": tensors,
            "inputs": [v.name for v in graph.input if v.name in graph_inputs and v.name in read],
            "outputs": [v.name for v in graph.output]}


def _submodel(proto, nodes: list, index: int, inputs: list[str], outputs: list[str], boundary: dict,
              initialisers: list) -> bytes:
    """One partition as an ONNX model of its own: its nodes (constants first), the initialisers they
    read, and its boundary tensors as typed, static-shaped inputs and outputs."""
    from onnx import helper

    graph = helper.make_graph(nodes, f"{proto.graph.name or 'model'}.part{index}",
                              [helper.make_tensor_value_info(n, *boundary[n]) for n in inputs],
                              [helper.make_tensor_value_info(n, *boundary[n]) for n in outputs], initialisers)
    return helper.make_model(graph, opset_imports=list(proto.opset_import),
                             ir_version=proto.ir_version).SerializeToString()


def _constants_read(reads: set[str], const_of: dict, nodes) -> set[int]:
    """The constant nodes a partition needs: those whose outputs it reads, and theirs in turn."""
    need, todo = set(), [u for u in reads if u in const_of]
    while todo:
        i = const_of[todo.pop()]
        if i not in need:
            need.add(i)
            todo += [u for u in _uses(nodes[i]) if u in const_of]
    return need


def _static(name: str, types: dict) -> tuple:
    """(elem_type, dims) of a boundary tensor, or a CompileError if its shape is data-dependent."""
    elem, dims = types.get(name, (0, None))
    if dims is None or not elem:
        raise CompileError(f"tensor {name!r} crosses from one device to another but its shape is not known "
                           "before the run (data-dependent); npud sizes every buffer at load")
    return elem, dims


def _row(node, index: int, target: str, reason: str, types: dict) -> dict:
    """One node's placement, as the report shows it."""
    return {"node": node_name(node, index), "op": node.op_type, "target": target, "reason": reason,
            "macs": macs(node, types)}


def plan(request: dict) -> dict:
    """The worker's answer to a ``partition`` request: the primary target's support query on the
    shape-fixed model, then ``partition``."""
    from npud import targets

    options = request.get("options") or {}
    proto, _inferred, declared = fix_shapes(request["model"], options.get("input_shapes"))
    fixed = proto.SerializeToString()
    support = targets.target(request["target"]).support(fixed, request["config"])
    plan = partition(fixed, support, options, request["target"], request["fallback"])
    return {**plan, "declared": {name: declared[name] for name in plan["inputs"] + plan["outputs"] if declared[name]}}
