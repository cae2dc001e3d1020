/*
 * float16 / bfloat16 tensors on the CPU reference backend.
 *
 * Bit for bit: the reference backend's half outputs equal the same backend
 * run on float64 tensors holding the same values (the half inputs widened,
 * float64 parameters holding the float32 ones), each result then rounded
 * once with the core rule (src/core/half.h; float32 statistics and gradients: rounded once
 * to float). Both runs do the same float64 arithmetic, so any double
 * rounding, flush to zero, float32 intermediate or wrong NaN/Inf handling of
 * the half path shows. The float64 backward gets the half forward's y (the
 * ReLU gate is on the stored, rounded y). Every operation, training with the
 * running statistics updated and eval, both layouts, both half dtypes, on
 * fresh random data, outputs poisoned before each call.
 *
 * Rounded once: outputs crafted to lie just above, just below and on the
 * midpoints of the format's grid, against the neighbours they must round to.
 *
 * Edges, through the same comparison and with their own assertions: a
 * channel holding a NaN (its y, dx all NaN), a channel holding +Inf, a
 * channel whose normalized output exceeds the format's range (y = +-Inf;
 * backward: the gate passes dy where y = +Inf, dx stays finite), a channel
 * whose outputs fall in the format's subnormal range (not flushed), and a
 * channel whose tiny positive pre-activations round to +0 (their gradient
 * gated off).
 *
 * Through the module API, on the reference and on the default backend: the
 * test matrix of the other dtypes (tests/util/case.c) on half tensors,
 * against the float64 reference of tests/util within the half tolerances.
 *
 * Bad input: half tensors with float64 parameters, a half x on a float32 op.
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

enum { EDGE_NONE, EDGE_NAN, EDGE_INF, EDGE_OVERFLOW, EDGE_SUBNORMAL, EDGE_ROUNDS_TO_ZERO };

typedef struct hcase {
  fbn_dtype dtype;
  fbn_layout layout;
  fbn_operation operation;
  bool batch;  /* batch statistics with the running ones updated, else eval */
  int64_t n, c, h, w;
  int edge;    /* channel 0 is the edge channel when edge != EDGE_NONE */
} hcase;

/* The test helpers' conversions are src/core/half.h's (tests/util/half.c):
 * rounded once from double, widened exactly. */
static uint16_t round_half(fbn_dtype dt, double v) {
  uint16_t h;
  fbnt_store(dt, &h, 0, v);
  return h;
}

static double widen_half(fbn_dtype dt, uint16_t h) { return fbnt_load(dt, &h, 0); }

static uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

static const char *op_str(fbn_operation op) { return fbn_operation_name(op); }

static void case_name(const hcase *hc, char *buf, size_t size) {
  static const char *edges[] = {"", " nan", " inf", " overflow", " subnormal", " rounds-to-0"};
  snprintf(buf, size, "%s %s %s %s (%lld,%lld,%lld,%lld)%s", fbnt_dtype_str(hc->dtype),
           fbnt_layout_str(hc->layout), op_str(hc->operation), hc->batch ? "train" : "eval",
           (long long)hc->n, (long long)hc->c, (long long)hc->h, (long long)hc->w,
           edges[hc->edge]);
}

/* Half tensor elements against the float64 run's, rounded once. */
static int compare_half(const char *name, const char *what, fbn_dtype dt, const uint16_t *got,
                        const double *want, size_t count) {
  int bad = 0;
  for (size_t i = 0; i < count; i++) {
    uint16_t w = round_half(dt, want[i]);
    if (got[i] != w) {
      if (bad < 5)
        print_error("%s: %s[%zu] = 0x%04x (%a), want 0x%04x (%a, from %a)\n", name, what, i,
                    got[i], widen_half(dt, got[i]), w, widen_half(dt, w), want[i]);
      bad++;
    }
  }
  return bad;
}

static int compare_float(const char *name, const char *what, const float *got, const double *want,
                         size_t count) {
  int bad = 0;
  for (size_t i = 0; i < count; i++) {
    float w = (float)want[i];
    if (float_bits(got[i]) != float_bits(w)) {
      if (bad < 5)
        print_error("%s: %s[%zu] = %a, want %a (from %a)\n", name, what, i, (double)got[i],
                    (double)w, want[i]);
      bad++;
    }
  }
  return bad;
}

