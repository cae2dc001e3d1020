/*
 * The CPU half-precision conversion paths (src/cpu/half/): every vector
 * path this CPU has gives the portable path's results bit for bit (the
 * portable path is src/core/half.h, the library's rounding rule):
 *   widening   all 65536 float16 and all 65536 bfloat16 bit patterns
 *   narrowing  every widened pattern and its neighbours (halfway points
 *              between half values, one float ulp either side: ties and
 *              near-ties), float32 subnormals, NaNs with every payload
 *              class (quiet, signaling, both signs), the overflow
 *              thresholds, and 2^22 random float32 bit patterns
 * at every run length 0..40 and at odd offsets (the vector loops' tails).
 * Paths the CPU lacks are skipped visibly.
 */
#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/half.h"
#include "cpu/half/half_convert.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rng_u32(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return (uint32_t)(rng_state >> 16);
}

static float float_of(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
static uint32_t bits_of(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

/* The float32 inputs of the narrowing checks. */
static float *narrow_inputs(int64_t *count) {
  const int64_t random = (int64_t)1 << 22, cap = 65536 * 2 * 7 + 4096 + random;
  float *v = malloc((size_t)cap * sizeof *v);
  assert_non_null(v);
  int64_t n = 0;
  for (uint32_t h = 0; h < 65536; h++) {
    const float wf[2] = {fbn_half_to_float((uint16_t)h), fbn_bfloat16_to_float((uint16_t)h)};
    const float nf[2] = {fbn_half_to_float((uint16_t)(h + 1)),
                         fbn_bfloat16_to_float((uint16_t)(h + 1))};
    for (int k = 0; k < 2; k++) {
      v[n++] = wf[k];
      if (isfinite(wf[k]) && isfinite(nf[k]) && h != 0x7fff && h != 0xffff) {
        /* the midpoint to the next pattern (a tie when exact) and a float
         * ulp either side of it */
        const float mid = (float)(((double)wf[k] + (double)nf[k]) / 2.0);
        v[n++] = mid;
        v[n++] = nextafterf(mid, INFINITY);
        v[n++] = nextafterf(mid, -INFINITY);
        v[n++] = nextafterf(wf[k], INFINITY);
        v[n++] = nextafterf(wf[k], -INFINITY);
        v[n++] = -mid;
      }
    }
  }
  /* float32 subnormals, NaN payloads (quiet, signaling, both signs) */
  for (uint32_t k = 0; k < 256; k++) {
    v[n++] = float_of(k);
    v[n++] = float_of(0x807fffffu - k);
    v[n++] = float_of(0x7f800001u + k * 0x7fffu);
    v[n++] = float_of(0xff800001u + k * 0x7fffu);
    v[n++] = float_of(0x7fc00000u | (k << 13) | k);
    v[n++] = float_of(0xffc00000u | (k << 13) | k);
    v[n++] = float_of(0x00800000u - 1u - k * 31u); /* largest subnormals */
  }
  /* overflow thresholds */
  const float edges[] = {65504.0f, 65519.0f, 65519.996f, 65520.0f, 65536.0f, -65520.0f,
                         INFINITY, -INFINITY, 0.0f,     -0.0f,    FLT_MAX, -FLT_MAX,
                         3.3895314e38f, 3.38953139e38f, 1.0f / 16777216.0f, 1.0f / 33554432.0f,
                         5.9604645e-8f, 2.9802322e-8f, 2.9802326e-8f};
  for (size_t k = 0; k < sizeof edges / sizeof edges[0]; k++) {
    v[n++] = edges[k];
    v[n++] = nextafterf(edges[k], 0.0f);
  }
  for (int64_t k = 0; k < random; k++)
    v[n++] = float_of(rng_u32());
  assert_true(n <= cap);
  *count = n;
  return v;
}

/* The path p, or a visible skip when this CPU (or build) lacks it. */
static const fbn_half_convert *path_or_skip(fbn_half_path p) {
  const fbn_half_convert *c = fbn_half_convert_of(p);
  if (c == NULL) {
    printf("[  SKIPPED ] the %s conversion path: this CPU or build lacks it\n",
           fbn_half_path_name(p));
    skip();
  }
  printf("           path %s\n", c->name);
  return c;
}

static void check_widen(const char *what, fbn_half_widen_fn got_fn, fbn_half_widen_fn want_fn) {
  uint16_t *src = malloc(65536 * sizeof *src);
  float *got = malloc(65536 * sizeof *got), *want = malloc(65536 * sizeof *want);
  for (uint32_t h = 0; h < 65536; h++)
    src[h] = (uint16_t)h;
  memset(got, 0xa5, 65536 * sizeof *got);
  got_fn(src, got, 65536);
  want_fn(src, want, 65536);
  for (uint32_t h = 0; h < 65536; h++)
    if (bits_of(got[h]) != bits_of(want[h]))
      fail_msg("%s of 0x%04x: 0x%08x, the portable path gives 0x%08x", what, h, bits_of(got[h]),
               bits_of(want[h]));
  /* every run length and offset: the tails */
  for (int64_t off = 0; off < 3; off++)
    for (int64_t n = 0; n <= 40; n++) {
      memset(got, 0xa5, 64 * sizeof *got);
      got_fn(src + 0x7bf0 + off, got, n);
      for (int64_t i = 0; i < n; i++)
        if (bits_of(got[i]) != bits_of(want[0x7bf0 + off + i]))
          fail_msg("%s, run of %lld at offset %lld: element %lld differs", what, (long long)n,
                   (long long)off, (long long)i);
      if (bits_of(got[n]) != 0xa5a5a5a5u)
        fail_msg("%s, run of %lld: wrote past its end", what, (long long)n);
    }
  free(src);
  free(got);
  free(want);
}

static void check_narrow(const char *what, fbn_half_narrow_fn got_fn,
                         fbn_half_narrow_fn want_fn) {
  int64_t n;
  float *src = narrow_inputs(&n);
  uint16_t *got = malloc((size_t)n * sizeof *got), *want = malloc((size_t)n * sizeof *want);
  memset(got, 0xa5, (size_t)n * sizeof *got);
  got_fn(src, got, n);
  want_fn(src, want, n);
  for (int64_t i = 0; i < n; i++)
    if (got[i] != want[i])
      fail_msg("%s of %a (0x%08x): 0x%04x, the portable path gives 0x%04x", what, (double)src[i],
               bits_of(src[i]), got[i], want[i]);
  for (int64_t off = 0; off < 3; off++)
    for (int64_t len = 0; len <= 40; len++) {
      memset(got, 0xa5, 64 * sizeof *got);
      got_fn(src + 1000 + off, got, len);
      for (int64_t i = 0; i < len; i++)
        if (got[i] != want[1000 + off + i])
          fail_msg("%s, run of %lld at offset %lld: element %lld differs", what,
                   (long long)len, (long long)off, (long long)i);
      if (got[len] != 0xa5a5u)
        fail_msg("%s, run of %lld: wrote past its end", what, (long long)len);
    }
  free(src);
  free(got);
  free(want);
}

static void check_path(fbn_half_path p) {
  const fbn_half_convert *c = path_or_skip(p), *ref = fbn_half_convert_portable();
  check_widen("float16 -> float32", c->f16_to_f32, ref->f16_to_f32);
  check_widen("bfloat16 -> float32", c->bf16_to_f32, ref->bf16_to_f32);
  check_narrow("float32 -> float16", c->f32_to_f16, ref->f32_to_f16);
  check_narrow("float32 -> bfloat16", c->f32_to_bf16, ref->f32_to_bf16);
}

/* The portable path is half.h: widening exact, narrowing rounded once
 * (a few spot values whose results are known). */
static void test_half_convert_portable_is_the_rule(void **state) {
  (void)state;
  const fbn_half_convert *c = fbn_half_convert_portable();
  const float in[] = {1.0f, 65504.0f, 65520.0f, 65519.996f, 5.9604645e-8f, 2.9802322e-8f,
                      2.9802326e-8f, -0.0f, 1.00048828125f, 1.00146484375f};
  const uint16_t f16[] = {0x3c00, 0x7bff, 0x7c00, 0x7bff, 0x0001, 0x0000,
                          0x0001, 0x8000, 0x3c00, 0x3c02};
  uint16_t out[10];
  c->f32_to_f16(in, out, 10);
  for (int i = 0; i < 10; i++)
    if (out[i] != f16[i])
      fail_msg("float32 -> float16 of %a: 0x%04x, want 0x%04x", (double)in[i], out[i], f16[i]);
  const float bin[] = {1.0f, 1.00390625f, 1.005859375f, 3.4028235e38f, -1.17549435e-38f};
  const uint16_t bf16[] = {0x3f80, 0x3f80, 0x3f81, 0x7f80, 0x8080};
  c->f32_to_bf16(bin, out, 5);
  for (int i = 0; i < 5; i++)
    if (out[i] != bf16[i])
      fail_msg("float32 -> bfloat16 of %a: 0x%04x, want 0x%04x", (double)bin[i], out[i],
               bf16[i]);
}

static void test_half_convert_avx2_matches_portable(void **state) {
  (void)state;
  check_path(FBN_HALF_PATH_AVX2);
}

static void test_half_convert_avx512_matches_portable(void **state) {
  (void)state;
  check_path(FBN_HALF_PATH_AVX512);
}

/* The process's choice: FBN_CPU_HALF_PATH when the CPU has that path. */
static void test_half_convert_choice(void **state) {
  (void)state;
  const fbn_half_convert *c = fbn_half_convert_get();
  assert_non_null(c);
  const char *want = getenv("FBN_CPU_HALF_PATH");
  printf("           FBN_CPU_HALF_PATH=%s: %s\n", want != NULL ? want : "(unset)", c->name);
  for (int p = 0; p < FBN_HALF_PATH_COUNT; p++)
    if (want != NULL && strcmp(want, fbn_half_path_name((fbn_half_path)p)) == 0 &&
        fbn_half_convert_of((fbn_half_path)p) != NULL)
      assert_int_equal(c->path, p);
  if (want == NULL)
    for (int p = c->path + 1; p < FBN_HALF_PATH_COUNT; p++)
      assert_null(fbn_half_convert_of((fbn_half_path)p)); /* the best one */
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_half_convert_portable_is_the_rule),
      cmocka_unit_test(test_half_convert_avx2_matches_portable),
      cmocka_unit_test(test_half_convert_avx512_matches_portable),
      cmocka_unit_test(test_half_convert_choice),
  };
  return cmocka_run_group_tests_name("half_convert", tests, NULL, NULL);
}
