"""Models: from ONNX bytes to a loaded executable a session can run.

``ModelLoader.executable`` answers from the compile cache or sends the model
to a compiler worker (the daemon never parses a model); identical compiles in
flight at the same time are done once.  ``instantiate`` turns an executable
into a ``LoadedModel`` for one session: it checks the executable's memory
layout and command stream as it would any client's (the worker's output is not
trusted either), allocates the weights and arena as buffer objects charged to
the session, and registers the stream with the device as a program validated
once for all runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import trio

from npud.drivers import Binding, DeviceParams, ProgramRejected
from npud.executable import ExecutableFormatError, weights_part
from npud.ipc_schema.errors import ErrorCode, RequestError

from .compile_cache import CachedExecutable, CompileCache, cache_key, model_digest
from .compilers import CompilerPool, raise_for
from .jobs import compact_layers
from .memory import BufferObject, round_up

if TYPE_CHECKING:
    from npud.targets import Target

    from .devices import DeviceHost
    from .sessions import Session


@dataclass(eq=False)
class LoadedModel:
    id: int
    device: int
    exe: CachedExecutable
    program: int
    fixed: list[tuple[BufferObject, int, bool]]      # weights and arena: (buffer, va, writable)
    inputs: list[dict]                               # I/O table entries, in binding order
    outputs: list[dict]
    regions: dict[str, dict] = field(default_factory=dict)
    # What each run needs of the per-op report, kept while loaded (the cached executable keeps
    # its report packed): (node, op, cycles) per layer for `trace` (jobs.compact_layers), the
    # modeled cycles of a run, and the model's name.
    layers: bytes = b""
    cycles: int = 0
    name: str = ""

    def info(self, cached: bool, compile_ms: float) -> dict:
        weights = sum(bo.mapped_size for bo, _va, w in self.fixed if not w)
        arena = sum(bo.mapped_size for bo, _va, w in self.fixed if w)
        return {"model": self.id, "inputs": [tensor_info(e) for e in self.inputs],
                "outputs": [tensor_info(e) for e in self.outputs], "cached": cached,
                "compile_ms": compile_ms, "weights_bytes": weights, "arena_bytes": arena}


def tensor_info(e: dict) -> dict:
    """An I/O table entry as a load's reply lists it (TENSOR_INFO)."""
    return {"name": e["name"], "dtype": e["dtype"], "shape": list(e["shape"]), "size": e["size"],
            **{k: list(e[k]) for k in DECLARED_FIELDS if k in e}}


log = logging.getLogger("npud.models")
DECLARED_FIELDS = ("symbolic", "defaulted")   # what an I/O table entry says of declared dims (1.7)
HASH_IN_THREAD_BYTES = 1 << 20
PRESENTED_KEPT = 65536   # model digests remembered as sent (52 bytes each, allocated at start: 3.3 MiB)
DIGEST_BYTES = 32
PLANS_KEPT = 64   # partition plans kept in memory, at most
PLANS_BYTES = 64 << 20   # and at most this many bytes of their submodels


