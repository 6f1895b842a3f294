"""The device link: the messages between the daemon and a device process, as schemas.

Every driver's device process speaks it (docs/DRIVERS.md, "The device link"): one Unix
SOCK_SEQPACKET socket, one msgpack map per packet, memfds in SCM_RIGHTS.  The daemon checks
every reply against these schemas before it acts on one -- a device process is hardware, and
hardware (or a vendor's driver) can be wrong: a reply that breaks the protocol resets the
device, it never reaches the daemon's logic.  A device process checks every request the same
way and answers a malformed one with ``EPROTO`` instead of dying.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from npud.ipc_schema.types import Any_, Array, Bin, Bool, F, FieldError, Float, Int, MapOf, Str, Struct, Type

U64 = Int(0, 2**64 - 1)
COUNT = Int(0, 2**31 - 1)
MAX_ITEMS = 1 << 20


@dataclass(frozen=True)
class Tuple_(Type):
    """A fixed-length array whose items have types of their own (msgpack has no tuples); with
    ``required``, only that many leading items are (the rest may be left off, newest last)."""

    items: tuple
    required: int | None = None

    def check(self, value, path, strict=True):
        least = len(self.items) if self.required is None else self.required
        if type(value) not in (list, tuple) or not least <= len(value) <= len(self.items):
            count = len(self.items) if least == len(self.items) else f"{least} to {len(self.items)}"
            raise FieldError(path, f"expected an array of {count} items, got {value!r:.60}")
        return [t.check(v, f"{path}[{i}]", strict) for i, (t, v) in enumerate(zip(self.items, value))]

    def describe(self):
        shown = [t.describe() for t in self.items]
        if self.required is not None and self.required < len(shown):
            shown[self.required:] = [f"optional {t}" for t in shown[self.required:]]
        return f"[{', '.join(shown)}]"


@dataclass(frozen=True)
class OrNone(Type):
    """A value of ``type``, or nil."""

    type: Type

    def check(self, value, path, strict=True):
        return None if value is None else self.type.check(value, path, strict)

    def describe(self):
        return f"{self.type.describe()} or nil"


def _op(name: str) -> F:
    return F(Str(32, (name,)), "the request")


BINDING = Tuple_((U64, U64, Bool()))       # [bo, va, writable]
# [va, size, writable, immutable]: immutable (optional, false if left off) promises that nothing
# writes the mapping's bytes while the program is loaded -- a loaded model's weights, which the
# daemon writes once before the load -- so the device may keep them pre-arranged (blocked,
# tiled, compressed) from load to unload.  Only a read-only mapping may be immutable.
MAPPING = Tuple_((U64, U64, Bool(), Bool()), required=3)
REQUESTS: dict[str, Struct] = {s.name: s for s in (
    Struct("import", {"op": _op("import"), "bo": F(U64, "the buffer object; its memfd rides along")}),
    Struct("release", {"op": _op("release"), "bo": F(U64, "the buffer object to forget")}),
    Struct("load_program", {
        "op": _op("load_program"), "program": F(U64, "its id"),
        "mappings": F(Array(MAPPING, MAX_ITEMS), "the address space it was validated for"),
        "boundaries": F(Array(COUNT, MAX_ITEMS), "proposed preemption points (command counts)", optional=True)}),
    Struct("unload_program", {"op": _op("unload_program"), "program": F(U64, "its id")}),
    Struct("run", {
        "op": _op("run"), "job": F(U64, "the job's id"),
        "bindings": F(Array(BINDING, MAX_ITEMS), "the buffers it maps"),
        "stream": F(Bin(1 << 26), "a raw command stream", optional=True),
        "program": F(U64, "a loaded program", optional=True),
        "from": F(COUNT, "the segment to start at", optional=True),
        "until": F(COUNT, "the segment to stop before", optional=True),
        "fault": F(Str(16, ("hang", "crash", "slow")), "test-mode fault injection", optional=True),
        "slow_ms": F(Int(0, 2**31 - 1), "for fault slow: sleep before each segment", optional=True)}),
    Struct("preempt", {"op": _op("preempt")}),
    Struct("shutdown", {"op": _op("shutdown")}),
)}

CARRIES_FD = ("import", "load_program")   # requests whose packet carries a memfd (SCM_RIGHTS)

ERROR = Struct("device_error", {
    "code": F(Str(32), "an npud error code name (EIO, EFAULT, ...)"),
    "message": F(Str(4096), "what went wrong, for a person"),
    "command": F(OrNone(COUNT), "the failing command's index, if one failed", optional=True),
    "retryable": F(OrNone(Bool()), "whether running it again may succeed", optional=True),
})
_FAILED = {"ok": F(Bool(), "false"), "error": F(ERROR, "why")}
READY = Struct("ready", {
    "op": _op("ready"),
    "kernels": F(Str(256), "which kernels the device process runs (npuctl devices shows it)", optional=True),
    "threads": F(MapOf(Int(0, 1 << 16), 16), "compute threads of each thread pool it loaded", optional=True),
})
PREPARED_BYTES = F(Int(0, 2**63 - 1), "bytes the device process now holds of weights it pre-arranged "
                                       "from immutable mappings (all loaded programs)", optional=True)
REPLIES: dict[str, Struct] = {
    "import": Struct("import_reply", {"ok": F(Bool(), "true")}),
    "release": Struct("release_reply", {"ok": F(Bool(), "true")}),
    "unload_program": Struct("unload_program_reply", {"ok": F(Bool(), "true"), "prepared_bytes": PREPARED_BYTES}),
    "load_program": Struct("load_program_reply", {
        "ok": F(Bool(), "true"),
        "segments": F(Array(Tuple_((COUNT, COUNT)), MAX_ITEMS), "[first command, end] of each segment",
                      optional=True),
        "segment_cycles": F(Array(Int(0, 2**63 - 1), MAX_ITEMS), "modeled cycles of each segment",
                            optional=True),
        "prepared_bytes": PREPARED_BYTES}),
    "run": Struct("run_reply", {
        "ok": F(Bool(), "true"),
        "done": F(Bool(), "false: stopped at a preemption point"),
        "next": F(COUNT, "the segment to resume from"),
        "segments": F(COUNT, "segments run", optional=True),
        "cycles": F(Int(0, 2**63 - 1), "modeled cycles of the segments run"),
        "stats": F(MapOf(Any_(), 64), "the device's counters of the finished job ({} if not done)"),
        "wall_ms": F(Float(), "measured time of the run")}),
}


class ProtocolError(ValueError):
    """A message that breaks the device link; the message says how."""


def check_request(message: Any) -> dict:
    """A request as the device process may act on it, or ProtocolError.  Fields the schema does not
    name are left for the driver to use or ignore (a daemon may be newer than its schema's reader)."""
    if type(message) is not dict or type(message.get("op")) is not str or message["op"] not in REQUESTS:
        raise ProtocolError(f"not a device request: {message!r:.80}")
    try:
        REQUESTS[message["op"]].check(message, message["op"], strict=False)
    except FieldError as exc:
        raise ProtocolError(str(exc)) from None
    return message


def check_reply(op: str, packet: bytes) -> dict:
    """The device process's reply to request ``op`` (``"ready"``: its start), decoded and checked,
    or ProtocolError.  A failure reply ({"ok": false, "error": ...}) is valid for any request."""
    try:
        reply = msgpack.unpackb(packet, raw=False)
    except Exception as exc:   # msgpack raises several types for garbage
        raise ProtocolError(f"an undecodable reply to {op} ({type(exc).__name__})") from None
    schema = READY if op == "ready" else REPLIES.get(op)
    if type(reply) is dict and reply.get("ok") is False and op != "ready":
        schema = Struct(f"{op}_failure", _FAILED)
    try:
        schema.check(reply, f"{op} reply", strict=False)
    except FieldError as exc:
        raise ProtocolError(str(exc)) from None
    return reply   # with any fields of the driver's own (extra counters) as it sent them


def serve_main(what: str, server, params_from_dict, argv: list[str] | None = None) -> int:
    """A device process's entry point: ``--sock-fd N --config HEX`` (``Driver.process_args``), then
    ``server(socket, params).serve()`` until the daemon says shutdown or goes away."""
    import argparse
    import socket

    parser = argparse.ArgumentParser(description=f"npud {what} device process (started by npud)")
    parser.add_argument("--sock-fd", type=int, required=True)
    parser.add_argument("--config", required=True, help="device parameters, msgpack as hex")
    args = parser.parse_args(argv)
    params = params_from_dict(msgpack.unpackb(bytes.fromhex(args.config), raw=False))
    server(socket.socket(fileno=args.sock_fd), params).serve()
    return 0


class DeviceServer:
    """The device-process side of the link, for a driver's runtime to subclass: the message loop
    (requests checked, a malformed one answered with EPROTO), the ``ready`` handshake, the
    ``preempt`` check between preemption points, and buffer objects imported as shared mappings
    (``self.buffers``: bo -> mmap).  A subclass adds ``_op_load_program``, ``_op_unload_program``
    and ``_op_run`` (each ``(request, fds) -> reply``)."""

    MAX_PACKET = 32 << 20
    KEEP_PACKET_BYTES = 1 << 20   # the packet buffer keeps at most this much resident between packets

    def __init__(self, sock):
        import mmap

        self.sock = sock
        self.buffers: dict = {}
        # Every packet is received into this one buffer: a fresh MAX_PACKET buffer per receive
        # (one per request, and one per preemption point of every run) cost an allocation of
        # 32 MiB each time.  Anonymous pages cost memory only once a packet has written them.
        self._packet = mmap.mmap(-1, self.MAX_PACKET)

    def ready_info(self) -> dict:
        """Fields of the driver's own for the ``ready`` message (e.g. ``kernels``, ``threads``)."""
        return {}

    def serve(self) -> None:
        import array
        import os
        import socket

        self.sock.send(msgpack.packb({**self.ready_info(), "op": "ready"}))
        fd_space = socket.CMSG_SPACE(4 * array.array("i").itemsize)
        while True:
            try:
                size, ancillary, _flags, _addr = self.sock.recvmsg_into([self._packet], fd_space)
            except ConnectionResetError:
                return
            if not size:
                return  # the daemon is gone: nothing to serve
            fds = _fds(ancillary)
            try:
                request = check_request(self._unpack(size))
                if request["op"] in CARRIES_FD and not fds:
                    raise ProtocolError(f"{request['op']} carries no file descriptor")
            except Exception as exc:   # garbage, or a map that breaks the device link: say so, go on
                for fd in fds:
                    os.close(fd)
                self.sock.send(msgpack.packb({"ok": False, "error": {
                    "code": "EPROTO", "message": f"malformed request: {exc}", "command": None}}))
                continue
            op = request["op"]
            if op == "shutdown":
                return
            if op == "preempt":
                continue  # the run it meant to stop had already finished
            reply = getattr(self, f"_op_{op}")(request, fds)
            self.sock.send(msgpack.packb(reply, use_bin_type=True))

    def preempted(self) -> bool:
        """Whether the daemon asked (with a ``preempt`` packet) to stop at this preemption point."""
        import socket

        try:
            size = self.sock.recv_into(self._packet, self.MAX_PACKET, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        if not size:   # the daemon is gone: nobody will read this run's result
            raise SystemExit("npud closed the device socket mid-run")
        try:
            return self._unpack(size).get("op") == "preempt"
        except Exception:
            return False   # garbage between preemption points is not a preempt request

    def _unpack(self, size: int):
        """The message in the first ``size`` bytes of the packet buffer (msgpack copies out
        whatever it keeps, so the buffer is free for the next packet)."""
        import mmap

        try:
            with memoryview(self._packet) as view:
                return msgpack.unpackb(view[:size], raw=False)
        finally:
            if size > self.KEEP_PACKET_BYTES:   # a large stream's pages go back to the kernel (zero again)
                self._packet.madvise(mmap.MADV_DONTNEED, 0, size)

    def _op_import(self, request, fds):
        import mmap
        import os

        fd = fds[0]
        try:
            size = os.fstat(fd).st_size
            self.buffers[request["bo"]] = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
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

    @staticmethod
    def hang_or_crash(request: dict) -> None:
        """Test-mode fault injection (``npud --test-mode``, ``inject_fault``): ``hang`` never
        answers -- only a reset gets the device back -- and ``crash`` kills the process."""
        import os
        import signal
        import time

        if request.get("fault") == "hang":
            while True:
                time.sleep(3600)
        if request.get("fault") == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)

    @staticmethod
    def before_segment(request: dict) -> None:
        """Call before each segment a run executes (a raw stream, or a program run whole, is one
        segment).  Test-mode fault ``slow`` has this one meaning for every driver: the run sleeps
        ``slow_ms`` here, so its ``wall_ms`` is at least ``slow_ms`` times its ``segments``."""
        import time

        if request.get("fault") == "slow":
            time.sleep(request.get("slow_ms", 0) / 1000)

    @staticmethod
    def read_stream(fds) -> bytes:
        """The program a ``load_program`` request carries in its memfd (a stream can exceed a packet)."""
        import os

        with open(fds[0], "rb", closefd=True) as f:
            stream = f.read()
        for extra in fds[1:]:
            os.close(extra)
        return stream


def _fds(ancillary: list) -> list[int]:
    """The file descriptors an SCM_RIGHTS message carried (as ``socket.recv_fds`` returns them)."""
    import array
    import socket

    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)
