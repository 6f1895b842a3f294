"""npu.ray on a simulated two-node Ray cluster (ray.cluster_utils.Cluster): each node has its own
private npud (its own endpoint and compile cache, found by the node's $NPUD_ENDPOINT) and one
``npu`` resource.  A dataset of 512 images goes through ``map_batches`` on both nodes and matches a
one-node run exactly; a daemon killed and restarted mid-run still yields every row exactly once."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import npu

pytest.importorskip("ray")

from npu.ray import NpuRunner  # noqa: E402

from examples.ray_batch import classify, dataset, images, simulated_cluster, tiny_cnn_batched  # noqa: E402

pytestmark = pytest.mark.slow

ROWS = 512
MODEL_BATCH = 8
RAY_BATCH = 20          # not a multiple of the model's batch: every Ray batch is split and padded


@pytest.fixture(scope="module")
def fleet():
    """Two Ray nodes, each with one ``npu`` and its own npud; every Ray process stopped at the end."""
    with simulated_cluster(2) as daemons:
        yield daemons


@pytest.fixture(scope="module")
def one_node(fleet):
    """The reference: the same rows through one runner on one node's daemon, in order."""
    runner = NpuRunner(tiny_cnn_batched(MODEL_BATCH), endpoint=fleet[0].endpoint)
    try:
        return runner.run({"x": images(np.arange(ROWS))})[0]["probs"]
    finally:
        runner.close()


def run_fleet(ds=None, **predictor):
    """The dataset through both nodes' NPUs, in Ray batches the model's batch does not divide."""
    ds = dataset(ROWS) if ds is None else ds
    return classify(ds, actors=2, model_batch=MODEL_BATCH, batch_size=RAY_BATCH, **predictor).take_all()


def by_id(rows):
    ids = [r["id"] for r in rows]
    assert len(ids) == ROWS and sorted(ids) == list(range(ROWS)), "rows lost or duplicated"
    return {r["id"]: r for r in rows}


def test_a_dataset_runs_on_both_nodes_and_matches_one_node_exactly(fleet, one_node):
    before = [d.jobs_completed() for d in fleet]
    started = time.perf_counter()
    rows = by_id(run_fleet(stats_columns=True))
    print(f"{ROWS} images on two nodes: {time.perf_counter() - started:.1f} s")
    jobs = [d.jobs_completed() - b for d, b in zip(fleet, before)]
    assert all(j > 0 for j in jobs), f"jobs per daemon {jobs}: both nodes should have taken work"
    assert sum(jobs) >= ROWS // MODEL_BATCH
    assert len({r["npu_node"] for r in rows.values()}) == 2
    got = np.stack([rows[i]["probs"] for i in range(ROWS)])
    assert np.array_equal(got, one_node)


def test_a_daemon_killed_and_restarted_mid_run_loses_and_duplicates_nothing(fleet, one_node, tmp_path):
    victim = fleet[1]
    start = victim.jobs_completed()
    result: dict = {}
    gate = str(tmp_path / "killed")

    def held_back(batch, flag=gate):
        # The second half of the rows waits for the kill: however fast the first half runs, the
        # victim's actor still has batches to run after its daemon is gone.
        while batch["id"].max() >= ROWS // 2 and not os.path.exists(flag):
            time.sleep(0.01)
        return batch

    def run() -> None:
        try:
            result["rows"] = run_fleet(dataset(ROWS).map_batches(held_back, batch_size=None, batch_format="numpy"),
                                       stats_columns=True)
        except Exception as exc:   # reported below, with the assertion that matters
            result["error"] = exc
    worker = threading.Thread(target=run)
    worker.start()
    try:
        give_up = time.monotonic() + 60
        while victim.jobs_completed() < start + 4 and time.monotonic() < give_up:
            time.sleep(0.02)      # until the victim's actor is running batches
        victim.kill()
        open(gate, "w").close()
        time.sleep(0.5)           # the actor finds its daemon gone and keeps trying to reconnect
        victim.start()
    finally:
        open(gate, "w").close()
        worker.join(120)
    assert not worker.is_alive() and "rows" in result, f"the dataset did not complete: {result.get('error')}"
    rows = by_id(result["rows"])
    assert sum(int(r["npu_retries"] > 0) for r in rows.values()) > 0, "no batch met the restart"
    assert victim.jobs_completed() > 0, "the restarted daemon took no work"
    got = np.stack([rows[i]["probs"] for i in range(ROWS)])
    assert np.array_equal(got, one_node)


def test_serve_replicas_on_both_nodes_answer_by_priority_and_deadline(fleet, one_node):
    from ray import serve

    from examples.ray_serve import classify, deploy

    before = [d.jobs_completed() for d in fleet]
    try:
        handle = deploy(replicas=2, model_batch=MODEL_BATCH)
        x = images(np.arange(64))
        answers = classify(handle, x, ["high" if i % 3 == 0 else "normal" for i in range(64)], deadline=30)
        assert np.array_equal(np.stack(answers), one_node[:64])
        late = classify(handle, x[:2], ["low", "low"], deadline=1e-6)
        assert all(isinstance(a, npu.MissedDeadline) for a in late), late
    finally:
        serve.shutdown()
    jobs = [d.jobs_completed() - b for d, b in zip(fleet, before)]
    assert all(j > 0 for j in jobs), f"jobs per daemon {jobs}: both replicas should have served"
