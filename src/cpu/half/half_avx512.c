/*
 * The avx512 conversion path: AVX512F's vcvtph2ps / vcvtps2ph on 16 lanes
 * for float16 (the F16C conversions' results: half_avx2.c), and for
 * bfloat16 half.h's integer shift and round on 16 lanes. Where the CPU has
 * AVX512-BF16, float32 -> bfloat16 takes vcvtneps2bf16, which rounds to
 * nearest even and keeps NaN quiet with the payload's high bits (half.h's
 * rule) but treats subnormal inputs as zero (Intel SDM, VCVTNEPS2BF16: no
 * MXCSR, DAZ and FTZ implied): a vector holding any subnormal input (its
 * exponent field 0, mantissa not 0) is redone by the integer rounding, so
 * that the path's results are the portable path's on every input. (Normal
 * inputs never round to a bfloat16 subnormal: both formats have float32's
 * exponent range.) Tails of fewer than 16 elements take the portable
 * conversions.
 */
#include "cpu/half/half_convert.h"

#if FBN_HALF_X86
#include <immintrin.h>

#define FBN_HALF_AVX512_TARGET __attribute__((target("avx512f,avx2,f16c")))

FBN_HALF_AVX512_TARGET static void f16_to_f32(const uint16_t *src, float *dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
  fbn_half_f16_to_f32_portable(src + i, dst + i, n - i);
}

FBN_HALF_AVX512_TARGET static void bf16_to_f32(const uint16_t *src, float *dst, int64_t n) {
  const __m512i abs = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  const __m512i quiet = _mm512_set1_epi32(0x400000);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + i))), 16);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, abs), inf);
    _mm512_storeu_si512(dst + i, _mm512_mask_or_epi32(u, nan, u, quiet));
  }
  fbn_half_bf16_to_f32_portable(src + i, dst + i, n - i);
}

FBN_HALF_AVX512_TARGET static void f32_to_f16(const float *src, uint16_t *dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256((__m256i *)(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  fbn_half_f32_to_f16_portable(src + i, dst + i, n - i);
}

/* 16 float32 (bits u) -> 16 bfloat16 by half.h's integer rounding. */
static inline __attribute__((always_inline, target("avx512f,avx2,f16c"))) __m256i
bf16_round16(__m512i u) {
  const __m512i abs = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, abs), inf);
  const __m512i v = _mm512_mask_or_epi32(r, nan, hi, _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(v);
}

FBN_HALF_AVX512_TARGET static void f32_to_bf16(const float *src, uint16_t *dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256((__m256i *)(dst + i),
                        bf16_round16(_mm512_loadu_si512((const void *)(src + i))));
  fbn_half_f32_to_bf16_portable(src + i, dst + i, n - i);
}

#if FBN_HALF_AVX512BF16
__attribute__((target("avx512f,avx512bf16,avx2,f16c"))) static void
f32_to_bf16_ne(const float *src, uint16_t *dst, int64_t n) {
  const __m512i exp = _mm512_set1_epi32(0x7f800000), mant = _mm512_set1_epi32(0x7fffff);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(src + i);
    const __m512i u = _mm512_castps_si512(v);
    /* subnormal inputs: exponent field 0, mantissa not 0 */
    const __mmask16 sub =
        _mm512_mask_test_epi32_mask(_mm512_testn_epi32_mask(u, exp), u, mant);
    const __m256i out = sub != 0 ? bf16_round16(u) : (__m256i)_mm512_cvtneps_pbh(v);
    _mm256_storeu_si256((__m256i *)(dst + i), out);
  }
  fbn_half_f32_to_bf16_portable(src + i, dst + i, n - i);
}
#endif

static const fbn_half_convert avx512 = {
    .path = FBN_HALF_PATH_AVX512,
    .name = "avx512",
    .f16_to_f32 = f16_to_f32,
    .bf16_to_f32 = bf16_to_f32,
    .f32_to_f16 = f32_to_f16,
    .f32_to_bf16 = f32_to_bf16,
};

#if FBN_HALF_AVX512BF16
static const fbn_half_convert avx512_bf16 = {
    .path = FBN_HALF_PATH_AVX512,
    .name = "avx512-bf16",
    .f16_to_f32 = f16_to_f32,
    .bf16_to_f32 = bf16_to_f32,
    .f32_to_f16 = f32_to_f16,
    .f32_to_bf16 = f32_to_bf16_ne,
};
#endif

const fbn_half_convert *fbn_half_convert_avx512(void) {
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx2") ||
      !fbn_half_cpu_has_f16c())
    return NULL;
#if FBN_HALF_AVX512BF16
  if (fbn_half_cpu_has_avx512bf16())
    return &avx512_bf16;
#endif
  return &avx512;
}
#else
const fbn_half_convert *fbn_half_convert_avx512(void) { return NULL; }
#endif
