/*
 * The callback adapter of synchronized batch norm (fbn_sync_comm): the
 * whole forward / backward through a caller's allgather and allreduce-sum,
 * on the split phases (sync_forward.c, sync_backward.c). Each call first
 * runs its local checks and local phase, then a check round: every rank
 * all-gathers its fixed-size check header (the op's fields, its count, and
 * its local status), so that a rank that failed on its own (an argument,
 * its workspace, an overlap, the backend's local phase) still takes part
 * and every rank returns a status instead of waiting in a collective the
 * failed rank never enters. Only a rank whose comm itself is unusable (NULL,
 * world_size or rank out of range, a NULL callback) returns at once.
 *
 * Workspace layout of fbn_sync_forward():
 *
 *   | own record | W check headers | W records | mean[C] var[C] |
 *   | running_mean, running_var copies | fbn_sync_workspace_size() |
 *
 * and of fbn_sync_backward(): | gradient record | its local copy |
 * W check headers | fbn_sync_workspace_size() |, each part
 * FBN_OP_MEMORY_ALIGNMENT-aligned. A failed rank writes nothing into the
 * workspace: it receives the W headers into a stack buffer (up to
 * SYNC_STACK_RANKS ranks) or, past that, a heap buffer of that failure
 * path only. Running statistics and parameter gradients are written back
 * only after every collective and the apply phase succeeded.
 */
#include <stdlib.h>
#include <string.h>

#include "sync/sync_internal.h"

#define FBN_SYNC_ERROR_BYTES 512
/* Ranks whose check headers a failed rank receives on its stack. */
#define SYNC_STACK_RANKS 16

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
  size_t record, local, headers, apply, total;
} sync_bwd_layout;

