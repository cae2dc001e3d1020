/*
 * The fast CPU backend against the reference backend (the oracle): two
 * modules with the same options and state, one created with
 * FBN_CPU_BACKEND=reference, one with the variable unset (the fast default),
 * fed the same fresh random data for several training steps and in eval
 * mode: y, running statistics, num_batches_tracked, dx, daddend and the
 * accumulated weight/bias gradients must agree.
 *
 * Matrix: shapes (odd sizes, H*W = 1, C > 64 and >= 256, small C with many
 * rows, tensors large enough to run on several threads) x NCHW/NHWC x
 * float32/float64 x affine x track_running_stats x addend x train/eval, with
 * momentum and the cumulative average; then NaN / infinity / degenerate
 * channels, which must come out exactly where the reference puts them. BN
 * alone (FBN_OPERATION_BN: no addend, backward without y) runs the same
 * matrix, and BN + ReLU must be ReLU(BN) bit for bit on the fast backend.
 *
 * Tolerances (per element, |fast - ref| <= atol + rtol * |ref|, NaN exactly
 * where ref is NaN, infinities equal):
 *   float32 tensors   rtol = 2e-5, atol = 2e-5 * max|ref| of the tensor
 *   float64 tensors   rtol = 1e-10, atol = 1e-10 * max|ref|
 *   parameters, running statistics, gradients: the same by param_dtype.
 * daddend = dy * !(y <= 0) is a copy and must match bitwise (rtol = atol = 0).
 * Backward runs both backends on the fast forward's y (already checked
 * against the reference's): the fast backend takes its ReLU mask from the
 * bitmask its forward saved (float32), which must then agree exactly with
 * the !(y <= 0) the reference backend computes from that y; an element within
 * rounding of 0 could be masked differently by the two forwards' own y.
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

#include "fbn_testutil.h"
#include "internal.h" /* only to assert which backend each module got */

/* ---- module pairs --------------------------------------------------------- */

static fbn_module *create_with(const fbn_module_options *o, const char *backend) {
  if (backend != NULL)
    assert_int_equal(setenv("FBN_CPU_BACKEND", backend, 1), 0);
  else
    assert_int_equal(unsetenv("FBN_CPU_BACKEND"), 0);
  fbn_module *m = NULL;
  fbn_status st = fbn_module_create(o, &m);
  assert_int_equal(unsetenv("FBN_CPU_BACKEND"), 0);
  if (st != FBN_STATUS_SUCCESS)
    fail_msg("fbn_module_create (FBN_CPU_BACKEND=%s) = %s: %s", backend ? backend : "(unset)",
             fbn_status_string(st), fbn_last_error_message());
  return m;
}

typedef struct pair {
  fbn_module *ref;
  fbn_module *fast;
} pair;

/* The same random parameters, running statistics and gradients (and
 * num_batches_tracked) into count modules of options o. */
static void modules_init_alike(fbn_module *const *mods, int count, const fbn_module_options *o,
                               fbnt_rng *rng) {
  static const struct {
    fbn_buffer which;
    double lo, hi;
    bool signed_;
  } init[] = {
      {FBN_BUFFER_WEIGHT, 0.5, 1.5, true},         {FBN_BUFFER_BIAS, -0.5, 0.5, false},
      {FBN_BUFFER_RUNNING_MEAN, -1.0, 1.0, false}, {FBN_BUFFER_RUNNING_VAR, 0.5, 2.0, false},
      {FBN_BUFFER_WEIGHT_GRAD, -1.0, 1.0, false},  {FBN_BUFFER_BIAS_GRAD, -1.0, 1.0, false},
  };
  double *v = calloc((size_t)o->num_features, sizeof *v);
  for (size_t i = 0; i < sizeof init / sizeof init[0]; i++) {
    if (!fbn_module_has_buffer(mods[0], init[i].which))
      continue;
    fbnt_fill_vector(rng, v, o->num_features, init[i].lo, init[i].hi, init[i].signed_, true);
    for (int k = 0; k < count; k++)
      assert_int_equal(fbn_module_write_buffer(mods[k], init[i].which, FBN_DTYPE_FLOAT64, v,
                                               (size_t)o->num_features),
                       FBN_STATUS_SUCCESS);
  }
  free(v);
  if (o->track_running_stats)
    for (int k = 0; k < count; k++)
      assert_int_equal(fbn_module_set_num_batches_tracked(mods[k], 3), FBN_STATUS_SUCCESS);
}

/* Two modules with options o and the same random state. */
static void pair_create(pair *p, const fbn_module_options *o, fbnt_rng *rng) {
  p->ref = create_with(o, "reference");
  p->fast = create_with(o, NULL);
  assert_string_equal(p->ref->backend->name, "cpu-reference");
  assert_string_equal(p->fast->backend->name, "cpu-fast");
  fbn_module *const mods[2] = {p->ref, p->fast};
  modules_init_alike(mods, 2, o, rng);
}

static void pair_destroy(pair *p) {
  fbn_module_destroy(p->ref);
  fbn_module_destroy(p->fast);
}

static void pair_set_training(pair *p, bool training) {
  assert_int_equal(fbn_module_set_training(p->ref, training), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_set_training(p->fast, training), FBN_STATUS_SUCCESS);
}

/* Set channel c of a buffer to value in both modules. */
static void pair_poke(pair *p, fbn_buffer which, int64_t c, double value) {
  const size_t count = (size_t)p->ref->options.num_features;
  double *v = calloc(count, sizeof *v);
  assert_int_equal(fbn_module_read_buffer(p->ref, which, FBN_DTYPE_FLOAT64, v, count),
                   FBN_STATUS_SUCCESS);
  v[c] = value;
  assert_int_equal(fbn_module_write_buffer(p->ref, which, FBN_DTYPE_FLOAT64, v, count),
                   FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_write_buffer(p->fast, which, FBN_DTYPE_FLOAT64, v, count),
                   FBN_STATUS_SUCCESS);
  free(v);
}

/* ---- comparisons ---------------------------------------------------------- */

static double tol_rel(fbn_dtype dtype) { return dtype == FBN_DTYPE_FLOAT64 ? 1e-10 : 2e-5; }

/* Every element of got against want (tensors of desc), relative tolerance
 * rtol and absolute rtol * max(max|want|, scale) (exact when rtol = 0). */
