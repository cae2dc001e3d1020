/*
 * fusedbn-bench: CPU mode.
 *
 * For each shape, (dtype, layout) and operation (BN, BN + ReLU, BN + add +
 * ReLU): a fusedbn CPU module of that operation (the library's default CPU
 * backend, or the float64 reference with --cpu-backend reference) against
 * the operation's unfused baseline of bench_unfused_cpu.h (fusedbn's BN
 * alone, then the add and ReLU passes; none for BN alone) and the copy floor
 * (bench_common.h), for the training forward (filling a saved object), the
 * eval forward and the training backward (dx, and daddend of BN + add +
 * ReLU). Before timing a pass both implementations run once on the same
 * data and their outputs are compared (the "note" column), so that a broken
 * path is never timed; BN alone is compared with the baseline's BN step (the
 * op API's BN alone, the same backend).
 *
 * The three are timed sample by sample in turn, each sample after the same
 * cache eviction, so that all start from memory and see the same state of
 * the machine. The floor copies the pass's counted bytes (half read, half
 * written) with the same threads: fused GB/s / floor GB/s is then at most
 * 100% for a pass that is bound by memory.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "bench_unfused_cpu.h"

typedef struct cpu_case {
  bench_shape shape;
  fbn_tensor_desc desc;
  size_t tensor_bytes;
  fbn_operation op; /* of the module */
  fbn_module *module;
  fbn_saved *saved;
  bench_unfused_cpu unfused;
  bench_copy copy;        /* the floor's buffers */
  size_t floor_copy;      /* bytes the floor copies for the pass timed now */
  const bench_evict *evict;
  /* fusedbn's inputs/outputs; *_ref are the baseline's outputs. */
  void *x, *addend, *dy;
  void *y, *dx, *daddend;
  void *y_ref, *dx_ref, *daddend_ref;
  void *fwd_ws, *bwd_ws;
  size_t fwd_ws_bytes, bwd_ws_bytes;
  /* float16 and bfloat16 on the fast backend: the same module on the
   * float64 reference backend, whose outputs (*_chk) the agreement check
   * also compares with fusedbn's. NULL otherwise. */
  fbn_module *ref_module;
  fbn_saved *ref_saved;
  void *ref_ws;
  size_t ref_ws_bytes;
  void *y_chk, *dx_chk, *daddend_chk;
} cpu_case;

typedef fbn_status (*cpu_op)(cpu_case *k);

/* ---- the operations being timed ------------------------------------------ */

static bool has_addend(const cpu_case *k) { return k->op == FBN_OPERATION_BN_ADD_RELU; }

static fbn_status fused_forward_train(cpu_case *k) {
  return fbn_module_forward(k->module, &k->desc, k->x, has_addend(k) ? k->addend : NULL, k->y,
                            k->saved, k->fwd_ws, k->fwd_ws_bytes);
}

static fbn_status fused_forward_eval(cpu_case *k) {
  return fbn_module_forward(k->module, &k->desc, k->x, has_addend(k) ? k->addend : NULL, k->y,
                            NULL, k->fwd_ws, k->fwd_ws_bytes);
}

/* BN alone reads no y (NULL); only BN + add + ReLU has a daddend. */
static fbn_status fused_backward(cpu_case *k) {
  return fbn_module_backward(k->module, k->saved, &k->desc, k->x,
                             k->op == FBN_OPERATION_BN ? NULL : k->y, k->dy, k->dx,
                             has_addend(k) ? k->daddend : NULL, k->bwd_ws, k->bwd_ws_bytes);
}

/* The baseline of k->op; for BN alone (no unfused form) its BN step, used
 * by the agreement check only. */
static fbn_status unfused_forward(cpu_case *k, bool train) {
  if (k->op == FBN_OPERATION_BN) {
    return bench_unfused_cpu_bn_forward(&k->unfused, train, k->x, k->y_ref);
  }
  return bench_unfused_cpu_forward(&k->unfused, k->op, train, k->x,
                                   has_addend(k) ? k->addend : NULL, k->y_ref);
}

