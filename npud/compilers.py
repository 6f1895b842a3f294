"""The compiler worker pool: supervised processes that turn models into executables.

The daemon never parses a model.  ``CompilerPool`` runs up to ``size`` worker
processes (npud/compiler_worker/worker.py), started on first use, each connected over ZeroMQ to a ROUTER
the pool binds on a private ipc endpoint, and hands each compile to an idle
worker.  A worker that crashes, exceeds its memory limit or its time limit
fails that one compile with a clear error and is replaced; other compiles
carry on.  One task owns the ROUTER; one task per worker supervises it.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass, field

import trio
import zmq

from npud import lifeline
from npud.config import compile_memory_limit
from npud.ipc_schema import bulk
from npud.ipc_schema.errors import ErrorCode, RequestError
from npud.ipc_schema.trio_zmq import OwnedSocket
from npud.ipc_schema.types import Array, Bin, Bool, F, FieldError, Float, Int, MapOf, Str, Struct

log = logging.getLogger("npud.compile")

READY_TIMEOUT_S = 60.0
DIR_PREFIX = "npud-compile-"   # then the daemon's pid: a later daemon can tell a dead one's directory


@dataclass(eq=False)
class _Pending:
    request: dict
    timeout_s: float
    done: trio.Event = field(default_factory=trio.Event)
    reply: dict | None = None
    frames: list | None = None     # a large reply, decoded off the event loop by its waiter

    @property
    def answered(self) -> bool:
        return self.reply is not None or self.frames is not None


LARGE_REPLY_BYTES = 1 << 20   # a reply this large is decoded in a thread (the executable's own frame counts)


# What a worker may answer (npud/compiler_worker/worker.py).  A worker parses untrusted models, so
# its replies are checked like a client's requests before the daemon acts on one.
_TEXT = Str(1 << 16)
U64 = Int(0, 2**64 - 1)
_FAILURE = Struct("compile_failure", {
    "ok": F(Bool(), "false"),
    "error": F(Struct("compile_error", {"code": F(Str(32), "an npud error code name"),
                                        "message": F(_TEXT, "why, for a person"),
                                        "node": F(_TEXT, "the node", optional=True),
                                        "op": F(_TEXT, "its op", optional=True)}), "why")})
WORKER_REPLIES = {
    "compile": Struct("compile_reply", {"ok": F(Bool(), "true"), "executable": F(Bin(1 << 40), "the container"),
                                        "seconds": F(Float(), "the worker's time", optional=True)}),
    "check": Struct("check_reply", {"ok": F(Bool(), "true"), "problems": F(Array(Struct("problem", {
        "node": F(_TEXT, "the node"), "op": F(_TEXT, "its op"), "reason": F(_TEXT, "why")}), 1 << 20),
        "every problem")}),
    "partition": Struct("partition_reply", {
        "ok": F(Bool(), "true"),
        "nodes": F(Array(Struct("placement", {
            "node": F(_TEXT, "the node"), "op": F(_TEXT, "its op"), "target": F(Str(64), "the target it runs on"),
            "reason": F(_TEXT, "why not on the NPU target (empty when it is)"),
            "macs": F(U64, "its multiply-accumulates")}), 1 << 20), "one placement per node"),
        "partitions": F(Array(Struct("partition", {
            "target": F(Str(64), "its target"), "model": F(Bin(1 << 40), "the ONNX submodel"),
            "inputs": F(Array(_TEXT, 1 << 16), "its boundary inputs"),
            "outputs": F(Array(_TEXT, 1 << 16), "its boundary outputs")}), 1 << 16),
            "in run order; empty when the NPU target runs every node"),
        "tensors": F(MapOf(Struct("boundary_tensor", {
            "dtype": F(Str(16), "numpy dtype name"), "shape": F(Array(Int(0, 2**62), 64), "static shape")}),
            1 << 16), "the boundary tensors"),
        "inputs": F(Array(_TEXT, 1 << 16), "the model's inputs that partitions read, in order"),
        "outputs": F(Array(_TEXT, 1 << 16), "the model's outputs, in order"),
        "declared": F(MapOf(Struct("declared_dims", {
            "symbolic": F(Array(Str(128), 64), "per dimension: a symbolic one's name, or empty"),
            "defaulted": F(Array(Int(0, 63), 64), "the symbolic dimensions set to 1", optional=True)}), 1 << 16),
            "what the model declares of its inputs' and outputs' dimensions (those with symbolic ones)",
            optional=True),
    }),
}


def checked_reply(op: str, message) -> dict:
    """A worker's reply to request ``op`` as the daemon may act on it; a malformed one becomes an EIO
    failure of that compile (the worker is then at fault, not the model's author)."""
    schema = _FAILURE if type(message) is dict and message.get("ok") is False else WORKER_REPLIES[op]
    try:
        schema.check(message, f"{op} reply", strict=False)
        return message   # fields a newer worker adds pass through
    except FieldError as exc:
        return _malformed(exc)


class CompilerPool:
    def __init__(self, size: int, memory_limit: int, timeout_s: float, test_mode: bool = False, *,
                 memory_scale: float = 0.0, memory_max: int = 0):
        self.size = size
        self.test_mode = test_mode  # workers honour a request's slow_s (inject_fault slow_compile)
        # A compile's RLIMIT_AS is memory_limit + memory_scale x its model's size, at most memory_max
        self.memory_limit = memory_limit
        self.memory_scale = memory_scale
        self.memory_max = max(memory_max, memory_limit)
        self.timeout_s = timeout_s
        self.restarts = 0
        self.compiles = 0
        remove_stale_dirs(tempfile.gettempdir())
        self._dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
        self.endpoint = f"ipc://{self._dir}/workers.sock"
        self._backlog: collections.deque[_Pending] = collections.deque()   # compiles no worker has taken yet
        self._idle: dict[bytes, trio.MemorySendChannel] = {}   # an idle worker's supervisor -> its inbox
        self._warm: set[bytes] = set()                          # workers whose process is running
        self._waiting: dict[bytes, _Pending] = {}
        self._ready: dict[bytes, trio.Event] = {}
        self._owned: OwnedSocket | None = None
        self._ids = itertools.count(1)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.bind(self.endpoint)
        os.chmod(self._dir, 0o700)
        self._owned = OwnedSocket(sock, self._on_frames)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._owned.run)
                for i in range(self.size):
                    nursery.start_soon(self._supervise, f"w{i}".encode())
                task_status.started()
        finally:
            sock.close()
            try:
                os.unlink(self.endpoint[len("ipc://"):])
                os.rmdir(self._dir)
            except OSError:
                pass

    async def compile(self, request: dict) -> dict:
        """Send ``request`` to a worker; its reply, or RequestError if the worker failed.  ENOMEM
        without asking one when its model needs more memory than any compile may have."""
        if self.memory_limit and request.get("model") is not None:
            request["memory_bytes"] = compile_memory_limit(self.memory_limit, self.memory_scale,
                                                           len(request["model"]))
            if request["memory_bytes"] > self.memory_max:
                return self._too_large(len(request["model"]), request["memory_bytes"])
        pending = _Pending(request, self.timeout_s)
        self._dispatch(pending)
        await pending.done.wait()
        if pending.frames is not None:
            pending.reply = await trio.to_thread.run_sync(self._decode, pending)
        return pending.reply

    @staticmethod
    def _decode(pending: _Pending) -> dict:
        """A large reply's message, checked (a partition plan carries every submodel: ~60 ms per
        100 MB to unpack, not on the event loop)."""
        try:
            message = bulk.from_frames(pending.frames)
        except bulk.MalformedFrames as exc:
            return _malformed(exc)
        if message.get("id") != pending.request["id"]:
            return _failure(ErrorCode.EIO, "the compiler worker answered another request; retry")
        return checked_reply(pending.request["op"], message)

    def _too_large(self, size: int, need: int) -> dict:
        return _failure(ErrorCode.ENOMEM, f"compiling this {size >> 20} MiB model would need {need >> 20} MiB "
                                          f"of address space (compile_memory_bytes {self.memory_limit >> 20} MiB + "
                                          f"compile_memory_scale {self.memory_scale:g} x the model), more than "
                                          f"compile_memory_max_bytes ({self.memory_max >> 20} MiB) allows: raise "
                                          "compile_memory_max_bytes in npud.toml if the host has the memory",
                        retryable=False)

    def _on_frames(self, frames: list) -> None:
        name = frames[0]
        pending = self._waiting.get(name)
        if pending is not None and not pending.answered and sum(map(len, frames[1:])) >= LARGE_REPLY_BYTES:
            pending.frames = frames[1:]   # a worker has one request at a time: this is its answer
            pending.done.set()
            return
        try:
            message = bulk.from_frames(frames[1:])
        except bulk.MalformedFrames as exc:
            log.error("compiler worker %s sent a malformed message (%s)", name.decode(errors="replace"), exc)
            return
        if message.get("op") == "ready":
            log.info("compiler worker %s started, confined to %s", name.decode(errors="replace"),
                     str(message.get("confinement", "?"))[:2000])
            event = self._ready.get(name)
            if event is not None:
                event.set()
            return
        if pending is not None and message.get("id") == pending.request["id"]:
            pending.reply = checked_reply(pending.request["op"], message)
            pending.done.set()

    def _dispatch(self, pending: _Pending) -> None:
        """Give ``pending`` to an idle worker whose process is running if there is one, else to an
        idle one that must start first, else keep it for the first worker to finish: a second
        compile must not pay a worker's start (1-3 s of imports) while a started one is idle."""
        warm = [n for n in self._idle if n in self._warm]
        # A worker whose reply has arrived is about to be idle: it takes one compile each
        finishing = sum(p.done.is_set() for p in self._waiting.values())
        if not self._idle or (not warm and len(self._backlog) < finishing):
            self._backlog.append(pending)
            return
        name = warm[0] if warm else next(iter(self._idle))
        self._idle.pop(name).send_nowait(pending)

    async def _next(self, name: bytes) -> _Pending:
        """The next compile for worker ``name``: the oldest waiting one, else the next dispatched."""
        if self._backlog:
            return self._backlog.popleft()
        inbox, receive = trio.open_memory_channel[_Pending](1)
        self._idle[name] = inbox
        try:
            return await receive.receive()
        finally:
            self._idle.pop(name, None)

    async def _supervise(self, name: bytes) -> None:
        """Feed one worker compiles, one at a time; start it on first use, replace it when it fails.

        Workers start lazily: a daemon that never compiles never pays for them.
        """
        process: trio.Process | None = None
        try:
            while True:
                if process is not None and process.poll() is None:
                    self._warm.add(name)
                else:
                    self._warm.discard(name)
                pending = await self._next(name)
                if process is not None and process.poll() is not None:
                    await self._retire(name, process)  # died while idle: not this compile's fault
                    process = None
                if process is None:
                    process = await self._start(name)
                    if process is None:
                        pending.reply = _failure(ErrorCode.EIO, "the compiler worker did not start; "
                                                                "see npud's log")
                        pending.done.set()
                        await trio.sleep(1.0)  # a worker that cannot start must not spin the CPU
                        continue
                if not await self._run_one(name, process, pending):
                    await self._retire(name, process)
                    process = None
        finally:
            if process is not None:
                with trio.CancelScope(shield=True):
                    process.kill()
                    await process.wait()

    async def _start(self, name: bytes) -> trio.Process | None:
        self._ready[name] = trio.Event()
        try:
            process = await lifeline.open_process(
                "npud.compiler_worker.worker", ["--endpoint", self.endpoint, "--name", name.decode(),
                                           "--memory-limit", str(self.memory_limit),
                                           "--memory-max", str(self.memory_max)]
                + (["--test-mode"] if self.test_mode else []))
        except OSError as exc:   # out of file descriptors or processes: fail this compile, not npud
            log.error("cannot start compiler worker %s: %s", name.decode(), exc)
            return None
        with trio.move_on_after(READY_TIMEOUT_S):
            await self._ready[name].wait()
        if self._ready[name].is_set():
            return process
        log.error("compiler worker %s did not announce itself within %.0f s", name.decode(), READY_TIMEOUT_S)
        await self._retire(name, process)
        return None

    async def _release_sent(self, name: bytes) -> None:
        """Let go of the request's zero-copy frames once libzmq has written them to the worker:
        the model (a 2 GiB model's private copy) is freed while it compiles, not after."""
        while self._owned.queued_bytes(name):
            await trio.sleep(0.1)

    async def _retire(self, name: bytes, process: trio.Process) -> None:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
        self.restarts += 1
        log.warning("compiler worker %s exited (status %s); a new one starts with the next compile",
                    name.decode(), process.returncode)

    async def _run_one(self, name: bytes, process: trio.Process, pending: _Pending) -> bool:
        """Run one compile on this worker; False if the worker must be replaced."""
        pending.request["id"] = next(self._ids)
        self._waiting[name] = pending
        self._owned.send([name, *bulk.to_frames(pending.request, "model")])
        pending.request.pop("model", None)   # its frame holds it until sent (_release_sent)
        died = False
        try:
            with trio.move_on_after(pending.timeout_s):
                async with trio.open_nursery() as nursery:
                    async def watch():
                        nonlocal died
                        await process.wait()
                        died = True
                        # not pending.done: its waiter would wake before the failure reply is set
                        nursery.cancel_scope.cancel()
                    nursery.start_soon(watch)
                    nursery.start_soon(self._release_sent, name)
                    await pending.done.wait()
                    nursery.cancel_scope.cancel()
        finally:
            del self._waiting[name]
        self.compiles += 1
        if pending.answered:
            return True
        if died:
            how = (f"was killed by signal {-process.returncode}" if process.returncode < 0
                   else f"exited with status {process.returncode}")
            memory = pending.request.get("memory_bytes", self.memory_limit)
            limit = (f" or its memory limit of {memory >> 20} MiB (compile_memory_bytes"
                     f"{' + compile_memory_scale x the model' if memory > self.memory_limit else ''})"
                     if self.memory_limit else "")
            pending.reply = _failure(ErrorCode.EIO, f"the compiler worker {how} while compiling "
                                                    f"this model (a crash{limit}); retry, or report "
                                                    "the model")
        else:
            pending.reply = _failure(ErrorCode.ETIMEDOUT, f"compiling took longer than the "
                                                          f"{pending.timeout_s:g} s limit; the worker was "
                                                          "stopped (raise compile_timeout_s for huge models)")
        pending.done.set()
        return False


