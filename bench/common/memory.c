/*
 * Page-touched buffers and the cache eviction read before every timed call.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench_common.h"

void *bench_alloc_touched(size_t bytes) {
  const size_t page = 4096;
  size_t rounded = (bytes + page - 1) / page * page;
  if (rounded == 0)
    rounded = page;
  void *p = aligned_alloc(page, rounded);
  if (p == NULL) {
    fprintf(stderr, "benchmark: out of memory allocating %zu bytes\n", bytes);
    exit(1);
  }
  memset(p, 0, rounded);
  return p;
}

void bench_free(void *p) { free(p); }

/* At most this much: virtual machines may report the whole host's L3
 * (320 MiB on a 2-core AMD EPYC guest whose share is 32 MiB), and reading
 * that much before every call would dominate the run. */
#define BENCH_EVICT_MAX ((size_t)256 << 20)

size_t bench_evict_default_bytes(void) {
  size_t bytes = (size_t)64 << 20;
#ifdef _SC_LEVEL3_CACHE_SIZE
  const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  if (l3 > 0 && 2 * (size_t)l3 > bytes)
    bytes = 2 * (size_t)l3;
#endif
  return bytes < BENCH_EVICT_MAX ? bytes : BENCH_EVICT_MAX;
}

void bench_evict_init(bench_evict *e, size_t bytes) {
  e->words = bytes / sizeof(uint64_t) / 8 * 8;
  e->buf = NULL;
  if (e->words == 0)
    return;
  e->buf = bench_alloc_touched(e->words * sizeof(uint64_t));
  for (size_t i = 0; i < e->words; i++)
    e->buf[i] = i;
}

static volatile uint64_t bench_evict_sink;

void bench_evict_run(const bench_evict *e) {
  if (e == NULL || e->words == 0)
    return;
  const uint64_t *buf = e->buf;
  const size_t words = e->words;
  uint64_t sum = 0;
#ifdef _OPENMP
  const int threads = bench_threads();
#pragma omp parallel for num_threads(threads) reduction(+ : sum) schedule(static)
#endif
  for (size_t i = 0; i < words; i += 8) /* one word per 64-byte line */
    sum += buf[i];
  bench_evict_sink = sum;
}

void bench_evict_fini(bench_evict *e) {
  bench_free(e->buf);
  e->buf = NULL;
  e->words = 0;
}
