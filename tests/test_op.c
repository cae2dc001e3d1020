/*
 * The op API (fbn_op_*) against the float64 reference (tests/util/ref.c) on
 * both CPU backends: every operation x affine x tracked statistics x
 * batch/running statistics x layout x dtype, forward and backward, with
 * dweight/dbias overwritten and accumulated, caller-owned saved state
 * reused across calls and two forwards run before their backwards. Outputs
 * are NaN-poisoned before every call and every element is checked.
 */
#include <dlfcn.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "fbn_testutil.h"

/* One configuration of the op. */
typedef struct op_case {
  const char *backend; /* FBN_CPU_BACKEND at fbn_op_create */
  fbn_operation operation;
  bool affine;
  bool tracked;  /* running statistics given */
  bool training; /* FBN_STATISTICS_BATCH (else RUNNING, tracked) */
  fbn_layout layout;
  fbn_dtype dtype;
  fbn_param_grad param_grad;
  int64_t n, c, h, w;
  /* > 0: OpenMP threads for the size queries, then for the calls */
  int query_threads, call_threads;
} op_case;

static void case_name(const op_case *k, char *buf, size_t size) {
  snprintf(buf, size, "%s %s affine=%d tracked=%d %s %s %s %s (%lld,%lld,%lld,%lld)",
           k->backend, fbn_operation_name(k->operation), k->affine, k->tracked,
           k->training ? "batch" : "running", fbnt_layout_str(k->layout),
           fbnt_dtype_str(k->dtype),
           k->param_grad == FBN_PARAM_GRAD_ACCUMULATE ? "accumulate" : "overwrite",
           (long long)k->n, (long long)k->c, (long long)k->h, (long long)k->w);
}

static fbn_op *make_op(const op_case *k) {
  assert_int_equal(setenv("FBN_CPU_BACKEND", k->backend, 1), 0);
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = k->c;
  od.eps = 1e-4;
  od.dtype = k->dtype;
  od.param_dtype = k->dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  od.layout = k->layout;
  od.operation = k->operation;
  od.affine = k->affine;
  od.statistics = k->training ? FBN_STATISTICS_BATCH : FBN_STATISTICS_RUNNING;
  fbn_op *op = NULL;
  assert_int_equal(fbn_op_create(&od, &op), FBN_STATUS_SUCCESS);
  unsetenv("FBN_CPU_BACKEND");
  return op;
}

/* A per-channel array of the op's param dtype from doubles. */
static void *param_array(fbn_dtype pt, const double *v, int64_t c) {
  void *p = fbnt_alloc((size_t)c * 8);
  for (int64_t i = 0; i < c; i++)
    fbnt_store(pt, p, (size_t)i, v[i]);
  return p;
}

static bool check_params(const char *name, const char *what, fbn_dtype pt, const void *got,
                         const double *want, int64_t c) {
  double g[64];
  assert_true(c <= 64);
  for (int64_t i = 0; i < c; i++)
    g[i] = fbnt_load(pt, got, (size_t)i);
  char label[320];
  snprintf(label, sizeof label, "%s: %s", name, what);
  const fbnt_tol tol = fbnt_tol_for(pt, fbnt_max_abs(want, (size_t)c));
  return fbnt_check_close(label, g, want, (size_t)c, tol.rtol, tol.atol, NULL);
}

/* One forward of the case on fresh data: x (and addend) random, y
 * poisoned, checked against the reference (which ref runs too); the
 * reference's y and saved statistics stay in yr / rs. */
typedef struct fwd_data {
  void *x, *z, *y;
  double *xr, *zr, *yr;
  fbnt_ref_saved rs;
} fwd_data;

static void fwd_data_init(fwd_data *f, const fbn_tensor_desc *d) {
  const size_t count = fbnt_desc_numel(d);
  f->x = fbnt_tensor_alloc(d);
  f->z = fbnt_tensor_alloc(d);
  f->y = fbnt_tensor_alloc(d);
  f->xr = calloc(count, sizeof(double));
  f->zr = calloc(count, sizeof(double));
  f->yr = calloc(count, sizeof(double));
  assert_non_null(f->xr);
  assert_non_null(f->zr);
  assert_non_null(f->yr);
  fbnt_ref_saved_init(&f->rs);
}

