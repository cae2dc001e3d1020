/*
 * Synchronized batch norm on CUDA ops (<fusedbn/fusedbn_cuda_sync.h>), API
 * layer: every argument checked on the host (op, communicator, shard,
 * pointers and their device, sizes, aliasing) before anything is queued,
 * then the cuDNN backend's phases (cuda/cuda_sync.h) with the caller's
 * collectives between them, all on exec->stream.  Built with the CUDA
 * backend only.
 */
#include <stdlib.h>
#include <string.h>

#include "cuda/cuda_sync.h"
#include "fusedbn/fusedbn_cuda_sync.h"
#include "sync/sync_internal.h"

#define ERROR_BYTES 512

static fbn_status check_op(const char *fn, const fbn_op *op) {
  if (op == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: op is NULL", fn);
  if (op->backend != fbn_backend_cuda())
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: op is not a CUDA op (backend %s): CPU ops take the calls of "
                     "fusedbn_sync.h",
                     fn, op->backend->name);
  if (op->desc.statistics != FBN_STATISTICS_BATCH)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: op statistics = FBN_STATISTICS_RUNNING: synchronized batch norm "
                     "normalizes with batch statistics (use fbn_cuda_op_forward in eval mode)",
                     fn);
  return FBN_STATUS_SUCCESS;
}

static fbn_status check_comm(const char *fn, const fbn_cuda_sync_comm *comm) {
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

/* x_desc of one shard against the op (N may be 0). */
static fbn_status check_x_desc(const char *fn, const fbn_op *op, const fbn_tensor_desc *x) {
  if (x == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: x_desc is NULL", fn);
  if (x->n < 0)
    return fbn_error(FBN_STATUS_INVALID_SHAPE,
                     "%s: N = %lld: a shard has N >= 0 (0: an empty shard)", fn, (long long)x->n);
  fbn_tensor_desc t = *x;
  if (t.n == 0)
    t.n = 1; /* the other dimensions are checked as for a shard of one */
  const fbn_op_desc *o = &op->desc;
  fbn_status st = fbn_check_desc_shape(fn, &t, o->num_features, "num_features");
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (x->dtype != o->dtype)
    return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                     "%s: x_desc dtype = %s: must equal the op's dtype = %s", fn,
                     fbn_dtype_name(x->dtype), fbn_dtype_name(o->dtype));
  if (x->layout != o->layout)
    return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                     "%s: x_desc layout = %s: must equal the op's layout = %s", fn,
                     fbn_layout_name(x->layout), fbn_layout_name(o->layout));
  return FBN_STATUS_SUCCESS;
}

/* Device memory of the op's device, aligned; messages prefixed with fn. */
static fbn_status check_device(const char *fn, const fbn_op *op, const char *name, const void *p,
                               size_t align) {
  fbn_status st = fbn_cuda_sync_check_memory(op->state, name, p, align);
  return st == FBN_STATUS_SUCCESS ? st : fbn_error_prefix(st, fn);
}

static fbn_status callback_failed(const char *fn, const char *which, fbn_status st, char *error) {
  error[ERROR_BYTES - 1] = '\0';
  if (st == FBN_STATUS_SUCCESS)
    st = FBN_STATUS_DEVICE_ERROR;
  return fbn_error(st, "%s: the %s callback failed with %s: %s", fn, which, fbn_status_string(st),
                   error[0] != '\0' ? error : "(no message)");
}

static cudaStream_t stream_of(const fbn_cuda_exec *exec) {
  return exec != NULL ? exec->stream : (cudaStream_t)0;
}

/* ---- sizes -------------------------------------------------------------- */

