"""Every request, reply and event of the npud protocol: the one source of truth.

A request is a msgpack map ``{"op": str, "seq": int, "args": map}``; the reply
carries the same ``seq`` and either ``{"ok": true, "result": map}`` or
``{"ok": false, "error": {"code", "message", "retryable"}}``.  Events are maps
``{"event": str, "data": map}`` that the daemon sends unprompted.  The tables
below give, for each op, the exact fields of ``args`` and ``result``; the
decoder refuses anything else before a handler runs, and docs/PROTOCOL.md is
generated from (and tested against) these tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from .types import Any_, Array, Bin, Bool, F, Float, Int, MapOf, Str, Struct, Type

PROTOCOL_VERSION = (1, 8)
"""(major, minor).  A major bump breaks compatibility; a minor bump only adds."""

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

MAX_INLINE_BYTES = 16 * MiB
"""Largest payload (buffer data, command stream, tensor) carried inside one message."""

MAX_MESSAGE_BYTES = MAX_INLINE_BYTES + 64 * KiB
"""Largest frame the daemon answers; a larger one gets EMSGSIZE."""

HARD_FRAME_LIMIT = 2 * MAX_MESSAGE_BYTES
"""ZMQ_MAXMSGSIZE: a peer sending a frame larger than this is disconnected by libzmq
before the daemon ever buffers it (the daemon stays up; the client library refuses
such frames locally with EMSGSIZE, so well-behaved clients never meet it)."""

MAX_SEQ = 2**32 - 1
MAX_BUFFER_BYTES = 1 << 40  # absolute ceiling of one allocation; configured limits are lower
MAX_BINDINGS = 256
DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool")
MAX_RANK = 8
MAX_MODEL_BUFFERS = 1024

U32 = Int(0, 2**32 - 1)
U64 = Int(0, 2**64 - 1)
HANDLE = Int(1, 2**32 - 1)
DEVICE_INDEX = Int(0, 255)
TIMEOUT_MS = Int(0, 24 * 3600 * 1000)
PRIORITY_NAMES = ("low", "normal", "high", "realtime")
PRIORITY = Str(16, PRIORITY_NAMES)
MAX_DEPENDENCIES = 256
FENCE_TOKEN = Str(64)

TENSOR = Struct("tensor", {
    "dtype": F(Str(16, DTYPES), "element type"),
    "shape": F(Array(Int(0, 2**31 - 1), MAX_RANK), "dimensions, outermost first (C order)"),
    "data": F(Bin(MAX_INLINE_BYTES), "the elements, little-endian, C order (inline form)", optional=True),
    "buffer": F(HANDLE, "buffer handle holding the elements (by-reference form)", optional=True),
    "offset": F(U64, "byte offset into `buffer`", optional=True),
}, doc="A tensor: exactly one of `data` (inline, small) or `buffer` (+`offset`, large) is present, "
       "and the byte size must equal the product of `shape` times the dtype's size.")

BINDING = Struct("binding", {
    "handle": F(HANDLE, "buffer to map into the job's address space"),
    "va": F(U64, "device virtual address, a multiple of the device's page size"),
    "writable": F(Bool(), "whether the job may write the buffer"),
})

HISTOGRAM = Struct("histogram", {
    "bounds_ms": F(Array(Float(), 64), "upper bounds of the buckets in ms, increasing (the +Inf bucket is "
                                        "implicit: `count`)"),
    "counts": F(Array(U64, 64), "counts[i]: observations of at most bounds_ms[i] (cumulative, as "
                                "Prometheus buckets are)"),
    "count": F(U64, "observations"),
    "sum_ms": F(Float(), "their sum in ms"),
}, doc="Durations counted in fixed buckets since the daemon started (a Prometheus histogram).")

MACS_PER_CYCLE = Struct("macs_per_cycle", {
    "int8": F(U32, "int8 (and uint8) multiply-accumulates per cycle, per core"),
    "fp16": F(U32, "float16 multiply-accumulates per cycle, per core"),
    "fp32": F(U32, "float32 multiply-accumulates per cycle, per core"),
})

DEVICE_PARAMS = Struct("device_params", {
    "preset": F(Str(64), "the named parameter set (`edge`, `server`) the others started from"),
    "cores": F(U32, "compute cores (each a device process running one job at a time)"),
    "mac_rows": F(U32, "rows of the MAC array (output pixels per pass)", optional=True),
    "mac_cols": F(U32, "columns of the MAC array (output channels per pass)", optional=True),
    "macs_per_cycle": F(MACS_PER_CYCLE, "MAC rate by element type", optional=True),
    "clock_mhz": F(U32, "clock in MHz: modeled cycles / (clock_mhz x 1000) = modeled milliseconds"),
    "sram_bytes": F(U64, "on-chip SRAM per core", optional=True),
    "dma_bytes_per_cycle": F(U32, "DMA bandwidth between device memory and SRAM", optional=True),
    "dma_latency_cycles": F(U32, "fixed cost of each DMA transfer", optional=True),
    "memory_bytes": F(U64, "device memory (the same as `memory_total`)"),
    "page_size": F(U32, "MMU page size: buffer sizes round up to it, binding addresses are multiples of it"),
    "hw_contexts": F(U32, "hardware contexts (address spaces) of a core", optional=True),
    "max_buffer_bytes": F(U64, "the largest buffer object the device maps: the compiler cuts a "
                               "model's weights into regions no larger", optional=True, since=(1, 7)),
    "threads": F(U32, "the cpu driver's onnxruntime threads per device process", optional=True),
}, doc="A device's parameters, as its driver reports them (docs/DRIVERS.md): `preset`, `cores`, `clock_mhz`, "
       "`memory_bytes` and `page_size` for every driver; the others are npu-emu's architecture "
       "(docs/ISA.md), where all but "
       "`memory_bytes`, `page_size`, `hw_contexts` and `max_buffer_bytes` go into the target hash (below); "
       "`threads` is the "
       "cpu driver's.")

DEVICE = Struct("device", {
    "index": F(DEVICE_INDEX, "device number used in requests"),
    "name": F(Str(64), "configured name, e.g. npu0"),
    "preset": F(Str(64), "the named parameter set it was created from"),
    "driver": F(Str(64), "the driver serving it: an `npud.drivers` entry point (docs/DRIVERS.md)", optional=True),
    "driver_version": F(Str(64), "that driver's version", optional=True),
    "state": F(Str(16, ("ok", "resetting", "down")), "device process health"),
    "params": F(DEVICE_PARAMS, "architecture parameters"),
    "memory_total": F(U64, "bytes of device memory"),
    "memory_used": F(U64, "bytes allocated in buffer objects"),
    "jobs_queued": F(U32, "jobs waiting to run"),
    "jobs_running": F(U32, "jobs executing now"),
    "jobs_completed": F(U64, "jobs finished successfully since start"),
    "jobs_failed": F(U64, "jobs that failed since start"),
    "busy_ms": F(Float(), "wall time the device spent executing jobs, averaged over its cores (each core "
                         "is a device process; running jobs count their time so far), so utilisation over "
                         "an interval is its growth divided by the interval"),
    "resets": F(U32, "device process restarts"),
    "util_pct": F(Float(), "utilisation over the last `util_window_s` seconds (sampled every 0.5 s): time "
                           "its cores spent executing jobs / (wall time x cores), in percent, at most 100"),
    "util_window_s": F(Float(), "the window `util_pct` covers"),
    "modeled_cycles": F(U64, "modeled cycles of the jobs completed since start"),
    "modeled_busy_ms": F(Float(), "`modeled_cycles` at the device clock: what those jobs would take on "
                                  "the modeled hardware"),
    "cores": F(U32, "device processes running jobs in parallel (one per modeled core)", optional=True),
    "hangs": F(U32, "jobs that hung or crashed a device process since start", optional=True),
    "banned_contexts": F(U32, "contexts banned on this device for hanging it repeatedly", optional=True),
    "uuid": F(Str(64), "stable identity, the same across daemon restarts: NPU- and a UUID derived from the "
                       "host's machine-id, the device's configured name and its index", optional=True),
    "latency_ms": F(HISTOGRAM, "of every finished job (done or failed): submission to outcome, queueing "
                               "included", optional=True),
    "run_ms": F(HISTOGRAM, "of every job that ran: the device time it took", optional=True),
    "target_hash": F(Bin(8, 8), "the target hash a command stream's header must carry to run on it "
                                "(section *Command streams and the target hash*)", optional=True, since=(1, 5)),
    "kernels": F(Str(256), "the compute kernels its device processes run, e.g. `onednn 3.2.0 (avx512_core_vnni)`, "
                           "or `numpy reference` and why (absent until a device process has started)",
                 optional=True, since=(1, 6)),
    "compute_threads": F(U32, "the most threads any BLAS or OpenMP pool of its device processes uses: 1, "
                              "parallelism is across device processes (absent with `kernels`)",
                         optional=True, since=(1, 6)),
    "prepared_bytes": F(U64, "memory its device processes hold for the loaded programs' prepared (e.g. "
                             "pre-tiled) immutable weights, as they last reported it (absent with `kernels`)",
                        optional=True, since=(1, 8)),
})

USER_USAGE = Struct("user_usage", {
    "uid": F(Int(-1, 2**32), "user id (-1: unknown, or any uid past the first 4096 seen)"),
    "jobs_completed": F(U64, "jobs of its sessions that finished successfully since the daemon started"),
    "jobs_failed": F(U64, "jobs of its sessions that failed"),
    "busy_ms": F(Float(), "device time those jobs took (finished jobs only)"),
    "modeled_cycles": F(U64, "modeled cycles of its completed jobs"),
}, doc="One user's finished jobs since the daemon started, its closed sessions' included (counters).")

COMPILE_CACHE_STATS = Struct("compile_cache_stats", {
    "hits": F(U64, "loads served from the compile cache (memory or disk) since start"),
    "misses": F(U64, "loads that had to compile (no entry, or an unreadable or corrupt one)"),
    "discarded": F(U64, "corrupt entries deleted"),
})

CLIENT_DEVICE = Struct("client_device", {
    "device": F(DEVICE_INDEX, "device index"),
    "busy_ms": F(Float(), "device time (core-milliseconds) its jobs took on this device, running ones so far"),
    "util_pct": F(Float(), "its share of the device over the last 5 s: its jobs' busy core time / (wall "
                           "time x the device's cores), in percent; the clients' shares add up to at most "
                           "the device's `util_pct`"),
}, doc="A client's use of one device.")

CLIENT = Struct("client", {
    "session": F(Str(64), "session id"),
    "pid": F(Int(0, 2**31), "process id as the daemon sees it (0 if unknown; PID namespaces differ)"),
    "uid": F(Int(-1, 2**32), "user id: from the kernel (ipc), or the policy's entry for the client's CURVE "
                             "key (tcp); -1 if unknown"),
    "name": F(Str(64), "name the client gave in HELLO"),
    "command": F(Str(256), "process command line as the daemon reads it from /proc"),
    "attached": F(Bool(), "whether the companion socket (fd passing, liveness) is connected"),
    "buffers": F(U32, "buffer objects held"),
    "memory": F(U64, "bytes of buffer objects held"),
    "jobs_submitted": F(U64, "jobs submitted"),
    "jobs_completed": F(U64, "jobs completed"),
    "jobs_failed": F(U64, "jobs failed"),
    "connected_s": F(Float(), "seconds since HELLO"),
    "jobs_in_flight": F(U32, "jobs queued or running"),
    "models": F(U32, "models loaded"),
    "busy_ms": F(Float(), "device time (core-milliseconds) its jobs took, all devices (including running "
                          "jobs so far)"),
    "util_pct": F(Float(), "the sum of its per-device `util_pct` in `devices` (so up to 100 per device)"),
    "modeled_cycles": F(U64, "modeled cycles of its completed jobs"),
    "priority": F(PRIORITY, "priority of its default context", optional=True),
    "contexts": F(U32, "contexts it created (besides its default one)", optional=True),
    "banned_contexts": F(U32, "of its contexts, those banned for hanging a device", optional=True),
    "devices": F(Array(CLIENT_DEVICE, 256), "the devices it ran jobs on or holds memory on, lowest index "
                                            "first", optional=True),
})

LIMITS = Struct("limits", {
    "max_message_bytes": F(U64, "largest request frame answered"),
    "max_inline_bytes": F(U64, "largest inline payload"),
    "max_buffer_bytes": F(U64, "largest single allocation"),
    "memory_quota": F(U64, "bytes of buffer objects this session may hold"),
})

JOB_STATE = Str(16, ("queued", "running", "done", "failed"))

TENSOR_INFO = Struct("tensor_info", {
    "name": F(Str(256), "tensor name in the model"),
    "dtype": F(Str(16, DTYPES), "element type"),
    "shape": F(Array(Int(0, 2**31 - 1), MAX_RANK), "dimensions"),
    "size": F(U64, "bytes; the buffer bound to it must hold at least this many"),
    "symbolic": F(Array(Str(128), MAX_RANK), "the model's declared dimensions: per dimension the name of a "
                  "symbolic one (`?` if unnamed), an empty string for a fixed one; `shape` is what this load compiled "
                  "them to. Absent when every dimension is fixed", optional=True, since=(1, 7)),
    "defaulted": F(Array(Int(0, MAX_RANK - 1), MAX_RANK), "indices of the symbolic dimensions this load set "
                   "to 1 because `options.input_shapes` did not size them: the loaded model takes only "
                   "that size; load again with `input_shapes` for others", optional=True, since=(1, 7)),
})

MODEL_SOURCE = {
    "model": F(Bin(MAX_INLINE_BYTES, 1), "the ONNX model's bytes (inline form)", optional=True),
    "model_buffer": F(HANDLE, "a buffer holding the model's bytes (for models over max_inline_bytes)",
                      optional=True),
    "model_buffers": F(Array(HANDLE, MAX_MODEL_BUFFERS, 1), "several buffers holding the model's bytes in order, "
                       "for a model over one buffer's limit (max_buffer_bytes): each is used whole but the "
                       "last, of which the first `model_size` minus the others' sizes bytes are. Distinct "
                       "buffers of this session; `model_size`, their bytes in all, is required",
                       optional=True, since=(1, 8)),
    "model_size": F(U64, "bytes of the model in `model_buffer` (or in all `model_buffers`)", optional=True),
}

COMPILE_OPTIONS = Struct("compile_options", {
    "input_shapes": F(MapOf(Array(Int(1, 2**31 - 1), MAX_RANK), 64),
                      "shapes for inputs with symbolic dimensions (default 1 for each)", optional=True),
    "name": F(Str(256), "name recorded in the executable", optional=True),
    "fallback": F(Str(8, ("cpu", "none")), "where nodes the device's target declines run: `cpu` (a cpu device "
                                           "of the daemon; the model is partitioned) or `none` (the load fails "
                                           "listing them); default: the daemon's `compile_fallback`",
                  optional=True, since=(1, 7)),
})

PROBLEM = Struct("problem", {
    "node": F(Str(1024), "node name (empty for model-level problems)"),
    "op": F(Str(256), "operator type (empty for model-level problems)"),
    "reason": F(Str(4096), "why it cannot compile"),
})

CACHE_ENTRY = Struct("cache_entry", {
    "key": F(Str(128), "content hash of model, options, compiler and target"),
    "size": F(U64, "bytes on disk"),
    "age_s": F(Float(), "seconds since it was written"),
    "model_name": F(Str(256), "name of the model it was compiled from (empty if it has none)", optional=True),
})


SESSION_ID = Str(64)
SESSION_FILTER = F(SESSION_ID, "only this session (default: every session)", optional=True)
DEVICE_FILTER = F(DEVICE_INDEX, "only this device (default: every device)", optional=True)

JOB_INFO = Struct("job_info", {
    "session": F(SESSION_ID, "session that submitted it"),
    "pid": F(Int(0, 2**31), "that client's pid as the daemon sees it (0 if unknown)"),
    "client": F(Str(64), "that client's name"),
    "job": F(U64, "job id (the session's name for it)"),
    "device": F(DEVICE_INDEX, "device it runs on"),
    "state": F(JOB_STATE, "job state"),
    "model": F(U32, "the session's id of the loaded model it runs (0: a raw command stream)"),
    "model_name": F(Str(256), "that model's name, from its executable (empty if none)"),
    "submitted_s": F(Float(), "when it was queued, seconds since the daemon started (status `uptime_s` "
                              "is the same clock)"),
    "started_s": F(Float(), "when the device began it (absent while queued, or if it never ran)",
                   optional=True),
    "finished_s": F(Float(), "when it finished (absent while queued or running)", optional=True),
    "wall_ms": F(Float(), "finished_s - started_s in milliseconds (absent unless it ran and finished)",
                 optional=True),
    "cycles": F(U64, "modeled cycles (0 unless done)"),
    "busy_ms": F(Float(), "device time it took, its run segments only (unlike `wall_ms`, not the time a "
                          "preempted job waited to resume); absent unless it ran", optional=True),
    "error": F(Str(16), "error code if it failed", optional=True),
    "priority": F(PRIORITY, "its context's priority", optional=True),
    "context": F(U32, "the session's id of its context (0: the default one)", optional=True),
    "preemptions": F(U32, "times it was stopped at a layer boundary for a more urgent job", optional=True),
}, doc="One job as `jobs` and `trace` report it.")

TRACE_EVENT = Struct("trace_event", {
    "seq": F(U64, "event number, increasing; pass the last one seen as `since`"),
    **JOB_INFO.fields,
}, doc="A finished job (done, failed or cancelled) from the daemon's trace ring.")

LAYER = Struct("layer", {
    "node": F(Str(1024), "node name in the model"),
    "op": F(Str(256), "operator type"),
    "cycles": F(U64, "modeled cycles of the op (its share of a job's time)"),
})

TRACE_MODEL = Struct("trace_model", {
    "session": F(SESSION_ID, "session that loaded it"),
    "model": F(U32, "the session's id for it"),
    "name": F(Str(256), "model name from the executable"),
    "layers": F(Array(LAYER, 1 << 16), "its ops in execution order, with modeled cycles"),
}, doc="The per-op rows of a model that trace events reference, so a job can be split into layers.")

BUFFER_INFO = Struct("buffer_info", {
    "session": F(SESSION_ID, "session holding it"),
    "pid": F(Int(0, 2**31), "that client's pid as the daemon sees it (0 if unknown)"),
    "device": F(DEVICE_INDEX, "device whose memory it is"),
    "handle": F(U32, "the session's handle (0 for a loaded model's weights or arena)"),
    "kind": F(Str(16, ("buffer", "weights", "arena")), "a client buffer, or part of a loaded model"),
    "model": F(U32, "the loaded model it belongs to (0 for client buffers)"),
    "size": F(U64, "usable bytes"),
    "mapped_size": F(U64, "device memory it takes (page-rounded); what quotas count"),
    "exported": F(Bool(), "its memfd was sent to the client (`map`), which may have it mapped"),
    "jobs": F(U32, "jobs holding a reference to it now"),
})

JOB_OPTIONS = {
    "context": F(U32, "context to run in (`context_create`; 0 or absent: the session's default context, "
                      "priority normal)", optional=True),
    "after": F(Array(U64, MAX_DEPENDENCIES), "jobs (this session's ids, or ids from `fence_import`) that must "
                                             "finish first; if one fails, this job fails with its cause",
               optional=True),
    "deadline_ms": F(Int(1, 24 * 3600 * 1000), "finish within this many ms of submission, or fail with ETIME "
                                               "(not retryable if it cannot even on an idle device)",
                     optional=True),
    "timeout_ms": F(Int(1, 24 * 3600 * 1000), "device time after which the job is aborted as hung "
                                              "(default: the daemon's job_timeout_ms)", optional=True),
}

SHAPE = Array(Int(0, 2**31 - 1), MAX_RANK)

PLACEMENT = Struct("placement", {
    "node": F(Str(1024), "node name in the model"),
    "op": F(Str(256), "ONNX operator type"),
    "device": F(U32, "the device it runs on"),
    "target": F(Str(64), "that device's compiler target"),
    "reason": F(Str(4096), "why the NPU target declined it (empty when it runs there)"),
    "macs": F(U64, "its multiply-accumulates (convolutions and matrix products)"),
}, doc="Where one node of a heterogeneous model runs, as `report` lists it.")

REPORT_ROW = Struct("report_row", {
    "node": F(Str(1024), "node name in the model"),
    "op": F(Str(256), "ONNX operator type"),
    "kind": F(Str(32), "how the compiler lowered it: `conv`, `matmul`, `eltwise`, `unary`, `pool`, `softmax`, "
                       "`reduce`, `norm`, `copy`, `fill`, ..."),
    "inputs": F(Array(SHAPE, 1024), "the shape of each input"),
    "outputs": F(Array(SHAPE, 1024), "the shape of each output"),
    "macs": F(U64, "multiply-accumulates"),
    "cycles": F(U64, "modeled cycles of its commands"),
    "sram_bytes": F(U64, "SRAM its tiles take (the largest of its steps)"),
    "dma_bytes": F(U64, "bytes its DMA commands move"),
    "commands": F(U64, "commands of the stream it became"),
    "device": F(U32, "the device its partition runs on (heterogeneous models only)", optional=True),
    "target": F(Str(64), "that device's compiler target (heterogeneous models only)", optional=True),
}, doc="One op of a loaded model as `report` lists it.")

JOB_SUBMITTED = {
    "job": F(U64, "job id, this session's name for the job"),
    "context": F(U32, "the context it runs in (0: the default one)", optional=True),
    "point": F(U64, "its fence point on that context's timeline (signalled once it and every earlier point "
                    "of the timeline finished)", optional=True),
}

ERROR = Struct("error", {
    "code": F(Str(16), "stable error code (docs/PROTOCOL.md#errors)"),
    "message": F(Str(4096), "what went wrong and what to do"),
    "retryable": F(Bool(), "whether repeating the request can succeed"),
    "retry_after_ms": F(U32, "a hint: milliseconds after which a retry is likely to succeed (admission "
                             "limits)", optional=True),
})

ENGINE_BUSY = Struct("engine_busy", {
    "dma": F(U64, "cycles the DMA engines were busy"),
    "mac": F(U64, "cycles the MAC arrays were busy"),
    "vector": F(U64, "cycles the vector engines were busy"),
    "pool": F(U64, "cycles the pooling engines were busy"),
}, doc="Busy cycles per engine, summed over the device's cores.")

PARTITION_STATS = Struct("partition_stats", {
    "job": F(U64, "the partition's job id"),
    "device": F(U32, "the device it ran on"),
    "wall_ms": F(Float(), "its device time in ms"),
    "cycles": F(U64, "its cycles (modeled, or measured at the device's nominal clock)"),
}, doc="One partition's job in a run of a heterogeneous model.")

JOB_STATS = Struct("job_stats", {
    "cycles": F(U64, "modeled cycles: what the job takes on the modeled hardware (its makespan)",
                optional=True),
    "macs": F(U64, "multiply-accumulates executed", optional=True),
    "dma_bytes_in": F(U64, "bytes DMA moved from device memory into SRAM", optional=True),
    "dma_bytes_out": F(U64, "bytes DMA moved from SRAM to device memory", optional=True),
    "commands": F(U64, "commands executed", optional=True),
    "stall_cycles": F(U64, "cycles command queues spent blocked in `wait` or `barrier`", optional=True),
    "engine_busy": F(ENGINE_BUSY, "busy cycles per engine", optional=True),
    "hazards": F(U64, "SRAM accesses the model let overlap with a conflicting access on another engine: "
                      "a missing signal/wait, a stream that would race on hardware (0 for compiled models)",
                 optional=True),
    "wall_ms": F(Float(), "device time the job took in ms, its run segments only", optional=True),
    "preemptions": F(U32, "times it was stopped at a layer boundary for a more urgent job", optional=True),
    "queue_ms": F(Float(), "ms from submission to the device starting it", optional=True),
    "partitions": F(Array(PARTITION_STATS, 1 << 16), "a run of a heterogeneous model (its last job): each "
                                                    "partition's job; the counters above are their sums",
                    optional=True, since=(1, 7)),
}, doc="A job's counters: every key once it is done, none (an empty map) while it is queued or running "
       "or if it failed.")

JOB_OUTCOME = {
    "state": F(JOB_STATE, "job state"),
    "stats": F(JOB_STATS, "its counters (empty unless done)"),
    "error": F(ERROR, "the job's error if it failed", optional=True),
}

JOB_STATUS = Struct("job_status", {
    "job": F(U64, "job id"),
    **JOB_OUTCOME,
}, doc="A job's state as `wait_jobs` reports it.")


@dataclass(frozen=True)
class Op:
    """One request type: its name, argument and result structs, and what it does."""

    name: str
    doc: str
    args: Struct
    result: Struct
    needs_session: bool = True
    errors: tuple[str, ...] = ()


def _op(name: str, doc: str, args: dict, result: dict, **kw) -> Op:
    return Op(name, doc, Struct(f"{name}.args", args), Struct(f"{name}.result", result), **kw)


OPS: dict[str, Op] = {op.name: op for op in [
    _op("hello", "Open a session. Must be the first request; negotiates the protocol version. EAGAIN "
                 "(retryable): the daemon has all the sessions it serves, or all but those it keeps for admins; "
                 "EDQUOT (not retryable): the user has its quota of sessions open and must close some.", {
        "protocol": F(Array(U32, 2, 2), "[major, minor] the client speaks"),
        "client_name": F(Str(64), "free-form name shown by npuctl"),
        "pid": F(Int(0, 2**31), "the client's pid as it knows it (informational; identity comes from the kernel)"),
    }, {
        "session": F(Str(64), "session id"),
        "protocol": F(Array(U32, 2, 2), "[major, minor] the daemon speaks"),
        "daemon_version": F(Str(64), "npud release"),
        "lease_ms": F(U32, "a session that sends nothing for this long and has no companion socket is closed"),
        "attach_path": F(Str(4096), "path of the companion Unix SOCK_SEQPACKET socket (empty if none)"),
        "attach_token": F(Bin(32, 32), "secret to present on the companion socket"),
        "limits": F(LIMITS, "limits in force for this session"),
    }, needs_session=False, errors=("EPROTO", "EPERM", "EAGAIN", "EDQUOT")),
    _op("bye", "Close the session and free everything it holds.", {}, {}),
    _op("ping", "Round trip; renews the session lease.", {}, {}),
    _op("version", "Daemon and protocol versions.", {}, {
        "daemon_version": F(Str(64), "npud release"),
        "protocol": F(Array(U32, 2, 2), "[major, minor]"),
    }, needs_session=False),
    _op("devices", "List the devices.", {}, {"devices": F(Array(DEVICE, 256), "one entry per device")}),
    _op("alloc", "Allocate a buffer object on a device.", {
        "device": F(DEVICE_INDEX, "device index"),
        "size": F(Int(1, MAX_BUFFER_BYTES), "bytes; rounded up to the device page size"),
    }, {
        "handle": F(HANDLE, "this session's name for the buffer"),
        "size": F(U64, "usable size in bytes (as requested)"),
    }, errors=("ENODEV", "EINVAL", "EDQUOT", "ENOMEM")),
    _op("free", "Free a buffer object.", {"handle": F(HANDLE, "buffer")}, {},
        errors=("ENOENT", "EBUSY")),
    _op("write", "Copy bytes into a buffer.", {
        "handle": F(HANDLE, "buffer"),
        "offset": F(U64, "byte offset"),
        "data": F(Bin(MAX_INLINE_BYTES), "bytes to write"),
    }, {}, errors=("ENOENT", "EINVAL")),
    _op("read", "Copy bytes out of a buffer.", {
        "handle": F(HANDLE, "buffer"),
        "offset": F(U64, "byte offset"),
        "size": F(Int(0, MAX_INLINE_BYTES), "bytes to read"),
    }, {"data": F(Bin(MAX_INLINE_BYTES), "the bytes")}, errors=("ENOENT", "EINVAL")),
    _op("map", "Send the buffer's memfd over the companion socket, tagged with this request's seq. "
               "EOPNOTSUPP (the session lives on) if the session has no companion socket: a tcp session, "
               "or a local one that has not attached; ENOTCONN only if the socket closed, which ends "
               "the session.", {
        "handle": F(HANDLE, "buffer"),
    }, {
        "size": F(U64, "usable size in bytes"),
        "mapped_size": F(U64, "size of the memfd (page-rounded); map this many bytes"),
    }, errors=("ENOENT", "EOPNOTSUPP", "ENOTCONN")),
    _op("submit", "Submit a command stream to run on a device with the given buffers mapped.", {
        "device": F(DEVICE_INDEX, "device index"),
        "stream": F(Bin(MAX_INLINE_BYTES, 1), "binary command stream (docs/ISA.md)"),
        "bindings": F(Array(BINDING, MAX_BINDINGS), "buffers the job may touch, and where"),
        **JOB_OPTIONS,
    }, JOB_SUBMITTED, errors=("ENODEV", "ENOENT", "EINVAL", "EAGAIN", "EPERM", "ETIME")),
    _op("wait", "Wait for a job to finish, up to a timeout.", {
        "job": F(U64, "job id"),
        "timeout_ms": F(TIMEOUT_MS, "how long to wait"),
    }, JOB_OUTCOME, errors=("ENOENT", "ETIMEDOUT")),
    _op("load", "Compile (or fetch from the compile cache) a model for a device and load it into "
                "this session. Exactly one of `model`, `model_buffer` (+`model_size`), `model_buffers` "
                "(+`model_size`) or `model_digest`.", {
        "device": F(DEVICE_INDEX, "device index"),
        **MODEL_SOURCE,
        "model_digest": F(Bin(32, 32), "load without sending the model: the `model_digest` an earlier load of "
                                       "the same bytes returned.  Honoured only for a user who has sent those "
                                       "bytes to this daemon before and while the executable is cached; "
                                       "otherwise ENOENT: send the bytes", optional=True),
        "options": F(COMPILE_OPTIONS, "compile options", optional=True),
    }, {
        "model": F(HANDLE, "this session's name for the loaded model"),
        "inputs": F(Array(TENSOR_INFO, 1024), "inputs, in the order `run_model` takes their buffers"),
        "outputs": F(Array(TENSOR_INFO, 1024), "outputs, in the order `run_model` takes their buffers"),
        "cached": F(Bool(), "whether the executable came from the compile cache"),
        "model_digest": F(Bin(32, 32), "the model's digest: SHA-256 of (its length as 8 little-endian bytes "
                                       "followed by the SHA-256 of each 16 MiB chunk); pass it to later loads",
                          optional=True),
        "compile_ms": F(Float(), "time to compile, or to read the cache entry"),
        "weights_bytes": F(U64, "device memory holding the weights (charged to the session)"),
        "arena_bytes": F(U64, "device memory for intermediate tensors (charged to the session)"),
    }, errors=("ENODEV", "EINVAL", "ETIMEDOUT", "EIO", "ENOMEM", "EDQUOT")),
    _op("check", "List every reason a model cannot compile for a device (empty: it compiles).", {
        "device": F(DEVICE_INDEX, "device index"),
        **MODEL_SOURCE,
    }, {"problems": F(Array(PROBLEM, 4096), "one entry per unsupported node or model-level problem")},
        errors=("ENODEV", "EINVAL", "ETIMEDOUT", "EIO")),
    _op("run_model", "Run a loaded model: inputs are read from, outputs written to, the given buffers. "
                     "With `wait_ms`, answer once the run has finished (or `wait_ms` passed) with its "
                     "outcome as `wait` gives it: one round trip per run.", {
        "model": F(HANDLE, "loaded model"),
        "inputs": F(Array(HANDLE, 1024), "one buffer per input, in `load`'s order"),
        "outputs": F(Array(HANDLE, 1024), "one buffer per output, in `load`'s order"),
        **JOB_OPTIONS,
        "wait_ms": F(TIMEOUT_MS, "wait up to this many ms for the run to finish and answer with its `state`, "
                                 "`stats` and `error` too (section *Running a model*)", optional=True,
                     since=(1, 8)),
    }, {
        **JOB_SUBMITTED,
        "state": F(JOB_STATE, "with `wait_ms`: the job's state, `queued` or `running` if `wait_ms` passed first",
                   optional=True, since=(1, 8)),
        "stats": F(JOB_STATS, "with `wait_ms`: its counters (empty unless done)", optional=True, since=(1, 8)),
        "error": F(ERROR, "with `wait_ms`: the job's error if it failed", optional=True, since=(1, 8)),
    }, errors=("ENOENT", "EINVAL", "EAGAIN", "EPERM", "ETIME")),
    _op("context_create", "Create a context: a run queue of this session's with a priority and a fair-share "
                          "weight. realtime is allowed only where policy says so.", {
        "priority": F(PRIORITY, "scheduling class: strict priority between classes (with a starvation "
                                "guard), preemption at layer boundaries"),
        "weight": F(Int(1, 1000), "fair-share weight against contexts of the same class (default 1)",
                    optional=True),
    }, {
        "context": F(U32, "this session's id for it"),
        "priority": F(PRIORITY, "its priority"),
        "weight": F(U32, "its weight"),
    }, errors=("EPERM", "EAGAIN")),
    _op("wait_jobs", "Wait until all (or any) of some jobs finished, up to a timeout. Never fails for a "
                     "failed job: each job's state and error are in the result.", {
        "jobs": F(Array(U64, 4096, 1), "job ids"),
        "all": F(Bool(), "true: wait for every job; false: for the first one"),
        "timeout_ms": F(TIMEOUT_MS, "how long to wait"),
    }, {
        "jobs": F(Array(JOB_STATUS, 4096), "every job's state now, in the order asked"),
        "ready": F(Bool(), "whether the condition (all or any finished) holds"),
    }, errors=("ENOENT",)),
    _op("cancel", "Cancel a job: a queued job fails with ECANCELED at once, a running model job at its next "
                  "layer boundary (a raw command stream runs to its end). Its dependents fail too. "
                  "EPERM for an imported fence (`fence_import`): only its owner may cancel it.", {
        "job": F(U64, "job id"),
    }, {"state": F(JOB_STATE, "the job's state now (a job that already finished keeps its outcome)")},
        errors=("ENOENT", "EPERM")),
    _op("fence_export", "A token naming a job's completion fence, for another session's `fence_import`. "
                        "EPERM for an imported fence: only its owner may export it.", {
        "job": F(U64, "job id"),
    }, {"token": F(FENCE_TOKEN, "unguessable token; valid while this session lives")},
        errors=("ENOENT", "EPERM")),
    _op("fence_import", "Make another session's exported fence a job id of this session: it can be waited "
                        "for and named in `after`, but not cancelled.", {
        "token": F(FENCE_TOKEN, "token from `fence_export`"),
    }, {
        "job": F(U64, "this session's id for the fence"),
        "state": F(JOB_STATE, "the fenced job's state now"),
    }, errors=("ENOENT",)),
    _op("inject_fault", "Test mode only (`npud --test-mode`; EPERM otherwise): make this session's next job "
                        "on a device hang, crash the device process, or run slowly (each layer segment "
                        "sleeps `slow_ms`); or make its next compile for the device (a `load` that misses "
                        "the cache) sleep `slow_ms` in the compiler worker first (`slow_compile`).", {
        "device": F(DEVICE_INDEX, "device index"),
        "kind": F(Str(16, ("hang", "crash", "slow", "slow_compile")), "the fault"),
        "slow_ms": F(Int(0, 60_000), "for slow: sleep per layer segment; for slow_compile (required, > 0): "
                                     "sleep before compiling", optional=True),
        "count": F(Int(1, 1000), "how many of the session's next jobs (slow_compile: compiles) it hits "
                                 "(default 1)", optional=True),
    }, {}, errors=("EPERM", "ENODEV")),
    _op("report", "The loaded model's per-op report: op, shapes, MACs, modeled cycles, SRAM, DMA bytes.", {
        "model": F(HANDLE, "loaded model"),
    }, {
        "rows": F(Array(REPORT_ROW, 1 << 20), "one row per op, in execution order"),
        "table": F(Str(1 << 24), "the same as a text table"),
        "placement": F(Array(PLACEMENT, 1 << 20), "a heterogeneous model: where each node of the model runs "
                                                  "(its partitions' rows are in `rows`)", optional=True,
                       since=(1, 7)),
        "npu_macs_share": F(Float(), "the share of the model's MACs on the device it was loaded for (1.0 "
                                     "unless partitions run elsewhere)", optional=True, since=(1, 7)),
    }, errors=("ENOENT",)),
    _op("unload", "Unload a model and free its device memory (after jobs using it finish).", {
        "model": F(HANDLE, "loaded model"),
    }, {}, errors=("ENOENT",)),
    _op("cache_list", "The compile cache's entries.", {}, {
        "directory": F(Str(4096), "where the cache lives"),
        "entries": F(Array(CACHE_ENTRY, 1 << 20), "entries"),
    }),
    _op("cache_clear", "Admin: delete every compile cache entry. Allowed to root, the daemon's own uid and "
                       "the policy's [admin] or [admin.cache_clear].", {}, {
        "removed": F(U64, "entries deleted"),
    }, errors=("EPERM",)),
    _op("status", "Everything npuctl status shows.", {}, {
        "daemon_version": F(Str(64), "npud release"),
        "protocol": F(Array(U32, 2, 2), "[major, minor]"),
        "pid": F(Int(0, 2**31), "daemon pid"),
        "uptime_s": F(Float(), "seconds since start"),
        "endpoint": F(Str(4096), "endpoint the daemon serves"),
        "devices": F(Array(DEVICE, 256), "devices"),
        "clients": F(Array(CLIENT, 65536), "sessions"),
        "compile_cache": F(COMPILE_CACHE_STATS, "compile cache counters", optional=True),
        "users": F(Array(USER_USAGE, 4097), "per-uid totals of finished jobs, by uid", optional=True),
    }),
    _op("clients", "List the sessions.", {}, {"clients": F(Array(CLIENT, 65536), "sessions")}),
    _op("jobs", "Recent and current jobs of every session (each session keeps its last 1024 finished "
                "jobs), oldest first.", {
        "session": SESSION_FILTER,
        "device": DEVICE_FILTER,
        "limit": F(Int(1, 65536), "at most this many, the most recent (default 1024)", optional=True),
    }, {
        "now_s": F(Float(), "the daemon's clock now, seconds since it started"),
        "jobs": F(Array(JOB_INFO, 65536), "jobs"),
    }, errors=("ENOENT", "ENODEV")),
    _op("buffers", "Buffer objects of every session: client buffers and loaded models' weights and arenas.", {
        "session": SESSION_FILTER,
        "device": DEVICE_FILTER,
    }, {"buffers": F(Array(BUFFER_INFO, 1 << 20), "buffers, by session then handle")},
        errors=("ENOENT", "ENODEV")),
    _op("trace", "Finished jobs from the daemon's trace ring (the last 16384, every session and device), "
                 "after a cursor.", {
        "since": F(U64, "return events with `seq` greater than this (0: all retained); "
                        "use the previous reply's `next`"),
        "limit": F(Int(0, 65536), "at most this many (default 16384; 0 just reads the cursor)",
                   optional=True),
    }, {
        "now_s": F(Float(), "the daemon's clock now, seconds since it started"),
        "next": F(U64, "the cursor for the next call"),
        "dropped": F(U64, "events after `since` already overwritten (the ring is bounded)"),
        "capacity": F(U32, "events the ring holds"),
        "events": F(Array(TRACE_EVENT, 65536), "events, oldest first"),
        "models": F(Array(TRACE_MODEL, 65536), "the models the events run"),
    }),
    _op("kill_client", "Admin: close a session as if it had sent bye (its jobs are cancelled, its memory "
                       "freed). Allowed to root, the daemon's own uid and the policy's [admin].", {
        "session": F(SESSION_ID, "session to close"),
    }, {
        "session": F(SESSION_ID, "the closed session"),
        "pid": F(Int(0, 2**31), "its pid as the daemon saw it"),
        "buffers": F(U32, "buffer objects freed"),
        "memory": F(U64, "bytes freed"),
    }, errors=("EPERM", "ENOENT")),
    _op("reset_device", "Admin: restart a device's processes; jobs running on them are innocent and run "
                        "again from their start, queued jobs run on the new processes. Answers once they are back. "
                        "Allowed to root, the daemon's own uid and the policy's [admin].", {
        "device": F(DEVICE_INDEX, "device index"),
    }, {
        "device": F(DEVICE_INDEX, "device index"),
        "resets": F(U32, "its restart count now"),
        "state": F(Str(16, ("ok", "resetting", "down")), "its state now"),
    }, errors=("EPERM", "ENODEV", "ETIMEDOUT")),
]}

EVENTS: dict[str, Struct] = {
    "shutdown": Struct("shutdown", {
        "reason": F(Str(256), "why the daemon is stopping"),
    }, doc="The daemon is stopping; outstanding requests are answered with ESHUTDOWN."),
}

REQUEST = Struct("request", {
    "op": F(Str(32), "operation name (one of the ops below)"),
    "seq": F(Int(0, MAX_SEQ), "the client's number for this request, echoed in the reply"),
    "args": F(MapOf(Any_()), "the op's arguments"),
})

REPLY = Struct("reply", {
    "seq": F(Int(0, MAX_SEQ), "the request's seq (0 if it could not be read)"),
    "ok": F(Bool(), "true: `result` follows; false: `error` follows"),
    "result": F(MapOf(Any_()), "the op's result", optional=True),
    "error": F(ERROR, "what went wrong", optional=True),
})

EVENT = Struct("event", {
    "event": F(Str(32), "event name"),
    "data": F(MapOf(Any_()), "the event's fields"),
})

DTYPE_SIZES = {"float32": 4, "float16": 2, "int8": 1, "uint8": 1, "int16": 2, "int32": 4,
               "int64": 8, "bool": 1}

ALL_STRUCTS: tuple[Type, ...] = (REQUEST, REPLY, EVENT, ERROR, TENSOR, BINDING, DEVICE, CLIENT, LIMITS,
                                  TENSOR_INFO, COMPILE_OPTIONS, PROBLEM, CACHE_ENTRY, JOB_INFO, TRACE_EVENT,
                                  LAYER, TRACE_MODEL, BUFFER_INFO, JOB_STATUS, HISTOGRAM,
                                  COMPILE_CACHE_STATS, USER_USAGE)

# --- The companion socket -------------------------------------------------------
# ZeroMQ cannot carry file descriptors, so each local session also connects a Unix
# SOCK_SEQPACKET socket (path from HELLO's `attach_path`).  Every packet is one
# msgpack map.  The client speaks first with ATTACH_HELLO; the daemon answers with
# ATTACH_REPLY; from then on the daemon sends FD_MESSAGE packets, each carrying one
# memfd in SCM_RIGHTS ancillary data, and the client sends nothing.  The socket's
# closing tells the daemon that the client process is gone (the kernel closes it
# even on SIGKILL), so the session's resources are freed at once.

MAX_ATTACH_PACKET = 4096

ATTACH_HELLO = Struct("attach.hello", {
    "session": F(Str(64), "session id from HELLO"),
    "token": F(Bin(32, 32), "attach_token from HELLO"),
})

ATTACH_REPLY = Struct("attach.reply", {
    "ok": F(Bool(), "whether the session is now attached"),
    "error": F(ERROR, "why not", optional=True),
})

FD_MESSAGE = Struct("attach.fd", {
    "tag": F(Int(0, MAX_SEQ), "seq of the `map` request this fd answers"),
    "handle": F(HANDLE, "the buffer"),
    "size": F(U64, "bytes to map (the memfd's size)"),
})
