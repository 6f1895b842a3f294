"""The daemon core: one ROUTER socket, its owner task, and the request dispatcher.

Every frame is decoded and validated (npud.ipc_schema.codec) before a handler runs;
every failure becomes an error reply to the request that caused it, and the
session stays usable.  Handlers that finish without waiting run inline in the
socket's owner task (the fast path for ping, alloc, small reads and writes, ...);
handlers that wait (for a job, for the device, for a copy on a thread) run as
tasks of their own.  A request that touches an object an earlier request of its
session is still working on waits for it (npud/ordering.py), so pipelined
requests on one object take effect in the order sent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass

import trio
import zmq

from npud.ipc_schema import codec
from npud.ipc_schema.endpoint import attach_path_for, ipc_path
from npud.ipc_schema.errors import ErrorCode, ErrorInfo, RequestError
from npud.ipc_schema.schema import HARD_FRAME_LIMIT, PROTOCOL_VERSION
from npud.ipc_schema.trio_zmq import OwnedSocket

from . import __version__, attach, auth, drivers, fences, handlers, hetero, systemd
from . import policy as policy_mod
from .config import Config, compile_memory_cap, device_params
from .devices import DeviceHost, SchedulingParams
from .fds import FdBudget
from .compile_cache import CompileCache, default_directory
from .compilers import CompilerPool
from .jobs import Job, TraceRing
from .models import ModelLoader
from .memory import HeapTrimmer
from .ordering import Sequencer, Ticket
from .sessions import Session, SessionTable, UsageByUid

log = logging.getLogger("npud")

TRACE_CAPACITY = 16384     # finished jobs kept for `trace` (a few MiB at most)
SAMPLE_PERIOD_S = 0.5      # how often utilisation windows are sampled
# What one connection may make the daemon hold: bytes of its replies not yet written to its
# connection plus the payloads of its requests being handled (a write's data, a read's result).
# ZeroMQ's high-water mark counts messages, so without this a client that sends reads and never
# reads the replies makes the daemon hold up to SNDHWM x 16 MiB.  Four maximal messages.
HELD_BYTES_PER_CONNECTION = 64 << 20
WAITING_PER_CONNECTION = 1024  # requests not answered inline (tasks, queued) one connection may have
BULK_FRAME_BYTES = 4096        # requests this large count their frame against the budget above
# Ops that give resources back: a connection over its budget may still send them.
RELEASING_OPS = frozenset({"bye", "free", "cancel", "unload"})


class AlreadyRunning(RuntimeError):
    pass


@dataclass(frozen=True)
class Call:
    """Who sent the request being handled."""

    routing_id: bytes
    session: Session | None
    seq: int
    identity: policy_mod.Identity | None = None   # from the ZAP handler: the kernel's uid/gid/pid, or a CURVE key


@dataclass(eq=False)
class _Pending:
    """A request admitted but not answered inline: charged to its connection until it finishes."""

    spec: handlers.Handler
    call: Call
    request: codec.Request
    bulk: int                          # payload bytes charged to the connection
    waits: bool                        # runs as a task
    order: Sequencer | None            # its session's queues, when it has a session
    ticket: Ticket | None = None       # its place in them, once entered

    def launch(self, start: Callable[["_Pending"], None]) -> Callable[[Ticket], None]:
        """The sequencer's callback: remember the ticket, then ``start`` this request."""
        def go(ticket: Ticket) -> None:
            self.ticket = ticket
            start(self)
        return go


