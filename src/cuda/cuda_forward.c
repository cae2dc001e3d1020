/*
 * Forward of the cuDNN backend, every path (docs/cuda-backend.md):
 *   FUSED    cudnnBatchNormalizationForwardTrainingEx with the operation's
 *            bnOps (OPS_BN, BN_ACTIVATION, BN_ADD_ACTIVATION)
 *   GENERAL  cuDNN's plain batch norm, then (ReLU operations) fusedbn's
 *            add + ReLU + mask kernel in place
 *   KERNELS  fusedbn's statistics, finalize and apply kernels
 *   EVAL     fusedbn's eval prepare and apply kernels
 * A cuDNN path refused at run time falls back down the chain FUSED ->
 * GENERAL -> KERNELS, the refusal remembered for the class.
 */
#include <cuda_runtime.h>

#include "cuda_internal.h"

typedef enum run_result { RUN_OK, RUN_REFUSED, RUN_ERROR } run_result;

typedef struct fwd_ctx {
  fbn_cuda_call cx;
  const fbn_bk_forward_args *a;
  fbn_cuda_saved_layout layout; /* valid when a->saved != NULL */
} fwd_ctx;

static void *saved_at(const fwd_ctx *f, size_t off) { return (char *)f->a->saved + off; }

static const void *dnn_scale(const fwd_ctx *f) {
  return f->a->weight != NULL ? f->a->weight : f->cx.st->ones;
}
static const void *dnn_bias(const fwd_ctx *f) {
  return f->a->bias != NULL ? f->a->bias : f->cx.st->zeros;
}

static fbn_status check_workspace(const fwd_ctx *f, size_t need) {
  if (need > 0 && (f->a->workspace == NULL || f->a->workspace_bytes < need))
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                     "workspace_bytes = %zu: this call needs at least %zu bytes",
                     f->a->workspace != NULL ? f->a->workspace_bytes : 0, need);
  return FBN_STATUS_SUCCESS;
}

static run_result forward_fused(fwd_ctx *f, fbn_status *s) {
  fbn_cuda_state *st = f->cx.st;
  const fbn_bk_forward_args *a = f->a;
  const fbn_tensor_desc *d = a->desc;
  const fbn_dnn_plan *plan;
  const fbn_dnn_sizes *sz;
  fbn_cuda_plan_result r = fbn_cuda_get_plan(st, d, FBN_CUDA_PATH_ID_FUSED, &plan, &sz, s);
  if (r != FBN_CUDA_PLAN_OK)
    return r == FBN_CUDA_PLAN_REFUSED ? RUN_REFUSED : RUN_ERROR;
  if (a->saved != NULL && f->layout.extra_bytes < sz->reserve) {
    *s = fbn_error(FBN_STATUS_INVALID_STATE,
                   "the saved state holds %zu bytes for cuDNN's reserve space, which needs %zu",
                   f->layout.extra_bytes, sz->reserve);
    return RUN_ERROR;
  }
  const size_t dnn_ws = fbn_cuda_dnn_ws_bytes(sz->forward_workspace);
  size_t need = dnn_ws;
  if (a->saved == NULL)
    need += fbn_cuda_align_up(sz->reserve) + 2 * fbn_cuda_stats_bytes(d);
  if ((*s = check_workspace(f, need)) != FBN_STATUS_SUCCESS)
    return RUN_ERROR;
  if ((*s = fbn_cuda_call_dnn(&f->cx)) != FBN_STATUS_SUCCESS)
    return RUN_ERROR;
  fbn_cuda_carver cv = {a->workspace, 0};
  fbn_dnn_forward_args fa = {
      .x = a->x,
      .z = a->addend,
      .y = a->y,
      .scale = dnn_scale(f),
      .bias = dnn_bias(f),
      .factor = a->update_running ? a->factor : 1.0,
      .running_mean = a->update_running ? a->running_mean : NULL,
      .running_var = a->update_running ? a->running_var : NULL,
      .epsilon = a->op->eps,
      .workspace = fbn_cuda_carve(&cv, dnn_ws),
      .workspace_bytes = dnn_ws,
      .reserve_bytes = sz->reserve,
  };
  if (a->saved != NULL) {
    fa.save_mean = saved_at(f, f->layout.mean_off);
    fa.save_invstd = saved_at(f, f->layout.invstd_off);
    fa.reserve = sz->reserve > 0 ? saved_at(f, f->layout.extra_off) : NULL;
  } else {
    fa.reserve = fbn_cuda_carve(&cv, sz->reserve);
    fa.save_mean = fbn_cuda_carve(&cv, fbn_cuda_stats_bytes(d));
    fa.save_invstd = fbn_cuda_carve(&cv, fbn_cuda_stats_bytes(d));
  }
  fbn_dnn_error e = fbn_dnn_forward_training(f->cx.dnn, plan, &fa);
  if (!fbn_dnn_ok(e)) {
    if (fbn_cuda_is_refusal(e, d->dtype)) {
      fbn_cuda_refuse(st, FBN_CUDA_PATH_ID_FUSED, d);
      return RUN_REFUSED;
    }
    *s = fbn_cuda_dnn_fail(e);
    return RUN_ERROR;
  }
  return RUN_OK;
}

