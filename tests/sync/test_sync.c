/*
 * Synchronized batch norm through the callback adapter, W ranks simulated
 * by threads of one process (allgather / allreduce-sum over a barrier),
 * against the plain op of the reference backend on the concatenated batch;
 * the split phases' statuses; failures on every rank with nothing written.
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

#include "fbn_testutil.h"
#include "sync_case.h"

/* Whether a[0..n) and b[0..n) hold the same values. */
static bool same_floats(const float *a, const float *b, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (!(a[i] == b[i]))
      return false;
  return true;
}

/* ---- W ranks as threads ------------------------------------------------- */

typedef struct thread_world {
  int world;
  pthread_barrier_t barrier;
  const void *send[SYNC_MAX_RANKS];
  double *data[SYNC_MAX_RANKS];
  int fail_at; /* index of the collective at which the callback fails; -1: none */
  int fail_rank; /* the rank whose callback fails after the exchange; -1: every rank's, before */
  fbn_status fail_status;
} thread_world;

typedef struct thread_rank {
  thread_world *w;
  int rank;
  int calls;
  fbn_sync_comm comm;
} thread_rank;

/* Whether this call fails (every rank's before the exchange, or one rank's
 * after it: *after). */
static bool inject(thread_rank *t, bool *after, char *error, size_t error_size) {
  *after = false;
  if (t->calls++ != t->w->fail_at || (t->w->fail_rank >= 0 && t->rank != t->w->fail_rank))
    return false;
  snprintf(error, error_size, "injected failure of collective %d", t->w->fail_at);
  *after = t->w->fail_rank >= 0;
  return true;
}

static fbn_status thread_allgather(void *context, const void *send, void *recv, size_t bytes,
                                   char *error, size_t error_size) {
  thread_rank *t = context;
  bool after = false;
  const bool fails = inject(t, &after, error, error_size);
  if (fails && !after)
    return t->w->fail_status;
  t->w->send[t->rank] = send;
  pthread_barrier_wait(&t->w->barrier);
  for (int r = 0; r < t->w->world; r++)
    memcpy((char *)recv + (size_t)r * bytes, t->w->send[r], bytes);
  pthread_barrier_wait(&t->w->barrier);
  return fails ? t->w->fail_status : FBN_STATUS_SUCCESS;
}

static fbn_status thread_allreduce(void *context, double *data, size_t count, char *error,
                                   size_t error_size) {
  thread_rank *t = context;
  bool after = false;
  const bool fails = inject(t, &after, error, error_size);
  if (fails && !after)
    return t->w->fail_status;
  t->w->data[t->rank] = data;
  pthread_barrier_wait(&t->w->barrier);
  double *sum = calloc(count, sizeof *sum);
  for (size_t i = 0; i < count; i++)
    for (int r = 0; r < t->w->world; r++) /* rank order on every rank */
      sum[i] += t->w->data[r][i];
  pthread_barrier_wait(&t->w->barrier);
  if (!fails)
    memcpy(data, sum, count * sizeof *sum);
  free(sum);
  return fails ? t->w->fail_status : FBN_STATUS_SUCCESS;
}

static void world_init(thread_world *w, thread_rank *ranks, int world) {
  memset(w, 0, sizeof *w);
  w->world = world;
  w->fail_at = -1;
  w->fail_rank = -1;
  pthread_barrier_init(&w->barrier, NULL, (unsigned)world);
  for (int r = 0; r < world; r++) {
    ranks[r] = (thread_rank){.w = w, .rank = r};
    ranks[r].comm = (fbn_sync_comm){.world_size = world,
                                    .rank = r,
                                    .context = &ranks[r],
                                    .allgather = thread_allgather,
                                    .allreduce_sum = thread_allreduce};
  }
}

/* ---- a case on W threads ------------------------------------------------ */

typedef struct case_job {
  const sync_data *d;
  const fbn_op *op;
  thread_rank *t;
  double dw[SYNC_MAX_STEPS * 64], db[SYNC_MAX_STEPS * 64];
  int rc;
  char why[512];
} case_job;

static void *case_thread(void *arg) {
  case_job *j = arg;
  j->rc = sync_rank_run(j->d, j->op, j->t->rank, &j->t->comm, j->dw, j->db, j->why, sizeof j->why);
  return NULL;
}

static const char *case_name(const sync_case *k, const char *backend) {
  static char name[256];
  char shards[64] = "";
  for (int r = 0; r < k->world; r++)
    snprintf(shards + strlen(shards), sizeof shards - strlen(shards), "%s%lld", r ? "," : "",
             (long long)k->shard_n[r]);
  snprintf(name, sizeof name, "%s %s %s %s affine=%d %s shards=(%s) C=%lld HxW=%lldx%lld %s",
           backend, fbnt_dtype_str(k->dtype),
           k->layout == FBN_LAYOUT_NCHW ? "NCHW" : "NHWC", fbn_operation_name(k->operation),
           k->affine, k->cumulative ? "cumulative" : "momentum=0.1", shards, (long long)k->c,
           (long long)k->h, (long long)k->w,
           k->scope == FBN_SYNC_GRAD_GLOBAL ? "global grads" : "local grads");
  return name;
}