static fbn_status unfused_forward_train(cpu_case *k) { return unfused_forward(k, true); }

static fbn_status unfused_forward_eval(cpu_case *k) { return unfused_forward(k, false); }

/* g (the ReLU's gradient) goes to daddend_ref: BN + add + ReLU's daddend,
 * BN + ReLU's temporary. */
static fbn_status unfused_backward(cpu_case *k) {
  if (k->op == FBN_OPERATION_BN) {
    return bench_unfused_cpu_bn_backward(&k->unfused, k->x, k->dy, k->dx_ref);
  }
  return bench_unfused_cpu_backward(&k->unfused, k->x, k->y_ref, k->dy, k->dx_ref,
                                    k->daddend_ref);
}

static fbn_status floor_copy(cpu_case *k) {
  bench_copy_run(&k->copy, k->floor_copy);
  return FBN_STATUS_SUCCESS;
}

/* ---- timing ------------------------------------------------------------- */

/* Runs shorter than this are timed in batches of back-to-back calls (the
 * sample is the batch time divided by its size), so that clock resolution
 * and call overhead do not dominate tiny shapes. */
#define MIN_SAMPLE_S BENCH_CPU_MIN_SAMPLE_S
#define MAX_BATCH 10000

/* One sample: evict the caches, then time `batch` calls (after the first
 * of a batch, the data of a tiny shape is in the caches). */
static fbn_status time_op(cpu_op op, cpu_case *k, int batch, double *ms) {
  fbn_status status = FBN_STATUS_SUCCESS;
  bench_evict_run(k->evict);
  const double t0 = bench_now_s();
  for (int i = 0; i < batch && status == FBN_STATUS_SUCCESS; i++) {
    status = op(k);
  }
  *ms = (bench_now_s() - t0) * 1e3 / batch;
  return status;
}

static int batch_size(double one_run_ms) {
  if (one_run_ms * 1e-3 >= MIN_SAMPLE_S) {
    return 1;
  }
  const double b = MIN_SAMPLE_S / fmax(one_run_ms * 1e-3, 1e-8);
  return b > MAX_BATCH ? MAX_BATCH : (int)b + 1;
}

/* Warm up, pick the repetition count, then take fused, unfused and floor
 * samples in turn so that all three see the same machine conditions.
 * Without warm-up runs, check_ms (the agreement check's fused and unfused
 * runs, which warmed both up) estimates one run of the pair. unfused NULL
 * (BN alone): fused and floor only. */
