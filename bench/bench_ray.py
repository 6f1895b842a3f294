"""npu.ray: a simulated two-node Ray cluster against one node, and the Ray path against a plain client.

Two Ray nodes on this machine (``ray.cluster_utils.Cluster``), each with a private npud and one
``npu`` resource; ROWS images of examples/ray_batch.py's tiny CNN (3x32x32, model batch 8) through
``map_batches`` in Ray batches of RAY_BATCH rows.  Each figure is one run (a Ray dataset costs
seconds; interleaved rounds would take minutes), after a warm-up run that fills both compile caches:

* two nodes (two actors, one per node) vs one node (one actor): throughput ratio.  On one machine
  the two "nodes" share its cores with Ray's own processes: the ratio says what Ray's spreading
  costs and gains here, not what two machines would do.
* the Ray path on one node (one actor) vs a plain npud client in this process (one Execution,
  batches of the model's batch), and npu.ray's runner in this process (its splitting, padding and
  copies without Ray) vs the plain client: the overhead of Ray Data and of npu.ray.
* each with a dataset's fixed cost (a SMALL-row dataset's time: actors started, sessions opened,
  models loaded) taken out: the steady state of a long job.

Nothing asserts a time.  Run: python -m bench ray [--rows N]
"""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np

from .common import Ratio, report, time_per_call

ROWS = 4096
RAY_BATCH = 256
SMALL = 256           # a dataset this small costs what any dataset costs to start
MODEL_BATCH = 8


def _plain_client(endpoint: str, x: np.ndarray) -> None:
    """The baseline: one session, one Execution, the rows ``MODEL_BATCH`` at a time, outputs copied."""
    import npu
    from examples.ray_batch import tiny_cnn_batched

    with npu.connect(endpoint) as c:
        execution = c.load(tiny_cnn_batched(MODEL_BATCH)).execution()
        out = np.empty((len(x), 10), np.float32)
        for start in range(0, len(x), MODEL_BATCH):
            out[start:start + MODEL_BATCH] = execution.run({"x": x[start:start + MODEL_BATCH]})["probs"]


def _runner(endpoint: str, x: np.ndarray) -> None:
    from examples.ray_batch import tiny_cnn_batched
    from npu.ray import NpuRunner

    runner = NpuRunner(tiny_cnn_batched(MODEL_BATCH), endpoint=endpoint)
    try:
        for start in range(0, len(x), RAY_BATCH):
            runner.run({"x": x[start:start + RAY_BATCH]})
    finally:
        runner.close()


def run(rows: int = ROWS, small: int = SMALL) -> list[Ratio]:
    from examples.ray_batch import classify, dataset, images, simulated_cluster

    x = images(np.arange(rows))
    with simulated_cluster(2) as daemons:
        big_ds, small_ds = dataset(rows).materialize(), dataset(small).materialize()   # made untimed

        def fleet(ds, actors: int) -> float:
            return time_per_call(lambda: classify(ds, actors=actors, model_batch=MODEL_BATCH,
                                                  batch_size=RAY_BATCH).materialize(), 1)
        fleet(small_ds, 2)                     # warm-up: both compile caches, Ray's workers
        two, one = fleet(big_ds, 2), fleet(big_ds, 1)
        two_fixed, one_fixed = fleet(small_ds, 2), fleet(small_ds, 1)
        plain = time_per_call(lambda: _plain_client(daemons[0].endpoint, x), 1)
        runner = time_per_call(lambda: _runner(daemons[0].endpoint, x), 1)
    # A dataset's fixed cost (actors started, model loaded: the small dataset's time) taken out,
    # what is left is the cost of the other rows: the steady state a long job sees.
    steady = (rows - small) / rows
    return [
        Ratio(f"{rows} images: two nodes vs one, end to end", two, one, "s", 1, "> 1x (2x on 2 machines)",
              higher_is_better=True),
        Ratio(f"{rows - small} images: two nodes vs one, steady state", two - two_fixed, one - one_fixed, "s", 1,
              "> 1x (2x on 2 machines)", higher_is_better=True),
        Ratio(f"{rows} images: Ray path (1 node) vs plain client", one, plain, "s", 1, "<= 1.5x"),
        Ratio(f"{rows - small} images: Ray path (1 node) vs plain, steady", one - one_fixed, plain * steady,
              "s", 1, "<= 1.2x"),
        Ratio(f"{rows} images: npu.ray runner vs plain client", runner, plain, "s", 1, "<= 1.1x"),
        Ratio(f"a dataset's fixed cost ({small} images), 1 node vs plain", one_fixed, plain * small / rows,
              "s", 1, "(startup: actor, session, load)"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench ray", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=ROWS)
    args = parser.parse_args(argv or [])
    if importlib.util.find_spec("ray") is None:
        print("## npu.ray\n(not run: pip install 'npud[ray]')\n")
        return 0
    report("npu.ray: two simulated nodes, and the Ray path's overhead (one run each)", run(args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
