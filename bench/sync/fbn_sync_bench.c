/*
 * fbn-sync-bench: a synchronized training step (fbn_mpi_sync_forward +
 * fbn_mpi_sync_backward) against the local one (fbn_op_forward +
 * fbn_op_backward) on the same shard, run by mpirun with W ranks.
 *
 * The batch of each --shape (N, C, H, W: the whole batch) is split over the
 * ranks (rank r holds N / W images, one more for r < N % W); every rank
 * times both steps on its shard: float32, y = ReLU(BN(x) + addend), affine,
 * batch statistics with the running update, the backward writing dx,
 * daddend and this shard's dweight/dbias (FBN_SYNC_GRAD_LOCAL: data-parallel
 * wrappers reduce parameter gradients themselves). The local step is what
 * each rank would run without synchronization (its own shard's statistics).
 *
 * Each repetition: for each kind of step (local, synchronized; the order
 * alternates between repetitions) a cache eviction (untimed, every rank),
 * MPI_Barrier, then the forward and the backward timed on every rank. A
 * repetition's time is the max over the ranks (the job waits for the
 * slowest rank); the figure is the median over repetitions.
 *
 * Bytes exchanged per step and rank, from the record sizes of
 * <fusedbn/fusedbn_sync.h>: the forward all-gathers the 64-byte check
 * headers, then the statistics records (fbn_sync_stats_record_size(), 64 +
 * 16 C bytes); the backward all-gathers the 64-byte check headers, then
 * all-reduces (sums) fbn_sync_grad_record_size() = (4 + 2 C) * 8 bytes:
 * W (64 + 64 + 16 C + 64) bytes gathered on every rank and (4 + 2 C) * 8
 * reduced. With W = 1 the collectives run but nothing leaves
 * the process.
 *
 * The library's threads: whatever OMP_NUM_THREADS says (scripts/sync-bench
 * sets 1 per rank).
 *
 * Output (rank 0): CSV on stdout, "# ..." lines are comments.
 *   world,layout,n,c,h,w,shard_n,kind,fwd_ms,bwd_ms,step_ms,reps,
 *   allgather_bytes,allreduce_bytes
 * (kind local or sync; n is the whole batch, shard_n rank 0's shard; the
 * byte columns are 0 for local.)
 *
 * --phases: the synchronized step as its split phases instead (where its
 * time goes), each the median over repetitions of its max over the ranks:
 *   world,layout,n,c,h,w,shard_n,phase,ms,reps
 */
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mpi.h>

#include "fusedbn/fusedbn.h"
#include "fusedbn/fusedbn_mpi.h"
#include "fusedbn/fusedbn_sync.h"

#include "bench_common.h"

/* The check header all-gathered alone before the records (docs/sync.md). */
#define SYNC_CHECK_HEADER_BYTES 64

typedef struct sync_shape {
  int64_t n, c, h, w;
} sync_shape;

/* ResNet-50's batch-norm shapes at batch 32 (one per stage width), as in
 * bench/peers. */
static const sync_shape resnet50_shapes[] = {
    {32, 64, 56, 56}, {32, 256, 56, 56}, {32, 512, 28, 28}, {32, 1024, 14, 14}, {32, 2048, 7, 7},
};
static const sync_shape quick_shapes[] = {{8, 16, 7, 7}, {4, 32, 5, 6}};

enum { MAX_SHAPES = 16 };

typedef struct sync_config {
  sync_shape shapes[MAX_SHAPES];
  int shape_count;
  bool nchw, nhwc;
  int reps, warmup;
  bool phases;
  size_t evict_bytes;
} sync_config;

static int rank_id, world_size;

__attribute__((format(printf, 1, 2), noreturn)) static void die(const char *fmt, ...) {
  fprintf(stderr, "fbn-sync-bench: rank %d: ", rank_id);
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\n");
  MPI_Abort(MPI_COMM_WORLD, 1);
  exit(1);
}

static void check(fbn_status st, const char *call) {
  if (st != FBN_STATUS_SUCCESS) {
    fprintf(stderr, "fbn-sync-bench: rank %d: %s: %s (%s)\n", rank_id, call,
            fbn_status_string(st), fbn_last_error_message());
    MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
  }
}

