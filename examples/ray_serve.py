"""Online serving on a Ray cluster's NPUs: a Ray Serve deployment with dynamic batching.

Requests of one image each are gathered by ``@serve.batch`` into the model's batch; a request's
``priority`` picks the npud context its batch runs in, its ``deadline`` (seconds) is passed to npud.
On a real cluster (docs/FLEET.md)::

    python -m examples.ray_serve --address auto --replicas 4

Without ``--address`` it simulates ``--nodes`` nodes here, each with a private npud.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np

from examples.ray_batch import images, simulated_cluster, tiny_cnn_batched


def deploy(replicas: int, model_batch: int = 8):
    """The classifier as a Serve application of ``replicas`` replicas (one NPU each); its handle."""
    from ray import serve

    from npu.ray import serve_deployment

    return serve.run(serve_deployment(tiny_cnn_batched(model_batch), num_replicas=replicas), name="npu",
                     route_prefix=None)


def classify(handle, x: np.ndarray, priorities: list[str], deadline: float | None = None) -> list:
    """One request per image, all in flight at once; each one's probabilities, or its error."""
    calls = [handle.remote(row, priority=p, deadline=deadline) for row, p in zip(x, priorities)]
    answers = []
    for call in calls:
        try:
            answers.append(call.result()["probs"])
        except Exception as exc:   # e.g. npu.MissedDeadline, as Ray raises it from the replica
            answers.append(exc)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", help="a running cluster ('auto'); default: simulate one here")
    parser.add_argument("--nodes", type=int, default=2, help="simulated nodes (default 2)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=256)
    args = parser.parse_args()
    from ray import serve

    with contextlib.ExitStack() as stack:
        if args.address:
            import ray
            ray.init(address=args.address)
        else:
            stack.enter_context(simulated_cluster(args.nodes))
        stack.callback(serve.shutdown)
        handle = deploy(args.replicas)
        x = images(np.arange(args.requests))
        priorities = ["high" if i % 4 == 0 else "normal" for i in range(args.requests)]
        started = time.perf_counter()
        answers = classify(handle, x, priorities, deadline=5.0)
        took = time.perf_counter() - started
    failed = [a for a in answers if isinstance(a, Exception)]
    print(f"{len(answers)} requests on {args.replicas} replica(s): {took:.2f} s "
          f"({len(answers) / took:.0f} requests/s), {len(failed)} failed")


if __name__ == "__main__":
    main()
