/*
 * fusedbn-bench: shared declarations.
 *
 * Layout of the program:
 *   bench_main.c          options, shapes table, device choice, main()
 *   bench_util.c          repetition counts, random tensors, dtypes, agreement
 *   bench_report.c        text table and CSV output
 *   bench_unfused_cpu.c   the unfused CPU baselines: fusedbn's BN alone, then
 *                         an add pass and/or a ReLU pass (bench_unfused_cpu.h)
 *   bench_cpu.c           CPU mode: a fusedbn CPU module of each operation
 *                         against its baseline and the copy floor
 *   common/               the CPU timing harness shared with fbn-peers-bench
 *                         and fbn-ab (clock, RNG, eviction, copy floor, machine)
 *   bench_cuda.c          GPU mode (only with the CUDA backend): fusedbn CUDA
 *                         module against the unfused cuDNN sequence
 */
#ifndef FUSEDBN_BENCH_BENCH_H
#define FUSEDBN_BENCH_BENCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bench_common.h"
#include "fusedbn/fusedbn.h"

#define BENCH_MAX_SHAPES 32
#define BENCH_DEFAULT_REPS 20
#define BENCH_DEFAULT_WARMUP 2
/* CPU runs shorter than this are timed as batches of back-to-back calls
 * (bench_cpu.c). */
#define BENCH_CPU_MIN_SAMPLE_S 0.5e-3

/* ---- configuration ------------------------------------------------------ */

typedef struct bench_shape {
  int64_t n, c, h, w;
} bench_shape;

typedef enum bench_pass {
  BENCH_PASS_TRAIN_FWD = 0, /* training forward (batch stats; addend: BN + add + ReLU) */
  BENCH_PASS_EVAL_FWD = 1,  /* eval forward (running stats) */
  BENCH_PASS_TRAIN_BWD = 2, /* backward of a training forward: dx (daddend: BN + add + ReLU) */
  BENCH_PASS_COUNT = 3,
} bench_pass;

/* The operations timed (fbn_operation values index the flags). */
#define BENCH_OP_COUNT 3

typedef enum bench_device {
  BENCH_DEVICE_AUTO = 0,
  BENCH_DEVICE_CPU = 1,
  BENCH_DEVICE_CUDA = 2,
} bench_device;

/* One (dtype, layout) combination to run every shape with. */
typedef struct bench_variant {
  fbn_dtype dtype;
  fbn_layout layout;
} bench_variant;

typedef struct bench_config {
  bench_shape shapes[BENCH_MAX_SHAPES];
  int num_shapes;
  bench_variant variants[8];
  int num_variants;
  bool passes[BENCH_PASS_COUNT];
  bool ops[BENCH_OP_COUNT]; /* by fbn_operation */
  bool ops_given;           /* --op was given (else all) */
  /* Repetitions: reps_forced true means exactly `reps`; otherwise `reps`
   * is the default count, lowered (never below min_reps) for runs that
   * would exceed time_budget_s. */
  int reps;
  bool reps_forced;
  int min_reps;
  double time_budget_s;
  int warmup;
  bench_device device; /* CPU or CUDA after device selection */
  bool csv;
  bool quick;
  /* Why GPU mode was not used under --device auto ("" if it was). */
  char fallback_reason[256];
} bench_config;

/* ---- timing and statistics (bench_util.c) -------------------------------- */

/* bench_now_s, bench_median, bench_min: bench_common.h. */

/* Timings of one implementation for one row; reps == 0: not measured. */
typedef struct bench_timing {
  int reps;
  double median_ms;
  double min_ms;
} bench_timing;

/* Fill t from samples[0..count) in milliseconds. */
void bench_timing_from_samples(bench_timing *t, double *samples_ms, int count);

/* Number of timed repetitions for a run whose single execution takes about
 * one_run_s (all implementations of a row together). */
int bench_choose_reps(const bench_config *cfg, double one_run_s);

/* ---- buffers and data (bench_util.c) ------------------------------------- */

/* bench_alloc_touched, bench_free, bench_rng: bench_common.h. */

/* Element count of a shape (validated: positive and no overflow). */
int64_t bench_shape_numel(const bench_shape *s);
/* Fill dst (numel elements of dtype) with values: channel offset +
 * scale * uniform, so that channels have distinct means/variances.
 * Layout matters for which element belongs to which channel. */