static void usage(FILE *f) {
  fprintf(f,
          "usage: mpirun -np W fbn-sync-bench [--shape N,C,H,W]... [--layout nchw|nhwc|both]\n"
          "                [--reps R] [--warmup K] [--evict-mib M] [--quick] [--phases]\n"
          "Synchronized (fbn_mpi_sync_forward/backward) against local (fbn_op_forward/backward)\n"
          "training steps on each rank's shard of the batch N. Default: ResNet-50's batch-32\n"
          "batch-norm shapes, both layouts, 15 repetitions after 2 warm-up steps, 64 MiB\n"
          "evicted before every step. CSV on stdout (rank 0).\n"
          "--phases: instead, the synchronized step's split phases (fbn_sync_stats, the\n"
          "all-gather, fbn_sync_combine, fbn_sync_apply, fbn_sync_backward_reduce, the\n"
          "all-reduce, fbn_sync_backward_apply), each timed on every rank.\n");
}

static void parse_args(int argc, char **argv, sync_config *cfg) {
  memset(cfg, 0, sizeof *cfg);
  cfg->nchw = cfg->nhwc = true;
  cfg->reps = 15;
  cfg->warmup = 2;
  cfg->evict_bytes = (size_t)64 << 20;
  bool quick = false;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      if (rank_id == 0)
        usage(stdout);
      MPI_Finalize();
      exit(0);
    } else if (strcmp(a, "--quick") == 0) {
      quick = true;
    } else if (strcmp(a, "--phases") == 0) {
      cfg->phases = true;
    } else if (v == NULL) {
      if (rank_id == 0)
        usage(stderr);
      die("%s: needs a value", a);
    } else if (strcmp(a, "--shape") == 0) {
      int64_t dims[4];
      const char *p = v;
      for (int d = 0; d < 4; d++) {
        char *end = NULL;
        const long long x = strtoll(p, &end, 10);
        if (end == p || x < 1 || x > (1LL << 31) || *end != (d < 3 ? ',' : '\0'))
          die("--shape %s: want N,C,H,W, each in [1, 2^31]", v);
        dims[d] = x;
        p = end + 1;
      }
      if (cfg->shape_count == MAX_SHAPES)
        die("--shape %s: at most 16 shapes", v);
      cfg->shapes[cfg->shape_count++] = (sync_shape){dims[0], dims[1], dims[2], dims[3]};
      i++;
    } else if (strcmp(a, "--layout") == 0) {
      cfg->nchw = strcmp(v, "nchw") == 0 || strcmp(v, "both") == 0;
      cfg->nhwc = strcmp(v, "nhwc") == 0 || strcmp(v, "both") == 0;
      if (!cfg->nchw && !cfg->nhwc)
        die("--layout %s: nchw, nhwc or both", v);
      i++;
    } else if (strcmp(a, "--reps") == 0 || strcmp(a, "--warmup") == 0 ||
               strcmp(a, "--evict-mib") == 0) {
      char *end = NULL;
      const long x = strtol(v, &end, 10);
      if (end == v || *end != '\0' || x < 0 || x > 100000 || (a[2] == 'r' && x < 1))
        die("bad value of %s (an integer: reps >= 1, warmup and evict-mib >= 0)", a);
      if (a[2] == 'r')
        cfg->reps = (int)x;
      else if (a[2] == 'w')
        cfg->warmup = (int)x;
      else
        cfg->evict_bytes = (size_t)x << 20;
      i++;
    } else {
      if (rank_id == 0)
        usage(stderr);
      die("unknown argument %s", a);
    }
  }
  if (cfg->shape_count == 0) {
    const sync_shape *s = quick ? quick_shapes : resnet50_shapes;
    const int count = quick ? (int)(sizeof quick_shapes / sizeof quick_shapes[0])
                            : (int)(sizeof resnet50_shapes / sizeof resnet50_shapes[0]);
    for (int i = 0; i < count; i++)
      cfg->shapes[cfg->shape_count++] = s[i];
  }
}

/* FBN_OP_MEMORY_ALIGNMENT-aligned, every page written (a first-touch page
 * fault must not land in a timed region); at least one page. */
static void *alloc_touched(size_t bytes) { return bench_alloc_touched(bytes > 0 ? bytes : 1); }

