/*
 * Backward against the float64 reference (the full matrix), against central
 * finite differences of the library's own forward (float64), gradient
 * accumulation and zero_grad, several saved objects in flight, saved-object
 * reuse, and the mode recorded in the saved object.
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

static void test_backward_matches_reference_nchw_f32(void **state) {
  (void)state;
  fbnt_case_matrix(__func__, FBN_LAYOUT_NCHW, FBN_DTYPE_FLOAT32, true);
}
static void test_backward_matches_reference_nhwc_f32(void **state) {
  (void)state;
  fbnt_case_matrix(__func__, FBN_LAYOUT_NHWC, FBN_DTYPE_FLOAT32, true);
}
static void test_backward_matches_reference_nchw_f64(void **state) {
  (void)state;
  fbnt_case_matrix(__func__, FBN_LAYOUT_NCHW, FBN_DTYPE_FLOAT64, true);
}
static void test_backward_matches_reference_nhwc_f64(void **state) {
  (void)state;
  fbnt_case_matrix(__func__, FBN_LAYOUT_NHWC, FBN_DTYPE_FLOAT64, true);
}

/* ---- a module and forward/backward passes on host tensors ------------------ */

/* A module of c features with random state, in dtype, and its reference. */
static void make(fbnt_fixture *f, fbnt_rng *rng, int64_t c, fbn_dtype dtype, bool affine,
                 bool track) {
  const fbnt_spec spec = {.c = c, .dtype = dtype, .no_affine = !affine, .no_track = !track};
  assert_int_equal(fbnt_fixture_create(f, rng, &spec), FBN_STATUS_SUCCESS);
}

/* Tensors of d, with an addend passed to every forward. */
static void pass_init(fbnt_tensors *p, fbnt_rng *rng, fbn_tensor_desc d) {
  fbnt_tensors_init(p, rng, d, true);
}

/* ---- finite differences -------------------------------------------------- */

/* loss = sum(y * r) with the library's forward (no saved). */
static double lib_loss(fbn_module *m, const fbn_tensor_desc *d, const double *x, const double *a,
                       const double *r) {
  size_t count = fbnt_desc_numel(d);
  double *y = calloc(count, sizeof *y);
  assert_int_equal(fbn_module_forward(m, d, x, a, y, NULL, NULL, 0), FBN_STATUS_SUCCESS);
  double loss = 0.0;
  for (size_t i = 0; i < count; i++) {
    loss += y[i] * r[i];
  }
  free(y);
  return loss;
}

static void check_fd(const char *what, size_t i, double numeric, double analytic) {
  if (!(fabs(numeric - analytic) <= 1e-6 * (1.0 + fabs(analytic)))) {
    fail_msg("%s[%zu]: analytic %.12g, finite difference %.12g", what, i, analytic, numeric);
  }
}

