/*
 * src/core/half.h, fusedbn's half-precision rule, against a slow rounding
 * that is right by construction: the finite non-negative values of a format
 * are listed in order from their fields (mantissa * 2^exponent, no bit
 * tricks), a value v is placed between its neighbours a <= |v| < b by binary
 * search, and the result is a if |v| is below their midpoint, b above it, the
 * even one on the midpoint (the midpoint of two neighbours has one bit more
 * than the format, so it is exact in double). Past the largest finite value
 * the next value is the one the format would have with an unbounded exponent
 * (2^16 for float16, 2^128 for bfloat16), whose encoding is +Inf: IEEE 754's
 * overflow rule.
 *
 * Cases: all 65536 float16 and bfloat16 patterns widen to the value of their
 * fields and narrow back to themselves (NaNs: quiet, sign and payload kept);
 * float -> half and double -> half on random bit patterns, on random values
 * spread over the formats' exponent range, on every midpoint between
 * neighbours (ties) and one double/float step either side of it, on doubles
 * just above a midpoint by less than a float step (the double rounding that
 * going through float would make), on the overflow thresholds, the subnormal
 * boundaries and NaN payloads.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "core/half.h"
#include "fbn_testutil.h"

typedef struct format {
  const char *name;
  int exp_bits;
  int mant_bits;
  uint16_t (*from_double)(double);
  uint16_t (*from_float)(float);
  float (*to_float)(uint16_t);
  double (*to_double)(uint16_t);
  /* Values of the patterns 0 .. inf_bits (the last one: 2^(bias+1), the
   * overflow neighbour), increasing. */
  double table[0x7f81];
  uint16_t inf_bits;
} format;

static format float16 = {"float16", 5, 10, fbn_double_to_half, fbn_float_to_half,
                         fbn_half_to_float, fbn_half_to_double, {0}, 0x7c00u};
static format bfloat16 = {"bfloat16", 8, 7, fbn_double_to_bfloat16, fbn_float_to_bfloat16,
                          fbn_bfloat16_to_float, fbn_bfloat16_to_double, {0}, 0x7f80u};

/* The value of a non-negative finite pattern from its fields (or, for the
 * Inf pattern, 2^(bias+1)). */
static double field_value(const format *fmt, uint16_t bits) {
  int bias = (1 << (fmt->exp_bits - 1)) - 1;
  int exp = bits >> fmt->mant_bits;
  int mant = bits & ((1 << fmt->mant_bits) - 1);
  if (exp == 0) {
    return ldexp((double)mant, 1 - bias - fmt->mant_bits);
  }
  return ldexp((double)((1 << fmt->mant_bits) + mant), exp - bias - fmt->mant_bits);
}

static void build_table(format *fmt) {
  for (uint32_t b = 0; b <= fmt->inf_bits; b++) {
    fmt->table[b] = field_value(fmt, (uint16_t)b);
  }
}

static uint64_t dbits(double v) {
  uint64_t u;
  memcpy(&u, &v, sizeof u);
  return u;
}

static double bits_double(uint64_t u) {
  double v;
  memcpy(&v, &u, sizeof v);
  return v;
}

static uint32_t fbits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