static void fwd_data_free(fwd_data *f) {
  fbnt_free(f->x);
  fbnt_free(f->z);
  fbnt_free(f->y);
  free(f->xr);
  free(f->zr);
  free(f->yr);
  fbnt_ref_saved_free(&f->rs);
}

typedef struct run_state {
  const op_case *k;
  const fbn_op *op;
  fbn_tensor_desc d;
  fbn_dtype pt;
  fbnt_ref_module ref;
  void *weight, *bias, *rmean, *rvar;
  void *workspace;
  size_t ws_fwd, ws_bwd, saved_bytes;
  char name[256];
} run_state;

static bool run_forward(run_state *s, fbnt_rng *rng, fwd_data *f, void *saved) {
  const op_case *k = s->k;
  const fbn_tensor_desc *d = &s->d;
  const bool has_z = k->operation == FBN_OPERATION_BN_ADD_RELU;
  fbnt_fill_channels(rng, d, f->x, f->xr);
  if (has_z)
    fbnt_fill_normal(rng, d, f->z, f->zr, 1.0);
  fbnt_tensor_poison(d, f->y);
  /* reference: BN alone is the pre-activation (taken before the forward
   * updates the running statistics); the forward gives the statistics */
  if (k->operation == FBN_OPERATION_BN)
    fbnt_ref_preactivation(&s->ref, d->n, d->h, d->w, f->xr, NULL, f->yr);
  double *ytmp = calloc(fbnt_desc_numel(d), sizeof(double));
  assert_non_null(ytmp);
  assert_true(fbnt_ref_forward(&s->ref, d->n, d->h, d->w, f->xr, has_z ? f->zr : NULL, ytmp,
                               &f->rs));
  if (k->operation != FBN_OPERATION_BN)
    memcpy(f->yr, ytmp, fbnt_desc_numel(d) * sizeof(double));
  free(ytmp);

  double factor = 0.0;
  assert_int_equal(fbn_running_average_factor(s->ref.momentum, false, 1, &factor),
                   FBN_STATUS_SUCCESS);
  fbn_status st = fbn_op_forward(s->op, d, f->x, has_z ? f->z : NULL, f->y, s->weight, s->bias,
                                 k->tracked ? s->rmean : NULL, k->tracked ? s->rvar : NULL,
                                 factor, saved, s->saved_bytes, s->workspace, s->ws_fwd);
  if (st != FBN_STATUS_SUCCESS) {
    print_error("%s: forward: %s: %s\n", s->name, fbn_status_string(st),
                fbn_last_error_message());
    return false;
  }
  bool ok = fbnt_check_tensor(s->name, "forward y", d, f->y, f->yr);
  if (k->tracked) {
    ok &= check_params(s->name, "running_mean", s->pt, s->rmean, s->ref.running_mean, d->c);
    ok &= check_params(s->name, "running_var", s->pt, s->rvar, s->ref.running_var, d->c);
  }
  return ok;
}

