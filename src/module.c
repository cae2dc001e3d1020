/*
 * API layer: options, module state, validation and the forward/backward
 * protocol. Backends (cpu/, cuda/) only compute; every rule of
 * docs/semantics.md that does not depend on the device lives here.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fbn_config.h"
#include "internal.h"

static _Atomic uint64_t fbn_next_module_id = 1;

int fbn_version(void) {
  return FBN_VERSION_MAJOR * 10000 + FBN_VERSION_MINOR * 100 + FBN_VERSION_PATCH;
}

/* ---- small helpers ------------------------------------------------------ */

size_t fbn_dtype_size(fbn_dtype dtype) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT32: return 4;
  case FBN_DTYPE_FLOAT64: return 8;
  case FBN_DTYPE_FLOAT16: return 2;
  case FBN_DTYPE_BFLOAT16: return 2;
  }
  return 0;
}

const char *fbn_dtype_name(fbn_dtype dtype) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT32: return "float32";
  case FBN_DTYPE_FLOAT64: return "float64";
  case FBN_DTYPE_FLOAT16: return "float16";
  case FBN_DTYPE_BFLOAT16: return "bfloat16";
  }
  return "unknown dtype";
}

const char *fbn_layout_name(fbn_layout layout) {
  switch (layout) {
  case FBN_LAYOUT_NCHW: return "NCHW";
  case FBN_LAYOUT_NHWC: return "NHWC";
  }
  return "unknown layout";
}

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

fbn_tensor_desc fbn_tensor_desc_make(int64_t n, int64_t c, int64_t h, int64_t w, fbn_dtype dtype,
                                     fbn_layout layout) {
  fbn_tensor_desc d = {n, c, h, w, dtype, layout};
  return d;
}

int64_t fbn_desc_numel(const fbn_tensor_desc *desc) {
  return desc->n * desc->c * desc->h * desc->w;
}

bool fbn_desc_equal(const fbn_tensor_desc *a, const fbn_tensor_desc *b) {
  return a->n == b->n && a->c == b->c && a->h == b->h && a->w == b->w && a->dtype == b->dtype &&
         a->layout == b->layout;
}

/* Whether [a, a+abytes) and [b, b+bbytes) overlap. NULL never overlaps. */
static bool fbn_overlap(const void *a, size_t abytes, const void *b, size_t bbytes) {
  if (a == NULL || b == NULL)
    return false;
  uintptr_t pa = (uintptr_t)a, pb = (uintptr_t)b;
  return pa < pb + bbytes && pb < pa + abytes;
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
  return FBN_STATUS_SUCCESS;
}

/* ---- module lifecycle --------------------------------------------------- */

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
    fbn_status st = m->backend->buffer_fill(m, init[i].which, init[i].value);
    if (st != FBN_STATUS_SUCCESS)
      return st;
  }
  return FBN_STATUS_SUCCESS;
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

  /* CPU: the fast backend, or the reference with FBN_CPU_BACKEND=reference. */
  const fbn_backend *backend = fbn_backend_cpu_fast();
  const char *cpu_choice = options->device == FBN_DEVICE_CPU ? getenv("FBN_CPU_BACKEND") : NULL;
  if (cpu_choice != NULL && strcmp(cpu_choice, "reference") == 0)
    backend = fbn_backend_cpu();
  else if (cpu_choice != NULL && cpu_choice[0] != '\0' && strcmp(cpu_choice, "fast") != 0)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: FBN_CPU_BACKEND = \"%s\": must be \"fast\" (the default) or "
                     "\"reference\"",
                     fn, cpu_choice);
  if (options->device == FBN_DEVICE_CUDA) {
#if FBN_HAVE_CUDA
    backend = fbn_backend_cuda();
#else
    backend = NULL;
#endif
    if (backend == NULL)
      return fbn_error(FBN_STATUS_NO_DEVICE,
                       "%s: device = FBN_DEVICE_CUDA: this build of fusedbn has no CUDA backend "
                       "(configured with -Dcuda=disabled or CUDA/cuDNN not found)",
                       fn);
  }

  fbn_module *m = calloc(1, sizeof *m);
  if (m == NULL)
    return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: out of host memory", fn);
  m->options = *options;
  m->training = true;
  m->num_batches_tracked = 0;
  m->backend = backend;
  m->id = atomic_fetch_add(&fbn_next_module_id, 1);

  st = backend->module_init(m);
  if (st != FBN_STATUS_SUCCESS) {
    free(m);
    return st;
  }
  st = fbn_fill_initial(m, true, true);
  if (st == FBN_STATUS_SUCCESS && options->affine) {
    st = backend->buffer_fill(m, FBN_BUFFER_WEIGHT_GRAD, 0.0);
    if (st == FBN_STATUS_SUCCESS)
      st = backend->buffer_fill(m, FBN_BUFFER_BIAS_GRAD, 0.0);
  }
  if (st != FBN_STATUS_SUCCESS) {
    backend->module_fini(m);
    free(m);
    return st;
  }
  *out = m;
  return FBN_STATUS_SUCCESS;
}

