/* A synchronized batch-norm case against the plain op on the whole batch
 * (sync_case.h). */
#include "sync_case.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fbn_testutil.h"
#ifdef SYNC_CASE_MPI
#include "fusedbn/fusedbn_mpi.h"
#endif

double sync_load(const void *p, fbn_dtype dtype, size_t i) { return fbnt_load(dtype, p, i); }

/* Rounded once to dtype (float16/bfloat16 with the library's rule). */
static void sync_store(void *p, fbn_dtype dtype, size_t i, double v) {
  fbnt_store(dtype, p, i, v);
}

double sync_tolerance(fbn_dtype dtype) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT64:
    return 1e-12;
  case FBN_DTYPE_FLOAT16:
    return 2e-3; /* four units of float16's rounding */
  case FBN_DTYPE_BFLOAT16:
    return 1.6e-2;
  case FBN_DTYPE_FLOAT32:
  default:
    return 2e-5;
  }
}

static void *alloc64(size_t bytes) {
  const size_t rounded = (bytes + 63) / 64 * 64;
  void *p = aligned_alloc(64, rounded > 0 ? rounded : 64);
  if (p != NULL)
    memset(p, 0, rounded > 0 ? rounded : 64);
  return p;
}

/* A finite sentinel, not NaN: an output left unwritten where the oracle is
 * NaN must fail the comparison, not pass it. */
#define SYNC_POISON -7777.25

static void poison(void *p, fbn_dtype dtype, size_t count) {
  for (size_t i = 0; i < count; i++)
    sync_store(p, dtype, i, SYNC_POISON);
}

fbn_op *sync_case_op(const sync_case *k, const char *backend, int64_t c) {
  setenv("FBN_CPU_BACKEND", backend, 1);
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = c;
  od.dtype = k->dtype;
  od.param_dtype = k->dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  od.layout = k->layout;
  od.operation = k->operation;
  od.affine = k->affine;
  fbn_op *op = NULL;
  if (fbn_op_create(&od, &op) != FBN_STATUS_SUCCESS)
    op = NULL;
  unsetenv("FBN_CPU_BACKEND");
  return op;
}

static double factor_of(const sync_case *k, int step) {
  return k->cumulative ? 1.0 / (double)(step + 1) : 0.1;
}

int sync_data_make(sync_data *d, const sync_case *k, char *why, size_t why_size) {
  memset(d, 0, sizeof *d);
  d->k = *k;
  for (int r = 0; r < k->world; r++)
    d->n_total += k->shard_n[r];
  d->elem = fbn_dtype_size(k->dtype);
  d->pelem = k->dtype == FBN_DTYPE_FLOAT64 ? 8 : 4;
  d->numel = (size_t)(d->n_total * k->c * k->h * k->w);
  const fbn_dtype pt = k->dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  const size_t tb = d->numel * d->elem, pb = (size_t)k->c * d->pelem;
  fbnt_rng rng;
  fbnt_rng_init(&rng, k->seed, 7);
  d->weight = alloc64(pb);
  d->bias = alloc64(pb);
  d->rm0 = alloc64(pb);
  d->rv0 = alloc64(pb);
  for (int64_t c = 0; c < k->c; c++) {
    sync_store(d->weight, pt, (size_t)c, fbnt_rng_uniform(&rng, 0.5, 1.5));
    sync_store(d->bias, pt, (size_t)c, fbnt_rng_uniform(&rng, -0.5, 0.5));
    sync_store(d->rm0, pt, (size_t)c, fbnt_rng_uniform(&rng, -1.0, 1.0));
    sync_store(d->rv0, pt, (size_t)c, fbnt_rng_uniform(&rng, 0.5, 2.0));
  }
  fbn_op *op = sync_case_op(k, "reference", k->c);
  if (op == NULL) {
    snprintf(why, why_size, "oracle op: %s", fbn_last_error_message());
    return 1;
  }
  const fbn_tensor_desc td =
      fbn_tensor_desc_make(d->n_total, k->c, k->h, k->w, k->dtype, k->layout);
  size_t saved_bytes = 0;
  fbn_op_saved_size(op, &td, &saved_bytes);
  void *saved = alloc64(saved_bytes);
  void *rm = alloc64(pb), *rv = alloc64(pb);
  memcpy(rm, d->rm0, pb);
  memcpy(rv, d->rv0, pb);
  const bool add = k->operation == FBN_OPERATION_BN_ADD_RELU;
  int rc = 0;
  for (int s = 0; s < k->steps && rc == 0; s++) {
    d->x[s] = alloc64(tb);
    d->z[s] = alloc64(tb);
    d->dy[s] = alloc64(tb);
    d->y[s] = alloc64(tb);
    d->dx[s] = alloc64(tb);
    d->dz[s] = alloc64(tb);
    d->rm[s] = alloc64(pb);
    d->rv[s] = alloc64(pb);
    d->dw[s] = alloc64(pb);
    d->db[s] = alloc64(pb);
    for (size_t i = 0; i < d->numel; i++) {
      const int64_t c = k->layout == FBN_LAYOUT_NHWC
                            ? (int64_t)(i % (size_t)k->c)
                            : (int64_t)(i / (size_t)(k->h * k->w) % (size_t)k->c);
      /* channel offsets far from 0: a merge that loses the mean shows */
      sync_store(d->x[s], k->dtype, i,
                 3.0 * (double)c - 4.0 + (0.5 + 0.2 * (double)c) * fbnt_rng_normal(&rng));
      sync_store(d->z[s], k->dtype, i, 0.5 * fbnt_rng_normal(&rng));
      sync_store(d->dy[s], k->dtype, i, fbnt_rng_normal(&rng));
    }
    fbn_status st = fbn_op_forward(op, &td, d->x[s], add ? d->z[s] : NULL, d->y[s],
                                   k->affine ? d->weight : NULL, k->affine ? d->bias : NULL, rm, rv,
                                   factor_of(k, s), saved, saved_bytes, NULL, 0);
    if (st == FBN_STATUS_SUCCESS)
      st = fbn_op_backward(op, &td, d->x[s], d->y[s], d->dy[s], saved, saved_bytes,
                           k->affine ? d->weight : NULL, k->affine ? d->bias : NULL, d->dx[s],
                           add ? d->dz[s] : NULL, k->affine ? d->dw[s] : NULL,
                           k->affine ? d->db[s] : NULL, FBN_PARAM_GRAD_OVERWRITE, NULL, 0);
    if (st != FBN_STATUS_SUCCESS) {
      snprintf(why, why_size, "oracle step %d: %s", s, fbn_last_error_message());
      rc = 1;
    }
    memcpy(d->rm[s], rm, pb);
    memcpy(d->rv[s], rv, pb);
  }
  free(saved);
  free(rm);
  free(rv);
  fbn_op_destroy(op);
  return rc;
}