static fbn_status sync_bwd_layout_of(const char *fn, const fbn_op *op, const fbn_tensor_desc *x,
                                     int world_size, sync_bwd_layout *l) {
  size_t rec = 0, ws = 0;
  fbn_status st = fbn_sync_grad_record_size(op, &rec);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_workspace_size(op, x, &ws);
  if (st != FBN_STATUS_SUCCESS)
    return fbn_error_prefix(st, fn);
  l->record = 0;
  l->local = fbn_sync_align(rec);
  l->headers = l->local + fbn_sync_align(rec);
  l->apply = l->headers + fbn_sync_align((size_t)world_size * FBN_SYNC_HEADER_BYTES);
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
    st = sync_bwd_layout_of(fn, op, x_desc, world_size, &b);
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


/*
 * The check round. A rank whose local part succeeded (local SUCCESS) sends
 * own (its header) and receives the W headers into recv (W *
 * FBN_SYNC_HEADER_BYTES of its workspace), then checks them: a rank that
 * reported a failure is that rank's status on this one, C or an op field
 * disagreeing the status of fbn_sync_combine(); *total is the summed count.
 * A rank that failed sends a header carrying its status and returns it
 * with its own message, whatever the collective does.
 */
static fbn_status sync_check_round(const char *fn, const fbn_sync_comm *comm, const fbn_op *op,
                                   fbn_status local, const void *own, void *recv, int64_t *total) {
  char error[FBN_SYNC_ERROR_BYTES] = "";
  if (local != FBN_STATUS_SUCCESS) {
    unsigned char header[FBN_SYNC_HEADER_BYTES];
    fbn_sync_make_header(op, 0, local, header);
    _Alignas(8) unsigned char stack[SYNC_STACK_RANKS * FBN_SYNC_HEADER_BYTES];
    const size_t need = (size_t)comm->world_size * FBN_SYNC_HEADER_BYTES;
    void *buf = need <= sizeof stack ? stack : malloc(need);
    /* without memory for the headers this rank cannot take part (the
     * others then wait in the round: the communicator's timeout) */
    if (buf != NULL)
      (void)comm->allgather(comm->context, header, buf, FBN_SYNC_HEADER_BYTES, error,
                            sizeof error);
    if (buf != stack)
      free(buf);
    return local; /* its message is still the one of the local failure */
  }
  fbn_status st =
      comm->allgather(comm->context, own, recv, FBN_SYNC_HEADER_BYTES, error, sizeof error);
  if (st != FBN_STATUS_SUCCESS)
    return sync_callback_failed(fn, "allgather", st, error);
  return fbn_sync_check_headers(fn, op, recv, comm->world_size, FBN_SYNC_HEADER_BYTES, total);
}

/* Every local part of fbn_sync_forward() before its check round: the
 * checks, the layout (*l) and this rank's statistics record. */
static fbn_status sync_forward_local(const char *fn, const fbn_op *op, const fbn_sync_comm *comm,
                                     const fbn_tensor_desc *x_desc, const void *x,
                                     const void *addend, void *y, const void *weight,
                                     const void *bias, void *running_mean, void *running_var,
                                     double factor, void *saved, size_t saved_bytes,
                                     void *workspace, size_t workspace_bytes,
                                     sync_fwd_layout *l) {
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_x_desc(fn, op, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_fwd_layout_of(fn, op, x_desc, comm->world_size, l);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_ws(fn, workspace, workspace_bytes, l->total);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  char *ws = workspace;
  st = fbn_sync_apply_checks(fn, op, x_desc, x, addend, y, weight, bias, saved, saved_bytes,
                             ws + l->apply, workspace_bytes - l->apply);
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
  const size_t pbytes = fbn_sync_pbytes(op);
  const size_t bytes = x_desc->n > 0 ? fbn_desc_bytes(x_desc) : 0;
  /* what the call writes (the whole workspace among it) against everything */
  const fbn_span_check spans[] = {{running_mean, pbytes, "running_mean"},
                                  {running_var, pbytes, "running_var"},
                                  {y, bytes, "y"},
                                  {saved, saved != NULL ? saved_bytes : 0, "saved"},
                                  {workspace, workspace_bytes, "workspace"},
                                  {x, bytes, "x"},
                                  {addend, bytes, "addend"},
                                  {weight, pbytes, "weight"},
                                  {bias, pbytes, "bias"}};
  st = fbn_sync_check_spans(fn, spans, 5, sizeof spans / sizeof spans[0]);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  st = fbn_sync_stats(op, x_desc, x, ws + l->record, fbn_sync_stats_bytes(op));
  if (st != FBN_STATUS_SUCCESS)
    return fbn_error_prefix(st, fn);
  fbn_clear_error();
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_sync_forward(const fbn_op *op, const fbn_sync_comm *comm,
                            const fbn_tensor_desc *x_desc, const void *x, const void *addend,
                            void *y, const void *weight, const void *bias, void *running_mean,
                            void *running_var, double factor, void *saved, size_t saved_bytes,
                            void *workspace, size_t workspace_bytes) {
  static const char fn[] = "fbn_sync_forward";
  fbn_clear_error();
  fbn_status st = sync_check_comm(fn, comm);
  if (st != FBN_STATUS_SUCCESS)
    return st; /* this rank cannot take part in any collective */
  sync_fwd_layout l = {0};
  st = sync_forward_local(fn, op, comm, x_desc, x, addend, y, weight, bias, running_mean,
                          running_var, factor, saved, saved_bytes, workspace, workspace_bytes, &l);
  char *ws = workspace;
  int64_t total = 0;
  /* the fixed-size check headers first: ranks that disagree on C would
   * otherwise enter an all-gather of different sizes, and a rank that
   * failed above would leave the others waiting in it */
  st = sync_check_round(fn, comm, op, st, st == FBN_STATUS_SUCCESS ? ws + l.record : NULL,
                        st == FBN_STATUS_SUCCESS ? ws + l.headers : NULL, &total);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  const int w = comm->world_size;
  const size_t rec_bytes = fbn_sync_stats_bytes(op);
  char error[FBN_SYNC_ERROR_BYTES] = "";
  st =
      comm->allgather(comm->context, ws + l.record, ws + l.records, rec_bytes, error, sizeof error);
  if (st != FBN_STATUS_SUCCESS)
    return sync_callback_failed(fn, "allgather", st, error);
  st = fbn_sync_check_headers(fn, op, ws + l.records, w, rec_bytes, &total);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  const size_t pbytes = fbn_sync_pbytes(op);
  double *mean = (double *)(void *)(ws + l.stats), *var = mean + op->desc.num_features;
  void *rm = NULL, *rv = NULL;
  if (running_mean != NULL) {
    rm = ws + l.running;
    rv = ws + l.running + pbytes;
    memcpy(rm, running_mean, pbytes);
    memcpy(rv, running_var, pbytes);
  }
  fbn_sync_combine_run(op, ws + l.records, w, rec_bytes, total, mean, var, rm, rv, factor);
  /* after the last collective: a failure here is this rank's alone and
   * leaves no rank waiting */
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

/* Every local part of fbn_sync_backward() before its check round: the
 * checks, the layout (*l), this rank's gradient record and its copy. */
static fbn_status sync_backward_local(const char *fn, const fbn_op *op, const fbn_sync_comm *comm,
                                      const fbn_tensor_desc *x_desc, const void *x, const void *y,
                                      const void *dy, const void *saved, size_t saved_bytes,
                                      const void *weight, const void *bias, void *dx,
                                      void *daddend, void *dweight, void *dbias,
                                      fbn_param_grad param_grad, fbn_sync_grad_scope scope,
                                      void *workspace, size_t workspace_bytes,
                                      sync_bwd_layout *l) {
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_x_desc(fn, op, x_desc);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (scope != FBN_SYNC_GRAD_LOCAL && scope != FBN_SYNC_GRAD_GLOBAL)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: scope = %d: must be FBN_SYNC_GRAD_LOCAL or FBN_SYNC_GRAD_GLOBAL", fn,
                     (int)scope);
  st = sync_bwd_layout_of(fn, op, x_desc, comm->world_size, l);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_ws(fn, workspace, workspace_bytes, l->total);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  char *ws = workspace;
  st = fbn_sync_backward_checks(fn, op, x_desc, x, y, dy, saved, saved_bytes, weight, bias, dx,
                                daddend, dweight, dbias, param_grad, ws + l->apply,
                                workspace_bytes - l->apply);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const size_t bytes = x_desc->n > 0 ? fbn_desc_bytes(x_desc) : 0;
  const size_t pbytes = fbn_sync_pbytes(op);
  /* what the call writes (the whole workspace among it) against everything */
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
  st = fbn_sync_check_spans(fn, spans, 5, sizeof spans / sizeof spans[0]);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const size_t rec_bytes = fbn_sync_grad_count(op) * sizeof(double);
  double *rec = (double *)(void *)(ws + l->record);
  st = fbn_sync_backward_reduce(op, x_desc, x, y, dy, saved, saved_bytes, weight, bias, rec,
                                rec_bytes, NULL, NULL, param_grad, ws + l->apply,
                                workspace_bytes - l->apply);
  if (st != FBN_STATUS_SUCCESS)
    return fbn_error_prefix(st, fn);
  fbn_clear_error();
  memcpy(ws + l->local, rec, rec_bytes);
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
  fbn_status st = sync_check_comm(fn, comm);
  if (st != FBN_STATUS_SUCCESS)
    return st; /* this rank cannot take part in any collective */
  sync_bwd_layout l = {0};
  st = sync_backward_local(fn, op, comm, x_desc, x, y, dy, saved, saved_bytes, weight, bias, dx,
                           daddend, dweight, dbias, param_grad, scope, workspace, workspace_bytes,
                           &l);
  char *ws = workspace;
  /* the check round: C, dtype, the op's fields, counts and every rank's
   * status before the all-reduce, whose size depends on C */
  unsigned char header[FBN_SYNC_HEADER_BYTES];
  if (st == FBN_STATUS_SUCCESS)
    fbn_sync_make_header(op, x_desc->n * x_desc->h * x_desc->w, FBN_STATUS_SUCCESS, header);
  int64_t total = 0;
  const bool ok = st == FBN_STATUS_SUCCESS;
  st = sync_check_round(fn, comm, op, st, ok ? header : NULL, ok ? ws + l.headers : NULL, &total);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  const size_t rec_bytes = fbn_sync_grad_count(op) * sizeof(double);
  double *rec = (double *)(void *)(ws + l.record);
  const double *local = (const double *)(const void *)(ws + l.local);
  char error[FBN_SYNC_ERROR_BYTES] = "";
  st = comm->allreduce_sum(comm->context, rec, rec_bytes / sizeof(double), error, sizeof error);
  if (st != FBN_STATUS_SUCCESS)
    return sync_callback_failed(fn, "allreduce_sum", st, error);
  /* after the last collective: a failure here is this rank's alone; the
   * summed record's rank and C entries are checked again there */
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
