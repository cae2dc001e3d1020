/*
 * Fast CPU backend: non-temporal stores, the chunk iterator of the blocked
 * loops, and the saved ReLU mask (8 values <-> one byte, its layout in the
 * saved state).
 */
#ifndef FUSEDBN_SRC_CPU_FAST_FAST_CHUNKS_H
#define FUSEDBN_SRC_CPU_FAST_FAST_CHUNKS_H

#include "cpu/fast/fast_types.h"

/* ---- non-temporal stores ------------------------------------------------ */

/* dst[0..n) = src[0..n) with non-temporal stores where dst is aligned
 * (SSE2: part of x86-64's baseline); plain stores elsewhere. Inlined into
 * each clone of the inner loops. fbn_fast_stream_fence() orders them before
 * the stores that follow (and before the end of the parallel region). */
#if defined(__x86_64__) && defined(__SSE2__)
#include <emmintrin.h>
FBN_FAST_INLINE void fbn_fast_stream_f32(float *restrict dst, const float *restrict src,
                                         int64_t n) {
  int64_t i = 0;
  for (; i < n && ((uintptr_t)(dst + i) & 15) != 0; i++)
    dst[i] = src[i];
  for (; i + 4 <= n; i += 4)
    _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
  for (; i < n; i++)
    dst[i] = src[i];
}
FBN_FAST_INLINE void fbn_fast_stream_f64(double *restrict dst, const double *restrict src,
                                         int64_t n) {
  int64_t i = 0;
  for (; i < n && ((uintptr_t)(dst + i) & 15) != 0; i++)
    dst[i] = src[i];
  for (; i + 2 <= n; i += 2)
    _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
  for (; i < n; i++)
    dst[i] = src[i];
}
/* The same for 16-bit elements (half tensors). */
FBN_FAST_INLINE void fbn_fast_stream_u16(uint16_t *restrict dst, const uint16_t *restrict src,
                                         int64_t n) {
  int64_t i = 0;
  for (; i < n && ((uintptr_t)(dst + i) & 15) != 0; i++)
    dst[i] = src[i];
  for (; i + 8 <= n; i += 8)
    _mm_stream_si128((__m128i *)(void *)(dst + i),
                     _mm_loadu_si128((const __m128i *)(const void *)(src + i)));
  for (; i < n; i++)
    dst[i] = src[i];
}
FBN_FAST_INLINE void fbn_fast_stream_fence(void) { _mm_sfence(); }
#else
FBN_FAST_INLINE void fbn_fast_stream_u16(uint16_t *restrict dst, const uint16_t *restrict src,
                                         int64_t n) {
  memcpy(dst, src, (size_t)n * sizeof *dst);
}
FBN_FAST_INLINE void fbn_fast_stream_f32(float *restrict dst, const float *restrict src,
                                         int64_t n) {
  memcpy(dst, src, (size_t)n * sizeof *dst);
}
FBN_FAST_INLINE void fbn_fast_stream_f64(double *restrict dst, const double *restrict src,
                                         int64_t n) {
  memcpy(dst, src, (size_t)n * sizeof *dst);
}
FBN_FAST_INLINE void fbn_fast_stream_fence(void) {}
#endif

/* ---- chunks and mask bits ----------------------------------------------- */

/* Iterator over the chunks of a block of `rows` rows of len elements: whole
 * rows, as many as fit in `chunk` elements, or pieces of `chunk` elements
 * (a multiple of 8) of one row. */
typedef struct fbn_fast_chunk {
  int64_t rows, len, chunk;
  int64_t off;   /* first element, from the start of the block */
  int64_t n;     /* elements */
  int64_t row;   /* first row */
  int64_t nrows; /* rows it touches */
  int64_t seg;   /* offset in the row (pieces of one row), else 0 */
} fbn_fast_chunk;

static inline void fbn_fast_chunk_start(fbn_fast_chunk *ck, int64_t rows, int64_t len,
                                        int64_t chunk) {
  ck->rows = rows;
  ck->len = len;
  ck->chunk = chunk;
  ck->off = ck->n = ck->row = ck->nrows = ck->seg = 0;
}

static inline bool fbn_fast_chunk_next(fbn_fast_chunk *ck) {
  if (ck->len <= ck->chunk) {
    const int64_t per = ck->chunk / ck->len;
    ck->row += ck->nrows;
    if (ck->row >= ck->rows)
      return false;
    ck->nrows = ck->rows - ck->row < per ? ck->rows - ck->row : per;
    ck->off = ck->row * ck->len;
    ck->n = ck->nrows * ck->len;
    return true;
  }
  if (ck->nrows == 0) {
    ck->nrows = 1;
    ck->seg = 0;
  } else {
    ck->seg += ck->chunk;
    if (ck->seg >= ck->len) {
      ck->seg = 0;
      ck->row++;
    }
  }
  if (ck->row >= ck->rows)
    return false;
  ck->off = ck->row * ck->len + ck->seg;
  ck->n = ck->len - ck->seg < ck->chunk ? ck->len - ck->seg : ck->chunk;
  return true;
}

