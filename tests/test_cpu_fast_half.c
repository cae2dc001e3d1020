/*
 * The fast CPU backend on float16 and bfloat16 tensors (float32 parameters
 * and statistics) against the reference backend (float64 arithmetic,
 * rounded once): two ops with the same description, one created with
 * FBN_CPU_BACKEND=reference, fed the same fresh random data rounded to the
 * dtype.
 *
 * Matrix: BN, BN + ReLU, BN + add + ReLU x training (running statistics
 * updated or not, saved state or none) and eval x backward (every output,
 * dx alone, daddend alone, dweight/dbias overwritten and accumulated) x
 * NCHW/NHWC x float16/bfloat16, on odd shapes (C = 1, C = 3, H*W = 1, 7x7,
 * lengths that are no multiple of a vector, rows longer than a chunk,
 * N = 1, C > 1024 in NHWC, tensors on several threads, outputs large
 * enough to be streamed); then NaN and infinity in x, values that overflow
 * float16 after normalization, constant and near-constant channels and
 * channels with |mean| >> std, channels whose positive pre-activations
 * round to +0 in the dtype (the ReLU mask must come from the rounded y:
 * one packed from the float32 y would keep dy there, which dbias, dweight
 * and daddend show). The conversion path is the process's
 * (FBN_CPU_HALF_PATH: meson runs this file once per path; a path the CPU
 * lacks is skipped visibly).
 *
 * Tolerances, per element, with u the dtype's ulp at 1 (float16 2^-10,
 * bfloat16 2^-7: twice the unit roundoff):
 *   y, dx      |fast - ref| <= 2 u |ref| + 2^-14 max|ref|
 *              the fast path computes in float32 (coefficients rounded to
 *              float32, ~2^-24 relative to the terms' size) and rounds once:
 *              one rounding boundary crossed gives one ulp; the absolute
 *              term covers results that cancel below the terms' size;
 *   daddend    bitwise (a copy of dy or +0);
 *   running statistics, dweight, dbias (float32, sums in float64)
 *              |fast - ref| <= 1e-5 |ref| + 1e-5 max|ref|;
 *   NaN exactly where ref is NaN, infinities equal.
 * Backward runs both backends on the fast forward's y: the fast backend
 * takes its ReLU mask from the bits its forward packed from the rounded y,
 * which must agree with the !(y <= 0) the reference computes from that y.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "api/api.h" /* only to assert which backend each op got */
#include "cpu/half/half_convert.h"
#include "fbn_testutil.h"

enum special {
  SPECIAL_NONE,
  SPECIAL_NAN_INF,   /* NaN in channel 0, +Inf in channel 1, -Inf in channel 2 */
  SPECIAL_OVERFLOW,  /* weight of channel 0 large: y beyond float16's range */
  SPECIAL_CONSTANT,  /* channel 0 constant, channel 1 two neighbouring values */
  SPECIAL_BIG_MEAN,  /* every channel: |mean| >> std (a few ulps of spread) */
  SPECIAL_TINY,      /* even channels: y > 0 in float32 that rounds to +0 (below) */
};

typedef struct hcase {
  int64_t n, c, h, w;
  fbn_layout layout;
  fbn_dtype dtype;
  fbn_operation operation;
  fbn_statistics statistics;
  bool update;  /* training: running statistics updated */
  bool save;    /* saved state (and a backward) */
  bool affine;
  int variant;  /* which backward outputs (0..3) */
  enum special special;
} hcase;

static int failures;

static double to_d(fbn_dtype t, uint16_t v) {
  return t == FBN_DTYPE_FLOAT16 ? (double)fbnt_half_to_float(v) : (double)fbnt_bfloat16_to_float(v);
}
static uint16_t from_d(fbn_dtype t, double v) {
  return t == FBN_DTYPE_FLOAT16 ? fbnt_float_to_half((float)v) : fbnt_float_to_bfloat16((float)v);
}

static void *xalloc(size_t bytes) {
  void *p = aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
  assert_non_null(p);
  return p;
}

