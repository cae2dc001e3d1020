/*
 * Paths and plans of the cuDNN backend: which path a call of an op takes
 * (cuda_paths.c's table with what cuDNN refused at run time and
 * FBN_CUDA_FORCE_PATH), the per-op cache of cuDNN descriptors and sizes,
 * and the workspace and saved-state sizes the API layer queries.
 */
#include <string.h>

#include "cuda_internal.h"

fbn_k_shape fbn_cuda_kshape(const fbn_tensor_desc *d) {
  fbn_k_shape s = {
      .n = d->n,
      .c = d->c,
      .hw = d->h * d->w,
      .nhwc = d->layout == FBN_LAYOUT_NHWC,
      .dtype = (int)d->dtype,
  };
  return s;
}

size_t fbn_cuda_tensor_bytes(const fbn_tensor_desc *d) {
  return (size_t)(d->n * d->c * d->h * d->w) * fbn_dtype_size(d->dtype);
}

static size_t param_size_of(const fbn_tensor_desc *d) {
  return d->dtype == FBN_DTYPE_FLOAT64 ? sizeof(double) : sizeof(float);
}

size_t fbn_cuda_stats_bytes(const fbn_tensor_desc *d) {
  return fbn_cuda_align_up((size_t)d->c * param_size_of(d));
}

/* The kernels keep their per-channel coefficients in float64 for every
 * dtype (cuda_kernels.cu: Coef). */
size_t fbn_cuda_coef_bytes(const fbn_tensor_desc *d, int coefs) {
  return fbn_cuda_align_up((size_t)coefs * (size_t)d->c * sizeof(double));
}

size_t fbn_cuda_own_backward_ws(const fbn_tensor_desc *d) {
  fbn_k_shape ks = fbn_cuda_kshape(d);
  return fbn_cuda_align_up(fbn_k_partials_bytes(&ks)) + fbn_cuda_coef_bytes(d, FBN_K_BWD_COEFS);
}

/* ---- paths ---------------------------------------------------------------- */

static int select_with(const fbn_cuda_state *st, const fbn_cuda_refusals *refusals,
                       const fbn_tensor_desc *d, bool forced, const char **why) {
  const fbn_op_desc *o = &st->op;
  const bool batch_stats = o->statistics == FBN_STATISTICS_BATCH;
  int path = fbn_cuda_select_path(&st->limits, refusals, o->bn_mode, o->eps, d, o->operation,
                                  batch_stats, why);
  if (forced && st->forced_path != FBN_CUDA_PATH_ID_NONE && batch_stats &&
      path != FBN_CUDA_PATH_ID_NONE && !fbn_cuda_size_gated(&st->limits, o->eps, d)) {
    path = st->forced_path;
    if (why != NULL)
      *why = "forced by FBN_CUDA_FORCE_PATH";
  }
  return path;
}

int fbn_cuda_state_path(const fbn_cuda_state *st, const fbn_tensor_desc *d, const char **why) {
  return select_with(st, &st->refusals, d, true, why);
}

bool fbn_cuda_forward_maybe_fused(const fbn_cuda_state *st, const fbn_tensor_desc *d) {
  if (st->forced_path != FBN_CUDA_PATH_ID_NONE)
    return false; /* the forced path is fixed for the op's life */
  return select_with(st, NULL, d, false, NULL) == FBN_CUDA_PATH_ID_FUSED &&
         fbn_cuda_state_path(st, d, NULL) != FBN_CUDA_PATH_ID_FUSED;
}

bool fbn_cuda_is_refusal(fbn_dnn_error e, fbn_dtype dtype) {
  if (fbn_dnn_is_not_supported(e))
    return true;
  /* bfloat16 in the legacy batch-norm calls is undocumented: a BAD_PARAM
   * there means the same. */
  return dtype == FBN_DTYPE_BFLOAT16 && fbn_dnn_is_bad_param(e);
}

