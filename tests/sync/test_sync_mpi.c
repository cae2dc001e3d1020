/*
 * Synchronized batch norm through the MPI adapter: run by mpirun with 2 or
 * 3 processes. Every process builds the same whole batch (same seed) and
 * runs the plain op of the reference backend on it; rank r runs its shard
 * (unequal shards, one of N = 1, the last rank of three empty) through
 * fbn_mpi_sync_forward/backward and checks its slice; the ranks' local
 * dweight/dbias are summed with MPI_Allreduce and checked against the whole
 * batch's. Every dtype, layout and operation, momentum and the cumulative
 * average, three steps; then one rank's own failure and C disagreeing in the
 * backward, a status on every rank (fail_checks). Exit status 0 on every
 * rank when every rank passed.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fusedbn/fusedbn_mpi.h"
#include "sync_case.h"

/* Failures that every rank must see, under MPI_ERRORS_RETURN: the last
 * rank alone passes too small a workspace to the forward (it returns
 * INSUFFICIENT_WORKSPACE, the others the same status naming it), then the
 * ranks' C differs (2, 4, 3) in the backward of forwards run alone on
 * MPI_COMM_SELF (SHAPE_MISMATCH on every rank). Running statistics, dx and
 * dweight/dbias untouched. 0 when this rank saw what it should. */
