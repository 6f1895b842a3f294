/* libnpu: the C client library of npud (docs/CLIENT-C.md).
 *
 * Conventions, as in IREE's runtime API and libdrm:
 *  - Every object is an opaque handle with an explicit lifetime: what a *_create, *_alloc,
 *    *_load or *_connect call returns through an out pointer is the caller's, released by the
 *    matching *_free, *_unload, *_release or *_close.  Release functions accept NULL.
 *  - Every fallible call returns an npu_status: NULL (NPU_OK) on success, otherwise an error
 *    value the caller owns and releases with npu_status_free(), carrying a stable code (the
 *    protocol's, docs/PROTOCOL.md#errors), a message a person can act on, and whether a retry
 *    can succeed.  Out parameters are written only on success.
 *  - No global state: each client owns its own ZeroMQ context and sockets.
 *  - Thread safety: a client and its objects may be used from several threads at once (one object
 *    by one thread at a time).  A client has one request in flight at a time, its callers served
 *    first come first served; waits go out in slices of 100 ms, so a thread waiting for a job
 *    holds up the others' calls for at most that long.
 *  - Objects made by a client keep it alive: npu_client_close ends the session at once (the
 *    daemon frees everything it held), and the memory of the client goes with its last object.
 *    Calls on objects of a closed client fail with NPU_ENOTCONN; releasing them still works.
 */
#ifndef NPU_H
#define NPU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NPU_VERSION_MAJOR 0
#define NPU_VERSION_MINOR 1
/* The wire protocol this library speaks (docs/PROTOCOL.md). */
#define NPU_PROTOCOL_MAJOR 1
#define NPU_PROTOCOL_MINOR 8

/* ---- status ------------------------------------------------------------------------------ */

/* The protocol's error codes, in docs/PROTOCOL.md's order; NPU_OK is 0. */
typedef enum npu_code {
  NPU_OK = 0,
  NPU_EINVAL, NPU_EPROTO, NPU_EMSGSIZE, NPU_ENOENT, NPU_EPERM, NPU_ENOMEM, NPU_EDQUOT,
  NPU_EAGAIN, NPU_EBUSY, NPU_ETIMEDOUT, NPU_EFAULT, NPU_EIO, NPU_ENODEV, NPU_ENOTCONN,
  NPU_ECONNREFUSED, NPU_ECANCELED, NPU_ESHUTDOWN, NPU_EINTERNAL, NPU_ETIME, NPU_EOPNOTSUPP,
  NPU_CODE_COUNT
} npu_code;

typedef struct npu_status_s *npu_status; /* NULL: success */
#define NPU_STATUS_OK ((npu_status)0)

npu_code npu_status_code(npu_status status);          /* NPU_OK for NULL */
const char *npu_status_code_name(npu_status status);  /* "EINVAL", ...; "OK" for NULL */
const char *npu_status_message(npu_status status);    /* "" for NULL; valid until freed */
bool npu_status_retryable(npu_status status);
uint32_t npu_status_retry_after_ms(npu_status status); /* the daemon's hint, 0 if none */
void npu_status_free(npu_status status);
const char *npu_code_name(npu_code code);

/* ---- client ------------------------------------------------------------------------------ */

typedef struct npu_client npu_client;

typedef struct npu_client_options {
  const char *name;       /* shown by npuctl clients; NULL: "libnpu" */
  uint32_t timeout_ms;    /* how long a reply may take; 0: 30000 */
} npu_client_options;

/* Open a session with the daemon at `endpoint` (NULL: $NPUD_ENDPOINT, else the user's and then the
 * system's daemon if their socket exists, else ipc:///tmp/npud-$UID/npud.sock) and attach the
 * companion socket (for npu_buffer_map).  `options` may be NULL. */
npu_status npu_client_connect(const char *endpoint, const npu_client_options *options, npu_client **out);
/* End the session (bye) and release the caller's reference; NULL is ignored. */
void npu_client_close(npu_client *client);
npu_status npu_client_ping(npu_client *client);
const char *npu_client_session(const npu_client *client);        /* the session id */
const char *npu_client_daemon_version(const npu_client *client);
const char *npu_client_endpoint(const npu_client *client);
bool npu_client_attached(const npu_client *client);              /* buffers can be mapped */
uint64_t npu_client_max_inline_bytes(const npu_client *client);

typedef struct npu_device_info {
  uint32_t index;
  char name[64];
  char preset[64];
  char state[16];         /* "ok", "resetting" or "down" */
  uint64_t memory_total;
  uint64_t memory_used;
} npu_device_info;

