"""A test-time ONNX model past protobuf's 2 GiB limit, with its weights as external data.

Four float32 MatMul weights of ``n x n`` (``n = 12032``: 2.16 GiB in all) in a chain, written one
at a time to ``model.data`` beside ``model.onnx`` (as ``onnx.save(..., save_as_external_data=True)``
lays them out), so making it never holds more than one weight.  Each weight is the outer product
of two random vectors: cheap to make, and the expected output (computed as the weights are
written) still depends on every row and column being where it belongs.
"""

from __future__ import annotations

import os

import numpy as np
from onnx import TensorProto, helper

N = 12032
LAYERS = 4


def write(directory, n: int = N, layers: int = LAYERS, seed: int = 0) -> tuple[str, dict, np.ndarray]:
    """(path of model.onnx, feeds, expected output) of the chain model written in ``directory``."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (1, n)).astype(np.float32)
    h = x.astype(np.float64)
    inits, nodes, offset = [], [], 0
    data_path = os.path.join(directory, "model.data")
    with open(data_path, "wb") as f:
        for i in range(layers):
            a = rng.uniform(-1, 1, n).astype(np.float32) / np.float32(np.sqrt(n))
            c = rng.uniform(0.5, 1.5, n).astype(np.float32)
            w = np.outer(a, c)
            f.write(memoryview(w).cast("B"))
            h = h @ w.astype(np.float64)
            del w
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[n, n])
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", "model.data"), ("offset", offset), ("length", n * n * 4)):
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)
            offset += n * n * 4
            inits.append(t)
            nodes.append(helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"],
                                          ["y" if i == layers - 1 else f"h{i + 1}"], name=f"mm{i}"))
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = os.path.join(directory, "model.onnx")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path, {"x": x}, h.astype(np.float32)
