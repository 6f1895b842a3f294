"""An onnxruntime program ported to npud by changing one line, its import.

    python -m examples.ort_port            # against the running npud (the endpoint search)
    python -m examples.ort_port --local    # against a private npud started for the run

Everything below the import is onnxruntime's API: sessions, node args, metadata, providers,
IOBinding.  The second half uses npu's own API for what onnxruntime has no words for
(a model's per-layer report, a reusable execution).  The program is type-checked with
``mypy --strict`` by tests/clients/test_client_typing.py.
"""

from __future__ import annotations

import sys

import numpy as np

import npu as ort   # was: import onnxruntime as ort

import npu

from . import tiny_cnn


def classify(session: ort.InferenceSession, images: np.ndarray) -> list[int]:
    """The class each image is most likely to be: onnxruntime's calling form."""
    name = session.get_inputs()[0].name
    (probs,) = session.run(None, {name: images})
    return [int(i) for i in probs.argmax(axis=1)]


def with_iobinding(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    """The same through an IOBinding: the device buffers are bound once and reused."""
    binding = session.io_binding()
    binding.bind_cpu_input(session.get_inputs()[0].name, images)
    binding.bind_output(session.get_outputs()[0].name)
    session.run_with_iobinding(binding)
    out: np.ndarray = binding.copy_outputs_to_cpu()[0]
    return out


def native(client: npu.Client, images: np.ndarray) -> tuple[str, np.ndarray]:
    """npu's own API: a model's per-layer report, and an execution filled in place."""
    model: npu.Model = client.load(tiny_cnn.build(), name="tiny_cnn")
    report: npu.Report = model.report()
    with model.execution() as execution:
        execution.inputs["x"][...] = images
        outputs: npu.Outputs = execution.run()
        probs = outputs[0].copy()
    model.unload()
    return str(report), probs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    client = npu.local() if "--local" in argv else npu.connect()
    with client:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(tiny_cnn.build().SerializeToString(), sess_options=options,
                                       providers=["NpuExecutionProvider", "CPUExecutionProvider"],
                                       client=client)
        meta = session.get_modelmeta()
        print(f"npu {npu.__version__}; {meta.producer_name}'s {meta.graph_name} on {session.get_providers()}")
        for arg in (*session.get_inputs(), *session.get_outputs()):
            print(f"  {arg.name}: {arg.type} {arg.shape}")
        images = np.random.default_rng(0).standard_normal(tiny_cnn.INPUT_SHAPE).astype(np.float32)
        print("classes:", classify(session, images))
        bound = with_iobinding(session, images)
        report, probs = native(client, images)
        print(report)
        ok = np.allclose(bound, tiny_cnn.reference(images), rtol=1e-3, atol=1e-4) and np.allclose(
            probs, bound, rtol=1e-3, atol=1e-4)
        print("matches the numpy reference" if ok else "DOES NOT match the numpy reference")
        session.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
