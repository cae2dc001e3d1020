/*
 * Fast CPU backend: the AVX2 + FMA loops written with intrinsics (streamed
 * normalization without a staging buffer, the paired loops over two sets
 * of streams, the pipelined rows) and the wrappers that say where they
 * apply; stand-ins that decline where a build has no such loops.
 */
#ifndef FUSEDBN_SRC_CPU_FAST_FAST_AVX2_H
#define FUSEDBN_SRC_CPU_FAST_FAST_AVX2_H

#include "cpu/fast/fast_chunks.h"
#include "cpu/fast/fast_kernels.h"

/* Stands in for a paired AVX2 loop where there is none (float64 tensors, or a
 * build without the loops): false, so that the caller runs its plain loop.
 * The arguments are passed on (and dropped) so that values computed only for
 * the call do not become unused variables. */
static inline bool fbn_fast_no_loop(int unused, ...) {
  (void)unused;
  return false;
}

/* ---- streamed normalization without a staging buffer (AVX2) ------------- */

/*
 * norm_block's streamed case for float32, when the block allows it: every
 * row a multiple of 8 elements with its mask bits on whole bytes (bpr ==
 * len / 8) and y 16-byte aligned (32-byte: one store per 8 elements). Each
 * group of 8 elements is computed in registers, stored with non-temporal
 * stores, and its mask byte comes
 * from the compare that implements the ReLU, so y is not staged in a buffer
 * and read back (measured on a 2-core AMD EPYC: the staged loop spent about
 * a third of its time in the copy-out, and a direct streamed loop ran ~17%
 * faster than staging + copy on a 100 MB tensor). Same arithmetic as
 * norm_piece's x86-64-v3 clone: fma((x - m), a, b) + z, then
 * y = v where !(v <= 0) (NaN included), else +0 (RELU; BN alone: y = v).
 * RELU, TWO, MASK: compile-time flags of the always-inline bodies, each
 * wrapper choosing the body for its run-time value.
 */
#if FBN_FAST_AVX2_LOOPS
#include <immintrin.h>
/* v = fma(x - m, a, b) [+ z]; y[0..8) <- v where !(v <= 0) (NaN included),
 * else +0 (RELU; else v), with non-temporal stores (one 32-byte store when
 * y32, else two 16-byte ones); returns the 8 mask bits !(v <= 0) (RELU;
 * else 0). */
static inline __attribute__((always_inline, target("avx2,fma"))) unsigned
fbn_fast_norm8_nt(const bool RELU, const float *x, const float *z, float *y, __m256 m, __m256 a,
                  __m256 b, bool y32) {
  __m256 v = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(x), m), a, b);
  if (z != NULL)
    v = _mm256_add_ps(v, _mm256_loadu_ps(z));
  __m256 out = v, pass = v;
  if (RELU) {
    pass = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NLE_UQ);
    out = _mm256_and_ps(pass, v);
  }
  if (y32) {
    _mm256_stream_ps(y, out);
  } else {
    _mm_stream_ps(y, _mm256_castps256_ps128(out));
    _mm_stream_ps(y + 4, _mm256_extractf128_ps(out, 1));
  }
  return RELU ? (unsigned)_mm256_movemask_ps(pass) : 0u;
}

/* The run of the paired loops for outputs at p and p + d whose runs start
 * every `step` floats (the row length; 0: one flat run). */
static inline int64_t fbn_fast_pair_run(const float *p, int64_t d, int64_t step) {
  const bool lines = ((uintptr_t)p & 63) == 0 && ((uintptr_t)(p + d) & 63) == 0 &&
                     (step == 0 || step % 16 == 0);
  return lines ? FBN_FAST_PAIR_RUN_LINES : FBN_FAST_PAIR_RUN_OTHER;
}

/* rows x len elements (len % 8 == 0, bits on whole bytes); TWO: and a
 * second block at x + d (z + d, y + d, bits + db) with the same
 * coefficients, 64 elements of each in turn (two sets of streams in flight;
 * y and y + d alike modulo 32 bytes). */
static inline __attribute__((always_inline, target("avx2,fma"))) void
fbn_fast_norm_rows_body(const bool TWO, const bool RELU, const float *x, const float *z, float *y,
                        int64_t rows, int64_t len, bool per_row, const float *m, const float *a,
                        const float *b, uint8_t *bits, bool y32, int64_t d, int64_t db,
                        int64_t run) {
  for (int64_t r = 0; r < rows; r++) {
    const int64_t o = r * len;
    __m256 mv = _mm256_set1_ps(per_row ? m[r] : 0.0f), av = _mm256_set1_ps(per_row ? a[r] : 0.0f);
    __m256 bv = _mm256_set1_ps(per_row ? b[r] : 0.0f);
    int64_t i = 0;
    /* one step: the 8 elements at i of set s (0 or 1) */
#define FBN_NORM_STEP(s, i)                                                                      \
  do {                                                                                         \
    if (!per_row) {                                                                            \
      mv = _mm256_loadu_ps(m + o + (i));                                                       \
      av = _mm256_loadu_ps(a + o + (i));                                                       \
      bv = _mm256_loadu_ps(b + o + (i));                                                       \
    }                                                                                          \
    const int64_t e = o + (i) + ((s) != 0 ? d : 0);                                            \
    const unsigned k =                                                                         \
        fbn_fast_norm8_nt(RELU, x + e, z != NULL ? z + e : NULL, y + e, mv, av, bv, y32);      \
    if (bits != NULL)                                                                          \
      bits[(o + (i)) / 8 + ((s) != 0 ? db : 0)] = (uint8_t)k;                                  \
  } while (0)
    if (TWO) {
      for (; i + run <= len; i += run) {
        for (int64_t j = 0; j < run; j += 8)
          FBN_NORM_STEP(0, i + j);
        for (int64_t j = 0; j < run; j += 8)
          FBN_NORM_STEP(1, i + j);
      }
    }
    /* the rest of each set in turn (not 8 elements of each: that puts the
     * loads of one set right behind the stores of the other, 4 KiB-aliased
     * when d is a multiple of 1024) */
    for (int64_t j = i; j < len; j += 8)
      FBN_NORM_STEP(0, j);
    if (TWO)
      for (int64_t j = i; j < len; j += 8)
        FBN_NORM_STEP(1, j);
#undef FBN_NORM_STEP
  }
  _mm_sfence();
}

