/*
 * The module API is a wrapper over the op API: a module and an op with the
 * same parameters give bit-identical y, running statistics, dx, daddend and
 * gradients on the same inputs (the wrapper adds no arithmetic). And the
 * module's operation option: BN alone and BN + ReLU modules against the
 * float64 reference, an addend given to them refused with the module
 * unchanged.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "fbn_testutil.h"

/* A copy of one module buffer (host memory on the CPU). */
static void *buffer_copy(fbn_module *m, fbn_buffer which, size_t bytes) {
  void *p = NULL;
  assert_int_equal(fbn_module_buffer_data(m, which, &p), FBN_STATUS_SUCCESS);
  void *c = fbnt_alloc(bytes);
  memcpy(c, p, bytes);
  return c;
}

static bool same(const char *name, const char *what, const void *a, const void *b, size_t bytes) {
  if (memcmp(a, b, bytes) == 0)
    return true;
  print_error("%s: %s differs between the module and the op\n", name, what);
  return false;
}

static bool buffer_same(const char *name, fbn_module *m, fbn_buffer which, const void *op_copy,
                        size_t bytes) {
  void *p = NULL;
  assert_int_equal(fbn_module_buffer_data(m, which, &p), FBN_STATUS_SUCCESS);
  static const char *names[6] = {"weight", "bias", "running_mean", "running_var", "weight_grad",
                                 "bias_grad"};
  return same(name, names[which], p, op_copy, bytes);
}

/* Forward (training, then eval) and backward through a module and through
 * an op on copies of its buffers (the buffers the module has: weight, bias
 * and their gradients when affine, the running statistics when tracked). */
