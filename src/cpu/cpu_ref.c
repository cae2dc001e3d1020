/*
 * CPU reference backend: host memory, float32/float64/float16/bfloat16
 * tensors (float32 parameters and statistics with the last three), every
 * reduction and every intermediate in float64, each output rounded once from
 * double to its dtype (fbn_cpu_store; src/core/half.h for the half dtypes).
 * It is the oracle of the GPU tests, so it is written to match
 * docs/semantics.md line by line rather than to be fast.
 *
 * The ReLU gate of backward reads the stored y: with a half y, a small
 * positive pre-activation that rounded to +0 gates its gradient off (as
 * PyTorch's threshold_backward on a half output).
 *
 * Saved state: the CPU header, then mean[C] and invstd[C] (cpu_common.h);
 * nothing else (backward reads y for the ReLU gate).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/bn_formulas.h"
#include "cpu/cpu_common.h"

/* ---- element access ----------------------------------------------------- */

/* Index of (n, c, s) where s = h*W + w is the spatial position. */
static inline int64_t index_of(const fbn_tensor_desc *d, int64_t hw, int64_t n, int64_t c,
                               int64_t s) {
  return d->layout == FBN_LAYOUT_NCHW ? (n * d->c + c) * hw + s : (n * hw + s) * d->c + c;
}

/* ---- sizes -------------------------------------------------------------- */

static fbn_status ref_saved_size(const fbn_op_desc *op, void *state, const fbn_tensor_desc *d,
                                 size_t *bytes) {
  *bytes = fbn_cpu_saved_bytes(d, 0);
  return FBN_STATUS_SUCCESS;
}

static fbn_status ref_workspace_size(const fbn_op_desc *op, void *state,
                                     const fbn_tensor_desc *d, bool backward, size_t *bytes) {
  *bytes = 0;
  return FBN_STATUS_SUCCESS;
}

/* ---- forward ------------------------------------------------------------ */

static fbn_status ref_forward(const fbn_bk_forward_args *a) {
  const fbn_tensor_desc *d = a->desc;
  const fbn_op_desc *o = a->op;
  const fbn_dtype dt = d->dtype, pt = o->param_dtype;
  const int64_t hw = d->h * d->w, count = d->n * hw;
  const bool relu = fbn_operation_has_relu(o->operation);
  double *saved_stats = a->saved != NULL ? fbn_cpu_saved_stats(a->saved) : NULL;

  for (int64_t c = 0; c < d->c; c++) {
    double mean, var;
    if (o->statistics == FBN_STATISTICS_BATCH) {
      double sum = 0.0;
      for (int64_t n = 0; n < d->n; n++)
        for (int64_t s = 0; s < hw; s++)
          sum += fbn_cpu_load(a->x, dt, index_of(d, hw, n, c, s));
      mean = sum / (double)count;
      double sq = 0.0;
      for (int64_t n = 0; n < d->n; n++)
        for (int64_t s = 0; s < hw; s++) {
          double v = fbn_cpu_load(a->x, dt, index_of(d, hw, n, c, s)) - mean;
          sq += v * v;
        }
      var = sq / (double)count; /* biased: normalizes */
      if (a->update_running) {
        double unbiased = sq / (double)(count - 1);
        fbn_cpu_store(a->running_mean, pt, c,
              fbn_bn_running_update(fbn_cpu_load(a->running_mean, pt, c), a->factor, mean));
        fbn_cpu_store(a->running_var, pt, c,
              fbn_bn_running_update(fbn_cpu_load(a->running_var, pt, c), a->factor, unbiased));
      }
    } else {
      mean = fbn_cpu_load(a->running_mean, pt, c);
      var = fbn_cpu_load(a->running_var, pt, c);
    }
    const double invstd = o->statistics == FBN_STATISTICS_BATCH ? fbn_bn_batch_invstd(var, o->eps)
                                                                : fbn_bn_invstd(var, o->eps);
    const double weight = o->affine ? fbn_cpu_load(a->weight, pt, c) : 1.0;
    const double bias = o->affine ? fbn_cpu_load(a->bias, pt, c) : 0.0;
    for (int64_t n = 0; n < d->n; n++)
      for (int64_t s = 0; s < hw; s++) {
        const int64_t i = index_of(d, hw, n, c, s);
        double v = (fbn_cpu_load(a->x, dt, i) - mean) * invstd * weight + bias;
        if (a->addend != NULL)
          v += fbn_cpu_load(a->addend, dt, i);
        fbn_cpu_store(a->y, dt, i, relu ? fbn_bn_relu(v) : v);
      }
    if (saved_stats != NULL) {
      saved_stats[c] = mean;
      saved_stats[d->c + c] = invstd;
    }
  }
  if (a->saved != NULL)
    fbn_cpu_saved_seal(a->saved, fbn_backend_cpu_reference(), o, d);
  return FBN_STATUS_SUCCESS;
}