static run_result forward_general(fwd_ctx *f, fbn_status *s) {
  fbn_cuda_state *st = f->cx.st;
  const fbn_bk_forward_args *a = f->a;
  const fbn_tensor_desc *d = a->desc;
  const fbn_dnn_plan *plan;
  const fbn_dnn_sizes *sz;
  fbn_cuda_plan_result r = fbn_cuda_get_plan(st, d, FBN_CUDA_PATH_ID_GENERAL, &plan, &sz, s);
  if (r != FBN_CUDA_PLAN_OK)
    return r == FBN_CUDA_PLAN_REFUSED ? RUN_REFUSED : RUN_ERROR;
  if ((*s = fbn_cuda_call_dnn(&f->cx)) != FBN_STATUS_SUCCESS)
    return RUN_ERROR;
  const bool saved = a->saved != NULL;
  fbn_dnn_forward_args fa = {
      .x = a->x,
      .y = a->y,
      .scale = dnn_scale(f),
      .bias = dnn_bias(f),
      .factor = a->update_running ? a->factor : 1.0,
      .running_mean = a->update_running ? a->running_mean : NULL,
      .running_var = a->update_running ? a->running_var : NULL,
      .epsilon = a->op->eps,
      .save_mean = saved ? saved_at(f, f->layout.mean_off) : NULL,
      .save_invstd = saved ? saved_at(f, f->layout.invstd_off) : NULL,
  };
  fbn_dnn_error e = fbn_dnn_forward_training(f->cx.dnn, plan, &fa);
  if (!fbn_dnn_ok(e)) {
    if (fbn_cuda_is_refusal(e, d->dtype)) {
      fbn_cuda_refuse(st, FBN_CUDA_PATH_ID_GENERAL, d);
      return RUN_REFUSED;
    }
    *s = fbn_cuda_dnn_fail(e);
    return RUN_ERROR;
  }
  if (!fbn_operation_has_relu(a->op->operation))
    return RUN_OK; /* BN alone: cuDNN's output is y */
  fbn_k_shape ks = fbn_cuda_kshape(d);
  uint32_t *mask = saved ? saved_at(f, f->layout.extra_off) : NULL;
  cudaError_t ke = fbn_k_add_relu(&ks, a->y, a->addend, mask, f->cx.stream);
  if ((*s = fbn_cuda_launch_check("the add+ReLU kernel", ke)) != FBN_STATUS_SUCCESS)
    return RUN_ERROR;
  return RUN_OK;
}

static run_result forward_own(fwd_ctx *f, bool eval, fbn_status *s) {
  const fbn_bk_forward_args *a = f->a;
  const fbn_tensor_desc *d = a->desc;
  fbn_k_shape ks = fbn_cuda_kshape(d);
  const size_t partials = eval ? 0 : fbn_cuda_align_up(fbn_k_partials_bytes(&ks));
  if ((*s = check_workspace(f, partials + fbn_cuda_coef_bytes(d, FBN_K_FWD_COEFS))) !=
      FBN_STATUS_SUCCESS)
    return RUN_ERROR;
  fbn_cuda_carver cv = {a->workspace, 0};
  double *part = eval ? NULL : fbn_cuda_carve(&cv, partials);
  void *coef = fbn_cuda_carve(&cv, fbn_cuda_coef_bytes(d, FBN_K_FWD_COEFS));
  const bool saved = a->saved != NULL;
  void *save_mean = saved ? saved_at(f, f->layout.mean_off) : NULL;
  void *save_invstd = saved ? saved_at(f, f->layout.invstd_off) : NULL;
  cudaError_t ke;
  if (eval) {
    ke = fbn_k_eval_prepare(&ks, a->op->eps, a->weight, a->bias, a->running_mean,
                            a->running_var, save_mean, save_invstd, coef, f->cx.stream);
    if ((*s = fbn_cuda_launch_check("the eval prepare kernel", ke)) != FBN_STATUS_SUCCESS)
      return RUN_ERROR;
  } else {
    ke = fbn_k_stats(&ks, a->x, part, f->cx.stream);
    if ((*s = fbn_cuda_launch_check("the statistics kernel", ke)) != FBN_STATUS_SUCCESS)
      return RUN_ERROR;
    ke = fbn_k_stats_finalize(&ks, a->x, part, a->op->eps, a->factor, a->weight, a->bias,
                              a->update_running ? a->running_mean : NULL,
                              a->update_running ? a->running_var : NULL, save_mean, save_invstd,
                              coef, f->cx.stream);
    if ((*s = fbn_cuda_launch_check("the statistics finalize kernel", ke)) !=
        FBN_STATUS_SUCCESS)
      return RUN_ERROR;
  }
  const bool relu = fbn_operation_has_relu(a->op->operation);
  uint32_t *mask = saved && relu ? saved_at(f, f->layout.extra_off) : NULL;
  ke = fbn_k_apply(&ks, a->x, a->addend, a->y, mask, coef, relu ? 1 : 0, f->cx.stream);
  if ((*s = fbn_cuda_launch_check("the apply kernel", ke)) != FBN_STATUS_SUCCESS)
    return RUN_ERROR;
  return RUN_OK;
}

