/*
 * GPU suite of the op API on CUDA (suite 'gpu'): the three batch-norm
 * operations on caller-owned device memory. Every test skips visibly
 * (cmocka skip, exit status 77) when no CUDA device is usable.
 *
 * Oracle: a CPU op of the float64 reference backend (FBN_CPU_BACKEND=
 * reference) with the same description, float16/bfloat16 tensors
 * included (the reference computes in float64 and rounds each output once
 * to the tensor's dtype). Backward gives the CPU op the GPU's y, so both use
 * the same ReLU gate even where a value sits on the kink.
 *
 *   matrix    BN, BN + ReLU, BN + add + ReLU x float32/float64/float16/
 *             bfloat16 x NCHW/NHWC x (batch statistics updating the running
 *             ones, batch statistics alone, running statistics) x affine on/
 *             off x C % 4 == 0 / != 0: forward into NaN-poisoned y, then
 *             backward into poisoned dx/daddend with dweight/dbias
 *             overwritten or accumulated (alternating), BN alone with
 *             y = NULL; y, running statistics, dx, daddend, dweight, dbias
 *             and the path taken (fbn_cuda_op_path, the table of
 *             docs/cuda-backend.md; a run-time fallback down the chain is a
 *             "# NOTE")
 *   pending   two forwards (own saved memory each) before their backwards,
 *             on a caller stream with a caller cuDNN handle (its stream
 *             given back)
 *   graph     forward + backward captured into a CUDA graph (global capture
 *             mode: an allocation or a synchronization inside would fail
 *             the capture) and replayed: the same results as direct calls
 *   module    a CUDA module of each operation and an op on copies of its
 *             buffers give the same bits (the fused path: within the
 *             tolerances, cuDNN's persistent kernels use atomics)
 *
 * Tolerances as tests/cuda/test_gpu.c: |got - want| <= rtol * |want| +
 * atol * max|want|; tensors float64 1e-9, float32 1e-4, float16 5e-3,
 * bfloat16 2e-2; per-channel buffers float64 1e-9, float32 1e-4, float16
 * 2e-3, bfloat16 1e-2.
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

#include <cuda_runtime_api.h>
#include <cudnn.h>

#include "fbn_testutil.h"
#include "fusedbn/fusedbn_cuda.h"

/* ---- device helpers (the skip mechanism of test_gpu.c) ------------------------ */

static int g_have_gpu = -1;

static bool have_gpu(void) {
  if (g_have_gpu < 0) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    (void)cudaGetLastError();
    g_have_gpu = e == cudaSuccess && count > 0;
    if (!g_have_gpu)
      print_message("# no CUDA device (%s): GPU tests skip\n", cudaGetErrorString(e));
  }
  return g_have_gpu != 0;
}

#define REQUIRE_GPU()                                                                            \
  do {                                                                                           \
    if (!have_gpu())                                                                             \
      skip();                                                                                    \
  } while (0)

#define CUDA_OK(expr)                                                                            \
  do {                                                                                           \
    cudaError_t e_ = (expr);                                                                     \
    if (e_ != cudaSuccess)                                                                       \
      fail_msg("%s: %s", #expr, cudaGetErrorString(e_));                                         \
  } while (0)

#define FBN_OK(expr)                                                                             \
  do {                                                                                           \
    fbn_status s_ = (expr);                                                                      \
    if (s_ != FBN_STATUS_SUCCESS)                                                                \
      fail_msg("%s: %s: %s", #expr, fbn_status_string(s_), fbn_last_error_message());           \
  } while (0)

static void *dev_alloc(size_t bytes) {
  void *p = NULL;
  CUDA_OK(cudaMalloc(&p, bytes > 0 ? bytes : 1));
  return p;
}

static void dev_free(void *p) {
  if (p != NULL)
    CUDA_OK(cudaFree(p));
}

static void *dev_from_host(const void *host, size_t bytes) {
  void *p = dev_alloc(bytes);
  CUDA_OK(cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice));
  return p;
}

/* Device memory of bytes, every byte 0xff: NaN in every floating dtype. */
static void *dev_poisoned(size_t bytes) {
  void *p = dev_alloc(bytes);
  CUDA_OK(cudaMemset(p, 0xff, bytes));
  /* done before work on a caller's non-blocking stream reads or writes it */
  CUDA_OK(cudaDeviceSynchronize());
  return p;
}

/* Device tensor -> logical NCHW float64 array (malloc'd). */
static double *dev_to_ref(const fbn_tensor_desc *d, const void *dev) {
  const size_t count = fbnt_desc_numel(d);
  void *h = fbnt_tensor_alloc(d);
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(h, dev, count * fbn_dtype_size(d->dtype), cudaMemcpyDeviceToHost));
  double *r = malloc(count * sizeof *r);
  assert_non_null(r);
  fbnt_tensor_to_ref(d, h, r);
  fbnt_free(h);
  return r;
}

/* Per-channel arrays: host doubles <-> param_dtype (float or double). */
static void params_pack(fbn_dtype pdt, const double *v, int64_t c, void *out) {
  for (int64_t i = 0; i < c; i++) {
    if (pdt == FBN_DTYPE_FLOAT64)
      ((double *)out)[i] = v[i];
    else
      ((float *)out)[i] = (float)v[i];
  }
}

static void params_unpack(fbn_dtype pdt, const void *in, int64_t c, double *v) {
  for (int64_t i = 0; i < c; i++)
    v[i] = pdt == FBN_DTYPE_FLOAT64 ? ((const double *)in)[i] : (double)((const float *)in)[i];
}

static void *dev_params(fbn_dtype pdt, const double *v, int64_t c) {
  char host[8 * 64];
  assert_true(c <= 64);
  params_pack(pdt, v, c, host);
  return dev_from_host(host, (size_t)c * fbn_dtype_size(pdt));
}

