"""One function per op.  Arguments arrive validated against npud.ipc_schema.schema.

Each handler takes ``(daemon, call, args)`` -- ``call`` says who asked (the
connection's routing id, its session, the request's seq) -- and returns the
result map or raises ``RequestError``.  ``HANDLERS`` maps op names to a
``Handler``: one that does not wait runs inline in the socket's owner task and
must not block; one that waits (for a job, a compile, a copy on a thread)
returns an awaitable, run as a task.  ``touches`` names the objects a request
works on, so that requests of one session on the same object take effect in the
order sent (npud/ordering.py, docs/PROTOCOL.md "Order").
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from npud.drivers import Binding, ProgramRejected
from npud.ipc_schema import codec
from npud.ipc_schema.errors import ErrorCode, ErrorInfo, RequestError
from npud.ipc_schema.schema import MAX_INLINE_BYTES, OPS, PROTOCOL_VERSION

from . import __version__, fences, hetero, policy
from .jobs import Job
from .scheduler import NORMAL, PRIORITIES, Context
from .memory import round_up
from .compile_cache import model_digest
from .models import check_layout, instantiate

if TYPE_CHECKING:
    from .server import Call, Daemon
    from .sessions import Session

THREAD_THRESHOLD = 1 << 20  # bytes of copying/validation worth moving off the event loop

# Keys of what a request touches (npud/ordering.py).  Buffers, models and contexts share one
# handle space per session, jobs have their own ids; JOBS stands for the session's job list.
JOBS = ("jobs",)


@dataclass(frozen=True)
class Handler:
    """How one op is run.  ``waits``: whether it returns an awaitable (a task), or a function of
    the args saying so per request.  ``touches(session, args)``: the keys of the objects it works
    on (None: nothing a later request of the session could observe out of order).  ``observes``:
    it takes effect when it starts (it only watches), so later requests on its objects need not
    wait for its end.  ``barrier``: it takes effect after every earlier request of the session.
    ``keeps(session, args)``: it queues work and then waits for it (its function returns an
    awaitable once the work is queued); later requests on its keys wait only until then, except
    on these keys, which they wait on until it is answered."""

    fn: Callable
    waits: bool | Callable[[dict], bool] = False
    touches: Callable[["Session", dict], tuple] | None = None
    observes: bool = False
    barrier: bool = False
    keeps: Callable[["Session", dict], tuple] | None = None

    def waits_for(self, args: dict) -> bool:
        return self.waits(args) if callable(self.waits) else self.waits


HANDLERS: dict[str, Handler] = {}


def handler(name: str, *, waits: bool | Callable[[dict], bool] = False, touches=None, observes: bool = False,
            barrier: bool = False, keeps=None):
    assert name in OPS, name

    def register(fn):
        HANDLERS[name] = Handler(fn, waits, touches, observes, barrier, keeps)
        return fn
    return register


# --- what requests touch --------------------------------------------------------------


def _handle_key(handle: int) -> tuple:
    return ("h", handle)


def _the_buffer(session, args) -> tuple:
    return (_handle_key(args["handle"]),)


def _the_model(session, args) -> tuple:
    return (_handle_key(args["model"]),)


def _job_keys(session, job_ids) -> list:
    """A job's key; and the job list's, for an id the session has not assigned yet (a client that
    predicts the id of a job it submitted but whose reply it has not read)."""
    keys = [("j", j) for j in job_ids]
    if any(j not in session.jobs and j not in session.imported for j in job_ids):
        keys.append(JOBS)
    return keys


def _the_job(session, args) -> tuple:
    return tuple(_job_keys(session, (args["job"],)))


def _the_jobs(session, args) -> tuple:
    return tuple(_job_keys(session, args["jobs"]))


def _new_job(session, args) -> tuple:
    """A request that makes a job (job ids and fence points follow the order sent) from buffers
    and a model, after other jobs."""
    keys = [JOBS, *_job_keys(session, args.get("after", ()))]
    keys += [_handle_key(b["handle"]) for b in args.get("bindings", ())]
    keys += [_handle_key(h) for h in (*args.get("inputs", ()), *args.get("outputs", ()))]
    if "model" in args:
        keys.append(_handle_key(args["model"]))
    return tuple(keys)


def _run_buffers(session, args) -> tuple:
    """A run's input and output buffers: what a request sent after it must see the run done with."""
    return tuple(_handle_key(h) for h in (*args["inputs"], *args["outputs"]))


def _model_buffer(session, args) -> tuple:
    handles = [args["model_buffer"]] if "model_buffer" in args else args.get("model_buffers", ())
    return tuple(_handle_key(h) for h in handles)