static int measure_row(const bench_config *cfg, cpu_case *k, const char *what, cpu_op fused,
                       cpu_op unfused, double check_ms, bench_row *row) {
  enum { FUSED, UNFUSED, FLOOR, FORMS };
  const cpu_op ops[FORMS] = {fused, unfused, floor_copy};
  double one_ms[FORMS] = {check_ms / 2, unfused != NULL ? check_ms / 2 : 0.0, 0.0};
  fbn_status status;
  (void)time_op(floor_copy, k, 1, &one_ms[FLOOR]); /* its warm-up and batch size */
  for (int i = 0; i < cfg->warmup; i++) {
    for (int f = 0; f < FORMS; f++) {
      if (ops[f] != NULL && (status = time_op(ops[f], k, 1, &one_ms[f])) != FBN_STATUS_SUCCESS) {
        return bench_fail_status(what, status);
      }
    }
  }
  const int reps = bench_choose_reps(cfg, (one_ms[FUSED] + one_ms[UNFUSED]) * 1e-3);
  /* Tiny shapes: without a warm-up the split of check_ms is a guess, and
   * batching only needs the order of magnitude. Fused and unfused take the
   * same batch size (both warm or both cold); batched calls stay in the
   * caches after the first, so those rows have no memory floor, and the
   * floor is never batched. */
  const int pair_batch =
      batch_size(unfused != NULL ? fmin(one_ms[FUSED], one_ms[UNFUSED]) : one_ms[FUSED]);
  const int batch[FORMS] = {pair_batch, pair_batch, 1};
  const int forms = pair_batch > 1 ? FLOOR : FORMS;
  /* The floor is sampled twice per rep, before and after the pair: its
   * fastest sample is the reference, and a busy machine slows samples down
   * at random. */
  double *samples = malloc((FORMS + 1) * (size_t)reps * sizeof(double));
  if (samples == NULL) {
    fprintf(stderr, "fusedbn-bench: out of memory\n");
    return 1;
  }
  double *floor_samples = samples + FLOOR * reps;
  for (int r = 0; r < reps; r++) {
    for (int f = 0; f < forms; f++) {
      if (ops[f] == NULL) {
        continue;
      }
      double *sample = f == FLOOR ? &floor_samples[2 * r] : &samples[f * reps + r];
      if ((status = time_op(ops[f], k, batch[f], sample)) != FBN_STATUS_SUCCESS) {
        free(samples);
        return bench_fail_status(what, status);
      }
    }
    if (forms == FORMS) {
      (void)time_op(floor_copy, k, 1, &floor_samples[2 * r + 1]);
    }
  }
  bench_timing_from_samples(&row->fused, samples + FUSED * reps, reps);
  if (unfused != NULL) {
    bench_timing_from_samples(&row->unfused, samples + UNFUSED * reps, reps);
  }
  if (forms == FORMS) {
    bench_timing_from_samples(&row->floor, floor_samples, 2 * reps);
  }
  free(samples);
  return 0;
}

/* ---- agreement check ---------------------------------------------------- */

static void poison(void *p, fbn_dtype dtype, int64_t numel) {
  for (int64_t i = 0; i < numel; i++) {
    switch (dtype) {
    case FBN_DTYPE_FLOAT32:
      ((float *)p)[i] = NAN;
      break;
    case FBN_DTYPE_FLOAT64:
      ((double *)p)[i] = NAN;
      break;
    case FBN_DTYPE_FLOAT16:
      ((uint16_t *)p)[i] = 0x7e00u; /* quiet NaN */
      break;
    case FBN_DTYPE_BFLOAT16:
      ((uint16_t *)p)[i] = 0x7fc0u;
      break;
    }
  }
}

/* The reference module's outputs of the pass checked (after the fused
 * module's: its backward gates with the fused forward's y), compared with
 * the fused module's in the row's note ("reference ..."). */
static int check_reference(cpu_case *k, bench_row *row) {
  const int64_t numel = bench_shape_numel(&k->shape);
  const fbn_dtype dt = k->desc.dtype;
  const bool train = row->pass != BENCH_PASS_EVAL_FWD;
  fbn_status status = fbn_module_set_training(k->ref_module, train);
  if (status != FBN_STATUS_SUCCESS) {
    return bench_fail_status("fbn_module_set_training (reference)", status);
  }
  const void *addend = has_addend(k) ? k->addend : NULL;
  poison(k->y_chk, dt, numel);
  status = fbn_module_forward(k->ref_module, &k->desc, k->x, addend, k->y_chk,
                              train ? k->ref_saved : NULL, k->ref_ws, k->ref_ws_bytes);
  if (status != FBN_STATUS_SUCCESS) {
    return bench_fail_status("fbn_module_forward (reference)", status);
  }
  if (row->pass != BENCH_PASS_TRAIN_BWD) {
    (void)bench_note_agreement(row, "reference ", bench_max_rel_diff(k->y, k->y_chk, dt, numel));
    return 0;
  }
  poison(k->dx_chk, dt, numel);
  poison(k->daddend_chk, dt, numel);
  status = fbn_module_backward(k->ref_module, k->ref_saved, &k->desc, k->x,
                               k->op == FBN_OPERATION_BN ? NULL : k->y, k->dy, k->dx_chk,
                               has_addend(k) ? k->daddend_chk : NULL, k->ref_ws, k->ref_ws_bytes);
  if (status != FBN_STATUS_SUCCESS) {
    return bench_fail_status("fbn_module_backward (reference)", status);
  }
  const double d_dx = bench_max_rel_diff(k->dx, k->dx_chk, dt, numel);
  const double d_da =
      has_addend(k) ? bench_max_rel_diff(k->daddend, k->daddend_chk, dt, numel) : 0.0;
  (void)bench_note_agreement(row, "reference ",
                             isnan(d_dx) || isnan(d_da) ? NAN : fmax(d_dx, d_da));
  return 0;
}

