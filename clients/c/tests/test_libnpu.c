/* libnpu's own test program: every call of npu.h and its error paths, against a running daemon
 * (tests/clients/test_libnpu.py starts a private one in test mode and runs this, plain and under
 * AddressSanitizer+UBSan).
 *
 *   test_libnpu ENDPOINT MODEL.onnx INPUT.raw OUTPUT.raw [BIG_MODEL.onnx]
 *   test_libnpu --wait-through-death ENDPOINT MODEL.onnx
 *
 * MODEL has one float32 input and one float32 output; INPUT.raw holds the input's bytes.  The
 * output of a run whose input was written into a mapped buffer goes to OUTPUT.raw, for the
 * caller to compare with the Python client's.  BIG_MODEL (over the inline limit) takes the
 * staging-buffer path of npu_model_load.  Prints one line per failed check and a summary; exits 1
 * if any failed.  --wait-through-death: print "ready", read a line from stdin, then wait for a
 * job and ping; the caller kills the daemon meanwhile, and both calls must say ENOTCONN at once.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <npu.h>

static int failures, checks;
static const char *endpoint;

#define CHECK(cond, ...)                                                          \
  do {                                                                            \
    checks++;                                                                     \
    if (!(cond)) {                                                                \
      failures++;                                                                 \
      printf("FAIL %s:%d: %s: ", __func__, __LINE__, #cond);                      \
      printf(__VA_ARGS__);                                                        \
      printf("\n");                                                               \
    }                                                                             \
  } while (0)

/* Consume `status`: it must be success. */
#define OK(call)                                                                                 \
  do {                                                                                           \
    npu_status s_ = (call);                                                                      \
    CHECK(s_ == NULL, "%s: %s", npu_status_code_name(s_), npu_status_message(s_));               \
    npu_status_free(s_);                                                                         \
  } while (0)

/* Consume `status`: it must be the error `code`, with a message and the given retryable flag. */
#define FAILS(call, code, retry)                                                                 \
  do {                                                                                           \
    npu_status s_ = (call);                                                                      \
    CHECK(npu_status_code(s_) == (code) && npu_status_retryable(s_) == (retry) &&                \
              *npu_status_message(s_) != '\0',                                                   \
          "expected %s (retryable %d), got %s (retryable %d): %s", npu_code_name(code), (retry), \
          npu_status_code_name(s_), npu_status_retryable(s_), npu_status_message(s_));           \
    npu_status_free(s_);                                                                         \
  } while (0)

static void *read_file(const char *path, size_t *size) {
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return NULL;
  fseek(f, 0, SEEK_END);
  *size = (size_t)ftell(f);
  fseek(f, 0, SEEK_SET);
  void *data = malloc(*size ? *size : 1);
  if (data != NULL && fread(data, 1, *size, f) != *size) {
    free(data);
    data = NULL;
  }
  fclose(f);
  return data;
}

static npu_client *connect_or_die(const char *name) {
  npu_client *client = NULL;
  npu_status s = npu_client_connect(endpoint, &(npu_client_options){.name = name, .timeout_ms = 60000}, &client);
  if (s != NULL) {
    printf("FAIL connect: %s: %s\n", npu_status_code_name(s), npu_status_message(s));
    exit(1);
  }
  return client;
}

static void test_status(void) {
  CHECK(npu_status_code(NPU_STATUS_OK) == NPU_OK, "NULL is success");
  CHECK(strcmp(npu_status_code_name(NULL), "OK") == 0 && *npu_status_message(NULL) == '\0', "names of OK");
  CHECK(!npu_status_retryable(NULL) && npu_status_retry_after_ms(NULL) == 0, "OK is not retryable");
  CHECK(strcmp(npu_code_name(NPU_EOPNOTSUPP), "EOPNOTSUPP") == 0, "last code's name");
  CHECK(strcmp(npu_code_name(NPU_ECONNREFUSED), "ECONNREFUSED") == 0, "code names");
  CHECK(strcmp(npu_dtype_name(NPU_INT64), "int64") == 0 && npu_dtype_size(NPU_INT64) == 8, "dtypes");
  npu_status_free(NULL);
}