static bool run_backward(run_state *s, fbnt_rng *rng, const fwd_data *f, const void *saved,
                         void *dweight, void *dbias) {
  const op_case *k = s->k;
  const fbn_tensor_desc *d = &s->d;
  const size_t count = fbnt_desc_numel(d);
  const bool has_z = k->operation == FBN_OPERATION_BN_ADD_RELU;
  void *dy = fbnt_tensor_alloc(d), *dx = fbnt_tensor_alloc(d), *dz = fbnt_tensor_alloc(d);
  double *dyr = calloc(count, sizeof(double)), *dxr = calloc(count, sizeof(double));
  double *dzr = calloc(count, sizeof(double)), *gate = calloc(count, sizeof(double));
  assert_true(dyr && dxr && dzr && gate);
  fbnt_fill_normal(rng, d, dy, dyr, 1.0);
  fbnt_tensor_poison(d, dx);
  fbnt_tensor_poison(d, dz);
  /* the reference gates with y > 0; BN alone passes every dy */
  for (size_t i = 0; i < count; i++)
    gate[i] = k->operation == FBN_OPERATION_BN ? 1.0 : f->yr[i];
  if (k->affine) {
    if (k->param_grad == FBN_PARAM_GRAD_OVERWRITE) {
      /* the reference accumulates: from zero; the op's arrays start as NaN */
      for (int64_t c = 0; c < d->c; c++) {
        s->ref.weight_grad[c] = s->ref.bias_grad[c] = 0.0;
        fbnt_store(s->pt, dweight, (size_t)c, NAN);
        fbnt_store(s->pt, dbias, (size_t)c, NAN);
      }
    } else {
      for (int64_t c = 0; c < d->c; c++) {
        s->ref.weight_grad[c] = fbnt_load(s->pt, dweight, (size_t)c);
        s->ref.bias_grad[c] = fbnt_load(s->pt, dbias, (size_t)c);
      }
    }
  }
  fbnt_ref_backward(&s->ref, &f->rs, f->xr, gate, dyr, dxr, dzr);
  fbn_status st = fbn_op_backward(
      s->op, d, f->x, k->operation == FBN_OPERATION_BN ? NULL : f->y, dy, saved, s->saved_bytes,
      s->weight, s->bias, dx, has_z ? dz : NULL, k->affine ? dweight : NULL,
      k->affine ? dbias : NULL, k->param_grad, s->workspace, s->ws_bwd);
  bool ok = st == FBN_STATUS_SUCCESS;
  if (!ok)
    print_error("%s: backward: %s: %s\n", s->name, fbn_status_string(st),
                fbn_last_error_message());
  if (ok) {
    ok &= fbnt_check_tensor(s->name, "backward dx", d, dx, dxr);
    if (has_z)
      ok &= fbnt_check_tensor(s->name, "backward daddend", d, dz, dzr);
    if (k->affine) {
      ok &= check_params(s->name, "dweight", s->pt, dweight, s->ref.weight_grad, d->c);
      ok &= check_params(s->name, "dbias", s->pt, dbias, s->ref.bias_grad, d->c);
    }
  }
  fbnt_free(dy);
  fbnt_free(dx);
  fbnt_free(dz);
  free(dyr);
  free(dxr);
  free(dzr);
  free(gate);
  return ok;
}

/* Bytes of one tensor of the case. */
static size_t tensor_bytes(const fbn_tensor_desc *d) {
  return fbnt_desc_numel(d) * fbn_dtype_size(d->dtype);
}

/* A call given an array its flags exclude (not affine: weight, dweight;
 * batch statistics without running statistics: running_mean alone) is
 * INVALID_VALUE and writes nothing: neither its outputs nor the NaN-filled
 * arrays handed over. */