static fbn_op *make_op(const hcase *hc, fbn_dtype dtype, fbn_dtype param_dtype) {
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = hc->c;
  od.dtype = dtype;
  od.param_dtype = param_dtype;
  od.layout = hc->layout;
  od.operation = hc->operation;
  od.statistics = hc->batch ? FBN_STATISTICS_BATCH : FBN_STATISTICS_RUNNING;
  fbn_op *op = NULL;
  fbn_status st = fbn_op_create(&od, &op);
  if (st != FBN_STATUS_SUCCESS)
    fail_msg("fbn_op_create(%s) = %s: %s", fbnt_dtype_str(dtype), fbn_status_string(st),
             fbn_last_error_message());
  return op;
}

static void *alloc_saved(const fbn_op *op, const fbn_tensor_desc *d, size_t *bytes) {
  assert_int_equal(fbn_op_saved_size(op, d, bytes), FBN_STATUS_SUCCESS);
  return fbnt_alloc(*bytes);
}

/* Random data of the case: x per channel offset + scale * normal, addend
 * and dy normal, all rounded to the half dtype; float32 parameters. The
 * edge channel (0) gets its values. */
typedef struct hdata {
  size_t count;
  int64_t c;
  uint16_t *x, *a, *dy;
  double *xd, *ad, *dyd;
  float weight[8], bias[8], rm[8], rv[8], dw[8], db[8];
} hdata;

static void hdata_fill(hdata *h, const hcase *hc, fbnt_rng *rng) {
  const fbn_dtype dt = hc->dtype;
  const bool f16 = dt == FBN_DTYPE_FLOAT16;
  const int64_t hw = hc->h * hc->w;
  h->count = (size_t)(hc->n * hc->c * hw);
  h->c = hc->c;
  h->x = fbnt_alloc(h->count * 2);
  h->a = fbnt_alloc(h->count * 2);
  h->dy = fbnt_alloc(h->count * 2);
  h->xd = fbnt_alloc(h->count * sizeof(double));
  h->ad = fbnt_alloc(h->count * sizeof(double));
  h->dyd = fbnt_alloc(h->count * sizeof(double));
  for (int64_t c = 0; c < hc->c; c++) {
    h->weight[c] = (float)fbnt_rng_signed(rng, 0.5, 1.5);
    h->bias[c] = (float)fbnt_rng_uniform(rng, -0.5, 0.5);
    h->rm[c] = (float)fbnt_rng_uniform(rng, -1.0, 1.0);
    h->rv[c] = (float)fbnt_rng_uniform(rng, 0.5, 2.0);
    h->dw[c] = (float)fbnt_rng_uniform(rng, -1.0, 1.0);
    h->db[c] = (float)fbnt_rng_uniform(rng, -1.0, 1.0);
  }
  double offset[8], scale[8];
  for (int64_t c = 0; c < hc->c; c++) {
    offset[c] = fbnt_rng_uniform(rng, -3.0, 3.0);
    scale[c] = fbnt_rng_uniform(rng, 0.5, 3.0);
  }
  /* eval: running statistics of channel 0 that fit its data, so that its
   * normalized values take both signs */
  h->rm[0] = (float)offset[0];
  h->rv[0] = (float)(scale[0] * scale[0]);
  double addend_scale = 1.0, dy_scale = 1.0;
  switch (hc->edge) {
  case EDGE_OVERFLOW: /* |xhat * weight| beyond the format's largest value */
    h->weight[0] = f16 ? 4.0e4f : 2.0e38f;
    h->bias[0] = 0.0f;
    dy_scale = 1e-3; /* dx = weight * invstd * (...) stays in range */
    break;
  case EDGE_SUBNORMAL: /* |y| in the subnormal range (f16 < 2^-14, bf16 < 2^-126) */
    h->weight[0] = f16 ? 2.0e-6f : 2.0e-39f;
    h->bias[0] = 0.0f;
    if (hc->operation == FBN_OPERATION_BN_ADD_RELU)
      addend_scale = 0.0; /* keep the addend's channel 0 from swamping it */
    break;
  case EDGE_ROUNDS_TO_ZERO: /* positive pre-activations below half the smallest subnormal */
    h->weight[0] = f16 ? 1.0e-9f : 1.0e-42f;
    h->bias[0] = 0.0f;
    if (hc->operation == FBN_OPERATION_BN_ADD_RELU)
      addend_scale = 0.0;
    break;
  default:
    break;
  }
  for (int64_t n = 0; n < hc->n; n++)
    for (int64_t c = 0; c < hc->c; c++)
      for (int64_t s = 0; s < hw; s++) {
        size_t i = (size_t)(hc->layout == FBN_LAYOUT_NCHW ? (n * hc->c + c) * hw + s
                                                          : (n * hw + s) * hc->c + c);
        double xv = offset[c] + scale[c] * fbnt_rng_normal(rng);
        double av = fbnt_rng_normal(rng) * (c == 0 ? addend_scale : 1.0);
        double gv = fbnt_rng_normal(rng) * (c == 0 ? dy_scale : 1.0);
        h->x[i] = round_half(dt, xv);
        h->a[i] = round_half(dt, av);
        h->dy[i] = round_half(dt, gv);
      }
  if (hc->edge == EDGE_NAN || hc->edge == EDGE_INF) {
    /* one element of channel 0: (n, s) = (0, 1 % hw) */
    size_t i = (size_t)(hc->layout == FBN_LAYOUT_NCHW ? (1 % hw) : (1 % hw) * hc->c);
    h->x[i] = hc->edge == EDGE_NAN ? round_half(dt, NAN) : round_half(dt, INFINITY);
  }
  for (size_t i = 0; i < h->count; i++) {
    h->xd[i] = widen_half(dt, h->x[i]);
    h->ad[i] = widen_half(dt, h->a[i]);
    h->dyd[i] = widen_half(dt, h->dy[i]);
  }
}