__attribute__((target("avx2,fma"))) static void
fbn_fast_norm_nt_avx2(bool relu, const float *x, const float *z, float *y, int64_t rows,
                      int64_t len, bool per_row, const float *m, const float *a, const float *b,
                      uint8_t *bits, bool y32) {
  if (relu)
    fbn_fast_norm_rows_body(false, true, x, z, y, rows, len, per_row, m, a, b, bits, y32, 0, 0, 0);
  else
    fbn_fast_norm_rows_body(false, false, x, z, y, rows, len, per_row, m, a, b, NULL, y32, 0, 0,
                            0);
}

__attribute__((target("avx2,fma"))) static void
fbn_fast_norm_nt2_rows_avx2(bool relu, const float *x, const float *z, float *y, int64_t rows,
                            int64_t len, bool per_row, const float *m, const float *a,
                            const float *b, uint8_t *bits, bool y32, int64_t d, int64_t db,
                            int64_t run) {
  if (relu)
    fbn_fast_norm_rows_body(true, true, x, z, y, rows, len, per_row, m, a, b, bits, y32, d, db,
                            run);
  else
    fbn_fast_norm_rows_body(true, false, x, z, y, rows, len, per_row, m, a, b, NULL, y32, d, db,
                            run);
}

/*
 * One row of the pipelined NCHW training forward (fbn_fast_forward_nchw_pipe):
 * y <- x normalized as by fbn_fast_norm_nt_avx2 with per-row coefficients
 * (mask byte per 8 elements into bits when not NULL), while the statistics
 * of another row xs of the same length are accumulated: acc[0] += sum
 * (xs - k), acc[1] += sum (xs - k)^2, in stats_rows' order (16 lanes, then
 * the tail, then the lanes one by one; products and sums not fused): alone,
 * bit for bit the sums of stats_rows' x86-64-v3 clone. TWO: and a second
 * row at + d (x, z, y, xs; its bits at + db) of the same channel, 64
 * elements of each in turn (two sets of streams in flight), its statistics
 * summed in the same lanes. len % 8 == 0, y 16-byte aligned (y + d alike
 * modulo 32 bytes).
 */
