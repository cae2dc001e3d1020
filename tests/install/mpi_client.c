/*
 * A client of the installed MPI adapter: built with only
 * `pkg-config --cflags --libs fusedbn-mpi` (install-test.sh) and run by
 * mpirun with 2 processes. Every rank builds the same whole batch (same
 * seed), runs the plain op on it, and checks that its own shard through
 * fbn_mpi_sync_forward/backward gives the same y, daddend, dx, running
 * statistics and (global) dweight/dbias. Exit status 0 on every rank when
 * every rank passed.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <fusedbn/fusedbn_mpi.h>

enum { C = 3, H = 4, W = 5, HW = H * W, MAX_RANKS = 8 };

static int failures;

#define EXPECT(cond, ...)                                                                          \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      fprintf(stderr, "mpi_client: rank %d: ", rank);                                             \
      fprintf(stderr, __VA_ARGS__);                                                                \
      fprintf(stderr, "\n");                                                                       \
      failures++;                                                                                  \
    }                                                                                              \
  } while (0)

#define EXPECT_OK(call)                                                                      \
  do {                                                                                             \
    fbn_status st_ = (call);                                                                       \
    EXPECT(st_ == FBN_STATUS_SUCCESS, "%s: %s (%s)", #call, fbn_status_string(st_),                \
           fbn_last_error_message());                                                              \
  } while (0)

static uint64_t rng_state = 0x9e3779b97f4a7c15u;

/* Uniform in [0, 1). */
static double next_uniform(void) {
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return (double)((rng_state * 2685821657736338717u) >> 11) * 0x1.0p-53;
}

static void *alloc64(size_t bytes) {
  return aligned_alloc(FBN_OP_MEMORY_ALIGNMENT, (bytes + 63) / 64 * 64 + 64);
}

