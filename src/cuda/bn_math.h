/*
 * Batch-norm formulas shared by the CUDA kernels (nvcc) and the host code
 * and host-only tests (C11), so the host tests exercise the very lines the
 * kernels run.  Everything is double precision.
 */
#ifndef FUSEDBN_SRC_CUDA_BN_MATH_H
#define FUSEDBN_SRC_CUDA_BN_MATH_H

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#  define FBN_HD __host__ __device__ __forceinline__
#else
#  define FBN_HD static inline
#endif

/* Running-statistics update with cuDNN's exponentialAverageFactor f:
 * running = f * batch + (1 - f) * running.  f is the momentum, or
 * 1/num_batches_tracked after the increment for the cumulative average (so
 * the first update, f = 1, replaces the initial value). */
FBN_HD double fbn_bn_running_update(double running, double batch, double factor) {
  return (1.0 - factor) * running + factor * batch;
}

/* The shift of a channel's shifted sums: the median of three of its
 * values, the first, one in the middle and the last in (n, h*w) order, so
 * that a single outlying value is never the shift (the CPU fast backend's
 * rule).  The rounding of the one-pass variance grows with the squared
 * distance of the shift from the mean in standard deviations; a channel
 * where two of the three samples are outliers keeps that error (the
 * kernels have no two-pass fallback). */
FBN_HD double fbn_bn_median3(double a, double b, double e) {
  const double lo = a < b ? a : b, hi = a < b ? b : a;
  return e < lo ? lo : e > hi ? hi : e;
}

/* Element offsets of the three shift samples of channel c of an (n, C, hw)
 * tensor, channels last (nhwc) or not. */
FBN_HD void fbn_bn_shift_samples(int64_t n, int64_t c, int64_t C, int64_t hw, int nhwc,
                                 int64_t at[3]) {
  const int64_t nn[3] = {0, n / 2, n - 1}, ss[3] = {0, hw / 2, hw - 1};
  for (int k = 0; k < 3; k++)
    at[k] = nhwc ? (nn[k] * hw + ss[k]) * C + c : (nn[k] * C + c) * hw + ss[k];
}

/* Batch statistics of one channel from the sums of (x - shift) and
 * (x - shift)^2 over count values (count >= 1).  Shifting by a value near
 * the channel's mean keeps the one-pass variance accurate when
 * |mean| >> std. */
typedef struct fbn_bn_stats {
  double mean;
  double var;          /* biased: divides by count (normalization) */
  double var_unbiased; /* divides by count - 1 (running_var); count >= 2 */
} fbn_bn_stats;

FBN_HD fbn_bn_stats fbn_bn_stats_from_sums(double shift, double sum, double sumsq,
                                           int64_t count) {
  fbn_bn_stats s;
  const double m = sum / (double)count;
  double var = sumsq / (double)count - m * m;
  /* Rounding can make a zero variance slightly negative; NaN stays NaN. */
  if (var < 0.0)
    var = 0.0;
  s.mean = shift + m;
  s.var = var;
  s.var_unbiased = count > 1 ? var * ((double)count / (double)(count - 1)) : var;
  return s;
}

/* Inverse standard deviation of batch statistics: 0 for a zero variance
 * with eps = 0 (a constant channel: y = bias [+ addend], dx = 0, PyTorch's
 * InvStd rule), else 1/sqrt(var + eps). Running statistics keep
 * 1/sqrt(var + eps), as PyTorch in eval mode. */
FBN_HD double fbn_bn_stats_invstd(double var, double eps) {
  return var == 0.0 && eps == 0.0 ? 0.0 : 1.0 / sqrt(var + eps);
}

/* Number of slices each channel's count values are split into for the
 * reduction kernels: enough blocks to fill a large GPU, at most 2048 blocks
 * of channel groups, and each slice a few thousand values.  groups is the
 * number of channel groups (C for NCHW, ceil(C/32) for NHWC).  A pure
 * function of the shape, so workspace sizes are known on the host. */
#define FBN_BN_SLICE_TARGET 4096
/* NHWC: rows (of C values) per slice. A block reads 8 rows per step, so
 * 128 rows is 16 steps; with 4096 (the NCHW target) a (32,64,56,56) tensor
 * got 50 blocks and ran at ~5% of the copy bandwidth on an H100. */
#define FBN_BN_NHWC_SLICE_ROWS 128
#define FBN_BN_MAX_BLOCKS 2048
FBN_HD int fbn_bn_reduce_slices_target(int64_t count, int64_t groups, int64_t target) {
  int64_t want = (count + target - 1) / target;
  int64_t cap = groups >= FBN_BN_MAX_BLOCKS ? 1 : FBN_BN_MAX_BLOCKS / groups;
  if (want > cap)
    want = cap;
  if (want < 1)
    want = 1;
  return (int)want;
}

FBN_HD int fbn_bn_reduce_slices(int64_t count, int64_t groups) {
  return fbn_bn_reduce_slices_target(count, groups, FBN_BN_SLICE_TARGET);
}

/* Backward coefficients of one channel: with g = dy * !(y <= 0),
 *   dx = k * g + b * (x - mean) + d
 * where for batch statistics (count values, invstd = 1/sqrt(var + eps))
 *   k = weight * invstd
 *   b = -k * invstd * sum(g * xhat) / count
 *   d = -k * sum(g) / count
 * and for running statistics (constants) b = d = 0. */
typedef struct fbn_bn_grad_coef {
  double k;
  double b;
  double d;
} fbn_bn_grad_coef;

FBN_HD fbn_bn_grad_coef fbn_bn_grad_coef_make(double weight, double invstd, double sum_g,
                                              double sum_g_xhat, int64_t count,
                                              int batch_stats) {
  fbn_bn_grad_coef r;
  r.k = weight * invstd;
  if (batch_stats) {
    r.b = -r.k * invstd * sum_g_xhat / (double)count;
    r.d = -r.k * sum_g / (double)count;
  } else {
    r.b = 0.0;
    r.d = 0.0;
  }
  return r;
}

#endif /* FUSEDBN_SRC_CUDA_BN_MATH_H */
