/* The session: endpoint, hello, the companion socket, and one request at a time over a DEALER. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define DEFAULT_TIMEOUT_MS 30000u
#define HELLO_TIMEOUT_MS 5000u
#define BYE_TIMEOUT_MS 2000u
#define PACKET_BYTES 4096            /* companion-socket packets are at most this */
#define MAX_MESSAGE_BYTES 16842752u  /* until hello tells the session's limit */
#define HARD_FRAME_LIMIT (2 * 16842752) /* ZMQ_MAXMSGSIZE, as the Python client sets it */

uint64_t npu__now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static const char *ipc_path(const char *endpoint) {
  return strncmp(endpoint, "ipc://", 6) == 0 ? endpoint + 6 : NULL;
}

static bool socket_exists(const char *endpoint) {
  struct stat st;
  return stat(ipc_path(endpoint), &st) == 0;
}

/* docs/PROTOCOL.md's endpoint rules (npud/ipc_schema/endpoint.py): the first candidate whose socket
 * exists, else the last. */
static void resolve_endpoint(const char *endpoint, char *out, size_t capacity) {
  const char *env = getenv("NPUD_ENDPOINT");
  const char *runtime = getenv("XDG_RUNTIME_DIR");
  if (endpoint == NULL || !*endpoint)
    endpoint = env != NULL && *env ? env : NULL;
  if (endpoint != NULL) {
    snprintf(out, capacity, "%s", endpoint);
    return;
  }
  if (runtime != NULL && *runtime) {
    snprintf(out, capacity, "ipc://%s/npud/npud.sock", runtime);
    if (socket_exists(out))
      return;
  }
  snprintf(out, capacity, "ipc:///run/npud/npud.sock");
  if (!socket_exists(out))
    snprintf(out, capacity, "ipc:///tmp/npud-%u/npud.sock", (unsigned)getuid());
}

static npu_status not_running(const char *endpoint, const char *detail) {
  return npu__error_default(NPU_ECONNREFUSED,
                            "npud is not running at %s%s; start it with `npud --endpoint %s` (or "
                            "`systemctl start npud`), or set NPUD_ENDPOINT",
                            endpoint, detail, endpoint);
}

/* Fail fast when nothing listens at an ipc endpoint (libzmq would wait for it forever). */
static npu_status check_reachable(const char *endpoint) {
  const char *path = ipc_path(endpoint);
  if (path == NULL)
    return NULL;
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof addr.sun_path)
    return npu__error_default(NPU_EINVAL, "the ipc path %s is longer than a Unix socket path can be", path);
  if (!socket_exists(endpoint))
    return not_running(endpoint, "");
  strcpy(addr.sun_path, path);
  int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (probe < 0)
    return npu__error_default(NPU_EIO, "socket: %s", strerror(errno));
  int rc = connect(probe, (struct sockaddr *)&addr, sizeof addr), err = errno;
  close(probe);
  if (rc < 0 && err == ECONNREFUSED)
    return not_running(endpoint, " (its socket file is left from a daemon that exited)");
  return NULL;
}

void npu__client_retain(npu_client *client) { atomic_fetch_add(&client->refs, 1); }

static void close_sockets(npu_client *client) {
  if (client->sock != NULL)
    zmq_close(client->sock);
  if (client->zctx != NULL)
    zmq_ctx_term(client->zctx);
  if (client->attach_fd >= 0)
    close(client->attach_fd);
  client->sock = client->zctx = NULL;
  client->attach_fd = -1;
}

void npu__client_release(npu_client *client) {
  if (atomic_fetch_sub(&client->refs, 1) != 1)
    return;
  close_sockets(client);
  pthread_cond_destroy(&client->turn);
  pthread_mutex_destroy(&client->lock);
  free(client);
}