static void dev_params_read(fbn_dtype pdt, const void *dev, int64_t c, double *v) {
  char host[8 * 64];
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(host, dev, (size_t)c * fbn_dtype_size(pdt), cudaMemcpyDeviceToHost));
  params_unpack(pdt, host, c, v);
}

/* ---- tolerances ----------------------------------------------------------------- */

static double tensor_tol(fbn_dtype dt) {
  switch (dt) {
  case FBN_DTYPE_FLOAT64: return 1e-9;
  case FBN_DTYPE_FLOAT32: return 1e-4;
  case FBN_DTYPE_FLOAT16: return 5e-3;
  default: return 2e-2;
  }
}

static double buffer_tol(fbn_dtype dt) {
  switch (dt) {
  case FBN_DTYPE_FLOAT64: return 1e-9;
  case FBN_DTYPE_FLOAT32: return 1e-4;
  case FBN_DTYPE_FLOAT16: return 2e-3;
  default: return 1e-2;
  }
}

static bool check_close(const char *name, const char *what, const double *got,
                        const double *want, size_t count, double tol,
                        const fbn_tensor_desc *d) {
  char label[512];
  snprintf(label, sizeof label, "%.250s: %.250s", name, what);
  const double scale = fbnt_max_abs(want, count);
  return fbnt_check_close(label, got, want, count, tol, tol * (scale > 0 ? scale : 1.0), d);
}

/* ---- one case --------------------------------------------------------------------- */

typedef enum stats_kind { STATS_UPDATE, STATS_BATCH_ONLY, STATS_RUNNING } stats_kind;

typedef struct ocase {
  fbn_operation op;
  fbn_dtype dtype;
  fbn_layout layout;
  stats_kind stats;
  bool affine;
  bool accumulate;
  int64_t n, c, h, w;
} ocase;

static const char *const stats_names[] = {"batch+update", "batch", "running"};

static void ocase_name(const ocase *o, char *buf, size_t size) {
  snprintf(buf, size, "%s %s %s %s affine=%d %s (%lld,%lld,%lld,%lld)",
           fbn_operation_name(o->op), fbnt_dtype_str(o->dtype), fbnt_layout_str(o->layout),
           stats_names[o->stats], o->affine, o->accumulate ? "accumulate" : "overwrite",
           (long long)o->n, (long long)o->c, (long long)o->h, (long long)o->w);
}

static fbn_op_desc ocase_desc(const ocase *o, bool gpu) {
  fbn_op_desc d;
  fbn_op_desc_init(&d);
  d.num_features = o->c;
  d.dtype = o->dtype;
  d.param_dtype = o->dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  d.layout = o->layout;
  d.device = gpu ? FBN_DEVICE_CUDA : FBN_DEVICE_CPU;
  d.operation = o->op;
  d.affine = o->affine;
  d.statistics = o->stats == STATS_RUNNING ? FBN_STATISTICS_RUNNING : FBN_STATISTICS_BATCH;
  return d;
}

/* The table of docs/cuda-backend.md for the case (no size gate applies to
 * these shapes). */
static fbn_cuda_path expected_path(const ocase *o) {
  if (o->stats == STATS_RUNNING)
    return FBN_CUDA_PATH_EVAL;
  if (o->dtype == FBN_DTYPE_FLOAT32 || o->dtype == FBN_DTYPE_FLOAT64)
    return FBN_CUDA_PATH_KERNELS;
  if (o->layout == FBN_LAYOUT_NCHW)
    return FBN_CUDA_PATH_GENERAL;
  if (o->op == FBN_OPERATION_BN_ADD_RELU && o->c % 4 != 0)
    return FBN_CUDA_PATH_KERNELS;
  return FBN_CUDA_PATH_FUSED;
}

static int g_fallback_notes = 0;

static bool check_path(const char *name, const fbn_op *gop, const fbn_tensor_desc *d,
                       fbn_cuda_path want) {
  fbn_cuda_path got = FBN_CUDA_PATH_NONE;
  FBN_OK(fbn_cuda_op_path(gop, d, &got));
  if (got == want)
    return true;
  /* cuDNN refused the documented path at run time: a later path of the
   * chain fused -> general -> kernels */
  const bool fallback = (want == FBN_CUDA_PATH_FUSED &&
                         (got == FBN_CUDA_PATH_GENERAL || got == FBN_CUDA_PATH_KERNELS)) ||
                        (want == FBN_CUDA_PATH_GENERAL && got == FBN_CUDA_PATH_KERNELS);
  if (fallback) {
    g_fallback_notes++;
    print_message("# NOTE %s: the table says %s, this cuDNN/GPU runs %s\n", name,
                  fbn_cuda_path_name(want), fbn_cuda_path_name(got));
    return true;
  }
  print_error("%s: path %s, want %s\n", name, fbn_cuda_path_name(got),
              fbn_cuda_path_name(want));
  return false;
}

/* Everything of one case: host data, both ops' memory. */
typedef struct run {
  fbn_tensor_desc dg, dc; /* GPU and CPU tensor descriptions */
  fbn_dtype pdt;
  size_t count, gbytes, cbytes;
  fbn_op *gop, *cop;
  double *xr, *zr, *dyr; /* logical NCHW values */
  double w[64], b[64], rm[64], rv[64], dw[64], db[64];
  /* CPU op memory */
  void *xc, *zc, *dyc;
  char wc[512], bc[512], rmc[512], rvc[512], dwc[512], dbc[512];
  void *saved_c, *ws_c;
  size_t saved_c_bytes, ws_c_bytes;
  /* GPU op memory */
  void *xg, *zg, *dyg, *wg, *bg, *rmg, *rvg, *dwg, *dbg, *saved_g, *ws_g;
  size_t saved_g_bytes, ws_g_bytes;
} run;

