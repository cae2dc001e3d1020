/*
 * One synchronized batch-norm case for the sync suites: the whole batch
 * (fresh random data, every step), the plain op of the float64 reference
 * backend on it (the oracle), and one rank's run of its shard through a
 * callback table (threads in test_sync.c, MPI in test_sync_mpi.c) checked
 * element by element against the oracle's slice.
 */
#ifndef FBN_TESTS_SYNC_CASE_H
#define FBN_TESTS_SYNC_CASE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fusedbn/fusedbn_sync.h"

#define SYNC_MAX_RANKS 8
#define SYNC_MAX_STEPS 4

typedef struct sync_case {
  fbn_dtype dtype;
  fbn_layout layout;
  fbn_operation operation;
  bool affine;
  bool cumulative; /* momentum=None: factor 1 / step */
  int world;
  int64_t shard_n[SYNC_MAX_RANKS]; /* N of each rank (0 allowed) */
  int64_t c, h, w;
  int steps;
  fbn_sync_grad_scope scope;
  uint64_t seed;
  bool exact; /* compare bit for bit (else sync_tolerance()) */
} sync_case;

/* The whole batch of every step and the oracle's results on it. */
typedef struct sync_data {
  sync_case k;
  int64_t n_total;
  size_t elem, pelem, numel;
  void *x[SYNC_MAX_STEPS], *z[SYNC_MAX_STEPS], *dy[SYNC_MAX_STEPS];
  void *y[SYNC_MAX_STEPS], *dx[SYNC_MAX_STEPS], *dz[SYNC_MAX_STEPS];
  void *weight, *bias, *rm0, *rv0;               /* param dtype */
  void *rm[SYNC_MAX_STEPS], *rv[SYNC_MAX_STEPS]; /* after each step */
  void *dw[SYNC_MAX_STEPS], *db[SYNC_MAX_STEPS]; /* whole-batch gradients */
} sync_data;

/* Generate the data and run the oracle (FBN_CPU_BACKEND=reference while
 * its op is created). 0 on success, else a message in why. */
int sync_data_make(sync_data *d, const sync_case *k, char *why, size_t why_size);
void sync_data_free(sync_data *d);

/* The op a rank runs (backend "reference" or "fast"), NULL on failure. */
fbn_op *sync_case_op(const sync_case *k, const char *backend, int64_t c);

/* Rank `rank`'s steps through comm, each output poisoned before and every
 * element checked after; its local (scope LOCAL) or global parameter
 * gradients of each step go to dw_out/db_out (C doubles per step, may be
 * NULL). comm NULL: MPI_COMM_WORLD through the MPI adapter (the build of
 * sync_case.c with SYNC_CASE_MPI). 0 when everything matched, else a message in why. */
int sync_rank_run(const sync_data *d, const fbn_op *op, int rank, const fbn_sync_comm *comm,
                  double *dw_out, double *db_out, char *why, size_t why_size);

/* Tolerance of the comparisons: float64 1e-12, float32 2e-5, float16 2e-3,
 * bfloat16 1.6e-2, relative to max(1, |expected|) (four times it for the
 * ranks' local parameter gradients summed). */
double sync_tolerance(fbn_dtype dtype);

/* Load element i of a dtype array as double. */
double sync_load(const void *p, fbn_dtype dtype, size_t i);

#endif /* FBN_TESTS_SYNC_CASE_H */