static inline __attribute__((always_inline, target("avx2,fma"))) void
fbn_fast_pipe_row_body(const bool TWO, const bool RELU, const float *x, const float *z, float *y,
                       int64_t len, float m, float a, float b, uint8_t *bits, bool y32,
                       const float *xs, double k, double *acc, int64_t d, int64_t db,
                       int64_t run) {
  const __m256 mv = _mm256_set1_ps(m), av = _mm256_set1_ps(a), bv = _mm256_set1_ps(b);
  const __m256d kv = _mm256_set1_pd(k);
  __m256d p10 = _mm256_setzero_pd(), p11 = p10, p12 = p10, p13 = p10;
  __m256d p20 = p10, p21 = p10, p22 = p10, p23 = p10;
  /* set s (0, or 1: the second row at + d) */
#define FBN_PIPE_LANES(s, i, h, p1, p2)                                                          \
  do {                                                                                         \
    const __m256d dd = _mm256_sub_pd(                                                          \
        _mm256_cvtps_pd(_mm_loadu_ps(xs + ((s) != 0 ? d : 0) + (i) + 4 * (h))), kv);          \
    p1 = _mm256_add_pd(p1, dd);                                                                \
    p2 = _mm256_add_pd(p2, _mm256_mul_pd(dd, dd));                                             \
  } while (0)
#define FBN_PIPE_NORM8(s, e)                                                                     \
  do {                                                                                         \
    const int64_t o_ = (e) + ((s) != 0 ? d : 0);                                               \
    const unsigned mask_ =                                                                     \
        fbn_fast_norm8_nt(RELU, x + o_, z != NULL ? z + o_ : NULL, y + o_, mv, av, bv, y32);   \
    if (bits != NULL)                                                                          \
      bits[(e) / 8 + ((s) != 0 ? db : 0)] = (uint8_t)mask_;                                    \
  } while (0)
#define FBN_PIPE_STEP16(s, i)                                                                    \
  do {                                                                                         \
    FBN_PIPE_LANES(s, i, 0, p10, p20);                                                         \
    FBN_PIPE_LANES(s, i, 1, p11, p21);                                                         \
    FBN_PIPE_LANES(s, i, 2, p12, p22);                                                         \
    FBN_PIPE_LANES(s, i, 3, p13, p23);                                                         \
    FBN_PIPE_NORM8(s, i);                                                                      \
    FBN_PIPE_NORM8(s, (i) + 8);                                                                \
  } while (0)
  int64_t i = 0;
  if (TWO) {
    for (; i + run <= len; i += run) {
      for (int64_t j = 0; j < run; j += 16)
        FBN_PIPE_STEP16(0, i + j);
      for (int64_t j = 0; j < run; j += 16)
        FBN_PIPE_STEP16(1, i + j);
    }
  }
  /* the rest of each set in turn (see fbn_fast_norm_rows_body) */
  const int64_t i0 = i;
  for (; i + 16 <= len; i += 16)
    FBN_PIPE_STEP16(0, i);
  if (TWO)
    for (int64_t j = i0; j + 16 <= len; j += 16)
      FBN_PIPE_STEP16(1, j);
  double s1 = 0.0, s2 = 0.0;
  if (i < len) {
    for (int s = 0; s < (TWO ? 2 : 1); s++) {
      FBN_PIPE_NORM8(s, i);
      for (int64_t e = i; e < len; e++) {
        const double dd = (double)xs[e + (s != 0 ? d : 0)] - k;
        s1 += dd;
        s2 += dd * dd;
      }
    }
  }
#undef FBN_PIPE_LANES
#undef FBN_PIPE_NORM8
#undef FBN_PIPE_STEP16
  double l1[16], l2[16];
  _mm256_storeu_pd(l1, p10);
  _mm256_storeu_pd(l1 + 4, p11);
  _mm256_storeu_pd(l1 + 8, p12);
  _mm256_storeu_pd(l1 + 12, p13);
  _mm256_storeu_pd(l2, p20);
  _mm256_storeu_pd(l2 + 4, p21);
  _mm256_storeu_pd(l2 + 8, p22);
  _mm256_storeu_pd(l2 + 12, p23);
  for (int l = 0; l < 16; l++) {
    s1 += l1[l];
    s2 += l2[l];
  }
  acc[0] += s1;
  acc[1] += s2;
}

__attribute__((target("avx2,fma"))) static void
fbn_fast_pipe_row_avx2(bool relu, const float *x, const float *z, float *y, int64_t len, float m,
                       float a, float b, uint8_t *bits, bool y32, const float *xs, double k,
                       double *acc) {
  if (relu)
    fbn_fast_pipe_row_body(false, true, x, z, y, len, m, a, b, bits, y32, xs, k, acc, 0, 0, 0);
  else
    fbn_fast_pipe_row_body(false, false, x, z, y, len, m, a, b, NULL, y32, xs, k, acc, 0, 0, 0);
}

/* Two rows at once: the second (and its statistics row) at + d, its bits at
 * + db, summed into the same acc. */
__attribute__((target("avx2,fma"))) static void
fbn_fast_pipe_row2_avx2(bool relu, const float *x, const float *z, float *y, int64_t len, float m,
                        float a, float b, uint8_t *bits, bool y32, const float *xs, double k,
                        double *acc, int64_t d, int64_t db, int64_t run) {
  if (relu)
    fbn_fast_pipe_row_body(true, true, x, z, y, len, m, a, b, bits, y32, xs, k, acc, d, db, run);
  else
    fbn_fast_pipe_row_body(true, false, x, z, y, len, m, a, b, NULL, y32, xs, k, acc, d, db, run);
}

/*
 * One row of the pipelined NCHW backward (fbn_fast_backward_nchw_pipe).
 * APPLY: for the current group's row, g = (its mask bit ? dy : +0),
 * dz <- g (dz not NULL) and dx <- g k + (x - m) c1 + c0 (bwd_apply_piece's
 * per-row arithmetic, products and sums not fused), non-temporal stores. REDUCE:
 * for the next group's row (xs, bs, dys), acc[0] += sum g, acc[1] += sum
 * g (xs - mean) in float64. len % 8 == 0 and each row's mask on whole
 * bytes; dx and dz 16-byte aligned (32-byte: al32). Without MASK (BN
 * alone, bits and bs NULL) g = dy.
 */
