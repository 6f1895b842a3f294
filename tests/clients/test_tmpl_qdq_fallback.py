"""The driver template runs a QDQ model with its float parts on the cpu device (issue 16 item 6).

tmpl-int8 claims the QDQ pattern (dq_x, dq_w, matmul, q_m) and declines quantize_input, dequantize_output and softmax (float), which run on cpu.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

import npu
from npu.local import LocalDaemon
from test_npuctl_cts import qdq_model, template_env

CONFIG = """
[[devices]]
name = "u55"
driver = "tmpl-int8"

[[devices]]
name = "cpu0"
driver = "cpu"
"""


def test_the_template_runs_a_qdq_model_with_its_float_parts_on_cpu(tmp_path):
    model = qdq_model()
    x = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    want = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    (tmp_path / "npud.toml").write_text(CONFIG)
    daemon = LocalDaemon("--config", str(tmp_path / "npud.toml"), "--cache-dir", str(tmp_path / "cache"),
                         env=template_env(tmp_path))
    try:
        with npu.connect(daemon.endpoint) as c:
            problems = c.check(model, device=0)
            assert {p["op"] for p in problems} == {"QuantizeLinear", "DequantizeLinear", "Softmax"}, problems
            m = c.load(model, device=0, fallback="cpu")
            got = m.run({"x": x})["y"]
            report = str(m.report())
    finally:
        daemon.stop()
    # softmax of int8-quantised logits: within a few quantisation steps (scale 0.05) before softmax
    np.testing.assert_allclose(got, want, atol=0.02)
    assert "cpu" in report and "tmpl-int8" in report, report
