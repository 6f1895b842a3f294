/* The wire format: requests packed with msgpack-c, replies looked up in place. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

void npu__pack_str(msgpack_packer *pk, const char *s) {
  size_t n = strlen(s);
  msgpack_pack_str(pk, n);
  msgpack_pack_str_body(pk, s, n);
}

void npu__request_begin(npu_request *request, const char *op, uint32_t nargs) {
  msgpack_sbuffer_init(&request->buffer);
  msgpack_packer_init(&request->pk, &request->buffer, msgpack_sbuffer_write);
  request->op = op;
  /* "seq" goes last, packed once the client assigns it (under its lock) */
  msgpack_pack_map(&request->pk, 3);
  npu__pack_str(&request->pk, "op");
  npu__pack_str(&request->pk, op);
  npu__pack_str(&request->pk, "args");
  msgpack_pack_map(&request->pk, nargs);
}

void npu__request_done(npu_request *request) { msgpack_sbuffer_destroy(&request->buffer); }

void npu__pack_key_u64(msgpack_packer *pk, const char *key, uint64_t value) {
  npu__pack_str(pk, key);
  msgpack_pack_uint64(pk, value);
}

void npu__pack_key_bin(msgpack_packer *pk, const char *key, const void *data, size_t size) {
  npu__pack_str(pk, key);
  msgpack_pack_bin(pk, size);
  msgpack_pack_bin_body(pk, data, size);
}

void npu__pack_key_str(msgpack_packer *pk, const char *key, const char *value) {
  npu__pack_str(pk, key);
  npu__pack_str(pk, value);
}

void npu__reply_free(npu_reply *reply) {
  if (!reply->live)
    return;
  msgpack_unpacked_destroy(&reply->unpacked);
  zmq_msg_close(&reply->frame);
  reply->live = false;
}

bool npu__str_is(const msgpack_object *obj, const char *s) {
  size_t n = strlen(s);
  return obj != NULL && obj->type == MSGPACK_OBJECT_STR && obj->via.str.size == n &&
         memcmp(obj->via.str.ptr, s, n) == 0;
}

const msgpack_object *npu__get(const msgpack_object *map, const char *key) {
  if (map == NULL || map->type != MSGPACK_OBJECT_MAP)
    return NULL;
  for (uint32_t i = 0; i < map->via.map.size; i++)
    if (npu__str_is(&map->via.map.ptr[i].key, key))
      return &map->via.map.ptr[i].val;
  return NULL;
}

uint64_t npu__get_u64(const msgpack_object *map, const char *key, uint64_t fallback) {
  const msgpack_object *v = npu__get(map, key);
  return v != NULL && v->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? v->via.u64 : fallback;
}

bool npu__get_bool(const msgpack_object *map, const char *key, bool fallback) {
  const msgpack_object *v = npu__get(map, key);
  return v != NULL && v->type == MSGPACK_OBJECT_BOOLEAN ? v->via.boolean : fallback;
}

double npu__get_f64(const msgpack_object *map, const char *key, double fallback) {
  const msgpack_object *v = npu__get(map, key);
  if (v == NULL)
    return fallback;
  if (v->type == MSGPACK_OBJECT_FLOAT64 || v->type == MSGPACK_OBJECT_FLOAT32)
    return v->via.f64;
  return v->type == MSGPACK_OBJECT_POSITIVE_INTEGER ? (double)v->via.u64 : fallback;
}

void npu__get_str(const msgpack_object *map, const char *key, char *out, size_t capacity) {
  const msgpack_object *v = npu__get(map, key);
  size_t n = v != NULL && v->type == MSGPACK_OBJECT_STR ? v->via.str.size : 0;
  if (n >= capacity)
    n = capacity - 1;
  if (n)
    memcpy(out, v->via.str.ptr, n);
  out[n] = '\0';
}

char *npu__strndup_obj(const msgpack_object *str) {
  size_t n = str != NULL && str->type == MSGPACK_OBJECT_STR ? str->via.str.size : 0;
  char *s = malloc(n + 1);
  if (s != NULL) {
    if (n)
      memcpy(s, str->via.str.ptr, n);
    s[n] = '\0';
  }
  return s;
}
