/*
 * The module API (fbn_module_*): a wrapper over the op API that owns what
 * torch.nn.BatchNorm2d owns (weight, bias, running statistics,
 * num_batches_tracked, gradients), the mode, a workspace cache and one op
 * per configuration it has run. Its forward and backward are the op API's
 * (fbn_op_forward_impl, fbn_op_backward_impl): one computation path.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/half.h"
#include "internal.h"

static _Atomic uint64_t fbn_next_module_id = 1;

/* ---- small helpers ------------------------------------------------------ */

const char *fbn_buffer_name(fbn_buffer which) {
  switch (which) {
  case FBN_BUFFER_WEIGHT: return "weight";
  case FBN_BUFFER_BIAS: return "bias";
  case FBN_BUFFER_RUNNING_MEAN: return "running_mean";
  case FBN_BUFFER_RUNNING_VAR: return "running_var";
  case FBN_BUFFER_WEIGHT_GRAD: return "weight_grad";
  case FBN_BUFFER_BIAS_GRAD: return "bias_grad";
  }
  return "unknown buffer";
}

static bool fbn_buffer_valid(fbn_buffer which) {
  return (unsigned)which < FBN_NUM_BUFFERS;
}

bool fbn_options_have_buffer(const fbn_module_options *o, fbn_buffer which) {
  switch (which) {
  case FBN_BUFFER_WEIGHT:
  case FBN_BUFFER_BIAS:
  case FBN_BUFFER_WEIGHT_GRAD:
  case FBN_BUFFER_BIAS_GRAD: return o->affine;
  case FBN_BUFFER_RUNNING_MEAN:
  case FBN_BUFFER_RUNNING_VAR: return o->track_running_stats;
  }
  return false;
}

/* ---- options ------------------------------------------------------------ */

void fbn_module_options_init(fbn_module_options *options) {
  if (options == NULL)
    return;
  memset(options, 0, sizeof *options);
  options->num_features = 0;
  options->eps = 1e-5;
  options->momentum = 0.1;
  options->cumulative_average = false;
  options->affine = true;
  options->track_running_stats = true;
  options->param_dtype = FBN_DTYPE_FLOAT32;
  options->device = FBN_DEVICE_CPU;
  options->device_index = 0;
  options->bn_mode = FBN_BN_MODE_AUTO;
  options->operation = FBN_OPERATION_BN_ADD_RELU;
}

fbn_status fbn_validate_options(const char *fn, const fbn_module_options *o) {
  if (o->num_features <= 0)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: num_features = %lld: the number of channels must be > 0", fn,
                     (long long)o->num_features);
  if (o->num_features > INT32_MAX)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: num_features = %lld: the number of channels must be <= %d", fn,
                     (long long)o->num_features, INT32_MAX);
  if (!(o->eps >= 0.0) || isinf(o->eps))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: eps = %g: eps must be a finite number >= 0", fn, o->eps);
  if (!o->cumulative_average && !(o->momentum >= 0.0 && o->momentum <= 1.0))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: momentum = %g: momentum must be in [0, 1] (use cumulative_average "
                     "for momentum=None)",
                     fn, o->momentum);
  if (o->param_dtype != FBN_DTYPE_FLOAT32 && o->param_dtype != FBN_DTYPE_FLOAT64)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: param_dtype = %d (%s): parameters must be float32 or float64", fn,
                     (int)o->param_dtype, fbn_dtype_name(o->param_dtype));
  if (o->device != FBN_DEVICE_CPU && o->device != FBN_DEVICE_CUDA)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: device = %d: device must be FBN_DEVICE_CPU or FBN_DEVICE_CUDA", fn,
                     (int)o->device);
  if (o->device_index < 0)
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: device_index = %d: must be >= 0", fn,
                     o->device_index);
  if (o->bn_mode != FBN_BN_MODE_AUTO && o->bn_mode != FBN_BN_MODE_SPATIAL)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: bn_mode = %d: must be FBN_BN_MODE_AUTO or FBN_BN_MODE_SPATIAL", fn,
                     (int)o->bn_mode);
  if (!fbn_operation_valid(o->operation))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: operation = %d: must be FBN_OPERATION_BN, FBN_OPERATION_BN_RELU or "
                     "FBN_OPERATION_BN_ADD_RELU",
                     fn, (int)o->operation);
  return FBN_STATUS_SUCCESS;
}

