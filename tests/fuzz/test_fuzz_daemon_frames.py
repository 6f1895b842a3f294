"""Whole frames, mutated from real requests, sent to a live daemon: every message gets exactly one
well-formed reply, the daemon stays up, and other sessions never notice.  (Short profile; the
decoder alone runs for longer under `make fuzz`.)"""

from __future__ import annotations

import os
import random

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import npu
from fuzz import targets
from npud.ipc_schema.schema import PROTOCOL_VERSION


class Peer:
    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def exchange(self, frames: list[bytes], timeout: float = 10.0) -> dict:
        self.sock.send_multipart(frames)
        while True:
            assert self.sock.poll(int(timeout * 1000)), f"no reply to {frames!r:.200}"
            reply = msgpack.unpackb(self.sock.recv(), raw=False)
            if "event" not in reply:
                return reply


@pytest.fixture(scope="module")
def peer(daemon):
    p = Peer(daemon.endpoint)
    hello = {"op": "hello", "seq": 1, "args": {"protocol": list(PROTOCOL_VERSION),
                                               "client_name": "fuzz", "pid": os.getpid()}}
    assert p.exchange([msgpack.packb(hello)])["ok"]
    yield p
    p.sock.close(0)


def well_formed(reply: dict) -> None:
    assert set(reply) <= {"seq", "ok", "result", "error"} and isinstance(reply["ok"], bool), reply
    if not reply["ok"]:
        err = reply["error"]
        assert isinstance(err["code"], str) and err["code"].startswith("E") and err["message"], err


@settings(derandomize=True, deadline=None, database=None, max_examples=250,
          suppress_health_check=list(HealthCheck))
@given(st.integers(0, 2**32), st.integers(1, 3))
def test_mutated_frames_each_get_one_reply(daemon, peer, seed, nframes):
    rng = random.Random(seed)
    seeds = targets.frame_seeds()
    frames = [targets.mutate(rng, rng.choice(seeds), seeds) for _ in range(nframes)]
    well_formed(peer.exchange(frames))
    assert daemon.process.poll() is None


def test_daemon_and_other_sessions_unaffected(daemon, peer):
    with npu.connect(daemon.endpoint) as c:
        buf = c.alloc(4096)
        buf.write(b"\x07" * 4096)
        assert buf.read() == b"\x07" * 4096
    assert peer.exchange([msgpack.packb({"op": "ping", "seq": 99, "args": {}})])["seq"] == 99