static void test_connect(npu_client *client) {
  npu_client *none = NULL;
  npu_status s = npu_client_connect("ipc:///nonexistent/libnpu-test.sock", NULL, &none);
  CHECK(npu_status_code(s) == NPU_ECONNREFUSED && npu_status_retryable(s) &&
            strstr(npu_status_message(s), "not running") != NULL,
        "%s: %s", npu_status_code_name(s), npu_status_message(s));
  CHECK(none == NULL, "out untouched on failure");
  npu_status_free(s);
  FAILS(npu_client_connect(endpoint, NULL, NULL), NPU_EINVAL, false);
  CHECK(strlen(npu_client_session(client)) > 0, "session id");
  CHECK(strlen(npu_client_daemon_version(client)) > 0, "daemon version");
  CHECK(strcmp(npu_client_endpoint(client), endpoint) == 0, "endpoint %s", npu_client_endpoint(client));
  CHECK(npu_client_attached(client), "a local session has the companion socket");
  CHECK(npu_client_max_inline_bytes(client) >= 1u << 20, "inline limit %llu",
        (unsigned long long)npu_client_max_inline_bytes(client));
  OK(npu_client_ping(client));
}

static void test_devices(npu_client *client) {
  npu_device_info devices[4];
  size_t count = 0;
  OK(npu_client_devices(client, devices, 4, &count));
  CHECK(count >= 1, "%zu devices", count);
  CHECK(devices[0].index == 0 && *devices[0].name && *devices[0].preset, "device 0 named");
  CHECK(strcmp(devices[0].state, "ok") == 0 && devices[0].memory_total > 0, "device 0 state %s", devices[0].state);
  size_t again = 0;
  OK(npu_client_devices(client, NULL, 0, &again));
  CHECK(again == count, "capacity 0 still counts");
}

static void test_buffers(npu_client *client) {
  npu_buffer *b = NULL;
  FAILS(npu_buffer_alloc(client, 99, 64, &b), NPU_ENODEV, false);
  FAILS(npu_buffer_alloc(client, 0, 0, &b), NPU_EINVAL, false);
  CHECK(b == NULL, "out untouched on failure");
  OK(npu_buffer_alloc(client, 0, 1000, &b));
  CHECK(npu_buffer_size(b) == 1000 && npu_buffer_handle(b) > 0, "size %llu", (unsigned long long)npu_buffer_size(b));
  unsigned char data[1000], back[1000];
  for (int i = 0; i < 1000; i++)
    data[i] = (unsigned char)(i * 7);
  OK(npu_buffer_read(b, 0, back, 1000));
  CHECK(back[0] == 0 && back[999] == 0, "a new buffer is zero-filled");
  OK(npu_buffer_write(b, 0, data, 1000));
  OK(npu_buffer_read(b, 10, back, 990));
  CHECK(memcmp(back, data + 10, 990) == 0, "read what was written (messages)");
  FAILS(npu_buffer_write(b, 999, data, 2), NPU_EINVAL, false);
  FAILS(npu_buffer_read(b, 1001, back, 0), NPU_EINVAL, false);
  FAILS(npu_buffer_write(b, 0, NULL, 4), NPU_EINVAL, false);
  FAILS(npu_buffer_map(b, NULL), NPU_EINVAL, false);

  void *map = NULL, *again = NULL;
  OK(npu_buffer_map(b, &map));
  OK(npu_buffer_map(b, &again));
  CHECK(map != NULL && map == again, "mapping twice gives the same address");
  CHECK(memcmp(map, data, 1000) == 0, "the mapping shows what messages wrote");
  memset(map, 0xA5, 1000);   /* in place: the daemon's copy is this memory */
  OK(npu_buffer_read(b, 0, back, 1000));
  CHECK(back[0] == 0xA5 && back[999] == 0xA5, "reads go through the mapping");
  OK(npu_buffer_free(b));
  OK(npu_buffer_free(NULL));

  /* larger than one message: chunked writes and reads */
  size_t big = (size_t)npu_client_max_inline_bytes(client) + 4096;
  unsigned char *src = malloc(big), *dst = malloc(big);
  for (size_t i = 0; i < big; i++)
    src[i] = (unsigned char)(i * 31 + 5);
  OK(npu_buffer_alloc(client, 0, big, &b));
  OK(npu_buffer_write(b, 0, src, big));
  OK(npu_buffer_read(b, 0, dst, big));
  CHECK(memcmp(src, dst, big) == 0, "chunked round trip of %zu bytes", big);
  OK(npu_buffer_free(b));
  free(src);
  free(dst);

  /* device memory runs out (the buffers are sparse memfds: nothing is touched) */
  npu_buffer *held[8] = {0};
  npu_status s = NULL;
  for (int i = 0; i < 8 && s == NULL; i++)
    s = npu_buffer_alloc(client, 0, 256u << 20, &held[i]);
  CHECK(npu_status_code(s) == NPU_ENOMEM && npu_status_retryable(s), "%s: %s", npu_status_code_name(s),
        npu_status_message(s));
  npu_status_free(s);
  for (int i = 0; i < 8; i++)
    OK(npu_buffer_free(held[i]));
}

