/*
 * Synchronized batch norm on CUDA ops (suite 'gpu'): fbn_cuda_sync_forward
 * / fbn_cuda_sync_backward on device memory against the plain op of the
 * float64 reference backend on the whole batch (tests/sync/sync_case.h:
 * fresh random data every step, channel means far from 0), W ranks as
 * threads of one process sharing one device, each on its own stream, with
 * a test communicator (allgather / allreduce-sum through device copies and
 * a barrier; it synchronizes its stream, the library does not).  Every
 * output poisoned (NaN) before each call, every element of y, dx, daddend,
 * the running statistics of every rank and the global dweight/dbias
 * checked after each of three steps; the status blocks read back.
 *
 *   ranks      float32 and float64, NCHW and NHWC, the three operations,
 *              shards (1, 5, 2), (0, 3, 4), (3, 2) and a larger (C = 24,
 *              23 x 29) case; momentum and cumulative average
 *   mismatch   ranks whose ops disagree on dtype: every rank's status block
 *              says FBN_STATUS_SHAPE_MISMATCH, every y is NaN, running
 *              statistics untouched, the backward's dx NaN and dweight
 *              untouched; C disagreeing: fbn_cuda_sync_check() gives
 *              FBN_STATUS_SHAPE_MISMATCH on every rank; a total count of 1:
 *              FBN_STATUS_INVALID_SHAPE in the status block
 *   errors     a failing allgather callback: its status and text returned,
 *              nothing written; host memory: FBN_STATUS_INVALID_VALUE; a
 *              small workspace: FBN_STATUS_INSUFFICIENT_WORKSPACE; every
 *              argument check of the forward and backward (communicator,
 *              shard, addend, running statistics, factor, sizes, saved,
 *              param_grad, scope): its status and message, nothing written
 *   nccl       (with libfusedbn_nccl) one rank through ncclCommInitAll on
 *              device 0 against the oracle, and against the single-process
 *              CUDA op (fbn_cuda_op_forward/backward); forward and backward
 *              captured into a CUDA graph give the eager results bit for bit
 *
 * Every test skips visibly (cmocka skip, exit status 77) without a device.
 */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <cuda_runtime_api.h>

#include "fbn_testutil.h"
#include "fusedbn/fusedbn_cuda_sync.h"
#include "sync_case.h"
#ifdef FBN_TEST_NCCL
#include "fusedbn/fusedbn_nccl.h"
#endif

static int g_have_gpu = -1;
static int g_skipped = 0, g_ran = 0;

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
    if (!have_gpu()) {                                                                           \
      g_skipped++;                                                                               \
      skip();                                                                                    \
    }                                                                                            \
    g_ran++;                                                                                     \
  } while (0)