/* One rank's buffers of one shape and layout: inputs, outputs shared by the
 * two kinds of step, saved state and workspace of each. */
typedef struct sync_case {
  fbn_op *op;
  fbn_tensor_desc d;
  size_t elems;
  float *x, *z, *dy, *y, *dx, *dz;
  float *weight, *bias, *rm, *rv, *dw, *db;
  void *local_saved, *local_ws, *sync_saved, *sync_ws;
  size_t local_saved_bytes, local_fws, local_bws, sync_saved_bytes, sync_ws_bytes;
  void *phase_ws;
  size_t sync_phase_ws_bytes; /* fbn_sync_workspace_size: the split phases' */
} sync_case;

static void case_init(sync_case *k, const sync_shape *s, fbn_layout layout, int64_t shard_n,
                      uint64_t seed) {
  memset(k, 0, sizeof *k);
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = s->c;
  od.layout = layout;
  od.operation = FBN_OPERATION_BN_ADD_RELU;
  check(fbn_op_create(&od, &k->op), "fbn_op_create");
  k->d = fbn_tensor_desc_make(shard_n, s->c, s->h, s->w, FBN_DTYPE_FLOAT32, layout);
  k->elems = (size_t)shard_n * (size_t)(s->c * s->h * s->w);
  const size_t tb = k->elems * sizeof(float), pb = (size_t)s->c * sizeof(float);
  float **tensors[] = {&k->x, &k->z, &k->dy, &k->y, &k->dx, &k->dz};
  for (size_t i = 0; i < sizeof tensors / sizeof tensors[0]; i++)
    *tensors[i] = alloc_touched(tb);
  float **params[] = {&k->weight, &k->bias, &k->rm, &k->rv, &k->dw, &k->db};
  for (size_t i = 0; i < sizeof params / sizeof params[0]; i++)
    *params[i] = alloc_touched(pb);
  bench_rng rng;
  bench_rng_seed(&rng, seed);
  bench_fill_float(k->x, k->elems, 0.5, 2.0, &rng);
  bench_fill_float(k->z, k->elems, 0.0, 0.5, &rng);
  bench_fill_float(k->dy, k->elems, 0.0, 1.0, &rng);
  bench_fill_float(k->weight, (size_t)s->c, 1.0, 0.5, &rng);
  bench_fill_float(k->bias, (size_t)s->c, 0.0, 0.5, &rng);
  for (int64_t c = 0; c < s->c; c++) {
    k->rm[c] = 0.0f;
    k->rv[c] = 1.0f;
  }
  check(fbn_op_saved_size(k->op, &k->d, &k->local_saved_bytes), "fbn_op_saved_size");
  check(fbn_op_forward_workspace_size(k->op, &k->d, &k->local_fws),
        "fbn_op_forward_workspace_size");
  check(fbn_op_backward_workspace_size(k->op, &k->d, &k->local_bws),
        "fbn_op_backward_workspace_size");
  check(fbn_sync_saved_size(k->op, &k->d, &k->sync_saved_bytes), "fbn_sync_saved_size");
  check(fbn_mpi_sync_workspace_size(k->op, MPI_COMM_WORLD, &k->d, &k->sync_ws_bytes),
        "fbn_mpi_sync_workspace_size");
  k->local_saved = alloc_touched(k->local_saved_bytes);
  k->local_ws = alloc_touched(k->local_fws > k->local_bws ? k->local_fws : k->local_bws);
  k->sync_saved = alloc_touched(k->sync_saved_bytes);
  k->sync_ws = alloc_touched(k->sync_ws_bytes);
  check(fbn_sync_workspace_size(k->op, &k->d, &k->sync_phase_ws_bytes), "fbn_sync_workspace_size");
  k->phase_ws = alloc_touched(k->sync_phase_ws_bytes);
}

static void case_fini(sync_case *k) {
  void *p[] = {k->x,  k->z,  k->dy, k->y,  k->dx, k->dz, k->weight, k->bias, k->rm, k->rv,
               k->dw, k->db, k->local_saved, k->local_ws, k->sync_saved, k->sync_ws,
               k->phase_ws};
  for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
    bench_free(p[i]);
  fbn_op_destroy(k->op);
}

