/*
 * Fast CPU backend: AVX2 + F16C loops for half tensors (float16, bfloat16)
 * that convert in registers: the statistics and the forward normalization
 * read the half values, widen them exactly in registers (vcvtph2ps; bfloat16
 * by the integer shift, NaN made quiet as src/cpu/half widens), and the
 * forward rounds its float32 results once in registers (vcvtps2ph with
 * round-to-nearest-even; bfloat16 by the integer round to nearest even of
 * src/cpu/half), so that no chunk is staged in a float32 buffer and read
 * again. Taken by fast_half_impl.h where the process's conversion path is
 * a vector one (avx2, avx512: the CPU has AVX2 and F16C).
 *
 * Numerics: those of the staged loops, in their order (fast_loops_impl.h,
 * x86-64-v3 clones built without contraction):
 *   statistics  stats_rows' 16 float64 lanes per sum (the tail, then the
 *               lanes one by one), stats_blocks' four blocks per trip,
 *               (d0 + d1) + (d2 + d3); products and sums not fused;
 *   forward     v = ((x - m) * a + b) [+ z] in float32, y = v where
 *               !(v <= 0) (NaN included) else +0 (ReLU; BN alone: y = v),
 *               rounded once; the mask bit is !(y <= 0) of the ROUNDED y,
 *               which after the gate is "its bits are not 0" (a positive v
 *               that rounds to +0 clears it, NaN sets it).
 */
#ifndef FUSEDBN_SRC_CPU_FAST_FAST_HALF_AVX2_H
#define FUSEDBN_SRC_CPU_FAST_FAST_HALF_AVX2_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "cpu/fast/fast_config.h"
#include "cpu/half/half_convert.h"

#if FBN_HALF_X86 && FBN_FAST_AVX2_LOOPS
#define FBN_FAST_HALF_AVX2 1
#include <immintrin.h>

#define FBN_FH_BODY static inline __attribute__((always_inline, target("avx2,f16c")))
#define FBN_FH_FN __attribute__((target("avx2,f16c"))) static

/* 8 half values -> 8 floats, exactly. */
FBN_FH_BODY __m256 fbn_fh_widen8(const bool BF16, __m128i h) {
  if (!BF16)
    return _mm256_cvtph_ps(h);
  const __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  return _mm256_castsi256_ps(_mm256_or_si256(u, _mm256_and_si256(nan, _mm256_set1_epi32(0x400000))));
}

/* 8 floats -> 8 half values, rounded once to nearest even. */
FBN_FH_BODY __m128i fbn_fh_narrow8(const bool BF16, __m256 v) {
  if (!BF16)
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i u = _mm256_castps_si256(v);
  const __m256i hi = _mm256_srli_epi32(u, 16);
  const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  const __m256i w = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(w, w), 0xd8));
}

/* The first n (< 8) values at p, the rest of the 8 lanes 0. */
FBN_FH_BODY __m128i fbn_fh_load_part(const uint16_t *p, int64_t n) {
  uint16_t t[8] = {0};
  memcpy(t, p, (size_t)n * sizeof *t);
  return _mm_loadu_si128((const __m128i *)(const void *)t);
}
FBN_FH_BODY __m128i fbn_fh_load8(const uint16_t *p) {
  return _mm_loadu_si128((const __m128i *)(const void *)p);
}

/* stats_rows on the widened rows (fast_loops_impl.h: the same sums, in
 * its order): acc[r][0] += sum (x - k[r]), acc[r][1] += sum (x - k[r])^2. */
