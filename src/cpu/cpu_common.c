/* Host memory hooks, op checks and the saved-state header shared by the CPU
 * backends. */
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_common.h"

#define FBN_CPU_ALIGN 256
#define FBN_CPU_SAVED_MAGIC 0x66626e5341564544ull /* "fbnSAVED" */

fbn_status fbn_cpu_mem_alloc(int device_index, size_t bytes, void **ptr) {
  (void)device_index;
  const size_t rounded = (bytes + FBN_CPU_ALIGN - 1) / FBN_CPU_ALIGN * FBN_CPU_ALIGN;
  void *p = rounded >= bytes ? aligned_alloc(FBN_CPU_ALIGN, rounded ? rounded : FBN_CPU_ALIGN)
                             : NULL;
  if (p == NULL)
    return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "out of host memory for %zu bytes", bytes);
  *ptr = p;
  return FBN_STATUS_SUCCESS;
}

void fbn_cpu_mem_free(int device_index, void *ptr) {
  (void)device_index;
  free(ptr);
}

fbn_status fbn_cpu_mem_copy(int device_index, void *dst, const void *src, size_t bytes,
                            fbn_bk_copy kind) {
  (void)device_index;
  (void)kind;
  memcpy(dst, src, bytes);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cpu_mem_fill(int device_index, void *ptr, fbn_dtype dtype, size_t count,
                            double value) {
  (void)device_index;
  for (size_t i = 0; i < count; i++)
    fbn_cpu_store(ptr, dtype, (int64_t)i, value);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cpu_op_init(const fbn_op_desc *op, void **state) {
  (void)op;
  *state = NULL;
  return FBN_STATUS_SUCCESS;
}

void fbn_cpu_op_fini(const fbn_op_desc *op, void *state) {
  (void)op;
  (void)state;
}

/* ---- saved-state header ------------------------------------------------- */

typedef struct fbn_cpu_saved_header {
  uint64_t magic;
  const fbn_backend *owner;
  int64_t n, c, h, w;
  int32_t dtype, layout, operation, statistics;
} fbn_cpu_saved_header;

_Static_assert(sizeof(fbn_cpu_saved_header) <= FBN_CPU_SAVED_HEADER_BYTES,
               "the saved-state header must fit its slot");

size_t fbn_cpu_saved_bytes(const fbn_tensor_desc *d, size_t extra) {
  return FBN_CPU_SAVED_HEADER_BYTES + 2 * (size_t)d->c * sizeof(double) + extra;
}

void fbn_cpu_saved_seal(void *saved, const fbn_backend *owner, const fbn_op_desc *op,
                        const fbn_tensor_desc *d) {
  const fbn_cpu_saved_header h = {
      .magic = FBN_CPU_SAVED_MAGIC,
      .owner = owner,
      .n = d->n,
      .c = d->c,
      .h = d->h,
      .w = d->w,
      .dtype = (int32_t)d->dtype,
      .layout = (int32_t)d->layout,
      .operation = (int32_t)op->operation,
      .statistics = (int32_t)op->statistics,
  };
  memcpy(saved, &h, sizeof h);
}

fbn_status fbn_cpu_saved_check(const void *saved, const fbn_backend *owner,
                               const fbn_op_desc *op, const fbn_tensor_desc *d) {
  fbn_cpu_saved_header h;
  memcpy(&h, saved, sizeof h);
  if (h.magic != FBN_CPU_SAVED_MAGIC || h.owner != owner)
    return fbn_error(FBN_STATUS_INVALID_STATE,
                     "saved = %p: not filled by a forward of the %s backend (pass it to a "
                     "successful forward of this op first)",
                     saved, owner->name);
  if (h.operation != (int32_t)op->operation || h.statistics != (int32_t)op->statistics)
    return fbn_error(FBN_STATUS_INVALID_STATE,
                     "saved = %p: filled by a forward of operation %s with %s statistics, this "
                     "op is %s with %s statistics",
                     saved, fbn_operation_name((fbn_operation)h.operation),
                     h.statistics == FBN_STATISTICS_BATCH ? "batch" : "running",
                     fbn_operation_name(op->operation),
                     op->statistics == FBN_STATISTICS_BATCH ? "batch" : "running");
  if (h.n != d->n || h.c != d->c || h.h != d->h || h.w != d->w || h.dtype != (int32_t)d->dtype ||
      h.layout != (int32_t)d->layout)
    return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                     "saved = %p: filled by a forward of shape (N=%lld, C=%lld, H=%lld, W=%lld), "
                     "backward has (N=%lld, C=%lld, H=%lld, W=%lld)",
                     saved, (long long)h.n, (long long)h.c, (long long)h.h, (long long)h.w,
                     (long long)d->n, (long long)d->c, (long long)d->h, (long long)d->w);
  return FBN_STATUS_SUCCESS;
}