static inline __attribute__((always_inline, target("avx2,fma"))) void
fbn_fast_bwd_pipe_body(const bool APPLY, const bool REDUCE, const bool MASK, const float *x,
                       const uint8_t *bits, const float *dy, float *dx, float *dz, int64_t len,
                       float m, float k, float c1, float c0, bool al32, const float *xs,
                       const uint8_t *bs, const float *dys, double mean, double *acc) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 mv = _mm256_set1_ps(m), kv = _mm256_set1_ps(k), c1v = _mm256_set1_ps(c1);
  const __m256 c0v = _mm256_set1_ps(c0);
  const __m256d meanv = _mm256_set1_pd(mean);
  __m256d s10 = _mm256_setzero_pd(), s11 = s10, s20 = s10, s21 = s10;
  for (int64_t i = 0; i < len; i += 8) {
    if (REDUCE) {
      __m256 g = _mm256_loadu_ps(dys + i);
      if (MASK) {
        /* bs is NULL only in the MASK = false instances (the callers below);
         * cppcheck does not tie the two. */
        // cppcheck-suppress nullPointer
        const __m256i bv = _mm256_and_si256(_mm256_set1_epi32(bs[i / 8]), sel);
        g = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(bv, sel)), g);
      }
      const __m256 xv = _mm256_loadu_ps(xs + i);
      const __m256d g0 = _mm256_cvtps_pd(_mm256_castps256_ps128(g));
      const __m256d g1 = _mm256_cvtps_pd(_mm256_extractf128_ps(g, 1));
      const __m256d x0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(xv)), meanv);
      const __m256d x1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(xv, 1)), meanv);
      s10 = _mm256_add_pd(s10, g0);
      s11 = _mm256_add_pd(s11, g1);
      s20 = _mm256_add_pd(s20, _mm256_mul_pd(g0, x0));
      s21 = _mm256_add_pd(s21, _mm256_mul_pd(g1, x1));
    }
    if (APPLY) {
      __m256 g = _mm256_loadu_ps(dy + i);
      if (MASK) {
        /* likewise bits */
        // cppcheck-suppress nullPointer
        const __m256i bv = _mm256_and_si256(_mm256_set1_epi32(bits[i / 8]), sel);
        g = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(bv, sel)), g);
      }
      const __m256 t = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv), c1v);
      const __m256 d = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(g, kv), t), c0v);
      if (al32) {
        if (dz != NULL)
          _mm256_stream_ps(dz + i, g);
        _mm256_stream_ps(dx + i, d);
      } else {
        if (dz != NULL) {
          _mm_stream_ps(dz + i, _mm256_castps256_ps128(g));
          _mm_stream_ps(dz + i + 4, _mm256_extractf128_ps(g, 1));
        }
        _mm_stream_ps(dx + i, _mm256_castps256_ps128(d));
        _mm_stream_ps(dx + i + 4, _mm256_extractf128_ps(d, 1));
      }
    }
  }
  if (REDUCE) {
    double l1[4], l2[4];
    _mm256_storeu_pd(l1, _mm256_add_pd(s10, s11));
    _mm256_storeu_pd(l2, _mm256_add_pd(s20, s21));
    acc[0] += (l1[0] + l1[1]) + (l1[2] + l1[3]);
    acc[1] += (l2[0] + l2[1]) + (l2[2] + l2[3]);
  }
}

__attribute__((target("avx2,fma"))) static void
fbn_fast_bwd_pipe_both_avx2(const float *x, const uint8_t *bits, const float *dy, float *dx,
                            float *dz, int64_t len, float m, float k, float c1, float c0,
                            bool al32, const float *xs, const uint8_t *bs, const float *dys,
                            double mean, double *acc) {
  if (bits != NULL)
    fbn_fast_bwd_pipe_body(true, true, true, x, bits, dy, dx, dz, len, m, k, c1, c0, al32, xs, bs,
                           dys, mean, acc);
  else
    fbn_fast_bwd_pipe_body(true, true, false, x, NULL, dy, dx, dz, len, m, k, c1, c0, al32, xs,
                           NULL, dys, mean, acc);
}

__attribute__((target("avx2,fma"))) static void
fbn_fast_bwd_pipe_apply_avx2(const float *x, const uint8_t *bits, const float *dy, float *dx,
                             float *dz, int64_t len, float m, float k, float c1, float c0,
                             bool al32) {
  if (bits != NULL)
    fbn_fast_bwd_pipe_body(true, false, true, x, bits, dy, dx, dz, len, m, k, c1, c0, al32, NULL,
                           NULL, NULL, 0.0, NULL);
  else
    fbn_fast_bwd_pipe_body(true, false, false, x, NULL, dy, dx, dz, len, m, k, c1, c0, al32, NULL,
                           NULL, NULL, 0.0, NULL);
}

__attribute__((target("avx2,fma"))) static void
fbn_fast_bwd_pipe_reduce_avx2(int64_t len, const float *xs, const uint8_t *bs, const float *dys,
                              double mean, double *acc) {
  if (bs != NULL)
    fbn_fast_bwd_pipe_body(false, true, true, NULL, NULL, NULL, NULL, NULL, len, 0.0f, 0.0f, 0.0f,
                           0.0f, false, xs, bs, dys, mean, acc);
  else
    fbn_fast_bwd_pipe_body(false, true, false, NULL, NULL, NULL, NULL, NULL, len, 0.0f, 0.0f,
                           0.0f, 0.0f, false, xs, NULL, dys, mean, acc);
}