static const char *case_name(const hcase *k, char *buf, size_t size) {
  snprintf(buf, size, "%s %s %s (%lld,%lld,%lld,%lld) %s%s%s variant %d special %d",
           k->dtype == FBN_DTYPE_FLOAT16 ? "float16" : "bfloat16",
           k->layout == FBN_LAYOUT_NCHW ? "NCHW" : "NHWC", fbn_operation_name(k->operation),
           (long long)k->n, (long long)k->c, (long long)k->h, (long long)k->w,
           k->statistics == FBN_STATISTICS_BATCH ? "training" : "eval",
           k->update ? " +running" : "", k->save ? " +saved" : "", k->variant, (int)k->special);
  return buf;
}

/* Half tensors: every element within tolerance, NaN where ref is NaN;
 * chan_tol (may be NULL): an absolute tolerance per channel, added (the
 * channel of element i by chan_of). */
static bool check_half(const char *what, const char *name, fbn_dtype t, const uint16_t *got,
                       const uint16_t *want, int64_t count, bool exact, const double *chan_tol,
                       int64_t hw, int64_t c_, bool nchw) {
  const double u = t == FBN_DTYPE_FLOAT16 ? 0x1p-10 : 0x1p-7;
  double maxref = 0.0;
  for (int64_t i = 0; i < count; i++) {
    const double r = to_d(t, want[i]);
    if (isfinite(r) && fabs(r) > maxref)
      maxref = fabs(r);
  }
  int bad = 0;
  for (int64_t i = 0; i < count && bad < 5; i++) {
    const double g = to_d(t, got[i]), r = to_d(t, want[i]);
    bool ok;
    if (exact)
      ok = got[i] == want[i] || (isnan(g) && isnan(r));
    else if (isnan(r))
      ok = isnan(g);
    else if (isinf(r))
      ok = g == r;
    else
      ok = isfinite(g) &&
           fabs(g - r) <= 2.0 * u * fabs(r) + 0x1p-14 * maxref +
                              (chan_tol != NULL ? chan_tol[nchw ? i / hw % c_ : i % c_] : 0.0);
    if (!ok) {
      printf("  %s: %s[%lld] = %.9g (0x%04x), reference %.9g (0x%04x)\n", name, what,
             (long long)i, g, got[i], r, want[i]);
      bad++;
    }
  }
  return bad == 0;
}

static bool check_f32(const char *what, const char *name, const float *got, const float *want,
                      int64_t count) {
  double maxref = 0.0;
  for (int64_t i = 0; i < count; i++)
    if (isfinite(want[i]) && fabs(want[i]) > maxref)
      maxref = fabs(want[i]);
  int bad = 0;
  for (int64_t i = 0; i < count && bad < 5; i++) {
    const double g = got[i], r = want[i];
    const bool ok = isnan(r) ? isnan(g)
                    : isinf(r) ? g == r
                               : isfinite(g) && fabs(g - r) <= 1e-5 * fabs(r) + 1e-5 * maxref;
    if (!ok) {
      printf("  %s: %s[%lld] = %.9g, reference %.9g\n", name, what, (long long)i, g, r);
      bad++;
    }
  }
  return bad == 0;
}

static fbn_op *op_with(const fbn_op_desc *od, const char *backend) {
  if (backend != NULL)
    assert_int_equal(setenv("FBN_CPU_BACKEND", backend, 1), 0);
  fbn_op *op = NULL;
  const fbn_status st = fbn_op_create(od, &op);
  assert_int_equal(unsetenv("FBN_CPU_BACKEND"), 0);
  if (st != FBN_STATUS_SUCCESS)
    fail_msg("fbn_op_create (%s) = %s: %s", backend ? backend : "fast", fbn_status_string(st),
             fbn_last_error_message());
  return op;
}

#define POISON 0xfbfbu

static void poison16(uint16_t *p, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    p[i] = POISON;
}

/* Element (n, c, s) of the case's layout. */
static int64_t index_of(const hcase *k, int64_t n, int64_t c, int64_t s) {
  const int64_t hw = k->h * k->w;
  return k->layout == FBN_LAYOUT_NCHW ? (n * k->c + c) * hw + s : (n * hw + s) * k->c + c;
}