/* Fill `devices[0..capacity)`; `*count` is the number the daemon has (may exceed capacity). */
npu_status npu_client_devices(npu_client *client, npu_device_info *devices, size_t capacity, size_t *count);

/* ---- buffers ----------------------------------------------------------------------------- */

typedef struct npu_buffer npu_buffer;

/* A zero-filled buffer object of `size` bytes on `device`. */
npu_status npu_buffer_alloc(npu_client *client, uint32_t device, uint64_t size, npu_buffer **out);
/* Free the buffer in the daemon (jobs still using it keep it until they finish), unmap it and
 * release the handle.  The handle is released even when the daemon refuses (the status says why). */
npu_status npu_buffer_free(npu_buffer *buffer);
uint64_t npu_buffer_size(const npu_buffer *buffer);
uint32_t npu_buffer_handle(const npu_buffer *buffer);  /* the session's name for it */
/* Copy bytes in or out at `offset` (through the mapping once mapped, else in messages). */
npu_status npu_buffer_write(npu_buffer *buffer, uint64_t offset, const void *data, size_t size);
npu_status npu_buffer_read(npu_buffer *buffer, uint64_t offset, void *data, size_t size);
/* The buffer's memory itself, read-write, `npu_buffer_size` bytes: no copies.  The memfd comes over
 * the companion socket (a local daemon only; else NPU_EOPNOTSUPP).  Mapping twice returns the same
 * address; it stays valid until npu_buffer_free. */
npu_status npu_buffer_map(npu_buffer *buffer, void **data);

/* ---- contexts ---------------------------------------------------------------------------- */

typedef enum npu_priority { NPU_PRIORITY_LOW, NPU_PRIORITY_NORMAL, NPU_PRIORITY_HIGH, NPU_PRIORITY_REALTIME } npu_priority;
typedef struct npu_context npu_context;

/* A run queue of this session with a priority and a fair-share weight (1..1000; 0: 1). */
npu_status npu_context_create(npu_client *client, npu_priority priority, uint32_t weight, npu_context **out);
void npu_context_release(npu_context *context);  /* the daemon keeps it until the session ends */
uint32_t npu_context_id(const npu_context *context);
npu_priority npu_context_priority(const npu_context *context);
uint32_t npu_context_weight(const npu_context *context);

/* ---- jobs and fences --------------------------------------------------------------------- */

typedef enum npu_job_state { NPU_JOB_QUEUED, NPU_JOB_RUNNING, NPU_JOB_DONE, NPU_JOB_FAILED } npu_job_state;
typedef struct npu_job npu_job;

typedef struct npu_job_options {
  const npu_context *context;   /* NULL: the session's default context */
  npu_job *const *after;        /* jobs (also imported fences) that must finish first */
  size_t after_count;
  uint32_t deadline_ms;         /* 0: none; else finish within it or fail with NPU_ETIME */
  uint32_t timeout_ms;          /* 0: the daemon's; device time before the job is aborted as hung */
} npu_job_options;

/* Wait up to `timeout_ms` for the job: NULL once done, the job's own error if it failed,
 * NPU_ETIMEDOUT (retryable) if it is still queued or running. */
npu_status npu_job_wait(npu_job *job, uint32_t timeout_ms);
/* Cancel: queued, it fails at once; running, at its next layer boundary.  `state` may be NULL. */
npu_status npu_job_cancel(npu_job *job, npu_job_state *state);
npu_job_state npu_job_state_now(const npu_job *job);  /* as last reported */
uint64_t npu_job_id(const npu_job *job);
uint64_t npu_job_cycles(const npu_job *job);           /* modeled cycles, once done */
void npu_job_release(npu_job *job);                    /* the job itself runs on */
/* A token (at most 64 chars + NUL) another client can import to wait for this job or run after it. */
npu_status npu_job_export_fence(npu_job *job, char token[65]);
npu_status npu_fence_import(npu_client *client, const char *token, npu_job **out);
/* Wait until all (or any) of `jobs` finished; `*ready` says whether that happened in time.
 * Never fails for a failed job: read each with npu_job_state_now / npu_job_wait(job, 0). */
npu_status npu_jobs_wait(npu_job *const *jobs, size_t count, bool all, uint32_t timeout_ms, bool *ready);

