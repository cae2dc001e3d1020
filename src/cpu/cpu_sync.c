/* Synchronized batch norm hooks of the CPU backends (cpu_sync.h). */
#include "cpu/cpu_sync.h"

#include "core/bn_formulas.h"

static inline int64_t index_of(const fbn_tensor_desc *d, int64_t hw, int64_t n, int64_t c,
                               int64_t s) {
  return d->layout == FBN_LAYOUT_NCHW ? (n * d->c + c) * hw + s : (n * hw + s) * d->c + c;
}

/* Whether a loop over the channels of desc is worth threads. */
static inline bool parallel_worth(const fbn_tensor_desc *d) {
  return d->c > 1 && d->n * d->c * d->h * d->w >= 65536;
}

static fbn_status cpu_sync_stats(const fbn_op_desc *op, void *state, const fbn_tensor_desc *d,
                                 const void *x, double *mean_out, double *m2_out) {
  (void)op;
  (void)state;
  const fbn_dtype dt = d->dtype;
  const int64_t hw = d->h * d->w, count = d->n * hw, c_ = d->c;
  const bool par = parallel_worth(d);
  (void)par;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (par)
#endif
  for (int64_t c = 0; c < c_; c++) {
    /* two passes, as the reference backend's batch statistics */
    double sum = 0.0;
    for (int64_t n = 0; n < d->n; n++)
      for (int64_t s = 0; s < hw; s++)
        sum += fbn_cpu_load(x, dt, index_of(d, hw, n, c, s));
    const double mean = count > 0 ? sum / (double)count : 0.0;
    double sq = 0.0;
    for (int64_t n = 0; n < d->n; n++)
      for (int64_t s = 0; s < hw; s++) {
        const double v = fbn_cpu_load(x, dt, index_of(d, hw, n, c, s)) - mean;
        sq += v * v;
      }
    mean_out[c] = mean;
    m2_out[c] = sq;
  }
  return FBN_STATUS_SUCCESS;
}

/* dx = k (g - sum_g / total - xhat sum_gxhat / total), daddend = g, with the
 * saved mean/invstd of the apply forward (the reference's backward
 * arithmetic with the whole batch's sums and count). */
static fbn_status sync_backward_apply(const fbn_bk_backward_args *a, const double *sum_g,
                                      const double *sum_gxhat, int64_t total) {
  const fbn_tensor_desc *d = a->desc;
  const fbn_op_desc *o = a->op;
  const fbn_dtype dt = d->dtype, pt = o->param_dtype;
  const int64_t hw = d->h * d->w, c_ = d->c;
  const bool relu = fbn_operation_has_relu(o->operation);
  const double *saved_mean = fbn_cpu_saved_stats_const(a->saved);
  const double *saved_invstd = saved_mean + d->c;
  const bool par = parallel_worth(d);
  (void)par;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (par)
#endif
  for (int64_t c = 0; c < c_; c++) {
    const double mean = saved_mean[c], invstd = saved_invstd[c];
    const double weight = o->affine ? fbn_cpu_load(a->weight, pt, c) : 1.0;
    const double k = weight * invstd;
    const double mean_g = sum_g[c] / (double)total, mean_g_xhat = sum_gxhat[c] / (double)total;
    for (int64_t n = 0; n < d->n; n++)
      for (int64_t s = 0; s < hw; s++) {
        const int64_t i = index_of(d, hw, n, c, s);
        const double g =
            relu && fbn_cpu_load(a->y, dt, i) <= 0.0 ? 0.0 : fbn_cpu_load(a->dy, dt, i);
        if (a->daddend != NULL)
          fbn_cpu_store(a->daddend, dt, i, g);
        if (a->dx != NULL) {
          const double xhat = (fbn_cpu_load(a->x, dt, i) - mean) * invstd;
          fbn_cpu_store(a->dx, dt, i, fbn_bn_dx(k, g, xhat, mean_g, mean_g_xhat, true));
        }
      }
  }
  return FBN_STATUS_SUCCESS;
}

static fbn_status ref_sync_backward_apply(const fbn_bk_backward_args *a, const double *sum_g,
                                          const double *sum_gxhat, int64_t total_count) {
  fbn_status st = fbn_cpu_saved_check(a->saved, fbn_backend_cpu_reference(), a->op, a->desc);
  return st == FBN_STATUS_SUCCESS ? sync_backward_apply(a, sum_g, sum_gxhat, total_count) : st;
}

static fbn_status fast_sync_backward_apply(const fbn_bk_backward_args *a, const double *sum_g,
                                           const double *sum_gxhat, int64_t total_count) {
  fbn_status st = fbn_cpu_saved_check(a->saved, fbn_backend_cpu_fast(), a->op, a->desc);
  return st == FBN_STATUS_SUCCESS ? sync_backward_apply(a, sum_g, sum_gxhat, total_count) : st;
}

static const fbn_backend_sync ref_sync = {cpu_sync_stats, ref_sync_backward_apply};
static const fbn_backend_sync fast_sync = {cpu_sync_stats, fast_sync_backward_apply};

const fbn_backend_sync *fbn_backend_sync_hooks(const fbn_backend *backend) {
  if (backend == fbn_backend_cpu_reference())
    return &ref_sync;
  if (backend == fbn_backend_cpu_fast())
    return &fast_sync;
  return NULL;
}