static void run_gradcheck(const char *test, fbn_layout layout, bool training, bool track,
                          bool affine) {
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, test);
  fbnt_fixture f;
  assert_int_equal(fbnt_fixture_create(&f, &rng,
                                       &(fbnt_spec){.n = 2,
                                                    .c = 3,
                                                    .h = 3,
                                                    .w = 2,
                                                    .dtype = FBN_DTYPE_FLOAT64,
                                                    .layout = layout,
                                                    .addend = true,
                                                    .eval = !training,
                                                    .no_affine = !affine,
                                                    .no_track = !track}),
                   FBN_STATUS_SUCCESS);
  fbn_module *m = f.m;
  const fbn_tensor_desc d = f.t.d;
  const size_t count = f.t.count;
  /* float64 tensors; r (the loss weights) is dy */
  double *x = f.t.x, *a = f.t.a, *r = f.t.dy, *y = f.t.y, *dx = f.t.dx, *da = f.t.da;
  double *ar = f.t.ar;
  double *pre = calloc(count, sizeof *pre);
  assert_non_null(pre);
  /* move the addend so every pre-activation is at least 0.1 from the ReLU
   * kink (a perturbation of 1e-6 then never crosses it) */
  fbnt_ref_preactivation(&f.ref, d.n, d.h, d.w, f.t.xr, ar, pre);
  int positive = 0;
  for (size_t i = 0; i < count; i++) {
    if (fabs(pre[i]) < 0.1) {
      ar[i] += pre[i] >= 0 ? 0.2 : -0.2;
    }
    positive += pre[i] > 0;
  }
  assert_true(positive > 0 && positive < (int)count); /* both sides of the ReLU */
  fbnt_tensor_from_ref(&d, ar, a);

  fbn_saved *saved = NULL;
  assert_int_equal(fbn_saved_create(&saved), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_zero_grad(m), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_forward(m, &d, x, a, y, saved, NULL, 0), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_backward(m, saved, &d, x, y, r, dx, da, NULL, 0),
                   FBN_STATUS_SUCCESS);
  double dw[3] = {0}, db[3] = {0};
  if (affine) {
    assert_int_equal(fbn_module_read_buffer(m, FBN_BUFFER_WEIGHT_GRAD, FBN_DTYPE_FLOAT64, dw, 3),
                     FBN_STATUS_SUCCESS);
    assert_int_equal(fbn_module_read_buffer(m, FBN_BUFFER_BIAS_GRAD, FBN_DTYPE_FLOAT64, db, 3),
                     FBN_STATUS_SUCCESS);
  }
  const double h = 1e-6;
  /* dx and daddend are given in desc's layout: perturb in place */
  for (size_t i = 0; i < count; i++) {
    double keep = x[i];
    x[i] = keep + h;
    double lp = lib_loss(m, &d, x, a, r);
    x[i] = keep - h;
    double lm = lib_loss(m, &d, x, a, r);
    x[i] = keep;
    check_fd("dx", i, (lp - lm) / (2 * h), dx[i]);
    keep = a[i];
    a[i] = keep + h;
    lp = lib_loss(m, &d, x, a, r);
    a[i] = keep - h;
    lm = lib_loss(m, &d, x, a, r);
    a[i] = keep;
    check_fd("daddend", i, (lp - lm) / (2 * h), da[i]);
  }
  if (affine) {
    const fbn_buffer params[2] = {FBN_BUFFER_WEIGHT, FBN_BUFFER_BIAS};
    const double *grads[2] = {dw, db};
    for (int p = 0; p < 2; p++) {
      double v[3];
      assert_int_equal(fbn_module_read_buffer(m, params[p], FBN_DTYPE_FLOAT64, v, 3),
                       FBN_STATUS_SUCCESS);
      for (size_t c = 0; c < 3; c++) {
        double keep = v[c];
        v[c] = keep + h;
        assert_int_equal(fbn_module_write_buffer(m, params[p], FBN_DTYPE_FLOAT64, v, 3),
                         FBN_STATUS_SUCCESS);
        double lp = lib_loss(m, &d, x, a, r);
        v[c] = keep - h;
        assert_int_equal(fbn_module_write_buffer(m, params[p], FBN_DTYPE_FLOAT64, v, 3),
                         FBN_STATUS_SUCCESS);
        double lm = lib_loss(m, &d, x, a, r);
        v[c] = keep;
        assert_int_equal(fbn_module_write_buffer(m, params[p], FBN_DTYPE_FLOAT64, v, 3),
                         FBN_STATUS_SUCCESS);
        check_fd(p == 0 ? "dweight" : "dbias", c, (lp - lm) / (2 * h), grads[p][c]);
      }
    }
  }
  fbn_saved_destroy(saved);
  fbnt_fixture_destroy(&f);
  free(pre);
}

static void test_backward_gradcheck_training(void **state) {
  (void)state;
  run_gradcheck("gradcheck train NCHW", FBN_LAYOUT_NCHW, true, true, true);
  run_gradcheck("gradcheck train NHWC", FBN_LAYOUT_NHWC, true, true, true);
  run_gradcheck("gradcheck train NCHW no affine", FBN_LAYOUT_NCHW, true, true, false);
}

static void test_backward_gradcheck_eval(void **state) {
  (void)state;
  run_gradcheck("gradcheck eval NCHW", FBN_LAYOUT_NCHW, false, true, true);
  run_gradcheck("gradcheck eval NHWC", FBN_LAYOUT_NHWC, false, true, true);
}