static float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* The slow rounding of the header comment. */
static uint16_t slow_round(const format *fmt, double v) {
  uint64_t u = dbits(v);
  uint16_t sign = (uint16_t)((u >> 48) & 0x8000u);
  if (isnan(v)) {
    uint16_t payload = (uint16_t)((u & 0xfffffffffffffull) >> (52 - fmt->mant_bits));
    return (uint16_t)(sign | fmt->inf_bits | (1u << (fmt->mant_bits - 1)) | payload);
  }
  double a = fabs(v);
  if (a >= fmt->table[fmt->inf_bits]) {
    return (uint16_t)(sign | fmt->inf_bits); /* includes Inf */
  }
  /* Largest lo with table[lo] <= a. */
  uint32_t lo = 0, hi = fmt->inf_bits;
  while (hi - lo > 1) {
    uint32_t mid = (lo + hi) / 2;
    if (fmt->table[mid] <= a) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  if (fmt->table[lo] == a) {
    return (uint16_t)(sign | lo);
  }
  double midpoint = (fmt->table[lo] + fmt->table[hi]) / 2;
  uint32_t r;
  if (a < midpoint) {
    r = lo;
  } else if (a > midpoint) {
    r = hi;
  } else {
    r = (lo & 1u) ? hi : lo;
  }
  return (uint16_t)(sign | r);
}

static int failures;

static void check_double(const format *fmt, double v) {
  uint16_t want = slow_round(fmt, v);
  uint16_t got = fmt->from_double(v);
  if (got != want && failures++ < 20) {
    print_error("%s: double %a (bits 0x%016llx) -> 0x%04x, want 0x%04x\n", fmt->name, v,
                (unsigned long long)dbits(v), got, want);
  }
}

static void check_float(const format *fmt, float f) {
  uint16_t want = slow_round(fmt, (double)f);
  uint16_t got = fmt->from_float(f);
  if (got != want && failures++ < 20) {
    print_error("%s: float %a (bits 0x%08x) -> 0x%04x, want 0x%04x\n", fmt->name, (double)f,
                fbits(f), got, want);
  }
  check_double(fmt, (double)f);
}

static void check_value(const format *fmt, double v) {
  check_double(fmt, v);
  check_double(fmt, -v);
  float f = (float)v;
  check_float(fmt, f);
  check_float(fmt, -f);
}

static int setup(void **state) {
  (void)state;
  build_table(&float16);
  build_table(&bfloat16);
  return 0;
}

/* Every pattern widens to its fields' value (exactly, as float and as
 * double) and narrows back to itself; NaN patterns widen to a quiet NaN with
 * their sign and payload and narrow back to the pattern with the quiet bit
 * set. */
static void all_patterns(const format *fmt) {
  failures = 0;
  uint16_t quiet = (uint16_t)(1u << (fmt->mant_bits - 1));
  uint16_t mant_mask = (uint16_t)((1u << fmt->mant_bits) - 1u);
  for (uint32_t b = 0; b <= 0xffffu; b++) {
    uint16_t h = (uint16_t)b;
    uint16_t mag = h & 0x7fffu;
    float f = fmt->to_float(h);
    double d = fmt->to_double(h);
    bool is_nan = (mag & fmt->inf_bits) == fmt->inf_bits && (mag & mant_mask) != 0;
    if (is_nan) {
      uint32_t fb = fbits(f);
      uint32_t want_fb = ((uint32_t)(h & 0x8000u) << 16) | 0x7f800000u | 0x400000u |
                         ((uint32_t)(h & mant_mask) << (23 - fmt->mant_bits));
      if ((fb != want_fb || !isnan(d) || !signbit(d) != !signbit(f)) && failures++ < 20) {
        print_error("%s: NaN 0x%04x widens to 0x%08x, want 0x%08x\n", fmt->name, h, fb, want_fb);
      }
      uint16_t back = fmt->from_float(f);
      uint16_t back_d = fmt->from_double(d);
      if ((back != (h | quiet) || back_d != (h | quiet)) && failures++ < 20) {
        print_error("%s: NaN 0x%04x -> 0x%04x (float) 0x%04x (double), want 0x%04x\n", fmt->name,
                    h, back, back_d, (uint16_t)(h | quiet));
      }
      continue;
    }
    double want = fmt->table[mag];
    if (mag == fmt->inf_bits) {
      want = INFINITY;
    }
    if (h & 0x8000u) {
      want = -want;
    }
    if ((dbits((double)f) != dbits(want) || dbits(d) != dbits(want)) && failures++ < 20) {
      print_error("%s: 0x%04x widens to %a / %a, want %a\n", fmt->name, h, (double)f, d, want);
    }
    uint16_t back = fmt->from_float(f);
    uint16_t back_d = fmt->from_double(d);
    if ((back != h || back_d != h) && failures++ < 20) {
      print_error("%s: 0x%04x -> %a -> 0x%04x (float) 0x%04x (double)\n", fmt->name, h, want, back,
                  back_d);
    }
  }
  assert_int_equal(failures, 0);
}

static void test_half_float16_all_patterns_round_trip(void **state) {
  (void)state;
  all_patterns(&float16);
}

static void test_half_bfloat16_all_patterns_round_trip(void **state) {
  (void)state;
  all_patterns(&bfloat16);
}

/* Every midpoint between neighbours (the ties), one step of double and of
 * float either side of it, and the neighbours themselves. */
static void midpoints(const format *fmt) {
  failures = 0;
  for (uint32_t b = 0; b < fmt->inf_bits; b++) {
    double lo = fmt->table[b], hi = fmt->table[b + 1];
    double m = (lo + hi) / 2;
    check_value(fmt, m);
    check_value(fmt, nextafter(m, 0.0));
    check_value(fmt, nextafter(m, INFINITY));
    float mf = (float)m;
    assert_true((double)mf == m); /* a midpoint has mant_bits + 2 bits */
    check_float(fmt, nextafterf(mf, 0.0f));
    check_float(fmt, nextafterf(mf, INFINITY));
    check_float(fmt, -nextafterf(mf, INFINITY));
    check_value(fmt, lo);
    check_value(fmt, (lo + m) / 2);
    check_value(fmt, (m + hi) / 2);
  }
  assert_int_equal(failures, 0);
}

static void test_half_float16_ties_and_neighbours(void **state) {
  (void)state;
  midpoints(&float16);
}

static void test_half_bfloat16_ties_and_neighbours(void **state) {
  (void)state;
  midpoints(&bfloat16);
}

/* A double just above a midpoint whose nearest float is the midpoint
 * itself: rounding through float would tie to even (down for an even lower
 * neighbour); rounded once from double it goes up. */
static void no_double_rounding(const format *fmt) {
  failures = 0;
  for (uint32_t b = 0; b < fmt->inf_bits; b += 2) { /* even lower neighbour */
    double lo = fmt->table[b], hi = fmt->table[b + 1];
    double m = (lo + hi) / 2;
    double above = m + ldexp(m == 0 ? 1.0 : m, -40);
    assert_true((double)(float)above == m);
    uint16_t got = fmt->from_double(above);
    if (got != (uint16_t)(b + 1) && failures++ < 20) {
      print_error("%s: %a (above the midpoint of 0x%04x and 0x%04x) -> 0x%04x\n", fmt->name, above,
                  b, b + 1, got);
    }
    check_value(fmt, above);
    /* An odd lower neighbour: just below the midpoint stays down. */
    if (b + 2 < fmt->inf_bits) {
      double lo2 = fmt->table[b + 1], hi2 = fmt->table[b + 2];
      double m2 = (lo2 + hi2) / 2;
      double under = m2 - ldexp(m2, -40);
      assert_true((double)(float)under == m2);
      got = fmt->from_double(under);
      if (got != (uint16_t)(b + 1) && failures++ < 20) {
        print_error("%s: %a (below the midpoint of 0x%04x and 0x%04x) -> 0x%04x\n", fmt->name,
                    under, b + 1, b + 2, got);
      }
      check_value(fmt, under);
    }
  }
  assert_int_equal(failures, 0);
}

static void test_half_float16_double_rounds_once(void **state) {
  (void)state;
  no_double_rounding(&float16);
}

static void test_half_bfloat16_double_rounds_once(void **state) {
  (void)state;
  no_double_rounding(&bfloat16);
}

/* The named edges, with their expected patterns written out. */
static void test_half_edges(void **state) {
  (void)state;
  /* float16 overflow: 65504 is the largest; [65504, 65520) rounds to it,
   * 65520 (the midpoint, tie to the even Inf pattern) and up to Inf. */
  assert_int_equal(fbn_double_to_half(65504.0), 0x7bff);
  assert_int_equal(fbn_double_to_half(nextafter(65520.0, 0.0)), 0x7bff);
  assert_int_equal(fbn_double_to_half(65520.0), 0x7c00);
  assert_int_equal(fbn_double_to_half(-65520.0), 0xfc00);
  assert_int_equal(fbn_float_to_half(65520.0f), 0x7c00);
  assert_int_equal(fbn_float_to_half(nextafterf(65520.0f, 0.0f)), 0x7bff);
  assert_int_equal(fbn_double_to_half(1e300), 0x7c00);
  assert_int_equal(fbn_double_to_half(-INFINITY), 0xfc00);
  assert_int_equal(fbn_float_to_half(3.4e38f), 0x7c00);
  /* float16 subnormals: 2^-24 the smallest, 2^-25 a tie to 0, just above it
   * up; the largest subnormal and the carry into the smallest normal. */
  assert_int_equal(fbn_double_to_half(ldexp(1.0, -24)), 0x0001);
  assert_int_equal(fbn_double_to_half(ldexp(1.0, -25)), 0x0000);
  assert_int_equal(fbn_double_to_half(-ldexp(1.0, -25)), 0x8000);
  assert_int_equal(fbn_double_to_half(nextafter(ldexp(1.0, -25), 1.0)), 0x0001);
  assert_int_equal(fbn_double_to_half(ldexp(3.0, -25)), 0x0002); /* 1.5 ulp: tie to even */
  assert_int_equal(fbn_double_to_half(ldexp(1023.0, -24)), 0x03ff);
  assert_int_equal(fbn_double_to_half(ldexp(2047.0, -25)), 0x0400); /* tie: up to even */
  assert_int_equal(fbn_double_to_half(ldexp(1.0, -14)), 0x0400);
  assert_int_equal(fbn_double_to_half(4.9e-324), 0x0000);
  assert_int_equal(fbn_double_to_half(-4.9e-324), 0x8000);
  assert_int_equal(fbn_double_to_half(-0.0), 0x8000);
  assert_true(fbn_half_to_float(0x0001) == ldexpf(1.0f, -24));
  assert_true(fbn_half_to_float(0x03ff) == ldexpf(1023.0f, -24));
  assert_true(signbit(fbn_half_to_float(0x8000)));
  /* bfloat16: largest finite, overflow threshold 2^128 - 2^119 (a float
   * just below it rounds down), subnormals of float's range. */
  assert_int_equal(fbn_float_to_bfloat16(bits_float(0x7f7f0000u)), 0x7f7f);
  assert_int_equal(fbn_float_to_bfloat16(bits_float(0x7f7f7fffu)), 0x7f7f);
  assert_int_equal(fbn_float_to_bfloat16(bits_float(0x7f7f8000u)), 0x7f80); /* tie to Inf */
  assert_int_equal(fbn_double_to_bfloat16(ldexp(1.0, 128) - ldexp(1.0, 119)), 0x7f80);
  assert_int_equal(fbn_double_to_bfloat16(nextafter(ldexp(1.0, 128) - ldexp(1.0, 119), 0.0)),
                   0x7f7f);
  assert_int_equal(fbn_float_to_bfloat16(bits_float(0x00000001u)), 0x0000);
  assert_int_equal(fbn_float_to_bfloat16(bits_float(0x00008000u)), 0x0000); /* tie to even */
  assert_int_equal(fbn_float_to_bfloat16(bits_float(0x00008001u)), 0x0001);
  assert_int_equal(fbn_float_to_bfloat16(bits_float(0x00018000u)), 0x0002);
  assert_int_equal(fbn_double_to_bfloat16(ldexp(1.0, -133)), 0x0001);
  assert_int_equal(fbn_double_to_bfloat16(ldexp(1.0, -134)), 0x0000);
  assert_int_equal(fbn_double_to_bfloat16(nextafter(ldexp(1.0, -134), 1.0)), 0x0001);
  assert_int_equal(fbn_double_to_bfloat16(1e300), 0x7f80);
  assert_int_equal(fbn_double_to_bfloat16(-1e300), 0xff80);
  /* NaN: quiet, sign and high payload bits kept, never Inf. */
  assert_int_equal(fbn_float_to_half(bits_float(0x7f800001u)), 0x7e00);      /* low payload */
  assert_int_equal(fbn_float_to_half(bits_float(0xff802000u)), 0xfe01);      /* signalling */
  assert_int_equal(fbn_float_to_half(bits_float(0x7fffe000u)), 0x7fff);
  assert_int_equal(fbn_double_to_half(bits_double(0x7ff0000000000001ull)), 0x7e00);
  assert_int_equal(fbn_double_to_half(bits_double(0xfff0040000000000ull)), 0xfe01);
  assert_int_equal(fbn_float_to_bfloat16(bits_float(0x7f800001u)), 0x7fc0);
  assert_int_equal(fbn_float_to_bfloat16(bits_float(0xff810000u)), 0xffc1);
  assert_int_equal(fbn_double_to_bfloat16(bits_double(0xfff0200000000000ull)), 0xffc1);
  assert_true(isnan(fbn_half_to_float(0x7c01)));
  assert_int_equal(fbits(fbn_half_to_float(0xfc01)), 0xffc02000u);
  assert_int_equal(fbits(fbn_bfloat16_to_float(0x7f81)), 0x7fc10000u);
}

/* Random bit patterns (all exponents, NaNs included) and random values
 * spread over each format's range, as double and as float. */
static void random_values(const format *fmt, const char *name) {
  failures = 0;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, name);
  int bias = (1 << (fmt->exp_bits - 1)) - 1;
  for (int i = 0; i < 400000; i++) {
    uint64_t u = ((uint64_t)fbnt_rng_u32(&rng) << 32) | fbnt_rng_u32(&rng);
    check_double(fmt, bits_double(u));
    check_float(fmt, bits_float(fbnt_rng_u32(&rng)));
    /* Exponent from below the smallest subnormal to past the overflow. */
    double e = fbnt_rng_uniform(&rng, -bias - fmt->mant_bits - 4, bias + 3);
    double v = ldexp(1.0 + fbnt_rng_unit(&rng), (int)floor(e));
    uint64_t vb = dbits(v) ^ (fbnt_rng_u32(&rng) & 0xfffu); /* vary the low bits */
    check_value(fmt, bits_double(vb));
  }
  assert_int_equal(failures, 0);
}

