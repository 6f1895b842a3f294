"""The daemon ops npuctl uses (jobs, buffers, trace, kill_client, reset_device): malformed input gets
clear errors, and admin ops judge a peer by the uid the kernel reports, companion socket or not."""

from __future__ import annotations

import os
import sys

import pytest

import npu
from npud.jobs import BusyWindow, TraceRing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "npud"))
from npud_raw import RawPeer, error_of  # noqa: E402


@pytest.fixture
def raw(daemon):
    peer = RawPeer(daemon.endpoint)
    assert peer.hello()["ok"]
    yield peer
    peer.close()


BAD = [
    ("jobs", {"session": 5}, "EINVAL", "session"),
    ("jobs", {"session": "x" * 65}, "EINVAL", "session"),
    ("jobs", {"device": -1}, "EINVAL", "device"),
    ("jobs", {"device": 256}, "EINVAL", "device"),
    ("jobs", {"device": "0"}, "EINVAL", "device"),
    ("jobs", {"limit": 0}, "EINVAL", "limit"),
    ("jobs", {"limit": 65537}, "EINVAL", "limit"),
    ("jobs", {"limit": 1.5}, "EINVAL", "limit"),
    ("jobs", {"bogus": 1}, "EINVAL", "bogus"),
    ("jobs", {"device": 9}, "ENODEV", "no device 9"),
    ("jobs", {"session": "s-nope"}, "ENOENT", "s-nope"),
    ("buffers", {"session": b"bin"}, "EINVAL", "session"),
    ("buffers", {"device": 300}, "EINVAL", "device"),
    ("buffers", {"device": None}, "EINVAL", "device"),
    ("buffers", {"extra": True}, "EINVAL", "extra"),
    ("buffers", {"device": 3}, "ENODEV", "no device 3"),
    ("buffers", {"session": "s-nope"}, "ENOENT", "s-nope"),
    ("trace", {}, "EINVAL", "since"),
    ("trace", {"since": -1}, "EINVAL", "since"),
    ("trace", {"since": -2**63}, "EINVAL", "since"),
    ("trace", {"since": "0"}, "EINVAL", "since"),
    ("trace", {"since": 0, "limit": -1}, "EINVAL", "limit"),
    ("trace", {"since": 0, "limit": 65537}, "EINVAL", "limit"),
    ("trace", {"since": 0, "what": 1}, "EINVAL", "what"),
    ("kill_client", {}, "EINVAL", "session"),
    ("kill_client", {"session": 7}, "EINVAL", "session"),
    ("kill_client", {"session": "x" * 65}, "EINVAL", "session"),
    ("kill_client", {"session": "s", "force": True}, "EINVAL", "force"),
    ("reset_device", {}, "EINVAL", "device"),
    ("reset_device", {"device": -1}, "EINVAL", "device"),
    ("reset_device", {"device": 256}, "EINVAL", "device"),
    ("reset_device", {"device": [0]}, "EINVAL", "device"),
    ("reset_device", {"device": 0, "hard": True}, "EINVAL", "hard"),
]


@pytest.mark.parametrize("op,args,code,needle", BAD, ids=[f"{o}-{i}" for i, (o, *_r) in enumerate(BAD)])
def test_malformed_args_get_clear_errors(raw, op, args, code, needle):
    err = error_of(raw.request(op, args))
    assert err["code"] == code and needle in err["message"], err
    assert raw.request("ping")["ok"]  # the session stays usable


def test_admin_ops_judge_peers_without_companion_socket_by_kernel_uid(raw, client):
    """A raw peer never connected the companion socket, yet the daemon knows its uid: the ZAP handler
    learned it from the kernel (npud/auth.py). As root (or the daemon's user) it is an admin."""
    listed = {c["name"]: c["uid"] for c in client.clients()}
    assert listed["raw"] == os.getuid()
    err = error_of(raw.request("kill_client", {"session": "s-nope"}))
    assert err["code"] == "ENOENT", err  # allowed, and then: no such session


def test_admin_ops_not_found_errors(client):
    with pytest.raises(npu.NotFound) as info:
        client._request("kill_client", {"session": "s-nope"})
    assert "s-nope" in info.value.message
    with pytest.raises(npu.NpuError) as info:
        client._request("reset_device", {"device": 5})
    assert info.value.code == "ENODEV"


def test_ops_need_a_session(daemon):
    peer = RawPeer(daemon.endpoint)
    try:
        for op, args in (("jobs", {}), ("buffers", {}), ("trace", {"since": 0})):
            assert error_of(peer.request(op, args))["code"] == "ENOTCONN"
    finally:
        peer.close()


def test_trace_cursor_and_bounded_ring():
    ring = TraceRing(3)
    assert ring.since(0, 10) == ([], 0)
    for i in range(5):
        ring.add({"job": i})
    events, dropped = ring.since(0, 10)
    assert [e["seq"] for e in events] == [3, 4, 5] and dropped == 2
    assert ring.since(3, 10) == (events[1:], 0) and ring.since(5, 10) == ([], 0)
    assert ring.since(3, 1) == (events[1:2], 0)


def test_busy_window_utilisation():
    w = BusyWindow(5.0, now=0.0, busy=0.0)
    assert w.pct(0.0, 0.0) == 0.0
    w.sample(1.0, 0.5)
    assert w.pct(2.0, 1.0) == pytest.approx(50.0)
    for t in range(2, 12):
        w.sample(float(t), 1.0)  # idle since t=1
    assert w.pct(12.0, 1.0) == 0.0  # the busy second left the window
    assert w.pct(12.0, 100.0) == 100.0  # never over 100 %
    four = BusyWindow(5.0, now=0.0, busy=0.0)  # a 4-core device: busy core-seconds over 4x the wall time
    assert four.pct(2.0, 2.0, cores=4) == pytest.approx(25.0) and four.pct(2.0, 8.0, cores=4) == 100.0
