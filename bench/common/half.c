/*
 * The benchmarks' float16 and bfloat16 conversions (bench_common.h): the
 * data they write and the values they compare. Not timed.
 */
#include <math.h>
#include <string.h>

#include "bench_common.h"

static uint16_t shift_round_even(uint32_t value, int shift) {
  const uint32_t q = value >> shift;
  const uint32_t rem = value & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  return (uint16_t)(q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u));
}

uint16_t bench_float_to_half(double v) {
  const float f = (float)v;
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  const uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
  const int exp = (int)((bits >> 23) & 0xffu);
  uint32_t mant = bits & 0x7fffffu;
  if (exp == 0xff) {
    return (uint16_t)(sign | 0x7c00u | (mant != 0 ? 0x200u : 0u));
  }
  const int e = exp - 127 + 15;
  if (e >= 31) {
    return (uint16_t)(sign | 0x7c00u);
  }
  if (e <= 0) {
    if (e < -10) {
      return sign;
    }
    mant |= 0x800000u; /* subnormal half: bits = value * 2^24 = mant >> (14 - e) */
    return (uint16_t)(sign | shift_round_even(mant, 14 - e));
  }
  /* Rounding may carry into the exponent, up to infinity: both correct. */
  return (uint16_t)(sign | shift_round_even(((uint32_t)e << 23) | mant, 13));
}

uint16_t bench_float_to_bfloat16(double v) {
  const float f = (float)v;
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  if (isnan(f)) {
    return (uint16_t)(((bits >> 16) & 0x8000u) | 0x7fc0u);
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
}

double bench_half_to_double(uint16_t h) {
  const int sign = (h >> 15) & 1;
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  double v;
  if (exp == 0) {
    v = ldexp((double)mant, -24);
  } else if (exp == 31) {
    v = mant != 0 ? NAN : INFINITY;
  } else {
    v = ldexp((double)(mant | 0x400), exp - 25);
  }
  return sign ? -v : v;
}

double bench_bfloat16_to_double(uint16_t b) {
  const uint32_t bits = (uint32_t)b << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return (double)f;
}

void bench_fill_half(uint16_t *p, size_t count, bool bfloat16, double offset, double scale,
                     bench_rng *rng) {
  for (size_t i = 0; i < count; i++) {
    const double v = offset + scale * bench_rng_uniform(rng);
    p[i] = bfloat16 ? bench_float_to_bfloat16(v) : bench_float_to_half(v);
  }
}
