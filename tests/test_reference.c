/*
 * Self-tests of the test helpers (tests/util): the RNG, half conversions,
 * layout offsets, the comparison and the float64 reference itself (hand
 * computed values, statistical properties and finite differences), so
 * that the other suites compare against something known to be right.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "fbn_testutil.h"

static void test_rng_reproducible(void **state) {
  (void)state;
  fbnt_rng a, b, c;
  fbnt_rng_init(&a, 42, 7);
  fbnt_rng_init(&b, 42, 7);
  fbnt_rng_init(&c, 42, 8);
  int same_c = 0;
  for (int i = 0; i < 1000; i++) {
    uint32_t va = fbnt_rng_u32(&a);
    assert_int_equal(va, fbnt_rng_u32(&b));
    same_c += va == fbnt_rng_u32(&c);
  }
  assert_true(same_c < 5);
}

static void test_rng_normal_moments(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  const int count = 200000;
  double sum = 0.0, sq = 0.0;
  for (int i = 0; i < count; i++) {
    double v = fbnt_rng_normal(&rng);
    sum += v;
    sq += v * v;
  }
  double mean = sum / count;
  double var = sq / count - mean * mean;
  assert_true(fabs(mean) < 0.01);
  assert_true(fabs(var - 1.0) < 0.02);
  for (int i = 0; i < 1000; i++) {
    double u = fbnt_rng_unit(&rng);
    assert_true(u >= 0.0 && u < 1.0);
    double s = fbnt_rng_signed(&rng, 0.5, 1.5);
    assert_true(fabs(s) >= 0.5 && fabs(s) <= 1.5);
  }
}

static void test_half_conversions(void **state) {
  (void)state;
  assert_int_equal(fbnt_float_to_half(1.0f), 0x3c00);
  assert_int_equal(fbnt_float_to_half(-2.0f), 0xc000);
  assert_int_equal(fbnt_float_to_half(65504.0f), 0x7bff);
  assert_int_equal(fbnt_float_to_half(65520.0f), 0x7c00); /* rounds to inf */
  assert_int_equal(fbnt_float_to_half(ldexpf(1.0f, -24)), 0x0001);
  assert_int_equal(fbnt_float_to_half(ldexpf(1.0f, -14)), 0x0400);
  assert_int_equal(fbnt_float_to_half(ldexpf(1.0f, -26)), 0x0000);
  assert_int_equal(fbnt_float_to_half(1.0f + ldexpf(1.0f, -11)), 0x3c00); /* tie to even */
  assert_int_equal(fbnt_float_to_half(1.0f + 3 * ldexpf(1.0f, -11)), 0x3c02);
  assert_int_equal(fbnt_float_to_half(INFINITY), 0x7c00);
  assert_true(isnan(fbnt_half_to_float(fbnt_float_to_half(NAN))));
  assert_true(fbnt_half_to_float(0x3555) == 0x1.554p-2f);
  assert_true(fbnt_half_to_float(0x0001) == ldexpf(1.0f, -24));
  assert_true(fbnt_half_to_float(0xfc00) == -INFINITY);
  for (uint32_t h = 0; h < 0x7c00; h++) { /* every finite positive half round-trips */
    assert_int_equal(fbnt_float_to_half(fbnt_half_to_float((uint16_t)h)), h);
  }
  assert_int_equal(fbnt_float_to_bfloat16(1.0f), 0x3f80);
  assert_int_equal(fbnt_float_to_bfloat16(1.0f + ldexpf(1.0f, -8)), 0x3f80); /* tie to even */
  assert_int_equal(fbnt_float_to_bfloat16(1.0f + 3 * ldexpf(1.0f, -8)), 0x3f82);
  assert_true(fbnt_bfloat16_to_float(0xc040) == -3.0f);
  assert_true(isnan(fbnt_bfloat16_to_float(fbnt_float_to_bfloat16(NAN))));
}

static void test_tensor_layout_offsets(void **state) {
  (void)state;
  fbn_tensor_desc d = {2, 3, 4, 5, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW};
  assert_int_equal(fbnt_desc_offset(&d, 1, 0, 2, 1), 71);
  d.layout = FBN_LAYOUT_NHWC;
  assert_int_equal(fbnt_desc_offset(&d, 1, 0, 2, 1), 93);
  assert_int_equal(fbnt_desc_offset(&d, 0, 2, 0, 0), 2);
  assert_int_equal(fbnt_desc_numel(&d), 120);
  /* to_ref(from_ref(v)) is the identity for every layout/dtype */
  fbn_dtype dtypes[] = {FBN_DTYPE_FLOAT32, FBN_DTYPE_FLOAT64, FBN_DTYPE_FLOAT16,
                        FBN_DTYPE_BFLOAT16};
  for (int l = 0; l < 2; l++) {
    for (int t = 0; t < 4; t++) {
      d.layout = (fbn_layout)l;
      d.dtype = dtypes[t];
      double ref[120], back[120];
      for (int i = 0; i < 120; i++) {
        ref[i] = i - 60; /* exact in every dtype */
      }
      void *data = fbnt_tensor_alloc(&d);
      fbnt_tensor_from_ref(&d, ref, data);
      assert_true(fbnt_get(&d, data, 1, 2, 3, 4) == 59.0);
      fbnt_tensor_to_ref(&d, data, back);
      assert_memory_equal(ref, back, sizeof ref);
      fbnt_tensor_poison(&d, data);
      fbnt_tensor_to_ref(&d, data, back);
      for (int i = 0; i < 120; i++) {
        assert_true(isnan(back[i]));
      }
      fbnt_free(data);
    }
  }
}

