/*
 * fusedbn-bench: repetition counts, random tensors, dtypes, agreement checks.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"

/* ---- repetitions ---------------------------------------------------------- */

void bench_timing_from_samples(bench_timing *t, double *samples_ms, int count) {
  t->reps = count;
  t->min_ms = bench_min(samples_ms, count);
  t->median_ms = bench_median(samples_ms, count);
}

int bench_choose_reps(const bench_config *cfg, double one_run_s) {
  if (cfg->reps_forced || one_run_s <= 0.0) {
    return cfg->reps;
  }
  int reps = cfg->reps;
  if (one_run_s * reps > cfg->time_budget_s) {
    reps = (int)(cfg->time_budget_s / one_run_s);
    if (reps < cfg->min_reps) {
      reps = cfg->min_reps;
    }
  }
  return reps;
}

/* ---- random tensors ------------------------------------------------------- */

int64_t bench_shape_numel(const bench_shape *s) { return s->n * s->c * s->h * s->w; }

double bench_load(const void *p, fbn_dtype dtype, int64_t i) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT32:
    return (double)((const float *)p)[i];
  case FBN_DTYPE_FLOAT64:
    return ((const double *)p)[i];
  case FBN_DTYPE_FLOAT16:
    return bench_half_to_double(((const uint16_t *)p)[i]);
  case FBN_DTYPE_BFLOAT16:
    return bench_bfloat16_to_double(((const uint16_t *)p)[i]);
  }
  return NAN;
}

double bench_max_rel_diff(const void *a, const void *b, fbn_dtype dtype, int64_t numel) {
  double worst = 0.0;
  for (int64_t i = 0; i < numel; i++) {
    const double va = bench_load(a, dtype, i), vb = bench_load(b, dtype, i);
    if (isnan(va) || isnan(vb)) {
      return NAN;
    }
    const double d = fabs(va - vb) / (1.0 + fabs(vb));
    if (d > worst) {
      worst = d;
    }
  }
  return worst;
}

/* float16 and bfloat16: 8 units in the last place at 1 (machine epsilon:
 * 2^-10 and 2^-7). Both sides compute in float or wider from the same
 * rounded inputs and round their outputs to the tensor's type; the unfused
 * side rounds BN's output before the add and again after it, so two
 * outputs of magnitude m can differ by about 2 ulp(m) <= 2 eps m, and
 * |a - b| / (1 + |b|) stays below 2 eps for these data (|BN(x) + addend| is
 * at most about 3); 8 eps leaves a factor of 4 for the statistics' own
 * rounding. */
double bench_agreement_tolerance(fbn_dtype dtype) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT64:
    return 1e-9;
  case FBN_DTYPE_FLOAT32:
    return 1e-3;
  case FBN_DTYPE_FLOAT16:
    return 8.0 * 0x1p-10;
  case FBN_DTYPE_BFLOAT16:
    return 8.0 * 0x1p-7;
  }
  return 0.0;
}

static int bench_mismatches;

int bench_mismatch_count(void) { return bench_mismatches; }

bool bench_note_agreement(bench_row *row, const char *prefix, double diff) {
  const bool ok = !isnan(diff) && diff <= bench_agreement_tolerance(row->dtype);
  if (!ok)
    bench_mismatches++;
  const size_t used = strlen(row->note);
  snprintf(row->note + used, sizeof row->note - used, "%s%s%smax rel diff %.1e",
           used > 0 ? "; " : "", prefix, ok ? "" : "MISMATCH ", diff);
  if (!ok) {
    fprintf(stderr,
            "fusedbn-bench: warning: %s%s outputs disagree with the unfused baseline (%g)\n",
            prefix, bench_pass_name(row->pass), diff);
  }
  return ok;
}

void bench_note_append(bench_row *row, const char *text) {
  const size_t used = strlen(row->note);
  snprintf(row->note + used, sizeof row->note - used, "%s%s", used > 0 ? "; " : "", text);
}

static void store_value(void *dst, int64_t i, fbn_dtype dtype, double v) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT32:
    ((float *)dst)[i] = (float)v;
    break;
  case FBN_DTYPE_FLOAT64:
    ((double *)dst)[i] = v;
    break;
  case FBN_DTYPE_FLOAT16:
    ((uint16_t *)dst)[i] = bench_float_to_half(v);
    break;
  case FBN_DTYPE_BFLOAT16:
    ((uint16_t *)dst)[i] = bench_float_to_bfloat16(v);
    break;
  }
}

void bench_fill_random(void *dst, const bench_shape *s, fbn_dtype dtype, fbn_layout layout,
                       double offset_per_channel, double scale, bench_rng *rng) {
  const int64_t hw = s->h * s->w;
  const int64_t numel = bench_shape_numel(s);
  for (int64_t i = 0; i < numel; i++) {
    const int64_t c = layout == FBN_LAYOUT_NCHW ? (i / hw) % s->c : i % s->c;
    const double channel_mean = offset_per_channel * (double)(c % 11 - 5) / 5.0;
    store_value(dst, i, dtype, channel_mean + scale * bench_rng_uniform(rng));
  }
}

/* ---- names --------------------------------------------------------------- */

const char *bench_dtype_name(fbn_dtype dtype) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT32:
    return "float32";
  case FBN_DTYPE_FLOAT64:
    return "float64";
  case FBN_DTYPE_FLOAT16:
    return "float16";
  case FBN_DTYPE_BFLOAT16:
    return "bfloat16";
  }
  return "?";
}

const char *bench_layout_name(fbn_layout layout) {
  return layout == FBN_LAYOUT_NCHW ? "nchw" : layout == FBN_LAYOUT_NHWC ? "nhwc" : "?";
}

const char *bench_pass_name(bench_pass pass) {
  switch (pass) {
  case BENCH_PASS_TRAIN_FWD:
    return "train-fwd";
  case BENCH_PASS_EVAL_FWD:
    return "eval-fwd";
  case BENCH_PASS_TRAIN_BWD:
    return "train-bwd";
  case BENCH_PASS_COUNT:
    break;
  }
  return "?";
}

int bench_pass_tensors(fbn_operation op, bench_pass pass) {
  const int add = op == FBN_OPERATION_BN_ADD_RELU ? 1 : 0;
  if (pass != BENCH_PASS_TRAIN_BWD) {
    return 2 + add; /* x, (addend,) y */
  }
  /* x, dy, dx, (y: the ReLU's gate,) (daddend) */
  return 3 + (op != FBN_OPERATION_BN ? 1 : 0) + add;
}

int bench_fail_status(const char *call, fbn_status status) {
  fprintf(stderr, "fusedbn-bench: %s failed: %s: %s\n", call, fbn_status_string(status),
          fbn_last_error_message());
  return status == FBN_STATUS_UNSUPPORTED ? BENCH_EXIT_UNSUPPORTED : 1;
}
