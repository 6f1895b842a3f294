/* Buffers, contexts, jobs and fences: the session's objects, each holding a reference to its client. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "internal.h"

/* ---- buffers ---- */

NPU_EXPORT npu_status npu_buffer_alloc(npu_client *client, uint32_t device, uint64_t size, npu_buffer **out) {
  if (client == NULL || out == NULL)
    return npu__error_default(NPU_EINVAL, "npu_buffer_alloc: client and out must not be NULL");
  npu_buffer *buffer = calloc(1, sizeof *buffer);
  if (buffer == NULL)
    return npu__error_default(NPU_ENOMEM, "out of memory");
  npu_request request;
  npu__request_begin(&request, "alloc", 2);
  npu__pack_key_u64(&request.pk, "device", device);
  npu__pack_key_u64(&request.pk, "size", size);
  npu_reply reply;
  npu_status status = npu__call(client, &request, 0, &reply, NULL);
  if (status != NULL) {
    free(buffer);
    return status;
  }
  buffer->handle = (uint32_t)npu__get_u64(&reply.result, "handle", 0);
  buffer->size = npu__get_u64(&reply.result, "size", size);
  npu__reply_free(&reply);
  buffer->client = client;
  npu__client_retain(client);
  *out = buffer;
  return NULL;
}

NPU_EXPORT npu_status npu_buffer_free(npu_buffer *buffer) {
  if (buffer == NULL)
    return NULL;
  npu_status status = npu__call_one(buffer->client, "free", "handle", buffer->handle);
  if (buffer->map != NULL)
    munmap(buffer->map, buffer->map_size);
  npu__client_release(buffer->client);
  free(buffer);
  return status;
}

NPU_EXPORT uint64_t npu_buffer_size(const npu_buffer *buffer) { return buffer->size; }
NPU_EXPORT uint32_t npu_buffer_handle(const npu_buffer *buffer) { return buffer->handle; }

static npu_status check_range(const char *verb, const npu_buffer *buffer, uint64_t offset, size_t size,
                              const void *data) {
  if (data == NULL && size > 0)
    return npu__error_default(NPU_EINVAL, "%s: data is NULL", verb);
  if (offset > buffer->size || size > buffer->size - offset)
    return npu__error_default(NPU_EINVAL, "%s of %zu bytes at offset %llu runs past the end of the %llu-byte buffer",
                              verb, size, (unsigned long long)offset, (unsigned long long)buffer->size);
  return NULL;
}

NPU_EXPORT npu_status npu_buffer_write(npu_buffer *buffer, uint64_t offset, const void *data, size_t size) {
  npu_status status = check_range("write", buffer, offset, size, data);
  if (status != NULL)
    return status;
  if (buffer->map != NULL) {
    memcpy((char *)buffer->map + offset, data, size);
    return NULL;
  }
  size_t chunk = buffer->client->max_inline_bytes;
  size_t start = 0;
  do {   /* an empty write still reaches the daemon, which checks the handle */
    size_t n = size - start < chunk ? size - start : chunk;
    npu_request request;
    npu__request_begin(&request, "write", 3);
    npu__pack_key_u64(&request.pk, "handle", buffer->handle);
    npu__pack_key_u64(&request.pk, "offset", offset + start);
    npu__pack_key_bin(&request.pk, "data", (const char *)data + start, n);
    if ((status = npu__call_void(buffer->client, &request)) != NULL)
      return status;
    start += n;
  } while (start < size);
  return NULL;
}

