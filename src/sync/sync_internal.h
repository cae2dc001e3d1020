/*
 * Synchronized batch norm inside the API layer: what the split phases
 * (sync_check.c: checks and sizes, sync_forward.c, sync_backward.c) share
 * with each other and with the callback adapter (sync_comm.c). Never
 * installed.
 */
#ifndef FUSEDBN_SRC_SYNC_SYNC_INTERNAL_H
#define FUSEDBN_SRC_SYNC_SYNC_INTERNAL_H

#include "fusedbn/fusedbn_sync.h"
#include "internal.h"

/* Bytes of the check header at the start of a statistics record. */
#define FBN_SYNC_HEADER_BYTES 64
/* Doubles in front of the sums of a gradient record: count, ranks, C, 0. */
#define FBN_SYNC_GRAD_HEAD 4

/* The check header: the first FBN_SYNC_HEADER_BYTES of a statistics
 * record, and what every rank sends in the check round of
 * fbn_sync_forward() and fbn_sync_backward() (zeros after it). status is
 * 0 on a rank that is ready for the collectives that follow, else the
 * fbn_status that rank failed with (its op fields may then be 0). */
#define FBN_SYNC_MAGIC 0x31434e5953626e66ull /* "fbnSYNC1" */

typedef struct fbn_sync_header {
  uint64_t magic;
  uint32_t version;
  int32_t dtype, param_dtype, operation, affine, status;
  int64_t c;
  int64_t count; /* values per channel in this rank's shard */
  double eps;
} fbn_sync_header;

_Static_assert(sizeof(fbn_sync_header) <= FBN_SYNC_HEADER_BYTES,
               "the check header must fit its slot");

/* Memory of a call, for the overlap checks. */
typedef struct fbn_span_check {
  const void *ptr;
  size_t bytes;
  const char *name;
} fbn_span_check;

/* The first `written` of the n spans (the memory the call writes) against
 * every other span: FBN_STATUS_ALIASING naming both on an overlap. NULL
 * and empty spans overlap nothing. */
FBN_INTERNAL fbn_status fbn_sync_check_spans(const char *fn, const fbn_span_check *spans,
                                             size_t written, size_t n);

/* The check header (FBN_SYNC_HEADER_BYTES at out) of this rank: op's
 * fields (zeros when op is NULL), count values per channel, status. */
FBN_INTERNAL void fbn_sync_make_header(const fbn_op *op, int64_t count, fbn_status status,
                                       void *out);

/* x up to a multiple of FBN_OP_MEMORY_ALIGNMENT. */
static inline size_t fbn_sync_align(size_t x) {
  return (x + FBN_OP_MEMORY_ALIGNMENT - 1) / FBN_OP_MEMORY_ALIGNMENT * FBN_OP_MEMORY_ALIGNMENT;
}

/* Element i of a float32/float64 array. */
static inline double fbn_sync_load(const void *p, fbn_dtype dtype, int64_t i) {
  return dtype == FBN_DTYPE_FLOAT64 ? ((const double *)p)[i] : (double)((const float *)p)[i];
}

static inline void fbn_sync_store(void *p, fbn_dtype dtype, int64_t i, double v) {
  if (dtype == FBN_DTYPE_FLOAT64)
    ((double *)p)[i] = v;
  else
    ((float *)p)[i] = (float)v;
}

/* The op the backend runs for the apply phases: running-statistics mode
 * (normalize with the given mean/variance), float64 per-channel arrays,
 * always with weight and bias (1 and 0 for an op without affine). */
static inline fbn_op_desc fbn_sync_apply_desc(const fbn_op *op) {
  fbn_op_desc d = op->desc;
  d.statistics = FBN_STATISTICS_RUNNING;
  d.param_dtype = FBN_DTYPE_FLOAT64;
  d.affine = true;
  return d;
}

/* Bytes of a statistics record; doubles of a gradient record; bytes of one
 * per-channel array of the op's param_dtype. */
static inline size_t fbn_sync_stats_bytes(const fbn_op *op) {
  return FBN_SYNC_HEADER_BYTES + 2 * (size_t)op->desc.num_features * sizeof(double);
}