def _the_job_list(session, args) -> tuple:
    return (JOBS,)


def _big_write(args) -> bool:
    return len(args["data"]) >= THREAD_THRESHOLD


def _big_read(args) -> bool:
    return args["size"] >= THREAD_THRESHOLD


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
    policy.check_sessions(daemon.sessions, call.identity, daemon.config.limits)
    session = daemon.sessions.create(call.routing_id, args["client_name"], args["pid"], identity=call.identity)
    limits = daemon.config.limits
    return {
        "session": session.id, "protocol": list(PROTOCOL_VERSION), "daemon_version": __version__,
        "lease_ms": limits.lease_ms,
        "attach_path": (daemon.attach_path or "") if call.identity is None or call.identity.kind == "ipc" else "",
        "attach_token": session.token,
        "limits": {"max_message_bytes": codec.MAX_MESSAGE_BYTES, "max_inline_bytes": MAX_INLINE_BYTES,
                   "max_buffer_bytes": limits.max_buffer_bytes,
                   "memory_quota": min(limits.memory_quota, policy.active().quota_for(session.uid).memory
                                       or limits.memory_quota)},
    }


@handler("bye", barrier=True)
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
    return {"devices": [{**d.info(), "target_hash": d.config.target_hash()} for d in daemon.devices]}


@handler("clients")
def clients(daemon, call, args):
    now = time.monotonic()
    return {"clients": [{**s.info(), **s.usage_info(now, daemon.devices), **_context_info(s)}
                        for s in daemon.sessions]}


def _context_info(session) -> dict:
    default = session.contexts.get(0)
    return {"priority": default.priority_name if default is not None else "normal",
            "contexts": len([c for c in session.contexts if c]),
            "banned_contexts": sum(1 for c in session.contexts.values() if c.banned)}


@handler("status")
def status(daemon, call, args):
    return {"daemon_version": __version__, "protocol": list(PROTOCOL_VERSION), "pid": os.getpid(),
            "uptime_s": time.monotonic() - daemon.started, "endpoint": daemon.endpoint,
            **devices(daemon, call, args), **clients(daemon, call, args),
            "compile_cache": daemon.loader.cache.counters(), "users": daemon.usage.info()}


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
    policy.check_memory(daemon.sessions, session, charged)  # the user's quota, all its sessions
    if len(session.buffers) >= daemon.fds.max_per_session:
        raise RequestError(ErrorCode.EDQUOT, f"this session holds {len(session.buffers)} buffers, the most one "
                                             f"session may (npud's open-file limit allows {daemon.fds.max_buffers} "
                                             "in all); free buffers first")
    bo = _allocate(daemon, device, size)
    handle = session.new_handle()
    session.buffers[handle] = bo
    device.refs.charge(session, bo)
    return {"handle": handle, "size": bo.size}


@handler("free", touches=_the_buffer)
def free(daemon, call, args):
    session = call.session
    bo = _buffer(session, args["handle"])
    del session.buffers[args["handle"]]
    daemon.devices[bo.device].refs.drop(session, bo)  # jobs still using it keep it alive until they finish
    return {}


@handler("write", waits=_big_write, touches=_the_buffer)
def write(daemon, call, args):
    """Copy inline; a large write returns a coroutine that copies on a thread."""
    bo = _buffer(call.session, args["handle"])
    data = args["data"]
    span = _span(bo, args["offset"], len(data), "write")
    if not _big_write(args):
        bo.view()[span] = data
        return {}

    async def copy():
        await _off_loop(daemon, bo, bo.view().__setitem__, span, data)
        return {}
    return copy()


@handler("read", waits=_big_read, touches=_the_buffer)
def read(daemon, call, args):
    """Copy inline; a large read returns a coroutine that copies on a thread."""
    bo = _buffer(call.session, args["handle"])
    span = _span(bo, args["offset"], args["size"], "read")
    if not _big_read(args):
        return {"data": bytes(bo.view()[span])}

    async def copy():
        return {"data": await _off_loop(daemon, bo, bytes, bo.view()[span])}
    return copy()


async def _off_loop(daemon, bo, fn, *args):
    """``fn(*args)`` on a thread, holding a reference to ``bo`` so that the session closing
    meanwhile cannot unmap it under the copy."""
    with daemon.devices[bo.device].refs.held(bo):
        return await trio.to_thread.run_sync(fn, *args)