static int fail_checks(int rank, int world, char *why, size_t why_size) {
  static const int64_t cs[] = {2, 4, 3};
  const int64_t c = world == 1 ? 3 : cs[rank % 3];
  sync_case k = {.dtype = FBN_DTYPE_FLOAT32,
                 .layout = FBN_LAYOUT_NCHW,
                 .operation = FBN_OPERATION_BN_RELU,
                 .affine = true};
  fbn_op *op = sync_case_op(&k, "fast", c);
  if (op == NULL) {
    snprintf(why, why_size, "op: %s", fbn_last_error_message());
    return 1;
  }
  const fbn_tensor_desc d = fbn_tensor_desc_make(2, c, 3, 2, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  const size_t numel = (size_t)(2 * c * 3 * 2);
  size_t saved_bytes = 0, ws_bytes = 0;
  fbn_sync_saved_size(op, &d, &saved_bytes);
  fbn_mpi_sync_workspace_size(op, MPI_COMM_WORLD, &d, &ws_bytes);
  void *saved = aligned_alloc(64, (saved_bytes + 63) / 64 * 64);
  void *ws = aligned_alloc(64, (ws_bytes + 63) / 64 * 64);
  float x[64], y[64], dy[64], dx[64], wt[4], bs[4], rm[4], rv[4], dw[4], db[4];
  for (size_t i = 0; i < numel; i++) {
    x[i] = (float)sin(1.0 + (double)i * (rank + 1));
    dy[i] = (float)cos(0.5 * (double)i);
    y[i] = dx[i] = -777.0f;
  }
  for (int64_t i = 0; i < c; i++) {
    wt[i] = 1.0f;
    bs[i] = 0.5f;
    rm[i] = 0.25f;
    rv[i] = 2.0f;
    dw[i] = 7.0f;
    db[i] = -3.0f;
  }
  int rc = 0;
  /* one rank's own failure: every rank gets a status */
  const bool bad = rank == world - 1;
  fbn_status st = fbn_mpi_sync_forward(op, MPI_COMM_WORLD, &d, x, NULL, y, wt, bs, rm, rv, 0.1,
                                       saved, saved_bytes, ws, bad ? 64 : ws_bytes);
  char named[64];
  snprintf(named, sizeof named, "rank %d failed with FBN_STATUS_INSUFFICIENT_WORKSPACE",
           world - 1);
  if (world > 1 && (st != FBN_STATUS_INSUFFICIENT_WORKSPACE ||
                    (!bad && strstr(fbn_last_error_message(), named) == NULL))) {
    snprintf(why, why_size, "one rank's small workspace: %s: %s", fbn_status_string(st),
             fbn_last_error_message());
    rc = 1;
  }
  for (int64_t i = 0; i < c && rc == 0; i++)
    if (rm[i] != 0.25f || rv[i] != 2.0f || y[i] != -777.0f) {
      snprintf(why, why_size, "one rank's small workspace: state written");
      rc = 1;
    }
  /* C disagreeing in the backward */
  st = fbn_mpi_sync_forward(op, MPI_COMM_SELF, &d, x, NULL, y, wt, bs, rm, rv, 0.1, saved,
                            saved_bytes, ws, ws_bytes);
  if (rc == 0 && st != FBN_STATUS_SUCCESS) {
    snprintf(why, why_size, "forward alone: %s", fbn_last_error_message());
    rc = 1;
  }
  st = fbn_mpi_sync_backward(op, MPI_COMM_WORLD, &d, x, y, dy, saved, saved_bytes, wt, bs, dx, NULL,
                             dw, db, FBN_PARAM_GRAD_ACCUMULATE, FBN_SYNC_GRAD_LOCAL, ws, ws_bytes);
  if (rc == 0 && world > 1 &&
      (st != FBN_STATUS_SHAPE_MISMATCH || strstr(fbn_last_error_message(), "has C = ") == NULL)) {
    snprintf(why, why_size, "backward, C disagreeing: %s: %s", fbn_status_string(st),
             fbn_last_error_message());
    rc = 1;
  }
  for (int64_t i = 0; i < c && rc == 0 && world > 1; i++)
    if (dw[i] != 7.0f || db[i] != -3.0f || dx[i] != -777.0f) {
      snprintf(why, why_size, "backward, C disagreeing: gradients written");
      rc = 1;
    }
  free(saved);
  free(ws);
  fbn_op_destroy(op);
  return rc;
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  static const int64_t shards3[] = {1, 5, 0}, shards2[] = {1, 5};
  int failures = 0, cases = 0;
  for (int dt = 0; dt < 2; dt++)
    for (int lay = 0; lay < 2; lay++)
      for (int opn = 0; opn < 3; opn++)
        for (int cum = 0; cum < 2; cum++) {
          sync_case k = {.dtype = dt ? FBN_DTYPE_FLOAT32 : FBN_DTYPE_FLOAT64,
                         .layout = lay ? FBN_LAYOUT_NHWC : FBN_LAYOUT_NCHW,
                         .operation = (fbn_operation)opn,
                         .affine = true,
                         .cumulative = cum == 1,
                         .world = world,
                         .c = 6,
                         .h = 4,
                         .w = 3,
                         .steps = 3,
                         .scope = FBN_SYNC_GRAD_LOCAL,
                         .seed = 1234 + (uint64_t)(((dt * 2 + lay) * 3 + opn) * 2 + cum)};
          for (int r = 0; r < world && r < SYNC_MAX_RANKS; r++)
            k.shard_n[r] = world == 3 ? shards3[r] : world == 2 ? shards2[r] : 2 + r;
          char why[512] = "";
          sync_data d;
          int rc = sync_data_make(&d, &k, why, sizeof why);
          fbn_op *op = rc == 0 ? sync_case_op(&k, "fast", k.c) : NULL;
          double dw[SYNC_MAX_STEPS * 6] = {0}, db[SYNC_MAX_STEPS * 6] = {0};
          if (op == NULL && rc == 0) {
            snprintf(why, sizeof why, "op: %s", fbn_last_error_message());
            rc = 1;
          }
          if (rc == 0) /* NULL comm: fbn_mpi_sync_* on MPI_COMM_WORLD */
            rc = sync_rank_run(&d, op, rank, NULL, dw, db, why, sizeof why);
          {
            /* on every rank, whatever it found: collectives stay in step */
            double sw[SYNC_MAX_STEPS * 6], sb[SYNC_MAX_STEPS * 6];
            MPI_Allreduce(dw, sw, k.steps * 6, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
            MPI_Allreduce(db, sb, k.steps * 6, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
            const fbn_dtype pt = k.dtype;
            const double tol = 4 * sync_tolerance(k.dtype);
            for (int i = 0; i < k.steps * 6 && rc == 0 && op != NULL; i++) {
              const double ww = sync_load(d.dw[i / 6], pt, (size_t)(i % 6));
              const double wb = sync_load(d.db[i / 6], pt, (size_t)(i % 6));
              if (!(fabs(sw[i] - ww) <= tol * fmax(1.0, fabs(ww))) ||
                  !(fabs(sb[i] - wb) <= tol * fmax(1.0, fabs(wb)))) {
                snprintf(why, sizeof why,
                         "step %d channel %d: summed dweight %.17g dbias %.17g, "
                         "whole batch %.17g %.17g",
                         i / 6, i % 6, sw[i], sb[i], ww, wb);
                rc = 1;
              }
            }
          }
          if (rc != 0) {
            fprintf(stderr, "rank %d/%d: case dtype=%d layout=%d op=%d cumulative=%d: %s\n", rank,
                    world, dt, lay, opn, cum, why);
            failures++;
          }
          cases++;
          fbn_op_destroy(op);
          sync_data_free(&d);
        }
  {
    char why[512] = "";
    if (fail_checks(rank, world, why, sizeof why) != 0) {
      fprintf(stderr, "rank %d/%d: failures seen on every rank: %s\n", rank, world, why);
      failures++;
    }
    cases++;
  }
  int all = 0;
  MPI_Allreduce(&failures, &all, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0)
    printf("%d ranks: %d cases, %d failures over all ranks\n", world, cases, all);
  MPI_Finalize();
  return all == 0 ? 0 : 1;
}
