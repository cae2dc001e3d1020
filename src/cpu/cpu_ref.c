/*
 * CPU reference backend: host memory, float32/float64 tensors, every
 * reduction and every intermediate in float64. It is the oracle of the GPU
 * tests, so it is written to match docs/semantics.md line by line rather
 * than to be fast.
 *
 * Saved payload: two arrays of C doubles, the mean and the inverse standard
 * deviation that normalized x (batch statistics, or running statistics in
 * eval mode).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu_common.h"

/* ---- element access ----------------------------------------------------- */

static inline double load(const void *p, fbn_dtype dtype, int64_t i) {
  return dtype == FBN_DTYPE_FLOAT64 ? ((const double *)p)[i] : (double)((const float *)p)[i];
}

static inline void store(void *p, fbn_dtype dtype, int64_t i, double v) {
  if (dtype == FBN_DTYPE_FLOAT64)
    ((double *)p)[i] = v;
  else
    ((float *)p)[i] = (float)v;
}

/* Index of (n, c, s) where s = h*W + w is the spatial position. */
static inline int64_t index_of(const fbn_tensor_desc *d, int64_t hw, int64_t n, int64_t c,
                               int64_t s) {
  return d->layout == FBN_LAYOUT_NCHW ? (n * d->c + c) * hw + s : (n * hw + s) * d->c + c;
}

/* ReLU with NaN propagation: ReLU(NaN) = NaN, ReLU(v <= 0) = +0. */
static inline double relu(double v) { return v > 0.0 || isnan(v) ? v : 0.0; }

/* ---- saved payload ---------------------------------------------------- */

static fbn_status cpu_saved_prepare(const fbn_module *m, const fbn_tensor_desc *d,
                                    bool has_addend, bool batch_stats, fbn_saved *s) {
  return fbn_cpu_saved_reserve(s, 2 * (size_t)d->c * sizeof(double), fbn_backend_cpu());
}

/* ---- forward ------------------------------------------------------------ */

static fbn_status cpu_forward(fbn_module *m, const fbn_forward_args *a) {
  const fbn_tensor_desc *d = a->desc;
  const fbn_module_options *o = &m->options;
  const fbn_dtype dt = d->dtype, pt = o->param_dtype;
  const int64_t hw = d->h * d->w, count = d->n * hw;

  for (int64_t c = 0; c < d->c; c++) {
    double mean, var;
    if (a->batch_stats) {
      double sum = 0.0;
      for (int64_t n = 0; n < d->n; n++)
        for (int64_t s = 0; s < hw; s++)
          sum += load(a->x, dt, index_of(d, hw, n, c, s));
      mean = sum / (double)count;
      double sq = 0.0;
      for (int64_t n = 0; n < d->n; n++)
        for (int64_t s = 0; s < hw; s++) {
          double v = load(a->x, dt, index_of(d, hw, n, c, s)) - mean;
          sq += v * v;
        }
      var = sq / (double)count; /* biased: normalizes */
      if (a->update_running) {
        double unbiased = sq / (double)(count - 1);
        void *rm = m->buffers[FBN_BUFFER_RUNNING_MEAN], *rv = m->buffers[FBN_BUFFER_RUNNING_VAR];
        store(rm, pt, c, (1.0 - a->factor) * load(rm, pt, c) + a->factor * mean);
        store(rv, pt, c, (1.0 - a->factor) * load(rv, pt, c) + a->factor * unbiased);
      }
    } else {
      mean = load(m->buffers[FBN_BUFFER_RUNNING_MEAN], pt, c);
      var = load(m->buffers[FBN_BUFFER_RUNNING_VAR], pt, c);
    }
    const double invstd = 1.0 / sqrt(var + o->eps);
    const double weight = o->affine ? load(m->buffers[FBN_BUFFER_WEIGHT], pt, c) : 1.0;
    const double bias = o->affine ? load(m->buffers[FBN_BUFFER_BIAS], pt, c) : 0.0;
    for (int64_t n = 0; n < d->n; n++)
      for (int64_t s = 0; s < hw; s++) {
        const int64_t i = index_of(d, hw, n, c, s);
        double v = (load(a->x, dt, i) - mean) * invstd * weight + bias;
        if (a->addend != NULL)
          v += load(a->addend, dt, i);
        store(a->y, dt, i, relu(v));
      }
    if (a->saved != NULL) {
      double *p = a->saved->payload;
      p[c] = mean;
      p[d->c + c] = invstd;
    }
  }
  if (a->saved != NULL)
    a->saved->path = 0;
  return FBN_STATUS_SUCCESS;
}

