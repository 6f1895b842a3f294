"""A compiler worker whose connection to the daemon drops exits, instead of waiting forever.

The daemon (npud/compilers.py) sees a worker's exit at once and fails the compile in flight; a
worker that silently reconnected would leave that compile waiting for its time limit (120 s).
"""

from __future__ import annotations

import subprocess
import sys

import msgpack
import pytest
import zmq

from npud.compiler_worker.worker import LOST_CONNECTION
from npud.emulator.config import make_config

MEMORY_LIMIT = 300 << 20


@pytest.fixture
def daemon_end(tmp_path):
    """The daemon's side of the compile endpoint: a ROUTER, and a worker connected to it."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/workers.sock"
    router.bind(endpoint)
    worker = subprocess.Popen([sys.executable, "-m", "npud.compiler_worker.worker", "--endpoint", endpoint,
                               "--name", "w0", "--memory-limit", str(MEMORY_LIMIT)],
                              stderr=subprocess.PIPE, text=True)
    try:
        assert router.poll(60_000), "the worker never announced itself"
        name, hello = router.recv_multipart()
        assert name == b"w0" and msgpack.unpackb(hello)["op"] == "ready"
        yield router, worker
    finally:
        worker.kill()
        worker.wait()
        router.close()
        ctx.term()


def test_a_request_too_large_for_the_memory_limit_ends_the_worker(daemon_end):
    router, worker = daemon_end
    # ZeroMQ's I/O thread cannot allocate this under RLIMIT_AS: it drops the connection.
    router.send_multipart([b"w0", bytes(MEMORY_LIMIT + (100 << 20))])
    assert worker.wait(timeout=60) == LOST_CONNECTION
    assert "connection to the daemon dropped" in worker.stderr.read()


def test_a_worker_whose_daemon_closes_the_endpoint_exits(daemon_end):
    router, worker = daemon_end
    router.close()
    assert worker.wait(timeout=60) == LOST_CONNECTION


def test_a_connected_worker_still_answers_and_exits_when_told(daemon_end):
    router, worker = daemon_end
    router.send_multipart([b"w0", msgpack.packb({"id": 7, "op": "compile", "model": b"not onnx",
                                                 "config": make_config("edge").to_dict()})])
    assert router.poll(60_000), worker.stderr.read() if worker.poll() is not None else "no reply"
    name, reply = router.recv_multipart()
    reply = msgpack.unpackb(reply)
    assert reply["id"] == 7 and reply["ok"] is False and reply["error"]["code"] == "EINVAL"
    router.send_multipart([b"w0", msgpack.packb({"op": "exit"})])
    assert worker.wait(timeout=60) == 0


def test_a_request_with_a_bad_device_config_is_answered_and_the_worker_carries_on(daemon_end):
    router, worker = daemon_end
    router.send_multipart([b"w0", msgpack.packb({"id": 8, "op": "compile", "model": b"not onnx",
                                                 "config": {"no such parameter": 1}})])
    assert router.poll(60_000), worker.stderr.read() if worker.poll() is not None else "no reply"
    reply = msgpack.unpackb(router.recv_multipart()[1])
    assert reply["id"] == 8 and reply["ok"] is False and reply["error"]["code"] == "EINVAL"
    assert worker.poll() is None, "the worker died of a bad request"
