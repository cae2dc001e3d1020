/*
 * Backward of the cuDNN backend.  The path is the forward's: the selection
 * is a function of the op, the shape and the refusals learnt (which only
 * grow), so the forward of this saved state took the path selected now,
 * except that a class refused since its forward may have run the fused
 * path then (fbn_cuda_forward_maybe_fused): fusedbn's kernels then gate
 * with !(y <= 0), exactly what the other paths' mask encodes.
 *
 *   FUSED    cudnnBatchNormalizationBackwardEx with the forward's bnOps,
 *            reserve space and (ReLU operations) y; dz is the addend's
 *            gradient (BN_ADD_RELU)
 *   GENERAL  (ReLU operations) dz = dy * mask, then cuDNN's plain backward
 *   KERNELS, EVAL, and a refused cuDNN backward: fusedbn's kernels (float64
 *            sums of g and g * xhat, then dx and daddend in one pass)
 */
#include <cuda_runtime.h>

#include "cuda_internal.h"

typedef enum run_result { RUN_OK, RUN_REFUSED, RUN_ERROR } run_result;

typedef struct bwd_ctx {
  fbn_cuda_call cx;
  const fbn_bk_backward_args *a;
  const void *mean;
  const void *invstd;
  const void *extra; /* mask words or reserve space */
} bwd_ctx;

static fbn_status check_workspace(const bwd_ctx *b, size_t need) {
  if (need > 0 && (b->a->workspace == NULL || b->a->workspace_bytes < need))
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                     "workspace_bytes = %zu: this call needs at least %zu bytes",
                     b->a->workspace != NULL ? b->a->workspace_bytes : 0, need);
  return FBN_STATUS_SUCCESS;
}

/* fusedbn's kernels; mask NULL: the gate comes from y (ReLU operations) or
 * is open (BN alone). */
static fbn_status backward_own(bwd_ctx *b, const uint32_t *mask) {
  const fbn_bk_backward_args *a = b->a;
  const fbn_tensor_desc *d = a->desc;
  fbn_k_shape ks = fbn_cuda_kshape(d);
  const bool batch_stats = a->op->statistics == FBN_STATISTICS_BATCH;
  const bool relu = fbn_operation_has_relu(a->op->operation);
  const void *gate_y = relu ? a->y : NULL;
  const uint32_t *gate_mask = relu ? mask : NULL;
  const bool grads = a->dweight != NULL || a->dbias != NULL;
  const bool reduce = grads || (batch_stats && a->dx != NULL);
  const size_t partials = reduce ? fbn_cuda_align_up(fbn_k_partials_bytes(&ks)) : 0;
  fbn_status s = check_workspace(b, partials + fbn_cuda_coef_bytes(d, FBN_K_BWD_COEFS));
  if (s != FBN_STATUS_SUCCESS)
    return s;
  fbn_cuda_carver cv = {a->workspace, 0};
  double *part = reduce ? fbn_cuda_carve(&cv, partials) : NULL;
  void *coef = fbn_cuda_carve(&cv, fbn_cuda_coef_bytes(d, FBN_K_BWD_COEFS));
  cudaStream_t stream = b->cx.stream;
  cudaError_t e;
  if (reduce) {
    e = fbn_k_grad_reduce(&ks, a->x, a->dy, gate_mask, gate_y, b->mean, b->invstd, part, stream);
    if ((s = fbn_cuda_launch_check("the gradient reduction kernel", e)) != FBN_STATUS_SUCCESS)
      return s;
  }
  if (reduce || a->dx != NULL) {
    e = fbn_k_grad_finalize(&ks, part, batch_stats, a->weight, b->mean, b->invstd, a->dweight,
                            a->dbias, a->accumulate ? 1 : 0, coef, stream);
    if ((s = fbn_cuda_launch_check("the gradient finalize kernel", e)) != FBN_STATUS_SUCCESS)
      return s;
  }
  if (a->dx != NULL || a->daddend != NULL) {
    e = fbn_k_grad_apply(&ks, a->x, a->dy, gate_mask, gate_y, coef, a->dx, a->daddend, stream);
    if ((s = fbn_cuda_launch_check("the backward kernel", e)) != FBN_STATUS_SUCCESS)
      return s;
  }
  return FBN_STATUS_SUCCESS;
}