/* ---- module lifecycle --------------------------------------------------- */

static size_t fbn_buffer_bytes(const fbn_module *m) {
  return (size_t)m->options.num_features * fbn_dtype_size(m->options.param_dtype);
}

static fbn_status fbn_buffer_fill(fbn_module *m, fbn_buffer which, double value) {
  return m->backend->mem_fill(m->options.device_index, m->buffers[which], m->options.param_dtype,
                              (size_t)m->options.num_features, value);
}

static fbn_status fbn_fill_initial(fbn_module *m, bool parameters, bool running) {
  static const struct {
    fbn_buffer which;
    double value;
    bool parameter;
  } init[] = {
      {FBN_BUFFER_WEIGHT, 1.0, true},
      {FBN_BUFFER_BIAS, 0.0, true},
      {FBN_BUFFER_RUNNING_MEAN, 0.0, false},
      {FBN_BUFFER_RUNNING_VAR, 1.0, false},
  };
  for (size_t i = 0; i < sizeof init / sizeof init[0]; i++) {
    if (m->buffers[init[i].which] == NULL)
      continue;
    if (init[i].parameter ? !parameters : !running)
      continue;
    fbn_status st = fbn_buffer_fill(m, init[i].which, init[i].value);
    if (st != FBN_STATUS_SUCCESS)
      return st;
  }
  return FBN_STATUS_SUCCESS;
}

/* Free everything the module owns and the module itself. */
static void fbn_module_free(fbn_module *m) {
  for (int i = 0; i < FBN_MODULE_OP_SLOTS; i++)
    fbn_op_destroy(m->ops[i]);
  for (int i = 0; i < FBN_NUM_BUFFERS; i++)
    m->backend->mem_free(m->options.device_index, m->buffers[i]);
  m->backend->mem_free(m->options.device_index, m->workspace);
  free(m);
}

fbn_status fbn_module_create(const fbn_module_options *options, fbn_module **out) {
  static const char fn[] = "fbn_module_create";
  fbn_clear_error();
  if (out == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: out is NULL", fn);
  *out = NULL;
  if (options == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: options is NULL", fn);
  fbn_status st = fbn_validate_options(fn, options);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const fbn_backend *backend;
  st = fbn_select_backend(fn, options->device, &backend);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  fbn_module *m = calloc(1, sizeof *m);
  if (m == NULL)
    return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: out of host memory", fn);
  m->options = *options;
  m->training = true;
  m->num_batches_tracked = 0;
  m->backend = backend;
  m->id = atomic_fetch_add(&fbn_next_module_id, 1);

  /* The workspace cache starts with one small block: every module, with
   * buffers or without (affine = false, track_running_stats = false), then
   * has memory on its device, and a CUDA module without a usable device
   * fails here (FBN_STATUS_NO_DEVICE) as fbn_module_create documents. */
  st = backend->mem_alloc(options->device_index, FBN_WORKSPACE_ALIGNMENT, &m->workspace);
  if (st == FBN_STATUS_SUCCESS)
    m->workspace_bytes = FBN_WORKSPACE_ALIGNMENT;
  else
    fbn_error_prefix(st, fn);
  for (int i = 0; i < FBN_NUM_BUFFERS && st == FBN_STATUS_SUCCESS; i++) {
    if (!fbn_options_have_buffer(options, (fbn_buffer)i))
      continue;
    st = backend->mem_alloc(options->device_index, fbn_buffer_bytes(m), &m->buffers[i]);
    if (st != FBN_STATUS_SUCCESS) {
      fbn_error_prefix(st, fn);
      fbn_error_append(" (%s)", fbn_buffer_name((fbn_buffer)i));
    }
  }
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_fill_initial(m, true, true);
  if (st == FBN_STATUS_SUCCESS && options->affine) {
    st = fbn_buffer_fill(m, FBN_BUFFER_WEIGHT_GRAD, 0.0);
    if (st == FBN_STATUS_SUCCESS)
      st = fbn_buffer_fill(m, FBN_BUFFER_BIAS_GRAD, 0.0);
  }
  if (st != FBN_STATUS_SUCCESS) {
    fbn_module_free(m);
    return st;
  }
  *out = m;
  return FBN_STATUS_SUCCESS;
}

void fbn_module_destroy(fbn_module *module) {
  if (module == NULL)
    return;
  fbn_module_free(module);
}

fbn_status fbn_module_get_options(const fbn_module *module, fbn_module_options *out) {
  fbn_clear_error();
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "fbn_module_get_options: module is NULL");
  if (out == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "fbn_module_get_options: out is NULL");
  *out = module->options;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_module_set_training(fbn_module *module, bool training) {
  fbn_clear_error();
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "fbn_module_set_training: module is NULL");
  module->training = training;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_module_is_training(const fbn_module *module, bool *training) {
  fbn_clear_error();
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "fbn_module_is_training: module is NULL");
  if (training == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "fbn_module_is_training: training is NULL");
  *training = module->training;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_module_reset_running_stats(fbn_module *module) {
  fbn_clear_error();
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "fbn_module_reset_running_stats: module is NULL");
  fbn_status st = fbn_fill_initial(module, false, true);
  if (st == FBN_STATUS_SUCCESS)
    module->num_batches_tracked = 0;
  return st;
}

fbn_status fbn_module_reset_parameters(fbn_module *module) {
  fbn_clear_error();
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "fbn_module_reset_parameters: module is NULL");
  fbn_status st = fbn_fill_initial(module, true, true);
  if (st == FBN_STATUS_SUCCESS)
    module->num_batches_tracked = 0;
  return st;
}