void fbn_module_destroy(fbn_module *module) {
  if (module == NULL)
    return;
  module->backend->module_fini(module);
  free(module);
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
  if (dtype != FBN_DTYPE_FLOAT32 && dtype != FBN_DTYPE_FLOAT64)
    return fbn_error(fbn_dtype_size(dtype) ? FBN_STATUS_UNSUPPORTED : FBN_STATUS_INVALID_VALUE,
                     "%s: dtype = %d (%s): host copies are float32 or float64", fn, (int)dtype,
                     fbn_dtype_name(dtype));
  if (count != (size_t)module->options.num_features)
    return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                     "%s: count = %zu: must equal num_features = %lld", fn, count,
                     (long long)module->options.num_features);
  return FBN_STATUS_SUCCESS;
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
  return module->backend->buffer_read(module, which, dtype, dst);
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
  return module->backend->buffer_write(module, which, dtype, src);
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
  fbn_status st = module->backend->buffer_fill(module, FBN_BUFFER_WEIGHT_GRAD, 0.0);
  if (st == FBN_STATUS_SUCCESS)
    st = module->backend->buffer_fill(module, FBN_BUFFER_BIAS_GRAD, 0.0);
  return st;
}

/* ---- saved objects ------------------------------------------------------ */

fbn_status fbn_saved_create(fbn_saved **out) {
  fbn_clear_error();
  if (out == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "fbn_saved_create: out is NULL");
  *out = calloc(1, sizeof **out);
  if (*out == NULL)
    return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "fbn_saved_create: out of host memory");
  return FBN_STATUS_SUCCESS;
}

void fbn_saved_destroy(fbn_saved *saved) {
  if (saved == NULL)
    return;
  if (saved->payload_backend != NULL)
    saved->payload_backend->saved_free(saved);
  free(saved);
}

/* ---- validation --------------------------------------------------------- */

bool fbn_module_uses_batch_stats(const fbn_module *module) {
  return module->training || !module->options.track_running_stats;
}

