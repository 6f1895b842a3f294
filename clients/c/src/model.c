/* Models: load (inline, or through a staging buffer), their tensors, runs. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct npu_model {
  npu_client *client;
  uint32_t id;
  bool cached;
  size_t input_count, output_count;
  npu_tensor_info *tensors;    /* inputs, then outputs */
};

static const char *const dtype_names[] = {"float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"};
static const size_t dtype_sizes[] = {4, 2, 1, 1, 2, 4, 8, 1};

NPU_EXPORT const char *npu_dtype_name(npu_dtype dtype) {
  return (unsigned)dtype <= NPU_BOOL ? dtype_names[dtype] : "?";
}

NPU_EXPORT size_t npu_dtype_size(npu_dtype dtype) { return (unsigned)dtype <= NPU_BOOL ? dtype_sizes[dtype] : 0; }

static void free_tensors(npu_model *model) {
  for (size_t i = 0; model->tensors != NULL && i < model->input_count + model->output_count; i++)
    free((char *)model->tensors[i].name);
  free(model->tensors);
}

/* tensor_info's `symbolic` (a name per dimension, "" for a fixed one) and `defaulted` (indices)
 * as bit masks; both are absent for a tensor whose dimensions are all fixed. */
static bool take_dim_bits(const msgpack_object *symbolic, const msgpack_object *defaulted, npu_tensor_info *t) {
  t->symbolic = t->defaulted = 0;
  if (symbolic != NULL) {
    if (symbolic->type != MSGPACK_OBJECT_ARRAY || symbolic->via.array.size != t->rank)
      return false;
    for (uint32_t i = 0; i < t->rank; i++)
      if (symbolic->via.array.ptr[i].type == MSGPACK_OBJECT_STR && symbolic->via.array.ptr[i].via.str.size > 0)
        t->symbolic |= 1u << i;
  }
  if (defaulted != NULL) {
    if (defaulted->type != MSGPACK_OBJECT_ARRAY)
      return false;
    for (uint32_t i = 0; i < defaulted->via.array.size; i++) {
      const msgpack_object *d = &defaulted->via.array.ptr[i];
      if (d->type != MSGPACK_OBJECT_POSITIVE_INTEGER || d->via.u64 >= t->rank)
        return false;
      t->defaulted |= 1u << d->via.u64;
    }
  }
  return true;
}

/* One tensor_info map into `t`; false if it is malformed. */
static bool take_tensor(const msgpack_object *m, npu_tensor_info *t) {
  const msgpack_object *dtype = npu__get(m, "dtype"), *shape = npu__get(m, "shape");
  t->name = npu__strndup_obj(npu__get(m, "name"));
  t->dtype = NPU_FLOAT32;
  for (int d = 0; d <= NPU_BOOL; d++)
    if (npu__str_is(dtype, dtype_names[d]))
      t->dtype = (npu_dtype)d;
  if (t->name == NULL || shape == NULL || shape->type != MSGPACK_OBJECT_ARRAY || shape->via.array.size > NPU_MAX_RANK)
    return false;
  t->rank = shape->via.array.size;
  for (uint32_t i = 0; i < t->rank; i++)
    t->shape[i] = (int64_t)shape->via.array.ptr[i].via.u64;
  t->size = npu__get_u64(m, "size", 0);
  return take_dim_bits(npu__get(m, "symbolic"), npu__get(m, "defaulted"), t);
}

static npu_status take_load_result(npu_model *model, const msgpack_object *r) {
  const msgpack_object *ins = npu__get(r, "inputs"), *outs = npu__get(r, "outputs");
  if (ins == NULL || outs == NULL || ins->type != MSGPACK_OBJECT_ARRAY || outs->type != MSGPACK_OBJECT_ARRAY)
    return npu__error_default(NPU_EPROTO, "load: the reply lacks inputs or outputs");
  model->id = (uint32_t)npu__get_u64(r, "model", 0);
  model->cached = npu__get_bool(r, "cached", false);
  size_t n = (size_t)ins->via.array.size + outs->via.array.size;
  model->tensors = calloc(n ? n : 1, sizeof *model->tensors);
  if (model->tensors == NULL)
    return npu__error_default(NPU_ENOMEM, "out of memory");
  model->input_count = ins->via.array.size;
  model->output_count = outs->via.array.size;
  for (size_t i = 0; i < n; i++) {
    const msgpack_object *m = i < model->input_count ? &ins->via.array.ptr[i]
                                                     : &outs->via.array.ptr[i - model->input_count];
    if (!take_tensor(m, &model->tensors[i]))
      return npu__error_default(NPU_EPROTO, "load: a malformed tensor_info in the reply");
  }
  return NULL;
}

