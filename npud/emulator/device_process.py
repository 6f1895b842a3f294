"""The device process: one emulated NPU, as an OS process the daemon supervises.

This is the "hardware" side of the daemon/device boundary.  It talks to the
daemon over one Unix SOCK_SEQPACKET socket (inherited as a file descriptor):
each packet is a msgpack map, and ``import`` packets carry a buffer object's
memfd in SCM_RIGHTS.  Once started (its imports done, its device built, its
integer GEMM chosen and every BLAS/OpenMP pool pinned to one thread) it sends
``{"op": "ready", "kernels": str, "threads": {"openblas": n, "openmp": n}}``
(which kernels it runs, and the thread counts its pools read back); then it
executes one request at a time, exactly as a device with one command queue
does, and answers every request with one packet::

    {"op": "import", "bo": id}  + memfd   -> {"ok": true}
    {"op": "release", "bo": id}           -> {"ok": true}
    {"op": "load_program", "program": id, "mappings": [[va, size, writable(, immutable)], ...],
     "boundaries": [command index, ...]}  + memfd of the stream
        -> {"ok": true, "segments": [[first command, end], ...], "segment_cycles": [int, ...],
            "prepared_bytes": int}
         | {"ok": false, "error": {...}}
    {"op": "unload_program", "program": id} -> {"ok": true, "prepared_bytes": int}
    {"op": "run", "job": id, "stream": bin | "program": id, "bindings": [[bo, va, writable], ...],
     "from": segment, "until": segment, "fault": "hang" | "crash" | "slow", "slow_ms": int}
        -> {"ok": true, "done": bool, "next": segment, "segments": n, "cycles": int,
            "stats": {...}, "wall_ms": float}
         | {"ok": false, "error": {"code", "message", "command"}}
    {"op": "preempt"}                     -> no reply of its own (see below)
    {"op": "shutdown"}                    -> exits

Preemption at layer boundaries.  A loaded program is cut into segments at the
``boundaries`` the daemon proposes (the compiler's layer boundaries) that are
safe: no SRAM byte is read after the boundary before being written after it,
so that running the segments as separate executes (SRAM is cleared between
them; layers talk through device memory) computes exactly what one execute
does.  ``run`` executes segments ``from`` .. ``until`` (default: to the end)
and, between two segments, looks for a ``preempt`` packet: if one came, it
stops there and answers with ``done: false`` and the segment to resume from.
A ``preempt`` that arrives after the run finished is ignored, so the daemon
may send one at any time while a run is in flight and always gets exactly one
reply to the run.

``fault`` is the daemon's test-mode fault injection (``npud --test-mode``):
``hang`` never answers, ``crash`` kills the process, ``slow`` sleeps
``slow_ms`` before each segment (a raw command stream is one segment).

A fault fails only the job that caused it: each job runs in a fresh hardware
context whose page table holds just that job's bindings.  A loaded program
(a model's stream) is validated once and run many times: the MMU still checks
every access against each run's own bindings.

Immutable mappings (a loaded model's weights: the daemon writes them once,
before the load) let the MAC engine keep those weights in its kernels' own
layout from the load to the unload, with no check that they changed; their
bytes are ``prepared_bytes`` in the replies above (bounded by
``NPU_EMU_PREPARED_BYTES``, 1 GiB by default; beyond it, weights are compared
and reordered every run as for any other memory).
"""

from __future__ import annotations

import dataclasses
import socket
import sys
import time

from npud.drivers import link
from npud.emulator.config import DeviceConfig
from npud.emulator import threads
from npud.emulator.device import Device
from npud.emulator.errors import DeviceError
from npud.emulator.engines import int_gemm, onednn
from npud.emulator.isa import Engine
from npud.emulator.timing import command_cost
from npud.emulator.validator import Mapping, Program, validate