static bool same_tensor(const char *name, const char *what, const fbn_tensor_desc *d,
                        const void *got, const void *want, double rtol, double scale) {
  const size_t count = fbnt_desc_numel(d);
  double *g = malloc(count * sizeof *g), *w = malloc(count * sizeof *w);
  fbnt_tensor_to_ref(d, got, g);
  fbnt_tensor_to_ref(d, want, w);
  char label[256];
  snprintf(label, sizeof label, "%s: %s", name, what);
  double atol = fbnt_max_finite(w, count);
  if (scale > atol)
    atol = scale;
  const bool ok = fbnt_check_close(label, g, w, count, rtol, rtol * atol, d);
  free(g);
  free(w);
  return ok;
}

/* Every buffer and num_batches_tracked of the two modules. */
static bool same_state(const char *name, const pair *p) {
  return fbnt_check_modules_agree(name, p->fast, p->ref, tol_rel(p->ref->options.param_dtype));
}

/*
 * Size of the terms that cancel in dx = k * (g - mean(g) - xhat * mean(g xhat)):
 * max over channels of |weight * invstd| times max |dy|, with the statistics
 * the coming forward of the reference module will use (batch statistics of x,
 * or its running statistics). dx itself can be far smaller (with N*H*W = 2 it
 * is exactly 0), so its absolute tolerance scales with this.
 */
static double dx_term_scale(const fbn_module *ref, const fbn_tensor_desc *d, const void *x,
                            const void *dy) {
  const int64_t c_ = d->c, hw = d->h * d->w, count = d->n * hw;
  const size_t numel = fbnt_desc_numel(d);
  double *v = malloc(numel * sizeof *v), *w = calloc((size_t)c_, sizeof *w);
  double *rv = calloc((size_t)c_, sizeof *rv);
  bool training = true;
  assert_int_equal(fbn_module_is_training(ref, &training), FBN_STATUS_SUCCESS);
  const bool running = !training && ref->options.track_running_stats;
  if (running)
    assert_int_equal(fbn_module_read_buffer(ref, FBN_BUFFER_RUNNING_VAR, FBN_DTYPE_FLOAT64, rv,
                                            (size_t)c_),
                     FBN_STATUS_SUCCESS);
  if (ref->options.affine)
    assert_int_equal(
        fbn_module_read_buffer(ref, FBN_BUFFER_WEIGHT, FBN_DTYPE_FLOAT64, w, (size_t)c_),
        FBN_STATUS_SUCCESS);
  fbnt_tensor_to_ref(d, x, v);
  double kmax = 0.0;
  for (int64_t c = 0; c < c_; c++) {
    double var = rv[c];
    if (!running) {
      double sum = 0.0, sq = 0.0;
      for (int64_t n = 0; n < d->n; n++)
        for (int64_t i = 0; i < hw; i++)
          sum += v[(n * c_ + c) * hw + i];
      const double mean = sum / (double)count;
      for (int64_t n = 0; n < d->n; n++)
        for (int64_t i = 0; i < hw; i++)
          sq += (v[(n * c_ + c) * hw + i] - mean) * (v[(n * c_ + c) * hw + i] - mean);
      var = sq / (double)count;
    }
    const double k = fabs((ref->options.affine ? w[c] : 1.0) / sqrt(var + ref->options.eps));
    if (isfinite(k) && k > kmax)
      kmax = k;
  }
  fbnt_tensor_to_ref(d, dy, v);
  const double scale = kmax * fbnt_max_finite(v, numel);
  free(v);
  free(w);
  free(rv);
  return scale;
}

/* ---- one case ------------------------------------------------------------- */

typedef enum special {
  SPECIAL_NONE = 0,
  SPECIAL_NAN_X,          /* NaN in x (one element of channel 1) */
  SPECIAL_INF_X,          /* +inf in x (channel 0), -inf in x (last channel) */
  SPECIAL_NAN_ADDEND,     /* NaN in a few addend elements */
  SPECIAL_NAN_DY,         /* NaN in a few dy elements */
  SPECIAL_CONSTANT_EPS0,  /* eps = 0 and a constant channel: invstd = inf */
  SPECIAL_NAN_RUNNING,    /* running_var NaN, running_mean inf (eval) */
  SPECIAL_INF_WEIGHT,     /* weight inf / NaN in two channels */
  SPECIAL_HUGE_OFFSET,    /* |mean| = 1e4 * std: shifted sums must not cancel */
  SPECIAL_COUNT,
} special;

/* A case with designated initializers: the module and shape (fields left
 * out: PyTorch's defaults, but momentum 0.25), a special, the steps;
 * bn_alone: operation FBN_OPERATION_BN (spec.addend must be false; backward
 * gets y = NULL), else BN + add + ReLU (BN + ReLU without an addend). */
typedef struct fcase {
  fbnt_spec spec;
  special sp;
  int steps;
  bool bn_alone;
} fcase;

static void case_name(const fcase *k, char *buf, size_t size) {
  char spec[192];
  fbnt_spec_name(&k->spec, spec, sizeof spec);
  snprintf(buf, size, "%s sp=%d%s", spec, (int)k->sp, k->bn_alone ? " op=bn" : "");
}

/* Fresh random tensor: element of channel c uniform in offset_c +- scale_c
 * with offset_c in [-off, off] and scale_c in [0.5, 3] drawn per call
 * (channels with different statistics); cheap enough for large tensors. */
static void fill_random(fbnt_rng *rng, const fbn_tensor_desc *d, void *t, double off) {
  const int64_t c_ = d->c, hw = d->h * d->w;
  const size_t numel = fbnt_desc_numel(d);
  double *offset = malloc((size_t)c_ * sizeof *offset), *scale = malloc((size_t)c_ * sizeof *scale);
  for (int64_t c = 0; c < c_; c++) {
    offset[c] = fbnt_rng_uniform(rng, -off, off);
    scale[c] = fbnt_rng_uniform(rng, 0.5, 3.0);
  }
  for (size_t i = 0; i < numel; i++) {
    const int64_t c = d->layout == FBN_LAYOUT_NCHW ? (int64_t)(i / (size_t)hw) % c_
                                                   : (int64_t)(i % (size_t)c_);
    const double v = offset[c] + scale[c] * (2.0 * fbnt_rng_unit(rng) - 1.0);
    if (d->dtype == FBN_DTYPE_FLOAT64)
      ((double *)t)[i] = v;
    else
      ((float *)t)[i] = (float)v;
  }
  free(offset);
  free(scale);
}