static bool check_refused(run_state *s, fbnt_rng *rng, const fwd_data *f, void *saved) {
  const op_case *k = s->k;
  const fbn_tensor_desc *d = &s->d;
  const bool has_z = k->operation == FBN_OPERATION_BN_ADD_RELU;
  const size_t bytes = tensor_bytes(d), pbytes = (size_t)d->c * fbn_dtype_size(s->pt);
  double nans[64];
  for (int64_t c = 0; c < d->c; c++)
    nans[c] = NAN;
  void *extra = param_array(s->pt, nans, d->c), *extra_copy = fbnt_alloc(pbytes);
  void *y_copy = fbnt_alloc(bytes), *saved_copy = fbnt_alloc(s->saved_bytes);
  void *dy = fbnt_tensor_alloc(d), *dx = fbnt_tensor_alloc(d), *dx_copy = fbnt_alloc(bytes);
  /* outputs poisoned: a refused call that computed would change them */
  fbnt_tensor_poison(d, f->y);
  memset(saved, 0xa5, s->saved_bytes);
  memcpy(extra_copy, extra, pbytes);
  memcpy(y_copy, f->y, bytes);
  memcpy(saved_copy, saved, s->saved_bytes);
  fbnt_fill_normal(rng, d, dy, NULL, 1.0);
  fbnt_tensor_poison(d, dx);
  memcpy(dx_copy, dx, bytes);
  bool ok = true;
  int calls = 0;
  for (int which = 0; which < 3; which++) {
    fbn_status st;
    if (which == 0 && !k->affine) {
      st = fbn_op_forward(s->op, d, f->x, has_z ? f->z : NULL, f->y, extra, NULL,
                          k->tracked ? s->rmean : NULL, k->tracked ? s->rvar : NULL, 0.25, saved,
                          s->saved_bytes, s->workspace, s->ws_fwd);
    } else if (which == 1 && !k->affine) {
      st = fbn_op_backward(s->op, d, f->x, k->operation == FBN_OPERATION_BN ? NULL : f->y, dy,
                           saved, s->saved_bytes, NULL, NULL, dx, NULL, extra, NULL,
                           k->param_grad, s->workspace, s->ws_bwd);
    } else if (which == 2 && !k->tracked) {
      st = fbn_op_forward(s->op, d, f->x, has_z ? f->z : NULL, f->y, s->weight, s->bias, extra,
                          NULL, 0.25, saved, s->saved_bytes, s->workspace, s->ws_fwd);
    } else {
      continue;
    }
    calls++;
    if (st != FBN_STATUS_INVALID_VALUE) {
      print_error("%s: refused call %d: got %s, want INVALID_VALUE\n", s->name, which,
                  fbn_status_string(st));
      ok = false;
    }
    if (memcmp(extra, extra_copy, pbytes) != 0 || memcmp(f->y, y_copy, bytes) != 0 ||
        memcmp(saved, saved_copy, s->saved_bytes) != 0 || memcmp(dx, dx_copy, bytes) != 0) {
      print_error("%s: refused call %d wrote memory\n", s->name, which);
      ok = false;
    }
  }
  if (!k->affine || !k->tracked)
    ok &= calls > 0;
  void *bufs[] = {extra, extra_copy, y_copy, saved_copy, dy, dx, dx_copy};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    fbnt_free(bufs[i]);
  return ok;
}

/* omp_set_num_threads / omp_get_max_threads of the OpenMP runtime the
 * library links, or NULL in a build without OpenMP. */
typedef void (*omp_set_fn)(int);
typedef int (*omp_get_fn)(void);
static omp_set_fn omp_setter(void) {
  void *p = dlsym(RTLD_DEFAULT, "omp_set_num_threads");
  omp_set_fn f;
  memcpy(&f, &p, sizeof f);
  return p != NULL ? f : NULL;
}

/* Forward A and B before their backwards, then A's saved memory reused by a
 * third forward and its backward. */
