"""The session under both clients (clients/npu/core.py): replies matched by seq first, one client
shared by threads, ConnectionLost at once when the daemon dies, and one API for both clients."""

from __future__ import annotations

import inspect
import os
import secrets
import signal
import socket
import threading
import time

import numpy as np
import onnx
import pytest
import trio
import zmq

import npu
from examples import tiny_cnn
from npud.ipc_schema import codec
from npud.ipc_schema.schema import MAX_MESSAGE_BYTES
from npu.local import LocalDaemon

LIMITS = {"max_message_bytes": MAX_MESSAGE_BYTES, "max_inline_bytes": 1 << 20,
          "max_buffer_bytes": 1 << 20, "memory_quota": 1 << 20}


class FakeDaemon:
    """A bare ROUTER answering hello (no companion socket) and whatever ``answer(request)`` returns:
    a list of frames to send back (``[]``: say nothing).  ``close()`` drops the connection."""

    def __init__(self, endpoint: str, answer=lambda request: []):
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if endpoint.endswith(":*"):
            self.endpoint = endpoint[:-2] + f":{self.sock.bind_to_random_port(endpoint[:-2])}"
        else:
            self.sock.bind(endpoint)
            self.endpoint = endpoint
        self.answer = answer
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            routing_id, frame = self.sock.recv_multipart()
            request = codec.decode_request(frame)
            if request.op.name == "hello":
                replies = [codec.encode_result(request.seq, {
                    "session": "s-fake", "protocol": list(request.args["protocol"]), "daemon_version": "9.9",
                    "lease_ms": 60000, "attach_path": "", "attach_token": secrets.token_bytes(32),
                    "limits": LIMITS})]
            else:
                replies = self.answer(request)
            for reply in replies:
                self.sock.send_multipart([routing_id, reply])
        self.sock.close(linger=0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def test_a_late_reply_is_dropped_not_checked_against_the_next_request(tmp_path):
    """The reply to a request that timed out arrives just before the next request's: it must be
    dropped by its seq, not checked against the next op's schema (EPROTO)."""
    held = []

    def answer(request):
        if request.op.name == "ping":
            held.append(request.seq)         # answered late, with the next reply
            return []
        return [codec.encode_result(held[0], {}),
                codec.encode_result(request.seq, {"handle": 7, "size": request.args["size"]})]
    fake = FakeDaemon(f"ipc://{tmp_path}/late.sock", answer)
    try:
        c = npu.connect(fake.endpoint, timeout=0.3)
        with pytest.raises(npu.Timeout):
            c.ping()
        buf = c.alloc(4096)
        assert (buf.handle, buf.size) == (7, 4096)
        assert c._core.stale == 1
    finally:
        fake.close()


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_a_session_without_companion_socket_is_lost_when_its_connection_closes(tmp_path, transport):
    """No companion socket (tcp, or this fake): the connection's end is the session's; a blocked
    call raises ConnectionLost at once instead of waiting for its timeout."""
    fake = FakeDaemon(f"ipc://{tmp_path}/plain.sock" if transport == "ipc" else "tcp://127.0.0.1:*")
    c = npu.connect(fake.endpoint, timeout=30)
    assert not c.attached
    threading.Timer(0.3, fake.close).start()
    t0 = time.monotonic()
    with pytest.raises(npu.ConnectionLost, match="reconnect"):
        c.ping()                      # the fake never answers a ping
    assert time.monotonic() - t0 < 5
    with pytest.raises(npu.ConnectionLost):
        c.ping()                      # and later calls fail at once
    buf = npu.Buffer(c, 1, 64, 0)
    c._core.lost = None               # map without a companion socket is refused locally:
    with pytest.raises(npu.InvalidArgument) as info:  # not supported, not a lost session
        buf.map()
    assert info.value.code == "EOPNOTSUPP"
    c._closed = True


def test_companion_connect_waits_out_a_full_backlog(tmp_path):
    """EAGAIN from connect (the listen backlog is full for a moment) is retried with backoff."""
    from npu.client import _attach

    path = str(tmp_path / "busy.fds")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen(0)
    fillers = []
    while True:   # fill the backlog
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        filler.setblocking(False)
        try:
            filler.connect(path)
        except BlockingIOError:
            filler.close()
            break
        fillers.append(filler)

    def accept_late():
        time.sleep(0.3)
        server.settimeout(5)
        for _ in range(len(fillers) + 1):
            conn, _ = server.accept()
            conn.settimeout(0.5)
            try:
                if conn.recv(4096):       # the client's attach request: say yes
                    conn.send(codec.pack({"ok": True}))
                    served.append(conn)
            except socket.timeout:
                conn.close()
    served: list = []
    thread = threading.Thread(target=accept_late)
    thread.start()
    try:
        sock = _attach(path, "s-x", bytes(32))
        sock.close()
    finally:
        thread.join(10)
        for s in (*fillers, *served, server):
            s.close()
    assert served, "the client never got through"


def test_every_blocked_call_raises_connection_lost_when_the_daemon_is_killed(daemon_to_kill, tmp_path):
    """SIGKILL (no shutdown event, the socket file left behind): job.wait, ping and load blocked in
    threads sharing one sync client, and a trio client's wait and ping, all raise ConnectionLost
    within seconds -- not after their 30 s timeouts.  The daemon is SIGSTOPped first, so that every
    call is surely waiting on it when it dies."""
    d = daemon_to_kill
    model_path = tmp_path / "cnn.onnx"
    onnx.save(tiny_cnn.build(), model_path)
    c = npu.connect(d.endpoint, timeout=30)
    model = c.load(model_path)
    job = model.submit(np.zeros(model.inputs[0].shape, np.float32))   # its result is asked for below
    token = job.export_fence()
    outcome: dict[str, object] = {}
    started, stopped = threading.Event(), threading.Event()
    killed_at = [0.0]

    def blocked(name, call):
        try:
            outcome[name] = call()
        except npu.NpuError as exc:
            outcome[name] = exc
        outcome[name + " s"] = time.monotonic() - killed_at[0]

    async def trio_client():
        async with npu.connect_async(d.endpoint, timeout=30) as ac:
            imported = await ac.import_fence(token)
            started.set()
            await trio.to_thread.run_sync(stopped.wait)

            async def one(name, call):
                try:
                    outcome[name] = await call()
                except npu.NpuError as exc:
                    outcome[name] = exc
                outcome[name + " s"] = time.monotonic() - killed_at[0]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, "trio wait", lambda: imported.wait(60))
                nursery.start_soon(one, "trio ping", ac.ping)

    threads = [threading.Thread(target=trio.run, args=(trio_client,))]
    threads[0].start()
    assert started.wait(20)
    os.kill(d.process.pid, signal.SIGSTOP)      # from now on nothing is answered
    stopped.set()
    threads += [threading.Thread(target=blocked, args=("wait", lambda: job.wait(60))),
                threading.Thread(target=blocked, args=("ping", c.ping)),
                threading.Thread(target=blocked, args=("load", lambda: c.load(tiny_cnn.build(), name="again")))]
    for t in threads[1:]:
        t.start()
    time.sleep(0.5)
    killed_at[0] = time.monotonic()
    os.kill(d.process.pid, signal.SIGKILL)
    for t in threads:
        t.join(15)
        assert not t.is_alive(), "a call still blocked after the daemon's death"
    for name in ("wait", "ping", "load", "trio wait", "trio ping"):
        assert isinstance(outcome[name], npu.ConnectionLost), (name, outcome[name])
        assert outcome[name + " s"] < 5, (name, outcome[name + " s"])
    print({k: round(v, 3) for k, v in outcome.items() if k.endswith(" s")})
    with pytest.raises(npu.ConnectionLost):     # the socket file is left: still refused at once
        npu.connect(d.endpoint, timeout=30)
    c._closed = True


