/*
 * Fast CPU backend: per-channel work shared by both dtypes: batch and
 * running statistics with the running-average update and the saved
 * mean/invstd, and the exact (reference arithmetic) paths of forward and
 * backward for degenerate channels.
 */
#ifndef FUSEDBN_SRC_CPU_FAST_FAST_CHANNEL_H
#define FUSEDBN_SRC_CPU_FAST_FAST_CHANNEL_H

#include "core/bn_formulas.h"
#include "cpu/fast/fast_chunks.h"

/* ---- per-channel statistics (shared by both dtypes) --------------------- */

static void fbn_fast_save(const fbn_bk_forward_args *a, int64_t c, double mean, double invstd) {
  if (a->saved != NULL) {
    double *p = fbn_cpu_saved_stats(a->saved);
    p[c] = mean;
    p[a->desc->c + c] = invstd;
  }
}

/* Mean and sum of squared deviations of channel c, as the reference backend
 * computes them (two passes, float64, n-major order). */
static void fbn_fast_exact_stats(const fbn_tensor_desc *d, const void *x, int64_t c,
                                 double *mean_out, double *sq_out) {
  const int64_t hw = d->h * d->w, count = d->n * hw;
  double sum = 0.0;
  for (int64_t n = 0; n < d->n; n++)
    for (int64_t s = 0; s < hw; s++)
      sum += fbn_fast_load(x, d->dtype, fbn_fast_index(d, hw, n, c, s));
  const double mean = sum / (double)count;
  double sq = 0.0;
  for (int64_t n = 0; n < d->n; n++)
    for (int64_t s = 0; s < hw; s++) {
      const double v = fbn_fast_load(x, d->dtype, fbn_fast_index(d, hw, n, c, s)) - mean;
      sq += v * v;
    }
  *mean_out = mean;
  *sq_out = sq;
}

/*
 * The shift k of channel c's shifted sums: the median of three of its
 * values, the first, one in the middle and the last (n-major order), so
 * that a single outlying value is never the shift; what an unlucky sample
 * leaves (two outliers among the three) FBN_FAST_SHIFT_MAX_R below catches.
 */
static double fbn_fast_shift_of(const fbn_tensor_desc *d, const void *x, int64_t c) {
  const int64_t hw = d->h * d->w;
  const double a = fbn_fast_load(x, d->dtype, fbn_fast_index(d, hw, 0, c, 0));
  const double b = fbn_fast_load(x, d->dtype, fbn_fast_index(d, hw, d->n / 2, c, hw / 2));
  const double e = fbn_fast_load(x, d->dtype, fbn_fast_index(d, hw, d->n - 1, c, hw - 1));
  const double lo = a < b ? a : b, hi = a < b ? b : a;
  return e < lo ? lo : e > hi ? hi : e;
}

/*
 * Shifted sums give the sum of squared deviations as s2 - s1^2/count, whose
 * rounding grows with R = (k - mean)^2 / var, the squared distance of the
 * shift k from the mean in standard deviations (the error is about
 * R * 1e-16 relative in float64). Up to R = 64 (a shift within 8 standard
 * deviations of the mean: every channel of normally distributed data) that
 * stays at the two-pass sum's level; a channel whose shift is an outlier
 * beyond it is recomputed by two passes.
 */
#define FBN_FAST_SHIFT_MAX_R 64.0

/*
 * Batch statistics of channel c from its shifted sums s1 = sum (x - k),
 * s2 = sum (x - k)^2: running-statistics update, saved mean/invstd.
 * Non-finite sums, a shift beyond FBN_FAST_SHIFT_MAX_R, or a zero variance
 * with eps = 0 are recomputed the reference's way (which then decides
 * whether the channel is constant: invstd = 0).
 */
