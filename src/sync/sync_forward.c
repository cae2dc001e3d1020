/*
 * Synchronized batch norm, forward phases: the statistics record with its
 * check header, the exact merge of the ranks' records (core/bn_merge.h) with
 * the running-statistics update, and the apply phase: the backend's own
 * forward in running-statistics mode with float64 per-channel arrays (the
 * combined mean and biased variance in place of the running ones).
 */
#include <math.h>
#include <string.h>

#include "core/bn_formulas.h"
#include "core/bn_merge.h"
#include "sync/sync_internal.h"

/* ---- statistics record -------------------------------------------------- */

fbn_status fbn_sync_stats(const fbn_op *op, const fbn_tensor_desc *x_desc, const void *x,
                          void *record, size_t record_bytes) {
  static const char fn[] = "fbn_sync_stats";
  fbn_clear_error();
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_x_desc(fn, op, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_tensor(fn, "x", x, x_desc);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (record == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: record is NULL", fn);
  st = fbn_sync_check_memory(fn, "record", record, record_bytes, fbn_sync_stats_bytes(op),
                             sizeof(double));
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const fbn_span_check spans[] = {{record, fbn_sync_stats_bytes(op), "record"},
                                  {x, x_desc->n > 0 ? fbn_desc_bytes(x_desc) : 0, "x"}};
  st = fbn_sync_check_spans(fn, spans, 1, 2);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  const int64_t c_ = op->desc.num_features;
  double *mean = (double *)(void *)((char *)record + FBN_SYNC_HEADER_BYTES);
  double *m2 = mean + c_;
  if (x_desc->n > 0) {
    st = fbn_backend_sync_hooks(op->backend)->stats(&op->desc, op->state, x_desc, x, mean, m2);
    if (st != FBN_STATUS_SUCCESS)
      return fbn_error_prefix(st, fn);
  } else {
    memset(mean, 0, 2 * (size_t)c_ * sizeof(double));
  }
  fbn_sync_make_header(op, x_desc->n * x_desc->h * x_desc->w, FBN_STATUS_SUCCESS, record);
  return FBN_STATUS_SUCCESS;
}

void fbn_sync_make_header(const fbn_op *op, int64_t count, fbn_status status, void *out) {
  fbn_sync_header h;
  memset(&h, 0, sizeof h);
  h.magic = FBN_SYNC_MAGIC;
  h.version = FBN_SYNC_RECORD_VERSION;
  if (op != NULL) {
    h.dtype = (int32_t)op->desc.dtype;
    h.param_dtype = (int32_t)op->desc.param_dtype;
    h.operation = (int32_t)op->desc.operation;
    h.affine = op->desc.affine ? 1 : 0;
    h.c = op->desc.num_features;
    h.eps = op->desc.eps;
  }
  h.status = (int32_t)status;
  h.count = count;
  memset(out, 0, FBN_SYNC_HEADER_BYTES);
  memcpy(out, &h, sizeof h);
}

/* ---- combine ------------------------------------------------------------ */

fbn_status fbn_sync_check_headers(const char *fn, const fbn_op *op, const void *records,
                                  int world_size, size_t stride, int64_t *total) {
  const fbn_op_desc *o = &op->desc;
  int64_t sum = 0;
  for (int r = 0; r < world_size; r++) {
    fbn_sync_header h;
    memcpy(&h, (const char *)records + (size_t)r * stride, sizeof h);
    if (h.magic != FBN_SYNC_MAGIC || h.version != FBN_SYNC_RECORD_VERSION)
      return fbn_error(FBN_STATUS_INVALID_STATE,
                       "%s: the record of rank %d (magic %#llx, version %u) is not a statistics "
                       "record of fbn_sync_stats version %d",
                       fn, r, (unsigned long long)h.magic, (unsigned)h.version,
                       FBN_SYNC_RECORD_VERSION);
    if (h.status != 0) {
      /* a status outside the enum is not one of a rank of this library */
      const fbn_status rs =
          h.status > 0 && strcmp(fbn_status_string((fbn_status)h.status), "FBN_STATUS_UNKNOWN") != 0
              ? (fbn_status)h.status
              : FBN_STATUS_INVALID_STATE;
      return fbn_error(rs,
                       "%s: rank %d failed with %s (status %d) before the exchange (its own "
                       "message names the cause): nothing written on any rank",
                       fn, r, fbn_status_string(rs), (int)h.status);
    }
  }
  for (int r = 0; r < world_size; r++) {
    fbn_sync_header h;
    memcpy(&h, (const char *)records + (size_t)r * stride, sizeof h);
    if (h.c != o->num_features)
      return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                       "%s: rank %d has C = %lld, this rank's op has num_features = %lld: every "
                       "rank must have the same channels",
                       fn, r, (long long)h.c, (long long)o->num_features);
    if (h.dtype != (int32_t)o->dtype)
      return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                       "%s: rank %d has dtype %s, this rank's op %s: every rank must have the "
                       "same dtype",
                       fn, r, fbn_dtype_name((fbn_dtype)h.dtype), fbn_dtype_name(o->dtype));
    if (h.param_dtype != (int32_t)o->param_dtype || h.operation != (int32_t)o->operation ||
        h.affine != (o->affine ? 1 : 0) || h.eps != o->eps)
      return fbn_error(FBN_STATUS_INVALID_VALUE,
                       "%s: rank %d has param_dtype %s, operation %s, affine %d, eps %g; this "
                       "rank's op %s, %s, %d, %g: every rank must run the same op",
                       fn, r, fbn_dtype_name((fbn_dtype)h.param_dtype),
                       fbn_operation_name((fbn_operation)h.operation), (int)h.affine, h.eps,
                       fbn_dtype_name(o->param_dtype), fbn_operation_name(o->operation),
                       o->affine ? 1 : 0, o->eps);
    if (h.count < 0 || __builtin_add_overflow(sum, h.count, &sum))
      return fbn_error(FBN_STATUS_INVALID_STATE,
                       "%s: the record of rank %d has count %lld: counts must be >= 0 and their "
                       "sum must fit int64",
                       fn, r, (long long)h.count);
  }
  if (sum < 2)
    return fbn_error(FBN_STATUS_INVALID_SHAPE,
                     "%s: %lld value(s) per channel over the %d ranks: batch statistics need "
                     "more than 1",
                     fn, (long long)sum, world_size);
  *total = sum;
  return FBN_STATUS_SUCCESS;
}

