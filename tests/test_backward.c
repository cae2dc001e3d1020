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

static const int64_t shapes[][4] = {
    {3, 1, 4, 5}, {5, 3, 1, 1}, {3, 5, 7, 3}, {4, 2, 8, 3}, {8, 16, 12, 10}, {32, 24, 7, 9},
};
#define NUM_SHAPES (sizeof shapes / sizeof shapes[0])

static void run_matrix(const char *test, fbn_layout layout, fbn_dtype dtype) {
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, test);
  int failed = 0, total = 0;
  for (size_t s = 0; s < NUM_SHAPES; s++) {
    for (int flags = 0; flags < 16; flags++) {
      fbnt_case cs = {shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3], dtype, layout,
                      (flags & 1) != 0, (flags & 2) != 0, (flags & 4) != 0, (flags & 8) != 0,
                      true};
      total++;
      if (!fbnt_case_run(&cs, &rng)) {
        failed++;
      }
    }
  }
  if (failed != 0) {
    fail_msg("%d of %d cases failed", failed, total);
  }
}

static void test_backward_matches_reference_nchw_f32(void **state) {
  (void)state;
  run_matrix(__func__, FBN_LAYOUT_NCHW, FBN_DTYPE_FLOAT32);
}
static void test_backward_matches_reference_nhwc_f32(void **state) {
  (void)state;
  run_matrix(__func__, FBN_LAYOUT_NHWC, FBN_DTYPE_FLOAT32);
}
static void test_backward_matches_reference_nchw_f64(void **state) {
  (void)state;
  run_matrix(__func__, FBN_LAYOUT_NCHW, FBN_DTYPE_FLOAT64);
}
static void test_backward_matches_reference_nhwc_f64(void **state) {
  (void)state;
  run_matrix(__func__, FBN_LAYOUT_NHWC, FBN_DTYPE_FLOAT64);
}

/* ---- a forward/backward pair on host tensors ----------------------------- */

typedef struct pass {
  fbn_tensor_desc d;
  size_t count;
  void *x, *a, *y, *dy, *dx, *da;
  double *xr, *ar, *yr, *dyr, *dxr, *dar;
  fbn_saved *saved;
  fbnt_ref_saved rs;
} pass;

static void pass_init(pass *p, fbnt_rng *rng, fbn_tensor_desc d) {
  memset(p, 0, sizeof *p);
  p->d = d;
  p->count = fbnt_desc_numel(&d);
  void **bufs[6] = {&p->x, &p->a, &p->y, &p->dy, &p->dx, &p->da};
  double **refs[6] = {&p->xr, &p->ar, &p->yr, &p->dyr, &p->dxr, &p->dar};
  for (int i = 0; i < 6; i++) {
    *bufs[i] = fbnt_tensor_alloc(&d);
    *refs[i] = calloc(p->count, sizeof(double));
    assert_non_null(*refs[i]);
  }
  fbnt_fill_channels(rng, &d, p->x, p->xr);
  fbnt_fill_normal(rng, &d, p->a, p->ar, 1.0);
  fbnt_fill_normal(rng, &d, p->dy, p->dyr, 1.0);
  fbnt_tensor_poison(&d, p->y);
  fbnt_tensor_poison(&d, p->dx);
  fbnt_tensor_poison(&d, p->da);
  assert_int_equal(fbn_saved_create(&p->saved), FBN_STATUS_SUCCESS);
  fbnt_ref_saved_init(&p->rs);
}

static void pass_free(pass *p) {
  void *bufs[6] = {p->x, p->a, p->y, p->dy, p->dx, p->da};
  double *refs[6] = {p->xr, p->ar, p->yr, p->dyr, p->dxr, p->dar};
  for (int i = 0; i < 6; i++) {
    fbnt_free(bufs[i]);
    free(refs[i]);
  }
  fbn_saved_destroy(p->saved);
  fbnt_ref_saved_free(&p->rs);
}