static void test_backward_gradcheck_untracked_eval(void **state) {
  (void)state;
  /* no running stats: eval normalizes (and differentiates) through the batch */
  run_gradcheck("gradcheck eval untracked NHWC", FBN_LAYOUT_NHWC, false, false, true);
}

/* ---- accumulation, several saved objects, reuse ---------------------------- */

static void test_backward_accumulates_grads_and_zero_grad(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  for (int t = 0; t < 2; t++) {
    fbn_dtype dtype = t ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
    fbnt_fixture f;
    make(&f, &rng, 4, dtype, true, true);
    fbnt_tensors p;
    pass_init(&p, &rng, (fbn_tensor_desc){3, 4, 5, 2, dtype, FBN_LAYOUT_NHWC});
    assert_true(fbnt_fixture_forward(&f, &p, p.saved, "accumulate forward"));
    /* starts from the random gradients create_random wrote: accumulates */
    assert_true(fbnt_fixture_backward(&f, &p, p.saved, true, true, "accumulate backward 1"));
    size_t bytes = p.count * (t ? 8 : 4);
    void *dx1 = fbnt_alloc(bytes);
    memcpy(dx1, p.dx, bytes);
    assert_true(fbnt_fixture_backward(&f, &p, p.saved, true, true, "accumulate backward 2"));
    assert_memory_equal(dx1, p.dx, bytes); /* same saved, same dx */
    assert_int_equal(fbn_module_zero_grad(f.m), FBN_STATUS_SUCCESS);
    for (int c = 0; c < 4; c++) {
      f.ref.weight_grad[c] = f.ref.bias_grad[c] = 0.0;
    }
    assert_true(
        fbnt_check_module("after zero_grad", f.m, &f.ref, fbnt_tol_for(dtype, 1.0).rtol, true));
    double g[4] = {1, 1, 1, 1};
    assert_int_equal(fbn_module_read_buffer(f.m, FBN_BUFFER_WEIGHT_GRAD, FBN_DTYPE_FLOAT64, g, 4),
                     FBN_STATUS_SUCCESS);
    assert_true(g[0] == 0.0 && g[1] == 0.0 && g[2] == 0.0 && g[3] == 0.0);
    assert_int_equal(fbn_module_read_buffer(f.m, FBN_BUFFER_BIAS_GRAD, FBN_DTYPE_FLOAT64, g, 4),
                     FBN_STATUS_SUCCESS);
    assert_true(g[0] == 0.0 && g[1] == 0.0 && g[2] == 0.0 && g[3] == 0.0);
    assert_true(fbnt_fixture_backward(&f, &p, p.saved, false, false,
                                      "backward after zero_grad, grads only"));
    fbnt_free(dx1);
    fbnt_tensors_free(&p);
    fbnt_fixture_destroy(&f);
  }
}

/* A module used twice in a net: two forwards, then the backwards in
 * reverse order, each with its own saved object. */
static void test_backward_two_saved_in_reverse_order(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  for (int t = 0; t < 2; t++) {
    fbn_dtype dtype = t ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
    fbn_layout layout = t ? FBN_LAYOUT_NCHW : FBN_LAYOUT_NHWC;
    fbnt_fixture f;
    make(&f, &rng, 3, dtype, true, true);
    fbnt_tensors p1, p2;
    pass_init(&p1, &rng, (fbn_tensor_desc){4, 3, 2, 5, dtype, layout});
    pass_init(&p2, &rng, (fbn_tensor_desc){2, 3, 3, 3, dtype, layout});
    assert_true(fbnt_fixture_forward(&f, &p1, p1.saved, "first forward"));
    assert_true(fbnt_fixture_forward(&f, &p2, p2.saved, "second forward"));
    assert_true(fbnt_fixture_backward(&f, &p2, p2.saved, true, true, "second backward"));
    assert_true(fbnt_fixture_backward(&f, &p1, p1.saved, true, true, "first backward"));
    fbnt_tensors_free(&p1);
    fbnt_tensors_free(&p2);
    fbnt_fixture_destroy(&f);
  }
}