/*
 * NHWC backward over two blocks of n elements (n % 8 == 0) at once, the
 * second at + d (x, dy, dz, dx; its mask at bits + db), with per-element
 * arrays of the block (the first block's element i and the second's share
 * them), 64 elements of each in turn (two sets of streams in flight). Mask
 * bytes on whole rows (bit e of byte e / 8); dz and dx 16-byte aligned
 * (32-byte: al32), the second block's alike.
 *
 * reduce: g = (mask bit ? dy : +0), or dy without a mask (bits NULL: BN
 *   alone), dz <- g when dz is not NULL;
 *   s1[i] += g, s2[i] += g * (x - mean[i]) in float64 (bwd_reduce_block's
 *   arithmetic; the two blocks' terms summed into the same accumulators).
 * apply: g from the mask and dy, or (g_given) read from dy;
 *   dz <- g when dz is not NULL and not g_given;
 *   dx <- g * k[i] + (x - m[i]) * c1[i] + c0[i] (full), else g * k[i]
 *   (bwd_apply_piece's arithmetic, products and sums not fused).
 */
static inline __attribute__((always_inline, target("avx2,fma"))) __m256
fbn_fast_g8(const uint8_t *bits, const float *dy, int64_t i) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i bv = _mm256_and_si256(_mm256_set1_epi32(bits[i / 8]), sel);
  return _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(bv, sel)), _mm256_loadu_ps(dy + i));
}

static inline __attribute__((always_inline, target("avx2,fma"))) void
fbn_fast_store8(float *p, __m256 v, bool al32) {
  if (al32) {
    _mm256_stream_ps(p, v);
  } else {
    _mm_stream_ps(p, _mm256_castps256_ps128(v));
    _mm_stream_ps(p + 4, _mm256_extractf128_ps(v, 1));
  }
}

static inline __attribute__((always_inline, target("avx2,fma"))) void
fbn_fast_bwd_reduce2_body(const bool MASK, const float *x, const uint8_t *bits, const float *dy,
                          float *dz, int64_t n, const double *mean, double *s1, double *s2,
                          bool al32, int64_t d, int64_t db, int64_t run) {
  for (int64_t i0 = 0; i0 < n; i0 += run) {
    const int64_t i1 = i0 + run < n ? i0 + run : n;
    for (int s = 0; s < 2; s++) {
      const int64_t o = s != 0 ? d : 0;
      const uint8_t *bs = MASK ? bits + (s != 0 ? db : 0) : NULL;
      for (int64_t i = i0; i < i1; i += 8) {
        const __m256 g = MASK ? fbn_fast_g8(bs, dy + o, i) : _mm256_loadu_ps(dy + o + i);
        if (dz != NULL)
          fbn_fast_store8(dz + o + i, g, al32);
        const __m256 xv = _mm256_loadu_ps(x + o + i);
        const __m256d g0 = _mm256_cvtps_pd(_mm256_castps256_ps128(g));
        const __m256d g1 = _mm256_cvtps_pd(_mm256_extractf128_ps(g, 1));
        const __m256d x0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(xv)),
                                         _mm256_loadu_pd(mean + i));
        const __m256d x1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(xv, 1)),
                                         _mm256_loadu_pd(mean + i + 4));
        _mm256_storeu_pd(s1 + i, _mm256_add_pd(_mm256_loadu_pd(s1 + i), g0));
        _mm256_storeu_pd(s1 + i + 4, _mm256_add_pd(_mm256_loadu_pd(s1 + i + 4), g1));
        _mm256_storeu_pd(s2 + i, _mm256_add_pd(_mm256_loadu_pd(s2 + i), _mm256_mul_pd(g0, x0)));
        _mm256_storeu_pd(s2 + i + 4,
                         _mm256_add_pd(_mm256_loadu_pd(s2 + i + 4), _mm256_mul_pd(g1, x1)));
      }
    }
  }
  _mm_sfence();
}

__attribute__((target("avx2,fma"))) static void
fbn_fast_bwd_reduce2_avx2(const float *x, const uint8_t *bits, const float *dy, float *dz,
                          int64_t n, const double *mean, double *s1, double *s2, bool al32,
                          int64_t d, int64_t db, int64_t run) {
  if (bits != NULL)
    fbn_fast_bwd_reduce2_body(true, x, bits, dy, dz, n, mean, s1, s2, al32, d, db, run);
  else
    fbn_fast_bwd_reduce2_body(false, x, NULL, dy, dz, n, mean, s1, s2, al32, d, db, run);
}

__attribute__((target("avx2,fma"))) static void
fbn_fast_bwd_apply2_avx2(const float *x, const uint8_t *bits, const float *dy, float *dz,
                         float *dx, int64_t n, bool full, bool g_given, const float *m,
                         const float *k, const float *c1, const float *c0, bool al32, int64_t d,
                         int64_t db, int64_t run) {
  for (int64_t i0 = 0; i0 < n; i0 += run) {
    const int64_t i1 = i0 + run < n ? i0 + run : n;
    for (int s = 0; s < 2; s++) {
      const int64_t o = s != 0 ? d : 0;
      const uint8_t *bs = bits != NULL ? bits + (s != 0 ? db : 0) : NULL;
      for (int64_t i = i0; i < i1; i += 8) {
        __m256 g;
        if (g_given) {
          g = _mm256_loadu_ps(dy + o + i);
        } else {
          g = fbn_fast_g8(bs, dy + o, i);
          if (dz != NULL)
            fbn_fast_store8(dz + o + i, g, al32);
        }
        __m256 v = _mm256_mul_ps(g, _mm256_loadu_ps(k + i));
        if (full) {
          const __m256 t = _mm256_mul_ps(
              _mm256_sub_ps(_mm256_loadu_ps(x + o + i), _mm256_loadu_ps(m + i)),
              _mm256_loadu_ps(c1 + i));
          v = _mm256_add_ps(_mm256_add_ps(v, t), _mm256_loadu_ps(c0 + i));
        }
        fbn_fast_store8(dx + o + i, v, al32);
      }
    }
  }
  _mm_sfence();
}

