"""Transformers as exporters write them: small random-initialised configurations of
Hugging Face architectures, exported by ``torch.onnx.export`` (TorchScript exporter) at the
opsets people use, with the feeds a user would pass (token ids, a padded attention mask).

``MODELS`` lists them by name; :func:`export` builds one (model bytes, feeds).  Nothing is
downloaded: configurations are written here and weights are random (seeded).  The zoo
(``make zoo``) and ``tests/zoo/test_zoo_transformers.py`` pick the list up from here: the
test runs ``FAST`` by default and every model with ``NPUD_ZOO=1`` in the environment.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

SEQ = 8
VOCAB = 100


@dataclass(frozen=True)
class Spec:
    family: str               # the transformers class family
    opset: int
    inputs: tuple = ("input_ids", "attention_mask")
    config: dict = field(default_factory=dict)
    note: str = ""
    quantize: str = ""        # "dynamic": onnxruntime.quantization.quantize_dynamic (int8 weights)
    batch: int = 1            # > 1: exported with symbolic batch and sequence axes (dynamic_axes),
                              # compiled with options["input_shapes"] from the feeds


MODELS: dict[str, Spec] = {
    "bert-opset14": Spec("bert", 14, note="LayerNorm decomposed (ReduceMean/Pow/Sqrt), Erf GELU"),
    "bert-opset17": Spec("bert", 17, note="LayerNormalization op"),
    "distilbert-opset14": Spec("distilbert", 14),
    "distilbert-opset20": Spec("distilbert", 20, note="opset-20 Gelu op"),
    "gpt2-opset14": Spec("gpt2", 14, note="Conv1D as Gemm, tanh GELU, causal Trilu mask"),
    "gpt2-masked-opset17": Spec("gpt2", 17, note="causal and padding masks together"),
    "bert-dynamic-int8": Spec("bert", 14, quantize="dynamic",
                              note="quantize_dynamic: DynamicQuantizeLinear, MatMulInteger with run-time "
                                   "zero points, a uint8 embedding table"),
    "bert-dynamic-axes-opset17": Spec("bert", 17, batch=2,
                                      note="symbolic batch/sequence: shape subgraphs fold at load"),
    "vit-dynamic-axes-opset18": Spec("vit", 18, inputs=("pixel_values",), batch=2),
    "vit-opset14": Spec("vit", 14, inputs=("pixel_values",), note="patch Conv, class token Concat"),
    "vit-opset18": Spec("vit", 18, inputs=("pixel_values",)),
    "whisper-encoder-opset17": Spec("whisper", 17, inputs=("input_features",),
                                    note="its two Conv1d run as 2-D convolutions with H = 1"),
}

# `make test` runs these (one per exporter form that matters: decomposed LayerNorm, the Gelu
# op, causal + padding masks, symbolic axes, quantize_dynamic); the zoo runs all of MODELS.
FAST = ("bert-opset14", "distilbert-opset20", "gpt2-masked-opset17", "vit-dynamic-axes-opset18",
        "bert-dynamic-int8")
assert set(FAST) <= set(MODELS)

# Exported and runnable with the same export(), but blocked by work outside the integer/
# transformer front end: move them into MODELS once it lands.
PENDING: dict[str, Spec] = {}


def _module(family: str):
    import transformers as tf
    if family == "bert":
        return tf.BertModel(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=64,
                                          max_position_embeddings=64))
    if family == "distilbert":
        return tf.DistilBertModel(tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4,
                                                      hidden_dim=64, max_position_embeddings=64))
    if family == "gpt2":
        return tf.GPT2Model(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))
    if family == "whisper":
        return tf.WhisperModel(tf.WhisperConfig(
            d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1,
            decoder_attention_heads=4, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16,
            vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1)).get_encoder()
    if family == "vit":
        return tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64), add_pooling_layer=False)
    raise KeyError(family)


def feeds(spec: Spec, seed: int = 0) -> dict:
    """What a user passes: token ids, and a mask with the last positions padded (two in the
    first sequence, one more in each next one), every batch row different."""
    rng = np.random.default_rng(seed)
    b = spec.batch
    out = {}
    for name in spec.inputs:
        if name == "input_ids":
            out[name] = rng.integers(0, VOCAB, (b, SEQ)).astype(np.int64)
        elif name == "attention_mask":
            out[name] = np.array([[1] * (SEQ - 2 - i) + [0] * (2 + i) for i in range(b)], np.int64)
        elif name == "input_features":       # 16 mel bins x 32 frames (two strided Conv1d -> 16)
            out[name] = rng.standard_normal((b, 16, 32)).astype(np.float32)
        else:
            out[name] = rng.standard_normal((b, 3, 32, 32)).astype(np.float32)
    return out


def input_shapes(feeds: dict) -> dict:
    """``options["input_shapes"]`` for feeds: the sizes of a dynamic export's symbolic axes."""
    return {k: list(v.shape) for k, v in feeds.items()}


def export(name: str, seed: int = 0) -> tuple[bytes, dict]:
    """Model ``name`` of :data:`MODELS` exported to ONNX bytes, with its feeds."""
    import torch

    spec = MODELS.get(name) or PENDING[name]
    torch.manual_seed(seed)
    model = _module(spec.family).eval()

    class Wrapped(torch.nn.Module):
        """Positional inputs in, the last hidden state out (as ``torch.onnx`` wants it)."""

        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, *args):
            return self.m(**dict(zip(spec.inputs, args))).last_hidden_state

    f = feeds(spec, seed)
    args = tuple(torch.from_numpy(f[k]) for k in spec.inputs)
    buf = io.BytesIO()
    import warnings
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        dynamic = {k: {0: "batch"} if k == "pixel_values" else {0: "batch", 1: "sequence"}
                   for k in spec.inputs} if spec.batch > 1 else None
        torch.onnx.export(Wrapped().eval(), args, buf, dynamo=False, opset_version=spec.opset,
                          input_names=list(spec.inputs), output_names=["last_hidden_state"],
                          dynamic_axes=dynamic)
    mb = buf.getvalue()
    return (quantize_dynamic(mb) if spec.quantize == "dynamic" else mb), f


def quantize_dynamic(model_bytes: bytes) -> bytes:
    """onnxruntime's dynamic quantisation (int8 weights), as users run it (it works on files)."""
    import logging
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as qd

    logging.getLogger().setLevel(logging.ERROR)    # its advice to pre-process first
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "model.onnx", Path(d) / "model.int8.onnx"
        src.write_bytes(model_bytes)
        qd(str(src), str(dst), weight_type=QuantType.QInt8)
        return dst.read_bytes()
