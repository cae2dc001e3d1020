/*
 * The per-channel formulas of docs/semantics.md, in float64, shared by the
 * CPU backends (and usable by any host code). Element-wise arithmetic stays
 * in the backends, written for their loops.
 */
#ifndef FUSEDBN_SRC_CORE_BN_FORMULAS_H
#define FUSEDBN_SRC_CORE_BN_FORMULAS_H

#include <math.h>
#include <stdbool.h>
#include <stdint.h>

/* Inverse standard deviation of running statistics: 1/sqrt(var + eps)
 * (+inf for var + eps = 0, as PyTorch in eval mode). */
static inline double fbn_bn_invstd(double var, double eps) { return 1.0 / sqrt(var + eps); }

/* Inverse standard deviation of batch statistics from the biased variance:
 * 0 for a zero variance with eps = 0 (a constant channel then gives
 * y = ReLU(bias [+ addend]), dx = 0, dweight = 0: PyTorch's InvStd rule),
 * else 1/sqrt(var + eps). */
static inline double fbn_bn_batch_invstd(double var, double eps) {
  return var == 0.0 && eps == 0.0 ? 0.0 : 1.0 / sqrt(var + eps);
}

/* One step of the running average: (1 - f) * running + f * batch_value. */
static inline double fbn_bn_running_update(double running, double factor, double batch_value) {
  return (1.0 - factor) * running + factor * batch_value;
}

/* ReLU with NaN propagation: ReLU(NaN) = NaN, ReLU(v <= 0) = +0. */
static inline double fbn_bn_relu(double v) { return v > 0.0 || isnan(v) ? v : 0.0; }

/* dx of one element: batch statistics (the full backward through the
 * statistics) or running statistics (constants). */
static inline double fbn_bn_dx(double k, double g, double xhat, double mean_g,
                               double mean_g_xhat, bool batch_stats) {
  return batch_stats ? k * (g - mean_g - xhat * mean_g_xhat) : k * g;
}

#endif /* FUSEDBN_SRC_CORE_BN_FORMULAS_H */
