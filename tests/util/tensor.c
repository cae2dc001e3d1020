/* Host tensors: logical element access for both layouts and every dtype. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/half.h"
#include "fbn_testutil.h"

size_t fbnt_desc_numel(const fbn_tensor_desc *desc) {
  if (desc->n <= 0 || desc->c <= 0 || desc->h <= 0 || desc->w <= 0) {
    return 0;
  }
  return (size_t)desc->n * (size_t)desc->c * (size_t)desc->h * (size_t)desc->w;
}

size_t fbnt_desc_offset(const fbn_tensor_desc *d, int64_t n, int64_t c, int64_t h, int64_t w) {
  if (d->layout == FBN_LAYOUT_NHWC) {
    return (size_t)(((n * d->h + h) * d->w + w) * d->c + c);
  }
  return (size_t)(((n * d->c + c) * d->h + h) * d->w + w);
}

size_t fbnt_ref_index(const fbn_tensor_desc *d, int64_t n, int64_t c, int64_t h, int64_t w) {
  return (size_t)(((n * d->c + c) * d->h + h) * d->w + w);
}

double fbnt_load(fbn_dtype dtype, const void *data, size_t index) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT32:
    return ((const float *)data)[index];
  case FBN_DTYPE_FLOAT64:
    return ((const double *)data)[index];
  case FBN_DTYPE_FLOAT16:
    return fbnt_half_to_float(((const uint16_t *)data)[index]);
  case FBN_DTYPE_BFLOAT16:
    return fbnt_bfloat16_to_float(((const uint16_t *)data)[index]);
  }
  fprintf(stderr, "fbnt_load: unknown dtype %d\n", (int)dtype);
  abort();
}

void fbnt_store(fbn_dtype dtype, void *data, size_t index, double value) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT32:
    ((float *)data)[index] = (float)value;
    return;
  case FBN_DTYPE_FLOAT64:
    ((double *)data)[index] = value;
    return;
  case FBN_DTYPE_FLOAT16:
    ((uint16_t *)data)[index] = fbn_double_to_half(value); /* rounded once */
    return;
  case FBN_DTYPE_BFLOAT16:
    ((uint16_t *)data)[index] = fbn_double_to_bfloat16(value);
    return;
  }
  fprintf(stderr, "fbnt_store: unknown dtype %d\n", (int)dtype);
  abort();
}

double fbnt_get(const fbn_tensor_desc *desc, const void *data, int64_t n, int64_t c, int64_t h,
                int64_t w) {
  return fbnt_load(desc->dtype, data, fbnt_desc_offset(desc, n, c, h, w));
}

void fbnt_set(const fbn_tensor_desc *desc, void *data, int64_t n, int64_t c, int64_t h, int64_t w,
              double value) {
  fbnt_store(desc->dtype, data, fbnt_desc_offset(desc, n, c, h, w), value);
}

void *fbnt_alloc(size_t bytes) {
  size_t rounded = (bytes + 255u) / 256u * 256u;
  if (rounded == 0) {
    rounded = 256;
  }
  void *p = aligned_alloc(256, rounded);
  if (p == NULL) {
    fprintf(stderr, "fbnt_alloc: out of memory (%zu bytes)\n", bytes);
    abort();
  }
  memset(p, 0, rounded);
  return p;
}

void *fbnt_tensor_alloc(const fbn_tensor_desc *desc) {
  size_t esize = 8;
  if (desc->dtype == FBN_DTYPE_FLOAT32) {
    esize = 4;
  } else if (desc->dtype == FBN_DTYPE_FLOAT16 || desc->dtype == FBN_DTYPE_BFLOAT16) {
    esize = 2;
  }
  return fbnt_alloc(fbnt_desc_numel(desc) * esize);
}

void fbnt_free(void *p) {
  free(p);
}

void fbnt_tensor_poison(const fbn_tensor_desc *desc, void *data) {
  size_t count = fbnt_desc_numel(desc);
  for (size_t i = 0; i < count; i++) {
    fbnt_store(desc->dtype, data, i, NAN);
  }
}