/* Run a raw command stream (docs/ISA.md) with buffers bound at device virtual addresses. */
typedef struct npu_binding { npu_buffer *buffer; uint64_t va; bool writable; } npu_binding;
npu_status npu_stream_submit(npu_client *client, uint32_t device, const void *stream, size_t size,
                             const npu_binding *bindings, size_t binding_count,
                             const npu_job_options *options, npu_job **out);

/* Test mode only (`npud --test-mode`, else NPU_EPERM): make this session's next `count` jobs on
 * `device` "hang", "crash" the device process, or run "slow" (`slow_ms` per layer); "slow_compile":
 * its next compiles sleep `slow_ms` first. */
npu_status npu_client_inject_fault(npu_client *client, uint32_t device, const char *kind, uint32_t slow_ms,
                                   uint32_t count);

/* ---- models ------------------------------------------------------------------------------ */

typedef enum npu_dtype {
  NPU_FLOAT32, NPU_FLOAT16, NPU_INT8, NPU_UINT8, NPU_INT16, NPU_INT32, NPU_INT64, NPU_BOOL
} npu_dtype;
#define NPU_MAX_RANK 8

typedef struct npu_tensor_info {
  const char *name;              /* valid while the model is */
  npu_dtype dtype;
  uint32_t rank;
  int64_t shape[NPU_MAX_RANK];
  uint64_t size;                 /* bytes; a buffer bound to it must hold at least this many */
  uint32_t symbolic;             /* bit i: the model declares dimension i symbolic (protocol 1.7) */
  uint32_t defaulted;            /* bit i: symbolic, and this load set it to 1 (no input_shapes): the
                                  * model takes only that size here; npu.Model.run compiles others */
} npu_tensor_info;

typedef struct npu_model npu_model;

/* Compile (or fetch from the daemon's compile cache) and load an ONNX model: from memory (sent
 * inline, or through a staging buffer when larger than the daemon's inline limit), or from a
 * self-contained file read by this process. */
npu_status npu_model_load(npu_client *client, uint32_t device, const void *onnx, size_t size, npu_model **out);
npu_status npu_model_load_file(npu_client *client, uint32_t device, const char *path, npu_model **out);

/* One input's shape for npu_model_load_shaped. */
typedef struct npu_input_shape {
  const char *name;              /* the input's name */
  uint32_t rank;                 /* at most NPU_MAX_RANK */
  const int64_t *dims;           /* `rank` sizes, each >= 1 */
} npu_input_shape;

/* npu_model_load, compiled for these input shapes (the protocol's `input_shapes`): the model's
 * symbolic dimensions take these sizes instead of 1 (npu_tensor_info.defaulted: which were set
 * to 1).  An input not named keeps 1 for its symbolic dimensions.  A shape naming no input, or
 * contradicting a dimension the model fixes, is EINVAL.  Each set of shapes compiles once (the
 * daemon's cache keeps it); load one model per shape your program runs. */
npu_status npu_model_load_shaped(npu_client *client, uint32_t device, const void *onnx, size_t size,
                                 const npu_input_shape *shapes, size_t count, npu_model **out);
/* Free its device memory (after jobs using it finish) and release the handle (always). */
npu_status npu_model_unload(npu_model *model);
size_t npu_model_input_count(const npu_model *model);
size_t npu_model_output_count(const npu_model *model);
const npu_tensor_info *npu_model_input(const npu_model *model, size_t index);   /* NULL if out of range */
const npu_tensor_info *npu_model_output(const npu_model *model, size_t index);
bool npu_model_cached(const npu_model *model);   /* the executable came from the compile cache */
/* Start a run reading `inputs` and writing `outputs` (one buffer per tensor, in load order); the
 * buffers are the caller's: map them to fill inputs and read outputs in place.  `options` may be NULL. */
npu_status npu_model_submit(npu_model *model, npu_buffer *const *inputs, size_t input_count,
                            npu_buffer *const *outputs, size_t output_count,
                            const npu_job_options *options, npu_job **out);
/* Submit and wait up to `timeout_ms` (0: the client's timeout): one round trip with a daemon of
 * protocol 1.8 or later.  NPU_ETIMEDOUT if the run has not finished by then (it runs on). */
npu_status npu_model_run(npu_model *model, npu_buffer *const *inputs, size_t input_count,
                         npu_buffer *const *outputs, size_t output_count, uint32_t timeout_ms);

const char *npu_dtype_name(npu_dtype dtype);
size_t npu_dtype_size(npu_dtype dtype);

#ifdef __cplusplus
}
#endif
#endif /* NPU_H */