/* One training step of kind sync (or local): forward, backward; the two
 * times in t[0], t[1]. */
static void step(sync_case *k, bool sync, double factor, double t[2]) {
  const int64_t n = k->d.n;
  const void *x = n > 0 ? k->x : NULL, *z = n > 0 ? k->z : NULL, *dy = n > 0 ? k->dy : NULL;
  void *y = n > 0 ? k->y : NULL, *dx = n > 0 ? k->dx : NULL, *dz = n > 0 ? k->dz : NULL;
  const double t0 = bench_now_s();
  if (sync)
    check(fbn_mpi_sync_forward(k->op, MPI_COMM_WORLD, &k->d, x, z, y, k->weight, k->bias, k->rm,
                               k->rv, factor, k->sync_saved, k->sync_saved_bytes, k->sync_ws,
                               k->sync_ws_bytes),
          "fbn_mpi_sync_forward");
  else
    check(fbn_op_forward(k->op, &k->d, x, z, y, k->weight, k->bias, k->rm, k->rv, factor,
                         k->local_saved, k->local_saved_bytes, k->local_ws, k->local_fws),
          "fbn_op_forward");
  const double t1 = bench_now_s();
  if (sync)
    check(fbn_mpi_sync_backward(k->op, MPI_COMM_WORLD, &k->d, x, y, dy, k->sync_saved,
                                k->sync_saved_bytes, k->weight, k->bias, dx, dz, k->dw, k->db,
                                FBN_PARAM_GRAD_OVERWRITE, FBN_SYNC_GRAD_LOCAL, k->sync_ws,
                                k->sync_ws_bytes),
          "fbn_mpi_sync_backward");
  else
    check(fbn_op_backward(k->op, &k->d, x, y, dy, k->local_saved, k->local_saved_bytes, k->weight,
                          k->bias, dx, dz, k->dw, k->db, FBN_PARAM_GRAD_OVERWRITE, k->local_ws,
                          k->local_bws),
          "fbn_op_backward");
  const double t2 = bench_now_s();
  t[0] = t1 - t0;
  t[1] = t2 - t1;
}

static int64_t shard_of(int64_t n, int r) {
  return n / world_size + (r < n % world_size ? 1 : 0);
}

enum { PHASES = 7 };
static const char *const phase_names[PHASES] = {
    "stats", "allgather", "combine", "apply", "backward_reduce", "allreduce", "backward_apply"};

/* The synchronized step as its split phases, each timed (t[PHASES]); the
 * collectives are MPI's own on the records (the adapter also all-gathers the
 * 64-byte check headers first). */
static void phase_step(sync_case *k, double factor, void *records, size_t rec_bytes,
                       double *mean, double *var, double *grad, size_t grad_bytes,
                       double t[PHASES]) {
  const int64_t n = k->d.n;
  const void *x = n > 0 ? k->x : NULL, *z = n > 0 ? k->z : NULL, *dy = n > 0 ? k->dy : NULL;
  void *y = n > 0 ? k->y : NULL, *dx = n > 0 ? k->dx : NULL, *dz = n > 0 ? k->dz : NULL;
  char *mine = (char *)records + (size_t)rank_id * rec_bytes;
  double c[PHASES + 1];
  c[0] = bench_now_s();
  check(fbn_sync_stats(k->op, &k->d, x, mine, rec_bytes), "fbn_sync_stats");
  c[1] = bench_now_s();
  if (MPI_Allgather(MPI_IN_PLACE, 0, MPI_BYTE, records, (int)rec_bytes, MPI_BYTE,
                    MPI_COMM_WORLD) != MPI_SUCCESS)
    die("%s failed", "MPI_Allgather");
  c[2] = bench_now_s();
  check(fbn_sync_combine(k->op, records, world_size, rec_bytes, mean, var, k->rm, k->rv, factor,
                         NULL),
        "fbn_sync_combine");
  c[3] = bench_now_s();
  check(fbn_sync_apply(k->op, &k->d, x, z, y, k->weight, k->bias, mean, var, k->sync_saved,
                       k->sync_saved_bytes, k->phase_ws, k->sync_phase_ws_bytes),
        "fbn_sync_apply");
  c[4] = bench_now_s();
  check(fbn_sync_backward_reduce(k->op, &k->d, x, y, dy, k->sync_saved, k->sync_saved_bytes,
                                 k->weight, k->bias, grad, grad_bytes, k->dw, k->db,
                                 FBN_PARAM_GRAD_OVERWRITE, k->phase_ws, k->sync_phase_ws_bytes),
        "fbn_sync_backward_reduce");
  c[5] = bench_now_s();
  if (MPI_Allreduce(MPI_IN_PLACE, grad, (int)(grad_bytes / sizeof(double)), MPI_DOUBLE, MPI_SUM,
                    MPI_COMM_WORLD) != MPI_SUCCESS)
    die("%s failed", "MPI_Allreduce");
  c[6] = bench_now_s();
  check(fbn_sync_backward_apply(k->op, &k->d, x, y, dy, k->sync_saved, k->sync_saved_bytes,
                                k->weight, k->bias, grad, grad_bytes, dx, dz, NULL, NULL,
                                FBN_PARAM_GRAD_OVERWRITE, k->phase_ws, k->sync_phase_ws_bytes),
        "fbn_sync_backward_apply");
  c[7] = bench_now_s();
  for (int p = 0; p < PHASES; p++)
    t[p] = c[p + 1] - c[p];
}

