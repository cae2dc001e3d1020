/*
 * Synchronized batch norm, split phases: the checks every phase shares (the
 * op, a shard's description, caller memory, weight/bias, tensors of an
 * empty shard, overlaps) and the size queries.
 */
#include <math.h>
#include <string.h>

#include "sync/sync_internal.h"

fbn_status fbn_sync_check_op(const char *fn, const fbn_op *op) {
  if (op == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: op is NULL", fn);
  if (op->desc.statistics != FBN_STATISTICS_BATCH)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: op statistics = FBN_STATISTICS_RUNNING: synchronized batch norm "
                     "normalizes with batch statistics (use fbn_op_forward in eval mode)",
                     fn);
  if (fbn_backend_sync_hooks(op->backend) == NULL)
    return fbn_error(FBN_STATUS_UNSUPPORTED,
                     "%s: the %s backend has no host-memory synchronized batch norm (CPU ops "
                     "only; CUDA ops: fbn_cuda_sync_forward/backward of fusedbn_cuda_sync.h)",
                     fn, op->backend->name);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_sync_check_x_desc(const char *fn, const fbn_op *op, const fbn_tensor_desc *x) {
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
  if (x->n > 0 && op->backend->check_shape != NULL) {
    const fbn_op_desc ad = fbn_sync_apply_desc(op);
    st = op->backend->check_shape(&ad, op->state, x);
    if (st != FBN_STATUS_SUCCESS)
      return fbn_error_prefix(st, fn);
  }
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_sync_check_memory(const char *fn, const char *name, const void *ptr, size_t have,
                                 size_t need, size_t align) {
  if (ptr == NULL) {
    if (need == 0)
      return FBN_STATUS_SUCCESS;
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                     "%s: %s is NULL: this call needs %zu bytes of it", fn, name, need);
  }
  if (have < need)
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                     "%s: %s_bytes = %zu: this op and shape need at least %zu bytes", fn, name,
                     have, need);
  if ((uintptr_t)ptr % align != 0)
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE, "%s: %s = %p: must be aligned to %zu bytes",
                     fn, name, ptr, align);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_sync_check_affine(const char *fn, const fbn_op *op, const void *weight,
                                 const void *bias) {
  const bool affine = op->desc.affine;
  if (affine && (weight == NULL || bias == NULL))
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: %s is NULL: an affine op needs it", fn,
                     weight == NULL ? "weight" : "bias");
  if (!affine && (weight != NULL || bias != NULL))
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: %s = %p: the op has affine = false (pass NULL)",
                     fn, weight != NULL ? "weight" : "bias", weight != NULL ? weight : bias);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_sync_check_spans(const char *fn, const fbn_span_check *spans, size_t written,
                                size_t n) {
  for (size_t i = 0; i < written; i++)
    for (size_t j = 0; j < n; j++)
      if (i != j && spans[i].bytes > 0 && spans[j].bytes > 0 &&
          fbn_overlap(spans[i].ptr, spans[i].bytes, spans[j].ptr, spans[j].bytes))
        return fbn_error(FBN_STATUS_ALIASING, "%s: %s overlaps %s", fn, spans[i].name,
                         spans[j].name);
  return FBN_STATUS_SUCCESS;
}

/* A tensor pointer of a shard: required unless the shard is empty. */

fbn_status fbn_sync_check_tensor(const char *fn, const char *name, const void *p,
                                 const fbn_tensor_desc *x) {
  if (p == NULL && x->n > 0)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: %s is NULL (N = %lld)", fn, name,
                     (long long)x->n);
  return FBN_STATUS_SUCCESS;
}

/* Float64 weight and bias for the backend at the start of the workspace. */

void fbn_sync_params64(const fbn_op *op, const void *weight, const void *bias, double *w64,
                       double *b64) {
  const int64_t c_ = op->desc.num_features;
  for (int64_t c = 0; c < c_; c++) {
    w64[c] = op->desc.affine ? fbn_sync_load(weight, op->desc.param_dtype, c) : 1.0;
    b64[c] = op->desc.affine ? fbn_sync_load(bias, op->desc.param_dtype, c) : 0.0;
  }
}

/* ---- sizes -------------------------------------------------------------- */

fbn_status fbn_sync_stats_record_size(const fbn_op *op, size_t *bytes) {
  static const char fn[] = "fbn_sync_stats_record_size";
  fbn_clear_error();
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (bytes == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: bytes is NULL", fn);
  *bytes = fbn_sync_stats_bytes(op);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_sync_grad_record_size(const fbn_op *op, size_t *bytes) {
  static const char fn[] = "fbn_sync_grad_record_size";
  fbn_clear_error();
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (bytes == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: bytes is NULL", fn);
  *bytes = fbn_sync_grad_count(op) * sizeof(double);
  return FBN_STATUS_SUCCESS;
}

/* Backend saved bytes / workspace bytes for a checked shard. */
fbn_status fbn_sync_sizes(const char *fn, const fbn_op *op, const fbn_tensor_desc *x, size_t *saved,
                          size_t *workspace) {
  const fbn_op_desc ad = fbn_sync_apply_desc(op);
  size_t s = FBN_OP_MEMORY_ALIGNMENT, wf = 0, wb = 0;
  fbn_status st = FBN_STATUS_SUCCESS;
  if (x->n > 0) {
    st = op->backend->saved_size(&ad, op->state, x, &s);
    if (st == FBN_STATUS_SUCCESS)
      st = op->backend->workspace_size(&ad, op->state, x, false, &wf);
    if (st == FBN_STATUS_SUCCESS)
      st = op->backend->workspace_size(&ad, op->state, x, true, &wb);
    if (st != FBN_STATUS_SUCCESS)
      return fbn_error_prefix(st, fn);
  }
  if (saved != NULL)
    *saved = s;
  if (workspace != NULL)
    *workspace = fbn_sync_param_bytes(op) + fbn_sync_align(wf > wb ? wf : wb);
  return st;
}

static fbn_status sync_size_query(const char *fn, const fbn_op *op, const fbn_tensor_desc *x,
                                  bool saved, size_t *bytes) {
  fbn_clear_error();
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_x_desc(fn, op, x);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (bytes == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: bytes is NULL", fn);
  size_t s = 0, w = 0;
  st = fbn_sync_sizes(fn, op, x, &s, &w);
  if (st == FBN_STATUS_SUCCESS)
    *bytes = saved ? s : w;
  return st;
}

fbn_status fbn_sync_saved_size(const fbn_op *op, const fbn_tensor_desc *x_desc, size_t *bytes) {
  return sync_size_query("fbn_sync_saved_size", op, x_desc, true, bytes);
}

fbn_status fbn_sync_workspace_size(const fbn_op *op, const fbn_tensor_desc *x_desc, size_t *bytes) {
  return sync_size_query("fbn_sync_workspace_size", op, x_desc, false, bytes);
}
