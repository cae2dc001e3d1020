/*
 * Both CPU backends at the edges of the range, against an oracle computed
 * in long double (x86-64: 64-bit significand) from the values as stored:
 * two-pass mean and variance, y = ReLU((x - mean) * invstd * weight + bias +
 * addend), the batch-statistics backward, running statistics updated with
 * factor 1 (they then hold the batch mean and unbiased variance), every
 * result rounded once to its dtype. The oracle checks the reference backend
 * as much as the fast one.
 *
 * Cases (the op API, BN + add + ReLU, affine, batch statistics but in
 * "running_var 0"; each with an ordinary channel beside the edge ones; NCHW
 * with long rows, NCHW with short rows and NHWC, so that every driver of
 * the fast backend runs):
 *   huge spread      float32 and bfloat16 (float32's exponent range)
 *                    channels of 1e19 * randn and of random-sign
 *                    values of magnitude FLT_MAX/1e3 * [0.5, 1]: the
 *                    x̂·mean(g·x̂) term of dx has a coefficient ~ invstd^2
 *                    below float32's normal range
 *   near FLT_MAX     a float32 or bfloat16 channel of random-sign values of magnitude
 *                    0.9 * FLT_MAX * [0.5, 1] (70% positive: the mean is far
 *                    from 0, x - mean beyond FLT_MAX), weight in [-16, -8]
 *                    (its coefficient weight * invstd stays normal), dy
 *                    scaled by 1e20 (dx stays normal)
 *   outlying first   float64, 262144 values per channel of 3 + randn whose
 *                    first value is 3 + 1e4 (a shift by it cancels); in the
 *                    second channel the middle value (n = N/2, h*W + w =
 *                    H*W/2) too, so that the median of the first, middle
 *                    and last values is an outlier as well
 *   constant, eps 0  every dtype, a channel of 0.75 with eps = 0: invstd = 0, so y =
 *                    ReLU(bias + addend), dx = 0, dweight = 0 (PyTorch's
 *                    InvStd rule), checked exactly as well; and the CUDA
 *                    kernels' invstd from src/cuda/bn_math.h (host-compiled)
 *   running_var 0    eval with running_var = 0 and eps = 0: invstd = +inf as
 *                    in ATen's eval path (y = +inf or 0, NaN where 0 * inf)
 *
 * Tolerances, per element, |got - want| <= rtol * |want| + atol, NaN and
 * infinities exactly where the oracle has them:
 *   float32 tensors   rtol = 2e-5, atol = 2e-5 * rms of the oracle's values
 *                     of the element's channel (the channels' scales differ
 *                     by up to 1e38)
 *   float64 tensors   rtol = 1e-12, atol = 1e-12 * rms of the channel
 *                     (sums shifted by the outlier are off by 1e-11 and
 *                     more; both backends pass with 1e-13 on 8 seeds)
 *   dweight, dbias    the tensor's rtol, atol = rtol * sum of |terms| of the
 *                     channel's sum
 *   running stats     the tensor's rtol, atol = rtol * mean |x| for the mean
 *                     (0 for the variance)
 * Outputs are NaN-poisoned before every call, and every element is checked.
 */
#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/half.h"
#include "cuda/bn_math.h" /* host-compilable: the CUDA kernels' per-channel math */
#include "fbn_testutil.h"

/* ---- one case --------------------------------------------------------------- */

typedef struct edge_case {
  const char *name;
  fbn_tensor_desc d;
  double eps;
  bool eval; /* running statistics (FBN_STATISTICS_RUNNING) */
  /* logical NCHW, the values as stored in the dtype */
  double *x, *z, *dy;
  /* C each, the values as stored in the param dtype */
  double *weight, *bias, *rmean, *rvar;
} edge_case;

typedef struct results {
  double *y, *dx, *dz; /* numel each */
  double *dw, *db, *rm, *rv; /* C each */
  /* oracle only: sum |g * xhat|, sum |g| and mean |x| per channel */
  double *dw_mag, *db_mag, *rm_mag;
} results;

static fbn_dtype param_dtype_of(fbn_dtype t) {
  return t == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
}

static double round_to(fbn_dtype t, long double v) {
  switch (t) {
  case FBN_DTYPE_FLOAT64:
    return (double)v;
  case FBN_DTYPE_FLOAT16:
    return fbn_half_to_double(fbn_double_to_half((double)v));
  case FBN_DTYPE_BFLOAT16:
    return fbn_bfloat16_to_double(fbn_double_to_bfloat16((double)v));
  default:
    return (double)(float)v;
  }
}