/* Store value at logical (n, c, h, w) of a tensor. */
static void poke(const fbn_tensor_desc *d, void *t, int64_t n, int64_t c, int64_t h, int64_t w,
                 double value) {
  fbnt_set(d, t, n % d->n, c % d->c, h % d->h, w % d->w, value);
}

static bool run_case(const fcase *k, fbnt_rng *rng) {
  char name[256];
  case_name(k, name, sizeof name);
  fbnt_spec spec = k->spec;
  if (spec.momentum == 0.0 && !spec.zero_momentum)
    spec.momentum = 0.25;
  if (k->sp == SPECIAL_CONSTANT_EPS0)
    spec.zero_eps = true;
  fbn_module_options o = fbnt_options(&spec);
  if (k->bn_alone) {
    assert_false(spec.addend);
    o.operation = FBN_OPERATION_BN;
  }
  const int64_t c_ = spec.c;
  pair p;
  pair_create(&p, &o, rng);
  if (spec.eval)
    pair_set_training(&p, false);
  if (k->sp == SPECIAL_NAN_RUNNING && o.track_running_stats) {
    pair_poke(&p, FBN_BUFFER_RUNNING_VAR, 0, NAN);
    pair_poke(&p, FBN_BUFFER_RUNNING_MEAN, c_ - 1, INFINITY);
  }
  if (k->sp == SPECIAL_INF_WEIGHT && o.affine) {
    pair_poke(&p, FBN_BUFFER_WEIGHT, 0, INFINITY);
    pair_poke(&p, FBN_BUFFER_WEIGHT, c_ - 1, NAN);
  }

  const fbn_tensor_desc d = {spec.n, spec.c, spec.h, spec.w, spec.dtype, spec.layout};
  void *x = fbnt_tensor_alloc(&d), *a = fbnt_tensor_alloc(&d), *dy = fbnt_tensor_alloc(&d);
  void *yr = fbnt_tensor_alloc(&d), *yf = fbnt_tensor_alloc(&d);
  void *dxr = fbnt_tensor_alloc(&d), *dxf = fbnt_tensor_alloc(&d);
  void *dar = fbnt_tensor_alloc(&d), *daf = fbnt_tensor_alloc(&d);
  fbn_saved *sr = NULL, *sf = NULL;
  assert_int_equal(fbn_saved_create(&sr), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_saved_create(&sf), FBN_STATUS_SUCCESS);

  bool ok = same_state(name, &p);
  for (int step = 0; step < k->steps && ok; step++) {
    char sname[300];
    snprintf(sname, sizeof sname, "%s step %d", name, step + 1);
    fill_random(rng, &d, x, 3.0);
    fill_random(rng, &d, a, 0.5);
    fill_random(rng, &d, dy, 0.5);
    switch (k->sp) {
    case SPECIAL_NAN_X:
      poke(&d, x, step, 1, 1, 2, NAN);
      break;
    case SPECIAL_INF_X:
      poke(&d, x, 0, 0, 0, 1, INFINITY);
      poke(&d, x, 1, c_ - 1, 0, 0, -INFINITY);
      break;
    case SPECIAL_NAN_ADDEND:
      poke(&d, a, 0, 0, 0, 0, NAN);
      poke(&d, a, 1, 2, 1, 1, NAN);
      break;
    case SPECIAL_NAN_DY:
      poke(&d, dy, 0, 1, 0, 0, NAN);
      poke(&d, dy, 1, 0, 1, 1, NAN);
      break;
    case SPECIAL_CONSTANT_EPS0:
      for (int64_t n = 0; n < d.n; n++)
        for (int64_t h = 0; h < d.h; h++)
          for (int64_t w = 0; w < d.w; w++)
            fbnt_set(&d, x, n, 0, h, w, 0.75);
      break;
    case SPECIAL_HUGE_OFFSET:
      for (int64_t n = 0; n < d.n; n++)
        for (int64_t c = 0; c < d.c; c++)
          for (int64_t h = 0; h < d.h; h++)
            for (int64_t w = 0; w < d.w; w++)
              fbnt_set(&d, x, n, c, h, w, 1e4 + fbnt_rng_normal(rng));
      break;
    default:
      break;
    }
    const void *addend = spec.addend ? a : NULL;
    const double dx_scale = dx_term_scale(p.ref, &d, x, dy);
    /* Forward (step 2 without a saved object: the no-backward path). */
    const bool keep = step != 1;
    fbnt_tensor_poison(&d, yr);
    fbnt_tensor_poison(&d, yf);
    fbn_status st = fbn_module_forward(p.ref, &d, x, addend, yr, keep ? sr : NULL, NULL, 0);
    if (st != FBN_STATUS_SUCCESS)
      fail_msg("%s: reference forward = %s: %s", sname, fbn_status_string(st),
               fbn_last_error_message());
    st = fbn_module_forward(p.fast, &d, x, addend, yf, keep ? sf : NULL, NULL, 0);
    if (st != FBN_STATUS_SUCCESS)
      fail_msg("%s: fast forward = %s: %s", sname, fbn_status_string(st),
               fbn_last_error_message());
    ok = same_tensor(sname, "y", &d, yf, yr, tol_rel(d.dtype), 0.0) && ok;
    ok = same_state(sname, &p) && ok;
    if (!keep)
      continue;

    /* Backward on the fast forward's y; step 3 skips dx, step 4 daddend. */
    void *wantdx = step == 2 ? NULL : dxr, *gotdx = step == 2 ? NULL : dxf;
    void *wantda = step == 3 || !spec.addend ? NULL : dar;
    void *gotda = step == 3 || !spec.addend ? NULL : daf;
    fbnt_tensor_poison(&d, dxr);
    fbnt_tensor_poison(&d, dxf);
    fbnt_tensor_poison(&d, dar);
    fbnt_tensor_poison(&d, daf);
    /* BN alone: backward does not read y (NULL) */
    const void *by = k->bn_alone ? NULL : yf;
    st = fbn_module_backward(p.ref, sr, &d, x, by, dy, wantdx, wantda, NULL, 0);
    if (st != FBN_STATUS_SUCCESS)
      fail_msg("%s: reference backward = %s: %s", sname, fbn_status_string(st),
               fbn_last_error_message());
    st = fbn_module_backward(p.fast, sf, &d, x, by, dy, gotdx, gotda, NULL, 0);
    if (st != FBN_STATUS_SUCCESS)
      fail_msg("%s: fast backward = %s: %s", sname, fbn_status_string(st),
               fbn_last_error_message());
    /* Untouched outputs stay poisoned in both: compared as NaN == NaN. */
    ok = same_tensor(sname, "dx", &d, dxf, dxr, tol_rel(d.dtype), dx_scale) && ok;
    ok = same_tensor(sname, "daddend", &d, daf, dar, 0.0, 0.0) && ok;
    ok = same_state(sname, &p) && ok;
  }

  fbn_saved_destroy(sr);
  fbn_saved_destroy(sf);
  void *bufs[] = {x, a, dy, yr, yf, dxr, dxf, dar, daf};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    fbnt_free(bufs[i]);
  pair_destroy(&p);
  if (!ok)
    fprintf(stderr, "FAILED: %s\n", name);
  return ok;
}