void sync_data_free(sync_data *d) {
  for (int s = 0; s < SYNC_MAX_STEPS; s++) {
    free(d->x[s]);
    free(d->z[s]);
    free(d->dy[s]);
    free(d->y[s]);
    free(d->dx[s]);
    free(d->dz[s]);
    free(d->rm[s]);
    free(d->rv[s]);
    free(d->dw[s]);
    free(d->db[s]);
  }
  free(d->weight);
  free(d->bias);
  free(d->rm0);
  free(d->rv0);
  memset(d, 0, sizeof *d);
}

/* Every element of got against want; 0 or a message naming the first
 * mismatch. */
static int compare_tol(const char *what, int step, int rank, const void *got, const void *want,
                       fbn_dtype dtype, size_t count, double tol, char *why, size_t why_size) {
  for (size_t i = 0; i < count; i++) {
    const double g = sync_load(got, dtype, i), w = sync_load(want, dtype, i);
    const bool ok = isnan(w) ? isnan(g) : fabs(g - w) <= tol * fmax(1.0, fabs(w));
    if (!ok) {
      snprintf(why, why_size, "rank %d step %d %s[%zu] = %.17g, whole batch %.17g (tol %g)", rank,
               step, what, i, g, w, tol);
      return 1;
    }
  }
  return 0;
}

#define compare(what, step, rank, got, want, dtype, count, why, why_size)                          \
  compare_tol(what, step, rank, got, want, dtype, count, k->exact ? 0.0 : sync_tolerance(dtype),   \
              why, why_size)

/* comm NULL (MPI build of this file): MPI_COMM_WORLD through the MPI
 * adapter. */
#ifdef SYNC_CASE_MPI
#define SYNC_WS_SIZE(op, comm, d, b)                                                               \
  ((comm) != NULL ? fbn_sync_comm_workspace_size(op, d, (comm)->world_size, b)                     \
                  : fbn_mpi_sync_workspace_size(op, MPI_COMM_WORLD, d, b))
#define SYNC_FORWARD(op, comm, ...)                                                                \
  ((comm) != NULL ? fbn_sync_forward(op, comm, __VA_ARGS__)                                        \
                  : fbn_mpi_sync_forward(op, MPI_COMM_WORLD, __VA_ARGS__))
#define SYNC_BACKWARD(op, comm, ...)                                                               \
  ((comm) != NULL ? fbn_sync_backward(op, comm, __VA_ARGS__)                                       \
                  : fbn_mpi_sync_backward(op, MPI_COMM_WORLD, __VA_ARGS__))
#else
#define SYNC_WS_SIZE(op, comm, d, b) fbn_sync_comm_workspace_size(op, d, (comm)->world_size, b)
#define SYNC_FORWARD fbn_sync_forward
#define SYNC_BACKWARD fbn_sync_backward
#endif

