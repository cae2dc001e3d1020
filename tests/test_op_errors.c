/*
 * Bad input to every function of the op API: the documented status, a
 * message that names the call and the bad value, and nothing written: y,
 * dx, daddend, dweight, dbias, the running statistics and (for forward) the
 * saved memory are poisoned after setup's successful forward and compared
 * byte for byte with their poisoned state after every failing call.
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

#include "fbn_config.h"
#include "fbn_testutil.h"

#define C 3
#define NBUF 10

/* An op (fast CPU backend, float32 NCHW, C = 3, affine, batch statistics)
 * of each operation, a filled saved state, and poisoned outputs. */
typedef struct fx {
  fbn_op *op[3]; /* indexed by fbn_operation */
  fbn_op *running; /* BN_ADD_RELU with running statistics */
  fbn_tensor_desc d; /* (4, 3, 5, 2) */
  size_t bytes, saved_bytes;
  /* x, z, y, dy, dx, dz, weight, bias, rmean, rvar */
  unsigned char *buf[NBUF];
  unsigned char *copy[NBUF];
  unsigned char *dw, *db, *saved, *saved_copy;
  unsigned char *dw_copy, *db_copy;
  unsigned char *ws; /* WS_BYTES: workspace for the calls that succeed */
} fx;

#define WS_BYTES ((size_t)1 << 20)

enum { X, Z, Y, DY, DX, DZ, W, B, RM, RV };

static fbn_op *make(fbn_operation operation, fbn_statistics stats) {
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = C;
  od.operation = operation;
  od.statistics = stats;
  fbn_op *op = NULL;
  assert_int_equal(fbn_op_create(&od, &op), FBN_STATUS_SUCCESS);
  return op;
}

static void snapshot(fx *f) {
  for (int i = 0; i < NBUF; i++)
    memcpy(f->copy[i], f->buf[i], f->bytes);
  memcpy(f->saved_copy, f->saved, f->saved_bytes);
  memcpy(f->dw_copy, f->dw, 64);
  memcpy(f->db_copy, f->db, 64);
}

static int setup(void **state) {
  fx *f = calloc(1, sizeof *f);
  assert_non_null(f);
  unsetenv("FBN_CPU_BACKEND");
  for (int o = 0; o < 3; o++)
    f->op[o] = make((fbn_operation)o, FBN_STATISTICS_BATCH);
  f->running = make(FBN_OPERATION_BN_ADD_RELU, FBN_STATISTICS_RUNNING);
  f->d = fbn_tensor_desc_make(4, C, 5, 2, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  f->bytes = 2 * fbnt_desc_numel(&f->d) * sizeof(float); /* room for partial overlaps */
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, "op_errors");
  for (int i = 0; i < NBUF; i++) {
    f->buf[i] = fbnt_alloc(f->bytes);
    f->copy[i] = fbnt_alloc(f->bytes);
  }
  fbnt_fill_channels(&rng, &f->d, f->buf[X], NULL);
  fbnt_fill_normal(&rng, &f->d, f->buf[Z], NULL, 1.0);
  fbnt_fill_normal(&rng, &f->d, f->buf[DY], NULL, 1.0);
  float *w = (float *)f->buf[W], *b = (float *)f->buf[B], *rm = (float *)f->buf[RM],
        *rv = (float *)f->buf[RV];
  for (int c = 0; c < C; c++) {
    w[c] = 0.5f + 0.25f * (float)c;
    b[c] = -0.125f * (float)c;
    rm[c] = 0.3f * (float)c;
    rv[c] = 1.5f + (float)c;
  }
  assert_int_equal(fbn_op_saved_size(f->op[2], &f->d, &f->saved_bytes), FBN_STATUS_SUCCESS);
  f->saved = fbnt_alloc(f->saved_bytes + 64);
  f->saved_copy = fbnt_alloc(f->saved_bytes + 64);
  f->dw = fbnt_alloc(64);
  f->db = fbnt_alloc(64);
  f->dw_copy = fbnt_alloc(64);
  f->db_copy = fbnt_alloc(64);
  f->ws = fbnt_alloc(WS_BYTES);
  size_t need = 0;
  assert_int_equal(fbn_op_forward_workspace_size(f->op[2], &f->d, &need), FBN_STATUS_SUCCESS);
  assert_true(need <= WS_BYTES);
  assert_int_equal(fbn_op_forward(f->op[2], &f->d, f->buf[X], f->buf[Z], f->buf[Y], w, b,
                                  f->buf[RM], f->buf[RV], 0.1, f->saved, f->saved_bytes, f->ws,
                                  WS_BYTES),
                   FBN_STATUS_SUCCESS);
  /* every output poisoned (over the whole buffer): a failing call that
   * computed would change it. The saved state stays the forward's: the
   * backward tests need it (forward tests poison it, poison_saved). */
  const fbn_tensor_desc whole = fbn_tensor_desc_make(8, C, 5, 2, FBN_DTYPE_FLOAT32,
                                                     FBN_LAYOUT_NCHW);
  fbnt_tensor_poison(&whole, f->buf[Y]);
  fbnt_tensor_poison(&whole, f->buf[DX]);
  fbnt_tensor_poison(&whole, f->buf[DZ]);
  memset(f->buf[RM], 0x7f, 64);
  memset(f->buf[RV], 0x7f, 64);
  memset(f->dw, 0x7f, 64);
  memset(f->db, 0x7f, 64);
  snapshot(f);
  *state = f;
  return 0;
}

/* The saved memory poisoned, for tests of forward (which writes it). */
static void poison_saved(fx *f) {
  memset(f->saved, 0xa5, f->saved_bytes);
  snapshot(f);
}