/* ---- buffers ------------------------------------------------------------ */

bool fbn_module_has_buffer(const fbn_module *module, fbn_buffer which) {
  if (module == NULL || !fbn_buffer_valid(which))
    return false;
  return module->buffers[which] != NULL;
}

/* Common checks of read/write/data: NULL, enum, presence. */
static fbn_status fbn_check_buffer(const char *fn, const fbn_module *module, fbn_buffer which,
                                   const void *ptr, const char *ptr_name) {
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: module is NULL", fn);
  if (ptr == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: %s is NULL", fn, ptr_name);
  if (!fbn_buffer_valid(which))
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: buffer = %d: not an fbn_buffer value", fn,
                     (int)which);
  if (module->buffers[which] == NULL)
    return fbn_error(FBN_STATUS_ABSENT, "%s: the module has no %s (%s)", fn,
                     fbn_buffer_name(which),
                     which == FBN_BUFFER_RUNNING_MEAN || which == FBN_BUFFER_RUNNING_VAR
                         ? "track_running_stats = false"
                         : "affine = false");
  return FBN_STATUS_SUCCESS;
}

static fbn_status fbn_check_host_copy(const char *fn, const fbn_module *module, fbn_dtype dtype,
                                      size_t count) {
  if (fbn_dtype_size(dtype) == 0)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: dtype = %d: not an fbn_dtype value (host copies are float32, float64, "
                     "float16 or bfloat16)",
                     fn, (int)dtype);
  if (count != (size_t)module->options.num_features)
    return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                     "%s: count = %zu: must equal num_features = %lld", fn, count,
                     (long long)module->options.num_features);
  return FBN_STATUS_SUCCESS;
}

static double fbn_host_load(const void *p, fbn_dtype dt, size_t i) {
  switch (dt) {
  case FBN_DTYPE_FLOAT64:
    return ((const double *)p)[i];
  case FBN_DTYPE_FLOAT16:
    return fbn_half_to_double(((const uint16_t *)p)[i]);
  case FBN_DTYPE_BFLOAT16:
    return fbn_bfloat16_to_double(((const uint16_t *)p)[i]);
  case FBN_DTYPE_FLOAT32:
  default:
    return ((const float *)p)[i];
  }
}

static void fbn_host_store(void *p, fbn_dtype dt, size_t i, double v) {
  switch (dt) {
  case FBN_DTYPE_FLOAT64:
    ((double *)p)[i] = v;
    return;
  case FBN_DTYPE_FLOAT16:
    ((uint16_t *)p)[i] = fbn_double_to_half(v);
    return;
  case FBN_DTYPE_BFLOAT16:
    ((uint16_t *)p)[i] = fbn_double_to_bfloat16(v);
    return;
  case FBN_DTYPE_FLOAT32:
  default:
    ((float *)p)[i] = (float)v;
    return;
  }
}

/* dst[0..count) (dtype dt) = src[0..count) (dtype sdt), both host memory:
 * widened exactly, rounded once to nearest even (the core rule,
 * src/core/half.h, for float16/bfloat16). */