/* Element e of fbn_fast_norm_flat_body with plain stores (its unaligned
 * head and its tail). */
static inline __attribute__((always_inline, target("avx2,fma"))) void
fbn_fast_norm1(const bool RELU, const float *x, const float *z, float *y, const float *m,
               const float *a, const float *b, uint8_t *fb, int64_t e) {
  float v = __builtin_fmaf(x[e] - m[e], a[e], b[e]);
  if (z != NULL)
    v += z[e];
  const bool pass = !(v <= 0.0f);
  y[e] = pass || !RELU ? v : 0.0f;
  if (fb != NULL && pass)
    fb[e / 8] = (uint8_t)(fb[e / 8] | 1u << (e % 8));
}

/* 8 elements at e of a flat run: bits into fb through the carry (see
 * fbn_fast_norm_flat_body). */
static inline __attribute__((always_inline, target("avx2,fma"))) void
fbn_fast_norm8_flat(const bool RELU, const float *x, const float *z, float *y, const float *m,
                    const float *a, const float *b, uint8_t *fb, int64_t e, unsigned sh,
                    unsigned *carry, bool y32) {
  const unsigned mask =
      fbn_fast_norm8_nt(RELU, x + e, z != NULL ? z + e : NULL, y + e, _mm256_loadu_ps(m + e),
                        _mm256_loadu_ps(a + e), _mm256_loadu_ps(b + e), y32);
  if (fb != NULL) {
    const unsigned w = *carry | mask << sh;
    fb[e / 8] = (uint8_t)w;
    *carry = w >> 8;
  }
}

/* fbn_fast_norm_nt_avx2 for one flat run of `total` elements with
 * per-element coefficients and any alignment of y (scalar elements until y
 * is 16-byte aligned, and at the end): rows whose length is not a multiple
 * of 8 (NCHW with short H*W, where a group's rows for one n are contiguous).
 * The mask goes to fb0 as one bit string (bit e = element e; fb0 zeroed by
 * the caller), cut into rows by fbn_fast_mask_rows(). TWO: and a second run
 * at x + d, z + d, y + d, its bits in fb1, with the same coefficients, 64
 * elements of each in turn (two sets of streams in flight; y and y + d
 * alike modulo 32 bytes). */
static inline __attribute__((always_inline, target("avx2,fma"))) void
fbn_fast_norm_flat_body(const bool TWO, const bool RELU, const float *x, const float *z, float *y,
                        int64_t total, const float *m, const float *a, const float *b,
                        uint8_t *fb0, uint8_t *fb1, int64_t d, int64_t run) {
  const float *x1 = TWO ? x + d : NULL, *z1 = TWO && z != NULL ? z + d : NULL;
  float *y1 = TWO ? y + d : NULL;
  int64_t e = 0;
  for (; e < total && ((uintptr_t)(y + e) & 15) != 0; e++) {
    fbn_fast_norm1(RELU, x, z, y, m, a, b, fb0, e);
    if (TWO)
      fbn_fast_norm1(RELU, x1, z1, y1, m, a, b, fb1, e);
  }
  const bool y32 = ((uintptr_t)(y + e) & 31) == 0;
  /* the vectors' bits start at bit sh of each byte; carry: the bits that
   * went past the last byte written (and the peel's bits at first), so that
   * each byte is stored once, with no read-modify-write chain */
  const unsigned sh = (unsigned)(e % 8);
  unsigned c0 = fb0 != NULL ? fb0[e / 8] : 0u, c1 = TWO && fb1 != NULL ? fb1[e / 8] : 0u;
  if (TWO) {
    for (; e + run <= total; e += run) {
      for (int64_t j = 0; j < run; j += 8)
        fbn_fast_norm8_flat(RELU, x, z, y, m, a, b, fb0, e + j, sh, &c0, y32);
      for (int64_t j = 0; j < run; j += 8)
        fbn_fast_norm8_flat(RELU, x1, z1, y1, m, a, b, fb1, e + j, sh, &c1, y32);
    }
  }
  /* the rest of each set in turn (see fbn_fast_norm_rows_body) */
  const int64_t e0 = e;
  for (; e + 8 <= total; e += 8)
    fbn_fast_norm8_flat(RELU, x, z, y, m, a, b, fb0, e, sh, &c0, y32);
  if (TWO)
    for (int64_t j = e0; j + 8 <= total; j += 8)
      fbn_fast_norm8_flat(RELU, x1, z1, y1, m, a, b, fb1, j, sh, &c1, y32);
  if (fb0 != NULL)
    fb0[e / 8] = (uint8_t)c0;
  if (TWO && fb1 != NULL)
    fb1[e / 8] = (uint8_t)c1;
  _mm_sfence();
  for (; e < total; e++) {
    fbn_fast_norm1(RELU, x, z, y, m, a, b, fb0, e);
    if (TWO)
      fbn_fast_norm1(RELU, x1, z1, y1, m, a, b, fb1, e);
  }
}