/* Forward of module and reference; checks y and the module state. */
static void pass_forward(pass *p, fbn_module *m, fbnt_ref_module *ref, fbn_saved *saved,
                         const char *name) {
  fbnt_tensor_poison(&p->d, p->y);
  fbn_status st = fbn_module_forward(m, &p->d, p->x, p->a, p->y, saved, NULL, 0);
  if (st != FBN_STATUS_SUCCESS) {
    fail_msg("%s: forward = %s: %s", name, fbn_status_string(st), fbn_last_error_message());
  }
  assert_true(fbnt_ref_forward(ref, p->d.n, p->d.h, p->d.w, p->xr, p->ar, p->yr, &p->rs));
  assert_true(fbnt_check_tensor(name, "y", &p->d, p->y, p->yr));
  assert_true(fbnt_check_module(name, m, ref, fbnt_tol_for(p->d.dtype, 1.0).rtol, true));
}

/* Backward of module and reference; checks dx, daddend, grads. */
static void pass_backward(pass *p, fbn_module *m, fbnt_ref_module *ref, const fbn_saved *saved,
                          bool want_dx, bool want_da, const char *name) {
  fbnt_tensor_poison(&p->d, p->dx);
  fbnt_tensor_poison(&p->d, p->da);
  fbn_status st = fbn_module_backward(m, saved, &p->d, p->x, p->y, p->dy, want_dx ? p->dx : NULL,
                                      want_da ? p->da : NULL, NULL, 0);
  if (st != FBN_STATUS_SUCCESS) {
    fail_msg("%s: backward = %s: %s", name, fbn_status_string(st), fbn_last_error_message());
  }
  double *ym = calloc(p->count, sizeof *ym);
  fbnt_tensor_to_ref(&p->d, p->y, ym);
  fbnt_ref_backward(ref, &p->rs, p->xr, ym, p->dyr, p->dxr, p->dar);
  free(ym);
  double *nan_ref = calloc(p->count, sizeof *nan_ref);
  for (size_t i = 0; i < p->count; i++) {
    nan_ref[i] = NAN;
  }
  /* an output that was not asked for stays poisoned */
  assert_true(fbnt_check_tensor(name, "dx", &p->d, p->dx, want_dx ? p->dxr : nan_ref));
  assert_true(fbnt_check_tensor(name, "daddend", &p->d, p->da, want_da ? p->dar : nan_ref));
  free(nan_ref);
  assert_true(fbnt_check_module(name, m, ref, fbnt_tol_for(p->d.dtype, 1.0).rtol, true));
}

