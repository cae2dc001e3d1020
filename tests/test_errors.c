/*
 * Bad input: one test per rule. Each asserts the exact status documented
 * in fusedbn.h, a non-empty fbn_last_error_message(), that the module's
 * state (options, mode, weight, bias, running statistics,
 * num_batches_tracked, gradients) is bitwise unchanged, and that no input
 * or output buffer was touched.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "fbn_config.h"
#include "fbn_testutil.h"

#define C 3

typedef struct fx {
  fbnt_rng rng;
  fbn_module *m;       /* C = 3, float32, affine, tracked, training, random state */
  fbn_module *other;   /* a second module like m */
  fbn_tensor_desc d;   /* (4, 3, 5, 2) float32 NCHW */
  size_t bytes;        /* bytes of one tensor of d */
  /* each allocated twice as large as d needs, for partial-overlap tests */
  unsigned char *x, *a, *y, *dy, *dx, *da;
  unsigned char *copy[6];
  fbn_saved *saved;        /* filled by m's forward with addend */
  fbn_saved *saved_noadd;  /* filled by m's forward without addend */
  fbn_saved *saved_other;  /* filled by other's forward */
  fbn_saved *empty;        /* never filled */
  fbn_module *target;      /* module whose state must not change */
  fbnt_state before;
} fx;

static unsigned char **fx_buffers(fx *f, int i) {
  unsigned char **b[6] = {&f->x, &f->a, &f->y, &f->dy, &f->dx, &f->da};
  return b[i];
}

static fbn_module *fx_module(fbnt_rng *rng, fbn_dtype dtype, bool affine, bool track) {
  const fbn_module_options opt =
      fbnt_options(&(fbnt_spec){.c = C, .dtype = dtype, .no_affine = !affine, .no_track = !track});
  fbn_module *m = NULL;
  assert_int_equal(fbnt_module_create_random(rng, &opt, &m, NULL), FBN_STATUS_SUCCESS);
  return m;
}

/* Snapshot target and every buffer: what a failing call must not change. */
static void fx_retarget(fx *f, fbn_module *target) {
  if (f->target != NULL) {
    fbnt_state_free(&f->before);
  }
  f->target = target;
  fbnt_state_capture(target, &f->before);
}