static void hdata_free(hdata *h) {
  fbnt_free(h->x);
  fbnt_free(h->a);
  fbnt_free(h->dy);
  fbnt_free(h->xd);
  fbnt_free(h->ad);
  fbnt_free(h->dyd);
}

/* Channel-0 element indices of the case's layout, in order. */
static size_t chan0_index(const hcase *hc, int64_t k) {
  const int64_t hw = hc->h * hc->w;
  const int64_t n = k / hw, s = k % hw;
  return (size_t)(hc->layout == FBN_LAYOUT_NCHW ? n * hc->c * hw + s : (n * hw + s) * hc->c);
}

/* The edge channel's own assertions on the half results. */
static int check_edge(const hcase *hc, const char *name, const uint16_t *y, const uint16_t *dx,
                      const uint16_t *da) {
  const fbn_dtype dt = hc->dtype;
  const int64_t per = hc->n * hc->h * hc->w;
  const bool relu = hc->operation != FBN_OPERATION_BN;
  int bad = 0, inf = 0, sub = 0, zero_gated = 0;
  for (int64_t k = 0; k < per; k++) {
    const size_t i = chan0_index(hc, k);
    const double yv = widen_half(dt, y[i]), dxv = widen_half(dt, dx[i]);
    switch (hc->edge) {
    case EDGE_NAN:
      if (hc->batch && (!isnan(yv) || !isnan(dxv)))
        bad++; /* a NaN in the batch makes the channel's statistics NaN */
      break;
    case EDGE_INF:
      if (hc->batch && !isnan(yv))
        bad++; /* mean = Inf, x - mean = NaN or Inf - Inf */
      break;
    case EDGE_OVERFLOW:
      if (isinf(yv))
        inf++;
      if (!isfinite(dxv))
        bad++; /* the gate passes dy where y = +Inf; dx stays finite */
      break;
    case EDGE_SUBNORMAL:
      if (yv != 0.0 && fabs(yv) < (dt == FBN_DTYPE_FLOAT16 ? 0x1p-14 : 0x1p-126))
        sub++;
      break;
    case EDGE_ROUNDS_TO_ZERO:
      if (yv != 0.0)
        bad++;
      if (hc->operation == FBN_OPERATION_BN_ADD_RELU && da[i] != 0)
        bad++; /* daddend = dy * !(y <= 0) with the rounded y = +0 */
      if (y[i] == 0 && relu)
        zero_gated++;
      break;
    default:
      break;
    }
  }
  if (hc->edge == EDGE_OVERFLOW && inf == 0)
    bad++;
  if (hc->edge == EDGE_SUBNORMAL && sub == 0)
    bad++;
  if (hc->edge == EDGE_ROUNDS_TO_ZERO && relu && zero_gated == 0)
    bad++;
  if (bad)
    print_error("%s: %d edge-channel checks failed (inf %d, subnormal %d)\n", name, bad, inf, sub);
  return bad;
}