void fbn_sync_combine_run(const fbn_op *op, const void *records, int world_size, size_t stride,
                          int64_t total, double *mean_out, double *var_out, void *running_mean,
                          void *running_var, double factor) {
  const int64_t c_ = op->desc.num_features;
  const fbn_dtype pt = op->desc.param_dtype;
  for (int64_t c = 0; c < c_; c++) {
    double n = 0.0, mean = 0.0, m2 = 0.0;
    for (int r = 0; r < world_size; r++) {
      const char *rec = (const char *)records + (size_t)r * stride;
      fbn_sync_header h;
      memcpy(&h, rec, sizeof h);
      double mb, m2b;
      memcpy(&mb, rec + FBN_SYNC_HEADER_BYTES + (size_t)c * sizeof(double), sizeof mb);
      memcpy(&m2b, rec + FBN_SYNC_HEADER_BYTES + (size_t)(c_ + c) * sizeof(double), sizeof m2b);
      fbn_bn_merge(&n, &mean, &m2, (double)h.count, mb, m2b);
    }
    mean_out[c] = mean;
    var_out[c] = m2 / (double)total; /* biased: normalizes */
    if (running_mean != NULL) {
      const double unbiased = m2 / (double)(total - 1);
      fbn_sync_store(running_mean, pt, c,
                     fbn_bn_running_update(fbn_sync_load(running_mean, pt, c), factor, mean));
      fbn_sync_store(running_var, pt, c,
                     fbn_bn_running_update(fbn_sync_load(running_var, pt, c), factor, unbiased));
    }
  }
}

fbn_status fbn_sync_combine(const fbn_op *op, const void *records, int world_size,
                            size_t record_bytes, double *mean, double *var, void *running_mean,
                            void *running_var, double factor, int64_t *total_count) {
  static const char fn[] = "fbn_sync_combine";
  fbn_clear_error();
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (records == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: records is NULL", fn);
  if (mean == NULL || var == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: %s is NULL", fn, mean == NULL ? "mean" : "var");
  if (world_size < 1)
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: world_size = %d: must be >= 1", fn, world_size);
  if (record_bytes < fbn_sync_stats_bytes(op) || record_bytes % sizeof(double) != 0)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: record_bytes = %zu: must be a multiple of 8 and at least %zu "
                     "(fbn_sync_stats_record_size)",
                     fn, record_bytes, fbn_sync_stats_bytes(op));
  if ((running_mean == NULL) != (running_var == NULL))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: running_mean = %p, running_var = %p: give both (to update them) or "
                     "neither",
                     fn, running_mean, running_var);
  if (running_mean != NULL && !(factor >= 0.0 && factor <= 1.0))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: factor = %g: the running-average factor must be in [0, 1]", fn, factor);
  const size_t cbytes = (size_t)op->desc.num_features * sizeof(double);
  const size_t all = (size_t)world_size * record_bytes;
  const fbn_span_check spans[] = {{mean, cbytes, "mean"},
                                  {var, cbytes, "var"},
                                  {running_mean, fbn_sync_pbytes(op), "running_mean"},
                                  {running_var, fbn_sync_pbytes(op), "running_var"},
                                  {records, all, "records"}};
  st = fbn_sync_check_spans(fn, spans, 4, 5);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  int64_t total = 0;
  st = fbn_sync_check_headers(fn, op, records, world_size, record_bytes, &total);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  fbn_sync_combine_run(op, records, world_size, record_bytes, total, mean, var, running_mean,
                       running_var, factor);
  if (total_count != NULL)
    *total_count = total;
  return FBN_STATUS_SUCCESS;
}