/* Every pointer of the call: device memory of the op's device, tensors
 * aligned to their element size, per-channel arrays to theirs. */
static fbn_status check_pointers(const fbn_cuda_state *st, const fbn_bk_forward_args *a) {
  const size_t e = fbn_dtype_size(a->desc->dtype), p = st->param_size;
  fbn_status s;
  if ((s = fbn_cuda_check_memory(st, "x", a->x, e)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "addend", a->addend, e)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "y", a->y, e)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "weight", a->weight, p)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "bias", a->bias, p)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "running_mean", a->running_mean, p)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "running_var", a->running_var, p)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "saved", a->saved, 1)) != FBN_STATUS_SUCCESS ||
      (s = fbn_cuda_check_memory(st, "workspace", a->workspace, 1)) != FBN_STATUS_SUCCESS)
    return s;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cuda_forward(const fbn_bk_forward_args *a) {
  fwd_ctx f;
  f.a = a;
  fbn_status s = fbn_cuda_call_begin(&f.cx, a->state, a->exec);
  if (s != FBN_STATUS_SUCCESS)
    return fbn_cuda_call_end(&f.cx, s);
  fbn_cuda_state *st = f.cx.st;
  const fbn_tensor_desc *d = a->desc;
  if ((s = check_pointers(st, a)) != FBN_STATUS_SUCCESS)
    return fbn_cuda_call_end(&f.cx, s);
  if (a->saved != NULL) {
    if ((s = fbn_cuda_saved_layout_of(st, d, &f.layout)) != FBN_STATUS_SUCCESS)
      return fbn_cuda_call_end(&f.cx, s);
    if (a->saved_bytes < f.layout.total)
      return fbn_cuda_call_end(
          &f.cx, fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                           "saved_bytes = %zu: this forward needs %zu", a->saved_bytes,
                           f.layout.total));
  }
  int path = fbn_cuda_state_path(st, d, NULL);
  for (;;) {
    run_result r;
    switch (path) {
    case FBN_CUDA_PATH_ID_FUSED: r = forward_fused(&f, &s); break;
    case FBN_CUDA_PATH_ID_GENERAL: r = forward_general(&f, &s); break;
    case FBN_CUDA_PATH_ID_KERNELS: r = forward_own(&f, false, &s); break;
    case FBN_CUDA_PATH_ID_EVAL: r = forward_own(&f, true, &s); break;
    default:
      s = fbn_error(FBN_STATUS_UNSUPPORTED, "no CUDA path for dtype = %s, layout = %s",
                    fbn_dtype_name(d->dtype), fbn_layout_name(d->layout));
      r = RUN_ERROR;
      break;
    }
    if (r == RUN_OK)
      break;
    if (r == RUN_ERROR)
      return fbn_cuda_call_end(&f.cx, s);
    /* refused: recorded; the next path of the chain (nothing was written:
     * cuDNN checks before it launches) */
    int next = fbn_cuda_state_path(st, d, NULL);
    path = next != path ? next : fbn_cuda_fallback_path(path);
  }
  if (a->path != NULL)
    *a->path = path;
  if (a->saved != NULL)
    fbn_cuda_record_saved_path(a->saved, path);
  return fbn_cuda_call_end(&f.cx, FBN_STATUS_SUCCESS);
}