/* Run k on W threads with the given backend; fails the test on a mismatch. */
static void run_case(const sync_case *k, const char *backend) {
  assert_true(k->c <= 64 && k->steps <= SYNC_MAX_STEPS);
  sync_data d;
  char why[512] = "";
  if (sync_data_make(&d, k, why, sizeof why) != 0)
    fail_msg("%s: %s", case_name(k, backend), why);
  thread_world w;
  thread_rank ranks[SYNC_MAX_RANKS];
  world_init(&w, ranks, k->world);
  fbn_op *op = sync_case_op(k, backend, k->c);
  assert_non_null(op);
  case_job *jobs = calloc((size_t)k->world, sizeof *jobs);
  pthread_t th[SYNC_MAX_RANKS];
  for (int r = 0; r < k->world; r++) {
    jobs[r] = (case_job){.d = &d, .op = op, .t = &ranks[r]};
    assert_int_equal(pthread_create(&th[r], NULL, case_thread, &jobs[r]), 0);
  }
  for (int r = 0; r < k->world; r++)
    pthread_join(th[r], NULL);
  for (int r = 0; r < k->world; r++)
    if (jobs[r].rc != 0)
      fail_msg("%s: %s", case_name(k, backend), jobs[r].why);
  if (k->affine && k->scope == FBN_SYNC_GRAD_LOCAL) {
    /* the ranks' local gradients sum to the whole batch's */
    const fbn_dtype pt = k->dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
    const double tol = sync_tolerance(k->dtype) * 4;
    for (int s = 0; s < k->steps; s++)
      for (int64_t c = 0; c < k->c; c++) {
        double sw = 0.0, sb = 0.0;
        for (int r = 0; r < k->world; r++) {
          sw += jobs[r].dw[s * k->c + c];
          sb += jobs[r].db[s * k->c + c];
        }
        const double ww = sync_load(d.dw[s], pt, (size_t)c), wb = sync_load(d.db[s], pt, (size_t)c);
        if (!(fabs(sw - ww) <= tol * fmax(1.0, fabs(ww))) ||
            !(fabs(sb - wb) <= tol * fmax(1.0, fabs(wb))))
          fail_msg("%s: step %d channel %lld: summed local dweight %.17g dbias %.17g, whole "
                   "batch %.17g %.17g",
                   case_name(k, backend), s, (long long)c, sw, sb, ww, wb);
      }
  }
  free(jobs);
  fbn_op_destroy(op);
  pthread_barrier_destroy(&w.barrier);
  sync_data_free(&d);
}

static uint64_t case_seed(const char *name) {
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, name);
  return ((uint64_t)fbnt_rng_u32(&rng) << 32) | fbnt_rng_u32(&rng);
}

/* Every dtype, layout and operation, both CPU backends, unequal shards
 * (one of N = 1, an empty one), momentum and the cumulative average, local
 * and global parameter gradients, three steps. */
static void test_sync_matches_whole_batch(void **state) {
  (void)state;
  static const int64_t shards[][4] = {{3, 1, 5, 2}, {3, 0, 1, 4}, {2, 3, 2, 0}};
  const char *backends[] = {"reference", "fast"};
  int cases = 0;
  for (int dt = 0; dt < 2; dt++)
    for (int lay = 0; lay < 2; lay++)
      for (int opn = 0; opn < 3; opn++)
        for (int sh = 0; sh < 3; sh++)
          for (int be = 0; be < 2; be++) {
            sync_case k = {
                .dtype = dt ? FBN_DTYPE_FLOAT32 : FBN_DTYPE_FLOAT64,
                .layout = lay ? FBN_LAYOUT_NHWC : FBN_LAYOUT_NCHW,
                .operation = (fbn_operation)opn,
                .affine = sh != 2,
                .cumulative = (sh + opn) % 2 == 1,
                .world = (int)shards[sh][0],
                .c = 5,
                .h = 3,
                .w = 4,
                .steps = 3,
                .scope = (sh + be) % 2 ? FBN_SYNC_GRAD_GLOBAL : FBN_SYNC_GRAD_LOCAL,
            };
            for (int r = 0; r < k.world; r++)
              k.shard_n[r] = shards[sh][r + 1];
            k.seed = case_seed(case_name(&k, backends[be]));
            run_case(&k, backends[be]);
            cases++;
          }
  print_message("# %d cases of 3 steps each\n", cases);
}

/* Shapes the fast backend runs with its vectorized loops (long NCHW rows,
 * NHWC blocks), float32 and float64; the shard of N = 5 is large enough for
 * the statistics and dx hooks to split their channels over OpenMP threads. */
static void test_sync_matches_whole_batch_larger(void **state) {
  (void)state;
  for (int dt = 0; dt < 2; dt++)
    for (int lay = 0; lay < 2; lay++) {
      sync_case k = {.dtype = dt ? FBN_DTYPE_FLOAT32 : FBN_DTYPE_FLOAT64,
                     .layout = lay ? FBN_LAYOUT_NHWC : FBN_LAYOUT_NCHW,
                     .operation = FBN_OPERATION_BN_ADD_RELU,
                     .affine = true,
                     .world = 2,
                     .shard_n = {1, 5},
                     .c = 24,
                     .h = 23,
                     .w = 29,
                     .steps = 2,
                     .scope = FBN_SYNC_GRAD_LOCAL};
      k.seed = case_seed(case_name(&k, "fast"));
      run_case(&k, "fast");
    }
}

/* W = 1 on the reference backend gives what the plain op gives on the same
 * batch, value for value (statistics, running update, y, dx, daddend and
 * gradients use the same arithmetic in the same order); on the fast
 * backend, whose plain forward takes shifted sums, within the tolerances. */
static void test_sync_one_rank_equals_plain_op(void **state) {
  (void)state;
  for (int be = 0; be < 2; be++)
    for (int dt = 0; dt < 2; dt++)
      for (int lay = 0; lay < 2; lay++)
        for (int opn = 0; opn < 3; opn++) {
          sync_case k = {.dtype = dt ? FBN_DTYPE_FLOAT32 : FBN_DTYPE_FLOAT64,
                         .layout = lay ? FBN_LAYOUT_NHWC : FBN_LAYOUT_NCHW,
                         .operation = (fbn_operation)opn,
                         .affine = true,
                         .world = 1,
                         .shard_n = {6},
                         .c = 7,
                         .h = 5,
                         .w = 3,
                         .steps = 2,
                         .scope = FBN_SYNC_GRAD_GLOBAL,
                         .exact = be == 0};
          const char *backend = be == 0 ? "reference" : "fast";
          k.seed = case_seed(case_name(&k, backend));
          run_case(&k, backend);
        }
}

/* float16/bfloat16 tensors (float32 parameters) on both CPU backends: W
 * ranks against the plain op on the whole batch within four units of the
 * dtype's rounding, and one rank on the reference backend value for value
 * (the same float64 arithmetic, each output rounded once). */