/* One saved object refilled by later forwards of other shapes and modes. */
static void test_backward_saved_reuse(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  fbnt_fixture f;
  make(&f, &rng, 2, FBN_DTYPE_FLOAT32, true, true);
  fbn_saved *saved = NULL;
  assert_int_equal(fbn_saved_create(&saved), FBN_STATUS_SUCCESS);
  fbnt_tensors p1, p2, p3;
  pass_init(&p1, &rng, (fbn_tensor_desc){4, 2, 8, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW});
  pass_init(&p2, &rng, (fbn_tensor_desc){6, 2, 3, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NHWC});
  pass_init(&p3, &rng, (fbn_tensor_desc){2, 2, 5, 1, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW});
  assert_true(fbnt_fixture_forward(&f, &p1, saved, "reuse forward 1"));
  assert_true(fbnt_fixture_backward(&f, &p1, saved, true, true, "reuse backward 1"));
  assert_true(fbnt_fixture_forward(&f, &p2, saved, "reuse forward 2 (other shape, layout)"));
  assert_true(fbnt_fixture_backward(&f, &p2, saved, true, true, "reuse backward 2"));
  /* the saved object now describes p2's shape only */
  fbnt_state before, after;
  fbnt_state_capture(f.m, &before);
  assert_int_equal(
      fbn_module_backward(f.m, saved, &p1.d, p1.x, p1.y, p1.dy, p1.dx, NULL, NULL, 0),
      FBN_STATUS_SHAPE_MISMATCH);
  fbnt_state_capture(f.m, &after);
  assert_true(fbnt_state_equal(&before, &after));
  fbnt_state_free(&before);
  fbnt_state_free(&after);
  assert_int_equal(fbnt_fixture_set_training(&f, false), FBN_STATUS_SUCCESS);
  assert_true(fbnt_fixture_forward(&f, &p3, saved, "reuse forward 3 (eval)"));
  assert_true(fbnt_fixture_backward(&f, &p3, saved, true, true, "reuse backward 3 (eval)"));
  fbnt_tensors_free(&p1);
  fbnt_tensors_free(&p2);
  fbnt_tensors_free(&p3);
  fbn_saved_destroy(saved);
  fbnt_fixture_destroy(&f);
}

/* A saved object is rebound by the next forward, whichever module runs it. */
static void test_backward_saved_rebinds_to_other_module(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  fbnt_fixture a, b;
  make(&a, &rng, 3, FBN_DTYPE_FLOAT32, true, true);
  make(&b, &rng, 3, FBN_DTYPE_FLOAT32, true, true);
  fbn_saved *saved = NULL;
  assert_int_equal(fbn_saved_create(&saved), FBN_STATUS_SUCCESS);
  fbnt_tensors p1, p2;
  pass_init(&p1, &rng, (fbn_tensor_desc){4, 3, 3, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NHWC});
  pass_init(&p2, &rng, (fbn_tensor_desc){4, 3, 3, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NHWC});
  assert_true(fbnt_fixture_forward(&a, &p1, saved, "forward of a"));
  assert_true(fbnt_fixture_forward(&b, &p2, saved, "forward of b into a's saved object"));
  assert_true(fbnt_fixture_backward(&b, &p2, saved, true, true, "backward of b"));
  fbnt_state before, after;
  fbnt_state_capture(a.m, &before);
  assert_int_equal(
      fbn_module_backward(a.m, saved, &p1.d, p1.x, p1.y, p1.dy, p1.dx, NULL, NULL, 0),
      FBN_STATUS_INVALID_STATE);
  fbnt_state_capture(a.m, &after);
  assert_true(fbnt_state_equal(&before, &after));
  fbnt_state_free(&before);
  fbnt_state_free(&after);
  fbnt_tensors_free(&p1);
  fbnt_tensors_free(&p2);
  fbn_saved_destroy(saved);
  fbnt_fixture_destroy(&a);
  fbnt_fixture_destroy(&b);
}

