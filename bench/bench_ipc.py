"""Client.ping() round trip vs a raw pyzmq REQ/REP echo over ipc.

Both servers run as separate processes (the daemon is one), and the two
round trips are measured in interleaved rounds.  Goal: ping <= 1.5x raw zmq.
Run: python -m bench.bench_ipc
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile

import zmq

import npu

from .common import Ratio, compare, report


def _echo_server(endpoint: str) -> None:
    sock = zmq.Context().socket(zmq.REP)
    sock.bind(endpoint)
    while True:
        message = sock.recv()
        sock.send(message)
        if message == b"stop":
            return


def run(n: int = 2000) -> list[Ratio]:
    directory = tempfile.mkdtemp(prefix="npud-bench-")
    endpoint = f"ipc://{directory}/echo.sock"
    server = multiprocessing.get_context("spawn").Process(target=_echo_server, args=(endpoint,), daemon=True)
    server.start()
    raw = zmq.Context.instance().socket(zmq.REQ)
    raw.connect(endpoint)
    # A ping request is about this size on the wire: the raw echo carries as much.
    payload = b"\x83\xa2op\xa4ping\xa3seq\xce\x00\x01\x00\x00\xa4args\x80"

    def raw_round_trip():
        raw.send(payload)
        raw.recv()

    try:
        with npu.local() as client:
            ping_s, raw_s = compare(client.ping, raw_round_trip, n=n)
    finally:
        raw.send(b"stop")
        raw.recv()
        raw.close()
        server.join(5)
        os.rmdir(directory) if not os.listdir(directory) else None
    return [Ratio("Client.ping() vs raw zmq REQ/REP", ping_s, raw_s, "us", 1e6, "<= 1.5x")]


def main() -> None:
    report("IPC round trip", run())


if __name__ == "__main__":
    main()
