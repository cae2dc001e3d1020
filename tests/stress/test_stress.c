/*
 * Stress: many create / forward / backward / destroy cycles over random
 * configurations, CPU only, fixed seed (FBN_TEST_SEED to vary it).
 *
 * Every cycle draws a random valid configuration (options, mode, shape,
 * layout, dtype, addend, which gradients) and, in most cycles, one fault to
 * inject at one step of the lifecycle: bad options, a bad buffer or
 * num_batches_tracked call, a bad forward, a bad backward.  Each fault
 * must
 *   - return its documented status (one fault per call, so the status is
 *     unambiguous) with a non-empty message naming the call,
 *   - leave the module's observable state unchanged and every output buffer
 *     untouched (the library may write outputs only on DEVICE_ERROR),
 *   - never crash.
 * The rest of the cycle then runs normally and is checked against the
 * float64 reference of tests/util (y, running statistics,
 * num_batches_tracked, dx, daddend, accumulated dweight/dbias), so a fault
 * that silently corrupted the module would show up there.
 *
 * A second test cycles through the op API the same way (test_stress_op_cycles:
 * the fast backend's op against the reference's on the same caller memory,
 * with one bad argument in most cycles).
 *
 * Leaks are caught by LeakSanitizer in the sanitizer build of
 * scripts/test (every allocation of a cycle, failing ones included, is
 * freed before the next).  FBN_STRESS_CYCLES overrides the number of
 * cycles (default 10000).
 */
#include <inttypes.h>
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

#define STRESS_DEFAULT_CYCLES 10000

/* ---- faults ------------------------------------------------------------- */

typedef enum fault {
  FAULT_NONE = 0,
  /* fbn_module_create */
  FAULT_CREATE_NULL,
  FAULT_OPT_NUM_FEATURES,
  FAULT_OPT_EPS,
  FAULT_OPT_MOMENTUM,
  FAULT_OPT_PARAM_DTYPE,
  FAULT_OPT_DEVICE,
  FAULT_OPT_BN_MODE,
  /* buffers and num_batches_tracked */
  FAULT_BUF_NULL,
  FAULT_BUF_ENUM,
  FAULT_BUF_ABSENT,
  FAULT_BUF_DTYPE,
  FAULT_BUF_COUNT,
  FAULT_NBT_NEGATIVE,
  FAULT_NBT_ABSENT,
  /* fbn_module_forward */
  FAULT_FWD_NULL,
  FAULT_FWD_DIM,
  FAULT_FWD_CHANNELS,
  FAULT_FWD_OVERFLOW,
  FAULT_FWD_DTYPE_ENUM,
  FAULT_FWD_LAYOUT_ENUM,
  FAULT_FWD_DTYPE_PARAMS,
  FAULT_FWD_ONE_VALUE,
  FAULT_FWD_ALIAS,
  FAULT_FWD_NBT_FULL,
  /* fbn_module_backward */
  FAULT_BWD_NULL,
  FAULT_BWD_EMPTY_SAVED,
  FAULT_BWD_OTHER_MODULE,
  FAULT_BWD_DESC,
  FAULT_BWD_DADDEND_NO_ADDEND,
  FAULT_BWD_ALIAS,
  FAULT_COUNT
} fault;

static const char *const fault_names[FAULT_COUNT] = {
    "none",
    "create_null",
    "opt_num_features",
    "opt_eps",
    "opt_momentum",
    "opt_param_dtype",
    "opt_device",
    "opt_bn_mode",
    "buf_null",
    "buf_enum",
    "buf_absent",
    "buf_dtype",
    "buf_count",
    "nbt_negative",
    "nbt_absent",
    "fwd_null",
    "fwd_dim",
    "fwd_channels",
    "fwd_overflow",
    "fwd_dtype_enum",
    "fwd_layout_enum",
    "fwd_dtype_params",
    "fwd_one_value",
    "fwd_alias",
    "fwd_nbt_full",
    "bwd_null",
    "bwd_empty_saved",
    "bwd_other_module",
    "bwd_desc",
    "bwd_daddend_no_addend",
    "bwd_alias",
};

static bool fault_is_create(fault f) { return f >= FAULT_CREATE_NULL && f <= FAULT_OPT_BN_MODE; }
static bool fault_is_buffer(fault f) { return f >= FAULT_BUF_NULL && f <= FAULT_NBT_ABSENT; }
static bool fault_is_forward(fault f) { return f >= FAULT_FWD_NULL && f <= FAULT_FWD_NBT_FULL; }
static bool fault_is_backward(fault f) { return f >= FAULT_BWD_NULL && f <= FAULT_BWD_ALIAS; }

/* ---- per-cycle context and checks --------------------------------------- */

typedef struct cycle {
  long index;
  fault fault;
  fbnt_rng *rng;
} cycle;

static const cycle *current;

/* Fail the test with the cycle, its fault and the seed in the message. */
#define CHECK(cond, ...)                                                                        \
  do {                                                                                          \
    if (!(cond)) {                                                                              \
      print_error("cycle %ld (fault %s, FBN_TEST_SEED=%" PRIu64 "): ", current->index,         \
                  fault_names[current->fault], fbnt_seed());                                    \
      print_error(__VA_ARGS__);                                                                 \
      print_error("\n  (last error message: \"%s\")\n", fbn_last_error_message());             \
      fail();                                                                                   \
    }                                                                                           \
  } while (0)