NPU_EXPORT npu_status npu_buffer_read(npu_buffer *buffer, uint64_t offset, void *data, size_t size) {
  npu_status status = check_range("read", buffer, offset, size, data);
  if (status != NULL)
    return status;
  if (buffer->map != NULL) {
    memcpy(data, (char *)buffer->map + offset, size);
    return NULL;
  }
  size_t chunk = buffer->client->max_inline_bytes;
  for (size_t start = 0; start < size || (size == 0 && start == 0); start += chunk) {
    size_t n = size - start < chunk ? size - start : chunk;
    npu_request request;
    npu__request_begin(&request, "read", 3);
    npu__pack_key_u64(&request.pk, "handle", buffer->handle);
    npu__pack_key_u64(&request.pk, "offset", offset + start);
    npu__pack_key_u64(&request.pk, "size", n);
    npu_reply reply;
    if ((status = npu__call(buffer->client, &request, 0, &reply, NULL)) != NULL)
      return status;
    const msgpack_object *got = npu__get(&reply.result, "data");
    if (got == NULL || got->type != MSGPACK_OBJECT_BIN || got->via.bin.size != n)
      status = npu__error_default(NPU_EPROTO, "read: the daemon sent %u bytes, not %zu",
                                  got && got->type == MSGPACK_OBJECT_BIN ? got->via.bin.size : 0, n);
    else if (n)
      memcpy((char *)data + start, got->via.bin.ptr, n);
    npu__reply_free(&reply);
    if (status != NULL || size == 0)
      return status;
  }
  return NULL;
}