static void run_case(const hcase *k, fbnt_rng *rng) {
  char name[200];
  case_name(k, name, sizeof name);
  const fbn_dtype t = k->dtype;
  const fbn_tensor_desc d = fbn_tensor_desc_make(k->n, k->c, k->h, k->w, t, k->layout);
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = k->c;
  od.dtype = t;
  od.param_dtype = FBN_DTYPE_FLOAT32;
  od.layout = k->layout;
  od.operation = k->operation;
  od.affine = k->affine;
  od.statistics = k->statistics;
  fbn_op *ref = op_with(&od, "reference"), *fast = op_with(&od, NULL);
  assert_string_equal(ref->backend->name, "cpu-reference");
  assert_string_equal(fast->backend->name, "cpu-fast");

  const int64_t c_ = k->c, hw = k->h * k->w, numel = k->n * c_ * hw;
  const size_t tb = (size_t)numel * 2, cb = (size_t)c_ * sizeof(float);
  uint16_t *x = xalloc(tb), *z = xalloc(tb), *yr = xalloc(tb), *yf = xalloc(tb);
  uint16_t *dy = xalloc(tb), *dxr = xalloc(tb), *dxf = xalloc(tb), *dzr = xalloc(tb),
           *dzf = xalloc(tb);
  float *w = xalloc(cb), *b = xalloc(cb), *rm[2], *rv[2], *dw[2], *db[2];
  for (int i = 0; i < 2; i++) {
    rm[i] = xalloc(cb);
    rv[i] = xalloc(cb);
    dw[i] = xalloc(cb);
    db[i] = xalloc(cb);
  }
  /* data: per channel a mean and a spread, rounded to the dtype */
  for (int64_t c = 0; c < c_; c++) {
    double mean = fbnt_rng_uniform(rng, -2.0, 2.0), sd = fbnt_rng_uniform(rng, 0.3, 2.0);
    if (k->special == SPECIAL_BIG_MEAN) {
      mean = (t == FBN_DTYPE_FLOAT16 ? 1000.0 : 1.0e5) * (c % 2 ? -1.0 : 1.0);
      sd = (t == FBN_DTYPE_FLOAT16 ? 0.5 : 512.0) * 2.0;
    }
    for (int64_t n = 0; n < k->n; n++)
      for (int64_t s = 0; s < hw; s++) {
        double v = mean + sd * fbnt_rng_normal(rng);
        if (k->special == SPECIAL_CONSTANT && c == 0)
          v = 0.75;
        if (k->special == SPECIAL_CONSTANT && c == 1)
          v = fbnt_rng_u32(rng) % 2 ? 3.0 : 3.0 + (t == FBN_DTYPE_FLOAT16 ? 0x1p-9 : 0x1p-6);
        if (k->special == SPECIAL_TINY && t == FBN_DTYPE_BFLOAT16 && c % 2 == 0)
          v = fbnt_rng_u32(rng) % 2 ? 0x1p-4 : 0x1p-4 + 0x1p-11; /* neighbours */
        x[index_of(k, n, c, s)] = from_d(t, v);
        z[index_of(k, n, c, s)] = from_d(t, fbnt_rng_uniform(rng, -1.0, 1.0));
        dy[index_of(k, n, c, s)] = from_d(t, fbnt_rng_uniform(rng, -1.0, 1.0));
      }
    w[c] = (float)fbnt_rng_signed(rng, 0.5, 1.5);
    b[c] = (float)fbnt_rng_uniform(rng, -0.5, 0.5);
    rm[0][c] = rm[1][c] = (float)(mean + fbnt_rng_uniform(rng, -0.2, 0.2));
    rv[0][c] = rv[1][c] = (float)(sd * sd * fbnt_rng_uniform(rng, 0.7, 1.3));
    dw[0][c] = dw[1][c] = (float)fbnt_rng_uniform(rng, -1.0, 1.0);
    db[0][c] = db[1][c] = (float)fbnt_rng_uniform(rng, -1.0, 1.0);
  }
  if (k->special == SPECIAL_NAN_INF) {
    x[index_of(k, k->n - 1, 0, hw / 2)] = from_d(t, NAN);
    if (c_ > 1)
      x[index_of(k, 0, 1, 0)] = from_d(t, INFINITY);
    if (c_ > 2)
      x[index_of(k, k->n / 2, 2, hw - 1)] = from_d(t, -INFINITY);
    if (k->statistics == FBN_STATISTICS_RUNNING)
      rm[0][c_ - 1] = rm[1][c_ - 1] = NAN;
  }
  if (k->special == SPECIAL_OVERFLOW && k->affine)
    w[0] = 4.0e4f;
  /* SPECIAL_TINY (affine): in the even channels y > 0 in float32 but at
   * most half the dtype's smallest subnormal s, so it rounds to +0. The
   * channel's float32 factor a = w invstd stays a normal float32 (else the
   * fast backend takes the channel off its vectorized loops).
   *   float16 (s = 2^-24): w = s / 16, b = s / 4: y = b (1 + xhat / 4) > 0
   *     for xhat > -4 and < s / 2 for xhat < 4.
   *   bfloat16 (s = 2^-133, float32's normal range ends at 2^-126): x takes
   *     two neighbours 2^-4 and 2^-4 + 2^-11, so |x - m| <= d <= 2^-11; w
   *     makes a = 2^-125 and b = 1.25 d a: y in [0.25, 2.25] d a, at most
   *     2.25 2^-136 < s / 2.
   * With the addend z = -s there and b + s for the bias, the float32 sum is
   * the same y (exact: subnormal float32 has 2^-149 steps). */
  const double tiny_s = t == FBN_DTYPE_FLOAT16 ? 0x1p-24 : 0x1p-133;
  const bool tiny = k->special == SPECIAL_TINY && k->affine;
  if (tiny)
    for (int64_t c = 0; c < c_; c += 2) {
      const bool addz = k->operation == FBN_OPERATION_BN_ADD_RELU;
      if (t == FBN_DTYPE_FLOAT16) {
        w[c] = (float)(tiny_s / 16.0);
        b[c] = (float)(tiny_s / 4.0 + (addz ? tiny_s : 0.0));
      } else {
        rm[0][c] = rm[1][c] = (float)(0x1p-4 + 0x1p-12);
        rv[0][c] = rv[1][c] = 0x1p-24f;
        double m = rm[0][c], var = rv[0][c];
        if (k->statistics == FBN_STATISTICS_BATCH) {
          double s1 = 0.0, s2 = 0.0;
          for (int64_t n = 0; n < k->n; n++)
            for (int64_t e = 0; e < hw; e++)
              s1 += to_d(t, x[index_of(k, n, c, e)]);
          m = s1 / (double)(k->n * hw);
          for (int64_t n = 0; n < k->n; n++)
            for (int64_t e = 0; e < hw; e++)
              s2 += (to_d(t, x[index_of(k, n, c, e)]) - m) * (to_d(t, x[index_of(k, n, c, e)]) - m);
          var = s2 / (double)(k->n * hw);
        }
        double dmax = 0.0;
        for (int64_t n = 0; n < k->n; n++)
          for (int64_t e = 0; e < hw; e++)
            dmax = fmax(dmax, fabs(to_d(t, x[index_of(k, n, c, e)]) - m));
        w[c] = (float)(0x1p-125 * sqrt(var + 1e-5));
        b[c] = (float)(1.25 * fmax(dmax, 0x1p-12) * 0x1p-125 + (addz ? tiny_s : 0.0));
      }
      for (int64_t n = 0; n < k->n; n++)
        for (int64_t e = 0; e < hw; e++)
          z[index_of(k, n, c, e)] = from_d(t, addz ? -tiny_s : 0.0);
    }
  const bool batch = k->statistics == FBN_STATISTICS_BATCH;
  const bool upd = batch && k->update;
  const bool add = k->operation == FBN_OPERATION_BN_ADD_RELU;

  fbn_op *ops[2] = {ref, fast};
  uint16_t *ys[2] = {yr, yf};
  void *saved[2] = {NULL, NULL}, *ws[2] = {NULL, NULL};
  size_t saved_b[2] = {0, 0}, ws_b[2] = {0, 0};
  for (int i = 0; i < 2; i++) {
    size_t bytes;
    assert_int_equal(fbn_op_saved_size(ops[i], &d, &saved_b[i]), FBN_STATUS_SUCCESS);
    if (k->save)
      saved[i] = xalloc(saved_b[i]);
    assert_int_equal(fbn_op_forward_workspace_size(ops[i], &d, &bytes), FBN_STATUS_SUCCESS);
    size_t bb;
    assert_int_equal(fbn_op_backward_workspace_size(ops[i], &d, &bb), FBN_STATUS_SUCCESS);
    ws_b[i] = bytes > bb ? bytes : bb;
    ws[i] = ws_b[i] > 0 ? xalloc(ws_b[i]) : NULL;
    poison16(ys[i], numel);
    const fbn_status st = fbn_op_forward(
        ops[i], &d, x, add ? z : NULL, ys[i], k->affine ? w : NULL, k->affine ? b : NULL,
        batch && !upd ? NULL : rm[i], batch && !upd ? NULL : rv[i], 0.1, saved[i], saved_b[i],
        ws[i], ws_b[i]);
    if (st != FBN_STATUS_SUCCESS)
      fail_msg("%s: forward (%s) = %s: %s", name, i ? "fast" : "reference",
               fbn_status_string(st), fbn_last_error_message());
  }
  const bool nchw = k->layout == FBN_LAYOUT_NCHW;
  bool ok = check_half("y", name, t, yf, yr, numel, false, NULL, hw, c_, nchw);
  if (tiny) {
    /* the setup does what it says: most of the even channels' y is +0 */
    int64_t zeros = 0, all = 0;
    for (int64_t c = 0; c < c_; c += 2)
      for (int64_t n = 0; n < k->n; n++)
        for (int64_t s = 0; s < hw; s++, all++)
          zeros += yf[index_of(k, n, c, s)] == 0;
    if (zeros * 4 < all * 3) {
      printf("  %s: only %lld of %lld tiny-channel y are +0\n", name, (long long)zeros,
             (long long)all);
      ok = false;
    }
  }
  if (upd) {
    ok &= check_f32("running_mean", name, rm[1], rm[0], c_);
    ok &= check_f32("running_var", name, rv[1], rv[0], c_);
  }
  if (k->save) {
    /* variant 0: every output, overwrite; 1: dx alone (+ accumulate);
     * 2: daddend alone / dbias alone; 3: parameter gradients alone */
    const bool want_dx = k->variant <= 1, want_dz = add && (k->variant == 0 || k->variant == 2);
    const bool want_dw = k->affine && k->variant != 2, want_db = k->affine;
    const bool acc = k->variant == 1 || k->variant == 3;
    /* dx = g k + (x - m) c1 + c0 in float32 cancels down from terms of
     * about |k| (|g| + |xhat| |mean g xhat| + |mean g|): their float32
     * rounding, 2^-19 of that size, is added to dx's tolerance (batch
     * statistics; with running statistics dx = g k has no cancellation) */
    double *dx_tol = calloc((size_t)c_, sizeof *dx_tol);
    if (batch) {
      double gmax = 0.0;
      for (int64_t i = 0; i < numel; i++)
        if (isfinite(to_d(t, dy[i])) && fabs(to_d(t, dy[i])) > gmax)
          gmax = fabs(to_d(t, dy[i]));
      const int64_t count = k->n * hw;
      for (int64_t c = 0; c < c_; c++) {
        double s = 0.0, q = 0.0, xmax = 0.0;
        for (int64_t n = 0; n < k->n; n++)
          for (int64_t e = 0; e < hw; e++)
            s += to_d(t, x[index_of(k, n, c, e)]);
        const double mean = s / (double)count;
        for (int64_t n = 0; n < k->n; n++)
          for (int64_t e = 0; e < hw; e++) {
            const double v = to_d(t, x[index_of(k, n, c, e)]) - mean;
            q += v * v;
            xmax = fabs(v) > xmax ? fabs(v) : xmax;
          }
        const double invstd = 1.0 / sqrt(q / (double)count + 1e-5);
        const double kc = fabs((k->affine ? w[c] : 1.0) * invstd);
        dx_tol[c] = 0x1p-19 * kc * gmax * (2.0 + xmax * invstd);
      }
    }
    for (int i = 0; i < 2; i++) {
      uint16_t *dx = i ? dxf : dxr, *dz = i ? dzf : dzr;
      poison16(dx, numel);
      poison16(dz, numel);
      if (!acc)
        for (int64_t c = 0; c < c_; c++)
          dw[i][c] = db[i][c] = NAN;
      const fbn_status st = fbn_op_backward(
          ops[i], &d, x, k->operation == FBN_OPERATION_BN ? NULL : yf, dy, saved[i], saved_b[i],
          k->affine ? w : NULL, k->affine ? b : NULL, want_dx ? dx : NULL, want_dz ? dz : NULL,
          want_dw ? dw[i] : NULL, want_db ? db[i] : NULL,
          acc ? FBN_PARAM_GRAD_ACCUMULATE : FBN_PARAM_GRAD_OVERWRITE, ws[i], ws_b[i]);
      if (st != FBN_STATUS_SUCCESS)
        fail_msg("%s: backward (%s) = %s: %s", name, i ? "fast" : "reference",
                 fbn_status_string(st), fbn_last_error_message());
    }
    if (tiny) {
      /* where y is a zero and dy finite, the gate is off: daddend is a
       * zero; with running statistics dx = k dy gated, a zero too */
      int bad = 0;
      for (int64_t i = 0; i < numel && bad < 5; i++) {
        if ((yf[i] & 0x7fffu) != 0 || !isfinite(to_d(t, dy[i])))
          continue;
        const bool dz_bad = want_dz && (dzf[i] & 0x7fffu) != 0;
        const bool dx_bad = want_dx && !batch && (dxf[i] & 0x7fffu) != 0;
        if (dz_bad || dx_bad) {
          printf("  %s: y[%lld] = 0 but daddend 0x%04x, dx 0x%04x (dy 0x%04x)\n", name,
                 (long long)i, dzf[i], dxf[i], dy[i]);
          bad++;
        }
      }
      ok &= bad == 0;
    }
    if (want_dx)
      ok &= check_half("dx", name, t, dxf, dxr, numel, false, dx_tol, hw, c_, nchw);
    else
      for (int64_t i = 0; i < numel; i++)
        if (dxf[i] != POISON) {
          printf("  %s: dx[%lld] written, not requested\n", name, (long long)i);
          ok = false;
          break;
        }
    ok &= check_half("daddend", name, t, dzf, dzr, numel, true, NULL, hw, c_, nchw);
    if (want_dw)
      ok &= check_f32("dweight", name, dw[1], dw[0], c_);
    if (want_db)
      ok &= check_f32("dbias", name, db[1], db[0], c_);
    free(dx_tol);
  }
  if (!ok) {
    printf("FAILED: %s\n", name);
    failures++;
  }
  for (int i = 0; i < 2; i++) {
    free(saved[i]);
    free(ws[i]);
    free(rm[i]);
    free(rv[i]);
    free(dw[i]);
    free(db[i]);
  }
  void *bufs[] = {x, z, yr, yf, dy, dxr, dxf, dzr, dzf, w, b};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    free(bufs[i]);
  fbn_op_destroy(ref);
  fbn_op_destroy(fast);
}