static void test_check_close_detects_mismatches(void **state) {
  (void)state;
  double want[4] = {1.0, -2.0, NAN, 0.0};
  double got[4] = {1.0, -2.0, NAN, 0.0};
  assert_true(fbnt_check_close("same", got, want, 4, 1e-6, 1e-6, NULL));
  got[1] = -2.001;
  assert_false(fbnt_check_close("off", got, want, 4, 1e-6, 1e-6, NULL));
  assert_true(fbnt_check_close("loose", got, want, 4, 1e-3, 0.0, NULL));
  got[1] = -2.0;
  got[2] = 5.0; /* NaN expected */
  assert_false(fbnt_check_close("nan missing", got, want, 4, 1e-6, 1e-6, NULL));
  got[2] = NAN;
  got[3] = NAN; /* NaN not expected */
  assert_false(fbnt_check_close("nan extra", got, want, 4, 1e6, 1e6, NULL));
  got[3] = 0.0;
  got[0] = INFINITY;
  assert_false(fbnt_check_close("inf", got, want, 4, 1e6, 1e6, NULL));
  /* every element is checked, not only the first */
  double w2[1000], g2[1000];
  for (int i = 0; i < 1000; i++) {
    w2[i] = g2[i] = i;
  }
  g2[999] = 0.0;
  assert_false(fbnt_check_close("last", g2, w2, 1000, 1e-6, 1e-6, NULL));
}

/* C = 1, x = {1, 2, 3, 4} as N = 4: mean 2.5, biased var 1.25, unbiased 5/3. */
static void test_reference_forward_hand_computed(void **state) {
  (void)state;
  fbnt_ref_module ref;
  fbnt_ref_module_init(&ref, 1);
  ref.weight[0] = 2.0;
  ref.bias[0] = 0.5;
  double x[4] = {1.0, 2.0, 3.0, 4.0};
  double addend[4] = {0.0, 1.0, -1.0, 0.25};
  double y[4];
  fbnt_ref_saved saved;
  fbnt_ref_saved_init(&saved);
  assert_true(fbnt_ref_forward(&ref, 4, 1, 1, x, addend, y, &saved));
  double invstd = 1.0 / sqrt(1.25 + 1e-5);
  for (int i = 0; i < 4; i++) {
    double pre = (x[i] - 2.5) * invstd * 2.0 + 0.5 + addend[i];
    double want = pre > 0 ? pre : 0.0;
    assert_true(fabs(y[i] - want) < 1e-14);
  }
  assert_true(y[0] == 0.0); /* (1-2.5)*1.79*2+0.5 < 0 */
  assert_int_equal(ref.num_batches_tracked, 1);
  assert_true(fabs(ref.running_mean[0] - 0.25) < 1e-15);
  assert_true(fabs(ref.running_var[0] - (0.9 + 0.1 * 5.0 / 3.0)) < 1e-15);
  assert_true(saved.batch_stats);
  assert_true(fabs(saved.mean[0] - 2.5) < 1e-15 && fabs(saved.var[0] - 1.25) < 1e-15);

  /* cumulative average: factor 1/nbt */
  ref.cumulative_average = true;
  ref.num_batches_tracked = 3;
  ref.running_mean[0] = 1.0;
  ref.running_var[0] = 2.0;
  assert_true(fbnt_ref_forward(&ref, 4, 1, 1, x, NULL, y, NULL));
  assert_int_equal(ref.num_batches_tracked, 4);
  assert_true(fabs(ref.running_mean[0] - (0.75 * 1.0 + 0.25 * 2.5)) < 1e-15);
  assert_true(fabs(ref.running_var[0] - (0.75 * 2.0 + 0.25 * 5.0 / 3.0)) < 1e-15);

  /* eval: running statistics, nothing changes */
  ref.training = false;
  ref.running_mean[0] = 1.0;
  ref.running_var[0] = 4.0 - 1e-5;
  assert_true(fbnt_ref_forward(&ref, 4, 1, 1, x, NULL, y, &saved));
  assert_int_equal(ref.num_batches_tracked, 4);
  assert_false(saved.batch_stats);
  for (int i = 0; i < 4; i++) {
    double pre = (x[i] - 1.0) / 2.0 * 2.0 + 0.5;
    assert_true(fabs(y[i] - (pre > 0 ? pre : 0.0)) < 1e-12);
  }
  /* one value per channel: refused in training, fine in eval */
  assert_true(fbnt_ref_forward(&ref, 1, 1, 1, x, NULL, y, NULL));
  ref.training = true;
  assert_false(fbnt_ref_forward(&ref, 1, 1, 1, x, NULL, y, NULL));
  ref.training = false;
  ref.track_running_stats = false;
  assert_false(fbnt_ref_forward(&ref, 1, 1, 1, x, NULL, y, NULL));

  /* NaN: ReLU keeps it, and it spreads through the batch statistics */
  ref.training = true;
  ref.track_running_stats = true;
  x[2] = NAN;
  assert_true(fbnt_ref_forward(&ref, 4, 1, 1, x, NULL, y, NULL));
  for (int i = 0; i < 4; i++) {
    assert_true(isnan(y[i]));
  }
  assert_true(isnan(ref.running_mean[0]));
  fbnt_ref_saved_free(&saved);
  fbnt_ref_module_free(&ref);
}

