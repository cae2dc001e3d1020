/*
 * The benchmark data's random numbers: xorshift64*, seeded per shape so that
 * every run of a program times the same values.
 */
#include "bench_common.h"

void bench_rng_seed(bench_rng *rng, uint64_t seed) {
  rng->state = seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
  if (rng->state == 0)
    rng->state = 1;
}

double bench_rng_uniform(bench_rng *rng) {
  uint64_t x = rng->state;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  rng->state = x;
  const uint64_t r = x * 0x2545F4914F6CDD1Dull;
  return (double)(r >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}

void bench_fill_float(float *p, size_t count, double offset, double scale, bench_rng *rng) {
  for (size_t i = 0; i < count; i++)
    p[i] = (float)(offset + scale * bench_rng_uniform(rng));
}