static bool run_case(const op_case *k, fbnt_rng *rng) {
  run_state s;
  memset(&s, 0, sizeof s);
  s.k = k;
  case_name(k, s.name, sizeof s.name);
  fbn_op *op = make_op(k);
  s.op = op;
  s.d = fbn_tensor_desc_make(k->n, k->c, k->h, k->w, k->dtype, k->layout);
  s.pt = k->dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  const bool f32 = s.pt == FBN_DTYPE_FLOAT32;

  fbnt_ref_module_init(&s.ref, k->c);
  s.ref.eps = 1e-4;
  s.ref.momentum = 0.25;
  s.ref.affine = k->affine;
  s.ref.track_running_stats = k->tracked;
  s.ref.training = k->training;
  fbnt_fill_vector(rng, s.ref.weight, k->c, 0.5, 1.5, true, f32);
  fbnt_fill_vector(rng, s.ref.bias, k->c, -0.5, 0.5, false, f32);
  fbnt_fill_vector(rng, s.ref.running_mean, k->c, -1.0, 1.0, false, f32);
  fbnt_fill_vector(rng, s.ref.running_var, k->c, 0.5, 2.0, false, f32);
  double grads[2][64];
  fbnt_fill_vector(rng, grads[0], k->c, -1.0, 1.0, false, f32);
  fbnt_fill_vector(rng, grads[1], k->c, -1.0, 1.0, false, f32);
  s.weight = k->affine ? param_array(s.pt, s.ref.weight, k->c) : NULL;
  s.bias = k->affine ? param_array(s.pt, s.ref.bias, k->c) : NULL;
  s.rmean = param_array(s.pt, s.ref.running_mean, k->c);
  s.rvar = param_array(s.pt, s.ref.running_var, k->c);
  void *dweight = param_array(s.pt, grads[0], k->c), *dbias = param_array(s.pt, grads[1], k->c);

  if (k->query_threads > 0)
    omp_setter()(k->query_threads);
  assert_int_equal(fbn_op_saved_size(op, &s.d, &s.saved_bytes), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_op_forward_workspace_size(op, &s.d, &s.ws_fwd), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_op_backward_workspace_size(op, &s.d, &s.ws_bwd), FBN_STATUS_SUCCESS);
  if (k->call_threads > 0) {
    /* the calls find more threads than the queries: the sizes they would
     * get now are larger than the workspace handed over */
    omp_setter()(k->call_threads);
    size_t now_fwd = 0, now_bwd = 0;
    assert_int_equal(fbn_op_forward_workspace_size(op, &s.d, &now_fwd), FBN_STATUS_SUCCESS);
    assert_int_equal(fbn_op_backward_workspace_size(op, &s.d, &now_bwd), FBN_STATUS_SUCCESS);
    assert_true(now_fwd > s.ws_fwd);
    assert_true(now_bwd > s.ws_bwd);
  }
  assert_true(s.saved_bytes > 0);
  const size_t ws = s.ws_fwd > s.ws_bwd ? s.ws_fwd : s.ws_bwd;
  s.workspace = ws > 0 ? fbnt_alloc(ws) : NULL;
  void *saved_a = fbnt_alloc(s.saved_bytes), *saved_b = fbnt_alloc(s.saved_bytes);

  fwd_data fa, fb;
  fwd_data_init(&fa, &s.d);
  fwd_data_init(&fb, &s.d);
  bool ok = run_forward(&s, rng, &fa, saved_a);
  ok = ok && run_forward(&s, rng, &fb, saved_b);
  ok = ok && run_backward(&s, rng, &fa, saved_a, dweight, dbias);
  ok = ok && run_backward(&s, rng, &fb, saved_b, dweight, dbias);
  ok = ok && run_forward(&s, rng, &fa, saved_a);
  ok = ok && run_backward(&s, rng, &fa, saved_a, dweight, dbias);
  ok = ok && check_refused(&s, rng, &fa, saved_a);

  fwd_data_free(&fa);
  fwd_data_free(&fb);
  fbnt_free(saved_a);
  fbnt_free(saved_b);
  fbnt_free(s.workspace);
  fbnt_free(s.weight);
  fbnt_free(s.bias);
  fbnt_free(s.rmean);
  fbnt_free(s.rvar);
  fbnt_free(dweight);
  fbnt_free(dbias);
  fbnt_ref_module_free(&s.ref);
  fbn_op_destroy(op);
  return ok;
}

/* Every configuration of one backend and operation on both shapes: short
 * rows (H*W = 24) and long NCHW rows (H*W = 272) take different loops of
 * the fast backend. */
static void run_operation(const char *backend, fbn_operation operation, const char *test) {
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, test);
  static const int64_t shapes[2][4] = {{3, 5, 4, 6}, {2, 3, 16, 17}};
  /* (training, tracked): batch statistics with and without running
   * statistics, running statistics */
  static const bool modes[3][2] = {{true, true}, {true, false}, {false, true}};
  int failures = 0, cases = 0;
  for (int sh = 0; sh < 2; sh++)
    for (int mo = 0; mo < 3; mo++)
      for (int affine = 0; affine < 2; affine++)
        for (int layout = 0; layout < 2; layout++)
          for (int dt = 0; dt < 2; dt++) {
            const op_case k = {
                .backend = backend,
                .operation = operation,
                .affine = affine,
                .tracked = modes[mo][1],
                .training = modes[mo][0],
                .layout = layout ? FBN_LAYOUT_NHWC : FBN_LAYOUT_NCHW,
                .dtype = dt ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32,
                .param_grad = (sh + mo + layout) % 2 ? FBN_PARAM_GRAD_ACCUMULATE
                                                     : FBN_PARAM_GRAD_OVERWRITE,
                .n = shapes[sh][0],
                .c = shapes[sh][1],
                .h = shapes[sh][2],
                .w = shapes[sh][3],
            };
            cases++;
            if (!run_case(&k, &rng))
              failures++;
          }
  if (failures > 0)
    fail_msg("%d of %d configurations failed", failures, cases);
}