static fbn_module *make(fbnt_rng *rng, fbnt_ref_module *ref, int64_t c, fbn_dtype dtype,
                        bool affine, bool track) {
  fbn_module_options opt;
  fbn_module_options_init(&opt);
  opt.num_features = c;
  opt.param_dtype = dtype;
  opt.affine = affine;
  opt.track_running_stats = track;
  memset(ref, 0, sizeof *ref);
  fbn_module *m = NULL;
  assert_int_equal(fbnt_module_create_random(rng, &opt, &m, ref), FBN_STATUS_SUCCESS);
  return m;
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
  fbnt_ref_module ref;
  fbn_module *m = make(&rng, &ref, 3, FBN_DTYPE_FLOAT64, affine, track);
  assert_int_equal(fbn_module_set_training(m, training), FBN_STATUS_SUCCESS);
  ref.training = training;
  fbn_tensor_desc d = {2, 3, 3, 2, FBN_DTYPE_FLOAT64, layout};
  size_t count = fbnt_desc_numel(&d);
  double *x = fbnt_tensor_alloc(&d), *a = fbnt_tensor_alloc(&d), *r = fbnt_tensor_alloc(&d);
  double *y = fbnt_tensor_alloc(&d), *dx = fbnt_tensor_alloc(&d), *da = fbnt_tensor_alloc(&d);
  double *xr = calloc(count, sizeof *xr), *ar = calloc(count, sizeof *ar);
  double *pre = calloc(count, sizeof *pre);
  fbnt_fill_channels(&rng, &d, x, xr);
  fbnt_fill_normal(&rng, &d, a, ar, 1.0);
  fbnt_fill_normal(&rng, &d, r, NULL, 1.0);
  /* move the addend so every pre-activation is at least 0.1 from the ReLU
   * kink (a perturbation of 1e-6 then never crosses it) */
  fbnt_ref_preactivation(&ref, d.n, d.h, d.w, xr, ar, pre);
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
  fbn_module_destroy(m);
  fbnt_ref_module_free(&ref);
  fbnt_free(x);
  fbnt_free(a);
  fbnt_free(r);
  fbnt_free(y);
  fbnt_free(dx);
  fbnt_free(da);
  free(xr);
  free(ar);
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
    fbnt_ref_module ref;
    fbn_module *m = make(&rng, &ref, 4, dtype, true, true);
    pass p;
    pass_init(&p, &rng, (fbn_tensor_desc){3, 4, 5, 2, dtype, FBN_LAYOUT_NHWC});
    pass_forward(&p, m, &ref, p.saved, "accumulate forward");
    /* starts from the random gradients create_random wrote: accumulates */
    pass_backward(&p, m, &ref, p.saved, true, true, "accumulate backward 1");
    size_t bytes = p.count * (t ? 8 : 4);
    void *dx1 = fbnt_alloc(bytes);
    memcpy(dx1, p.dx, bytes);
    pass_backward(&p, m, &ref, p.saved, true, true, "accumulate backward 2");
    assert_memory_equal(dx1, p.dx, bytes); /* same saved, same dx */
    assert_int_equal(fbn_module_zero_grad(m), FBN_STATUS_SUCCESS);
    for (int c = 0; c < 4; c++) {
      ref.weight_grad[c] = ref.bias_grad[c] = 0.0;
    }
    assert_true(fbnt_check_module("after zero_grad", m, &ref, fbnt_tol_for(dtype, 1.0).rtol, true));
    double g[4] = {1, 1, 1, 1};
    assert_int_equal(fbn_module_read_buffer(m, FBN_BUFFER_WEIGHT_GRAD, FBN_DTYPE_FLOAT64, g, 4),
                     FBN_STATUS_SUCCESS);
    assert_true(g[0] == 0.0 && g[1] == 0.0 && g[2] == 0.0 && g[3] == 0.0);
    assert_int_equal(fbn_module_read_buffer(m, FBN_BUFFER_BIAS_GRAD, FBN_DTYPE_FLOAT64, g, 4),
                     FBN_STATUS_SUCCESS);
    assert_true(g[0] == 0.0 && g[1] == 0.0 && g[2] == 0.0 && g[3] == 0.0);
    pass_backward(&p, m, &ref, p.saved, false, false, "backward after zero_grad, grads only");
    fbnt_free(dx1);
    pass_free(&p);
    fbn_module_destroy(m);
    fbnt_ref_module_free(&ref);
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
    fbnt_ref_module ref;
    fbn_module *m = make(&rng, &ref, 3, dtype, true, true);
    pass p1, p2;
    pass_init(&p1, &rng, (fbn_tensor_desc){4, 3, 2, 5, dtype, layout});
    pass_init(&p2, &rng, (fbn_tensor_desc){2, 3, 3, 3, dtype, layout});
    pass_forward(&p1, m, &ref, p1.saved, "first forward");
    pass_forward(&p2, m, &ref, p2.saved, "second forward");
    pass_backward(&p2, m, &ref, p2.saved, true, true, "second backward");
    pass_backward(&p1, m, &ref, p1.saved, true, true, "first backward");
    pass_free(&p1);
    pass_free(&p2);
    fbn_module_destroy(m);
    fbnt_ref_module_free(&ref);
  }
}