/* Run one fused and one unfused pass on fresh (poisoned) outputs and
 * compare. For the backward, both first run their own training forward.
 * With a reference module, its outputs are compared with the fused ones
 * too. */
static int check_pass(cpu_case *k, bench_row *row) {
  const int64_t numel = bench_shape_numel(&k->shape);
  const fbn_dtype dt = k->desc.dtype;
  fbn_status status;
  switch (row->pass) {
  case BENCH_PASS_TRAIN_FWD:
  case BENCH_PASS_EVAL_FWD: {
    const bool train = row->pass == BENCH_PASS_TRAIN_FWD;
    poison(k->y, dt, numel);
    poison(k->y_ref, dt, numel);
    status = train ? fused_forward_train(k) : fused_forward_eval(k);
    if (status != FBN_STATUS_SUCCESS) {
      return bench_fail_status("fbn_module_forward", status);
    }
    if ((status = unfused_forward(k, train)) != FBN_STATUS_SUCCESS) {
      return bench_fail_status("fbn_op_forward (the baseline's BN alone)", status);
    }
    (void)bench_note_agreement(row, "", bench_max_rel_diff(k->y, k->y_ref, dt, numel));
    return k->ref_module != NULL ? check_reference(k, row) : 0;
  }
  case BENCH_PASS_TRAIN_BWD: {
    if ((status = fused_forward_train(k)) != FBN_STATUS_SUCCESS) {
      return bench_fail_status("fbn_module_forward", status);
    }
    if ((status = unfused_forward_train(k)) != FBN_STATUS_SUCCESS) {
      return bench_fail_status("fbn_op_forward (the baseline's BN alone)", status);
    }
    /* Same ReLU mask for both: an element within rounding of 0 may be
     * positive in one forward and not in the other. */
    memcpy(k->y_ref, k->y, k->tensor_bytes);
    poison(k->dx, dt, numel);
    poison(k->daddend, dt, numel);
    poison(k->dx_ref, dt, numel);
    poison(k->daddend_ref, dt, numel);
    if ((status = fused_backward(k)) != FBN_STATUS_SUCCESS) {
      return bench_fail_status("fbn_module_backward", status);
    }
    if ((status = unfused_backward(k)) != FBN_STATUS_SUCCESS) {
      return bench_fail_status("fbn_op_backward (the baseline's BN alone)", status);
    }
    const double d_dx = bench_max_rel_diff(k->dx, k->dx_ref, dt, numel);
    const double d_da =
        has_addend(k) ? bench_max_rel_diff(k->daddend, k->daddend_ref, dt, numel) : 0.0;
    (void)bench_note_agreement(row, "", isnan(d_dx) || isnan(d_da) ? NAN : fmax(d_dx, d_da));
    return k->ref_module != NULL ? check_reference(k, row) : 0;
  }
  case BENCH_PASS_COUNT:
    break;
  }
  return 0;
}

/* ---- one shape ------------------------------------------------------------ */

static void *tensor(const cpu_case *k) { return bench_alloc_touched(k->tensor_bytes); }

/* Whether the fused module runs on the reference backend (FBN_CPU_BACKEND,
 * which --cpu-backend sets). */
static bool on_reference_backend(void) {
  const char *backend = getenv("FBN_CPU_BACKEND");
  return backend != NULL && strcmp(backend, "reference") == 0;
}