void fbnt_tensor_to_ref(const fbn_tensor_desc *d, const void *data, double *ref) {
  for (int64_t n = 0; n < d->n; n++)
    for (int64_t c = 0; c < d->c; c++)
      for (int64_t h = 0; h < d->h; h++)
        for (int64_t w = 0; w < d->w; w++)
          ref[fbnt_ref_index(d, n, c, h, w)] = fbnt_get(d, data, n, c, h, w);
}

void fbnt_tensor_from_ref(const fbn_tensor_desc *d, const double *ref, void *data) {
  for (int64_t n = 0; n < d->n; n++)
    for (int64_t c = 0; c < d->c; c++)
      for (int64_t h = 0; h < d->h; h++)
        for (int64_t w = 0; w < d->w; w++)
          fbnt_set(d, data, n, c, h, w, ref[fbnt_ref_index(d, n, c, h, w)]);
}

/* Store v, return the value actually stored (rounded to the dtype). */
static double store_logical(const fbn_tensor_desc *d, void *data, int64_t n, int64_t c, int64_t h,
                            int64_t w, double v) {
  size_t off = fbnt_desc_offset(d, n, c, h, w);
  fbnt_store(d->dtype, data, off, v);
  return fbnt_load(d->dtype, data, off);
}

void fbnt_fill_channels(fbnt_rng *rng, const fbn_tensor_desc *d, void *data, double *ref) {
  double *offset = malloc((size_t)d->c * sizeof *offset);
  double *scale = malloc((size_t)d->c * sizeof *scale);
  if (offset == NULL || scale == NULL) {
    abort();
  }
  for (int64_t c = 0; c < d->c; c++) {
    offset[c] = fbnt_rng_uniform(rng, -3.0, 3.0);
    scale[c] = fbnt_rng_uniform(rng, 0.5, 3.0);
  }
  for (int64_t n = 0; n < d->n; n++)
    for (int64_t c = 0; c < d->c; c++)
      for (int64_t h = 0; h < d->h; h++)
        for (int64_t w = 0; w < d->w; w++) {
          double v = offset[c] + scale[c] * fbnt_rng_normal(rng);
          double s = store_logical(d, data, n, c, h, w, v);
          if (ref != NULL) {
            ref[fbnt_ref_index(d, n, c, h, w)] = s;
          }
        }
  free(offset);
  free(scale);
}

void fbnt_fill_normal(fbnt_rng *rng, const fbn_tensor_desc *d, void *data, double *ref,
                      double scale) {
  for (int64_t n = 0; n < d->n; n++)
    for (int64_t c = 0; c < d->c; c++)
      for (int64_t h = 0; h < d->h; h++)
        for (int64_t w = 0; w < d->w; w++) {
          double s = store_logical(d, data, n, c, h, w, scale * fbnt_rng_normal(rng));
          if (ref != NULL) {
            ref[fbnt_ref_index(d, n, c, h, w)] = s;
          }
        }
}

void fbnt_fill_vector(fbnt_rng *rng, double *v, int64_t count, double lo, double hi, bool signed_,
                      bool round_to_float) {
  for (int64_t i = 0; i < count; i++) {
    double x = signed_ ? fbnt_rng_signed(rng, lo, hi) : fbnt_rng_uniform(rng, lo, hi);
    v[i] = round_to_float ? (double)(float)x : x;
  }
}

const char *fbnt_layout_str(fbn_layout layout) {
  switch (layout) {
  case FBN_LAYOUT_NCHW:
    return "NCHW";
  case FBN_LAYOUT_NHWC:
    return "NHWC";
  }
  return "layout?";
}

const char *fbnt_dtype_str(fbn_dtype dtype) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT32:
    return "f32";
  case FBN_DTYPE_FLOAT64:
    return "f64";
  case FBN_DTYPE_FLOAT16:
    return "f16";
  case FBN_DTYPE_BFLOAT16:
    return "bf16";
  }
  return "dtype?";
}