async def _leave(order: Sequencer, ticket: Ticket) -> None:
    order.leave(ticket)


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.policy = policy_mod.load(config.policy)    # ConfigError naming the key: npud exits 2
        policy_mod.set_active(self.policy)              # for the handlers' policy.check_* calls
        self.curve_keys = (auth.load_server_secret(config.curve_secret_key_file) if config.tcp_endpoint
                           else None)
        self.tcp_endpoint = ""                          # the tcp endpoint bound, if any
        self.zap: auth.ZapHandler | None = None
        self.endpoint = config.endpoint
        self.sessions = SessionTable()
        sched = config.scheduling
        params = SchedulingParams(job_timeout_s=sched.job_timeout_ms / 1000, ban_after_hangs=sched.ban_after_hangs,
                                  starvation_s=sched.starvation_ms / 1000, max_queued=sched.max_queued_per_device,
                                  cores=sched.device_processes, test_mode=config.test_mode)
        self.fds = FdBudget()   # the devices' buffers share one count against the open-file limit
        self.devices = [self._device(i, spec, params) for i, spec in enumerate(config.devices)]
        for device in self.devices:   # a heterogeneous model's buffers cross devices (npud/hetero.py)
            device.peers = self.devices
        self.fence_tokens: dict[str, Job] = {}   # fence_export tokens (npud/fences.py)
        self.loader = ModelLoader(
            CompilerPool(config.compile_workers, config.compile_memory_bytes, config.compile_timeout_s,
                         config.test_mode, memory_scale=config.compile_memory_scale,
                         memory_max=compile_memory_cap(config)),
            CompileCache(Path(config.cache_dir) if config.cache_dir else default_directory(),
                         config.cache_memory_bytes))
        self.started = time.monotonic()
        self.stopping = False
        self.trace = TraceRing(TRACE_CAPACITY)
        self.usage = UsageByUid()   # per-uid totals that outlive sessions (`status` users)
        # The C heap's free pages (and the buffer pools) go back once no session is left.
        self.heap = HeapTrimmer(release=lambda: [device.memory.shrink_pool() for device in self.devices])
        self.attach_path = attach_path_for(self.endpoint)
        self._zsock: OwnedSocket | None = None
        self._nursery: trio.Nursery | None = None
        self._in_flight = 0
        self._waiting: dict[bytes, list[int]] = {}   # routing id -> [tasks, payload bytes held]
        self._idle = trio.Event()
        self._idle.set()
        self.version = (__version__, list(PROTOCOL_VERSION))

    def _device(self, index: int, spec, params: SchedulingParams) -> DeviceHost:
        """The host of one configured device, through its driver (loaded here, on first use)."""
        driver = drivers.driver(spec.driver)
        return DeviceHost(index, spec.name, spec.preset,
                          device_params(driver, spec, self.config.device_memory_fraction),
                          self._job_done, params, self.fds, driver)

    # --- lifecycle -------------------------------------------------------------------

    async def serve(self, *, handle_signals: bool = True, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until SIGTERM/SIGINT (or cancellation), then shut down cleanly."""
        ctx = zmq.Context.instance()
        activated = systemd.activated_sockets()  # socket activation: adopt, else bind our own
        owned_paths = []  # the socket files we created (an inherited socket's file is its unit's)
        # The ZAP handler's socket is bound before anything can connect: libzmq asks it about every
        # connection (ZAP_ENFORCE_DOMAIN refuses them while no handler is bound).
        self.zap = auth.ZapHandler(ctx, self.policy)
        try:
            sock = self._bind(ctx, activated.zmq_fd, activated.zmq_path)
        except BaseException:
            self.zap.close()
            raise
        if activated.zmq_fd is None and ipc_path(self.endpoint):
            owned_paths.append(ipc_path(self.endpoint))
        if activated.attach is not None:
            self.attach_path = activated.attach_path
        attach_listener = (attach.listen(self.attach_path, activated.attach, self.config.limits.max_sessions)
                           if self.attach_path else None)
        if attach_listener is not None and activated.attach is None:
            owned_paths.append(self.attach_path)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.zap.run)
                watchdog = systemd.watchdog_interval()
                if watchdog:  # first, so that slow device start-up is not mistaken for a hang
                    nursery.start_soon(systemd.run_watchdog, watchdog)
                for device in self.devices:
                    await nursery.start(device.run)
                await nursery.start(self.loader.pool.run)
                self._zsock = OwnedSocket(sock, self._on_frames, copy=False)  # frames carry User-Id
                nursery.start_soon(self._zsock.run)
                if attach_listener is not None:
                    nursery.start_soon(attach.serve, self, attach_listener)
                nursery.start_soon(self._expire_leases)
                nursery.start_soon(self._sample_usage)
                log.info("npud %s serving %s with %d device(s)", __version__, self.endpoint,
                         len(self.devices))
                # SIGTERM is caught before READY=1 goes out: a stop right after it shuts down cleanly.
                with (trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) if handle_signals
                      else contextlib.nullcontext()) as signals:
                    systemd.notify(f"READY=1\nSTATUS={self._status_line()}\nMAINPID={os.getpid()}")
                    nursery.start_soon(self._report_status)
                    task_status.started(self)
                    if signals is not None:
                        async for signum in signals:
                            log.info("received %s, shutting down", signal.Signals(signum).name)
                            break
                    else:
                        await trio.sleep_forever()
                await self._shutdown(nursery)
        finally:
            sock.close(linger=1000)
            self.zap.close()
            if attach_listener is not None:
                attach_listener.close()
            for path in owned_paths:
                if path:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
            log.info("npud stopped")

    def _bind(self, ctx: zmq.Context, fd: int | None = None, fd_path: str | None = None) -> zmq.Socket:
        """The ROUTER socket: bound to our endpoint, or to ``fd``, a listening socket systemd passed.

        With ZMQ_USE_FD, libzmq neither creates, binds nor unlinks the socket: it
        accepts on ``fd`` (and closes it with the ROUTER); bind() only names the
        endpoint.  Connections queued on it before we started are accepted then.
        """
        if fd is not None:
            endpoint = f"ipc://{fd_path}"
            if endpoint != self.endpoint:
                log.info("serving the socket systemd passed, %s (not the configured %s)", endpoint,
                         self.endpoint)
                self.endpoint = endpoint
                self.attach_path = attach_path_for(endpoint)
        path = ipc_path(self.endpoint)
        if path and fd is None:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            if _someone_listens(path):
                raise AlreadyRunning(f"another npud is already serving {self.endpoint}; "
                                     "stop it or choose another --endpoint")
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # know when a peer is gone instead of dropping silently
        sock.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.setsockopt(zmq.BACKLOG, attach.backlog_for(self.config.limits.max_sessions))  # libzmq's is 100
        # Every connection goes through the ZAP handler (npud/auth.py): over ipc it receives the
        # peer's uid/gid/pid from the kernel; without a handler, connections are refused.
        sock.setsockopt(zmq.ZAP_DOMAIN, auth.ZAP_DOMAIN)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        if fd is not None:
            os.set_blocking(fd, False)  # systemd passes blocking sockets; libzmq's poller expects not
            sock.setsockopt(zmq.USE_FD, fd)
        sock.bind(self.endpoint)
        if path and fd is None:
            os.chmod(path, 0o660)
        if self.config.tcp_endpoint:
            # Options are copied into each listener at bind(): the ipc one above stays NULL
            # (kernel identity), this one is CURVE-only.
            if fd is not None:
                sock.setsockopt(zmq.USE_FD, -1)
            public, secret = self.curve_keys
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            try:
                sock.bind(self.config.tcp_endpoint)
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                raise AlreadyRunning(f"cannot listen on tcp_endpoint {self.config.tcp_endpoint}: {exc}") from None
            self.tcp_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            log.info("serving %s (CURVE, server public key %s)", self.tcp_endpoint, public.decode())
        return sock

    async def _shutdown(self, nursery: trio.Nursery) -> None:
        self.stopping = True
        systemd.notify("STOPPING=1\nSTATUS=stopping")
        for session in self.sessions:
            self._zsock.send([session.routing_id, codec.encode_event(
                "shutdown", {"reason": "npud is stopping"})])
        with trio.move_on_after(self.config.shutdown_grace_s):
            await self._idle.wait()
        # Jobs that did not finish in the grace period never will: wake their waits now,
        # while the socket's owner task still runs, so each is answered ESHUTDOWN.
        for session in self.sessions:
            for job in session.jobs.unfinished():
                job.done.set()
        with trio.move_on_after(1.0):
            await self._idle.wait()
        for session in self.sessions:
            self.close_session(session, "daemon shutdown")
        await trio.sleep(0.05)  # let the owner task flush the last replies
        nursery.cancel_scope.cancel()

    def _status_line(self) -> str:
        jobs = sum(session.jobs_in_flight for session in self.sessions)
        return (f"serving {self.endpoint}: {len(self.sessions)} client(s), "
                f"{len(self.devices)} device(s), {jobs} job(s) in flight")

    async def _report_status(self) -> None:
        """Keep systemctl status's STATUS= line current (sent only when it changes)."""
        last = self._status_line()
        while True:
            await trio.sleep(1.0)
            line = self._status_line()
            if line != last and not self.stopping:
                systemd.notify(f"STATUS={line}")
                last = line

    # --- requests --------------------------------------------------------------------

    def _on_frames(self, frames: list) -> None:
        user_id = _user_id(frames[-1])   # what the ZAP handler said this connection is
        frames = [f.bytes if isinstance(f, zmq.Frame) else f for f in frames]
        routing_id = frames[0]
        if len(frames) != 2:
            self._reply_error(routing_id, None, ErrorInfo.of(
                ErrorCode.EPROTO, f"expected one frame per request, got {len(frames) - 1}"))
            return
        try:
            request = codec.decode_request(frames[1])
        except RequestError as exc:
            self._reply_error(routing_id, exc.seq, exc.info)
            return
        self._dispatch(routing_id, user_id, request, len(frames[1]))

    def _dispatch(self, routing_id: bytes, user_id: str, request: codec.Request, size: int) -> None:
        """Authorise and admit a decoded request, then answer it inline, or start it as a task, or
        queue it behind the earlier requests of its session that touch the same objects
        (npud/ordering.py)."""
        try:
            session = self.sessions.by_routing(routing_id)
            identity = self._authorise(user_id, session, request)
            if self.stopping:
                raise RequestError(ErrorCode.ESHUTDOWN, "npud is shutting down; reconnect once it is back",
                                   seq=request.seq)
            if request.op.needs_session:
                if session is None:
                    raise RequestError(ErrorCode.ENOTCONN,
                                       "no session on this connection: send hello first "
                                       "(or the session expired; reconnect)", seq=request.seq)
                session.last_seen = time.monotonic()
            spec = handlers.HANDLERS[request.op.name]
            waits = spec.waits_for(request.args)
            order = session.order if session is not None else None
            keys = spec.touches(session, request.args) if order is not None and spec.touches else ()
            queued = order is not None and order.must_wait(keys, spec.barrier)
            bulk = self._admit(routing_id, request, waits or queued, size)
        except RequestError as exc:
            self._reply_error(routing_id, exc.seq, exc.info)
            return
        call = Call(routing_id, session, request.seq, identity)
        if not (waits or queued):
            self._zsock.send([routing_id, self._answer(spec, call, request)])
            return
        self._in_flight += 1   # admitted and charged (``_admit``) until ``_finish``
        self._idle = trio.Event() if self._in_flight == 1 else self._idle
        pending = _Pending(spec, call, request, bulk, waits, order)
        if order is None or not (keys or spec.barrier or order.barrier_pending):
            self._start(pending)      # touches none of the session's objects: nothing to order
        elif order.barrier_pending:   # sent after bye: dispatched afresh once bye is done
            order.hold(lambda: self._resume(pending, user_id, size))
        else:
            order.enter(keys, pending.launch(self._start), spec.barrier)

    def _authorise(self, user_id: str, session: Session | None, request: codec.Request):
        """Every request is judged on the identity of the connection it came on, never on what the
        client claims: a session's requests must come with the identity it was opened with; a
        request without a session (hello, version) from an identity the policy refuses gets EPERM."""
        if session is not None:
            if user_id != session.user_id:
                raise RequestError(ErrorCode.EPERM, "this connection's identity is not the one its session "
                                   "was opened with", seq=request.seq)
            return session.identity
        identity = policy_mod.Identity.parse(user_id) if user_id else None
        refusal = self.policy.connect_refusal(identity)
        if refusal is not None:
            raise RequestError(ErrorCode.EPERM, refusal, seq=request.seq)
        return identity

    def _admit(self, routing_id: bytes, request: codec.Request, deferred: bool, size: int) -> int:
        """Refuse (EAGAIN) a request that would take its connection past what the daemon holds
        for one connection; otherwise the payload bytes its handler will hold, charged to the
        connection here when it is not answered inline (a task, or queued behind earlier
        requests; ``_finish`` releases them).  A request is
        always admitted when its connection holds nothing, so a lone maximal message is never
        refused."""
        name = request.op.name
        bulk = size if size >= BULK_FRAME_BYTES else 0
        if name == "read":
            bulk += request.args["size"]
        waiting = self._waiting.get(routing_id)
        unread = self._zsock.queued_bytes(routing_id)
        in_flight = waiting[1] if waiting else 0
        held = unread + in_flight
        if name in RELEASING_OPS:
            pass
        elif held and held + bulk > HELD_BYTES_PER_CONNECTION:
            # Name the cause: a peer that stopped reading must read; one with many large requests
            # under way only has to wait for them (the next attempt usually passes).
            cause = ("read the replies it was sent, then retry" if unread >= in_flight else
                     "retry when some of its requests have been answered, or use fewer large requests "
                     "at once (a local client can map the buffer instead)")
            raise RequestError(ErrorCode.EAGAIN, f"this connection already has {held} bytes held by npud "
                               f"({unread} in replies not yet read, {in_flight} in requests being handled; "
                               f"at most {HELD_BYTES_PER_CONNECTION}): {cause}", seq=request.seq,
                               retry_after_ms=100 if unread >= in_flight else 10)
        elif deferred and waiting and waiting[0] >= WAITING_PER_CONNECTION:
            raise RequestError(ErrorCode.EAGAIN, f"this connection has {waiting[0]} requests still being "
                               f"handled (at most {WAITING_PER_CONNECTION}); retry once some are answered",
                               seq=request.seq, retry_after_ms=10)
        if deferred:  # charged now, not when it starts: the rest of this batch must see it
            if waiting is None:
                waiting = self._waiting[routing_id] = [0, 0]
            waiting[0] += 1
            waiting[1] += bulk
        return bulk

    def _start(self, pending: "_Pending") -> None:
        """Run an admitted request whose turn has come: as a task if it waits, else inline."""
        session = pending.call.session
        if session is not None and session.closed:   # killed, or its lease or client gone, meanwhile
            seq = pending.request.seq
            self._zsock.send([pending.call.routing_id, codec.encode_error(seq, ErrorInfo.of(
                ErrorCode.ESHUTDOWN, "npud stopped before this request ran; retry once it is back")
                if self.stopping else ErrorInfo.of(
                ErrorCode.ENOTCONN, "the session closed before this request ran (kill_client, its lease "
                                    "expired or its companion socket closed); reconnect"))])
            self._finish(pending)
        elif pending.waits:
            self._nursery.start_soon(self._run_waiting, pending)
        else:
            self._zsock.send([pending.call.routing_id, self._answer(pending.spec, pending.call, pending.request)])
            self._finish(pending)

    def _resume(self, pending: "_Pending", user_id: str, size: int) -> None:
        """A request held behind bye: uncharge it and dispatch it again (to the session open now,
        if any: hello may have opened a new one)."""
        self._finish(pending)
        self._dispatch(pending.call.routing_id, user_id, pending.request, size)

    def _answer(self, spec: handlers.Handler, call: Call, request: codec.Request) -> bytes:
        """Run an inline handler; its encoded reply."""
        try:
            return codec.encode_result(request.seq, spec.fn(self, call, request.args))
        except RequestError as exc:
            return codec.encode_error(request.seq, exc.info)
        except Exception:
            log.exception("handler %s failed", request.op.name)
            return codec.encode_error(request.seq, ErrorInfo.of(
                ErrorCode.EINTERNAL, f"internal error while handling {request.op.name}"))

    async def _run_waiting(self, pending: "_Pending") -> None:
        """Run a handler that waits; its one reply is always sent, even on shutdown."""
        request, call = pending.request, pending.call
        reply = codec.encode_error(request.seq, ErrorInfo.of(
            ErrorCode.EINTERNAL, f"{request.op.name} was interrupted"))
        try:
            if pending.spec.observes and pending.ticket is not None:
                self._observing(pending)
            result = pending.spec.fn(self, call, request.args)
            if not isinstance(result, dict):
                if pending.spec.keeps is not None and pending.ticket is not None:   # its work is queued
                    pending.order.release(pending.ticket, pending.spec.keeps(call.session, request.args))
                result = await result
            reply = codec.encode_result(request.seq, result)
        except RequestError as exc:
            reply = codec.encode_error(request.seq, exc.info)
        except trio.Cancelled:
            reply = codec.encode_error(request.seq, ErrorInfo.of(
                ErrorCode.ESHUTDOWN, f"npud stopped before {request.op.name} finished; retry once it is back"))
            raise
        except Exception:
            log.exception("handler %s failed", request.op.name)
            reply = codec.encode_error(request.seq, ErrorInfo.of(
                ErrorCode.EINTERNAL, f"internal error while handling {request.op.name}"))
        finally:
            self._zsock.send([call.routing_id, reply])  # counted in queued_bytes from here on
            self._finish(pending)

    def _observing(self, pending: "_Pending") -> None:
        """An observer (wait) takes effect when it first looks at its job: the requests it holds
        up may run once this task has reached its first pause, not before (a cancel sent after a
        wait must not be seen by that wait's first look)."""
        if pending.order.holds_up(pending.ticket):
            self._nursery.start_soon(_leave, pending.order, pending.ticket)
        else:
            pending.order.leave(pending.ticket)

    def _finish(self, pending: "_Pending") -> None:
        """Release what ``_dispatch`` charged a request that was not answered inline, and start
        the requests of its session that were waiting for it."""
        waiting = self._waiting[pending.call.routing_id]
        waiting[0] -= 1
        waiting[1] -= pending.bulk
        if not waiting[0]:
            del self._waiting[pending.call.routing_id]
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()
        if pending.ticket is not None:
            pending.order.leave(pending.ticket)

    def _reply_error(self, routing_id: bytes, seq: int | None, error: ErrorInfo) -> None:
        self._zsock.send([routing_id, codec.encode_error(seq, error)])

    # --- resources -------------------------------------------------------------------

    def device(self, index: int) -> DeviceHost:
        if index >= len(self.devices):
            raise RequestError(ErrorCode.ENODEV, f"no device {index}; this daemon has "
                                                 f"{len(self.devices)} (see `npuctl devices`)")
        return self.devices[index]

    def _job_done(self, job: Job) -> None:
        session = self.sessions.by_id(job.session_id)
        for bo, _va, _w in job.bindings:
            self.devices[bo.device].refs.release(bo)
        job.bindings = []
        job.stream = b""    # the session keeps the finished job (for a late wait), not its stream
        if session is not None:
            session.jobs_in_flight -= 1
            if job.error:
                session.jobs_failed += 1
            else:
                session.jobs_completed += 1
            session.modeled_cycles += int(job.stats.get("cycles", 0))
            self.usage.add(session.uid, job)
        self.trace.add(self.job_record(job))
        job.layers = None   # the trace event keeps them; a kept job must not pin an unloaded model's report
        fences.job_finished(self, job)
        if session is not None:
            session.keep_finished(job)

    def job_record(self, job: Job) -> dict:
        """A job as the `jobs` and `trace` ops show it (times in seconds since the daemon started)."""
        rel = self.started
        record = {"session": job.session_id, "pid": job.pid, "client": job.client, "job": job.id,
                  "device": job.device, "state": job.state, "model": job.model,
                  "model_name": job.model_name, "submitted_s": job.submitted - rel,
                  "cycles": int(job.stats.get("cycles", 0))}
        if job.started:
            record["started_s"] = job.started - rel
        if job.finished:
            record["finished_s"] = job.finished - rel
            if job.started:
                record["wall_ms"] = (job.finished - job.started) * 1e3
        if job.started:
            record["busy_ms"] = job.busy_s * 1e3
        if job.error is not None:
            record["error"] = job.error.code.value
        if job.layers is not None:
            record["layers"] = job.layers  # a shared reference: not part of the wire record
        if job.context is not None:
            record.update(priority=job.context.priority_name, context=job.context.id,
                          preemptions=job.preemptions)
        return record

    def close_session(self, session: Session, why: str) -> None:
        """Free everything a session holds; safe to call twice."""
        if session.closed:
            return
        session.closed = True
        self.sessions.remove(session)
        fences.cancel_session(self, session, ErrorInfo.of(
            ErrorCode.ESHUTDOWN, "npud stopped before the job ran; submit it again once it is back")
            if self.stopping else ErrorInfo.of(ErrorCode.ECANCELED, "the session closed"))
        for model in session.models.values():
            hetero.unload(self, session, model)
        session.models.clear()
        for bo in session.buffers.values():
            self.devices[bo.device].refs.drop(session, bo)
        session.buffers.clear()
        session.attach_scope.cancel()  # the companion socket's task closes it
        log.info("session %s (%s, pid %d) closed: %s", session.id, session.name, session.pid, why,
                 extra={"session": session.id, "uid": session.uid})

    # The periodic loops visit the sessions in functions of their own: a loop variable in the
    # long-lived coroutine kept the last session it saw (and its 1024 kept jobs) alive after
    # every client had left, until another session connected (the soak's probe found it).

    async def _sample_usage(self) -> None:
        """Feed the utilisation windows of devices and sessions (util_pct)."""
        while True:
            await trio.sleep(SAMPLE_PERIOD_S)
            self._sample_once(time.monotonic())

    def _sample_once(self, now: float) -> None:
        for device in self.devices:
            device.usage.sample(now, device.busy_now(now))
        for session in self.sessions:
            for device in self.devices:
                session.window(device.index).sample(now, session.busy_on(device, now))
        self.heap.tick(now, len(self.sessions) > 0)

    async def _expire_leases(self) -> None:
        lease_s = self.config.limits.lease_ms / 1000
        while True:
            await trio.sleep(min(1.0, lease_s / 4))
            self._expire_once(time.monotonic(), lease_s)

    def _expire_once(self, now: float, lease_s: float) -> None:
        for session in self.sessions:
            if session.attach is None and now - session.last_seen > lease_s:
                self.close_session(session, "lease expired")


def _user_id(frame) -> str:
    """The User-Id property of a received message ("" if none: not a frame, or no ZAP answer)."""
    if not isinstance(frame, zmq.Frame):
        return ""
    try:
        return frame.get("User-Id") or ""
    except zmq.ZMQError:
        return ""


def _someone_listens(path: str) -> bool:
    """Whether a live process accepts connections on this Unix socket path."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    except OSError:
        return False
    finally:
        probe.close()