/* A CPU module of k's operation with default parameters on the reference
 * backend: FBN_CPU_BACKEND=reference while it is created (the library reads
 * it then), restored after. */
static int create_reference_module(cpu_case *k, const fbn_module_options *opts) {
  const char *was = getenv("FBN_CPU_BACKEND");
  char saved_value[64] = "";
  const bool had = was != NULL && strlen(was) < sizeof saved_value;
  if (had) {
    strcpy(saved_value, was);
  }
  fbn_status status = FBN_STATUS_SUCCESS;
  if (setenv("FBN_CPU_BACKEND", "reference", 1) != 0) {
    perror("fusedbn-bench: setenv");
    return 1;
  }
  status = fbn_module_create(opts, &k->ref_module);
  if (had ? setenv("FBN_CPU_BACKEND", saved_value, 1) != 0
          : unsetenv("FBN_CPU_BACKEND") != 0) {
    perror("fusedbn-bench: setenv");
    return 1;
  }
  if (status != FBN_STATUS_SUCCESS) {
    return bench_fail_status("fbn_module_create (reference)", status);
  }
  if ((status = fbn_saved_create(&k->ref_saved)) != FBN_STATUS_SUCCESS) {
    return bench_fail_status("fbn_saved_create", status);
  }
  size_t fwd = 0, bwd = 0;
  if ((status = fbn_module_forward_workspace_size(k->ref_module, &k->desc, true, &fwd)) !=
          FBN_STATUS_SUCCESS ||
      (status = fbn_module_backward_workspace_size(k->ref_module, &k->desc, true, &bwd)) !=
          FBN_STATUS_SUCCESS) {
    return bench_fail_status("fbn_module_*_workspace_size (reference)", status);
  }
  k->ref_ws_bytes = fwd > bwd ? fwd : bwd;
  k->ref_ws = k->ref_ws_bytes > 0 ? bench_alloc_touched(k->ref_ws_bytes) : NULL;
  return 0;
}

static void destroy_reference_module(cpu_case *k) {
  fbn_saved_destroy(k->ref_saved);
  fbn_module_destroy(k->ref_module);
  bench_free(k->ref_ws);
  k->ref_saved = NULL;
  k->ref_module = NULL;
  k->ref_ws = NULL;
  k->ref_ws_bytes = 0;
}

/* The fused module of operation op (replacing the previous one), its saved
 * object and workspaces; for float16 and bfloat16 on the fast backend, the
 * reference module the agreement check compares it with. */
static int case_set_op(cpu_case *k, fbn_operation op) {
  fbn_saved_destroy(k->saved);
  fbn_module_destroy(k->module);
  bench_free(k->fwd_ws);
  bench_free(k->bwd_ws);
  destroy_reference_module(k);
  k->saved = NULL;
  k->module = NULL;
  k->fwd_ws = k->bwd_ws = NULL;
  k->op = op;
  fbn_module_options opts;
  fbn_module_options_init(&opts);
  opts.num_features = k->shape.c;
  opts.param_dtype = k->desc.dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  opts.device = FBN_DEVICE_CPU;
  opts.operation = op;
  fbn_status status = fbn_module_create(&opts, &k->module);
  if (status != FBN_STATUS_SUCCESS) {
    return bench_fail_status("fbn_module_create", status);
  }
  if (k->y_chk != NULL) {
    const int rc = create_reference_module(k, &opts);
    if (rc != 0) {
      return rc;
    }
  }
  if ((status = fbn_saved_create(&k->saved)) != FBN_STATUS_SUCCESS) {
    return bench_fail_status("fbn_saved_create", status);
  }
  status = fbn_module_forward_workspace_size(k->module, &k->desc, true, &k->fwd_ws_bytes);
  if (status != FBN_STATUS_SUCCESS) {
    return bench_fail_status("fbn_module_forward_workspace_size", status);
  }
  status = fbn_module_backward_workspace_size(k->module, &k->desc, true, &k->bwd_ws_bytes);
  if (status != FBN_STATUS_SUCCESS) {
    return bench_fail_status("fbn_module_backward_workspace_size", status);
  }
  k->fwd_ws = k->fwd_ws_bytes > 0 ? bench_alloc_touched(k->fwd_ws_bytes) : NULL;
  k->bwd_ws = k->bwd_ws_bytes > 0 ? bench_alloc_touched(k->bwd_ws_bytes) : NULL;
  return 0;
}