static void test_contexts(npu_client *client) {
  npu_context *ctx = NULL;
  FAILS(npu_context_create(client, (npu_priority)42, 1, &ctx), NPU_EINVAL, false);
  npu_status s = npu_context_create(client, NPU_PRIORITY_REALTIME, 1, &ctx);   /* as policy says */
  CHECK(s == NULL || (npu_status_code(s) == NPU_EPERM && !npu_status_retryable(s)), "realtime: %s: %s",
        npu_status_code_name(s), npu_status_message(s));
  if (s == NULL)
    npu_context_release(ctx);
  npu_status_free(s);
  FAILS(npu_context_create(client, NPU_PRIORITY_LOW, 1001, &ctx), NPU_EINVAL, false);
  OK(npu_context_create(client, NPU_PRIORITY_HIGH, 3, &ctx));
  CHECK(ctx != NULL && npu_context_id(ctx) > 0, "a new context has an id");
  CHECK(npu_context_priority(ctx) == NPU_PRIORITY_HIGH && npu_context_weight(ctx) == 3, "priority and weight");
  npu_context_release(ctx);
  npu_context_release(NULL);
}

/* A loaded model and a mapped buffer per tensor. */
typedef struct io {
  npu_model *model;
  npu_buffer *in, *out;
  void *in_map, *out_map;
} io;

static void io_open(npu_client *client, npu_model *model, io *x) {
  *x = (io){.model = model};
  OK(npu_buffer_alloc(client, 0, npu_model_input(model, 0)->size, &x->in));
  OK(npu_buffer_alloc(client, 0, npu_model_output(model, 0)->size, &x->out));
  OK(npu_buffer_map(x->in, &x->in_map));
  OK(npu_buffer_map(x->out, &x->out_map));
}

static void io_close(io *x) {
  OK(npu_buffer_free(x->in));
  OK(npu_buffer_free(x->out));
}

static void test_models(npu_client *client, const char *model_path, const void *onnx, size_t size) {
  npu_model *m = NULL;
  FAILS(npu_model_load_file(client, 0, "/nonexistent/model.onnx", &m), NPU_ENOENT, false);
  FAILS(npu_model_load(client, 0, "not an onnx model", 17, &m), NPU_EINVAL, false);
  FAILS(npu_model_load(client, 7, onnx, size, &m), NPU_ENODEV, false);
  CHECK(m == NULL, "out untouched on failure");
  OK(npu_model_load_file(client, 0, model_path, &m));
  if (m == NULL)
    return;
  CHECK(npu_model_input_count(m) == 1 && npu_model_output_count(m) == 1, "one input, one output");
  const npu_tensor_info *ti = npu_model_input(m, 0), *to = npu_model_output(m, 0);
  CHECK(ti->dtype == NPU_FLOAT32 && ti->rank >= 1 && ti->size > 0 && *ti->name, "input %s", ti->name);
  uint64_t elements = 1;
  for (uint32_t i = 0; i < ti->rank; i++)
    elements *= (uint64_t)ti->shape[i];
  CHECK(elements * 4 == ti->size, "the input's size is its shape's");
  CHECK(ti->symbolic == 0 && ti->defaulted == 0, "a model with fixed dims declares none symbolic");
  CHECK(to->dtype == NPU_FLOAT32 && to->size > 0, "output %s", to->name);
  CHECK(npu_model_input(m, 1) == NULL && npu_model_output(m, 1) == NULL, "out of range is NULL");

  npu_model *again = NULL;
  OK(npu_model_load(client, 0, onnx, size, &again));
  CHECK(again != NULL && npu_model_cached(again), "the second load comes from the compile cache");
  OK(npu_model_unload(again));
  OK(npu_model_unload(m));
  OK(npu_model_unload(NULL));
}

