/*
 * The copy floor: the fastest copy this harness knows, with the harness's
 * threads. Non-temporal stores, 256 bytes per step; each thread's slice is
 * cut into two parts copied 256 bytes of each in turn (two sets of streams
 * in flight per core, as the library's large loops read and write: up to
 * 20-30% faster than one set on 2-core AMD EPYC VMs, never slower). glibc's
 * memcpy changes strategy with the size; this loop does not, so floors of
 * every size are measured alike.
 */
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bench_common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BENCH_COPY_NT 1
#endif

/* Bytes of a step of one part; a slice is a multiple of STEP * PARTS. */
#define BENCH_COPY_STEP 256
#define BENCH_COPY_PARTS 2
#define BENCH_COPY_SLICE (BENCH_COPY_STEP * BENCH_COPY_PARTS)
/* Copies below this run on one thread. */
#define BENCH_COPY_MIN_PARALLEL ((size_t)256 << 10)

#ifdef BENCH_COPY_NT
/* V, the vector type; LOAD, STREAM its intrinsics; W, its bytes. bytes: a
 * multiple of BENCH_COPY_SLICE; dst and src 64-byte aligned. */
#define BENCH_COPY_NT_BODY(V, LOAD, STREAM, W)                                                  \
  do {                                                                                         \
    const size_t part = bytes / BENCH_COPY_PARTS;                                              \
    for (size_t i = 0; i < part; i += BENCH_COPY_STEP)                                         \
      for (size_t p = 0; p < BENCH_COPY_PARTS; p++)                                            \
        for (size_t j = p * part + i; j < p * part + i + BENCH_COPY_STEP; j += 4 * (W)) {      \
          const V a = LOAD((const V *)(src + j)), b = LOAD((const V *)(src + j + (W)));        \
          const V c = LOAD((const V *)(src + j + 2 * (W)));                                    \
          const V e = LOAD((const V *)(src + j + 3 * (W)));                                    \
          STREAM((V *)(dst + j), a);                                                           \
          STREAM((V *)(dst + j + (W)), b);                                                     \
          STREAM((V *)(dst + j + 2 * (W)), c);                                                 \
          STREAM((V *)(dst + j + 3 * (W)), e);                                                 \
        }                                                                                      \
    _mm_sfence();                                                                              \
  } while (0)

__attribute__((target("avx"))) static void copy_nt_avx(char *dst, const char *src, size_t bytes) {
  BENCH_COPY_NT_BODY(__m256i, _mm256_load_si256, _mm256_stream_si256, 32);
}

static void copy_nt_sse2(char *dst, const char *src, size_t bytes) {
  BENCH_COPY_NT_BODY(__m128i, _mm_load_si128, _mm_stream_si128, 16);
}
#undef BENCH_COPY_NT_BODY
#endif

/* [begin, end) of dst <- src, begin and end multiples of BENCH_COPY_SLICE. */
static void copy_slice(char *dst, const char *src, size_t begin, size_t end, bool avx) {
#ifdef BENCH_COPY_NT
  if (avx)
    copy_nt_avx(dst + begin, src + begin, end - begin);
  else
    copy_nt_sse2(dst + begin, src + begin, end - begin);
#else
  (void)avx;
  memcpy(dst + begin, src + begin, end - begin);
#endif
}

#ifdef BENCH_COPY_NT
__attribute__((target("avx"))) static void stream_avx(char *dst, const char *src, size_t bytes) {
  for (size_t i = 0; i < bytes; i += 32)
    _mm256_stream_si256((__m256i *)(dst + i), _mm256_loadu_si256((const __m256i *)(src + i)));
  _mm_sfence();
}
#endif

void bench_stream_store(void *dst, const void *src, size_t bytes) {
  char *d = dst;
  const char *s = src;
#ifdef BENCH_COPY_NT
  if (__builtin_cpu_supports("avx")) {
    size_t head = (32 - ((uintptr_t)d & 31)) & 31;
    head = head < bytes ? head : bytes;
    memcpy(d, s, head);
    const size_t body = (bytes - head) / 32 * 32;
    stream_avx(d + head, s + head, body);
    memcpy(d + head + body, s + head + body, bytes - head - body);
    return;
  }
#endif
  memcpy(d, s, bytes);
}

void bench_copy_init(bench_copy *c, size_t max_copy) {
  c->capacity = max_copy < BENCH_COPY_SLICE ? BENCH_COPY_SLICE : max_copy;
  c->src = bench_alloc_touched(c->capacity);
  c->dst = bench_alloc_touched(c->capacity);
  memset(c->src, 0x5a, c->capacity);
}

void bench_copy_fini(bench_copy *c) {
  bench_free(c->src);
  bench_free(c->dst);
  c->src = c->dst = NULL;
  c->capacity = 0;
}

int bench_copy_threads(size_t copy_bytes) {
  return copy_bytes < BENCH_COPY_MIN_PARALLEL ? 1 : bench_threads();
}

const char *bench_copy_method(void) {
#ifdef BENCH_COPY_NT
  return "non-temporal stores, two sets of streams per thread";
#else
  return "memcpy per thread (no non-temporal copy for this target)";
#endif
}

void bench_copy_run(bench_copy *c, size_t copy_bytes) {
  if (copy_bytes > c->capacity)
    copy_bytes = c->capacity;
  char *dst = c->dst;
  const char *src = c->src;
#ifdef BENCH_COPY_NT
  const bool avx = __builtin_cpu_supports("avx");
#else
  const bool avx = false;
#endif
  const size_t body = copy_bytes / BENCH_COPY_SLICE * BENCH_COPY_SLICE;
  const int threads = bench_copy_threads(copy_bytes);
  if (threads <= 1) {
    copy_slice(dst, src, 0, body, avx);
  } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
      const size_t t = (size_t)omp_get_thread_num(), n = (size_t)omp_get_num_threads();
      const size_t slices = body / BENCH_COPY_SLICE;
      copy_slice(dst, src, slices * t / n * BENCH_COPY_SLICE,
                 slices * (t + 1) / n * BENCH_COPY_SLICE, avx);
    }
#else
    copy_slice(dst, src, 0, body, avx);
#endif
  }
  memcpy(dst + body, src + body, copy_bytes - body);
}

double bench_copy_gbps(size_t copy_bytes, int reps, const bench_evict *e) {
  bench_copy c;
  bench_copy_init(&c, copy_bytes);
  double *samples = malloc((size_t)(reps > 0 ? reps : 1) * sizeof(double));
  if (samples == NULL) {
    bench_copy_fini(&c);
    return 0.0;
  }
  bench_copy_run(&c, copy_bytes); /* warm-up */
  for (int r = 0; r < reps; r++) {
    bench_evict_run(e);
    const double t0 = bench_now_s();
    bench_copy_run(&c, copy_bytes);
    samples[r] = bench_now_s() - t0;
  }
  const double seconds = bench_median(samples, reps);
  free(samples);
  bench_copy_fini(&c);
  return 2.0 * (double)copy_bytes / seconds / 1e9;
}