static void run_init(run *r, const ocase *o, fbnt_rng *rng) {
  memset(r, 0, sizeof *r);
  const fbn_op_desc gd = ocase_desc(o, true), cd = ocase_desc(o, false);
  FBN_OK(fbn_op_create(&gd, &r->gop));
  FBN_OK(fbn_op_create(&cd, &r->cop));
  r->dg = fbn_tensor_desc_make(o->n, o->c, o->h, o->w, gd.dtype, o->layout);
  r->dc = fbn_tensor_desc_make(o->n, o->c, o->h, o->w, cd.dtype, o->layout);
  r->pdt = gd.param_dtype;
  r->count = fbnt_desc_numel(&r->dg);
  r->gbytes = r->count * fbn_dtype_size(r->dg.dtype);
  r->cbytes = r->count * fbn_dtype_size(r->dc.dtype);
  /* x, addend, dy in the GPU dtype; the CPU gets the same values */
  void *xh = fbnt_tensor_alloc(&r->dg), *zh = fbnt_tensor_alloc(&r->dg),
       *dyh = fbnt_tensor_alloc(&r->dg);
  r->xr = malloc(r->count * sizeof(double));
  r->zr = malloc(r->count * sizeof(double));
  r->dyr = malloc(r->count * sizeof(double));
  assert_true(r->xr != NULL && r->zr != NULL && r->dyr != NULL);
  fbnt_fill_channels(rng, &r->dg, xh, r->xr);
  fbnt_fill_normal(rng, &r->dg, zh, r->zr, 1.0);
  fbnt_fill_normal(rng, &r->dg, dyh, r->dyr, 1.0);
  r->xg = dev_from_host(xh, r->gbytes);
  r->zg = dev_from_host(zh, r->gbytes);
  r->dyg = dev_from_host(dyh, r->gbytes);
  fbnt_free(xh);
  fbnt_free(zh);
  fbnt_free(dyh);
  r->xc = fbnt_tensor_alloc(&r->dc);
  r->zc = fbnt_tensor_alloc(&r->dc);
  r->dyc = fbnt_tensor_alloc(&r->dc);
  fbnt_tensor_from_ref(&r->dc, r->xr, r->xc);
  fbnt_tensor_from_ref(&r->dc, r->zr, r->zc);
  fbnt_tensor_from_ref(&r->dc, r->dyr, r->dyc);
  /* per-channel state, float32-exact for float32 parameters */
  const bool rnd = r->pdt == FBN_DTYPE_FLOAT32;
  fbnt_fill_vector(rng, r->w, o->c, 0.5, 1.5, true, rnd);
  fbnt_fill_vector(rng, r->b, o->c, -0.5, 0.5, false, rnd);
  fbnt_fill_vector(rng, r->rm, o->c, -1.0, 1.0, false, rnd);
  fbnt_fill_vector(rng, r->rv, o->c, 0.5, 2.0, false, rnd);
  fbnt_fill_vector(rng, r->dw, o->c, -1.0, 1.0, false, rnd);
  fbnt_fill_vector(rng, r->db, o->c, -1.0, 1.0, false, rnd);
  params_pack(r->pdt, r->w, o->c, r->wc);
  params_pack(r->pdt, r->b, o->c, r->bc);
  params_pack(r->pdt, r->rm, o->c, r->rmc);
  params_pack(r->pdt, r->rv, o->c, r->rvc);
  params_pack(r->pdt, r->dw, o->c, r->dwc);
  params_pack(r->pdt, r->db, o->c, r->dbc);
  r->wg = dev_params(r->pdt, r->w, o->c);
  r->bg = dev_params(r->pdt, r->b, o->c);
  r->rmg = dev_params(r->pdt, r->rm, o->c);
  r->rvg = dev_params(r->pdt, r->rv, o->c);
  r->dwg = dev_params(r->pdt, r->dw, o->c);
  r->dbg = dev_params(r->pdt, r->db, o->c);
  /* sizes: saved state, the larger workspace of forward and backward */
  size_t f = 0, b = 0;
  FBN_OK(fbn_op_saved_size(r->gop, &r->dg, &r->saved_g_bytes));
  FBN_OK(fbn_op_forward_workspace_size(r->gop, &r->dg, &f));
  FBN_OK(fbn_op_backward_workspace_size(r->gop, &r->dg, &b));
  r->ws_g_bytes = f > b ? f : b;
  r->saved_g = dev_poisoned(r->saved_g_bytes);
  r->ws_g = r->ws_g_bytes > 0 ? dev_poisoned(r->ws_g_bytes) : NULL;
  FBN_OK(fbn_op_saved_size(r->cop, &r->dc, &r->saved_c_bytes));
  FBN_OK(fbn_op_forward_workspace_size(r->cop, &r->dc, &f));
  FBN_OK(fbn_op_backward_workspace_size(r->cop, &r->dc, &b));
  r->ws_c_bytes = f > b ? f : b;
  r->saved_c = fbnt_alloc(r->saved_c_bytes);
  r->ws_c = r->ws_c_bytes > 0 ? fbnt_alloc(r->ws_c_bytes) : NULL;
}

static void run_free(run *r) {
  void *dev[] = {r->xg, r->zg, r->dyg, r->wg, r->bg, r->rmg, r->rvg,
                 r->dwg, r->dbg, r->saved_g, r->ws_g};
  for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
    dev_free(dev[i]);
  fbnt_free(r->xc);
  fbnt_free(r->zc);
  fbnt_free(r->dyc);
  fbnt_free(r->saved_c);
  if (r->ws_c != NULL)
    fbnt_free(r->ws_c);
  free(r->xr);
  free(r->zr);
  free(r->dyr);
  fbn_op_destroy(r->gop);
  fbn_op_destroy(r->cop);
}