/* 8 values -> one byte of !(v <= 0) (NaN sets its bit); one byte -> 8 lane
 * masks (all ones where set). SSE2 on x86-64, plain loops elsewhere. */
#if defined(__x86_64__) && defined(__SSE2__)
FBN_FAST_INLINE uint8_t fbn_fast_pack8_f32(const float *v) {
  const __m128 zero = _mm_setzero_ps();
  return (uint8_t)(_mm_movemask_ps(_mm_cmpnle_ps(_mm_loadu_ps(v), zero)) |
                   (_mm_movemask_ps(_mm_cmpnle_ps(_mm_loadu_ps(v + 4), zero)) << 4));
}
FBN_FAST_INLINE uint8_t fbn_fast_pack8_f64(const double *v) {
  const __m128d zero = _mm_setzero_pd();
  int b = 0;
  for (int k = 0; k < 4; k++)
    b |= _mm_movemask_pd(_mm_cmpnle_pd(_mm_loadu_pd(v + 2 * k), zero)) << (2 * k);
  return (uint8_t)b;
}
FBN_FAST_INLINE void fbn_fast_expand8_f32(uint8_t b, int32_t *out) {
  const __m128i v = _mm_set1_epi32(b);
  const __m128i lo = _mm_setr_epi32(1, 2, 4, 8), hi = _mm_setr_epi32(16, 32, 64, 128);
  _mm_storeu_si128((__m128i *)(void *)out, _mm_cmpeq_epi32(_mm_and_si128(v, lo), lo));
  _mm_storeu_si128((__m128i *)(void *)(out + 4), _mm_cmpeq_epi32(_mm_and_si128(v, hi), hi));
}
#else
FBN_FAST_INLINE uint8_t fbn_fast_pack8_f32(const float *v) {
  unsigned b = 0;
  for (int k = 0; k < 8; k++)
    b |= (unsigned)!(v[k] <= 0.0f) << k;
  return (uint8_t)b;
}
FBN_FAST_INLINE uint8_t fbn_fast_pack8_f64(const double *v) {
  unsigned b = 0;
  for (int k = 0; k < 8; k++)
    b |= (unsigned)!(v[k] <= 0.0) << k;
  return (uint8_t)b;
}
FBN_FAST_INLINE void fbn_fast_expand8_f32(uint8_t b, int32_t *out) {
  for (int k = 0; k < 8; k++)
    out[k] = (b >> k) & 1 ? -1 : 0;
}
#endif
FBN_FAST_INLINE void fbn_fast_expand8_f64(uint8_t b, int64_t *out) {
  for (int k = 0; k < 8; k++)
    out[k] = (b >> k) & 1 ? -1 : 0;
}

/* The saved ReLU bitmask (float32 and half tensors): one bit per element,
 * !(y <= 0),
 * each row of the tensor (NCHW: the H*W of one (n, c); NHWC: the C of one
 * (n, h, w)) starting on a byte. Backward reads it instead of y. */
static int64_t fbn_fast_mask_row_len(const fbn_tensor_desc *d) {
  return d->layout == FBN_LAYOUT_NCHW ? d->h * d->w : d->c;
}
static int64_t fbn_fast_mask_bpr(const fbn_tensor_desc *d) {
  return (fbn_fast_mask_row_len(d) + 7) / 8;
}
static size_t fbn_fast_mask_bytes(const fbn_tensor_desc *d) {
  if (d->dtype == FBN_DTYPE_FLOAT64)
    return 0;
  return (size_t)(fbn_desc_numel(d) / fbn_fast_mask_row_len(d) * fbn_fast_mask_bpr(d));
}

/* Set or clear the mask bit of element (n, c, s). */
static void fbn_fast_mask_set(const fbn_tensor_desc *d, uint8_t *bits, int64_t n, int64_t c,
                              int64_t s, bool on) {
  const int64_t hw = d->h * d->w, bpr = fbn_fast_mask_bpr(d);
  const int64_t row = d->layout == FBN_LAYOUT_NCHW ? n * d->c + c : n * hw + s;
  const int64_t pos = d->layout == FBN_LAYOUT_NCHW ? s : c;
  uint8_t *byte = bits + row * bpr + pos / 8;
  if (on)
    *byte = (uint8_t)(*byte | (1u << (pos % 8)));
  else
    *byte = (uint8_t)(*byte & ~(1u << (pos % 8)));
}

#endif /* FUSEDBN_SRC_CPU_FAST_FAST_CHUNKS_H */