FBN_FH_BODY void fbn_fh_stats_rows_body(const bool BF16, const uint16_t *x, int64_t rows,
                                        int64_t len, const double *k, double (*acc)[2]) {
  for (int64_t r = 0; r < rows; r++, x += len) {
    const double kr = k[r];
    const __m256d kv = _mm256_set1_pd(kr);
    __m256d p1[4], p2[4];
    for (int q = 0; q < 4; q++)
      p1[q] = p2[q] = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      const __m256 lo = fbn_fh_widen8(BF16, fbn_fh_load8(x + i));
      const __m256 hi = fbn_fh_widen8(BF16, fbn_fh_load8(x + i + 8));
      __m256d d[4];
      d[0] = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(lo)), kv);
      d[1] = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(lo, 1)), kv);
      d[2] = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(hi)), kv);
      d[3] = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(hi, 1)), kv);
      for (int q = 0; q < 4; q++) {
        p1[q] = _mm256_add_pd(p1[q], d[q]);
        p2[q] = _mm256_add_pd(p2[q], _mm256_mul_pd(d[q], d[q]));
      }
    }
    double s1 = 0.0, s2 = 0.0;
    while (i < len) {
      const int64_t n = len - i < 8 ? len - i : 8;
      float t[8];
      _mm256_storeu_ps(t, fbn_fh_widen8(BF16, fbn_fh_load_part(x + i, n)));
      for (int64_t l = 0; l < n; l++) {
        const double dd = (double)t[l] - kr;
        s1 += dd;
        s2 += dd * dd;
      }
      i += n;
    }
    double l1[16], l2[16];
    for (int q = 0; q < 4; q++) {
      _mm256_storeu_pd(l1 + 4 * q, p1[q]);
      _mm256_storeu_pd(l2 + 4 * q, p2[q]);
    }
    for (int l = 0; l < 16; l++) {
      s1 += l1[l];
      s2 += l2[l];
    }
    acc[r][0] += s1;
    acc[r][1] += s2;
  }
}

/* The 8 values at p (n < 8: the first n, the rest 0) widened into two
 * float64 vectors minus k. */
FBN_FH_BODY void fbn_fh_diff8(const bool BF16, const uint16_t *p, int64_t n, __m256d k0,
                              __m256d k1, __m256d *d0, __m256d *d1) {
  const __m256 v = fbn_fh_widen8(BF16, n == 8 ? fbn_fh_load8(p) : fbn_fh_load_part(p, n));
  *d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), k0);
  *d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), k1);
}

/* The first n (<= 4) doubles of v into p. */
FBN_FH_BODY void fbn_fh_store_pd_part(double *p, __m256d v, int64_t n) {
  double t[4];
  _mm256_storeu_pd(t, v);
  memcpy(p, t, (size_t)n * sizeof *t);
}
FBN_FH_BODY __m256d fbn_fh_load_pd_part(const double *p, int64_t n) {
  double t[4] = {0.0, 0.0, 0.0, 0.0};
  memcpy(t, p, (size_t)n * sizeof *t);
  return _mm256_loadu_pd(t);
}

/* stats_blocks on the widened blocks (the same sums, in its order): per
 * element i of n, over nblocks blocks at x + j*stride, s1[i] += x - k[i],
 * s2[i] += (x - k[i])^2, four blocks per trip. */
