"""The device process's side of its socket to the daemon."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import tracemalloc

import msgpack
import pytest

from npud.emulator.assembler import StreamBuilder
from npud.emulator.config import make_config
from npud.emulator.device_process import DeviceProcess

A, OUT = 0x10000, 0x20000


def test_a_run_stops_at_the_next_boundary_once_the_daemon_is_gone():
    """EOF is not "not preempted": nobody will read the run's result, so the process exits."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = DeviceProcess(theirs, make_config("edge"))
    try:
        assert device.preempted() is False                 # the daemon is there, no preempt
        ours.send(msgpack.packb({"op": "preempt"}))
        assert device.preempted() is True
        ours.close()
        with pytest.raises(SystemExit, match="closed the device socket"):
            device.preempted()
    finally:
        theirs.close()


def _layered_program(device: DeviceProcess, layers: int) -> None:
    """Import two buffers and load program 1: ``layers`` copies of A to OUT, each a safe segment."""
    cfg = device.device.config
    page = cfg.page_size
    for bo in (1, 2):
        fd = os.memfd_create("bo")
        os.ftruncate(fd, page)
        device._op_import({"bo": bo}, [fd])
    sb = StreamBuilder(cfg)
    for _ in range(layers):
        sb.dma_load(0, A, "float32", (256,))
        sb.dma_store(0, OUT, "float32", (256,))
    sb.end()
    stream = os.memfd_create("stream")
    os.write(stream, sb.build())
    os.lseek(stream, 0, os.SEEK_SET)
    reply = device._op_load_program({"program": 1, "mappings": [[A, page, False], [OUT, page, True]],
                                     "boundaries": [2 * i for i in range(1, layers)]}, [stream])
    assert reply["ok"] and len(reply["segments"]) == layers


def test_segment_boundaries_allocate_nothing_per_segment():
    """Between two segments the process looks for a preempt packet; that look must not allocate
    a packet-sized buffer each time (it allocated 32 MiB per boundary)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = DeviceProcess(theirs, make_config("edge"))
    try:
        _layered_program(device, 20)
        run = {"program": 1, "bindings": [[1, A, False], [2, OUT, True]]}
        assert device._op_run(run, [])["done"]            # warm: first-use allocations are not per segment
        tracemalloc.start()
        try:
            reply = device._op_run(run, [])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert reply["ok"] and reply["done"] and reply["segments"] == 20
        assert peak < 1 << 20, f"a 20-segment run of 1 KiB layers peaked at {peak} bytes allocated"
    finally:
        ours.close()
        theirs.close()


def test_a_program_is_prepared_when_it_is_loaded():
    """Its segments' steps (and the oneDNN primitives in them) are made at load, not in the
    first run; that run uses them."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = DeviceProcess(theirs, make_config("edge"))
    try:
        _layered_program(device, 3)
        prepared = [seg.prepared.get("steps") for seg in device.segments[1]]
        assert all(p is not None and len(p[2]) == 2 for p in prepared)
        run = {"program": 1, "bindings": [[1, A, False], [2, OUT, True]]}
        assert device._op_run(run, [])["done"]
        assert [seg.prepared["steps"] for seg in device.segments[1]] == prepared
    finally:
        ours.close()
        theirs.close()


def test_requests_with_descriptors_are_served_from_the_one_packet_buffer():
    """serve() receives into a reused buffer: requests, their memfds and replies still arrive whole."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = DeviceProcess(theirs, make_config("edge"))
    server = threading.Thread(target=device.serve)
    server.start()
    try:
        ready = msgpack.unpackb(ours.recv(1 << 16), raw=False)
        assert ready["op"] == "ready"
        fd = os.memfd_create("bo")
        os.ftruncate(fd, 4096)
        socket.send_fds(ours, [msgpack.packb({"op": "import", "bo": 7})], [fd])
        os.close(fd)
        assert msgpack.unpackb(ours.recv(1 << 16), raw=False) == {"ok": True}
        assert 7 in device.buffers
        ours.send(msgpack.packb({"op": "release", "bo": 7}))
        assert msgpack.unpackb(ours.recv(1 << 16), raw=False) == {"ok": True}
        assert 7 not in device.buffers
        ours.send(msgpack.packb({"op": "shutdown"}))
    finally:
        server.join(10)
        ours.close()
        theirs.close()


def test_a_device_process_runs_one_compute_thread_whatever_its_environment_asks():
    """Started with every pool asked for 4 threads, the process still pins them to one, and says
    so (with the kernels it runs) in its ready packet."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "4", "OMP_NUM_THREADS": "4"}
    config = msgpack.packb(make_config("edge").to_dict()).hex()
    proc = subprocess.Popen([sys.executable, "-m", "npud.emulator.device_process", "--sock-fd",
                             str(theirs.fileno()), "--config", config], pass_fds=(theirs.fileno(),), env=env)
    theirs.close()
    try:
        ours.settimeout(60)
        ready = msgpack.unpackb(ours.recv(1 << 16), raw=False)
        assert ready["op"] == "ready"
        assert ready["kernels"].startswith(("onednn ", "numpy reference"))
        assert ready["threads"].get("openblas") == 1     # numpy's OpenBLAS is always loaded
        assert set(ready["threads"].values()) == {1}
        ours.send(msgpack.packb({"op": "shutdown"}))
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ours.close()


def _resident(mm) -> int:
    """Resident bytes of an anonymous mapping (its line in /proc/self/smaps)."""
    import ctypes
    start = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        if line.split("-")[0] == f"{start:x}" or line.startswith(f"{start:012x}-"):
            return next(int(x.split()[1]) * 1024 for x in lines[i + 1:] if x.startswith("Rss:"))
    raise AssertionError("mapping not found in smaps")


def test_a_large_packet_does_not_stay_resident():
    """The reused packet buffer gives a large packet's pages back: a 6 MiB request must not leave
    a device process 6 MiB larger for good (a fresh buffer per packet freed them before)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    device = DeviceProcess(theirs, make_config("edge"))
    try:
        # As a receive leaves it (this host's socket buffers are too small to carry it whole).
        packet = msgpack.packb({"op": "release", "bo": 3, "padding": b"x" * (6 << 20)})
        device._packet[:len(packet)] = packet
        assert _resident(device._packet) >= 6 << 20
        assert device._unpack(len(packet))["bo"] == 3
        assert _resident(device._packet) < 2 << 20
    finally:
        ours.close()
        theirs.close()
