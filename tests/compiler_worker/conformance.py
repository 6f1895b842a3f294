"""ONNX backend conformance: the one list of covered ops and the one exclusion table.

``test_compiler_onnx_backend.py`` runs ONNX's own backend test suite
(``onnx.backend.test.BackendTest``) against ``npu.onnx_backend`` with include
patterns built from :data:`OPS` and exclude patterns from :data:`EXCLUDE`;
``docs/CONFORMANCE.md`` is rendered from both by :func:`render_doc` (a test
keeps the file in sync; regenerate it with
``.venv/bin/python tests/compiler_worker/conformance.py``).

Selection rule: a node test is *selected* for op X when its graph's first
node other than Constant is an X (an ``*_expanded`` test: the op of the test
it expands) and every node of its graph is an op of :data:`OPS` (so the
``*_expanded`` variants, which spell an op as a subgraph of simpler ops,
count for X when all their ops are covered).  A selected test either runs
or matches an :data:`EXCLUDE` pattern, whose reason says why it is out of
scope.
"""

from __future__ import annotations

import os
import re
import sys
from collections import defaultdict

from npuctl.cts import nodes

# The coverage target: fp32, opsets 11-21.
OPS = [
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt",
    "Reciprocal", "Neg", "Abs", "Exp", "Log", "Relu", "LeakyRelu", "Clip", "Sigmoid",
    "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Softmax", "LogSoftmax", "MaxPool",
    "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LRN", "BatchNormalization",
    "LayerNormalization", "InstanceNormalization", "GroupNormalization", "ReduceMean", "ReduceSum", "ReduceMax",
    "ReduceMin", "Flatten", "Reshape", "Transpose", "Concat", "Split", "Slice", "Gather",
    "Squeeze", "Unsqueeze", "Expand", "Pad", "Resize", "Shape", "Constant", "ConstantOfShape",
    "Cast", "Identity", "Dropout", "Sum", "Where", "Equal", "Less", "Greater", "Min", "Max", "Size",
    # integer tensors and masks (int64/int32 are int32 on the device; lower_index.py)
    "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Not", "Mod", "CumSum", "IsNaN", "IsInf",
    "GatherElements", "Range", "If",
    # recurrent layers, unrolled over time (passes/recurrent.py)
    "LSTM", "GRU", "RNN",
    # quantised (int8/uint8 on the NPU's integer path)
    "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
    "ConvInteger", "DynamicQuantizeLinear",
]

# The light real models shipped inside the onnx package (onnx/backend/test/data/light):
# BackendTest names them test_<model>; each compares with its stored _output_0.pb.
REAL_MODELS = ["resnet50", "densenet121", "inception_v1", "inception_v2", "vgg19", "squeezenet",
               "shufflenet", "bvlc_alexnet", "zfnet512"]