/* One case: forward (+ backward) of the half op and of the float64 op on
 * the same values; every output compared bit for bit. */
static bool run_case(const hcase *hc, fbnt_rng *rng) {
  char name[160];
  case_name(hc, name, sizeof name);
  const fbn_dtype dt = hc->dtype;
  const bool add = hc->operation == FBN_OPERATION_BN_ADD_RELU;
  const fbn_tensor_desc dh = fbn_tensor_desc_make(hc->n, hc->c, hc->h, hc->w, dt, hc->layout);
  const fbn_tensor_desc dd =
      fbn_tensor_desc_make(hc->n, hc->c, hc->h, hc->w, FBN_DTYPE_FLOAT64, hc->layout);
  hdata h;
  hdata_fill(&h, hc, rng);
  const size_t count = h.count, c = (size_t)hc->c;

  fbn_op *oph = make_op(hc, dt, FBN_DTYPE_FLOAT32);
  fbn_op *opd = make_op(hc, FBN_DTYPE_FLOAT64, FBN_DTYPE_FLOAT64);
  size_t sh_bytes, sd_bytes;
  void *sh = alloc_saved(oph, &dh, &sh_bytes);
  void *sd = alloc_saved(opd, &dd, &sd_bytes);

  /* float64 copies of the parameters */
  double wd[8], bd[8], rmd[8], rvd[8], dwd[8], dbd[8];
  for (size_t k = 0; k < c; k++) {
    wd[k] = h.weight[k];
    bd[k] = h.bias[k];
    rmd[k] = h.rm[k];
    rvd[k] = h.rv[k];
    dwd[k] = h.dw[k];
    dbd[k] = h.db[k];
  }
  float rm[8], rv[8], dw[8], db[8];
  memcpy(rm, h.rm, sizeof rm);
  memcpy(rv, h.rv, sizeof rv);
  memcpy(dw, h.dw, sizeof dw);
  memcpy(db, h.db, sizeof db);

  uint16_t *y = fbnt_alloc(count * 2), *dx = fbnt_alloc(count * 2), *da = fbnt_alloc(count * 2);
  double *yd = fbnt_alloc(count * sizeof(double)), *dxd = fbnt_alloc(count * sizeof(double));
  double *dad = fbnt_alloc(count * sizeof(double)), *yhd = fbnt_alloc(count * sizeof(double));
  fbnt_tensor_poison(&dh, y);
  fbnt_tensor_poison(&dh, dx);
  fbnt_tensor_poison(&dh, da);
  fbnt_tensor_poison(&dd, yd);
  fbnt_tensor_poison(&dd, dxd);
  fbnt_tensor_poison(&dd, dad);

  int bad = 0;
  fbn_status st = fbn_op_forward(oph, &dh, h.x, add ? h.a : NULL, y, h.weight, h.bias, rm, rv,
                                 0.1, sh, sh_bytes, NULL, 0);
  if (st != FBN_STATUS_SUCCESS)
    fail_msg("%s: forward = %s: %s", name, fbn_status_string(st), fbn_last_error_message());
  st = fbn_op_forward(opd, &dd, h.xd, add ? h.ad : NULL, yd, wd, bd, rmd, rvd, 0.1, sd, sd_bytes,
                      NULL, 0);
  assert_int_equal(st, FBN_STATUS_SUCCESS);
  bad += compare_half(name, "y", dt, y, yd, count);
  bad += compare_float(name, "running_mean", rm, rmd, c);
  bad += compare_float(name, "running_var", rv, rvd, c);

  /* backward: the float64 run gates on the half y */
  for (size_t i = 0; i < count; i++)
    yhd[i] = widen_half(dt, y[i]);
  st = fbn_op_backward(oph, &dh, h.x, y, h.dy, sh, sh_bytes, h.weight, h.bias, dx,
                       add ? da : NULL, dw, db, FBN_PARAM_GRAD_ACCUMULATE, NULL, 0);
  if (st != FBN_STATUS_SUCCESS)
    fail_msg("%s: backward = %s: %s", name, fbn_status_string(st), fbn_last_error_message());
  st = fbn_op_backward(opd, &dd, h.xd, yhd, h.dyd, sd, sd_bytes, wd, bd, dxd, add ? dad : NULL,
                       dwd, dbd, FBN_PARAM_GRAD_ACCUMULATE, NULL, 0);
  assert_int_equal(st, FBN_STATUS_SUCCESS);
  bad += compare_half(name, "dx", dt, dx, dxd, count);
  if (add)
    bad += compare_half(name, "daddend", dt, da, dad, count);
  else
    for (size_t i = 0; i < count; i++)
      bad += !isnan(widen_half(dt, da[i])); /* not asked for: still poisoned */
  bad += compare_float(name, "dweight", dw, dwd, c);
  bad += compare_float(name, "dbias", db, dbd, c);
  if (hc->edge != EDGE_NONE)
    bad += check_edge(hc, name, y, dx, da);

  fbnt_free(y);
  fbnt_free(dx);
  fbnt_free(da);
  fbnt_free(yd);
  fbnt_free(dxd);
  fbnt_free(dad);
  fbnt_free(yhd);
  fbnt_free(sh);
  fbnt_free(sd);
  fbn_op_destroy(oph);
  fbn_op_destroy(opd);
  hdata_free(&h);
  if (bad)
    print_error("%s: %d mismatches\n", name, bad);
  return bad == 0;
}