static bool compare_one(fbnt_rng *rng, const char *backend, fbn_operation operation,
                        bool addend, fbn_layout layout, fbn_dtype dtype, bool affine,
                        bool tracked, bool cumulative) {
  char name[200];
  snprintf(name, sizeof name, "%s %s addend=%d %s %s affine=%d tracked=%d cumulative=%d", backend,
           fbn_operation_name(operation), addend, fbnt_layout_str(layout), fbnt_dtype_str(dtype),
           affine, tracked, cumulative);
  assert_int_equal(setenv("FBN_CPU_BACKEND", backend, 1), 0);
  const int64_t C = 4;
  const fbn_dtype pt = dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  const size_t pbytes = (size_t)C * fbn_dtype_size(pt);
  fbn_module_options mo;
  fbn_module_options_init(&mo);
  mo.num_features = C;
  mo.param_dtype = pt;
  mo.operation = operation;
  mo.affine = affine;
  mo.track_running_stats = tracked;
  mo.cumulative_average = cumulative;
  fbn_module *m = NULL;
  assert_int_equal(fbnt_module_create_random(rng, &mo, &m, NULL), FBN_STATUS_SUCCESS);
  int64_t nbt = 0;
  if (tracked)
    assert_int_equal(fbn_module_get_num_batches_tracked(m, &nbt), FBN_STATUS_SUCCESS);

  void *w = affine ? buffer_copy(m, FBN_BUFFER_WEIGHT, pbytes) : NULL;
  void *b = affine ? buffer_copy(m, FBN_BUFFER_BIAS, pbytes) : NULL;
  void *rm = tracked ? buffer_copy(m, FBN_BUFFER_RUNNING_MEAN, pbytes) : NULL;
  void *rv = tracked ? buffer_copy(m, FBN_BUFFER_RUNNING_VAR, pbytes) : NULL;
  void *gw = affine ? buffer_copy(m, FBN_BUFFER_WEIGHT_GRAD, pbytes) : NULL;
  void *gb = affine ? buffer_copy(m, FBN_BUFFER_BIAS_GRAD, pbytes) : NULL;

  const fbn_tensor_desc d = fbn_tensor_desc_make(3, C, 5, 7, dtype, layout);
  const size_t bytes = fbnt_desc_numel(&d) * fbn_dtype_size(dtype);
  void *x = fbnt_tensor_alloc(&d), *z = fbnt_tensor_alloc(&d), *dy = fbnt_tensor_alloc(&d);
  void *y1 = fbnt_tensor_alloc(&d), *y2 = fbnt_tensor_alloc(&d);
  void *dx1 = fbnt_tensor_alloc(&d), *dx2 = fbnt_tensor_alloc(&d);
  void *dz1 = fbnt_tensor_alloc(&d), *dz2 = fbnt_tensor_alloc(&d);
  fbnt_fill_channels(rng, &d, x, NULL);
  fbnt_fill_normal(rng, &d, z, NULL, 1.0);
  fbnt_fill_normal(rng, &d, dy, NULL, 1.0);
  const bool with_z = addend && operation == FBN_OPERATION_BN_ADD_RELU;
  const fbn_operation run = operation == FBN_OPERATION_BN_ADD_RELU && !with_z
                                ? FBN_OPERATION_BN_RELU
                                : operation;
  bool ok = true;

  for (int pass = 0; pass < 2 && ok; pass++) {
    const bool training = pass == 0;
    assert_int_equal(fbn_module_set_training(m, training), FBN_STATUS_SUCCESS);
    fbn_op_desc od;
    fbn_op_desc_init(&od);
    od.num_features = C;
    od.dtype = dtype;
    od.param_dtype = pt;
    od.layout = layout;
    od.operation = run;
    od.affine = affine;
    /* without running statistics eval normalizes with the batch's */
    const bool batch_stats = training || !tracked;
    od.statistics = batch_stats ? FBN_STATISTICS_BATCH : FBN_STATISTICS_RUNNING;
    fbn_op *op = NULL;
    assert_int_equal(fbn_op_create(&od, &op), FBN_STATUS_SUCCESS);
    size_t sb = 0, wsf = 0, wsb = 0;
    assert_int_equal(fbn_op_saved_size(op, &d, &sb), FBN_STATUS_SUCCESS);
    assert_int_equal(fbn_op_forward_workspace_size(op, &d, &wsf), FBN_STATUS_SUCCESS);
    assert_int_equal(fbn_op_backward_workspace_size(op, &d, &wsb), FBN_STATUS_SUCCESS);
    void *saved = fbnt_alloc(sb), *ws = fbnt_alloc(wsf > wsb ? wsf : wsb);
    fbn_saved *ms = NULL;
    assert_int_equal(fbn_saved_create(&ms), FBN_STATUS_SUCCESS);

    double factor = 0.0;
    if (training && tracked) {
      nbt += 1;
      assert_int_equal(fbn_running_average_factor(mo.momentum, cumulative, nbt, &factor),
                       FBN_STATUS_SUCCESS);
    }
    fbnt_tensor_poison(&d, y1);
    fbnt_tensor_poison(&d, y2);
    assert_int_equal(fbn_module_forward(m, &d, x, with_z ? z : NULL, y1, ms, NULL, 0),
                     FBN_STATUS_SUCCESS);
    assert_int_equal(fbn_op_forward(op, &d, x, with_z ? z : NULL, y2, w, b, rm, rv, factor,
                                    saved, sb, ws, wsf),
                     FBN_STATUS_SUCCESS);
    ok &= same(name, "y", y1, y2, bytes);
    if (tracked) {
      ok &= buffer_same(name, m, FBN_BUFFER_RUNNING_MEAN, rm, pbytes);
      ok &= buffer_same(name, m, FBN_BUFFER_RUNNING_VAR, rv, pbytes);
    }

    fbnt_tensor_poison(&d, dx1);
    fbnt_tensor_poison(&d, dx2);
    fbnt_tensor_poison(&d, dz1);
    fbnt_tensor_poison(&d, dz2);
    const void *ym = operation == FBN_OPERATION_BN ? NULL : y1;
    assert_int_equal(fbn_module_backward(m, ms, &d, x, ym, dy, dx1, with_z ? dz1 : NULL, NULL, 0),
                     FBN_STATUS_SUCCESS);
    assert_int_equal(fbn_op_backward(op, &d, x, operation == FBN_OPERATION_BN ? NULL : y2, dy,
                                     saved, sb, w, b, dx2, with_z ? dz2 : NULL, gw, gb,
                                     FBN_PARAM_GRAD_ACCUMULATE, ws, wsb),
                     FBN_STATUS_SUCCESS);
    ok &= same(name, "dx", dx1, dx2, bytes);
    if (with_z)
      ok &= same(name, "daddend", dz1, dz2, bytes);
    if (affine) {
      ok &= buffer_same(name, m, FBN_BUFFER_WEIGHT_GRAD, gw, pbytes);
      ok &= buffer_same(name, m, FBN_BUFFER_BIAS_GRAD, gb, pbytes);
    }
    fbn_saved_destroy(ms);
    fbnt_free(saved);
    fbnt_free(ws);
    fbn_op_destroy(op);
  }
  if (tracked) {
    int64_t after = 0;
    assert_int_equal(fbn_module_get_num_batches_tracked(m, &after), FBN_STATUS_SUCCESS);
    assert_int_equal(after, nbt);
  }
  void *bufs[] = {w, b, rm, rv, gw, gb, x, z, dy, y1, y2, dx1, dx2, dz1, dz2};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    fbnt_free(bufs[i]);
  fbn_module_destroy(m);
  unsetenv("FBN_CPU_BACKEND");
  return ok;
}

