"""The compiler's side of ``tmpl-int8``: npu-emu's compiler behind an int8-only support table.

``support`` answers per node, in graph order (npud/targets: ``NodeSupport``).  The device
computes int8: it runs a node when npu-emu's compiler can, and

* every tensor the node computes is an 8-bit integer (int32 for the accumulating ops, whose
  results a requantisation takes back to 8 bits) -- QLinearConv, QLinearMatMul, ConvInteger,
  MatMulInteger, integer data movement; scales and zero points are constants, not data; or
* it is part of a QDQ pattern, the form quantisers (onnxruntime.quantization) write: an op whose
  float inputs all come from DequantizeLinear and whose outputs all go to QuantizeLinear, and
  the DequantizeLinear/QuantizeLinear nodes around it -- the compiler's front end recognises
  the pattern and runs it as int8.

Every other node (float arithmetic; the QuantizeLinear of a float model input; the final
DequantizeLinear to a float output) is declined with a reason: on a heterogeneous load
(``fallback = "cpu"``) those run on the cpu device.
"""

from __future__ import annotations

import functools
from pathlib import Path

from npud.targets import NodeSupport, source_fingerprint
from npud.targets.npu_emu import NpuEmuTarget

from . import __version__
from .params import TmplParams

INT8 = {"int8", "uint8"}
ACCUMULATORS = {"ConvInteger", "MatMulInteger"}      # int32 results, by definition of the op
READS_FLOAT = {"QuantizeLinear", "DynamicQuantizeLinear", "Cast", "CastLike"}
SCALES = {  # inputs that are quantisation parameters (constants folded into requantisation), by op
    "QLinearConv": {1, 2, 4, 5, 6, 7}, "QLinearMatMul": {1, 2, 4, 5, 6, 7},
    "ConvInteger": {2, 3}, "MatMulInteger": {2, 3}, "QuantizeLinear": {1, 2}, "DequantizeLinear": {1, 2},
}


class TmplTarget(NpuEmuTarget):
    name = "tmpl-int8"

    @functools.cache
    def fingerprint(self) -> str:
        here = Path(__file__).resolve().parent
        return source_fingerprint(f"tmpl-int8-{__version__}+{super().fingerprint()}",
                                  [(p.name, p) for p in sorted(here.glob("*.py"))])

    def support(self, model: bytes, params: dict) -> list[NodeSupport]:
        import onnx

        emu = TmplParams.from_dict(params).emulator_config().to_dict()
        proto = onnx.load_from_string(bytes(model))
        dtypes = _dtypes(proto)
        answers = super().support(model, emu)
        pattern = _qdq_pattern(proto.graph, dtypes, {i for i, a in enumerate(answers) if a.supported})
        out = []
        for i, (node, answer) in enumerate(zip(proto.graph.node, answers)):
            if answer.supported and i not in pattern:
                why = _float_reason(node, dtypes)
                if why:
                    answer = NodeSupport(answer.node, answer.op, False,
                                         f"tmpl-int8 computes int8 only: {why} outside a quantised (QDQ) pattern")
            out.append(answer)
        return out

    def compile(self, model: bytes, params: dict, options: dict) -> bytes:
        from npud.compiler_worker.errors import CompileError

        for s in self.support(model, params):
            if not s.supported:
                raise CompileError(s.reason, node=s.node, op=s.op)
        return super().compile(model, TmplParams.from_dict(params).emulator_config().to_dict(), options)


def _dtypes(proto) -> dict[str, str]:
    """Every tensor's element type by name (after ONNX shape inference; '' where unknown)."""
    import onnx
    from onnx import helper

    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:
        pass   # types stay unknown where inference fails: such nodes are declined
    g = proto.graph
    out = {t.name: helper.tensor_dtype_to_np_dtype(t.data_type).name for t in g.initializer}
    for v in [*g.input, *g.value_info, *g.output]:
        elem = v.type.tensor_type.elem_type if v.type.HasField("tensor_type") else 0
        if elem:
            try:
                out[v.name] = helper.tensor_dtype_to_np_dtype(elem).name
            except (KeyError, ValueError):
                out[v.name] = "other"
    for n in g.node:   # Constant nodes' outputs
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = helper.tensor_dtype_to_np_dtype(a.t.data_type).name
    return out


def _float_reason(node, dtypes: dict[str, str]) -> str:
    """Why ``node`` is not an int8 node ('' if it is)."""
    op = node.op_type
    if op in READS_FLOAT:
        return f"{op} reads a float tensor"
    scales = SCALES.get(op, set())
    tensors = [(t, "reads", i) for i, t in enumerate(node.input) if t and i not in scales]
    tensors += [(t, "writes", -1) for t in node.output if t]
    for t, verb, i in tensors:
        # int32: the accumulating ops' results, and QLinearConv's bias (input 8)
        wide = (op in ACCUMULATORS and verb == "writes") or (op == "QLinearConv" and i == 8)
        if dtypes.get(t, "") not in INT8 | ({"int32"} if wide else set()):
            return f"{op} {verb} {dtypes.get(t) or 'an untyped'} tensor {t!r}"
    return ""


def _qdq_pattern(graph, dtypes: dict[str, str], runs: set[int]) -> set[int]:
    """Indices of the nodes of QDQ patterns: DequantizeLinear -> op -> QuantizeLinear, where the
    compiler runs the op (index in ``runs``): around an op it declines, the DequantizeLinear and
    QuantizeLinear are float nodes like any other (a claim is a promise: the compile would refuse
    a DequantizeLinear whose float output leaves the partition)."""
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            consumers.setdefault(t, []).append(i)
    outputs = {o.name for o in graph.output}
    inits = {t.name for t in graph.initializer}
    inside: set[int] = set()
    for i, n in enumerate(nodes):
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        floats_in = [t for t in n.input if t and t not in inits and dtypes.get(t) not in INT8 | {"int32", "int64"}]
        fed = all(t in producer and nodes[producer[t]].op_type == "DequantizeLinear" for t in floats_in)
        drained = all(o not in outputs and consumers.get(o)
                      and all(nodes[c].op_type == "QuantizeLinear" for c in consumers[o]) for o in n.output if o)
        if floats_in and fed and drained and i in runs:
            inside.add(i)
            inside.update(producer[t] for t in floats_in)
            inside.update(c for o in n.output for c in consumers.get(o, []))
    return inside