void fbn_cuda_refuse(fbn_cuda_state *st, int path, const fbn_tensor_desc *d) {
  if (path == FBN_CUDA_PATH_ID_FUSED)
    *fbn_cuda_fused_refusal(&st->refusals, d, st->op.operation) = true;
  else if (path == FBN_CUDA_PATH_ID_GENERAL)
    st->refusals.bn[d->dtype] = true;
}

/* ---- plan cache ----------------------------------------------------------- */

fbn_cuda_plan_result fbn_cuda_get_plan(fbn_cuda_state *st, const fbn_tensor_desc *d, int path,
                                       const fbn_dnn_plan **plan, const fbn_dnn_sizes **sizes,
                                       fbn_status *status) {
  fbn_cuda_plan_slot *victim = &st->plans[0];
  for (int i = 0; i < FBN_CUDA_PLAN_SLOTS; i++) {
    fbn_cuda_plan_slot *slot = &st->plans[i];
    if (slot->valid && slot->plan.path == path && fbn_desc_equal(&slot->plan.desc, d)) {
      slot->last_use = ++st->plan_clock;
      *plan = &slot->plan;
      *sizes = &slot->sizes;
      return FBN_CUDA_PLAN_OK;
    }
    if (!slot->valid || (victim->valid && slot->last_use < victim->last_use))
      victim = slot;
  }
  if (st->dnn == NULL) {
    *status = fbn_error(FBN_STATUS_DEVICE_ERROR, "the op holds no cuDNN handle for path %s",
                        fbn_cuda_path_id_name(path));
    return FBN_CUDA_PLAN_ERROR;
  }
  fbn_dnn_plan p;
  fbn_dnn_error e = fbn_dnn_plan_init(&p, d, path, st->op.operation);
  if (fbn_dnn_ok(e)) {
    fbn_dnn_sizes sz;
    e = fbn_dnn_plan_sizes(st->dnn, &p, &sz);
    if (fbn_dnn_ok(e)) {
      if (victim->valid)
        fbn_dnn_plan_fini(&victim->plan);
      victim->plan = p;
      victim->sizes = sz;
      victim->valid = true;
      victim->last_use = ++st->plan_clock;
      *plan = &victim->plan;
      *sizes = &victim->sizes;
      return FBN_CUDA_PLAN_OK;
    }
    fbn_dnn_plan_fini(&p);
  }
  if (fbn_cuda_is_refusal(e, d->dtype)) {
    fbn_cuda_refuse(st, path, d);
    return FBN_CUDA_PLAN_REFUSED;
  }
  *status = fbn_cuda_dnn_fail(e);
  return FBN_CUDA_PLAN_ERROR;
}

/* ---- sizes ------------------------------------------------------------------ */