static bool run_ocase(const ocase *o, fbnt_rng *rng, const fbn_cuda_exec *exec) {
  char name[256];
  ocase_name(o, name, sizeof name);
  run r;
  run_init(&r, o, rng);
  const int64_t C = o->c;
  const bool addend = o->op == FBN_OPERATION_BN_ADD_RELU;
  const bool relu = o->op != FBN_OPERATION_BN;
  const bool running = o->stats != STATS_BATCH_ONLY;
  const double factor = 0.3;
  const double tt = tensor_tol(o->dtype), bt = buffer_tol(o->dtype);
  bool ok = true;

  /* forward */
  void *yg = dev_poisoned(r.gbytes);
  void *yc = fbnt_tensor_alloc(&r.dc);
  fbnt_tensor_poison(&r.dc, yc);
  FBN_OK(fbn_cuda_op_forward(r.gop, exec, &r.dg, r.xg, addend ? r.zg : NULL, yg,
                             o->affine ? r.wg : NULL, o->affine ? r.bg : NULL,
                             running ? r.rmg : NULL, running ? r.rvg : NULL, factor, r.saved_g,
                             r.saved_g_bytes, r.ws_g, r.ws_g_bytes));
  FBN_OK(fbn_op_forward(r.cop, &r.dc, r.xc, addend ? r.zc : NULL, yc, o->affine ? r.wc : NULL,
                        o->affine ? r.bc : NULL, running ? r.rmc : NULL, running ? r.rvc : NULL,
                        factor, r.saved_c, r.saved_c_bytes, r.ws_c, r.ws_c_bytes));
  double *y_got = dev_to_ref(&r.dg, yg);
  double *y_want = malloc(r.count * sizeof(double));
  assert_non_null(y_want);
  fbnt_tensor_to_ref(&r.dc, yc, y_want);
  ok &= check_close(name, "y", y_got, y_want, r.count, tt, &r.dg);
  if (running) {
    double got[64], want[64];
    dev_params_read(r.pdt, r.rmg, C, got);
    params_unpack(r.pdt, r.rmc, C, want);
    ok &= check_close(name, "running_mean", got, want, (size_t)C, bt, NULL);
    dev_params_read(r.pdt, r.rvg, C, got);
    params_unpack(r.pdt, r.rvc, C, want);
    ok &= check_close(name, "running_var", got, want, (size_t)C, bt, NULL);
  }
  ok &= check_path(name, r.gop, &r.dg, expected_path(o));

  /* backward: the CPU op gets the GPU's y (the same gate at the kink) */
  void *yc_from_gpu = fbnt_tensor_alloc(&r.dc);
  fbnt_tensor_from_ref(&r.dc, y_got, yc_from_gpu);
  void *dxg = dev_poisoned(r.gbytes), *dzg = addend ? dev_poisoned(r.gbytes) : NULL;
  void *dxc = fbnt_tensor_alloc(&r.dc), *dzc = fbnt_tensor_alloc(&r.dc);
  fbnt_tensor_poison(&r.dc, dxc);
  fbnt_tensor_poison(&r.dc, dzc);
  const fbn_param_grad pg = o->accumulate ? FBN_PARAM_GRAD_ACCUMULATE : FBN_PARAM_GRAD_OVERWRITE;
  if (!o->accumulate && o->affine) {
    /* overwrite must not read the old gradient: make it NaN */
    CUDA_OK(cudaMemset(r.dwg, 0xff, (size_t)C * fbn_dtype_size(r.pdt)));
    CUDA_OK(cudaMemset(r.dbg, 0xff, (size_t)C * fbn_dtype_size(r.pdt)));
    memset(r.dwc, 0xff, sizeof r.dwc);
    memset(r.dbc, 0xff, sizeof r.dbc);
    CUDA_OK(cudaDeviceSynchronize());
  }
  FBN_OK(fbn_cuda_op_backward(r.gop, exec, &r.dg, r.xg, relu ? yg : NULL, r.dyg, r.saved_g,
                              r.saved_g_bytes, o->affine ? r.wg : NULL, o->affine ? r.bg : NULL,
                              dxg, dzg, o->affine ? r.dwg : NULL, o->affine ? r.dbg : NULL, pg,
                              r.ws_g, r.ws_g_bytes));
  FBN_OK(fbn_op_backward(r.cop, &r.dc, r.xc, relu ? yc_from_gpu : NULL, r.dyc, r.saved_c,
                         r.saved_c_bytes, o->affine ? r.wc : NULL, o->affine ? r.bc : NULL, dxc,
                         addend ? dzc : NULL, o->affine ? r.dwc : NULL, o->affine ? r.dbc : NULL,
                         pg, r.ws_c, r.ws_c_bytes));
  double *got = dev_to_ref(&r.dg, dxg);
  double *want = malloc(r.count * sizeof(double));
  assert_non_null(want);
  fbnt_tensor_to_ref(&r.dc, dxc, want);
  ok &= check_close(name, "dx", got, want, r.count, tt, &r.dg);
  free(got);
  if (addend) {
    got = dev_to_ref(&r.dg, dzg);
    fbnt_tensor_to_ref(&r.dc, dzc, want);
    ok &= check_close(name, "daddend", got, want, r.count, tt, &r.dg);
    free(got);
  }
  free(want);
  if (o->affine) {
    double g[64], w[64];
    dev_params_read(r.pdt, r.dwg, C, g);
    params_unpack(r.pdt, r.dwc, C, w);
    ok &= check_close(name, "dweight", g, w, (size_t)C, bt, NULL);
    dev_params_read(r.pdt, r.dbg, C, g);
    params_unpack(r.pdt, r.dbc, C, w);
    ok &= check_close(name, "dbias", g, w, (size_t)C, bt, NULL);
  }
  free(y_got);
  free(y_want);
  fbnt_free(yc);
  fbnt_free(yc_from_gpu);
  fbnt_free(dxc);
  fbnt_free(dzc);
  dev_free(yg);
  dev_free(dxg);
  dev_free(dzg);
  run_free(&r);
  if (!ok)
    print_error("FAILED: %s\n", name);
  return ok;
}

