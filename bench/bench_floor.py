"""The per-run floor: a one-op model (Relu over 16 floats) through the daemon vs onnxruntime.

Run: ``python -m bench floor``.

For a model this small the device's work is nothing; what a run costs is the path itself.
Figures, each measured in this run:

* **wall time per call**, medians of interleaved rounds: ``Model.run``, ``Execution.run``
  (buffers bound and the request encoded once), ``Client.ping`` (one round trip, for scale),
  onnxruntime's ``run`` in this process (one thread);
* **client CPU per call** (``time.process_time`` of this process, which neighbours' load does
  not inflate the way it inflates wall time): the same calls;
* **the client library's own work per run**, without the transport: checking the feeds,
  encoding the ``run_model`` request, decoding and schema-checking its reply and ``wait``'s;
* **one round trip vs two** (protocol 1.8): ``Model.run`` and ``Execution.run`` as ``run_model``
  with ``wait_ms`` vs as ``run_model`` then ``wait`` (what a client of a 1.7 daemon sends), on
  the same session, interleaved;
* **dynamic shapes**: ``Model.run`` on a kept specialisation (a symbolic batch fed batch 2)
  vs on the signature loaded first (batch 1): what the dispatch by shape adds per run.

``python -m bench floor --zoo NAME...`` measures the zoo models whose names contain a NAME
(tests/zoo/zoo_models.py) the same way: one round trip vs two, and vs onnxruntime.

Nothing here asserts a time.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import numpy as np
from onnx import TensorProto, helper

import npu
from npu import protocol
from npud.ipc_schema import codec

from .common import Ratio, compare, ort_session, report, time_per_call


def relu_model(batch: int | str) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 16])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def cpu_per_call(fn, n: int, rounds: int = 5) -> float:
    """Median client CPU seconds per call."""
    out = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(n):
            fn()
        out.append((time.process_time() - start) / n)
    return statistics.median(out)


@contextlib.contextmanager
def two_requests(client: npu.Client):
    """Runs as ``run_model`` then ``wait``, as a client does with a daemon before protocol 1.8."""
    spoken, client._core.protocol = client._core.protocol, (1, 7)
    try:
        yield
    finally:
        client._core.protocol = spoken


def old_path(client: npu.Client, fn):
    """``fn`` run the two-request way."""
    def run():
        with two_requests(client):
            fn()
    return run


def replies(client: npu.Client, model: npu.Model, feed: np.ndarray) -> list[bytes]:
    """The frames of one ``Model.run``'s replies (run_model's, then wait's if the daemon is older
    than 1.8), as they arrived."""
    frames: list[bytes] = []
    feed_frame = client._core.feed
    client._core.feed = lambda frame: (frames.append(bytes(frame)), feed_frame(frame))[1]
    try:
        model.run(feed)
    finally:
        client._core.feed = feed_frame
    return frames


def library_work(client: npu.Client, model: npu.Model, feed: np.ndarray, n: int) -> float:
    """CPU seconds per run of the client library's own steps, without the transport."""
    frames = replies(client, model, feed)
    args = {"model": model.id, "inputs": [1], "outputs": [2]}

    def one_run():
        model._normalise(feed)
        protocol.encode("run_model", 7, args, protocol.MAX_MESSAGE_BYTES)
        for op, frame in zip(("run_model", "wait"), frames):
            codec.OPS[op].result.check(codec.decode_reply(frame, None).result, op, strict=False)
    return cpu_per_call(one_run, n)


