/*
 * fusedbn-bench: the text table and the CSV output.
 *
 * One row per (shape, layout, dtype, operation, pass). Columns: fused
 * (fusedbn), unfused (the device's baseline of that operation; "-" for BN
 * alone, which has none), and on the GPU spatial (fusedbn with
 * bn_mode SPATIAL: no persistent kernel). GB/s counts the minimum bytes a
 * pass must move (row->bytes). The reference of "%floor" (CPU: the row's
 * own copy floor) or "%copy" (GPU: one device copy for the run) is a
 * fraction of bandwidths: at most 100% for a pass bound by memory.
 */
#include <math.h>
#include <stdio.h>

#include "bench.h"

static double gbps(double bytes, const bench_timing *t) {
  if (t->reps == 0 || !(t->median_ms > 0.0)) {
    return NAN;
  }
  return bytes / (t->median_ms * 1e-3) / 1e9;
}

static bool is_gpu(const bench_config *cfg) { return cfg->device == BENCH_DEVICE_CUDA; }

/* The bandwidth a row is compared with: its floor on the CPU, the run's
 * copy on the GPU. */
static double reference_gbps(const bench_report_info *info, const bench_row *row) {
  if (row->floor.reps == 0 || !(row->floor.min_ms > 0.0)) {
    return info->copy_gbps;
  }
  /* The fastest floor sample: what the memory did at best during the row
   * (a descheduled thread slows a sample, nothing speeds one up). */
  return row->bytes / (row->floor.min_ms * 1e-3) / 1e9;
}

void bench_report_begin(const bench_config *cfg, const bench_report_info *info) {
  if (cfg->csv) {
    printf("device,n,c,h,w,layout,dtype,op,pass,bytes,copy_gbps,"
           "fused_reps,fused_ms,fused_min_ms,fused_gbps,fused_copy_frac,"
           "unfused_reps,unfused_ms,unfused_min_ms,unfused_gbps,"
           "spatial_reps,spatial_ms,spatial_gbps,fused_over_unfused,speedup,"
           "floor_reps,floor_ms,unfused_copy_frac,note,device_desc\n");
    fflush(stdout);
    return;
  }
  printf("fusedbn-bench (libfusedbn %d.%d.%d)\n", fbn_version() / 10000, fbn_version() / 100 % 100,
         fbn_version() % 100);
  if (cfg->fallback_reason[0] != '\0') {
    printf("note:     --device auto fell back to the CPU: %s\n", cfg->fallback_reason);
  }
  printf("device:   %s\n", info->device_desc);
  printf("unfused:  %s\n", info->baseline_desc);
  if (is_gpu(cfg)) {
    printf("copy:     %.1f GB/s (%s)\n", info->copy_gbps, info->copy_desc);
  } else {
    printf("floor:    %s\n", info->copy_desc);
  }
  printf("timing:   median of `reps` timed runs%s; each pass first runs once untimed for the "
         "agreement check (note), then %d more warm-up run(s)%s\n",
         is_gpu(cfg) ? "" : " (fused, unfused and floor in turn)", cfg->warmup,
         cfg->quick ? " (--quick)" : "");
  printf("GB/s:     minimum bytes moved / median time; forward counts 3 tensors for bn_add_relu\n"
         "          (x, addend, y; training reads x once where its statistics and its\n"
         "          normalization share the caches), 2 for bn_relu and bn (x, y); backward 5 for\n"
         "          bn_add_relu (x, y, dy read; dx, daddend written), 4 for bn_relu (x, y, dy;\n"
         "          dx), 3 for bn (x, dy; dx)\n");
  if (is_gpu(cfg)) {
    printf("%%copy:    fused GB/s / copy GB/s;  f/unf: fused ms / unfused ms (< 1: fused is "
           "faster);  speedup: unfused ms / fused ms\n\n");
  } else {
    printf("floor ms: the fastest of the row's floor samples;  %%floor: GB/s / the floor's GB/s "
           "(= floor ms / ms);\n          \"-\" where calls under %.1f ms are timed in batches "
           "(their data stays in the caches)\n",
           BENCH_CPU_MIN_SAMPLE_S * 1e3);
    printf("f/unf:    fused ms / unfused ms (< 1: fused is faster);  speedup: unfused ms / fused "
           "ms\n\n");
  }
  const char *ref = is_gpu(cfg) ? "%copy" : "%floor";
  printf("%-17s %-6s %-8s %-11s %-9s %4s %10s %7s %6s %11s %7s", "shape", "layout", "dtype", "op",
         "pass", "reps", "fused ms", "GB/s", ref, "unfused ms", "GB/s");
  if (is_gpu(cfg)) {
    printf(" %11s %7s", "spatial ms", "GB/s");
  } else {
    printf(" %6s %9s", ref, "floor ms");
  }
  printf(" %6s %7s  %s\n", "f/unf", "speedup", "note");
  fflush(stdout);
}

