/*
 * Plain float64 reference of the fused module, written from the semantics
 * (docs/semantics.md, PyTorch's BatchNorm2d) and not from the library:
 *
 *   batch statistics (training, or no running statistics), M = N*H*W:
 *     mean = sum(x) / M, var = sum((x - mean)^2) / M      (biased)
 *     tracked + training: nbt += 1, f = momentum or 1/nbt,
 *       running_mean = (1-f) running_mean + f mean
 *       running_var  = (1-f) running_var  + f var * M/(M-1)   (unbiased)
 *   running statistics (eval with tracked statistics): mean, var = running
 *   xhat = (x - mean) / sqrt(var + eps)
 *   y = ReLU(xhat * weight + bias + addend), ReLU(NaN) = NaN
 *
 *   backward, g = dy * !(y <= 0) (NaN y passes dy, as torch's threshold_backward):
 *     daddend = g, dbias += sum g, dweight += sum g * xhat
 *     batch:   dx = weight/sqrt(var+eps) * (g - mean(g) - xhat * mean(g*xhat))
 *     running: dx = weight/sqrt(var+eps) * g
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fbn_testutil.h"

static double *vec_new(int64_t c, double value) {
  double *v = malloc((size_t)c * sizeof *v);
  if (v == NULL) {
    abort();
  }
  for (int64_t i = 0; i < c; i++) {
    v[i] = value;
  }
  return v;
}

void fbnt_ref_module_init(fbnt_ref_module *ref, int64_t c) {
  memset(ref, 0, sizeof *ref);
  ref->c = c;
  ref->eps = 1e-5;
  ref->momentum = 0.1;
  ref->cumulative_average = false;
  ref->affine = true;
  ref->track_running_stats = true;
  ref->training = true;
  ref->num_batches_tracked = 0;
  ref->weight = vec_new(c, 1.0);
  ref->bias = vec_new(c, 0.0);
  ref->running_mean = vec_new(c, 0.0);
  ref->running_var = vec_new(c, 1.0);
  ref->weight_grad = vec_new(c, 0.0);
  ref->bias_grad = vec_new(c, 0.0);
}

void fbnt_ref_module_free(fbnt_ref_module *ref) {
  free(ref->weight);
  free(ref->bias);
  free(ref->running_mean);
  free(ref->running_var);
  free(ref->weight_grad);
  free(ref->bias_grad);
  memset(ref, 0, sizeof *ref);
}

static double *ref_buffer(const fbnt_ref_module *ref, fbn_buffer which) {
  switch (which) {
  case FBN_BUFFER_WEIGHT:
    return ref->weight;
  case FBN_BUFFER_BIAS:
    return ref->bias;
  case FBN_BUFFER_RUNNING_MEAN:
    return ref->running_mean;
  case FBN_BUFFER_RUNNING_VAR:
    return ref->running_var;
  case FBN_BUFFER_WEIGHT_GRAD:
    return ref->weight_grad;
  case FBN_BUFFER_BIAS_GRAD:
    return ref->bias_grad;
  }
  return NULL;
}

static bool ref_has(const fbnt_ref_module *ref, fbn_buffer which) {
  if (which == FBN_BUFFER_RUNNING_MEAN || which == FBN_BUFFER_RUNNING_VAR) {
    return ref->track_running_stats;
  }
  return ref->affine;
}

fbn_status fbnt_ref_module_from(fbnt_ref_module *ref, const fbn_module *module) {
  fbn_module_options opt;
  fbn_status st = fbn_module_get_options(module, &opt);
  if (st != FBN_STATUS_SUCCESS) {
    return st;
  }
  fbnt_ref_module_free(ref);
  fbnt_ref_module_init(ref, opt.num_features);
  ref->eps = opt.eps;
  ref->momentum = opt.momentum;
  ref->cumulative_average = opt.cumulative_average;
  ref->affine = opt.affine;
  ref->track_running_stats = opt.track_running_stats;
  st = fbn_module_is_training(module, &ref->training);
  if (st != FBN_STATUS_SUCCESS) {
    return st;
  }
  if (opt.track_running_stats) {
    st = fbn_module_get_num_batches_tracked(module, &ref->num_batches_tracked);
    if (st != FBN_STATUS_SUCCESS) {
      return st;
    }
  }
  for (int b = 0; b < 6; b++) {
    if (!ref_has(ref, (fbn_buffer)b)) {
      continue;
    }
    st = fbn_module_read_buffer(module, (fbn_buffer)b, FBN_DTYPE_FLOAT64, ref_buffer(ref, b),
                                (size_t)ref->c);
    if (st != FBN_STATUS_SUCCESS) {
      return st;
    }
  }
  return FBN_STATUS_SUCCESS;
}

fbn_status fbnt_ref_module_to(const fbnt_ref_module *ref, fbn_module *module) {
  fbn_status st;
  for (int b = 0; b < 6; b++) {
    if (!ref_has(ref, (fbn_buffer)b)) {
      continue;
    }
    st = fbn_module_write_buffer(module, (fbn_buffer)b, FBN_DTYPE_FLOAT64, ref_buffer(ref, b),
                                 (size_t)ref->c);
    if (st != FBN_STATUS_SUCCESS) {
      return st;
    }
  }
  if (ref->track_running_stats) {
    st = fbn_module_set_num_batches_tracked(module, ref->num_batches_tracked);
    if (st != FBN_STATUS_SUCCESS) {
      return st;
    }
  }
  return FBN_STATUS_SUCCESS;
}

void fbnt_ref_saved_init(fbnt_ref_saved *saved) {
  memset(saved, 0, sizeof *saved);
}

void fbnt_ref_saved_free(fbnt_ref_saved *saved) {
  free(saved->mean);
  free(saved->var);
  memset(saved, 0, sizeof *saved);
}

static double relu(double v) {
  if (isnan(v)) {
    return v;
  }
  return v > 0.0 ? v : 0.0;
}

static size_t idx(int64_t c_total, int64_t h_total, int64_t w_total, int64_t n, int64_t c,
                  int64_t h, int64_t w) {
  return (size_t)(((n * c_total + c) * h_total + h) * w_total + w);
}

static bool uses_batch_stats(const fbnt_ref_module *ref) {
  return ref->training || !ref->track_running_stats;
}

/* Mean, biased and unbiased variance of channel c. */
static void channel_stats(const fbnt_ref_module *ref, int64_t N, int64_t H, int64_t W,
                          const double *x, int64_t c, double *mean, double *var_biased,
                          double *var_unbiased) {
  double m = (double)(N * H * W);
  double sum = 0.0;
  for (int64_t n = 0; n < N; n++)
    for (int64_t h = 0; h < H; h++)
      for (int64_t w = 0; w < W; w++)
        sum += x[idx(ref->c, H, W, n, c, h, w)];
  double mu = sum / m;
  double ss = 0.0;
  for (int64_t n = 0; n < N; n++)
    for (int64_t h = 0; h < H; h++)
      for (int64_t w = 0; w < W; w++) {
        double d = x[idx(ref->c, H, W, n, c, h, w)] - mu;
        ss += d * d;
      }
  *mean = mu;
  *var_biased = ss / m;
  *var_unbiased = m > 1.0 ? ss / (m - 1.0) : NAN;
}

