/* Host-memory buffer and saved-payload handling shared by the CPU backends. */
#include <stdlib.h>

#include "cpu/cpu_common.h"

static inline double load(const void *p, fbn_dtype dtype, int64_t i) {
  return dtype == FBN_DTYPE_FLOAT64 ? ((const double *)p)[i] : (double)((const float *)p)[i];
}

static inline void store(void *p, fbn_dtype dtype, int64_t i, double v) {
  if (dtype == FBN_DTYPE_FLOAT64)
    ((double *)p)[i] = v;
  else
    ((float *)p)[i] = (float)v;
}

void fbn_cpu_buffers_free(fbn_module *m) {
  for (int i = 0; i < FBN_NUM_BUFFERS; i++) {
    free(m->buffers[i]);
    m->buffers[i] = NULL;
  }
}

fbn_status fbn_cpu_buffers_alloc(fbn_module *m) {
  const fbn_module_options *o = &m->options;
  const size_t bytes = (size_t)o->num_features * fbn_dtype_size(o->param_dtype);
  for (int i = 0; i < FBN_NUM_BUFFERS; i++) {
    if (!fbn_options_have_buffer(o, (fbn_buffer)i))
      continue;
    m->buffers[i] = malloc(bytes);
    if (m->buffers[i] == NULL) {
      fbn_cpu_buffers_free(m);
      return fbn_error(FBN_STATUS_OUT_OF_MEMORY,
                       "fbn_module_create: out of host memory for %zu-byte %s", bytes,
                       fbn_buffer_name((fbn_buffer)i));
    }
  }
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cpu_buffer_read(const fbn_module *m, fbn_buffer which, fbn_dtype dtype,
                               void *dst) {
  for (int64_t c = 0; c < m->options.num_features; c++)
    store(dst, dtype, c, load(m->buffers[which], m->options.param_dtype, c));
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cpu_buffer_write(fbn_module *m, fbn_buffer which, fbn_dtype dtype,
                                const void *src) {
  for (int64_t c = 0; c < m->options.num_features; c++)
    store(m->buffers[which], m->options.param_dtype, c, load(src, dtype, c));
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cpu_buffer_fill(fbn_module *m, fbn_buffer which, double value) {
  for (int64_t c = 0; c < m->options.num_features; c++)
    store(m->buffers[which], m->options.param_dtype, c, value);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cpu_check_desc(const fbn_module *m, const fbn_tensor_desc *d, bool has_addend,
                              bool batch_stats) {
  if (d->dtype != FBN_DTYPE_FLOAT32 && d->dtype != FBN_DTYPE_FLOAT64)
    return fbn_error(FBN_STATUS_UNSUPPORTED,
                     "dtype = %s: the CPU backend supports float32 and float64 tensors",
                     fbn_dtype_name(d->dtype));
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cpu_workspace_size(const fbn_module *m, const fbn_tensor_desc *d,
                                  bool has_addend, bool batch_stats, bool backward,
                                  size_t *bytes) {
  *bytes = 0;
  return FBN_STATUS_SUCCESS;
}

void fbn_cpu_saved_free(fbn_saved *s) {
  free(s->payload);
  s->payload = NULL;
  s->payload_bytes = 0;
  s->payload_backend = NULL;
}

fbn_status fbn_cpu_saved_reserve(fbn_saved *s, size_t need, const fbn_backend *owner) {
  if (s->payload != NULL && s->payload_backend == owner && s->payload_bytes >= need)
    return FBN_STATUS_SUCCESS;
  void *p = malloc(need);
  if (p == NULL)
    return fbn_error(FBN_STATUS_OUT_OF_MEMORY,
                     "fbn_module_forward: out of host memory for %zu bytes of saved state", need);
  if (s->payload_backend != NULL)
    s->payload_backend->saved_free(s);
  s->payload = p;
  s->payload_bytes = need;
  s->payload_backend = owner;
  return FBN_STATUS_SUCCESS;
}