/* ---- tests ------------------------------------------------------------------------ */

static const fbn_dtype dtypes[] = {FBN_DTYPE_FLOAT32, FBN_DTYPE_FLOAT64, FBN_DTYPE_FLOAT16,
                                   FBN_DTYPE_BFLOAT16};
static const int64_t shapes[][4] = {{4, 8, 5, 3}, {3, 6, 4, 7}};

static void run_matrix(fbn_operation op, const char *test) {
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, test);
  int failed = 0, run_count = 0, k = 0;
  for (size_t t = 0; t < 4; t++)
    for (int l = 0; l < 2; l++)
      for (int st = 0; st < 3; st++)
        for (int affine = 0; affine < 2; affine++)
          for (size_t s = 0; s < 2; s++) {
            ocase o = {
                .op = op,
                .dtype = dtypes[t],
                .layout = (fbn_layout)l,
                .stats = (stats_kind)st,
                .affine = affine != 0,
                .accumulate = (k++ & 1) != 0,
                .n = shapes[s][0],
                .c = shapes[s][1],
                .h = shapes[s][2],
                .w = shapes[s][3],
            };
            failed += !run_ocase(&o, &rng, NULL);
            run_count++;
          }
  print_message("# %s: %d cases, %d failed\n", fbn_operation_name(op), run_count, failed);
  assert_int_equal(failed, 0);
}

static void test_gpu_ops_bn(void **state) {
  (void)state;
  REQUIRE_GPU();
  run_matrix(FBN_OPERATION_BN, __func__);
}

static void test_gpu_ops_bn_relu(void **state) {
  (void)state;
  REQUIRE_GPU();
  run_matrix(FBN_OPERATION_BN_RELU, __func__);
}

static void test_gpu_ops_bn_add_relu(void **state) {
  (void)state;
  REQUIRE_GPU();
  run_matrix(FBN_OPERATION_BN_ADD_RELU, __func__);
}

/* The fused path's main shapes on a caller stream with and without a
 * caller cuDNN handle, whose stream is given back. */
static void test_gpu_ops_caller_exec(void **state) {
  (void)state;
  REQUIRE_GPU();
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  cudaStream_t stream, other;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CUDA_OK(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking));
  cudnnHandle_t h;
  assert_int_equal(cudnnCreate(&h), CUDNN_STATUS_SUCCESS);
  assert_int_equal(cudnnSetStream(h, other), CUDNN_STATUS_SUCCESS);
  int failed = 0;
  for (int op = 0; op < 3; op++)
    for (int with_handle = 0; with_handle < 2; with_handle++) {
      fbn_cuda_exec exec = {stream, with_handle ? h : NULL};
      ocase o = {.op = (fbn_operation)op, .dtype = FBN_DTYPE_FLOAT16,
                 .layout = FBN_LAYOUT_NHWC, .stats = STATS_UPDATE, .affine = true,
                 .accumulate = with_handle != 0, .n = 8, .c = 32, .h = 7, .w = 7};
      failed += !run_ocase(&o, &rng, &exec);
      cudaStream_t now = NULL;
      assert_int_equal(cudnnGetStream(h, &now), CUDNN_STATUS_SUCCESS);
      assert_ptr_equal(now, other);
    }
  fbn_op_desc gd;
  fbn_op_desc_init(&gd);
  gd.num_features = 32;
  gd.dtype = FBN_DTYPE_FLOAT16;
  gd.layout = FBN_LAYOUT_NHWC;
  gd.device = FBN_DEVICE_CUDA;
  fbn_op *gop = NULL;
  FBN_OK(fbn_op_create(&gd, &gop));
  fbn_status result = FBN_STATUS_DEVICE_ERROR;
  fbn_cuda_exec exec = {stream, h};
  FBN_OK(fbn_cuda_op_check_runtime_error(gop, &exec, true, &result));
  assert_int_equal(result, FBN_STATUS_SUCCESS);
  FBN_OK(fbn_cuda_op_check_runtime_error(gop, NULL, true, &result));
  assert_int_equal(result, FBN_STATUS_SUCCESS);
  fbn_op_destroy(gop);
  assert_int_equal(cudnnDestroy(h), CUDNN_STATUS_SUCCESS);
  CUDA_OK(cudaStreamDestroy(stream));
  CUDA_OK(cudaStreamDestroy(other));
  assert_int_equal(failed, 0);
}

/* Two forwards, each into its own saved memory, before their backwards
 * (in the other order): each backward matches the CPU op's backward of its
 * own forward. */