/* One saved object refilled by later forwards of other shapes and modes. */
static void test_backward_saved_reuse(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  fbnt_ref_module ref;
  fbn_module *m = make(&rng, &ref, 2, FBN_DTYPE_FLOAT32, true, true);
  fbn_saved *saved = NULL;
  assert_int_equal(fbn_saved_create(&saved), FBN_STATUS_SUCCESS);
  pass p1, p2, p3;
  pass_init(&p1, &rng, (fbn_tensor_desc){4, 2, 8, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW});
  pass_init(&p2, &rng, (fbn_tensor_desc){6, 2, 3, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NHWC});
  pass_init(&p3, &rng, (fbn_tensor_desc){2, 2, 5, 1, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW});
  pass_forward(&p1, m, &ref, saved, "reuse forward 1");
  pass_backward(&p1, m, &ref, saved, true, true, "reuse backward 1");
  pass_forward(&p2, m, &ref, saved, "reuse forward 2 (other shape, layout)");
  pass_backward(&p2, m, &ref, saved, true, true, "reuse backward 2");
  /* the saved object now describes p2's shape only */
  fbnt_state before, after;
  fbnt_state_capture(m, &before);
  assert_int_equal(fbn_module_backward(m, saved, &p1.d, p1.x, p1.y, p1.dy, p1.dx, NULL, NULL, 0),
                   FBN_STATUS_SHAPE_MISMATCH);
  fbnt_state_capture(m, &after);
  assert_true(fbnt_state_equal(&before, &after));
  fbnt_state_free(&before);
  fbnt_state_free(&after);
  assert_int_equal(fbn_module_set_training(m, false), FBN_STATUS_SUCCESS);
  ref.training = false;
  pass_forward(&p3, m, &ref, saved, "reuse forward 3 (eval)");
  pass_backward(&p3, m, &ref, saved, true, true, "reuse backward 3 (eval)");
  pass_free(&p1);
  pass_free(&p2);
  pass_free(&p3);
  fbn_saved_destroy(saved);
  fbn_module_destroy(m);
  fbnt_ref_module_free(&ref);
}

/* A saved object is rebound by the next forward, whichever module runs it. */
static void test_backward_saved_rebinds_to_other_module(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  fbnt_ref_module ref_a, ref_b;
  fbn_module *a = make(&rng, &ref_a, 3, FBN_DTYPE_FLOAT32, true, true);
  fbn_module *b = make(&rng, &ref_b, 3, FBN_DTYPE_FLOAT32, true, true);
  fbn_saved *saved = NULL;
  assert_int_equal(fbn_saved_create(&saved), FBN_STATUS_SUCCESS);
  pass p1, p2;
  pass_init(&p1, &rng, (fbn_tensor_desc){4, 3, 3, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NHWC});
  pass_init(&p2, &rng, (fbn_tensor_desc){4, 3, 3, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NHWC});
  pass_forward(&p1, a, &ref_a, saved, "forward of a");
  pass_forward(&p2, b, &ref_b, saved, "forward of b into a's saved object");
  pass_backward(&p2, b, &ref_b, saved, true, true, "backward of b");
  fbnt_state before, after;
  fbnt_state_capture(a, &before);
  assert_int_equal(fbn_module_backward(a, saved, &p1.d, p1.x, p1.y, p1.dy, p1.dx, NULL, NULL, 0),
                   FBN_STATUS_INVALID_STATE);
  fbnt_state_capture(a, &after);
  assert_true(fbnt_state_equal(&before, &after));
  fbnt_state_free(&before);
  fbnt_state_free(&after);
  pass_free(&p1);
  pass_free(&p2);
  fbn_saved_destroy(saved);
  fbn_module_destroy(a);
  fbn_module_destroy(b);
  fbnt_ref_module_free(&ref_a);
  fbnt_ref_module_free(&ref_b);
}