/* float16/bfloat16 (u = 2^-11 / 2^-8): each output rounded once, from
 * float64 or from float32 (within 2^-22 of its terms): one ulp, 2u, of the
 * value plus 2u of the channel's rms (the float32 cancellation terms and
 * the subnormal spacing); float32 buffers (statistics, parameter
 * gradients) take float32's tolerance (check_channels). */
static double tol_of(fbn_dtype t) {
  switch (t) {
  case FBN_DTYPE_FLOAT64:
    return 1e-12;
  case FBN_DTYPE_FLOAT16:
    return 0x1p-10;
  case FBN_DTYPE_BFLOAT16:
    return 0x1p-7;
  default:
    return 2e-5;
  }
}

static size_t numel(const edge_case *k) { return fbnt_desc_numel(&k->d); }

static void results_alloc(results *r, const edge_case *k) {
  const size_t n = numel(k), c = (size_t)k->d.c;
  r->y = calloc(n, sizeof(double));
  r->dx = calloc(n, sizeof(double));
  r->dz = calloc(n, sizeof(double));
  r->dw = calloc(c, sizeof(double));
  r->db = calloc(c, sizeof(double));
  r->rm = calloc(c, sizeof(double));
  r->rv = calloc(c, sizeof(double));
  r->dw_mag = calloc(c, sizeof(double));
  r->db_mag = calloc(c, sizeof(double));
  r->rm_mag = calloc(c, sizeof(double));
  assert_non_null(r->rm_mag);
  assert_non_null(r->y);
  assert_non_null(r->db_mag);
}

static void results_free(results *r) {
  free(r->y);
  free(r->dx);
  free(r->dz);
  free(r->dw);
  free(r->db);
  free(r->rm);
  free(r->rv);
  free(r->dw_mag);
  free(r->db_mag);
  free(r->rm_mag);
}

/* Allocate the case's arrays; x, z, dy and the parameters random (x then
 * shaped by the caller, which calls case_round after). */
static void case_init(edge_case *k, const char *name, fbn_dtype dtype, fbn_layout layout,
                      int64_t n, int64_t c, int64_t h, int64_t w, double eps, fbnt_rng *rng) {
  k->name = name;
  k->d = fbn_tensor_desc_make(n, c, h, w, dtype, layout);
  k->eps = eps;
  k->eval = false;
  const size_t count = numel(k);
  k->x = malloc(count * sizeof(double));
  k->z = malloc(count * sizeof(double));
  k->dy = malloc(count * sizeof(double));
  k->weight = malloc((size_t)c * sizeof(double));
  k->bias = malloc((size_t)c * sizeof(double));
  k->rmean = malloc((size_t)c * sizeof(double));
  k->rvar = malloc((size_t)c * sizeof(double));
  assert_non_null(k->rvar);
  for (size_t i = 0; i < count; i++) {
    const int64_t ch = (int64_t)(i / (size_t)(h * w)) % c;
    k->x[i] = fbnt_rng_uniform(rng, -2.0, 2.0) + (1.0 + ch) * fbnt_rng_normal(rng);
    k->z[i] = fbnt_rng_normal(rng);
    k->dy[i] = fbnt_rng_normal(rng);
  }
  fbnt_fill_vector(rng, k->weight, c, 0.5, 1.5, true, false);
  fbnt_fill_vector(rng, k->bias, c, -0.5, 0.5, false, false);
  fbnt_fill_vector(rng, k->rmean, c, -1.0, 1.0, false, false);
  fbnt_fill_vector(rng, k->rvar, c, 0.5, 2.0, false, false);
}

/* Round every input to the dtype it is stored in. */
static void case_round(edge_case *k) {
  const fbn_dtype t = k->d.dtype, pt = param_dtype_of(t);
  for (size_t i = 0; i < numel(k); i++) {
    k->x[i] = round_to(t, k->x[i]);
    k->z[i] = round_to(t, k->z[i]);
    k->dy[i] = round_to(t, k->dy[i]);
  }
  for (int64_t c = 0; c < k->d.c; c++) {
    k->weight[c] = round_to(pt, k->weight[c]);
    k->bias[c] = round_to(pt, k->bias[c]);
    k->rmean[c] = round_to(pt, k->rmean[c]);
    k->rvar[c] = round_to(pt, k->rvar[c]);
  }
}