/* Backward follows the statistics the forward used, not the current mode. */
static void test_backward_uses_mode_recorded_in_saved(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  for (int first_training = 0; first_training < 2; first_training++) {
    fbnt_fixture f;
    make(&f, &rng, 3, FBN_DTYPE_FLOAT64, true, true);
    assert_int_equal(fbnt_fixture_set_training(&f, first_training), FBN_STATUS_SUCCESS);
    fbnt_tensors p;
    pass_init(&p, &rng, (fbn_tensor_desc){3, 3, 4, 2, FBN_DTYPE_FLOAT64, FBN_LAYOUT_NHWC});
    assert_true(fbnt_fixture_forward(&f, &p, p.saved, "forward"));
    assert_int_equal(fbnt_fixture_set_training(&f, !first_training), FBN_STATUS_SUCCESS);
    assert_true(fbnt_fixture_backward(&f, &p, p.saved, true, true,
                                      first_training ? "train forward, eval backward"
                                                     : "eval forward, train backward"));
    fbnt_tensors_free(&p);
    fbnt_fixture_destroy(&f);
  }
}

/* dx only, daddend only, neither (gradients only). */
static void test_backward_optional_outputs(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  fbnt_fixture f;
  make(&f, &rng, 2, FBN_DTYPE_FLOAT32, true, true);
  fbnt_tensors p;
  pass_init(&p, &rng, (fbn_tensor_desc){4, 2, 8, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NHWC});
  assert_true(fbnt_fixture_forward(&f, &p, p.saved, "forward"));
  assert_true(fbnt_fixture_backward(&f, &p, p.saved, true, false, "dx only"));
  assert_true(fbnt_fixture_backward(&f, &p, p.saved, false, true, "daddend only"));
  assert_true(fbnt_fixture_backward(&f, &p, p.saved, false, false, "gradients only"));
  fbnt_tensors_free(&p);
  fbnt_fixture_destroy(&f);
}

/* ---- NaN through the ReLU gate ---------------------------------------------- */

/* A NaN y passes its dy (PyTorch's threshold_backward is y <= 0 ? 0 : dy, and
 * cuDNN's fused backward agrees). Spelled out, for both CPU backends: a NaN
 * in x makes channel 1 NaN, so its daddend is dy, dbias[1] is the sum of its
 * dy (finite), dweight[1] and dx of channel 1 are NaN; a NaN in addend at
 * (0,2,0,0) passes that element's dy and leaves channel 2's dx finite. */