/* EINVAL unless every shape names an input and has 1..NPU_MAX_RANK sizes, each >= 1. */
static npu_status check_shapes(const npu_input_shape *shapes, size_t count) {
  if (count > 0 && shapes == NULL)
    return npu__error_default(NPU_EINVAL, "npu_model_load_shaped: shapes is NULL but count is %zu", count);
  for (size_t i = 0; i < count; i++) {
    const npu_input_shape *s = &shapes[i];
    if (s->name == NULL || s->rank == 0 || s->rank > NPU_MAX_RANK || s->dims == NULL)
      return npu__error_default(NPU_EINVAL, "npu_model_load_shaped: shape %zu needs a name and 1..%d dims", i,
                                NPU_MAX_RANK);
    for (uint32_t d = 0; d < s->rank; d++)
      if (s->dims[d] < 1 || s->dims[d] > INT32_MAX)
        return npu__error_default(NPU_EINVAL, "npu_model_load_shaped: input %s dimension %u is %lld (1..%d)",
                                  s->name, d, (long long)s->dims[d], INT32_MAX);
  }
  return NULL;
}

/* The load's `options`: {"input_shapes": {name: [dims]}}. */
static void pack_shapes(msgpack_packer *pk, const npu_input_shape *shapes, size_t count) {
  npu__pack_str(pk, "options");
  msgpack_pack_map(pk, 1);
  npu__pack_str(pk, "input_shapes");
  msgpack_pack_map(pk, count);
  for (size_t i = 0; i < count; i++) {
    npu__pack_str(pk, shapes[i].name);
    msgpack_pack_array(pk, shapes[i].rank);
    for (uint32_t d = 0; d < shapes[i].rank; d++)
      msgpack_pack_int64(pk, shapes[i].dims[d]);
  }
}

/* Send the model's bytes inline, or through a staging buffer when they exceed the inline limit. */
static npu_status send_load(npu_client *client, uint32_t device, const void *onnx, size_t size,
                            const npu_input_shape *shapes, size_t count, npu_reply *reply) {
  uint32_t options = count > 0 ? 1 : 0;
  npu_request request;
  npu_buffer *staging = NULL;
  if (size > client->max_inline_bytes) {
    npu_status status = npu_buffer_alloc(client, device, size, &staging);
    void *p;
    if (status == NULL && npu_client_attached(client) && (status = npu_buffer_map(staging, &p)) == NULL)
      memcpy(p, onnx, size);
    else if (status == NULL)
      status = npu_buffer_write(staging, 0, onnx, size);
    if (status != NULL) {
      npu_status_free(npu_buffer_free(staging));
      return status;
    }
    npu__request_begin(&request, "load", 3 + options);
    npu__pack_key_u64(&request.pk, "model_buffer", staging->handle);
    npu__pack_key_u64(&request.pk, "model_size", size);
  } else {
    npu__request_begin(&request, "load", 2 + options);
    npu__pack_key_bin(&request.pk, "model", onnx, size);
  }
  npu__pack_key_u64(&request.pk, "device", device);
  if (options)
    pack_shapes(&request.pk, shapes, count);
  npu_status status = npu__call(client, &request, 0, reply, NULL);
  npu_status_free(npu_buffer_free(staging));
  return status;
}

NPU_EXPORT npu_status npu_model_load(npu_client *client, uint32_t device, const void *onnx, size_t size,
                                     npu_model **out) {
  return npu_model_load_shaped(client, device, onnx, size, NULL, 0, out);
}