@handler("map", waits=True, touches=_the_buffer)
async def map_(daemon, call, args):
    session = call.session
    from .attach import send_fd

    bo = _buffer(session, args["handle"])
    if session.attach is None:
        # Not ENOTCONN: that says the session is gone, and a client would drop this live one.
        if session.identity is not None and session.identity.kind != "ipc":
            raise RequestError(ErrorCode.EOPNOTSUPP, "map passes the buffer's file descriptor over the companion "
                                                     "Unix socket, which a tcp session has none of; use read "
                                                     "and write (the session is fine)")
        raise RequestError(ErrorCode.EOPNOTSUPP, "map needs the companion socket: connect to attach_path and "
                                                 "present attach_token first (the session is fine)")
    bo.exported = True
    await send_fd(session, call.seq, args["handle"], bo)
    return {"size": bo.size, "mapped_size": bo.mapped_size}


@handler("submit", waits=True, touches=_new_job)
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
        mappings.append(Binding(b["va"], bo.mapped_size, b["writable"]))
    check_layout([(m.va, m.size, f"bindings[{i}]") for i, m in enumerate(mappings)], device.config.page_size)
    stream = args["stream"]
    ctx, deps = _job_options(daemon, session, device, args)
    try:
        if len(stream) >= THREAD_THRESHOLD:
            program = await trio.to_thread.run_sync(device.validate, stream, mappings)
        else:
            program = device.validate(stream, mappings)
    except ProgramRejected as exc:
        raise RequestError(ErrorCode.EINVAL, f"command stream refused: {exc}") from None
    if session.closed:
        raise RequestError(ErrorCode.ENOTCONN, "the session closed")
    _check_admission(daemon, session, device)  # again: the validation let others in meanwhile
    estimate = program.cycles / (device.config.clock_mhz * 1e6)
    return _queue_job(daemon, session, device, stream, bindings, ctx=ctx, deps=deps, args=args,
                      estimate_s=estimate)


def _check_admission(daemon, session, device=None, jobs: int = 1) -> None:
    """EAGAIN (with a retry hint) unless ``jobs`` more jobs fit the session's, its user's and the
    device's limits (a heterogeneous run is one job per partition)."""
    limit = daemon.config.limits.max_jobs_in_flight
    if session.jobs_in_flight + jobs > limit:
        raise RequestError(ErrorCode.EAGAIN, f"this session has {session.jobs_in_flight} jobs in flight, "
                                             f"the limit (limits.max_jobs_in_flight); wait for some to finish",
                           retry_after_ms=_retry_hint(daemon, device))
    policy.check_jobs(daemon.sessions, session, _retry_hint(daemon, device), jobs=jobs)  # the user's, all its sessions
    if device is not None and device.jobs_queued >= device.params.max_queued:
        raise RequestError(ErrorCode.EAGAIN, f"device {device.index} has {device.jobs_queued} jobs queued, "
                                             "the limit (scheduling.max_queued_per_device); retry later",
                           retry_after_ms=_retry_hint(daemon, device))


def _allocate(daemon, device, size: int):
    """Device memory, or ENOMEM with a retry hint when running or queued jobs hold memory that
    their completion will free (a quota overrun, EDQUOT, is the client's to fix: no hint)."""
    try:
        return device.memory.allocate(size)
    except RequestError as exc:
        if exc.info.code is not ErrorCode.ENOMEM or not (device.jobs_queued or device.running_jobs()):
            raise
        raise RequestError(ErrorCode.ENOMEM, f"{exc.info.message}; jobs in flight hold memory that is "
                                             "freed as they finish", retry_after_ms=_retry_hint(daemon, device)
                           ) from None


def _retry_hint(daemon, device) -> int:
    """Milliseconds until a job's worth of room is likely: the recent mean device time of a job."""
    devices = [device] if device is not None else daemon.devices
    done = sum(d.jobs_completed + d.jobs_failed for d in devices)
    busy = sum(d.busy_s for d in devices)   # core-seconds: a job's device time
    per_job = busy / done if done else 0.01
    return max(1, min(60_000, int(per_job * 1e3 + 0.5)))


def _context(session, context_id: int) -> Context:
    ctx = session.contexts.get(context_id)
    if ctx is None:
        if context_id:
            raise RequestError(ErrorCode.ENOENT, f"no context {context_id} in this session (context_create)")
        ctx = session.contexts[0] = Context(0, session.id, NORMAL, policy.weight_for(session, 1))
    return ctx


def _job_ref(daemon, session, job_id: int) -> Job:
    job = session.jobs.get(job_id) or session.imported.get(job_id)
    if job is None:
        raise RequestError(ErrorCode.ENOENT, f"no job {job_id} in this session (finished jobs are kept for the "
                                             "last 1024)")
    return job