static void normalize(const fbnt_ref_module *ref, int64_t N, int64_t H, int64_t W, const double *x,
                      const double *addend, const double *mean, const double *var, double *out,
                      bool apply_relu) {
  for (int64_t c = 0; c < ref->c; c++) {
    double invstd = 1.0 / sqrt(var[c] + ref->eps);
    double gamma = ref->affine ? ref->weight[c] : 1.0;
    double beta = ref->affine ? ref->bias[c] : 0.0;
    for (int64_t n = 0; n < N; n++)
      for (int64_t h = 0; h < H; h++)
        for (int64_t w = 0; w < W; w++) {
          size_t i = idx(ref->c, H, W, n, c, h, w);
          double v = (x[i] - mean[c]) * invstd * gamma + beta;
          if (addend != NULL) {
            v += addend[i];
          }
          out[i] = apply_relu ? relu(v) : v;
        }
  }
}

/* mean/var used to normalize; updates running stats when asked. */
static void stats_used(fbnt_ref_module *ref, int64_t N, int64_t H, int64_t W, const double *x,
                       double *mean, double *var, bool update) {
  bool batch = uses_batch_stats(ref);
  bool do_update = update && ref->training && ref->track_running_stats;
  double factor = 0.0;
  if (do_update) {
    ref->num_batches_tracked += 1;
    factor = ref->cumulative_average ? 1.0 / (double)ref->num_batches_tracked : ref->momentum;
  }
  for (int64_t c = 0; c < ref->c; c++) {
    if (batch) {
      double vu;
      channel_stats(ref, N, H, W, x, c, &mean[c], &var[c], &vu);
      if (do_update) {
        ref->running_mean[c] = (1.0 - factor) * ref->running_mean[c] + factor * mean[c];
        ref->running_var[c] = (1.0 - factor) * ref->running_var[c] + factor * vu;
      }
    } else {
      mean[c] = ref->running_mean[c];
      var[c] = ref->running_var[c];
    }
  }
}