/* The zero-copy run: the input written into the mapped buffer bound to the model's input. */
static void test_run(npu_client *client, npu_model *m, const char *input_path, const char *output_path) {
  io x;
  io_open(client, m, &x);
  size_t n = 0;
  void *input = read_file(input_path, &n);
  CHECK(input != NULL && n == npu_model_input(m, 0)->size, "%s holds the input (%zu bytes)", input_path, n);
  if (input == NULL || n != npu_model_input(m, 0)->size)
    exit(1);
  memcpy(x.in_map, input, n);   /* stands for a producer writing its tensor in place */
  free(input);
  OK(npu_model_run(m, &x.in, 1, &x.out, 1, 0));
  FILE *f = fopen(output_path, "wb");
  CHECK(f != NULL && fwrite(x.out_map, 1, npu_model_output(m, 0)->size, f) == npu_model_output(m, 0)->size,
        "wrote %s", output_path);
  if (f)
    fclose(f);

  npu_job *job = NULL;
  OK(npu_model_submit(m, &x.in, 1, &x.out, 1, NULL, &job));
  OK(npu_job_wait(job, 30000));
  CHECK(npu_job_state_now(job) == NPU_JOB_DONE && npu_job_cycles(job) > 0, "done, %llu modeled cycles",
        (unsigned long long)npu_job_cycles(job));
  OK(npu_job_wait(job, 0));   /* a finished job answers from what it knows */
  npu_job_release(job);
  npu_job_release(NULL);

  FAILS(npu_model_run(m, &x.in, 1, NULL, 0, 0), NPU_EINVAL, false);
  FAILS(npu_model_run(m, NULL, 1, &x.out, 1, 0), NPU_EINVAL, false);
  npu_buffer *small = NULL;
  OK(npu_buffer_alloc(client, 0, 4, &small));
  FAILS(npu_model_run(m, &small, 1, &x.out, 1, 0), NPU_EINVAL, false);
  OK(npu_buffer_free(small));

  npu_context *ctx = NULL;
  OK(npu_context_create(client, NPU_PRIORITY_LOW, 2, &ctx));
  npu_job_options opts = {.context = ctx, .deadline_ms = 60000, .timeout_ms = 60000};
  OK(npu_model_submit(m, &x.in, 1, &x.out, 1, &opts, &job));
  OK(npu_job_wait(job, 30000));
  npu_job_release(job);
  npu_context_release(ctx);
  io_close(&x);
}

