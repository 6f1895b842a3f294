"""Batch inference on a Ray cluster's NPUs: a dataset of images through ``map_batches``.

On a real cluster every node runs npud (the system service) and joined Ray with its NPUs as
resources (docs/FLEET.md)::

    ray start --address HEAD:6379 --resources "$(npuctl ray-resources)"
    python -m examples.ray_batch --address auto --rows 4096

Without ``--address`` the example simulates a cluster on this machine: ``--nodes`` Ray nodes,
each with a private npud and one ``npu`` resource (``ray.cluster_utils.Cluster``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import onnx

from examples import tiny_cnn


def tiny_cnn_batched(batch: int) -> onnx.ModelProto:
    """examples/tiny_cnn.py's classifier taking ``batch`` 3x32x32 images at once."""
    model = tiny_cnn.build()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    return model


def images(ids: np.ndarray) -> np.ndarray:
    """One 3x32x32 float32 image per id, the same for an id wherever it is made."""
    grid = np.arange(3 * 32 * 32, dtype=np.float64).reshape(1, 3, 32, 32)
    return np.sin(ids.reshape(-1, 1, 1, 1) * 0.37 + grid * 0.011).astype(np.float32)


class NodeDaemon:
    """A simulated node's npud at a fixed endpoint with its own compile cache, so that it can be
    killed and started again where the node's workers look for it (as systemd restarts npud)."""

    def __init__(self, root: str):
        self.endpoint, self.cache = f"ipc://{root}/npud.sock", f"{root}/cache"
        os.makedirs(root, exist_ok=True)
        self.start()

    def start(self) -> None:
        from npu.local import LocalDaemon

        self.proc = LocalDaemon("--endpoint", self.endpoint, "--cache-dir", self.cache)

    def kill(self) -> None:
        """SIGKILL: no goodbye to any session."""
        self.proc.process.kill()
        self.proc.process.wait()

    def jobs_completed(self) -> int:
        """Jobs the daemon's device 0 completed since it started."""
        import npu

        with npu.connect(self.endpoint, name="jobs-counter") as c:
            return c.devices()[0].info["jobs_completed"]

    def stop(self) -> None:
        self.proc.stop()


@contextlib.contextmanager
def simulated_cluster(nodes: int, cpus_per_node: int = 1) -> Iterator[list[NodeDaemon]]:
    """``nodes`` Ray nodes on this machine, each with one ``npu`` and its own private npud (reached
    through the node's $NPUD_ENDPOINT); yields the daemons.  Everything stops on exit."""
    import ray
    from ray.cluster_utils import Cluster

    root = tempfile.mkdtemp(prefix="npu-ray-")
    daemons: list[NodeDaemon] = []
    cluster = Cluster()
    try:
        for i in range(nodes):
            daemons.append(NodeDaemon(f"{root}/node{i}"))
            cluster.add_node(num_cpus=cpus_per_node, resources={"npu": 1}, include_dashboard=False,
                             env_vars={"NPUD_ENDPOINT": daemons[-1].endpoint})
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        # Every node's actor up (model loaded) before the first batch: else, on a loaded machine, the
        # first actor may take the whole dataset while the other still starts.
        context.wait_for_min_actors_s = 120
        yield daemons
    finally:
        ray.shutdown()
        cluster.shutdown()
        for d in daemons:
            d.stop()
        shutil.rmtree(root, ignore_errors=True)


def dataset(rows: int, blocks: int = 16):
    """Rows ``{"id", "x"}``: ids 0..rows-1 and their images."""
    import ray

    ids = np.arange(rows, dtype=np.int64)
    x = images(ids)
    return ray.data.from_items([{"id": int(i), "x": x[i]} for i in ids], override_num_blocks=blocks)


def classify(ds, *, actors: int, model_batch: int = 8, batch_size: int = 64, **predictor):
    """``ds`` with each row's class probabilities (``probs``), ``actors`` NPUs at once."""
    from ray.data import ActorPoolStrategy

    from npu.ray import NpuBatchPredictor

    model = tiny_cnn_batched(model_batch).SerializeToString()
    # compute=ActorPoolStrategy(size=N) is what Ray before 2.51 spelt concurrency=N
    return ds.map_batches(NpuBatchPredictor, fn_constructor_kwargs={"model": model, **predictor},
                          compute=ActorPoolStrategy(size=actors), num_cpus=0, resources={"npu": 1},
                          batch_size=batch_size, batch_format="numpy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", help="a running cluster ('auto'); default: simulate one here")
    parser.add_argument("--nodes", type=int, default=2, help="simulated nodes (default 2)")
    parser.add_argument("--rows", type=int, default=1024)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.address:
            import ray
            ray.init(address=args.address)
            actors = int(ray.cluster_resources().get("npu", 0))
        else:
            actors = len(stack.enter_context(simulated_cluster(args.nodes)))
        started = time.perf_counter()
        rows = classify(dataset(args.rows), actors=actors, stats_columns=True).take_all()
        took = time.perf_counter() - started
    nodes = {r["npu_node"] for r in rows}
    top = np.bincount([int(np.argmax(r["probs"])) for r in rows], minlength=tiny_cnn.CLASSES)
    print(f"{len(rows)} images on {len(nodes)} node(s), {actors} NPU(s): {took:.1f} s "
          f"({len(rows) / took:.0f} images/s); classes {top.tolist()}")


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
