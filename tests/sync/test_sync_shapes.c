/*
 * Synchronized batch norm on shards large enough for the CPU backends'
 * threaded statistics and dx loops (at least 64 Ki elements on a rank), with
 * shapes that take every branch of those loops: NHWC with more than 256
 * and more than 2048 channels (blocks of channels and a partial block), NHWC with few channels
 * and a row count that leaves a tail, NCHW runs of H*W longer than one
 * widening piece; every dtype (float16 and bfloat16 included), both CPU
 * backends, two ranks as threads (the callback adapter over a barrier),
 * against the plain op of the reference backend on the whole batch; and one
 * rank on the reference backend, bit for bit against its plain op. Run with
 * OMP_NUM_THREADS=1 and 2 (tests/sync/meson.build).
 */
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

typedef struct world {
  int size;
  pthread_barrier_t barrier;
  const void *send[SYNC_MAX_RANKS];
  double *data[SYNC_MAX_RANKS];
} world;

typedef struct rank_job {
  world *w;
  int rank;
  fbn_sync_comm comm;
  const sync_data *d;
  const fbn_op *op;
  int rc;
  char why[512];
} rank_job;

static fbn_status allgather(void *context, const void *send, void *recv, size_t bytes,
                            char *error, size_t error_size) {
  (void)error;
  (void)error_size;
  rank_job *j = context;
  j->w->send[j->rank] = send;
  pthread_barrier_wait(&j->w->barrier);
  for (int r = 0; r < j->w->size; r++)
    memcpy((char *)recv + (size_t)r * bytes, j->w->send[r], bytes);
  pthread_barrier_wait(&j->w->barrier);
  return FBN_STATUS_SUCCESS;
}

static fbn_status allreduce_sum(void *context, double *data, size_t count, char *error,
                                size_t error_size) {
  (void)error;
  (void)error_size;
  rank_job *j = context;
  j->w->data[j->rank] = data;
  pthread_barrier_wait(&j->w->barrier);
  double *sum = calloc(count, sizeof *sum);
  if (sum != NULL)
    for (size_t i = 0; i < count; i++)
      for (int r = 0; r < j->w->size; r++) /* rank order on every rank */
        sum[i] += j->w->data[r][i];
  pthread_barrier_wait(&j->w->barrier);
  if (sum == NULL)
    return FBN_STATUS_OUT_OF_MEMORY;
  memcpy(data, sum, count * sizeof *sum);
  free(sum);
  return FBN_STATUS_SUCCESS;
}

static void *rank_thread(void *arg) {
  rank_job *j = arg;
  j->rc = sync_rank_run(j->d, j->op, j->rank, &j->comm, NULL, NULL, j->why, sizeof j->why);
  return NULL;
}

static const char *case_name(const sync_case *k, const char *backend) {
  static char name[256];
  char shards[64] = "";
  for (int r = 0; r < k->world; r++)
    snprintf(shards + strlen(shards), sizeof shards - strlen(shards), "%s%lld", r ? "," : "",
             (long long)k->shard_n[r]);
  snprintf(name, sizeof name, "%s %s %s %s shards=(%s) C=%lld HxW=%lldx%lld%s", backend,
           fbnt_dtype_str(k->dtype), k->layout == FBN_LAYOUT_NCHW ? "NCHW" : "NHWC",
           fbn_operation_name(k->operation), shards, (long long)k->c, (long long)k->h,
           (long long)k->w, k->exact ? " bit for bit" : "");
  return name;
}

/* k on k->world threads with the given backend; fails the test on a
 * mismatch of any element of any rank. */
static void run_case(const sync_case *k, const char *backend) {
  sync_data d;
  char why[512] = "";
  if (sync_data_make(&d, k, why, sizeof why) != 0)
    fail_msg("%s: %s", case_name(k, backend), why);
  fbn_op *op = sync_case_op(k, backend, k->c);
  assert_non_null(op);
  world w = {.size = k->world};
  assert_int_equal(pthread_barrier_init(&w.barrier, NULL, (unsigned)k->world), 0);
  rank_job jobs[SYNC_MAX_RANKS];
  pthread_t th[SYNC_MAX_RANKS];
  for (int r = 0; r < k->world; r++) {
    jobs[r] = (rank_job){.w = &w, .rank = r, .d = &d, .op = op};
    jobs[r].comm = (fbn_sync_comm){.world_size = k->world,
                                   .rank = r,
                                   .context = &jobs[r],
                                   .allgather = allgather,
                                   .allreduce_sum = allreduce_sum};
    assert_int_equal(pthread_create(&th[r], NULL, rank_thread, &jobs[r]), 0);
  }
  for (int r = 0; r < k->world; r++)
    pthread_join(th[r], NULL);
  for (int r = 0; r < k->world; r++)
    if (jobs[r].rc != 0)
      fail_msg("%s: rank %d: %s", case_name(k, backend), r, jobs[r].why);
  fbn_op_destroy(op);
  pthread_barrier_destroy(&w.barrier);
  sync_data_free(&d);
}