/* ---- matrix --------------------------------------------------------------- */

/* Odd sizes; H*W = 1; N*H*W = 2; C > 64 (several NCHW groups); C > 1024
 * (NHWC rows longer than a chunk); small C with many rows; H*W > 1024
 * (NCHW rows longer than a chunk); the last three have more than 64K
 * elements and run on all threads. */
static const int64_t shapes[][4] = {
    {2, 3, 5, 7},   {5, 3, 1, 1},    {1, 1, 2, 1},     {3, 70, 3, 3},    {2, 300, 3, 2},
    {2, 1100, 3, 3}, {4, 32, 24, 24}, {2, 300, 11, 13}, {3, 7, 61, 59},
};
#define NUM_SHAPES (sizeof shapes / sizeof shapes[0])

/* bn_alone: operation FBN_OPERATION_BN, the flags without the addend. */
static void run_matrix(const char *test, fbn_layout layout, fbn_dtype dtype, bool bn_alone) {
  fbnt_tally all;
  fbnt_tally_begin(&all, test);
  for (size_t s = 0; s < NUM_SHAPES; s++)
    for (int flags = 0; flags < 16; flags++) {
      /* The multi-threaded shapes take a subset of the flags (time):
       * none; track+addend; affine+track+addend (train and eval); affine
       * and addend alone in eval (batch statistics in eval). */
      const bool big = shapes[s][0] * shapes[s][1] * shapes[s][2] * shapes[s][3] > 65536;
      if (big && flags != 0 && flags != 6 && flags != 7 && flags != 15 && flags != 9 &&
          flags != 12)
        continue;
      /* BN alone has no addend (the flag is cleared below): the small shapes
       * skip the flags that would repeat a case; the subset of the big ones
       * stays distinct without it. */
      if (bn_alone && !big && (flags & 4) != 0)
        continue;
      const bool track = (flags & 2) != 0;
      const fcase k = {.spec = {.n = shapes[s][0],
                                .c = shapes[s][1],
                                .h = shapes[s][2],
                                .w = shapes[s][3],
                                .dtype = dtype,
                                .layout = layout,
                                .no_affine = (flags & 1) == 0,
                                .no_track = !track,
                                .cumulative = track && (s % 2 == 1),
                                .addend = (flags & 4) != 0 && !bn_alone,
                                .eval = (flags & 8) != 0},
                       .sp = SPECIAL_NONE,
                       .steps = 4,
                       .bn_alone = bn_alone};
      fbnt_tally_add(&all, run_case(&k, &all.rng));
    }
  fbnt_tally_end(&all, "cases");
}

static void test_cpu_fast_matches_reference_nchw_f32(void **state) {
  (void)state;
  run_matrix(__func__, FBN_LAYOUT_NCHW, FBN_DTYPE_FLOAT32, false);
}
static void test_cpu_fast_matches_reference_nhwc_f32(void **state) {
  (void)state;
  run_matrix(__func__, FBN_LAYOUT_NHWC, FBN_DTYPE_FLOAT32, false);
}
static void test_cpu_fast_matches_reference_nchw_f64(void **state) {
  (void)state;
  run_matrix(__func__, FBN_LAYOUT_NCHW, FBN_DTYPE_FLOAT64, false);
}
static void test_cpu_fast_matches_reference_nhwc_f64(void **state) {
  (void)state;
  run_matrix(__func__, FBN_LAYOUT_NHWC, FBN_DTYPE_FLOAT64, false);
}

/* NaN, infinities and degenerate channels: every special on a small shape
 * and on a multi-threaded one, both layouts, both dtypes, train and eval. */
static void test_cpu_fast_nan_and_degenerate_channels_match_reference(void **state) {
  (void)state;
  fbnt_tally all;
  fbnt_tally_begin(&all, __func__);
  static const int64_t sp_shapes[][4] = {{3, 5, 4, 3}, {2, 16, 45, 46}};
  for (int sp = 1; sp < SPECIAL_COUNT; sp++)
    for (size_t s = 0; s < 2; s++)
      for (int l = 0; l < 2; l++)
        for (int t = 0; t < (s == 0 ? 2 : 1); t++) /* float64 on the small shape only */
          for (int e = 0; e < 2; e++) {
            const fcase k = {.spec = {.n = sp_shapes[s][0],
                                      .c = sp_shapes[s][1],
                                      .h = sp_shapes[s][2],
                                      .w = sp_shapes[s][3],
                                      .dtype = t ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32,
                                      .layout = (fbn_layout)l,
                                      .addend = true,
                                      .eval = e != 0},
                             .sp = (special)sp,
                             .steps = 4};
            fbnt_tally_add(&all, run_case(&k, &all.rng));
          }
  fbnt_tally_end(&all, "cases");
}

/* Outputs of 8 MiB and more are written with non-temporal stores through an
 * on-stack chunk: long rows, short rows crossing chunk boundaries (NCHW) and
 * channel blocks longer than a chunk (NHWC), float32 and float64. */