static void case_free(edge_case *k) {
  free(k->x);
  free(k->z);
  free(k->dy);
  free(k->weight);
  free(k->bias);
  free(k->rmean);
  free(k->rvar);
}

/* x of channel c, element i of the channel's n*h*w (NCHW order). */
static double *chan_x(const edge_case *k, int64_t n, int64_t c) {
  return k->x + ((size_t)n * (size_t)k->d.c + (size_t)c) * (size_t)(k->d.h * k->d.w);
}

/* ---- the oracle ------------------------------------------------------------- */

/* Forward and backward in long double; the ReLU gate of backward from
 * y_gate (the y that backend computed and hands to its backward). */
static void oracle(const edge_case *k, const double *y_gate, results *o) {
  const int64_t n_ = k->d.n, c_ = k->d.c, hw = k->d.h * k->d.w, count = n_ * hw;
  const fbn_dtype t = k->d.dtype, pt = param_dtype_of(t);
  for (int64_t c = 0; c < c_; c++) {
    long double sum = 0.0L, sum_abs = 0.0L, sq = 0.0L;
    for (int64_t n = 0; n < n_; n++)
      for (int64_t s = 0; s < hw; s++) {
        sum += chan_x(k, n, c)[s];
        sum_abs += fabsl((long double)chan_x(k, n, c)[s]);
      }
    const long double batch_mean = sum / (long double)count;
    o->rm_mag[c] = (double)(sum_abs / (long double)count);
    for (int64_t n = 0; n < n_; n++)
      for (int64_t s = 0; s < hw; s++) {
        const long double v = (long double)chan_x(k, n, c)[s] - batch_mean;
        sq += v * v;
      }
    const long double var = sq / (long double)count;
    /* eval: the running statistics, 1/sqrt(running_var + eps) (+inf for 0) */
    const long double invstd =
        k->eval ? 1.0L / sqrtl((long double)k->rvar[c] + (long double)k->eps)
        : var == 0.0L && k->eps == 0.0 ? 0.0L
                                       : 1.0L / sqrtl(var + (long double)k->eps);
    const long double w = k->weight[c], b = k->bias[c];
    const long double mean = k->eval ? (long double)k->rmean[c] : batch_mean;
    o->rm[c] = k->eval ? k->rmean[c] : round_to(pt, mean);
    o->rv[c] = k->eval ? k->rvar[c] : round_to(pt, sq / (long double)(count - 1));
    long double sg = 0.0L, sgx = 0.0L, mg = 0.0L, mgx = 0.0L;
    for (int64_t n = 0; n < n_; n++)
      for (int64_t s = 0; s < hw; s++) {
        const size_t i = (size_t)((n * c_ + c) * hw + s);
        const long double xhat = ((long double)k->x[i] - mean) * invstd;
        const long double v = xhat * w + b + (long double)k->z[i];
        o->y[i] = round_to(t, v > 0.0L || isnan(v) ? v : 0.0L);
        const long double g = y_gate[i] <= 0.0 ? 0.0L : (long double)k->dy[i];
        sg += g;
        sgx += g * xhat;
        mg += fabsl(g);
        mgx += fabsl(g * xhat);
      }
    o->dw[c] = round_to(pt, sgx);
    o->db[c] = round_to(pt, sg);
    o->dw_mag[c] = (double)mgx;
    o->db_mag[c] = (double)mg;
    const long double mean_g = sg / (long double)count, mean_gx = sgx / (long double)count;
    for (int64_t n = 0; n < n_; n++)
      for (int64_t s = 0; s < hw; s++) {
        const size_t i = (size_t)((n * c_ + c) * hw + s);
        const long double xhat = ((long double)k->x[i] - mean) * invstd;
        const long double g = y_gate[i] <= 0.0 ? 0.0L : (long double)k->dy[i];
        o->dz[i] = round_to(t, g);
        o->dx[i] = round_to(t, k->eval ? w * invstd * g
                                       : w * invstd * (g - mean_g - xhat * mean_gx));
      }
  }
}

/* ---- one backend ------------------------------------------------------------ */

static void *param_array(fbn_dtype pt, const double *v, int64_t c) {
  void *p = fbnt_alloc((size_t)c * (size_t)fbn_dtype_size(pt));
  for (int64_t i = 0; i < c; i++)
    fbnt_store(pt, p, (size_t)i, v != NULL ? v[i] : NAN);
  return p;
}