static inline size_t fbn_sync_grad_count(const fbn_op *op) {
  return FBN_SYNC_GRAD_HEAD + 2 * (size_t)op->desc.num_features;
}

/* Bytes of the float64 weight, bias, variance and mean at the start of the
 * workspace of the apply phases. */
static inline size_t fbn_sync_param_bytes(const fbn_op *op) {
  return fbn_sync_align(4 * (size_t)op->desc.num_features * sizeof(double));
}

static inline size_t fbn_sync_pbytes(const fbn_op *op) {
  return (size_t)op->desc.num_features * fbn_dtype_size(op->desc.param_dtype);
}

/* The op can run the synchronized calls (batch statistics, a backend with
 * the sync hooks); messages name fn. */
FBN_INTERNAL fbn_status fbn_sync_check_op(const char *fn, const fbn_op *op);
/* x_desc of one shard against the op (N may be 0). */
FBN_INTERNAL fbn_status fbn_sync_check_x_desc(const char *fn, const fbn_op *op,
                                              const fbn_tensor_desc *x_desc);
/* The check headers of world_size records, stride bytes apart, against
 * the op: the status of fbn_sync_combine(); *total the summed count. A
 * header that carries a failed rank's status (the check rounds) is that
 * status, naming the rank, before any other check. */
FBN_INTERNAL fbn_status fbn_sync_check_headers(const char *fn, const fbn_op *op,
                                               const void *records, int world_size, size_t stride,
                                               int64_t *total);
/* Caller memory `name` of `have` bytes for a need of `need` (NULL only when
 * need is 0), aligned to align: INSUFFICIENT_WORKSPACE otherwise. */
FBN_INTERNAL fbn_status fbn_sync_check_memory(const char *fn, const char *name, const void *ptr,
                                              size_t have, size_t need, size_t align);
/* weight and bias: both for an affine op, neither otherwise. */
FBN_INTERNAL fbn_status fbn_sync_check_affine(const char *fn, const fbn_op *op, const void *weight,
                                              const void *bias);
/* A tensor pointer of a shard: required unless the shard is empty. */
FBN_INTERNAL fbn_status fbn_sync_check_tensor(const char *fn, const char *name, const void *p,
                                              const fbn_tensor_desc *x);
/* w64, b64 = the op's weight and bias as float64 (1 and 0 without affine). */
FBN_INTERNAL void fbn_sync_params64(const fbn_op *op, const void *weight, const void *bias,
                                    double *w64, double *b64);
/* Saved bytes and workspace bytes (either may be NULL) of the apply phases
 * for a checked shard. */
FBN_INTERNAL fbn_status fbn_sync_sizes(const char *fn, const fbn_op *op, const fbn_tensor_desc *x,
                                       size_t *saved, size_t *workspace);
/* Every check of fbn_sync_apply() (workspace of fbn_sync_workspace_size()). */
FBN_INTERNAL fbn_status fbn_sync_apply_checks(const char *fn, const fbn_op *op,
                                              const fbn_tensor_desc *x_desc, const void *x,
                                              const void *addend, const void *y, const void *weight,
                                              const void *bias, const void *saved,
                                              size_t saved_bytes, const void *workspace,
                                              size_t workspace_bytes);
/* fbn_sync_apply() after its checks passed. */
FBN_INTERNAL fbn_status fbn_sync_apply_run(const char *fn, const fbn_op *op,
                                           const fbn_tensor_desc *x_desc, const void *x,
                                           const void *addend, void *y, const void *weight,
                                           const void *bias, const double *mean, const double *var,
                                           void *saved, size_t saved_bytes, void *workspace,
                                           size_t workspace_bytes);
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
FBN_INTERNAL fbn_status fbn_sync_backward_checks(
    const char *fn, const fbn_op *op, const fbn_tensor_desc *x_desc, const void *x, const void *y,
    const void *dy, const void *saved, size_t saved_bytes, const void *weight, const void *bias,
    void *dx, void *daddend, void *dweight, void *dbias, fbn_param_grad param_grad,
    const void *workspace, size_t workspace_bytes);

#endif /* FUSEDBN_SRC_SYNC_SYNC_INTERNAL_H */