static void test_cpu_fast_streamed_outputs_match_reference(void **state) {
  (void)state;
  fbnt_tally all;
  fbnt_tally_begin(&all, __func__);
  static const int64_t big[2][2][4] = {
      {{2, 24, 200, 230}, {16, 2800, 7, 7}}, /* float32: 8.8 MB */
      {{1, 24, 200, 230}, {8, 2800, 7, 7}},  /* float64: 8.8 MB */
  };
  for (int t = 0; t < 2; t++)
    for (int s = 0; s < 2; s++)
      for (int l = 0; l < 2; l++)
        for (int e = 0; e < 2; e++) {
          const fcase k = {.spec = {.n = big[t][s][0],
                                    .c = big[t][s][1],
                                    .h = big[t][s][2],
                                    .w = big[t][s][3],
                                    .dtype = t ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32,
                                    .layout = (fbn_layout)l,
                                    .addend = true,
                                    .eval = e != 0},
                           .sp = SPECIAL_NONE,
                           .steps = 3};
          fbnt_tally_add(&all, run_case(&k, &all.rng));
        }
  /* NaN through the streamed float32 loops (AVX2: rows of a multiple of 8,
   * and the flat one for NCHW's 7x7 rows): NaN in x (its channel) and in the
   * addend, both shapes and layouts */
  for (int l = 0; l < 4; l++)
    for (int sp = 0; sp < 2; sp++) {
      const fcase k = {.spec = {.n = big[0][l / 2][0],
                                .c = big[0][l / 2][1],
                                .h = big[0][l / 2][2],
                                .w = big[0][l / 2][3],
                                .dtype = FBN_DTYPE_FLOAT32,
                                .layout = (fbn_layout)(l % 2),
                                .addend = true},
                       .sp = sp ? SPECIAL_NAN_ADDEND : SPECIAL_NAN_X,
                       .steps = 2};
      fbnt_tally_add(&all, run_case(&k, &all.rng));
    }
  fbnt_tally_end(&all, "cases");
}

/* Float32 tensors of 8 MiB and more (AVX2 loops with streamed output).
 *
 * NCHW, long rows: the statistics (forward) or sums (backward) of a group of
 * channels are accumulated while the previous group is normalized (dx and
 * daddend written), in units of several groups. (4,35,46,348): forward
 * groups of 2 channels and a last group of 1, which ends a unit after a
 * group of 2, and rows of 16k + 8 elements (the forward loop's tail);
 * (4,69,40,200): backward groups of 2 and a last of 1 (forward: 4 and 1).
 *
 * NHWC: the statistics pass reads whole chunks four at a time, the
 * normalization two at a time. (3,48,139,113): 37 chunks of 1290 rows, the
 * last partial, 36 whole ones in 9 quads and one chunk alone; the pairs
 * (u, u + 19) end with a pair whose second chunk is partial and a chunk
 * alone. (2,35,180,180): C not a multiple of 8, so the paired loop does not
 * apply and each pair falls back to one chunk at a time.
 *
 * NCHW eval (long rows) and short rows (7x7, flat loop): the runs of n and
 * n + N/2 are normalized in one loop; odd N leaves the last n alone
 * ((5,600,28,28), (17,2700,7,7)).
 *
 * Specials put channels on the exact path inside a unit; eval without
 * running statistics takes batch statistics (pipelined too). */
static void test_cpu_fast_large_streamed_matches_reference(void **state) {
  (void)state;
  fbnt_tally all;
  fbnt_tally_begin(&all, __func__);
  /* float32; shape, layout and steps filled in below */
  static const fcase v[] = {
      {.spec = {.addend = true}},
      {.spec = {.no_affine = true, .cumulative = true}},
      {.spec = {.no_track = true, .addend = true, .eval = true}},
      {.spec = {.addend = true, .eval = true}},
      {.spec = {.addend = true}, .sp = SPECIAL_NAN_X},
      {.spec = {.addend = true}, .sp = SPECIAL_INF_WEIGHT},
      {.spec = {.addend = true}, .sp = SPECIAL_NAN_ADDEND},
      {.spec = {.addend = true}, .sp = SPECIAL_NAN_DY},
  };
  static const struct {
    int64_t n, c, h, w;
    fbn_layout layout;
    size_t variants; /* the first ones of v[] */
  } big[] = {
      {4, 35, 46, 348, FBN_LAYOUT_NCHW, 8},
      {4, 69, 40, 200, FBN_LAYOUT_NCHW, 8},
      {3, 48, 139, 113, FBN_LAYOUT_NHWC, 8},
      {2, 35, 180, 180, FBN_LAYOUT_NHWC, 4},
      {5, 600, 28, 28, FBN_LAYOUT_NCHW, 4},
      {17, 2700, 7, 7, FBN_LAYOUT_NCHW, 4},
  };
  for (size_t sh = 0; sh < sizeof big / sizeof big[0]; sh++)
    for (size_t i = 0; i < big[sh].variants; i++) {
      fcase k = v[i];
      k.spec.n = big[sh].n;
      k.spec.c = big[sh].c;
      k.spec.h = big[sh].h;
      k.spec.w = big[sh].w;
      k.spec.layout = big[sh].layout;
      k.steps = 2;
      fbnt_tally_add(&all, run_case(&k, &all.rng));
    }
  fbnt_tally_end(&all, "cases");
}

/* ---- BN alone ------------------------------------------------------------- */

static void test_cpu_fast_bn_alone_matches_reference_nchw_f32(void **state) {
  (void)state;
  run_matrix(__func__, FBN_LAYOUT_NCHW, FBN_DTYPE_FLOAT32, true);
}
static void test_cpu_fast_bn_alone_matches_reference_nhwc_f32(void **state) {
  (void)state;
  run_matrix(__func__, FBN_LAYOUT_NHWC, FBN_DTYPE_FLOAT32, true);
}
static void test_cpu_fast_bn_alone_matches_reference_nchw_f64(void **state) {
  (void)state;
  run_matrix(__func__, FBN_LAYOUT_NCHW, FBN_DTYPE_FLOAT64, true);
}
static void test_cpu_fast_bn_alone_matches_reference_nhwc_f64(void **state) {
  (void)state;
  run_matrix(__func__, FBN_LAYOUT_NHWC, FBN_DTYPE_FLOAT64, true);
}

/* BN alone on the streamed paths (float32 tensors of 8 MiB and more: the
 * pipelined NCHW forward and backward, the paired NHWC passes, the eval and
 * short-row loops of two runs at once, the flat loop of 7x7 rows), and with
 * the specials that put channels on the exact path, small and threaded. */