def run(n: int = 1000, rounds: int = 7) -> list[Ratio]:
    feed = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)
    ort = ort_session(relu_model(1))

    def ort_run():
        ort.run(None, {"x": feed})
    ratios = []
    with npu.local() as client:
        model = client.load(relu_model(1))
        execution = model.execution()

        def model_run():
            model.run(feed)

        def execution_run():
            execution.run({"x": feed})
        for name, fn in (("Model.run", model_run), ("Execution.run", execution_run),
                         ("Client.ping", client.ping)):
            wall, base = compare(fn, ort_run, n=n, rounds=rounds)
            ratios.append(Ratio(f"{name} vs onnxruntime run (wall)", wall, base, "us", 1e6, "none: the floor"))
        ort_cpu = cpu_per_call(ort_run, n)
        for name, fn in (("Model.run", model_run), ("Execution.run", execution_run),
                         ("Client.ping", client.ping)):
            ratios.append(Ratio(f"{name} vs onnxruntime run (client CPU)", cpu_per_call(fn, n), ort_cpu,
                                "us", 1e6, "none: the floor"))
        for name, fn in (("Model.run", model_run), ("Execution.run", execution_run)):
            wall, base = compare(fn, old_path(client, fn), n=n, rounds=rounds)
            ratios.append(Ratio(f"{name}: one round trip vs run_model + wait (wall)", wall, base, "us", 1e6,
                                "< 1x: a round trip less"))
            ratios.append(Ratio(f"{name}: one round trip vs run_model + wait (client CPU)", cpu_per_call(fn, n),
                                cpu_per_call(old_path(client, fn), n), "us", 1e6, "< 1x"))
        ping_cpu = cpu_per_call(client.ping, n)
        ratios.append(Ratio("library work per run vs 2 pings (client CPU)", library_work(client, model, feed, n * 10),
                            2 * ping_cpu, "us", 1e6, "small"))

        dynamic = client.load(relu_model("N"))
        first, second = feed, np.concatenate([feed, feed])
        dynamic.run(second)   # loads the batch-2 specialisation once

        wall_kept, wall_first = compare(lambda: dynamic.run(second), lambda: dynamic.run(first), n=n, rounds=rounds)
        ratios.append(Ratio("Model.run on a kept specialisation vs the first", wall_kept, wall_first, "us", 1e6,
                            "~1x"))
    return ratios


def zoo(names: list[str], n: int = 100, rounds: int = 7) -> list[Ratio]:
    """For the zoo models (tests/zoo/zoo_models.py) whose names contain one of ``names``: their
    steady-state ``Model.run`` in one round trip vs as ``run_model`` + ``wait`` (wall: interleaved
    medians; and client CPU), on one daemon with an edge device as ``make zoo``, and vs onnxruntime."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "zoo"))
    import zoo_models

    ratios = []
    with zoo_models._daemon_client("edge") as client:
        for name in [m for m in zoo_models.ZOO if any(a in m for a in names)]:
            model = zoo_models.ZOO[name][0]()
            feeds = zoo_models.feeds_for(model)
            ort = ort_session(model)
            loaded = client.load(model)
            try:
                def one():
                    loaded.run(feeds)
                one()
                new, old = compare(one, old_path(client, one), n=n, rounds=rounds)
                new_cpu, old_cpu = cpu_per_call(one, n, rounds), cpu_per_call(old_path(client, one), n, rounds)
                ort_s = statistics.median(time_per_call(lambda: ort.run(None, feeds), n) for _ in range(rounds))
            finally:
                loaded.unload()
            ratios.append(Ratio(f"{name}: Model.run one round trip vs run_model + wait", new, old, "ms", 1e3,
                                "< 1x"))
            ratios.append(Ratio(f"{name}: the same, client CPU", new_cpu, old_cpu, "ms", 1e3, "< 1x"))
            ratios.append(Ratio(f"{name}: Model.run one round trip vs onnxruntime", new, ort_s, "ms", 1e3,
                                "<= 1.5x"))
    return ratios


def main(argv: list[str] | None = None) -> None:
    """``python -m bench floor``; ``python -m bench floor --zoo NAME...``: the zoo models named."""
    if argv and argv[0] == "--zoo":
        report("Model.run of small zoo models: one round trip vs two", zoo(argv[1:]))
        return
    report("The per-run floor of a one-op model", run())


if __name__ == "__main__":
    main()