@pytest.fixture
def daemon_to_kill():
    """A private daemon the test kills; its device processes are reaped whatever happens."""
    d = LocalDaemon()
    kids = [int(e) for e in os.listdir("/proc") if e.isdigit() and _parent(int(e)) == d.process.pid]
    yield d
    d.stop()
    for pid in kids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def test_one_client_shared_by_8_threads_100_runs_each(daemon, tmp_path):
    """As onnxruntime's InferenceSession.run: threads share one client and one model."""
    path = tmp_path / "cnn.onnx"
    onnx.save(tiny_cnn.build(), path)
    with npu.connect(daemon.endpoint) as c:
        model = c.load(path)
        rng = np.random.default_rng(1)
        xs = [rng.standard_normal(model.inputs[0].shape).astype(np.float32) for _ in range(8)]
        name = model.outputs[0].name
        expected = [model.run(x)[name] for x in xs]
        right, errors = [0] * 8, []

        def worker(i):
            try:
                for _ in range(100):
                    right[i] += np.array_equal(model.run(xs[i])[name], expected[i])
            except Exception as exc:   # noqa: BLE001 - reported below
                errors.append(exc)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors[:3]
        assert right == [100] * 8
        assert c._core.stale == 0


def test_an_interrupted_run_does_not_return_its_buffers_to_the_pool(client, tmp_path):
    """Interrupted after run_model left (here: KeyboardInterrupt), a job may be running on the
    buffer set: both clients discard it (they used to differ)."""
    path = tmp_path / "cnn.onnx"
    onnx.save(tiny_cnn.build(), path)
    model = client.load(path)
    x = np.zeros(model.inputs[0].shape, np.float32)
    model.run(x)
    pooled = list(model._idle_sets)
    real_call = client._call

    def interrupted(call):
        result = real_call(call)
        if call.op == "run_model":
            raise KeyboardInterrupt
        return result
    client._call = interrupted
    with pytest.raises(KeyboardInterrupt):
        model.run(x)
    del client._call
    assert model._idle_sets == [] and all(b._freed for io in pooled for b in (*io[0], *io[1]))
    model.run(x)


PAIRS = [(npu.Client, npu.AsyncClient), (npu.Buffer, npu.AsyncBuffer), (npu.Job, npu.AsyncJob),
         (npu.Model, npu.AsyncModel), (npu.ModelJob, npu.AsyncModelJob),
         (npu.Execution, npu.AsyncExecution), (npu.ExecutionJob, npu.AsyncExecutionJob)]
# Intentional differences: a trio session is the ``async with npu.connect_async()`` block, so it is
# not closed or reopened by methods.
SYNC_ONLY = {npu.Client: {"close", "reconnect"}}


@pytest.mark.parametrize("sync,aio", PAIRS, ids=[s.__name__ for s, _ in PAIRS])
def test_both_clients_expose_the_same_api(sync, aio):
    def public(cls):
        return {n for n in dir(cls) if not n.startswith("_")}
    assert public(sync) - SYNC_ONLY.get(sync, set()) == public(aio)
    for name in public(aio):
        s, a = inspect.getattr_static(sync, name), inspect.getattr_static(aio, name)
        if callable(s):
            assert inspect.iscoroutinefunction(a), f"{aio.__name__}.{name} is not async"
            assert inspect.signature(s) == inspect.signature(a), name
