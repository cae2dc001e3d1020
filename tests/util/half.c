/* float <-> IEEE half and bfloat16, round to nearest even. */
#include <math.h>
#include <string.h>

#include "fbn_testutil.h"

static uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

static float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

uint16_t fbnt_float_to_half(float f) {
  uint32_t bits = float_bits(f);
  uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
  int32_t exp = (int32_t)((bits >> 23) & 0xffu);
  uint32_t mant = bits & 0x7fffffu;

  if (exp == 255) { /* inf or NaN (keep NaN quiet) */
    return (uint16_t)(sign | 0x7c00u | (mant != 0 ? 0x200u | (mant >> 13) : 0u));
  }
  int32_t e = exp - 127 + 15;
  if (e >= 31) {
    return (uint16_t)(sign | 0x7c00u);
  }
  if (e <= 0) { /* half subnormal or zero */
    if (e < -10) {
      return sign;
    }
    uint32_t full = mant | 0x800000u;
    uint32_t shift = (uint32_t)(14 - e);
    uint32_t h = full >> shift;
    uint32_t rem = full & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (h & 1u))) {
      h++;
    }
    return (uint16_t)(sign | h);
  }
  uint32_t h = ((uint32_t)e << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) {
    h++; /* may carry into the exponent, up to infinity: correct */
  }
  return (uint16_t)(sign | h);
}

float fbnt_half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    float v = ldexpf((float)mant, -24);
    return sign ? -v : v;
  }
  if (exp == 31) {
    return bits_float(sign | 0x7f800000u | (mant << 13));
  }
  return bits_float(sign | ((exp - 15u + 127u) << 23) | (mant << 13));
}

uint16_t fbnt_float_to_bfloat16(float f) {
  uint32_t bits = float_bits(f);
  if (isnan(f)) {
    return (uint16_t)((bits >> 16) | 0x40u);
  }
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return (uint16_t)((bits + rounding) >> 16);
}

float fbnt_bfloat16_to_float(uint16_t b) {
  return bits_float((uint32_t)b << 16);
}