static void test_cpu_fast_bn_alone_streamed_and_special_match_reference(void **state) {
  (void)state;
  fbnt_tally all;
  fbnt_tally_begin(&all, __func__);
  static const struct {
    int64_t n, c, h, w;
    fbn_layout layout;
  } big[] = {
      {4, 35, 46, 348, FBN_LAYOUT_NCHW}, {3, 48, 139, 113, FBN_LAYOUT_NHWC},
      {2, 35, 180, 180, FBN_LAYOUT_NHWC}, {5, 600, 28, 28, FBN_LAYOUT_NCHW},
      {17, 2700, 7, 7, FBN_LAYOUT_NCHW},
  };
  for (size_t sh = 0; sh < sizeof big / sizeof big[0]; sh++)
    for (int e = 0; e < 2; e++) {
      const fcase k = {.spec = {.n = big[sh].n,
                                .c = big[sh].c,
                                .h = big[sh].h,
                                .w = big[sh].w,
                                .layout = big[sh].layout,
                                .eval = e != 0},
                       .steps = 2,
                       .bn_alone = true};
      fbnt_tally_add(&all, run_case(&k, &all.rng));
    }
  static const special sps[] = {SPECIAL_NAN_X,         SPECIAL_INF_X,       SPECIAL_NAN_DY,
                                SPECIAL_CONSTANT_EPS0, SPECIAL_NAN_RUNNING, SPECIAL_INF_WEIGHT,
                                SPECIAL_HUGE_OFFSET};
  static const int64_t sp_shapes[][4] = {{3, 5, 4, 3}, {2, 16, 45, 46}};
  for (size_t i = 0; i < sizeof sps / sizeof sps[0]; i++)
    for (size_t s = 0; s < 2; s++)
      for (int l = 0; l < 2; l++)
        for (int t = 0; t < (s == 0 ? 2 : 1); t++)
          for (int e = 0; e < 2; e++) {
            const fcase k = {.spec = {.n = sp_shapes[s][0],
                                      .c = sp_shapes[s][1],
                                      .h = sp_shapes[s][2],
                                      .w = sp_shapes[s][3],
                                      .dtype = t ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32,
                                      .layout = (fbn_layout)l,
                                      .eval = e != 0},
                             .sp = sps[i],
                             .steps = 4,
                             .bn_alone = true};
            fbnt_tally_add(&all, run_case(&k, &all.rng));
          }
  fbnt_tally_end(&all, "cases");
}

/* Elements of got and want (tensors of d) that differ in their bits (NaN
 * equal to NaN); the first few are printed. */
static size_t count_bit_differences(const char *name, const char *what, const fbn_tensor_desc *d,
                                    const void *got, const void *want) {
  const size_t count = fbnt_desc_numel(d), size = fbn_dtype_size(d->dtype);
  size_t bad = 0;
  for (size_t i = 0; i < count; i++) {
    const double g = fbnt_load(d->dtype, got, i), w = fbnt_load(d->dtype, want, i);
    if ((isnan(g) && isnan(w)) || memcmp((const char *)got + i * size,
                                         (const char *)want + i * size, size) == 0)
      continue;
    if (bad++ < 5)
      fprintf(stderr, "%s: %s[%zu] = %.17g, want %.17g (bit for bit)\n", name, what, i, g, w);
  }
  return bad;
}

/* Every buffer of two modules, bit for bit (NaN equal to NaN). */
static size_t count_buffer_differences(const char *name, const fbn_module *got,
                                       const fbn_module *want) {
  static const fbn_buffer which[] = {FBN_BUFFER_RUNNING_MEAN, FBN_BUFFER_RUNNING_VAR,
                                     FBN_BUFFER_WEIGHT_GRAD, FBN_BUFFER_BIAS_GRAD};
  const size_t c = (size_t)want->options.num_features;
  double *g = malloc(c * sizeof *g), *w = malloc(c * sizeof *w);
  size_t bad = 0;
  for (size_t b = 0; b < sizeof which / sizeof which[0]; b++) {
    if (!fbn_module_has_buffer(want, which[b]))
      continue;
    assert_int_equal(fbn_module_read_buffer(got, which[b], FBN_DTYPE_FLOAT64, g, c),
                     FBN_STATUS_SUCCESS);
    assert_int_equal(fbn_module_read_buffer(want, which[b], FBN_DTYPE_FLOAT64, w, c),
                     FBN_STATUS_SUCCESS);
    for (size_t i = 0; i < c; i++)
      if (!(isnan(g[i]) && isnan(w[i])) && memcmp(&g[i], &w[i], sizeof g[i]) != 0 &&
          bad++ < 5)
        fprintf(stderr, "%s: buffer %d [%zu] = %.17g, want %.17g (bit for bit)\n", name,
                (int)which[b], i, g[i], w[i]);
  }
  free(g);
  free(w);
  return bad;
}

/*
 * BN + ReLU == ReLU(BN) bit for bit on the fast backend: two fast modules
 * with the same state, one of FBN_OPERATION_BN_RELU, one of
 * FBN_OPERATION_BN, fed the same fresh random data. Forward: ReLU applied
 * to BN's y (!(v <= 0) ? v : +0) must be BN + ReLU's y, and the running
 * statistics equal; backward: BN alone from the gradient the ReLU lets
 * through (dy where !(y <= 0), else 0) must give BN + ReLU's dx and
 * weight/bias gradients; then eval. Shapes and dtypes cover every path:
 * short rows, channel groups, NHWC blocks, threads, and the streamed float32
 * loops (pipelined NCHW, paired NHWC and short-row runs, the flat loop).
 * NHWC on several threads (64Ki elements and more) sums each thread's
 * chunks into its own partial sums, and threads take chunks as they come:
 * two calls of one op may round the batch statistics differently there, so
 * its training steps are compared within 1e-6 (float32) / 1e-12 (float64)
 * of max |y|, |dx| and the buffers, and its eval step's y bit for bit
 * (both modules given the same running statistics).
 */