class DeviceProcess(link.DeviceServer):
    def __init__(self, sock: socket.socket, config: DeviceConfig):
        super().__init__(sock)
        self.device = Device(config)
        self.programs: dict[int, Program] = {}
        self.segments: dict[int, list[Program]] = {}   # a loaded program cut at its safe boundaries
        self.cycles: dict[int, list[int]] = {}         # modeled cycles of each segment
        # The integer GEMM's backend is chosen (and self-tested) now, not in the first int8 job,
        # and every thread pool it and numpy loaded runs one thread (npud/emulator/threads.py).
        self.kernels = int_gemm.kernels()
        self.threads = threads.pin()

    def ready_info(self) -> dict:
        return {"kernels": self.kernels, "threads": self.threads}

    def _op_load_program(self, request, fds):
        # The stream arrives as a memfd: a model's stream can exceed one packet.
        try:
            stream = self.read_stream(fds)
            program = validate(stream, self.device.config,
                               [Mapping(*m) for m in request["mappings"]])
        except DeviceError as exc:
            return {"ok": False, "error": {"code": exc.code, "message": exc.message, "command": None}}
        pid = request["program"]
        self.programs[pid] = program
        spans = segment_spans(program, request.get("boundaries", []))
        self.segments[pid] = [dataclasses.replace(program, commands=program.commands[a:b]) for a, b in spans]
        try:    # decode once, at load (oneDNN primitives, qbinary tables), not in the first run
            for seg in self.segments[pid]:
                self.device.prepare(seg)
        except Exception:   # pragma: no cover - the first run prepares again and fails with the reason
            pass
        costs = [command_cost(c, self.device.config)[0] if c.op.engine != Engine.CTRL else 0
                 for c in program.commands]
        self.cycles[pid] = [sum(costs[a:b]) for a, b in spans]
        return {"ok": True, "segments": [list(span) for span in spans], "segment_cycles": self.cycles[pid],
                "prepared_bytes": onednn.prepared_bytes()}

    def _op_unload_program(self, request, fds):
        self.programs.pop(request["program"], None)
        for seg in self.segments.pop(request["program"], ()):
            self.device.forget(seg)     # frees the weights its steps kept pre-arranged
        self.cycles.pop(request["program"], None)
        return {"ok": True, "prepared_bytes": onednn.prepared_bytes()}

    def _op_run(self, request, fds):
        started = time.perf_counter()
        self.hang_or_crash(request)
        ctx = None
        done, segment, ran, cycles = True, 0, 0, 0
        try:
            ctx = self.device.create_context()
            for bo, va, writable in request["bindings"]:
                ctx.map(va, self.buffers[bo], writable=writable)
            if "program" in request:
                pid = request["program"]
                segments = self.segments[pid]
                segment = request.get("from", 0)
                until = min(request.get("until", len(segments)), len(segments))
                while segment < until:
                    if ran and self.preempted():
                        break
                    self.before_segment(request)
                    # Later segments of this run continue the same job: no SRAM clearing per
                    # layer (a resumed run after preemption starts fresh, as another job may
                    # have run in between).
                    stats = self.device.execute(ctx, segments[segment], continues=ran > 0)
                    cycles += self.cycles[pid][segment]
                    segment += 1
                    ran += 1
                done = segment >= len(segments)
                stats = self.programs[pid].stats   # read-only here: to_dict() below copies it
            else:   # a raw command stream: one segment
                self.before_segment(request)
                stats = self.device.execute(ctx, request["stream"])
                cycles, ran = stats.cycles, 1
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
        return {"ok": True, "done": done, "next": segment, "segments": ran, "cycles": cycles,
                "stats": stats.to_dict() if done else {}, "wall_ms": (time.perf_counter() - started) * 1e3}


def segment_spans(program: Program, boundaries: list[int]) -> list[tuple[int, int]]:
    """[first, end) command ranges of the program cut at those of ``boundaries`` that are safe.

    A boundary before command i is safe when nothing the commands from i on read
    from SRAM was written before i: running from i with SRAM cleared then
    computes the same.  One backward pass keeps, per core, the SRAM ranges read
    before being written ("live in") from each command on; a boundary is safe
    where that set is empty.
    """
    n = len(program.commands)
    wanted = sorted({b for b in boundaries if 0 < b < n})
    if not wanted:
        return [(0, n)]
    live: dict[int, list[tuple[int, int]]] = {}
    safe = set()
    want = set(wanted)
    for i in range(n - 1, 0, -1):
        fp = program.footprints[i]
        for core, lo, hi, write in fp:
            if write and hi > lo:
                live[core] = _subtract(live.get(core, []), lo, hi)
        for core, lo, hi, write in fp:
            if not write and hi > lo:
                live[core] = _add(live.get(core, []), lo, hi)
        if i in want and not any(live.values()):
            safe.add(i)
    cuts = [0, *sorted(safe), n]
    return list(zip(cuts, cuts[1:]))


def _subtract(spans, lo, hi):
    out = []
    for a, b in spans:
        if b <= lo or a >= hi:
            out.append((a, b))
            continue
        if a < lo:
            out.append((a, lo))
        if b > hi:
            out.append((hi, b))
    return out


def _add(spans, lo, hi):
    out = []
    for a, b in sorted([*spans, (lo, hi)]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def main(argv: list[str] | None = None) -> int:
    return link.serve_main("npu-emu", DeviceProcess, DeviceConfig.from_dict, argv)


if __name__ == "__main__":
    sys.exit(main())
