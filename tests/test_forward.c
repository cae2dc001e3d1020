/*
 * Forward against the float64 reference: shapes x layouts x dtypes x
 * addend x affine x track x mode, several training steps (momentum and
 * cumulative average), momentum 0 and 1, NaN propagation, one value per
 * channel in eval, saved/workspace variants.
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

static void test_forward_matches_reference_nchw_f32(void **state) {
  (void)state;
  fbnt_case_matrix(__func__, FBN_LAYOUT_NCHW, FBN_DTYPE_FLOAT32, false);
}
static void test_forward_matches_reference_nhwc_f32(void **state) {
  (void)state;
  fbnt_case_matrix(__func__, FBN_LAYOUT_NHWC, FBN_DTYPE_FLOAT32, false);
}
static void test_forward_matches_reference_nchw_f64(void **state) {
  (void)state;
  fbnt_case_matrix(__func__, FBN_LAYOUT_NCHW, FBN_DTYPE_FLOAT64, false);
}
static void test_forward_matches_reference_nhwc_f64(void **state) {
  (void)state;
  fbnt_case_matrix(__func__, FBN_LAYOUT_NHWC, FBN_DTYPE_FLOAT64, false);
}

/* ---- several training steps --------------------------------------------- */

typedef struct steps_setup {
  fbn_dtype dtype;
  fbn_layout layout;
  bool cumulative;
  double momentum; /* 0: PyTorch's 0.1 */
  int64_t start_nbt;
  bool addend;
} steps_setup;

/* One forward of module and reference on fresh data, checks y and state. */
static void step(fbnt_rng *rng, fbnt_fixture *f, fbn_tensor_desc d, bool addend,
                 const char *name) {
  fbnt_tensors t;
  fbnt_tensors_init(&t, rng, d, addend);
  fbnt_fill_normal(rng, &d, t.a, t.ar, 0.5);
  assert_true(fbnt_fixture_forward(f, &t, NULL, name));
  fbnt_tensors_free(&t);
}

static void run_steps(const char *test, const steps_setup *su) {
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, test);
  const int64_t c = 3;
  fbnt_fixture f;
  assert_int_equal(fbnt_fixture_create(&f, &rng,
                                       &(fbnt_spec){.c = c,
                                                    .dtype = su->dtype,
                                                    .momentum = su->momentum,
                                                    .cumulative = su->cumulative}),
                   FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_set_num_batches_tracked(f.m, su->start_nbt), FBN_STATUS_SUCCESS);
  f.ref.num_batches_tracked = su->start_nbt;
  char name[128];
  for (int s = 0; s < 5; s++) {
    /* a different batch size each step */
    snprintf(name, sizeof name, "%s step %d", test, s + 1);
    step(&rng, &f, (fbn_tensor_desc){2 + s, c, 5, 3, su->dtype, su->layout}, su->addend, name);
    int64_t nbt = -1;
    assert_int_equal(fbn_module_get_num_batches_tracked(f.m, &nbt), FBN_STATUS_SUCCESS);
    assert_int_equal(nbt, su->start_nbt + s + 1);
  }
  /* eval: normalize with the running statistics, change nothing */
  assert_int_equal(fbnt_fixture_set_training(&f, false), FBN_STATUS_SUCCESS);
  for (int s = 0; s < 2; s++) {
    snprintf(name, sizeof name, "%s eval %d", test, s + 1);
    step(&rng, &f, (fbn_tensor_desc){3, c, 4, 4, su->dtype, su->layout}, su->addend, name);
  }
  /* and training resumes counting */
  assert_int_equal(fbnt_fixture_set_training(&f, true), FBN_STATUS_SUCCESS);
  snprintf(name, sizeof name, "%s step 6", test);
  step(&rng, &f, (fbn_tensor_desc){4, c, 2, 3, su->dtype, su->layout}, su->addend, name);
  fbnt_fixture_destroy(&f);
}

static void test_forward_training_steps_momentum(void **state) {
  (void)state;
  run_steps("momentum f32 NCHW",
            &(steps_setup){.dtype = FBN_DTYPE_FLOAT32, .layout = FBN_LAYOUT_NCHW, .addend = true});
  run_steps("momentum f64 NHWC",
            &(steps_setup){.dtype = FBN_DTYPE_FLOAT64, .layout = FBN_LAYOUT_NHWC});
  run_steps("momentum 0.3 f32 NHWC", &(steps_setup){.dtype = FBN_DTYPE_FLOAT32,
                                                    .layout = FBN_LAYOUT_NHWC,
                                                    .momentum = 0.3,
                                                    .start_nbt = 11});
}

