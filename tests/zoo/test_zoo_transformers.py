"""The transformer models of ``transformer_models.MODELS``, compiled for the edge NPU and run
on the emulator, match onnxruntime (fp32, rtol 1e-3): ``FAST`` ones always, all of them with
``NPUD_ZOO=1`` (``make zoo``)."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest

from npud.compiler_worker import compile_model, run_on_emulator
from npud.emulator.config import make_config

pytest.importorskip("torch")
pytest.importorskip("transformers")

import transformer_models  # noqa: E402 -- after the skips: it needs torch and transformers


def ort_run(model_bytes, feeds):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


@pytest.mark.parametrize("name", sorted(transformer_models.MODELS if os.environ.get("NPUD_ZOO")
                                         else transformer_models.FAST))
def test_transformer_matches_onnxruntime(name):
    mb, feeds = transformer_models.export(name)
    cfg = make_config("edge")
    exe = compile_model(mb, cfg, options={"input_shapes": transformer_models.input_shapes(feeds)})
    outs, stats = run_on_emulator(exe, feeds, cfg)
    ref = ort_run(mb, feeds)
    # int8 models: exact integer paths, float rounding differs only in the last place
    atol = 1e-3 if transformer_models.MODELS[name].quantize else 1e-4
    np.testing.assert_allclose(outs["last_hidden_state"], ref["last_hidden_state"], rtol=1e-3, atol=atol)
    assert stats.hazards == 0
    for k, v in feeds.items():
        assert next(e for e in exe.inputs if e["name"] == k)["dtype"] == v.dtype.name