static void test_jobs_and_fences(npu_client *client, npu_model *m) {
  io x;
  io_open(client, m, &x);
  memset(x.in_map, 0, npu_model_input(m, 0)->size);

  /* cancel: a job queued behind a slowed one fails at once, and so does a job after it */
  OK(npu_client_inject_fault(client, 0, "slow", 300, 1));
  npu_job *slow = NULL, *queued = NULL, *after = NULL;
  OK(npu_model_submit(m, &x.in, 1, &x.out, 1, NULL, &slow));
  npu_job_options behind_slow = {.after = &slow, .after_count = 1};
  OK(npu_model_submit(m, &x.in, 1, &x.out, 1, &behind_slow, &queued));
  FAILS(npu_job_wait(queued, 0), NPU_ETIMEDOUT, true);
  npu_job_state state = NPU_JOB_DONE;
  OK(npu_job_cancel(queued, &state));
  CHECK(state == NPU_JOB_QUEUED || state == NPU_JOB_FAILED, "cancelled while queued (state %d)", state);
  FAILS(npu_job_wait(queued, 30000), NPU_ECANCELED, false);
  CHECK(npu_job_state_now(queued) == NPU_JOB_FAILED, "a cancelled job failed");
  FAILS(npu_job_wait(queued, 0), NPU_ECANCELED, false);   /* its error stays */
  npu_job_options behind_cancelled = {.after = &queued, .after_count = 1};
  OK(npu_model_submit(m, &x.in, 1, &x.out, 1, &behind_cancelled, &after));
  npu_status s = npu_job_wait(after, 30000);
  CHECK(npu_status_code(s) == NPU_ECANCELED, "a dependent fails with its cause: %s: %s", npu_status_code_name(s),
        npu_status_message(s));
  npu_status_free(s);
  OK(npu_job_wait(slow, 30000));
  OK(npu_job_cancel(slow, &state));   /* finished: keeps its outcome */
  CHECK(state == NPU_JOB_DONE, "a finished job stays done (state %d)", state);
  npu_job_release(slow);
  npu_job_release(queued);
  npu_job_release(after);

  /* a deadline the slowed job cannot meet even on an idle device: ETIME, and (unlike the code's
   * default) not retryable, as the daemon says */
  OK(npu_client_inject_fault(client, 0, "slow", 300, 1));
  npu_job_options soon = {.deadline_ms = 100};
  npu_job *late = NULL;
  FAILS(npu_model_submit(m, &x.in, 1, &x.out, 1, &soon, &late), NPU_ETIME, false);
  CHECK(late == NULL, "no job from a refused submit");

  /* a fence exported by one session, imported and run after in another */
  npu_job *first = NULL, *imported = NULL, *second = NULL;
  OK(npu_model_submit(m, &x.in, 1, &x.out, 1, NULL, &first));
  char token[65] = "";
  OK(npu_job_export_fence(first, token));
  CHECK(strlen(token) > 0, "a token");
  npu_client *other = connect_or_die("libnpu-test-other");
  npu_buffer *theirs = NULL;
  OK(npu_buffer_alloc(other, 0, 4096, &theirs));
  FAILS(npu_fence_import(other, "no-such-token", &imported), NPU_ENOENT, false);
  FAILS(npu_fence_import(other, NULL, &imported), NPU_EINVAL, false);
  OK(npu_fence_import(other, token, &imported));
  CHECK(imported != NULL && npu_job_id(imported) > 0, "an imported fence is a job id of the other session");
  npu_job *both[2] = {first, NULL};
  bool ready = false;
  OK(npu_jobs_wait(both, 1, true, 30000, &ready));
  CHECK(ready && npu_job_state_now(first) == NPU_JOB_DONE, "wait_jobs saw it done");
  OK(npu_job_wait(imported, 30000));
  FAILS(npu_job_cancel(imported, NULL), NPU_EPERM, false);   /* an imported fence cannot be cancelled */

  /* a raw command stream that runs after the imported fence: refused for its bytes, not the fence */
  npu_job_options fenced = {.after = &imported, .after_count = 1};
  npu_binding binding = {theirs, 0, true};
  FAILS(npu_stream_submit(other, 0, "garbage", 7, &binding, 1, &fenced, &second), NPU_EINVAL, false);
  FAILS(npu_stream_submit(other, 0, NULL, 7, NULL, 0, NULL, &second), NPU_EINVAL, false);
  size_t huge = 17u << 20;   /* over the daemon's message limit: refused before sending */
  char *stream = calloc(1, huge);
  FAILS(npu_stream_submit(other, 0, stream, huge, NULL, 0, NULL, &second), NPU_EMSGSIZE, false);
  free(stream);
  CHECK(second == NULL, "no job from refused submits");
  both[1] = imported;
  FAILS(npu_jobs_wait(both, 2, true, 0, &ready), NPU_EINVAL, false);   /* two clients' jobs */
  FAILS(npu_jobs_wait(both, 0, true, 0, &ready), NPU_EINVAL, false);
  FAILS(npu_job_wait(NULL, 0), NPU_EINVAL, false);
  npu_job_release(imported);
  npu_job_release(first);
  OK(npu_buffer_free(theirs));
  npu_client_close(other);
  io_close(&x);
}