/* Workspace one path needs; *status set on ERROR. */
static fbn_cuda_plan_result path_workspace(fbn_cuda_state *st, const fbn_tensor_desc *d, int path,
                                           bool backward, size_t *bytes, fbn_status *status) {
  const fbn_operation op = st->op.operation;
  fbn_k_shape ks = fbn_cuda_kshape(d);
  const size_t own_bwd = fbn_cuda_own_backward_ws(d);
  *bytes = 0;
  switch (path) {
  case FBN_CUDA_PATH_ID_FUSED: {
    const fbn_dnn_plan *plan;
    const fbn_dnn_sizes *sz;
    fbn_cuda_plan_result r = fbn_cuda_get_plan(st, d, path, &plan, &sz, status);
    if (r != FBN_CUDA_PLAN_OK)
      return r;
    if (backward) {
      /* dz scratch for the addend's gradient when daddend is skipped */
      size_t need = fbn_cuda_dnn_ws_bytes(sz->backward_workspace) +
                    (op == FBN_OPERATION_BN_ADD_RELU
                         ? fbn_cuda_align_up(fbn_cuda_tensor_bytes(d))
                         : 0);
      *bytes = need > own_bwd ? need : own_bwd;
    } else {
      /* cuDNN workspace, and reserve + saved statistics without saved memory */
      *bytes = fbn_cuda_dnn_ws_bytes(sz->forward_workspace) + fbn_cuda_align_up(sz->reserve) +
               2 * fbn_cuda_stats_bytes(d);
    }
    return FBN_CUDA_PLAN_OK;
  }
  case FBN_CUDA_PATH_ID_GENERAL:
    if (backward) {
      /* dz = dy * mask for cuDNN's backward (a ReLU operation) */
      size_t need = fbn_operation_has_relu(op) ? fbn_cuda_align_up(fbn_cuda_tensor_bytes(d)) : 0;
      *bytes = need > own_bwd ? need : own_bwd;
    }
    return FBN_CUDA_PLAN_OK;
  case FBN_CUDA_PATH_ID_KERNELS:
    *bytes = backward ? own_bwd
                      : fbn_cuda_align_up(fbn_k_partials_bytes(&ks)) +
                            fbn_cuda_coef_bytes(d, FBN_K_FWD_COEFS);
    return FBN_CUDA_PLAN_OK;
  case FBN_CUDA_PATH_ID_EVAL:
    *bytes = backward ? own_bwd : fbn_cuda_coef_bytes(d, FBN_K_FWD_COEFS);
    return FBN_CUDA_PLAN_OK;
  default: return FBN_CUDA_PLAN_OK;
  }
}

fbn_status fbn_cuda_workspace_bound(fbn_cuda_state *st, const fbn_tensor_desc *d, bool backward,
                                    size_t *bytes) {
  *bytes = 0;
  int path = fbn_cuda_state_path(st, d, NULL);
  /* A backward may find the class refused after its forward took the
   * fused path: it then runs fusedbn's kernels (included in every bound). */
  while (path != FBN_CUDA_PATH_ID_NONE) {
    size_t b = 0;
    fbn_status s = FBN_STATUS_SUCCESS;
    fbn_cuda_plan_result r = path_workspace(st, d, path, backward, &b, &s);
    if (r == FBN_CUDA_PLAN_ERROR)
      return s;
    if (r == FBN_CUDA_PLAN_OK && b > *bytes)
      *bytes = b;
    path = fbn_cuda_fallback_path(path);
  }
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cuda_saved_layout_of(fbn_cuda_state *st, const fbn_tensor_desc *d,
                                    fbn_cuda_saved_layout *l) {
  memset(l, 0, sizeof *l);
  fbn_k_shape ks = fbn_cuda_kshape(d);
  /* A ReLU operation's mask, which every path but the fused one writes. */
  const size_t mask = fbn_operation_has_relu(st->op.operation)
                          ? fbn_cuda_align_up(fbn_k_mask_words(&ks) * sizeof(uint32_t))
                          : 0;
  l->extra_bytes = mask;
  int path = fbn_cuda_state_path(st, d, NULL);
  while (path == FBN_CUDA_PATH_ID_FUSED) {
    const fbn_dnn_plan *plan;
    const fbn_dnn_sizes *sz;
    fbn_status s = FBN_STATUS_SUCCESS;
    fbn_cuda_plan_result r = fbn_cuda_get_plan(st, d, path, &plan, &sz, &s);
    if (r == FBN_CUDA_PLAN_ERROR)
      return s;
    if (r == FBN_CUDA_PLAN_REFUSED) {
      path = fbn_cuda_state_path(st, d, NULL);
      continue;
    }
    l->reserve_bytes = sz->reserve;
    if (fbn_cuda_align_up(sz->reserve) > l->extra_bytes)
      l->extra_bytes = fbn_cuda_align_up(sz->reserve);
    break;
  }
  l->mean_off = 0;
  l->invstd_off = fbn_cuda_stats_bytes(d);
  l->extra_off = 2 * fbn_cuda_stats_bytes(d);
  l->total = l->extra_off + l->extra_bytes;
  return FBN_STATUS_SUCCESS;
}