class PresentedDigests:
    """Which users have sent the bytes behind each model digest: at most ``capacity`` digests,
    the least recently presented forgotten first (a forgotten digest only costs its user one
    upload of the bytes: ENOENT, then the client sends them).

    Kept in arrays allocated once (the digests side by side, a first user and a last-presented
    stamp per slot, an open-addressing index of slots), so that the entries added while the
    daemon is busy are no Python objects of their own: as a dict of bytes to tuples they were
    ~200 bytes in three small objects per digest, made among the transient objects of the load
    and outliving it, which kept pymalloc's arenas from being returned.  A digest's further users
    (rare: one user per digest, nearly always) are in a dict of their own.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._digests = bytearray(DIGEST_BYTES * capacity)
        self._first = np.full(capacity, -1, np.int64)       # first user of each slot (-1: free)
        self._stamp = np.zeros(capacity, np.int64)          # when each slot was last presented
        self._index = np.zeros(_table_size(capacity), np.int32)   # slot + 1, or 0: empty
        self._more: dict[int, tuple[int, ...]] = {}        # slot -> its other users
        self._used = 0
        self._clock = 0

    def __len__(self) -> int:
        return self._used

    def __iter__(self):
        """The digests, least recently presented first."""
        slots = np.argsort(self._stamp[:self._used], kind="stable")
        return (self._digest(int(s)) for s in slots)

    def users(self, digest: bytes) -> tuple[int, ...]:
        _pos, slot = self._find(digest)
        return () if slot < 0 else (int(self._first[slot]), *self._more.get(slot, ()))

    def add(self, digest: bytes, uid: int) -> None:
        """Record that ``uid`` sent the bytes of ``digest`` (now its most recently presented)."""
        if len(digest) != DIGEST_BYTES:
            raise ValueError(f"a model digest is {DIGEST_BYTES} bytes, not {len(digest)}")
        pos, slot = self._find(digest)
        if slot < 0:
            if self._used < self.capacity:
                slot, self._used = self._used, self._used + 1
            else:
                slot = int(np.argmin(self._stamp))
                self._remove(slot)
            pos, _ = self._find(digest)
            self._index[pos] = slot + 1
            self._digests[slot * DIGEST_BYTES:(slot + 1) * DIGEST_BYTES] = digest
            self._first[slot] = uid
        elif uid != self._first[slot] and uid not in self._more.get(slot, ()):
            self._more[slot] = (*self._more.get(slot, ()), uid)
        self._clock += 1
        self._stamp[slot] = self._clock

    def _digest(self, slot: int) -> bytes:
        return bytes(self._digests[slot * DIGEST_BYTES:(slot + 1) * DIGEST_BYTES])

    def _home(self, digest) -> int:
        return int.from_bytes(digest[:8], "little") & (len(self._index) - 1)

    def _find(self, digest: bytes) -> tuple[int, int]:
        """(position in the index, slot) of ``digest``, or (the empty position it would take, -1)."""
        mask = len(self._index) - 1
        pos = self._home(digest) if len(digest) == DIGEST_BYTES else 0
        view = memoryview(self._digests)
        while True:
            entry = int(self._index[pos])
            if entry == 0:
                return pos, -1
            slot = entry - 1
            if view[slot * DIGEST_BYTES:(slot + 1) * DIGEST_BYTES] == digest:
                return pos, slot
            pos = (pos + 1) & mask

    def _remove(self, slot: int) -> None:
        """Take ``slot`` out of the index (backward-shift deletion: no tombstones to pile up)."""
        mask = len(self._index) - 1
        pos, _ = self._find(self._digest(slot))
        self._index[pos] = 0
        self._more.pop(slot, None)
        nxt = pos
        while True:
            nxt = (nxt + 1) & mask
            entry = int(self._index[nxt])
            if entry == 0:
                return
            home = self._home(self._digest(entry - 1))
            if (nxt - home) & mask >= (nxt - pos) & mask:   # it may move back into the hole
                self._index[pos], self._index[nxt] = entry, 0
                pos = nxt


def _table_size(capacity: int) -> int:
    """A power of two at least twice ``capacity``: probes stay short."""
    return 1 << max(1, (2 * capacity - 1).bit_length())


class ModelLoader:
    def __init__(self, pool: CompilerPool, cache: CompileCache):
        self.pool = pool
        self.cache = cache
        self._in_flight: dict[str, trio.Event] = {}
        # Which users have sent the bytes behind a digest: a digest alone must not let one
        # user run another's model (knowing a hash is not having the model).
        self._presented = PresentedDigests(PRESENTED_KEPT)
        self._storing: set[trio.Event] = set()
        self._plans: dict[str, dict] = {}   # partition plans, least recently used first

    async def executable(self, model, options: dict, config: DeviceParams, digest: bytes | None = None,
                         private_copy=None, compile_faults: list | None = None, *,
                         target: Target) -> tuple[CachedExecutable, bool, float]:
        """(executable, came from the cache, milliseconds it took).

        ``digest`` is ``model_digest(model)`` if the caller computed it already.
        ``model`` may be memory its client can still change (a buffer); then
        ``private_copy`` is an async function returning ``(copy, digest)``, and
        only a cache miss pays for the copy: a hit serves an entry compiled from
        bytes with that very digest, whatever the client did meanwhile, while a
        compile must hash exactly the bytes it compiles.  ``compile_faults`` (test mode): the
        session's pending slow_compile faults; a compile takes the first.  ``target``: the
        device's compiler target (its fingerprint is part of the key).
        """
        started = time.perf_counter()
        if digest is None and len(model) >= HASH_IN_THREAD_BYTES:  # ~0.5 ms per MB: not on the event loop
            digest = await trio.to_thread.run_sync(model_digest, model)
        fingerprint = target.fingerprint()
        key = cache_key(model, options, config, fingerprint, digest)
        exe = await self._lookup(key)
        if exe is None and private_copy is not None:
            model, digest = await private_copy()
            key = cache_key(model, options, config, fingerprint, digest)
            exe = await self._lookup(key)
        if exe is not None:
            return exe, True, (time.perf_counter() - started) * 1e3
        self._in_flight[key] = done = trio.Event()
        storing = False
        try:
            request = {"op": "compile", "model": model, "config": config.to_dict(), "options": options,
                       "target": target.name}
            # The request owns the model: the pool lets go of it once sent, so that of a model with
            # big weights its copy and the executable coming back are not held at once
            size = len(model)
            del model
            if compile_faults:
                request["slow_s"] = compile_faults.pop(0)["slow_ms"] / 1000
            reply = raise_for(await self.pool.compile(request))
            received = time.perf_counter()
            data = reply["executable"]
            try:
                exe = await trio.to_thread.run_sync(CachedExecutable.from_bytes, data)
            except ExecutableFormatError as exc:
                raise RequestError(ErrorCode.EIO, f"the compiler produced an unreadable executable: {exc}")
            # The load does not wait for the disk (a 100 MB fsync can take 0.1-0.5 s); lookups of the
            # same key, cache_list and cache_clear wait for the entry.
            trio.lowlevel.spawn_system_task(self._store, key, data, exe, done)
            storing = True
            log.debug("compiled a %d-byte model in %.0f ms (the worker's part %.0f ms, %.0f ms after it)",
                      size, (time.perf_counter() - started) * 1e3, reply.get("seconds", 0) * 1e3,
                      (time.perf_counter() - received) * 1e3)
        finally:
            if not storing:
                self._done(key, done)
        return exe, False, (time.perf_counter() - started) * 1e3

    def presented_by(self, digest: bytes, uid: int) -> bool:
        """Whether ``uid`` has sent the bytes behind ``digest`` (a digest alone proves nothing)."""
        return uid >= 0 and uid in self._presented.users(digest)

    def presented(self, digest: bytes, uid: int) -> None:
        """Record that ``uid`` sent the bytes whose digest this is."""
        if uid >= 0:
            self._presented.add(digest, uid)

    async def by_digest(self, digest: bytes, options: dict, config: DeviceParams,
                        uid: int, target: Target | None = None) -> tuple[CachedExecutable, bool, float]:
        """A cached executable for a model known only by its digest, for a user who has sent it."""
        started = time.perf_counter()
        exe = None
        if self.presented_by(digest, uid):
            exe = await self._lookup(cache_key(None, options, config, target.fingerprint(), digest))
        if exe is None:
            raise RequestError(ErrorCode.ENOENT, "no cached executable of that model digest for this user "
                                                 "and these options: send the model's bytes")
        return exe, True, (time.perf_counter() - started) * 1e3

    async def _store(self, key: str, data: bytes, exe: CachedExecutable, done: trio.Event) -> None:
        self._storing.add(done)
        try:
            ident = await trio.to_thread.run_sync(self.cache.put, key, data)
            if ident is not None:
                self.cache.remember(key, ident, exe)
        except Exception:  # a system task must not raise; put already logs disk errors
            log.exception("storing compile cache entry %s failed", key)
        finally:
            self._storing.discard(done)
            self._done(key, done)

    def _done(self, key: str, done: trio.Event) -> None:
        if self._in_flight.get(key) is done:
            del self._in_flight[key]
        done.set()

    async def settled(self) -> None:
        """Wait until every cache entry being written is on disk."""
        for event in list(self._storing):
            await event.wait()

    async def _lookup(self, key: str) -> CachedExecutable | None:
        """The cached executable, or None and no compile of ``key`` under way: the caller
        must then mark its own compile in flight before it awaits anything."""
        while True:
            while key in self._in_flight:  # the same compile is under way: wait for its entry
                await self._in_flight[key].wait()
            exe = await trio.to_thread.run_sync(self.cache.get, key)
            if exe is not None or key not in self._in_flight:  # else one started while we read
                return exe

    def partitioned(self, model, options: dict, config: DeviceParams, target: Target, fallback: str,
                    digest: bytes) -> bool:
        """Whether a kept plan says the target declines nodes of this model: its load can skip the
        whole-model compile, which would only fail again."""
        plan = self._plans.get(_plan_key(model, options, config, target, fallback, digest))
        return bool(plan and plan["partitions"])

    async def partition(self, model: bytes, options: dict, config: DeviceParams, target: Target,
                        fallback: str, digest: bytes | None = None) -> dict:
        """The partition plan of a model the target declines nodes of (a compiler worker's
        ``partition`` reply, npud/compiler_worker/partition.py), kept in memory by the model's
        digest, options, device and compiler: a reload asks no worker."""
        key = _plan_key(model, options, config, target, fallback, digest)
        plan = self._plans.pop(key, None)
        if plan is None:
            plan = raise_for(await self.pool.compile(
                {"op": "partition", "model": model, "config": config.to_dict(), "options": options,
                 "target": target.name, "fallback": fallback}))
        self._plans[key] = plan   # most recently used last
        while len(self._plans) > PLANS_KEPT or sum(map(_plan_bytes, self._plans.values())) > PLANS_BYTES:
            del self._plans[next(iter(self._plans))]
        return plan

    async def check(self, model: bytes, config: DeviceParams, target: Target) -> list[dict]:
        return raise_for(await self.pool.compile(
            {"op": "check", "model": model, "config": config.to_dict(), "target": target.name}))["problems"]


def _plan_key(model, options: dict, config: DeviceParams, target: "Target", fallback: str,
              digest: bytes | None) -> str:
    """A partition plan's name: what a compile's cache key names, and the fallback target."""
    return cache_key(model, {**options, "partition": fallback}, config, target.fingerprint(), digest)


def _plan_bytes(plan: dict) -> int:
    """The bytes a kept partition plan holds: its submodels'."""
    return sum(len(part["model"]) for part in plan["partitions"])