static int teardown(void **state) {
  fx *f = *state;
  for (int o = 0; o < 3; o++)
    fbn_op_destroy(f->op[o]);
  fbn_op_destroy(f->running);
  for (int i = 0; i < NBUF; i++) {
    fbnt_free(f->buf[i]);
    fbnt_free(f->copy[i]);
  }
  fbnt_free(f->saved);
  fbnt_free(f->saved_copy);
  fbnt_free(f->dw);
  fbnt_free(f->db);
  fbnt_free(f->dw_copy);
  fbnt_free(f->db_copy);
  fbnt_free(f->ws);
  free(f);
  return 0;
}

/* got == want, the message names fn and contains needle, nothing written. */
static void expect(fx *f, fbn_status got, fbn_status want, const char *fn, const char *needle,
                   const char *call, int line) {
  const char *msg = fbn_last_error_message();
  if (got != want)
    fail_msg("line %d: %s: got %s, want %s (%s)", line, call, fbn_status_string(got),
             fbn_status_string(want), msg);
  if (strstr(msg, fn) == NULL)
    fail_msg("line %d: %s: message \"%s\" does not name %s", line, call, msg, fn);
  if (needle != NULL && strstr(msg, needle) == NULL)
    fail_msg("line %d: %s: message \"%s\" does not say \"%s\"", line, call, msg, needle);
  if (f == NULL)
    return;
  static const char *names[NBUF] = {"x", "addend", "y", "dy", "dx", "daddend",
                                    "weight", "bias", "running_mean", "running_var"};
  for (int i = 0; i < NBUF; i++)
    if (memcmp(f->buf[i], f->copy[i], f->bytes) != 0)
      fail_msg("line %d: %s: %s was written by a failing call", line, call, names[i]);
  if (memcmp(f->saved, f->saved_copy, f->saved_bytes) != 0)
    fail_msg("line %d: %s: the saved state was written by a failing call", line, call);
  if (memcmp(f->dw, f->dw_copy, 64) != 0 || memcmp(f->db, f->db_copy, 64) != 0)
    fail_msg("line %d: %s: dweight/dbias were written by a failing call", line, call);
}

#define FAILS(call, want, fn, needle) expect(f, (call), (want), fn, needle, #call, __LINE__)
#define FX fx *f = *state

/* Forward of f->op[o] with everything valid except what the macro
 * arguments replace. */
#define FWD(o, desc, x, z, y, w, b, rm, rv, factor, saved, sbytes, ws, wsbytes)                    \
  fbn_op_forward(f->op[o], desc, x, z, y, w, b, rm, rv, factor, saved, sbytes, ws, wsbytes)
#define GOOD_FWD_ARGS                                                                             \
  &f->d, f->buf[X], f->buf[Z], f->buf[Y], f->buf[W], f->buf[B], f->buf[RM], f->buf[RV], 0.1,   \
      f->saved, f->saved_bytes

/* ---- fbn_op_create / fbn_op_get_desc / fbn_op_destroy ------------------- */

static void create_fails(void (*edit)(fbn_op_desc *), fbn_status want, const char *needle,
                         int line) {
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = C;
  edit(&od);
  fbn_op *op = (fbn_op *)&od; /* must become NULL */
  expect(NULL, fbn_op_create(&od, &op), want, "fbn_op_create", needle, needle, line);
  if (op != NULL)
    fail_msg("line %d: fbn_op_create left *out non-NULL on failure", line);
}

#define EDIT(name, stmt)                                                                          \
  static void edit_##name(fbn_op_desc *d) { stmt; }
EDIT(c0, d->num_features = 0)
EDIT(cbig, d->num_features = (int64_t)INT32_MAX + 1)
EDIT(eps_neg, d->eps = -1e-3)
EDIT(eps_nan, d->eps = NAN)
EDIT(eps_inf, d->eps = INFINITY)
EDIT(dtype, d->dtype = (fbn_dtype)99)
EDIT(pdtype, d->param_dtype = FBN_DTYPE_FLOAT16)
EDIT(layout, d->layout = (fbn_layout)7)
EDIT(device, d->device = (fbn_device_type)5)
EDIT(device_index, d->device_index = -1)
EDIT(operation, d->operation = (fbn_operation)9)
EDIT(operation_neg, d->operation = (fbn_operation)-1)
EDIT(statistics, d->statistics = (fbn_statistics)4)
EDIT(bn_mode, d->bn_mode = (fbn_bn_mode)3)
EDIT(pair, d->dtype = FBN_DTYPE_FLOAT64)
EDIT(half, d->dtype = FBN_DTYPE_FLOAT16)
EDIT(cuda, d->device = FBN_DEVICE_CUDA)

