/*
 * Clock and medians shared by the benchmark programs (fusedbn-bench,
 * fbn-peers-bench, fbn-ab). Header-only: the three link nothing in common
 * (fbn-ab dlopen()s the library it times).
 */
#ifndef FBN_BENCH_TIME_H
#define FBN_BENCH_TIME_H

#include <math.h>
#include <stdlib.h>
#include <time.h>

/* Monotonic wall clock in seconds. */
static inline double bench_now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* qsort comparison of doubles, ascending. */
static inline int bench_cmp_double(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Median of values[0..count) (sorts the array in place); NaN for none. */
static inline double bench_median(double *values, int count) {
  if (count <= 0)
    return NAN;
  qsort(values, (size_t)count, sizeof(double), bench_cmp_double);
  if (count % 2 == 1)
    return values[count / 2];
  return 0.5 * (values[count / 2 - 1] + values[count / 2]);
}

#endif /* FBN_BENCH_TIME_H */
