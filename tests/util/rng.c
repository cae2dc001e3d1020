/* Seeded random numbers for the tests: PCG32 (XSH RR), Box-Muller normals. */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "fbn_testutil.h"

uint64_t fbnt_seed(void) {
  static bool done;
  static uint64_t seed;
  if (!done) {
    const char *env = getenv("FBN_TEST_SEED");
    seed = FBNT_DEFAULT_SEED;
    if (env != NULL && env[0] != '\0') {
      char *end = NULL;
      unsigned long long v = strtoull(env, &end, 0);
      if (end != NULL && *end == '\0') {
        seed = (uint64_t)v;
      } else {
        fprintf(stderr, "# ignoring FBN_TEST_SEED=\"%s\" (not an integer)\n", env);
      }
    }
    done = true;
  }
  return seed;
}

void fbnt_print_seed(void) {
  fprintf(stderr, "# FBN_TEST_SEED=%" PRIu64 " (set FBN_TEST_SEED to reproduce another run)\n",
          fbnt_seed());
}

void fbnt_rng_init(fbnt_rng *rng, uint64_t seed, uint64_t stream) {
  rng->state = 0;
  rng->inc = (stream << 1) | 1u;
  rng->have_spare = false;
  rng->spare = 0.0;
  (void)fbnt_rng_u32(rng);
  rng->state += seed;
  (void)fbnt_rng_u32(rng);
}

void fbnt_rng_for_test(fbnt_rng *rng, const char *name) {
  /* FNV-1a of the name selects the stream. */
  uint64_t h = UINT64_C(1469598103934665603);
  for (const char *p = name; p != NULL && *p != '\0'; p++) {
    h ^= (unsigned char)*p;
    h *= UINT64_C(1099511628211);
  }
  fbnt_rng_init(rng, fbnt_seed() ^ (h >> 1), h);
}

uint32_t fbnt_rng_u32(fbnt_rng *rng) {
  uint64_t old = rng->state;
  rng->state = old * UINT64_C(6364136223846793005) + rng->inc;
  uint32_t xorshifted = (uint32_t)(((old >> 18u) ^ old) >> 27u);
  uint32_t rot = (uint32_t)(old >> 59u);
  return (xorshifted >> rot) | (xorshifted << ((-rot) & 31u));
}

double fbnt_rng_unit(fbnt_rng *rng) {
  uint64_t hi = fbnt_rng_u32(rng) >> 5;  /* 27 bits */
  uint64_t lo = fbnt_rng_u32(rng) >> 6;  /* 26 bits */
  return (double)((hi << 26) | lo) * 0x1p-53;
}

double fbnt_rng_uniform(fbnt_rng *rng, double lo, double hi) {
  return lo + (hi - lo) * fbnt_rng_unit(rng);
}

double fbnt_rng_normal(fbnt_rng *rng) {
  if (rng->have_spare) {
    rng->have_spare = false;
    return rng->spare;
  }
  double u1;
  do {
    u1 = fbnt_rng_unit(rng);
  } while (u1 <= 0.0);
  double u2 = fbnt_rng_unit(rng);
  double r = sqrt(-2.0 * log(u1));
  double t = 2.0 * M_PI * u2;
  rng->spare = r * sin(t);
  rng->have_spare = true;
  return r * cos(t);
}

double fbnt_rng_signed(fbnt_rng *rng, double lo, double hi) {
  double v = fbnt_rng_uniform(rng, lo, hi);
  return (fbnt_rng_u32(rng) & 1u) ? -v : v;
}
