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

from . import __version__, policy
from .jobs import Job
from .memory import round_up
from .compile_cache import model_digest
from .models import check_layout, instantiate

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
    now = time.monotonic()
    return {"clients": [{**s.info(), **s.usage_info(now, daemon.devices)} for s in daemon.sessions]}


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
    _check_admission(daemon, session)
    bindings, mappings = [], []
    for i, b in enumerate(args["bindings"]):
        bo = _buffer(session, b["handle"])
        if bo.device != device.index:
            raise RequestError(ErrorCode.EINVAL, f"bindings[{i}]: buffer {b['handle']} lives on device "
                                                 f"{bo.device}, not {device.index}")
        bindings.append((bo, b["va"], b["writable"]))
        mappings.append(Mapping(b["va"], bo.mapped_size, b["writable"]))
    check_layout([(m.va, m.size, f"bindings[{i}]") for i, m in enumerate(mappings)], device.config.page_size)
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
    return {"job": _queue_job(daemon, session, device, stream, bindings)}


def _check_admission(daemon, session) -> None:
    if session.jobs_in_flight >= daemon.config.limits.max_jobs_in_flight:
        raise RequestError(ErrorCode.EAGAIN, f"this session has {session.jobs_in_flight} jobs in flight, "
                                             "the limit; wait for some to finish")


def _queue_job(daemon, session, device, stream: bytes, bindings, program: int | None = None,
               model=None) -> int:
    for bo, _va, _w in bindings:
        bo.refs += 1
    job = Job(session.new_job_id(), session.id, device.index, stream, bindings, program=program,
              pid=session.pid, client=session.name)
    if model is not None:  # what `jobs` and `trace` show of it
        job.model, job.layers = model.id, model.exe.ops
        job.model_name = str(model.exe.meta.get("model_name", ""))[:256]
    session.jobs_in_flight += 1
    session.jobs_submitted += 1
    session.remember_job(job)
    device.submit(job)
    return job.id


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


# --- models --------------------------------------------------------------------------


def _model_source(session: "Session", args):
    """(inline bytes, None) or (None, (buffer, span)) for the model of a load/check."""
    if ("model" in args) == ("model_buffer" in args):
        raise RequestError(ErrorCode.EINVAL, "give exactly one of model (inline bytes) or model_buffer")
    if "model" in args:
        if "model_size" in args:
            raise RequestError(ErrorCode.EINVAL, "model_size goes with model_buffer only")
        return args["model"], None
    bo = _buffer(session, args["model_buffer"])
    return None, (bo, _span(bo, 0, args.get("model_size", bo.size), "model_size"))


async def _copy_model(bo, span: slice) -> tuple[bytes | bytearray, bytes | None]:
    """A private copy of a model in a buffer (its client may change the buffer meanwhile),
    and the copy's compile-cache digest when it was worth computing on the way."""
    if span.stop - span.start < THREAD_THRESHOLD:
        return bytes(bo.view()[span]), None
    data = bytearray(span.stop - span.start)
    return data, await trio.to_thread.run_sync(model_digest, bo.view()[span], data)


def _model(session: "Session", model_id: int):
    model = session.models.get(model_id)
    if model is None:
        raise RequestError(ErrorCode.ENOENT, f"no loaded model {model_id} in this session")
    return model


@handler("load", waits=True)
async def load(daemon, call, args):
    session = call.session
    device = daemon.device(args["device"])
    data, source = _model_source(session, args)
    if source is None:
        exe, cached, ms = await daemon.loader.executable(data, args.get("options", {}), device.config)
    else:
        bo, span = source
        bo.refs += 1  # a concurrent free must not unmap it under the hashing or the copy
        try:
            exe, cached, ms = await daemon.loader.executable(
                bo.view()[span], args.get("options", {}), device.config,
                private_copy=lambda: _copy_model(bo, span))
        finally:
            daemon.unref(bo)
    if session.closed:
        raise RequestError(ErrorCode.ENOTCONN, "the session closed")
    model = await instantiate(session, device, exe, session.new_handle(), daemon.config.limits.memory_quota)
    if session.closed:  # it went away while the stream was being validated
        daemon.unload_model(model)
        raise RequestError(ErrorCode.ENOTCONN, "the session closed")
    session.models[model.id] = model
    return model.info(cached, ms)


@handler("check", waits=True)
async def check(daemon, call, args):
    device = daemon.device(args["device"])
    data, source = _model_source(call.session, args)
    if source is not None:
        bo, span = source
        bo.refs += 1
        try:
            data, _digest = await _copy_model(bo, span)
        finally:
            daemon.unref(bo)
    return {"problems": await daemon.loader.check(data, device.config)}