static uint64_t case_seed(const char *name) {
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, name);
  return ((uint64_t)fbnt_rng_u32(&rng) << 32) | fbnt_rng_u32(&rng);
}

typedef struct shape {
  fbn_layout layout;
  int64_t n0, n1, c, h, w;
} shape;

static void run_shapes(const shape *shapes, size_t count) {
  const fbn_dtype dtypes[] = {FBN_DTYPE_FLOAT64, FBN_DTYPE_FLOAT32, FBN_DTYPE_FLOAT16,
                              FBN_DTYPE_BFLOAT16};
  const char *backends[] = {"reference", "fast"};
  for (size_t s = 0; s < count; s++)
    for (int dt = 0; dt < 4; dt++)
      for (int be = 0; be < 2; be++) {
        const shape *p = &shapes[s];
        sync_case k = {.dtype = dtypes[dt],
                       .layout = p->layout,
                       .operation = (fbn_operation)((s + (size_t)dt + (size_t)be) % 3),
                       .affine = true,
                       .world = 2,
                       .shard_n = {p->n0, p->n1},
                       .c = p->c,
                       .h = p->h,
                       .w = p->w,
                       .steps = 2,
                       .scope = be ? FBN_SYNC_GRAD_GLOBAL : FBN_SYNC_GRAD_LOCAL};
        k.seed = case_seed(case_name(&k, backends[be]));
        run_case(&k, backends[be]);
        if (be == 0) {
          /* one rank on the reference backend: its plain op's results */
          sync_case one = k;
          one.world = 1;
          one.shard_n[0] = p->n0 + p->n1;
          one.shard_n[1] = 0;
          one.scope = FBN_SYNC_GRAD_GLOBAL;
          one.exact = true;
          one.seed = case_seed(case_name(&one, backends[be]));
          run_case(&one, backends[be]);
        }
      }
}

/* NHWC, C = 300: a block of 256 channels and one of 44, rows split over
 * the threads; 7 * 300 * 35 = 73500 elements on rank 0. C = 2100: more
 * channels than the dx pass takes in whole rows (tiles of rows, nine
 * blocks of channels). */
static void test_sync_nhwc_many_channels(void **state) {
  (void)state;
  const shape shapes[] = {{FBN_LAYOUT_NHWC, 7, 2, 300, 5, 7}, {FBN_LAYOUT_NHWC, 3, 1, 2100, 3, 4}};
  run_shapes(shapes, 2);
}

/* NHWC, C = 7: 36 rows per block of 252 slots, 2257 rows per sample (a
 * tail of rows on every thread); NCHW, the same shape: runs of 2257
 * elements (four widening pieces and a tail). */
static void test_sync_few_channels_long_runs(void **state) {
  (void)state;
  const shape shapes[] = {{FBN_LAYOUT_NHWC, 5, 1, 7, 61, 37}, {FBN_LAYOUT_NCHW, 5, 1, 7, 61, 37}};
  run_shapes(shapes, 2);
}

/* NCHW, C = 64 with short runs (7 x 7): threads over (n, c) runs. */
static void test_sync_nchw_short_runs(void **state) {
  (void)state;
  const shape shapes[] = {{FBN_LAYOUT_NCHW, 24, 3, 64, 7, 7}};
  run_shapes(shapes, 1);
}

int main(int argc, char **argv) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_sync_nhwc_many_channels),
      cmocka_unit_test(test_sync_few_channels_long_runs),
      cmocka_unit_test(test_sync_nchw_short_runs),
  };
  if (argc > 1)
    cmocka_set_test_filter(argv[1]);
  return cmocka_run_group_tests_name("sync_shapes", tests, NULL, NULL);
}