/* The conversion path this process runs (FBN_CPU_HALF_PATH), or a visible
 * skip when it names one the CPU lacks. */
static void path_or_skip(void) {
  const char *want = getenv("FBN_CPU_HALF_PATH");
  if (want == NULL)
    return;
  for (int p = 0; p < FBN_HALF_PATH_COUNT; p++)
    if (strcmp(want, fbn_half_path_name((fbn_half_path)p)) == 0 &&
        fbn_half_convert_of((fbn_half_path)p) == NULL) {
      printf("[  SKIPPED ] FBN_CPU_HALF_PATH=%s: this CPU or build lacks the path\n", want);
      skip();
    }
  printf("           conversion path %s\n", fbn_half_convert_get()->name);
}

static const int64_t shapes[][4] = {
    {2, 3, 5, 7},  {1, 1, 16, 16}, {4, 3, 1, 1},    {3, 5, 7, 7},   {2, 4, 17, 19},
    {2, 70, 3, 3}, {1, 8, 33, 33}, {3, 1100, 1, 2}, {4, 32, 32, 32}, {2, 9, 20, 20},
};

static void run_matrix(fbn_dtype t, fbn_layout l) {
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, t == FBN_DTYPE_FLOAT16 ? "half-f16" : "half-bf16");
  const fbn_operation opsv[] = {FBN_OPERATION_BN, FBN_OPERATION_BN_RELU,
                                FBN_OPERATION_BN_ADD_RELU};
  int variant = 0;
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (int o = 0; o < 3; o++)
      for (int mode = 0; mode < 4; mode++) {
        /* mode 0: training, running update, saved; 1: training, no update,
         * saved; 2: training, update, no saved state; 3: eval, saved */
        const hcase k = {.n = shapes[s][0], .c = shapes[s][1], .h = shapes[s][2],
                         .w = shapes[s][3], .layout = l, .dtype = t, .operation = opsv[o],
                         .statistics = mode == 3 ? FBN_STATISTICS_RUNNING : FBN_STATISTICS_BATCH,
                         .update = mode != 1, .save = mode != 2,
                         .affine = (s + (size_t)o) % 4 != 3, .variant = variant++ % 4,
                         .special = SPECIAL_NONE};
        run_case(&k, &rng);
      }
}