void bench_fill_random(void *dst, const bench_shape *s, fbn_dtype dtype, fbn_layout layout,
                       double offset_per_channel, double scale, bench_rng *rng);

/* float16 / bfloat16 conversions: bench_common.h. */
/* Element i of p (numel elements of dtype) as a double. */
double bench_load(const void *p, fbn_dtype dtype, int64_t i);
/* Largest |a - b| / (1 + |b|) over host arrays; NaN if any is NaN. */
double bench_max_rel_diff(const void *a, const void *b, fbn_dtype dtype, int64_t numel);
/* Agreement expected between fusedbn and a baseline for that data type. */
double bench_agreement_tolerance(fbn_dtype dtype);

const char *bench_dtype_name(fbn_dtype dtype);
const char *bench_layout_name(fbn_layout layout);
const char *bench_pass_name(bench_pass pass);

/* ---- results and reporting (bench_report.c) ------------------------------ */

typedef struct bench_row {
  bench_shape shape;
  fbn_dtype dtype;
  fbn_layout layout;
  fbn_operation op;
  bench_pass pass;
  /* Bytes the pass must move at minimum, counted for GB/s
   * (bench_pass_tensors() tensors of x's size). */
  double bytes;
  bench_timing fused;   /* fusedbn module (default bn_mode) */
  bench_timing unfused; /* the unfused baseline of this device (none for BN alone) */
  bench_timing spatial; /* GPU only: fusedbn with bn_mode SPATIAL */
  bench_timing floor;   /* CPU only: the copy floor moving `bytes` */
  /* Short note (path taken, baseline mode), may be "". */
  char note[160];
} bench_row;

/* Append "max rel diff D" (prefixed; flagged MISMATCH, with a warning on
 * stderr, beyond bench_agreement_tolerance()) to row->note. Returns whether
 * the outputs agree. */
bool bench_note_agreement(bench_row *row, const char *prefix, double diff);
/* How many agreement checks have failed so far (fusedbn-bench then exits
 * with BENCH_EXIT_MISMATCH after its table). */
int bench_mismatch_count(void);
#define BENCH_EXIT_MISMATCH 4
/* Append text to row->note ("; "-separated). */
void bench_note_append(bench_row *row, const char *text);

/* Tensors of x's size a pass of operation op must move at minimum. BN +
 * add + ReLU: 3 for a forward (x, addend, y: a training forward can read x
 * once, keeping a group of channels in the caches from its statistics to
 * its normalization, as the library's NCHW pipeline and the GPU's
 * persistent kernels do), 5 for a backward (x, y, dy, dx, daddend); BN +
 * ReLU: 2 (x, y) and 4 (x, y, dy, dx); BN alone: 2 and 3 (x, dy, dx). */
int bench_pass_tensors(fbn_operation op, bench_pass pass);

typedef struct bench_report_info {
  const char *device_desc;   /* "cpu: ..." or "cuda: <GPU name> ..." */
  const char *baseline_desc; /* what "unfused" is */
  /* GPU: the copy bandwidth (read + write bytes) every row is compared
   * with; the CPU compares each row with its own floor (bench_row.floor)
   * and leaves copy_gbps NaN. */
  double copy_gbps;
  const char *copy_desc; /* how the reference was measured */
} bench_report_info;

void bench_report_begin(const bench_config *cfg, const bench_report_info *info);
void bench_report_row(const bench_config *cfg, const bench_report_info *info,
                      const bench_row *row);
void bench_report_end(const bench_config *cfg);

/* ---- modes --------------------------------------------------------------- */

/* CPU mode (bench_cpu.c). Returns a process exit status. */
int bench_run_cpu(const bench_config *cfg);

/* GPU mode (bench_cuda.c, only built with the CUDA backend). */
/* true if a CUDA device is usable; else false with the reason in why. */
bool bench_cuda_available(char *why, size_t why_size);
int bench_run_cuda(const bench_config *cfg);

/* Print "fusedbn-bench: <call> failed: <status>: <message>" and return 1,
 * or BENCH_EXIT_UNSUPPORTED for FBN_STATUS_UNSUPPORTED. */
int bench_fail_status(const char *call, fbn_status status);
/* Exit status when the backend refuses what was asked (a dtype the CPU
 * backend does not take): the status test harnesses read as "skipped". */
#define BENCH_EXIT_UNSUPPORTED 77

#endif /* FUSEDBN_BENCH_BENCH_H */