static void fbn_fast_batch_stats(fbn_fast_call *m, const fbn_bk_forward_args *a, int64_t c,
                                 double k,
                                 double s1, double s2, double *mean_out, double *invstd_out) {
  const fbn_tensor_desc *d = a->desc;
  const fbn_op_desc *o = m->op;
  const int64_t count = d->n * d->h * d->w;
  double mean, sq;
  bool ok = isfinite(s1) && isfinite(s2);
  if (ok) {
    const double mu = s1 / (double)count;
    sq = s2 - s1 * mu;
    if (sq < 0.0)
      sq = 0.0;
    mean = k + mu;
    ok = sq / (double)count + o->eps > 0.0 && s1 * mu <= FBN_FAST_SHIFT_MAX_R * sq;
  }
  if (!ok)
    fbn_fast_exact_stats(d, a->x, c, &mean, &sq);
  const double var = sq / (double)count; /* biased: normalizes */
  if (a->update_running) {
    const fbn_dtype pt = o->param_dtype;
    const double unbiased = sq / (double)(count - 1);
    void *rm = m->running_mean, *rv = m->running_var;
    fbn_fast_store(rm, pt, c, fbn_bn_running_update(fbn_fast_load(rm, pt, c), a->factor, mean));
    fbn_fast_store(rv, pt, c,
                   fbn_bn_running_update(fbn_fast_load(rv, pt, c), a->factor, unbiased));
  }
  const double invstd = fbn_bn_batch_invstd(var, o->eps);
  fbn_fast_save(a, c, mean, invstd);
  *mean_out = mean;
  *invstd_out = invstd;
}

static void fbn_fast_running_stats(const fbn_fast_call *m, const fbn_bk_forward_args *a, int64_t c,
                                   double *mean_out, double *invstd_out) {
  const double mean = fbn_fast_param(m, m->running_mean, c);
  const double var = fbn_fast_param(m, m->running_var, c);
  const double invstd = fbn_bn_invstd(var, m->op->eps);
  fbn_fast_save(a, c, mean, invstd);
  *mean_out = mean;
  *invstd_out = invstd;
}

/* y of channel c with the reference's arithmetic (and its mask bits). */
static void fbn_fast_exact_normalize(const fbn_fast_call *m, const fbn_bk_forward_args *a,
                                     int64_t c,
                                     double mean, double invstd, uint8_t *bits, int64_t bpr) {
  (void)bpr;
  const fbn_tensor_desc *d = a->desc;
  const int64_t hw = d->h * d->w;
  const double weight = fbn_fast_weight(m, c), bias = fbn_fast_bias(m, c);
  const bool relu = fbn_operation_has_relu(a->op->operation);
  for (int64_t n = 0; n < d->n; n++)
    for (int64_t s = 0; s < hw; s++) {
      const int64_t i = fbn_fast_index(d, hw, n, c, s);
      double v = (fbn_fast_load(a->x, d->dtype, i) - mean) * invstd * weight + bias;
      if (a->addend != NULL)
        v += fbn_fast_load(a->addend, d->dtype, i);
      fbn_fast_store(a->y, d->dtype, i, !relu || v > 0.0 || isnan(v) ? v : 0.0);
      if (bits != NULL)
        fbn_fast_mask_set(d, bits, n, c, s, !(fbn_fast_load(a->y, d->dtype, i) <= 0.0));
    }
}

/* ---- whether a channel's coefficients fit the vectorized loops ---------- */

/*
 * The vectorized loops compute in the tensor's type T:
 *   forward   y  = ReLU((x - m) * a + b [+ z])
 *   backward  dx = g * k + (x - m) * c1 + c0    (c1 = c0 = 0: running stats)
 * with the coefficients computed in float64 and rounded to T once
 * (fast_loops_impl.h: forward_coef, backward_coef). A channel takes them
 * only when, besides every coefficient being finite:
 *   - each factor (a, k, c1) is a normal number of T, or zero because one of
 *     its float64 factors is zero: a factor rounded to a subnormal or to zero
 *     has lost its relative precision, and so has every product with it (a
 *     channel of standard deviation 1e19 in float32 has c1 ~ invstd^2 ~
 *     1e-38). The terms b and c0 may be subnormal: their rounding is no
 *     larger than the result's own.
 *   - |m| is below half an ulp of T's largest finite value, so that x - m
 *     is finite for every finite x (values near T's largest, with a mean far
 *     from 0, would overflow it where the float64 arithmetic does not).
 * Other channels take the exact path (the reference's arithmetic).
 */
static inline bool fbn_fast_factor_fits(bool exact_zero, double rounded, double t_min) {
  return exact_zero || fabs(rounded) >= t_min;
}

/* Half an ulp of T's largest finite value, less a little: 2^103 for float,
 * 2^970 for double. */
#define FBN_FAST_SHIFT_LIMIT(t_max, t_epsilon) ((double)(t_max) * (double)(t_epsilon) * 0.25)

static inline bool fbn_fast_shift_fits(double rounded, double limit) {
  return fabs(rounded) < limit;
}

/* ---- per-channel backward ----------------------------------------------- */