def _job_options(daemon, session, device, args) -> tuple[Context, list[Job]]:
    """The context and dependencies a submit names, checked (no side effects)."""
    _check_admission(daemon, session, device)
    ctx = _context(session, args.get("context", 0))
    if ctx.banned:
        raise RequestError(ErrorCode.EPERM, f"context {ctx.id} of this session is banned: {ctx.banned}; "
                                            "create a new context, and fix the jobs that hang")
    deps = [_job_ref(daemon, session, j) for j in args.get("after", [])]
    return ctx, deps


def _queue_job(daemon, session, device, stream: bytes, bindings, program: int | None = None,
               model=None, *, ctx: Context, deps: list[Job], args, estimate_s: float = 0.0) -> dict:
    job_id = session.new_job_id()   # the id is taken even if refused below
    if "deadline_ms" in args:
        _check_deadline(device.expected_s(program, estimate_s), args)
    job = _make_job(daemon, session, device, stream, bindings, program, model, ctx=ctx, deps=deps, args=args,
                   estimate_s=estimate_s, job_id=job_id)
    return {"job": job.id, "context": ctx.id, "point": job.point}


def _check_deadline(need: float, args) -> None:
    """ETIME (persistent) when a job needs more device time than its deadline even on an idle device."""
    if need > args["deadline_ms"] / 1000:
        raise RequestError(ErrorCode.ETIME, f"this job needs about {need * 1e3:.1f} ms of device time, more "
                                            f"than its {args['deadline_ms']} ms deadline even on an idle "
                                            "device (persistent: a retry cannot help)", retryable=False)


def _make_job(daemon, session, device, stream: bytes, bindings, program: int | None = None, model=None, *,
             ctx: Context, deps: list[Job], args, estimate_s: float = 0.0, point: bool = True, chain=None,
             job_id: int | None = None) -> Job:
    """Make a job in one step, hold its buffers and program, and queue it (or wait for ``deps``).
    ``point``: whether it takes a point on its context's timeline (a chain's last job only)."""
    job_id = session.new_job_id() if job_id is None else job_id
    submitted = time.monotonic()
    faults = session.faults.get(device.index)
    shown = {"model": model.id, "layers": model.layers, "model_name": model.name} if model is not None else {}
    job = Job(job_id, session.id, device.index, stream, bindings, program=program,   # in one step
              submitted=submitted, pid=session.pid, client=session.name, session=session, context=ctx,
              point=ctx.next_point() if point else 0, estimate_s=estimate_s,
              timeout_s=args.get("timeout_ms", 0) / 1000,
              deadline=submitted + args["deadline_ms"] / 1000 if "deadline_ms" in args else 0.0,
              fault=faults.pop(0) if faults else None, chain=chain, **shown)
    for bo, _va, _w in bindings:
        device.refs.retain(bo)   # released when the job ends (Daemon._job_done)
    if program is not None:
        device.programs.retain(program)   # released when it ends (DeviceHost.complete), run or not
    session.jobs_in_flight += 1
    session.jobs_submitted += 1
    session.remember_job(job)
    if chain is not None:
        chain.jobs.append(job)   # before it can finish: its fences look it up there
    failed = fences.depend(daemon, job, deps)
    if failed is not None:
        device.complete(job, error=failed)
    elif job.waiting_on == 0:
        device.submit(job)
    return job


@handler("wait", waits=True, touches=_the_job, observes=True)
async def wait(daemon, call, args):
    job = _job_ref(daemon, call.session, args["job"])
    outcome = await _outcome(daemon, job, args["timeout_ms"])
    if not job.done.is_set():
        raise RequestError(ErrorCode.ETIMEDOUT, f"job {job.id} is still {job.state} after "
                                                f"{args['timeout_ms']} ms")
    return outcome


async def _outcome(daemon, job: Job, timeout_ms: int) -> dict:
    """The job's state, stats and error once it has finished or ``timeout_ms`` have passed
    (ESHUTDOWN if the daemon stops first)."""
    with trio.move_on_after(timeout_ms / 1000):
        await job.done.wait()
    if daemon.stopping and job.state in ("queued", "running"):  # woken by the shutdown
        raise RequestError(ErrorCode.ESHUTDOWN, f"npud stopped before job {job.id} finished; "
                                                "submit it again once it is back")
    return _job_outcome(job)


def _job_outcome(job: Job) -> dict:
    """What ``wait`` says of a job: its state, stats and error."""
    result = {"state": job.state, "stats": job.stats}
    if job.error is not None:
        result["error"] = job.error.to_wire()
    return result