static void param_read(fbn_dtype pt, const void *p, int64_t c, double *out) {
  for (int64_t i = 0; i < c; i++)
    out[i] = fbnt_load(pt, p, (size_t)i);
}

/* Forward (running statistics updated with factor 1) and backward of the
 * case on one backend (FBN_CPU_BACKEND at fbn_op_create), into poisoned
 * outputs. */
static void run_backend(const edge_case *k, const char *backend, results *r) {
  const fbn_tensor_desc *d = &k->d;
  const fbn_dtype pt = param_dtype_of(d->dtype);
  const int64_t c_ = d->c;
  assert_int_equal(setenv("FBN_CPU_BACKEND", backend, 1), 0);
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = c_;
  od.eps = k->eps;
  od.dtype = d->dtype;
  od.param_dtype = pt;
  od.layout = d->layout;
  od.operation = FBN_OPERATION_BN_ADD_RELU;
  od.statistics = k->eval ? FBN_STATISTICS_RUNNING : FBN_STATISTICS_BATCH;
  fbn_op *op = NULL;
  const fbn_status created = fbn_op_create(&od, &op);
  assert_int_equal(unsetenv("FBN_CPU_BACKEND"), 0);
  if (created != FBN_STATUS_SUCCESS)
    fail_msg("fbn_op_create: %s", fbn_last_error_message());

  void *x = fbnt_tensor_alloc(d), *z = fbnt_tensor_alloc(d), *dy = fbnt_tensor_alloc(d);
  void *y = fbnt_tensor_alloc(d), *dx = fbnt_tensor_alloc(d), *dz = fbnt_tensor_alloc(d);
  fbnt_tensor_from_ref(d, k->x, x);
  fbnt_tensor_from_ref(d, k->z, z);
  fbnt_tensor_from_ref(d, k->dy, dy);
  void *w = param_array(pt, k->weight, c_), *b = param_array(pt, k->bias, c_);
  void *rm = param_array(pt, k->rmean, c_), *rv = param_array(pt, k->rvar, c_);
  void *dw = param_array(pt, NULL, c_), *db = param_array(pt, NULL, c_);
  size_t saved_bytes = 0, fws = 0, bws = 0;
  assert_int_equal(fbn_op_saved_size(op, d, &saved_bytes), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_op_forward_workspace_size(op, d, &fws), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_op_backward_workspace_size(op, d, &bws), FBN_STATUS_SUCCESS);
  void *saved = fbnt_alloc(saved_bytes);
  void *ws = fbnt_alloc(fws > bws ? fws : bws);

  fbnt_tensor_poison(d, y);
  fbn_status st = fbn_op_forward(op, d, x, z, y, w, b, rm, rv, 1.0, saved, saved_bytes, ws, fws);
  if (st != FBN_STATUS_SUCCESS)
    fail_msg("%s: fbn_op_forward (%s): %s", k->name, backend, fbn_last_error_message());
  fbnt_tensor_poison(d, dx);
  fbnt_tensor_poison(d, dz);
  st = fbn_op_backward(op, d, x, y, dy, saved, saved_bytes, w, b, dx, dz, dw, db,
                       FBN_PARAM_GRAD_OVERWRITE, ws, bws);
  if (st != FBN_STATUS_SUCCESS)
    fail_msg("%s: fbn_op_backward (%s): %s", k->name, backend, fbn_last_error_message());

  fbnt_tensor_to_ref(d, y, r->y);
  fbnt_tensor_to_ref(d, dx, r->dx);
  fbnt_tensor_to_ref(d, dz, r->dz);
  param_read(pt, dw, c_, r->dw);
  param_read(pt, db, c_, r->db);
  param_read(pt, rm, c_, r->rm);
  param_read(pt, rv, c_, r->rv);
  void *bufs[] = {x, z, dy, y, dx, dz, w, b, rm, rv, dw, db, saved, ws};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    fbnt_free(bufs[i]);
  fbn_op_destroy(op);
}

/* ---- comparison ------------------------------------------------------------- */

/* Root mean square of the finite values of channel c of a logical NCHW
 * array. */
