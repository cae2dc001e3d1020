/*
 * Core layer: what every other layer of fusedbn uses and which uses nothing
 * above it: the thread-local error message (status.c), names and sizes of
 * dtypes, layouts and operations, tensor-description validation with its
 * overflow checks (desc.c), the per-channel formulas (bn_formulas.h) and
 * the float16/bfloat16 conversions (half.h). Never installed.
 *
 *   core (src/core/)  <-  backends (src/cpu/, src/cuda/)  <-  API layer
 *   (src/api/: op API, module API, CUDA interop entry points, backend
 *   selection)  <-  state files (src/state/)
 */
#ifndef FUSEDBN_SRC_CORE_CORE_H
#define FUSEDBN_SRC_CORE_CORE_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fusedbn/fusedbn.h"

#define FBN_INTERNAL __attribute__((visibility("hidden")))

/* ---- errors (status.c) -------------------------------------------------- */

/* Record "fmt..." as this thread's last error message and return status. */
FBN_INTERNAL fbn_status fbn_error(fbn_status status, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Clear the thread's last error (called at the start of every API call). */
FBN_INTERNAL void fbn_clear_error(void);
/* Append " (detail)" to the current message, for wrapping backend errors. */
FBN_INTERNAL void fbn_error_append(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Prefix the current message with "fn: " (backend messages name no call). */
FBN_INTERNAL fbn_status fbn_error_prefix(fbn_status status, const char *fn);

/* ---- names (desc.c) ----------------------------------------------------- */

FBN_INTERNAL const char *fbn_dtype_name(fbn_dtype dtype);
FBN_INTERNAL const char *fbn_layout_name(fbn_layout layout);

/* ---- operations --------------------------------------------------------- */

static inline bool fbn_operation_valid(fbn_operation op) {
  return op == FBN_OPERATION_BN || op == FBN_OPERATION_BN_RELU || op == FBN_OPERATION_BN_ADD_RELU;
}
/* Whether y = ReLU(...) (the backward then gates dy with !(y <= 0)). */
static inline bool fbn_operation_has_relu(fbn_operation op) { return op != FBN_OPERATION_BN; }
/* Whether forward takes an addend (and backward may write daddend). */
static inline bool fbn_operation_has_addend(fbn_operation op) {
  return op == FBN_OPERATION_BN_ADD_RELU;
}

/* ---- tensor descriptions (desc.c) --------------------------------------- */

/* Number of elements of a validated desc. */
FBN_INTERNAL int64_t fbn_desc_numel(const fbn_tensor_desc *desc);
/* Bytes of one tensor of a validated desc. */
FBN_INTERNAL size_t fbn_desc_bytes(const fbn_tensor_desc *desc);
/* Offset in elements of logical (n, c, h, w) for desc's layout. */
static inline int64_t fbn_desc_offset(const fbn_tensor_desc *d, int64_t n, int64_t c, int64_t h,
                                      int64_t w) {
  return d->layout == FBN_LAYOUT_NCHW ? ((n * d->c + c) * d->h + h) * d->w + w
                                      : ((n * d->h + h) * d->w + w) * d->c + c;
}
FBN_INTERNAL bool fbn_desc_equal(const fbn_tensor_desc *a, const fbn_tensor_desc *b);
/* Whether [a, a+abytes) and [b, b+bbytes) overlap. NULL never overlaps. */
FBN_INTERNAL bool fbn_overlap(const void *a, size_t abytes, const void *b, size_t bbytes);

/* Validate desc on its own and against the channels c (named c_name in the
 * message): enum values (INVALID_VALUE), dimensions > 0 (INVALID_SHAPE),
 * desc->c == c (SHAPE_MISMATCH), element/byte counts that fit
 * (INVALID_SHAPE). Messages start with fn and name the value and the
 * rule. */
FBN_INTERNAL fbn_status fbn_check_desc_shape(const char *fn, const fbn_tensor_desc *desc,
                                             int64_t c, const char *c_name);
/* Batch statistics need more than one value per channel: N*H*W > 1
 * (INVALID_SHAPE). */
FBN_INTERNAL fbn_status fbn_check_batch_values(const char *fn, const fbn_tensor_desc *desc);
/* float64 tensors need float64 parameters, the others float32 ones
 * (UNSUPPORTED otherwise). */
FBN_INTERNAL fbn_status fbn_check_dtype_pair(const char *fn, fbn_dtype dtype,
                                              fbn_dtype param_dtype);

#endif /* FUSEDBN_SRC_CORE_CORE_H */