/* Before ReLU, each channel of BN(x)*w+b has mean b and variance
 * w^2 var/(var+eps) over the batch. */
static void test_reference_forward_properties(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  fbn_tensor_desc d = {6, 3, 5, 7, FBN_DTYPE_FLOAT64, FBN_LAYOUT_NCHW};
  size_t count = fbnt_desc_numel(&d);
  double *x = calloc(count, sizeof *x);
  double *pre = calloc(count, sizeof *pre);
  void *data = fbnt_tensor_alloc(&d);
  fbnt_fill_channels(&rng, &d, data, x);
  fbnt_ref_module ref;
  fbnt_ref_module_init(&ref, 3);
  fbnt_fill_vector(&rng, ref.weight, 3, 0.5, 1.5, true, false);
  fbnt_fill_vector(&rng, ref.bias, 3, -0.5, 0.5, false, false);
  fbnt_ref_preactivation(&ref, d.n, d.h, d.w, x, NULL, pre);
  double m = (double)(d.n * d.h * d.w);
  for (int64_t c = 0; c < 3; c++) {
    double sum = 0.0, sq = 0.0, xs = 0.0, xq = 0.0;
    for (int64_t n = 0; n < d.n; n++)
      for (int64_t h = 0; h < d.h; h++)
        for (int64_t w = 0; w < d.w; w++) {
          size_t i = fbnt_ref_index(&d, n, c, h, w);
          sum += pre[i];
          sq += pre[i] * pre[i];
          xs += x[i];
          xq += x[i] * x[i];
        }
    double mean = sum / m, var = sq / m - mean * mean;
    double xvar = xq / m - (xs / m) * (xs / m);
    assert_true(fabs(mean - ref.bias[c]) < 1e-12);
    double want_var = ref.weight[c] * ref.weight[c] * xvar / (xvar + 1e-5);
    assert_true(fabs(var - want_var) < 1e-10);
  }
  assert_int_equal(ref.num_batches_tracked, 0); /* preactivation changes nothing */
  assert_true(ref.running_mean[0] == 0.0 && ref.running_var[0] == 1.0);
  fbnt_ref_module_free(&ref);
  fbnt_free(data);
  free(x);
  free(pre);
}

/* loss = sum(y * r) of the reference alone; gradients vs central differences. */
static double ref_loss(fbnt_ref_module *ref, const fbn_tensor_desc *d, const double *x,
                       const double *addend, const double *r) {
  size_t count = fbnt_desc_numel(d);
  double *y = calloc(count, sizeof *y);
  fbnt_ref_module copy = *ref; /* forward may update running stats: work on a copy */
  int64_t nbt = ref->num_batches_tracked;
  double *rm = malloc((size_t)ref->c * sizeof *rm), *rv = malloc((size_t)ref->c * sizeof *rv);
  memcpy(rm, ref->running_mean, (size_t)ref->c * sizeof *rm);
  memcpy(rv, ref->running_var, (size_t)ref->c * sizeof *rv);
  assert_true(fbnt_ref_forward(&copy, d->n, d->h, d->w, x, addend, y, NULL));
  memcpy(ref->running_mean, rm, (size_t)ref->c * sizeof *rm);
  memcpy(ref->running_var, rv, (size_t)ref->c * sizeof *rv);
  ref->num_batches_tracked = nbt;
  double loss = 0.0;
  for (size_t i = 0; i < count; i++) {
    loss += y[i] * r[i];
  }
  free(y);
  free(rm);
  free(rv);
  return loss;
}