#define OP_TEST(backend, op, name)                                                               \
  static void test_op_##name##_##backend(void **state) {                                         \
    (void)state;                                                                                 \
    run_operation(#backend, op, "test_op_" #name "_" #backend);                                  \
  }
OP_TEST(fast, FBN_OPERATION_BN, bn)
OP_TEST(fast, FBN_OPERATION_BN_RELU, bn_relu)
OP_TEST(fast, FBN_OPERATION_BN_ADD_RELU, bn_add_relu)
OP_TEST(reference, FBN_OPERATION_BN, bn)
OP_TEST(reference, FBN_OPERATION_BN_RELU, bn_relu)
OP_TEST(reference, FBN_OPERATION_BN_ADD_RELU, bn_add_relu)

/* Overwrite and accumulate differ by exactly the starting values. */
static void test_op_grad_overwrite_vs_accumulate(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, "test_op_grad_overwrite_vs_accumulate");
  const op_case k = {.backend = "fast",
                     .operation = FBN_OPERATION_BN_ADD_RELU,
                     .affine = true,
                     .tracked = true,
                     .training = true,
                     .layout = FBN_LAYOUT_NCHW,
                     .dtype = FBN_DTYPE_FLOAT64,
                     .n = 4, .c = 2, .h = 8, .w = 3};
  fbn_op *op = make_op(&k);
  const fbn_tensor_desc d = fbn_tensor_desc_make(4, 2, 8, 3, FBN_DTYPE_FLOAT64, FBN_LAYOUT_NCHW);
  void *x = fbnt_tensor_alloc(&d), *z = fbnt_tensor_alloc(&d), *y = fbnt_tensor_alloc(&d);
  void *dy = fbnt_tensor_alloc(&d), *dx = fbnt_tensor_alloc(&d);
  fbnt_fill_channels(&rng, &d, x, NULL);
  fbnt_fill_normal(&rng, &d, z, NULL, 1.0);
  fbnt_fill_normal(&rng, &d, dy, NULL, 1.0);
  double w[2] = {0.75, -1.25}, b[2] = {0.125, -0.5};
  size_t sb = 0;
  assert_int_equal(fbn_op_saved_size(op, &d, &sb), FBN_STATUS_SUCCESS);
  void *saved = fbnt_alloc(sb);
  size_t wf = 0, wb = 0;
  assert_int_equal(fbn_op_forward_workspace_size(op, &d, &wf), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_op_backward_workspace_size(op, &d, &wb), FBN_STATUS_SUCCESS);
  void *ws = fbnt_alloc(wf > wb ? wf : wb);
  assert_int_equal(fbn_op_forward(op, &d, x, z, y, w, b, NULL, NULL, 0.0, saved, sb, ws, wf),
                   FBN_STATUS_SUCCESS);
  double gw0[2] = {NAN, NAN}, gb0[2] = {NAN, NAN}, gw1[2] = {3.0, -7.0}, gb1[2] = {0.5, 11.0};
  assert_int_equal(fbn_op_backward(op, &d, x, y, dy, saved, sb, w, b, dx, NULL, gw0, gb0,
                                   FBN_PARAM_GRAD_OVERWRITE, ws, wb),
                   FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_op_backward(op, &d, x, y, dy, saved, sb, w, b, dx, NULL, gw1, gb1,
                                   FBN_PARAM_GRAD_ACCUMULATE, ws, wb),
                   FBN_STATUS_SUCCESS);
  for (int c = 0; c < 2; c++) {
    assert_false(isnan(gw0[c]));
    assert_true(fabs(gw1[c] - ((c ? -7.0 : 3.0) + gw0[c])) <= 1e-12);
    assert_true(fabs(gb1[c] - ((c ? 11.0 : 0.5) + gb0[c])) <= 1e-12);
  }
  fbnt_free(x);
  fbnt_free(z);
  fbnt_free(y);
  fbnt_free(dy);
  fbnt_free(dx);
  fbnt_free(saved);
  fbnt_free(ws);
  fbn_op_destroy(op);
}