#define CHECK_OK(expr)                                                                          \
  do {                                                                                          \
    fbn_status st_ = (expr);                                                                    \
    CHECK(st_ == FBN_STATUS_SUCCESS, "%s returned %s", #expr, fbn_status_string(st_));        \
    CHECK(fbn_last_error_message()[0] == '\0', "%s succeeded but left a message", #expr);     \
  } while (0)

/* A failing call: the expected status and a message that names the call. */
static void check_failure(fbn_status got, fbn_status want, const char *call) {
  CHECK(got == want, "%s returned %s, want %s", call, fbn_status_string(got),
        fbn_status_string(want));
  const char *msg = fbn_last_error_message();
  CHECK(msg != NULL, "%s: fbn_last_error_message() is NULL", call);
  if (msg == NULL)
    return; /* (fail() has returned control only if cmocka is misused) */
  CHECK(msg[0] != '\0', "%s failed with an empty message", call);
  CHECK(strstr(msg, call) != NULL, "%s: message \"%s\" does not name the call", call, msg);
}

static int pick(fbnt_rng *rng, int count) { return (int)(fbnt_rng_u32(rng) % (uint32_t)count); }
static bool coin(fbnt_rng *rng) { return (fbnt_rng_u32(rng) & 1u) != 0; }

/* ---- host tensors that remember their bytes ------------------------------ */

typedef struct tensor {
  void *data;
  size_t bytes;
  void *copy; /* snapshot for "untouched" checks */
} tensor;

static size_t desc_bytes(const fbn_tensor_desc *d) {
  return fbnt_desc_numel(d) * fbn_dtype_size(d->dtype);
}

static void tensor_new(tensor *t, const fbn_tensor_desc *d) {
  t->bytes = desc_bytes(d);
  t->data = fbnt_tensor_alloc(d);
  t->copy = NULL;
}

static void tensor_free(tensor *t) {
  fbnt_free(t->data);
  free(t->copy);
  t->data = t->copy = NULL;
}

static void tensor_snapshot(tensor *t) {
  free(t->copy);
  t->copy = malloc(t->bytes ? t->bytes : 1);
  if (t->copy == NULL)
    abort();
  memcpy(t->copy, t->data, t->bytes);
}

static void check_untouched(const tensor *t, const char *name) {
  CHECK(memcmp(t->copy, t->data, t->bytes) == 0, "%s was written by a failing call", name);
}

/* ---- random valid configuration ---------------------------------------- */

typedef struct config {
  fbn_module_options options;
  bool training;
  fbn_tensor_desc desc;
  bool has_addend;
  bool want_dx;
  bool want_daddend;
} config;

static bool config_batch_stats(const config *c) {
  return c->training || !c->options.track_running_stats;
}

static void random_shape(fbnt_rng *rng, config *c) {
  fbn_dtype dtype =
      c->options.param_dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  fbn_layout layout = coin(rng) ? FBN_LAYOUT_NHWC : FBN_LAYOUT_NCHW;
  int64_t n = 1 + pick(rng, 4), h = 1 + pick(rng, 4), w = 1 + pick(rng, 5);
  if (config_batch_stats(c) && n * h * w == 1)
    w = 2;
  c->desc = fbn_tensor_desc_make(n, c->options.num_features, h, w, dtype, layout);
}

static void random_config(fbnt_rng *rng, config *c) {
  static const double eps_choices[] = {0.0, 1e-5, 1e-3, 0.1};
  fbn_module_options_init(&c->options);
  c->options.num_features = 1 + pick(rng, 6);
  c->options.eps = eps_choices[pick(rng, 4)];
  c->options.momentum = fbnt_rng_unit(rng);
  if (pick(rng, 8) == 0)
    c->options.momentum = pick(rng, 2); /* the bounds 0 and 1 are valid */
  c->options.cumulative_average = pick(rng, 4) == 0;
  c->options.affine = pick(rng, 4) != 0;
  c->options.track_running_stats = pick(rng, 4) != 0;
  c->options.param_dtype = coin(rng) ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  c->options.bn_mode = coin(rng) ? FBN_BN_MODE_SPATIAL : FBN_BN_MODE_AUTO;
  c->training = pick(rng, 3) != 0;
  c->has_addend = coin(rng);
  c->want_dx = pick(rng, 4) != 0;
  c->want_daddend = c->has_addend && coin(rng);
  random_shape(rng, c);
}

/* Adjust a valid configuration so the fault is reachable. */
static void config_for_fault(fbnt_rng *rng, config *c, fault f) {
  switch (f) {
  case FAULT_BUF_ABSENT:
    if (coin(rng))
      c->options.affine = false;
    else
      c->options.track_running_stats = false;
    break;
  case FAULT_NBT_ABSENT: c->options.track_running_stats = false; break;
  case FAULT_BUF_DTYPE:
  case FAULT_BUF_COUNT: c->options.affine = true; break; /* a buffer that exists */
  case FAULT_NBT_NEGATIVE: c->options.track_running_stats = true; break;
  case FAULT_FWD_NBT_FULL:
    c->options.track_running_stats = true;
    c->training = true;
    break;
  case FAULT_FWD_ONE_VALUE: c->training = true; break;
  case FAULT_BWD_DADDEND_NO_ADDEND:
    c->has_addend = false;
    c->want_daddend = false;
    break;
  case FAULT_BWD_ALIAS:
    c->has_addend = true;
    break;
  default: break;
  }
  random_shape(rng, c);
}

/* ---- faults at fbn_module_create ---------------------------------------- */

static void run_create_fault(fbnt_rng *rng, const config *cfg, fault f) {
  fbn_module_options o = cfg->options;
  fbn_status want = FBN_STATUS_INVALID_VALUE;
  switch (f) {
  case FAULT_CREATE_NULL: want = FBN_STATUS_NULL_POINTER; break;
  case FAULT_OPT_NUM_FEATURES: {
    static const int64_t bad[] = {0, -1, INT64_MIN};
    o.num_features = bad[pick(rng, 3)];
    break;
  }
  case FAULT_OPT_EPS: {
    const double bad[] = {-1e-5, -INFINITY, INFINITY, NAN};
    o.eps = bad[pick(rng, 4)];
    break;
  }
  case FAULT_OPT_MOMENTUM: {
    const double bad[] = {-0.1, 1.0000001, 2.0, NAN, INFINITY};
    o.momentum = bad[pick(rng, 5)];
    o.cumulative_average = false; /* momentum is ignored with the cumulative average */
    break;
  }
  case FAULT_OPT_PARAM_DTYPE: {
    static const int bad[] = {FBN_DTYPE_FLOAT16, FBN_DTYPE_BFLOAT16, 4, -1, 1000};
    o.param_dtype = (fbn_dtype)bad[pick(rng, 5)];
    break;
  }
  case FAULT_OPT_DEVICE: {
    static const int bad[] = {2, -1, 77};
    o.device = (fbn_device_type)bad[pick(rng, 3)];
    break;
  }
  case FAULT_OPT_BN_MODE: {
    static const int bad[] = {2, -1, 1 << 20};
    o.bn_mode = (fbn_bn_mode)bad[pick(rng, 3)];
    break;
  }
  default: fail_msg("not a create fault: %d", (int)f);
  }

  static char sentinel;
  fbn_module *m = (fbn_module *)(void *)&sentinel; /* must be set to NULL */
  fbn_status st;
  if (f == FAULT_CREATE_NULL && coin(rng)) {
    st = fbn_module_create(NULL, &m);
  } else if (f == FAULT_CREATE_NULL) {
    st = fbn_module_create(&o, NULL);
    m = NULL;
  } else {
    st = fbn_module_create(&o, &m);
  }
  check_failure(st, want, "fbn_module_create");
  CHECK(m == NULL, "fbn_module_create failed but did not set *out to NULL");
}

/* ---- faults at buffer and num_batches_tracked calls --------------------- */

static void run_buffer_fault(fbnt_rng *rng, fbn_module *m, const config *cfg, fault f) {
  const size_t c = (size_t)cfg->options.num_features;
  double *host = calloc(c + 1, sizeof(double));
  if (host == NULL)
    abort();
  for (size_t i = 0; i <= c; i++)
    host[i] = fbnt_rng_normal(rng);
  const bool write = coin(rng);
  const char *call = write ? "fbn_module_write_buffer" : "fbn_module_read_buffer";

  /* A buffer the module has (for the faults that need one). */
  fbn_buffer present = FBN_BUFFER_WEIGHT;
  {
    fbn_buffer candidates[6];
    int count = 0;
    for (int b = 0; b < 6; b++)
      if (fbn_module_has_buffer(m, (fbn_buffer)b))
        candidates[count++] = (fbn_buffer)b;
    if (count > 0)
      present = candidates[pick(rng, count)];
  }

  fbn_buffer which = present;
  fbn_dtype dtype = coin(rng) ? FBN_DTYPE_FLOAT32 : FBN_DTYPE_FLOAT64;
  size_t count = c;
  void *ptr = host;
  fbn_status want = FBN_STATUS_SUCCESS;

  switch (f) {
  case FAULT_BUF_NULL:
    if (coin(rng))
      ptr = NULL;
    else
      m = NULL;
    want = FBN_STATUS_NULL_POINTER;
    break;
  case FAULT_BUF_ENUM: {
    static const int bad[] = {6, -1, 1000};
    which = (fbn_buffer)bad[pick(rng, 3)];
    want = FBN_STATUS_INVALID_VALUE;
    break;
  }
  case FAULT_BUF_ABSENT: {
    fbn_buffer absent[6];
    int n = 0;
    for (int b = 0; b < 6; b++)
      if (!fbn_module_has_buffer(m, (fbn_buffer)b))
        absent[n++] = (fbn_buffer)b;
    CHECK(n > 0, "config for buf_absent has every buffer");
    which = absent[pick(rng, n)];
    want = FBN_STATUS_ABSENT;
    break;
  }
  case FAULT_BUF_DTYPE: {
    /* values that are not dtypes at all (host copies take all four) */
    static const int bad[] = {4, 9, -1, -2};
    dtype = (fbn_dtype)bad[pick(rng, 4)];
    want = FBN_STATUS_INVALID_VALUE;
    break;
  }
  case FAULT_BUF_COUNT:
    count = coin(rng) ? c + 1 : c - 1;
    want = FBN_STATUS_SHAPE_MISMATCH;
    break;
  case FAULT_NBT_NEGATIVE: {
    static const int64_t bad[] = {-1, INT64_MIN};
    check_failure(fbn_module_set_num_batches_tracked(m, bad[pick(rng, 2)]),
                  FBN_STATUS_INVALID_VALUE, "fbn_module_set_num_batches_tracked");
    free(host);
    return;
  }
  case FAULT_NBT_ABSENT:
    if (coin(rng)) {
      check_failure(fbn_module_set_num_batches_tracked(m, 1 + pick(rng, 5)), FBN_STATUS_ABSENT,
                    "fbn_module_set_num_batches_tracked");
    } else {
      int64_t v = -42;
      check_failure(fbn_module_get_num_batches_tracked(m, &v), FBN_STATUS_ABSENT,
                    "fbn_module_get_num_batches_tracked");
      CHECK(v == -42, "failing get_num_batches_tracked wrote its output");
    }
    free(host);
    return;
  default: fail_msg("not a buffer fault: %d", (int)f);
  }

  double *before = malloc((c + 1) * sizeof(double));
  if (before == NULL)
    abort();
  memcpy(before, host, (c + 1) * sizeof(double));
  fbn_status st = write ? fbn_module_write_buffer(m, which, dtype, ptr, count)
                        : fbn_module_read_buffer(m, which, dtype, ptr, count);
  check_failure(st, want, call);
  CHECK(memcmp(before, host, (c + 1) * sizeof(double)) == 0,
        "failing %s wrote the host array", call);
  free(before);
  free(host);
}

/* ---- the lifecycle ------------------------------------------------------ */

typedef struct run {
  config cfg;
  fbn_module *m;
  fbnt_ref_module ref;
  fbn_saved *saved;
  fbnt_ref_saved ref_saved;
  tensor x, addend, y, dy, dx, daddend;
  double *rx, *raddend, *ry, *rdy, *rdx, *rdaddend, *got;
} run;

static double *ref_array(const fbn_tensor_desc *d) {
  double *p = calloc(fbnt_desc_numel(d) + 1, sizeof(double));
  if (p == NULL)
    abort();
  return p;
}

static void run_tensors_new(fbnt_rng *rng, run *r) {
  const fbn_tensor_desc *d = &r->cfg.desc;
  tensor_new(&r->x, d);
  tensor_new(&r->addend, d);
  tensor_new(&r->y, d);
  tensor_new(&r->dy, d);
  tensor_new(&r->dx, d);
  tensor_new(&r->daddend, d);
  r->rx = ref_array(d);
  r->raddend = ref_array(d);
  r->ry = ref_array(d);
  r->rdy = ref_array(d);
  r->rdx = ref_array(d);
  r->rdaddend = ref_array(d);
  r->got = ref_array(d);
  fbnt_fill_channels(rng, d, r->x.data, r->rx);
  fbnt_fill_normal(rng, d, r->addend.data, r->raddend, 1.0);
  fbnt_fill_normal(rng, d, r->dy.data, r->rdy, 1.0);
  fbnt_tensor_poison(d, r->y.data);
  fbnt_tensor_poison(d, r->dx.data);
  fbnt_tensor_poison(d, r->daddend.data);
}

static void run_tensors_free(run *r) {
  tensor *ts[] = {&r->x, &r->addend, &r->y, &r->dy, &r->dx, &r->daddend};
  for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++)
    tensor_free(ts[i]);
  double **rs[] = {&r->rx, &r->raddend, &r->ry, &r->rdy, &r->rdx, &r->rdaddend, &r->got};
  for (size_t i = 0; i < sizeof rs / sizeof rs[0]; i++) {
    free(*rs[i]);
    *rs[i] = NULL;
  }
}

/* Compare a per-channel module buffer with the reference's values. */
static void check_vector(const fbn_module *m, fbn_buffer which, const double *want, int64_t c,
                         double atol_scale, const char *what) {
  double got[8];
  for (int i = 0; i < 8; i++)
    got[i] = NAN;
  CHECK_OK(fbn_module_read_buffer(m, which, FBN_DTYPE_FLOAT64, got, (size_t)c));
  fbn_module_options o;
  CHECK_OK(fbn_module_get_options(m, &o));
  fbnt_tol tol = fbnt_tol_for(o.param_dtype, atol_scale);
  CHECK(fbnt_check_close(what, got, want, (size_t)c, tol.rtol, tol.atol, NULL),
        "%s differs from the reference", what);
}

/* Everything observable through the API agrees with the reference module. */
static void check_module_matches_ref(run *r, double grad_scale) {
  const fbnt_ref_module *ref = &r->ref;
  const int64_t c = r->cfg.options.num_features;
  if (r->cfg.options.track_running_stats) {
    int64_t nbt = -1;
    CHECK_OK(fbn_module_get_num_batches_tracked(r->m, &nbt));
    CHECK(nbt == ref->num_batches_tracked, "num_batches_tracked %" PRId64 ", want %" PRId64, nbt,
          ref->num_batches_tracked);
    check_vector(r->m, FBN_BUFFER_RUNNING_MEAN, ref->running_mean, c, 4.0, "running_mean");
    check_vector(r->m, FBN_BUFFER_RUNNING_VAR, ref->running_var, c, 16.0, "running_var");
  }
  if (r->cfg.options.affine) {
    check_vector(r->m, FBN_BUFFER_WEIGHT, ref->weight, c, 1.0, "weight");
    check_vector(r->m, FBN_BUFFER_BIAS, ref->bias, c, 1.0, "bias");
    check_vector(r->m, FBN_BUFFER_WEIGHT_GRAD, ref->weight_grad, c, grad_scale, "weight_grad");
    check_vector(r->m, FBN_BUFFER_BIAS_GRAD, ref->bias_grad, c, grad_scale, "bias_grad");
  }
}

/* scale: magnitude of the terms that make up each element (the absolute
 * tolerance is relative to it, so cancellation does not make it tiny). */
static void check_tensor(run *r, const tensor *t, const double *want, const char *what,
                         double scale) {
  const fbn_tensor_desc *d = &r->cfg.desc;
  const size_t count = fbnt_desc_numel(d);
  fbnt_tensor_to_ref(d, t->data, r->got);
  double m = fbnt_max_abs(want, count);
  fbnt_tol tol = fbnt_tol_for(d->dtype, scale > m ? scale : m);
  CHECK(fbnt_check_close(what, r->got, want, count, tol.rtol, tol.atol, d),
        "%s (%s %s N=%" PRId64 " C=%" PRId64 " H=%" PRId64 " W=%" PRId64
        ") differs from the reference",
        what, fbnt_dtype_str(d->dtype), fbnt_layout_str(d->layout), d->n, d->c, d->h, d->w);
}

/* One fault at fbn_module_forward; the call must change nothing. */
static void run_forward_fault(fbnt_rng *rng, run *r, fault f) {
  const config *cfg = &r->cfg;
  fbn_tensor_desc d = cfg->desc;
  const void *x = r->x.data;
  const void *addend = cfg->has_addend ? r->addend.data : NULL;
  void *y = r->y.data;
  fbn_module *m = r->m;
  const fbn_tensor_desc *dp = &d;
  fbn_status want;
  void *overlap = NULL; /* a buffer holding x, addend and y for the aliasing faults */

  switch (f) {
  case FAULT_FWD_NULL: {
    int k = pick(rng, 4);
    if (k == 0)
      m = NULL;
    else if (k == 1)
      x = NULL;
    else if (k == 2)
      y = NULL;
    else
      dp = NULL;
    want = FBN_STATUS_NULL_POINTER;
    break;
  }
  case FAULT_FWD_DIM: {
    static const int64_t bad[] = {0, -1, INT64_MIN};
    int64_t v = bad[pick(rng, 3)];
    /* (C <= 0 is left out: it is also "C != num_features".) */
    switch (pick(rng, 3)) {
    case 0: d.n = v; break;
    case 1: d.h = v; break;
    default: d.w = v; break;
    }
    want = FBN_STATUS_INVALID_SHAPE;
    break;
  }
  case FAULT_FWD_CHANNELS:
    d.c = coin(rng) ? d.c + 1 + pick(rng, 3) : d.c + 100;
    want = FBN_STATUS_SHAPE_MISMATCH;
    break;
  case FAULT_FWD_OVERFLOW:
    /* Valid dimensions whose element count overflows: never dereferenced. */
    if (coin(rng)) {
      d.n = INT64_MAX / 2;
      d.h = 3;
    } else {
      d.h = (int64_t)1 << 31;
      d.w = (int64_t)1 << 31;
      d.n = 1 + pick(rng, 4);
    }
    want = FBN_STATUS_INVALID_SHAPE;
    break;
  case FAULT_FWD_DTYPE_ENUM: {
    static const int bad[] = {4, -1, 99};
    d.dtype = (fbn_dtype)bad[pick(rng, 3)];
    want = FBN_STATUS_INVALID_VALUE;
    break;
  }
  case FAULT_FWD_LAYOUT_ENUM: {
    static const int bad[] = {2, -1, 1 << 30};
    d.layout = (fbn_layout)bad[pick(rng, 3)];
    want = FBN_STATUS_INVALID_VALUE;
    break;
  }
  case FAULT_FWD_DTYPE_PARAMS:
    /* float64 tensors need float64 parameters, the others float32 ones. */
    if (cfg->options.param_dtype == FBN_DTYPE_FLOAT64) {
      static const fbn_dtype narrow[] = {FBN_DTYPE_FLOAT32, FBN_DTYPE_FLOAT16,
                                         FBN_DTYPE_BFLOAT16};
      d.dtype = narrow[pick(rng, 3)];
    } else {
      d.dtype = FBN_DTYPE_FLOAT64; /* x is never read: the call fails first */
    }
    want = FBN_STATUS_UNSUPPORTED;
    break;
  case FAULT_FWD_ONE_VALUE:
    d.n = d.h = d.w = 1;
    want = FBN_STATUS_INVALID_SHAPE;
    break;
  case FAULT_FWD_ALIAS: {
    /* [spare | x | addend | spare] and y starting inside x or addend, or
     * ending inside x. */
    const size_t bytes = r->x.bytes;
    const size_t esize = fbn_dtype_size(d.dtype);
    const int count = (int)(bytes / esize);
    overlap = fbnt_alloc(4 * bytes);
    char *px = (char *)overlap + bytes, *pa = (char *)overlap + 2 * bytes;
    memcpy(px, r->x.data, bytes);
    memcpy(pa, r->addend.data, bytes);
    x = px;
    addend = cfg->has_addend ? pa : NULL;
    int k = pick(rng, 3);
    if (k == 1 && count > 1)
      y = px - (size_t)(1 + pick(rng, count - 1)) * esize; /* tail over x's head */
    else if (k == 2 && cfg->has_addend)
      y = pa + (size_t)pick(rng, count) * esize; /* head inside addend */
    else
      y = px + (size_t)pick(rng, count) * esize; /* head inside x (0: y == x) */
    want = FBN_STATUS_ALIASING;
    break;
  }
  case FAULT_FWD_NBT_FULL:
    CHECK_OK(fbn_module_set_num_batches_tracked(r->m, INT64_MAX));
    want = FBN_STATUS_INVALID_STATE;
    break;
  default: fail_msg("not a forward fault: %d", (int)f);
  }

  fbnt_state before;
  fbnt_state_capture(r->m, &before);
  tensor_snapshot(&r->y);
  tensor_snapshot(&r->x);
  tensor_snapshot(&r->addend);
  size_t overlap_bytes = 4 * r->x.bytes;
  void *overlap_copy = NULL;
  if (overlap != NULL) {
    overlap_copy = malloc(overlap_bytes);
    if (overlap_copy == NULL)
      abort();
    memcpy(overlap_copy, overlap, overlap_bytes);
  }

  fbn_status st = fbn_module_forward(m, dp, x, addend, y, r->saved, NULL, 0);
  check_failure(st, want, "fbn_module_forward");

  fbnt_state after;
  fbnt_state_capture(r->m, &after);
  CHECK(fbnt_state_equal(&before, &after), "failing forward changed the module");
  fbnt_state_free(&before);
  fbnt_state_free(&after);
  check_untouched(&r->y, "y");
  check_untouched(&r->x, "x");
  check_untouched(&r->addend, "addend");
  if (overlap != NULL) {
    CHECK(memcmp(overlap, overlap_copy, overlap_bytes) == 0,
          "failing aliased forward wrote its buffers");
    free(overlap_copy);
    fbnt_free(overlap);
  }
  if (f == FAULT_FWD_NBT_FULL)
    CHECK_OK(fbn_module_set_num_batches_tracked(r->m, r->ref.num_batches_tracked));
}

/* One fault at fbn_module_backward; the call must change nothing. */
static void run_backward_fault(fbnt_rng *rng, run *r, fault f) {
  const config *cfg = &r->cfg;
  fbn_tensor_desc d = cfg->desc;
  fbn_module *m = r->m;
  const fbn_saved *saved = r->saved;
  const void *x = r->x.data, *y = r->y.data, *dy = r->dy.data;
  void *dx = cfg->want_dx ? r->dx.data : NULL;
  void *daddend = cfg->want_daddend ? r->daddend.data : NULL;
  fbn_status want;
  const fbn_tensor_desc *dp = &d;
  fbn_saved *scratch = NULL;
  fbn_module *other = NULL;
  tensor other_y = {0};

  switch (f) {
  case FAULT_BWD_NULL: {
    int k = pick(rng, 6);
    if (k == 0)
      m = NULL;
    else if (k == 1)
      saved = NULL;
    else if (k == 2)
      dp = NULL;
    else if (k == 3)
      x = NULL;
    else if (k == 4)
      y = NULL;
    else
      dy = NULL;
    want = FBN_STATUS_NULL_POINTER;
    break;
  }
  case FAULT_BWD_EMPTY_SAVED:
    CHECK_OK(fbn_saved_create(&scratch));
    saved = scratch;
    want = FBN_STATUS_INVALID_STATE;
    break;
  case FAULT_BWD_OTHER_MODULE: {
    /* saved filled by another module's forward (same options and shape). */
    CHECK_OK(fbn_module_create(&cfg->options, &other));
    CHECK_OK(fbn_module_set_training(other, cfg->training));
    CHECK_OK(fbn_saved_create(&scratch));
    tensor_new(&other_y, &d);
    CHECK_OK(fbn_module_forward(other, &d, r->x.data, cfg->has_addend ? r->addend.data : NULL,
                                other_y.data, scratch, NULL, 0));
    saved = scratch;
    want = FBN_STATUS_INVALID_STATE;
    break;
  }
  case FAULT_BWD_DESC: {
    /* Valid on its own, but not the forward's description (never larger,
     * so the buffers would still be big enough). */
    const bool batch_stats = config_batch_stats(cfg);
    int k = pick(rng, 3);
    if (k == 1 && d.n > 1 && (!batch_stats || (d.n - 1) * d.h * d.w > 1)) {
      d.n -= 1;
    } else if (k == 2 && d.h != d.w) {
      int64_t t = d.h;
      d.h = d.w;
      d.w = t;
    } else {
      d.layout = d.layout == FBN_LAYOUT_NCHW ? FBN_LAYOUT_NHWC : FBN_LAYOUT_NCHW;
    }
    want = FBN_STATUS_SHAPE_MISMATCH;
    break;
  }
  case FAULT_BWD_DADDEND_NO_ADDEND:
    daddend = r->daddend.data;
    want = FBN_STATUS_INVALID_STATE;
    break;
  case FAULT_BWD_ALIAS: {
    /* An output on top of an input, or the two outputs on each other. */
    void *inputs[3] = {r->x.data, r->y.data, r->dy.data};
    int k = pick(rng, 4);
    if (k < 3) {
      if (coin(rng))
        dx = inputs[k];
      else
        daddend = inputs[k];
    } else {
      dx = r->dx.data;
      daddend = r->dx.data;
    }
    want = FBN_STATUS_ALIASING;
    break;
  }
  default: fail_msg("not a backward fault: %d", (int)f);
  }

  fbnt_state before;
  fbnt_state_capture(r->m, &before);
  tensor *all[] = {&r->x, &r->y, &r->dy, &r->dx, &r->daddend};
  for (size_t i = 0; i < 5; i++)
    tensor_snapshot(all[i]);

  fbn_status st = fbn_module_backward(m, saved, dp, x, y, dy, dx, daddend, NULL, 0);
  check_failure(st, want, "fbn_module_backward");

  fbnt_state after;
  fbnt_state_capture(r->m, &after);
  CHECK(fbnt_state_equal(&before, &after), "failing backward changed the module");
  fbnt_state_free(&before);
  fbnt_state_free(&after);
  static const char *const names[] = {"x", "y", "dy", "dx", "daddend"};
  for (size_t i = 0; i < 5; i++)
    check_untouched(all[i], names[i]);

  fbn_saved_destroy(scratch);
  fbn_module_destroy(other);
  if (other_y.data != NULL)
    tensor_free(&other_y);
}

/* max |xhat| and, per channel, gamma * invstd of the reference's last
 * forward. */
static double ref_xhat_max(const run *r, double *k) {
  const fbn_tensor_desc *d = &r->cfg.desc;
  double xmax = 0.0;
  for (int64_t c = 0; c < d->c; c++) {
    double invstd = 1.0 / sqrt(r->ref_saved.var[c] + r->cfg.options.eps);
    k[c] = (r->cfg.options.affine ? fabs(r->ref.weight[c]) : 1.0) * invstd;
    for (int64_t n = 0; n < d->n; n++)
      for (int64_t h = 0; h < d->h; h++)
        for (int64_t w = 0; w < d->w; w++) {
          double xhat = (r->rx[fbnt_ref_index(d, n, c, h, w)] - r->ref_saved.mean[c]) * invstd;
          if (fabs(xhat) > xmax)
            xmax = fabs(xhat);
        }
  }
  return xmax;
}

/* Valid forward and its checks against the reference. */
static void run_forward(run *r) {
  const config *cfg = &r->cfg;
  const fbn_tensor_desc *d = &cfg->desc;
  fbnt_tensor_poison(d, r->y.data);
  CHECK_OK(fbn_module_forward(r->m, d, r->x.data, cfg->has_addend ? r->addend.data : NULL,
                              r->y.data, r->saved, NULL, 0));
  CHECK(fbnt_ref_forward(&r->ref, d->n, d->h, d->w, r->rx, cfg->has_addend ? r->raddend : NULL,
                         r->ry, &r->ref_saved),
        "the reference refused a valid configuration");
  /* y = ReLU(gamma * xhat + beta + addend): bound of the terms. */
  double k[8];
  double scale = ref_xhat_max(r, k);
  double kmax = 0.0, bmax = 0.0;
  for (int64_t c = 0; c < d->c; c++) {
    double w = cfg->options.affine ? fabs(r->ref.weight[c]) : 1.0;
    kmax = w > kmax ? w : kmax;
    if (cfg->options.affine && fabs(r->ref.bias[c]) > bmax)
      bmax = fabs(r->ref.bias[c]);
  }
  const size_t count = fbnt_desc_numel(d);
  scale = kmax * scale + bmax + (cfg->has_addend ? fbnt_max_abs(r->raddend, count) : 0.0);
  check_tensor(r, &r->y, r->ry, "y", scale);
  check_module_matches_ref(r, 1.0);
}

/* Valid backward; the ReLU mask is the module's own y, as the library's. */
static void run_backward(run *r) {
  const config *cfg = &r->cfg;
  const fbn_tensor_desc *d = &cfg->desc;
  const size_t count = fbnt_desc_numel(d);
  fbnt_tensor_poison(d, r->dx.data);
  fbnt_tensor_poison(d, r->daddend.data);
  tensor_snapshot(&r->dx);
  tensor_snapshot(&r->daddend);
  CHECK_OK(fbn_module_backward(r->m, r->saved, d, r->x.data, r->y.data, r->dy.data,
                               cfg->want_dx ? r->dx.data : NULL,
                               cfg->want_daddend ? r->daddend.data : NULL, NULL, 0));
  fbnt_tensor_to_ref(d, r->y.data, r->got);
  memcpy(r->ry, r->got, count * sizeof(double));

  /* Bound of the terms summed into dweight/dbias: sum |dy| (1 + |xhat|). */
  double grad_scale = 1.0;
  for (int64_t n = 0; n < d->n; n++)
    for (int64_t c = 0; c < d->c; c++)
      for (int64_t h = 0; h < d->h; h++)
        for (int64_t w = 0; w < d->w; w++) {
          size_t i = fbnt_ref_index(d, n, c, h, w);
          double xhat = (r->rx[i] - r->ref_saved.mean[c]) /
                        sqrt(r->ref_saved.var[c] + cfg->options.eps);
          grad_scale += fabs(r->rdy[i]) * (1.0 + fabs(xhat));
        }
  if (cfg->options.affine) {
    for (int64_t c = 0; c < d->c; c++)
      grad_scale += fabs(r->ref.weight_grad[c]) + fabs(r->ref.bias_grad[c]);
  }

  fbnt_ref_backward(&r->ref, &r->ref_saved, r->rx, r->ry, r->rdy,
                    cfg->want_dx ? r->rdx : NULL, cfg->want_daddend ? r->rdaddend : NULL);
  /* dx = k (g - mean(g) - xhat mean(g xhat)): bound of the terms. */
  double k[8];
  double xmax = ref_xhat_max(r, k);
  double kmax = 0.0;
  for (int64_t c = 0; c < d->c; c++)
    kmax = k[c] > kmax ? k[c] : kmax;
  double dx_scale = kmax * fbnt_max_abs(r->rdy, count) * (2.0 + xmax * xmax);
  if (cfg->want_dx)
    check_tensor(r, &r->dx, r->rdx, "dx", dx_scale);
  else
    check_untouched(&r->dx, "dx (not requested)");
  if (cfg->want_daddend)
    check_tensor(r, &r->daddend, r->rdaddend, "daddend", 0.0);
  else
    check_untouched(&r->daddend, "daddend (not requested)");
  check_module_matches_ref(r, grad_scale);
}

static void run_cycle(fbnt_rng *rng, fault f) {
  run r;
  memset(&r, 0, sizeof r);
  fbnt_ref_saved_init(&r.ref_saved);
  random_config(rng, &r.cfg);
  config_for_fault(rng, &r.cfg, f);

  if (fault_is_create(f)) {
    run_create_fault(rng, &r.cfg, f);
    return;
  }

  fbnt_ref_module_init(&r.ref, r.cfg.options.num_features);
  CHECK_OK(fbnt_module_create_random(rng, &r.cfg.options, &r.m, &r.ref));
  CHECK(r.m != NULL, "module not created");
  CHECK_OK(fbn_module_set_training(r.m, r.cfg.training));
  r.ref.training = r.cfg.training;
  CHECK_OK(fbn_saved_create(&r.saved));

  if (fault_is_buffer(f)) {
    fbnt_state before, after;
    fbnt_state_capture(r.m, &before);
    run_buffer_fault(rng, r.m, &r.cfg, f);
    fbnt_state_capture(r.m, &after);
    CHECK(fbnt_state_equal(&before, &after), "failing buffer call changed the module");
    fbnt_state_free(&before);
    fbnt_state_free(&after);
  }

  /* One or two forward/backward rounds reusing the saved object (the
   * second with a new shape, so its payload is re-prepared). */
  int rounds = 1 + pick(rng, 2);
  for (int round = 0; round < rounds; round++) {
    if (round > 0) {
      random_shape(rng, &r.cfg);
      run_tensors_free(&r);
    }
    run_tensors_new(rng, &r);
    if (round == 0 && fault_is_forward(f))
      run_forward_fault(rng, &r, f);
    run_forward(&r);
    if (round == 0 && fault_is_backward(f))
      run_backward_fault(rng, &r, f);
    run_backward(&r);
  }

  run_tensors_free(&r);
  fbnt_ref_saved_free(&r.ref_saved);
  fbnt_ref_module_free(&r.ref);
  fbn_saved_destroy(r.saved);
  fbn_module_destroy(r.m);
}

static long stress_cycles(void) {
  const char *env = getenv("FBN_STRESS_CYCLES");
  if (env != NULL && env[0] != '\0') {
    char *end = NULL;
    long v = strtol(env, &end, 10);
    if (end != NULL && *end == '\0' && v > 0)
      return v;
    fprintf(stderr, "# ignoring FBN_STRESS_CYCLES=\"%s\"\n", env);
  }
  return STRESS_DEFAULT_CYCLES;
}

static void test_stress_random_cycles(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, "stress_random_cycles");
  const long cycles = stress_cycles();
  long seen[FAULT_COUNT] = {0};
  for (long i = 0; i < cycles; i++) {
    /* About a third of the cycles are fault-free. */
    fault f = pick(&rng, 3) == 0 ? FAULT_NONE : (fault)(1 + pick(&rng, FAULT_COUNT - 1));
    cycle cyc = {i, f, &rng};
    current = &cyc;
    run_cycle(&rng, f);
    seen[f]++;
  }
  current = NULL;
  fprintf(stderr, "# %ld cycles:", cycles);
  for (int f = 0; f < FAULT_COUNT; f++)
    fprintf(stderr, " %s=%ld", fault_names[f], seen[f]);
  fprintf(stderr, "\n");
  /* Every fault was exercised (guards against a generator that lost some). */
  if (cycles >= 1000) {
    for (int f = 0; f < FAULT_COUNT; f++)
      if (seen[f] < 10)
        fail_msg("fault %s ran only %ld times", fault_names[f], seen[f]);
  }
}