static void matrix_test(fbn_dtype t, fbn_layout l) {
  path_or_skip();
  failures = 0;
  run_matrix(t, l);
  if (failures != 0)
    fail_msg("%d cases failed", failures);
}

static void test_cpu_fast_half_f16_nchw(void **state) {
  (void)state;
  matrix_test(FBN_DTYPE_FLOAT16, FBN_LAYOUT_NCHW);
}
static void test_cpu_fast_half_f16_nhwc(void **state) {
  (void)state;
  matrix_test(FBN_DTYPE_FLOAT16, FBN_LAYOUT_NHWC);
}
static void test_cpu_fast_half_bf16_nchw(void **state) {
  (void)state;
  matrix_test(FBN_DTYPE_BFLOAT16, FBN_LAYOUT_NCHW);
}
static void test_cpu_fast_half_bf16_nhwc(void **state) {
  (void)state;
  matrix_test(FBN_DTYPE_BFLOAT16, FBN_LAYOUT_NHWC);
}

/* NaN/Inf, overflow, constant channels, |mean| >> std; and outputs large
 * enough to be streamed (8 MiB and more). */
static void test_cpu_fast_half_special_values(void **state) {
  (void)state;
  path_or_skip();
  failures = 0;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  const int64_t sp_shapes[][4] = {{3, 5, 7, 7}, {2, 4, 17, 19}, {2, 6, 1, 1}, {4, 5, 20, 20}};
  const enum special sps[] = {SPECIAL_NAN_INF, SPECIAL_OVERFLOW, SPECIAL_CONSTANT,
                              SPECIAL_BIG_MEAN, SPECIAL_TINY};
  int variant = 0;
  for (int t = 0; t < 2; t++)
    for (int l = 0; l < 2; l++)
      for (size_t s = 0; s < sizeof sp_shapes / sizeof sp_shapes[0]; s++)
        for (size_t p = 0; p < sizeof sps / sizeof sps[0]; p++)
          for (int o = 1; o < 3; o++)
            for (int mode = 0; mode < 2; mode++) {
              const hcase k = {.n = sp_shapes[s][0], .c = sp_shapes[s][1], .h = sp_shapes[s][2],
                               .w = sp_shapes[s][3], .layout = (fbn_layout)l,
                               .dtype = t ? FBN_DTYPE_BFLOAT16 : FBN_DTYPE_FLOAT16,
                               .operation = o == 1 ? FBN_OPERATION_BN_RELU
                                                   : FBN_OPERATION_BN_ADD_RELU,
                               .statistics =
                                   mode ? FBN_STATISTICS_RUNNING : FBN_STATISTICS_BATCH,
                               .update = true, .save = true, .affine = true,
                               .variant = variant++ % 4, .special = sps[p]};
              run_case(&k, &rng);
            }
  for (int t = 0; t < 2; t++)
    for (int l = 0; l < 2; l++)
      for (int mode = 0; mode < 2; mode++) {
        const hcase k = {.n = 8, .c = 64, .h = 96, .w = 96, .layout = (fbn_layout)l,
                         .dtype = t ? FBN_DTYPE_BFLOAT16 : FBN_DTYPE_FLOAT16,
                         .operation = FBN_OPERATION_BN_ADD_RELU,
                         .statistics = mode ? FBN_STATISTICS_RUNNING : FBN_STATISTICS_BATCH,
                         .update = true, .save = true, .affine = true, .variant = 0,
                         .special = SPECIAL_NONE};
        run_case(&k, &rng);
      }
  if (failures != 0)
    fail_msg("%d cases failed", failures);
}

int main(int argc, char **argv) {
  fbnt_parse_args(argc, argv);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_cpu_fast_half_f16_nchw),
      cmocka_unit_test(test_cpu_fast_half_f16_nhwc),
      cmocka_unit_test(test_cpu_fast_half_bf16_nchw),
      cmocka_unit_test(test_cpu_fast_half_bf16_nhwc),
      cmocka_unit_test(test_cpu_fast_half_special_values),
  };
  return cmocka_run_group_tests_name("cpu_fast_half", tests, NULL, NULL);
}