typedef struct waiter {
  npu_job *job;
  double returned_at;   /* read after the join */
} waiter;

static double seconds(void);

static void *wait_for_job(void *arg) {
  waiter *w = arg;
  OK(npu_job_wait(w->job, 30000));
  w->returned_at = seconds();
  return NULL;
}

/* A thread waiting for a slow job does not hold up another thread's calls on the same client. */
static void test_wait_leaves_the_client_to_others(npu_client *client, npu_model *m) {
  io x;
  io_open(client, m, &x);
  waiter w = {0};
  OK(npu_client_inject_fault(client, 0, "slow", 300, 1));   /* about 2 s: 7 layer segments */
  OK(npu_model_submit(m, &x.in, 1, &x.out, 1, NULL, &w.job));
  pthread_t thread;
  double start = seconds(), slowest = 0;
  pthread_create(&thread, NULL, wait_for_job, &w);
  nanosleep(&(struct timespec){0, 200000000}, NULL);   /* the waiter is surely waiting by now */
  for (int i = 0; i < 5; i++) {
    double t = seconds();
    OK(npu_client_ping(client));
    if (seconds() - t > slowest)
      slowest = seconds() - t;
  }
  double pinged_at = seconds();
  pthread_join(thread, NULL);
  CHECK(slowest < 1.0 && pinged_at < w.returned_at, "pings took up to %.0f ms, done %.0f ms before the wait",
        slowest * 1e3, (w.returned_at - pinged_at) * 1e3);
  printf("pings during a wait: slowest %.1f ms; the wait returned after %.0f ms\n", slowest * 1e3,
         (w.returned_at - start) * 1e3);
  npu_job_release(w.job);
  io_close(&x);
}

/* A job that crashes its device process fails with an error of its own. */
static void test_failed_job(npu_client *client, npu_model *m) {
  io x;
  io_open(client, m, &x);
  OK(npu_client_inject_fault(client, 0, "crash", 0, 1));
  npu_job *job = NULL;
  OK(npu_model_submit(m, &x.in, 1, &x.out, 1, NULL, &job));
  npu_status s = npu_job_wait(job, 60000);
  CHECK(s != NULL && npu_status_code(s) != NPU_ETIMEDOUT && npu_job_state_now(job) == NPU_JOB_FAILED,
        "%s: %s", npu_status_code_name(s), npu_status_message(s));
  npu_status_free(s);
  npu_job_release(job);
  /* npu_model_run (one round trip with a 1.8 daemon): the run's error, and wait's timeout */
  OK(npu_client_inject_fault(client, 0, "crash", 0, 1));
  s = npu_model_run(m, &x.in, 1, &x.out, 1, 60000);
  CHECK(s != NULL && npu_status_code(s) == NPU_EIO, "run: %s: %s", npu_status_code_name(s), npu_status_message(s));
  npu_status_free(s);
  OK(npu_client_inject_fault(client, 0, "slow", 1500, 1));
  FAILS(npu_model_run(m, &x.in, 1, &x.out, 1, 50), NPU_ETIMEDOUT, true);
  OK(npu_model_run(m, &x.in, 1, &x.out, 1, 60000));
  FAILS(npu_client_inject_fault(client, 99, "slow", 1, 1), NPU_ENODEV, false);
  FAILS(npu_client_inject_fault(client, 0, NULL, 1, 1), NPU_EINVAL, false);
  io_close(&x);
}

/* Input shapes at load: a fixed model takes its own shape and refuses another; a model with a
 * symbolic batch says the load set it to 1, and compiles for the batch given. */
