"""One function per op.  Arguments arrive validated against ipc_schema.schema.

Each handler takes ``(daemon, call, args)`` -- ``call`` says who asked (the
connection's routing id, its session, the request's seq) -- and returns the
result map or raises ``RequestError``.  ``HANDLERS`` maps op names to
``(function, waits)``: plain functions run inline in the socket's owner task
and must not block; ``waits=True`` ones are coroutines run as tasks.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import trio

from emulator.errors import StreamError
from emulator.validator import Mapping, validate
from ipc_schema import codec
from ipc_schema.errors import ErrorCode, RequestError
from ipc_schema.schema import MAX_INLINE_BYTES, OPS, PROTOCOL_VERSION

from . import __version__
from .jobs import Job
from .memory import round_up

if TYPE_CHECKING:
    from .server import Call, Daemon
    from .sessions import Session

HANDLERS: dict[str, tuple[Any, bool]] = {}
THREAD_THRESHOLD = 1 << 20  # bytes of copying/validation worth moving off the event loop


def handler(name: str, *, waits: bool = False):
    assert name in OPS, name

    def register(fn):
        HANDLERS[name] = (fn, waits)
        return fn
    return register


def _buffer(session: "Session", handle: int):
    bo = session.buffers.get(handle)
    if bo is None:
        raise RequestError(ErrorCode.ENOENT, f"no buffer with handle {handle} in this session")
    return bo


def _span(bo, offset: int, size: int, what: str) -> slice:
    if offset + size > bo.size:
        raise RequestError(ErrorCode.EINVAL, f"{what} of {size} bytes at offset {offset} runs past the "
                                             f"end of the {bo.size}-byte buffer")
    return slice(offset, offset + size)


@handler("hello")
def hello(daemon: "Daemon", call: "Call", args):
    session = call.session
    codec.check_version(args["protocol"], side="the client")
    if session is not None:
        raise RequestError(ErrorCode.EINVAL, f"this connection already has session {session.id}; "
                                             "send bye before hello")
    if len(daemon.sessions) >= daemon.config.limits.max_sessions:
        raise RequestError(ErrorCode.EAGAIN, f"npud serves at most {daemon.config.limits.max_sessions} "
                                             "sessions; retry later")
    session = daemon.sessions.create(call.routing_id, args["client_name"], args["pid"])
    limits = daemon.config.limits
    return {
        "session": session.id, "protocol": list(PROTOCOL_VERSION), "daemon_version": __version__,
        "lease_ms": limits.lease_ms, "attach_path": daemon.attach_path or "",
        "attach_token": session.token,
        "limits": {"max_message_bytes": codec.MAX_MESSAGE_BYTES, "max_inline_bytes": MAX_INLINE_BYTES,
                   "max_buffer_bytes": limits.max_buffer_bytes, "memory_quota": limits.memory_quota},
    }


@handler("bye")
def bye(daemon, call, args):
    daemon.close_session(call.session, "bye")
    return {}


@handler("ping")
def ping(daemon, call, args):
    return {}


@handler("version")
def version(daemon, call, args):
    return {"daemon_version": __version__, "protocol": list(PROTOCOL_VERSION)}


@handler("devices")
def devices(daemon, call, args):
    return {"devices": [d.info() for d in daemon.devices]}


@handler("clients")
def clients(daemon, call, args):
    return {"clients": [s.info() for s in daemon.sessions]}


@handler("status")
def status(daemon, call, args):
    return {"daemon_version": __version__, "protocol": list(PROTOCOL_VERSION), "pid": os.getpid(),
            "uptime_s": time.monotonic() - daemon.started, "endpoint": daemon.endpoint,
            **devices(daemon, call, args), **clients(daemon, call, args)}


@handler("alloc")
def alloc(daemon, call, args):
    session = call.session
    device = daemon.device(args["device"])
    size = args["size"]
    limits = daemon.config.limits
    if size > limits.max_buffer_bytes:
        raise RequestError(ErrorCode.EINVAL, f"cannot allocate {size} bytes: one buffer may be at most "
                                             f"{limits.max_buffer_bytes} bytes (limits.max_buffer_bytes)")
    charged = round_up(size, device.config.page_size)  # quotas count real device memory
    if session.memory + charged > limits.memory_quota:
        raise RequestError(ErrorCode.EDQUOT, f"allocating {size} bytes ({charged} with page rounding) would "
                                             f"bring this session to {session.memory + charged} bytes of "
                                             f"its {limits.memory_quota}-byte quota; free buffers first")
    bo = device.memory.allocate(size)
    handle = session.new_handle()
    session.buffers[handle] = bo
    session.memory += bo.mapped_size
    return {"handle": handle, "size": bo.size}


@handler("free")
def free(daemon, call, args):
    session = call.session
    bo = _buffer(session, args["handle"])
    del session.buffers[args["handle"]]
    session.memory -= bo.mapped_size
    daemon.unref(bo)  # jobs still using it keep it alive until they finish
    return {}


@handler("write", waits=True)
async def write(daemon, call, args):
    session = call.session
    bo = _buffer(session, args["handle"])
    data = args["data"]
    span = _span(bo, args["offset"], len(data), "write")
    if len(data) >= THREAD_THRESHOLD:
        bo.refs += 1  # a concurrent free must not unmap it under the copy
        try:
            await trio.to_thread.run_sync(bo.view().__setitem__, span, data)
        finally:
            daemon.unref(bo)
    else:
        bo.view()[span] = data
    return {}


@handler("read", waits=True)
async def read(daemon, call, args):
    session = call.session
    bo = _buffer(session, args["handle"])
    span = _span(bo, args["offset"], args["size"], "read")
    if args["size"] >= THREAD_THRESHOLD:
        bo.refs += 1
        try:
            return {"data": await trio.to_thread.run_sync(bytes, bo.view()[span])}
        finally:
            daemon.unref(bo)
    return {"data": bytes(bo.view()[span])}


@handler("map", waits=True)
async def map_(daemon, call, args):
    session = call.session
    from .attach import send_fd

    bo = _buffer(session, args["handle"])
    if session.attach is None:
        raise RequestError(ErrorCode.ENOTCONN, "map needs the companion socket: connect to attach_path "
                                               "and present attach_token first (local clients only)")
    bo.exported = True
    await send_fd(session, call.seq, args["handle"], bo)
    return {"size": bo.size, "mapped_size": bo.mapped_size}


@handler("submit", waits=True)
async def submit(daemon, call, args):
    session = call.session
    device = daemon.device(args["device"])
    if session.jobs_in_flight >= daemon.config.limits.max_jobs_in_flight:
        raise RequestError(ErrorCode.EAGAIN, f"this session has {session.jobs_in_flight} jobs in flight, "
                                             "the limit; wait for some to finish")
    page = device.config.page_size
    bindings, mappings, spans = [], [], []
    for i, b in enumerate(args["bindings"]):
        bo = _buffer(session, b["handle"])
        if bo.device != device.index:
            raise RequestError(ErrorCode.EINVAL, f"bindings[{i}]: buffer {b['handle']} lives on device "
                                                 f"{bo.device}, not {device.index}")
        if b["va"] % page:
            raise RequestError(ErrorCode.EINVAL, f"bindings[{i}]: va {b['va']:#x} is not a multiple of "
                                                 f"the page size {page}")
        spans.append((b["va"], b["va"] + bo.mapped_size, i))
        bindings.append((bo, b["va"], b["writable"]))
        mappings.append(Mapping(b["va"], bo.mapped_size, b["writable"]))
    spans.sort()
    for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
        if start < end:
            raise RequestError(ErrorCode.EINVAL, f"bindings[{j}] overlaps bindings[{i}] in the address space")
    stream = args["stream"]
    try:
        if len(stream) >= THREAD_THRESHOLD:
            await trio.to_thread.run_sync(validate, stream, device.config, mappings)
        else:
            validate(stream, device.config, mappings)
    except StreamError as exc:
        raise RequestError(ErrorCode.EINVAL, f"command stream refused: {exc.message}") from None
    if session.closed:
        raise RequestError(ErrorCode.ENOTCONN, "the session closed")
    for bo, _va, _w in bindings:
        bo.refs += 1
    job = Job(session.new_job_id(), session.id, device.index, stream, bindings)
    session.jobs_in_flight += 1
    session.jobs_submitted += 1
    session.remember_job(job)
    device.submit(job)
    return {"job": job.id}


@handler("wait", waits=True)
async def wait(daemon, call, args):
    job = call.session.jobs.get(args["job"])
    if job is None:
        raise RequestError(ErrorCode.ENOENT, f"no job {args['job']} in this session (finished jobs are "
                                             "kept for the last 1024)")
    with trio.move_on_after(args["timeout_ms"] / 1000):
        await job.done.wait()
    if daemon.stopping and job.state in ("queued", "running"):  # woken by the shutdown
        raise RequestError(ErrorCode.ESHUTDOWN, f"npud stopped before job {job.id} finished; "
                                                "submit it again once it is back")
    if not job.done.is_set():
        raise RequestError(ErrorCode.ETIMEDOUT, f"job {job.id} is still {job.state} after "
                                                f"{args['timeout_ms']} ms")
    result = {"state": job.state, "stats": job.stats}
    if job.error is not None:
        result["error"] = job.error.to_wire()
    return result