@handler("run_model")
def run_model(daemon, call, args):
    session = call.session
    model = _model(session, args["model"])
    _check_admission(daemon, session)
    bindings = list(model.fixed)
    for kind, entries, handles, writable in (("inputs", model.inputs, args["inputs"], False),
                                             ("outputs", model.outputs, args["outputs"], True)):
        if len(handles) != len(entries):
            raise RequestError(ErrorCode.EINVAL, f"the model has {len(entries)} {kind}, "
                                                 f"got {len(handles)} buffers")
        for entry, handle in zip(entries, handles):
            bo = _buffer(session, handle)
            region = model.regions[f"{kind[:-1]}:{entry['name']}"]
            if bo.device != model.device or bo.size < entry["size"] or bo.mapped_size > round_up(
                    max(region["size"], 1), daemon.devices[model.device].config.page_size):
                raise RequestError(ErrorCode.EINVAL, f"{kind[:-1]} {entry['name']!r} needs a buffer of "
                                                     f"{entry['size']} bytes on device {model.device}; "
                                                     f"buffer {handle} has {bo.size} on device {bo.device}")
            bindings.append((bo, entry["va"], writable))
    return {"job": _queue_job(daemon, session, daemon.devices[model.device], b"", bindings, model.program,
                              model=model)}


@handler("report")
def report(daemon, call, args):
    rep = _model(call.session, args["model"]).exe.report()
    return {"rows": list(rep.rows), "table": rep.table}


@handler("unload")
def unload(daemon, call, args):
    model = _model(call.session, args["model"])
    del call.session.models[model.id]
    call.session.memory -= daemon.unload_model(model)
    return {}


@handler("cache_list", waits=True)
async def cache_list(daemon, call, args):
    await daemon.loader.settled()
    return {"directory": str(daemon.loader.cache.directory),
            "entries": await trio.to_thread.run_sync(daemon.loader.cache.entries)}


@handler("cache_clear", waits=True)
async def cache_clear(daemon, call, args):
    await daemon.loader.settled()
    return {"removed": await trio.to_thread.run_sync(daemon.loader.cache.clear)}


# --- inspection and administration (npuctl) ----------------------------------------


def _sessions(daemon, args) -> list:
    if "device" in args:
        daemon.device(args["device"])  # ENODEV for a device that does not exist
    if "session" not in args:
        return list(daemon.sessions)
    session = daemon.sessions.by_id(args["session"])
    if session is None:
        raise RequestError(ErrorCode.ENOENT, f"no session {args['session']!r} (see `npuctl clients`)")
    return [session]


@handler("jobs")
def jobs(daemon, call, args):
    device = args.get("device")
    records = []
    for session in _sessions(daemon, args):
        for job in session.jobs.values():
            if device is None or job.device == device:
                record = daemon.job_record(job)
                record.pop("layers", None)
                records.append(record)
    records.sort(key=lambda r: r["submitted_s"])
    return {"now_s": time.monotonic() - daemon.started, "jobs": records[-args.get("limit", 1024):]}


@handler("buffers")
def buffers(daemon, call, args):
    device = args.get("device")
    out = []

    def add(session, bo, handle, kind, model):
        if device is None or bo.device == device:
            out.append({"session": session.id, "pid": session.pid, "device": bo.device, "handle": handle,
                        "kind": kind, "model": model, "size": bo.size, "mapped_size": bo.mapped_size,
                        "exported": bo.exported, "jobs": max(0, bo.refs - 1)})
    for session in _sessions(daemon, args):
        for handle, bo in sorted(session.buffers.items()):
            add(session, bo, handle, "buffer", 0)
        for model in session.models.values():
            for bo, _va, writable in model.fixed:
                add(session, bo, 0, "arena" if writable else "weights", model.id)
    return {"buffers": out}


@handler("trace")
def trace(daemon, call, args):
    events, dropped = daemon.trace.since(args["since"], args.get("limit", daemon.trace.capacity))
    out, models = [], {}
    for event in events:
        event = dict(event)
        layers = event.pop("layers", None)
        if layers is not None and (event["session"], event["model"]) not in models:
            models[(event["session"], event["model"])] = {
                "session": event["session"], "model": event["model"], "name": event["model_name"],
                "layers": [{"node": str(r.get("node", ""))[:1024], "op": str(r.get("op", ""))[:256],
                            "cycles": int(r.get("cycles", 0))} for r in layers]}
        out.append(event)
    return {"now_s": time.monotonic() - daemon.started,
            "next": out[-1]["seq"] if out else daemon.trace.last_seq, "dropped": dropped, "capacity": daemon.trace.capacity, "events": out,
            "models": list(models.values())}


@handler("kill_client")
def kill_client(daemon, call, args):
    policy.check_admin(call.session, "kill_client")
    target = daemon.sessions.by_id(args["session"])
    if target is None:
        raise RequestError(ErrorCode.ENOENT, f"no session {args['session']!r} (see `npuctl clients`)")
    result = {"session": target.id, "pid": target.pid, "buffers": len(target.buffers),
              "memory": target.memory}
    who = f"uid {call.session.uid}, pid {call.session.pid}"
    daemon.close_session(target, f"killed by an admin ({who})")
    return result


RESET_TIMEOUT_S = 30.0


@handler("reset_device", waits=True)
async def reset_device(daemon, call, args):
    policy.check_admin(call.session, "reset_device")
    device = daemon.device(args["device"])
    with trio.move_on_after(RESET_TIMEOUT_S):
        await device.reset_now(f"reset requested by an admin (uid {call.session.uid}, pid {call.session.pid})")
        return {"device": device.index, "resets": device.resets, "state": device.state}
    raise RequestError(ErrorCode.ETIMEDOUT, f"device {device.index} did not come back within "
                                            f"{RESET_TIMEOUT_S:.0f} s; see the daemon's log")