static const fbn_operation operations[3] = {FBN_OPERATION_BN, FBN_OPERATION_BN_RELU,
                                            FBN_OPERATION_BN_ADD_RELU};

static void run_matrix(const char *test, fbn_dtype dt, int edge) {
  assert_int_equal(setenv("FBN_CPU_BACKEND", "reference", 1), 0);
  static const int64_t shapes[][4] = {{4, 3, 5, 7}, {2, 5, 1, 1}, {3, 4, 8, 9}, {1, 2, 33, 3}};
  fbnt_tally t;
  fbnt_tally_begin(&t, test);
  for (int layout = 0; layout < 2; layout++)
    for (int o = 0; o < 3; o++)
      for (int batch = 0; batch < 2; batch++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
          if (edge != EDGE_NONE && s == 1)
            continue; /* one value per channel of each n: too few for the edge checks */
          const hcase hc = {dt, (fbn_layout)layout, operations[o], batch == 1,
                            shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3], edge};
          fbnt_tally_add(&t, run_case(&hc, &t.rng));
        }
  assert_int_equal(unsetenv("FBN_CPU_BACKEND"), 0);
  fbnt_tally_end(&t, "cases");
}

static void test_half_ref_float16_bitwise(void **state) {
  (void)state;
  run_matrix("test_half_ref_float16_bitwise", FBN_DTYPE_FLOAT16, EDGE_NONE);
}

static void test_half_ref_bfloat16_bitwise(void **state) {
  (void)state;
  run_matrix("test_half_ref_bfloat16_bitwise", FBN_DTYPE_BFLOAT16, EDGE_NONE);
}

static void edges(const char *test, fbn_dtype dt) {
  for (int e = EDGE_NAN; e <= EDGE_ROUNDS_TO_ZERO; e++)
    run_matrix(test, dt, e);
}

static void test_half_ref_float16_edges(void **state) {
  (void)state;
  edges("test_half_ref_float16_edges", FBN_DTYPE_FLOAT16);
}

static void test_half_ref_bfloat16_edges(void **state) {
  (void)state;
  edges("test_half_ref_bfloat16_edges", FBN_DTYPE_BFLOAT16);
}

/* The module API on the reference backend, then on the default (fast)
 * one, against the float64 reference of tests/util within the half
 * tolerances. */