fbn_status fbn_cuda_sync_saved_size(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                    size_t *bytes) {
  static const char fn[] = "fbn_cuda_sync_saved_size";
  fbn_clear_error();
  fbn_status st = check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = check_x_desc(fn, op, x_desc);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (bytes == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: bytes is NULL", fn);
  *bytes = fbn_cuda_sync_saved_layout(&op->desc, x_desc).bytes;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cuda_sync_workspace_size(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                        int world_size, size_t *bytes) {
  static const char fn[] = "fbn_cuda_sync_workspace_size";
  fbn_clear_error();
  fbn_status st = check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = check_x_desc(fn, op, x_desc);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (world_size < 1)
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: world_size = %d: must be >= 1", fn,
                     world_size);
  if (bytes == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: bytes is NULL", fn);
  *bytes = fbn_cuda_sync_ws_layout(x_desc, world_size).bytes;
  return FBN_STATUS_SUCCESS;
}

/* ---- check -------------------------------------------------------------- */

fbn_status fbn_cuda_sync_check(const fbn_op *op, const fbn_cuda_exec *exec,
                               const fbn_cuda_sync_comm *comm, void *workspace,
                               size_t workspace_bytes) {
  static const char fn[] = "fbn_cuda_sync_check";
  fbn_clear_error();
  fbn_status st = check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = check_comm(fn, comm);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const int w_ = comm->world_size;
  const fbn_tensor_desc empty = {.n = 0, .c = op->desc.num_features, .h = 1, .w = 1,
                                 .dtype = op->desc.dtype, .layout = op->desc.layout};
  const fbn_cuda_sync_ws_parts w = fbn_cuda_sync_ws_layout(&empty, w_);
  st = fbn_sync_check_memory(fn, "workspace", workspace, workspace_bytes, w.bytes,
                             FBN_OP_MEMORY_ALIGNMENT);
  if (st == FBN_STATUS_SUCCESS)
    st = check_device(fn, op, "workspace", workspace, FBN_OP_MEMORY_ALIGNMENT);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const size_t all = (size_t)w_ * FBN_CS_HEADER_BYTES;
  unsigned char *host = malloc(all);
  if (host == NULL)
    return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: %zu bytes of host memory for the headers", fn,
                     all);
  char error[ERROR_BYTES] = "";
  char *ws = workspace;
  st = fbn_cuda_sync_header_only(op->state, exec, w_, workspace);
  if (st != FBN_STATUS_SUCCESS) {
    free(host);
    return fbn_error_prefix(st, fn);
  }
  st = comm->allgather(comm->context, ws + w.record, ws + w.records, FBN_CS_HEADER_BYTES,
                       stream_of(exec), error, sizeof error);
  if (st != FBN_STATUS_SUCCESS) {
    free(host);
    return callback_failed(fn, "allgather", st, error);
  }
  st = fbn_cuda_sync_fetch(op->state, exec, ws + w.records, host, all);
  if (st != FBN_STATUS_SUCCESS) {
    free(host);
    return fbn_error_prefix(st, fn);
  }
  const fbn_cs_header self = fbn_cuda_sync_header(&op->desc, 0);
  fbn_cs_status s;
  fbn_cs_check_headers(host, w_, FBN_CS_HEADER_BYTES, &self, &s);
  free(host);
  if (s.code == FBN_STATUS_SUCCESS || s.what == FBN_CS_TOTAL) /* no counts in the check */
    return FBN_STATUS_SUCCESS;
  char text[ERROR_BYTES];
  fbn_cuda_sync_describe(&s, text, sizeof text);
  return fbn_error((fbn_status)s.code, "%s: %s", fn, text);
}

/* ---- forward ------------------------------------------------------------ */

fbn_status fbn_cuda_sync_forward(const fbn_op *op, const fbn_cuda_exec *exec,
                                 const fbn_cuda_sync_comm *comm, const fbn_tensor_desc *x_desc,
                                 const void *x, const void *addend, void *y, const void *weight,
                                 const void *bias, void *running_mean, void *running_var,
                                 double factor, void *saved, size_t saved_bytes, void *workspace,
                                 size_t workspace_bytes) {
  static const char fn[] = "fbn_cuda_sync_forward";
  fbn_clear_error();
  fbn_status st = check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = check_comm(fn, comm);
  if (st == FBN_STATUS_SUCCESS)
    st = check_x_desc(fn, op, x_desc);
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
  if ((running_mean == NULL) != (running_var == NULL))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: running_mean = %p, running_var = %p: give both (to update them) or "
                     "neither",
                     fn, running_mean, running_var);
  if (running_mean != NULL && !(factor >= 0.0 && factor <= 1.0))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: factor = %g: the running-average factor must be in [0, 1]", fn, factor);
  const int w_ = comm->world_size;
  const fbn_cuda_sync_saved_parts sp = fbn_cuda_sync_saved_layout(o, x_desc);
  const fbn_cuda_sync_ws_parts w = fbn_cuda_sync_ws_layout(x_desc, w_);
  if (saved != NULL)
    st = fbn_sync_check_memory(fn, "saved", saved, saved_bytes, sp.bytes, FBN_OP_MEMORY_ALIGNMENT);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_memory(fn, "workspace", workspace, workspace_bytes, w.bytes,
                               FBN_OP_MEMORY_ALIGNMENT);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const size_t es = fbn_dtype_size(o->dtype), ps = fbn_dtype_size(o->param_dtype);
  const size_t bytes = x_desc->n > 0 ? fbn_desc_bytes(x_desc) : 0;
  const size_t pbytes = fbn_sync_pbytes(op);
  const fbn_span_check spans[] = {{y, bytes, "y"},
                                  {saved, saved != NULL ? saved_bytes : 0, "saved"},
                                  {workspace, workspace_bytes, "workspace"},
                                  {running_mean, running_mean != NULL ? pbytes : 0,
                                   "running_mean"},
                                  {running_var, running_var != NULL ? pbytes : 0, "running_var"},
                                  {x, bytes, "x"},
                                  {addend, bytes, "addend"},
                                  {weight, pbytes, "weight"},
                                  {bias, pbytes, "bias"}};
  const size_t align[] = {es, FBN_OP_MEMORY_ALIGNMENT, FBN_OP_MEMORY_ALIGNMENT, ps, ps, es, es,
                          ps, ps};
  for (size_t i = 0; i < sizeof spans / sizeof spans[0]; i++) {
    st = check_device(fn, op, spans[i].name, spans[i].ptr, align[i]);
    if (st != FBN_STATUS_SUCCESS)
      return st;
  }
  st = fbn_sync_check_spans(fn, spans, 5, sizeof spans / sizeof spans[0]);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  char *ws = workspace;
  st = fbn_cuda_sync_stats(op->state, exec, x_desc, w_, x, workspace);
  if (st != FBN_STATUS_SUCCESS)
    return fbn_error_prefix(st, fn);
  char error[ERROR_BYTES] = "";
  st = comm->allgather(comm->context, ws + w.record, ws + w.records, w.record_bytes,
                       stream_of(exec), error, sizeof error);
  if (st != FBN_STATUS_SUCCESS)
    return callback_failed(fn, "allgather", st, error);
  st = fbn_cuda_sync_apply(op->state, exec, x_desc, w_, x, addend, y, weight, bias, running_mean,
                           running_var, factor, saved, workspace);
  return st == FBN_STATUS_SUCCESS ? st : fbn_error_prefix(st, fn);
}