fbn_status fbn_validate_desc(const char *fn, const fbn_module *module, const fbn_tensor_desc *d,
                             bool has_addend, bool batch_stats) {
  if (fbn_dtype_size(d->dtype) == 0)
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: dtype = %d: not an fbn_dtype value", fn,
                     (int)d->dtype);
  if (d->layout != FBN_LAYOUT_NCHW && d->layout != FBN_LAYOUT_NHWC)
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: layout = %d: not an fbn_layout value", fn,
                     (int)d->layout);
  if (d->n <= 0 || d->c <= 0 || d->h <= 0 || d->w <= 0)
    return fbn_error(FBN_STATUS_INVALID_SHAPE,
                     "%s: shape (N=%lld, C=%lld, H=%lld, W=%lld): every dimension must be > 0", fn,
                     (long long)d->n, (long long)d->c, (long long)d->h, (long long)d->w);
  if (d->c != module->options.num_features)
    return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                     "%s: C = %lld: the tensor's channels must equal num_features = %lld", fn,
                     (long long)d->c, (long long)module->options.num_features);
  int64_t numel, bytes;
  if (__builtin_mul_overflow(d->n, d->c, &numel) || __builtin_mul_overflow(numel, d->h, &numel) ||
      __builtin_mul_overflow(numel, d->w, &numel) ||
      __builtin_mul_overflow(numel, (int64_t)8, &bytes) || (uint64_t)bytes > SIZE_MAX / 2)
    return fbn_error(FBN_STATUS_INVALID_SHAPE,
                     "%s: shape (N=%lld, C=%lld, H=%lld, W=%lld): the element count overflows", fn,
                     (long long)d->n, (long long)d->c, (long long)d->h, (long long)d->w);
  bool wide = d->dtype == FBN_DTYPE_FLOAT64;
  if (wide != (module->options.param_dtype == FBN_DTYPE_FLOAT64))
    return fbn_error(FBN_STATUS_UNSUPPORTED,
                     "%s: dtype = %s with param_dtype = %s: float64 tensors need float64 "
                     "parameters, float32/float16/bfloat16 tensors need float32 parameters",
                     fn, fbn_dtype_name(d->dtype), fbn_dtype_name(module->options.param_dtype));
  if (batch_stats && d->n * d->h * d->w == 1)
    return fbn_error(FBN_STATUS_INVALID_SHAPE,
                     "%s: shape (N=%lld, C=%lld, H=%lld, W=%lld): batch statistics need more "
                     "than 1 value per channel (N*H*W = 1)",
                     fn, (long long)d->n, (long long)d->c, (long long)d->h, (long long)d->w);
  fbn_status st = module->backend->check_desc(module, d, has_addend, batch_stats);
  if (st != FBN_STATUS_SUCCESS) {
    char detail[768];
    snprintf(detail, sizeof detail, "%s", fbn_last_error_message());
    return fbn_error(st, "%s: %s", fn, detail);
  }
  return FBN_STATUS_SUCCESS;
}

static fbn_status fbn_check_workspace(const char *fn, const fbn_module *module,
                                      const fbn_tensor_desc *desc, bool has_addend,
                                      bool batch_stats, bool backward, const void *workspace,
                                      size_t workspace_bytes) {
  if (workspace == NULL)
    return FBN_STATUS_SUCCESS;
  size_t need = 0;
  fbn_status st =
      module->backend->workspace_size(module, desc, has_addend, batch_stats, backward, &need);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (workspace_bytes < need)
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                     "%s: workspace_bytes = %zu: this call needs at least %zu bytes", fn,
                     workspace_bytes, need);
  if ((uintptr_t)workspace % FBN_WORKSPACE_ALIGNMENT != 0)
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                     "%s: workspace = %p: must be aligned to %d bytes", fn, workspace,
                     FBN_WORKSPACE_ALIGNMENT);
  return FBN_STATUS_SUCCESS;
}

/* ---- workspace queries -------------------------------------------------- */

