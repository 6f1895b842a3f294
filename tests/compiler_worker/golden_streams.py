"""Golden digests of the compiler's output, for behaviour-preserving refactors of the lowering
(issue 14, "Keep the compiler readable").

``python tests/compiler_worker/golden_streams.py --write`` compiles a fixed set of models (the
compiler test models, the fast zoo, int8 QDQ/QOperator, LSTM, Resize, Conv3d and the NPU
partitions of heterogeneous models) for both presets and records, per executable, a SHA-256 of
its stream, weights, I/O table, memory plan and report in ``golden_streams.json``;
test_compiler_golden.py recompiles them and compares.  Regenerate only deliberately: a changed
digest means the compiler's output changed.  The digests hold for this environment's torch and
onnxruntime (some models are exported/quantised by them at run time)."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
from onnx import TensorProto, helper

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden_streams.json")
PRESETS = ("edge", "server")
for _p in (os.path.join(HERE, "..", ".."), os.path.join(HERE, "..", "zoo"), os.path.join(HERE, "..", "npud"), HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def _resize() -> bytes:
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic",
                            coordinate_transformation_mode="half_pixel")
    g = helper.make_graph([node], "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 1.7, 0.6])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def _misc() -> bytes:
    """The kernels the other models miss: gather (run-time indices), select (Where), integer
    I/O conversions (a bool output), instance normalisation."""
    rng = np.random.default_rng(0)
    f32 = TensorProto.FLOAT
    nodes = [helper.make_node("Gather", ["table", "idx"], ["g"], axis=0),
             helper.make_node("Greater", ["g", "zero"], ["pos"]),
             helper.make_node("Neg", ["g"], ["neg"]),
             helper.make_node("Where", ["pos", "g", "neg"], ["y"]),
             helper.make_node("InstanceNormalization", ["x", "gamma", "beta"], ["z"]),
             helper.make_node("Add", ["idx", "one"], ["idx1"])]
    inits = [helper.make_tensor("table", f32, [10, 8], rng.standard_normal(80).tolist()),
             helper.make_tensor("zero", f32, [], [0.0]),
             helper.make_tensor("one", TensorProto.INT64, [], [1]),
             helper.make_tensor("gamma", f32, [3], [1.0, 2.0, 0.5]),
             helper.make_tensor("beta", f32, [3], [0.0, 0.1, -0.1])]
    g = helper.make_graph(nodes, "misc", [helper.make_tensor_value_info("idx", TensorProto.INT64, [3]),
                                          helper.make_tensor_value_info("x", f32, [1, 3, 6, 6])],
                          [helper.make_tensor_value_info(n, t, None)
                           for n, t in (("y", f32), ("z", f32), ("idx1", TensorProto.INT64),
                                     ("pos", TensorProto.BOOL))], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def _small_qdq() -> bytes:
    import compiler_testmodels as tm

    model = tm.small_cnn()
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((2, 3, 20, 20)).astype(np.float32)} for _ in range(4)]
    return tm.quantize_qdq(model, calib)


def _partitions(build):
    """The npu-emu partitions of a heterogeneous model, as the daemon would compile them."""
    def parts():
        from npud.compiler_worker import worker
        from npud.emulator.config import make_config

        reply = worker.handle({"op": "partition", "model": build(), "config": make_config("edge").to_dict(),
                               "options": {}, "target": "npu-emu", "fallback": "cpu"})
        assert reply["ok"], reply
        return [p["model"] for p in reply["partitions"] if p["target"] == "npu-emu"]
    return parts


def models() -> dict:
    """name -> a function returning a list of model bytes (one model, or a model's partitions)."""
    import compiler_testmodels as tm
    import hetero_models as hm
    import zoo_models as zoo

    one = {
        "resnet18-ish 64px": lambda: tm.resnet(blocks=(2, 2, 2, 2), size=64, classes=10),
        "small_cnn": tm.small_cnn, "mlp": tm.mlp, "transformer_block": tm.transformer_block,
        "small_cnn QDQ": _small_qdq,
        "resize cubic": _resize, "misc": _misc,
        "torch video Conv3d": zoo.torch_video,
        "torch LSTM": lambda: zoo.torch_recurrent("LSTM", seq=6),
        "torch MLP dynamic": lambda: zoo.quantize(zoo.torch_mlp(), "dynamic"),
    }
    for name in zoo.FAST:
        one["zoo " + name] = zoo.ZOO[name][0]
    out = {name: (lambda f=f: [f()]) for name, f in one.items()}
    out["hetero topk"] = _partitions(hm.topk_model)
    out["hetero loop"] = _partitions(hm.loop_model)
    return out


def digest(exe) -> dict:
    """SHA-256 (first 16 hex digits) of each part of an executable the compiler decides."""
    def h(b: bytes) -> str:
        return hashlib.sha256(b).hexdigest()[:16]

    def j(v) -> str:
        return h(json.dumps(v, sort_keys=True, default=str).encode())
    return {"stream": h(exe.stream), "weights": h(exe.weights), "io": j(exe.io), "memory": j(exe.memory),
            "report": j(exe.ops)}


def compute(names=None) -> dict:
    """{model/preset/part: digest} for the fixed model set (or the ``names`` in it)."""
    from npud.compiler_worker import compile_model
    from npud.emulator.config import make_config

    result = {}
    for name, build in models().items():
        if names is not None and name not in names:
            continue
        for i, model in enumerate(build()):
            for preset in PRESETS:
                exe = compile_model(model, make_config(preset))
                result[f"{name}/{preset}/{i}"] = digest(exe)
    return result


def load() -> dict:
    with open(GOLDEN) as f:
        return json.load(f)


def main(argv) -> int:
    got = compute()
    if "--write" in argv:
        with open(GOLDEN, "w") as f:
            json.dump(got, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"wrote {len(got)} digests to {GOLDEN}")
        return 0
    want = load()
    bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    for k in bad:
        print("DIFFERS", k, want.get(k), got.get(k))
    print(f"{len(got) - len(bad)}/{len(got)} identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