static void test_op_create_rejects_bad_desc(void **state) {
  (void)state;
  unsetenv("FBN_CPU_BACKEND");
  create_fails(edit_c0, FBN_STATUS_INVALID_VALUE, "num_features = 0", __LINE__);
  create_fails(edit_cbig, FBN_STATUS_INVALID_VALUE, "num_features = 2147483648", __LINE__);
  create_fails(edit_eps_neg, FBN_STATUS_INVALID_VALUE, "eps = -0.001", __LINE__);
  create_fails(edit_eps_nan, FBN_STATUS_INVALID_VALUE, "eps = nan", __LINE__);
  create_fails(edit_eps_inf, FBN_STATUS_INVALID_VALUE, "eps = inf", __LINE__);
  create_fails(edit_dtype, FBN_STATUS_INVALID_VALUE, "dtype = 99", __LINE__);
  create_fails(edit_pdtype, FBN_STATUS_INVALID_VALUE, "param_dtype = 2 (float16)", __LINE__);
  create_fails(edit_layout, FBN_STATUS_INVALID_VALUE, "layout = 7", __LINE__);
  create_fails(edit_device, FBN_STATUS_INVALID_VALUE, "device = 5", __LINE__);
  create_fails(edit_device_index, FBN_STATUS_INVALID_VALUE, "device_index = -1", __LINE__);
  create_fails(edit_operation, FBN_STATUS_INVALID_VALUE, "operation = 9", __LINE__);
  create_fails(edit_operation_neg, FBN_STATUS_INVALID_VALUE, "operation = -1", __LINE__);
  create_fails(edit_statistics, FBN_STATUS_INVALID_VALUE, "statistics = 4", __LINE__);
  create_fails(edit_bn_mode, FBN_STATUS_INVALID_VALUE, "bn_mode = 3", __LINE__);
  create_fails(edit_pair, FBN_STATUS_UNSUPPORTED, "dtype = float64 with param_dtype = float32",
               __LINE__);
  /* Half tensors (float32 parameters) are no error: both CPU backends take them. */
  {
    static const char *backends[2] = {"reference", "fast"};
    for (int i = 0; i < 2; i++) {
      fbn_op_desc od;
      fbn_op_desc_init(&od);
      od.num_features = C;
      edit_half(&od);
      fbn_op *op = NULL;
      assert_int_equal(setenv("FBN_CPU_BACKEND", backends[i], 1), 0);
      assert_int_equal(fbn_op_create(&od, &op), FBN_STATUS_SUCCESS);
      assert_non_null(op);
      fbn_op_destroy(op);
    }
    assert_int_equal(unsetenv("FBN_CPU_BACKEND"), 0);
  }
#if !FBN_HAVE_CUDA
  create_fails(edit_cuda, FBN_STATUS_NO_DEVICE, "FBN_DEVICE_CUDA", __LINE__);
#else
  (void)edit_cuda;
#endif
  assert_int_equal(setenv("FBN_CPU_BACKEND", "fastest", 1), 0);
  create_fails(edit_c0, FBN_STATUS_INVALID_VALUE, "num_features = 0", __LINE__);
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = C;
  fbn_op *op = NULL;
  expect(NULL, fbn_op_create(&od, &op), FBN_STATUS_INVALID_VALUE, "fbn_op_create",
         "FBN_CPU_BACKEND = \"fastest\"", "create(FBN_CPU_BACKEND=fastest)", __LINE__);
  assert_null(op);
  unsetenv("FBN_CPU_BACKEND");
  expect(NULL, fbn_op_create(NULL, &op), FBN_STATUS_NULL_POINTER, "fbn_op_create", "desc is NULL",
         "create(NULL)", __LINE__);
  expect(NULL, fbn_op_create(&od, NULL), FBN_STATUS_NULL_POINTER, "fbn_op_create", "out is NULL",
         "create(out NULL)", __LINE__);
  fbn_op_destroy(NULL); /* no-op */
  fbn_op_desc_init(NULL);
}

static void test_op_get_desc(void **state) {
  FX;
  fbn_op_desc got;
  memset(&got, 0, sizeof got);
  assert_int_equal(fbn_op_get_desc(f->op[1], &got), FBN_STATUS_SUCCESS);
  assert_int_equal(got.num_features, C);
  assert_int_equal(got.operation, FBN_OPERATION_BN_RELU);
  assert_true(got.eps == 1e-5);
  expect(NULL, fbn_op_get_desc(NULL, &got), FBN_STATUS_NULL_POINTER, "fbn_op_get_desc",
         "op is NULL", "get_desc(NULL)", __LINE__);
  expect(NULL, fbn_op_get_desc(f->op[1], NULL), FBN_STATUS_NULL_POINTER, "fbn_op_get_desc",
         "out is NULL", "get_desc(out NULL)", __LINE__);
}

/* ---- size queries ------------------------------------------------------- */

typedef fbn_status (*size_fn)(const fbn_op *, const fbn_tensor_desc *, size_t *);

