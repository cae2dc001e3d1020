/*
 * fusedbn-bench: how the unfused CPU baseline's passes are threaded and
 * compiled, the same way as the library's fast CPU backend: one thread (no
 * OpenMP region at all) for tensors under 64Ki elements, else every OpenMP
 * thread, each a contiguous range of rows; inner loops `omp simd`, built for
 * x86-64-v3 (AVX2, FMA) and the baseline and chosen at load time where GCC
 * can (target_clones on x86-64 ELF Linux).
 */
#ifndef FUSEDBN_BENCH_PARALLEL_H
#define FUSEDBN_BENCH_PARALLEL_H

#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bench_common.h"

#define BENCH_STR(...) #__VA_ARGS__
#ifdef _OPENMP
#define BENCH_OMP(...) _Pragma(BENCH_STR(omp __VA_ARGS__))
#else
#define BENCH_OMP(...)
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__) && \
    defined(__linux__)
#define BENCH_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define BENCH_CLONES
#endif

#define BENCH_ALWAYS_INLINE inline __attribute__((always_inline))

/* Elements of the staging buffer of a streamed (non-temporal) output. */
#define BENCH_STAGE_ELEMS 1024

/* Tensors with fewer elements run on one thread (as the library). */
#define BENCH_PARALLEL_MIN (64 * 1024)

static inline int bench_parallel_threads(int64_t numel) {
  return numel < BENCH_PARALLEL_MIN ? 1 : bench_threads();
}

static inline int bench_thread_num(void) {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

static inline int bench_num_threads(void) {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

/* Run CALL, an expression using the int64_t variables `begin`, `end` and
 * the int `tid`, over [0, total): inline when nt <= 1, else split
 * statically over nt threads. */
#define BENCH_PARALLEL_RANGE(nt, total, CALL)                                                   \
  do {                                                                                          \
    const int64_t total_ = (total);                                                             \
    if ((nt) <= 1) {                                                                            \
      const int64_t begin = 0, end = total_;                                                    \
      const int tid = 0;                                                                        \
      (void)tid;                                                                                \
      CALL;                                                                                     \
    } else {                                                                                    \
      BENCH_OMP(parallel num_threads(nt))                                                       \
      {                                                                                         \
        const int tid = bench_thread_num();                                                     \
        const int64_t nth = bench_num_threads();                                                \
        const int64_t begin = total_ * tid / nth, end = total_ * (tid + 1) / nth;               \
        CALL;                                                                                   \
      }                                                                                         \
    }                                                                                           \
  } while (0)

#endif /* FUSEDBN_BENCH_PARALLEL_H */