#define CUDA_OK(expr)                                                                            \
  do {                                                                                           \
    cudaError_t e_ = (expr);                                                                     \
    if (e_ != cudaSuccess)                                                                       \
      fail_msg("%s: %s", #expr, cudaGetErrorString(e_));                                         \
  } while (0)

static void *dev_alloc(size_t bytes) {
  void *p = NULL;
  CUDA_OK(cudaMalloc(&p, bytes > 0 ? bytes : 256));
  CUDA_OK(cudaMemset(p, 0xff, bytes > 0 ? bytes : 256)); /* NaN in both dtypes */
  return p;
}

static void *dev_copy(const void *host, size_t bytes) {
  void *p = dev_alloc(bytes);
  if (bytes > 0)
    CUDA_OK(cudaMemcpy(p, host, bytes, cudaMemcpyHostToDevice));
  return p;
}

static void *host_copy(const void *dev, size_t bytes) {
  void *p = malloc(bytes > 0 ? bytes : 1);
  if (bytes > 0)
    CUDA_OK(cudaMemcpy(p, dev, bytes, cudaMemcpyDeviceToHost));
  return p;
}

/* ---- the test communicator: threads, a barrier, device copies ------------ */

typedef struct gworld {
  int world;
  pthread_barrier_t barrier;
  const void *send[SYNC_MAX_RANKS];
  double *data[SYNC_MAX_RANKS];
  bool fail_allgather; /* every rank's allgather fails */
} gworld;

typedef struct grank {
  gworld *g;
  int rank;
} grank;

static fbn_status g_allgather(void *context, const void *send, void *recv, size_t bytes,
                              cudaStream_t stream, char *error, size_t error_size) {
  grank *r = context;
  if (r->g->fail_allgather) {
    snprintf(error, error_size, "test transport down on rank %d", r->rank);
    return FBN_STATUS_DEVICE_ERROR;
  }
  if (cudaStreamSynchronize(stream) != cudaSuccess)
    return FBN_STATUS_DEVICE_ERROR;
  r->g->send[r->rank] = send;
  pthread_barrier_wait(&r->g->barrier);
  for (int q = 0; q < r->g->world; q++)
    if (cudaMemcpyAsync((char *)recv + (size_t)q * bytes, r->g->send[q], bytes,
                        cudaMemcpyDeviceToDevice, stream) != cudaSuccess)
      return FBN_STATUS_DEVICE_ERROR;
  const cudaError_t e = cudaStreamSynchronize(stream);
  pthread_barrier_wait(&r->g->barrier);
  return e == cudaSuccess ? FBN_STATUS_SUCCESS : FBN_STATUS_DEVICE_ERROR;
}

static fbn_status g_allreduce(void *context, double *data, size_t count, cudaStream_t stream,
                              char *error, size_t error_size) {
  (void)error;
  (void)error_size;
  grank *r = context;
  if (cudaStreamSynchronize(stream) != cudaSuccess)
    return FBN_STATUS_DEVICE_ERROR;
  r->g->data[r->rank] = data;
  pthread_barrier_wait(&r->g->barrier);
  double *sum = calloc(count, sizeof(double)), *part = malloc(count * sizeof(double));
  for (int q = 0; q < r->g->world; q++) {
    (void)cudaMemcpy(part, r->g->data[q], count * sizeof(double), cudaMemcpyDeviceToHost);
    for (size_t i = 0; i < count; i++)
      sum[i] += part[i];
  }
  pthread_barrier_wait(&r->g->barrier);
  const cudaError_t e = cudaMemcpy(data, sum, count * sizeof(double), cudaMemcpyHostToDevice);
  free(sum);
  free(part);
  pthread_barrier_wait(&r->g->barrier);
  return e == cudaSuccess ? FBN_STATUS_SUCCESS : FBN_STATUS_DEVICE_ERROR;
}

/* ---- one rank's steps against the oracle --------------------------------- */

static fbn_op *cuda_op(fbn_dtype dtype, fbn_layout layout, fbn_operation operation, bool affine,
                       int64_t c) {
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = c;
  od.dtype = dtype;
  od.param_dtype = dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  od.layout = layout;
  od.operation = operation;
  od.affine = affine;
  od.device = FBN_DEVICE_CUDA;
  fbn_op *op = NULL;
  if (fbn_op_create(&od, &op) != FBN_STATUS_SUCCESS)
    return NULL;
  return op;
}

static double factor_of(const sync_case *k, int step) {
  return k->cumulative ? 1.0 / (double)(step + 1) : 0.1;
}

/* n elements of got (device) against want (host); 0 or a message. */
static int compare(const char *what, int step, const void *got_dev, const void *want, size_t n,
                   fbn_dtype dtype, char *why, size_t why_size) {
  const size_t es = dtype == FBN_DTYPE_FLOAT64 ? 8 : 4;
  void *got = host_copy(got_dev, n * es);
  const double tol = sync_tolerance(dtype);
  int rc = 0;
  for (size_t i = 0; i < n && rc == 0; i++) {
    const double g = sync_load(got, dtype, i), e = sync_load(want, dtype, i);
    const double scale = fabs(e) > 1.0 ? fabs(e) : 1.0;
    if (!(fabs(g - e) <= tol * scale) && !(isnan(g) && isnan(e))) {
      snprintf(why, why_size, "step %d: %s[%zu] = %.17g, expected %.17g", step, what, i, g, e);
      rc = 1;
    }
  }
  free(got);
  return rc;
}

typedef enum { RUN_THREADS, RUN_NCCL } run_kind;

typedef struct rank_job {
  const sync_data *d;
  int rank;
  run_kind kind;
  fbn_cuda_sync_comm comm;
#ifdef FBN_TEST_NCCL
  ncclComm_t nccl;
#endif
  int rc;
  char why[512];
} rank_job;

static fbn_status job_forward(rank_job *j, const fbn_op *op, cudaStream_t stream,
                              const fbn_tensor_desc *td, const void *x, const void *z, void *y,
                              const void *w, const void *b, void *rm, void *rv, double f,
                              void *saved, size_t sb, void *ws, size_t wb) {
#ifdef FBN_TEST_NCCL
  if (j->kind == RUN_NCCL)
    return fbn_nccl_sync_forward(op, j->nccl, stream, td, x, z, y, w, b, rm, rv, f, saved, sb,
                                 ws, wb);
#endif
  const fbn_cuda_exec exec = {stream, NULL};
  return fbn_cuda_sync_forward(op, &exec, &j->comm, td, x, z, y, w, b, rm, rv, f, saved, sb, ws,
                               wb);
}

static fbn_status job_backward(rank_job *j, const fbn_op *op, cudaStream_t stream,
                               const fbn_tensor_desc *td, const void *x, const void *y,
                               const void *dy, const void *saved, size_t sb, const void *w,
                               const void *b, void *dx, void *dz, void *dw, void *db, void *ws,
                               size_t wb) {
#ifdef FBN_TEST_NCCL
  if (j->kind == RUN_NCCL)
    return fbn_nccl_sync_backward(op, j->nccl, stream, td, x, y, dy, saved, sb, w, b, dx, dz, dw,
                                  db, FBN_PARAM_GRAD_OVERWRITE, FBN_SYNC_GRAD_GLOBAL, ws, wb);
#endif
  const fbn_cuda_exec exec = {stream, NULL};
  return fbn_cuda_sync_backward(op, &exec, &j->comm, td, x, y, dy, saved, sb, w, b, dx, dz, dw,
                                db, FBN_PARAM_GRAD_OVERWRITE, FBN_SYNC_GRAD_GLOBAL, ws, wb);
}

static int rank_run(rank_job *j) {
  const sync_data *d = j->d;
  const sync_case *k = &d->k;
  char *why = j->why;
  const size_t why_size = sizeof j->why;
  fbn_op *op = cuda_op(k->dtype, k->layout, k->operation, k->affine, k->c);
  if (op == NULL) {
    snprintf(why, why_size, "fbn_op_create(CUDA): %s", fbn_last_error_message());
    return 1;
  }
  int64_t n0 = 0;
  for (int r = 0; r < j->rank; r++)
    n0 += k->shard_n[r];
  const int64_t n = k->shard_n[j->rank];
  const size_t per = (size_t)(k->c * k->h * k->w), cnt = (size_t)n * per;
  const size_t tb = cnt * d->elem, pb = (size_t)k->c * d->pelem, off = (size_t)n0 * per * d->elem;
  const fbn_tensor_desc td = fbn_tensor_desc_make(n, k->c, k->h, k->w, k->dtype, k->layout);
  const int world = k->world;
  size_t sb = 0, wb = 0;
  if (fbn_cuda_sync_saved_size(op, &td, &sb) != FBN_STATUS_SUCCESS ||
      fbn_cuda_sync_workspace_size(op, &td, world, &wb) != FBN_STATUS_SUCCESS) {
    snprintf(why, why_size, "sizes: %s", fbn_last_error_message());
    fbn_op_destroy(op);
    return 1;
  }
  const bool add = k->operation == FBN_OPERATION_BN_ADD_RELU;
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  void *w = dev_copy(d->weight, pb), *b = dev_copy(d->bias, pb);
  void *rm = dev_copy(d->rm0, pb), *rv = dev_copy(d->rv0, pb);
  void *dw = dev_alloc(pb), *db = dev_alloc(pb);
  void *saved = dev_alloc(sb), *ws = dev_alloc(wb);
  int rc = 0;
  for (int s = 0; s < k->steps && rc == 0; s++) {
    void *x = dev_copy((const char *)d->x[s] + off, tb);
    void *z = dev_copy((const char *)d->z[s] + off, tb);
    void *dy = dev_copy((const char *)d->dy[s] + off, tb);
    void *y = dev_alloc(tb), *dx = dev_alloc(tb), *dz = dev_alloc(tb);
    CUDA_OK(cudaMemset(dw, 0xff, pb));
    CUDA_OK(cudaMemset(db, 0xff, pb));
    fbn_status st =
        job_forward(j, op, stream, &td, n > 0 ? x : NULL, add && n > 0 ? z : NULL,
                    n > 0 ? y : NULL, k->affine ? w : NULL, k->affine ? b : NULL, rm, rv,
                    factor_of(k, s), saved, sb, ws, wb);
    fbn_status result = (fbn_status)-1;
    if (st == FBN_STATUS_SUCCESS) {
      const fbn_cuda_exec exec = {stream, NULL};
      st = fbn_cuda_sync_read_status(op, &exec, ws, &result);
      if (st == FBN_STATUS_SUCCESS && result != FBN_STATUS_SUCCESS)
        st = result;
    }
    if (st == FBN_STATUS_SUCCESS)
      st = job_backward(j, op, stream, &td, n > 0 ? x : NULL, n > 0 ? y : NULL,
                        n > 0 ? dy : NULL, saved, sb, k->affine ? w : NULL,
                        k->affine ? b : NULL, n > 0 ? dx : NULL, add && n > 0 ? dz : NULL,
                        k->affine ? dw : NULL, k->affine ? db : NULL, ws, wb);
    if (st == FBN_STATUS_SUCCESS) {
      const fbn_cuda_exec exec = {stream, NULL};
      st = fbn_cuda_sync_read_status(op, &exec, ws, &result);
      if (st == FBN_STATUS_SUCCESS && result != FBN_STATUS_SUCCESS)
        st = result;
    }
    if (st != FBN_STATUS_SUCCESS) {
      snprintf(why, why_size, "rank %d step %d: %s: %s", j->rank, s, fbn_status_string(st),
               fbn_last_error_message());
      rc = 1;
    }
    CUDA_OK(cudaStreamSynchronize(stream));
    if (rc == 0 && n > 0)
      rc = compare("y", s, y, (const char *)d->y[s] + off, cnt, k->dtype, why, why_size);
    if (rc == 0 && n > 0)
      rc = compare("dx", s, dx, (const char *)d->dx[s] + off, cnt, k->dtype, why, why_size);
    if (rc == 0 && n > 0 && add)
      rc = compare("daddend", s, dz, (const char *)d->dz[s] + off, cnt, k->dtype, why, why_size);
    if (rc == 0)
      rc = compare("running_mean", s, rm, d->rm[s], (size_t)k->c, k->dtype, why, why_size);
    if (rc == 0)
      rc = compare("running_var", s, rv, d->rv[s], (size_t)k->c, k->dtype, why, why_size);
    if (rc == 0 && k->affine)
      rc = compare("dweight", s, dw, d->dw[s], (size_t)k->c, k->dtype, why, why_size);
    if (rc == 0 && k->affine)
      rc = compare("dbias", s, db, d->db[s], (size_t)k->c, k->dtype, why, why_size);
    cudaFree(x);
    cudaFree(z);
    cudaFree(dy);
    cudaFree(y);
    cudaFree(dx);
    cudaFree(dz);
  }
  cudaFree(w);
  cudaFree(b);
  cudaFree(rm);
  cudaFree(rv);
  cudaFree(dw);
  cudaFree(db);
  cudaFree(saved);
  cudaFree(ws);
  cudaStreamDestroy(stream);
  fbn_op_destroy(op);
  return rc;
}

static void *rank_thread(void *arg) {
  rank_job *j = arg;
  CUDA_OK(cudaSetDevice(0));
  j->rc = rank_run(j);
  return NULL;
}

/* The case through W threads (kind RUN_THREADS). */
static void run_threads(const sync_case *k) {
  sync_data d;
  char why[512];
  if (sync_data_make(&d, k, why, sizeof why) != 0)
    fail_msg("%s", why);
  gworld g;
  memset(&g, 0, sizeof g);
  g.world = k->world;
  pthread_barrier_init(&g.barrier, NULL, (unsigned)k->world);
  grank ctx[SYNC_MAX_RANKS];
  rank_job jobs[SYNC_MAX_RANKS];
  pthread_t th[SYNC_MAX_RANKS];
  for (int r = 0; r < k->world; r++) {
    ctx[r] = (grank){&g, r};
    memset(&jobs[r], 0, sizeof jobs[r]);
    jobs[r].d = &d;
    jobs[r].rank = r;
    jobs[r].kind = RUN_THREADS;
    jobs[r].comm = (fbn_cuda_sync_comm){k->world, r, &ctx[r], g_allgather, g_allreduce};
    assert_int_equal(pthread_create(&th[r], NULL, rank_thread, &jobs[r]), 0);
  }
  for (int r = 0; r < k->world; r++)
    pthread_join(th[r], NULL);
  pthread_barrier_destroy(&g.barrier);
  for (int r = 0; r < k->world; r++)
    if (jobs[r].rc != 0)
      fail_msg("%s, %s, %s, W = %d: %s", k->dtype == FBN_DTYPE_FLOAT64 ? "float64" : "float32",
               k->layout == FBN_LAYOUT_NHWC ? "NHWC" : "NCHW", fbn_operation_name(k->operation),
               k->world, jobs[r].why);
  sync_data_free(&d);
}

/* ---- tests: ranks against the oracle -------------------------------------- */

static sync_case base_case(fbn_dtype dtype, fbn_layout layout, fbn_operation operation) {
  sync_case k;
  memset(&k, 0, sizeof k);
  k.dtype = dtype;
  k.layout = layout;
  k.operation = operation;
  k.affine = true;
  k.c = 3;
  k.h = 4;
  k.w = 5;
  k.steps = 3;
  k.scope = FBN_SYNC_GRAD_GLOBAL;
  k.seed = 0x5eed0c0dau;
  return k;
}

static void test_ranks(void **state) {
  (void)state;
  REQUIRE_GPU();
  const fbn_dtype dtypes[] = {FBN_DTYPE_FLOAT32, FBN_DTYPE_FLOAT64};
  const fbn_layout layouts[] = {FBN_LAYOUT_NCHW, FBN_LAYOUT_NHWC};
  const fbn_operation ops[] = {FBN_OPERATION_BN, FBN_OPERATION_BN_RELU, FBN_OPERATION_BN_ADD_RELU};
  const int64_t shards[3][3] = {{1, 5, 2}, {0, 3, 4}, {3, 2, 0}};
  const int worlds[3] = {3, 3, 2};
  int idx = 0;
  for (int a = 0; a < 2; a++)
    for (int b = 0; b < 2; b++)
      for (int o = 0; o < 3; o++)
        for (int sh = 0; sh < 3; sh++, idx++) {
          sync_case k = base_case(dtypes[a], layouts[b], ops[o]);
          k.world = worlds[sh];
          for (int r = 0; r < k.world; r++)
            k.shard_n[r] = shards[sh][r];
          k.affine = idx % 4 != 3;
          k.cumulative = idx % 2 == 1;
          k.seed += (uint64_t)idx;
          run_threads(&k);
        }
}

static void test_ranks_larger(void **state) {
  (void)state;
  REQUIRE_GPU();
  const fbn_dtype dtypes[] = {FBN_DTYPE_FLOAT32, FBN_DTYPE_FLOAT64};
  const fbn_layout layouts[] = {FBN_LAYOUT_NCHW, FBN_LAYOUT_NHWC};
  for (int a = 0; a < 2; a++)
    for (int b = 0; b < 2; b++) {
      sync_case k = base_case(dtypes[a], layouts[b], FBN_OPERATION_BN_ADD_RELU);
      k.c = 24;
      k.h = 23;
      k.w = 29;
      k.steps = 2;
      k.world = 2;
      k.shard_n[0] = 3;
      k.shard_n[1] = 5;
      k.seed += 100u + (uint64_t)(2 * a + b);
      run_threads(&k);
    }
}

/* ---- tests: disagreement and errors --------------------------------------- */

typedef struct mismatch_job {
  gworld *g;
  int rank;
  fbn_dtype dtype;
  int64_t c, n, hw;
  bool check_only;
  fbn_status forward_st, check_st, fwd_result, bwd_result;
  bool y_all_nan, dx_all_nan, running_untouched, dweight_untouched;
  char fwd_msg[512], bwd_msg[512], check_msg[512];
} mismatch_job;

static bool all_nan(const void *dev, size_t n, fbn_dtype dtype) {
  const size_t es = dtype == FBN_DTYPE_FLOAT64 ? 8 : 4;
  void *h = host_copy(dev, n * es);
  bool ok = true;
  for (size_t i = 0; i < n; i++)
    ok = ok && isnan(sync_load(h, dtype, i));
  free(h);
  return ok;
}

static bool equal_bytes(const void *dev, const void *host, size_t bytes) {
  void *h = host_copy(dev, bytes);
  const bool ok = memcmp(h, host, bytes) == 0;
  free(h);
  return ok;
}

static void *mismatch_thread(void *arg) {
  mismatch_job *m = arg;
  CUDA_OK(cudaSetDevice(0));
  grank ctx = {m->g, m->rank};
  const fbn_cuda_sync_comm comm = {m->g->world, m->rank, &ctx, g_allgather, g_allreduce};
  fbn_op *op = cuda_op(m->dtype, FBN_LAYOUT_NCHW, FBN_OPERATION_BN_ADD_RELU, true, m->c);
  assert_non_null(op);
  const fbn_tensor_desc td = fbn_tensor_desc_make(m->n, m->c, 1, m->hw, m->dtype, FBN_LAYOUT_NCHW);
  size_t sb = 0, wb = 0;
  assert_int_equal(fbn_cuda_sync_saved_size(op, &td, &sb), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_cuda_sync_workspace_size(op, &td, m->g->world, &wb), FBN_STATUS_SUCCESS);
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const fbn_cuda_exec exec = {stream, NULL};
  void *ws = dev_alloc(wb), *saved = dev_alloc(sb);
  if (m->check_only) {
    m->check_st = fbn_cuda_sync_check(op, &exec, &comm, ws, wb);
    snprintf(m->check_msg, sizeof m->check_msg, "%s", fbn_last_error_message());
  } else {
    const size_t es = m->dtype == FBN_DTYPE_FLOAT64 ? 8 : 4;
    const size_t cnt = (size_t)(m->n * m->c * m->hw), pb = (size_t)m->c * es;
    unsigned char *hx = malloc(cnt * es + 1), *hp = malloc(pb);
    for (size_t i = 0; i < cnt; i++) {
      if (es == 8)
        ((double *)(void *)hx)[i] = (double)(i % 7) - 2.5;
      else
        ((float *)(void *)hx)[i] = (float)(i % 7) - 2.5f;
    }
    for (size_t i = 0; i < (size_t)m->c; i++) {
      if (es == 8)
        ((double *)(void *)hp)[i] = 0.75;
      else
        ((float *)(void *)hp)[i] = 0.75f;
    }
    void *x = dev_copy(hx, cnt * es), *z = dev_copy(hx, cnt * es), *y = dev_alloc(cnt * es);
    void *w = dev_copy(hp, pb), *b = dev_copy(hp, pb), *rm = dev_copy(hp, pb),
         *rv = dev_copy(hp, pb);
    void *dx = dev_alloc(cnt * es), *dz = dev_alloc(cnt * es), *dw = dev_copy(hp, pb),
         *db = dev_copy(hp, pb);
    m->forward_st = fbn_cuda_sync_forward(op, &exec, &comm, &td, x, z, y, w, b, rm, rv, 0.1, saved,
                                          sb, ws, wb);
    if (m->forward_st == FBN_STATUS_SUCCESS) {
      assert_int_equal(fbn_cuda_sync_read_status(op, &exec, ws, &m->fwd_result),
                       FBN_STATUS_SUCCESS);
      snprintf(m->fwd_msg, sizeof m->fwd_msg, "%s", fbn_last_error_message());
      fbn_status again = FBN_STATUS_SUCCESS;
      assert_int_equal(fbn_cuda_sync_read_status(op, &exec, saved, &again), FBN_STATUS_SUCCESS);
      assert_int_equal(again, m->fwd_result);
      m->y_all_nan = all_nan(y, cnt, m->dtype);
      m->running_untouched = equal_bytes(rm, hp, pb) && equal_bytes(rv, hp, pb);
      assert_int_equal(fbn_cuda_sync_backward(op, &exec, &comm, &td, x, y, x, saved, sb, w, b, dx,
                                              dz, dw, db, FBN_PARAM_GRAD_OVERWRITE,
                                              FBN_SYNC_GRAD_LOCAL, ws, wb),
                       FBN_STATUS_SUCCESS);
      assert_int_equal(fbn_cuda_sync_read_status(op, &exec, ws, &m->bwd_result),
                       FBN_STATUS_SUCCESS);
      snprintf(m->bwd_msg, sizeof m->bwd_msg, "%s", fbn_last_error_message());
      m->dx_all_nan = all_nan(dx, cnt, m->dtype);
      m->dweight_untouched = equal_bytes(dw, hp, pb) && equal_bytes(db, hp, pb);
    } else {
      snprintf(m->fwd_msg, sizeof m->fwd_msg, "%s", fbn_last_error_message());
      CUDA_OK(cudaStreamSynchronize(stream));
      m->running_untouched = equal_bytes(rm, hp, pb) && equal_bytes(rv, hp, pb);
      m->y_all_nan = all_nan(y, cnt, m->dtype); /* still the poison */
    }
    void *bufs[] = {x, z, y, w, b, rm, rv, dx, dz, dw, db};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
      cudaFree(bufs[i]);
    free(hx);
    free(hp);
  }
  cudaFree(ws);
  cudaFree(saved);
  cudaStreamDestroy(stream);
  fbn_op_destroy(op);
  return NULL;
}

static void run_mismatch(mismatch_job *jobs, int world, bool fail_allgather) {
  gworld g;
  memset(&g, 0, sizeof g);
  g.world = world;
  g.fail_allgather = fail_allgather;
  pthread_barrier_init(&g.barrier, NULL, (unsigned)world);
  pthread_t th[SYNC_MAX_RANKS];
  for (int r = 0; r < world; r++) {
    jobs[r].g = &g;
    jobs[r].rank = r;
    assert_int_equal(pthread_create(&th[r], NULL, mismatch_thread, &jobs[r]), 0);
  }
  for (int r = 0; r < world; r++)
    pthread_join(th[r], NULL);
  pthread_barrier_destroy(&g.barrier);
}

static void test_dtype_mismatch(void **state) {
  (void)state;
  REQUIRE_GPU();
  mismatch_job jobs[2];
  memset(jobs, 0, sizeof jobs);
  for (int r = 0; r < 2; r++) {
    jobs[r].dtype = r == 0 ? FBN_DTYPE_FLOAT32 : FBN_DTYPE_FLOAT64;
    jobs[r].c = 3;
    jobs[r].n = 2;
    jobs[r].hw = 5;
  }
  run_mismatch(jobs, 2, false);
  for (int r = 0; r < 2; r++) {
    assert_int_equal(jobs[r].forward_st, FBN_STATUS_SUCCESS);
    assert_int_equal(jobs[r].fwd_result, FBN_STATUS_SHAPE_MISMATCH);
    assert_non_null(strstr(jobs[r].fwd_msg, "fbn_cuda_sync_read_status: rank"));
    assert_non_null(strstr(jobs[r].fwd_msg, "has dtype"));
    assert_true(jobs[r].y_all_nan);
    assert_true(jobs[r].running_untouched);
    assert_int_equal(jobs[r].bwd_result, FBN_STATUS_SHAPE_MISMATCH);
    assert_non_null(strstr(jobs[r].bwd_msg, "the forward that filled saved failed its check"));
    assert_true(jobs[r].dx_all_nan);
    assert_true(jobs[r].dweight_untouched);
  }
}

static void test_c_mismatch_check(void **state) {
  (void)state;
  REQUIRE_GPU();
  mismatch_job jobs[2];
  memset(jobs, 0, sizeof jobs);
  for (int r = 0; r < 2; r++) {
    jobs[r].dtype = FBN_DTYPE_FLOAT32;
    jobs[r].c = 3 + r;
    jobs[r].n = 2;
    jobs[r].hw = 5;
    jobs[r].check_only = true;
  }
  run_mismatch(jobs, 2, false);
  for (int r = 0; r < 2; r++) {
    assert_int_equal(jobs[r].check_st, FBN_STATUS_SHAPE_MISMATCH);
    assert_non_null(strstr(jobs[r].check_msg, "fbn_cuda_sync_check: rank"));
    assert_non_null(strstr(jobs[r].check_msg, "every rank must have the same channels"));
  }
  /* agreeing ranks pass the check */
  for (int r = 0; r < 2; r++) {
    jobs[r].c = 3;
    jobs[r].check_st = FBN_STATUS_DEVICE_ERROR;
  }
  run_mismatch(jobs, 2, false);
  for (int r = 0; r < 2; r++)
    assert_int_equal(jobs[r].check_st, FBN_STATUS_SUCCESS);
}

static void test_total_count_one(void **state) {
  (void)state;
  REQUIRE_GPU();
  mismatch_job jobs[2];
  memset(jobs, 0, sizeof jobs);
  for (int r = 0; r < 2; r++) {
    jobs[r].dtype = FBN_DTYPE_FLOAT32;
    jobs[r].c = 2;
    jobs[r].n = r; /* shards of 0 and 1 value per channel */
    jobs[r].hw = 1;
  }
  run_mismatch(jobs, 2, false);
  for (int r = 0; r < 2; r++) {
    assert_int_equal(jobs[r].forward_st, FBN_STATUS_SUCCESS);
    assert_int_equal(jobs[r].fwd_result, FBN_STATUS_INVALID_SHAPE);
    assert_non_null(strstr(jobs[r].fwd_msg, "1 value(s) per channel over the 2 ranks"));
    assert_true(jobs[r].running_untouched);
    assert_true(jobs[r].dweight_untouched);
  }
  assert_true(jobs[1].y_all_nan);
}

static void test_failing_allgather(void **state) {
  (void)state;
  REQUIRE_GPU();
  mismatch_job jobs[2];
  memset(jobs, 0, sizeof jobs);
  for (int r = 0; r < 2; r++) {
    jobs[r].dtype = FBN_DTYPE_FLOAT32;
    jobs[r].c = 3;
    jobs[r].n = 2;
    jobs[r].hw = 4;
  }
  run_mismatch(jobs, 2, true);
  for (int r = 0; r < 2; r++) {
    assert_int_equal(jobs[r].forward_st, FBN_STATUS_DEVICE_ERROR);
    assert_non_null(strstr(jobs[r].fwd_msg, "fbn_cuda_sync_forward: the allgather callback failed"));
    assert_non_null(strstr(jobs[r].fwd_msg, "test transport down on rank"));
    assert_true(jobs[r].running_untouched);
    assert_true(jobs[r].y_all_nan);
  }
}

static void test_bad_memory(void **state) {
  (void)state;
  REQUIRE_GPU();
  fbn_op *op = cuda_op(FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW, FBN_OPERATION_BN_RELU, false, 4);
  assert_non_null(op);
  const fbn_tensor_desc td = fbn_tensor_desc_make(2, 4, 3, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  size_t sb = 0, wb = 0;
  assert_int_equal(fbn_cuda_sync_saved_size(op, &td, &sb), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_cuda_sync_workspace_size(op, &td, 1, &wb), FBN_STATUS_SUCCESS);
  gworld g;
  memset(&g, 0, sizeof g);
  g.world = 1;
  pthread_barrier_init(&g.barrier, NULL, 1);
  grank ctx = {&g, 0};
  const fbn_cuda_sync_comm comm = {1, 0, &ctx, g_allgather, g_allreduce};
  void *x = dev_alloc(72 * 4), *y = dev_alloc(72 * 4), *saved = dev_alloc(sb), *ws = dev_alloc(wb);
  float host_x[72];
  for (int i = 0; i < 72; i++)
    host_x[i] = (float)i;
  assert_int_equal(fbn_cuda_sync_forward(op, NULL, &comm, &td, host_x, NULL, y, NULL, NULL, NULL,
                                         NULL, 0.0, saved, sb, ws, wb),
                   FBN_STATUS_INVALID_VALUE);
  assert_non_null(strstr(fbn_last_error_message(), "fbn_cuda_sync_forward: x = "));
  assert_non_null(strstr(fbn_last_error_message(), "host memory"));
  assert_int_equal(fbn_cuda_sync_forward(op, NULL, &comm, &td, x, NULL, y, NULL, NULL, NULL, NULL,
                                         0.0, saved, sb, ws, wb - 256),
                   FBN_STATUS_INSUFFICIENT_WORKSPACE);
  assert_non_null(strstr(fbn_last_error_message(), "workspace_bytes"));
  assert_true(all_nan(y, 72, FBN_DTYPE_FLOAT32));
  assert_int_equal(fbn_cuda_sync_forward(op, NULL, &comm, &td, x, NULL, x, NULL, NULL, NULL, NULL,
                                         0.0, saved, sb, ws, wb),
                   FBN_STATUS_ALIASING);
  fbn_status result = FBN_STATUS_SUCCESS;
  CUDA_OK(cudaMemset(ws, 0, wb));
  assert_int_equal(fbn_cuda_sync_read_status(op, NULL, ws, &result), FBN_STATUS_INVALID_STATE);
  pthread_barrier_destroy(&g.barrier);
  cudaFree(x);
  cudaFree(y);
  cudaFree(saved);
  cudaFree(ws);
  fbn_op_destroy(op);
}

/* Bad arguments of the forward and backward: the status, the message naming
 * the call and the value, y / dx / running statistics untouched. */
static void test_argument_checks(void **state) {
  (void)state;
  REQUIRE_GPU();
  fbn_op *op = cuda_op(FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW, FBN_OPERATION_BN_RELU, true, 4);
  assert_non_null(op);
  const fbn_tensor_desc td = fbn_tensor_desc_make(2, 4, 3, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  size_t sb = 0, wb = 0;
  assert_int_equal(fbn_cuda_sync_saved_size(op, &td, &sb), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_cuda_sync_workspace_size(op, &td, 1, &wb), FBN_STATUS_SUCCESS);
  gworld g;
  memset(&g, 0, sizeof g);
  g.world = 1;
  pthread_barrier_init(&g.barrier, NULL, 1);
  grank ctx = {&g, 0};
  const fbn_cuda_sync_comm good = {1, 0, &ctx, g_allgather, g_allreduce};
  fbn_cuda_sync_comm bad_w = good, bad_rank = good, no_gather = good, no_reduce = good;
  bad_w.world_size = 0;
  bad_rank.rank = 1;
  no_gather.allgather = NULL;
  no_reduce.allreduce_sum = NULL;
  void *x = dev_alloc(72 * 4), *y = dev_alloc(72 * 4), *dy = dev_alloc(72 * 4);
  void *dx = dev_alloc(72 * 4), *w = dev_alloc(16), *b = dev_alloc(16);
  void *rm = dev_alloc(16), *rv = dev_alloc(16), *saved = dev_alloc(sb), *ws = dev_alloc(wb);
  const fbn_tensor_desc neg = fbn_tensor_desc_make(-1, 4, 3, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  const fbn_tensor_desc other_c =
      fbn_tensor_desc_make(2, 5, 3, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  const fbn_tensor_desc other_dt =
      fbn_tensor_desc_make(2, 4, 3, 3, FBN_DTYPE_FLOAT64, FBN_LAYOUT_NCHW);
  struct fwd_case {
    const fbn_cuda_sync_comm *comm;
    const fbn_tensor_desc *td;
    const void *z;
    void *rm, *rv;
    double factor;
    size_t saved_bytes;
    fbn_status want;
    const char *text;
  } fwd[] = {
      {NULL, &td, NULL, rm, rv, 0.1, sb, FBN_STATUS_NULL_POINTER, "comm is NULL"},
      {&bad_w, &td, NULL, rm, rv, 0.1, sb, FBN_STATUS_INVALID_VALUE, "comm->world_size = 0"},
      {&bad_rank, &td, NULL, rm, rv, 0.1, sb, FBN_STATUS_INVALID_VALUE, "comm->rank = 1"},
      {&no_gather, &td, NULL, rm, rv, 0.1, sb, FBN_STATUS_NULL_POINTER, "comm->allgather"},
      {&no_reduce, &td, NULL, rm, rv, 0.1, sb, FBN_STATUS_NULL_POINTER, "comm->allreduce_sum"},
      {&good, NULL, NULL, rm, rv, 0.1, sb, FBN_STATUS_NULL_POINTER, "x_desc is NULL"},
      {&good, &neg, NULL, rm, rv, 0.1, sb, FBN_STATUS_INVALID_SHAPE, "N = -1"},
      {&good, &other_c, NULL, rm, rv, 0.1, sb, FBN_STATUS_SHAPE_MISMATCH, "num_features"},
      {&good, &other_dt, NULL, rm, rv, 0.1, sb, FBN_STATUS_SHAPE_MISMATCH, "dtype = float64"},
      {&good, &td, dy, rm, rv, 0.1, sb, FBN_STATUS_INVALID_VALUE, "takes no addend"},
      {&good, &td, NULL, rm, NULL, 0.1, sb, FBN_STATUS_INVALID_VALUE, "give both"},
      {&good, &td, NULL, rm, rv, 1.5, sb, FBN_STATUS_INVALID_VALUE, "factor = 1.5"},
      {&good, &td, NULL, rm, rv, 0.1, sb - 1, FBN_STATUS_INSUFFICIENT_WORKSPACE, "saved_bytes"},
  };
  const float poison_rm = 3.5f;
  float host_p[4] = {poison_rm, poison_rm, poison_rm, poison_rm};
  CUDA_OK(cudaMemcpy(rm, host_p, 16, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(rv, host_p, 16, cudaMemcpyHostToDevice));
  for (size_t i = 0; i < sizeof fwd / sizeof fwd[0]; i++) {
    const struct fwd_case *k = &fwd[i];
    const fbn_status st = fbn_cuda_sync_forward(op, NULL, k->comm, k->td, x, k->z, y, w, b, k->rm,
                                                k->rv, k->factor, saved, k->saved_bytes, ws, wb);
    if (st != k->want || strstr(fbn_last_error_message(), k->text) == NULL ||
        strstr(fbn_last_error_message(), "fbn_cuda_sync_forward: ") == NULL)
      fail_msg("forward case %zu: %s, \"%s\" (wanted %s, \"%s\")", i, fbn_status_string(st),
               fbn_last_error_message(), fbn_status_string(k->want), k->text);
  }
  assert_true(all_nan(y, 72, FBN_DTYPE_FLOAT32));
  assert_true(equal_bytes(rm, host_p, 16) && equal_bytes(rv, host_p, 16));
  struct bwd_case {
    const void *saved;
    void *daddend;
    int param_grad, scope;
    fbn_status want;
    const char *text;
  } bwd[] = {
      {NULL, NULL, FBN_PARAM_GRAD_OVERWRITE, FBN_SYNC_GRAD_LOCAL, FBN_STATUS_NULL_POINTER,
       "saved is NULL"},
      {saved, dy, FBN_PARAM_GRAD_OVERWRITE, FBN_SYNC_GRAD_LOCAL, FBN_STATUS_INVALID_VALUE,
       "has no addend"},
      {saved, NULL, 7, FBN_SYNC_GRAD_LOCAL, FBN_STATUS_INVALID_VALUE, "param_grad = 7"},
      {saved, NULL, FBN_PARAM_GRAD_OVERWRITE, 9, FBN_STATUS_INVALID_VALUE, "scope = 9"},
  };
  for (size_t i = 0; i < sizeof bwd / sizeof bwd[0]; i++) {
    const struct bwd_case *k = &bwd[i];
    const fbn_status st = fbn_cuda_sync_backward(
        op, NULL, &good, &td, x, y, dy, k->saved, sb, w, b, dx, k->daddend, NULL, NULL,
        (fbn_param_grad)k->param_grad, (fbn_sync_grad_scope)k->scope, ws, wb);
    if (st != k->want || strstr(fbn_last_error_message(), k->text) == NULL ||
        strstr(fbn_last_error_message(), "fbn_cuda_sync_backward: ") == NULL)
      fail_msg("backward case %zu: %s, \"%s\" (wanted %s, \"%s\")", i, fbn_status_string(st),
               fbn_last_error_message(), fbn_status_string(k->want), k->text);
  }
  assert_true(all_nan(dx, 72, FBN_DTYPE_FLOAT32));
  size_t bytes = 77;
  assert_int_equal(fbn_cuda_sync_workspace_size(op, &td, 0, &bytes), FBN_STATUS_INVALID_VALUE);
  assert_non_null(strstr(fbn_last_error_message(), "world_size = 0"));
  assert_int_equal(fbn_cuda_sync_saved_size(op, &td, NULL), FBN_STATUS_NULL_POINTER);
  assert_int_equal(bytes, 77);
  void *bufs[] = {x, y, dy, dx, w, b, rm, rv, saved, ws};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    cudaFree(bufs[i]);
  pthread_barrier_destroy(&g.barrier);
  fbn_op_destroy(op);
}

/* ---- NCCL: one rank ------------------------------------------------------- */

#ifdef FBN_TEST_NCCL
static void test_nccl_one_rank(void **state) {
  (void)state;
  REQUIRE_GPU();
  ncclComm_t comm;
  const int devs[1] = {0};
  CUDA_OK(cudaSetDevice(0));
  const ncclResult_t r = ncclCommInitAll(&comm, 1, devs);
  if (r != ncclSuccess)
    fail_msg("ncclCommInitAll: %s", ncclGetErrorString(r));
  const fbn_dtype dtypes[] = {FBN_DTYPE_FLOAT32, FBN_DTYPE_FLOAT64};
  const fbn_operation ops[] = {FBN_OPERATION_BN, FBN_OPERATION_BN_RELU, FBN_OPERATION_BN_ADD_RELU};
  for (int a = 0; a < 2; a++)
    for (int o = 0; o < 3; o++)
      for (int lay = 0; lay < 2; lay++) {
        sync_case k = base_case(dtypes[a], lay ? FBN_LAYOUT_NHWC : FBN_LAYOUT_NCHW, ops[o]);
        k.world = 1;
        k.shard_n[0] = 4;
        k.seed += 200u + (uint64_t)(6 * a + 2 * o + lay);
        sync_data d;
        char why[512];
        if (sync_data_make(&d, &k, why, sizeof why) != 0)
          fail_msg("%s", why);
        rank_job j;
        memset(&j, 0, sizeof j);
        j.d = &d;
        j.kind = RUN_NCCL;
        j.nccl = comm;
        if (rank_run(&j) != 0)
          fail_msg("NCCL, one rank: %s", j.why);
        sync_data_free(&d);
      }
  /* the NCCL workspace query and check agree with the callback adapter's */
  fbn_op *op = cuda_op(FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW, FBN_OPERATION_BN_ADD_RELU, true, 5);
  const fbn_tensor_desc td = fbn_tensor_desc_make(3, 5, 2, 2, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  size_t a = 0, b = 0;
  assert_int_equal(fbn_nccl_sync_workspace_size(op, comm, &td, &a), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_cuda_sync_workspace_size(op, &td, 1, &b), FBN_STATUS_SUCCESS);
  assert_int_equal(a, b);
  void *ws = dev_alloc(a);
  assert_int_equal(fbn_nccl_sync_check(op, comm, 0, ws, a), FBN_STATUS_SUCCESS);
  cudaFree(ws);
  fbn_op_destroy(op);
  ncclCommDestroy(comm);
}

/* One NCCL rank against the single-process CUDA op on the same data, and
 * the same step captured into a CUDA graph against the eager one. */
static void test_nccl_against_cuda_op(void **state) {
  (void)state;
  REQUIRE_GPU();
  ncclComm_t comm;
  const int devs[1] = {0};
  CUDA_OK(cudaSetDevice(0));
  const ncclResult_t r = ncclCommInitAll(&comm, 1, devs);
  if (r != ncclSuccess)
    fail_msg("ncclCommInitAll: %s", ncclGetErrorString(r));
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, "gpu-sync-nccl-op");
  const int64_t n = 4, c = 6, h = 7, w = 5;
  const size_t cnt = (size_t)(n * c * h * w);
  float *hx = malloc(cnt * 4), *hz = malloc(cnt * 4), *hdy = malloc(cnt * 4), hp[6], hb[6];
  for (size_t i = 0; i < cnt; i++) {
    hx[i] = (float)(5.0 + 2.0 * fbnt_rng_normal(&rng));
    hz[i] = (float)fbnt_rng_normal(&rng);
    hdy[i] = (float)fbnt_rng_normal(&rng);
  }
  for (int i = 0; i < 6; i++) {
    hp[i] = (float)fbnt_rng_uniform(&rng, 0.5, 1.5);
    hb[i] = (float)fbnt_rng_uniform(&rng, -0.5, 0.5);
  }
  fbn_op *op = cuda_op(FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW, FBN_OPERATION_BN_ADD_RELU, true, c);
  assert_non_null(op);
  const fbn_tensor_desc td = fbn_tensor_desc_make(n, c, h, w, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  void *x = dev_copy(hx, cnt * 4), *z = dev_copy(hz, cnt * 4), *dy = dev_copy(hdy, cnt * 4);
  void *wt = dev_copy(hp, 24), *bs = dev_copy(hb, 24);
  void *y[2], *dx[2], *dz[2], *dw[2], *db[2], *rm[2], *rv[2];
  for (int k = 0; k < 2; k++) {
    y[k] = dev_alloc(cnt * 4);
    dx[k] = dev_alloc(cnt * 4);
    dz[k] = dev_alloc(cnt * 4);
    dw[k] = dev_alloc(24);
    db[k] = dev_alloc(24);
    rm[k] = dev_copy(hb, 24);
    rv[k] = dev_copy(hp, 24);
  }
  size_t sb = 0, wb = 0, osb = 0, owb = 0, owb2 = 0;
  assert_int_equal(fbn_cuda_sync_saved_size(op, &td, &sb), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_nccl_sync_workspace_size(op, comm, &td, &wb), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_op_saved_size(op, &td, &osb), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_op_forward_workspace_size(op, &td, &owb), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_op_backward_workspace_size(op, &td, &owb2), FBN_STATUS_SUCCESS);
  if (owb2 > owb)
    owb = owb2;
  void *saved = dev_alloc(sb), *ws = dev_alloc(wb), *osaved = dev_alloc(osb),
       *ows = dev_alloc(owb);
  assert_int_equal(fbn_nccl_sync_forward(op, comm, 0, &td, x, z, y[0], wt, bs, rm[0], rv[0], 0.1,
                                         saved, sb, ws, wb),
                   FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_nccl_sync_backward(op, comm, 0, &td, x, y[0], dy, saved, sb, wt, bs, dx[0],
                                          dz[0], dw[0], db[0], FBN_PARAM_GRAD_OVERWRITE,
                                          FBN_SYNC_GRAD_LOCAL, ws, wb),
                   FBN_STATUS_SUCCESS);
  fbn_status result = FBN_STATUS_DEVICE_ERROR;
  assert_int_equal(fbn_cuda_sync_read_status(op, NULL, ws, &result), FBN_STATUS_SUCCESS);
  assert_int_equal(result, FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_cuda_op_forward(op, NULL, &td, x, z, y[1], wt, bs, rm[1], rv[1], 0.1,
                                       osaved, osb, ows, owb),
                   FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_cuda_op_backward(op, NULL, &td, x, y[1], dy, osaved, osb, wt, bs, dx[1],
                                        dz[1], dw[1], db[1], FBN_PARAM_GRAD_OVERWRITE, ows, owb),
                   FBN_STATUS_SUCCESS);
  CUDA_OK(cudaDeviceSynchronize());
  char why[512];
  void *const got[] = {y[0], dx[0], dz[0], dw[0], db[0], rm[0], rv[0]};
  void *const want_dev[] = {y[1], dx[1], dz[1], dw[1], db[1], rm[1], rv[1]};
  const size_t counts[] = {cnt, cnt, cnt, 6, 6, 6, 6};
  const char *names[] = {"y", "dx", "daddend", "dweight", "dbias", "running_mean", "running_var"};
  for (int k = 0; k < 7; k++) {
    void *want = host_copy(want_dev[k], counts[k] * 4);
    if (compare(names[k], 0, got[k], want, counts[k], FBN_DTYPE_FLOAT32, why, sizeof why) != 0)
      fail_msg("NCCL against fbn_cuda_op: %s", why);
    free(want);
  }
  /* The same step captured into a CUDA graph on a stream of its own (fresh
   * running statistics), launched: the eager NCCL step's results, bit for
   * bit. */
  cudaStream_t cs;
  CUDA_OK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
  void *gy = dev_alloc(cnt * 4), *gdx = dev_alloc(cnt * 4), *gdz = dev_alloc(cnt * 4);
  void *gdw = dev_alloc(24), *gdb = dev_alloc(24), *grm = dev_copy(hb, 24), *grv = dev_copy(hp, 24);
  cudaGraph_t graph;
  CUDA_OK(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal));
  const fbn_status fst = fbn_nccl_sync_forward(op, comm, cs, &td, x, z, gy, wt, bs, grm, grv, 0.1,
                                               saved, sb, ws, wb);
  const fbn_status bst = fbn_nccl_sync_backward(op, comm, cs, &td, x, gy, dy, saved, sb, wt, bs,
                                                gdx, gdz, gdw, gdb, FBN_PARAM_GRAD_OVERWRITE,
                                                FBN_SYNC_GRAD_LOCAL, ws, wb);
  CUDA_OK(cudaStreamEndCapture(cs, &graph));
  assert_int_equal(fst, FBN_STATUS_SUCCESS);
  assert_int_equal(bst, FBN_STATUS_SUCCESS);
  cudaGraphExec_t exec_graph;
  CUDA_OK(cudaGraphInstantiate(&exec_graph, graph, 0));
  CUDA_OK(cudaGraphLaunch(exec_graph, cs));
  CUDA_OK(cudaStreamSynchronize(cs));
  const fbn_cuda_exec gexec = {cs, NULL};
  result = FBN_STATUS_DEVICE_ERROR;
  assert_int_equal(fbn_cuda_sync_read_status(op, &gexec, ws, &result), FBN_STATUS_SUCCESS);
  assert_int_equal(result, FBN_STATUS_SUCCESS);
  void *const eager[] = {y[0], dx[0], dz[0], dw[0], db[0], rm[0], rv[0]};
  void *const graphed[] = {gy, gdx, gdz, gdw, gdb, grm, grv};
  for (int k = 0; k < 7; k++) {
    void *e = host_copy(eager[k], counts[k] * 4), *g = host_copy(graphed[k], counts[k] * 4);
    if (memcmp(e, g, counts[k] * 4) != 0)
      fail_msg("the graph-captured step's %s differs from the eager one", names[k]);
    free(e);
    free(g);
  }
  CUDA_OK(cudaGraphExecDestroy(exec_graph));
  CUDA_OK(cudaGraphDestroy(graph));
  CUDA_OK(cudaStreamDestroy(cs));
  void *gbufs[] = {gy, gdx, gdz, gdw, gdb, grm, grv};
  for (size_t i = 0; i < sizeof gbufs / sizeof gbufs[0]; i++)
    cudaFree(gbufs[i]);

  void *bufs[] = {x, z, dy, wt, bs, saved, ws, osaved, ows};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    cudaFree(bufs[i]);
  for (int k = 0; k < 2; k++) {
    void *more[] = {y[k], dx[k], dz[k], dw[k], db[k], rm[k], rv[k]};
    for (size_t i = 0; i < 7; i++)
      cudaFree(more[i]);
  }
  free(hx);
  free(hz);
  free(hdy);
  fbn_op_destroy(op);
  ncclCommDestroy(comm);
}
#endif

int main(void) {
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_ranks),
    cmocka_unit_test(test_ranks_larger),
    cmocka_unit_test(test_dtype_mismatch),
    cmocka_unit_test(test_c_mismatch_check),
    cmocka_unit_test(test_total_count_one),
    cmocka_unit_test(test_failing_allgather),
    cmocka_unit_test(test_bad_memory),
    cmocka_unit_test(test_argument_checks),
#ifdef FBN_TEST_NCCL
    cmocka_unit_test(test_nccl_one_rank),
    cmocka_unit_test(test_nccl_against_cuda_op),
#endif
  };
  const int failed = cmocka_run_group_tests(tests, NULL, NULL);
#ifndef FBN_TEST_NCCL
  print_message("# libfusedbn_nccl not built: the NCCL tests are not compiled in\n");
#endif
  /* Every test skipped: exit status 77 (meson: SKIP). */
  if (failed == 0 && g_ran == 0 && g_skipped > 0)
    return 77;
  return failed;
}