static int case_init(cpu_case *k, const bench_shape *shape, const bench_variant *v,
                     const bench_evict *evict) {
  memset(k, 0, sizeof *k);
  k->evict = evict;
  k->shape = *shape;
  k->desc = fbn_tensor_desc_make(shape->n, shape->c, shape->h, shape->w, v->dtype, v->layout);
  k->tensor_bytes = (size_t)bench_shape_numel(shape) * fbn_dtype_size(v->dtype);

  const int rc = bench_unfused_cpu_init(&k->unfused, shape, v->dtype, v->layout);
  if (rc != 0) {
    return rc;
  }
  /* The floor of the pass moving most: BN + add + ReLU's backward. */
  bench_copy_init(&k->copy, (size_t)bench_pass_tensors(FBN_OPERATION_BN_ADD_RELU,
                                                       BENCH_PASS_TRAIN_BWD) *
                                k->tensor_bytes / 2);
  k->x = tensor(k);
  k->addend = tensor(k);
  k->dy = tensor(k);
  k->y = tensor(k);
  k->dx = tensor(k);
  k->daddend = tensor(k);
  k->y_ref = tensor(k);
  k->dx_ref = tensor(k);
  k->daddend_ref = tensor(k);
  if (fbn_dtype_size(v->dtype) == 2 && !on_reference_backend()) {
    k->y_chk = tensor(k);
    k->dx_chk = tensor(k);
    k->daddend_chk = tensor(k);
  }

  bench_rng rng;
  bench_rng_seed(&rng, (uint64_t)(shape->n * 1000003 + shape->c * 1009 + shape->h * 31 + shape->w));
  bench_fill_random(k->x, shape, v->dtype, v->layout, 2.0, 1.5, &rng);
  bench_fill_random(k->addend, shape, v->dtype, v->layout, 0.0, 1.0, &rng);
  bench_fill_random(k->dy, shape, v->dtype, v->layout, 0.0, 1.0, &rng);
  return 0;
}

static void case_fini(cpu_case *k) {
  void *buffers[] = {k->x,      k->addend,      k->dy,     k->y,     k->dx,
                     k->daddend, k->y_ref,       k->dx_ref, k->daddend_ref,
                     k->fwd_ws,  k->bwd_ws,      k->y_chk,  k->dx_chk, k->daddend_chk};
  for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) {
    bench_free(buffers[i]);
  }
  if (k->unfused.train_op != NULL || k->unfused.eval_op != NULL) {
    bench_unfused_cpu_fini(&k->unfused);
  }
  if (k->copy.src != NULL) {
    bench_copy_fini(&k->copy);
  }
  destroy_reference_module(k);
  fbn_saved_destroy(k->saved);
  fbn_module_destroy(k->module);
}

/* Give the baseline (and the reference module) the module's running
 * statistics so that the eval forwards normalize with the same values. */
static int sync_running_stats(cpu_case *k) {
  const size_t c = (size_t)k->shape.c;
  const fbn_dtype pt = k->unfused.param_dtype;
  fbn_status status = fbn_module_read_buffer(k->module, FBN_BUFFER_RUNNING_MEAN, pt,
                                             k->unfused.running_mean, c);
  if (status == FBN_STATUS_SUCCESS) {
    status = fbn_module_read_buffer(k->module, FBN_BUFFER_RUNNING_VAR, pt,
                                    k->unfused.running_var, c);
  }
  if (status != FBN_STATUS_SUCCESS) {
    return bench_fail_status("fbn_module_read_buffer", status);
  }
  if (k->ref_module != NULL) {
    status = fbn_module_write_buffer(k->ref_module, FBN_BUFFER_RUNNING_MEAN, pt,
                                     k->unfused.running_mean, c);
    if (status == FBN_STATUS_SUCCESS) {
      status = fbn_module_write_buffer(k->ref_module, FBN_BUFFER_RUNNING_VAR, pt,
                                       k->unfused.running_var, c);
    }
    if (status != FBN_STATUS_SUCCESS) {
      return bench_fail_status("fbn_module_write_buffer (reference)", status);
    }
  }
  return 0;
}