# test name (without the _cpu suffix) regex -> reason it is out of scope.
EXCLUDE: dict[str, str] = {
    # dtypes: the device computes float32 (bool as a float32 mask) and int32 (int64/int32
    # tensors); 8/16-bit integers outside quantised patterns, unsigned 32/64-bit, half and
    # double activations are out of scope for this target
    r"test_(add|sub|mul|div|max|min|equal|greater|less|greater_equal|less_equal)_"
    r"(u?int(8|16)|uint(32|64)|float16|float64)(_expanded)?":
        "8/16-bit, unsigned 32/64-bit, float16 or float64 operands (float32, int32 and int64 only; "
        "8-bit integers run only on the quantised path)",
    r"test_mod_(mixed_sign_(float64|float16|int16|int8)|float(64|16)_mixed_sign_fmod_0|"
    r"float_edge_cases_fmod_0_float(16|64)|uint(8|16|32|64))":
        "8/16-bit or unsigned integer, float16 or float64 operands (float32, int32 and int64 only)",
    r"test_is(nan|inf)_float16": "float16 operands (float32 only)",
    r"test_cumsum_(1d|1d_exclusive|1d_reverse|1d_reverse_exclusive|2d_axis_0|2d_axis_1|2d_negative_axis)":
        "float64 operands (float32, int32 and int64 only)",
    r"test_equal_string(_broadcast)?": "string tensors",
    r"test_clip_default_int8_.*": "int8 Clip outside a quantised pattern (integer element-wise ops are not compiled)",
    r"test_pow_types_.*": "integer base or exponent (the compiler is float32-only)",
    r"test_cast_.*": "every Cast test converts to or from a type the device does not have (float16, "
                     "double, bfloat16, float8, int4/2, string); Cast compiles between float32, bool, "
                     "int32 and int64",
    r"test_identity_(sequence|opt)": "sequence and optional types (tensors only)",
    # quantised types the NPU does not have
    r"test_(de)?quantizelinear_(e4m3fn|e5m2|float4e2m1|uint4|int4|uint2|int2|uint16|int16)(_.*)?":
        "quantised type other than int8/uint8 (float8, float4, 4-/2-bit, 16-bit): the MAC and "
        "requant datapaths are 8-bit",
    r"test_(de)?quantizelinear_blocked(_.*)?":
        "blocked quantisation (block_size): requant scales are per-tensor or per-channel",
    r"test_qlinearmatmul_(2|3)D_(u?int8)_float16":
        "float16 scales (the compiler's float type is float32)",
    # training-time semantics
    r"test_training_dropout.*": "Dropout in training mode (random masks; inference only)",
    r"test_batchnorm_.*_training_mode": "BatchNormalization in training mode (inference only)",
    # geometry the engines do not have
    r"test_(averagepool|maxpool)_1d_.*": "1-D pooling (the pool engine is 2-D, NHWC)",
    r"test_(averagepool|maxpool)_3d_dilations.*": "3-D pooling with dilations (pooling dilations are not supported)",
    r"test_convtranspose_3d": "3-D ConvTranspose (1-D and 2-D only)",
    r"test_(averagepool|maxpool)_2d_dilations": "dilated pooling (the pool engine has no dilation)",
    r"test_averagepool_2d_ceil_last_window_starts_on_pad":
        "ceil_mode together with count_include_pad (the divisor of the ceil window is not modeled)",
    r"test_maxpool_with_argmax_.*": "MaxPool's Indices output",
    r"test_slice_neg_steps": "negative Slice steps (DMA strides are unsigned)",
    r"test_wrap_pad": "Pad mode wrap (constant, reflect and edge are supported)",
    r"test_resize_downsample_scales_(linear|cubic)_align_corners":
        "align_corners with a non-integer input x scale (2.4 here): npud follows onnxruntime and "
        "torch, dividing by the integer output length - 1; the ONNX reference divides by in x scale - 1",
    r"test_resize_.*antialias": "Resize with antialias",
    r"test_resize_tf_crop_and_resize.*": "Resize tf_crop_and_resize (roi, extrapolation)",
    r"test_if_(seq|opt)": "sequence and optional types (tensors only)",
    # zero-sized tensors
    r"test_reduce_(max|min|sum)_empty_set.*|test_reshape_allowzero_reordered|"
    r"test_slice_start_out_of_bounds|test_split_zero_size_splits_opset1[38]|"
    r"test_constantofshape_int_shape_zero|test_shape_start_greater_than_end":
        "zero-sized tensors (an input or output with a 0 dimension); the compiler refuses empty "
        "tensors",
}


def classify(node_cases) -> dict[str, dict[str, list[str]]]:
    """{op: {"selected": [names], "excluded": [names], "other_ops": [names]}} from
    (name, model) pairs of node tests; "other_ops" lists tests of the op that use
    ops outside OPS (not selected).  An ``*_expanded`` test counts for the op of
    the test it expands (the rule ``npuctl cts`` shares: npuctl/cts/nodes.py)."""
    covered = set(OPS)
    cases = dict(node_cases)
    op_of = nodes.op_of_tests(cases)
    out: dict[str, dict[str, list[str]]] = {op: defaultdict(list) for op in OPS}
    for name, model in sorted(node_cases):
        op = op_of.get(name)
        if op not in covered:
            continue
        slot = out[op]
        if not set(nodes.node_ops(model)) <= covered:
            slot["other_ops"].append(name)
        elif excluded(name):
            slot["excluded"].append(name)
        else:
            slot["selected"].append(name)
    return out


def excluded(name: str) -> str | None:
    for pat, why in EXCLUDE.items():
        if re.fullmatch(pat, name):
            return why
    return None


def node_cases():
    """(name, model) of every ONNX node test (no device suffix)."""
    return [(t.name, t.model) for t in nodes.node_tests()]


def render_table() -> str:
    lines = ["| Excluded tests (regex) | Reason |", "|---|---|"]
    for pat, why in EXCLUDE.items():
        lines.append(f"| `{pat}` | {why} |")
    return "\n".join(lines)


COMMAND = ".venv/bin/python -m pytest -q -p no:cacheprovider tests/compiler_worker/test_compiler_onnx_backend.py"