static void run_phases(const sync_config *cfg, sync_case *k, const sync_shape *s,
                       fbn_layout layout, double factor, const bench_evict *evict) {
  size_t rec = 0, grad_bytes = 0;
  check(fbn_sync_stats_record_size(k->op, &rec), "fbn_sync_stats_record_size");
  check(fbn_sync_grad_record_size(k->op, &grad_bytes), "fbn_sync_grad_record_size");
  void *records = alloc_touched((size_t)world_size * rec);
  double *grad = alloc_touched(grad_bytes), *mean = alloc_touched((size_t)s->c * sizeof(double));
  double *var = alloc_touched((size_t)s->c * sizeof(double));
  const int reps = cfg->reps;
  double *mine = calloc((size_t)reps * PHASES, sizeof *mine);
  double *worst = calloc((size_t)reps * PHASES, sizeof *worst);
  double *col = malloc((size_t)reps * sizeof *col);
  if (mine == NULL || worst == NULL || col == NULL)
    die("%s", "out of memory");
  for (int i = -cfg->warmup; i < reps; i++) {
    bench_evict_run(evict);
    MPI_Barrier(MPI_COMM_WORLD);
    double t[PHASES];
    phase_step(k, factor, records, rec, mean, var, grad, grad_bytes, t);
    if (i >= 0)
      memcpy(mine + (size_t)i * PHASES, t, sizeof t);
  }
  MPI_Reduce(mine, worst, reps * PHASES, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
  if (rank_id == 0)
    for (int p = 0; p < PHASES; p++) {
      for (int i = 0; i < reps; i++)
        col[i] = worst[(size_t)i * PHASES + (size_t)p];
      printf("%d,%s,%lld,%lld,%lld,%lld,%lld,%s,%.4f,%d\n", world_size,
             layout == FBN_LAYOUT_NCHW ? "nchw" : "nhwc", (long long)s->n, (long long)s->c,
             (long long)s->h, (long long)s->w, (long long)shard_of(s->n, 0), phase_names[p],
             1e3 * bench_median(col, reps), reps);
    }
  fflush(stdout);
  free(mine);
  free(worst);
  free(col);
  bench_free(records);
  bench_free(grad);
  bench_free(mean);
  bench_free(var);
}

static void run_case(const sync_config *cfg, const sync_shape *s, fbn_layout layout,
                     const bench_evict *evict) {
  sync_case k;
  case_init(&k, s, layout, shard_of(s->n, rank_id), 0x5eed0000u + (uint64_t)rank_id);
  double factor = 0.0;
  check(fbn_running_average_factor(0.1, false, 1, &factor), "fbn_running_average_factor");
  if (cfg->phases) {
    run_phases(cfg, &k, s, layout, factor, evict);
    case_fini(&k);
    return;
  }

  /* times[rep][kind][pass]: kind 0 local, 1 sync; pass 0 forward, 1 backward, 2 step */
  const int reps = cfg->reps;
  double *mine = calloc((size_t)reps * 6, sizeof *mine);
  double *worst = calloc((size_t)reps * 6, sizeof *worst);
  if (mine == NULL || worst == NULL)
    die("%s", "out of memory");
  for (int i = -cfg->warmup; i < reps; i++)
    for (int j = 0; j < 2; j++) {
      const int kind = (i & 1) ? 1 - j : j; /* alternate which kind goes first */
      bench_evict_run(evict);
      MPI_Barrier(MPI_COMM_WORLD);
      double t[2];
      step(&k, kind == 1, factor, t);
      if (i >= 0) {
        double *m = mine + (size_t)i * 6 + (size_t)kind * 3;
        m[0] = t[0];
        m[1] = t[1];
        m[2] = t[0] + t[1];
      }
    }
  MPI_Reduce(mine, worst, reps * 6, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);

  size_t rec = 0, grad = 0;
  check(fbn_sync_stats_record_size(k.op, &rec), "fbn_sync_stats_record_size");
  check(fbn_sync_grad_record_size(k.op, &grad), "fbn_sync_grad_record_size");
  /* forward: W headers + W records; backward: W headers before the all-reduce */
  const size_t gathered = (size_t)world_size * (2 * SYNC_CHECK_HEADER_BYTES + rec);
  if (rank_id == 0) {
    double *col = malloc((size_t)reps * sizeof *col);
    if (col == NULL)
      die("%s", "out of memory");
    for (int kind = 0; kind < 2; kind++) {
      double med[3];
      for (int p = 0; p < 3; p++) {
        for (int i = 0; i < reps; i++)
          col[i] = worst[(size_t)i * 6 + (size_t)kind * 3 + (size_t)p];
        med[p] = 1e3 * bench_median(col, reps);
      }
      printf("%d,%s,%lld,%lld,%lld,%lld,%lld,%s,%.4f,%.4f,%.4f,%d,%zu,%zu\n", world_size,
             layout == FBN_LAYOUT_NCHW ? "nchw" : "nhwc", (long long)s->n, (long long)s->c,
             (long long)s->h, (long long)s->w, (long long)shard_of(s->n, 0),
             kind ? "sync" : "local", med[0], med[1], med[2], reps, kind ? gathered : (size_t)0,
             kind ? grad : (size_t)0);
    }
    fflush(stdout);
    free(col);
  }
  free(mine);
  free(worst);
  case_fini(&k);
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_id);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  sync_config cfg;
  parse_args(argc, argv, &cfg);
  for (int i = 0; i < cfg.shape_count; i++)
    if (cfg.shapes[i].n < 2 || cfg.shapes[i].n < world_size)
      die("%s: a batch of at least 2 images and at least one per rank (the local step needs "
          "one)",
          "--shape");

  if (rank_id == 0) {
    char line[512];
    bench_machine_line(line, sizeof line);
    printf("# fbn-sync-bench: %d MPI rank(s), %d OpenMP thread(s) per rank; %s\n", world_size,
           bench_threads(), line);
    printf("# reps=%d warmup=%d evict_mib=%zu per rank; median over repetitions of the max over "
           "ranks\n",
           cfg.reps, cfg.warmup, cfg.evict_bytes >> 20);
    if (cfg.phases)
      printf("world,layout,n,c,h,w,shard_n,phase,ms,reps\n");
    else
      printf("world,layout,n,c,h,w,shard_n,kind,fwd_ms,bwd_ms,step_ms,reps,allgather_bytes,"
             "allreduce_bytes\n");
    fflush(stdout);
  }
  bench_evict evict;
  bench_evict_init(&evict, cfg.evict_bytes);
  for (int l = 0; l < 2; l++) {
    const fbn_layout layout = l == 0 ? FBN_LAYOUT_NCHW : FBN_LAYOUT_NHWC;
    if ((l == 0 && !cfg.nchw) || (l == 1 && !cfg.nhwc))
      continue;
    for (int i = 0; i < cfg.shape_count; i++)
      run_case(&cfg, &cfg.shapes[i], layout, &evict);
  }
  bench_evict_fini(&evict);
  MPI_Finalize();
  return 0;
}