static void test_sync_half_tensors(void **state) {
  (void)state;
  const fbn_dtype halves[2] = {FBN_DTYPE_FLOAT16, FBN_DTYPE_BFLOAT16};
  const char *backends[] = {"reference", "fast"};
  for (int dt = 0; dt < 2; dt++)
    for (int lay = 0; lay < 2; lay++)
      for (int opn = 0; opn < 3; opn++)
        for (int be = 0; be < 2; be++) {
          sync_case k = {.dtype = halves[dt],
                         .layout = lay ? FBN_LAYOUT_NHWC : FBN_LAYOUT_NCHW,
                         .operation = (fbn_operation)opn,
                         .affine = true,
                         .world = 3,
                         .shard_n = {1, 5, 2},
                         .c = 5,
                         .h = 3,
                         .w = 4,
                         .steps = 2,
                         .scope = (opn + be) % 2 ? FBN_SYNC_GRAD_GLOBAL : FBN_SYNC_GRAD_LOCAL};
          k.seed = case_seed(case_name(&k, backends[be]));
          run_case(&k, backends[be]);
          sync_case one = k;
          one.world = 1;
          one.shard_n[0] = 6;
          one.scope = FBN_SYNC_GRAD_GLOBAL;
          one.exact = be == 0;
          one.seed = case_seed(case_name(&one, backends[be]));
          run_case(&one, backends[be]);
        }
}

/* The split phases called directly, the W ranks one after the other (the
 * all-gather is a copy, the all-reduce a sum in rank order): y, dx,
 * daddend, running statistics, the local dweight/dbias of
 * fbn_sync_backward_reduce() summed and the global ones of
 * fbn_sync_backward_apply(). */
static void test_sync_split_phases_sequential(void **state) {
  (void)state;
  for (int dt = 0; dt < 2; dt++) {
    sync_case k = {.dtype = dt ? FBN_DTYPE_FLOAT32 : FBN_DTYPE_FLOAT64,
                   .layout = dt ? FBN_LAYOUT_NHWC : FBN_LAYOUT_NCHW,
                   .operation = FBN_OPERATION_BN_ADD_RELU,
                   .affine = true,
                   .world = 3,
                   .shard_n = {2, 0, 1},
                   .c = 4,
                   .h = 3,
                   .w = 5,
                   .steps = 1};
    k.seed = case_seed(case_name(&k, "split"));
    sync_data d;
    char why[512] = "";
    if (sync_data_make(&d, &k, why, sizeof why) != 0)
      fail_msg("%s", why);
    fbn_op *op = sync_case_op(&k, "fast", k.c);
    assert_non_null(op);
    const fbn_dtype pt = k.dtype;
    const double tol = sync_tolerance(k.dtype);
    size_t rb = 0, gb = 0;
    assert_int_equal(fbn_sync_stats_record_size(op, &rb), FBN_STATUS_SUCCESS);
    assert_int_equal(fbn_sync_grad_record_size(op, &gb), FBN_STATUS_SUCCESS);
    char *records = aligned_alloc(64, (3 * rb + 63) / 64 * 64);
    double *grads = calloc(3, gb), *sum = calloc(1, gb);
    const size_t per_n = (size_t)(k.c * k.h * k.w), pb = (size_t)k.c * d.pelem;
    void *saved[3], *ws[3];
    size_t sb[3], wb[3];
    fbn_tensor_desc sd[3];
    size_t off[3];
    size_t o = 0;
    for (int r = 0; r < 3; r++) {
      sd[r] = fbn_tensor_desc_make(k.shard_n[r], k.c, k.h, k.w, k.dtype, k.layout);
      off[r] = o;
      o += (size_t)k.shard_n[r] * per_n * d.elem;
      assert_int_equal(fbn_sync_saved_size(op, &sd[r], &sb[r]), FBN_STATUS_SUCCESS);
      assert_int_equal(fbn_sync_workspace_size(op, &sd[r], &wb[r]), FBN_STATUS_SUCCESS);
      saved[r] = aligned_alloc(64, (sb[r] + 63) / 64 * 64);
      ws[r] = aligned_alloc(64, (wb[r] + 63) / 64 * 64);
      assert_int_equal(fbn_sync_stats(op, &sd[r], (char *)d.x[0] + off[r], records + r * rb, rb),
                       FBN_STATUS_SUCCESS);
    }
    char *y = aligned_alloc(64, (d.numel * d.elem + 63) / 64 * 64);
    char *dx = aligned_alloc(64, (d.numel * d.elem + 63) / 64 * 64);
    char *dz = aligned_alloc(64, (d.numel * d.elem + 63) / 64 * 64);
    memset(y, 0xff, d.numel * d.elem);
    memset(dx, 0xff, d.numel * d.elem);
    memset(dz, 0xff, d.numel * d.elem);
    double local_w[4] = {0}, local_b[4] = {0};
    for (int r = 0; r < 3; r++) {
      double mean[4], var[4];
      char rm[32], rv[32];
      memcpy(rm, d.rm0, pb);
      memcpy(rv, d.rv0, pb);
      int64_t total = 0;
      assert_int_equal(fbn_sync_combine(op, records, 3, rb, mean, var, rm, rv, 0.1, &total),
                       FBN_STATUS_SUCCESS);
      assert_int_equal(total, 3 * k.h * k.w);
      for (int64_t c = 0; c < k.c; c++) {
        const double em = sync_load(d.rm[0], pt, (size_t)c), ev = sync_load(d.rv[0], pt, (size_t)c);
        assert_true(fabs(sync_load(rm, pt, (size_t)c) - em) <= tol * fmax(1.0, fabs(em)));
        assert_true(fabs(sync_load(rv, pt, (size_t)c) - ev) <= tol * fmax(1.0, fabs(ev)));
      }
      assert_int_equal(fbn_sync_apply(op, &sd[r], (char *)d.x[0] + off[r], (char *)d.z[0] + off[r],
                                      y + off[r], d.weight, d.bias, mean, var, saved[r], sb[r],
                                      ws[r], wb[r]),
                       FBN_STATUS_SUCCESS);
      char lw[32], lb[32];
      assert_int_equal(fbn_sync_backward_reduce(op, &sd[r], (char *)d.x[0] + off[r], y + off[r],
                                                (char *)d.dy[0] + off[r], saved[r], sb[r], d.weight,
                                                d.bias, grads + r * (gb / 8), gb, lw, lb,
                                                FBN_PARAM_GRAD_OVERWRITE, ws[r], wb[r]),
                       FBN_STATUS_SUCCESS);
      for (int64_t c = 0; c < k.c; c++) {
        local_w[c] += sync_load(lw, pt, (size_t)c);
        local_b[c] += sync_load(lb, pt, (size_t)c);
      }
    }
    for (size_t i = 0; i < gb / 8; i++)
      for (int r = 0; r < 3; r++)
        sum[i] += grads[r * (gb / 8) + i];
    for (int r = 0; r < 3; r++) {
      char gw[32], gbias[32];
      memset(gw, 0, sizeof gw);
      memset(gbias, 0, sizeof gbias);
      assert_int_equal(fbn_sync_backward_apply(op, &sd[r], (char *)d.x[0] + off[r], y + off[r],
                                               (char *)d.dy[0] + off[r], saved[r], sb[r], d.weight,
                                               d.bias, sum, gb, dx + off[r], dz + off[r], gw, gbias,
                                               FBN_PARAM_GRAD_ACCUMULATE, ws[r], wb[r]),
                       FBN_STATUS_SUCCESS);
      for (int64_t c = 0; c < k.c; c++) {
        const double ew = sync_load(d.dw[0], pt, (size_t)c), eb = sync_load(d.db[0], pt, (size_t)c);
        assert_true(fabs(sync_load(gw, pt, (size_t)c) - ew) <= tol * fmax(1.0, fabs(ew)));
        assert_true(fabs(sync_load(gbias, pt, (size_t)c) - eb) <= tol * fmax(1.0, fabs(eb)));
        assert_true(fabs(local_w[c] - ew) <= 4 * tol * fmax(1.0, fabs(ew)));
        assert_true(fabs(local_b[c] - eb) <= 4 * tol * fmax(1.0, fabs(eb)));
      }
    }
    const struct {
      const char *name;
      const void *got, *want;
    } outs[] = {{"y", y, d.y[0]}, {"dx", dx, d.dx[0]}, {"daddend", dz, d.dz[0]}};
    for (size_t t = 0; t < 3; t++)
      for (size_t i = 0; i < d.numel; i++) {
        const double g = sync_load(outs[t].got, k.dtype, i),
                     w = sync_load(outs[t].want, k.dtype, i);
        if (!(fabs(g - w) <= tol * fmax(1.0, fabs(w))))
          fail_msg("%s[%zu] = %.17g, whole batch %.17g", outs[t].name, i, g, w);
      }
    for (int r = 0; r < 3; r++) {
      free(saved[r]);
      free(ws[r]);
    }
    free(records);
    free(grads);
    free(sum);
    free(y);
    free(dx);
    free(dz);
    fbn_op_destroy(op);
    sync_data_free(&d);
  }
}