# --- models --------------------------------------------------------------------------


def _model_source(session: "Session", args):
    """(inline bytes, None) or (None, [(buffer, span), ...]: the model's parts in order) for the
    model of a load/check."""
    if sum(k in args for k in ("model", "model_buffer", "model_buffers")) != 1:
        raise RequestError(ErrorCode.EINVAL, "give exactly one of model (inline bytes), model_buffer "
                                             "or model_buffers")
    if "model" in args:
        if "model_size" in args:
            raise RequestError(ErrorCode.EINVAL, "model_size goes with model_buffer(s) only")
        return args["model"], None
    if "model_buffers" in args:
        return None, _model_parts(session, args["model_buffers"], args.get("model_size"))
    bo = _buffer(session, args["model_buffer"])
    return None, [(bo, _span(bo, 0, args.get("model_size", bo.size), "model_size"))]


def _model_parts(session: "Session", handles: list[int], size: int | None) -> list[tuple]:
    """The (buffer, span) of each of ``model_buffers``: each buffer whole but the last, which holds
    the rest of ``size``; EINVAL naming what does not fit that."""
    if size is None:
        raise RequestError(ErrorCode.EINVAL, "model_buffers needs model_size (the model's bytes in all)")
    bos = []
    for i, handle in enumerate(handles):
        if handle in handles[:i]:
            raise RequestError(ErrorCode.EINVAL, f"model_buffers[{i}]: buffer {handle} is listed twice")
        bo = session.buffers.get(handle)
        if bo is None:
            raise RequestError(ErrorCode.EINVAL, f"model_buffers[{i}]: no buffer with handle {handle} "
                                                 "in this session")
        bos.append(bo)
    before = sum(bo.size for bo in bos[:-1])
    if not 0 < size - before <= bos[-1].size:
        raise RequestError(ErrorCode.EINVAL, f"model_size {size} does not add up: the buffers before the "
                                             f"last hold {before} bytes, so the last ({bos[-1].size} bytes) "
                                             f"would hold {size - before}")
    return [(bo, slice(0, bo.size)) for bo in bos[:-1]] + [(bos[-1], slice(0, size - before))]


def _views(parts: list[tuple]):
    """The model in buffer parts as model_digest takes it: one view, or a list of them."""
    views = [bo.view()[span] for bo, span in parts]
    return views[0] if len(views) == 1 else views


@contextlib.contextmanager
def _held(daemon, parts: list[tuple]):
    """The parts' buffers held: a concurrent free must not unmap one while it is read."""
    with contextlib.ExitStack() as stack:
        for bo, _ in parts:
            stack.enter_context(daemon.devices[bo.device].refs.held(bo))
        yield


async def _copy_model(parts: list[tuple]) -> tuple[bytes | bytearray, bytes | None]:
    """A private copy of a model in buffers (its client may change them meanwhile), and the
    copy's compile-cache digest when it was worth computing on the way."""
    size = sum(span.stop - span.start for _, span in parts)
    if len(parts) == 1 and size < THREAD_THRESHOLD:
        bo, span = parts[0]
        return bytes(bo.view()[span]), None
    data = bytearray(size)
    return data, await trio.to_thread.run_sync(model_digest, _views(parts), data)


def _model(session: "Session", model_id: int):
    model = session.models.get(model_id)
    if model is None:
        raise RequestError(ErrorCode.ENOENT, f"no loaded model {model_id} in this session")
    return model


@handler("load", waits=True, touches=_model_buffer)
async def load(daemon, call, args):
    session = call.session
    device = daemon.device(args["device"])
    options = dict(args.get("options", {}))
    fallback = options.pop("fallback", daemon.config.compile_fallback)   # not a compile option
    try:
        exe, cached, ms, digest = await _executable(daemon, session, device, args, options)
    except _Declined as declined:   # the device's target declines nodes: partition the model
        digest = declined.digest
        model, cached, ms = await hetero.load(daemon, session, device, declined.data, digest, options, fallback,
                                              session.new_handle(), lambda: _quota(daemon, session),
                                              declined.error)
        daemon.loader.presented(digest, session.uid)   # its next load may send the digest alone
    else:
        if session.closed:
            raise RequestError(ErrorCode.ENOTCONN, "the session closed")
        model = await instantiate(session, device, exe, session.new_handle(), _quota(daemon, session))
    if session.closed:  # it went away while the stream was being validated
        hetero.unload(daemon, session, model)
        raise RequestError(ErrorCode.ENOTCONN, "the session closed")
    session.models[model.id] = model
    return {**model.info(cached, ms), "model_digest": digest}