static double rms_channel(const edge_case *k, const double *v, int64_t c) {
  const int64_t hw = k->d.h * k->d.w;
  double s = 0.0;
  int64_t count = 0;
  for (int64_t n = 0; n < k->d.n; n++)
    for (int64_t i = 0; i < hw; i++) {
      const double e = v[(n * k->d.c + c) * hw + i];
      if (isfinite(e)) {
        s += e * e;
        count++;
      }
    }
  return count > 0 ? sqrt(s / (double)count) : 0.0;
}

/* Every element, with the tolerance of its channel: rtol * |want| + rtol *
 * rms of the channel's oracle values; NaN and infinities exactly. */
static bool check_tensor(const edge_case *k, const char *backend, const char *what,
                         const double *got, const double *want) {
  const double tol = tol_of(k->d.dtype);
  const int64_t hw = k->d.h * k->d.w;
  bool ok = true;
  for (int64_t c = 0; c < k->d.c; c++) {
    const double atol = tol * rms_channel(k, want, c);
    int64_t bad = 0, first = -1;
    for (int64_t n = 0; n < k->d.n; n++)
      for (int64_t s = 0; s < hw; s++) {
        const int64_t i = (n * k->d.c + c) * hw + s;
        const double g = got[i], w = want[i];
        const bool same = isnan(w)   ? isnan(g)
                          : isinf(w) ? g == w
                                     : isfinite(g) && fabs(g - w) <= tol * fabs(w) + atol;
        if (!same && bad++ == 0)
          first = i;
      }
    if (bad > 0) {
      fprintf(stderr,
              "%s %s %s: %s channel %lld: %lld of %lld elements differ (rtol %g, atol %g); "
              "first at [%lld]: got %.17g, want %.17g\n",
              k->name, fbnt_layout_str(k->d.layout), backend, what, (long long)c, (long long)bad,
              (long long)(k->d.n * hw), tol, atol, (long long)first, got[first], want[first]);
      ok = false;
    }
  }
  return ok;
}

/* Per channel: rtol, atol = rtol * mag[c] (0 when mag is NULL). */
static bool check_channels(const edge_case *k, const char *backend, const char *what,
                           const double *got, const double *want, const double *mag) {
  const double tol = tol_of(param_dtype_of(k->d.dtype));
  bool ok = true;
  for (int64_t c = 0; c < k->d.c; c++) {
    char label[256];
    snprintf(label, sizeof label, "%s %s %s: %s[%lld]", k->name, fbnt_layout_str(k->d.layout),
             backend, what, (long long)c);
    ok &= fbnt_check_close(label, got + c, want + c, 1, tol, mag != NULL ? tol * mag[c] : 0.0,
                           NULL);
  }
  return ok;
}

/* The case on both backends against the oracle. */
static bool case_check(const edge_case *k) {
  static const char *const backends[] = {"reference", "fast"};
  bool ok = true;
  for (size_t b = 0; b < 2; b++) {
    results r, o;
    results_alloc(&r, k);
    results_alloc(&o, k);
    run_backend(k, backends[b], &r);
    oracle(k, r.y, &o);
    ok &= check_tensor(k, backends[b], "y", r.y, o.y);
    ok &= check_tensor(k, backends[b], "dx", r.dx, o.dx);
    ok &= check_tensor(k, backends[b], "daddend", r.dz, o.dz);
    ok &= check_channels(k, backends[b], "dweight", r.dw, o.dw, o.dw_mag);
    ok &= check_channels(k, backends[b], "dbias", r.db, o.db, o.db_mag);
    ok &= check_channels(k, backends[b], "running_mean", r.rm, o.rm, o.rm_mag);
    ok &= check_channels(k, backends[b], "running_var", r.rv, o.rv, NULL);
    results_free(&r);
    results_free(&o);
  }
  return ok;
}

/* The three drivers: NCHW with long rows (H*W >= 256), NCHW with short
 * rows, NHWC. */
typedef struct shape {
  fbn_layout layout;
  int64_t n, h, w;
} shape;

static const shape small_shapes[] = {
    {FBN_LAYOUT_NCHW, 4, 16, 20},
    {FBN_LAYOUT_NCHW, 8, 5, 7},
    {FBN_LAYOUT_NHWC, 4, 16, 20},
};

#define FOR_SHAPES(s) for (size_t s = 0; s < sizeof small_shapes / sizeof small_shapes[0]; s++)

/* ---- tests ------------------------------------------------------------------ */

