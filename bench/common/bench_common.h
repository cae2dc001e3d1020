/*
 * The CPU timing harness shared by fusedbn-bench, fbn-peers-bench and
 * fbn-ab: clock and medians, a random-number generator, touched buffers,
 * cache eviction, the threaded copy floor, and the line that says which
 * machine a figure is from. It depends on neither libfusedbn nor CUDA
 * (fbn-ab dlopen()s the library it times); OpenMP when found.
 *
 *   timing.c    clock, medians, quartiles
 *   rng.c       xorshift64* generator, uniform fills
 *   half.c      float16 / bfloat16 conversions and fills (untimed)
 *   memory.c    page-touched buffers, cache eviction
 *   copy.c      the copy floor (non-temporal stores, the harness's threads)
 *   machine.c   threads, CPU model, the library's instruction-set path
 */
#ifndef FBN_BENCH_COMMON_H
#define FBN_BENCH_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- clock and statistics (timing.c) ----------------------------------- */

/* Monotonic wall clock in seconds. */
double bench_now_s(void);
/* qsort comparison of doubles, ascending. */
int bench_cmp_double(const void *a, const void *b);
/* Median of values[0..count) (sorts the array in place); NaN for none. */
double bench_median(double *values, int count);
/* Smallest of values[0..count); +infinity for none. */
double bench_min(const double *values, int count);
/* Element q * (count - 1), rounded down, of values sorted ascending
 * (sorts in place; q in [0, 1]: 0.25 and 0.75 are the quartiles). */
double bench_quantile(double *values, int count, double q);

/* ---- random numbers (rng.c) -------------------------------------------- */

typedef struct bench_rng {
  uint64_t state;
} bench_rng;

void bench_rng_seed(bench_rng *rng, uint64_t seed);
/* Uniform in [-1, 1). */
double bench_rng_uniform(bench_rng *rng);
/* p[i] = offset + scale * uniform, i in [0, count). */
void bench_fill_float(float *p, size_t count, double offset, double scale, bench_rng *rng);

/* ---- float16 and bfloat16 (half.c) -------------------------------------- */

/* IEEE binary16 / bfloat16 bits of a double (through float, then rounded to
 * nearest even; NaN stays NaN), and back. */
uint16_t bench_float_to_half(double v);
uint16_t bench_float_to_bfloat16(double v);
double bench_half_to_double(uint16_t h);
double bench_bfloat16_to_double(uint16_t b);
/* p[i] = offset + scale * uniform, rounded to float16 (bfloat16 false) or
 * bfloat16. */
void bench_fill_half(uint16_t *p, size_t count, bool bfloat16, double offset, double scale,
                     bench_rng *rng);

/* ---- buffers and cache eviction (memory.c) ------------------------------ */

/* Page-aligned buffer of `bytes`, every page written now (a first-touch page
 * fault costs microseconds and must not land in a timed region). Exits with
 * a message when out of memory. */
void *bench_alloc_touched(size_t bytes);
void bench_free(void *p);

/* A buffer read, untimed, before every timed call, so that each call starts
 * from the same state: caches holding clean lines of other data. Without it
 * a call pays for writing back the dirty lines the previous call left, and
 * a tensor smaller than the last-level cache may still be there from the
 * call before. */
typedef struct bench_evict {
  uint64_t *buf;
  size_t words;
} bench_evict;

/* 64 MiB or twice the last-level cache, whichever is larger, at most
 * 256 MiB. */
size_t bench_evict_default_bytes(void);
/* bytes == 0: no eviction (bench_evict_run does nothing). */
void bench_evict_init(bench_evict *e, size_t bytes);
/* Reads one word per 64-byte line with bench_threads() threads. */
void bench_evict_run(const bench_evict *e);
void bench_evict_fini(bench_evict *e);

/* ---- the copy floor (copy.c) -------------------------------------------- */

/* A copy of `bytes` (bytes / 2 read, bytes / 2 written) is the floor of a
 * pass that moves `bytes`: src -> dst with non-temporal stores, each thread
 * its slice, two sets of streams per thread taken 256 bytes in turn (as the
 * library's large loops read and write). bench_threads() threads from
 * 256 KiB on, one below (as the library, which runs small tensors on one
 * thread). */
typedef struct bench_copy {
  char *src, *dst;
  size_t capacity; /* bytes of each buffer */
} bench_copy;

/* Buffers for floors of up to 2 * max_copy bytes moved. */
void bench_copy_init(bench_copy *c, size_t max_copy);
void bench_copy_fini(bench_copy *c);
/* Copy `copy_bytes` (<= capacity) from src to dst. */
void bench_copy_run(bench_copy *c, size_t copy_bytes);
/* Threads bench_copy_run uses for copy_bytes. */
int bench_copy_threads(size_t copy_bytes);
/* How the copy is done, for report headers. */
const char *bench_copy_method(void);
/* Bandwidth (bytes read + written per second, median of reps) of copies
 * of copy_bytes, each after an eviction (e may be NULL). */
double bench_copy_gbps(size_t copy_bytes, int reps, const bench_evict *e);

/* dst <- src (bytes), with non-temporal stores for dst's 32-byte aligned
 * middle where the CPU has AVX (plain copies elsewhere), then a store
 * fence: how the unfused baseline writes outputs of BENCH_STREAM_MIN bytes
 * or more from a small staging buffer, as the library writes its large
 * outputs. */
void bench_stream_store(void *dst, const void *src, size_t bytes);
#define BENCH_STREAM_MIN ((size_t)8 << 20)

/* ---- the machine (machine.c) --------------------------------------------- */

/* Threads of an OpenMP region: OMP_NUM_THREADS or the cores (the library's
 * CPU backend uses as many for tensors of 64Ki elements or more); 1 without
 * OpenMP. */
int bench_threads(void);
/* "AMD EPYC 9654 96-Core Processor" from /proc/cpuinfo, or "unknown CPU". */
const char *bench_cpu_model(void);
/* The instruction-set path libfusedbn's fast CPU backend takes on this CPU
 * (it chooses at load time between loops built for x86-64-v3, i.e. AVX2 and
 * FMA, and the baseline), decided by the same rule. The harness is built by
 * the same compiler as the library. */
const char *bench_isa_path(void);
/* One line: CPU model, cores online, ISA path, threads (and OpenMP or
 * not), load average when the machine is busy. */
void bench_machine_line(char *buf, size_t size);

#endif /* FBN_BENCH_COMMON_H */