static fbn_status fbn_workspace_query(const char *fn, const fbn_module *module,
                                      const fbn_tensor_desc *desc, bool has_addend,
                                      bool backward, size_t *bytes) {
  fbn_clear_error();
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: module is NULL", fn);
  if (desc == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: desc is NULL", fn);
  if (bytes == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: bytes is NULL", fn);
  bool batch_stats = fbn_module_uses_batch_stats(module);
  fbn_status st = fbn_validate_desc(fn, module, desc, has_addend, batch_stats);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  return module->backend->workspace_size(module, desc, has_addend, batch_stats, backward, bytes);
}

fbn_status fbn_module_forward_workspace_size(const fbn_module *module, const fbn_tensor_desc *desc,
                                             bool has_addend, size_t *bytes) {
  return fbn_workspace_query("fbn_module_forward_workspace_size", module, desc, has_addend, false,
                             bytes);
}

fbn_status fbn_module_backward_workspace_size(const fbn_module *module,
                                              const fbn_tensor_desc *desc, bool has_addend,
                                              size_t *bytes) {
  return fbn_workspace_query("fbn_module_backward_workspace_size", module, desc, has_addend, true,
                             bytes);
}

/* ---- forward / backward ------------------------------------------------- */

fbn_status fbn_forward_impl(const char *fn, fbn_module *module, const fbn_tensor_desc *desc,
                            const void *x, const void *addend, void *y, fbn_saved *saved,
                            void *workspace, size_t workspace_bytes, const void *exec) {
  fbn_clear_error();
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: module is NULL", fn);
  if (desc == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: desc is NULL", fn);
  if (x == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: x is NULL", fn);
  if (y == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: y is NULL", fn);

  const bool has_addend = addend != NULL;
  const bool batch_stats = fbn_module_uses_batch_stats(module);
  fbn_status st = fbn_validate_desc(fn, module, desc, has_addend, batch_stats);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  const size_t bytes = (size_t)fbn_desc_numel(desc) * fbn_dtype_size(desc->dtype);
  if (fbn_overlap(y, bytes, x, bytes))
    return fbn_error(FBN_STATUS_ALIASING, "%s: y overlaps x: in-place forward is not supported",
                     fn);
  if (fbn_overlap(y, bytes, addend, bytes))
    return fbn_error(FBN_STATUS_ALIASING,
                     "%s: y overlaps addend: in-place forward is not supported", fn);

  st = fbn_check_workspace(fn, module, desc, has_addend, batch_stats, false, workspace,
                           workspace_bytes);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  const bool update_running = module->training && module->options.track_running_stats;
  double factor = 0.0;
  int64_t next_count = module->num_batches_tracked;
  if (update_running) {
    if (module->num_batches_tracked == INT64_MAX)
      return fbn_error(FBN_STATUS_INVALID_STATE,
                       "%s: num_batches_tracked = %lld: one more batch would overflow it", fn,
                       (long long)module->num_batches_tracked);
    next_count = module->num_batches_tracked + 1;
    factor = module->options.cumulative_average ? 1.0 / (double)next_count
                                                : module->options.momentum;
  }

  if (saved != NULL) {
    if (saved->payload_backend != NULL && saved->payload_backend != module->backend)
      saved->payload_backend->saved_free(saved);
    saved->module_id = 0; /* empty until this forward succeeds */
    st = module->backend->saved_prepare(module, desc, has_addend, batch_stats, saved);
    if (st != FBN_STATUS_SUCCESS)
      return st;
  }

  fbn_forward_args args = {
      .desc = desc,
      .x = x,
      .addend = addend,
      .y = y,
      .saved = saved,
      .batch_stats = batch_stats,
      .update_running = update_running,
      .factor = factor,
      .workspace = workspace,
      .workspace_bytes = workspace ? workspace_bytes : 0,
      .exec = exec,
  };
  st = module->backend->forward(module, &args);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  module->num_batches_tracked = next_count;
  if (saved != NULL) {
    saved->module_id = module->id;
    saved->desc = *desc;
    saved->has_addend = has_addend;
    saved->batch_stats = batch_stats;
  }
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_backward_impl(const char *fn, fbn_module *module, const fbn_saved *saved,
                             const fbn_tensor_desc *desc, const void *x, const void *y,
                             const void *dy, void *dx, void *daddend, void *workspace,
                             size_t workspace_bytes, const void *exec) {
  fbn_clear_error();
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: module is NULL", fn);
  if (saved == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: saved is NULL", fn);
  if (desc == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: desc is NULL", fn);
  if (x == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: x is NULL", fn);
  if (y == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: y is NULL", fn);
  if (dy == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: dy is NULL", fn);

  if (saved->module_id == 0)
    return fbn_error(FBN_STATUS_INVALID_STATE,
                     "%s: saved is empty: pass it to a successful fbn_module_forward first", fn);
  if (saved->module_id != module->id)
    return fbn_error(FBN_STATUS_INVALID_STATE,
                     "%s: saved was filled by another module's forward (module id %llu, this "
                     "module is %llu)",
                     fn, (unsigned long long)saved->module_id, (unsigned long long)module->id);
  fbn_status st = fbn_validate_desc(fn, module, desc, saved->has_addend, saved->batch_stats);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (!fbn_desc_equal(desc, &saved->desc))
    return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                     "%s: desc (N=%lld, C=%lld, H=%lld, W=%lld, %s, %s) differs from the forward's "
                     "(N=%lld, C=%lld, H=%lld, W=%lld, %s, %s)",
                     fn, (long long)desc->n, (long long)desc->c, (long long)desc->h,
                     (long long)desc->w, fbn_dtype_name(desc->dtype), fbn_layout_name(desc->layout),
                     (long long)saved->desc.n, (long long)saved->desc.c, (long long)saved->desc.h,
                     (long long)saved->desc.w, fbn_dtype_name(saved->desc.dtype),
                     fbn_layout_name(saved->desc.layout));
  if (daddend != NULL && !saved->has_addend)
    return fbn_error(FBN_STATUS_INVALID_STATE,
                     "%s: daddend is not NULL but the forward had no addend", fn);

  const size_t bytes = (size_t)fbn_desc_numel(desc) * fbn_dtype_size(desc->dtype);
  const struct {
    const void *ptr;
    const char *name;
  } inputs[] = {{x, "x"}, {y, "y"}, {dy, "dy"}};
  for (size_t i = 0; i < sizeof inputs / sizeof inputs[0]; i++) {
    if (fbn_overlap(dx, bytes, inputs[i].ptr, bytes))
      return fbn_error(FBN_STATUS_ALIASING, "%s: dx overlaps %s: in-place backward is not supported",
                       fn, inputs[i].name);
    if (fbn_overlap(daddend, bytes, inputs[i].ptr, bytes))
      return fbn_error(FBN_STATUS_ALIASING,
                       "%s: daddend overlaps %s: in-place backward is not supported", fn,
                       inputs[i].name);
  }
  if (fbn_overlap(dx, bytes, daddend, bytes))
    return fbn_error(FBN_STATUS_ALIASING, "%s: dx overlaps daddend", fn);

  st = fbn_check_workspace(fn, module, desc, saved->has_addend, saved->batch_stats, true, workspace,
                           workspace_bytes);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  fbn_backward_args args = {
      .desc = desc,
      .saved = saved,
      .x = x,
      .y = y,
      .dy = dy,
      .dx = dx,
      .daddend = daddend,
      .workspace = workspace,
      .workspace_bytes = workspace ? workspace_bytes : 0,
      .exec = exec,
  };
  return module->backend->backward(module, &args);
}

fbn_status fbn_module_forward(fbn_module *module, const fbn_tensor_desc *desc, const void *x,
                              const void *addend, void *y, fbn_saved *saved, void *workspace,
                              size_t workspace_bytes) {
  return fbn_forward_impl("fbn_module_forward", module, desc, x, addend, y, saved, workspace,
                          workspace_bytes, NULL);
}

fbn_status fbn_module_backward(fbn_module *module, const fbn_saved *saved,
                               const fbn_tensor_desc *desc, const void *x, const void *y,
                               const void *dy, void *dx, void *daddend, void *workspace,
                               size_t workspace_bytes) {
  return fbn_backward_impl("fbn_module_backward", module, saved, desc, x, y, dy, dx, daddend,
                           workspace, workspace_bytes, NULL);
}