static void module_matrix(const char *test, fbn_dtype dt) {
  char name[96];
  for (int pass = 0; pass < 2; pass++) {
    if (pass == 0)
      assert_int_equal(setenv("FBN_CPU_BACKEND", "reference", 1), 0);
    else
      assert_int_equal(unsetenv("FBN_CPU_BACKEND"), 0);
    for (int layout = 0; layout < 2; layout++) {
      snprintf(name, sizeof name, "%s_%s_%s", test, pass == 0 ? "reference" : "default",
               layout == 0 ? "nchw" : "nhwc");
      fbnt_case_matrix(name, (fbn_layout)layout, dt, true);
    }
  }
}

static void test_half_ref_module_float16(void **state) {
  (void)state;
  module_matrix("test_half_ref_module_float16", FBN_DTYPE_FLOAT16);
}

static void test_half_ref_module_bfloat16(void **state) {
  (void)state;
  module_matrix("test_half_ref_module_bfloat16", FBN_DTYPE_BFLOAT16);
}

/* y rounded once, from double: eval BN with mean 0, variance 1, eps 0 and
 * weight 1 gives y = x + bias exactly in double; x on the format's grid in
 * [1, 2) (spacing u) and a float32 bias of u/2 + 2^-30 put every y just
 * above a midpoint (want: the upper neighbour; through float, 2^-30 would
 * be lost and the tie go to even), u/2 - 2^-30 just below (the lower one),
 * u/2 on it (the even one). */
static void rounds_once(fbn_dtype dt, const char *test) {
  assert_int_equal(setenv("FBN_CPU_BACKEND", "reference", 1), 0);
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, test);
  const int mant = dt == FBN_DTYPE_FLOAT16 ? 10 : 7;
  const double u = ldexp(1.0, -mant);
  const int64_t n = 4, c = 3, hw = 64;
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = c;
  od.dtype = dt;
  od.operation = FBN_OPERATION_BN;
  od.statistics = FBN_STATISTICS_RUNNING;
  od.eps = 0.0;
  fbn_op *op = NULL;
  assert_int_equal(fbn_op_create(&od, &op), FBN_STATUS_SUCCESS);
  const fbn_tensor_desc d = fbn_tensor_desc_make(n, c, hw, 1, dt, FBN_LAYOUT_NCHW);
  const size_t count = (size_t)(n * c * hw);
  uint16_t *x = fbnt_alloc(count * 2), *y = fbnt_alloc(count * 2);
  uint32_t *k = fbnt_alloc(count * sizeof(uint32_t));
  for (size_t i = 0; i < count; i++) {
    k[i] = fbnt_rng_u32(&rng) % (1u << mant);
    x[i] = round_half(dt, 1.0 + k[i] * u);
    assert_true(widen_half(dt, x[i]) == 1.0 + k[i] * u);
  }
  fbnt_tensor_poison(&d, y);
  const float weight[3] = {1.0f, 1.0f, 1.0f}, mean[3] = {0.0f, 0.0f, 0.0f};
  const float var[3] = {1.0f, 1.0f, 1.0f};
  const float bias[3] = {(float)(u / 2 + 0x1p-30), (float)(u / 2 - 0x1p-30), (float)(u / 2)};
  assert_true((double)bias[0] == u / 2 + 0x1p-30 && (double)bias[1] == u / 2 - 0x1p-30);
  assert_int_equal(fbn_op_forward(op, &d, x, NULL, y, weight, bias, (void *)mean, (void *)var, 0.0,
                                  NULL, 0, NULL, 0),
                   FBN_STATUS_SUCCESS);
  int bad = 0;
  for (int64_t nn = 0; nn < n; nn++)
    for (int64_t cc = 0; cc < c; cc++)
      for (int64_t s = 0; s < hw; s++) {
        const size_t i = (size_t)((nn * c + cc) * hw + s);
        /* the upper neighbour of x is the next pattern (x > 0) */
        uint16_t want = cc == 0 ? (uint16_t)(x[i] + 1u)
                        : cc == 1 ? x[i]
                                  : (uint16_t)((x[i] & 1u) ? x[i] + 1u : x[i]);
        if (y[i] != want) {
          if (bad < 5)
            print_error("%s: c=%lld: x = 0x%04x + bias %a -> 0x%04x, want 0x%04x\n", test,
                        (long long)cc, x[i], (double)bias[cc], y[i], want);
          bad++;
        }
      }
  fbnt_free(x);
  fbnt_free(y);
  fbnt_free(k);
  fbn_op_destroy(op);
  assert_int_equal(unsetenv("FBN_CPU_BACKEND"), 0);
  assert_int_equal(bad, 0);
}