static void test_cpu_fast_bn_relu_is_relu_of_bn_bit_for_bit(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  static const struct {
    int64_t n, c, h, w;
    bool f64; /* float64 too */
  } shapes_[] = {
      {2, 3, 5, 7, true},       {3, 70, 3, 3, true},     {4, 32, 24, 24, true},
      {2, 1100, 3, 3, true},    {3, 7, 61, 59, true},    {2, 300, 11, 13, true},
      {4, 35, 46, 348, false},  {3, 48, 139, 113, false}, {5, 600, 28, 28, false},
      {17, 2700, 7, 7, false},
  };
  size_t failed = 0, cases = 0;
  for (size_t s = 0; s < sizeof shapes_ / sizeof shapes_[0]; s++)
    for (int t = 0; t < (shapes_[s].f64 ? 2 : 1); t++)
      for (int l = 0; l < 2; l++) {
        const fbn_tensor_desc d = {shapes_[s].n, shapes_[s].c, shapes_[s].h, shapes_[s].w,
                                   t ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32, (fbn_layout)l};
        char name[128];
        snprintf(name, sizeof name, "(%lld,%lld,%lld,%lld) %s %s", (long long)d.n,
                 (long long)d.c, (long long)d.h, (long long)d.w, fbnt_layout_str(d.layout),
                 fbnt_dtype_str(d.dtype));
        fbn_module_options o = fbnt_options(&(fbnt_spec){.c = d.c, .momentum = 0.25});
        if (t)
          o.param_dtype = FBN_DTYPE_FLOAT64;
        o.operation = FBN_OPERATION_BN_RELU;
        fbn_module *relu = create_with(&o, NULL);
        o.operation = FBN_OPERATION_BN;
        fbn_module *bn = create_with(&o, NULL);
        fbn_module *const mods[2] = {relu, bn};
        modules_init_alike(mods, 2, &o, &rng);
        void *x = fbnt_tensor_alloc(&d), *dy = fbnt_tensor_alloc(&d), *g = fbnt_tensor_alloc(&d);
        void *yr = fbnt_tensor_alloc(&d), *yb = fbnt_tensor_alloc(&d);
        void *dxr = fbnt_tensor_alloc(&d), *dxb = fbnt_tensor_alloc(&d);
        fbn_saved *sr = NULL, *sb = NULL;
        assert_int_equal(fbn_saved_create(&sr), FBN_STATUS_SUCCESS);
        assert_int_equal(fbn_saved_create(&sb), FBN_STATUS_SUCCESS);
        const size_t numel = fbnt_desc_numel(&d);
        const bool exact = d.layout == FBN_LAYOUT_NCHW || numel < 65536;
        const double rtol = t ? 1e-12 : 1e-6;
        size_t bad = 0;
        for (int step = 0; step < 3; step++) {
          const bool eval = step == 2;
          if (eval) {
            assert_int_equal(fbn_module_set_training(relu, false), FBN_STATUS_SUCCESS);
            assert_int_equal(fbn_module_set_training(bn, false), FBN_STATUS_SUCCESS);
            /* the same running statistics (within rtol only, where !exact) */
            double *v = malloc((size_t)d.c * sizeof *v);
            const fbn_buffer rs[] = {FBN_BUFFER_RUNNING_MEAN, FBN_BUFFER_RUNNING_VAR};
            for (int b = 0; b < 2; b++) {
              assert_int_equal(fbn_module_read_buffer(relu, rs[b], FBN_DTYPE_FLOAT64, v,
                                                      (size_t)d.c),
                               FBN_STATUS_SUCCESS);
              assert_int_equal(fbn_module_write_buffer(bn, rs[b], FBN_DTYPE_FLOAT64, v,
                                                       (size_t)d.c),
                               FBN_STATUS_SUCCESS);
            }
            free(v);
          }
          fill_random(&rng, &d, x, 3.0);
          fill_random(&rng, &d, dy, 0.5);
          fbnt_tensor_poison(&d, yr);
          fbnt_tensor_poison(&d, yb);
          assert_int_equal(fbn_module_forward(relu, &d, x, NULL, yr, eval ? NULL : sr, NULL, 0),
                           FBN_STATUS_SUCCESS);
          assert_int_equal(fbn_module_forward(bn, &d, x, NULL, yb, eval ? NULL : sb, NULL, 0),
                           FBN_STATUS_SUCCESS);
          /* ReLU(BN) in place; g = the gradient the ReLU of yr lets through */
          for (size_t i = 0; i < numel; i++) {
            const double v = fbnt_load(d.dtype, yb, i), r = fbnt_load(d.dtype, yr, i);
            fbnt_store(d.dtype, yb, i, v <= 0.0 ? 0.0 : v);
            fbnt_store(d.dtype, g, i, r <= 0.0 ? 0.0 : fbnt_load(d.dtype, dy, i));
          }
          if (exact || eval)
            bad += count_bit_differences(name, "ReLU(BN(x)) vs BN + ReLU y", &d, yb, yr);
          else
            bad += !same_tensor(name, "ReLU(BN(x)) vs BN + ReLU y", &d, yb, yr, rtol, 0.0);
          /* (the gradients accumulated by the training steps, within rtol
           * where !exact) */
          if (exact)
            bad += count_buffer_differences(name, bn, relu);
          else
            bad += !fbnt_check_modules_agree(name, bn, relu, rtol);
          if (eval)
            continue;
          fbnt_tensor_poison(&d, dxr);
          fbnt_tensor_poison(&d, dxb);
          assert_int_equal(fbn_module_backward(relu, sr, &d, x, yr, dy, dxr, NULL, NULL, 0),
                           FBN_STATUS_SUCCESS);
          assert_int_equal(fbn_module_backward(bn, sb, &d, x, NULL, g, dxb, NULL, NULL, 0),
                           FBN_STATUS_SUCCESS);
          if (exact) {
            bad += count_bit_differences(name, "BN backward of the ReLU's gradient vs BN + ReLU dx",
                                         &d, dxb, dxr);
            bad += count_buffer_differences(name, bn, relu);
          } else {
            bad += !same_tensor(name, "BN backward of the ReLU's gradient vs BN + ReLU dx", &d, dxb,
                                dxr, rtol, 0.0);
            bad += !fbnt_check_modules_agree(name, bn, relu, rtol);
          }
        }
        cases++;
        if (bad != 0) {
          failed++;
          fprintf(stderr, "FAILED: %s: %zu values differ\n", name, bad);
        }
        fbn_saved_destroy(sr);
        fbn_saved_destroy(sb);
        void *bufs[] = {x, dy, g, yr, yb, dxr, dxb};
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
          fbnt_free(bufs[i]);
        fbn_module_destroy(relu);
        fbn_module_destroy(bn);
      }
  if (failed != 0)
    fail_msg("%zu of %zu cases differ", failed, cases);
}

/* The streamed float32 loop at other alignments: y (and x, addend, dy, dx,
 * daddend) 16 bytes past a 256-byte boundary, as glibc's malloc returns
 * large blocks (two 16-byte non-temporal stores per 8 elements), and 4
 * bytes past it (the staged loop). y and, through the saved mask, daddend
 * against the reference backend. */