static void size_query_fails(size_fn q, const char *name) {
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = C;
  fbn_op *op = NULL, *run = NULL;
  assert_int_equal(fbn_op_create(&od, &op), FBN_STATUS_SUCCESS);
  od.statistics = FBN_STATISTICS_RUNNING;
  assert_int_equal(fbn_op_create(&od, &run), FBN_STATUS_SUCCESS);
  const struct {
    fbn_tensor_desc d;
    fbn_status want;
    const char *needle;
  } bad[] = {
      {fbn_tensor_desc_make(0, C, 5, 2, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW),
       FBN_STATUS_INVALID_SHAPE, "N=0"},
      {fbn_tensor_desc_make(4, C, -1, 2, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW),
       FBN_STATUS_INVALID_SHAPE, "H=-1"},
      {fbn_tensor_desc_make(4, C + 1, 5, 2, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW),
       FBN_STATUS_SHAPE_MISMATCH, "C = 4"},
      {fbn_tensor_desc_make(INT64_MAX / 2, C, 5, 2, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW),
       FBN_STATUS_INVALID_SHAPE, "overflows"},
      {fbn_tensor_desc_make(4, C, 5, 2, FBN_DTYPE_FLOAT64, FBN_LAYOUT_NCHW),
       FBN_STATUS_SHAPE_MISMATCH, "dtype = float64"},
      {fbn_tensor_desc_make(4, C, 5, 2, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NHWC),
       FBN_STATUS_SHAPE_MISMATCH, "layout = NHWC"},
      {fbn_tensor_desc_make(4, C, 5, 2, (fbn_dtype)42, FBN_LAYOUT_NCHW),
       FBN_STATUS_INVALID_VALUE, "dtype = 42"},
      {fbn_tensor_desc_make(4, C, 5, 2, FBN_DTYPE_FLOAT32, (fbn_layout)3),
       FBN_STATUS_INVALID_VALUE, "layout = 3"},
      {fbn_tensor_desc_make(1, C, 1, 1, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW),
       FBN_STATUS_INVALID_SHAPE, "N*H*W = 1"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    size_t bytes = 777;
    expect(NULL, q(op, &bad[i].d, &bytes), bad[i].want, name, bad[i].needle, bad[i].needle,
           __LINE__);
    assert_int_equal(bytes, 777);
  }
  /* one value per channel is fine with running statistics */
  const fbn_tensor_desc one = fbn_tensor_desc_make(1, C, 1, 1, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  size_t bytes = 777;
  assert_int_equal(q(run, &one, &bytes), FBN_STATUS_SUCCESS);
  const fbn_tensor_desc d = fbn_tensor_desc_make(4, C, 5, 2, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  expect(NULL, q(NULL, &d, &bytes), FBN_STATUS_NULL_POINTER, name, "op is NULL", "op NULL",
         __LINE__);
  expect(NULL, q(op, NULL, &bytes), FBN_STATUS_NULL_POINTER, name, "x_desc is NULL",
         "x_desc NULL", __LINE__);
  expect(NULL, q(op, &d, NULL), FBN_STATUS_NULL_POINTER, name, "bytes is NULL", "bytes NULL",
         __LINE__);
  fbn_op_destroy(op);
  fbn_op_destroy(run);
}

static void test_op_size_queries_reject_bad_input(void **state) {
  (void)state;
  size_query_fails(fbn_op_saved_size, "fbn_op_saved_size");
  size_query_fails(fbn_op_forward_workspace_size, "fbn_op_forward_workspace_size");
  size_query_fails(fbn_op_backward_workspace_size, "fbn_op_backward_workspace_size");
}

static void test_op_factor_rejects_bad_input(void **state) {
  (void)state;
  double f = 0.5;
  const char *fn = "fbn_running_average_factor";
  expect(NULL, fbn_running_average_factor(1.5, false, 1, &f), FBN_STATUS_INVALID_VALUE, fn,
         "momentum = 1.5", "momentum 1.5", __LINE__);
  expect(NULL, fbn_running_average_factor(-0.25, false, 1, &f), FBN_STATUS_INVALID_VALUE, fn,
         "momentum = -0.25", "momentum -0.25", __LINE__);
  expect(NULL, fbn_running_average_factor(NAN, false, 1, &f), FBN_STATUS_INVALID_VALUE, fn,
         "momentum = nan", "momentum NaN", __LINE__);
  expect(NULL, fbn_running_average_factor(0.1, true, 0, &f), FBN_STATUS_INVALID_VALUE, fn,
         "num_batches_tracked = 0", "cumulative 0", __LINE__);
  expect(NULL, fbn_running_average_factor(0.1, false, 1, NULL), FBN_STATUS_NULL_POINTER, fn,
         "factor is NULL", "NULL", __LINE__);
  assert_true(f == 0.5);
}

/* ---- forward ------------------------------------------------------------ */

static void test_op_forward_rejects_bad_input(void **state) {
  FX;
  poison_saved(f);
  const char *fn = "fbn_op_forward";
  unsigned char *x = f->buf[X], *z = f->buf[Z], *y = f->buf[Y], *w = f->buf[W], *b = f->buf[B];
  unsigned char *rm = f->buf[RM], *rv = f->buf[RV], *sv = f->saved;
  const size_t sb = f->saved_bytes;
  const fbn_tensor_desc *d = &f->d;
  FAILS(fbn_op_forward(NULL, GOOD_FWD_ARGS, NULL, 0), FBN_STATUS_NULL_POINTER, fn, "op is NULL");
  FAILS(FWD(2, NULL, x, z, y, w, b, rm, rv, 0.1, sv, sb, NULL, 0), FBN_STATUS_NULL_POINTER, fn,
        "x_desc is NULL");
  FAILS(FWD(2, d, NULL, z, y, w, b, rm, rv, 0.1, sv, sb, NULL, 0), FBN_STATUS_NULL_POINTER, fn,
        "x is NULL");
  FAILS(FWD(2, d, x, z, NULL, w, b, rm, rv, 0.1, sv, sb, NULL, 0), FBN_STATUS_NULL_POINTER, fn,
        "y is NULL");
  /* which operations take an addend */
  FAILS(FWD(2, d, x, NULL, y, w, b, rm, rv, 0.1, sv, sb, NULL, 0), FBN_STATUS_NULL_POINTER, fn,
        "addend is NULL: operation bn_add_relu");
  FAILS(FWD(0, d, x, z, y, w, b, rm, rv, 0.1, sv, sb, NULL, 0), FBN_STATUS_INVALID_VALUE, fn,
        "operation bn takes no addend");
  FAILS(FWD(1, d, x, z, y, w, b, rm, rv, 0.1, sv, sb, NULL, 0), FBN_STATUS_INVALID_VALUE, fn,
        "operation bn_relu takes no addend");
  /* affine */
  FAILS(FWD(2, d, x, z, y, NULL, b, rm, rv, 0.1, sv, sb, NULL, 0), FBN_STATUS_NULL_POINTER, fn,
        "weight is NULL");
  FAILS(FWD(2, d, x, z, y, w, NULL, rm, rv, 0.1, sv, sb, NULL, 0), FBN_STATUS_NULL_POINTER, fn,
        "bias is NULL");
  /* running statistics */
  FAILS(FWD(2, d, x, z, y, w, b, rm, NULL, 0.1, sv, sb, NULL, 0), FBN_STATUS_INVALID_VALUE, fn,
        "give both");
  FAILS(FWD(2, d, x, z, y, w, b, NULL, rv, 0.1, sv, sb, NULL, 0), FBN_STATUS_INVALID_VALUE, fn,
        "give both");
  FAILS(fbn_op_forward(f->running, d, x, z, y, w, b, NULL, rv, 0.1, sv, sb, NULL, 0),
        FBN_STATUS_NULL_POINTER, fn, "running_mean is NULL");
  FAILS(fbn_op_forward(f->running, d, x, z, y, w, b, rm, NULL, 0.1, sv, sb, NULL, 0),
        FBN_STATUS_NULL_POINTER, fn, "running_var is NULL");
  /* factor */
  FAILS(FWD(2, d, x, z, y, w, b, rm, rv, 1.5, sv, sb, NULL, 0), FBN_STATUS_INVALID_VALUE, fn,
        "factor = 1.5");
  FAILS(FWD(2, d, x, z, y, w, b, rm, rv, -0.5, sv, sb, NULL, 0), FBN_STATUS_INVALID_VALUE, fn,
        "factor = -0.5");
  FAILS(FWD(2, d, x, z, y, w, b, rm, rv, NAN, sv, sb, NULL, 0), FBN_STATUS_INVALID_VALUE, fn,
        "factor = nan");
  /* shapes */
  fbn_tensor_desc bad = *d;
  bad.c = C + 2;
  FAILS(FWD(2, &bad, x, z, y, w, b, rm, rv, 0.1, sv, sb, NULL, 0), FBN_STATUS_SHAPE_MISMATCH, fn,
        "C = 5");
  bad = fbn_tensor_desc_make(1, C, 1, 1, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  FAILS(FWD(2, &bad, x, z, y, w, b, rm, rv, 0.1, sv, sb, NULL, 0), FBN_STATUS_INVALID_SHAPE, fn,
        "N*H*W = 1");
  bad = *d;
  bad.dtype = FBN_DTYPE_BFLOAT16;
  FAILS(FWD(2, &bad, x, z, y, w, b, rm, rv, 0.1, sv, sb, NULL, 0), FBN_STATUS_SHAPE_MISMATCH, fn,
        "dtype = bfloat16");
  bad = *d;
  bad.layout = FBN_LAYOUT_NHWC;
  FAILS(FWD(2, &bad, x, z, y, w, b, rm, rv, 0.1, sv, sb, NULL, 0), FBN_STATUS_SHAPE_MISMATCH, fn,
        "layout = NHWC");
  /* saved memory */
  FAILS(FWD(2, d, x, z, y, w, b, rm, rv, 0.1, sv, sb - 1, NULL, 0),
        FBN_STATUS_INSUFFICIENT_WORKSPACE, fn, "saved_bytes");
  FAILS(FWD(2, d, x, z, y, w, b, rm, rv, 0.1, sv + 8, sb, NULL, 0),
        FBN_STATUS_INSUFFICIENT_WORKSPACE, fn, "must be aligned to 64 bytes");
  /* aliasing */
  FAILS(FWD(2, d, x, z, x + 4, w, b, rm, rv, 0.1, sv, sb, NULL, 0), FBN_STATUS_ALIASING, fn,
        "y overlaps x");
  FAILS(FWD(2, d, x, z, z, w, b, rm, rv, 0.1, sv, sb, NULL, 0), FBN_STATUS_ALIASING, fn,
        "y overlaps addend");
  /* saved state and workspace overlapping the call's tensors or each other
   * (every span inside its allocation: the library may compare any of them) */
  FAILS(FWD(2, d, x, z, y, w, b, rm, rv, 0.1, f->ws, sb, f->ws + 64, WS_BYTES - 64),
        FBN_STATUS_ALIASING, fn, "saved overlaps workspace");
  FAILS(FWD(2, d, x, z, y, w, b, rm, rv, 0.1, y, sb, f->ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "saved overlaps y");
  FAILS(FWD(2, d, x, z, y, w, b, rm, rv, 0.1, rm, sb, f->ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "saved overlaps running_mean");
  FAILS(FWD(2, d, f->ws, z, y, w, b, rm, rv, 0.1, sv, sb, f->ws, WS_BYTES), FBN_STATUS_ALIASING,
        fn, "workspace overlaps x");
  /* workspace: misaligned even when none is needed */
  FAILS(FWD(2, d, x, z, y, w, b, rm, rv, 0.1, sv, sb, f->ws + 4, WS_BYTES - 4),
        FBN_STATUS_INSUFFICIENT_WORKSPACE, fn, "workspace = ");
}

/* Without affine, weight and bias must be NULL; a factor is ignored when
 * nothing is updated. */
static void test_op_forward_affine_off(void **state) {
  FX;
  poison_saved(f);
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = C;
  od.affine = false;
  fbn_op *op = NULL;
  assert_int_equal(fbn_op_create(&od, &op), FBN_STATUS_SUCCESS);
  FAILS(fbn_op_forward(op, &f->d, f->buf[X], f->buf[Z], f->buf[Y], f->buf[W], NULL, NULL, NULL,
                       0.1, NULL, 0, NULL, 0),
        FBN_STATUS_INVALID_VALUE, "fbn_op_forward", "weight = ");
  FAILS(fbn_op_forward(op, &f->d, f->buf[X], f->buf[Z], f->buf[Y], NULL, f->buf[B], NULL, NULL,
                       0.1, NULL, 0, NULL, 0),
        FBN_STATUS_INVALID_VALUE, "fbn_op_forward", "bias = ");
  /* NaN factor, no running statistics: accepted, y written */
  unsigned char *y = fbnt_alloc(f->bytes);
  fbnt_tensor_poison(&f->d, y);
  assert_int_equal(fbn_op_forward(op, &f->d, f->buf[X], f->buf[Z], y, NULL, NULL, NULL, NULL, NAN,
                                  NULL, 0, f->ws, WS_BYTES),
                   FBN_STATUS_SUCCESS);
  assert_false(isnan(((float *)y)[0]));
  fbnt_free(y);
  fbn_op_destroy(op);
}

/* The fast backend's NHWC loops need workspace: NULL, too small. */
static void test_op_forward_rejects_small_workspace(void **state) {
  FX;
  poison_saved(f);
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = C;
  od.layout = FBN_LAYOUT_NHWC;
  fbn_op *op = NULL;
  assert_int_equal(fbn_op_create(&od, &op), FBN_STATUS_SUCCESS);
  fbn_tensor_desc d = f->d;
  d.layout = FBN_LAYOUT_NHWC;
  size_t need = 0;
  assert_int_equal(fbn_op_forward_workspace_size(op, &d, &need), FBN_STATUS_SUCCESS);
  assert_true(need > 0);
  unsigned char *ws = fbnt_alloc(need);
  FAILS(fbn_op_forward(op, &d, f->buf[X], f->buf[Z], f->buf[Y], f->buf[W], f->buf[B], f->buf[RM],
                       f->buf[RV], 0.1, NULL, 0, NULL, 0),
        FBN_STATUS_INSUFFICIENT_WORKSPACE, "fbn_op_forward", "workspace is NULL");
  FAILS(fbn_op_forward(op, &d, f->buf[X], f->buf[Z], f->buf[Y], f->buf[W], f->buf[B], f->buf[RM],
                       f->buf[RV], 0.1, NULL, 0, ws, need - 1),
        FBN_STATUS_INSUFFICIENT_WORKSPACE, "fbn_op_forward", "workspace_bytes");
  assert_int_equal(fbn_op_backward_workspace_size(op, &d, &need), FBN_STATUS_SUCCESS);
  assert_true(need > 0);
  fbnt_free(ws);
  fbn_op_destroy(op);
}

/* The running statistics (when updated) and y are written: each against
 * every other span of the call. */
static void test_op_forward_rejects_aliased_outputs(void **state) {
  FX;
  poison_saved(f);
  const char *fn = "fbn_op_forward";
  unsigned char *x = f->buf[X], *z = f->buf[Z], *y = f->buf[Y], *w = f->buf[W], *b = f->buf[B];
  unsigned char *rm = f->buf[RM], *rv = f->buf[RV], *sv = f->saved, *ws = f->ws;
  const size_t sb = f->saved_bytes;
  const fbn_tensor_desc *d = &f->d;
  FAILS(FWD(2, d, x, z, y, w, b, y + 20, rv, 0.1, sv, sb, ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "y overlaps running_mean");
  FAILS(FWD(2, d, x, z, y, w, b, rm, rm, 0.1, sv, sb, ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "running_mean overlaps running_var");
  FAILS(FWD(2, d, x, z, y, w, b, x, rv, 0.1, sv, sb, ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "running_mean overlaps x");
  FAILS(FWD(2, d, x, z, y, w, b, rm, z + 4, 0.1, sv, sb, ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "running_var overlaps addend");
  FAILS(FWD(2, d, x, z, y, w, b, rm, b, 0.1, sv, sb, ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "running_var overlaps bias");
  FAILS(FWD(2, d, x, z, y, rv, b, rm, rv, 0.1, sv, sb, ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "running_var overlaps weight");
  FAILS(FWD(2, d, x, z, y, w, b, sv + 8, rv, 0.1, sv, sb, ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "saved overlaps running_mean");
  FAILS(FWD(2, d, x, z, y, w, b, rm, ws + 64, 0.1, sv, sb, ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "workspace overlaps running_var");
  FAILS(FWD(2, d, x, z, y, y + 8, b, rm, rv, 0.1, sv, sb, ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "y overlaps weight");
  FAILS(FWD(2, d, x, z, y, w, y + 4, rm, rv, 0.1, sv, sb, ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "y overlaps bias");
  /* running statistics only read (running-statistics op): y still may not
   * overlap them */
  FAILS(fbn_op_forward(f->running, d, x, z, y, w, b, y + 20, rv, 0.1, sv, sb, ws, WS_BYTES),
        FBN_STATUS_ALIASING, fn, "y overlaps running_mean");
}

/* ---- backward ----------------------------------------------------------- */

#define BWD(o, x, y, dy, saved, sbytes, dx, dz, dw, db, pg, ws, wsb)                               \
  fbn_op_backward(f->op[o], &f->d, x, y, dy, saved, sbytes, f->buf[W], f->buf[B], dx, dz, dw, db, \
                  pg, ws, wsb)

static void test_op_backward_rejects_bad_input(void **state) {
  FX;
  const char *fn = "fbn_op_backward";
  unsigned char *x = f->buf[X], *y = f->buf[Y], *dy = f->buf[DY], *dx = f->buf[DX];
  unsigned char *dz = f->buf[DZ], *sv = f->saved, *dw = f->dw, *db = f->db;
  const size_t sb = f->saved_bytes;
  const fbn_param_grad ow = FBN_PARAM_GRAD_OVERWRITE;
  FAILS(fbn_op_backward(NULL, &f->d, x, y, dy, sv, sb, f->buf[W], f->buf[B], dx, dz, dw, db, ow,
                        NULL, 0),
        FBN_STATUS_NULL_POINTER, fn, "op is NULL");
  FAILS(fbn_op_backward(f->op[2], NULL, x, y, dy, sv, sb, f->buf[W], f->buf[B], dx, dz, dw, db,
                        ow, NULL, 0),
        FBN_STATUS_NULL_POINTER, fn, "x_desc is NULL");
  FAILS(BWD(2, NULL, y, dy, sv, sb, dx, dz, dw, db, ow, NULL, 0), FBN_STATUS_NULL_POINTER, fn,
        "x is NULL");
  FAILS(BWD(2, x, NULL, dy, sv, sb, dx, dz, dw, db, ow, NULL, 0), FBN_STATUS_NULL_POINTER, fn,
        "y is NULL: the backward of operation bn_add_relu");
  FAILS(BWD(1, x, NULL, dy, sv, sb, dx, NULL, dw, db, ow, NULL, 0), FBN_STATUS_NULL_POINTER, fn,
        "y is NULL: the backward of operation bn_relu");
  FAILS(BWD(2, x, y, NULL, sv, sb, dx, dz, dw, db, ow, NULL, 0), FBN_STATUS_NULL_POINTER, fn,
        "dy is NULL");
  FAILS(BWD(2, x, y, dy, NULL, sb, dx, dz, dw, db, ow, NULL, 0), FBN_STATUS_NULL_POINTER, fn,
        "saved is NULL");
  FAILS(fbn_op_backward(f->op[2], &f->d, x, y, dy, sv, sb, NULL, f->buf[B], dx, dz, dw, db, ow,
                        NULL, 0),
        FBN_STATUS_NULL_POINTER, fn, "weight is NULL");
  FAILS(BWD(1, x, y, dy, sv, sb, dx, dz, dw, db, ow, NULL, 0), FBN_STATUS_INVALID_VALUE, fn,
        "operation bn_relu has no addend");
  FAILS(BWD(0, x, y, dy, sv, sb, dx, dz, dw, db, ow, NULL, 0), FBN_STATUS_INVALID_VALUE, fn,
        "operation bn has no addend");
  FAILS(BWD(2, x, y, dy, sv, sb, dx, dz, dw, db, (fbn_param_grad)7, NULL, 0),
        FBN_STATUS_INVALID_VALUE, fn, "param_grad = 7");
  FAILS(BWD(2, x, y, dy, sv, sb - 1, dx, dz, dw, db, ow, NULL, 0),
        FBN_STATUS_INSUFFICIENT_WORKSPACE, fn, "saved_bytes");
  FAILS(BWD(2, x, y, dy, sv + 16, sb, dx, dz, dw, db, ow, NULL, 0),
        FBN_STATUS_INSUFFICIENT_WORKSPACE, fn, "must be aligned to 64 bytes");
  FAILS(BWD(2, x, y, dy, sv, sb, dx, dz, dw, db, ow, NULL, 0), FBN_STATUS_INSUFFICIENT_WORKSPACE,
        fn, "workspace is NULL");
  FAILS(BWD(2, x, y, dy, sv, sb, dx, dz, dw, db, ow, f->ws + 32, WS_BYTES - 32),
        FBN_STATUS_INSUFFICIENT_WORKSPACE, fn, "must be aligned to 64 bytes");
  FAILS(BWD(2, x, y, dy, sv, sb, dx, dz, dw, db, ow, f->ws, 16), FBN_STATUS_INSUFFICIENT_WORKSPACE,
        fn, "workspace_bytes = 16");
  FAILS(BWD(2, x, y, dy, sv, sb, dy, dz, dw, db, ow, NULL, 0), FBN_STATUS_ALIASING, fn,
        "dx overlaps dy");
  FAILS(BWD(2, x, y, dy, sv, sb, dx, dz, dw, dw + 4, ow, f->ws, WS_BYTES), FBN_STATUS_ALIASING,
        fn, "dweight overlaps dbias");
  FAILS(BWD(2, x, y, dy, sv, sb, dx, dz, sv, db, ow, f->ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "dweight overlaps saved");
  FAILS(BWD(2, x, y, dy, sv, sb, f->ws, dz, dw, db, ow, f->ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "dx overlaps workspace");
  FAILS(BWD(2, x, y, dy, sv, sb, dx, x + 8, dw, db, ow, NULL, 0), FBN_STATUS_ALIASING, fn,
        "daddend overlaps x");
  FAILS(BWD(2, x, y, dy, sv, sb, dx, dx, dw, db, ow, NULL, 0), FBN_STATUS_ALIASING, fn,
        "dx overlaps daddend");
  fbn_tensor_desc bad = f->d;
  bad.c = 2;
  FAILS(fbn_op_backward(f->op[2], &bad, x, y, dy, sv, sb, f->buf[W], f->buf[B], dx, dz, dw, db,
                        ow, NULL, 0),
        FBN_STATUS_SHAPE_MISMATCH, fn, "C = 2");
}

/* Saved memory no forward of this op and shape filled (CPU: checked). */
static void test_op_backward_rejects_foreign_saved(void **state) {
  FX;
  const char *fn = "fbn_op_backward";
  unsigned char *x = f->buf[X], *y = f->buf[Y], *dy = f->buf[DY], *dx = f->buf[DX];
  const fbn_param_grad ow = FBN_PARAM_GRAD_OVERWRITE;
  const size_t sb = f->saved_bytes;
  /* never filled */
  unsigned char *blank = fbnt_alloc(sb);
  FAILS(BWD(2, x, y, dy, blank, sb, dx, NULL, f->dw, f->db, ow, f->ws, WS_BYTES),
        FBN_STATUS_INVALID_STATE, fn, "not filled by a forward");
  /* filled by another operation's forward (BN + add + ReLU, used by BN + ReLU) */
  FAILS(BWD(1, x, y, dy, f->saved, sb, dx, NULL, f->dw, f->db, ow, f->ws, WS_BYTES),
        FBN_STATUS_INVALID_STATE, fn, "operation bn_add_relu");
  /* filled by a forward of another shape (N = 2: the same size suffices) */
  const fbn_tensor_desc d2 = fbn_tensor_desc_make(2, C, 5, 2, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  unsigned char *y2 = fbnt_alloc(f->bytes);
  assert_int_equal(fbn_op_forward(f->op[2], &d2, x, f->buf[Z], y2, f->buf[W], f->buf[B], NULL,
                                  NULL, 0.0, blank, sb, f->ws, WS_BYTES),
                   FBN_STATUS_SUCCESS);
  FAILS(BWD(2, x, y, dy, blank, sb, dx, NULL, f->dw, f->db, ow, f->ws, WS_BYTES),
        FBN_STATUS_SHAPE_MISMATCH, fn, "N=2");
  /* from the reference backend's op */
  assert_int_equal(setenv("FBN_CPU_BACKEND", "reference", 1), 0);
  fbn_op *ref = make(FBN_OPERATION_BN_ADD_RELU, FBN_STATISTICS_BATCH);
  unsetenv("FBN_CPU_BACKEND");
  size_t rsb = 0;
  assert_int_equal(fbn_op_saved_size(ref, &f->d, &rsb), FBN_STATUS_SUCCESS);
  unsigned char *rsaved = fbnt_alloc(sb > rsb ? sb : rsb);
  assert_int_equal(fbn_op_forward(ref, &f->d, x, f->buf[Z], y2, f->buf[W], f->buf[B], NULL, NULL,
                                  0.0, rsaved, rsb, f->ws, WS_BYTES),
                   FBN_STATUS_SUCCESS);
  FAILS(BWD(2, x, y, dy, rsaved, sb, dx, NULL, f->dw, f->db, ow, f->ws, WS_BYTES),
        FBN_STATUS_INVALID_STATE, fn, "cpu-fast");
  fbn_op_destroy(ref);
  fbnt_free(rsaved);
  fbnt_free(blank);
  fbnt_free(y2);
}

/* dx, daddend, dweight, dbias and workspace are written: each against
 * every other span of the call (x, y, dy, saved, weight, bias, each other). */
static void test_op_backward_rejects_aliased_outputs(void **state) {
  FX;
  const char *fn = "fbn_op_backward";
  unsigned char *x = f->buf[X], *y = f->buf[Y], *dy = f->buf[DY], *dx = f->buf[DX];
  unsigned char *dz = f->buf[DZ], *sv = f->saved, *dw = f->dw, *db = f->db, *ws = f->ws;
  const size_t sb = f->saved_bytes;
  const fbn_param_grad ow = FBN_PARAM_GRAD_OVERWRITE;
  FAILS(BWD(2, x, y, dy, sv, sb, dx, dz, x + 4, db, ow, ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "dweight overlaps x");
  FAILS(BWD(2, x, y, dy, sv, sb, dx, dz, dw, f->buf[W], ow, ws, WS_BYTES), FBN_STATUS_ALIASING,
        fn, "dbias overlaps weight");
  FAILS(BWD(2, x, y, dy, sv, sb, dx, dz, f->buf[B], db, ow, ws, WS_BYTES), FBN_STATUS_ALIASING,
        fn, "dweight overlaps bias");
  FAILS(BWD(2, x, y, dy, sv, sb, sv, dz, dw, db, ow, ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "dx overlaps saved");
  FAILS(BWD(2, x, y, dy, sv, sb, dx, f->buf[B], dw, db, ow, ws, WS_BYTES), FBN_STATUS_ALIASING,
        fn, "daddend overlaps bias");
  FAILS(BWD(2, x, y, dy, sv, sb, dx, dz, y + 12, db, ow, ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "dweight overlaps y");
  FAILS(BWD(2, x, y, dy, sv, sb, dx, dz, dw, dy, ow, ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "dbias overlaps dy");
  FAILS(BWD(2, x, y, dy, sv, sb, dx, dz, dw, dx + 8, ow, ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "dx overlaps dbias");
  FAILS(BWD(2, x, y, dy, sv, sb, dx, dz, ws, db, ow, ws, WS_BYTES), FBN_STATUS_ALIASING, fn,
        "dweight overlaps workspace");
}

static void test_op_backward_affine_off(void **state) {
  FX;
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = C;
  od.affine = false;
  fbn_op *op = NULL;
  assert_int_equal(fbn_op_create(&od, &op), FBN_STATUS_SUCCESS);
  size_t sb = 0;
  assert_int_equal(fbn_op_saved_size(op, &f->d, &sb), FBN_STATUS_SUCCESS);
  unsigned char *saved = fbnt_alloc(sb), *y = fbnt_alloc(f->bytes);
  assert_int_equal(fbn_op_forward(op, &f->d, f->buf[X], f->buf[Z], y, NULL, NULL, NULL, NULL, 0.0,
                                  saved, sb, f->ws, WS_BYTES),
                   FBN_STATUS_SUCCESS);
  FAILS(fbn_op_backward(op, &f->d, f->buf[X], y, f->buf[DY], saved, sb, NULL, NULL, f->buf[DX],
                        NULL, f->dw, NULL, FBN_PARAM_GRAD_OVERWRITE, NULL, 0),
        FBN_STATUS_INVALID_VALUE, "fbn_op_backward", "dweight = ");
  FAILS(fbn_op_backward(op, &f->d, f->buf[X], y, f->buf[DY], saved, sb, f->buf[W], NULL,
                        f->buf[DX], NULL, NULL, NULL, FBN_PARAM_GRAD_OVERWRITE, NULL, 0),
        FBN_STATUS_INVALID_VALUE, "fbn_op_backward", "weight = ");
  fbnt_free(saved);
  fbnt_free(y);
  fbn_op_destroy(op);
}

int main(int argc, char **argv) {
  fbnt_parse_args(argc, argv);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_op_create_rejects_bad_desc),
      cmocka_unit_test_setup_teardown(test_op_get_desc, setup, teardown),
      cmocka_unit_test(test_op_size_queries_reject_bad_input),
      cmocka_unit_test(test_op_factor_rejects_bad_input),
      cmocka_unit_test_setup_teardown(test_op_forward_rejects_bad_input, setup, teardown),
      cmocka_unit_test_setup_teardown(test_op_forward_affine_off, setup, teardown),
      cmocka_unit_test_setup_teardown(test_op_forward_rejects_small_workspace, setup, teardown),
      cmocka_unit_test_setup_teardown(test_op_forward_rejects_aliased_outputs, setup, teardown),
      cmocka_unit_test_setup_teardown(test_op_backward_rejects_aliased_outputs, setup, teardown),
      cmocka_unit_test_setup_teardown(test_op_backward_rejects_bad_input, setup, teardown),
      cmocka_unit_test_setup_teardown(test_op_backward_rejects_foreign_saved, setup, teardown),
      cmocka_unit_test_setup_teardown(test_op_backward_affine_off, setup, teardown),
  };
  return cmocka_run_group_tests_name("op_errors", tests, NULL, NULL);
}
