/*
 * The callback adapter of synchronized batch norm (fbn_sync_comm): the
 * whole forward / backward through a caller's allgather and allreduce-sum,
 * on the split phases of sync.c. Workspace layout of fbn_sync_forward():
 *
 *   | own record | W check headers | W records | mean[C] var[C] |
 *   | running_mean, running_var copies | fbn_sync_workspace_size() |
 *
 * and of fbn_sync_backward(): | gradient record | its local copy |
 * fbn_sync_workspace_size() |, each part FBN_OP_MEMORY_ALIGNMENT-aligned.
 * Running statistics and parameter gradients are written back only after
 * every collective and the apply phase succeeded.
 */
#include <string.h>

#include "sync/sync_internal.h"

#define FBN_SYNC_ERROR_BYTES 512

static fbn_status sync_check_comm(const char *fn, const fbn_sync_comm *comm) {
  if (comm == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: comm is NULL", fn);
  if (comm->world_size < 1)
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: comm->world_size = %d: must be >= 1", fn,
                     comm->world_size);
  if (comm->rank < 0 || comm->rank >= comm->world_size)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: comm->rank = %d: must be in [0, world_size = %d)", fn, comm->rank,
                     comm->world_size);
  if (comm->allgather == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: comm->allgather is NULL", fn);
  if (comm->allreduce_sum == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: comm->allreduce_sum is NULL", fn);
  return FBN_STATUS_SUCCESS;
}

/* The status of a failed callback, with its message. */
static fbn_status sync_callback_failed(const char *fn, const char *which, fbn_status st,
                                       char *error) {
  error[FBN_SYNC_ERROR_BYTES - 1] = '\0';
  if (st == FBN_STATUS_SUCCESS)
    st = FBN_STATUS_DEVICE_ERROR;
  return fbn_error(st, "%s: the %s callback failed with %s: %s", fn, which, fbn_status_string(st),
                   error[0] != '\0' ? error : "(no message)");
}

typedef struct sync_fwd_layout {
  size_t record, headers, records, stats, running, apply, total;
} sync_fwd_layout;

static fbn_status sync_fwd_layout_of(const char *fn, const fbn_op *op, const fbn_tensor_desc *x,
                                     int world_size, sync_fwd_layout *l) {
  size_t rec = 0, ws = 0;
  fbn_status st = fbn_sync_stats_record_size(op, &rec);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_workspace_size(op, x, &ws);
  if (st != FBN_STATUS_SUCCESS)
    return fbn_error_prefix(st, fn);
  const size_t c = (size_t)op->desc.num_features;
  const size_t w = (size_t)world_size;
  l->record = 0;
  l->headers = l->record + fbn_sync_align(rec);
  l->records = l->headers + fbn_sync_align(w * FBN_SYNC_HEADER_BYTES);
  l->stats = l->records + fbn_sync_align(w * rec);
  l->running = l->stats + fbn_sync_align(2 * c * sizeof(double));
  l->apply = l->running + fbn_sync_align(2 * c * fbn_dtype_size(op->desc.param_dtype));
  l->total = l->apply + ws;
  return FBN_STATUS_SUCCESS;
}

typedef struct sync_bwd_layout {
  size_t record, local, apply, total;
} sync_bwd_layout;

static fbn_status sync_bwd_layout_of(const char *fn, const fbn_op *op, const fbn_tensor_desc *x,
                                     sync_bwd_layout *l) {
  size_t rec = 0, ws = 0;
  fbn_status st = fbn_sync_grad_record_size(op, &rec);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_workspace_size(op, x, &ws);
  if (st != FBN_STATUS_SUCCESS)
    return fbn_error_prefix(st, fn);
  l->record = 0;
  l->local = fbn_sync_align(rec);
  l->apply = l->local + fbn_sync_align(rec);
  l->total = l->apply + ws;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_sync_comm_workspace_size(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                        int world_size, size_t *bytes) {
  static const char fn[] = "fbn_sync_comm_workspace_size";
  fbn_clear_error();
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_x_desc(fn, op, x_desc);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (world_size < 1)
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: world_size = %d: must be >= 1", fn, world_size);
  if (bytes == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: bytes is NULL", fn);
  sync_fwd_layout f = {0};
  sync_bwd_layout b = {0};
  st = sync_fwd_layout_of(fn, op, x_desc, world_size, &f);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_bwd_layout_of(fn, op, x_desc, &b);
  if (st == FBN_STATUS_SUCCESS)
    *bytes = f.total > b.total ? f.total : b.total;
  return st;
}

static fbn_status sync_check_ws(const char *fn, const void *ws, size_t have, size_t need) {
  if (ws == NULL)
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                     "%s: workspace is NULL: this call needs %zu bytes of it "
                     "(fbn_sync_comm_workspace_size)",
                     fn, need);
  if (have < need)
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                     "%s: workspace_bytes = %zu: this op, shape and world size need at least "
                     "%zu bytes (fbn_sync_comm_workspace_size)",
                     fn, have, need);
  if ((uintptr_t)ws % FBN_OP_MEMORY_ALIGNMENT != 0)
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                     "%s: workspace = %p: must be aligned to %d bytes", fn, ws,
                     FBN_OP_MEMORY_ALIGNMENT);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_sync_forward(const fbn_op *op, const fbn_sync_comm *comm,
                            const fbn_tensor_desc *x_desc, const void *x, const void *addend,
                            void *y, const void *weight, const void *bias, void *running_mean,
                            void *running_var, double factor, void *saved, size_t saved_bytes,
                            void *workspace, size_t workspace_bytes) {
  static const char fn[] = "fbn_sync_forward";
  fbn_clear_error();
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_comm(fn, comm);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_x_desc(fn, op, x_desc);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  sync_fwd_layout l = {0};
  st = sync_fwd_layout_of(fn, op, x_desc, comm->world_size, &l);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_ws(fn, workspace, workspace_bytes, l.total);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  char *ws = workspace;
  st = fbn_sync_apply_checks(fn, op, x_desc, x, addend, y, weight, bias, saved, saved_bytes,
                             ws + l.apply, workspace_bytes - l.apply);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if ((running_mean == NULL) != (running_var == NULL))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: running_mean = %p, running_var = %p: give both (to update them) or "
                     "neither",
                     fn, running_mean, running_var);
  if (running_mean != NULL && !(factor >= 0.0 && factor <= 1.0))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: factor = %g: the running-average factor must be in [0, 1]", fn, factor);
  const size_t pbytes = (size_t)op->desc.num_features * fbn_dtype_size(op->desc.param_dtype);
  const size_t bytes = x_desc->n > 0 ? fbn_desc_bytes(x_desc) : 0;
  {
    const fbn_span_check spans[] = {{running_mean, pbytes, "running_mean"},
                                    {running_var, pbytes, "running_var"},
                                    {x, bytes, "x"},
                                    {addend, bytes, "addend"},
                                    {y, bytes, "y"},
                                    {weight, pbytes, "weight"},
                                    {bias, pbytes, "bias"},
                                    {saved, saved_bytes, "saved"},
                                    {workspace, workspace_bytes, "workspace"}};
    for (size_t i = 0; i < 2; i++)
      for (size_t j = 0; j < sizeof spans / sizeof spans[0]; j++)
        if (i != j && fbn_overlap(spans[i].ptr, spans[i].bytes, spans[j].ptr, spans[j].bytes))
          return fbn_error(FBN_STATUS_ALIASING, "%s: %s overlaps %s", fn, spans[i].name,
                           spans[j].name);
  }

  size_t rec_bytes = 0;
  (void)fbn_sync_stats_record_size(op, &rec_bytes);
  st = fbn_sync_stats(op, x_desc, x, ws + l.record, rec_bytes);
  if (st != FBN_STATUS_SUCCESS)
    return fbn_error_prefix(st, fn);
  fbn_clear_error();

  /* the fixed-size check headers first: ranks that disagree on C would
   * otherwise enter an all-gather of different sizes */
  const int w = comm->world_size;
  char error[FBN_SYNC_ERROR_BYTES] = "";
  st = comm->allgather(comm->context, ws + l.record, ws + l.headers, FBN_SYNC_HEADER_BYTES, error,
                       sizeof error);
  if (st != FBN_STATUS_SUCCESS)
    return sync_callback_failed(fn, "allgather", st, error);
  int64_t total = 0;
  st = fbn_sync_check_headers(fn, op, ws + l.headers, w, FBN_SYNC_HEADER_BYTES, &total);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  st =
      comm->allgather(comm->context, ws + l.record, ws + l.records, rec_bytes, error, sizeof error);
  if (st != FBN_STATUS_SUCCESS)
    return sync_callback_failed(fn, "allgather", st, error);
  st = fbn_sync_check_headers(fn, op, ws + l.records, w, rec_bytes, &total);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  double *mean = (double *)(void *)(ws + l.stats), *var = mean + op->desc.num_features;
  void *rm = NULL, *rv = NULL;
  if (running_mean != NULL) {
    rm = ws + l.running;
    rv = ws + l.running + pbytes;
    memcpy(rm, running_mean, pbytes);
    memcpy(rv, running_var, pbytes);
  }
  fbn_sync_combine_run(op, ws + l.records, w, rec_bytes, total, mean, var, rm, rv, factor);
  st = fbn_sync_apply_run(fn, op, x_desc, x, addend, y, weight, bias, mean, var, saved, saved_bytes,
                          ws + l.apply, workspace_bytes - l.apply);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (running_mean != NULL) {
    memcpy(running_mean, rm, pbytes);
    memcpy(running_var, rv, pbytes);
  }
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_sync_backward(const fbn_op *op, const fbn_sync_comm *comm,
                             const fbn_tensor_desc *x_desc, const void *x, const void *y,
                             const void *dy, const void *saved, size_t saved_bytes,
                             const void *weight, const void *bias, void *dx, void *daddend,
                             void *dweight, void *dbias, fbn_param_grad param_grad,
                             fbn_sync_grad_scope scope, void *workspace, size_t workspace_bytes) {
  static const char fn[] = "fbn_sync_backward";
  fbn_clear_error();
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_comm(fn, comm);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_x_desc(fn, op, x_desc);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (scope != FBN_SYNC_GRAD_LOCAL && scope != FBN_SYNC_GRAD_GLOBAL)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: scope = %d: must be FBN_SYNC_GRAD_LOCAL or FBN_SYNC_GRAD_GLOBAL", fn,
                     (int)scope);
  sync_bwd_layout l = {0};
  st = sync_bwd_layout_of(fn, op, x_desc, &l);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_ws(fn, workspace, workspace_bytes, l.total);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  char *ws = workspace;
  st = fbn_sync_backward_checks(fn, op, x_desc, x, y, dy, saved, saved_bytes, weight, bias, dx,
                                daddend, dweight, dbias, param_grad, ws + l.apply,
                                workspace_bytes - l.apply);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  {
    const size_t pbytes = (size_t)op->desc.num_features * fbn_dtype_size(op->desc.param_dtype);
    const fbn_span_check outs[] = {{dx, x_desc->n > 0 ? fbn_desc_bytes(x_desc) : 0, "dx"},
                                   {daddend, x_desc->n > 0 ? fbn_desc_bytes(x_desc) : 0, "daddend"},
                                   {dweight, pbytes, "dweight"},
                                   {dbias, pbytes, "dbias"}};
    for (size_t j = 0; j < sizeof outs / sizeof outs[0]; j++)
      if (fbn_overlap(workspace, workspace_bytes, outs[j].ptr, outs[j].bytes))
        return fbn_error(FBN_STATUS_ALIASING, "%s: workspace overlaps %s", fn, outs[j].name);
  }
  size_t rec_bytes = 0;
  (void)fbn_sync_grad_record_size(op, &rec_bytes);
  double *rec = (double *)(void *)(ws + l.record);
  double *local = (double *)(void *)(ws + l.local);
  st = fbn_sync_backward_reduce(op, x_desc, x, y, dy, saved, saved_bytes, weight, bias, rec,
                                rec_bytes, NULL, NULL, param_grad, ws + l.apply,
                                workspace_bytes - l.apply);
  if (st != FBN_STATUS_SUCCESS)
    return fbn_error_prefix(st, fn);
  fbn_clear_error();
  memcpy(local, rec, rec_bytes);
  char error[FBN_SYNC_ERROR_BYTES] = "";
  st = comm->allreduce_sum(comm->context, rec, rec_bytes / sizeof(double), error, sizeof error);
  if (st != FBN_STATUS_SUCCESS)
    return sync_callback_failed(fn, "allreduce_sum", st, error);
  st = fbn_sync_backward_apply(op, x_desc, x, y, dy, saved, saved_bytes, weight, bias, rec,
                               rec_bytes, dx, daddend, NULL, NULL, param_grad, ws + l.apply,
                               workspace_bytes - l.apply);
  if (st != FBN_STATUS_SUCCESS)
    return fbn_error_prefix(st, fn);
  fbn_clear_error();
  fbn_sync_store_param_grads(op, scope == FBN_SYNC_GRAD_GLOBAL ? rec : local, dweight, dbias,
                             param_grad == FBN_PARAM_GRAD_ACCUMULATE);
  return FBN_STATUS_SUCCESS;
}