static void fbn_fast_bwd_chan_init(const fbn_fast_call *m, const fbn_bk_backward_args *a, int64_t c,
                                   fbn_fast_bwd_chan *ch) {
  const double *p = fbn_cpu_saved_stats_const(a->saved);
  ch->mean = p[c];
  ch->invstd = p[a->desc->c + c];
  ch->weight = fbn_fast_weight(m, c);
  ch->sum_g = ch->sum_gxhat = 0.0;
  ch->finite = isfinite(ch->mean) && isfinite(ch->invstd) && isfinite(ch->weight);
}

/* sum g and sum g * xhat of channel c the reference's way. */
static void fbn_fast_exact_bwd_sums(const fbn_bk_backward_args *a, int64_t c,
                                    fbn_fast_bwd_chan *ch) {
  const fbn_tensor_desc *d = a->desc;
  const fbn_dtype dt = d->dtype;
  const int64_t hw = d->h * d->w;
  const bool relu = fbn_operation_has_relu(a->op->operation);
  double sum_g = 0.0, sum_g_xhat = 0.0;
  for (int64_t n = 0; n < d->n; n++)
    for (int64_t s = 0; s < hw; s++) {
      const int64_t i = fbn_fast_index(d, hw, n, c, s);
      const double g =
          relu && fbn_fast_load(a->y, dt, i) <= 0.0 ? 0.0 : fbn_fast_load(a->dy, dt, i);
      sum_g += g;
      sum_g_xhat += g * (fbn_fast_load(a->x, dt, i) - ch->mean) * ch->invstd;
    }
  ch->sum_g = sum_g;
  ch->sum_gxhat = sum_g_xhat;
}

/*
 * Complete channel c's sums from the fast reduction (sg = sum g,
 * sgx = sum g*(x - mean)) or, if the channel is not on the fast path or the
 * sums are not finite, exactly; accumulate dweight/dbias. Returns whether
 * the channel stays on the fast path.
 */
static bool fbn_fast_bwd_chan_sums(fbn_fast_call *m, const fbn_bk_backward_args *a, int64_t c,
                                   bool fast, double sg, double sgx, fbn_fast_bwd_chan *ch) {
  if (fast) {
    ch->sum_g = sg;
    ch->sum_gxhat = sgx * ch->invstd;
    fast = isfinite(ch->sum_g) && isfinite(ch->sum_gxhat);
  }
  if (!fast)
    fbn_fast_exact_bwd_sums(a, c, ch);
  const fbn_dtype pt = m->op->param_dtype;
  if (m->dweight != NULL)
    fbn_fast_store(m->dweight, pt, c,
                   m->accumulate ? fbn_fast_load(m->dweight, pt, c) + ch->sum_gxhat
                                 : ch->sum_gxhat);
  if (m->dbias != NULL)
    fbn_fast_store(m->dbias, pt, c,
                   m->accumulate ? fbn_fast_load(m->dbias, pt, c) + ch->sum_g : ch->sum_g);
  return fast;
}

/* dx and daddend of channel c with the reference's arithmetic. */
static void fbn_fast_exact_backward_apply(const fbn_fast_call *m, const fbn_bk_backward_args *a,
                                          int64_t c, const fbn_fast_bwd_chan *ch) {
  const fbn_tensor_desc *d = a->desc;
  const fbn_dtype dt = d->dtype;
  const int64_t hw = d->h * d->w, count = d->n * hw;
  const double k = ch->weight * ch->invstd;
  const double mean_g = ch->sum_g / (double)count, mean_g_xhat = ch->sum_gxhat / (double)count;
  const bool relu = fbn_operation_has_relu(a->op->operation);
  for (int64_t n = 0; n < d->n; n++)
    for (int64_t s = 0; s < hw; s++) {
      const int64_t i = fbn_fast_index(d, hw, n, c, s);
      const double g =
          relu && fbn_fast_load(a->y, dt, i) <= 0.0 ? 0.0 : fbn_fast_load(a->dy, dt, i);
      if (a->daddend != NULL)
        fbn_fast_store(a->daddend, dt, i, g);
      if (a->dx != NULL) {
        double dx;
        if (fbn_fast_full(a)) {
          const double xhat = (fbn_fast_load(a->x, dt, i) - ch->mean) * ch->invstd;
          dx = k * (g - mean_g - xhat * mean_g_xhat);
        } else {
          dx = k * g;
        }
        fbn_fast_store(a->dx, dt, i, dx);
      }
    }
}

#endif /* FUSEDBN_SRC_CPU_FAST_FAST_CHANNEL_H */
