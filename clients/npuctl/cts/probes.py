"""The models the CTS's system checks run: the first one the target under test claims is used.

A driver-neutral check cannot send a command stream (its format is the driver's own): it runs
models, compiled by the driver's target.  So the CTS carries models of the two kinds a target
can claim -- float (most NPUs and the cpu device) and int8 (an integer-only NPU) -- each deep
enough (many layers, so many preemption points) for the preemption and fault checks, and checks
every output against ``onnx.reference`` (no onnxruntime needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAYERS = 12
WIDTH = 64
BATCH = 8


@dataclass(frozen=True)
class Probe:
    name: str
    model: bytes
    dtype: str
    tolerance: float       # largest accepted |device - reference|, relative to the output's scale

    def feeds(self, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        if self.dtype == "int8":
            return rng.integers(-60, 60, (BATCH, WIDTH), dtype=np.int8)
        return rng.standard_normal((BATCH, WIDTH)).astype(np.float32)

    def mismatch(self, x: np.ndarray, got: np.ndarray) -> str | None:
        """Why ``got`` is not this model's output for ``x`` (None: it is), against onnx.reference.
        float32: within ``tolerance`` of the output's scale.  int8: a rounding difference in one
        layer (requantisation rounds in fixed point on an NPU, in float in the reference) grows
        through the next ones, so the mean difference must stay within ``tolerance`` steps."""
        from onnx.reference import ReferenceEvaluator

        import onnx

        want = ReferenceEvaluator(onnx.load_from_string(self.model)).run(None, {"x": x})[0]
        got = np.asarray(got)
        if got.dtype != want.dtype and want.dtype.kind in "iu" and np.array_equal(np.rint(got), got):
            got = got.astype(want.dtype)   # integers that crossed as float32 (exact), as npu-emu's do
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"output {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        if self.dtype == "int8":
            if diff.mean() > self.tolerance:
                return f"output differs from onnx.reference by {diff.mean():.2f} steps on average " \
                       f"(allowed {self.tolerance:g})"
            return None
        scale = max(float(np.max(np.abs(want.astype(np.float64)), initial=0.0)), 1.0)
        if diff.max(initial=0.0) > self.tolerance * scale:
            return f"output differs from onnx.reference by {diff.max():.3g} (allowed {self.tolerance * scale:.3g})"
        return None


def float_mlp(layers: int = LAYERS, sin_after: int | None = None) -> Probe:
    """``layers`` MatMul+Relu layers on float32; with ``sin_after``, a Sin after that layer (the
    cross-device check's node for the fallback device)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    nodes, inits, y = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((WIDTH, WIDTH)) * 0.2).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("MatMul", [y, f"w{i}"], [f"m{i}"], name=f"matmul{i}"),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}")]
        y = f"r{i}"
        if i == sin_after:
            nodes.append(helper.make_node("Sin", [y], ["sin"], name="sin"))
            y = "sin"
    name = "float32 MLP" if sin_after is None else "float32 MLP with a Sin"
    return Probe(name, _model(nodes, inits, TensorProto.FLOAT, y), "float32", 1e-4)


def int8_mlp(layers: int = LAYERS, sin_after: int | None = None) -> Probe:
    """``layers`` QLinearMatMul layers on int8 (an integer-only NPU's bread and butter); with
    ``sin_after``, a float Sin between a DequantizeLinear and a QuantizeLinear after that layer."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    nodes, inits, y = [], [], "x"
    scalars = {"s_act": np.float32(0.05), "s_w": np.float32(0.004), "zp": np.int8(0)}
    inits += [numpy_helper.from_array(np.array(v), k) for k, v in scalars.items()]
    for i in range(layers):
        w = rng.integers(-100, 100, (WIDTH, WIDTH), dtype=np.int8)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("QLinearMatMul", [y, "s_act", "zp", f"w{i}", "s_w", "zp", "s_act", "zp"],
                                      [f"q{i}"], name=f"qmatmul{i}"))
        y = f"q{i}"
        if i == sin_after:
            nodes += [helper.make_node("DequantizeLinear", [y, "s_act", "zp"], ["dq_sin"], name="dq_sin"),
                      helper.make_node("Sin", ["dq_sin"], ["sin"], name="sin"),
                      helper.make_node("QuantizeLinear", ["sin", "s_act", "zp"], ["q_sin"], name="q_sin")]
            y = "q_sin"
    name = "int8 MLP" if sin_after is None else "int8 MLP with a float Sin"
    # opset 21 with the Sin: onnx.reference implements DequantizeLinear from version 19 only.  The
    # Sin turns the layers' one-step rounding differences into larger ones: onnxruntime itself is
    # 2.8 steps from onnx.reference on average there (1.3 without it), hence the wider tolerance
    if sin_after is None:
        return Probe(name, _model(nodes, inits, TensorProto.INT8, y), "int8", 2.0)
    return Probe(name, _model(nodes, inits, TensorProto.INT8, y, 21), "int8", 4.0)


def with_sin(probe: Probe) -> Probe:
    """``probe`` with a Sin in its middle: a node few NPUs run, so its model crosses devices."""
    build = int8_mlp if probe.dtype == "int8" else float_mlp
    return build(sin_after=LAYERS // 2 - 1)


def small_float() -> Probe:
    """One Relu: the second device's half of the fence checks (any float device runs it)."""
    from onnx import TensorProto, helper

    return Probe("float32 Relu", _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [],
                                        TensorProto.FLOAT, "y"), "float32", 0.0)


def _model(nodes, inits, elem, output, opset: int = 13) -> bytes:
    from onnx import helper

    graph = helper.make_graph(nodes, "cts_probe", [helper.make_tensor_value_info("x", elem, [BATCH, WIDTH])],
                              [helper.make_tensor_value_info(output, elem, [BATCH, WIDTH])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()


def candidates() -> list[Probe]:
    return [float_mlp(), int8_mlp()]