def _copy_into(dst: memoryview, src: memoryview) -> None:
    dst[: len(src)] = src


def check_layout(spans: list[tuple[int, int, str]], page: int) -> None:
    """Refuse unaligned or overlapping (va, size, name) spans of an address space."""
    ordered = sorted((va, va + round_up(max(size, 1), page), name) for va, size, name in spans)
    for va, _end, name in ordered:
        if va % page:
            raise RequestError(ErrorCode.EINVAL, f"{name}: va {va:#x} is not a multiple of the page size {page}")
    for (_, end, first), (start, _, second) in zip(ordered, ordered[1:]):
        if start < end:
            raise RequestError(ErrorCode.EINVAL, f"{second} overlaps {first} in the address space")


async def instantiate(session: "Session", device: "DeviceHost", exe: CachedExecutable, model_id: int,
                      quota: int) -> LoadedModel:
    config = device.config
    if bytes(exe.target_hash) != config.target_hash():
        raise RequestError(ErrorCode.EIO, "the executable was built for another target")
    regions = {r["name"]: r for r in exe.memory["regions"]}
    page = config.page_size
    check_layout([(r["va"], r["size"], f"region {name}") for name, r in regions.items()], page)
    fixed_regions = [r for r in regions.values() if r["kind"] not in ("input", "output")]
    charge = sum(round_up(max(r["size"], 1), page) for r in fixed_regions)
    if session.memory + charge > quota:
        raise RequestError(ErrorCode.EDQUOT, f"this model needs {charge} bytes of device memory for its "
                                             f"weights and arena; the session holds {session.memory} of "
                                             f"its {quota}-byte quota")
    mappings = [Binding(r["va"], round_up(max(r["size"], 1), page), bool(r["writable"]))
                for r in regions.values()]
    io, ops, stream = exe.io, exe.ops, exe.stream   # a cached executable decodes them at each access
    by_tensor = {(r["kind"], r.get("tensor")): r for r in regions.values()}
    for kind, entries in (("input", io["inputs"]), ("output", io["outputs"])):
        for entry in entries:
            region = by_tensor.get((kind, entry["name"]))
            if region is None or region["va"] != entry["va"] or region["size"] < entry["size"]:
                raise RequestError(ErrorCode.EIO, f"the executable's I/O table does not match its layout "
                                                  f"({kind} {entry['name']!r})")
    # An executable object (the compile cache keeps them in memory) is validated once per target
    # and layout; its stream cannot change.
    checked = _validation_key(config, mappings)
    if not exe.validated_for(checked):
        try:
            await trio.to_thread.run_sync(device.validate, stream, mappings)
        except ProgramRejected as exc:
            raise RequestError(ErrorCode.EIO, f"the compiler produced a stream the device refuses: "
                                              f"{exc}") from None
        exe.validated += checked
    bounds, cycles = _report_bounds(ops)
    fixed = await _fixed_buffers(device, exe, fixed_regions)
    for bo, _va, _w in fixed:
        device.refs.charge(session, bo)
    program = None
    try:
        # Read-only weights are immutable while the program is loaded: written once above, before
        # the load, and no client holds a handle to them (the device may keep them pre-arranged).
        immutable = [r["kind"] == "weights" and not r["writable"] for r in regions.values()]
        program = device.programs.add(stream, [(m.va, m.size, m.writable, frozen)
                                               for m, frozen in zip(mappings, immutable)], bounds)
        if exe.trace_layers is None:
            exe.trace_layers = compact_layers(ops)
        # The name interned: the trace ring keeps it for each of its events, and names repeat.
        return LoadedModel(model_id, device.index, exe, program, fixed, io["inputs"], io["outputs"], regions,
                           layers=exe.trace_layers, cycles=cycles,
                           name=sys.intern(str(exe.meta.get("model_name", ""))[:256]))
    except BaseException as exc:   # undo it all: nothing stays charged, allocated or registered
        device.refs.drop_all(session, fixed)
        if program is not None:
            device.programs.remove(program)
        if isinstance(exc, Exception) and not isinstance(exc, RequestError):
            raise RequestError(ErrorCode.EIO, f"the executable is malformed ({exc!r})") from None
        raise