static void test_op_module_bit_identical(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, "test_op_module_bit_identical");
  static const char *backends[2] = {"fast", "reference"};
  int failures = 0, cases = 0;
  /* affine x track_running_stats; momentum and the cumulative average
   * alternate over layout x dtype, so each flag pair meets both */
  for (int be = 0; be < 2; be++)
    for (int op = 0; op < 3; op++)
      for (int addend = 0; addend < 2; addend++)
        for (int layout = 0; layout < 2; layout++)
          for (int dt = 0; dt < 2; dt++)
            for (int flags = 0; flags < 4; flags++) {
              if (addend && op != FBN_OPERATION_BN_ADD_RELU)
                continue;
              cases++;
              if (!compare_one(&rng, backends[be], (fbn_operation)op, addend,
                               layout ? FBN_LAYOUT_NHWC : FBN_LAYOUT_NCHW,
                               dt ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32, flags & 1, flags & 2,
                               (layout + dt + flags) % 2 == 1))
                failures++;
            }
  if (failures > 0)
    fail_msg("%d of %d configurations differ", failures, cases);
}

/* BN alone / BN + ReLU modules against the reference; backward of BN alone
 * with y = NULL. */
static void module_operation_case(fbnt_rng *rng, fbn_operation operation, bool training) {
  const int64_t C = 3;
  fbn_module_options mo;
  fbn_module_options_init(&mo);
  mo.num_features = C;
  mo.operation = operation;
  fbn_module *m = NULL;
  fbnt_ref_module ref;
  memset(&ref, 0, sizeof ref);
  fbnt_ref_module_init(&ref, C);
  assert_int_equal(fbnt_module_create_random(rng, &mo, &m, &ref), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_set_training(m, training), FBN_STATUS_SUCCESS);
  ref.training = training;
  const fbn_tensor_desc d = fbn_tensor_desc_make(4, C, 8, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  const size_t count = fbnt_desc_numel(&d);
  void *x = fbnt_tensor_alloc(&d), *y = fbnt_tensor_alloc(&d), *dy = fbnt_tensor_alloc(&d);
  void *dx = fbnt_tensor_alloc(&d);
  double *xr = calloc(count, sizeof(double)), *yr = calloc(count, sizeof(double));
  double *pre = calloc(count, sizeof(double)), *dyr = calloc(count, sizeof(double));
  double *dxr = calloc(count, sizeof(double)), *gate = calloc(count, sizeof(double));
  assert_true(xr && yr && pre && dyr && dxr && gate);
  fbnt_fill_channels(rng, &d, x, xr);
  fbnt_fill_normal(rng, &d, dy, dyr, 1.0);
  fbnt_tensor_poison(&d, y);
  fbnt_tensor_poison(&d, dx);
  fbnt_ref_preactivation(&ref, d.n, d.h, d.w, xr, NULL, pre);
  fbnt_ref_saved rs;
  fbnt_ref_saved_init(&rs);
  assert_true(fbnt_ref_forward(&ref, d.n, d.h, d.w, xr, NULL, yr, &rs));
  const bool bn = operation == FBN_OPERATION_BN;
  for (size_t i = 0; i < count; i++)
    gate[i] = bn ? 1.0 : yr[i];
  fbnt_ref_backward(&ref, &rs, xr, gate, dyr, dxr, NULL);

  fbn_saved *saved = NULL;
  assert_int_equal(fbn_saved_create(&saved), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_forward(m, &d, x, NULL, y, saved, NULL, 0), FBN_STATUS_SUCCESS);
  char name[96];
  snprintf(name, sizeof name, "module %s %s", fbn_operation_name(operation),
           training ? "train" : "eval");
  assert_true(fbnt_check_tensor(name, "y", &d, y, bn ? pre : yr));
  assert_int_equal(fbn_module_backward(m, saved, &d, x, bn ? NULL : y, dy, dx, NULL, NULL, 0),
                   FBN_STATUS_SUCCESS);
  assert_true(fbnt_check_tensor(name, "dx", &d, dx, dxr));
  assert_true(fbnt_check_module(name, m, &ref, 1e-5, true));

  /* an addend is refused, the module unchanged */
  fbnt_state before, after;
  fbnt_state_capture(m, &before);
  memcpy(dx, y, count * sizeof(float));
  assert_int_equal(fbn_module_forward(m, &d, x, dy, y, saved, NULL, 0), FBN_STATUS_INVALID_VALUE);
  assert_non_null(strstr(fbn_last_error_message(), "takes no addend"));
  assert_non_null(strstr(fbn_last_error_message(), fbn_operation_name(operation)));
  assert_memory_equal(dx, y, count * sizeof(float));
  fbnt_state_capture(m, &after);
  assert_true(fbnt_state_equal(&before, &after));
  fbnt_state_free(&before);
  fbnt_state_free(&after);

  fbn_saved_destroy(saved);
  fbnt_ref_saved_free(&rs);
  fbnt_ref_module_free(&ref);
  fbn_module_destroy(m);
  fbnt_free(x);
  fbnt_free(y);
  fbnt_free(dy);
  fbnt_free(dx);
  free(xr);
  free(yr);
  free(pre);
  free(dyr);
  free(dxr);
  free(gate);
}

static void test_op_module_operation_option(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, "test_op_module_operation_option");
  for (int op = 0; op < 2; op++)
    for (int training = 0; training < 2; training++)
      module_operation_case(&rng, (fbn_operation)op, training);
}

