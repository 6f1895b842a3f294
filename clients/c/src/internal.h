/* libnpu's internals: shared between its source files, not installed. */
#ifndef NPU_INTERNAL_H
#define NPU_INTERNAL_H

#include <msgpack.h>
#include <pthread.h>
#include <stdatomic.h>
#include <zmq.h>

#include "npu.h"

#define NPU_EXPORT __attribute__((visibility("default")))
#define NPU_PRINTF(f, a) __attribute__((format(printf, f, a)))

/* ---- status.c ---- */
npu_status npu__error(npu_code code, bool retryable, const char *fmt, ...) NPU_PRINTF(3, 4);
npu_status npu__error_default(npu_code code, const char *fmt, ...) NPU_PRINTF(2, 3); /* the code's retryable */
npu_status npu__status_copy(npu_status status);
npu_code npu__code_from_name(const char *name, size_t length);
npu_status npu__status_from_wire(const msgpack_object *error); /* an {code, message, retryable} map */

/* ---- wire.c: msgpack requests and replies ---- */
typedef struct npu_request {
  msgpack_sbuffer buffer;
  msgpack_packer pk;
  const char *op;
} npu_request;

/* Start a request: {"op": op, "args": {<nargs pairs packed next>}, "seq": <added when sent>}. */
void npu__request_begin(npu_request *request, const char *op, uint32_t nargs);
void npu__request_done(npu_request *request);
void npu__pack_str(msgpack_packer *pk, const char *s);
void npu__pack_key_u64(msgpack_packer *pk, const char *key, uint64_t value);
void npu__pack_key_bin(msgpack_packer *pk, const char *key, const void *data, size_t size);
void npu__pack_key_str(msgpack_packer *pk, const char *key, const char *value);

/* A decoded reply: `result` points into the frame, valid until npu__reply_free. */
typedef struct npu_reply {
  zmq_msg_t frame;
  msgpack_unpacked unpacked;
  msgpack_object result;
  bool live;
} npu_reply;
void npu__reply_free(npu_reply *reply);

const msgpack_object *npu__get(const msgpack_object *map, const char *key); /* NULL if absent */
uint64_t npu__get_u64(const msgpack_object *map, const char *key, uint64_t fallback);
bool npu__get_bool(const msgpack_object *map, const char *key, bool fallback);
double npu__get_f64(const msgpack_object *map, const char *key, double fallback);
/* Copy a str field into `out` (NUL-terminated, truncated to `capacity`); "" if absent. */
void npu__get_str(const msgpack_object *map, const char *key, char *out, size_t capacity);
char *npu__strndup_obj(const msgpack_object *str);   /* a str object as a malloc'd C string */
bool npu__str_is(const msgpack_object *obj, const char *s);

/* ---- client.c: the session and its transport ---- */
uint64_t npu__now_ms(void);   /* CLOCK_MONOTONIC */
struct npu_client {
  atomic_int refs;                 /* the caller's (until close) + one per live object */
  /* The sockets, seq, closed and lost belong to one caller at a time, in the order they came
   * (a ticket lock: a thread that loops on short waits cannot starve the others). */
  pthread_mutex_t lock;
  pthread_cond_t turn;
  uint64_t next_ticket, serving;
  void *zctx, *sock;
  int attach_fd;                   /* the companion socket, -1 if none */
  uint32_t seq;
  bool closed;
  bool lost;                       /* the companion socket ended: so did the session */
  uint32_t timeout_ms;
  uint32_t protocol_minor;         /* the daemon's, from hello: which optional fields it knows */
  uint64_t max_message_bytes, max_inline_bytes;
  char endpoint[4200];
  char session[65];
  char daemon_version[65];
};

void npu__client_retain(npu_client *client);
void npu__client_release(npu_client *client);
/* Send the request (which is consumed) and wait up to `timeout_ms` for its reply; on success
 * `*reply` holds the result (free it).  `fd`: also receive the memfd the companion socket sends
 * for this request (map).  The daemon's error comes back as the status. */
npu_status npu__call(npu_client *client, npu_request *request, uint32_t timeout_ms, npu_reply *reply, int *fd);
/* A call whose result is not needed. */
npu_status npu__call_void(npu_client *client, npu_request *request);
/* `op` with the one argument {key: value} (free, unload, ...), its result not needed. */
npu_status npu__call_one(npu_client *client, const char *op, const char *key, uint64_t value);

/* ---- objects.c ---- */
struct npu_buffer {
  npu_client *client;
  uint32_t handle;
  uint64_t size;
  void *map;
  size_t map_size;
};

struct npu_context {
  npu_client *client;
  uint32_t id, weight;
  npu_priority priority;
};

struct npu_job {
  npu_client *client;
  uint64_t id;
  npu_job_state state;
  uint64_t cycles;
  npu_status error;      /* the job's own error once it failed */
};

npu_status npu__job_new(npu_client *client, uint64_t id, npu_job_state state, npu_job **out);
void npu__pack_job_options(msgpack_packer *pk, const npu_job_options *options);
uint32_t npu__job_option_count(const npu_job_options *options);
bool npu__state_from_obj(const msgpack_object *obj, npu_job_state *state);
/* run_model; with `wait_ms` >= 0 (protocol 1.8) the daemon answers once the job finished or
 * `wait_ms` passed, and `*out` has its state and error then. */
npu_status npu__run_model(npu_client *client, uint32_t model, npu_buffer *const *inputs, size_t input_count,
                          npu_buffer *const *outputs, size_t output_count, const npu_job_options *options,
                          int64_t wait_ms, npu_job **out);

#endif