/* ---- failures on every rank --------------------------------------------- */

/* A failure of one rank's own (its arguments), in the forward or the
 * backward. */
typedef enum fault {
  FAULT_NONE,
  FAULT_FWD_NULL_OP,   /* op NULL: FBN_STATUS_NULL_POINTER */
  FAULT_FWD_ARG,       /* factor = 2: FBN_STATUS_INVALID_VALUE */
  FAULT_FWD_WORKSPACE, /* 64 bytes: FBN_STATUS_INSUFFICIENT_WORKSPACE */
  FAULT_FWD_ALIAS,     /* weight inside the workspace's records: FBN_STATUS_ALIASING */
  FAULT_BWD_ARG,       /* param_grad = 7 */
  FAULT_BWD_WORKSPACE,
  FAULT_BWD_ALIAS, /* dy inside the workspace's gradient record */
  FAULT_COUNT
} fault;

static fbn_status fault_status(fault f) {
  switch (f) {
  case FAULT_FWD_NULL_OP:
    return FBN_STATUS_NULL_POINTER;
  case FAULT_FWD_ARG:
  case FAULT_BWD_ARG:
    return FBN_STATUS_INVALID_VALUE;
  case FAULT_FWD_WORKSPACE:
  case FAULT_BWD_WORKSPACE:
    return FBN_STATUS_INSUFFICIENT_WORKSPACE;
  case FAULT_FWD_ALIAS:
  case FAULT_BWD_ALIAS:
    return FBN_STATUS_ALIASING;
  default:
    return FBN_STATUS_SUCCESS;
  }
}

/* A world of one (the forward of ranks that disagree on C, run alone). */
static fbn_status solo_allgather(void *context, const void *send, void *recv, size_t bytes,
                                 char *error, size_t error_size) {
  (void)context;
  (void)error;
  (void)error_size;
  memcpy(recv, send, bytes);
  return FBN_STATUS_SUCCESS;
}

static fbn_status solo_allreduce(void *context, double *data, size_t count, char *error,
                                 size_t error_size) {
  (void)context;
  (void)data;
  (void)count;
  (void)error;
  (void)error_size;
  return FBN_STATUS_SUCCESS;
}

typedef struct fail_job {
  thread_rank *t;
  const fbn_op *op;
  fbn_tensor_desc d;
  fault fault;       /* this rank's own failure */
  bool solo_forward; /* the forward on a world of one, the backward on all */
  bool backward_too;
  fbn_status fwd, bwd;
  char fwd_msg[512], bwd_msg[512];
  bool untouched; /* y, running stats (and dx, dweight) as before */
} fail_job;