/* ---- backward ----------------------------------------------------------- */

/* g = dL/d(pre-activation) = dy * !(y <= 0) with a ReLU (on the stored y; a
 * NaN y passes dy, as in PyTorch), else dy: the gradient reaching both the
 * addend and BN's output. */
static inline double gated_dy(const fbn_bk_backward_args *a, fbn_dtype dt, bool relu, int64_t i) {
  return relu && fbn_cpu_load(a->y, dt, i) <= 0.0 ? 0.0 : fbn_cpu_load(a->dy, dt, i);
}

static fbn_status ref_backward(const fbn_bk_backward_args *a) {
  const fbn_tensor_desc *d = a->desc;
  const fbn_op_desc *o = a->op;
  fbn_status st = fbn_cpu_saved_check(a->saved, fbn_backend_cpu_reference(), o, d);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const fbn_dtype dt = d->dtype, pt = o->param_dtype;
  const int64_t hw = d->h * d->w, count = d->n * hw;
  const bool relu = fbn_operation_has_relu(o->operation);
  const bool batch_stats = o->statistics == FBN_STATISTICS_BATCH;
  const double *saved_mean = fbn_cpu_saved_stats_const(a->saved);
  const double *saved_invstd = saved_mean + d->c;

  for (int64_t c = 0; c < d->c; c++) {
    const double mean = saved_mean[c], invstd = saved_invstd[c];
    double sum_g = 0.0, sum_g_xhat = 0.0;
    for (int64_t n = 0; n < d->n; n++)
      for (int64_t s = 0; s < hw; s++) {
        const int64_t i = index_of(d, hw, n, c, s);
        const double g = gated_dy(a, dt, relu, i);
        sum_g += g;
        sum_g_xhat += g * (fbn_cpu_load(a->x, dt, i) - mean) * invstd;
      }
    if (a->dweight != NULL)
      fbn_cpu_store(a->dweight, pt, c,
                    a->accumulate ? fbn_cpu_load(a->dweight, pt, c) + sum_g_xhat : sum_g_xhat);
    if (a->dbias != NULL)
      fbn_cpu_store(a->dbias, pt, c,
                    a->accumulate ? fbn_cpu_load(a->dbias, pt, c) + sum_g : sum_g);
    const double weight = o->affine ? fbn_cpu_load(a->weight, pt, c) : 1.0;
    const double k = weight * invstd;
    const double mean_g = sum_g / (double)count, mean_g_xhat = sum_g_xhat / (double)count;
    for (int64_t n = 0; n < d->n; n++)
      for (int64_t s = 0; s < hw; s++) {
        const int64_t i = index_of(d, hw, n, c, s);
        const double g = gated_dy(a, dt, relu, i);
        if (a->daddend != NULL)
          fbn_cpu_store(a->daddend, dt, i, g);
        if (a->dx != NULL) {
          const double xhat = (fbn_cpu_load(a->x, dt, i) - mean) * invstd;
          fbn_cpu_store(a->dx, dt, i, fbn_bn_dx(k, g, xhat, mean_g, mean_g_xhat, batch_stats));
        }
      }
  }
  return FBN_STATUS_SUCCESS;
}

static const fbn_backend ref_backend = {
    .name = "cpu-reference",
    .device = FBN_DEVICE_CPU,
    .op_init = fbn_cpu_op_init,
    .op_fini = fbn_cpu_op_fini,
    .check_shape = NULL,
    .saved_size = ref_saved_size,
    .workspace_size = ref_workspace_size,
    .forward = ref_forward,
    .backward = ref_backward,
    .mem_alloc = fbn_cpu_mem_alloc,
    .mem_free = fbn_cpu_mem_free,
    .mem_copy = fbn_cpu_mem_copy,
    .mem_fill = fbn_cpu_mem_fill,
};

const fbn_backend *fbn_backend_cpu_reference(void) { return &ref_backend; }