static void test_half_ref_float16_rounds_once(void **state) {
  (void)state;
  rounds_once(FBN_DTYPE_FLOAT16, "test_half_ref_float16_rounds_once");
}

static void test_half_ref_bfloat16_rounds_once(void **state) {
  (void)state;
  rounds_once(FBN_DTYPE_BFLOAT16, "test_half_ref_bfloat16_rounds_once");
}

/* Half tensors need float32 parameters; an op's x must have its dtype. */
static void test_half_ref_rejects_bad_input(void **state) {
  (void)state;
  const fbn_dtype halves[2] = {FBN_DTYPE_FLOAT16, FBN_DTYPE_BFLOAT16};
  for (int i = 0; i < 2; i++) {
    fbn_op_desc od;
    fbn_op_desc_init(&od);
    od.num_features = 3;
    od.dtype = halves[i];
    od.param_dtype = FBN_DTYPE_FLOAT64;
    fbn_op *op = (fbn_op *)&od;
    assert_int_equal(fbn_op_create(&od, &op), FBN_STATUS_UNSUPPORTED);
    assert_null(op);
    char want[96];
    snprintf(want, sizeof want, "dtype = %s with param_dtype = float64",
             halves[i] == FBN_DTYPE_FLOAT16 ? "float16" : "bfloat16");
    const char *msg = fbn_last_error_message();
    if (strstr(msg, "fbn_op_create") == NULL || strstr(msg, want) == NULL)
      fail_msg("message \"%s\" does not say \"%s\"", msg, want);
    /* a half x on a float32 op: SHAPE_MISMATCH, nothing written */
    od.dtype = FBN_DTYPE_FLOAT32;
    od.param_dtype = FBN_DTYPE_FLOAT32;
    od.operation = FBN_OPERATION_BN;
    assert_int_equal(fbn_op_create(&od, &op), FBN_STATUS_SUCCESS);
    fbn_tensor_desc d = fbn_tensor_desc_make(2, 3, 2, 2, halves[i], FBN_LAYOUT_NCHW);
    uint16_t x[24], y[24];
    for (int k = 0; k < 24; k++) {
      x[k] = round_half(halves[i], k * 0.25 - 2.0);
      y[k] = 0x7e00u;
    }
    float w[3] = {1, 1, 1}, b[3] = {0, 0, 0};
    assert_int_equal(fbn_op_forward(op, &d, x, NULL, y, w, b, NULL, NULL, 0.1, NULL, 0, NULL, 0),
                     FBN_STATUS_SHAPE_MISMATCH);
    assert_non_null(strstr(fbn_last_error_message(), "dtype"));
    for (int k = 0; k < 24; k++)
      assert_int_equal(y[k], 0x7e00u);
    fbn_op_destroy(op);
  }
}

/* fbn_module_read_buffer / write_buffer with float16/bfloat16 host copies:
 * written values widen exactly into float32 and float64 parameters and read
 * back bit for bit; a float32 parameter read as half is rounded once
 * (to nearest even, not through another format). */
