"""A compiler worker: one process that compiles models for the daemon, one at a time.

Started and supervised by npud (npud/compilers.py).  It connects a DEALER to
the daemon's private compile endpoint with its name as routing id, announces
``{"op": "ready", "confinement": str}`` (what npud/compiler_worker/sandbox.py did, for the
log), then answers each request with one reply::

    {"id": n, "op": "compile", "model": bin, "config": map, "options": map, "target": str}
        -> {"id": n, "ok": true, "executable": bin, "seconds": float}
    {"id": n, "op": "check", "model": bin, "config": map}
        -> {"id": n, "ok": true, "problems": [{"node", "op", "reason"}, ...]}
    {"id": n, "op": "partition", "model": bin, "config": map, "options": map, "target": str,
     "fallback": str}
        -> {"id": n, "ok": true, "nodes": [{"node", "op", "target", "reason", "macs"}, ...],
            "partitions": [{"target", "model": bin, "inputs": [str], "outputs": [str]}, ...],
            "tensors": {name: {"dtype", "shape"}}}       (npud/compiler_worker/partition.py)
    any failure
        -> {"id": n, "ok": false, "error": {"code", "message", "node", "op"}}

The model of a request and the executable of a reply each travel as a ZeroMQ frame of their own
after the map (npud/ipc_schema/bulk.py): 100 MB are then neither packed nor unpacked.

A compile request may carry ``"slow_s": float``: with ``--test-mode`` (npud
--test-mode, inject_fault slow_compile) the worker sleeps that long before
compiling, so tests can hit the compile timeout; without it the field is ignored.

Only workers parse models.  A worker runs with an address-space limit
(RLIMIT_AS) and no core dumps, so a model that blows up memory fails here,
not in the daemon; a crash or hang costs one compile and the daemon starts a
fresh worker.  It confines itself before it reads a request (npud/compiler_worker/sandbox.py):
an empty, deleted working directory and, with Landlock, no file but its own code.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from npud.emulator.config import DeviceConfig

from npud.ipc_schema import bulk

from . import sandbox
from .errors import CompileError

LOST_CONNECTION = 3   # exit status: the connection to the daemon dropped (see _serve)


def _limit_resources(memory_max: int) -> None:
    """No core dumps, and at most ``memory_max`` bytes of address space, ever (0: no limit).
    Between compiles the soft limit is that too: the next request's model arrives (ZeroMQ's I/O
    thread allocates it) before the worker can read the limit it comes with."""
    if memory_max > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_max, memory_max))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@contextlib.contextmanager
def _address_space(limit: int):
    """The soft RLIMIT_AS lowered to ``limit`` (a compile's: compile_memory_bytes + scale x its
    model, npud/compilers.py) for the block, then raised back to the hard limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if limit <= 0 or hard == resource.RLIM_INFINITY:
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def _error(exc: BaseException) -> dict:
    if isinstance(exc, CompileError):
        return {"code": "EINVAL", "message": f"compile error: {exc}", "node": exc.node or "",
                "op": exc.op or ""}
    if isinstance(exc, MemoryError):
        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)   # this compile's (_address_space)
        limit = f"{soft >> 20} MiB" if soft != resource.RLIM_INFINITY else "none"
        return {"code": "ENOMEM", "message": f"the compiler ran out of memory (its RLIMIT_AS, {limit}: "
                                             "compile_memory_bytes + compile_memory_scale x the model's "
                                             "size); the model is too large for the configured limit",
                "node": "", "op": ""}
    return {"code": "EINVAL", "message": f"cannot compile this model: {type(exc).__name__}: {exc}",
            "node": "", "op": ""}


def handle(request: dict, test_mode: bool = False) -> dict:
    from .api import check_model, compile_model   # after sandbox.confine(): see main()

    started = time.perf_counter()
    if test_mode and request.get("slow_s"):
        time.sleep(float(request["slow_s"]))  # an injected slow compile
    try:
        if request["op"] == "partition":
            from .partition import plan

            return {"ok": True, **plan(request)}
        if request.get("target", "npu-emu") != "npu-emu":
            return _for_target(request, started)
        config = DeviceConfig.from_dict(request["config"])
        if request["op"] == "check":
            problems = [{"node": e.node or "", "op": e.op or "", "reason": e.reason}
                        for e in check_model(request["model"], config)]
            return {"ok": True, "problems": problems}
        exe = compile_model(request["model"], config, request.get("options") or None)
        return {"ok": True, "executable": exe.to_bytes(), "seconds": time.perf_counter() - started}
    except Exception as exc:  # MemoryError too: every failure is this compile's, not the worker's
        return {"ok": False, "error": _error(exc)}