static void test_forward_training_steps_cumulative_average(void **state) {
  (void)state;
  run_steps("cumulative f32 NHWC", &(steps_setup){.dtype = FBN_DTYPE_FLOAT32,
                                                  .layout = FBN_LAYOUT_NHWC,
                                                  .cumulative = true,
                                                  .addend = true});
  run_steps("cumulative f64 NCHW", &(steps_setup){.dtype = FBN_DTYPE_FLOAT64,
                                                  .layout = FBN_LAYOUT_NCHW,
                                                  .cumulative = true});
  /* starting from num_batches_tracked = 4: factors 1/5, 1/6, ... */
  run_steps("cumulative from 4 f64 NHWC", &(steps_setup){.dtype = FBN_DTYPE_FLOAT64,
                                                         .layout = FBN_LAYOUT_NHWC,
                                                         .cumulative = true,
                                                         .start_nbt = 4,
                                                         .addend = true});
}

/* Direct checks of the edge factors, without going through the reference. */
static void run_momentum_edge(const char *test, double momentum, bool cumulative) {
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, test);
  fbnt_fixture f;
  assert_int_equal(fbnt_fixture_create(&f, &rng,
                                       &(fbnt_spec){.n = 3,
                                                    .c = 2,
                                                    .h = 3,
                                                    .w = 4,
                                                    .dtype = FBN_DTYPE_FLOAT64,
                                                    .momentum = momentum,
                                                    .zero_momentum = momentum == 0.0,
                                                    .cumulative = cumulative}),
                   FBN_STATUS_SUCCESS);
  fbn_module *m = f.m;
  assert_true(f.ref.momentum == momentum && f.ref.cumulative_average == cumulative);
  if (cumulative) {
    assert_int_equal(fbn_module_set_num_batches_tracked(m, 0), FBN_STATUS_SUCCESS);
  }
  const double *x = f.t.xr; /* NCHW float64: the tensor's own values */
  double rm0[2], rv0[2];
  assert_int_equal(fbn_module_read_buffer(m, FBN_BUFFER_RUNNING_MEAN, FBN_DTYPE_FLOAT64, rm0, 2),
                   FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_read_buffer(m, FBN_BUFFER_RUNNING_VAR, FBN_DTYPE_FLOAT64, rv0, 2),
                   FBN_STATUS_SUCCESS);
  int64_t nbt0 = 0;
  assert_int_equal(fbn_module_get_num_batches_tracked(m, &nbt0), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_forward(m, &f.t.d, f.t.x, NULL, f.t.y, NULL, NULL, 0),
                   FBN_STATUS_SUCCESS);
  double rm[2], rv[2];
  assert_int_equal(fbn_module_read_buffer(m, FBN_BUFFER_RUNNING_MEAN, FBN_DTYPE_FLOAT64, rm, 2),
                   FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_read_buffer(m, FBN_BUFFER_RUNNING_VAR, FBN_DTYPE_FLOAT64, rv, 2),
                   FBN_STATUS_SUCCESS);
  int64_t nbt = 0;
  assert_int_equal(fbn_module_get_num_batches_tracked(m, &nbt), FBN_STATUS_SUCCESS);
  assert_int_equal(nbt, nbt0 + 1);
  for (int c = 0; c < 2; c++) {
    double sum = 0, ss = 0;
    for (int i = 0; i < 36; i++) {
      sum += x[(i / 12) * 24 + c * 12 + i % 12];
    }
    double mean = sum / 36;
    for (int i = 0; i < 36; i++) {
      double v = x[(i / 12) * 24 + c * 12 + i % 12] - mean;
      ss += v * v;
    }
    double unbiased = ss / 35;
    if (momentum == 0.0 && !cumulative) {
      assert_true(rm[c] == rm0[c]); /* bitwise unchanged */
      assert_true(rv[c] == rv0[c]);
    } else {
      /* factor 1: the batch statistics exactly (up to rounding) */
      assert_true(fabs(rm[c] - mean) <= 1e-12 * (1 + fabs(mean)));
      assert_true(fabs(rv[c] - unbiased) <= 1e-12 * unbiased);
    }
  }
  fbnt_fixture_destroy(&f);
}

static void test_forward_momentum_zero_keeps_running_stats(void **state) {
  (void)state;
  run_momentum_edge(__func__, 0.0, false);
}

static void test_forward_momentum_one_takes_batch_stats(void **state) {
  (void)state;
  run_momentum_edge(__func__, 1.0, false);
}

