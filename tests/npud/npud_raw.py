"""A raw ZeroMQ DEALER peer for poking the daemon with frames the client library would never send."""

from __future__ import annotations

import contextlib
import itertools
import os

import msgpack
import zmq

from npud.ipc_schema.schema import PROTOCOL_VERSION


class RawPeer:
    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.seq = itertools.count(1)

    def send_frames(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout: float = 5.0) -> dict:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError("no reply from the daemon")
        return msgpack.unpackb(self.sock.recv(), raw=False)

    def send(self, op: str, args: dict | None = None, seq: int | None = None) -> int:
        """Send a request without waiting for its reply (pipelining); its seq."""
        seq = next(self.seq) if seq is None else seq
        self.send_frames(msgpack.packb({"op": op, "seq": seq, "args": args or {}}, use_bin_type=True))
        return seq

    def request(self, op: str, args: dict | None = None, seq: int | None = None, **kw) -> dict:
        seq = self.send(op, args, seq)
        while True:
            reply = self.recv(**kw)
            if "event" not in reply:
                assert reply["seq"] == seq, reply
                return reply

    def replies(self, n: int, timeout: float = 30.0) -> list[dict]:
        """The next ``n`` replies (events skipped), in the order they arrived (pipelined requests)."""
        out = []
        while len(out) < n:
            reply = self.recv(timeout)
            if "event" not in reply:
                out.append(reply)
        return out

    def hello(self, version=PROTOCOL_VERSION, name: str = "raw") -> dict:
        return self.request("hello", {"protocol": list(version), "client_name": name, "pid": os.getpid()})

    def close(self) -> None:
        self.sock.close(0)


@contextlib.contextmanager
def session_peer(endpoint: str):
    """A RawPeer with a session open (hello answered), closed on exit."""
    peer = RawPeer(endpoint)
    try:
        assert peer.hello()["ok"]
        yield peer
    finally:
        peer.close()


def error_of(reply: dict) -> dict:
    assert reply["ok"] is False, reply
    err = reply["error"]
    assert set(err) == {"code", "message", "retryable"}
    assert isinstance(err["message"], str) and err["message"]
    return err
