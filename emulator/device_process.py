"""The device process: one emulated NPU, as an OS process the daemon supervises.

This is the "hardware" side of the daemon/device boundary.  It talks to the
daemon over one Unix SOCK_SEQPACKET socket (inherited as a file descriptor):
each packet is a msgpack map, and ``import`` packets carry a buffer object's
memfd in SCM_RIGHTS.  It executes one request at a time, exactly as a device
with one command queue does, and answers every request with one packet::

    {"op": "import", "bo": id}  + memfd   -> {"ok": true}
    {"op": "release", "bo": id}           -> {"ok": true}
    {"op": "load_program", "program": id, "mappings": [[va, size, writable], ...]}  + memfd of the stream
        -> {"ok": true} | {"ok": false, "error": {...}}
    {"op": "unload_program", "program": id} -> {"ok": true}
    {"op": "run", "job": id, "stream": bin | "program": id, "bindings": [[bo, va, writable], ...]}
        -> {"ok": true, "stats": {...}, "wall_ms": float}
         | {"ok": false, "error": {"code", "message", "command"}}
    {"op": "shutdown"}                    -> exits

A fault fails only the job that caused it: each job runs in a fresh hardware
context whose page table holds just that job's bindings.  A loaded program
(a model's stream) is validated once and run many times: the MMU still checks
every access against each run's own bindings.
"""

from __future__ import annotations

import argparse
import mmap
import os
import socket
import sys
import time

import msgpack

from emulator.config import DeviceConfig
from emulator.device import Device
from emulator.errors import DeviceError
from emulator.validator import Mapping, Program, validate

MAX_PACKET = 32 << 20


class DeviceProcess:
    def __init__(self, sock: socket.socket, config: DeviceConfig):
        self.sock = sock
        self.device = Device(config)
        self.buffers: dict[int, mmap.mmap] = {}
        self.programs: dict[int, Program] = {}

    def serve(self) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_PACKET, 4)
            except ConnectionResetError:
                return
            if not data:
                return  # the daemon is gone: nothing to serve
            request = msgpack.unpackb(data, raw=False)
            op = request["op"]
            if op == "shutdown":
                return
            reply = getattr(self, f"_op_{op}")(request, fds)
            self.sock.send(msgpack.packb(reply, use_bin_type=True))

    def _op_import(self, request, fds):
        fd = fds[0]
        try:
            size = os.fstat(fd).st_size
            self.buffers[request["bo"]] = mmap.mmap(fd, size, mmap.MAP_SHARED,
                                                    mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            for extra in fds:
                os.close(extra)
        return {"ok": True}

    def _op_release(self, request, fds):
        mm = self.buffers.pop(request["bo"], None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # a view is still alive somewhere; the mapping goes with it
        return {"ok": True}

    def _op_load_program(self, request, fds):
        # The stream arrives as a memfd: a model's stream can exceed one packet.
        try:
            with open(fds[0], "rb", closefd=True) as f:
                stream = f.read()
            for extra in fds[1:]:
                os.close(extra)
            self.programs[request["program"]] = validate(
                stream, self.device.config,
                [Mapping(va, size, writable) for va, size, writable in request["mappings"]])
        except DeviceError as exc:
            return {"ok": False, "error": {"code": exc.code, "message": exc.message, "command": None}}
        return {"ok": True}

    def _op_unload_program(self, request, fds):
        self.programs.pop(request["program"], None)
        return {"ok": True}

    def _op_run(self, request, fds):
        started = time.perf_counter()
        ctx = None
        try:
            ctx = self.device.create_context()
            for bo, va, writable in request["bindings"]:
                ctx.map(va, self.buffers[bo], writable=writable)
            work = self.programs[request["program"]] if "program" in request else request["stream"]
            stats = self.device.execute(ctx, work)
        except DeviceError as exc:
            return {"ok": False, "error": {"code": exc.code, "message": exc.message,
                                           "command": exc.command_index}}
        except (KeyError, ValueError) as exc:
            # The daemon checked the bindings; reaching here means it has a bug.
            return {"ok": False, "error": {"code": "EIO", "message": f"bad bindings: {exc}",
                                           "command": None}}
        finally:
            if ctx is not None:
                ctx.close()  # unmaps everything and frees the hardware context slot
        return {"ok": True, "stats": stats.to_dict(),
                "wall_ms": (time.perf_counter() - started) * 1e3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="npud device process (started by npud)")
    parser.add_argument("--sock-fd", type=int, required=True)
    parser.add_argument("--config", required=True, help="device parameters, msgpack as hex")
    args = parser.parse_args(argv)
    config = DeviceConfig.from_dict(msgpack.unpackb(bytes.fromhex(args.config), raw=False))
    sock = socket.socket(fileno=args.sock_fd)
    DeviceProcess(sock, config).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