static void *fail_thread(void *arg) {
  fail_job *j = arg;
  const fbn_op *op = j->op;
  fbn_op_desc od;
  fbn_op_get_desc(op, &od);
  const size_t numel = (size_t)(j->d.n * j->d.c * j->d.h * j->d.w), c = (size_t)j->d.c;
  size_t saved_bytes = 0, ws_bytes = 0;
  assert_int_equal(fbn_sync_saved_size(op, &j->d, &saved_bytes), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_sync_comm_workspace_size(op, &j->d, j->t->comm.world_size, &ws_bytes),
                   FBN_STATUS_SUCCESS);
  /* room for float64 elements too (a rank whose op disagrees on dtype) */
  float *x = calloc(2 * numel + 2, 4), *z = calloc(2 * numel + 2, 4), *y = calloc(2 * numel + 2, 4);
  float *dy = calloc(2 * numel + 2, 4), *dx = calloc(2 * numel + 2, 4);
  float wt[128], bs[128], rm[128], rv[128], dw[128], db[128];
  void *saved = aligned_alloc(64, (saved_bytes + 63) / 64 * 64);
  void *ws = aligned_alloc(64, (ws_bytes + 63) / 64 * 64);
  fbnt_rng rng;
  fbnt_rng_init(&rng, 99, (uint64_t)j->t->rank);
  for (size_t i = 0; i < numel; i++) {
    x[i] = (float)fbnt_rng_normal(&rng);
    z[i] = (float)fbnt_rng_normal(&rng);
    dy[i] = (float)fbnt_rng_normal(&rng);
  }
  for (size_t i = 0; i < c; i++) {
    wt[i] = 1.0f + 0.1f * (float)i;
    bs[i] = 0.1f;
    rm[i] = 0.25f * (float)i;
    rv[i] = 1.5f;
    dw[i] = 7.0f;
    db[i] = -3.0f;
  }
  float rm0[128], rv0[128];
  memcpy(rm0, rm, sizeof rm);
  memcpy(rv0, rv, sizeof rv);
  memset(y, 0xff, (numel + 1) * 4);
  memset(dx, 0xff, (numel + 1) * 4);
  const fault f = j->fault;
  const fbn_sync_comm solo = {1, 0, NULL, solo_allgather, solo_allreduce};
  j->fwd = fbn_sync_forward(f == FAULT_FWD_NULL_OP ? NULL : op,
                            j->solo_forward ? &solo : &j->t->comm, &j->d, x, z, y,
                            f == FAULT_FWD_ALIAS ? ws : wt, bs, rm, rv, f == FAULT_FWD_ARG ? 2.0 : 0.1,
                            saved, saved_bytes, ws, f == FAULT_FWD_WORKSPACE ? 64 : ws_bytes);
  snprintf(j->fwd_msg, sizeof j->fwd_msg, "%s", fbn_last_error_message());
  bool ok = same_floats(rm, rm0, c) && same_floats(rv, rv0, c);
  if (j->fwd != FBN_STATUS_SUCCESS)
    for (size_t i = 0; i < numel; i++)
      ok = ok && isnan(y[i]);
  if (j->backward_too && j->fwd == FBN_STATUS_SUCCESS) {
    ok = true; /* the forward succeeded: what the backward must leave */
    j->bwd = fbn_sync_backward(op, &j->t->comm, &j->d, x, y, f == FAULT_BWD_ALIAS ? ws : dy, saved,
                               saved_bytes, wt, bs, dx, NULL, dw, db,
                               f == FAULT_BWD_ARG ? (fbn_param_grad)7 : FBN_PARAM_GRAD_ACCUMULATE,
                               FBN_SYNC_GRAD_LOCAL, ws, f == FAULT_BWD_WORKSPACE ? 64 : ws_bytes);
    snprintf(j->bwd_msg, sizeof j->bwd_msg, "%s", fbn_last_error_message());
    for (size_t i = 0; i < numel; i++)
      ok = ok && isnan(dx[i]);
    for (size_t i = 0; i < c; i++)
      ok = ok && dw[i] == 7.0f && db[i] == -3.0f;
    (void)od;
  }
  j->untouched = ok;
  free(x);
  free(z);
  free(y);
  free(dy);
  free(dx);
  free(saved);
  free(ws);
  return NULL;
}

static fbn_op *dtype_op(fbn_dtype dtype, int64_t c) {
  sync_case k = {.dtype = dtype,
                 .layout = FBN_LAYOUT_NCHW,
                 .operation = FBN_OPERATION_BN_ADD_RELU,
                 .affine = true};
  return sync_case_op(&k, "fast", c);
}

static fbn_op *f32_op(int64_t c) { return dtype_op(FBN_DTYPE_FLOAT32, c); }

/* Run fail_thread on `world` ranks; rank r has channels cs[r], N ns[r] and
 * dtype dts[r] (dts NULL: float32). */
static void run_fail_ex(int world, const int64_t *cs, const int64_t *ns, const fbn_dtype *dts,
                        int64_t hw, int fail_at, int fail_rank, const fault *faults,
                        bool solo_forward, bool backward_too, fail_job *jobs) {
  thread_world w;
  thread_rank ranks[SYNC_MAX_RANKS];
  world_init(&w, ranks, world);
  w.fail_at = fail_at;
  w.fail_rank = fail_rank;
  w.fail_status = FBN_STATUS_IO_ERROR;
  fbn_op *ops[SYNC_MAX_RANKS];
  pthread_t th[SYNC_MAX_RANKS];
  for (int r = 0; r < world; r++) {
    const fbn_dtype dt = dts != NULL ? dts[r] : FBN_DTYPE_FLOAT32;
    ops[r] = dtype_op(dt, cs[r]);
    assert_non_null(ops[r]);
    jobs[r] = (fail_job){
        .t = &ranks[r],
        .op = ops[r],
        .backward_too = backward_too,
        .fault = faults != NULL ? faults[r] : FAULT_NONE,
        .solo_forward = solo_forward,
        .d = fbn_tensor_desc_make(ns[r], cs[r], hw, 1, dt, FBN_LAYOUT_NCHW)};
    assert_int_equal(pthread_create(&th[r], NULL, fail_thread, &jobs[r]), 0);
  }
  for (int r = 0; r < world; r++) {
    pthread_join(th[r], NULL);
    fbn_op_destroy(ops[r]);
  }
  pthread_barrier_destroy(&w.barrier);
}

static void run_fail(int world, const int64_t *cs, const int64_t *ns, const fbn_dtype *dts,
                     int64_t hw, int fail_at, bool backward_too, fail_job *jobs) {
  run_fail_ex(world, cs, ns, dts, hw, fail_at, -1, NULL, false, backward_too, jobs);
}

static void test_sync_disagreeing_channels(void **state) {
  (void)state;
  const int64_t cs[] = {5, 6, 5}, ns[] = {2, 3, 1};
  fail_job jobs[3];
  run_fail(3, cs, ns, NULL, 4, -1, false, jobs);
  for (int r = 0; r < 3; r++) {
    assert_int_equal(jobs[r].fwd, FBN_STATUS_SHAPE_MISMATCH);
    /* rank 1 sees rank 0 disagree with it, the others see rank 1 */
    assert_non_null(strstr(jobs[r].fwd_msg, r == 1 ? "rank 0 has C = 5" : "rank 1 has C = 6"));
    assert_true(jobs[r].untouched);
  }
}