def _quota(daemon, session) -> int:
    """The most device memory the session may hold now: its own quota, and its user's (all its
    sessions)."""
    quota, used = policy.memory_limit(daemon.sessions, session)
    limit = daemon.config.limits.memory_quota
    return limit if quota is None else min(limit, session.memory + max(0, quota - used))


class _Declined(Exception):
    """The device's target declined the model (a compile error): its bytes and digest, for the
    partitioner, and the error to raise if partitioning cannot help."""

    def __init__(self, error: RequestError, data, digest: bytes):
        self.error, self.data, self.digest = error, data, digest


def _raise_if_partitioned(daemon, options: dict, config, target, digest: bytes, data=None) -> None:
    """_Declined when a kept partition plan says the target declines nodes of the model with this
    digest: its whole-model compile would only fail again (seconds, for a big model), however the
    model came (inline, in buffers, or by its digest alone; ``data`` None: the plan has it all)."""
    if daemon.loader.partitioned(data, options, config, target, hetero.PARTITIONER, digest):
        raise _Declined(RequestError(ErrorCode.EINVAL, "compile error: the target declines nodes of the model"),
                        data, digest)


async def _compile_or_declined(daemon, data, digest, **kwargs):
    """``loader.executable``, with a compile error (EINVAL) turned into ``_Declined`` -- at once for a
    model already partitioned (a kept plan)."""
    _raise_if_partitioned(daemon, kwargs["options"], kwargs["config"], kwargs["target"], digest, data)
    try:
        return await daemon.loader.executable(data, digest=digest, **kwargs)
    except RequestError as exc:
        if not _declines(exc):
            raise
        raise _Declined(exc, data, digest) from None


def _declines(exc: RequestError) -> bool:
    """Whether a load's error is its target declining the model (worth asking the partitioner)."""
    return exc.info.code is ErrorCode.EINVAL and exc.info.message.startswith("compile error")


async def _executable(daemon, session, device, args, options):
    """(executable, cached, ms, model digest) for a load's model, however it was given; _Declined
    when the device's target declines it."""
    if "model_digest" in args:
        if "model" in args or "model_buffer" in args or "model_buffers" in args:
            raise RequestError(ErrorCode.EINVAL, "give exactly one of model, model_buffer(s) or model_digest")
        digest = args["model_digest"]
        try:
            return (*await daemon.loader.by_digest(digest, options, device.config, session.uid, device.target),
                    digest)
        except RequestError:   # no whole-model executable: a kept partition plan may do
            if daemon.loader.presented_by(digest, session.uid):
                _raise_if_partitioned(daemon, options, device.config, device.target, digest)
            raise
    data, source = _model_source(session, args)
    if source is None:
        digest = (await trio.to_thread.run_sync(model_digest, data) if len(data) >= THREAD_THRESHOLD
                  else model_digest(data))
        result = await _compile_or_declined(daemon, data, digest, options=options, config=device.config,
                                            target=device.target,
                                            compile_faults=session.compile_faults.get(device.index))
    else:
        with _held(daemon, source):
            digest = await trio.to_thread.run_sync(model_digest, _views(source))
            _raise_if_partitioned(daemon, options, device.config, device.target, digest)
            try:
                result = await daemon.loader.executable(
                    _views(source), options, device.config, digest, target=device.target,
                    private_copy=lambda: _copy_model(source), compile_faults=session.compile_faults.get(device.index))
            except RequestError as exc:
                if not _declines(exc):
                    raise
                data, copied = await _copy_model(source)   # the partitioner's own copy
                raise _Declined(exc, data, copied or model_digest(data)) from None
    daemon.loader.presented(digest, session.uid)  # this user has shown it holds the model
    return (*result, digest)


@handler("check", waits=True, touches=_model_buffer)
async def check(daemon, call, args):
    device = daemon.device(args["device"])
    data, source = _model_source(call.session, args)
    if source is not None:
        with _held(daemon, source):
            data, _digest = await _copy_model(source)
    return {"problems": await daemon.loader.check(data, device.config, device.target)}


def _waits_for_run(args) -> bool:
    return "wait_ms" in args