FBN_FH_BODY void fbn_fh_stats_blocks_body(const bool BF16, const uint16_t *x, int64_t nblocks,
                                          int64_t stride, int64_t n, const double *k, double *s1,
                                          double *s2) {
  int64_t j = 0;
  for (; j + 4 <= nblocks; j += 4) {
    const uint16_t *x0 = x + j * stride, *x1 = x0 + stride, *x2 = x1 + stride, *x3 = x2 + stride;
    for (int64_t i = 0; i < n; i += 8) {
      const int64_t c = n - i < 8 ? n - i : 8;
      const int64_t c0 = c < 4 ? c : 4, c1 = c - c0;
      __m256d k0, k1, a0, a1, b0, b1, e0, e1, f0, f1, u0, u1, v0, v1;
      if (c == 8) {
        k0 = _mm256_loadu_pd(k + i);
        k1 = _mm256_loadu_pd(k + i + 4);
        u0 = _mm256_loadu_pd(s1 + i);
        u1 = _mm256_loadu_pd(s1 + i + 4);
        v0 = _mm256_loadu_pd(s2 + i);
        v1 = _mm256_loadu_pd(s2 + i + 4);
      } else {
        k0 = fbn_fh_load_pd_part(k + i, c0);
        k1 = fbn_fh_load_pd_part(k + i + 4, c1);
        u0 = fbn_fh_load_pd_part(s1 + i, c0);
        u1 = fbn_fh_load_pd_part(s1 + i + 4, c1);
        v0 = fbn_fh_load_pd_part(s2 + i, c0);
        v1 = fbn_fh_load_pd_part(s2 + i + 4, c1);
      }
      fbn_fh_diff8(BF16, x0 + i, c, k0, k1, &a0, &a1);
      fbn_fh_diff8(BF16, x1 + i, c, k0, k1, &b0, &b1);
      fbn_fh_diff8(BF16, x2 + i, c, k0, k1, &e0, &e1);
      fbn_fh_diff8(BF16, x3 + i, c, k0, k1, &f0, &f1);
      u0 = _mm256_add_pd(u0, _mm256_add_pd(_mm256_add_pd(a0, b0), _mm256_add_pd(e0, f0)));
      u1 = _mm256_add_pd(u1, _mm256_add_pd(_mm256_add_pd(a1, b1), _mm256_add_pd(e1, f1)));
      v0 = _mm256_add_pd(
          v0, _mm256_add_pd(_mm256_add_pd(_mm256_mul_pd(a0, a0), _mm256_mul_pd(b0, b0)),
                            _mm256_add_pd(_mm256_mul_pd(e0, e0), _mm256_mul_pd(f0, f0))));
      v1 = _mm256_add_pd(
          v1, _mm256_add_pd(_mm256_add_pd(_mm256_mul_pd(a1, a1), _mm256_mul_pd(b1, b1)),
                            _mm256_add_pd(_mm256_mul_pd(e1, e1), _mm256_mul_pd(f1, f1))));
      if (c == 8) {
        _mm256_storeu_pd(s1 + i, u0);
        _mm256_storeu_pd(s1 + i + 4, u1);
        _mm256_storeu_pd(s2 + i, v0);
        _mm256_storeu_pd(s2 + i + 4, v1);
      } else {
        fbn_fh_store_pd_part(s1 + i, u0, c0);
        fbn_fh_store_pd_part(s1 + i + 4, u1, c1);
        fbn_fh_store_pd_part(s2 + i, v0, c0);
        fbn_fh_store_pd_part(s2 + i + 4, v1, c1);
      }
    }
  }
  for (; j < nblocks; j++) {
    const uint16_t *xj = x + j * stride;
    for (int64_t i = 0; i < n; i += 8) {
      const int64_t c = n - i < 8 ? n - i : 8;
      const int64_t c0 = c < 4 ? c : 4, c1 = c - c0;
      __m256d a0, a1;
      const __m256d k0 = fbn_fh_load_pd_part(k + i, c0), k1 = fbn_fh_load_pd_part(k + i + 4, c1);
      fbn_fh_diff8(BF16, xj + i, c, k0, k1, &a0, &a1);
      const __m256d u0 = _mm256_add_pd(fbn_fh_load_pd_part(s1 + i, c0), a0);
      const __m256d u1 = _mm256_add_pd(fbn_fh_load_pd_part(s1 + i + 4, c1), a1);
      const __m256d v0 = _mm256_add_pd(fbn_fh_load_pd_part(s2 + i, c0), _mm256_mul_pd(a0, a0));
      const __m256d v1 = _mm256_add_pd(fbn_fh_load_pd_part(s2 + i + 4, c1), _mm256_mul_pd(a1, a1));
      fbn_fh_store_pd_part(s1 + i, u0, c0);
      fbn_fh_store_pd_part(s1 + i + 4, u1, c1);
      fbn_fh_store_pd_part(s2 + i, v0, c0);
      fbn_fh_store_pd_part(s2 + i + 4, v1, c1);
    }
  }
}

/* Up to 8 elements (n) at offset e of the block, coefficients mv, av, bv:
 * y rounded (non-temporal store when nt and n == 8); returns the mask bits
 * of the rounded y (RELU; else 0). */