static void test_forward_cumulative_first_batch_takes_batch_stats(void **state) {
  (void)state;
  run_momentum_edge(__func__, 0.1, true);
}

/* ---- NaN ------------------------------------------------------------------ */

static void run_nan(const char *test, fbn_dtype dtype, fbn_layout layout, bool training,
                    bool in_addend) {
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, test);
  fbnt_fixture f;
  assert_int_equal(fbnt_fixture_create(&f, &rng,
                                       &(fbnt_spec){.n = 4,
                                                    .c = 3,
                                                    .h = 3,
                                                    .w = 5,
                                                    .dtype = dtype,
                                                    .layout = layout,
                                                    .addend = true,
                                                    .eval = !training}),
                   FBN_STATUS_SUCCESS);
  fbnt_tensors *t = &f.t;
  const fbn_tensor_desc d = t->d;
  /* one NaN in channel 1 */
  if (in_addend) {
    fbnt_set(&d, t->a, 2, 1, 1, 3, NAN);
    t->ar[fbnt_ref_index(&d, 2, 1, 1, 3)] = NAN;
  } else {
    fbnt_set(&d, t->x, 2, 1, 1, 3, NAN);
    t->xr[fbnt_ref_index(&d, 2, 1, 1, 3)] = NAN;
  }
  assert_true(fbnt_fixture_forward(&f, NULL, t->saved, test));
  /* spelled out: which elements are NaN */
  double *ym = calloc(t->count, sizeof *ym);
  assert_non_null(ym);
  fbnt_tensor_to_ref(&d, t->y, ym);
  for (int64_t n = 0; n < d.n; n++)
    for (int64_t c = 0; c < d.c; c++)
      for (int64_t h = 0; h < d.h; h++)
        for (int64_t w = 0; w < d.w; w++) {
          bool the_element = n == 2 && c == 1 && h == 1 && w == 3;
          bool whole_channel = training && !in_addend && c == 1;
          bool want_nan = the_element || whole_channel;
          double v = ym[fbnt_ref_index(&d, n, c, h, w)];
          if (want_nan != (bool)isnan(v)) {
            fail_msg("%s: y(%d,%d,%d,%d) = %g, NaN expected: %d", test, (int)n, (int)c, (int)h,
                     (int)w, v, want_nan);
          }
        }
  double rm[3];
  assert_int_equal(fbn_module_read_buffer(f.m, FBN_BUFFER_RUNNING_MEAN, FBN_DTYPE_FLOAT64, rm, 3),
                   FBN_STATUS_SUCCESS);
  assert_false(isnan(rm[0]) || isnan(rm[2]));
  assert_int_equal(isnan(rm[1]) != 0, training && !in_addend);
  free(ym);
  fbnt_fixture_destroy(&f);
}

static void test_forward_nan_in_x_poisons_its_channel(void **state) {
  (void)state;
  run_nan("nan x f32 NCHW train", FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW, true, false);
  run_nan("nan x f32 NHWC train", FBN_DTYPE_FLOAT32, FBN_LAYOUT_NHWC, true, false);
  run_nan("nan x f64 NHWC train", FBN_DTYPE_FLOAT64, FBN_LAYOUT_NHWC, true, false);
}

static void test_forward_nan_in_x_eval_stays_in_element(void **state) {
  (void)state;
  run_nan("nan x f32 NCHW eval", FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW, false, false);
  run_nan("nan x f64 NHWC eval", FBN_DTYPE_FLOAT64, FBN_LAYOUT_NHWC, false, false);
}

static void test_forward_nan_in_addend_propagates_to_element(void **state) {
  (void)state;
  run_nan("nan addend f32 NCHW train", FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW, true, true);
  run_nan("nan addend f32 NHWC eval", FBN_DTYPE_FLOAT32, FBN_LAYOUT_NHWC, false, true);
  run_nan("nan addend f64 NCHW train", FBN_DTYPE_FLOAT64, FBN_LAYOUT_NCHW, true, true);
}

/* ---- misc ---------------------------------------------------------------- */

/* N*H*W == 1 is fine in eval with tracked statistics. */
static void test_forward_eval_one_value_per_channel(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  for (int l = 0; l < 2; l++) {
    fbnt_case cs = {.n = 1,
                    .c = 4,
                    .h = 1,
                    .w = 1,
                    .dtype = FBN_DTYPE_FLOAT32,
                    .layout = (fbn_layout)l,
                    .addend = true,
                    .affine = true,
                    .track = true,
                    .training = false,
                    .backward = true};
    assert_true(fbnt_case_run(&cs, &rng));
    cs.dtype = FBN_DTYPE_FLOAT64;
    cs.addend = false;
    assert_true(fbnt_case_run(&cs, &rng));
  }
}