static void test_reference_backward_matches_finite_differences(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  fbn_tensor_desc d = {3, 2, 2, 3, FBN_DTYPE_FLOAT64, FBN_LAYOUT_NCHW};
  size_t count = fbnt_desc_numel(&d);
  void *data = fbnt_tensor_alloc(&d);
  double *x = calloc(count, sizeof *x), *a = calloc(count, sizeof *a);
  double *r = calloc(count, sizeof *r), *y = calloc(count, sizeof *y);
  double *pre = calloc(count, sizeof *pre);
  double *dx = calloc(count, sizeof *dx), *da = calloc(count, sizeof *da);
  fbnt_fill_channels(&rng, &d, data, x);
  fbnt_fill_normal(&rng, &d, data, a, 1.0);
  fbnt_fill_normal(&rng, &d, data, r, 1.0);
  for (int training = 0; training < 2; training++) {
    fbnt_ref_module ref;
    fbnt_ref_module_init(&ref, d.c);
    ref.training = training;
    fbnt_fill_vector(&rng, ref.weight, d.c, 0.5, 1.5, true, false);
    fbnt_fill_vector(&rng, ref.bias, d.c, -0.5, 0.5, false, false);
    fbnt_fill_vector(&rng, ref.running_mean, d.c, -1, 1, false, false);
    fbnt_fill_vector(&rng, ref.running_var, d.c, 0.5, 2, false, false);
    /* keep pre-activations away from the ReLU kink */
    fbnt_ref_preactivation(&ref, d.n, d.h, d.w, x, a, pre);
    for (size_t i = 0; i < count; i++) {
      if (fabs(pre[i]) < 0.1) {
        a[i] += pre[i] >= 0 ? 0.2 : -0.2;
      }
    }
    fbnt_ref_saved saved;
    fbnt_ref_saved_init(&saved);
    fbnt_ref_module work = ref;
    double rm[2], rv[2];
    memcpy(rm, ref.running_mean, sizeof rm);
    memcpy(rv, ref.running_var, sizeof rv);
    assert_true(fbnt_ref_forward(&work, d.n, d.h, d.w, x, a, y, &saved));
    memcpy(ref.running_mean, rm, sizeof rm);
    memcpy(ref.running_var, rv, sizeof rv);
    ref.num_batches_tracked = 0;
    fbnt_ref_backward(&ref, &saved, x, y, r, dx, da);
    const double h = 1e-6;
    for (size_t i = 0; i < count; i++) {
      double keep = x[i];
      x[i] = keep + h;
      double lp = ref_loss(&ref, &d, x, a, r);
      x[i] = keep - h;
      double lm = ref_loss(&ref, &d, x, a, r);
      x[i] = keep;
      assert_true(fabs((lp - lm) / (2 * h) - dx[i]) < 1e-6 * (1 + fabs(dx[i])));
      keep = a[i];
      a[i] = keep + h;
      lp = ref_loss(&ref, &d, x, a, r);
      a[i] = keep - h;
      lm = ref_loss(&ref, &d, x, a, r);
      a[i] = keep;
      assert_true(fabs((lp - lm) / (2 * h) - da[i]) < 1e-6 * (1 + fabs(da[i])));
    }
    for (int64_t c = 0; c < d.c; c++) {
      double *params[2] = {ref.weight, ref.bias};
      double grads[2] = {ref.weight_grad[c], ref.bias_grad[c]};
      for (int p = 0; p < 2; p++) {
        double keep = params[p][c];
        params[p][c] = keep + h;
        double lp = ref_loss(&ref, &d, x, a, r);
        params[p][c] = keep - h;
        double lm = ref_loss(&ref, &d, x, a, r);
        params[p][c] = keep;
        assert_true(fabs((lp - lm) / (2 * h) - grads[p]) < 1e-6 * (1 + fabs(grads[p])));
      }
    }
    fbnt_ref_saved_free(&saved);
    fbnt_ref_module_free(&ref);
  }
  fbnt_free(data);
  free(x);
  free(a);
  free(r);
  free(y);
  free(pre);
  free(dx);
  free(da);
}

int main(int argc, char **argv) {
  fbnt_parse_args(argc, argv);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_rng_reproducible),
      cmocka_unit_test(test_rng_normal_moments),
      cmocka_unit_test(test_half_conversions),
      cmocka_unit_test(test_tensor_layout_offsets),
      cmocka_unit_test(test_check_close_detects_mismatches),
      cmocka_unit_test(test_reference_forward_hand_computed),
      cmocka_unit_test(test_reference_forward_properties),
      cmocka_unit_test(test_reference_backward_matches_finite_differences),
  };
  return cmocka_run_group_tests_name("reference", tests, NULL, NULL);
}