/* Destroying NULL objects and creating/destroying without any call. */
static void test_stress_create_destroy_only(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, "stress_create_destroy_only");
  for (int i = 0; i < 2000; i++) {
    config cfg;
    random_config(&rng, &cfg);
    fbn_module *m = NULL;
    fbn_saved *s = NULL;
    assert_int_equal(fbn_module_create(&cfg.options, &m), FBN_STATUS_SUCCESS);
    assert_int_equal(fbn_saved_create(&s), FBN_STATUS_SUCCESS);
    if (coin(&rng)) {
      fbn_saved_destroy(s);
      fbn_module_destroy(m);
    } else {
      fbn_module_destroy(m);
      fbn_saved_destroy(s); /* an empty saved outlives nothing */
    }
  }
  fbn_module_destroy(NULL);
  fbn_saved_destroy(NULL);
}

/* ---- the op API --------------------------------------------------------- */

/*
 * Cycles through the op API: a random description (operation, affine,
 * batch or running statistics, tracked, layout, dtype) and shape, an op of
 * the fast backend and one of the float64 reference, forward and backward
 * of both on the same caller memory, compared element by element; in most
 * cycles one bad argument first (to forward or backward), which must fail
 * with its status and leave every output, the running statistics and the
 * saved memory untouched.
 */