static void test_shaped(npu_client *client, const void *onnx, size_t size, const char *symbolic_path) {
  npu_model *m = NULL;
  OK(npu_model_load(client, 0, onnx, size, &m));
  if (m == NULL)
    return;
  const npu_tensor_info *ti = npu_model_input(m, 0);
  npu_input_shape own = {ti->name, ti->rank, ti->shape};
  npu_model *same = NULL, *other = NULL;
  OK(npu_model_load_shaped(client, 0, onnx, size, &own, 1, &same));
  CHECK(same != NULL && memcmp(npu_model_input(same, 0)->shape, ti->shape, ti->rank * sizeof(int64_t)) == 0,
        "a fixed model loads with its own shape given");
  npu_status_free(npu_model_unload(same));
  int64_t wrong[NPU_MAX_RANK];
  memcpy(wrong, ti->shape, sizeof wrong);
  wrong[ti->rank - 1] += 1;
  npu_input_shape contradicting = {ti->name, ti->rank, wrong};
  FAILS(npu_model_load_shaped(client, 0, onnx, size, &contradicting, 1, &other), NPU_EINVAL, false);
  FAILS(npu_model_load_shaped(client, 0, onnx, size, NULL, 1, &other), NPU_EINVAL, false);
  npu_input_shape zero = {ti->name, 0, ti->shape};
  FAILS(npu_model_load_shaped(client, 0, onnx, size, &zero, 1, &other), NPU_EINVAL, false);
  CHECK(other == NULL, "out untouched on failure");
  OK(npu_model_unload(m));

  size_t n = 0;
  void *data = read_file(symbolic_path, &n);
  CHECK(data != NULL, "read %s", symbolic_path);
  if (data == NULL)
    return;
  npu_model *batch1 = NULL, *batch3 = NULL;
  OK(npu_model_load(client, 0, data, n, &batch1));
  if (batch1 != NULL) {
    const npu_tensor_info *x = npu_model_input(batch1, 0);
    CHECK(x->shape[0] == 1 && x->symbolic == 1u && x->defaulted == 1u, "the symbolic batch was set to 1, and "
          "said so (shape[0] %lld, symbolic %#x, defaulted %#x)", (long long)x->shape[0], x->symbolic, x->defaulted);
    int64_t dims[NPU_MAX_RANK];
    memcpy(dims, x->shape, sizeof dims);
    dims[0] = 3;
    npu_input_shape three = {x->name, x->rank, dims};
    OK(npu_model_load_shaped(client, 0, data, n, &three, 1, &batch3));
    const npu_tensor_info *x3 = batch3 != NULL ? npu_model_input(batch3, 0) : NULL;
    CHECK(x3 != NULL && x3->shape[0] == 3 && x3->symbolic == 1u && x3->defaulted == 0 &&
          x3->size == 3 * x->size, "compiled for batch 3, nothing defaulted");
    npu_status_free(npu_model_unload(batch3));
    OK(npu_model_unload(batch1));
  }
  free(data);
}

static void test_big_model(npu_client *client, const char *path) {
  npu_model *m = NULL;
  size_t size = 0;
  void *data = read_file(path, &size);
  CHECK(data != NULL && size > npu_client_max_inline_bytes(client), "%s is over the inline limit", path);
  OK(npu_model_load(client, 0, data, size, &m));   /* through a staging buffer */
  CHECK(m != NULL && npu_model_input_count(m) == 1, "the big model loaded");
  OK(npu_model_unload(m));
  free(data);
}

/* Threads sharing one client: each allocates, writes, reads back and frees its own buffers. */
static void *buffer_worker(void *arg) {
  npu_client *client = arg;
  unsigned char data[256], back[256];
  for (int i = 0; i < 25; i++) {
    npu_buffer *b = NULL;
    memset(data, i, sizeof data);
    OK(npu_buffer_alloc(client, 0, sizeof data, &b));
    OK(npu_buffer_write(b, 0, data, sizeof data));
    OK(npu_buffer_read(b, 0, back, sizeof back));
    CHECK(memcmp(data, back, sizeof data) == 0, "a thread reads its own bytes back");
    OK(npu_client_ping(client));
    OK(npu_buffer_free(b));
  }
  return NULL;
}

