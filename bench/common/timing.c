/*
 * Clock, medians and quantiles of the benchmark harness.
 */
#include <math.h>
#include <stdlib.h>
#include <time.h>

#include "bench_common.h"

double bench_now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int bench_cmp_double(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

double bench_median(double *values, int count) {
  if (count <= 0)
    return NAN;
  qsort(values, (size_t)count, sizeof(double), bench_cmp_double);
  if (count % 2 == 1)
    return values[count / 2];
  return 0.5 * (values[count / 2 - 1] + values[count / 2]);
}

double bench_min(const double *values, int count) {
  double m = INFINITY;
  for (int i = 0; i < count; i++)
    if (values[i] < m)
      m = values[i];
  return m;
}

double bench_quantile(double *values, int count, double q) {
  if (count <= 0)
    return NAN;
  qsort(values, (size_t)count, sizeof(double), bench_cmp_double);
  int i = (int)(q * (double)(count - 1));
  i = i < 0 ? 0 : i >= count ? count - 1 : i;
  return values[i];
}