static void test_half_float16_random(void **state) {
  (void)state;
  random_values(&float16, "test_half_float16_random");
}

static void test_half_bfloat16_random(void **state) {
  (void)state;
  random_values(&bfloat16, "test_half_bfloat16_random");
}

/* The test utilities' conversions follow the same rule. */
static void test_half_testutil_same_rule(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, "test_half_testutil_same_rule");
  for (int i = 0; i < 200000; i++) {
    float f = bits_float(fbnt_rng_u32(&rng));
    assert_int_equal(fbnt_float_to_half(f), fbn_float_to_half(f));
    assert_int_equal(fbnt_float_to_bfloat16(f), fbn_float_to_bfloat16(f));
    uint16_t h = (uint16_t)fbnt_rng_u32(&rng);
    assert_int_equal(fbits(fbnt_half_to_float(h)), fbits(fbn_half_to_float(h)));
    assert_int_equal(fbits(fbnt_bfloat16_to_float(h)), fbits(fbn_bfloat16_to_float(h)));
  }
}

int main(int argc, char **argv) {
  fbnt_parse_args(argc, argv);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_half_float16_all_patterns_round_trip),
      cmocka_unit_test(test_half_bfloat16_all_patterns_round_trip),
      cmocka_unit_test(test_half_float16_ties_and_neighbours),
      cmocka_unit_test(test_half_bfloat16_ties_and_neighbours),
      cmocka_unit_test(test_half_float16_double_rounds_once),
      cmocka_unit_test(test_half_bfloat16_double_rounds_once),
      cmocka_unit_test(test_half_edges),
      cmocka_unit_test(test_half_float16_random),
      cmocka_unit_test(test_half_bfloat16_random),
      cmocka_unit_test(test_half_testutil_same_rule),
  };
  return cmocka_run_group_tests_name("half", tests, setup, NULL);
}