int sync_rank_run(const sync_data *d, const fbn_op *op, int rank, const fbn_sync_comm *comm,
                  double *dw_out, double *db_out, char *why, size_t why_size) {
  const sync_case *k = &d->k;
  const fbn_dtype pt = k->dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  int64_t n0 = 0;
  for (int r = 0; r < rank; r++)
    n0 += k->shard_n[r];
  const int64_t n = k->shard_n[rank];
  const size_t per_n = (size_t)(k->c * k->h * k->w);
  const size_t off = (size_t)n0 * per_n * d->elem, count = (size_t)n * per_n;
  const size_t tb = count * d->elem, pb = (size_t)k->c * d->pelem;
  const fbn_tensor_desc sd = fbn_tensor_desc_make(n, k->c, k->h, k->w, k->dtype, k->layout);
  size_t saved_bytes = 0, ws_bytes = 0;
  fbn_status sst = fbn_sync_saved_size(op, &sd, &saved_bytes);
  if (sst == FBN_STATUS_SUCCESS)
    sst = SYNC_WS_SIZE(op, comm, &sd, &ws_bytes);
  if (sst != FBN_STATUS_SUCCESS) {
    snprintf(why, why_size, "rank %d sizes: %s", rank, fbn_last_error_message());
    return 1;
  }
  void *saved = alloc64(saved_bytes), *ws = alloc64(ws_bytes);
  void *y = alloc64(tb), *dx = alloc64(tb), *dz = alloc64(tb);
  void *rm = alloc64(pb), *rv = alloc64(pb), *dw = alloc64(pb), *db = alloc64(pb);
  memcpy(rm, d->rm0, pb);
  memcpy(rv, d->rv0, pb);
  const bool add = k->operation == FBN_OPERATION_BN_ADD_RELU;
  const void *w = k->affine ? d->weight : NULL, *b = k->affine ? d->bias : NULL;
  /* every step runs on every rank whatever it finds (the collectives stay
   * in step); the first mismatch is reported */
  int rc = 0;
  for (int s = 0; s < k->steps; s++) {
    const char *x = (const char *)d->x[s] + off, *z = (const char *)d->z[s] + off;
    const char *dy = (const char *)d->dy[s] + off;
    poison(y, k->dtype, count);
    poison(dx, k->dtype, count);
    poison(dz, k->dtype, count);
    poison(dw, pt, (size_t)k->c);
    poison(db, pt, (size_t)k->c);
    fbn_status st =
        SYNC_FORWARD(op, comm, &sd, n > 0 ? x : NULL, add && n > 0 ? z : NULL, n > 0 ? y : NULL, w,
                     b, rm, rv, factor_of(k, s), saved, saved_bytes, ws, ws_bytes);
    if (st != FBN_STATUS_SUCCESS) {
      if (rc == 0)
        snprintf(why, why_size, "rank %d step %d forward: %s: %s", rank, s, fbn_status_string(st),
                 fbn_last_error_message());
      rc = 1;
    }
    st = SYNC_BACKWARD(op, comm, &sd, n > 0 ? x : NULL, n > 0 ? y : NULL, n > 0 ? dy : NULL, saved,
                       saved_bytes, w, b, n > 0 ? dx : NULL, add && n > 0 ? dz : NULL,
                       k->affine ? dw : NULL, k->affine ? db : NULL, FBN_PARAM_GRAD_OVERWRITE,
                       k->scope, ws, ws_bytes);
    if (st != FBN_STATUS_SUCCESS) {
      if (rc == 0)
        snprintf(why, why_size, "rank %d step %d backward: %s: %s", rank, s, fbn_status_string(st),
                 fbn_last_error_message());
      rc = 1;
    }
    if (rc == 0)
      rc = compare("y", s, rank, y, (const char *)d->y[s] + off, k->dtype, count, why, why_size);
    if (rc == 0)
      rc = compare("dx", s, rank, dx, (const char *)d->dx[s] + off, k->dtype, count, why, why_size);
    if (rc == 0 && add)
      rc = compare("daddend", s, rank, dz, (const char *)d->dz[s] + off, k->dtype, count, why,
                   why_size);
    if (rc == 0)
      rc = compare("running_mean", s, rank, rm, d->rm[s], pt, (size_t)k->c, why, why_size);
    if (rc == 0)
      rc = compare("running_var", s, rank, rv, d->rv[s], pt, (size_t)k->c, why, why_size);
    if (rc == 0 && k->affine) {
      if (k->scope == FBN_SYNC_GRAD_GLOBAL) {
        rc = compare("dweight", s, rank, dw, d->dw[s], pt, (size_t)k->c, why, why_size);
        if (rc == 0)
          rc = compare("dbias", s, rank, db, d->db[s], pt, (size_t)k->c, why, why_size);
      }
      for (int64_t c = 0; c < k->c; c++) {
        if (dw_out != NULL)
          dw_out[s * k->c + c] = sync_load(dw, pt, (size_t)c);
        if (db_out != NULL)
          db_out[s * k->c + c] = sync_load(db, pt, (size_t)c);
      }
    }
  }
  free(saved);
  free(ws);
  free(y);
  free(dx);
  free(dz);
  free(rm);
  free(rv);
  free(dw);
  free(db);
  return rc;
}
