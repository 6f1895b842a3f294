"""A short load soak (bench/bench_soak.py, issue 9) and the checks its verdict rests on.

The soak itself: 16 clients in two processes for a few seconds, every
completion checked.  It asserts no lost, duplicated or wrong completion and no
error other than admission control's EAGAIN -- never a time or a memory
figure, which a shared machine makes noisy.  The unit tests below show the
checker can fail: a corrupted output, a reply delivered twice, a completion
reported twice, a reused job id and a lost job are each caught.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench import bench_soak, soak_workload
from bench.soak_ledger import ReplyLedger, Tally
from npud.ipc_schema import codec
from npud.ipc_schema.errors import ErrorCode, ErrorInfo


@pytest.mark.slow
def test_short_soak_loses_duplicates_and_corrupts_nothing():
    result = bench_soak.run_soak(clients=16, procs=2, seconds=8.0, wait_timeout=20.0, sample_every=2.0)
    tally = result.tally
    assert result.problems() == [], bench_soak.render(result)   # includes the daemon dying
    assert sum(tally.per_client_ops) > 0 and len(tally.per_client_ops) == 16   # every client worked
    for kind in soak_workload.MIX:                          # every op kind ran and was checked
        assert tally.ops_ok[kind] > 0, kind
    outcomes = sum(n for counts in (tally.correct, tally.wrong, tally.failed)
                   for kind, n in counts.items() if kind != "buffers")     # buffer checks are not jobs
    assert outcomes == sum(tally.jobs.values()) > 0
    assert tally.replies["completions"] == outcomes    # the ledger saw each job finish exactly once


# --- the checker ---------------------------------------------------------------------------

def _twice_stream(n: int, preset: str) -> bytes:
    """``dst += 2 * src``: what a job executed twice by the daemon would leave behind."""
    from npud.emulator.assembler import StreamBuilder, tile
    from npud.emulator.config import make_config

    sb = StreamBuilder(make_config(preset))
    sb.dma_load(0, soak_workload.VA_SRC, "float32", (n,))
    sb.dma_load(n * 4, soak_workload.VA_DST, "float32", (n,))
    sb.sync("dma", "vector")
    sb.add(tile(0, "float32", (n,)), tile(n * 4, "float32", (n,)), tile(2 * n * 4, "float32", (n,)))
    sb.add(tile(0, "float32", (n,)), tile(2 * n * 4, "float32", (n,)), tile(n * 4, "float32", (n,)))
    sb.sync("vector", "dma")
    sb.dma_store(n * 4, soak_workload.VA_DST, "float32", (n,))
    sb.end()
    return sb.build()


def test_a_session_against_a_real_daemon_flags_doubled_jobs_and_foreign_outputs(daemon, tmp_path):
    plan = soak_workload.SessionPlan(0, daemon.endpoint, str(tmp_path), "edge", map_io=True, wait_timeout=20.0)
    session = soak_workload.Session(plan, shared=[])
    try:
        session.op_job()
        session.op_run()
        assert session.tally.wrong == {} and session.tally.correct == {"job": 1, "run": 1}

        session.streams = {n: _twice_stream(n, "edge") for n in soak_workload.JOB_SIZES}
        session.op_job()
        _, session.weights = soak_workload.tiny_mlp(seed=12345, hidden=16)    # as if another model answered
        session.op_run()
        assert session.tally.wrong == {"job": 1, "run": 1}
    finally:
        session.finish()
    assert session.tally.replies["completions"] == 4 and session.tally.replies["duplicate_completions"] == 0


def test_a_corrupted_model_output_is_wrong():
    _, weights = soak_workload.tiny_mlp(seed=1, hidden=16)
    x = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    want = soak_workload.mlp_reference(weights, x)
    corrupted = want.copy()
    corrupted[1, 3] += 1e-2
    other_input = soak_workload.mlp_reference(weights, x + 0.5)   # another job's result
    assert soak_workload.outputs_match(want.copy(), want)
    assert not soak_workload.outputs_match(corrupted, want)
    assert not soak_workload.outputs_match(other_input, want)

    tally = Tally()
    tally.check("run", soak_workload.outputs_match(corrupted, want), "corrupted")
    assert tally.wrong["run"] == 1 and any("wrong" in p for p in tally.problems())


def _reply(seq: int, result: dict) -> bytes:
    return codec.encode_result(seq, result)


def test_a_reply_delivered_twice_is_a_duplicate():
    ledger = ReplyLedger()
    ledger.sent(7, "ping", {})
    ledger.received(_reply(7, {}))
    assert ledger.counts["duplicate_replies"] == 0
    ledger.received(_reply(7, {}))
    ledger.received(_reply(99, {}))             # never sent
    assert ledger.counts["duplicate_replies"] == 1
    assert ledger.counts["phantom_replies"] == 1


def test_a_completion_reported_twice_is_a_duplicate():
    ledger = ReplyLedger()
    ledger.sent(1, "submit", {"stream": b"", "bindings": []})
    ledger.received(_reply(1, {"job": 5}))
    ledger.sent(2, "wait", {"job": 5, "timeout_ms": 1000})
    ledger.received(_reply(2, {"state": "done", "stats": {}}))
    assert ledger.counts["duplicate_completions"] == 0
    ledger.sent(3, "wait_jobs", {"jobs": [5], "all": True, "timeout_ms": 1000})
    ledger.received(_reply(3, {"jobs": [{"job": 5, "state": "done", "stats": {}}], "ready": True}))
    assert ledger.counts["duplicate_completions"] == 1


def test_a_reused_job_id_and_a_misordered_wait_jobs_answer_are_caught():
    ledger = ReplyLedger()
    for seq in (1, 2):
        ledger.sent(seq, "run_model", {"model": 1, "inputs": [], "outputs": []})
        ledger.received(_reply(seq, {"job": 3}))
    assert ledger.counts["reused_job_ids"] == 1
    ledger.sent(3, "wait_jobs", {"jobs": [3, 4], "all": True, "timeout_ms": 1000})
    ledger.received(_reply(3, {"jobs": [{"job": 4, "state": "done", "stats": {}},
                                        {"job": 3, "state": "done", "stats": {}}], "ready": True}))
    assert ledger.counts["mismatched_statuses"] == 1


def test_a_timed_out_wait_is_not_a_completion_and_errors_are_not_counted_twice():
    ledger = ReplyLedger()
    ledger.sent(1, "wait", {"job": 5, "timeout_ms": 10})
    ledger.received(codec.encode_error(1, ErrorInfo.of(ErrorCode.ETIMEDOUT, "still running")))
    ledger.sent(2, "wait", {"job": 5, "timeout_ms": 10})
    ledger.received(_reply(2, {"state": "done", "stats": {}}))
    assert ledger.counts["completions"] == 1 and ledger.counts["duplicate_completions"] == 0


def test_lost_jobs_and_unexpected_codes_fail_the_verdict_but_retried_eagain_does_not():
    tally = Tally()
    tally.errors["EAGAIN"] += 3
    assert tally.problems() == []
    tally.lost["job"] += 1
    tally.errors["EIO"] += 1
    problems = tally.problems()
    assert any("lost" in p for p in problems) and any("EIO" in p for p in problems)


def test_merged_tallies_add_up():
    a, b = Tally(), Tally()
    a.correct["run"] += 2
    b.correct["run"] += 3
    b.wrong["job"] += 1
    a.took("run", 0.1)
    b.took("run", 0.2)
    b.replies["duplicate_replies"] += 1
    a.merge(b)
    assert a.correct["run"] == 5 and a.wrong["job"] == 1 and a.latency["run"] == [0.1, 0.2]
    assert any("duplicate replies" in p for p in a.problems())