bool fbnt_ref_forward(fbnt_ref_module *ref, int64_t N, int64_t H, int64_t W, const double *x,
                      const double *addend, double *y, fbnt_ref_saved *saved) {
  if (uses_batch_stats(ref) && N * H * W == 1) {
    return false;
  }
  double *mean = vec_new(ref->c, 0.0);
  double *var = vec_new(ref->c, 0.0);
  stats_used(ref, N, H, W, x, mean, var, true);
  normalize(ref, N, H, W, x, addend, mean, var, y, true);
  if (saved != NULL) {
    fbnt_ref_saved_free(saved);
    saved->n = N;
    saved->c = ref->c;
    saved->h = H;
    saved->w = W;
    saved->batch_stats = uses_batch_stats(ref);
    saved->has_addend = addend != NULL;
    saved->mean = mean;
    saved->var = var;
  } else {
    free(mean);
    free(var);
  }
  return true;
}

void fbnt_ref_preactivation(const fbnt_ref_module *ref, int64_t N, int64_t H, int64_t W,
                            const double *x, const double *addend, double *pre) {
  double *mean = vec_new(ref->c, 0.0);
  double *var = vec_new(ref->c, 0.0);
  stats_used((fbnt_ref_module *)ref, N, H, W, x, mean, var, false);
  normalize(ref, N, H, W, x, addend, mean, var, pre, false);
  free(mean);
  free(var);
}

void fbnt_ref_backward(fbnt_ref_module *ref, const fbnt_ref_saved *saved, const double *x,
                       const double *y, const double *dy, double *dx, double *daddend) {
  int64_t N = saved->n, H = saved->h, W = saved->w;
  double m = (double)(N * H * W);
  for (int64_t c = 0; c < ref->c; c++) {
    double invstd = 1.0 / sqrt(saved->var[c] + ref->eps);
    double gamma = ref->affine ? ref->weight[c] : 1.0;
    double sum_g = 0.0;
    double sum_gx = 0.0;
    for (int64_t n = 0; n < N; n++)
      for (int64_t h = 0; h < H; h++)
        for (int64_t w = 0; w < W; w++) {
          size_t i = idx(ref->c, H, W, n, c, h, w);
          double g = y[i] <= 0.0 ? 0.0 : dy[i];
          double xhat = (x[i] - saved->mean[c]) * invstd;
          sum_g += g;
          sum_gx += g * xhat;
        }
    if (ref->affine) {
      ref->bias_grad[c] += sum_g;
      ref->weight_grad[c] += sum_gx;
    }
    for (int64_t n = 0; n < N; n++)
      for (int64_t h = 0; h < H; h++)
        for (int64_t w = 0; w < W; w++) {
          size_t i = idx(ref->c, H, W, n, c, h, w);
          double g = y[i] <= 0.0 ? 0.0 : dy[i];
          double xhat = (x[i] - saved->mean[c]) * invstd;
          if (daddend != NULL) {
            daddend[i] = g;
          }
          if (dx != NULL) {
            if (saved->batch_stats) {
              dx[i] = gamma * invstd * (g - sum_g / m - xhat * sum_gx / m);
            } else {
              dx[i] = gamma * invstd * g;
            }
          }
        }
  }
}
