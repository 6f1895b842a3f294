/* classify: load an ONNX classifier into npud, run it once and print the top classes.
 *
 *   classify MODEL.onnx [INPUT.raw] [--top K] [--endpoint ENDPOINT]
 *
 * INPUT.raw holds the first input's elements (little-endian, C order, exactly its size in bytes);
 * without it the input is a fixed test pattern.  The input is written straight into a buffer
 * mapped from the daemon and bound to the model's input: no copies on the way to the device.
 * Build: cc classify.c $(pkg-config --cflags --libs libnpu) -lm   (or `make libnpu` in npud's tree).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <npu.h>

static int fail(const char *what, npu_status status) {
  fprintf(stderr, "classify: %s: %s: %s%s\n", what, npu_status_code_name(status), npu_status_message(status),
          npu_status_retryable(status) ? " (retryable)" : "");
  npu_status_free(status);
  return 1;
}

/* The input: INPUT.raw's bytes, or a pattern (float32 inputs) so a run needs no file. */
static int fill_input(void *dst, const npu_tensor_info *t, const char *path) {
  if (path == NULL) {
    if (t->dtype != NPU_FLOAT32) {
      fprintf(stderr, "classify: input %s is %s: give its bytes in a file\n", t->name, npu_dtype_name(t->dtype));
      return 1;
    }
    float *x = dst;
    for (uint64_t i = 0; i < t->size / sizeof(float); i++)
      x[i] = (float)sin(0.01 * (double)i);
    return 0;
  }
  FILE *f = fopen(path, "rb");
  size_t got = f ? fread(dst, 1, t->size, f) : 0;
  int extra = f ? fgetc(f) : EOF;
  if (f)
    fclose(f);
  if (got != t->size || extra != EOF) {
    fprintf(stderr, "classify: %s must hold exactly %llu bytes (input %s)\n", path, (unsigned long long)t->size,
            t->name);
    return 1;
  }
  return 0;
}

/* Print the k highest scores of a float32 output, best first. */
static void print_top(const float *scores, size_t n, size_t k) {
  printf("top %zu of %zu classes:\n", k < n ? k : n, n);
  unsigned char *taken = calloc(n, 1);
  for (size_t rank = 0; rank < k && rank < n; rank++) {
    size_t best = n;
    for (size_t i = 0; i < n; i++)
      if (!taken[i] && (best == n || scores[i] > scores[best]))
        best = i;
    taken[best] = 1;
    printf("%zu %.6f\n", best, scores[best]);
  }
  free(taken);
}

int main(int argc, char **argv) {
  const char *model_path = NULL, *input_path = NULL, *endpoint = NULL;
  size_t top = 5;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--top") == 0 && i + 1 < argc)
      top = (size_t)strtoul(argv[++i], NULL, 10);
    else if (strcmp(argv[i], "--endpoint") == 0 && i + 1 < argc)
      endpoint = argv[++i];
    else if (model_path == NULL)
      model_path = argv[i];
    else
      input_path = argv[i];
  }
  if (model_path == NULL) {
    fprintf(stderr, "usage: classify MODEL.onnx [INPUT.raw] [--top K] [--endpoint ENDPOINT]\n");
    return 2;
  }
  npu_client *client;
  npu_status status = npu_client_connect(endpoint, &(npu_client_options){.name = "classify"}, &client);
  if (status)
    return fail("connect", status);
  int rc = 1;
  npu_model *model = NULL;
  npu_buffer *in = NULL, *out = NULL;
  void *in_map, *out_map;
  if ((status = npu_model_load_file(client, 0, model_path, &model))) {
    rc = fail("load", status);
    goto done;
  }
  const npu_tensor_info *ti = npu_model_input(model, 0), *to = npu_model_output(model, 0);
  if (ti == NULL || to == NULL || to->dtype != NPU_FLOAT32) {
    fprintf(stderr, "classify: the model needs an input and a float32 output\n");
    goto done;
  }
  if ((status = npu_buffer_alloc(client, 0, ti->size, &in)) || (status = npu_buffer_alloc(client, 0, to->size, &out)) ||
      (status = npu_buffer_map(in, &in_map)) || (status = npu_buffer_map(out, &out_map))) {
    rc = fail("buffers", status);
    goto done;
  }
  if (fill_input(in_map, ti, input_path))
    goto done;
  if ((status = npu_model_run(model, &in, 1, &out, 1, 0))) {
    rc = fail("run", status);
    goto done;
  }
  print_top(out_map, to->size / sizeof(float), top);
  rc = 0;
done:
  npu_status_free(npu_buffer_free(in));
  npu_status_free(npu_buffer_free(out));
  npu_status_free(npu_model_unload(model));
  npu_client_close(client);
  return rc;
}