static void run_nan_gate(const char *backend, fbn_layout layout) {
  char name[96];
  snprintf(name, sizeof name, "nan gate %s %s", backend,
           layout == FBN_LAYOUT_NCHW ? "NCHW" : "NHWC");
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, name);
  fbnt_fixture f;
  assert_int_equal(setenv("FBN_CPU_BACKEND", backend, 1), 0);
  const fbn_status cs = fbnt_fixture_create(
      &f, &rng, &(fbnt_spec){.n = 4, .c = 3, .h = 3, .w = 5, .layout = layout, .addend = true});
  assert_int_equal(unsetenv("FBN_CPU_BACKEND"), 0);
  assert_int_equal(cs, FBN_STATUS_SUCCESS);
  fbn_module *m = f.m;
  assert_int_equal(fbn_module_zero_grad(m), FBN_STATUS_SUCCESS);
  const fbn_tensor_desc d = f.t.d;
  const size_t count = f.t.count;
  void *x = f.t.x, *a = f.t.a, *y = f.t.y, *dy = f.t.dy, *dx = f.t.dx, *da = f.t.da;
  const double *dyr = f.t.dyr;
  /* the module's outputs as float64 */
  double *yr = calloc(count, sizeof *yr), *dxr = calloc(count, sizeof *dxr);
  double *dar = calloc(count, sizeof *dar);
  assert_true(yr != NULL && dxr != NULL && dar != NULL);
  fbnt_set(&d, x, 2, 1, 1, 3, NAN);
  fbnt_set(&d, a, 0, 2, 0, 0, NAN);
  fbn_saved *saved = NULL;
  assert_int_equal(fbn_saved_create(&saved), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_forward(m, &d, x, a, y, saved, NULL, 0), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_backward(m, saved, &d, x, y, dy, dx, da, NULL, 0),
                   FBN_STATUS_SUCCESS);
  fbnt_tensor_to_ref(&d, y, yr);
  fbnt_tensor_to_ref(&d, dx, dxr);
  fbnt_tensor_to_ref(&d, da, dar);
  double sum_dy[3] = {0, 0, 0};
  for (int64_t n = 0; n < d.n; n++)
    for (int64_t c = 0; c < d.c; c++)
      for (int64_t h = 0; h < d.h; h++)
        for (int64_t w = 0; w < d.w; w++) {
          const size_t i = fbnt_ref_index(&d, n, c, h, w);
          const bool nan_y = c == 1 || (n == 0 && c == 2 && h == 0 && w == 0);
          if (nan_y != (bool)isnan(yr[i]))
            fail_msg("%s: y(%d,%d,%d,%d) = %g", name, (int)n, (int)c, (int)h, (int)w, yr[i]);
          const double g = yr[i] <= 0.0 ? 0.0 : dyr[i];
          sum_dy[c] += g;
          if (!(dar[i] == g))
            fail_msg("%s: daddend(%d,%d,%d,%d) = %g, want %g (y = %g, dy = %g)", name, (int)n,
                     (int)c, (int)h, (int)w, dar[i], g, yr[i], dyr[i]);
          if ((c == 1) != (bool)isnan(dxr[i]))
            fail_msg("%s: dx(%d,%d,%d,%d) = %g, NaN expected: %d", name, (int)n, (int)c, (int)h,
                     (int)w, dxr[i], c == 1);
        }
  double db[3], dw[3];
  assert_int_equal(fbn_module_read_buffer(m, FBN_BUFFER_BIAS_GRAD, FBN_DTYPE_FLOAT64, db, 3),
                   FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_read_buffer(m, FBN_BUFFER_WEIGHT_GRAD, FBN_DTYPE_FLOAT64, dw, 3),
                   FBN_STATUS_SUCCESS);
  for (int c = 0; c < 3; c++) {
    if (!(fabs(db[c] - sum_dy[c]) <= 1e-5 * (1.0 + fabs(sum_dy[c]))))
      fail_msg("%s: dbias[%d] = %.9g, want %.9g", name, c, db[c], sum_dy[c]);
    if ((c == 1) != (bool)isnan(dw[c]))
      fail_msg("%s: dweight[%d] = %g, NaN expected: %d", name, c, dw[c], c == 1);
  }
  fbn_saved_destroy(saved);
  fbnt_fixture_destroy(&f);
  free(yr);
  free(dxr);
  free(dar);
}

static void test_backward_nan_y_passes_dy(void **state) {
  (void)state;
  run_nan_gate("reference", FBN_LAYOUT_NCHW);
  run_nan_gate("reference", FBN_LAYOUT_NHWC);
  run_nan_gate("fast", FBN_LAYOUT_NCHW);
  run_nan_gate("fast", FBN_LAYOUT_NHWC);
}

int main(int argc, char **argv) {
  fbnt_parse_args(argc, argv);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_backward_matches_reference_nchw_f32),
      cmocka_unit_test(test_backward_matches_reference_nhwc_f32),
      cmocka_unit_test(test_backward_matches_reference_nchw_f64),
      cmocka_unit_test(test_backward_matches_reference_nhwc_f64),
      cmocka_unit_test(test_backward_gradcheck_training),
      cmocka_unit_test(test_backward_gradcheck_eval),
      cmocka_unit_test(test_backward_gradcheck_untracked_eval),
      cmocka_unit_test(test_backward_accumulates_grads_and_zero_grad),
      cmocka_unit_test(test_backward_two_saved_in_reverse_order),
      cmocka_unit_test(test_backward_saved_reuse),
      cmocka_unit_test(test_backward_saved_rebinds_to_other_module),
      cmocka_unit_test(test_backward_uses_mode_recorded_in_saved),
      cmocka_unit_test(test_backward_optional_outputs),
      cmocka_unit_test(test_backward_nan_y_passes_dy),
  };
  return cmocka_run_group_tests_name("backward", tests, NULL, NULL);
}
