/*
 * Synchronized batch norm through the MPI adapter: run by mpirun with 2 or
 * 3 processes. Every process builds the same whole batch (same seed) and
 * runs the plain op of the reference backend on it; rank r runs its shard
 * (unequal shards, one of N = 1, the last rank of three empty) through
 * fbn_mpi_sync_forward/backward and checks its slice; the ranks' local
 * dweight/dbias are summed with MPI_Allreduce and checked against the whole
 * batch's. Every dtype, layout and operation, momentum and the cumulative
 * average, three steps. Exit status 0 on every rank when every rank passed.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fusedbn/fusedbn_mpi.h"
#include "sync_case.h"

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
  int all = 0;
  MPI_Allreduce(&failures, &all, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0)
    printf("%d ranks: %d cases, %d failures over all ranks\n", world, cases, all);
  MPI_Finalize();
  return all == 0 ? 0 : 1;
}