FBN_FH_BODY unsigned fbn_fh_norm8(const bool BF16, const bool RELU, const uint16_t *x,
                                  const uint16_t *z, uint16_t *y, int64_t n, __m256 mv,
                                  __m256 av, __m256 bv, bool nt) {
  const bool full = n == 8;
  __m256 v = fbn_fh_widen8(BF16, full ? fbn_fh_load8(x) : fbn_fh_load_part(x, n));
  v = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(v, mv), av), bv);
  if (z != NULL)
    v = _mm256_add_ps(v, fbn_fh_widen8(BF16, full ? fbn_fh_load8(z) : fbn_fh_load_part(z, n)));
  if (RELU)
    v = _mm256_and_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NLE_UQ), v);
  const __m128i h = fbn_fh_narrow8(BF16, v);
  if (full) {
    if (nt)
      _mm_stream_si128((__m128i *)(void *)y, h);
    else
      _mm_storeu_si128((__m128i *)(void *)y, h);
  } else {
    uint16_t t[8];
    _mm_storeu_si128((__m128i *)(void *)t, h);
    memcpy(y, t, (size_t)n * sizeof *t);
  }
  if (!RELU)
    return 0u;
  const __m128i zero = _mm_cmpeq_epi16(h, _mm_setzero_si128());
  const unsigned zb = (unsigned)_mm_movemask_epi8(_mm_packs_epi16(zero, zero)) & 0xffu;
  return ~zb & ((1u << n) - 1u);
}

/* A partial vector of coefficients: n (< 8) floats at p, the rest 0. */
FBN_FH_BODY __m256 fbn_fh_coef(const float *p, int64_t n) {
  if (n == 8)
    return _mm256_loadu_ps(p);
  float t[8] = {0.0f};
  memcpy(t, p, (size_t)n * sizeof *t);
  return _mm256_loadu_ps(t);
}

/* Rows of the flat loop per pass: their mask bits fit tb. */
#define FBN_FH_FLAT_ELEMS 8192

/* norm_block for half tensors in one sweep: rows x len elements,
 * coefficients per row (per_row) or per element of the block; bits (may be
 * NULL): the block's first row of the mask, bpr bytes per row; stream:
 * non-temporal stores where y's groups of 8 fall on 16 bytes. Coefficients
 * per element: the block is one flat run (groups of 8 across rows), its mask
 * bits packed as one bit string and cut into the rows (each on a byte). */
