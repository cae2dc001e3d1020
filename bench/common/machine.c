/*
 * Which machine a figure is from: CPU model, cores, threads, and the
 * instruction-set path libfusedbn's fast CPU backend takes there.
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bench_common.h"

int bench_threads(void) {
#ifdef _OPENMP
  const int t = omp_get_max_threads();
  return t < 1 ? 1 : t;
#else
  return 1;
#endif
}

const char *bench_cpu_model(void) {
  static char model[128];
  if (model[0] != '\0')
    return model;
  snprintf(model, sizeof model, "unknown CPU");
  FILE *f = fopen("/proc/cpuinfo", "r");
  if (f == NULL)
    return model;
  char line[512];
  while (fgets(line, sizeof line, f) != NULL) {
    if (strncmp(line, "model name", 10) != 0)
      continue;
    const char *colon = strchr(line, ':');
    if (colon == NULL)
      continue;
    colon++;
    while (*colon == ' ' || *colon == '\t')
      colon++;
    snprintf(model, sizeof model, "%s", colon);
    model[strcspn(model, "\n")] = '\0';
    break;
  }
  fclose(f);
  return model;
}

/* The library (src/cpu/cpu_fast.c) builds its inner loops twice, for
 * x86-64-v3 and for the baseline, with GCC's target_clones on x86-64 ELF
 * Linux, and its hand-written loops for AVX2 + FMA; the loader picks the
 * x86-64-v3 clones on CPUs that have that level, the hand-written loops run
 * where AVX2 and FMA are present. */
const char *bench_isa_path(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__) && \
    defined(__linux__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v3"))
    return "fast-backend loops: x86-64-v3 (AVX2, FMA), chosen at load time";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return "fast-backend loops: baseline x86-64, hand-written AVX2+FMA ones (no x86-64-v3)";
  return "fast-backend loops: baseline x86-64 (no AVX2+FMA on this CPU)";
#elif defined(__x86_64__)
  return "fast-backend loops: baseline x86-64 (this compiler builds no AVX2 variants)";
#else
  return "fast-backend loops: portable C (not x86-64)";
#endif
}

void bench_machine_line(char *buf, size_t size) {
  const long cores = sysconf(_SC_NPROCESSORS_ONLN);
  int used = snprintf(buf, size, "%s, %ld core(s) online; %s; %d thread(s)%s", bench_cpu_model(),
                      cores, bench_isa_path(), bench_threads(),
#ifdef _OPENMP
                      " (OpenMP)"
#else
                      " (built without OpenMP)"
#endif
  );
  /* Other processes on the cores make OpenMP barriers, and so every CPU
   * timing, erratic: say so. */
  double load = 0.0;
  FILE *f = fopen("/proc/loadavg", "r");
  if (f != NULL) {
    if (fscanf(f, "%lf", &load) != 1)
      load = 0.0;
    fclose(f);
  }
  if (used > 0 && (size_t)used < size && cores > 0 && load > 0.5 * (double)cores)
    snprintf(buf + used, size - (size_t)used, "; BUSY: load average %.1f", load);
}