/* The rows of one operation (k's module set to it). */
static int run_op(const bench_config *cfg, const bench_report_info *info, cpu_case *k) {
  int rc = 0;
  const bool bn_alone = k->op == FBN_OPERATION_BN;
  for (int p = 0; rc == 0 && p < BENCH_PASS_COUNT; p++) {
    if (!cfg->passes[p]) {
      continue;
    }
    bench_row row;
    memset(&row, 0, sizeof row);
    row.shape = k->shape;
    row.dtype = k->desc.dtype;
    row.layout = k->desc.layout;
    row.op = k->op;
    row.pass = (bench_pass)p;
    row.bytes = (double)bench_pass_tensors(row.op, row.pass) * (double)k->tensor_bytes;
    k->floor_copy = (size_t)bench_pass_tensors(row.op, row.pass) * k->tensor_bytes / 2;

    const bool train = row.pass != BENCH_PASS_EVAL_FWD;
    fbn_status status = fbn_module_set_training(k->module, train);
    if (status != FBN_STATUS_SUCCESS) {
      rc = bench_fail_status("fbn_module_set_training", status);
      break;
    }
    if (!train && (rc = sync_running_stats(k)) != 0) {
      break;
    }
    const double t0 = bench_now_s();
    if ((rc = check_pass(k, &row)) != 0) {
      break;
    }
    const double check_ms = (bench_now_s() - t0) * 1e3;
    switch (row.pass) {
    case BENCH_PASS_TRAIN_FWD:
      rc = measure_row(cfg, k, "fbn_module_forward (training)", fused_forward_train,
                       bn_alone ? NULL : unfused_forward_train, check_ms, &row);
      break;
    case BENCH_PASS_EVAL_FWD:
      rc = measure_row(cfg, k, "fbn_module_forward (eval)", fused_forward_eval,
                       bn_alone ? NULL : unfused_forward_eval, check_ms, &row);
      break;
    case BENCH_PASS_TRAIN_BWD:
      rc = measure_row(cfg, k, "fbn_module_backward", fused_backward,
                       bn_alone ? NULL : unfused_backward, check_ms, &row);
      break;
    case BENCH_PASS_COUNT:
      break;
    }
    if (rc == 0) {
      bench_report_row(cfg, info, &row);
    }
  }
  return rc;
}

static int run_case(const bench_config *cfg, const bench_report_info *info,
                    const bench_shape *shape, const bench_variant *v, const bench_evict *evict) {
  cpu_case k;
  int rc = case_init(&k, shape, v, evict);
  for (int o = 0; rc == 0 && o < BENCH_OP_COUNT; o++) {
    if (cfg->ops[o] && (rc = case_set_op(&k, (fbn_operation)o)) == 0) {
      rc = run_op(cfg, info, &k);
    }
  }
  case_fini(&k);
  return rc;
}

/* Whether the CPU backend takes tensors of v's dtype and layout: an op of
 * BN + add + ReLU with batch statistics created on one channel. A refusal
 * (FBN_STATUS_UNSUPPORTED) is reported before the table, with the library's
 * message, and ends the run with BENCH_EXIT_UNSUPPORTED. */