/* Parse one reply frame; true if it answers `seq` (events and stale replies are dropped). */
static bool take_frame(npu_reply *reply, uint32_t seq, npu_status *status) {
  msgpack_unpacked_init(&reply->unpacked);
  size_t offset = 0;
  const char *data = zmq_msg_data(&reply->frame);
  size_t size = zmq_msg_size(&reply->frame);
  if (msgpack_unpack_next(&reply->unpacked, data, size, &offset) != MSGPACK_UNPACK_SUCCESS ||
      reply->unpacked.data.type != MSGPACK_OBJECT_MAP) {
    msgpack_unpacked_destroy(&reply->unpacked);
    *status = npu__error_default(NPU_EPROTO, "the daemon sent a frame that is not a msgpack map");
    return true;
  }
  const msgpack_object *msg = &reply->unpacked.data;
  const msgpack_object *got = npu__get(msg, "seq");
  if (npu__get(msg, "event") != NULL || got == NULL || got->type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
      got->via.u64 != seq) {
    msgpack_unpacked_destroy(&reply->unpacked);
    return false;
  }
  reply->live = true;
  const msgpack_object *result = npu__get(msg, "result");
  if (npu__get_bool(msg, "ok", false) && result != NULL && result->type == MSGPACK_OBJECT_MAP) {
    reply->result = *result;
    *status = NULL;
    return true;
  }
  const msgpack_object *error = npu__get(msg, "error");
  *status = error != NULL ? npu__status_from_wire(error)
                          : npu__error_default(NPU_EPROTO, "the daemon's reply has neither result nor error");
  return true;
}

static npu_status session_gone(const npu_client *client, const char *op) {
  return npu__error_default(NPU_ENOTCONN, "%s: the session with npud at %s is gone (the daemon stopped, or closed "
                                          "the session); connect again and load models again",
                            op, client->endpoint);
}

static npu_status timed_out(const char *op, uint32_t timeout_ms) {
  return npu__error_default(NPU_ETIMEDOUT, "no reply to %s within %u ms: is the daemon overloaded or stopped?",
                            op, timeout_ms);
}

/* Receive frames until the reply to `seq` arrives or `deadline` (now_ms) passes. */
static npu_status receive_reply(npu_client *client, const char *op, uint32_t seq, uint64_t deadline,
                                uint32_t timeout_ms, npu_reply *reply) {
  for (;;) {
    uint64_t now = npu__now_ms();
    if (now >= deadline)
      return timed_out(op, timeout_ms);
    /* The companion socket is watched for its end only (no events asked: hangup and errors are
     * always reported): the daemon closes it with the session, or the kernel when it dies. */
    zmq_pollitem_t items[2] = {{client->sock, 0, ZMQ_POLLIN, 0}, {NULL, client->attach_fd, 0, 0}};
    int n = zmq_poll(items, client->attach_fd >= 0 ? 2 : 1, (long)(deadline - now));
    if (n < 0 && zmq_errno() == EINTR)
      continue;
    if (n < 0)
      return npu__error_default(NPU_EIO, "zmq_poll: %s", zmq_strerror(zmq_errno()));
    if (items[0].revents == 0 && items[1].revents != 0) {
      client->lost = true;
      return session_gone(client, op);
    }
    if (n == 0)
      continue;
    zmq_msg_init(&reply->frame);
    if (zmq_msg_recv(&reply->frame, client->sock, ZMQ_DONTWAIT) < 0) {
      zmq_msg_close(&reply->frame);
      continue;
    }
    npu_status status = NULL;
    if (take_frame(reply, seq, &status)) {
      if (status != NULL && reply->live)
        npu__reply_free(reply);
      else if (status != NULL)
        zmq_msg_close(&reply->frame);
      return status;
    }
    zmq_msg_close(&reply->frame);
  }
}

