"""Dynamic shapes (issue 14): a symbolic dimension takes its size from a run's feeds; each new
shape signature compiles once (cached, bounded, reported), never a silent batch of 1.  The
model that matters is a real one: a small transformer encoder exported by torch.onnx with
``dynamic_axes`` on batch and sequence length, run through the daemon for several sizes and
matched against onnxruntime."""

from __future__ import annotations

import io
import uuid

import numpy as np
import onnx
import onnxruntime
import pytest
import trio
from onnx import TensorProto, helper

import npu
import npu.shapes
from npud.ipc_schema import codec
from npud.ipc_schema.types import FieldError

RTOL, ATOL = 1e-3, 1e-4
VOCAB = 50


def encoder_model() -> bytes:
    """A one-layer transformer encoder over tokens [N, T] -> logits [N, T, 5], exported with
    ``dynamic_axes`` (N and T symbolic); its reshapes take their sizes from Shape ops."""
    torch = pytest.importorskip("torch")

    class Encoder(torch.nn.Module):
        def __init__(self, d: int = 32, heads: int = 4):
            super().__init__()
            self.heads = heads
            self.emb = torch.nn.Embedding(VOCAB, d)
            self.qkv = torch.nn.Linear(d, 3 * d)
            self.proj = torch.nn.Linear(d, d)
            self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
            self.ff = torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.GELU(), torch.nn.Linear(64, d))
            self.head = torch.nn.Linear(d, 5)

        def forward(self, tokens):
            x = self.emb(tokens)
            n, t, d = x.shape
            q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1) @ v
            x = self.norm1(x + self.proj(a.transpose(1, 2).reshape(n, t, d)))
            return self.head(self.norm2(x + self.ff(x)))

    torch.manual_seed(0)
    f = io.BytesIO()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the TorchScript exporter's deprecation notice
        torch.onnx.export(Encoder().eval(), (torch.zeros(2, 7, dtype=torch.long),), f, input_names=["tokens"],
                          output_names=["logits"], dynamic_axes={"tokens": {0: "N", 1: "T"},
                                                                 "logits": {0: "N", 1: "T"}},
                          opset_version=17, dynamo=False)
    return f.getvalue()


@pytest.fixture(scope="module")
def encoder() -> bytes:
    """The encoder, made unique to this run: compiles are counted, and daemons share a cache."""
    proto = onnx.load_from_string(encoder_model())
    proto.doc_string = f"dyn14 {uuid.uuid4()}"
    return proto.SerializeToString()


def relu_model(dims: list) -> onnx.ModelProto:
    """y = relu(x), x and y declared with ``dims`` (strings are symbolic)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    return helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 17)])


def cache_entries(client: npu.Client) -> int:
    return len(client._request("cache_list", {})["entries"])


# --- what the daemon says: declared dims, and which it fixed to 1 ---------------------------

def test_the_load_reply_declares_symbolic_dims_and_says_which_it_set_to_1(client):
    data = relu_model(["N", 3, "T"]).SerializeToString()
    model = client.load(data)
    (x,), (y,) = model.inputs, model.outputs
    assert x.shape == (1, 3, 1) and x.dims == ("N", 3, "T") and x.defaulted == (0, 2)
    assert y.dims == ("N", 3, "T") and y.defaulted == ()
    sized = client.load(data, input_shapes={"x": [2, 3, 4]})
    assert sized.inputs[0].shape == (2, 3, 4) and sized.inputs[0].defaulted == ()
    fixed = client.load(relu_model([2, 3]).SerializeToString())
    assert fixed.inputs[0].dims == () and not fixed.inputs[0].symbolic    # nothing to declare


def test_the_wire_reply_carries_them_typed(client):
    reply = client._request("load", {"device": 0, "model": relu_model(["N", 3]).SerializeToString()})
    assert reply["inputs"][0]["symbolic"] == ["N", ""] and reply["inputs"][0]["defaulted"] == [0]


def test_npuctl_compile_says_which_dims_it_set_to_1(capsys, daemon, tmp_path):
    from npuctl.main import main as npuctl_main
    path = tmp_path / "relu.onnx"
    onnx.save(relu_model(["N", 3, "T"]), path)
    capsys.readouterr()
    assert npuctl_main(["--endpoint", daemon.endpoint, "compile", str(path)]) == 0
    out = capsys.readouterr().out
    assert "symbolic dimensions set to 1 (x ['N', 3, 'T'])" in out and "--input-shape" in out
    assert npuctl_main(["--endpoint", daemon.endpoint, "compile", str(path), "--input-shape", "x=2x3x4"]) == 0
    assert "symbolic dimensions set to 1" not in capsys.readouterr().out


def test_the_cpu_driver_declares_and_specialises_the_same_way(tmp_path):
    """The cpu target's I/O table carries the declared dims too, so Model.run specialises there."""
    from npu.local import LocalDaemon
    config = tmp_path / "npud.toml"
    config.write_text('[[devices]]\nname = "npu0"\n\n[[devices]]\nname = "cpu0"\ndriver = "cpu"\n')
    d = LocalDaemon("--config", str(config), "--cache-dir", str(tmp_path / "cache"))
    try:
        with npu.connect(d.endpoint) as c:
            model = c.load(relu_model(["N", 3, "T"]), device=1)
            assert model.inputs[0].dims == ("N", 3, "T") and model.inputs[0].defaulted == (0, 2)
            x = np.random.default_rng(6).standard_normal((4, 3, 6)).astype(np.float32)
            np.testing.assert_array_equal(model.run(x)["y"], np.maximum(x, 0))
            assert [s["shapes"]["x"] for s in model.signatures] == [[1, 3, 1], [4, 3, 6]]
    finally:
        d.stop()