/* ---- backward ----------------------------------------------------------- */

static fbn_status cpu_backward(fbn_module *m, const fbn_backward_args *a) {
  const fbn_tensor_desc *d = a->desc;
  const fbn_module_options *o = &m->options;
  const fbn_dtype dt = d->dtype, pt = o->param_dtype;
  const int64_t hw = d->h * d->w, count = d->n * hw;
  const double *saved_mean = a->saved->payload;
  const double *saved_invstd = saved_mean + d->c;

  for (int64_t c = 0; c < d->c; c++) {
    const double mean = saved_mean[c], invstd = saved_invstd[c];
    /* g = dL/d(pre-activation) = dy * !(y <= 0) (a NaN y passes dy, as in
     * PyTorch): the gradient reaching both the addend and BN's output. */
    double sum_g = 0.0, sum_g_xhat = 0.0;
    for (int64_t n = 0; n < d->n; n++)
      for (int64_t s = 0; s < hw; s++) {
        const int64_t i = index_of(d, hw, n, c, s);
        const double g = load(a->y, dt, i) <= 0.0 ? 0.0 : load(a->dy, dt, i);
        sum_g += g;
        sum_g_xhat += g * (load(a->x, dt, i) - mean) * invstd;
      }
    if (o->affine) {
      void *gw = m->buffers[FBN_BUFFER_WEIGHT_GRAD], *gb = m->buffers[FBN_BUFFER_BIAS_GRAD];
      store(gw, pt, c, load(gw, pt, c) + sum_g_xhat);
      store(gb, pt, c, load(gb, pt, c) + sum_g);
    }
    const double weight = o->affine ? load(m->buffers[FBN_BUFFER_WEIGHT], pt, c) : 1.0;
    const double k = weight * invstd;
    const double mean_g = sum_g / (double)count, mean_g_xhat = sum_g_xhat / (double)count;
    for (int64_t n = 0; n < d->n; n++)
      for (int64_t s = 0; s < hw; s++) {
        const int64_t i = index_of(d, hw, n, c, s);
        const double g = load(a->y, dt, i) <= 0.0 ? 0.0 : load(a->dy, dt, i);
        if (a->daddend != NULL)
          store(a->daddend, dt, i, g);
        if (a->dx != NULL) {
          double dx;
          if (a->saved->batch_stats) {
            const double xhat = (load(a->x, dt, i) - mean) * invstd;
            dx = k * (g - mean_g - xhat * mean_g_xhat);
          } else {
            dx = k * g;
          }
          store(a->dx, dt, i, dx);
        }
      }
  }
  return FBN_STATUS_SUCCESS;
}

static const fbn_backend cpu_backend = {
    .name = "cpu-reference",
    .module_init = fbn_cpu_buffers_alloc,
    .module_fini = fbn_cpu_buffers_free,
    .check_desc = fbn_cpu_check_desc,
    .buffer_read = fbn_cpu_buffer_read,
    .buffer_write = fbn_cpu_buffer_write,
    .buffer_fill = fbn_cpu_buffer_fill,
    .workspace_size = fbn_cpu_workspace_size,
    .saved_prepare = cpu_saved_prepare,
    .saved_free = fbn_cpu_saved_free,
    .forward = cpu_forward,
    .backward = cpu_backward,
};

const fbn_backend *fbn_backend_cpu(void) { return &cpu_backend; }