/* ---- backward ----------------------------------------------------------- */

fbn_status fbn_cuda_sync_backward(const fbn_op *op, const fbn_cuda_exec *exec,
                                  const fbn_cuda_sync_comm *comm, const fbn_tensor_desc *x_desc,
                                  const void *x, const void *y, const void *dy, const void *saved,
                                  size_t saved_bytes, const void *weight, const void *bias,
                                  void *dx, void *daddend, void *dweight, void *dbias,
                                  fbn_param_grad param_grad, fbn_sync_grad_scope scope,
                                  void *workspace, size_t workspace_bytes) {
  static const char fn[] = "fbn_cuda_sync_backward";
  fbn_clear_error();
  fbn_status st = check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = check_comm(fn, comm);
  if (st == FBN_STATUS_SUCCESS)
    st = check_x_desc(fn, op, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_tensor(fn, "x", x, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_tensor(fn, "dy", dy, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_affine(fn, op, weight, bias);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (saved == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER,
                     "%s: saved is NULL: the backward reads the forward's saved state (and its "
                     "status block)",
                     fn);
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
  if (scope != FBN_SYNC_GRAD_LOCAL && scope != FBN_SYNC_GRAD_GLOBAL)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: scope = %d: must be FBN_SYNC_GRAD_LOCAL or FBN_SYNC_GRAD_GLOBAL", fn,
                     (int)scope);
  const int w_ = comm->world_size;
  const fbn_cuda_sync_saved_parts sp = fbn_cuda_sync_saved_layout(o, x_desc);
  const fbn_cuda_sync_ws_parts w = fbn_cuda_sync_ws_layout(x_desc, w_);
  st = fbn_sync_check_memory(fn, "saved", saved, saved_bytes, sp.bytes, FBN_OP_MEMORY_ALIGNMENT);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_memory(fn, "workspace", workspace, workspace_bytes, w.bytes,
                               FBN_OP_MEMORY_ALIGNMENT);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const size_t es = fbn_dtype_size(o->dtype), ps = fbn_dtype_size(o->param_dtype);
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
  const size_t align[] = {es, es, ps, ps, FBN_OP_MEMORY_ALIGNMENT, es, es, es,
                          FBN_OP_MEMORY_ALIGNMENT, ps, ps};
  for (size_t i = 0; i < sizeof spans / sizeof spans[0]; i++) {
    st = check_device(fn, op, spans[i].name, spans[i].ptr, align[i]);
    if (st != FBN_STATUS_SUCCESS)
      return st;
  }
  st = fbn_sync_check_spans(fn, spans, 5, sizeof spans / sizeof spans[0]);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  char *ws = workspace;
  st = fbn_cuda_sync_grad_reduce(op->state, exec, x_desc, w_, x, dy, saved, workspace);
  if (st != FBN_STATUS_SUCCESS)
    return fbn_error_prefix(st, fn);
  char error[ERROR_BYTES] = "";
  st = comm->allreduce_sum(comm->context, (double *)(void *)(ws + w.grad),
                           FBN_CS_GRAD_HEAD + 2 * (size_t)o->num_features, stream_of(exec), error,
                           sizeof error);
  if (st != FBN_STATUS_SUCCESS)
    return callback_failed(fn, "allreduce_sum", st, error);
  st = fbn_cuda_sync_grad_apply(op->state, exec, x_desc, w_, x, dy, saved, weight, dx, daddend,
                                dweight, dbias, param_grad == FBN_PARAM_GRAD_ACCUMULATE,
                                scope == FBN_SYNC_GRAD_GLOBAL, workspace);
  return st == FBN_STATUS_SUCCESS ? st : fbn_error_prefix(st, fn);
}

/* ---- status ------------------------------------------------------------- */

fbn_status fbn_cuda_sync_read_status(const fbn_op *op, const fbn_cuda_exec *exec,
                                     const void *status_memory, fbn_status *result) {
  static const char fn[] = "fbn_cuda_sync_read_status";
  fbn_clear_error();
  fbn_status st = check_op(fn, op);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (result == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: result is NULL", fn);
  if (status_memory == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: status_memory is NULL", fn);
  st = check_device(fn, op, "status_memory", status_memory, FBN_OP_MEMORY_ALIGNMENT);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  fbn_cs_status s;
  st = fbn_cuda_sync_read(op->state, exec, status_memory, &s);
  if (st != FBN_STATUS_SUCCESS)
    return fbn_error_prefix(st, fn);
  if (s.magic != FBN_CS_STATUS_MAGIC)
    return fbn_error(FBN_STATUS_INVALID_STATE,
                     "%s: status_memory = %p holds no status block of a synchronized call (the "
                     "start of its workspace or saved state)",
                     fn, status_memory);
  *result = (fbn_status)s.code;
  if (s.code != FBN_STATUS_SUCCESS) {
    char text[ERROR_BYTES];
    fbn_cuda_sync_describe(&s, text, sizeof text);
    (void)fbn_error((fbn_status)s.code, "%s: %s", fn, text);
  }
  return FBN_STATUS_SUCCESS;
}