static void test_gpu_ops_two_forwards_before_backwards(void **state) {
  (void)state;
  REQUIRE_GPU();
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  const fbn_dtype dts[] = {FBN_DTYPE_FLOAT16, FBN_DTYPE_FLOAT32};
  const fbn_layout ls[] = {FBN_LAYOUT_NHWC, FBN_LAYOUT_NCHW};
  for (size_t v = 0; v < 2; v++)
    for (size_t l = 0; l < 2; l++) {
      ocase o = {.op = FBN_OPERATION_BN_ADD_RELU, .dtype = dts[v], .layout = ls[l],
                 .stats = STATS_UPDATE, .affine = true, .n = 4, .c = 16, .h = 6, .w = 5};
      char name[256];
      ocase_name(&o, name, sizeof name);
      run a, b;
      run_init(&a, &o, &rng);
      run_init(&b, &o, &rng);
      /* b's op is not used: a's op runs both forwards, b holds the second
       * forward's data and saved memory */
      void *ya = dev_poisoned(a.gbytes), *yb = dev_poisoned(a.gbytes);
      void *yca = fbnt_tensor_alloc(&a.dc), *ycb = fbnt_tensor_alloc(&a.dc);
      FBN_OK(fbn_op_forward(a.gop, &a.dg, a.xg, a.zg, ya, a.wg, a.bg, a.rmg, a.rvg, 0.1,
                            a.saved_g, a.saved_g_bytes, a.ws_g, a.ws_g_bytes));
      FBN_OK(fbn_op_forward(a.gop, &a.dg, b.xg, b.zg, yb, a.wg, a.bg, a.rmg, a.rvg, 0.1,
                            b.saved_g, b.saved_g_bytes, a.ws_g, a.ws_g_bytes));
      FBN_OK(fbn_op_forward(a.cop, &a.dc, a.xc, a.zc, yca, a.wc, a.bc, a.rmc, a.rvc, 0.1,
                            a.saved_c, a.saved_c_bytes, a.ws_c, a.ws_c_bytes));
      FBN_OK(fbn_op_forward(a.cop, &a.dc, b.xc, b.zc, ycb, a.wc, a.bc, a.rmc, a.rvc, 0.1,
                            b.saved_c, b.saved_c_bytes, a.ws_c, a.ws_c_bytes));
      bool ok = true;
      run *runs[2] = {&b, &a};
      void *ys[2] = {yb, ya};
      for (int k = 0; k < 2; k++) {
        run *r = runs[k];
        double *yg_ref = dev_to_ref(&a.dg, ys[k]);
        void *yc = fbnt_tensor_alloc(&a.dc);
        fbnt_tensor_from_ref(&a.dc, yg_ref, yc);
        void *dxg = dev_poisoned(a.gbytes), *dzg = dev_poisoned(a.gbytes);
        void *dxc = fbnt_tensor_alloc(&a.dc), *dzc = fbnt_tensor_alloc(&a.dc);
        FBN_OK(fbn_op_backward(a.gop, &a.dg, r->xg, ys[k], r->dyg, r->saved_g, r->saved_g_bytes,
                               a.wg, a.bg, dxg, dzg, a.dwg, a.dbg, FBN_PARAM_GRAD_ACCUMULATE,
                               a.ws_g, a.ws_g_bytes));
        FBN_OK(fbn_op_backward(a.cop, &a.dc, r->xc, yc, r->dyc, r->saved_c, r->saved_c_bytes,
                               a.wc, a.bc, dxc, dzc, a.dwc, a.dbc, FBN_PARAM_GRAD_ACCUMULATE,
                               a.ws_c, a.ws_c_bytes));
        double *got = dev_to_ref(&a.dg, dxg), *want = malloc(a.count * sizeof(double));
        assert_non_null(want);
        fbnt_tensor_to_ref(&a.dc, dxc, want);
        ok &= check_close(name, k == 0 ? "second forward's dx" : "first forward's dx", got,
                          want, a.count, tensor_tol(o.dtype), &a.dg);
        free(got);
        got = dev_to_ref(&a.dg, dzg);
        fbnt_tensor_to_ref(&a.dc, dzc, want);
        ok &= check_close(name, "daddend", got, want, a.count, tensor_tol(o.dtype), &a.dg);
        free(got);
        free(want);
        free(yg_ref);
        fbnt_free(yc);
        fbnt_free(dxc);
        fbnt_free(dzc);
        dev_free(dxg);
        dev_free(dzg);
      }
      double g[64], w[64];
      dev_params_read(a.pdt, a.dwg, o.c, g);
      params_unpack(a.pdt, a.dwc, o.c, w);
      ok &= check_close(name, "dweight accumulated over both", g, w, (size_t)o.c,
                        buffer_tol(o.dtype), NULL);
      dev_free(ya);
      dev_free(yb);
      fbnt_free(yca);
      fbnt_free(ycb);
      run_free(&a);
      run_free(&b);
      assert_true(ok);
    }
}

/* Forward + backward captured into a CUDA graph in global capture mode (an
 * allocation or synchronization during capture fails it), replayed, give
 * what direct calls give. One case per path. */