static void test_cpu_fast_streamed_outputs_at_offsets(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  const fbn_module_options o = fbnt_options(&(fbnt_spec){.c = 24});
  int failed = 0;
  for (int l = 0; l < 2; l++)
    for (int off = 4; off <= 16; off += 12) {
      pair p;
      pair_create(&p, &o, &rng);
      const fbn_tensor_desc d = {2, 24, 200, 230, FBN_DTYPE_FLOAT32, (fbn_layout)l};
      const size_t bytes = fbnt_desc_numel(&d) * sizeof(float);
      char *mem[6];
      void *t[6]; /* x, addend, dy, y, dx, daddend */
      for (int i = 0; i < 6; i++) {
        mem[i] = fbnt_alloc(bytes + 32);
        t[i] = mem[i] + off;
      }
      fill_random(&rng, &d, t[0], 3.0);
      fill_random(&rng, &d, t[1], 0.5);
      fill_random(&rng, &d, t[2], 0.5);
      fbnt_set(&d, t[1], 1, 3, 7, 9, NAN);
      void *yr = fbnt_tensor_alloc(&d), *dar = fbnt_tensor_alloc(&d), *dxr = fbnt_tensor_alloc(&d);
      fbn_saved *sr = NULL, *sf = NULL;
      assert_int_equal(fbn_saved_create(&sr), FBN_STATUS_SUCCESS);
      assert_int_equal(fbn_saved_create(&sf), FBN_STATUS_SUCCESS);
      fbnt_tensor_poison(&d, t[3]);
      assert_int_equal(fbn_module_forward(p.ref, &d, t[0], t[1], yr, sr, NULL, 0),
                       FBN_STATUS_SUCCESS);
      assert_int_equal(fbn_module_forward(p.fast, &d, t[0], t[1], t[3], sf, NULL, 0),
                       FBN_STATUS_SUCCESS);
      char name[64];
      snprintf(name, sizeof name, "%s offset %d", l ? "NHWC" : "NCHW", off);
      bool ok = same_tensor(name, "y", &d, t[3], yr, tol_rel(d.dtype), 0.0);
      fbnt_tensor_poison(&d, t[4]);
      fbnt_tensor_poison(&d, t[5]);
      assert_int_equal(fbn_module_backward(p.ref, sr, &d, t[0], t[3], t[2], dxr, dar, NULL, 0),
                       FBN_STATUS_SUCCESS);
      assert_int_equal(fbn_module_backward(p.fast, sf, &d, t[0], t[3], t[2], t[4], t[5], NULL, 0),
                       FBN_STATUS_SUCCESS);
      ok = same_tensor(name, "daddend", &d, t[5], dar, 0.0, 0.0) && ok;
      ok = same_tensor(name, "dx", &d, t[4], dxr, tol_rel(d.dtype), 0.0) && ok;
      if (!ok)
        failed++;
      fbn_saved_destroy(sr);
      fbn_saved_destroy(sf);
      fbnt_free(yr);
      fbnt_free(dar);
      fbnt_free(dxr);
      for (int i = 0; i < 6; i++)
        fbnt_free(mem[i]);
      pair_destroy(&p);
    }
  if (failed != 0)
    fail_msg("%d of 4 cases failed", failed);
}

/* One value per channel is valid in eval with running statistics. */
static void test_cpu_fast_eval_single_value_matches_reference(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  for (int l = 0; l < 2; l++)
    for (int t = 0; t < 2; t++) {
      const fcase k = {.spec = {.n = 1,
                                .c = 4,
                                .h = 1,
                                .w = 1,
                                .dtype = t ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32,
                                .layout = (fbn_layout)l,
                                .addend = true,
                                .eval = true},
                       .sp = SPECIAL_NONE,
                       .steps = 4};
      assert_true(run_case(&k, &rng));
    }
}

/* FBN_CPU_BACKEND picks the backend; an unknown value is rejected. */
static void test_cpu_fast_backend_selection(void **state) {
  (void)state;
  fbn_module_options o = fbnt_options(&(fbnt_spec){.c = 4});
  fbn_module *m = create_with(&o, NULL);
  assert_string_equal(m->backend->name, "cpu-fast");
  fbn_module_destroy(m);
  m = create_with(&o, "fast");
  assert_string_equal(m->backend->name, "cpu-fast");
  fbn_module_destroy(m);
  m = create_with(&o, "reference");
  assert_string_equal(m->backend->name, "cpu-reference");
  fbn_module_destroy(m);

  assert_int_equal(setenv("FBN_CPU_BACKEND", "refrence", 1), 0);
  m = (fbn_module *)&o; /* must be reset to NULL */
  assert_int_equal(fbn_module_create(&o, &m), FBN_STATUS_INVALID_VALUE);
  assert_null(m);
  assert_non_null(strstr(fbn_last_error_message(), "FBN_CPU_BACKEND"));
  assert_non_null(strstr(fbn_last_error_message(), "refrence"));
  assert_int_equal(unsetenv("FBN_CPU_BACKEND"), 0);
}

int main(int argc, char **argv) {
  fbnt_parse_args(argc, argv);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_cpu_fast_backend_selection),
      cmocka_unit_test(test_cpu_fast_matches_reference_nchw_f32),
      cmocka_unit_test(test_cpu_fast_matches_reference_nhwc_f32),
      cmocka_unit_test(test_cpu_fast_matches_reference_nchw_f64),
      cmocka_unit_test(test_cpu_fast_matches_reference_nhwc_f64),
      cmocka_unit_test(test_cpu_fast_nan_and_degenerate_channels_match_reference),
      cmocka_unit_test(test_cpu_fast_eval_single_value_matches_reference),
      cmocka_unit_test(test_cpu_fast_streamed_outputs_match_reference),
      cmocka_unit_test(test_cpu_fast_streamed_outputs_at_offsets),
      cmocka_unit_test(test_cpu_fast_large_streamed_matches_reference),
      cmocka_unit_test(test_cpu_fast_bn_alone_matches_reference_nchw_f32),
      cmocka_unit_test(test_cpu_fast_bn_alone_matches_reference_nhwc_f32),
      cmocka_unit_test(test_cpu_fast_bn_alone_matches_reference_nchw_f64),
      cmocka_unit_test(test_cpu_fast_bn_alone_matches_reference_nhwc_f64),
      cmocka_unit_test(test_cpu_fast_bn_alone_streamed_and_special_match_reference),
      cmocka_unit_test(test_cpu_fast_bn_relu_is_relu_of_bn_bit_for_bit),
  };
  return cmocka_run_group_tests_name("cpu_fast", tests, NULL, NULL);
}