@handler("run_model", waits=_waits_for_run, touches=_new_job, keeps=_run_buffers)
def run_model(daemon, call, args):
    """Queue a run; with ``wait_ms``, an awaitable of the run's outcome too (one round trip):
    later requests on its buffers wait for that reply, the others only for the job to be queued."""
    queued = _queue_run(daemon, call.session, args)
    if not _waits_for_run(args):
        return queued
    job = call.session.jobs[queued["job"]]   # now: requests run meanwhile may make the session forget it

    async def outcome():
        return {**queued, **await _outcome(daemon, job, args["wait_ms"])}
    return outcome()


def _queue_run(daemon, session, args) -> dict:
    """Queue one run of a loaded model (a chain of jobs for a heterogeneous one): its last job."""
    model = _model(session, args["model"])
    device = daemon.devices[model.device]
    ctx, deps = _job_options(daemon, session, device, args)
    feeds = {}
    for kind, entries, handles in (("inputs", model.inputs, args["inputs"]),
                                   ("outputs", model.outputs, args["outputs"])):
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
            feeds[entry["name"], kind] = bo
    if isinstance(model, hetero.HeteroModel):
        return _run_chain(daemon, session, model, {name: bo for (name, _k), bo in feeds.items()}, ctx, deps, args)
    bindings = list(model.fixed) + [(feeds[entry["name"], kind], entry["va"], kind == "outputs")
                                    for kind, entries in (("inputs", model.inputs), ("outputs", model.outputs))
                                    for entry in entries]
    modeled = model.cycles / (device.config.clock_mhz * 1e6)
    return _queue_job(daemon, session, device, b"", bindings, model.program, model=model, ctx=ctx, deps=deps,
                      args=args, estimate_s=modeled)


def _run_chain(daemon, session, model, feeds: dict, ctx: Context, deps: list[Job], args) -> dict:
    """One run of a heterogeneous model: a job per partition, each after the previous (fences), the
    first after ``deps`` and, for order only, after the previous run's last job.  The client is
    given the last job."""
    parts = [(daemon.devices[part.device], part) for part in model.parts]
    estimates = [part.cycles / (dev.config.clock_mhz * 1e6) for dev, part in parts]
    for dev, part in parts:
        _check_admission(daemon, session, dev, jobs=len(parts))
    first_id = session.new_job_id()   # taken even if refused below, as for one job
    if "deadline_ms" in args:
        _check_deadline(sum(dev.expected_s(part.program, est) for (dev, part), est in zip(parts, estimates)),
                        args)
    previous = model.tail if model.tail is not None and model.tail.state in ("queued", "running") else None
    if any(d is previous for d in deps):
        previous = None   # the client's own `after`: its failure is this run's (not an order-only edge)
    chain = hetero.RunChain(model, after=previous)
    for i, ((dev, part), bindings) in enumerate(zip(parts, model.bindings(feeds))):
        last = i == len(parts) - 1
        job = _make_job(daemon, session, dev, b"", bindings, part.program, model=part, ctx=ctx, args=args,
                       deps=chain.jobs[-1:] if chain.jobs else deps + ([previous] if previous else []),
                       estimate_s=estimates[i], point=last, chain=chain, job_id=None if i else first_id)
    model.tail = job
    return {"job": job.id, "context": ctx.id, "point": job.point}


# --- contexts, fences, cancellation, fault injection (npud/scheduler.py, npud/fences.py) ---


@handler("context_create")
def context_create(daemon, call, args):
    session = call.session
    priority = args["priority"]
    _check_priority(session, priority)
    if len(session.contexts) >= daemon.config.scheduling.max_contexts:
        raise RequestError(ErrorCode.EAGAIN, f"this session has {len(session.contexts)} contexts, the limit "
                                             "(scheduling.max_contexts)")
    _context(session, 0)
    ctx = Context(session.new_handle(), session.id, PRIORITIES.index(priority),
                  policy.weight_for(session, args.get("weight", 1)))  # times the user's share (policy)
    session.contexts[ctx.id] = ctx
    return {"context": ctx.id, "priority": priority, "weight": ctx.weight}


def _check_priority(session, priority: str) -> None:
    """realtime only where policy allows it (npud/policy.py decides; root and the daemon's user by default)."""
    check = getattr(policy, "check_priority", None)
    if check is not None:
        check(session, priority)
    elif priority == "realtime":
        reason = policy.admin_refusal(session, "realtime priority")
        if reason is not None:
            raise RequestError(ErrorCode.EPERM, reason.replace("is an admin operation", "is reserved by policy"))


def _status(job: Job) -> dict:
    return {"job": job.id, **_job_outcome(job)}