static void test_sync_disagreeing_dtype(void **state) {
  (void)state;
  const int64_t cs[] = {4, 4}, ns[] = {3, 2};
  const fbn_dtype dts[] = {FBN_DTYPE_FLOAT32, FBN_DTYPE_FLOAT64};
  fail_job jobs[2];
  run_fail(2, cs, ns, dts, 3, -1, false, jobs);
  for (int r = 0; r < 2; r++) {
    assert_int_equal(jobs[r].fwd, FBN_STATUS_SHAPE_MISMATCH);
    assert_non_null(
        strstr(jobs[r].fwd_msg, r == 1 ? "rank 0 has dtype float32" : "rank 1 has dtype float64"));
    assert_true(jobs[r].untouched);
  }
}

static void test_sync_total_count_one(void **state) {
  (void)state;
  const int64_t cs[] = {4, 4}, ns[] = {1, 0};
  fail_job jobs[2];
  run_fail(2, cs, ns, NULL, 1, -1, false, jobs);
  for (int r = 0; r < 2; r++) {
    assert_int_equal(jobs[r].fwd, FBN_STATUS_INVALID_SHAPE);
    assert_non_null(strstr(jobs[r].fwd_msg, "1 value(s) per channel over the 2 ranks"));
    assert_true(jobs[r].untouched);
  }
}

static void test_sync_failing_callback(void **state) {
  (void)state;
  const int64_t cs[] = {3, 3}, ns[] = {2, 0};
  /* 0: the forward's check headers' allgather, 1: the records', 2: the
   * backward's check headers' allgather, 3: its allreduce */
  for (int at = 0; at < 4; at++) {
    fail_job jobs[2];
    run_fail(2, cs, ns, NULL, 5, at, true, jobs);
    for (int r = 0; r < 2; r++) {
      const fbn_status st = at < 2 ? jobs[r].fwd : jobs[r].bwd;
      const char *msg = at < 2 ? jobs[r].fwd_msg : jobs[r].bwd_msg;
      assert_int_equal(st, FBN_STATUS_IO_ERROR);
      assert_non_null(
          strstr(msg, at < 3 ? "allgather callback failed" : "allreduce_sum callback failed"));
      assert_non_null(strstr(msg, "injected failure"));
      if (!jobs[r].untouched)
        fail_msg("collective %d failing: rank %d wrote outputs or state", at, r);
    }
  }
}

/* One rank fails on its own (an argument, its workspace, an overlap, a NULL
 * op) in the forward or the backward: it returns its own status and message,
 * every other rank the same status naming it; nothing is written on any
 * rank and no rank waits (the suite's timeout catches a hang). */
static void test_sync_one_rank_fails(void **state) {
  (void)state;
  const int64_t cs[] = {3, 3, 3}, ns[] = {2, 1, 3};
  for (int f = FAULT_FWD_NULL_OP; f < FAULT_COUNT; f++)
    for (int bad = 0; bad < 3; bad++) {
      fault faults[3] = {FAULT_NONE, FAULT_NONE, FAULT_NONE};
      faults[bad] = (fault)f;
      fail_job jobs[3];
      run_fail_ex(3, cs, ns, NULL, 4, -1, -1, faults, false, true, jobs);
      const bool in_fwd = f < FAULT_BWD_ARG;
      char named[64];
      snprintf(named, sizeof named, "rank %d failed with %s", bad,
               fbn_status_string(fault_status((fault)f)));
      for (int r = 0; r < 3; r++) {
        const fbn_status st = in_fwd ? jobs[r].fwd : jobs[r].bwd;
        const char *msg = in_fwd ? jobs[r].fwd_msg : jobs[r].bwd_msg;
        if (!in_fwd)
          assert_int_equal(jobs[r].fwd, FBN_STATUS_SUCCESS);
        if (st != fault_status((fault)f) || (r != bad && strstr(msg, named) == NULL) ||
            (r == bad && strstr(msg, "failed with") != NULL))
          fail_msg("fault %d on rank %d: rank %d returned %s: %s", f, bad, r,
                   fbn_status_string(st), msg);
        if (!jobs[r].untouched)
          fail_msg("fault %d on rank %d: rank %d wrote outputs or state", f, bad, r);
      }
    }
}

/* The callback of the last collective of a call (the forward's records
 * all-gather, the backward's all-reduce) fails on one rank only: that rank
 * returns its status with nothing written, the others finish. */
static void test_sync_one_rank_callback_fails(void **state) {
  (void)state;
  const int64_t cs[] = {3, 3}, ns[] = {2, 3};
  for (int at = 1; at < 4; at += 2)
    for (int bad = 0; bad < 2; bad++) {
      fail_job jobs[2];
      /* after a forward that failed on one rank only the others would go
       * on to a backward that rank never enters: the forward case stops */
      run_fail_ex(2, cs, ns, NULL, 5, at, bad, NULL, false, at == 3, jobs);
      for (int r = 0; r < 2; r++) {
        const fbn_status st = at == 1 ? jobs[r].fwd : jobs[r].bwd;
        if (r == bad) {
          assert_int_equal(st, FBN_STATUS_IO_ERROR);
          assert_non_null(strstr(at == 1 ? jobs[r].fwd_msg : jobs[r].bwd_msg,
                                 "injected failure"));
          assert_true(jobs[r].untouched);
        } else {
          assert_int_equal(st, FBN_STATUS_SUCCESS);
        }
      }
    }
}

/* Ranks whose C differs (2, 4, 3) in the backward (each forward run alone):
 * the backward's check round finds it on every rank, before an all-reduce
 * of different sizes (whose summed C entry, 9 = 3 * 3, would pass for C =
 * 3), with nothing written. */
static void test_sync_backward_disagreeing_channels(void **state) {
  (void)state;
  const int64_t cs[] = {2, 4, 3}, ns[] = {2, 3, 1};
  fail_job jobs[3];
  run_fail_ex(3, cs, ns, NULL, 4, -1, -1, NULL, true, true, jobs);
  for (int r = 0; r < 3; r++) {
    assert_int_equal(jobs[r].fwd, FBN_STATUS_SUCCESS);
    assert_int_equal(jobs[r].bwd, FBN_STATUS_SHAPE_MISMATCH);
    assert_non_null(strstr(jobs[r].bwd_msg, r == 0 ? "rank 1 has C = 4" : "rank 0 has C = 2"));
    assert_non_null(strstr(jobs[r].bwd_msg, "fbn_sync_backward"));
    assert_true(jobs[r].untouched);
  }
}