static run_result backward_dnn(bwd_ctx *b, int path, fbn_status *s) {
  fbn_cuda_state *st = b->cx.st;
  const fbn_bk_backward_args *a = b->a;
  const fbn_tensor_desc *d = a->desc;
  const fbn_operation op = a->op->operation;
  const bool fused = path == FBN_CUDA_PATH_ID_FUSED;
  const fbn_dnn_plan *plan;
  const fbn_dnn_sizes *sz;
  fbn_cuda_plan_result r = fbn_cuda_get_plan(st, d, path, &plan, &sz, s);
  if (r != FBN_CUDA_PLAN_OK)
    return r == FBN_CUDA_PLAN_REFUSED ? RUN_REFUSED : RUN_ERROR;
  /* dz: the addend's gradient (FUSED BN_ADD_RELU) or dy * mask (GENERAL
   * with a ReLU), into daddend when the caller wants it */
  const bool need_dz = fused ? op == FBN_OPERATION_BN_ADD_RELU : fbn_operation_has_relu(op);
  const bool dz_scratch = need_dz && a->daddend == NULL;
  const size_t dnn_ws = fused ? fbn_cuda_dnn_ws_bytes(sz->backward_workspace) : 0;
  const size_t need =
      dnn_ws + (dz_scratch ? fbn_cuda_align_up(fbn_cuda_tensor_bytes(d)) : 0);
  if ((*s = check_workspace(b, need)) != FBN_STATUS_SUCCESS)
    return RUN_ERROR;
  if ((*s = fbn_cuda_call_dnn(&b->cx)) != FBN_STATUS_SUCCESS)
    return RUN_ERROR;
  fbn_cuda_carver cv = {a->workspace, 0};
  void *dnn_workspace = fbn_cuda_carve(&cv, dnn_ws);
  void *dz = need_dz ? (dz_scratch ? fbn_cuda_carve(&cv, fbn_cuda_tensor_bytes(d)) : a->daddend)
                     : NULL;
  fbn_dnn_backward_args ba = {
      .x = a->x,
      .y = a->y,
      .dy = a->dy,
      .dz = dz,
      .dx = a->dx,
      .scale = a->weight != NULL ? a->weight : st->ones,
      .bias = a->bias != NULL ? a->bias : st->zeros,
      .dscale = a->dweight != NULL ? a->dweight : st->scratch_dscale,
      .dbias = a->dbias != NULL ? a->dbias : st->scratch_dbias,
      .accumulate = a->accumulate,
      .epsilon = a->op->eps,
      .saved_mean = b->mean,
      .saved_invstd = b->invstd,
      .workspace = dnn_workspace,
      .workspace_bytes = dnn_ws,
      .reserve = fused && sz->reserve > 0 ? (void *)b->extra : NULL,
      .reserve_bytes = fused ? sz->reserve : 0,
  };
  if (!fused && need_dz) {
    fbn_k_shape ks = fbn_cuda_kshape(d);
    cudaError_t ke = fbn_k_mask_grad(&ks, a->dy, b->extra, NULL, dz, b->cx.stream);
    if ((*s = fbn_cuda_launch_check("the ReLU mask backward kernel", ke)) != FBN_STATUS_SUCCESS)
      return RUN_ERROR;
    ba.dy = dz;
  }
  fbn_dnn_error e = fbn_dnn_backward(b->cx.dnn, plan, &ba);
  if (!fbn_dnn_ok(e)) {
    if (fbn_cuda_is_refusal(e, d->dtype))
      return RUN_REFUSED; /* the forward worked: the path stays as it is */
    *s = fbn_cuda_dnn_fail(e);
    return RUN_ERROR;
  }
  return RUN_OK;
}

static fbn_status check_pointers(const fbn_cuda_state *st, const fbn_bk_backward_args *a) {
  const size_t e = fbn_dtype_size(a->desc->dtype), p = st->param_size;
  fbn_status s;
  if ((s = fbn_cuda_check_memory(st, "x", a->x, e)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "y", a->y, e)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "dy", a->dy, e)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "dx", a->dx, e)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "daddend", a->daddend, e)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "weight", a->weight, p)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "bias", a->bias, p)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "dweight", a->dweight, p)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "dbias", a->dbias, p)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "saved", a->saved, 1)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "workspace", a->workspace, 1)) != FBN_STATUS_SUCCESS)
    return s;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cuda_backward(const fbn_bk_backward_args *a) {
  bwd_ctx b;
  b.a = a;
  fbn_status s = fbn_cuda_call_begin(&b.cx, a->state, a->exec);
  if (s != FBN_STATUS_SUCCESS)
    return fbn_cuda_call_end(&b.cx, s);
  fbn_cuda_state *st = b.cx.st;
  const fbn_tensor_desc *d = a->desc;
  if ((s = check_pointers(st, a)) != FBN_STATUS_SUCCESS)
    return fbn_cuda_call_end(&b.cx, s);
  /* The layout's offsets do not depend on the path. */
  const size_t stats = fbn_cuda_stats_bytes(d);
  if (a->saved_bytes < 2 * stats)
    return fbn_cuda_call_end(&b.cx, fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                                              "saved_bytes = %zu: smaller than the saved "
                                              "statistics (%zu bytes)",
                                              a->saved_bytes, 2 * stats));
  b.mean = a->saved;
  b.invstd = (const char *)a->saved + stats;
  b.extra = (const char *)a->saved + 2 * stats;

  const int path = fbn_cuda_state_path(st, d, NULL);
  const bool maybe_fused = fbn_cuda_forward_maybe_fused(st, d);
  if ((path == FBN_CUDA_PATH_ID_FUSED || path == FBN_CUDA_PATH_ID_GENERAL) && a->dx != NULL) {
    run_result r = backward_dnn(&b, path, &s);
    if (r == RUN_OK)
      return fbn_cuda_call_end(&b.cx, FBN_STATUS_SUCCESS);
    if (r == RUN_ERROR)
      return fbn_cuda_call_end(&b.cx, s);
    /* refused: fusedbn's kernels compute the same gradients */
  }
  /* The fused forward leaves no mask (its reserve space is cuDNN's). */
  const bool has_mask = path != FBN_CUDA_PATH_ID_FUSED && !maybe_fused;
  s = backward_own(&b, has_mask ? (const uint32_t *)b.extra : NULL);
  return fbn_cuda_call_end(&b.cx, s);
}