@handler("wait_jobs", waits=True, touches=_the_jobs, observes=True)
async def wait_jobs(daemon, call, args):
    jobs = [_job_ref(daemon, call.session, j) for j in args["jobs"]]

    def ready() -> bool:
        finished = [job.done.is_set() for job in jobs]
        return all(finished) if args["all"] else any(finished)
    with trio.move_on_after(args["timeout_ms"] / 1000):
        while not ready():
            pending = [job for job in jobs if not job.done.is_set()]
            if args["all"]:
                await pending[0].done.wait()
            else:
                async with trio.open_nursery() as nursery:
                    for job in pending:
                        nursery.start_soon(_first, job, nursery.cancel_scope)
    if daemon.stopping and not ready():
        raise RequestError(ErrorCode.ESHUTDOWN, "npud stopped before the jobs finished; submit them again once "
                                                "it is back")
    return {"jobs": [_status(job) for job in jobs], "ready": ready()}


async def _first(job: Job, scope: trio.CancelScope) -> None:
    await job.done.wait()
    scope.cancel()


def _own_job(session, job_id: int, what: str) -> Job:
    """The session's own job: EPERM for an imported fence (another session's job, which this one
    may only watch), ENOENT for an id it does not know."""
    job = session.jobs.get(job_id)
    if job is None and job_id in session.imported:
        raise RequestError(ErrorCode.EPERM, f"job {job_id} is an imported fence (another session's job): "
                                            f"only the session that submitted it can {what} it")
    if job is None:
        raise RequestError(ErrorCode.ENOENT, f"no job {job_id} in this session")
    return job


@handler("cancel", touches=_the_job)
def cancel(daemon, call, args):
    job = _own_job(call.session, args["job"], "cancel")
    error = ErrorInfo.of(ErrorCode.ECANCELED, f"job {job.id} was cancelled")
    # A run of a heterogeneous model: the client knows its last job; every partition stops.
    for part in [job, *(job.chain.jobs if getattr(job, "chain", None) is not None else ())]:
        if part.state in ("queued", "running"):
            fences.fail(daemon, part, error)
    return {"state": job.state}


@handler("fence_export", touches=_the_job)
def fence_export(daemon, call, args):
    job = _own_job(call.session, args["job"], "export")
    return {"token": fences.export(daemon, job)}


@handler("fence_import", touches=_the_job_list)
def fence_import(daemon, call, args):
    job = daemon.fence_tokens.get(args["token"])
    if job is None:
        raise RequestError(ErrorCode.ENOENT, "no such fence token (wrong, or its session closed)")
    session = call.session
    for local_id, known in session.imported.items():
        if known is job:
            return {"job": local_id, "state": job.state}
    local_id = session.new_job_id()
    session.imported[local_id] = job
    return {"job": local_id, "state": job.state}


@handler("inject_fault", touches=_the_job_list)
def inject_fault(daemon, call, args):
    if not daemon.config.test_mode:
        raise RequestError(ErrorCode.EPERM, "fault injection is for tests: start npud with --test-mode")
    device = daemon.device(args["device"])
    fault = {"fault": args["kind"], "slow_ms": args.get("slow_ms", 0)}
    faults = call.session.faults
    if args["kind"] == "slow_compile":  # the next compiles sleep in the worker (compiler_worker --test-mode)
        if fault["slow_ms"] <= 0:
            raise RequestError(ErrorCode.EINVAL, "inject_fault: slow_compile needs slow_ms > 0")
        faults = call.session.compile_faults
    faults.setdefault(device.index, []).extend(dict(fault) for _ in range(args.get("count", 1)))
    return {}


@handler("report", touches=_the_model)
def report(daemon, call, args):
    model = _model(call.session, args["model"])
    if isinstance(model, hetero.HeteroModel):
        return model.report()
    rep = model.exe.report()
    return {"rows": list(rep.rows), "table": rep.table, "npu_macs_share": 1.0}


@handler("unload", touches=_the_model)
def unload(daemon, call, args):
    model = _model(call.session, args["model"])
    del call.session.models[model.id]
    hetero.unload(daemon, call.session, model)
    return {}


@handler("cache_list", waits=True)
async def cache_list(daemon, call, args):
    await daemon.loader.settled()
    return {"directory": str(daemon.loader.cache.directory),
            "entries": await trio.to_thread.run_sync(daemon.loader.cache.entries)}


@handler("cache_clear", waits=True)
async def cache_clear(daemon, call, args):
    policy.check_admin(call.session, "cache_clear")
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
        # (a heterogeneous model's partitions share its id; each has its own name and layers)
        if layers is not None and (event["session"], event["model"], event["model_name"]) not in models:
            models[(event["session"], event["model"], event["model_name"])] = {
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
