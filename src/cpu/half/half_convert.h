/*
 * Runs of half-precision conversions for the CPU backends, chosen once per
 * process from the CPU's features:
 *
 *   float16  -> float32     bfloat16 -> float32     (widening: exact)
 *   float32  -> float16     float32  -> bfloat16    (narrowing: rounded once)
 *
 * Every path gives the results of src/core/half.h, bit for bit, on every
 * input: widening exact with a NaN kept (made quiet, sign and payload kept);
 * narrowing to nearest, ties to even, NaN kept (quiet, sign and the
 * payload's high bits), overflow to +-Inf, subnormal results rounded in
 * the subnormal range (never flushed).
 *
 * Paths (half_portable.c, half_avx2.c, half_avx512.c):
 *   portable  the scalar conversions of src/core/half.h
 *   avx2      F16C (vcvtph2ps / vcvtps2ph, round to nearest) for float16;
 *             AVX2 integer shift and round for bfloat16
 *   avx512    AVX512F (vcvtph2ps / vcvtps2ph on 16 lanes); bfloat16 by the
 *             AVX512F integer shift and round, or by AVX512-BF16's
 *             vcvtneps2bf16 where the CPU has it, with its subnormal inputs
 *             (which that instruction flushes to zero) redone by the integer
 *             rounding
 * The best path the CPU has is taken unless FBN_CPU_HALF_PATH (read once)
 * names another one it has: portable, avx2 or avx512. A path the CPU lacks,
 * or any other value, is ignored.
 */
#ifndef FUSEDBN_SRC_CPU_HALF_HALF_CONVERT_H
#define FUSEDBN_SRC_CPU_HALF_HALF_CONVERT_H

#include <stdint.h>

#ifndef FBN_INTERNAL
#define FBN_INTERNAL __attribute__((visibility("hidden")))
#endif

/* The vector paths: x86-64 with GCC or clang (target attributes). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(FBN_HALF_NO_VECTOR)
#define FBN_HALF_X86 1
#else
#define FBN_HALF_X86 0
#endif
/* AVX512-BF16 intrinsics: GCC >= 10, clang >= 11. */
#if FBN_HALF_X86 && ((defined(__clang__) && __clang_major__ >= 11) ||                          \
                     (!defined(__clang__) && __GNUC__ >= 10))
#define FBN_HALF_AVX512BF16 1
#else
#define FBN_HALF_AVX512BF16 0
#endif

#if FBN_HALF_X86
#include <cpuid.h>
/* CPUID bits that not every compiler's __builtin_cpu_supports knows (clang
 * 14 has no "f16c"): F16C (leaf 1, ECX bit 29), AVX512-BF16 (leaf 7
 * subleaf 1, EAX bit 5). The AVX state's OS support comes with the
 * "avx2" / "avx512f" checks they are paired with. */
static inline int fbn_half_cpu_has_f16c(void) {
  unsigned a, b, c, d;
  return __get_cpuid(1, &a, &b, &c, &d) && (c >> 29 & 1u);
}
static inline int fbn_half_cpu_has_avx512bf16(void) {
  unsigned a, b, c, d;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 5 & 1u);
}
#endif

typedef enum fbn_half_path {
  FBN_HALF_PATH_PORTABLE = 0,
  FBN_HALF_PATH_AVX2 = 1,
  FBN_HALF_PATH_AVX512 = 2,
  FBN_HALF_PATH_COUNT = 3,
} fbn_half_path;

/* dst[0..n) <- src[0..n) widened (dst and src do not overlap). */
typedef void (*fbn_half_widen_fn)(const uint16_t *src, float *dst, int64_t n);
/* dst[0..n) <- src[0..n) rounded once. */
typedef void (*fbn_half_narrow_fn)(const float *src, uint16_t *dst, int64_t n);

typedef struct fbn_half_convert {
  fbn_half_path path;
  const char *name; /* "portable", "avx2", "avx512" or "avx512-bf16" */
  fbn_half_widen_fn f16_to_f32, bf16_to_f32;
  fbn_half_narrow_fn f32_to_f16, f32_to_bf16;
} fbn_half_convert;

/* The process's conversions (chosen on first use, by exactly one thread). */
FBN_INTERNAL const fbn_half_convert *fbn_half_convert_get(void);
/* The conversions of one path; NULL when this CPU (or build) lacks it. */
FBN_INTERNAL const fbn_half_convert *fbn_half_convert_of(fbn_half_path path);
/* The name FBN_CPU_HALF_PATH takes for a path. */
FBN_INTERNAL const char *fbn_half_path_name(fbn_half_path path);

/* Per path (half_portable.c, half_avx2.c, half_avx512.c): its table, or
 * NULL when this CPU lacks it. */
FBN_INTERNAL const fbn_half_convert *fbn_half_convert_portable(void);
FBN_INTERNAL const fbn_half_convert *fbn_half_convert_avx2(void);
FBN_INTERNAL const fbn_half_convert *fbn_half_convert_avx512(void);

/* Scalar tails of the vector paths (half_portable.c). */
FBN_INTERNAL void fbn_half_f16_to_f32_portable(const uint16_t *src, float *dst, int64_t n);
FBN_INTERNAL void fbn_half_bf16_to_f32_portable(const uint16_t *src, float *dst, int64_t n);
FBN_INTERNAL void fbn_half_f32_to_f16_portable(const float *src, uint16_t *dst, int64_t n);
FBN_INTERNAL void fbn_half_f32_to_bf16_portable(const float *src, uint16_t *dst, int64_t n);

#endif /* FUSEDBN_SRC_CPU_HALF_HALF_CONVERT_H */