static void test_edges_huge_spread(void **state) {
  (void)state;
  fbnt_tally t;
  fbnt_tally_begin(&t, __func__);
  static const fbn_dtype dtypes[] = {FBN_DTYPE_FLOAT32, FBN_DTYPE_BFLOAT16};
  for (size_t dt = 0; dt < 2; dt++)
    FOR_SHAPES(s) {
      const shape *sh = &small_shapes[s];
      edge_case k;
      case_init(&k, "huge spread", dtypes[dt], sh->layout, sh->n, 3, sh->h, sh->w, 1e-5,
                &t.rng);
      const int64_t hw = sh->h * sh->w;
      for (int64_t n = 0; n < sh->n; n++)
        for (int64_t i = 0; i < hw; i++) {
          chan_x(&k, n, 0)[i] = 1e19 * fbnt_rng_normal(&t.rng);
          chan_x(&k, n, 1)[i] = fbnt_rng_signed(&t.rng, 0.5 * FLT_MAX / 1e3, FLT_MAX / 1e3);
        }
      case_round(&k);
      fbnt_tally_add(&t, case_check(&k));
      case_free(&k);
    }
  fbnt_tally_end(&t, "cases");
}

static void test_edges_near_flt_max(void **state) {
  (void)state;
  fbnt_tally t;
  fbnt_tally_begin(&t, __func__);
  static const fbn_dtype dtypes[] = {FBN_DTYPE_FLOAT32, FBN_DTYPE_BFLOAT16};
  for (size_t dt = 0; dt < 2; dt++)
    FOR_SHAPES(s) {
      const shape *sh = &small_shapes[s];
      edge_case k;
      case_init(&k, "near FLT_MAX", dtypes[dt], sh->layout, sh->n, 2, sh->h, sh->w, 1e-5,
                &t.rng);
      const int64_t hw = sh->h * sh->w;
      for (int64_t n = 0; n < sh->n; n++)
        for (int64_t i = 0; i < hw; i++) {
          const double m = fbnt_rng_uniform(&t.rng, 0.45, 0.9) * FLT_MAX;
          chan_x(&k, n, 0)[i] = fbnt_rng_unit(&t.rng) < 0.7 ? m : -m;
        }
      k.weight[0] = -fbnt_rng_uniform(&t.rng, 8.0, 16.0);
      for (size_t i = 0; i < numel(&k); i++)
        k.dy[i] *= 1e20;
      case_round(&k);
      fbnt_tally_add(&t, case_check(&k));
      case_free(&k);
    }
  fbnt_tally_end(&t, "cases");
}

static void test_edges_outlying_first_value_float64(void **state) {
  (void)state;
  fbnt_tally t;
  fbnt_tally_begin(&t, __func__);
  static const fbn_layout layouts[] = {FBN_LAYOUT_NCHW, FBN_LAYOUT_NHWC};
  for (size_t l = 0; l < 2; l++) {
    edge_case k;
    /* 16 * 128 * 128 = 262144 values per channel */
    case_init(&k, "outlying first value", FBN_DTYPE_FLOAT64, layouts[l], 16, 2, 128, 128, 1e-5,
              &t.rng);
    const int64_t hw = 128 * 128;
    for (int64_t c = 0; c < 2; c++)
      for (int64_t n = 0; n < 16; n++)
        for (int64_t i = 0; i < hw; i++)
          chan_x(&k, n, c)[i] = 3.0 + fbnt_rng_normal(&t.rng);
    /* channel 0: the first value; channel 1: also the middle one, the
     * fast backend's median-of-three shift then is an outlier too */
    chan_x(&k, 0, 0)[0] = 3.0 + 1e4;
    chan_x(&k, 0, 1)[0] = chan_x(&k, 8, 1)[hw / 2] = 3.0 + 1e4;
    case_round(&k);
    fbnt_tally_add(&t, case_check(&k));
    case_free(&k);
  }
  fbnt_tally_end(&t, "cases");
}

/* Channel 0 of both backends' results: y = ReLU(bias + addend), dx = 0,
 * dweight = 0, exactly. */