/* Backward follows the statistics the forward used, not the current mode. */
static void test_backward_uses_mode_recorded_in_saved(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  for (int first_training = 0; first_training < 2; first_training++) {
    fbnt_ref_module ref;
    fbn_module *m = make(&rng, &ref, 3, FBN_DTYPE_FLOAT64, true, true);
    assert_int_equal(fbn_module_set_training(m, first_training), FBN_STATUS_SUCCESS);
    ref.training = first_training;
    pass p;
    pass_init(&p, &rng, (fbn_tensor_desc){3, 3, 4, 2, FBN_DTYPE_FLOAT64, FBN_LAYOUT_NHWC});
    pass_forward(&p, m, &ref, p.saved, "forward");
    assert_int_equal(fbn_module_set_training(m, !first_training), FBN_STATUS_SUCCESS);
    ref.training = !first_training;
    pass_backward(&p, m, &ref, p.saved, true, true,
                  first_training ? "train forward, eval backward" : "eval forward, train backward");
    pass_free(&p);
    fbn_module_destroy(m);
    fbnt_ref_module_free(&ref);
  }
}

/* dx only, daddend only, neither (gradients only). */
static void test_backward_optional_outputs(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  fbnt_ref_module ref;
  fbn_module *m = make(&rng, &ref, 2, FBN_DTYPE_FLOAT32, true, true);
  pass p;
  pass_init(&p, &rng, (fbn_tensor_desc){4, 2, 8, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NHWC});
  pass_forward(&p, m, &ref, p.saved, "forward");
  pass_backward(&p, m, &ref, p.saved, true, false, "dx only");
  pass_backward(&p, m, &ref, p.saved, false, true, "daddend only");
  pass_backward(&p, m, &ref, p.saved, false, false, "gradients only");
  pass_free(&p);
  fbn_module_destroy(m);
  fbnt_ref_module_free(&ref);
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
  fbn_module_options opt;
  fbn_module_options_init(&opt);
  opt.num_features = 3;
  fbnt_ref_module ref;
  memset(&ref, 0, sizeof ref);
  assert_int_equal(setenv("FBN_CPU_BACKEND", backend, 1), 0);
  fbn_module *m = NULL;
  const fbn_status cs = fbnt_module_create_random(&rng, &opt, &m, &ref);
  assert_int_equal(unsetenv("FBN_CPU_BACKEND"), 0);
  assert_int_equal(cs, FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_zero_grad(m), FBN_STATUS_SUCCESS);
  const fbn_tensor_desc d = {4, 3, 3, 5, FBN_DTYPE_FLOAT32, layout};
  const size_t count = fbnt_desc_numel(&d);
  void *x = fbnt_tensor_alloc(&d), *a = fbnt_tensor_alloc(&d), *y = fbnt_tensor_alloc(&d);
  void *dy = fbnt_tensor_alloc(&d), *dx = fbnt_tensor_alloc(&d), *da = fbnt_tensor_alloc(&d);
  double *yr = calloc(count, sizeof *yr), *dyr = calloc(count, sizeof *dyr);
  double *dxr = calloc(count, sizeof *dxr), *dar = calloc(count, sizeof *dar);
  assert_true(yr != NULL && dyr != NULL && dxr != NULL && dar != NULL);
  fbnt_fill_channels(&rng, &d, x, NULL);
  fbnt_fill_normal(&rng, &d, a, NULL, 1.0);
  fbnt_fill_normal(&rng, &d, dy, dyr, 1.0);
  fbnt_set(&d, x, 2, 1, 1, 3, NAN);
  fbnt_set(&d, a, 0, 2, 0, 0, NAN);
  fbnt_tensor_poison(&d, y);
  fbnt_tensor_poison(&d, dx);
  fbnt_tensor_poison(&d, da);
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
  fbn_module_destroy(m);
  fbnt_ref_module_free(&ref);
  fbnt_free(x);
  fbnt_free(a);
  fbnt_free(y);
  fbnt_free(dy);
  fbnt_free(dx);
  fbnt_free(da);
  free(yr);
  free(dyr);
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