static void print_ms_text(const bench_timing *t, double bytes, int ms_width) {
  if (t->reps == 0) {
    printf(" %*s %7s", ms_width, "-", "-");
    return;
  }
  const double g = gbps(bytes, t);
  printf(" %*.4g %7.1f", ms_width, t->median_ms, g);
}

/* ",\"text\"", doubling any quote in text. */
static void print_quoted_csv(const char *text) {
  printf(",\"");
  for (const char *q = text; *q != '\0'; q++) {
    printf(*q == '"' ? "\"\"" : "%c", *q);
  }
  printf("\"");
}

static void print_opt_csv(const bench_timing *t, double value, int precision) {
  if (t->reps == 0 || isnan(value)) {
    printf(",");
  } else {
    printf(",%.*f", precision, value);
  }
}

void bench_report_row(const bench_config *cfg, const bench_report_info *info,
                      const bench_row *row) {
  const double fused_gbps = gbps(row->bytes, &row->fused);
  const double ref_gbps = reference_gbps(info, row);
  const double copy_frac = fused_gbps / ref_gbps;
  const double unfused_frac = gbps(row->bytes, &row->unfused) / ref_gbps;
  const bool have_ratio = row->fused.reps > 0 && row->unfused.reps > 0;
  const double ratio = have_ratio ? row->fused.median_ms / row->unfused.median_ms : NAN;
  const double speedup = have_ratio ? row->unfused.median_ms / row->fused.median_ms : NAN;

  if (cfg->csv) {
    printf("%s,%lld,%lld,%lld,%lld,%s,%s,%s,%s,%.0f", is_gpu(cfg) ? "cuda" : "cpu",
           (long long)row->shape.n, (long long)row->shape.c, (long long)row->shape.h,
           (long long)row->shape.w, bench_layout_name(row->layout), bench_dtype_name(row->dtype),
           fbn_operation_name(row->op), bench_pass_name(row->pass), row->bytes);
    if (isnan(ref_gbps)) {
      printf(",");
    } else {
      printf(",%.3f", ref_gbps);
    }
    printf(",%d", row->fused.reps);
    print_opt_csv(&row->fused, row->fused.median_ms, 6);
    print_opt_csv(&row->fused, row->fused.min_ms, 6);
    print_opt_csv(&row->fused, fused_gbps, 3);
    print_opt_csv(&row->fused, copy_frac, 4);
    printf(",%d", row->unfused.reps);
    print_opt_csv(&row->unfused, row->unfused.median_ms, 6);
    print_opt_csv(&row->unfused, row->unfused.min_ms, 6);
    print_opt_csv(&row->unfused, gbps(row->bytes, &row->unfused), 3);
    printf(",%d", row->spatial.reps);
    print_opt_csv(&row->spatial, row->spatial.median_ms, 6);
    print_opt_csv(&row->spatial, gbps(row->bytes, &row->spatial), 3);
    print_opt_csv(&row->fused, ratio, 4);
    print_opt_csv(&row->fused, speedup, 4);
    printf(",%d", row->floor.reps);
    print_opt_csv(&row->floor, row->floor.min_ms, 6);
    print_opt_csv(&row->unfused, unfused_frac, 4);
    /* The note and the machine are free text. */
    print_quoted_csv(row->note);
    print_quoted_csv(info->device_desc);
    printf("\n");
    fflush(stdout);
    return;
  }

  char shape[64];
  snprintf(shape, sizeof shape, "(%lld,%lld,%lld,%lld)", (long long)row->shape.n,
           (long long)row->shape.c, (long long)row->shape.h, (long long)row->shape.w);
  printf("%-17s %-6s %-8s %-11s %-9s %4d", shape, bench_layout_name(row->layout),
         bench_dtype_name(row->dtype), fbn_operation_name(row->op), bench_pass_name(row->pass),
         row->fused.reps);
  print_ms_text(&row->fused, row->bytes, 10);
  if (row->fused.reps > 0 && !isnan(copy_frac)) {
    printf(" %5.1f%%", 100.0 * copy_frac);
  } else {
    printf(" %6s", "-");
  }
  print_ms_text(&row->unfused, row->bytes, 11);
  if (is_gpu(cfg)) {
    print_ms_text(&row->spatial, row->bytes, 11);
  } else {
    if (row->unfused.reps > 0 && row->floor.reps > 0) {
      printf(" %5.1f%%", 100.0 * unfused_frac);
    } else {
      printf(" %6s", "-");
    }
    if (row->floor.reps > 0) {
      printf(" %9.4g", row->floor.min_ms);
    } else {
      printf(" %9s", "-");
    }
  }
  if (have_ratio) {
    printf(" %6.2f %6.2fx", ratio, speedup);
  } else {
    printf(" %6s %7s", "-", "-");
  }
  printf("  %s\n", row->note);
  fflush(stdout);
}

void bench_report_end(const bench_config *cfg) {
  if (!cfg->csv) {
    printf("\n");
  }
  fflush(stdout);
}