NPU_EXPORT npu_status npu_model_load_shaped(npu_client *client, uint32_t device, const void *onnx, size_t size,
                                            const npu_input_shape *shapes, size_t count, npu_model **out) {
  if (client == NULL || onnx == NULL || out == NULL)
    return npu__error_default(NPU_EINVAL, "npu_model_load: client, onnx and out must not be NULL");
  npu_status invalid = check_shapes(shapes, count);
  if (invalid != NULL)
    return invalid;
  npu_model *model = calloc(1, sizeof *model);
  if (model == NULL)
    return npu__error_default(NPU_ENOMEM, "out of memory");
  npu_reply reply;
  npu_status status = send_load(client, device, onnx, size, shapes, count, &reply);
  if (status == NULL) {
    status = take_load_result(model, &reply.result);
    npu__reply_free(&reply);
  }
  model->client = client;
  npu__client_retain(client);
  if (status != NULL && model->id != 0) {
    npu_status_free(npu_model_unload(model));   /* loaded, but its reply was unusable */
    return status;
  }
  if (status != NULL) {
    free_tensors(model);
    npu__client_release(client);
    free(model);
    return status;
  }
  *out = model;
  return NULL;
}

NPU_EXPORT npu_status npu_model_load_file(npu_client *client, uint32_t device, const char *path, npu_model **out) {
  if (path == NULL)
    return npu__error_default(NPU_EINVAL, "npu_model_load_file: path is NULL");
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return npu__error_default(errno == ENOENT ? NPU_ENOENT : errno == EACCES ? NPU_EPERM : NPU_EIO,
                              "cannot open the model %s: %s", path, strerror(errno));
  char *data = NULL;
  long size = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
  if (size >= 0 && fseek(f, 0, SEEK_SET) == 0 && (data = malloc(size ? (size_t)size : 1)) != NULL &&
      fread(data, 1, (size_t)size, f) != (size_t)size) {
    free(data);
    data = NULL;
  }
  fclose(f);
  if (data == NULL)
    return npu__error_default(NPU_EIO, "cannot read the model %s", path);
  npu_status status = npu_model_load(client, device, data, (size_t)size, out);
  free(data);
  return status;
}

NPU_EXPORT npu_status npu_model_unload(npu_model *model) {
  if (model == NULL)
    return NULL;
  npu_status status = npu__call_one(model->client, "unload", "model", model->id);
  free_tensors(model);
  npu__client_release(model->client);
  free(model);
  return status;
}

NPU_EXPORT size_t npu_model_input_count(const npu_model *model) { return model->input_count; }
NPU_EXPORT size_t npu_model_output_count(const npu_model *model) { return model->output_count; }
NPU_EXPORT bool npu_model_cached(const npu_model *model) { return model->cached; }

NPU_EXPORT const npu_tensor_info *npu_model_input(const npu_model *model, size_t index) {
  return index < model->input_count ? &model->tensors[index] : NULL;
}

NPU_EXPORT const npu_tensor_info *npu_model_output(const npu_model *model, size_t index) {
  return index < model->output_count ? &model->tensors[model->input_count + index] : NULL;
}

NPU_EXPORT npu_status npu_model_submit(npu_model *model, npu_buffer *const *inputs, size_t input_count,
                                       npu_buffer *const *outputs, size_t output_count,
                                       const npu_job_options *options, npu_job **out) {
  return npu__run_model(model->client, model->id, inputs, input_count, outputs, output_count, options, -1, out);
}

/* One round trip (run_model with wait_ms) when the daemon speaks protocol 1.8, else run_model then wait. */
NPU_EXPORT npu_status npu_model_run(npu_model *model, npu_buffer *const *inputs, size_t input_count,
                                    npu_buffer *const *outputs, size_t output_count, uint32_t timeout_ms) {
  uint32_t wait_ms = timeout_ms ? timeout_ms : model->client->timeout_ms;
  bool one_trip = model->client->protocol_minor >= 8;
  npu_job *job;
  npu_status status = npu__run_model(model->client, model->id, inputs, input_count, outputs, output_count, NULL,
                                     one_trip ? (int64_t)wait_ms : -1, &job);
  if (status != NULL)
    return status;
  npu_job_state state = npu_job_state_now(job);
  if (one_trip && state != NPU_JOB_DONE && state != NPU_JOB_FAILED)   /* as wait's timeout: it runs on */
    status = npu__error_default(NPU_ETIMEDOUT, "job %llu did not finish within %u ms",
                                (unsigned long long)npu_job_id(job), wait_ms);
  else
    status = npu_job_wait(job, wait_ms);
  npu_job_release(job);
  return status;
}
