/*
 * The avx2 conversion path: F16C for float16 (vcvtph2ps is exact, NaN made
 * quiet; vcvtps2ph with round-to-nearest-even rounds once, overflow to
 * Inf, subnormal results kept, NaN made quiet with the payload's high
 * bits: src/core/half.h's rule), AVX2 integer arithmetic for bfloat16
 * (half.h's formulas on 8 lanes). Tails of fewer than 8 elements take the
 * portable conversions.
 */
#include "cpu/half/half_convert.h"

#if FBN_HALF_X86
#include <immintrin.h>

#define FBN_HALF_AVX2_TARGET __attribute__((target("avx2,f16c")))

FBN_HALF_AVX2_TARGET static void f16_to_f32(const uint16_t *src, float *dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
  fbn_half_f16_to_f32_portable(src + i, dst + i, n - i);
}

FBN_HALF_AVX2_TARGET static void bf16_to_f32(const uint16_t *src, float *dst, int64_t n) {
  const __m256i abs = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  const __m256i quiet = _mm256_set1_epi32(0x400000);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i))), 16);
    /* NaN (|u| > Inf's bits, as signed integers): set the quiet bit */
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs), inf);
    _mm256_storeu_si256((__m256i *)(dst + i),
                        _mm256_or_si256(u, _mm256_and_si256(nan, quiet)));
  }
  fbn_half_bf16_to_f32_portable(src + i, dst + i, n - i);
}

FBN_HALF_AVX2_TARGET static void f32_to_f16(const float *src, uint16_t *dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i *)(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  fbn_half_f32_to_f16_portable(src + i, dst + i, n - i);
}

FBN_HALF_AVX2_TARGET static void f32_to_bf16(const float *src, uint16_t *dst, int64_t n) {
  const __m256i abs = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
  const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
  const __m256i quiet = _mm256_set1_epi32(0x40);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_loadu_si256((const __m256i *)(src + i));
    const __m256i hi = _mm256_srli_epi32(u, 16);
    /* round to nearest even: u + 0x7fff + (bit 16 of u), then the high half
     * (a carry into the exponent, up to Inf, is the correct result) */
    const __m256i lsb = _mm256_and_si256(hi, one);
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(bias, lsb)), 16);
    /* NaN: the high half with the quiet bit */
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs), inf);
    const __m256i v = _mm256_blendv_epi8(r, _mm256_or_si256(hi, quiet), nan);
    /* 8 values of at most 0xffff in 32-bit lanes -> 8 uint16 (packus works
     * per 128-bit lane: lanes 0 and 2 of the 64-bit quarters hold them) */
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0xd8);
    _mm_storeu_si128((__m128i *)(dst + i), _mm256_castsi256_si128(p));
  }
  fbn_half_f32_to_bf16_portable(src + i, dst + i, n - i);
}

static const fbn_half_convert avx2 = {
    .path = FBN_HALF_PATH_AVX2,
    .name = "avx2",
    .f16_to_f32 = f16_to_f32,
    .bf16_to_f32 = bf16_to_f32,
    .f32_to_f16 = f32_to_f16,
    .f32_to_bf16 = f32_to_bf16,
};

const fbn_half_convert *fbn_half_convert_avx2(void) {
  return __builtin_cpu_supports("avx2") && fbn_half_cpu_has_f16c() ? &avx2 : NULL;
}
#else
const fbn_half_convert *fbn_half_convert_avx2(void) { return NULL; }
#endif