static int check_variant(const bench_variant *v, const char *backend_name) {
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = 1;
  od.dtype = v->dtype;
  od.param_dtype = v->dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  od.layout = v->layout;
  od.device = FBN_DEVICE_CPU;
  od.operation = FBN_OPERATION_BN_ADD_RELU;
  od.statistics = FBN_STATISTICS_BATCH;
  fbn_op *op = NULL;
  const fbn_status status = fbn_op_create(&od, &op);
  fbn_op_destroy(op);
  if (status == FBN_STATUS_UNSUPPORTED) {
    fprintf(stderr,
            "fusedbn-bench: --dtype %s --layout %s: the %s CPU backend refuses it (%s: %s); "
            "nothing timed\n",
            bench_dtype_name(v->dtype), bench_layout_name(v->layout), backend_name,
            fbn_status_string(status), fbn_last_error_message());
    return BENCH_EXIT_UNSUPPORTED;
  }
  return status == FBN_STATUS_SUCCESS ? 0 : bench_fail_status("fbn_op_create", status);
}

int bench_run_cpu(const bench_config *cfg) {
  char copy_desc[256], device_desc[512], baseline_desc[1024], machine[320];
  const char *backend = getenv("FBN_CPU_BACKEND");
  const bool reference = backend != NULL && strcmp(backend, "reference") == 0;
  for (int v = 0; v < cfg->num_variants; v++) {
    const int rc = check_variant(&cfg->variants[v], reference ? "reference" : "fast");
    if (rc != 0) {
      return rc;
    }
  }
  const int threads = bench_threads();
  bench_machine_line(machine, sizeof machine);
  if (reference) {
    snprintf(device_desc, sizeof device_desc,
             "cpu: fusedbn CPU reference backend (FBN_CPU_BACKEND=reference; float64, one "
             "thread); %s",
             machine);
  } else {
    snprintf(device_desc, sizeof device_desc,
             "cpu: fusedbn fast CPU backend (the default; one thread under 64Ki elements); %s",
             machine);
  }
  snprintf(baseline_desc, sizeof baseline_desc,
           "fusedbn's BN alone (op API, FBN_OPERATION_BN, the same backend as fused), then for "
           "bn_add_relu an add pass (y += addend) and a ReLU pass (backward: a ReLU-backward "
           "pass writing daddend, then BN alone's backward), for bn_relu a ReLU pass "
           "(backward: a ReLU-backward pass into a temporary, then BN alone's backward); bn has "
           "no unfused form (\"-\"), only its floor; each pass one loop, omp simd, the "
           "library's threads; new outputs of 8 MiB or more with non-temporal stores");
  if (strstr(machine, "BUSY") != NULL) {
    fprintf(stderr,
            "fusedbn-bench: warning: the machine is busy (%s): CPU timings will be noisy%s\n",
            machine,
#ifdef _OPENMP
            "; OpenMP threads that spin while others are descheduled can be 100x slower (try "
            "OMP_WAIT_POLICY=passive or OMP_NUM_THREADS=1)"
#else
            ""
#endif
    );
  }
  bench_evict evict;
  bench_evict_init(&evict, bench_evict_default_bytes());
  snprintf(copy_desc, sizeof copy_desc,
           "per row, a copy of the pass's counted bytes (half read, half written) with %d "
           "thread(s) from 256 KiB on, %s; every sample after a %zu MiB cache eviction",
           threads, bench_copy_method(), (evict.words * sizeof(uint64_t)) >> 20);
  bench_report_info info;
  info.device_desc = device_desc;
  info.baseline_desc = baseline_desc;
  info.copy_gbps = NAN;
  info.copy_desc = copy_desc;

  bench_report_begin(cfg, &info);
  for (int s = 0; s < cfg->num_shapes; s++) {
    for (int v = 0; v < cfg->num_variants; v++) {
      const int rc = run_case(cfg, &info, &cfg->shapes[s], &cfg->variants[v], &evict);
      if (rc != 0) {
        bench_evict_fini(&evict);
        return rc;
      }
    }
  }
  bench_report_end(cfg);
  bench_evict_fini(&evict);
  return 0;
}