/* The companion socket's packet tagged `seq`: its fd (packets for abandoned requests are dropped). */
static npu_status receive_fd(npu_client *client, uint32_t seq, uint64_t deadline, int *fd) {
  for (;;) {
    uint64_t now = npu__now_ms();
    if (now >= deadline)
      return npu__error_default(NPU_ETIMEDOUT, "the map reply came but not its fd on the companion socket");
    struct pollfd p = {client->attach_fd, POLLIN, 0};
    if (poll(&p, 1, (int)(deadline - now)) <= 0)
      continue;
    char data[PACKET_BYTES];
    char control[CMSG_SPACE(sizeof(int))] __attribute__((aligned(8)));
    struct iovec iov = {data, sizeof data};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    ssize_t n = recvmsg(client->attach_fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
      continue;
    if (n <= 0) {
      client->lost = true;
      return session_gone(client, "map");
    }
    int got = -1;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (c != NULL && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
      memcpy(&got, CMSG_DATA(c), sizeof got);
    msgpack_unpacked up;
    msgpack_unpacked_init(&up);
    size_t offset = 0;
    bool ours = msgpack_unpack_next(&up, data, (size_t)n, &offset) == MSGPACK_UNPACK_SUCCESS &&
                npu__get_u64(&up.data, "tag", UINT64_MAX) == seq;
    msgpack_unpacked_destroy(&up);
    if (ours && got >= 0) {
      *fd = got;
      return NULL;
    }
    if (got >= 0)
      close(got);
  }
}

static npu_status call_in_turn(npu_client *client, npu_request *request, uint32_t timeout_ms, npu_reply *reply,
                              int *fd) {
  if (client->closed)
    return npu__error_default(NPU_ENOTCONN, "%s: the client was closed; connect again", request->op);
  if (client->lost)
    return session_gone(client, request->op);
  uint32_t seq = ++client->seq;
  npu__pack_str(&request->pk, "seq");
  msgpack_pack_uint32(&request->pk, seq);
  if (request->buffer.size > client->max_message_bytes)
    return npu__error_default(NPU_EMSGSIZE,
                              "%s request of %zu bytes exceeds the daemon's limit of %llu; use a mapped "
                              "buffer for bulk data",
                              request->op, request->buffer.size, (unsigned long long)client->max_message_bytes);
  if (zmq_send(client->sock, request->buffer.data, request->buffer.size, 0) < 0)
    return npu__error_default(NPU_EIO, "%s: zmq_send: %s", request->op, zmq_strerror(zmq_errno()));
  uint64_t deadline = npu__now_ms() + timeout_ms;
  npu_status status = receive_reply(client, request->op, seq, deadline, timeout_ms, reply);
  if (status == NULL && fd != NULL && (status = receive_fd(client, seq, deadline, fd)) != NULL)
    npu__reply_free(reply);
  return status;
}

/* Wait for this thread's turn with the client's sockets (first come, first served). */
static void turn_begin(npu_client *client) {
  pthread_mutex_lock(&client->lock);
  uint64_t ticket = client->next_ticket++;
  while (client->serving != ticket)
    pthread_cond_wait(&client->turn, &client->lock);
  pthread_mutex_unlock(&client->lock);
}

static void turn_end(npu_client *client) {
  pthread_mutex_lock(&client->lock);
  client->serving++;
  pthread_cond_broadcast(&client->turn);
  pthread_mutex_unlock(&client->lock);
}

npu_status npu__call(npu_client *client, npu_request *request, uint32_t timeout_ms, npu_reply *reply, int *fd) {
  reply->live = false;
  turn_begin(client);
  npu_status status = call_in_turn(client, request, timeout_ms ? timeout_ms : client->timeout_ms, reply, fd);
  turn_end(client);
  npu__request_done(request);
  return status;
}

npu_status npu__call_void(npu_client *client, npu_request *request) {
  npu_reply reply;
  npu_status status = npu__call(client, request, 0, &reply, NULL);
  npu__reply_free(&reply);
  return status;
}

npu_status npu__call_one(npu_client *client, const char *op, const char *key, uint64_t value) {
  npu_request request;
  npu__request_begin(&request, op, 1);
  npu__pack_key_u64(&request.pk, key, value);
  return npu__call_void(client, &request);
}

static npu_status attach_refused(const char *path, const char *why) {
  return npu__error_default(NPU_ENOTCONN, "cannot attach the companion socket %s: %s", path, why);
}

/* Connect the companion socket and present the session's token; a full backlog is waited out. */
static npu_status attach(npu_client *client, const char *path, const msgpack_object *token) {
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof addr.sun_path)
    return attach_refused(path, "path too long");
  strcpy(addr.sun_path, path);
  int fd = -1;
  uint64_t deadline = npu__now_ms() + HELLO_TIMEOUT_MS;
  /* pauses doubling from 1 ms to 100 ms, as the Python client's (protocol.attach_retries) */
  for (useconds_t delay = 1000;; delay = delay < 50000 ? 2 * delay : 100000) {
    fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
      return attach_refused(path, strerror(errno));
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0)
      break;
    int err = errno;
    close(fd);
    if (err != EAGAIN || npu__now_ms() + delay / 1000 >= deadline)
      return attach_refused(path, err == EAGAIN ? "its listen backlog stayed full" : strerror(err));
    usleep(delay);
  }
  struct timeval tv = {HELLO_TIMEOUT_MS / 1000, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  msgpack_sbuffer sb;
  msgpack_packer pk;
  msgpack_sbuffer_init(&sb);
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  msgpack_pack_map(&pk, 2);
  npu__pack_key_str(&pk, "session", client->session);
  npu__pack_key_bin(&pk, "token", token->via.bin.ptr, token->via.bin.size);
  ssize_t sent = send(fd, sb.data, sb.size, MSG_NOSIGNAL);
  msgpack_sbuffer_destroy(&sb);
  char packet[PACKET_BYTES];
  ssize_t n = sent < 0 ? -1 : recv(fd, packet, sizeof packet, 0);
  if (n <= 0) {
    close(fd);
    return attach_refused(path, n == 0 ? "the daemon closed it" : strerror(errno));
  }
  msgpack_unpacked up;
  msgpack_unpacked_init(&up);
  size_t offset = 0;
  npu_status status = NULL;
  if (msgpack_unpack_next(&up, packet, (size_t)n, &offset) != MSGPACK_UNPACK_SUCCESS)
    status = npu__error_default(NPU_EPROTO, "bad companion-socket reply");
  else if (!npu__get_bool(&up.data, "ok", false)) {
    const msgpack_object *error = npu__get(&up.data, "error");
    status = error ? npu__status_from_wire(error) : npu__error_default(NPU_EPROTO, "companion socket refused");
  }
  msgpack_unpacked_destroy(&up);
  if (status != NULL)
    close(fd);
  else
    client->attach_fd = fd;
  return status;
}

static npu_status hello(npu_client *client, const char *name) {
  npu_request request;
  npu__request_begin(&request, "hello", 3);
  npu__pack_str(&request.pk, "protocol");
  msgpack_pack_array(&request.pk, 2);
  msgpack_pack_uint32(&request.pk, NPU_PROTOCOL_MAJOR);
  msgpack_pack_uint32(&request.pk, NPU_PROTOCOL_MINOR);
  npu__pack_key_str(&request.pk, "client_name", name);
  npu__pack_key_u64(&request.pk, "pid", (uint64_t)getpid());
  npu_reply reply;
  npu_status status = npu__call(client, &request, HELLO_TIMEOUT_MS, &reply, NULL);
  if (status != NULL) {
    if (npu_status_code(status) != NPU_ETIMEDOUT)
      return status;
    npu_status_free(status);
    return not_running(client->endpoint, " (no answer to hello)");
  }
  const msgpack_object *r = &reply.result, *proto = npu__get(r, "protocol");
  if (proto == NULL || proto->type != MSGPACK_OBJECT_ARRAY || proto->via.array.size != 2 ||
      proto->via.array.ptr[0].via.u64 != NPU_PROTOCOL_MAJOR) {
    npu__reply_free(&reply);
    return npu__error_default(NPU_EPROTO, "the daemon speaks another major version of the protocol than %d.%d",
                              NPU_PROTOCOL_MAJOR, NPU_PROTOCOL_MINOR);
  }
  client->protocol_minor = (uint32_t)proto->via.array.ptr[1].via.u64;
  npu__get_str(r, "session", client->session, sizeof client->session);
  npu__get_str(r, "daemon_version", client->daemon_version, sizeof client->daemon_version);
  const msgpack_object *limits = npu__get(r, "limits");
  client->max_message_bytes = npu__get_u64(limits, "max_message_bytes", MAX_MESSAGE_BYTES);
  client->max_inline_bytes = npu__get_u64(limits, "max_inline_bytes", 1u << 20);
  char path[4097];
  npu__get_str(r, "attach_path", path, sizeof path);
  const msgpack_object *token = npu__get(r, "attach_token");
  if (*path && token != NULL && token->type == MSGPACK_OBJECT_BIN)
    status = attach(client, path, token);
  npu__reply_free(&reply);
  return status;
}

static npu_status open_socket(npu_client *client) {
  int linger = 0;
  int64_t maxmsg = HARD_FRAME_LIMIT;
  client->zctx = zmq_ctx_new();
  client->sock = client->zctx ? zmq_socket(client->zctx, ZMQ_DEALER) : NULL;
  if (client->sock == NULL || zmq_setsockopt(client->sock, ZMQ_LINGER, &linger, sizeof linger) < 0 ||
      zmq_setsockopt(client->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg) < 0)
    return npu__error_default(NPU_EIO, "cannot make a ZeroMQ socket: %s", zmq_strerror(zmq_errno()));
  if (zmq_connect(client->sock, client->endpoint) < 0)
    return npu__error_default(NPU_EINVAL, "cannot connect to %s: %s", client->endpoint, zmq_strerror(zmq_errno()));
  return NULL;
}

NPU_EXPORT npu_status npu_client_connect(const char *endpoint, const npu_client_options *options, npu_client **out) {
  if (out == NULL)
    return npu__error_default(NPU_EINVAL, "npu_client_connect: out is NULL");
  npu_client *client = calloc(1, sizeof *client);
  if (client == NULL)
    return npu__error_default(NPU_ENOMEM, "out of memory");
  atomic_init(&client->refs, 1);
  pthread_mutex_init(&client->lock, NULL);
  pthread_cond_init(&client->turn, NULL);
  client->attach_fd = -1;
  client->max_message_bytes = MAX_MESSAGE_BYTES;
  client->timeout_ms = options && options->timeout_ms ? options->timeout_ms : DEFAULT_TIMEOUT_MS;
  resolve_endpoint(endpoint, client->endpoint, sizeof client->endpoint);
  npu_status status = check_reachable(client->endpoint);
  if (status == NULL)
    status = open_socket(client);
  if (status == NULL)
    status = hello(client, options && options->name ? options->name : "libnpu");
  if (status != NULL) {
    npu__client_release(client);
    return status;
  }
  *out = client;
  return NULL;
}

NPU_EXPORT void npu_client_close(npu_client *client) {
  if (client == NULL)
    return;
  npu_request request;
  npu__request_begin(&request, "bye", 0);
  npu_reply reply;
  npu_status_free(npu__call(client, &request, BYE_TIMEOUT_MS, &reply, NULL));
  npu__reply_free(&reply);
  turn_begin(client);
  client->closed = true;
  close_sockets(client);   /* the companion socket's end frees the session at once */
  turn_end(client);
  npu__client_release(client);
}

NPU_EXPORT npu_status npu_client_ping(npu_client *client) {
  npu_request request;
  npu__request_begin(&request, "ping", 0);
  return npu__call_void(client, &request);
}

NPU_EXPORT const char *npu_client_session(const npu_client *client) { return client->session; }
NPU_EXPORT const char *npu_client_daemon_version(const npu_client *client) { return client->daemon_version; }
NPU_EXPORT const char *npu_client_endpoint(const npu_client *client) { return client->endpoint; }
NPU_EXPORT bool npu_client_attached(const npu_client *client) { return client->attach_fd >= 0; }
NPU_EXPORT uint64_t npu_client_max_inline_bytes(const npu_client *client) { return client->max_inline_bytes; }

NPU_EXPORT npu_status npu_client_devices(npu_client *client, npu_device_info *devices, size_t capacity,
                                         size_t *count) {
  npu_request request;
  npu__request_begin(&request, "devices", 0);
  npu_reply reply;
  npu_status status = npu__call(client, &request, 0, &reply, NULL);
  if (status != NULL)
    return status;
  const msgpack_object *list = npu__get(&reply.result, "devices");
  size_t n = list != NULL && list->type == MSGPACK_OBJECT_ARRAY ? list->via.array.size : 0;
  for (size_t i = 0; i < n && i < capacity; i++) {
    const msgpack_object *d = &list->via.array.ptr[i];
    npu_device_info *info = &devices[i];
    info->index = (uint32_t)npu__get_u64(d, "index", i);
    npu__get_str(d, "name", info->name, sizeof info->name);
    npu__get_str(d, "preset", info->preset, sizeof info->preset);
    npu__get_str(d, "state", info->state, sizeof info->state);
    info->memory_total = npu__get_u64(d, "memory_total", 0);
    info->memory_used = npu__get_u64(d, "memory_used", 0);
  }
  if (count != NULL)
    *count = n;
  npu__reply_free(&reply);
  return NULL;
}