static int close_to(double got, double want) {
  return fabs(got - want) <= 1e-12 * fmax(1.0, fabs(want));
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  if (world > MAX_RANKS) {
    if (rank == 0)
      fprintf(stderr, "mpi_client: %d ranks: at most %d\n", world, MAX_RANKS);
    MPI_Finalize();
    return 2;
  }

  /* Unequal shards: rank r holds 1 + r % 3 images, starting at first. */
  int64_t total_n = 0, first = 0;
  for (int r = 0; r < world; r++) {
    if (r == rank)
      first = total_n;
    total_n += 1 + r % 3;
  }
  const int64_t n = 1 + rank % 3;
  const size_t whole = (size_t)total_n * C * HW, shard = (size_t)n * C * HW;
  const size_t offset = (size_t)first * C * HW; /* NCHW: a shard is a slice */

  double *x = malloc(whole * sizeof *x), *z = malloc(whole * sizeof *z);
  double *dy = malloc(whole * sizeof *dy), *y_ref = malloc(whole * sizeof *y_ref);
  double *dx_ref = malloc(whole * sizeof *dx_ref), *dz_ref = malloc(whole * sizeof *dz_ref);
  double *y = malloc(shard * sizeof *y), *dx = malloc(shard * sizeof *dx);
  double *dz = malloc(shard * sizeof *dz);
  if (!x || !z || !dy || !y_ref || !dx_ref || !dz_ref || !y || !dx || !dz) {
    fprintf(stderr, "mpi_client: out of memory\n");
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  for (size_t i = 0; i < whole; i++) {
    x[i] = 3.0 * next_uniform() - 1.0 + 0.5 * (double)(i / HW % C);
    z[i] = next_uniform() - 0.5;
    dy[i] = 2.0 * next_uniform() - 1.0;
  }
  double weight[C], bias[C];
  for (int c = 0; c < C; c++) {
    weight[c] = 0.5 + next_uniform();
    bias[c] = next_uniform() - 0.5;
  }

  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = C;
  od.dtype = FBN_DTYPE_FLOAT64;
  od.param_dtype = FBN_DTYPE_FLOAT64;
  fbn_op *op = NULL;
  EXPECT_OK(fbn_op_create(&od, &op));
  if (op == NULL) {
    MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
  double factor = 0.0;
  EXPECT_OK(fbn_running_average_factor(0.1, false, 1, &factor));

  /* The plain op on the whole batch. */
  fbn_tensor_desc wd = fbn_tensor_desc_make(total_n, C, H, W, FBN_DTYPE_FLOAT64, FBN_LAYOUT_NCHW);
  size_t ref_saved = 0, fws = 0, bws = 0;
  EXPECT_OK(fbn_op_saved_size(op, &wd, &ref_saved));
  EXPECT_OK(fbn_op_forward_workspace_size(op, &wd, &fws));
  EXPECT_OK(fbn_op_backward_workspace_size(op, &wd, &bws));
  void *ref_state = alloc64(ref_saved), *ref_ws = alloc64(fws > bws ? fws : bws);
  double rm_ref[C], rv_ref[C], dw_ref[C], db_ref[C];
  for (int c = 0; c < C; c++) {
    rm_ref[c] = 0.0;
    rv_ref[c] = 1.0;
  }
  EXPECT_OK(fbn_op_forward(op, &wd, x, z, y_ref, weight, bias, rm_ref, rv_ref, factor,
                                 ref_state, ref_saved, ref_ws, fws));
  EXPECT_OK(fbn_op_backward(op, &wd, x, y_ref, dy, ref_state, ref_saved, weight, bias,
                                  dx_ref, dz_ref, dw_ref, db_ref, FBN_PARAM_GRAD_OVERWRITE, ref_ws,
                                  bws));

  /* This rank's shard through the MPI adapter, outputs poisoned first. */
  fbn_tensor_desc sd = fbn_tensor_desc_make(n, C, H, W, FBN_DTYPE_FLOAT64, FBN_LAYOUT_NCHW);
  size_t saved_bytes = 0, ws_bytes = 0;
  EXPECT_OK(fbn_sync_saved_size(op, &sd, &saved_bytes));
  EXPECT_OK(fbn_mpi_sync_workspace_size(op, MPI_COMM_WORLD, &sd, &ws_bytes));
  void *saved = alloc64(saved_bytes), *ws = alloc64(ws_bytes);
  double rm[C], rv[C], dw[C], db[C];
  for (int c = 0; c < C; c++) {
    rm[c] = 0.0;
    rv[c] = 1.0;
    dw[c] = db[c] = NAN;
  }
  for (size_t i = 0; i < shard; i++)
    y[i] = dx[i] = dz[i] = NAN;

  /* A bad argument on every rank: a status before any collective, nothing
   * written. */
  fbn_status st = fbn_mpi_sync_forward(op, MPI_COMM_WORLD, &sd, NULL, z + offset, y, weight, bias,
                                       rm, rv, factor, saved, saved_bytes, ws, ws_bytes);
  EXPECT(st == FBN_STATUS_NULL_POINTER, "fbn_mpi_sync_forward with x = NULL: %s, want %s",
         fbn_status_string(st), fbn_status_string(FBN_STATUS_NULL_POINTER));
  EXPECT(strstr(fbn_last_error_message(), "x") != NULL, "message \"%s\" does not name x",
         fbn_last_error_message());
  EXPECT(isnan(y[0]) && rm[0] == 0.0 && rv[0] == 1.0,
         "a failed fbn_mpi_sync_forward wrote y or the running statistics");

  EXPECT_OK(fbn_mpi_sync_forward(op, MPI_COMM_WORLD, &sd, x + offset, z + offset, y, weight,
                                       bias, rm, rv, factor, saved, saved_bytes, ws, ws_bytes));
  EXPECT_OK(fbn_mpi_sync_backward(op, MPI_COMM_WORLD, &sd, x + offset, y, dy + offset,
                                        saved, saved_bytes, weight, bias, dx, dz, dw, db,
                                        FBN_PARAM_GRAD_OVERWRITE, FBN_SYNC_GRAD_GLOBAL, ws,
                                        ws_bytes));

  int bad = 0;
  for (size_t i = 0; i < shard; i++) {
    if (!close_to(y[i], y_ref[offset + i]) && bad++ < 5)
      EXPECT(0, "y[%zu] = %.17g, whole batch %.17g", i, y[i], y_ref[offset + i]);
    if (!close_to(dx[i], dx_ref[offset + i]) && bad++ < 5)
      EXPECT(0, "dx[%zu] = %.17g, whole batch %.17g", i, dx[i], dx_ref[offset + i]);
    if (!(dz[i] == dz_ref[offset + i]) && bad++ < 5)
      EXPECT(0, "daddend[%zu] = %.17g, whole batch %.17g", i, dz[i], dz_ref[offset + i]);
  }
  EXPECT(bad == 0, "%d shard elements differ from the whole batch's", bad);
  for (int c = 0; c < C; c++) {
    EXPECT(close_to(rm[c], rm_ref[c]) && close_to(rv[c], rv_ref[c]),
           "running mean/var[%d] = %.17g/%.17g, whole batch %.17g/%.17g", c, rm[c], rv[c],
           rm_ref[c], rv_ref[c]);
    EXPECT(close_to(dw[c], dw_ref[c]) && close_to(db[c], db_ref[c]),
           "global dweight/dbias[%d] = %.17g/%.17g, whole batch %.17g/%.17g", c, dw[c], db[c],
           dw_ref[c], db_ref[c]);
  }

  fbn_op_destroy(op);
  free(saved);
  free(ws);
  free(ref_state);
  free(ref_ws);
  free(x);
  free(z);
  free(dy);
  free(y_ref);
  free(dx_ref);
  free(dz_ref);
  free(y);
  free(dx);
  free(dz);

  int all = 0;
  MPI_Allreduce(&failures, &all, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0) {
    if (all == 0)
      printf("mpi_client: OK (%d ranks, whole batch of %lld)\n", world, (long long)total_n);
    else
      fprintf(stderr, "mpi_client: %d check(s) failed over %d ranks\n", all, world);
  }
  MPI_Finalize();
  return all == 0 ? 0 : 1;
}