/* A forward that fails after the saved object was handed over (here: the
 * caller's workspace overlaps x, found by the op layer) leaves the saved
 * object bound to the earlier forward: its backward still runs and matches
 * the reference. Twice: with the same shape, and with a larger one, whose
 * saved state needs more memory than the object holds. */
static void test_op_module_failed_forward_keeps_saved(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, "test_op_module_failed_forward_keeps_saved");
  const int64_t C = 3;
  fbn_module_options mo;
  fbn_module_options_init(&mo);
  mo.num_features = C;
  fbn_module *m = NULL;
  fbnt_ref_module ref;
  memset(&ref, 0, sizeof ref);
  fbnt_ref_module_init(&ref, C);
  assert_int_equal(fbnt_module_create_random(&rng, &mo, &m, &ref), FBN_STATUS_SUCCESS);
  const fbn_tensor_desc d = fbn_tensor_desc_make(4, C, 8, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  const fbn_tensor_desc big = fbn_tensor_desc_make(32, C, 8, 3, FBN_DTYPE_FLOAT32,
                                                   FBN_LAYOUT_NCHW);
  const size_t count = fbnt_desc_numel(&d);
  /* x and xb start blocks that the failing calls also pass as workspace:
   * larger than any need, so the module takes them */
  const size_t blob = (size_t)1 << 22;
  void *x = fbnt_alloc(blob), *z = fbnt_tensor_alloc(&d), *y = fbnt_tensor_alloc(&d);
  void *dy = fbnt_tensor_alloc(&d), *dx = fbnt_tensor_alloc(&d), *dz = fbnt_tensor_alloc(&d);
  void *xb = fbnt_alloc(blob), *yb = fbnt_tensor_alloc(&big);
  double *xr = calloc(count, sizeof(double)), *zr = calloc(count, sizeof(double));
  double *yr = calloc(count, sizeof(double)), *dyr = calloc(count, sizeof(double));
  double *dxr = calloc(count, sizeof(double)), *dzr = calloc(count, sizeof(double));
  assert_true(xr && zr && yr && dyr && dxr && dzr);
  fbnt_fill_channels(&rng, &d, x, xr);
  fbnt_fill_normal(&rng, &d, z, zr, 1.0);
  fbnt_fill_normal(&rng, &d, dy, dyr, 1.0);
  fbnt_fill_channels(&rng, &big, xb, NULL);
  fbnt_tensor_poison(&d, y);
  fbnt_ref_saved rs;
  fbnt_ref_saved_init(&rs);
  assert_true(fbnt_ref_forward(&ref, d.n, d.h, d.w, xr, zr, yr, &rs));
  fbnt_ref_backward(&ref, &rs, xr, yr, dyr, dxr, dzr);

  fbn_saved *saved = NULL;
  assert_int_equal(fbn_saved_create(&saved), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_forward(m, &d, x, z, y, saved, NULL, 0), FBN_STATUS_SUCCESS);
  assert_true(fbnt_check_tensor("failed forward keeps saved", "y", &d, y, yr));
  void *y2 = fbnt_tensor_alloc(&big);
  fbnt_tensor_poison(&big, y2);
  memcpy(yb, y2, fbnt_desc_numel(&big) * sizeof(float));
  assert_int_equal(fbn_module_forward(m, &d, x, z, y2, saved, x, blob), FBN_STATUS_ALIASING);
  assert_non_null(strstr(fbn_last_error_message(), "workspace overlaps x"));
  assert_int_equal(fbn_module_forward(m, &big, xb, NULL, y2, saved, xb, blob),
                   FBN_STATUS_ALIASING);
  assert_memory_equal(y2, yb, fbnt_desc_numel(&big) * sizeof(float));

  fbnt_tensor_poison(&d, dx);
  fbnt_tensor_poison(&d, dz);
  fbn_status st = fbn_module_backward(m, saved, &d, x, y, dy, dx, dz, NULL, 0);
  if (st != FBN_STATUS_SUCCESS)
    fail_msg("backward after a failed forward: %s: %s", fbn_status_string(st),
             fbn_last_error_message());
  assert_true(fbnt_check_tensor("failed forward keeps saved", "dx", &d, dx, dxr));
  assert_true(fbnt_check_tensor("failed forward keeps saved", "daddend", &d, dz, dzr));
  /* running statistics, num_batches_tracked and gradients: one forward */
  assert_true(fbnt_check_module("failed forward keeps saved", m, &ref, 1e-5, true));

  fbn_saved_destroy(saved);
  fbnt_ref_saved_free(&rs);
  fbnt_ref_module_free(&ref);
  fbn_module_destroy(m);
  void *bufs[] = {x, z, y, dy, dx, dz, xb, yb, y2};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    fbnt_free(bufs[i]);
  double *refs[] = {xr, zr, yr, dyr, dxr, dzr};
  for (size_t i = 0; i < sizeof refs / sizeof refs[0]; i++)
    free(refs[i]);
}

