/* Names and sizes of dtypes, layouts and operations; tensor descriptions and
 * their validation (dimensions, overflow, channels, dtype pairs). */
#include <stdint.h>

#include "core/core.h"

int fbn_version(void) {
  return FBN_VERSION_MAJOR * 10000 + FBN_VERSION_MINOR * 100 + FBN_VERSION_PATCH;
}

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

const char *fbn_operation_name(fbn_operation operation) {
  switch (operation) {
  case FBN_OPERATION_BN: return "bn";
  case FBN_OPERATION_BN_RELU: return "bn_relu";
  case FBN_OPERATION_BN_ADD_RELU: return "bn_add_relu";
  }
  return "unknown operation";
}

fbn_tensor_desc fbn_tensor_desc_make(int64_t n, int64_t c, int64_t h, int64_t w, fbn_dtype dtype,
                                     fbn_layout layout) {
  fbn_tensor_desc d = {n, c, h, w, dtype, layout};
  return d;
}

int64_t fbn_desc_numel(const fbn_tensor_desc *desc) {
  return desc->n * desc->c * desc->h * desc->w;
}

size_t fbn_desc_bytes(const fbn_tensor_desc *desc) {
  return (size_t)fbn_desc_numel(desc) * fbn_dtype_size(desc->dtype);
}

bool fbn_desc_equal(const fbn_tensor_desc *a, const fbn_tensor_desc *b) {
  return a->n == b->n && a->c == b->c && a->h == b->h && a->w == b->w && a->dtype == b->dtype &&
         a->layout == b->layout;
}

bool fbn_overlap(const void *a, size_t abytes, const void *b, size_t bbytes) {
  if (a == NULL || b == NULL)
    return false;
  uintptr_t pa = (uintptr_t)a, pb = (uintptr_t)b;
  return pa < pb + bbytes && pb < pa + abytes;
}

fbn_status fbn_check_desc_shape(const char *fn, const fbn_tensor_desc *d, int64_t c,
                                const char *c_name) {
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
  if (d->c != c)
    return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                     "%s: C = %lld: the tensor's channels must equal %s = %lld", fn,
                     (long long)d->c, c_name, (long long)c);
  int64_t numel, bytes;
  if (__builtin_mul_overflow(d->n, d->c, &numel) || __builtin_mul_overflow(numel, d->h, &numel) ||
      __builtin_mul_overflow(numel, d->w, &numel) ||
      __builtin_mul_overflow(numel, (int64_t)8, &bytes) || (uint64_t)bytes > SIZE_MAX / 2)
    return fbn_error(FBN_STATUS_INVALID_SHAPE,
                     "%s: shape (N=%lld, C=%lld, H=%lld, W=%lld): the element count overflows", fn,
                     (long long)d->n, (long long)d->c, (long long)d->h, (long long)d->w);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_check_batch_values(const char *fn, const fbn_tensor_desc *d) {
  if (d->n * d->h * d->w == 1)
    return fbn_error(FBN_STATUS_INVALID_SHAPE,
                     "%s: shape (N=%lld, C=%lld, H=%lld, W=%lld): batch statistics need more "
                     "than 1 value per channel (N*H*W = 1)",
                     fn, (long long)d->n, (long long)d->c, (long long)d->h, (long long)d->w);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_check_dtype_pair(const char *fn, fbn_dtype dtype, fbn_dtype param_dtype) {
  const bool wide = dtype == FBN_DTYPE_FLOAT64;
  if (wide != (param_dtype == FBN_DTYPE_FLOAT64))
    return fbn_error(FBN_STATUS_UNSUPPORTED,
                     "%s: dtype = %s with param_dtype = %s: float64 tensors need float64 "
                     "parameters, float32/float16/bfloat16 tensors need float32 parameters",
                     fn, fbn_dtype_name(dtype), fbn_dtype_name(param_dtype));
  return FBN_STATUS_SUCCESS;
}