@pytest.mark.parametrize("field, value, problem", [
    ("symbolic", "N", "expected array"),
    ("symbolic", [3], "expected str"),
    ("symbolic", ["x" * 129], "exceeds 128"),
    ("defaulted", [-1], "-1"),
    ("defaulted", ["0"], "expected int"),
    ("defaulted", list(range(40)), "40"),
])
def test_malformed_declared_dims_in_a_load_reply_are_refused(field, value, problem):
    tensor = {"name": "x", "dtype": "float32", "shape": [1, 3], "size": 12, field: value}
    result = {"model": 1, "inputs": [tensor], "outputs": [], "cached": False, "compile_ms": 1.0,
              "weights_bytes": 0, "arena_bytes": 0}
    with pytest.raises(FieldError, match=f"load.result.inputs\\[0\\].{field}.*{problem}"):
        codec.OPS["load"].result.check(result, "load.result", strict=False)


# --- Model.run specialises ---------------------------------------------------------------------

def test_a_symbolic_batch_takes_the_size_of_the_run(client):
    """Issue 14's example: ['N', 3, 32, 32] was fixed to batch 1 and batch 4 refused."""
    model = client.load(relu_model(["N", 3, 32, 32]))
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    y = model.run(x)["y"]
    assert y.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(y, np.maximum(x, 0))


def test_a_feed_that_contradicts_a_fixed_dim_names_the_input_dim_and_both_sizes(client):
    model = client.load(relu_model(["N", 3, "T"]))
    with pytest.raises(npu.InvalidArgument, match=r"input 'x' dimension 1 is fixed at 3 by the model; "
                                                  r"the feed has 4"):
        model.run(np.zeros((2, 4, 5), np.float32))
    with pytest.raises(npu.InvalidArgument, match=r"input 'x' has 2 dimensions"):
        model.run(np.zeros((2, 3), np.float32))
    with pytest.raises(npu.InvalidArgument, match=r"Unexpected input data type"):
        model.run(np.zeros((2, 3, 5), np.float64))
    assert len(model.signatures) == 1    # nothing was loaded for them


def test_the_encoder_matches_onnxruntime_and_compiles_once_per_signature(client, encoder):
    ort = onnxruntime.InferenceSession(encoder, providers=["CPUExecutionProvider"])
    before = cache_entries(client)
    model = client.load(encoder)
    rng = np.random.default_rng(1)
    sizes = [(1, 1), (2, 7), (4, 7), (2, 7), (3, 12), (1, 1), (4, 7), (1, 16)]
    for n, t in sizes:
        tokens = rng.integers(0, VOCAB, (n, t)).astype(np.int64)
        logits = model.run({"tokens": tokens})["logits"]
        assert logits.shape == (n, t, 5)
        np.testing.assert_allclose(logits, ort.run(None, {"tokens": tokens})[0], rtol=RTOL, atol=ATOL)
    distinct = list(dict.fromkeys(sizes))
    signatures = model.signatures
    assert [tuple(s["shapes"]["tokens"]) for s in signatures] == [(1, 1), (2, 7), (3, 12), (4, 7), (1, 16)]
    assert {tuple(s["shapes"]["tokens"]): s["hits"] for s in signatures} == \
        {size: sizes.count(size) for size in distinct}
    assert not any(s["cached"] for s in signatures) and all(s["compile_ms"] > 0 for s in signatures)
    assert cache_entries(client) - before == len(distinct)      # one compile per signature
    kept = [model.specialise(s["shapes"]) for s in signatures]   # no load: all are kept
    assert len({m.id for m in kept}) == len(distinct) and cache_entries(client) - before == len(distinct)
    model.unload()
    assert all(m._unloaded for m in kept)