/* OpenMP's thread count raised between the size queries and the calls
 * (as torch.set_num_threads does): the fast backend runs on as many threads
 * as the workspace holds, forward and backward checked against the
 * reference. NHWC and short-row NCHW size their scratch per thread. */
static void test_op_threads_raised_after_query(void **state) {
  (void)state;
  const omp_set_fn set = omp_setter();
  void *g = dlsym(RTLD_DEFAULT, "omp_get_max_threads");
  if (set == NULL || g == NULL) {
    print_message("[  SKIPPED ] built without OpenMP: the thread count cannot change\n");
    skip();
    return;
  }
  omp_get_fn get;
  memcpy(&get, &g, sizeof get);
  const int before = get();
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, "test_op_threads_raised_after_query");
  static const struct {
    fbn_operation operation;
    fbn_layout layout;
    int64_t n, c, h, w;
    int query_threads, call_threads;
  } shapes[] = {
      {FBN_OPERATION_BN_RELU, FBN_LAYOUT_NHWC, 8, 64, 28, 28, 1, 4},
      /* short-row groups: the one-thread size is larger than two threads' */
      {FBN_OPERATION_BN_ADD_RELU, FBN_LAYOUT_NCHW, 64, 16, 8, 8, 2, 8},
  };
  int failures = 0;
  for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
    const op_case k = {.backend = "fast",
                       .operation = shapes[i].operation,
                       .affine = true,
                       .tracked = true,
                       .training = true,
                       .layout = shapes[i].layout,
                       .dtype = FBN_DTYPE_FLOAT32,
                       .param_grad = FBN_PARAM_GRAD_OVERWRITE,
                       .n = shapes[i].n,
                       .c = shapes[i].c,
                       .h = shapes[i].h,
                       .w = shapes[i].w,
                       .query_threads = shapes[i].query_threads,
                       .call_threads = shapes[i].call_threads};
    if (!run_case(&k, &rng))
      failures++;
  }
  set(before);
  if (failures > 0)
    fail_msg("%d configurations failed", failures);
}

/* The factor helper: momentum, or 1/num_batches_tracked. */
static void test_op_running_average_factor(void **state) {
  (void)state;
  double f = -1.0;
  assert_int_equal(fbn_running_average_factor(0.1, false, 7, &f), FBN_STATUS_SUCCESS);
  assert_true(f == 0.1);
  assert_int_equal(fbn_running_average_factor(0.1, true, 1, &f), FBN_STATUS_SUCCESS);
  assert_true(f == 1.0);
  assert_int_equal(fbn_running_average_factor(0.9, true, 4, &f), FBN_STATUS_SUCCESS);
  assert_true(f == 0.25);
}

int main(int argc, char **argv) {
  fbnt_parse_args(argc, argv);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_op_bn_fast),
      cmocka_unit_test(test_op_bn_relu_fast),
      cmocka_unit_test(test_op_bn_add_relu_fast),
      cmocka_unit_test(test_op_bn_reference),
      cmocka_unit_test(test_op_bn_relu_reference),
      cmocka_unit_test(test_op_bn_add_relu_reference),
      cmocka_unit_test(test_op_grad_overwrite_vs_accumulate),
      cmocka_unit_test(test_op_threads_raised_after_query),
      cmocka_unit_test(test_op_running_average_factor),
  };
  return cmocka_run_group_tests_name("op", tests, NULL, NULL);
}