__attribute__((target("avx2,fma"))) static void
fbn_fast_norm_nt_flat_avx2(bool relu, const float *x, const float *z, float *y, int64_t total,
                           const float *m, const float *a, const float *b, uint8_t *fb) {
  if (relu)
    fbn_fast_norm_flat_body(false, true, x, z, y, total, m, a, b, fb, NULL, 0, 0);
  else
    fbn_fast_norm_flat_body(false, false, x, z, y, total, m, a, b, NULL, NULL, 0, 0);
}

__attribute__((target("avx2,fma"))) static void
fbn_fast_norm_nt2_flat_avx2(bool relu, const float *x, const float *z, float *y, int64_t total,
                            const float *m, const float *a, const float *b, uint8_t *fb0,
                            uint8_t *fb1, int64_t d, int64_t run) {
  if (relu)
    fbn_fast_norm_flat_body(true, true, x, z, y, total, m, a, b, fb0, fb1, d, run);
  else
    fbn_fast_norm_flat_body(true, false, x, z, y, total, m, a, b, NULL, NULL, d, run);
}

/* Row r of the saved mask (bpr bytes) <- bits [r*len, (r+1)*len) of fb
 * (fb readable 8 bytes past its last bit), 7 bytes per 64-bit window; the
 * bits past len in a row's last byte are cleared. Little-endian. */
static void fbn_fast_mask_rows(const uint8_t *fb, int64_t rows, int64_t len, uint8_t *bits,
                               int64_t bpr) {
  const unsigned last = (unsigned)(len - 8 * (bpr - 1)); /* 1..8 bits */
  for (int64_t r = 0; r < rows; r++) {
    uint8_t *row = bits + r * bpr;
    for (int64_t q = 0; q < bpr; q += 7) {
      const int64_t s = r * len + 8 * q;
      uint64_t w;
      memcpy(&w, fb + s / 8, sizeof w);
      w >>= s % 8;
      /* 8 bytes where the ones past the window are written again later
       * (by the next windows or rows of this call); the exact count near
       * the end of the block */
      if ((r * bpr + q + 8) <= rows * bpr)
        memcpy(row + q, &w, sizeof w);
      else
        memcpy(row + q, &w, (size_t)(bpr - q < 7 ? bpr - q : 7));
    }
    row[bpr - 1] = (uint8_t)(row[bpr - 1] & ((1u << last) - 1u));
  }
}

/* Largest flat run whose mask bits fbn_fast_norm_nt_f32 collects on the
 * stack. */
#define FBN_FAST_NT_FLAT_MAX 65536

/* Whether this CPU runs the AVX2 loops (the kernel table, fast_kernels.h). */
static bool fbn_fast_have_avx2(void) { return fbn_fast_kernels()->avx2; }

static bool fbn_fast_norm_nt_f32(bool relu, const float *x, const float *z, float *y,
                                 int64_t rows, int64_t len, bool per_row, const float *m,
                                 const float *a, const float *b, uint8_t *bits, int64_t bpr) {
  if (!fbn_fast_have_avx2())
    return false;
  if (len % 8 == 0 && (bits == NULL || bpr == len / 8) && ((uintptr_t)y & 15) == 0) {
    fbn_fast_norm_nt_avx2(relu, x, z, y, rows, len, per_row, m, a, b, bits,
                          ((uintptr_t)y & 31) == 0);
    return true;
  }
  const int64_t total = rows * len;
  if (per_row || (bits != NULL && total > FBN_FAST_NT_FLAT_MAX))
    return false;
  uint8_t fb[FBN_FAST_NT_FLAT_MAX / 8 + 9];
  if (bits != NULL)
    memset(fb, 0, (size_t)(total / 8 + 9));
  fbn_fast_norm_nt_flat_avx2(relu, x, z, y, total, m, a, b, bits != NULL ? fb : NULL);
  if (bits != NULL)
    fbn_fast_mask_rows(fb, rows, len, bits, bpr);
  return true;
}

/* fbn_fast_norm_nt_f32 on two blocks of rows x len elements with the same
 * coefficients, the second at x + d (z + d, y + d, bits + db), in one loop:
 * false where it does not apply (the caller then normalizes each block on
 * its own). */
static bool fbn_fast_norm_nt2_f32(bool relu, const float *x, const float *z, float *y,
                                  int64_t rows, int64_t len, bool per_row, const float *m,
                                  const float *a, const float *b, uint8_t *bits, int64_t bpr,
                                  int64_t d, int64_t db) {
  if (!fbn_fast_have_avx2() || ((uintptr_t)(y + d) & 31) != ((uintptr_t)y & 31))
    return false;
  if (len % 8 == 0 && (bits == NULL || bpr == len / 8) && ((uintptr_t)y & 15) == 0) {
    fbn_fast_norm_nt2_rows_avx2(relu, x, z, y, rows, len, per_row, m, a, b, bits,
                                ((uintptr_t)y & 31) == 0, d, db, fbn_fast_pair_run(y, d, len));
    return true;
  }
  const int64_t total = rows * len;
  if (per_row || (bits != NULL && total > FBN_FAST_NT_FLAT_MAX))
    return false;
  uint8_t fb[2][FBN_FAST_NT_FLAT_MAX / 8 + 9];
  if (bits != NULL) {
    memset(fb[0], 0, (size_t)(total / 8 + 9));
    memset(fb[1], 0, (size_t)(total / 8 + 9));
  }
  fbn_fast_norm_nt2_flat_avx2(relu, x, z, y, total, m, a, b, bits != NULL ? fb[0] : NULL,
                              bits != NULL ? fb[1] : NULL, d, fbn_fast_pair_run(y, d, 0));
  if (bits != NULL) {
    fbn_fast_mask_rows(fb[0], rows, len, bits, bpr);
    fbn_fast_mask_rows(fb[1], rows, len, bits + db, bpr);
  }
  return true;
}