static void fbn_convert(void *dst, fbn_dtype dt, const void *src, fbn_dtype sdt, size_t count) {
  for (size_t i = 0; i < count; i++)
    fbn_host_store(dst, dt, i, fbn_host_load(src, sdt, i));
}

fbn_status fbn_module_read_buffer(const fbn_module *module, fbn_buffer which, fbn_dtype dtype,
                                  void *dst, size_t count) {
  static const char fn[] = "fbn_module_read_buffer";
  fbn_clear_error();
  fbn_status st = fbn_check_buffer(fn, module, which, dst, "dst");
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_check_host_copy(fn, module, dtype, count);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const fbn_dtype pt = module->options.param_dtype;
  if (pt == dtype)
    st = module->backend->mem_copy(module->options.device_index, dst, module->buffers[which],
                                   fbn_buffer_bytes(module), FBN_BK_COPY_TO_HOST);
  else {
    void *host = malloc(fbn_buffer_bytes(module));
    if (host == NULL)
      return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: out of host memory", fn);
    st = module->backend->mem_copy(module->options.device_index, host, module->buffers[which],
                                   fbn_buffer_bytes(module), FBN_BK_COPY_TO_HOST);
    if (st == FBN_STATUS_SUCCESS)
      fbn_convert(dst, dtype, host, pt, count);
    free(host);
  }
  return st == FBN_STATUS_SUCCESS ? st : fbn_error_prefix(st, fn);
}

fbn_status fbn_module_write_buffer(fbn_module *module, fbn_buffer which, fbn_dtype dtype,
                                   const void *src, size_t count) {
  static const char fn[] = "fbn_module_write_buffer";
  fbn_clear_error();
  fbn_status st = fbn_check_buffer(fn, module, which, src, "src");
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_check_host_copy(fn, module, dtype, count);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const fbn_dtype pt = module->options.param_dtype;
  if (pt == dtype)
    st = module->backend->mem_copy(module->options.device_index, module->buffers[which], src,
                                   fbn_buffer_bytes(module), FBN_BK_COPY_FROM_HOST);
  else {
    void *host = malloc(fbn_buffer_bytes(module));
    if (host == NULL)
      return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: out of host memory", fn);
    fbn_convert(host, pt, src, dtype, count);
    st = module->backend->mem_copy(module->options.device_index, module->buffers[which], host,
                                   fbn_buffer_bytes(module), FBN_BK_COPY_FROM_HOST);
    free(host);
  }
  return st == FBN_STATUS_SUCCESS ? st : fbn_error_prefix(st, fn);
}

fbn_status fbn_module_buffer_data(fbn_module *module, fbn_buffer which, void **data) {
  fbn_clear_error();
  fbn_status st = fbn_check_buffer("fbn_module_buffer_data", module, which, data, "data");
  if (st != FBN_STATUS_SUCCESS)
    return st;
  *data = module->buffers[which];
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_module_get_num_batches_tracked(const fbn_module *module, int64_t *value) {
  static const char fn[] = "fbn_module_get_num_batches_tracked";
  fbn_clear_error();
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: module is NULL", fn);
  if (value == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: value is NULL", fn);
  if (!module->options.track_running_stats)
    return fbn_error(FBN_STATUS_ABSENT,
                     "%s: the module has no num_batches_tracked (track_running_stats = false)",
                     fn);
  *value = module->num_batches_tracked;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_module_set_num_batches_tracked(fbn_module *module, int64_t value) {
  static const char fn[] = "fbn_module_set_num_batches_tracked";
  fbn_clear_error();
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: module is NULL", fn);
  if (!module->options.track_running_stats)
    return fbn_error(FBN_STATUS_ABSENT,
                     "%s: the module has no num_batches_tracked (track_running_stats = false)",
                     fn);
  if (value < 0)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: value = %lld: num_batches_tracked must be >= 0", fn, (long long)value);
  module->num_batches_tracked = value;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_module_zero_grad(fbn_module *module) {
  fbn_clear_error();
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "fbn_module_zero_grad: module is NULL");
  if (!module->options.affine)
    return FBN_STATUS_SUCCESS;
  fbn_status st = fbn_buffer_fill(module, FBN_BUFFER_WEIGHT_GRAD, 0.0);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_buffer_fill(module, FBN_BUFFER_BIAS_GRAD, 0.0);
  return st == FBN_STATUS_SUCCESS ? st : fbn_error_prefix(st, "fbn_module_zero_grad");
}
