/*
 * What both CPU backends (cpu_ref.c, fast/) share: host memory hooks, the
 * op_init of both (every dtype), element access in float64 for every dtype,
 * and the layout of their saved state:
 *
 *   | header (64 bytes) | mean[C] | invstd[C] | backend's extra (ReLU mask) |
 *
 * mean and invstd are C doubles each: the statistics that normalized x
 * (batch statistics, or the running statistics of an eval forward). The
 * header records which backend, operation, statistics mode and tensor
 * description filled it, so that a backward can refuse memory that no
 * forward of its op and shape filled (FBN_STATUS_INVALID_STATE).
 */
#ifndef FUSEDBN_SRC_CPU_CPU_COMMON_H
#define FUSEDBN_SRC_CPU_CPU_COMMON_H

#include "backend.h"
#include "core/half.h"

#define FBN_CPU_SAVED_HEADER_BYTES 64

/* Memory hooks (fbn_backend.mem_*): aligned_alloc'd host memory. */
FBN_INTERNAL fbn_status fbn_cpu_mem_alloc(int device_index, size_t bytes, void **ptr);
FBN_INTERNAL void fbn_cpu_mem_free(int device_index, void *ptr);
FBN_INTERNAL fbn_status fbn_cpu_mem_copy(int device_index, void *dst, const void *src,
                                         size_t bytes, fbn_bk_copy kind);
FBN_INTERNAL fbn_status fbn_cpu_mem_fill(int device_index, void *ptr, fbn_dtype dtype,
                                         size_t count, double value);

/* op_init of both CPU backends: every dtype (float32, float64, float16 and
 * bfloat16 tensors); no state. */
FBN_INTERNAL fbn_status fbn_cpu_op_init(const fbn_op_desc *op, void **state);
FBN_INTERNAL void fbn_cpu_op_fini(const fbn_op_desc *op, void *state);

/* Element i of a tensor of dtype, widened to double (exact). */
static inline double fbn_cpu_load(const void *p, fbn_dtype dtype, int64_t i) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT64:
    return ((const double *)p)[i];
  case FBN_DTYPE_FLOAT16:
    return fbn_half_to_double(((const uint16_t *)p)[i]);
  case FBN_DTYPE_BFLOAT16:
    return fbn_bfloat16_to_double(((const uint16_t *)p)[i]);
  case FBN_DTYPE_FLOAT32:
  default:
    return (double)((const float *)p)[i];
  }
}

/* Store v as element i of a tensor of dtype, rounded once to nearest even
 * (src/core/half.h for the half dtypes). */
static inline void fbn_cpu_store(void *p, fbn_dtype dtype, int64_t i, double v) {
  switch (dtype) {
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

/* Bytes of saved state with extra bytes after the statistics. */
FBN_INTERNAL size_t fbn_cpu_saved_bytes(const fbn_tensor_desc *d, size_t extra);
/* The mean[C], invstd[C] arrays of saved state. */
static inline double *fbn_cpu_saved_stats(void *saved) {
  return (double *)(void *)((char *)saved + FBN_CPU_SAVED_HEADER_BYTES);
}
static inline const double *fbn_cpu_saved_stats_const(const void *saved) {
  return (const double *)(const void *)((const char *)saved + FBN_CPU_SAVED_HEADER_BYTES);
}
/* The backend's extra bytes (after the statistics). */
static inline void *fbn_cpu_saved_extra(void *saved, int64_t c) {
  return (char *)saved + FBN_CPU_SAVED_HEADER_BYTES + 2 * (size_t)c * sizeof(double);
}
static inline const void *fbn_cpu_saved_extra_const(const void *saved, int64_t c) {
  return (const char *)saved + FBN_CPU_SAVED_HEADER_BYTES + 2 * (size_t)c * sizeof(double);
}
/* Write the header after a forward of op on d by backend `owner`. */
FBN_INTERNAL void fbn_cpu_saved_seal(void *saved, const fbn_backend *owner,
                                     const fbn_op_desc *op, const fbn_tensor_desc *d);
/* INVALID_STATE (message naming the rule) unless saved was sealed by a
 * forward of owner with op's operation and statistics on d. */
FBN_INTERNAL fbn_status fbn_cpu_saved_check(const void *saved, const fbn_backend *owner,
                                            const fbn_op_desc *op, const fbn_tensor_desc *d);

#endif /* FUSEDBN_SRC_CPU_CPU_COMMON_H */