/* Two NHWC backward blocks of rows x len (the second at + d, its mask at
 * + db) through fbn_fast_bwd_reduce2_avx2 / fbn_fast_bwd_apply2_avx2: false
 * where they do not apply (the caller then takes each block on its own). */
static bool fbn_fast_bwd_reduce2_f32(bool relu, const float *x, const uint8_t *bits,
                                     int64_t bpr, const float *dy, float *dz, int64_t rows,
                                     int64_t len, const double *mean, double *s1, double *s2,
                                     int64_t d, int64_t db) {
  if (!relu)
    bits = NULL; /* g = dy */
  if (!fbn_fast_have_avx2() || (relu && (bits == NULL || bpr * 8 != len)) ||
      (dz != NULL && (((uintptr_t)dz & 15) != 0 ||
                      ((uintptr_t)(dz + d) & 31) != ((uintptr_t)dz & 31))))
    return false;
  fbn_fast_bwd_reduce2_avx2(x, bits, dy, dz, rows * len, mean, s1, s2,
                            dz != NULL && ((uintptr_t)dz & 31) == 0, d, db,
                            dz != NULL ? fbn_fast_pair_run(dz, d, 0) : FBN_FAST_PAIR_RUN_LINES);
  return true;
}

static bool fbn_fast_bwd_apply2_f32(const float *x, const uint8_t *bits, int64_t bpr,
                                    const float *dy, float *dz, float *dx, int64_t rows,
                                    int64_t len, bool full, bool g_given, const float *m,
                                    const float *k, const float *c1, const float *c0, int64_t d,
                                    int64_t db) {
  if (!fbn_fast_have_avx2() || dx == NULL || ((uintptr_t)dx & 15) != 0 ||
      ((uintptr_t)(dx + d) & 31) != ((uintptr_t)dx & 31))
    return false;
  /* without g_given: the mask on whole bytes, dz stored like dx */
  if (!g_given && (bits == NULL || bpr * 8 != len ||
                   (dz != NULL && ((uintptr_t)dz & 31) != ((uintptr_t)dx & 31))))
    return false;
  int64_t run = fbn_fast_pair_run(dx, d, 0);
  if (!g_given && dz != NULL && fbn_fast_pair_run(dz, d, 0) != run)
    run = FBN_FAST_PAIR_RUN_OTHER;
  fbn_fast_bwd_apply2_avx2(x, bits, dy, dz, dx, rows * len, full, g_given, m, k, c1, c0,
                           ((uintptr_t)dx & 31) == 0, d, db, run);
  return true;
}
#define FBN_FAST_PIPE 1
#else
#define fbn_fast_norm_nt_f32(...) false /* no AVX2 loop: the staged one */
#define fbn_fast_norm_nt2_f32(...) fbn_fast_no_loop(0, __VA_ARGS__)
#define fbn_fast_bwd_reduce2_f32(...) fbn_fast_no_loop(0, __VA_ARGS__)
#define fbn_fast_bwd_apply2_f32(...) fbn_fast_no_loop(0, __VA_ARGS__)
#define FBN_FAST_PIPE 0
#endif
/* float64 tensors keep the staged loop (they have no saved mask either) and
 * the loops of one set of streams. */
#define fbn_fast_norm_nt_f64(...) false
#define fbn_fast_norm_nt2_f64(...) fbn_fast_no_loop(0, __VA_ARGS__)
#define fbn_fast_bwd_reduce2_f64(...) fbn_fast_no_loop(0, __VA_ARGS__)
#define fbn_fast_bwd_apply2_f64(...) fbn_fast_no_loop(0, __VA_ARGS__)
/* Half tensors: the staged loops of fast_half_impl.h only. */
#define fbn_fast_norm_nt2_f16(...) fbn_fast_no_loop(0, __VA_ARGS__)
#define fbn_fast_bwd_reduce2_f16(...) fbn_fast_no_loop(0, __VA_ARGS__)
#define fbn_fast_bwd_apply2_f16(...) fbn_fast_no_loop(0, __VA_ARGS__)
#define fbn_fast_norm_nt2_bf16(...) fbn_fast_no_loop(0, __VA_ARGS__)
#define fbn_fast_bwd_reduce2_bf16(...) fbn_fast_no_loop(0, __VA_ARGS__)
#define fbn_fast_bwd_apply2_bf16(...) fbn_fast_no_loop(0, __VA_ARGS__)

#endif /* FUSEDBN_SRC_CPU_FAST_FAST_AVX2_H */
