/*
 * Synchronized batch norm inside the API layer: what the split phases
 * (sync.c) share with the callback adapter (sync_comm.c). Never installed.
 */
#ifndef FUSEDBN_SRC_SYNC_SYNC_INTERNAL_H
#define FUSEDBN_SRC_SYNC_SYNC_INTERNAL_H

#include "fusedbn/fusedbn_sync.h"
#include "internal.h"

/* Bytes of the check header at the start of a statistics record. */
#define FBN_SYNC_HEADER_BYTES 64
/* Doubles in front of the sums of a gradient record: count, ranks, C, 0. */
#define FBN_SYNC_GRAD_HEAD 4

/* Memory of a call, for the overlap checks. */
typedef struct fbn_span_check {
  const void *ptr;
  size_t bytes;
  const char *name;
} fbn_span_check;

/* x up to a multiple of FBN_OP_MEMORY_ALIGNMENT. */
static inline size_t fbn_sync_align(size_t x) {
  return (x + FBN_OP_MEMORY_ALIGNMENT - 1) / FBN_OP_MEMORY_ALIGNMENT * FBN_OP_MEMORY_ALIGNMENT;
}

/* The op can run the synchronized calls (batch statistics, a backend with
 * the sync hooks); messages name fn. */
FBN_INTERNAL fbn_status fbn_sync_check_op(const char *fn, const fbn_op *op);
/* x_desc of one shard against the op (N may be 0). */
FBN_INTERNAL fbn_status fbn_sync_check_x_desc(const char *fn, const fbn_op *op,
                                              const fbn_tensor_desc *x_desc);
/* The check headers of world_size records, stride bytes apart, against
 * the op: the status of fbn_sync_combine(); *total the summed count. */
FBN_INTERNAL fbn_status fbn_sync_check_headers(const char *fn, const fbn_op *op,
                                               const void *records, int world_size,
                                               size_t stride, int64_t *total);
/* Every check of fbn_sync_apply() (workspace of fbn_sync_workspace_size()). */
FBN_INTERNAL fbn_status fbn_sync_apply_checks(const char *fn, const fbn_op *op,
                                              const fbn_tensor_desc *x_desc, const void *x,
                                              const void *addend, const void *y,
                                              const void *weight, const void *bias,
                                              const void *saved, size_t saved_bytes,
                                              const void *workspace, size_t workspace_bytes);
/* fbn_sync_apply() after its checks passed. */
FBN_INTERNAL fbn_status fbn_sync_apply_run(const char *fn, const fbn_op *op,
                                           const fbn_tensor_desc *x_desc, const void *x,
                                           const void *addend, void *y, const void *weight,
                                           const void *bias, const double *mean,
                                           const double *var, void *saved, size_t saved_bytes,
                                           void *workspace, size_t workspace_bytes);
/* Combine after fbn_sync_check_headers() passed: mean/var, running update. */
FBN_INTERNAL void fbn_sync_combine_run(const fbn_op *op, const void *records, int world_size,
                                       size_t stride, int64_t total, double *mean, double *var,
                                       void *running_mean, void *running_var, double factor);
/* dweight/dbias (param dtype, each may be NULL) = or += the sums of a
 * gradient record. */
FBN_INTERNAL void fbn_sync_store_param_grads(const fbn_op *op, const double *grad_record,
                                             void *dweight, void *dbias, bool accumulate);
/* Checks shared by fbn_sync_backward_reduce() and fbn_sync_backward_apply():
 * pointers, saved state, workspace, aliasing of the outputs. */
FBN_INTERNAL fbn_status fbn_sync_backward_checks(const char *fn, const fbn_op *op,
                                                 const fbn_tensor_desc *x_desc, const void *x,
                                                 const void *y, const void *dy,
                                                 const void *saved, size_t saved_bytes,
                                                 const void *weight, const void *bias, void *dx,
                                                 void *daddend, void *dweight, void *dbias,
                                                 fbn_param_grad param_grad,
                                                 const void *workspace, size_t workspace_bytes);

#endif /* FUSEDBN_SRC_SYNC_SYNC_INTERNAL_H */