typedef enum op_fault {
  OP_FAULT_NONE,
  OP_FAULT_FACTOR,
  OP_FAULT_ADDEND,
  OP_FAULT_SAVED_SMALL,
  OP_FAULT_SAVED_MISALIGNED,
  OP_FAULT_CHANNELS,
  OP_FAULT_GRAD_MODE,
  OP_FAULT_BWD_SAVED_SMALL,
  OP_FAULT_COUNT,
} op_fault;

static fbn_op *op_make(const fbn_op_desc *od, const char *backend) {
  assert_int_equal(setenv("FBN_CPU_BACKEND", backend, 1), 0);
  fbn_op *op = NULL;
  assert_int_equal(fbn_op_create(od, &op), FBN_STATUS_SUCCESS);
  unsetenv("FBN_CPU_BACKEND");
  return op;
}

static void *op_alloc_sized(const fbn_op *op, const fbn_tensor_desc *d,
                            fbn_status (*q)(const fbn_op *, const fbn_tensor_desc *, size_t *),
                            size_t *bytes) {
  assert_int_equal(q(op, d, bytes), FBN_STATUS_SUCCESS);
  return *bytes > 0 ? fbnt_alloc(*bytes) : NULL;
}

/* scale: magnitude of the terms each element is made of (at least the
 * largest |want|). */