/* saved = NULL and a caller workspace give the same y as the default. */
static void test_forward_saved_and_workspace_optional(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  /* no running statistics: forward changes nothing, so it is repeatable */
  fbnt_fixture f;
  assert_int_equal(fbnt_fixture_create(&f, &rng,
                                       &(fbnt_spec){.n = 4,
                                                    .c = 2,
                                                    .h = 8,
                                                    .w = 3,
                                                    .layout = FBN_LAYOUT_NHWC,
                                                    .addend = true,
                                                    .no_track = true}),
                   FBN_STATUS_SUCCESS);
  const fbn_tensor_desc d = f.t.d;
  assert_true(fbnt_fixture_forward(&f, NULL, f.t.saved, NULL));
  const float *y1 = f.t.y;
  float y2[192], y3[192];
  fbnt_tensor_poison(&d, y2);
  fbnt_tensor_poison(&d, y3);
  assert_int_equal(fbn_module_forward(f.m, &d, f.t.x, f.t.a, y2, NULL, NULL, 0),
                   FBN_STATUS_SUCCESS);
  size_t ws = 1;
  assert_int_equal(fbn_module_forward_workspace_size(f.m, &d, true, &ws), FBN_STATUS_SUCCESS);
  void *workspace = fbnt_alloc(ws + 256);
  assert_int_equal(fbn_module_forward(f.m, &d, f.t.x, f.t.a, y3, f.t.saved, workspace, ws + 256),
                   FBN_STATUS_SUCCESS);
  assert_memory_equal(y1, y2, sizeof y2);
  assert_memory_equal(y1, y3, sizeof y3);
  bool any_nan = false, any_positive = false, any_zero = false;
  for (int i = 0; i < 192; i++) {
    any_nan |= isnan(y1[i]);
    any_positive |= y1[i] > 0;
    any_zero |= y1[i] == 0;
  }
  assert_false(any_nan);
  assert_true(any_positive && any_zero); /* the ReLU did something */
  fbnt_free(workspace);
  fbnt_fixture_destroy(&f);
}

/* Large mean, small spread: the statistics must not cancel catastrophically
 * (x = 1000 + 0.05 * normal in float32). */
static void test_forward_large_mean_small_variance(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  for (int l = 0; l < 2; l++) {
    fbnt_fixture f;
    assert_int_equal(
        fbnt_fixture_create(&f, &rng,
                            &(fbnt_spec){.n = 16, .c = 4, .h = 9, .w = 7, .layout = (fbn_layout)l}),
        FBN_STATUS_SUCCESS);
    fbnt_tensors *t = &f.t;
    fbnt_fill_normal(&rng, &t->d, t->x, t->xr, 0.05);
    for (size_t i = 0; i < t->count; i++) {
      t->xr[i] = (double)(float)(t->xr[i] + 1000.0);
    }
    fbnt_tensor_from_ref(&t->d, t->xr, t->x);
    assert_true(fbnt_fixture_forward(&f, NULL, NULL, __func__));
    fbnt_fixture_destroy(&f);
  }
}

int main(int argc, char **argv) {
  fbnt_parse_args(argc, argv);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_forward_matches_reference_nchw_f32),
      cmocka_unit_test(test_forward_matches_reference_nhwc_f32),
      cmocka_unit_test(test_forward_matches_reference_nchw_f64),
      cmocka_unit_test(test_forward_matches_reference_nhwc_f64),
      cmocka_unit_test(test_forward_training_steps_momentum),
      cmocka_unit_test(test_forward_training_steps_cumulative_average),
      cmocka_unit_test(test_forward_momentum_zero_keeps_running_stats),
      cmocka_unit_test(test_forward_momentum_one_takes_batch_stats),
      cmocka_unit_test(test_forward_cumulative_first_batch_takes_batch_stats),
      cmocka_unit_test(test_forward_nan_in_x_poisons_its_channel),
      cmocka_unit_test(test_forward_nan_in_x_eval_stays_in_element),
      cmocka_unit_test(test_forward_nan_in_addend_propagates_to_element),
      cmocka_unit_test(test_forward_eval_one_value_per_channel),
      cmocka_unit_test(test_forward_saved_and_workspace_optional),
      cmocka_unit_test(test_forward_large_mean_small_variance),
  };
  return cmocka_run_group_tests_name("forward", tests, NULL, NULL);
}