NPU_EXPORT npu_status npu_buffer_map(npu_buffer *buffer, void **data) {
  if (data == NULL)
    return npu__error_default(NPU_EINVAL, "npu_buffer_map: data is NULL");
  if (buffer->map != NULL) {
    *data = buffer->map;
    return NULL;
  }
  if (!npu_client_attached(buffer->client))
    return npu__error_default(NPU_EOPNOTSUPP, "map needs a local daemon with the companion socket (this session "
                                              "has none, e.g. over tcp); use npu_buffer_read/write instead");
  npu_request request;
  npu__request_begin(&request, "map", 1);
  npu__pack_key_u64(&request.pk, "handle", buffer->handle);
  npu_reply reply;
  int fd = -1;
  npu_status status = npu__call(buffer->client, &request, 0, &reply, &fd);
  if (status != NULL)
    return status;
  size_t mapped = (size_t)npu__get_u64(&reply.result, "mapped_size", buffer->size);
  npu__reply_free(&reply);
  void *p = mmap(NULL, mapped, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  close(fd);
  if (p == MAP_FAILED)
    return npu__error_default(NPU_ENOMEM, "cannot map the buffer's %zu bytes (mmap failed)", mapped);
  buffer->map = p;
  buffer->map_size = mapped;
  *data = p;
  return NULL;
}

/* ---- contexts ---- */

static const char *const priority_names[] = {"low", "normal", "high", "realtime"};

NPU_EXPORT npu_status npu_context_create(npu_client *client, npu_priority priority, uint32_t weight,
                                         npu_context **out) {
  if ((unsigned)priority > NPU_PRIORITY_REALTIME || out == NULL)
    return npu__error_default(NPU_EINVAL, "npu_context_create: priority %d is not an npu_priority, or out is NULL",
                              (int)priority);
  npu_context *context = calloc(1, sizeof *context);
  if (context == NULL)
    return npu__error_default(NPU_ENOMEM, "out of memory");
  npu_request request;
  npu__request_begin(&request, "context_create", 2);
  npu__pack_key_str(&request.pk, "priority", priority_names[priority]);
  npu__pack_key_u64(&request.pk, "weight", weight ? weight : 1);
  npu_reply reply;
  npu_status status = npu__call(client, &request, 0, &reply, NULL);
  if (status != NULL) {
    free(context);
    return status;
  }
  context->id = (uint32_t)npu__get_u64(&reply.result, "context", 0);
  context->weight = (uint32_t)npu__get_u64(&reply.result, "weight", weight);
  context->priority = priority;
  npu__reply_free(&reply);
  context->client = client;
  npu__client_retain(client);
  *out = context;
  return NULL;
}

NPU_EXPORT void npu_context_release(npu_context *context) {
  if (context == NULL)
    return;
  npu__client_release(context->client);
  free(context);
}

NPU_EXPORT uint32_t npu_context_id(const npu_context *context) { return context->id; }
NPU_EXPORT npu_priority npu_context_priority(const npu_context *context) { return context->priority; }
NPU_EXPORT uint32_t npu_context_weight(const npu_context *context) { return context->weight; }

/* ---- jobs ---- */

npu_status npu__job_new(npu_client *client, uint64_t id, npu_job_state state, npu_job **out) {
  npu_job *job = calloc(1, sizeof *job);
  if (job == NULL)
    return npu__error_default(NPU_ENOMEM, "out of memory (the job %llu runs on)", (unsigned long long)id);
  job->client = client;
  job->id = id;
  job->state = state;
  npu__client_retain(client);
  *out = job;
  return NULL;
}

bool npu__state_from_obj(const msgpack_object *obj, npu_job_state *state) {
  static const char *const names[] = {"queued", "running", "done", "failed"};
  for (int i = 0; i < 4; i++)
    if (npu__str_is(obj, names[i])) {
      *state = (npu_job_state)i;
      return true;
    }
  return false;
}

uint32_t npu__job_option_count(const npu_job_options *options) {
  if (options == NULL)
    return 0;
  return (options->context != NULL) + (options->after_count > 0) + (options->deadline_ms > 0) +
         (options->timeout_ms > 0);
}

void npu__pack_job_options(msgpack_packer *pk, const npu_job_options *options) {
  if (options == NULL)
    return;
  if (options->context != NULL)
    npu__pack_key_u64(pk, "context", options->context->id);
  if (options->after_count > 0) {
    npu__pack_str(pk, "after");
    msgpack_pack_array(pk, options->after_count);
    for (size_t i = 0; i < options->after_count; i++)
      msgpack_pack_uint64(pk, options->after[i]->id);
  }
  if (options->deadline_ms > 0)
    npu__pack_key_u64(pk, "deadline_ms", options->deadline_ms);
  if (options->timeout_ms > 0)
    npu__pack_key_u64(pk, "timeout_ms", options->timeout_ms);
}

static bool finished(const npu_job *job) { return job->state == NPU_JOB_DONE || job->state == NPU_JOB_FAILED; }

/* Record a wait / wait_jobs entry: {state, stats, error?}. */
static void take_state(npu_job *job, const msgpack_object *entry) {
  npu_job_state state;
  if (finished(job) || !npu__state_from_obj(npu__get(entry, "state"), &state))
    return;
  job->state = state;
  job->cycles = npu__get_u64(npu__get(entry, "stats"), "cycles", 0);
  const msgpack_object *error = npu__get(entry, "error");
  if (state == NPU_JOB_FAILED)
    job->error = error ? npu__status_from_wire(error) : npu__error_default(NPU_EIO, "the job failed");
}

NPU_EXPORT npu_status npu_job_wait(npu_job *job, uint32_t timeout_ms) {
  if (job == NULL)
    return npu__error_default(NPU_EINVAL, "npu_job_wait: job is NULL");
  if (!finished(job)) {
    bool ready = false;
    npu_status status = npu_jobs_wait(&job, 1, true, timeout_ms, &ready);
    if (status != NULL)
      return status;
    if (!finished(job))
      return npu__error_default(NPU_ETIMEDOUT, "job %llu did not finish within %u ms", (unsigned long long)job->id,
                                timeout_ms);
  }
  return npu__status_copy(job->error);
}

NPU_EXPORT npu_status npu_job_cancel(npu_job *job, npu_job_state *state) {
  npu_request request;
  npu__request_begin(&request, "cancel", 1);
  npu__pack_key_u64(&request.pk, "job", job->id);
  npu_reply reply;
  npu_status status = npu__call(job->client, &request, 0, &reply, NULL);
  if (status != NULL)
    return status;
  npu_job_state now = NPU_JOB_QUEUED;
  npu__state_from_obj(npu__get(&reply.result, "state"), &now);
  npu__reply_free(&reply);
  if (state != NULL)
    *state = now;
  return NULL;
}

NPU_EXPORT npu_job_state npu_job_state_now(const npu_job *job) { return job->state; }
NPU_EXPORT uint64_t npu_job_id(const npu_job *job) { return job->id; }
NPU_EXPORT uint64_t npu_job_cycles(const npu_job *job) { return job->cycles; }

NPU_EXPORT void npu_job_release(npu_job *job) {
  if (job == NULL)
    return;
  npu_status_free(job->error);
  npu__client_release(job->client);
  free(job);
}

NPU_EXPORT npu_status npu_job_export_fence(npu_job *job, char token[65]) {
  npu_request request;
  npu__request_begin(&request, "fence_export", 1);
  npu__pack_key_u64(&request.pk, "job", job->id);
  npu_reply reply;
  npu_status status = npu__call(job->client, &request, 0, &reply, NULL);
  if (status != NULL)
    return status;
  npu__get_str(&reply.result, "token", token, 65);
  npu__reply_free(&reply);
  return NULL;
}

NPU_EXPORT npu_status npu_fence_import(npu_client *client, const char *token, npu_job **out) {
  if (token == NULL || out == NULL)
    return npu__error_default(NPU_EINVAL, "npu_fence_import: token and out must not be NULL");
  npu_request request;
  npu__request_begin(&request, "fence_import", 1);
  npu__pack_key_str(&request.pk, "token", token);
  npu_reply reply;
  npu_status status = npu__call(client, &request, 0, &reply, NULL);
  if (status != NULL)
    return status;
  /* an imported fence is waited for like any job: its outcome comes with the wait */
  status = npu__job_new(client, npu__get_u64(&reply.result, "job", 0), NPU_JOB_QUEUED, out);
  npu__reply_free(&reply);
  return status;
}

/* One wait_jobs request: the jobs' states taken, `*ready` as the daemon says. */
static npu_status wait_jobs_once(npu_job *const *jobs, size_t count, bool all, uint32_t timeout_ms, bool *ready) {
  npu_client *client = jobs[0]->client;
  npu_request request;
  npu__request_begin(&request, "wait_jobs", 3);
  npu__pack_str(&request.pk, "jobs");
  msgpack_pack_array(&request.pk, count);
  for (size_t i = 0; i < count; i++)
    msgpack_pack_uint64(&request.pk, jobs[i]->id);
  npu__pack_str(&request.pk, "all");
  all ? msgpack_pack_true(&request.pk) : msgpack_pack_false(&request.pk);
  npu__pack_key_u64(&request.pk, "timeout_ms", timeout_ms);
  npu_reply reply;
  npu_status status = npu__call(client, &request, timeout_ms + client->timeout_ms, &reply, NULL);
  if (status != NULL)
    return status;
  const msgpack_object *list = npu__get(&reply.result, "jobs");
  for (size_t i = 0; list && list->type == MSGPACK_OBJECT_ARRAY && i < list->via.array.size && i < count; i++)
    take_state(jobs[i], &list->via.array.ptr[i]);
  *ready = npu__get_bool(&reply.result, "ready", false);
  npu__reply_free(&reply);
  return NULL;
}

/* A client runs one request at a time: a long wait is cut into requests of at most this long, so
 * that other threads' calls on the client go between them (each costs one round trip). */
#define WAIT_SLICE_MS 100u

NPU_EXPORT npu_status npu_jobs_wait(npu_job *const *jobs, size_t count, bool all, uint32_t timeout_ms, bool *ready) {
  if (jobs == NULL || count == 0 || count > 4096)
    return npu__error_default(NPU_EINVAL, "npu_jobs_wait: give 1 to 4096 jobs");
  for (size_t i = 0; i < count; i++)
    if (jobs[i] == NULL || jobs[i]->client != jobs[0]->client)
      return npu__error_default(NPU_EINVAL, "npu_jobs_wait: job %zu is NULL or another client's", i);
  uint64_t deadline = npu__now_ms() + timeout_ms;
  bool done = false;
  for (;;) {
    uint64_t now = npu__now_ms();
    uint32_t left = now < deadline ? (uint32_t)(deadline - now) : 0;
    npu_status status = wait_jobs_once(jobs, count, all, left < WAIT_SLICE_MS ? left : WAIT_SLICE_MS, &done);
    if (status != NULL)
      return status;
    if (done || left <= WAIT_SLICE_MS)
      break;
  }
  if (ready != NULL)
    *ready = done;
  return NULL;
}

NPU_EXPORT npu_status npu_client_inject_fault(npu_client *client, uint32_t device, const char *kind,
                                              uint32_t slow_ms, uint32_t count) {
  if (kind == NULL)
    return npu__error_default(NPU_EINVAL, "npu_client_inject_fault: kind is NULL");
  npu_request request;
  npu__request_begin(&request, "inject_fault", 4);
  npu__pack_key_u64(&request.pk, "device", device);
  npu__pack_key_str(&request.pk, "kind", kind);
  npu__pack_key_u64(&request.pk, "slow_ms", slow_ms);
  npu__pack_key_u64(&request.pk, "count", count ? count : 1);
  return npu__call_void(client, &request);
}

/* A submit or run_model reply: the new job. */
/* Send a request that makes a job and wait up to `timeout_ms` (0: the client's) for its reply: the
 * job, with its outcome if the reply has one (run_model with wait_ms). */
static npu_status job_from_reply(npu_client *client, npu_request *request, uint32_t timeout_ms, npu_job **out) {
  npu_reply reply;
  npu_status status = npu__call(client, request, timeout_ms, &reply, NULL);
  if (status != NULL)
    return status;
  status = npu__job_new(client, npu__get_u64(&reply.result, "job", 0), NPU_JOB_QUEUED, out);
  if (status == NULL)
    take_state(*out, &reply.result);
  npu__reply_free(&reply);
  return status;
}

static void pack_handles(msgpack_packer *pk, const char *key, npu_buffer *const *buffers, size_t count) {
  npu__pack_str(pk, key);
  msgpack_pack_array(pk, count);
  for (size_t i = 0; i < count; i++)
    msgpack_pack_uint32(pk, buffers[i]->handle);
}

static npu_status check_array(const char *what, const void *array, size_t count) {
  return array == NULL && count > 0 ? npu__error_default(NPU_EINVAL, "%s is NULL but its count is %zu", what, count)
                                    : NULL;
}

NPU_EXPORT npu_status npu_stream_submit(npu_client *client, uint32_t device, const void *stream, size_t size,
                                        const npu_binding *bindings, size_t binding_count,
                                        const npu_job_options *options, npu_job **out) {
  npu_status status = check_array("stream", stream, size);
  if (status == NULL)
    status = check_array("bindings", bindings, binding_count);
  if (status != NULL || out == NULL)
    return status ? status : npu__error_default(NPU_EINVAL, "npu_stream_submit: out is NULL");
  npu_request request;
  npu__request_begin(&request, "submit", 3 + npu__job_option_count(options));
  npu__pack_key_u64(&request.pk, "device", device);
  npu__pack_key_bin(&request.pk, "stream", stream, size);
  npu__pack_str(&request.pk, "bindings");
  msgpack_pack_array(&request.pk, binding_count);
  for (size_t i = 0; i < binding_count; i++) {
    msgpack_pack_map(&request.pk, 3);
    npu__pack_key_u64(&request.pk, "handle", bindings[i].buffer->handle);
    npu__pack_key_u64(&request.pk, "va", bindings[i].va);
    npu__pack_str(&request.pk, "writable");
    bindings[i].writable ? msgpack_pack_true(&request.pk) : msgpack_pack_false(&request.pk);
  }
  npu__pack_job_options(&request.pk, options);
  return job_from_reply(client, &request, 0, out);
}

npu_status npu__run_model(npu_client *client, uint32_t model, npu_buffer *const *inputs, size_t input_count,
                          npu_buffer *const *outputs, size_t output_count, const npu_job_options *options,
                          int64_t wait_ms, npu_job **out) {
  npu_status status = check_array("inputs", inputs, input_count);
  if (status == NULL)
    status = check_array("outputs", outputs, output_count);
  if (status != NULL || out == NULL)
    return status ? status : npu__error_default(NPU_EINVAL, "npu_model_submit: out is NULL");
  npu_request request;
  npu__request_begin(&request, "run_model", 3 + npu__job_option_count(options) + (wait_ms >= 0));
  npu__pack_key_u64(&request.pk, "model", model);
  pack_handles(&request.pk, "inputs", inputs, input_count);
  pack_handles(&request.pk, "outputs", outputs, output_count);
  npu__pack_job_options(&request.pk, options);
  if (wait_ms < 0)
    return job_from_reply(client, &request, 0, out);
  npu__pack_key_u64(&request.pk, "wait_ms", (uint64_t)wait_ms);
  /* the reply comes once the job is done: allow the wait plus the client's usual timeout */
  uint64_t call_ms = (uint64_t)wait_ms + client->timeout_ms;
  return job_from_reply(client, &request, call_ms > UINT32_MAX ? UINT32_MAX : (uint32_t)call_ms, out);
}
