/* npu_status: errors as values with a stable code, a message and a retryable flag. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct npu_status_s {
  npu_code code;
  bool retryable;
  bool is_static;
  uint32_t retry_after_ms;
  char message[];
};

/* Returned when a status itself cannot be allocated; npu_status_free leaves it alone. */
static struct npu_status_s out_of_memory = {NPU_ENOMEM, true, true, 0};

static const char *const code_names[NPU_CODE_COUNT] = {
  "OK", "EINVAL", "EPROTO", "EMSGSIZE", "ENOENT", "EPERM", "ENOMEM", "EDQUOT", "EAGAIN", "EBUSY",
  "ETIMEDOUT", "EFAULT", "EIO", "ENODEV", "ENOTCONN", "ECONNREFUSED", "ECANCELED", "ESHUTDOWN",
  "EINTERNAL", "ETIME", "EOPNOTSUPP",
};

/* docs/PROTOCOL.md's "retryable by default" column. */
static bool default_retryable(npu_code code) {
  switch (code) {
  case NPU_ENOMEM: case NPU_EAGAIN: case NPU_EBUSY: case NPU_ETIMEDOUT: case NPU_EIO:
  case NPU_ENOTCONN: case NPU_ECONNREFUSED: case NPU_ESHUTDOWN: case NPU_ETIME:
    return true;
  default:
    return false;
  }
}

static npu_status status_vnew(npu_code code, bool retryable, const char *fmt, va_list ap) {
  va_list again;
  va_copy(again, ap);
  int n = vsnprintf(NULL, 0, fmt, ap);
  struct npu_status_s *s = malloc(sizeof *s + (size_t)(n < 0 ? 0 : n) + 1);
  if (s == NULL) {
    va_end(again);
    return &out_of_memory;
  }
  *s = (struct npu_status_s){code, retryable, false, 0};
  vsnprintf(s->message, (size_t)(n < 0 ? 0 : n) + 1, fmt, again);
  va_end(again);
  return s;
}

npu_status npu__error(npu_code code, bool retryable, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  npu_status s = status_vnew(code, retryable, fmt, ap);
  va_end(ap);
  return s;
}

npu_status npu__error_default(npu_code code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  npu_status s = status_vnew(code, default_retryable(code), fmt, ap);
  va_end(ap);
  return s;
}

npu_status npu__status_copy(npu_status status) {
  if (status == NULL)
    return NULL;
  npu_status copy = npu__error(status->code, status->retryable, "%s", status->message);
  if (!copy->is_static)
    copy->retry_after_ms = status->retry_after_ms;
  return copy;
}

npu_code npu__code_from_name(const char *name, size_t length) {
  for (int c = 1; c < NPU_CODE_COUNT; c++)
    if (strlen(code_names[c]) == length && memcmp(code_names[c], name, length) == 0)
      return (npu_code)c;
  return NPU_EPROTO;
}

npu_status npu__status_from_wire(const msgpack_object *error) {
  const msgpack_object *code = npu__get(error, "code");
  const msgpack_object *message = npu__get(error, "message");
  if (code == NULL || code->type != MSGPACK_OBJECT_STR)
    return npu__error_default(NPU_EPROTO, "the daemon sent an error without a code");
  npu_code c = npu__code_from_name(code->via.str.ptr, code->via.str.size);
  bool retryable = npu__get_bool(error, "retryable", default_retryable(c));
  int len = message != NULL && message->type == MSGPACK_OBJECT_STR ? (int)message->via.str.size : 0;
  npu_status s = c == NPU_EPROTO && !npu__str_is(code, "EPROTO")
                     ? npu__error(c, false, "unknown error code %.*s: %.*s", (int)code->via.str.size,
                                  code->via.str.ptr, len, len ? message->via.str.ptr : "")
                     : npu__error(c, retryable, "%.*s", len, len ? message->via.str.ptr : "");
  if (!s->is_static)
    s->retry_after_ms = (uint32_t)npu__get_u64(error, "retry_after_ms", 0);
  return s;
}

NPU_EXPORT npu_code npu_status_code(npu_status status) { return status ? status->code : NPU_OK; }

NPU_EXPORT const char *npu_status_code_name(npu_status status) { return npu_code_name(npu_status_code(status)); }

NPU_EXPORT const char *npu_status_message(npu_status status) {
  if (status == &out_of_memory)
    return "out of memory in the client";
  return status ? status->message : "";
}

NPU_EXPORT bool npu_status_retryable(npu_status status) { return status ? status->retryable : false; }

NPU_EXPORT uint32_t npu_status_retry_after_ms(npu_status status) { return status ? status->retry_after_ms : 0; }

NPU_EXPORT void npu_status_free(npu_status status) {
  if (status != NULL && !status->is_static)
    free(status);
}

NPU_EXPORT const char *npu_code_name(npu_code code) {
  return (unsigned)code < NPU_CODE_COUNT ? code_names[code] : "EINVAL";
}