static void test_gpu_ops_graph_capture(void **state) {
  (void)state;
  REQUIRE_GPU();
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  const ocase cases[] = {
      {.op = FBN_OPERATION_BN_ADD_RELU, .dtype = FBN_DTYPE_FLOAT16, .layout = FBN_LAYOUT_NHWC,
       .stats = STATS_BATCH_ONLY, .affine = true, .n = 8, .c = 64, .h = 7, .w = 7},
      {.op = FBN_OPERATION_BN_RELU, .dtype = FBN_DTYPE_FLOAT16, .layout = FBN_LAYOUT_NCHW,
       .stats = STATS_BATCH_ONLY, .affine = true, .n = 8, .c = 64, .h = 7, .w = 7},
      {.op = FBN_OPERATION_BN, .dtype = FBN_DTYPE_FLOAT32, .layout = FBN_LAYOUT_NCHW,
       .stats = STATS_BATCH_ONLY, .affine = false, .n = 8, .c = 64, .h = 7, .w = 7},
      {.op = FBN_OPERATION_BN_ADD_RELU, .dtype = FBN_DTYPE_FLOAT32, .layout = FBN_LAYOUT_NHWC,
       .stats = STATS_RUNNING, .affine = true, .n = 8, .c = 64, .h = 7, .w = 7},
  };
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const fbn_cuda_exec exec = {stream, NULL};
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const ocase *o = &cases[i];
    char name[256];
    ocase_name(o, name, sizeof name);
    run r;
    run_init(&r, o, &rng);
    const bool addend = o->op == FBN_OPERATION_BN_ADD_RELU, relu = o->op != FBN_OPERATION_BN;
    const bool running = o->stats == STATS_RUNNING;
    void *y[2], *dx[2];
    for (int k = 0; k < 2; k++) {
      y[k] = dev_poisoned(r.gbytes);
      dx[k] = dev_poisoned(r.gbytes);
    }
    /* k = 0: direct calls (they also build the op's plans); k = 1: captured */
    for (int k = 0; k < 2; k++) {
      cudaGraph_t graph = NULL;
      if (k == 1)
        CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
      fbn_status sf = fbn_cuda_op_forward(
          r.gop, &exec, &r.dg, r.xg, addend ? r.zg : NULL, y[k], o->affine ? r.wg : NULL,
          o->affine ? r.bg : NULL, running ? r.rmg : NULL, running ? r.rvg : NULL, 0.0,
          r.saved_g, r.saved_g_bytes, r.ws_g, r.ws_g_bytes);
      fbn_status sb = fbn_cuda_op_backward(
          r.gop, &exec, &r.dg, r.xg, relu ? y[k] : NULL, r.dyg, r.saved_g, r.saved_g_bytes,
          o->affine ? r.wg : NULL, o->affine ? r.bg : NULL, dx[k], NULL, NULL, NULL,
          FBN_PARAM_GRAD_OVERWRITE, r.ws_g, r.ws_g_bytes);
      if (k == 1) {
        cudaError_t ce = cudaStreamEndCapture(stream, &graph);
        if (sf != FBN_STATUS_SUCCESS || sb != FBN_STATUS_SUCCESS || ce != cudaSuccess)
          fail_msg("%s: during capture: forward %s, backward %s (%s), capture %s", name,
                   fbn_status_string(sf), fbn_status_string(sb), fbn_last_error_message(),
                   cudaGetErrorString(ce));
        cudaGraphExec_t ge;
        CUDA_OK(cudaGraphInstantiate(&ge, graph, 0));
        CUDA_OK(cudaGraphLaunch(ge, stream));
        CUDA_OK(cudaStreamSynchronize(stream));
        CUDA_OK(cudaGraphExecDestroy(ge));
        CUDA_OK(cudaGraphDestroy(graph));
      } else {
        FBN_OK(sf);
        FBN_OK(sb);
      }
    }
    CUDA_OK(cudaStreamSynchronize(stream));
    double *a = dev_to_ref(&r.dg, y[0]), *b = dev_to_ref(&r.dg, y[1]);
    bool ok = check_close(name, "graph y vs direct y", b, a, r.count, tensor_tol(o->dtype),
                          &r.dg);
    free(a);
    free(b);
    a = dev_to_ref(&r.dg, dx[0]);
    b = dev_to_ref(&r.dg, dx[1]);
    ok &= check_close(name, "graph dx vs direct dx", b, a, r.count, tensor_tol(o->dtype),
                      &r.dg);
    free(a);
    free(b);
    for (int k = 0; k < 2; k++) {
      dev_free(y[k]);
      dev_free(dx[k]);
    }
    run_free(&r);
    assert_true(ok);
  }
  CUDA_OK(cudaStreamDestroy(stream));
}

/* A CUDA module of each operation and an op on copies of its buffers give
 * the same results (the module API adds no arithmetic): forward in training
 * mode (factor = momentum), backward accumulating the gradients. */