static void test_half_ref_module_half_host_copies(void **state) {
  (void)state;
  const fbn_dtype halves[2] = {FBN_DTYPE_FLOAT16, FBN_DTYPE_BFLOAT16};
  const fbn_dtype params[2] = {FBN_DTYPE_FLOAT32, FBN_DTYPE_FLOAT64};
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, "test_half_ref_module_half_host_copies");
  enum { NC = 64 };
  for (int p = 0; p < 2; p++) {
    fbn_module_options opt;
    fbn_module_options_init(&opt);
    opt.num_features = NC;
    opt.param_dtype = params[p];
    fbn_module *m = NULL;
    assert_int_equal(fbn_module_create(&opt, &m), FBN_STATUS_SUCCESS);
    for (int i = 0; i < 2; i++) {
      const fbn_dtype dt = halves[i];
      uint16_t src[NC], back[NC];
      for (int k = 0; k < NC; k++) {
        src[k] = (uint16_t)fbnt_rng_u32(&rng);
        if ((src[k] & 0x7fffu) >= (dt == FBN_DTYPE_FLOAT16 ? 0x7c00u : 0x7f80u))
          src[k] &= 0xbfffu; /* finite values (NaNs come back quiet) */
      }
      src[0] = 0x0001; /* the smallest subnormal */
      src[1] = 0x8000; /* -0 */
      assert_int_equal(fbn_module_write_buffer(m, FBN_BUFFER_WEIGHT, dt, src, NC),
                       FBN_STATUS_SUCCESS);
      double wide[NC];
      assert_int_equal(fbn_module_read_buffer(m, FBN_BUFFER_WEIGHT, FBN_DTYPE_FLOAT64, wide, NC),
                       FBN_STATUS_SUCCESS);
      memset(back, 0xff, sizeof back);
      assert_int_equal(fbn_module_read_buffer(m, FBN_BUFFER_WEIGHT, dt, back, NC),
                       FBN_STATUS_SUCCESS);
      for (int k = 0; k < NC; k++) {
        if (memcmp(&wide[k], &(double){widen_half(dt, src[k])}, sizeof(double)) != 0)
          fail_msg("%s: 0x%04x widened to %a", fbnt_dtype_str(dt), src[k], wide[k]);
        assert_int_equal(back[k], src[k]);
      }
    }
    /* rounded once when read as half: float32 just above a float16
     * midpoint (1 + 2^-11 + 2^-20: up), on one (1 + 2^-11: to even, down),
     * and a bfloat16 one (1 + 2^-8 + 2^-20: up) */
    float v[NC];
    for (int k = 0; k < NC; k++)
      v[k] = 1.0f;
    v[0] = 1.0f + 0x1p-11f + 0x1p-20f;
    v[1] = 1.0f + 0x1p-11f;
    v[2] = 1.0f + 0x1p-8f + 0x1p-20f;
    v[3] = 70000.0f; /* beyond float16: +Inf */
    assert_int_equal(fbn_module_write_buffer(m, FBN_BUFFER_BIAS, FBN_DTYPE_FLOAT32, v, NC),
                     FBN_STATUS_SUCCESS);
    uint16_t h[NC], b[NC];
    assert_int_equal(fbn_module_read_buffer(m, FBN_BUFFER_BIAS, FBN_DTYPE_FLOAT16, h, NC),
                     FBN_STATUS_SUCCESS);
    assert_int_equal(fbn_module_read_buffer(m, FBN_BUFFER_BIAS, FBN_DTYPE_BFLOAT16, b, NC),
                     FBN_STATUS_SUCCESS);
    assert_int_equal(h[0], 0x3c01);
    assert_int_equal(h[1], 0x3c00);
    assert_int_equal(h[3], 0x7c00);
    assert_int_equal(b[2], 0x3f81);
    assert_int_equal(h[4], 0x3c00);
    assert_int_equal(b[4], 0x3f80);
    fbn_module_destroy(m);
  }
}

int main(int argc, char **argv) {
  fbnt_parse_args(argc, argv);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_half_ref_float16_bitwise),
      cmocka_unit_test(test_half_ref_bfloat16_bitwise),
      cmocka_unit_test(test_half_ref_float16_rounds_once),
      cmocka_unit_test(test_half_ref_bfloat16_rounds_once),
      cmocka_unit_test(test_half_ref_float16_edges),
      cmocka_unit_test(test_half_ref_bfloat16_edges),
      cmocka_unit_test(test_half_ref_module_float16),
      cmocka_unit_test(test_half_ref_module_bfloat16),
      cmocka_unit_test(test_half_ref_module_half_host_copies),
      cmocka_unit_test(test_half_ref_rejects_bad_input),
  };
  return cmocka_run_group_tests_name("half_ref", tests, NULL, NULL);
}