static void test_op_module_rejects_unknown_operation(void **state) {
  (void)state;
  fbn_module_options mo;
  fbn_module_options_init(&mo);
  assert_int_equal(mo.operation, FBN_OPERATION_BN_ADD_RELU);
  mo.num_features = 2;
  mo.operation = (fbn_operation)3;
  fbn_module *m = (fbn_module *)&mo;
  assert_int_equal(fbn_module_create(&mo, &m), FBN_STATUS_INVALID_VALUE);
  assert_null(m);
  assert_non_null(strstr(fbn_last_error_message(), "operation = 3"));
  assert_non_null(strstr(fbn_last_error_message(), "fbn_module_create"));
  assert_string_equal(fbn_operation_name((fbn_operation)3), "unknown operation");
  assert_string_equal(fbn_operation_name(FBN_OPERATION_BN_RELU), "bn_relu");
}

int main(int argc, char **argv) {
  fbnt_parse_args(argc, argv);
  unsetenv("FBN_CPU_BACKEND");
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_op_module_bit_identical),
      cmocka_unit_test(test_op_module_operation_option),
      cmocka_unit_test(test_op_module_failed_forward_keeps_saved),
      cmocka_unit_test(test_op_module_rejects_unknown_operation),
  };
  return cmocka_run_group_tests_name("op_module", tests, NULL, NULL);
}