def test_evicted_signatures_are_unloaded_and_reload_from_the_cache(client, encoder, monkeypatch):
    monkeypatch.setattr(npu.shapes, "SIGNATURES_KEPT", 2)
    model = client.load(encoder)
    loaded = {}
    for t in (2, 3, 4):
        loaded[t] = model.specialise({"tokens": (1, t)})
    assert loaded[2]._unloaded and not loaded[3]._unloaded and not loaded[4]._unloaded
    assert [s["shapes"]["tokens"] for s in model.signatures] == [[1, 1], [1, 3], [1, 4]]
    before = cache_entries(client)
    tokens = np.arange(2, dtype=np.int64).reshape(1, 2)
    model.run({"tokens": tokens})                       # loaded again: by digest, from the cache
    again = next(s for s in model.signatures if s["shapes"]["tokens"] == [1, 2])
    assert again["cached"] and cache_entries(client) == before
    assert loaded[3]._unloaded                           # the least recently run one went
    model.unload()
    assert all(m._unloaded for m in loaded.values())


def test_an_execution_binds_a_specialisation_and_closes_with_its_eviction(client, monkeypatch):
    monkeypatch.setattr(npu.shapes, "SIGNATURES_KEPT", 1)
    model = client.load(relu_model(["N", 4]))
    execution = model.execution(input_shapes={"x": [3, 4]})
    assert execution.inputs["x"].shape == (3, 4)
    x = np.arange(-6, 6, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(execution.run({"x": x})["y"], np.maximum(x, 0))
    model.run(np.zeros((5, 4), np.float32))             # a second specialisation evicts the first
    with pytest.raises(npu.NotFound, match="closed"):
        execution.run({"x": x})


def test_threads_sharing_a_model_get_the_shapes_they_fed(client):
    import threading
    model = client.load(relu_model(["N", 8]))
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((n, 8)).astype(np.float32) for n in (2, 3, 2, 5, 3, 2, 5, 1) * 3]
    got: dict[int, np.ndarray] = {}

    def run(i: int) -> None:
        got[i] = model.run(xs[i])["y"]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(got[i], np.maximum(x, 0))
    signatures = model.signatures
    assert sorted(s["shapes"]["x"][0] for s in signatures) == [1, 2, 3, 5]
    assert sum(s["hits"] for s in signatures) == len(xs)


def test_the_trio_client_specialises_the_same_way(daemon, encoder):
    ort = onnxruntime.InferenceSession(encoder, providers=["CPUExecutionProvider"])
    tokens = np.random.default_rng(2).integers(0, VOCAB, (3, 5)).astype(np.int64)

    async def main():
        async with npu.connect_async(daemon.endpoint) as client:
            model = await client.load(encoder)
            first = (await model.run({"tokens": tokens}))["logits"]
            again = (await model.run({"tokens": tokens}))["logits"]
            return first, again, model.signatures

    first, again, signatures = trio.run(main)
    np.testing.assert_allclose(first, ort.run(None, {"tokens": tokens})[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(first, again)
    assert [(s["shapes"]["tokens"], s["hits"]) for s in signatures] == [([1, 1], 0), ([3, 5], 2)]


def test_inference_session_shares_the_mechanism(client, encoder):
    ort = onnxruntime.InferenceSession(encoder, providers=["CPUExecutionProvider"])
    with npu.InferenceSession(encoder, client=client) as sess:
        assert sess.get_inputs()[0].shape == ["N", "T"]
        for n, t in ((2, 3), (2, 3), (5, 9)):
            tokens = np.random.default_rng(n * t).integers(0, VOCAB, (n, t)).astype(np.int64)
            np.testing.assert_allclose(sess.run(None, {"tokens": tokens})[0], ort.run(None, {"tokens": tokens})[0],
                                       rtol=RTOL, atol=ATOL)
        assert [(s["shapes"]["tokens"], s["hits"]) for s in sess.signatures()] == \
            [([1, 1], 0), ([2, 3], 2), ([5, 9], 1)]