static void op_check_close(const char *what, const fbn_tensor_desc *d, const void *got,
                           const void *want, size_t count, double scale, long cyc) {
  double *g = malloc(count * sizeof *g), *w = malloc(count * sizeof *w);
  assert_true(g && w);
  for (size_t i = 0; i < count; i++) {
    g[i] = fbnt_load(d->dtype, got, i);
    w[i] = fbnt_load(d->dtype, want, i);
  }
  const double big = fbnt_max_abs(w, count);
  const fbnt_tol tol = fbnt_tol_for(d->dtype, big > scale ? big : scale);
  char label[96];
  snprintf(label, sizeof label, "op cycle %ld: %s", cyc, what);
  const bool ok = fbnt_check_close(label, g, w, count, 4 * tol.rtol, 4 * tol.atol, NULL);
  free(g);
  free(w);
  if (!ok)
    fail_msg("op cycle %ld: %s differs from the reference backend", cyc, what);
}

static void run_op_cycle(fbnt_rng *rng, long cyc, op_fault bad_arg) {
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = 1 + pick(rng, 6);
  od.dtype = coin(rng) ? FBN_DTYPE_FLOAT32 : FBN_DTYPE_FLOAT64;
  od.param_dtype = od.dtype;
  od.layout = coin(rng) ? FBN_LAYOUT_NCHW : FBN_LAYOUT_NHWC;
  od.operation = (fbn_operation)pick(rng, 3);
  od.affine = coin(rng);
  od.statistics = pick(rng, 3) == 0 ? FBN_STATISTICS_RUNNING : FBN_STATISTICS_BATCH;
  const bool tracked = od.statistics == FBN_STATISTICS_RUNNING || coin(rng);
  fbn_tensor_desc d = fbn_tensor_desc_make(1 + pick(rng, 4), od.num_features, 1 + pick(rng, 9),
                                           1 + pick(rng, 9), od.dtype, od.layout);
  if (d.n * d.h * d.w == 1)
    d.w = 2;
  fbn_op *fast = op_make(&od, "fast"), *ref = op_make(&od, "reference");
  const size_t count = fbnt_desc_numel(&d), pbytes = (size_t)od.num_features * 8;
  const bool has_z = od.operation == FBN_OPERATION_BN_ADD_RELU;
  const bool relu = od.operation != FBN_OPERATION_BN;
  void *x = fbnt_tensor_alloc(&d), *z = fbnt_tensor_alloc(&d), *dy = fbnt_tensor_alloc(&d);
  fbnt_fill_channels(rng, &d, x, NULL);
  fbnt_fill_normal(rng, &d, z, NULL, 1.0);
  fbnt_fill_normal(rng, &d, dy, NULL, 1.0);
  double v[4][8];
  fbnt_fill_vector(rng, v[0], od.num_features, 0.5, 1.5, true, od.dtype == FBN_DTYPE_FLOAT32);
  fbnt_fill_vector(rng, v[1], od.num_features, -0.5, 0.5, false, false);
  fbnt_fill_vector(rng, v[2], od.num_features, -1.0, 1.0, false, false);
  fbnt_fill_vector(rng, v[3], od.num_features, 0.5, 2.0, false, false);
  /* per-channel arrays: [0] the fast op's, [1] the reference's */
  void *w = fbnt_alloc(pbytes), *b = fbnt_alloc(pbytes), *rm[2], *rv[2], *dw[2], *db[2];
  void *y[2], *dx[2], *dz[2], *saved[2], *ws[2][2];
  size_t sb[2], wsb[2][2];
  for (int64_t c = 0; c < od.num_features; c++) {
    fbnt_store(od.dtype, w, (size_t)c, v[0][c]);
    fbnt_store(od.dtype, b, (size_t)c, v[1][c]);
  }
  for (int k = 0; k < 2; k++) {
    const fbn_op *op = k == 0 ? fast : ref;
    rm[k] = fbnt_alloc(pbytes);
    rv[k] = fbnt_alloc(pbytes);
    dw[k] = fbnt_alloc(pbytes);
    db[k] = fbnt_alloc(pbytes);
    for (int64_t c = 0; c < od.num_features; c++) {
      fbnt_store(od.dtype, rm[k], (size_t)c, v[2][c]);
      fbnt_store(od.dtype, rv[k], (size_t)c, v[3][c]);
      fbnt_store(od.dtype, dw[k], (size_t)c, 0.25 * (double)c);
      fbnt_store(od.dtype, db[k], (size_t)c, -0.5 * (double)c);
    }
    y[k] = fbnt_tensor_alloc(&d);
    dx[k] = fbnt_tensor_alloc(&d);
    dz[k] = fbnt_tensor_alloc(&d);
    fbnt_tensor_poison(&d, y[k]);
    fbnt_tensor_poison(&d, dx[k]);
    fbnt_tensor_poison(&d, dz[k]);
    saved[k] = op_alloc_sized(op, &d, fbn_op_saved_size, &sb[k]);
    ws[k][0] = op_alloc_sized(op, &d, fbn_op_forward_workspace_size, &wsb[k][0]);
    ws[k][1] = op_alloc_sized(op, &d, fbn_op_backward_workspace_size, &wsb[k][1]);
  }
  const double factor = fbnt_rng_uniform(rng, 0.0, 1.0);
  const fbn_param_grad pg = coin(rng) ? FBN_PARAM_GRAD_ACCUMULATE : FBN_PARAM_GRAD_OVERWRITE;
  void *W = od.affine ? w : NULL, *B = od.affine ? b : NULL;

  /* one bad argument to the fast op: nothing may change */
  if (bad_arg != OP_FAULT_NONE) {
    const size_t tb = count * fbn_dtype_size(d.dtype);
    unsigned char *before = malloc(3 * tb + 4 * pbytes + sb[0]);
    assert_non_null(before);
    memcpy(before, y[0], tb);
    memcpy(before + tb, dx[0], tb);
    memcpy(before + 2 * tb, dz[0], tb);
    memcpy(before + 3 * tb, rm[0], pbytes);
    memcpy(before + 3 * tb + pbytes, rv[0], pbytes);
    memcpy(before + 3 * tb + 2 * pbytes, dw[0], pbytes);
    memcpy(before + 3 * tb + 3 * pbytes, db[0], pbytes);
    memcpy(before + 3 * tb + 4 * pbytes, saved[0], sb[0]);
    fbn_tensor_desc bad = d;
    bad.c += 1;
    fbn_status st = FBN_STATUS_SUCCESS, want = FBN_STATUS_SUCCESS;
    void *rmf = tracked ? rm[0] : NULL, *rvf = tracked ? rv[0] : NULL;
    switch (bad_arg) {
    case OP_FAULT_FACTOR: /* only checked when the running statistics are updated */
      want = tracked && od.statistics == FBN_STATISTICS_BATCH ? FBN_STATUS_INVALID_VALUE
                                                              : FBN_STATUS_SUCCESS;
      if (want == FBN_STATUS_SUCCESS)
        break;
      st = fbn_op_forward(fast, &d, x, has_z ? z : NULL, y[0], W, B, rmf, rvf, 1.0 + factor,
                          saved[0], sb[0], ws[0][0], wsb[0][0]);
      break;
    case OP_FAULT_ADDEND:
      want = has_z ? FBN_STATUS_NULL_POINTER : FBN_STATUS_INVALID_VALUE;
      st = fbn_op_forward(fast, &d, x, has_z ? NULL : z, y[0], W, B, rmf, rvf, factor, saved[0],
                          sb[0], ws[0][0], wsb[0][0]);
      break;
    case OP_FAULT_SAVED_SMALL:
      want = FBN_STATUS_INSUFFICIENT_WORKSPACE;
      st = fbn_op_forward(fast, &d, x, has_z ? z : NULL, y[0], W, B, rmf, rvf, factor, saved[0],
                          sb[0] - 1, ws[0][0], wsb[0][0]);
      break;
    case OP_FAULT_SAVED_MISALIGNED:
      want = FBN_STATUS_INSUFFICIENT_WORKSPACE;
      st = fbn_op_forward(fast, &d, x, has_z ? z : NULL, y[0], W, B, rmf, rvf, factor,
                          (char *)saved[0] + 8, sb[0] - 8, ws[0][0], wsb[0][0]);
      break;
    case OP_FAULT_CHANNELS:
      want = FBN_STATUS_SHAPE_MISMATCH;
      st = fbn_op_forward(fast, &bad, x, has_z ? z : NULL, y[0], W, B, rmf, rvf, factor,
                          saved[0], sb[0], ws[0][0], wsb[0][0]);
      break;
    case OP_FAULT_GRAD_MODE:
      want = FBN_STATUS_INVALID_VALUE;
      st = fbn_op_backward(fast, &d, x, y[0], dy, saved[0], sb[0], W, B, dx[0],
                           has_z ? dz[0] : NULL, od.affine ? dw[0] : NULL,
                           od.affine ? db[0] : NULL, (fbn_param_grad)(2 + pick(rng, 5)), ws[0][1],
                           wsb[0][1]);
      break;
    case OP_FAULT_BWD_SAVED_SMALL:
      want = FBN_STATUS_INSUFFICIENT_WORKSPACE;
      st = fbn_op_backward(fast, &d, x, y[0], dy, saved[0], sb[0] / 2, W, B, dx[0],
                           has_z ? dz[0] : NULL, od.affine ? dw[0] : NULL,
                           od.affine ? db[0] : NULL, pg, ws[0][1], wsb[0][1]);
      break;
    case OP_FAULT_NONE:
    case OP_FAULT_COUNT: break;
    }
    if (st != want)
      fail_msg("op cycle %ld: bad_arg %d: got %s, want %s (%s)", cyc, (int)bad_arg,
               fbn_status_string(st), fbn_status_string(want), fbn_last_error_message());
    if (want != FBN_STATUS_SUCCESS) {
      if (strstr(fbn_last_error_message(), "fbn_op_") == NULL)
        fail_msg("op cycle %ld: message \"%s\" names no call", cyc, fbn_last_error_message());
      if (memcmp(before, y[0], tb) != 0 || memcmp(before + tb, dx[0], tb) != 0 ||
          memcmp(before + 2 * tb, dz[0], tb) != 0 ||
          memcmp(before + 3 * tb, rm[0], pbytes) != 0 ||
          memcmp(before + 3 * tb + pbytes, rv[0], pbytes) != 0 ||
          memcmp(before + 3 * tb + 2 * pbytes, dw[0], pbytes) != 0 ||
          memcmp(before + 3 * tb + 3 * pbytes, db[0], pbytes) != 0 ||
          memcmp(before + 3 * tb + 4 * pbytes, saved[0], sb[0]) != 0)
        fail_msg("op cycle %ld: bad_arg %d wrote to caller memory", cyc, (int)bad_arg);
    }
    free(before);
  }

  for (int k = 0; k < 2; k++) {
    const fbn_op *op = k == 0 ? fast : ref;
    fbn_status st = fbn_op_forward(op, &d, x, has_z ? z : NULL, y[k], W, B,
                                   tracked ? rm[k] : NULL, tracked ? rv[k] : NULL, factor,
                                   saved[k], sb[k], ws[k][0], wsb[k][0]);
    if (st != FBN_STATUS_SUCCESS)
      fail_msg("op cycle %ld: forward: %s", cyc, fbn_last_error_message());
    st = fbn_op_backward(op, &d, x, relu ? y[k] : NULL, dy, saved[k], sb[k], W, B, dx[k],
                         has_z ? dz[k] : NULL, od.affine ? dw[k] : NULL,
                         od.affine ? db[k] : NULL, pg, ws[k][1], wsb[k][1]);
    if (st != FBN_STATUS_SUCCESS)
      fail_msg("op cycle %ld: backward: %s", cyc, fbn_last_error_message());
  }
  /* |dy| <= ~4, weight * invstd <= 1.5 * 2, |xhat| <= ~sqrt(N*H*W) */
  const double per = (double)(d.n * d.h * d.w);
  op_check_close("y", &d, y[0], y[1], count, 0.0, cyc);
  op_check_close("dx", &d, dx[0], dx[1], count, 12.0 * (1.0 + sqrt(per)), cyc);
  if (has_z)
    op_check_close("daddend", &d, dz[0], dz[1], count, 0.0, cyc);
  const fbn_tensor_desc pc = fbn_tensor_desc_make(1, od.num_features, 1, 1, od.dtype, od.layout);
  op_check_close("running_mean", &pc, rm[0], rm[1], (size_t)od.num_features, 0.0, cyc);
  op_check_close("running_var", &pc, rv[0], rv[1], (size_t)od.num_features, 0.0, cyc);
  if (od.affine) {
    op_check_close("dweight", &pc, dw[0], dw[1], (size_t)od.num_features, 4.0 * per, cyc);
    op_check_close("dbias", &pc, db[0], db[1], (size_t)od.num_features, 4.0 * per, cyc);
  }

  for (int k = 0; k < 2; k++) {
    void *p[] = {rm[k], rv[k], dw[k], db[k], y[k], dx[k], dz[k], saved[k], ws[k][0], ws[k][1]};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
      fbnt_free(p[i]);
  }
  fbnt_free(w);
  fbnt_free(b);
  fbnt_free(x);
  fbnt_free(z);
  fbnt_free(dy);
  fbn_op_destroy(fast);
  fbn_op_destroy(ref);
}

static void test_stress_op_cycles(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, "stress_op_cycles");
  const long cycles = stress_cycles() / 5;
  for (long i = 0; i < cycles; i++) {
    const op_fault f = pick(&rng, 3) == 0 ? OP_FAULT_NONE
                                          : (op_fault)(1 + pick(&rng, OP_FAULT_COUNT - 1));
    run_op_cycle(&rng, i, f);
  }
  fprintf(stderr, "# %ld op API cycles\n", cycles);
}

int main(int argc, char **argv) {
  fbnt_parse_args(argc, argv);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_stress_random_cycles),
      cmocka_unit_test(test_stress_create_destroy_only),
      cmocka_unit_test(test_stress_op_cycles),
  };
  return cmocka_run_group_tests_name("stress", tests, NULL, NULL);
}