FBN_FH_BODY void fbn_fh_norm_body(const bool BF16, const bool RELU, const uint16_t *x,
                                  const uint16_t *z, uint16_t *y, int64_t rows, int64_t len,
                                  bool per_row, const float *m, const float *a, const float *b,
                                  uint8_t *bits, int64_t bpr, bool stream) {
  const bool direct = bits == NULL || (len % 8 == 0 && bpr == len / 8);
  if (!per_row && (direct || len <= FBN_FH_FLAT_ELEMS)) {
    /* passes of a multiple of 8 rows where they fit: each starts on a group */
    int64_t per = len >= FBN_FH_FLAT_ELEMS ? 1 : FBN_FH_FLAT_ELEMS / len;
    if (per >= 8)
      per -= per % 8;
    uint8_t tb[FBN_FH_FLAT_ELEMS / 8 + 2];
    for (int64_t r0 = 0; r0 < rows; r0 += per) {
      const int64_t nr = rows - r0 < per ? rows - r0 : per, o = r0 * len, tot = nr * len;
      uint8_t *bo = bits == NULL ? NULL : direct ? bits + r0 * bpr : tb;
      for (int64_t i = 0; i < tot; i += 8) {
        const int64_t n = tot - i < 8 ? tot - i : 8, e = o + i;
        const bool nt = stream && ((uintptr_t)(y + e) & 15) == 0;
        const unsigned mk = fbn_fh_norm8(BF16, RELU, x + e, z != NULL ? z + e : NULL, y + e, n,
                                         fbn_fh_coef(m + e, n), fbn_fh_coef(a + e, n),
                                         fbn_fh_coef(b + e, n), nt);
        if (RELU && bo != NULL)
          bo[i / 8] = (uint8_t)mk;
      }
      if (RELU && bits != NULL && !direct) {
        tb[(tot + 7) / 8] = tb[(tot + 7) / 8 + 1] = 0;
        for (int64_t j = 0; j < nr; j++) {
          uint8_t *br = bits + (r0 + j) * bpr;
          const int64_t b0 = j * len;
          for (int64_t q = 0; q * 8 < len; q++) {
            const int64_t bb = b0 + q * 8;
            const unsigned w = (unsigned)tb[bb / 8] | (unsigned)tb[bb / 8 + 1] << 8;
            const int64_t left = len - q * 8;
            const unsigned low = left >= 8 ? 0xffu : (1u << left) - 1u;
            br[q] = (uint8_t)((w >> (bb % 8)) & low);
          }
        }
      }
    }
    if (stream)
      _mm_sfence();
    return;
  }
  for (int64_t r = 0; r < rows; r++) {
    const int64_t o = r * len;
    const bool nt = stream && ((uintptr_t)(y + o) & 15) == 0;
    __m256 mv = _mm256_set1_ps(per_row ? m[r] : 0.0f), av = _mm256_set1_ps(per_row ? a[r] : 0.0f);
    __m256 bv = _mm256_set1_ps(per_row ? b[r] : 0.0f);
    uint8_t *br = bits != NULL ? bits + r * bpr : NULL;
    for (int64_t i = 0; i < len; i += 8) {
      const int64_t n = len - i < 8 ? len - i : 8, e = o + i;
      if (!per_row) {
        mv = fbn_fh_coef(m + e, n);
        av = fbn_fh_coef(a + e, n);
        bv = fbn_fh_coef(b + e, n);
      }
      const unsigned mk =
          fbn_fh_norm8(BF16, RELU, x + e, z != NULL ? z + e : NULL, y + e, n, mv, av, bv, nt);
      if (RELU && br != NULL)
        br[i / 8] = (uint8_t)mk;
    }
  }
  if (stream)
    _mm_sfence();
}

FBN_FH_FN void fbn_fast_half_stats_rows_avx2(bool bf16, const uint16_t *x, int64_t rows,
                                             int64_t len, const double *k, double (*acc)[2]) {
  if (bf16)
    fbn_fh_stats_rows_body(true, x, rows, len, k, acc);
  else
    fbn_fh_stats_rows_body(false, x, rows, len, k, acc);
}

FBN_FH_FN void fbn_fast_half_stats_blocks_avx2(bool bf16, const uint16_t *x, int64_t nblocks,
                                               int64_t stride, int64_t n, const double *k,
                                               double *s1, double *s2) {
  if (bf16)
    fbn_fh_stats_blocks_body(true, x, nblocks, stride, n, k, s1, s2);
  else
    fbn_fh_stats_blocks_body(false, x, nblocks, stride, n, k, s1, s2);
}

FBN_FH_FN void fbn_fast_half_norm_avx2(bool bf16, bool relu, const uint16_t *x, const uint16_t *z,
                                       uint16_t *y, int64_t rows, int64_t len, bool per_row,
                                       const float *m, const float *a, const float *b,
                                       uint8_t *bits, int64_t bpr, bool stream) {
  if (bf16) {
    if (relu)
      fbn_fh_norm_body(true, true, x, z, y, rows, len, per_row, m, a, b, bits, bpr, stream);
    else
      fbn_fh_norm_body(true, false, x, z, y, rows, len, per_row, m, a, b, NULL, bpr, stream);
  } else {
    if (relu)
      fbn_fh_norm_body(false, true, x, z, y, rows, len, per_row, m, a, b, bits, bpr, stream);
    else
      fbn_fh_norm_body(false, false, x, z, y, rows, len, per_row, m, a, b, NULL, bpr, stream);
  }
}

/*
 * One row of the pipelined NCHW training forward for half tensors
 * (forward_nchw_pipe in fast_half_impl.h): y <- x normalized with the row's
 * coefficients (fbn_fh_norm8, non-temporal stores: y 16-byte aligned), the
 * mask byte of every 8 elements into bits (not NULL), while the statistics
 * of the row xs of the same length are accumulated into acc as
 * fbn_fh_stats_rows_body sums the staged loops' chunks of that row (pieces
 * of `piece` elements, or the whole row when it is no longer): the same
 * sums, bit for bit. len % 16 == 0, piece % 16 == 0.
 */