static void test_threads(npu_client *client) {
  pthread_t threads[4];
  for (int i = 0; i < 4; i++)
    pthread_create(&threads[i], NULL, buffer_worker, client);
  for (int i = 0; i < 4; i++)
    pthread_join(threads[i], NULL);
}

static double seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The daemon dies while a call waits on it: the companion socket's end ends the call at once. */
static int wait_through_death(const char *model_path) {
  npu_client *client = connect_or_die("libnpu-test-death");
  npu_model *m = NULL;
  io x;
  npu_job *job = NULL;
  OK(npu_model_load_file(client, 0, model_path, &m));
  if (m == NULL)
    return 1;
  io_open(client, m, &x);
  OK(npu_model_submit(m, &x.in, 1, &x.out, 1, NULL, &job));   /* unfinished here until a wait says so */
  printf("ready\n");
  fflush(stdout);
  char line[16];
  if (fgets(line, sizeof line, stdin) == NULL)
    return 1;
  double start = seconds();
  npu_status s = npu_job_wait(job, 60000);
  printf("wait %s %.0f ms: %s\n", npu_status_code_name(s), (seconds() - start) * 1e3, npu_status_message(s));
  npu_status_free(s);
  s = npu_client_ping(client);
  printf("ping %s\n", npu_status_code_name(s));
  npu_status_free(s);
  npu_job_release(job);
  npu_status_free(npu_buffer_free(x.in));   /* ENOTCONN too: the session is gone */
  npu_status_free(npu_buffer_free(x.out));
  npu_status_free(npu_model_unload(m));
  npu_client_close(client);
  return 0;
}

/* Objects outlive their client's session: calls fail with ENOTCONN, releasing still works. */
static void test_closed_client(void) {
  npu_client *client = connect_or_die("libnpu-test-closed");
  npu_buffer *b = NULL;
  npu_context *ctx = NULL;
  OK(npu_buffer_alloc(client, 0, 64, &b));
  OK(npu_context_create(client, NPU_PRIORITY_NORMAL, 0, &ctx));
  CHECK(npu_context_weight(ctx) == 1, "weight 0 means 1");
  npu_client_close(client);
  npu_client_close(NULL);
  char byte = 1;
  FAILS(npu_buffer_write(b, 0, &byte, 1), NPU_ENOTCONN, true);
  FAILS(npu_buffer_free(b), NPU_ENOTCONN, true);
  npu_context_release(ctx);
}

int main(int argc, char **argv) {
  if (argc == 4 && strcmp(argv[1], "--wait-through-death") == 0) {
    endpoint = argv[2];
    return wait_through_death(argv[3]);
  }
  if (argc < 5) {
    fprintf(stderr, "usage: test_libnpu ENDPOINT MODEL.onnx INPUT.raw OUTPUT.raw [BIG_MODEL.onnx "
                    "[SYMBOLIC_BATCH_MODEL.onnx]]\n");
    return 2;
  }
  setvbuf(stdout, NULL, _IONBF, 0);   /* what failed is on record even if a check crashes */
  endpoint = argv[1];
  size_t size = 0;
  void *onnx = read_file(argv[2], &size);
  if (onnx == NULL) {
    fprintf(stderr, "test_libnpu: cannot read %s\n", argv[2]);
    return 2;
  }
  test_status();
  npu_client *client = connect_or_die("libnpu-test");
  test_connect(client);
  test_devices(client);
  test_buffers(client);
  test_threads(client);
  test_contexts(client);
  test_models(client, argv[2], onnx, size);
  npu_model *m = NULL;
  OK(npu_model_load(client, 0, onnx, size, &m));
  if (m != NULL) {
    test_run(client, m, argv[3], argv[4]);
    test_jobs_and_fences(client, m);
    test_wait_leaves_the_client_to_others(client, m);
    test_failed_job(client, m);
    OK(npu_model_unload(m));
  }
  if (argc > 5)
    test_big_model(client, argv[5]);
  if (argc > 6)
    test_shaped(client, onnx, size, argv[6]);
  npu_client_close(client);
  test_closed_client();
  free(onnx);
  printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