static bool constant_channel_exact(const edge_case *k) {
  bool ok = true;
  static const char *const backends[] = {"reference", "fast"};
  const int64_t hw = k->d.h * k->d.w;
  for (size_t b = 0; b < 2; b++) {
    results r;
    results_alloc(&r, k);
    run_backend(k, backends[b], &r);
    int bad = 0;
    for (int64_t n = 0; n < k->d.n; n++)
      for (int64_t s = 0; s < hw; s++) {
        const size_t i = (size_t)(n * k->d.c * hw + s);
        const double v = round_to(k->d.dtype, (long double)k->bias[0] + (long double)k->z[i]);
        bad += r.y[i] != (v > 0.0 ? v : 0.0) || r.dx[i] != 0.0;
      }
    if (bad > 0 || r.dw[0] != 0.0) {
      fprintf(stderr, "%s %s %s: %d elements of channel 0 with y != ReLU(bias + addend) or "
              "dx != 0, dweight = %g\n", k->name, fbnt_layout_str(k->d.layout), backends[b], bad,
              r.dw[0]);
      ok = false;
    }
    results_free(&r);
  }
  return ok;
}

static void test_edges_constant_channel_eps_zero(void **state) {
  (void)state;
  fbnt_tally t;
  fbnt_tally_begin(&t, __func__);
  static const fbn_dtype dtypes[] = {FBN_DTYPE_FLOAT32, FBN_DTYPE_FLOAT64, FBN_DTYPE_FLOAT16,
                                     FBN_DTYPE_BFLOAT16};
  for (size_t dt = 0; dt < 4; dt++)
    FOR_SHAPES(s) {
      const shape *sh = &small_shapes[s];
      edge_case k;
      case_init(&k, "constant, eps = 0", dtypes[dt], sh->layout, sh->n, 2, sh->h, sh->w, 0.0,
                &t.rng);
      for (int64_t n = 0; n < sh->n; n++)
        for (int64_t i = 0; i < sh->h * sh->w; i++)
          chan_x(&k, n, 0)[i] = 0.75;
      case_round(&k);
      fbnt_tally_add(&t, case_check(&k) && constant_channel_exact(&k));
      case_free(&k);
    }
  fbnt_tally_end(&t, "cases");
}

/* Running statistics keep invstd = 1/sqrt(running_var + eps) (ATen's eval
 * path): running_var = 0 with eps = 0 gives +inf, so y = +inf or 0, dx and
 * dweight NaN where 0 * inf meets, on both backends as in the oracle. */
static void test_edges_running_var_zero_eps_zero(void **state) {
  (void)state;
  fbnt_tally t;
  fbnt_tally_begin(&t, __func__);
  static const fbn_dtype dtypes[] = {FBN_DTYPE_FLOAT32, FBN_DTYPE_FLOAT64};
  for (size_t dt = 0; dt < 2; dt++)
    FOR_SHAPES(s) {
      const shape *sh = &small_shapes[s];
      edge_case k;
      case_init(&k, "running_var 0, eps = 0", dtypes[dt], sh->layout, sh->n, 2, sh->h, sh->w,
                0.0, &t.rng);
      k.eval = true;
      k.rvar[0] = 0.0;
      case_round(&k);
      fbnt_tally_add(&t, case_check(&k));
      case_free(&k);
    }
  fbnt_tally_end(&t, "cases");
}

/* The CUDA training kernels' invstd (src/cuda/bn_math.h, host-compiled):
 * the same rule, from the sums stats_finalize_kernel gets for a constant
 * channel (shifted by its first value: both sums 0). */
static void test_edges_cuda_kernels_invstd(void **state) {
  (void)state;
  const fbn_bn_stats st = fbn_bn_stats_from_sums(0.75, 0.0, 0.0, 1000);
  assert_true(st.var == 0.0 && st.mean == 0.75);
  assert_true(fbn_bn_stats_invstd(st.var, 0.0) == 0.0);
  assert_true(fbn_bn_stats_invstd(st.var, 0.25) == 2.0);
  assert_true(fbn_bn_stats_invstd(4.0, 0.0) == 0.5);
  assert_true(fbn_bn_stats_invstd(1e-300, 0.0) == 1.0 / sqrt(1e-300));
  assert_true(isnan(fbn_bn_stats_invstd(NAN, 0.0)));
}

int main(int argc, char **argv) {
  fbnt_parse_args(argc, argv);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_edges_huge_spread),
      cmocka_unit_test(test_edges_near_flt_max),
      cmocka_unit_test(test_edges_outlying_first_value_float64),
      cmocka_unit_test(test_edges_constant_channel_eps_zero),
      cmocka_unit_test(test_edges_running_var_zero_eps_zero),
      cmocka_unit_test(test_edges_cuda_kernels_invstd),
  };
  return cmocka_run_group_tests_name("edges", tests, NULL, NULL);
}