static int fx_setup(void **state) {
  fx *f = calloc(1, sizeof *f);
  assert_non_null(f);
  fbnt_rng_init(&f->rng, fbnt_seed(), 77);
  f->m = fx_module(&f->rng, FBN_DTYPE_FLOAT32, true, true);
  f->other = fx_module(&f->rng, FBN_DTYPE_FLOAT32, true, true);
  f->d = fbn_tensor_desc_make(4, C, 5, 2, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  f->bytes = fbnt_desc_numel(&f->d) * sizeof(float);
  fbn_tensor_desc twice = f->d;
  twice.n *= 2;
  for (int i = 0; i < 6; i++) {
    *fx_buffers(f, i) = fbnt_tensor_alloc(&twice);
    fbnt_fill_channels(&f->rng, &twice, *fx_buffers(f, i), NULL);
  }
  assert_int_equal(fbn_saved_create(&f->saved), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_saved_create(&f->saved_noadd), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_saved_create(&f->saved_other), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_saved_create(&f->empty), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_forward(f->m, &f->d, f->x, f->a, f->y, f->saved, NULL, 0),
                   FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_forward(f->other, &f->d, f->x, f->a, f->y, f->saved_other, NULL, 0),
                   FBN_STATUS_SUCCESS);
  /* y of the last forward of m stays valid for backward */
  assert_int_equal(fbn_module_forward(f->m, &f->d, f->x, NULL, f->y, f->saved_noadd, NULL, 0),
                   FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_forward(f->m, &f->d, f->x, f->a, f->y, f->saved, NULL, 0),
                   FBN_STATUS_SUCCESS);
  /* outputs poisoned: a failing call must leave them so */
  fbn_tensor_desc all = twice;
  fbnt_tensor_poison(&all, f->dx);
  fbnt_tensor_poison(&all, f->da);
  for (int i = 0; i < 6; i++) {
    f->copy[i] = fbnt_alloc(2 * f->bytes);
    memcpy(f->copy[i], *fx_buffers(f, i), 2 * f->bytes);
  }
  fx_retarget(f, f->m);
  *state = f;
  return 0;
}

static int fx_teardown(void **state) {
  fx *f = *state;
  fbnt_state_free(&f->before);
  for (int i = 0; i < 6; i++) {
    fbnt_free(*fx_buffers(f, i));
    fbnt_free(f->copy[i]);
  }
  fbn_saved_destroy(f->saved);
  fbn_saved_destroy(f->saved_noadd);
  fbn_saved_destroy(f->saved_other);
  fbn_saved_destroy(f->empty);
  fbn_module_destroy(f->m);
  fbn_module_destroy(f->other);
  free(f);
  return 0;
}

static void expect_failure(fx *f, fbn_status got, fbn_status want, const char *call, int line) {
  const char *msg = fbn_last_error_message();
  if (got != want) {
    fail_msg("line %d: %s returned %s, want %s (message: \"%s\")", line, call,
             fbn_status_string(got), fbn_status_string(want), msg != NULL ? msg : "(NULL)");
  }
  if (msg == NULL || msg[0] == '\0') {
    fail_msg("line %d: %s returned %s with an empty error message", line, call,
             fbn_status_string(got));
  }
  if (getenv("FBN_TEST_VERBOSE") != NULL) {
    print_message("#   %s -> %s: %s\n", call, fbn_status_string(got), msg);
  }
  if (f == NULL) {
    return;
  }
  fbnt_state after;
  fbnt_state_capture(f->target, &after);
  bool same = fbnt_state_equal(&f->before, &after);
  fbnt_state_free(&after);
  if (!same) {
    fail_msg("line %d: %s changed the module's state", line, call);
  }
  static const char *names[6] = {"x", "addend", "y", "dy", "dx", "daddend"};
  for (int i = 0; i < 6; i++) {
    if (memcmp(*fx_buffers(f, i), f->copy[i], 2 * f->bytes) != 0) {
      fail_msg("line %d: %s wrote to %s", line, call, names[i]);
    }
  }
}

#define FAILS(call, want) expect_failure(f, (call), (want), #call, __LINE__)
#define FX fx *f = *state

/* ---- module creation ------------------------------------------------------- */

static void expect_create_fails(fbn_module_options opt, fbn_status want, const char *what,
                                int line) {
  fbn_module *m = (fbn_module *)(uintptr_t)0x10; /* must be reset to NULL */
  fbn_status st = fbn_module_create(&opt, &m);
  expect_failure(NULL, st, want, what, line);
  if (m != NULL) {
    fail_msg("line %d: %s: *out not set to NULL on failure", line, what);
  }
}

static fbn_module_options good_options(void) { return fbnt_options(&(fbnt_spec){.c = C}); }

#define CREATE_FAILS(field_assignment, want)                                                     \
  do {                                                                                           \
    fbn_module_options opt_ = good_options();                                                    \
    opt_.field_assignment;                                                                       \
    expect_create_fails(opt_, (want), #field_assignment, __LINE__);                             \
  } while (0)

static void test_create_rejects_null(void **state) {
  (void)state;
  fbn_module *m = (fbn_module *)(uintptr_t)0x10;
  expect_failure(NULL, fbn_module_create(NULL, &m), FBN_STATUS_NULL_POINTER, "create(NULL, &m)",
                 __LINE__);
  assert_null(m);
  fbn_module_options opt = good_options();
  expect_failure(NULL, fbn_module_create(&opt, NULL), FBN_STATUS_NULL_POINTER,
                 "create(&opt, NULL)", __LINE__);
}

static void test_create_rejects_num_features_not_positive(void **state) {
  (void)state;
  CREATE_FAILS(num_features = 0, FBN_STATUS_INVALID_VALUE);
  CREATE_FAILS(num_features = -3, FBN_STATUS_INVALID_VALUE);
}

static void test_create_rejects_bad_eps(void **state) {
  (void)state;
  CREATE_FAILS(eps = -1e-5, FBN_STATUS_INVALID_VALUE);
  CREATE_FAILS(eps = NAN, FBN_STATUS_INVALID_VALUE);
  CREATE_FAILS(eps = INFINITY, FBN_STATUS_INVALID_VALUE);
}

static void test_create_rejects_bad_momentum(void **state) {
  (void)state;
  CREATE_FAILS(momentum = -0.01, FBN_STATUS_INVALID_VALUE);
  CREATE_FAILS(momentum = 1.01, FBN_STATUS_INVALID_VALUE);
  CREATE_FAILS(momentum = NAN, FBN_STATUS_INVALID_VALUE);
}

static void test_create_accepts_edge_values(void **state) {
  (void)state;
  const double eps[] = {0.0, 1e-5};
  const double momentum[] = {0.0, 1.0};
  for (int i = 0; i < 2; i++) {
    fbn_module_options opt = good_options();
    opt.eps = eps[i];
    opt.momentum = momentum[i];
    fbn_module *m = NULL;
    assert_int_equal(fbn_module_create(&opt, &m), FBN_STATUS_SUCCESS);
    fbn_module_destroy(m);
  }
}

static void test_create_rejects_unknown_enums(void **state) {
  (void)state;
  CREATE_FAILS(param_dtype = (fbn_dtype)42, FBN_STATUS_INVALID_VALUE);
  CREATE_FAILS(param_dtype = (fbn_dtype)-1, FBN_STATUS_INVALID_VALUE);
  CREATE_FAILS(device = (fbn_device_type)7, FBN_STATUS_INVALID_VALUE);
  CREATE_FAILS(bn_mode = (fbn_bn_mode)9, FBN_STATUS_INVALID_VALUE);
}

static void test_create_cuda_without_device(void **state) {
  (void)state;
#if FBN_HAVE_CUDA
  if (access("/dev/nvidia0", F_OK) == 0) {
    print_message("# a CUDA device node exists: covered by the gpu suite\n");
    skip();
  }
#endif
  /* built without CUDA, or no device/driver: NO_DEVICE, with a message */
  CREATE_FAILS(device = FBN_DEVICE_CUDA, FBN_STATUS_NO_DEVICE);
  CREATE_FAILS(device = FBN_DEVICE_CUDA; opt_.param_dtype = FBN_DTYPE_FLOAT64,
               FBN_STATUS_NO_DEVICE);
}

/* ---- NULL pointers, one test per public function ----------------------------- */

static void test_null_get_options(void **state) {
  FX;
  fbn_module_options o;
  FAILS(fbn_module_get_options(NULL, &o), FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_get_options(f->m, NULL), FBN_STATUS_NULL_POINTER);
}

static void test_null_set_is_training(void **state) {
  FX;
  bool t;
  FAILS(fbn_module_set_training(NULL, false), FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_is_training(NULL, &t), FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_is_training(f->m, NULL), FBN_STATUS_NULL_POINTER);
}

static void test_null_resets_and_zero_grad(void **state) {
  FX;
  FAILS(fbn_module_reset_running_stats(NULL), FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_reset_parameters(NULL), FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_zero_grad(NULL), FBN_STATUS_NULL_POINTER);
}

static void test_null_read_buffer(void **state) {
  FX;
  double v[C];
  FAILS(fbn_module_read_buffer(NULL, FBN_BUFFER_WEIGHT, FBN_DTYPE_FLOAT64, v, C),
        FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_read_buffer(f->m, FBN_BUFFER_WEIGHT, FBN_DTYPE_FLOAT64, NULL, C),
        FBN_STATUS_NULL_POINTER);
}

static void test_null_write_buffer(void **state) {
  FX;
  double v[C] = {1, 2, 3};
  FAILS(fbn_module_write_buffer(NULL, FBN_BUFFER_BIAS, FBN_DTYPE_FLOAT64, v, C),
        FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_write_buffer(f->m, FBN_BUFFER_BIAS, FBN_DTYPE_FLOAT64, NULL, C),
        FBN_STATUS_NULL_POINTER);
}

static void test_null_buffer_data(void **state) {
  FX;
  void *p;
  FAILS(fbn_module_buffer_data(NULL, FBN_BUFFER_WEIGHT, &p), FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_buffer_data(f->m, FBN_BUFFER_WEIGHT, NULL), FBN_STATUS_NULL_POINTER);
}

static void test_null_num_batches_tracked(void **state) {
  FX;
  int64_t v;
  FAILS(fbn_module_get_num_batches_tracked(NULL, &v), FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_get_num_batches_tracked(f->m, NULL), FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_set_num_batches_tracked(NULL, 3), FBN_STATUS_NULL_POINTER);
}

static void test_null_saved_create(void **state) {
  FX;
  FAILS(fbn_saved_create(NULL), FBN_STATUS_NULL_POINTER);
}

static void test_null_workspace_size(void **state) {
  FX;
  size_t b;
  FAILS(fbn_module_forward_workspace_size(NULL, &f->d, true, &b), FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_forward_workspace_size(f->m, NULL, true, &b), FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_forward_workspace_size(f->m, &f->d, true, NULL), FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_backward_workspace_size(NULL, &f->d, true, &b), FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_backward_workspace_size(f->m, NULL, true, &b), FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_backward_workspace_size(f->m, &f->d, true, NULL), FBN_STATUS_NULL_POINTER);
}

static void test_null_forward(void **state) {
  FX;
  FAILS(fbn_module_forward(NULL, &f->d, f->x, f->a, f->y, f->saved, NULL, 0),
        FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_forward(f->m, NULL, f->x, f->a, f->y, f->saved, NULL, 0),
        FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_forward(f->m, &f->d, NULL, f->a, f->y, f->saved, NULL, 0),
        FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_forward(f->m, &f->d, f->x, f->a, NULL, f->saved, NULL, 0),
        FBN_STATUS_NULL_POINTER);
}

static void test_null_backward(void **state) {
  FX;
  FAILS(fbn_module_backward(NULL, f->saved, &f->d, f->x, f->y, f->dy, f->dx, f->da, NULL, 0),
        FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_backward(f->m, NULL, &f->d, f->x, f->y, f->dy, f->dx, f->da, NULL, 0),
        FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_backward(f->m, f->saved, NULL, f->x, f->y, f->dy, f->dx, f->da, NULL, 0),
        FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_backward(f->m, f->saved, &f->d, NULL, f->y, f->dy, f->dx, f->da, NULL, 0),
        FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_backward(f->m, f->saved, &f->d, f->x, NULL, f->dy, f->dx, f->da, NULL, 0),
        FBN_STATUS_NULL_POINTER);
  FAILS(fbn_module_backward(f->m, f->saved, &f->d, f->x, f->y, NULL, f->dx, f->da, NULL, 0),
        FBN_STATUS_NULL_POINTER);
}

/* ---- buffers --------------------------------------------------------------- */

static void test_buffer_rejects_unknown_buffer(void **state) {
  FX;
  double v[C] = {1, 2, 3};
  void *p;
  const fbn_buffer bad[2] = {(fbn_buffer)6, (fbn_buffer)-1};
  for (int i = 0; i < 2; i++) {
    FAILS(fbn_module_read_buffer(f->m, bad[i], FBN_DTYPE_FLOAT64, v, C), FBN_STATUS_INVALID_VALUE);
    FAILS(fbn_module_write_buffer(f->m, bad[i], FBN_DTYPE_FLOAT64, v, C),
          FBN_STATUS_INVALID_VALUE);
    FAILS(fbn_module_buffer_data(f->m, bad[i], &p), FBN_STATUS_INVALID_VALUE);
  }
  assert_true(v[0] == 1 && v[1] == 2 && v[2] == 3);
}

static void test_buffer_rejects_unknown_dtype(void **state) {
  FX;
  double v[C] = {1, 2, 3};
  FAILS(fbn_module_read_buffer(f->m, FBN_BUFFER_WEIGHT, (fbn_dtype)42, v, C),
        FBN_STATUS_INVALID_VALUE);
  FAILS(fbn_module_write_buffer(f->m, FBN_BUFFER_WEIGHT, (fbn_dtype)42, v, C),
        FBN_STATUS_INVALID_VALUE);
  assert_true(v[0] == 1 && v[1] == 2 && v[2] == 3);
}

static void test_buffer_rejects_wrong_count(void **state) {
  FX;
  double v[C + 1] = {1, 2, 3, 4};
  const size_t counts[3] = {C - 1, C + 1, 0};
  for (int i = 0; i < 3; i++) {
    FAILS(fbn_module_read_buffer(f->m, FBN_BUFFER_RUNNING_MEAN, FBN_DTYPE_FLOAT64, v, counts[i]),
          FBN_STATUS_SHAPE_MISMATCH);
    FAILS(fbn_module_write_buffer(f->m, FBN_BUFFER_RUNNING_VAR, FBN_DTYPE_FLOAT32, v, counts[i]),
          FBN_STATUS_SHAPE_MISMATCH);
  }
  assert_true(v[0] == 1 && v[3] == 4);
}

static void test_set_num_batches_tracked_rejects_negative(void **state) {
  FX;
  FAILS(fbn_module_set_num_batches_tracked(f->m, -1), FBN_STATUS_INVALID_VALUE);
  FAILS(fbn_module_set_num_batches_tracked(f->m, INT64_MIN), FBN_STATUS_INVALID_VALUE);
}

/* ---- tensor descriptions ----------------------------------------------------- */

/* The same bad desc must be refused by forward, backward and the size queries. */
static void fails_everywhere(fx *f, fbn_tensor_desc d, fbn_status want, const char *what,
                             int line) {
  char call[256];
  size_t b = 0;
  snprintf(call, sizeof call, "forward(%s)", what);
  expect_failure(f, fbn_module_forward(f->m, &d, f->x, f->a, f->y, f->saved, NULL, 0), want, call,
                 line);
  snprintf(call, sizeof call, "forward without addend or saved (%s)", what);
  expect_failure(f, fbn_module_forward(f->m, &d, f->x, NULL, f->y, NULL, NULL, 0), want, call,
                 line);
  snprintf(call, sizeof call, "backward(%s)", what);
  expect_failure(
      f, fbn_module_backward(f->m, f->saved, &d, f->x, f->y, f->dy, f->dx, f->da, NULL, 0), want,
      call, line);
  snprintf(call, sizeof call, "forward_workspace_size(%s)", what);
  expect_failure(f, fbn_module_forward_workspace_size(f->m, &d, true, &b), want, call, line);
  snprintf(call, sizeof call, "backward_workspace_size(%s)", what);
  expect_failure(f, fbn_module_backward_workspace_size(f->m, &d, true, &b), want, call, line);
}

#define DESC_FAILS(field_assignment, want)                                                       \
  do {                                                                                           \
    fbn_tensor_desc d_ = f->d;                                                                   \
    d_.field_assignment;                                                                         \
    fails_everywhere(f, d_, (want), #field_assignment, __LINE__);                               \
  } while (0)

static void test_desc_rejects_channel_mismatch(void **state) {
  FX;
  DESC_FAILS(c = C + 1, FBN_STATUS_SHAPE_MISMATCH);
  DESC_FAILS(c = C - 1, FBN_STATUS_SHAPE_MISMATCH);
}

static void test_desc_rejects_nonpositive_dims(void **state) {
  FX;
  DESC_FAILS(n = 0, FBN_STATUS_INVALID_SHAPE);
  DESC_FAILS(n = -4, FBN_STATUS_INVALID_SHAPE);
  DESC_FAILS(h = 0, FBN_STATUS_INVALID_SHAPE);
  DESC_FAILS(h = -1, FBN_STATUS_INVALID_SHAPE);
  DESC_FAILS(w = 0, FBN_STATUS_INVALID_SHAPE);
  DESC_FAILS(w = -2, FBN_STATUS_INVALID_SHAPE);
}

static void test_desc_rejects_overflowing_counts(void **state) {
  FX;
  DESC_FAILS(n = INT64_MAX, FBN_STATUS_INVALID_SHAPE);
  DESC_FAILS(n = INT64_C(1) << 62, FBN_STATUS_INVALID_SHAPE);
  /* products that wrap around to 0 and to a small positive count */
  DESC_FAILS(n = INT64_C(1) << 62; d_.h = 4; d_.w = 1, FBN_STATUS_INVALID_SHAPE);
  DESC_FAILS(n = (INT64_C(1) << 62) + 1; d_.h = 4; d_.w = 1, FBN_STATUS_INVALID_SHAPE);
  DESC_FAILS(h = INT64_C(1) << 32; d_.w = INT64_C(1) << 32, FBN_STATUS_INVALID_SHAPE);
}

static void test_desc_rejects_unknown_dtype_and_layout(void **state) {
  FX;
  DESC_FAILS(dtype = (fbn_dtype)42, FBN_STATUS_INVALID_VALUE);
  DESC_FAILS(layout = (fbn_layout)5, FBN_STATUS_INVALID_VALUE);
  DESC_FAILS(layout = (fbn_layout)-1, FBN_STATUS_INVALID_VALUE);
}

/* float16/bfloat16 tensors need float32 parameters: a float64 module
 * refuses them with a message naming both dtypes. */
static void test_desc_rejects_half_precision_with_float64_params(void **state) {
  FX;
  fbn_module *m64 = fx_module(&f->rng, FBN_DTYPE_FLOAT64, true, true);
  fx_retarget(f, m64);
  const fbn_dtype halves[2] = {FBN_DTYPE_FLOAT16, FBN_DTYPE_BFLOAT16};
  const char *want[2] = {"dtype = float16 with param_dtype = float64",
                         "dtype = bfloat16 with param_dtype = float64"};
  for (int i = 0; i < 2; i++) {
    fbn_tensor_desc h = f->d;
    h.dtype = halves[i];
    fbn_status st = fbn_module_forward(m64, &h, f->x, f->a, f->y, NULL, NULL, 0);
    if (strstr(fbn_last_error_message(), want[i]) == NULL)
      fail_msg("message \"%s\" does not say \"%s\"", fbn_last_error_message(), want[i]);
    FAILS(st, FBN_STATUS_UNSUPPORTED);
  }
  fx_retarget(f, f->m);
  fbn_module_destroy(m64);
}

static void test_desc_rejects_dtype_param_mismatch(void **state) {
  FX;
  /* float64 x needs param_dtype FLOAT64 */
  DESC_FAILS(dtype = FBN_DTYPE_FLOAT64, FBN_STATUS_UNSUPPORTED);
  /* and a float64 module takes float64 x only */
  fbn_module *m64 = fx_module(&f->rng, FBN_DTYPE_FLOAT64, true, true);
  fx_retarget(f, m64);
  FAILS(fbn_module_forward(m64, &f->d, f->x, f->a, f->y, NULL, NULL, 0), FBN_STATUS_UNSUPPORTED);
  fx_retarget(f, f->m);
  fbn_module_destroy(m64);
}

static void test_forward_training_rejects_one_value_per_channel(void **state) {
  FX;
  fbn_tensor_desc d = fbn_tensor_desc_make(1, C, 1, 1, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  FAILS(fbn_module_forward(f->m, &d, f->x, f->a, f->y, f->saved, NULL, 0),
        FBN_STATUS_INVALID_SHAPE);
  d.layout = FBN_LAYOUT_NHWC;
  FAILS(fbn_module_forward(f->m, &d, f->x, NULL, f->y, NULL, NULL, 0), FBN_STATUS_INVALID_SHAPE);
  /* eval without running statistics normalizes with the batch too */
  fbn_module *untracked = fx_module(&f->rng, FBN_DTYPE_FLOAT32, true, false);
  assert_int_equal(fbn_module_set_training(untracked, false), FBN_STATUS_SUCCESS);
  fx_retarget(f, untracked);
  FAILS(fbn_module_forward(untracked, &d, f->x, NULL, f->y, NULL, NULL, 0),
        FBN_STATUS_INVALID_SHAPE);
  fx_retarget(f, f->m);
  fbn_module_destroy(untracked);
}

/* ---- aliasing ---------------------------------------------------------------- */

static void test_forward_rejects_aliasing(void **state) {
  FX;
  FAILS(fbn_module_forward(f->m, &f->d, f->x, f->a, f->x, NULL, NULL, 0), FBN_STATUS_ALIASING);
  FAILS(fbn_module_forward(f->m, &f->d, f->x, f->a, f->a, NULL, NULL, 0), FBN_STATUS_ALIASING);
  FAILS(fbn_module_forward(f->m, &f->d, f->x, NULL, f->x, f->saved, NULL, 0),
        FBN_STATUS_ALIASING);
  /* partial overlaps, either way round */
  FAILS(fbn_module_forward(f->m, &f->d, f->x, f->a, f->x + sizeof(float), NULL, NULL, 0),
        FBN_STATUS_ALIASING);
  FAILS(fbn_module_forward(f->m, &f->d, f->x + f->bytes - sizeof(float), f->a, f->x, NULL, NULL,
                           0),
        FBN_STATUS_ALIASING);
  FAILS(fbn_module_forward(f->m, &f->d, f->x, f->a, f->a + f->bytes / 2, NULL, NULL, 0),
        FBN_STATUS_ALIASING);
}

static void test_backward_rejects_aliasing(void **state) {
  FX;
  FAILS(fbn_module_backward(f->m, f->saved, &f->d, f->x, f->y, f->dy, f->dy, f->da, NULL, 0),
        FBN_STATUS_ALIASING);
  FAILS(fbn_module_backward(f->m, f->saved, &f->d, f->x, f->y, f->dy, f->x, NULL, NULL, 0),
        FBN_STATUS_ALIASING);
  FAILS(fbn_module_backward(f->m, f->saved, &f->d, f->x, f->y, f->dy, f->y, NULL, NULL, 0),
        FBN_STATUS_ALIASING);
  FAILS(fbn_module_backward(f->m, f->saved, &f->d, f->x, f->y, f->dy, NULL, f->dy, NULL, 0),
        FBN_STATUS_ALIASING);
  FAILS(fbn_module_backward(f->m, f->saved, &f->d, f->x, f->y, f->dy, f->dx, f->dx, NULL, 0),
        FBN_STATUS_ALIASING);
  /* partial overlaps */
  FAILS(fbn_module_backward(f->m, f->saved, &f->d, f->x, f->y, f->dy, f->dy + f->bytes / 2, NULL,
                            NULL, 0),
        FBN_STATUS_ALIASING);
  FAILS(fbn_module_backward(f->m, f->saved, &f->d, f->x, f->y, f->dy, f->dx,
                            f->dx + f->bytes - sizeof(float), NULL, 0),
        FBN_STATUS_ALIASING);
}

/* ---- saved objects ------------------------------------------------------------ */

static void test_backward_rejects_empty_saved(void **state) {
  FX;
  FAILS(fbn_module_backward(f->m, f->empty, &f->d, f->x, f->y, f->dy, f->dx, NULL, NULL, 0),
        FBN_STATUS_INVALID_STATE);
}

static void test_backward_rejects_saved_of_other_module(void **state) {
  FX;
  FAILS(fbn_module_backward(f->m, f->saved_other, &f->d, f->x, f->y, f->dy, f->dx, f->da, NULL,
                            0),
        FBN_STATUS_INVALID_STATE);
  /* a destroyed module's saved object does not match a new module, even
   * one allocated at the same address */
  fbn_module *gone = fx_module(&f->rng, FBN_DTYPE_FLOAT32, true, true);
  fbn_saved *s = NULL;
  assert_int_equal(fbn_saved_create(&s), FBN_STATUS_SUCCESS);
  void *scratch_y = fbnt_tensor_alloc(&f->d);
  assert_int_equal(fbn_module_forward(gone, &f->d, f->x, NULL, scratch_y, s, NULL, 0),
                   FBN_STATUS_SUCCESS);
  fbnt_free(scratch_y);
  fbn_module_destroy(gone);
  fbn_module *fresh = fx_module(&f->rng, FBN_DTYPE_FLOAT32, true, true);
  fx_retarget(f, fresh);
  FAILS(fbn_module_backward(fresh, s, &f->d, f->x, f->y, f->dy, f->dx, NULL, NULL, 0),
        FBN_STATUS_INVALID_STATE);
  fx_retarget(f, f->m);
  fbn_module_destroy(fresh);
  fbn_saved_destroy(s);
}

static void test_backward_rejects_other_shape(void **state) {
  FX;
  fbn_tensor_desc d = f->d;
  d.n = 2; /* valid on its own, not what the forward recorded */
  FAILS(fbn_module_backward(f->m, f->saved, &d, f->x, f->y, f->dy, f->dx, f->da, NULL, 0),
        FBN_STATUS_SHAPE_MISMATCH);
  d = f->d;
  d.h = 2;
  d.w = 5;
  FAILS(fbn_module_backward(f->m, f->saved, &d, f->x, f->y, f->dy, f->dx, f->da, NULL, 0),
        FBN_STATUS_SHAPE_MISMATCH);
  d = f->d;
  d.layout = FBN_LAYOUT_NHWC;
  FAILS(fbn_module_backward(f->m, f->saved, &d, f->x, f->y, f->dy, f->dx, f->da, NULL, 0),
        FBN_STATUS_SHAPE_MISMATCH);
}

static void test_backward_rejects_daddend_without_addend(void **state) {
  FX;
  FAILS(fbn_module_backward(f->m, f->saved_noadd, &f->d, f->x, f->y, f->dy, f->dx, f->da, NULL, 0),
        FBN_STATUS_INVALID_STATE);
}

/* ---- workspace ----------------------------------------------------------------- */

static void test_forward_rejects_misaligned_workspace(void **state) {
  FX;
  unsigned char *ws = fbnt_alloc(4096);
  FAILS(fbn_module_forward(f->m, &f->d, f->x, f->a, f->y, f->saved, ws + 8, 1024),
        FBN_STATUS_INSUFFICIENT_WORKSPACE);
  FAILS(fbn_module_backward(f->m, f->saved, &f->d, f->x, f->y, f->dy, f->dx, f->da, ws + 8, 1024),
        FBN_STATUS_INSUFFICIENT_WORKSPACE);
  fbnt_free(ws);
}

/* ---- audit: every fallible core call names itself --------------------------------- */

/* expect_failure, and the message names the public function that failed. */
static void expect_named(fx *f, fbn_status got, fbn_status want, const char *call,
                         const char *name, int line) {
  /* copied first: the state checks of expect_failure make calls that succeed */
  char msg[1024];
  snprintf(msg, sizeof msg, "%s", fbn_last_error_message());
  expect_failure(f, got, want, call, line);
  if (strstr(msg, name) == NULL) {
    fail_msg("line %d: %s: message \"%s\" does not name %s", line, call, msg, name);
  }
}

#define FAILS_NAMED(name, call, want) expect_named(f, (call), (want), #call, #name, __LINE__)

static void test_messages_name_the_call(void **state) {
  FX;
  fbn_module_options o;
  bool t;
  double v[C] = {1, 2, 3};
  void *p;
  int64_t nbt;
  size_t b;
  fbn_module *m = NULL;
  fbn_module_options bad = good_options();
  bad.eps = -1.0;
  FAILS_NAMED(fbn_module_create, fbn_module_create(NULL, &m), FBN_STATUS_NULL_POINTER);
  FAILS_NAMED(fbn_module_create, fbn_module_create(&bad, &m), FBN_STATUS_INVALID_VALUE);
  assert_null(m);
  FAILS_NAMED(fbn_module_get_options, fbn_module_get_options(f->m, NULL),
              FBN_STATUS_NULL_POINTER);
  FAILS_NAMED(fbn_module_get_options, fbn_module_get_options(NULL, &o), FBN_STATUS_NULL_POINTER);
  FAILS_NAMED(fbn_module_set_training, fbn_module_set_training(NULL, true),
              FBN_STATUS_NULL_POINTER);
  FAILS_NAMED(fbn_module_is_training, fbn_module_is_training(f->m, NULL),
              FBN_STATUS_NULL_POINTER);
  FAILS_NAMED(fbn_module_is_training, fbn_module_is_training(NULL, &t), FBN_STATUS_NULL_POINTER);
  FAILS_NAMED(fbn_module_reset_running_stats, fbn_module_reset_running_stats(NULL),
              FBN_STATUS_NULL_POINTER);
  FAILS_NAMED(fbn_module_reset_parameters, fbn_module_reset_parameters(NULL),
              FBN_STATUS_NULL_POINTER);
  FAILS_NAMED(fbn_module_zero_grad, fbn_module_zero_grad(NULL), FBN_STATUS_NULL_POINTER);
  FAILS_NAMED(fbn_module_read_buffer,
              fbn_module_read_buffer(f->m, FBN_BUFFER_WEIGHT, FBN_DTYPE_FLOAT64, NULL, C),
              FBN_STATUS_NULL_POINTER);
  FAILS_NAMED(fbn_module_read_buffer,
              fbn_module_read_buffer(f->m, (fbn_buffer)6, FBN_DTYPE_FLOAT64, v, C),
              FBN_STATUS_INVALID_VALUE);
  FAILS_NAMED(fbn_module_read_buffer,
              fbn_module_read_buffer(f->m, FBN_BUFFER_BIAS, FBN_DTYPE_FLOAT64, v, C + 1),
              FBN_STATUS_SHAPE_MISMATCH);
  FAILS_NAMED(fbn_module_write_buffer,
              fbn_module_write_buffer(NULL, FBN_BUFFER_WEIGHT, FBN_DTYPE_FLOAT64, v, C),
              FBN_STATUS_NULL_POINTER);
  FAILS_NAMED(fbn_module_write_buffer,
              fbn_module_write_buffer(f->m, FBN_BUFFER_WEIGHT, (fbn_dtype)42, v, C),
              FBN_STATUS_INVALID_VALUE);
  FAILS_NAMED(fbn_module_write_buffer,
              fbn_module_write_buffer(f->m, FBN_BUFFER_WEIGHT, FBN_DTYPE_FLOAT64, v, C - 1),
              FBN_STATUS_SHAPE_MISMATCH);
  FAILS_NAMED(fbn_module_buffer_data, fbn_module_buffer_data(f->m, (fbn_buffer)-1, &p),
              FBN_STATUS_INVALID_VALUE);
  FAILS_NAMED(fbn_module_buffer_data, fbn_module_buffer_data(NULL, FBN_BUFFER_BIAS, &p),
              FBN_STATUS_NULL_POINTER);
  FAILS_NAMED(fbn_module_get_num_batches_tracked, fbn_module_get_num_batches_tracked(NULL, &nbt),
              FBN_STATUS_NULL_POINTER);
  FAILS_NAMED(fbn_module_set_num_batches_tracked, fbn_module_set_num_batches_tracked(f->m, -7),
              FBN_STATUS_INVALID_VALUE);
  FAILS_NAMED(fbn_saved_create, fbn_saved_create(NULL), FBN_STATUS_NULL_POINTER);
  fbn_tensor_desc wrong = f->d;
  wrong.c = C + 2;
  FAILS_NAMED(fbn_module_forward_workspace_size,
              fbn_module_forward_workspace_size(f->m, &wrong, false, &b),
              FBN_STATUS_SHAPE_MISMATCH);
  FAILS_NAMED(fbn_module_backward_workspace_size,
              fbn_module_backward_workspace_size(f->m, &wrong, false, &b),
              FBN_STATUS_SHAPE_MISMATCH);
  FAILS_NAMED(fbn_module_forward,
              fbn_module_forward(f->m, &wrong, f->x, f->a, f->y, f->saved, NULL, 0),
              FBN_STATUS_SHAPE_MISMATCH);
  FAILS_NAMED(fbn_module_forward,
              fbn_module_forward(f->m, &f->d, f->x, f->a, f->a, f->saved, NULL, 0),
              FBN_STATUS_ALIASING);
  FAILS_NAMED(fbn_module_backward,
              fbn_module_backward(f->m, f->saved, &wrong, f->x, f->y, f->dy, f->dx, f->da, NULL, 0),
              FBN_STATUS_SHAPE_MISMATCH);
  FAILS_NAMED(fbn_module_backward,
              fbn_module_backward(f->m, f->empty, &f->d, f->x, f->y, f->dy, f->dx, f->da, NULL, 0),
              FBN_STATUS_INVALID_STATE);
}

static void test_create_rejects_more_bad_options(void **state) {
  (void)state;
  CREATE_FAILS(num_features = (int64_t)INT32_MAX + 1, FBN_STATUS_INVALID_VALUE);
  CREATE_FAILS(num_features = INT64_MIN, FBN_STATUS_INVALID_VALUE);
  CREATE_FAILS(device_index = -1, FBN_STATUS_INVALID_VALUE);
  CREATE_FAILS(eps = -INFINITY, FBN_STATUS_INVALID_VALUE);
  CREATE_FAILS(momentum = INFINITY, FBN_STATUS_INVALID_VALUE);
  CREATE_FAILS(param_dtype = FBN_DTYPE_FLOAT16, FBN_STATUS_INVALID_VALUE);
  CREATE_FAILS(param_dtype = FBN_DTYPE_BFLOAT16, FBN_STATUS_INVALID_VALUE);
  CREATE_FAILS(device = (fbn_device_type)-1, FBN_STATUS_INVALID_VALUE);
  CREATE_FAILS(bn_mode = (fbn_bn_mode)-1, FBN_STATUS_INVALID_VALUE);
}

/* Host copies in half precision (accepted, tests/test_half_ref.c) with a
 * count other than num_features: SHAPE_MISMATCH, the host array and the
 * module untouched. */
static void test_buffer_half_host_copies_reject_bad_count(void **state) {
  FX;
  const fbn_dtype half[2] = {FBN_DTYPE_FLOAT16, FBN_DTYPE_BFLOAT16};
  for (int i = 0; i < 2; i++) {
    uint16_t v[C + 1] = {0x3c00, 0x4000, 0x4200, 0x4400};
    FAILS_NAMED(fbn_module_read_buffer,
                fbn_module_read_buffer(f->m, FBN_BUFFER_RUNNING_VAR, half[i], v, C + 1),
                FBN_STATUS_SHAPE_MISMATCH);
    assert_true(v[0] == 0x3c00 && v[1] == 0x4000 && v[2] == 0x4200 && v[3] == 0x4400);
    FAILS_NAMED(fbn_module_write_buffer,
                fbn_module_write_buffer(f->m, FBN_BUFFER_BIAS, half[i], v, C - 1),
                FBN_STATUS_SHAPE_MISMATCH);
  }
}

/* ABSENT buffers (affine = false, track_running_stats = false): the
 * status, a message naming the call, nothing changed or written. */
static void test_absent_buffers_fail_cleanly(void **state) {
  FX;
  fbn_module *bare = fx_module(&f->rng, FBN_DTYPE_FLOAT64, false, false);
  fx_retarget(f, bare);
  for (int b = 0; b < 6; b++) {
    double v[C] = {1, 2, 3};
    void *p = v;
    FAILS_NAMED(fbn_module_read_buffer,
                fbn_module_read_buffer(bare, (fbn_buffer)b, FBN_DTYPE_FLOAT64, v, C),
                FBN_STATUS_ABSENT);
    FAILS_NAMED(fbn_module_write_buffer,
                fbn_module_write_buffer(bare, (fbn_buffer)b, FBN_DTYPE_FLOAT32, v, C),
                FBN_STATUS_ABSENT);
    FAILS_NAMED(fbn_module_buffer_data, fbn_module_buffer_data(bare, (fbn_buffer)b, &p),
                FBN_STATUS_ABSENT);
    assert_true(v[0] == 1 && v[1] == 2 && v[2] == 3 && p == (void *)v);
  }
  int64_t nbt = 5;
  FAILS_NAMED(fbn_module_get_num_batches_tracked, fbn_module_get_num_batches_tracked(bare, &nbt),
              FBN_STATUS_ABSENT);
  assert_int_equal(nbt, 5);
  FAILS_NAMED(fbn_module_set_num_batches_tracked, fbn_module_set_num_batches_tracked(bare, 2),
              FBN_STATUS_ABSENT);
  fx_retarget(f, f->m);
  fbn_module_destroy(bare);
}

/* NULL is reported before any other problem of the same call. */
static void test_null_reported_first(void **state) {
  FX;
  fbn_tensor_desc wrong = f->d;
  wrong.c = C + 1;
  wrong.dtype = (fbn_dtype)42;
  FAILS_NAMED(fbn_module_forward,
              fbn_module_forward(f->m, &wrong, NULL, f->a, f->y, f->saved, NULL, 0),
              FBN_STATUS_NULL_POINTER);
  FAILS_NAMED(fbn_module_backward,
              fbn_module_backward(f->m, f->empty, &wrong, f->x, f->y, NULL, f->dx, f->da, NULL, 0),
              FBN_STATUS_NULL_POINTER);
  FAILS_NAMED(fbn_module_read_buffer,
              fbn_module_read_buffer(f->m, (fbn_buffer)9, (fbn_dtype)42, NULL, 0),
              FBN_STATUS_NULL_POINTER);
  size_t b = 0;
  FAILS_NAMED(fbn_module_forward_workspace_size,
              fbn_module_forward_workspace_size(f->m, &wrong, true, NULL),
              FBN_STATUS_NULL_POINTER);
  FAILS_NAMED(fbn_module_backward_workspace_size,
              fbn_module_backward_workspace_size(NULL, &wrong, true, &b), FBN_STATUS_NULL_POINTER);
}

/* The never-failing helpers with out-of-range input. */
static void test_helpers_with_bad_input(void **state) {
  (void)state;
  assert_int_equal(fbn_dtype_size((fbn_dtype)-1), 0);
  assert_int_equal(fbn_dtype_size((fbn_dtype)4), 0);
  const char *s = fbn_status_string((fbn_status)15);
  assert_non_null(s);
  assert_true(s[0] != '\0');
  assert_non_null(fbn_status_string((fbn_status)INT32_MIN));
  fbn_module_options_init(NULL);
  fbn_module_destroy(NULL);
  fbn_saved_destroy(NULL);
  assert_false(fbn_module_has_buffer(NULL, (fbn_buffer)42));
  /* the desc helper stores what it is given, even unknown enums (validated later) */
  fbn_tensor_desc d = fbn_tensor_desc_make(-1, 0, 3, 4, (fbn_dtype)42, (fbn_layout)7);
  assert_true(d.n == -1 && d.c == 0 && d.h == 3 && d.w == 4);
  assert_int_equal(d.dtype, 42);
  assert_int_equal(d.layout, 7);
  assert_non_null(fbn_last_error_message());
}

int main(int argc, char **argv) {
  fbnt_parse_args(argc, argv);
#define T(fn) cmocka_unit_test_setup_teardown(fn, fx_setup, fx_teardown)
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_create_rejects_null),
      cmocka_unit_test(test_create_rejects_num_features_not_positive),
      cmocka_unit_test(test_create_rejects_bad_eps),
      cmocka_unit_test(test_create_rejects_bad_momentum),
      cmocka_unit_test(test_create_accepts_edge_values),
      cmocka_unit_test(test_create_rejects_unknown_enums),
      cmocka_unit_test(test_create_cuda_without_device),
      T(test_null_get_options),
      T(test_null_set_is_training),
      T(test_null_resets_and_zero_grad),
      T(test_null_read_buffer),
      T(test_null_write_buffer),
      T(test_null_buffer_data),
      T(test_null_num_batches_tracked),
      T(test_null_saved_create),
      T(test_null_workspace_size),
      T(test_null_forward),
      T(test_null_backward),
      T(test_buffer_rejects_unknown_buffer),
      T(test_buffer_rejects_unknown_dtype),
      T(test_buffer_rejects_wrong_count),
      T(test_set_num_batches_tracked_rejects_negative),
      T(test_desc_rejects_channel_mismatch),
      T(test_desc_rejects_nonpositive_dims),
      T(test_desc_rejects_overflowing_counts),
      T(test_desc_rejects_unknown_dtype_and_layout),
      T(test_desc_rejects_half_precision_with_float64_params),
      T(test_desc_rejects_dtype_param_mismatch),
      T(test_forward_training_rejects_one_value_per_channel),
      T(test_forward_rejects_aliasing),
      T(test_backward_rejects_aliasing),
      T(test_backward_rejects_empty_saved),
      T(test_backward_rejects_saved_of_other_module),
      T(test_backward_rejects_other_shape),
      T(test_backward_rejects_daddend_without_addend),
      T(test_forward_rejects_misaligned_workspace),
      T(test_messages_name_the_call),
      cmocka_unit_test(test_create_rejects_more_bad_options),
      T(test_buffer_half_host_copies_reject_bad_count),
      T(test_absent_buffers_fail_cleanly),
      T(test_null_reported_first),
      cmocka_unit_test(test_helpers_with_bad_input),
  };
  return cmocka_run_group_tests_name("errors", tests, NULL, NULL);
}