FBN_FH_BODY void fbn_fh_pipe_row_body(const bool BF16, const bool RELU, const uint16_t *x,
                                      const uint16_t *z, uint16_t *y, int64_t len, float m,
                                      float a, float b, uint8_t *bits, const uint16_t *xs,
                                      double k, double *acc, int64_t piece) {
  const __m256 mv = _mm256_set1_ps(m), av = _mm256_set1_ps(a), bv = _mm256_set1_ps(b);
  const __m256d kv = _mm256_set1_pd(k);
  for (int64_t p0 = 0; p0 < len; p0 += piece) {
    const int64_t pe = len - p0 < piece ? len : p0 + piece;
    __m256d p1[4], p2[4];
    for (int q = 0; q < 4; q++)
      p1[q] = p2[q] = _mm256_setzero_pd();
    for (int64_t i = p0; i < pe; i += 16) {
      const __m256 lo = fbn_fh_widen8(BF16, fbn_fh_load8(xs + i));
      const __m256 hi = fbn_fh_widen8(BF16, fbn_fh_load8(xs + i + 8));
      __m256d d[4];
      d[0] = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(lo)), kv);
      d[1] = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(lo, 1)), kv);
      d[2] = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(hi)), kv);
      d[3] = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(hi, 1)), kv);
      for (int q = 0; q < 4; q++) {
        p1[q] = _mm256_add_pd(p1[q], d[q]);
        p2[q] = _mm256_add_pd(p2[q], _mm256_mul_pd(d[q], d[q]));
      }
      const unsigned k0 = fbn_fh_norm8(BF16, RELU, x + i, z != NULL ? z + i : NULL, y + i, 8, mv,
                                       av, bv, true);
      const unsigned k1 = fbn_fh_norm8(BF16, RELU, x + i + 8, z != NULL ? z + i + 8 : NULL,
                                       y + i + 8, 8, mv, av, bv, true);
      if (RELU && bits != NULL) {
        bits[i / 8] = (uint8_t)k0;
        bits[i / 8 + 1] = (uint8_t)k1;
      }
    }
    double l1[16], l2[16], s1 = 0.0, s2 = 0.0;
    for (int q = 0; q < 4; q++) {
      _mm256_storeu_pd(l1 + 4 * q, p1[q]);
      _mm256_storeu_pd(l2 + 4 * q, p2[q]);
    }
    for (int l = 0; l < 16; l++) {
      s1 += l1[l];
      s2 += l2[l];
    }
    acc[0] += s1;
    acc[1] += s2;
  }
}

FBN_FH_FN void fbn_fast_half_pipe_row_avx2(bool bf16, bool relu, const uint16_t *x,
                                           const uint16_t *z, uint16_t *y, int64_t len, float m,
                                           float a, float b, uint8_t *bits, const uint16_t *xs,
                                           double k, double *acc, int64_t piece) {
  if (bf16) {
    if (relu)
      fbn_fh_pipe_row_body(true, true, x, z, y, len, m, a, b, bits, xs, k, acc, piece);
    else
      fbn_fh_pipe_row_body(true, false, x, z, y, len, m, a, b, NULL, xs, k, acc, piece);
  } else {
    if (relu)
      fbn_fh_pipe_row_body(false, true, x, z, y, len, m, a, b, bits, xs, k, acc, piece);
    else
      fbn_fh_pipe_row_body(false, false, x, z, y, len, m, a, b, NULL, xs, k, acc, piece);
  }
}

/* Whether the process's conversions are a vector path (AVX2 and F16C). */
static inline bool fbn_fast_half_vec(void) {
  return fbn_half_convert_get()->path != FBN_HALF_PATH_PORTABLE;
}
#else
#define FBN_FAST_HALF_AVX2 0
#endif

#endif /* FUSEDBN_SRC_CPU_FAST_FAST_HALF_AVX2_H */