def render_doc(classes) -> str:
    import onnx
    rows = ["| Op | Run (all pass) | Excluded | Not selected (other ops) |", "|---|---:|---:|---:|"]
    tot = [0, 0, 0]
    for op in OPS:
        c = classes[op]
        n = [len(c["selected"]), len(c["excluded"]), len(c["other_ops"])]
        tot = [a + b for a, b in zip(tot, n)]
        rows.append(f"| {op} | {n[0]} | {n[1]} | {n[2]} |")
    rows.append(f"| **total** | **{tot[0]}** | **{tot[1]}** | **{tot[2]}** |")
    return f"""# ONNX backend conformance

`npu.onnx_backend` (clients/npu/onnx_backend.py) implements
`onnx.backend.base.Backend`; `{COMMAND.split()[-1]}` runs ONNX's own backend
test suite (`onnx.backend.test.BackendTest`, onnx {onnx.__version__}) against it
through one private daemon: every test model is compiled by the daemon's compiler
workers and run as a command stream on the emulated NPU, then compared with ONNX's
reference outputs exactly as `BackendTest` does (same shapes, same dtype,
`rtol`/`atol` of the test).

Reproduce (part of `make test`):

```sh
{COMMAND}
```

This file is generated from `tests/compiler_worker/conformance.py` (the op list and
the exclusion table) and kept in sync by a test; regenerate it with
`.venv/bin/python tests/compiler_worker/conformance.py`.

## Selection

A node test counts for op X when the first node of its graph other than
`Constant` is an X (an `*_expanded` test counts for the op of the test it expands). It is
*selected* when every node of its graph is an op of the list (so `*_expanded`
variants, which spell X as a subgraph, count when all of their ops are covered),
and then it either runs or matches an exclusion below. Tests of X that use other
ops (e.g. `CastLike` inside an expanded function body) are listed as "not
selected". Every test that runs passes: the suite fails otherwise.

## Node tests per op

{chr(10).join(rows)}

## Real models

The nine light models shipped in the onnx package (`onnx/backend/test/data/light`,
no network): {", ".join(f"`test_{m}`" for m in REAL_MODELS)}. Each runs with the
test's generated input and is compared with the stored `_output_0.pb`
(rtol 1e-3, atol 1e-7). All nine pass.

## Exclusions

{render_table()}

{zoo_section()}"""


def zoo_section() -> str:
    """The model zoo's table as `make zoo` last recorded it (tests/zoo/zoo_table.md)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "zoo", "zoo_table.md")
    with open(path) as f:
        table = f.read()
    return f"""## The zoo (issue 14)

Models made the way users make them, built at test time from code (`tests/zoo/zoo_models.py`,
nothing downloaded): torchvision architectures exported by `torch.onnx` (random weights, BatchNorm
statistics recalibrated on random batches), the same quantised by `onnxruntime.quantization` (QDQ
and QOperator static with a calibration reader, dynamic), `onnx.helper` equivalents of the onnx
package's classic architectures at their shipped opset 9 (upgraded inside the compiler worker),
1-D audio convolutions with reflect/edge padding, a 3-D video net and recurrent (LSTM/GRU)
taggers.  Each is compiled for the default device
(`edge`), run on the in-process emulator and compared with onnxruntime (one thread): fp32 within
1e-3 of the output's largest magnitude, int8 within 3 quantisation steps and the same argmax.
Times are the best of up to 3 runs (one for runs over a second; `Model.run` the best of 5 after a
warm-up) on this 2-core machine, which other jobs may share (the wall times are noisy):
"npud emulator" is a whole in-process emulator run (device set-up and the program's first-run
preparation included); "npud Model.run" is what a user sees -- the model loaded once into a
private daemon (one `edge` device) and run through the client library, IPC included;
"modelled device" is the cycle model's time on `edge` (800 MHz); "onnxruntime" one thread.  The
last line is the issue's measure: the geometric mean of Model.run / onnxruntime (goal <= 1.5x,
no model worse than 3x).  An error code in the Model.run column is the daemon's refusal.  VGG-19's
558 MB of weights are over `edge`'s 512 MiB buffer limit: they load as two buffers, on a device
whose memory is sized from the machine (docs/DEPLOY.md).  The unrolled LSTM/GRU are thousands of
small commands (about 6,100 for the LSTM), so the per-command cost dominates them.
Every op of a compiled model runs on the NPU (no CPU fallback exists), so its MACs are all on the
NPU.  `make test` runs the fast subset; reproduce the table with `make zoo`.

{table}"""


if __name__ == "__main__":
    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "CONFORMANCE.md")
    doc = render_doc(classify(node_cases()))
    with open(path, "w") as f:
        f.write(doc)
    print(f"wrote {os.path.normpath(path)}", file=sys.stderr)