def _for_target(request: dict, started: float) -> dict:
    """A request for a target other than npu-emu's: through the target registry (npud/targets)."""
    from npud import targets

    target = targets.target(request["target"])
    if request["op"] == "check":
        try:
            answers = target.support(request["model"], request["config"])
        except CompileError as exc:   # a problem of the whole model (npu-emu's answers the same way)
            return {"ok": True, "problems": [{"node": exc.node or "", "op": exc.op or "", "reason": exc.reason}]}
        return {"ok": True, "problems": [{"node": s.node, "op": s.op, "reason": s.reason}
                                         for s in answers if not s.supported]}
    return {"ok": True, "executable": target.compile(request["model"], request["config"], request.get("options") or {}),
            "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="npud compiler worker (started by npud)")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--memory-limit", type=int, default=0,
                        help="RLIMIT_AS in bytes of a compile whose request names none (0: none)")
    parser.add_argument("--memory-max", type=int, default=0,
                        help="the hard RLIMIT_AS: no request may raise a compile's past it (0: --memory-limit)")
    parser.add_argument("--test-mode", action="store_true", help="honour slow_s (npud --test-mode only)")
    args = parser.parse_args(argv)
    _limit_resources(args.memory_max or args.memory_limit)
    # Before any thread starts (ZeroMQ's I/O thread, BLAS's) and before the compiler is imported:
    # Landlock confines only the calling thread and those it starts later.
    from npud import targets
    targets.installed()   # the registry's listing, read while the entry points' files are still readable
    confinement = sandbox.confine()
    from . import api  # noqa: F401 -- the compiler, imported from inside the confinement
    sock = zmq.Context().socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, args.name.encode())
    sock.setsockopt(zmq.LINGER, 1000)
    dropped = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)   # before connect: no event missed
    sock.connect(args.endpoint)
    sock.send(msgpack.packb({"op": "ready", "confinement": confinement}))
    # No watch on the daemon here: the lifeline it was started through (npud/lifeline.py)
    # ends this process when the daemon dies, busy or idle.
    return _serve(sock, dropped, args.test_mode, args.memory_limit)


def _serve(sock: zmq.Socket, dropped: zmq.Socket, test_mode: bool, memory_limit: int = 0) -> int:
    """Answer requests until the daemon says exit (0) or the connection drops (LOST_CONNECTION).

    A dropped connection means a request may be lost unseen: when a model does not fit the
    worker's RLIMIT_AS, ZeroMQ's I/O thread fails to allocate the incoming message, drops the
    connection and quietly reconnects, and the daemon would wait for an answer until its compile
    time limit.  Exiting instead lets the daemon see the worker die and fail the compile at once,
    naming the memory limit, and its replacement starts clean.
    """
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(dropped, zmq.POLLIN)
    while True:
        ready = dict(poller.poll())
        if dropped in ready and recv_monitor_message(dropped)["event"] == zmq.EVENT_DISCONNECTED:
            print("npud compiler worker: the connection to the daemon dropped (a request too large "
                  "for this worker's memory limit, or the daemon closed it); exiting",
                  file=sys.stderr, flush=True)
            return LOST_CONNECTION
        if sock not in ready:
            continue
        # copy=False: the model is read where ZeroMQ received it, through memoryviews that keep
        # their frames alive (a copy into bytes was ~70 ms of CPU for a 100 MB model; a 2 GiB
        # model must not be held twice)
        request = bulk.from_frames([frame.buffer for frame in sock.recv_multipart(copy=False)])
        if request.get("op") == "exit":
            return 0
        with _address_space(int(request.get("memory_bytes") or memory_limit)):
            reply = handle(request, test_mode)
        reply["id"] = request["id"]
        sock.send_multipart(bulk.to_frames(reply, "executable"), copy=False)

if __name__ == "__main__":
    sys.exit(main())