static void test_gpu_ops_module_matches_op(void **state) {
  (void)state;
  REQUIRE_GPU();
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  const fbn_dtype dts[] = {FBN_DTYPE_FLOAT16, FBN_DTYPE_FLOAT32};
  const fbn_layout ls[] = {FBN_LAYOUT_NHWC, FBN_LAYOUT_NCHW};
  for (int op = 0; op < 3; op++)
    for (size_t v = 0; v < 2; v++)
      for (size_t l = 0; l < 2; l++) {
        const int64_t C = 12;
        fbn_module_options mo;
        fbn_module_options_init(&mo);
        mo.num_features = C;
        mo.device = FBN_DEVICE_CUDA;
        mo.operation = (fbn_operation)op;
        fbn_module *m = NULL;
        FBN_OK(fbnt_module_create_random(&rng, &mo, &m, NULL));
        fbn_op_desc od;
        fbn_op_desc_init(&od);
        od.num_features = C;
        od.dtype = dts[v];
        od.layout = ls[l];
        od.device = FBN_DEVICE_CUDA;
        od.operation = (fbn_operation)op;
        fbn_op *gop = NULL;
        FBN_OK(fbn_op_create(&od, &gop));
        /* the op's per-channel arrays: copies of the module's */
        void *bufs[6], *copies[6];
        const size_t pbytes = (size_t)C * sizeof(float);
        for (int b = 0; b < 6; b++) {
          FBN_OK(fbn_module_buffer_data(m, (fbn_buffer)b, &bufs[b]));
          copies[b] = dev_alloc(pbytes);
          CUDA_OK(cudaMemcpy(copies[b], bufs[b], pbytes, cudaMemcpyDeviceToDevice));
        }
        const fbn_tensor_desc d = fbn_tensor_desc_make(4, C, 5, 6, dts[v], ls[l]);
        const size_t bytes = fbnt_desc_numel(&d) * fbn_dtype_size(d.dtype);
        void *xh = fbnt_tensor_alloc(&d), *zh = fbnt_tensor_alloc(&d), *dyh = fbnt_tensor_alloc(&d);
        fbnt_fill_channels(&rng, &d, xh, NULL);
        fbnt_fill_normal(&rng, &d, zh, NULL, 1.0);
        fbnt_fill_normal(&rng, &d, dyh, NULL, 1.0);
        void *x = dev_from_host(xh, bytes), *z = dev_from_host(zh, bytes),
             *dy = dev_from_host(dyh, bytes);
        const bool addend = op == FBN_OPERATION_BN_ADD_RELU, relu = op != FBN_OPERATION_BN;
        void *y1 = dev_poisoned(bytes), *y2 = dev_poisoned(bytes);
        void *dx1 = dev_poisoned(bytes), *dx2 = dev_poisoned(bytes);
        void *dz1 = dev_poisoned(bytes), *dz2 = dev_poisoned(bytes);
        size_t sb = 0, f = 0, b = 0;
        FBN_OK(fbn_op_saved_size(gop, &d, &sb));
        FBN_OK(fbn_op_forward_workspace_size(gop, &d, &f));
        FBN_OK(fbn_op_backward_workspace_size(gop, &d, &b));
        void *saved = dev_alloc(sb), *ws = dev_alloc(f > b ? f : b);
        fbn_saved *sv = NULL;
        FBN_OK(fbn_saved_create(&sv));
        FBN_OK(fbn_module_forward(m, &d, x, addend ? z : NULL, y1, sv, NULL, 0));
        FBN_OK(fbn_op_forward(gop, &d, x, addend ? z : NULL, y2, copies[0], copies[1], copies[2],
                              copies[3], mo.momentum, saved, sb, ws, f > b ? f : b));
        FBN_OK(fbn_module_backward(m, sv, &d, x, relu ? y1 : NULL, dy, dx1, addend ? dz1 : NULL,
                                   NULL, 0));
        FBN_OK(fbn_op_backward(gop, &d, x, relu ? y2 : NULL, dy, saved, sb, copies[0], copies[1],
                               dx2, addend ? dz2 : NULL, copies[4], copies[5],
                               FBN_PARAM_GRAD_ACCUMULATE, ws, f > b ? f : b));
        CUDA_OK(cudaDeviceSynchronize());
        char name[128];
        snprintf(name, sizeof name, "%s %s %s", fbn_operation_name((fbn_operation)op),
                 fbnt_dtype_str(dts[v]), fbnt_layout_str(ls[l]));
        /* fusedbn's kernels and cuDNN's plain batch norm give the same bits
         * run after run; cuDNN's persistent kernels reduce with atomics, so
         * the fused path is compared within the tolerances */
        fbn_cuda_path path = FBN_CUDA_PATH_NONE;
        FBN_OK(fbn_cuda_op_path(gop, &d, &path));
        const bool bitwise = path != FBN_CUDA_PATH_FUSED;
        void *h1 = fbnt_alloc(bytes), *h2 = fbnt_alloc(bytes);
        void *const pairs[3][2] = {{y1, y2}, {dx1, dx2}, {dz1, dz2}};
        for (int k = 0; k < (addend ? 3 : 2); k++) {
          CUDA_OK(cudaMemcpy(h1, pairs[k][0], bytes, cudaMemcpyDeviceToHost));
          CUDA_OK(cudaMemcpy(h2, pairs[k][1], bytes, cudaMemcpyDeviceToHost));
          if (bitwise && memcmp(h1, h2, bytes) != 0)
            fail_msg("%s: tensor %d differs between the module and the op", name, k);
          if (!bitwise) {
            double *r1 = dev_to_ref(&d, pairs[k][0]), *r2 = dev_to_ref(&d, pairs[k][1]);
            const bool close = check_close(name, "module vs op", r2, r1, fbnt_desc_numel(&d),
                                           tensor_tol(d.dtype), &d);
            free(r1);
            free(r2);
            assert_true(close);
          }
        }
        for (int k = 0; k < 6; k++) {
          double a[64], c[64];
          dev_params_read(FBN_DTYPE_FLOAT32, bufs[k], C, a);
          dev_params_read(FBN_DTYPE_FLOAT32, copies[k], C, c);
          if (bitwise ? memcmp(a, c, (size_t)C * sizeof(double)) != 0
                      : !check_close(name, "module vs op buffer", c, a, (size_t)C,
                                     buffer_tol(d.dtype), NULL))
            fail_msg("%s: buffer %d differs between the module and the op", name, k);
        }
        fbnt_free(h1);
        fbnt_free(h2);
        fbnt_free(xh);
        fbnt_free(zh);
        fbnt_free(dyh);
        void *dev[] = {x, z, dy, y1, y2, dx1, dx2, dz1, dz2, saved, ws};
        for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
          dev_free(dev[i]);
        for (int k = 0; k < 6; k++)
          dev_free(copies[k]);
        fbn_saved_destroy(sv);
        fbn_op_destroy(gop);
        fbn_module_destroy(m);
      }
}

int main(int argc, char **argv) {
  /* the oracle is the float64 reference backend */
  setenv("FBN_CPU_BACKEND", "reference", 1);
  unsetenv("FBN_CUDA_FORCE_PATH");
  fbnt_parse_args(argc, argv);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_gpu_ops_bn),
      cmocka_unit_test(test_gpu_ops_bn_relu),
      cmocka_unit_test(test_gpu_ops_bn_add_relu),
      cmocka_unit_test(test_gpu_ops_caller_exec),
      cmocka_unit_test(test_gpu_ops_two_forwards_before_backwards),
      cmocka_unit_test(test_gpu_ops_graph_capture),
      cmocka_unit_test(test_gpu_ops_module_matches_op),
  };
  const int failed = cmocka_run_group_tests_name("gpu-ops", tests, NULL, NULL);
  if (g_fallback_notes > 0)
    print_message("# %d call(s) fell back from the documented cuDNN path at run time (see the "
                  "NOTE lines)\n",
                  g_fallback_notes);
  /* Every test skipped: exit status 77 (meson: SKIP). */
  if (failed == 0 && !have_gpu())
    return 77;
  return failed;
}