def remove_stale_dirs(parent: str) -> list[str]:
    """Remove the endpoint directories that SIGKILLed daemons of this user left in ``parent``.

    Several daemons may share ``parent`` (tests run many at once), so a directory goes only if it
    is this user's, its name carries the pid of a process that no longer exists, and nothing
    listens on its endpoint (a pid can be another pid namespace's).  Returns the paths removed.
    """
    removed = []
    for entry in os.scandir(parent):
        match = re.fullmatch(re.escape(DIR_PREFIX) + r"(\d+)-\w+", entry.name)
        try:
            if match is None or not _owned_dir(entry) or _pid_exists(int(match[1])) \
                    or _listening(os.path.join(entry.path, "workers.sock")):
                continue
        except OSError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    if removed:
        log.info("removed %d compile endpoint directories of dead daemons", len(removed))
    return removed


def _owned_dir(entry: os.DirEntry) -> bool:
    info = entry.stat(follow_symlinks=False)
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # someone else's process
    return True


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        return True


def _malformed(exc: Exception) -> dict:
    """The failure of a compile whose worker broke the protocol: the worker's fault, not the model's."""
    return _failure(ErrorCode.EIO, f"the compiler worker sent a malformed reply ({exc}); retry, or report the model")


def _failure(code: ErrorCode, message: str, retryable: bool | None = None) -> dict:
    error = {"code": code.value, "message": message, "node": "", "op": ""}
    return {"ok": False, "error": error if retryable is None else {**error, "retryable": retryable}}


def raise_for(reply: dict) -> dict:
    """The reply of a successful compile, or RequestError with the worker's error."""
    if reply["ok"]:
        return reply
    err = reply["error"]
    code = ErrorCode(err["code"]) if err["code"] in ErrorCode.__members__ else ErrorCode.EIO
    raise RequestError(code, err["message"], retryable=err.get("retryable"))
