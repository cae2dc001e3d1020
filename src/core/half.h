/*
 * fusedbn's half-precision rule, the one definition every layer uses:
 * conversions between float/double and IEEE binary16 (float16) or bfloat16,
 * as bit patterns in a uint16_t.
 *
 *   widening (half -> float, half -> double)  exact for every non-NaN value,
 *       subnormals included; a NaN stays NaN, quiet, with its sign and payload
 *   narrowing (float -> half, double -> half)  rounded ONCE to nearest, ties to
 *       even, directly from the source value (double -> float16 never goes
 *       through float: no double rounding);
 *       +-0 and +-Inf kept; a NaN stays NaN, quiet, sign kept, the payload's
 *       high bits kept;
 *       values beyond the format's range round to +-Inf as IEEE 754 says:
 *       |v| >= 65520 (halfway between 65504 and 2^16) for float16,
 *       |v| >= 2^128 - 2^119 for bfloat16;
 *       results in the subnormal range are rounded there (no flush to zero).
 *
 * Header-only, plain C, no CUDA; usable from the backends' scalar loops and as
 * the reference of vectorized conversions.
 */
#ifndef FUSEDBN_SRC_CORE_HALF_H
#define FUSEDBN_SRC_CORE_HALF_H

#include <stdint.h>
#include <string.h>

/* Round the finite or non-finite double with bits `bits` to a format of
 * 1 sign, `exp_bits` exponent and `mant_bits` mantissa bits (IEEE-style:
 * bias 2^(exp_bits-1) - 1, all-ones exponent for Inf/NaN). */
static inline uint16_t fbn_half_round_double_bits(uint64_t bits, int exp_bits, int mant_bits) {
  const uint16_t sign = (uint16_t)((bits >> 48) & 0x8000u);
  const int dexp = (int)((bits >> 52) & 0x7ffu);
  const uint64_t dmant = bits & 0xfffffffffffffull;
  const uint32_t exp_max = (1u << exp_bits) - 1u; /* Inf/NaN exponent field */
  const int bias = (int)(exp_max >> 1);
  const uint16_t inf = (uint16_t)(exp_max << mant_bits);

  if (dexp == 0x7ff) {
    if (dmant == 0) {
      return (uint16_t)(sign | inf);
    }
    /* NaN: quiet bit set, high payload bits kept. */
    uint16_t payload = (uint16_t)(dmant >> (52 - mant_bits));
    return (uint16_t)(sign | inf | (1u << (mant_bits - 1)) | payload);
  }
  if (dexp == 0) {
    /* +-0 or a double subnormal (< 2^-1022): far below half of the smallest
     * subnormal of either format, so it rounds to a signed zero. */
    return sign;
  }
  const int e = dexp - 1023;              /* unbiased exponent */
  const uint64_t sig = dmant | (1ull << 52); /* 53-bit significand */
  const int emin = 1 - bias;              /* smallest normal exponent */
  int shift;
  uint64_t base;
  if (e >= emin) {
    if (e > bias) {
      return (uint16_t)(sign | inf); /* >= 2^(bias+1): beyond any rounding */
    }
    shift = 52 - mant_bits;
    base = ((uint64_t)(e + bias) << mant_bits) | (dmant >> shift);
    uint64_t rem = dmant & ((1ull << shift) - 1u);
    uint64_t halfway = 1ull << (shift - 1);
    if (rem > halfway || (rem == halfway && (base & 1u))) {
      base++; /* may carry into the exponent, up to Inf: correct */
    }
    return (uint16_t)(sign | base);
  }
  /* Subnormal result: units of 2^(emin - mant_bits). */
  shift = (52 - mant_bits) + (emin - e);
  if (shift > 54) {
    return sign; /* below half of the smallest subnormal */
  }
  base = sig >> shift;
  uint64_t rem = sig & ((1ull << shift) - 1u);
  uint64_t halfway = 1ull << (shift - 1);
  if (rem > halfway || (rem == halfway && (base & 1u))) {
    base++; /* may carry into the smallest normal: correct */
  }
  return (uint16_t)(sign | base);
}

static inline uint64_t fbn_half_double_bits(double v) {
  uint64_t u;
  memcpy(&u, &v, sizeof u);
  return u;
}

/* double -> float16, rounded once, to nearest even. */
static inline uint16_t fbn_double_to_half(double v) {
  return fbn_half_round_double_bits(fbn_half_double_bits(v), 5, 10);
}

/* double -> bfloat16, rounded once, to nearest even. */
static inline uint16_t fbn_double_to_bfloat16(double v) {
  return fbn_half_round_double_bits(fbn_half_double_bits(v), 8, 7);
}

/* float -> float16 (float -> double is exact, so this rounds once). */
static inline uint16_t fbn_float_to_half(float f) { return fbn_double_to_half((double)f); }

/* float -> bfloat16, rounded once, to nearest even. */
static inline uint16_t fbn_float_to_bfloat16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu) != 0) {
    return (uint16_t)((u >> 16) | 0x40u); /* NaN: quiet, sign and high payload kept */
  }
  uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)((u + rounding) >> 16); /* carries into Inf past the top: correct */
}

/* float16 -> float, exact (a NaN comes back quiet). */
static inline float fbn_half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (mant << 13) | (mant != 0 ? 0x400000u : 0u);
  } else if (exp != 0) {
    u = sign | ((exp + (127u - 15u)) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {
    /* Subnormal: normalize (mant * 2^-24 = 1.f * 2^(e)). */
    int shift = 0;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      shift++;
    }
    u = sign | ((uint32_t)(127 - 14 - shift) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* bfloat16 -> float, exact (a NaN comes back quiet). */
static inline float fbn_bfloat16_to_float(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu) != 0) {
    u |= 0x400000u;
  }
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline double fbn_half_to_double(uint16_t h) { return (double)fbn_half_to_float(h); }
static inline double fbn_bfloat16_to_double(uint16_t b) { return (double)fbn_bfloat16_to_float(b); }

#endif
