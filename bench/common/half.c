/*
 * The benchmarks' float16 and bfloat16 conversions (bench_common.h): the
 * data they write and the values they compare. Not timed.
 */
#include "bench_common.h"
#include "core/half.h"

/* The library's core conversions (src/core/half.h): a double rounded once
 * to the 2-byte type (nearest even, NaN quiet with its sign and payload),
 * widened exactly. */
uint16_t bench_float_to_half(double v) { return fbn_double_to_half(v); }

uint16_t bench_float_to_bfloat16(double v) { return fbn_double_to_bfloat16(v); }

double bench_half_to_double(uint16_t h) { return fbn_half_to_double(h); }

double bench_bfloat16_to_double(uint16_t b) { return fbn_bfloat16_to_double(b); }

void bench_fill_half(uint16_t *p, size_t count, bool bfloat16, double offset, double scale,
                     bench_rng *rng) {
  for (size_t i = 0; i < count; i++) {
    const double v = offset + scale * bench_rng_uniform(rng);
    p[i] = bfloat16 ? bench_float_to_bfloat16(v) : bench_float_to_half(v);
  }
}
