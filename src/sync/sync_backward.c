/*
 * Synchronized batch norm, backward phases: the local reduction (the
 * backend's own backward in running-statistics mode, whose dweight/dbias
 * are the sums dz * xhat and dz) into the gradient record, and the apply
 * phase with the all-reduced record (the backend's sync hook: dx with the
 * total count).
 */
#include <math.h>
#include <string.h>

#include "sync/sync_internal.h"

/* ---- backward ----------------------------------------------------------- */

fbn_status fbn_sync_backward_checks(const char *fn, const fbn_op *op, const fbn_tensor_desc *x_desc,
                                    const void *x, const void *y, const void *dy, const void *saved,
                                    size_t saved_bytes, const void *weight, const void *bias,
                                    void *dx, void *daddend, void *dweight, void *dbias,
                                    fbn_param_grad param_grad, const void *workspace,
                                    size_t workspace_bytes) {
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_x_desc(fn, op, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_tensor(fn, "x", x, x_desc);
  if (st == FBN_STATUS_SUCCESS && fbn_operation_has_relu(op->desc.operation))
    st = fbn_sync_check_tensor(fn, "y", y, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_tensor(fn, "dy", dy, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_tensor(fn, "saved", saved, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_affine(fn, op, weight, bias);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const fbn_op_desc *o = &op->desc;
  if (daddend != NULL && !fbn_operation_has_addend(o->operation))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: daddend = %p: operation %s has no addend (pass NULL)", fn, daddend,
                     fbn_operation_name(o->operation));
  if (!o->affine && (dweight != NULL || dbias != NULL))
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: %s = %p: the op has affine = false (pass NULL)",
                     fn, dweight != NULL ? "dweight" : "dbias", dweight != NULL ? dweight : dbias);
  if (param_grad != FBN_PARAM_GRAD_OVERWRITE && param_grad != FBN_PARAM_GRAD_ACCUMULATE)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: param_grad = %d: must be FBN_PARAM_GRAD_OVERWRITE or "
                     "FBN_PARAM_GRAD_ACCUMULATE",
                     fn, (int)param_grad);
  size_t need_saved = 0, need_ws = 0;
  st = fbn_sync_sizes(fn, op, x_desc, &need_saved, &need_ws);
  if (st == FBN_STATUS_SUCCESS && x_desc->n > 0)
    st =
        fbn_sync_check_memory(fn, "saved", saved, saved_bytes, need_saved, FBN_OP_MEMORY_ALIGNMENT);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_memory(fn, "workspace", workspace, workspace_bytes, need_ws,
                               FBN_OP_MEMORY_ALIGNMENT);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const size_t bytes = x_desc->n > 0 ? fbn_desc_bytes(x_desc) : 0;
  const size_t pbytes = fbn_sync_pbytes(op);
  const fbn_span_check spans[] = {{dx, bytes, "dx"},
                                  {daddend, bytes, "daddend"},
                                  {dweight, pbytes, "dweight"},
                                  {dbias, pbytes, "dbias"},
                                  {workspace, workspace_bytes, "workspace"},
                                  {x, bytes, "x"},
                                  {y, bytes, "y"},
                                  {dy, bytes, "dy"},
                                  {saved, saved_bytes, "saved"},
                                  {weight, pbytes, "weight"},
                                  {bias, pbytes, "bias"}};
  return fbn_sync_check_spans(fn, spans, 5, sizeof spans / sizeof spans[0]);
}

void fbn_sync_store_param_grads(const fbn_op *op, const double *rec, void *dweight, void *dbias,
                                bool accumulate) {
  const int64_t c_ = op->desc.num_features;
  const fbn_dtype pt = op->desc.param_dtype;
  const double *sum_g = rec + FBN_SYNC_GRAD_HEAD, *sum_gxhat = sum_g + c_;
  for (int64_t c = 0; c < c_; c++) {
    if (dweight != NULL)
      fbn_sync_store(dweight, pt, c,
                     accumulate ? fbn_sync_load(dweight, pt, c) + sum_gxhat[c] : sum_gxhat[c]);
    if (dbias != NULL)
      fbn_sync_store(dbias, pt, c, accumulate ? fbn_sync_load(dbias, pt, c) + sum_g[c] : sum_g[c]);
  }
}

static fbn_status sync_check_grad_record(const char *fn, const fbn_op *op, const void *rec,
                                         size_t rec_bytes) {
  if (rec == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: grad_record is NULL", fn);
  return fbn_sync_check_memory(fn, "grad_record", rec, rec_bytes,
                               fbn_sync_grad_count(op) * sizeof(double), sizeof(double));
}

fbn_status fbn_sync_backward_reduce(const fbn_op *op, const fbn_tensor_desc *x_desc, const void *x,
                                    const void *y, const void *dy, const void *saved,
                                    size_t saved_bytes, const void *weight, const void *bias,
                                    double *grad_record, size_t grad_record_bytes, void *dweight,
                                    void *dbias, fbn_param_grad param_grad, void *workspace,
                                    size_t workspace_bytes) {
  static const char fn[] = "fbn_sync_backward_reduce";
  fbn_clear_error();
  fbn_status st =
      fbn_sync_backward_checks(fn, op, x_desc, x, y, dy, saved, saved_bytes, weight, bias, NULL,
                               NULL, dweight, dbias, param_grad, workspace, workspace_bytes);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_grad_record(fn, op, grad_record, grad_record_bytes);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const int64_t c_ = op->desc.num_features;
  const size_t rec_bytes = fbn_sync_grad_count(op) * sizeof(double);
  const size_t pbytes = fbn_sync_pbytes(op);
  const size_t bytes = x_desc->n > 0 ? fbn_desc_bytes(x_desc) : 0;
  const fbn_span_check spans[] = {{grad_record, rec_bytes, "grad_record"},
                                  {x, bytes, "x"},
                                  {y, bytes, "y"},
                                  {dy, bytes, "dy"},
                                  {saved, saved_bytes, "saved"},
                                  {dweight, pbytes, "dweight"},
                                  {dbias, pbytes, "dbias"},
                                  {workspace, workspace_bytes, "workspace"},
                                  {weight, pbytes, "weight"},
                                  {bias, pbytes, "bias"}};
  st = fbn_sync_check_spans(fn, spans, 1, sizeof spans / sizeof spans[0]);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  double *sum_g = grad_record + FBN_SYNC_GRAD_HEAD, *sum_gxhat = sum_g + c_;
  if (x_desc->n > 0) {
    const fbn_op_desc ad = fbn_sync_apply_desc(op);
    double *w64 = workspace, *b64 = w64 + c_;
    fbn_sync_params64(op, weight, bias, w64, b64);
    const size_t off = fbn_sync_param_bytes(op), rest = workspace_bytes - off;
    const fbn_bk_backward_args args = {
        .op = &ad,
        .state = op->state,
        .desc = x_desc,
        .x = x,
        .y = y,
        .dy = dy,
        .saved = saved,
        .saved_bytes = saved_bytes,
        .weight = w64,
        .bias = b64,
        .dx = NULL,
        .daddend = NULL,
        /* running-statistics backward: dweight = sum g * xhat, dbias = sum g */
        .dweight = sum_gxhat,
        .dbias = sum_g,
        .accumulate = false,
        .workspace = rest > 0 ? (char *)workspace + off : NULL,
        .workspace_bytes = rest,
        .exec = NULL,
    };
    st = op->backend->backward(&args);
    if (st != FBN_STATUS_SUCCESS)
      return fbn_error_prefix(st, fn);
  } else {
    memset(sum_g, 0, 2 * (size_t)c_ * sizeof(double));
  }
  grad_record[0] = (double)(x_desc->n * x_desc->h * x_desc->w);
  grad_record[1] = 1.0;
  grad_record[2] = (double)c_;
  grad_record[3] = 0.0;
  fbn_sync_store_param_grads(op, grad_record, dweight, dbias,
                             param_grad == FBN_PARAM_GRAD_ACCUMULATE);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_sync_backward_apply(const fbn_op *op, const fbn_tensor_desc *x_desc, const void *x,
                                   const void *y, const void *dy, const void *saved,
                                   size_t saved_bytes, const void *weight, const void *bias,
                                   const double *grad_record, size_t grad_record_bytes, void *dx,
                                   void *daddend, void *dweight, void *dbias,
                                   fbn_param_grad param_grad, void *workspace,
                                   size_t workspace_bytes) {
  static const char fn[] = "fbn_sync_backward_apply";
  fbn_clear_error();
  fbn_status st =
      fbn_sync_backward_checks(fn, op, x_desc, x, y, dy, saved, saved_bytes, weight, bias, dx,
                               daddend, dweight, dbias, param_grad, workspace, workspace_bytes);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_grad_record(fn, op, grad_record, grad_record_bytes);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const int64_t c_ = op->desc.num_features;
  const size_t rec_bytes = fbn_sync_grad_count(op) * sizeof(double);
  const size_t bytes = x_desc->n > 0 ? fbn_desc_bytes(x_desc) : 0;
  const size_t pbytes = fbn_sync_pbytes(op);
  const fbn_span_check spans[] = {{dx, bytes, "dx"},
                                  {daddend, bytes, "daddend"},
                                  {dweight, pbytes, "dweight"},
                                  {dbias, pbytes, "dbias"},
                                  {grad_record, rec_bytes, "grad_record"}};
  st = fbn_sync_check_spans(fn, spans, 4, sizeof spans / sizeof spans[0]);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const double total = grad_record[0], ranks = grad_record[1], cs = grad_record[2];
  const double local = (double)(x_desc->n * x_desc->h * x_desc->w);
  if (!(ranks >= 1.0) || cs != ranks * (double)c_)
    return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                     "%s: grad_record has %g ranks with %g channels in all: every rank must "
                     "have C = %lld (all-reduce SUM the records of fbn_sync_backward_reduce)",
                     fn, ranks, cs, (long long)c_);
  if (!(total >= local && total >= 1.0) || total != floor(total) || total > 9007199254740992.0)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: grad_record count = %g: the total count must be an integer >= this "
                     "shard's %g",
                     fn, total, local);

  const double *sum_g = grad_record + FBN_SYNC_GRAD_HEAD, *sum_gxhat = sum_g + c_;
  if (x_desc->n > 0 && (dx != NULL || daddend != NULL)) {
    const fbn_op_desc ad = fbn_sync_apply_desc(op);
    double *w64 = workspace, *b64 = w64 + c_;
    fbn_sync_params64(op, weight, bias, w64, b64);
    const fbn_bk_backward_args args = {
        .op = &ad,
        .state = op->state,
        .desc = x_desc,
        .x = x,
        .y = y,
        .dy = dy,
        .saved = saved,
        .saved_bytes = saved_bytes,
        .weight = w64,
        .bias = b64,
        .dx = dx,
        .daddend = daddend,
        .exec = NULL,
    };
    st = fbn_backend_sync_hooks(op->backend)
             ->backward_apply(&args, sum_g, sum_gxhat, (int64_t)total);
    if (st != FBN_STATUS_SUCCESS)
      return fbn_error_prefix(st, fn);
  }
  fbn_sync_store_param_grads(op, grad_record, dweight, dbias,
                             param_grad == FBN_PARAM_GRAD_ACCUMULATE);
  return FBN_STATUS_SUCCESS;
}