def _report_bounds(ops: list) -> tuple[list[int], int]:
    """(the command count at the end of each layer, the modeled cycles of a run) from the
    executable's per-op report, or EIO: the compiler's report is checked like its stream."""
    bounds, total, cycles = [], 0, 0
    try:
        for row in ops:
            total += int(row.get("commands", 0))
            cycles += int(row.get("cycles", 0))
            bounds.append(total)
    except (AttributeError, TypeError, ValueError) as exc:
        raise RequestError(ErrorCode.EIO, f"the executable's per-op report is malformed ({exc})") from None
    return bounds, cycles


def _validation_key(config: DeviceParams, mappings: list[Binding]) -> bytes:
    """What a stream was validated against (the target and the layout), as 16 bytes."""
    text = json.dumps([config.to_dict(), [(m.va, m.size, m.writable) for m in mappings]], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=CachedExecutable.VALIDATION_KEY).digest()


async def _fixed_buffers(device: "DeviceHost", exe: CachedExecutable, fixed_regions: list[dict]) -> list:
    """The weights and arena buffers of one load: (buffer, va, writable) each.

    Weights are mapped read-only, so every load of one executable on a device shares its weights
    buffers (one per weights region: weights larger than the device's largest buffer object come
    in several regions): a cache hit copies no weights.  (Each session is still charged for them.)
    The device's table of them refers to the buffers weakly: a released buffer leaves no record."""
    fixed = []
    try:
        for r in fixed_regions:
            size = max(r["size"], 1)
            shared = (exe, r["name"])
            if r["kind"] == "weights" and not r["writable"]:
                bo = device.shared_weights.get(shared)
                if bo is not None and bo.refs > 0 and not bo.uncharged and bo.size == size:
                    fixed.append((device.refs.retain(bo), r["va"], False))
                    continue
            bo = device.memory.allocate(size)
            fixed.append((bo, r["va"], bool(r["writable"])))
            if r["kind"] == "weights":
                try:
                    weights = weights_part(exe.weights, r)
                except ValueError as exc:
                    raise RequestError(ErrorCode.EIO, f"the executable's weights do not match its layout: {exc}") from None
                if len(weights) >= HASH_IN_THREAD_BYTES:  # a ResNet-50 is 100 MB: not on the event loop
                    await trio.to_thread.run_sync(_copy_into, bo.view(), weights)
                else:
                    bo.view()[: len(weights)] = weights
                if not r["writable"]:
                    device.shared_weights[shared] = bo
    except BaseException:
        for bo, _va, _w in fixed:
            device.refs.release(bo)
        raise
    return fixed
