/*
 * Fast CPU backend: the kernel table, filled once (pthread_once) from the
 * CPU's features: whether the AVX2 + FMA loops of fast_avx2.h run here, and
 * the name of the loops taken. The x86-64-v3 / baseline clones of the
 * plain loops are chosen by the loader (target_clones) and need no entry.
 */
#ifndef FUSEDBN_SRC_CPU_FAST_FAST_KERNELS_H
#define FUSEDBN_SRC_CPU_FAST_FAST_KERNELS_H

#include <pthread.h>
#include <stdbool.h>

#include "cpu/fast/fast_config.h"

typedef struct fbn_fast_kernel_table {
  bool avx2;         /* the AVX2 + FMA intrinsics loops run on this CPU */
  const char *loops; /* "avx2" or "baseline" */
} fbn_fast_kernel_table;

static fbn_fast_kernel_table fbn_fast_kernel_table_once;
static pthread_once_t fbn_fast_kernel_once = PTHREAD_ONCE_INIT;

static void fbn_fast_kernels_init(void) {
  fbn_fast_kernel_table *t = &fbn_fast_kernel_table_once;
  t->avx2 = false;
#if FBN_FAST_AVX2_LOOPS
  t->avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  t->loops = t->avx2 ? "avx2" : "baseline";
}

/* The table, filled on first use by exactly one thread. */
static inline const fbn_fast_kernel_table *fbn_fast_kernels(void) {
  pthread_once(&fbn_fast_kernel_once, fbn_fast_kernels_init);
  return &fbn_fast_kernel_table_once;
}

#endif /* FUSEDBN_SRC_CPU_FAST_FAST_KERNELS_H */