/* ---- forward apply ------------------------------------------------------ */

fbn_status fbn_sync_apply_checks(const char *fn, const fbn_op *op, const fbn_tensor_desc *x_desc,
                                 const void *x, const void *addend, const void *y,
                                 const void *weight, const void *bias, const void *saved,
                                 size_t saved_bytes, const void *workspace,
                                 size_t workspace_bytes) {
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_x_desc(fn, op, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_tensor(fn, "x", x, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_tensor(fn, "y", y, x_desc);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const fbn_op_desc *o = &op->desc;
  if (fbn_operation_has_addend(o->operation))
    st = fbn_sync_check_tensor(fn, "addend", addend, x_desc);
  else if (addend != NULL)
    st = fbn_error(FBN_STATUS_INVALID_VALUE,
                   "%s: addend = %p: operation %s takes no addend (pass NULL)", fn, addend,
                   fbn_operation_name(o->operation));
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_affine(fn, op, weight, bias);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  size_t need_saved = 0, need_ws = 0;
  st = fbn_sync_sizes(fn, op, x_desc, &need_saved, &need_ws);
  if (st == FBN_STATUS_SUCCESS && saved != NULL)
    st =
        fbn_sync_check_memory(fn, "saved", saved, saved_bytes, need_saved, FBN_OP_MEMORY_ALIGNMENT);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_memory(fn, "workspace", workspace, workspace_bytes, need_ws,
                               FBN_OP_MEMORY_ALIGNMENT);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const size_t bytes = x_desc->n > 0 ? fbn_desc_bytes(x_desc) : 0;
  const size_t pbytes = fbn_sync_pbytes(op);
  const fbn_span_check spans[] = {{y, bytes, "y"},
                                  {saved, saved_bytes, "saved"},
                                  {workspace, workspace_bytes, "workspace"},
                                  {x, bytes, "x"},
                                  {addend, bytes, "addend"},
                                  {weight, pbytes, "weight"},
                                  {bias, pbytes, "bias"}};
  return fbn_sync_check_spans(fn, spans, 3, sizeof spans / sizeof spans[0]);
}

fbn_status fbn_sync_apply_run(const char *fn, const fbn_op *op, const fbn_tensor_desc *x_desc,
                              const void *x, const void *addend, void *y, const void *weight,
                              const void *bias, const double *mean, const double *var, void *saved,
                              size_t saved_bytes, void *workspace, size_t workspace_bytes) {
  if (x_desc->n == 0)
    return FBN_STATUS_SUCCESS;
  const fbn_op_desc ad = fbn_sync_apply_desc(op);
  const int64_t c_ = op->desc.num_features;
  double *w64 = workspace, *b64 = w64 + c_, *v64 = b64 + c_, *m64 = v64 + c_;
  fbn_sync_params64(op, weight, bias, w64, b64);
  /* the running path's invstd is 1/sqrt(var + eps); batch statistics give
   * a constant channel with eps = 0 invstd 0 (PyTorch's rule), which
   * 1/sqrt(+inf) is */
  for (int64_t c = 0; c < c_; c++) {
    m64[c] = mean[c];
    v64[c] = var[c] == 0.0 && op->desc.eps == 0.0 ? INFINITY : var[c];
  }
  const size_t off = fbn_sync_param_bytes(op);
  const size_t rest = workspace_bytes - off;
  const fbn_bk_forward_args args = {
      .op = &ad,
      .state = op->state,
      .desc = x_desc,
      .x = x,
      .addend = addend,
      .y = y,
      .weight = w64,
      .bias = b64,
      /* only read in running-statistics mode */
      .running_mean = m64,
      .running_var = v64,
      .update_running = false,
      .factor = 0.0,
      .saved = saved,
      .saved_bytes = saved != NULL ? saved_bytes : 0,
      .workspace = rest > 0 ? (char *)workspace + off : NULL,
      .workspace_bytes = rest,
      .exec = NULL,
  };
  fbn_status st = op->backend->forward(&args);
  return st == FBN_STATUS_SUCCESS ? st : fbn_error_prefix(st, fn);
}

fbn_status fbn_sync_apply(const fbn_op *op, const fbn_tensor_desc *x_desc, const void *x,
                          const void *addend, void *y, const void *weight, const void *bias,
                          const double *mean, const double *var, void *saved, size_t saved_bytes,
                          void *workspace, size_t workspace_bytes) {
  static const char fn[] = "fbn_sync_apply";
  fbn_clear_error();
  fbn_status st = fbn_sync_apply_checks(fn, op, x_desc, x, addend, y, weight, bias, saved,
                                        saved_bytes, workspace, workspace_bytes);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (mean == NULL || var == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: %s is NULL", fn, mean == NULL ? "mean" : "var");
  return fbn_sync_apply_run(fn, op, x_desc, x, addend, y, weight, bias, mean, var, saved,
                            saved_bytes, workspace, workspace_bytes);
}