/* ---- split phases: statuses ------------------------------------------------ */

static void test_sync_split_phase_errors(void **state) {
  (void)state;
  fbn_op *op = f32_op(3);
  assert_non_null(op);
  const fbn_tensor_desc d = fbn_tensor_desc_make(2, 3, 2, 2, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  size_t rb = 0, gb = 0;
  assert_int_equal(fbn_sync_stats_record_size(op, &rb), FBN_STATUS_SUCCESS);
  assert_int_equal(rb, 64 + 16 * 3);
  assert_int_equal(fbn_sync_grad_record_size(op, &gb), FBN_STATUS_SUCCESS);
  assert_int_equal(gb, (4 + 2 * 3) * 8);
  assert_int_equal(fbn_sync_stats_record_size(NULL, &rb), FBN_STATUS_NULL_POINTER);
  assert_int_equal(fbn_sync_stats_record_size(op, NULL), FBN_STATUS_NULL_POINTER);

  float x[24];
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, "split_phase_errors");
  for (int i = 0; i < 24; i++)
    x[i] = (float)fbnt_rng_normal(&rng);
  double *recs = aligned_alloc(64, (2 * rb + 63) / 64 * 64);
  assert_int_equal(fbn_sync_stats(op, &d, x, recs, rb), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_sync_stats(op, &d, x, (char *)recs + rb, rb), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_sync_stats(op, &d, NULL, recs, rb), FBN_STATUS_NULL_POINTER);
  assert_int_equal(fbn_sync_stats(op, &d, x, recs, rb - 8), FBN_STATUS_INSUFFICIENT_WORKSPACE);
  fbn_tensor_desc bad = d;
  bad.c = 4;
  assert_int_equal(fbn_sync_stats(op, &bad, x, recs, rb), FBN_STATUS_SHAPE_MISMATCH);
  bad = d;
  bad.n = -1;
  assert_int_equal(fbn_sync_stats(op, &bad, x, recs, rb), FBN_STATUS_INVALID_SHAPE);

  double mean[3] = {5, 5, 5}, var[3] = {5, 5, 5};
  float rm[3] = {1, 2, 3}, rv[3] = {4, 5, 6};
  /* a good combine: two equal halves give the half's mean */
  int64_t total = 0;
  assert_int_equal(fbn_sync_combine(op, recs, 2, rb, mean, var, rm, rv, 0.5, &total),
                   FBN_STATUS_SUCCESS);
  assert_int_equal(total, 16);
  assert_true(fabs(mean[0] - recs[8]) <= 1e-15 * fmax(1.0, fabs(recs[8])));
  const float rm1[3] = {rm[0], rm[1], rm[2]};
  /* a corrupted record: INVALID_STATE, nothing written */
  double saved_word = recs[rb / 8];
  recs[rb / 8] = 0.0; /* rank 1's magic */
  double m2[3] = {9, 9, 9};
  assert_int_equal(fbn_sync_combine(op, recs, 2, rb, m2, var, rm, rv, 0.5, NULL),
                   FBN_STATUS_INVALID_STATE);
  assert_non_null(strstr(fbn_last_error_message(), "rank 1"));
  assert_true(m2[0] == 9 && same_floats(rm, rm1, 3));
  recs[rb / 8] = saved_word;
  /* another eps on rank 0: INVALID_VALUE */
  double eps = 1e-3;
  memcpy((char *)recs + 48, &eps, 8); /* rank 0's eps in its check header */
  assert_int_equal(fbn_sync_combine(op, recs, 2, rb, m2, var, rm, rv, 0.5, NULL),
                   FBN_STATUS_INVALID_VALUE);
  assert_non_null(strstr(fbn_last_error_message(), "rank 0"));
  assert_true(m2[0] == 9);
  assert_int_equal(fbn_sync_stats(op, &d, x, recs, rb), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_sync_combine(op, recs, 0, rb, m2, var, NULL, NULL, 0.0, NULL),
                   FBN_STATUS_INVALID_VALUE);
  assert_int_equal(fbn_sync_combine(op, recs, 2, rb, m2, var, rm, NULL, 0.5, NULL),
                   FBN_STATUS_INVALID_VALUE);
  assert_int_equal(fbn_sync_combine(op, recs, 2, rb, m2, var, rm, rv, 1.5, NULL),
                   FBN_STATUS_INVALID_VALUE);
  assert_int_equal(fbn_sync_combine(op, NULL, 2, rb, m2, var, NULL, NULL, 0.0, NULL),
                   FBN_STATUS_NULL_POINTER);
  assert_int_equal(fbn_sync_combine(op, recs, 2, rb, mean, mean, NULL, NULL, 0.0, NULL),
                   FBN_STATUS_ALIASING);
  assert_true(m2[0] == 9 && same_floats(rm, rm1, 3));

  /* apply and the backward phases */
  size_t sb = 0, wb = 0;
  assert_int_equal(fbn_sync_saved_size(op, &d, &sb), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_sync_workspace_size(op, &d, &wb), FBN_STATUS_SUCCESS);
  void *saved = aligned_alloc(64, (sb + 63) / 64 * 64),
       *ws = aligned_alloc(64, (wb + 63) / 64 * 64);
  float z[24] = {0}, y[24], wt[3] = {1, 1, 1}, bs[3] = {0, 0, 0};
  memset(y, 0xff, sizeof y);
  assert_int_equal(fbn_sync_apply(op, &d, x, NULL, y, wt, bs, mean, var, saved, sb, ws, wb),
                   FBN_STATUS_NULL_POINTER);
  assert_int_equal(fbn_sync_apply(op, &d, x, z, y, wt, bs, mean, var, saved, sb, ws, wb - 64),
                   FBN_STATUS_INSUFFICIENT_WORKSPACE);
  assert_int_equal(fbn_sync_apply(op, &d, x, z, x, wt, bs, mean, var, saved, sb, ws, wb),
                   FBN_STATUS_ALIASING);
  assert_int_equal(fbn_sync_apply(op, &d, x, z, y, NULL, bs, mean, var, saved, sb, ws, wb),
                   FBN_STATUS_NULL_POINTER);
  for (int i = 0; i < 24; i++)
    assert_true(isnan(y[i]));
  assert_int_equal(fbn_sync_apply(op, &d, x, z, y, wt, bs, mean, var, saved, sb, ws, wb),
                   FBN_STATUS_SUCCESS);
  double grad[10], grad2[10];
  float dy[24], dx[24];
  for (int i = 0; i < 24; i++)
    dy[i] = (float)fbnt_rng_normal(&rng);
  assert_int_equal(fbn_sync_backward_reduce(op, &d, x, y, dy, saved, sb, wt, bs, grad, gb - 8, NULL,
                                            NULL, FBN_PARAM_GRAD_OVERWRITE, ws, wb),
                   FBN_STATUS_INSUFFICIENT_WORKSPACE);
  assert_int_equal(fbn_sync_backward_reduce(op, &d, x, y, dy, saved, sb, wt, bs, grad, gb, NULL,
                                            NULL, (fbn_param_grad)7, ws, wb),
                   FBN_STATUS_INVALID_VALUE);
  assert_int_equal(fbn_sync_backward_reduce(op, &d, x, y, dy, saved, sb, wt, bs, grad, gb, NULL,
                                            NULL, FBN_PARAM_GRAD_OVERWRITE, ws, wb),
                   FBN_STATUS_SUCCESS);
  assert_true(grad[0] == 8.0 && grad[1] == 1.0 && grad[2] == 3.0);
  /* a record summed over ranks that disagree on C */
  memcpy(grad2, grad, sizeof grad);
  grad2[1] = 2.0;
  grad2[2] = 7.0;
  memset(dx, 0xff, sizeof dx);
  assert_int_equal(fbn_sync_backward_apply(op, &d, x, y, dy, saved, sb, wt, bs, grad2, gb, dx, NULL,
                                           NULL, NULL, FBN_PARAM_GRAD_OVERWRITE, ws, wb),
                   FBN_STATUS_SHAPE_MISMATCH);
  grad2[2] = 6.0;
  grad2[0] = 3.0; /* fewer than this shard's 8 values */
  assert_int_equal(fbn_sync_backward_apply(op, &d, x, y, dy, saved, sb, wt, bs, grad2, gb, dx, NULL,
                                           NULL, NULL, FBN_PARAM_GRAD_OVERWRITE, ws, wb),
                   FBN_STATUS_INVALID_VALUE);
  /* saved memory no apply filled */
  char junk[4096] __attribute__((aligned(64)));
  memset(junk, 0, sizeof junk);
  assert_true(sb <= sizeof junk);
  assert_int_equal(fbn_sync_backward_apply(op, &d, x, y, dy, junk, sb, wt, bs, grad, gb, dx, NULL,
                                           NULL, NULL, FBN_PARAM_GRAD_OVERWRITE, ws, wb),
                   FBN_STATUS_INVALID_STATE);
  for (int i = 0; i < 24; i++)
    assert_true(isnan(dx[i]));
  /* the op API's backward refuses the sync apply's saved state */
  size_t obw = 0;
  assert_int_equal(fbn_op_backward_workspace_size(op, &d, &obw), FBN_STATUS_SUCCESS);
  assert_true(obw <= wb);
  assert_int_equal(fbn_op_backward(op, &d, x, y, dy, saved, sb, wt, bs, dx, NULL, NULL, NULL,
                                   FBN_PARAM_GRAD_OVERWRITE, ws, wb),
                   FBN_STATUS_INVALID_STATE);

  /* ops the synchronized calls can't run */
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = 3;
  od.statistics = FBN_STATISTICS_RUNNING;
  fbn_op *eval = NULL;
  assert_int_equal(fbn_op_create(&od, &eval), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_sync_stats_record_size(eval, &rb), FBN_STATUS_INVALID_VALUE);
  assert_non_null(strstr(fbn_last_error_message(), "batch statistics"));
  fbn_op_destroy(eval);

  /* the adapter's own arguments */
  fbn_sync_comm comm = {.world_size = 2, .rank = 2};
  size_t cw = 0;
  assert_int_equal(fbn_sync_comm_workspace_size(op, &d, 0, &cw), FBN_STATUS_INVALID_VALUE);
  assert_int_equal(
      fbn_sync_forward(op, &comm, &d, x, z, y, wt, bs, NULL, NULL, 0.0, NULL, 0, ws, wb),
      FBN_STATUS_INVALID_VALUE);
  assert_non_null(strstr(fbn_last_error_message(), "comm->rank = 2"));
  comm.rank = 0;
  assert_int_equal(
      fbn_sync_forward(op, &comm, &d, x, z, y, wt, bs, NULL, NULL, 0.0, NULL, 0, ws, wb),
      FBN_STATUS_NULL_POINTER);
  assert_int_equal(
      fbn_sync_forward(op, NULL, &d, x, z, y, wt, bs, NULL, NULL, 0.0, NULL, 0, ws, wb),
      FBN_STATUS_NULL_POINTER);
  assert_int_equal(fbn_sync_backward(op, &comm, &d, x, y, dy, saved, sb, wt, bs, dx, NULL, NULL,
                                     NULL, FBN_PARAM_GRAD_OVERWRITE, (fbn_sync_grad_scope)5, ws,
                                     wb),
                   FBN_STATUS_NULL_POINTER);
  free(recs);
  free(saved);
  free(ws);
  fbn_op_destroy(op);
}

int main(int argc, char **argv) {
  fbnt_print_seed();
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_sync_matches_whole_batch),
      cmocka_unit_test(test_sync_matches_whole_batch_larger),
      cmocka_unit_test(test_sync_one_rank_equals_plain_op),
      cmocka_unit_test(test_sync_half_tensors),
      cmocka_unit_test(test_sync_split_phases_sequential),
      cmocka_unit_test(test_sync_disagreeing_channels),
      cmocka_unit_test(test_sync_disagreeing_dtype),
      cmocka_unit_test(test_sync_total_count_one),
      cmocka_unit_test(test_sync_failing_callback),
      cmocka_unit_test(test_sync_one_rank_fails),
      cmocka_unit_test(test_sync_one_rank_callback_fails),
      cmocka_unit_test(test_sync_backward_disagreeing_channels),
      cmocka_unit_test(test_sync_split_phase_errors),
  };
  if (argc > 1)
    cmocka_set_test_filter(argv[1]);
  return cmocka_run_group_tests_name("sync", tests, NULL, NULL);
}
