/*
 * Inner loops and drivers of the fast CPU backend, written once for an
 * element type. Included by cpu_fast.c twice: FBN_T = float (FBN_SFX f32,
 * FBN_MASK_T int32_t) and FBN_T = double (f64, int64_t).
 *
 * Inner loops are plain countable loops over restrict pointers marked
 * `omp simd`, so that GCC vectorizes them (reductions included) without
 * -ffast-math; FBN_FAST_CLONES compiles each one for x86-64-v3 (AVX2, FMA)
 * as well as for the baseline ISA and picks one at load time.
 *
 * Element conventions (docs/semantics.md):
 *   ReLU(v) = v <= 0 ? +0 : v     (NaN compares false: ReLU(NaN) = NaN)
 *   g       = y <= 0 ? 0 : dy     (a NaN y passes dy, as PyTorch's threshold_backward)
 * Statistics are accumulated in double on data shifted by a value k of the
 * channel itself (shifted-data sums: no cancellation of E[x^2] - E[x]^2 when
 * |mean| >> std). Normalization runs in FBN_T as
 *   y = ReLU((x - m) * a + b + z),  m = mean rounded to FBN_T,
 *   a = weight * invstd,  b = bias - (mean - m) * a
 * so that x - m is exact near the mean and the rounding of the mean is
 * folded into b.
 *
 * Blocks and chunks. The loops work on blocks of `rows` contiguous rows of
 * `len` elements (an NCHW row is the H*W of one (n, c); an NHWC row the C
 * channels of one (n, h, w)), cut into chunks of at most FBN_CHUNK elements
 * that hold whole rows or, for rows longer than a chunk, a multiple-of-8
 * piece of one row (fbn_fast_chunk_next). Per chunk:
 *   - the ReLU mask of backward is expanded into mk[] (from the saved
 *     bitmask, or from y), so that the arithmetic loops are branch-free;
 *   - streamed outputs (tensors larger than the caches) are computed into an
 *     L1-resident buffer and copied out with non-temporal stores
 *     (fbn_fast_stream_*): no read-for-ownership of the output lines;
 *   - forward packs !(y <= 0) into the saved bitmask, one bit per element, each
 *     row starting on a byte (`bpr` bytes per row).
 */
#ifndef FBN_T
#error "define FBN_T, FBN_SFX and FBN_MASK_T before including cpu_fast_impl.h"
#endif

#define FBN_CAT2(a, b) a##_##b
#define FBN_CAT(a, b) FBN_CAT2(a, b)
#define FBN_K(name) FBN_CAT(name, FBN_SFX)
#define FBN_CHUNK (FBN_FAST_CHUNK_BYTES / (int64_t)sizeof(FBN_T))
/* The staging buffers are written row by row before each copy-out, which
 * clang's static analyzer cannot follow (chunks of several rows); for it
 * alone they start zeroed. */
#ifdef __clang_analyzer__
#define FBN_ANALYZER_INIT(a) memset((a), 0, sizeof(a))
#else
#define FBN_ANALYZER_INIT(a) ((void)0)
#endif

/* ======================================================================== */
/* Masks                                                                    */
/* ======================================================================== */

/* bits of the chunk's rows <- !(v <= 0) (v: the chunk's n values; NaN sets). */
FBN_FAST_INLINE void FBN_K(mask_pack)(const FBN_T *v, const fbn_fast_chunk *ck, int64_t len,
                                      uint8_t *bits, int64_t bpr) {
  if (ck->nrows > 1 && len < 8) {
    /* Rows of fewer than 8 elements (small C in NHWC), one byte each: pack
     * the chunk as one bit string, then cut each row's bits out of it. */
    uint8_t tb[FBN_CHUNK / 8 + 2];
    const int64_t n = ck->n;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      tb[i / 8] = FBN_K(fbn_fast_pack8)(v + i);
    tb[i / 8] = tb[i / 8 + 1] = 0;
    for (int64_t k = 0; i + k < n; k++)
      tb[i / 8] = (uint8_t)(tb[i / 8] | (unsigned)!(v[i + k] <= (FBN_T)0) << k);
    const unsigned low = (1u << len) - 1u;
    uint8_t *br = bits + ck->row * bpr;
    for (int64_t j = 0, bo = 0; j < ck->nrows; j++, bo += len) {
      const unsigned w = (unsigned)tb[bo / 8] | (unsigned)tb[bo / 8 + 1] << 8;
      br[j * bpr] = (uint8_t)((w >> (bo % 8)) & low);
    }
    return;
  }
  const int64_t per_row = ck->nrows > 1 ? len : ck->n;
  for (int64_t j = 0; j < ck->nrows; j++) {
    const FBN_T *vr = v + j * len;
    uint8_t *br = bits + (ck->row + j) * bpr + ck->seg / 8;
    int64_t i = 0;
    for (; i + 8 <= per_row; i += 8)
      br[i / 8] = FBN_K(fbn_fast_pack8)(vr + i);
    if (i < per_row) {
      unsigned b = 0;
      for (int64_t k = 0; i + k < per_row; k++)
        b |= (unsigned)!(vr[i + k] <= (FBN_T)0) << k;
      br[i / 8] = (uint8_t)b;
    }
  }
}

/* mk[0..n) <- the chunk's bits (all ones where set). */
FBN_FAST_INLINE void FBN_K(mask_expand)(const uint8_t *bits, const fbn_fast_chunk *ck,
                                        int64_t len, int64_t bpr, FBN_MASK_T *mk) {
  if (ck->nrows > 1 && len < 8) {
    /* Rows of fewer than 8 elements: join their bits into one bit string,
     * expand that. */
    uint8_t tb[FBN_CHUNK / 8 + 2];
    const int64_t n = ck->n;
    memset(tb, 0, (size_t)(n / 8 + 2));
    const unsigned low = (1u << len) - 1u;
    const uint8_t *br = bits + ck->row * bpr;
    for (int64_t j = 0, bo = 0; j < ck->nrows; j++, bo += len) {
      const unsigned w = (br[j * bpr] & low) << (bo % 8);
      tb[bo / 8] = (uint8_t)(tb[bo / 8] | (w & 0xffu));
      tb[bo / 8 + 1] = (uint8_t)(tb[bo / 8 + 1] | (w >> 8));
    }
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      FBN_K(fbn_fast_expand8)(tb[i / 8], mk + i);
    for (; i < n; i++)
      mk[i] = (tb[i / 8] >> (i % 8)) & 1 ? (FBN_MASK_T)-1 : 0;
    return;
  }
  const int64_t per_row = ck->nrows > 1 ? len : ck->n;
  for (int64_t j = 0; j < ck->nrows; j++) {
    const uint8_t *br = bits + (ck->row + j) * bpr + ck->seg / 8;
    FBN_MASK_T *mr = mk + j * len;
    int64_t i = 0;
    for (; i + 8 <= per_row; i += 8)
      FBN_K(fbn_fast_expand8)(br[i / 8], mr + i);
    for (; i < per_row; i++)
      mr[i] = (br[i / 8] >> (i % 8)) & 1 ? (FBN_MASK_T)-1 : 0;
  }
}

/* mk[i] <- !(y[i] <= 0) (NaN passes). */
FBN_FAST_INLINE void FBN_K(mask_from_y)(const FBN_T *restrict y, int64_t n,
                                        FBN_MASK_T *restrict mk) {
  FBN_SIMD
  for (int64_t i = 0; i < n; i++)
    mk[i] = y[i] <= (FBN_T)0 ? 0 : (FBN_MASK_T)-1;
}

/* mk of one chunk from bits (when not NULL) or from y. */
FBN_FAST_INLINE void FBN_K(chunk_mask)(const FBN_T *y, const uint8_t *bits, int64_t bpr,
                                       const fbn_fast_chunk *ck, int64_t len, FBN_MASK_T *mk) {
  if (bits != NULL)
    FBN_K(mask_expand)(bits, ck, len, bpr, mk);
  else
    FBN_K(mask_from_y)(y + ck->off, ck->n, mk);
}

/* ======================================================================== */
/* Statistics                                                               */
/* ======================================================================== */

/* For each of `rows` contiguous rows of len elements (one channel each):
 * acc[r][0] += sum (x - k[r]), acc[r][1] += sum (x - k[r])^2. */
FBN_FAST_CLONES
static void FBN_K(stats_rows)(const FBN_T *restrict x, int64_t rows, int64_t len,
                              const double *restrict k, double (*restrict acc)[2]) {
  for (int64_t r = 0; r < rows; r++, x += len) {
    const double kr = k[r];
    /* FBN_FAST_LANES independent partial sums per sum (a single vector
     * accumulator makes the loop wait on the latency of its adds). */
    double p1[FBN_FAST_LANES] = {0.0}, p2[FBN_FAST_LANES] = {0.0};
    int64_t i = 0;
    for (; i + FBN_FAST_LANES <= len; i += FBN_FAST_LANES) {
      const FBN_T *restrict xi = x + i;
      FBN_SIMD
      for (int l = 0; l < FBN_FAST_LANES; l++) {
        const double d = (double)xi[l] - kr;
        p1[l] += d;
        p2[l] += d * d;
      }
    }
    double s1 = 0.0, s2 = 0.0;
    for (; i < len; i++) {
      const double d = (double)x[i] - kr;
      s1 += d;
      s2 += d * d;
    }
    for (int l = 0; l < FBN_FAST_LANES; l++) {
      s1 += p1[l];
      s2 += p2[l];
    }
    acc[r][0] += s1;
    acc[r][1] += s2;
  }
}

/* Per-element sums over nblocks blocks of n elements, block j at
 * x + j*stride: s1[i] += x[i] - k[i], s2[i] += (x[i] - k[i])^2, four blocks
 * per trip through the accumulators. */
FBN_FAST_CLONES
static void FBN_K(stats_blocks)(const FBN_T *restrict x, int64_t nblocks, int64_t stride,
                                int64_t n, const double *restrict k, double *restrict s1,
                                double *restrict s2) {
  int64_t j = 0;
  for (; j + 4 <= nblocks; j += 4) {
    const FBN_T *x0 = x + j * stride, *x1 = x0 + stride, *x2 = x1 + stride, *x3 = x2 + stride;
    FBN_SIMD
    for (int64_t i = 0; i < n; i++) {
      const double ki = k[i];
      const double d0 = (double)x0[i] - ki, d1 = (double)x1[i] - ki;
      const double d2 = (double)x2[i] - ki, d3 = (double)x3[i] - ki;
      s1[i] += (d0 + d1) + (d2 + d3);
      s2[i] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
  for (; j < nblocks; j++) {
    const FBN_T *xj = x + j * stride;
    FBN_SIMD
    for (int64_t i = 0; i < n; i++) {
      const double d = (double)xj[i] - k[i];
      s1[i] += d;
      s2[i] += d * d;
    }
  }
}

/* ======================================================================== */
/* Forward: y = ReLU((x - m) * a + b [+ z])                                 */
/* ======================================================================== */

FBN_FAST_INLINE void FBN_K(norm_piece)(const FBN_T *restrict x, const FBN_T *restrict z,
                                       FBN_T *restrict y, int64_t n, FBN_T m, FBN_T a, FBN_T b) {
  if (z != NULL) {
    FBN_SIMD
    for (int64_t i = 0; i < n; i++) {
      const FBN_T v = (x[i] - m) * a + b + z[i];
      y[i] = v <= (FBN_T)0 ? (FBN_T)0 : v;
    }
  } else {
    FBN_SIMD
    for (int64_t i = 0; i < n; i++) {
      const FBN_T v = (x[i] - m) * a + b;
      y[i] = v <= (FBN_T)0 ? (FBN_T)0 : v;
    }
  }
}

FBN_FAST_INLINE void FBN_K(norm_piece_vec)(const FBN_T *restrict x, const FBN_T *restrict z,
                                           FBN_T *restrict y, int64_t n,
                                           const FBN_T *restrict m, const FBN_T *restrict a,
                                           const FBN_T *restrict b) {
  if (z != NULL) {
    FBN_SIMD
    for (int64_t i = 0; i < n; i++) {
      const FBN_T v = (x[i] - m[i]) * a[i] + b[i] + z[i];
      y[i] = v <= (FBN_T)0 ? (FBN_T)0 : v;
    }
  } else {
    FBN_SIMD
    for (int64_t i = 0; i < n; i++) {
      const FBN_T v = (x[i] - m[i]) * a[i] + b[i];
      y[i] = v <= (FBN_T)0 ? (FBN_T)0 : v;
    }
  }
}

/*
 * One block of rows x len. Coefficients per row (m[r], a[r], b[r]) when
 * per_row, else per element of the block. bits (may be NULL): the block's
 * first row of the saved bitmask.
 */
FBN_FAST_CLONES
static void FBN_K(norm_block)(const FBN_T *x, const FBN_T *z, FBN_T *y, int64_t rows, int64_t len,
                              bool per_row, const FBN_T *m, const FBN_T *a, const FBN_T *b,
                              uint8_t *bits, int64_t bpr, bool stream) {
  if (stream && FBN_K(fbn_fast_norm_nt)(x, z, y, rows, len, per_row, m, a, b, bits, bpr))
    return;
  FBN_T tmp[FBN_CHUNK] __attribute__((aligned(64)));
  FBN_ANALYZER_INIT(tmp);
  fbn_fast_chunk ck;
  fbn_fast_chunk_start(&ck, rows, len, FBN_CHUNK);
  while (fbn_fast_chunk_next(&ck)) {
    FBN_T *out = stream ? tmp : y + ck.off;
    if (per_row) {
      for (int64_t j = 0; j < ck.nrows; j++) {
        const int64_t r = ck.row + j, o = j * len, n = ck.nrows > 1 ? len : ck.n;
        FBN_K(norm_piece)(x + ck.off + o, z != NULL ? z + ck.off + o : NULL, out + o, n, m[r],
                          a[r], b[r]);
      }
    } else {
      FBN_K(norm_piece_vec)(x + ck.off, z != NULL ? z + ck.off : NULL, out, ck.n, m + ck.off,
                            a + ck.off, b + ck.off);
    }
    if (bits != NULL)
      FBN_K(mask_pack)(out, &ck, len, bits, bpr);
    if (stream)
      FBN_K(fbn_fast_stream)(y + ck.off, tmp, ck.n);
  }
  if (stream)
    fbn_fast_stream_fence();
}

/* ======================================================================== */
/* Backward                                                                 */
/* ======================================================================== */

/*
 * Reduction of one block: sum g and sum g * (x - mean), g = mk ? dy : 0.
 * per_row: acc[r] per row with mean[r]; else per element into sg[], sgx[]
 * with mean[] per element. gout (may be NULL) receives g.
 */
FBN_FAST_CLONES
static void FBN_K(bwd_reduce_block)(const FBN_T *x, const FBN_T *y, const uint8_t *bits,
                                    int64_t bpr, const FBN_T *dy, FBN_T *gout, int64_t rows,
                                    int64_t len, bool per_row, const double *mean,
                                    double (*acc)[2], double *sg, double *sgx, bool stream) {
  FBN_MASK_T mk[FBN_CHUNK] __attribute__((aligned(64)));
  FBN_T tmp[FBN_CHUNK] __attribute__((aligned(64)));
  FBN_ANALYZER_INIT(tmp);
  fbn_fast_chunk ck;
  fbn_fast_chunk_start(&ck, rows, len, FBN_CHUNK);
  while (fbn_fast_chunk_next(&ck)) {
    FBN_K(chunk_mask)(y, bits, bpr, &ck, len, mk);
    const FBN_T *xc = x + ck.off, *dyc = dy + ck.off;
    FBN_T *gc = gout == NULL ? NULL : stream ? tmp : gout + ck.off;
    if (per_row) {
      for (int64_t j = 0; j < ck.nrows; j++) {
        const int64_t o = j * len, n = ck.nrows > 1 ? len : ck.n;
        const double mr = mean[ck.row + j];
        const FBN_MASK_T *restrict mo = mk + o;
        const FBN_T *restrict xo = xc + o, *restrict dyo = dyc + o;
        double s1 = 0.0, s2 = 0.0;
        FBN_SIMD_REDUCTION(s1, s2)
        for (int64_t i = 0; i < n; i++) {
          const FBN_T dyv = dyo[i];
          const FBN_T g = mo[i] ? dyv : (FBN_T)0;
          s1 += (double)g;
          s2 += (double)g * ((double)xo[i] - mr);
        }
        acc[ck.row + j][0] += s1;
        acc[ck.row + j][1] += s2;
        if (gc != NULL) {
          FBN_T *restrict go = gc + o;
          FBN_SIMD
          for (int64_t i = 0; i < n; i++) {
            const FBN_T dyv = dyo[i];
            go[i] = mo[i] ? dyv : (FBN_T)0;
          }
        }
      }
    } else {
      const FBN_MASK_T *restrict mo = mk;
      const double *restrict me = mean + ck.off;
      double *restrict s1 = sg + ck.off, *restrict s2 = sgx + ck.off;
      if (gc != NULL) {
        FBN_T *restrict go = gc;
        FBN_SIMD
        for (int64_t i = 0; i < ck.n; i++) {
          const FBN_T dyv = dyc[i];
          const FBN_T g = mo[i] ? dyv : (FBN_T)0;
          go[i] = g;
          s1[i] += (double)g;
          s2[i] += (double)g * ((double)xc[i] - me[i]);
        }
      } else {
        FBN_SIMD
        for (int64_t i = 0; i < ck.n; i++) {
          const FBN_T dyv = dyc[i];
          const FBN_T g = mo[i] ? dyv : (FBN_T)0;
          s1[i] += (double)g;
          s2[i] += (double)g * ((double)xc[i] - me[i]);
        }
      }
    }
    if (gc != NULL && stream)
      FBN_K(fbn_fast_stream)(gout + ck.off, tmp, ck.n);
  }
  if (gout != NULL && stream)
    fbn_fast_stream_fence();
}

/* dx (and dz = g) of n elements; g = mk ? dy : 0, or g = dy when mk is NULL
 * (dy already holds g). Coefficients: scalars (cs, one row) or arrays. */
FBN_FAST_INLINE void FBN_K(bwd_apply_piece)(const FBN_T *restrict x, const FBN_MASK_T *restrict mk,
                                            const FBN_T *restrict dy, FBN_T *restrict dx,
                                            FBN_T *restrict dz, int64_t n, bool full,
                                            const FBN_T *restrict m, const FBN_T *restrict k,
                                            const FBN_T *restrict c1, const FBN_T *restrict c0,
                                            bool cs) {
  if (dx == NULL) {
    FBN_SIMD
    for (int64_t i = 0; i < n; i++) {
      const FBN_T dyv = dy[i];
      dz[i] = mk[i] ? dyv : (FBN_T)0;
    }
    return;
  }
  if (cs) {
    const FBN_T ms = m[0], ks = k[0], c1s = c1[0], c0s = c0[0];
    if (dz != NULL && full) {
      FBN_SIMD
      for (int64_t i = 0; i < n; i++) {
        const FBN_T dyv = dy[i];
        const FBN_T g = mk[i] ? dyv : (FBN_T)0;
        dz[i] = g;
        dx[i] = g * ks + (x[i] - ms) * c1s + c0s;
      }
    } else if (dz != NULL) {
      FBN_SIMD
      for (int64_t i = 0; i < n; i++) {
        const FBN_T dyv = dy[i];
        const FBN_T g = mk[i] ? dyv : (FBN_T)0;
        dz[i] = g;
        dx[i] = g * ks;
      }
    } else if (full) {
      FBN_SIMD
      for (int64_t i = 0; i < n; i++) {
        const FBN_T dyv = dy[i];
        const FBN_T g = mk[i] ? dyv : (FBN_T)0;
        dx[i] = g * ks + (x[i] - ms) * c1s + c0s;
      }
    } else {
      FBN_SIMD
      for (int64_t i = 0; i < n; i++) {
        const FBN_T dyv = dy[i];
        const FBN_T g = mk[i] ? dyv : (FBN_T)0;
        dx[i] = g * ks;
      }
    }
    return;
  }
  if (mk == NULL) { /* dy holds g; dz is NULL */
    if (full) {
      FBN_SIMD
      for (int64_t i = 0; i < n; i++)
        dx[i] = dy[i] * k[i] + (x[i] - m[i]) * c1[i] + c0[i];
    } else {
      FBN_SIMD
      for (int64_t i = 0; i < n; i++)
        dx[i] = dy[i] * k[i];
    }
  } else if (dz != NULL && full) {
    FBN_SIMD
    for (int64_t i = 0; i < n; i++) {
      const FBN_T dyv = dy[i];
      const FBN_T g = mk[i] ? dyv : (FBN_T)0;
      dz[i] = g;
      dx[i] = g * k[i] + (x[i] - m[i]) * c1[i] + c0[i];
    }
  } else if (dz != NULL) {
    FBN_SIMD
    for (int64_t i = 0; i < n; i++) {
      const FBN_T dyv = dy[i];
      const FBN_T g = mk[i] ? dyv : (FBN_T)0;
      dz[i] = g;
      dx[i] = g * k[i];
    }
  } else if (full) {
    FBN_SIMD
    for (int64_t i = 0; i < n; i++) {
      const FBN_T dyv = dy[i];
      const FBN_T g = mk[i] ? dyv : (FBN_T)0;
      dx[i] = g * k[i] + (x[i] - m[i]) * c1[i] + c0[i];
    }
  } else {
    FBN_SIMD
    for (int64_t i = 0; i < n; i++) {
      const FBN_T dyv = dy[i];
      const FBN_T g = mk[i] ? dyv : (FBN_T)0;
      dx[i] = g * k[i];
    }
  }
}

/*
 * dx and dz of one block. The mask comes from bits (not NULL) or y; with
 * g_given, dy already holds g (no mask, dz NULL). Coefficients per row or
 * per element as in norm_block.
 */
FBN_FAST_CLONES
static void FBN_K(bwd_apply_block)(const FBN_T *x, const FBN_T *y, const uint8_t *bits,
                                   int64_t bpr, const FBN_T *dy, FBN_T *dx, FBN_T *dz,
                                   int64_t rows, int64_t len, bool full, bool g_given,
                                   bool per_row, const FBN_T *m, const FBN_T *k, const FBN_T *c1,
                                   const FBN_T *c0, bool stream) {
  FBN_MASK_T mk[FBN_CHUNK] __attribute__((aligned(64)));
  FBN_T tx[FBN_CHUNK] __attribute__((aligned(64)));
  FBN_T tz[FBN_CHUNK] __attribute__((aligned(64)));
  FBN_ANALYZER_INIT(tx);
  FBN_ANALYZER_INIT(tz);
  fbn_fast_chunk ck;
  fbn_fast_chunk_start(&ck, rows, len, FBN_CHUNK);
  while (fbn_fast_chunk_next(&ck)) {
    if (!g_given)
      FBN_K(chunk_mask)(y, bits, bpr, &ck, len, mk);
    FBN_T *ox = dx == NULL ? NULL : stream ? tx : dx + ck.off;
    FBN_T *oz = dz == NULL ? NULL : stream ? tz : dz + ck.off;
    if (per_row) {
      for (int64_t j = 0; j < ck.nrows; j++) {
        const int64_t r = ck.row + j, o = j * len, n = ck.nrows > 1 ? len : ck.n;
        FBN_K(bwd_apply_piece)(x + ck.off + o, mk + o, dy + ck.off + o,
                               ox != NULL ? ox + o : NULL, oz != NULL ? oz + o : NULL, n, full,
                               m + r, k + r, c1 + r, c0 + r, true);
      }
    } else {
      FBN_K(bwd_apply_piece)(x + ck.off, g_given ? NULL : mk, dy + ck.off, ox, oz, ck.n, full,
                             m + ck.off, k + ck.off, c1 + ck.off, c0 + ck.off, false);
    }
    if (stream && dx != NULL)
      FBN_K(fbn_fast_stream)(dx + ck.off, tx, ck.n);
    if (stream && dz != NULL)
      FBN_K(fbn_fast_stream)(dz + ck.off, tz, ck.n);
  }
  if (stream)
    fbn_fast_stream_fence();
}

/* ======================================================================== */
/* Per-channel coefficients                                                 */
/* ======================================================================== */

/* Forward coefficients of one channel; false when any of them is not a
 * finite, normal FBN_T (the channel then takes the exact path). */
static bool FBN_K(forward_coef)(double mean, double invstd, double w, double b, FBN_T *cm,
                                FBN_T *ca, FBN_T *cb) {
  const double ad = invstd * w;
  const FBN_T mh = (FBN_T)mean;
  const double bd = b - (mean - (double)mh) * ad;
  *cm = mh;
  *ca = (FBN_T)ad;
  *cb = (FBN_T)bd;
  return fbn_fast_finite(mean) && fbn_fast_finite(ad) && fbn_fast_finite(bd) &&
         fbn_fast_finite((double)*cm) && fbn_fast_finite((double)*ca) &&
         fbn_fast_finite((double)*cb) && (*ca == (FBN_T)0 || fabs((double)*ca) >= FBN_T_MIN);
}

/* Backward coefficients: dx = g*k + (x - m)*c1 + c0; false as above. */
static bool FBN_K(backward_coef)(const fbn_fast_bwd_chan *ch, bool full, int64_t count, FBN_T *cm,
                                 FBN_T *ck, FBN_T *cc1, FBN_T *cc0) {
  const double k = ch->weight * ch->invstd;
  double c1 = 0.0, c0 = 0.0;
  const FBN_T mh = (FBN_T)ch->mean;
  if (full) {
    const double mean_g = ch->sum_g / (double)count;
    const double mean_gxhat = ch->sum_gxhat / (double)count;
    c1 = -k * ch->invstd * mean_gxhat;
    c0 = -k * mean_g + c1 * ((double)mh - ch->mean);
  }
  *cm = mh;
  *ck = (FBN_T)k;
  *cc1 = (FBN_T)c1;
  *cc0 = (FBN_T)c0;
  return fbn_fast_finite(ch->mean) && fbn_fast_finite(k) && fbn_fast_finite(c1) &&
         fbn_fast_finite(c0) && fbn_fast_finite((double)*cm) && fbn_fast_finite((double)*ck) &&
         fbn_fast_finite((double)*cc1) && fbn_fast_finite((double)*cc0) &&
         (*ck == (FBN_T)0 || fabs((double)*ck) >= FBN_T_MIN);
}

/* Copy e[j*hw] to e[j*hw + 1 .. (j+1)*hw) for the gc channels of a group. */
static void FBN_K(expand)(FBN_T *e, int64_t gc, int64_t hw) {
  for (int64_t j = 0; j < gc; j++)
    for (int64_t s = 1; s < hw; s++)
      e[j * hw + s] = e[j * hw];
}

/* ======================================================================== */
/* Forward drivers                                                          */
/* ======================================================================== */

/*
 * NCHW, long rows (H*W >= FBN_FAST_NCHW_VEC_HW): threads over groups of
 * channels; for each n a group's rows are one contiguous run, normalized
 * with per-row coefficients. A group's data is read twice (statistics,
 * normalization) and is sized to come back from the caches.
 */
static void FBN_K(forward_nchw_group)(fbn_fast_call *m, const fbn_bk_forward_args *a, int64_t gi,
                                      int64_t g_, bool stream, uint8_t *bits, int64_t bpr) {
  const fbn_tensor_desc *d = a->desc;
  const int64_t n_ = d->n, c_ = d->c, hw = d->h * d->w;
  const FBN_T *x = a->x, *z = a->addend;
  FBN_T *y = a->y;
  {
    const int64_t c0 = gi * g_;
    const int64_t gc = c_ - c0 < g_ ? c_ - c0 : g_;
    double acc[FBN_FAST_MAX_GROUP][2], shift[FBN_FAST_MAX_GROUP];
    double mean[FBN_FAST_MAX_GROUP], invstd[FBN_FAST_MAX_GROUP];
    FBN_T cm[FBN_FAST_MAX_GROUP], ca[FBN_FAST_MAX_GROUP], cb[FBN_FAST_MAX_GROUP];
    bool fast[FBN_FAST_MAX_GROUP];

    if (fbn_fast_full(a)) {
      for (int64_t j = 0; j < gc; j++) {
        acc[j][0] = acc[j][1] = 0.0;
        shift[j] = (double)x[(c0 + j) * hw];
      }
      for (int64_t n = 0; n < n_; n++)
        FBN_K(stats_rows)(x + (n * c_ + c0) * hw, gc, hw, shift, acc);
      for (int64_t j = 0; j < gc; j++)
        fbn_fast_batch_stats(m, a, c0 + j, shift[j], acc[j][0], acc[j][1], &mean[j],
                             &invstd[j]);
    } else {
      for (int64_t j = 0; j < gc; j++)
        fbn_fast_running_stats(m, a, c0 + j, &mean[j], &invstd[j]);
    }
    for (int64_t j = 0; j < gc; j++)
      fast[j] = FBN_K(forward_coef)(mean[j], invstd[j], fbn_fast_weight(m, c0 + j),
                                    fbn_fast_bias(m, c0 + j), &cm[j], &ca[j], &cb[j]);

    /* Channels on the exact path are computed here too, then overwritten. */
    for (int64_t n = 0; n < n_; n++) {
      const int64_t off = (n * c_ + c0) * hw;
      FBN_K(norm_block)(x + off, z != NULL ? z + off : NULL, y + off, gc, hw, true, cm, ca, cb,
                        bits != NULL ? bits + (n * c_ + c0) * bpr : NULL, bpr, stream);
    }
    for (int64_t j = 0; j < gc; j++)
      if (!fast[j])
        fbn_fast_exact_normalize(m, a, c0 + j, mean[j], invstd[j], bits, bpr);
  }
}

static void FBN_K(forward_nchw)(fbn_fast_call *m, const fbn_bk_forward_args *a, int nt, uint8_t *bits,
                                int64_t bpr) {
  const fbn_tensor_desc *d = a->desc;
  const int64_t c_ = d->c, count = d->n * d->h * d->w;
  const bool stream = fbn_fast_stream_output(fbn_desc_numel(d) * (int64_t)sizeof(FBN_T));
  const int64_t g_ = fbn_fast_nchw_group(c_, count * (int64_t)sizeof(FBN_T), nt);
  const int64_t ngroups = (c_ + g_ - 1) / g_;
  if (nt > 1) {
    FBN_OMP(omp parallel for schedule(dynamic, 1) num_threads(nt))
    for (int64_t gi = 0; gi < ngroups; gi++)
      FBN_K(forward_nchw_group)(m, a, gi, g_, stream, bits, bpr);
  } else {
    for (int64_t gi = 0; gi < ngroups; gi++)
      FBN_K(forward_nchw_group)(m, a, gi, g_, stream, bits, bpr);
  }
}

/*
 * NCHW, long rows, running statistics (eval): there is no statistics pass,
 * so the tensor is read in memory order, in units of up to
 * FBN_FAST_EVAL_CHUNK elements (whole rows of one n) handed out
 * dynamically: long contiguous runs instead of a channel group's N short
 * ones. coef: 3 C elements (m, a, b), stat: 2 C doubles, fast: C flags
 * (scratch).
 */
static void FBN_K(forward_nchw_eval)(fbn_fast_call *m, const fbn_bk_forward_args *a, int nt,
                                     uint8_t *bits, int64_t bpr, FBN_T *coef, double *stat,
                                     bool *fast) {
  const fbn_tensor_desc *d = a->desc;
  const int64_t n_ = d->n, c_ = d->c, hw = d->h * d->w;
  const FBN_T *x = a->x, *z = a->addend;
  FBN_T *y = a->y;
  const bool stream = fbn_fast_stream_output(fbn_desc_numel(d) * (int64_t)sizeof(FBN_T));
  FBN_T *cm = coef, *ca = coef + c_, *cb = coef + 2 * c_;
  for (int64_t c = 0; c < c_; c++) {
    fbn_fast_running_stats(m, a, c, &stat[c], &stat[c_ + c]);
    fast[c] = FBN_K(forward_coef)(stat[c], stat[c_ + c], fbn_fast_weight(m, c),
                                  fbn_fast_bias(m, c), &cm[c], &ca[c], &cb[c]);
  }
  int64_t rpc = FBN_FAST_EVAL_CHUNK / hw;
  rpc = rpc < 1 ? 1 : rpc > c_ ? c_ : rpc;
  /* streamed: unit (n, rows) together with (n + half, rows) where the
   * paired loop applies (two sets of streams in flight, see forward_nhwc_run) */
  const int64_t half = stream ? n_ / 2 : 0, dn = half * c_;
  const int64_t cpn = (c_ + rpc - 1) / rpc, total = (n_ - half) * cpn;
#define FBN_EVAL_RUN(n, c0, c1)                                                                  \
  FBN_K(norm_block)(x + ((n) * c_ + (c0)) * hw, z != NULL ? z + ((n) * c_ + (c0)) * hw : NULL,   \
                    y + ((n) * c_ + (c0)) * hw, (c1) - (c0), hw, true, cm + (c0), ca + (c0),     \
                    cb + (c0), bits != NULL ? bits + ((n) * c_ + (c0)) * bpr : NULL, bpr, stream)
#define FBN_EVAL_UNIT(k)                                                                         \
  do {                                                                                         \
    const int64_t c0 = (k) % cpn * rpc, c1 = c0 + rpc < c_ ? c0 + rpc : c_;                    \
    if ((k) < half * cpn) {                                                                    \
      const int64_t n = (k) / cpn, off = (n * c_ + c0) * hw;                                   \
      if (!FBN_K(fbn_fast_norm_nt2)(x + off, z != NULL ? z + off : NULL, y + off, c1 - c0, hw,  \
                                    true, cm + c0, ca + c0, cb + c0,                           \
                                    bits != NULL ? bits + (n * c_ + c0) * bpr : NULL, bpr,     \
                                    dn * hw, dn * bpr)) {                                      \
        FBN_EVAL_RUN(n, c0, c1);                                                               \
        FBN_EVAL_RUN(n + half, c0, c1);                                                        \
      }                                                                                        \
    } else {                                                                                   \
      FBN_EVAL_RUN(2 * half + ((k) - half * cpn) / cpn, c0, c1);                               \
    }                                                                                          \
  } while (0)
  if (nt > 1) { /* one thread: no OpenMP region at all (its fixed cost) */
    FBN_OMP(omp parallel for schedule(dynamic, 1) num_threads(nt))
    for (int64_t k = 0; k < total; k++)
      FBN_EVAL_UNIT(k);
  } else {
    for (int64_t k = 0; k < total; k++)
      FBN_EVAL_UNIT(k);
  }
#undef FBN_EVAL_RUN
#undef FBN_EVAL_UNIT
  for (int64_t c = 0; c < c_; c++)
    if (!fast[c])
      fbn_fast_exact_normalize(m, a, c, stat[c], stat[c_ + c], bits, bpr);
}

/*
 * NCHW, short rows: a group of gc channels is, for each n, one run of
 * gc*H*W contiguous elements; the runs are treated like channels-last
 * blocks (stride C*H*W) with per-element accumulators and coefficients, so
 * that the vector loops are long however small H*W is.
 */
static void FBN_K(forward_nchw_vec_group)(fbn_fast_call *m, const fbn_bk_forward_args *a, int nt,
                                          const fbn_fast_nchw_plan *plan, uint8_t *bits,
                                          int64_t bpr, int64_t gi) {
  const fbn_tensor_desc *d = a->desc;
  const int64_t n_ = d->n, c_ = d->c, hw = d->h * d->w;
  const FBN_T *x = a->x, *z = a->addend;
  FBN_T *y = a->y;
  const bool stream = fbn_fast_stream_output(fbn_desc_numel(d) * (int64_t)sizeof(FBN_T));
  const int64_t g_ = plan->group;
  {
    const int64_t c0 = gi * g_;
    const int64_t gc = c_ - c0 < g_ ? c_ - c0 : g_, len = gc * hw;
    fbn_fast_nchw_view v;
    fbn_fast_nchw_view_of(plan, fbn_fast_thread_num(), &v);
    FBN_T *cm = v.coef[0], *ca = v.coef[1], *cb = v.coef[2];
    if (fbn_fast_full(a)) {
      for (int64_t j = 0; j < gc; j++) {
        const double k = (double)x[(c0 + j) * hw];
        for (int64_t s = 0; s < hw; s++) {
          v.shift[j * hw + s] = k;
          v.s1[j * hw + s] = v.s2[j * hw + s] = 0.0;
        }
      }
      FBN_K(stats_blocks)(x + c0 * hw, n_, c_ * hw, len, v.shift, v.s1, v.s2);
      for (int64_t j = 0; j < gc; j++) {
        double t1 = 0.0, t2 = 0.0;
        for (int64_t s = 0; s < hw; s++) {
          t1 += v.s1[j * hw + s];
          t2 += v.s2[j * hw + s];
        }
        fbn_fast_batch_stats(m, a, c0 + j, v.shift[j * hw], t1, t2, &v.mean[j], &v.invstd[j]);
      }
    } else {
      for (int64_t j = 0; j < gc; j++)
        fbn_fast_running_stats(m, a, c0 + j, &v.mean[j], &v.invstd[j]);
    }
    for (int64_t j = 0; j < gc; j++)
      v.fast[j] = FBN_K(forward_coef)(v.mean[j], v.invstd[j], fbn_fast_weight(m, c0 + j),
                                      fbn_fast_bias(m, c0 + j), &cm[j * hw], &ca[j * hw],
                                      &cb[j * hw]);
    FBN_K(expand)(cm, gc, hw);
    FBN_K(expand)(ca, gc, hw);
    FBN_K(expand)(cb, gc, hw);
    /* streamed: the runs of n and n + half in one loop where it applies
     * (two sets of streams in flight, see forward_nhwc_run), the rest one
     * run at a time */
    const int64_t half = stream ? n_ / 2 : 0, dn = half * c_;
#define FBN_VEC_RUN(n)                                                                           \
  FBN_K(norm_block)(x + ((n) * c_ + c0) * hw, z != NULL ? z + ((n) * c_ + c0) * hw : NULL,       \
                    y + ((n) * c_ + c0) * hw, gc, hw, false, cm, ca, cb,                         \
                    bits != NULL ? bits + ((n) * c_ + c0) * bpr : NULL, bpr, stream)
    for (int64_t n = 0; n < half; n++) {
      const int64_t off = (n * c_ + c0) * hw;
      if (!FBN_K(fbn_fast_norm_nt2)(x + off, z != NULL ? z + off : NULL, y + off, gc, hw, false,
                                    cm, ca, cb, bits != NULL ? bits + (n * c_ + c0) * bpr : NULL, bpr,
                                    dn * hw, dn * bpr)) {
        FBN_VEC_RUN(n);
        FBN_VEC_RUN(n + half);
      }
    }
    for (int64_t n = 2 * half; n < n_; n++)
      FBN_VEC_RUN(n);
#undef FBN_VEC_RUN
    for (int64_t j = 0; j < gc; j++)
      if (!v.fast[j])
        fbn_fast_exact_normalize(m, a, c0 + j, v.mean[j], v.invstd[j], bits, bpr);
  }
}

static void FBN_K(forward_nchw_vec)(fbn_fast_call *m, const fbn_bk_forward_args *a, int nt,
                                    const fbn_fast_nchw_plan *plan, uint8_t *bits, int64_t bpr) {
  const int64_t c_ = a->desc->c, g_ = plan->group, ngroups = (c_ + g_ - 1) / g_;
  if (nt > 1) {
    FBN_OMP(omp parallel for schedule(dynamic, 1) num_threads(nt))
    for (int64_t gi = 0; gi < ngroups; gi++)
      FBN_K(forward_nchw_vec_group)(m, a, nt, plan, bits, bpr, gi);
  } else {
    for (int64_t gi = 0; gi < ngroups; gi++)
      FBN_K(forward_nchw_vec_group)(m, a, nt, plan, bits, bpr, gi);
  }
}

/*
 * NHWC: threads over chunks of rows (n, h, w), each row the C channels,
 * handed out dynamically (a thread that is descheduled on a busy machine
 * does not hold the others up). Blocks of P rows (P*C >=
 * FBN_FAST_NHWC_BLOCK elements) share one array of per-element
 * accumulators / coefficients, so that small C still gives long vector
 * loops. Statistics: per-thread partial sums, merged by one thread; then
 * every thread normalizes chunks of rows.
 */
/* q[0..c) <- the sum of the `rows` rows of c elements of q (pairwise: the
 * upper half of the rows added onto the lower half until one is left). */
static void FBN_K(fold_rows)(double *q, int64_t rows, int64_t c) {
  while (rows > 1) {
    const int64_t half = rows / 2, rest = rows - half;
    double *restrict lo = q;
    const double *restrict hi = q + rest * c;
    FBN_SIMD
    for (int64_t i = 0; i < half * c; i++)
      lo[i] += hi[i];
    rows = rest;
  }
}

/* t1[c], t2[c] <- the sums of channel c over the partial sums of nthreads
 * threads (each thread's block folded pairwise, then thread by thread).
 * Overwrites the partial sums. */
static void FBN_K(merge_partials)(const fbn_fast_nhwc_plan *plan, int nthreads, int64_t c_,
                                  double *restrict t1, double *restrict t2) {
  for (int64_t c = 0; c < c_; c++)
    t1[c] = t2[c] = 0.0;
  for (int tt = 0; tt < nthreads; tt++) {
    double *q1 = fbn_fast_partial(plan, tt, 0), *q2 = fbn_fast_partial(plan, tt, 1);
    FBN_K(fold_rows)(q1, plan->rows_per_block, c_);
    FBN_K(fold_rows)(q2, plan->rows_per_block, c_);
    for (int64_t c = 0; c < c_; c++) {
      t1[c] += q1[c];
      t2[c] += q2[c];
    }
  }
}

/* Statistics of chunk k (rows [k*cr, (k+1)*cr)) into s1, s2. */
static void FBN_K(forward_nhwc_stats_chunk)(const fbn_bk_forward_args *a,
                                            const fbn_fast_nhwc_plan *plan, int64_t k, double *s1,
                                            double *s2) {
  const fbn_tensor_desc *d = a->desc;
  const int64_t c_ = d->c, rows = d->n * d->h * d->w, cr = plan->chunk_rows;
  const int64_t p_ = plan->rows_per_block, lp = plan->block;
  const FBN_T *x = a->x;
  const int64_t r0 = k * cr, r1 = r0 + cr < rows ? r0 + cr : rows;
  const int64_t nblocks = (r1 - r0) / p_, rtail = r0 + nblocks * p_;
  FBN_K(stats_blocks)(x + r0 * c_, nblocks, lp, lp, plan->shift, s1, s2);
  if (rtail < r1)
    FBN_K(stats_blocks)(x + rtail * c_, 1, lp, (r1 - rtail) * c_, plan->shift, s1, s2);
}

/* Statistics of the four whole chunks k + j*q (j < 4), one block of each
 * per step: four streams far apart. */
static void FBN_K(forward_nhwc_stats_quad)(const fbn_bk_forward_args *a,
                                           const fbn_fast_nhwc_plan *plan, int64_t k, int64_t q,
                                           double *s1, double *s2) {
  const int64_t c_ = a->desc->c, cr = plan->chunk_rows, p_ = plan->rows_per_block;
  const int64_t lp = plan->block;
  const FBN_T *x = (const FBN_T *)a->x + k * cr * c_;
  for (int64_t r = 0; r < cr; r += p_)
    FBN_K(stats_blocks)(x + r * c_, 4, q * cr * c_, lp, plan->shift, s1, s2);
}

/* Per-channel statistics and coefficients (one thread), from the partial
 * sums of nthreads threads (batch statistics) or the running statistics. */
static void FBN_K(forward_nhwc_coef)(fbn_fast_call *m, const fbn_bk_forward_args *a,
                                     const fbn_fast_nhwc_plan *plan, int nthreads) {
  const int64_t c_ = a->desc->c, p_ = plan->rows_per_block;
  double *mean = plan->mean, *invstd = plan->invstd;
  FBN_T *cm = plan->coef[0], *ca = plan->coef[1], *cb = plan->coef[2];
  if (fbn_fast_full(a))
    FBN_K(merge_partials)(plan, nthreads, c_, mean, invstd); /* the sums, until replaced */
  for (int64_t c = 0; c < c_; c++) {
    if (fbn_fast_full(a)) {
      fbn_fast_batch_stats(m, a, c, plan->shift[c], mean[c], invstd[c], &mean[c], &invstd[c]);
    } else {
      fbn_fast_running_stats(m, a, c, &mean[c], &invstd[c]);
    }
    plan->fast[c] = FBN_K(forward_coef)(mean[c], invstd[c], fbn_fast_weight(m, c),
                                        fbn_fast_bias(m, c), &cm[c], &ca[c], &cb[c]);
  }
  fbn_fast_repeat(cm, sizeof(FBN_T), c_, p_);
  fbn_fast_repeat(ca, sizeof(FBN_T), c_, p_);
  fbn_fast_repeat(cb, sizeof(FBN_T), c_, p_);
}

/* Normalization of rows [r0, r1), r0 a multiple of P. */
static void FBN_K(forward_nhwc_norm_rows)(const fbn_bk_forward_args *a,
                                          const fbn_fast_nhwc_plan *plan, int64_t r0, int64_t r1,
                                          bool stream, uint8_t *bits, int64_t bpr) {
  const int64_t c_ = a->desc->c, p_ = plan->rows_per_block;
  const FBN_T *x = a->x, *z = a->addend;
  FBN_T *y = a->y;
  for (int64_t r = r0; r < r1; r += p_) {
    const int64_t nr = r + p_ <= r1 ? p_ : r1 - r;
    FBN_K(norm_block)(x + r * c_, z != NULL ? z + r * c_ : NULL, y + r * c_, nr, c_, false,
                      plan->coef[0], plan->coef[1], plan->coef[2],
                      bits != NULL ? bits + r * bpr : NULL, bpr, stream);
  }
}

/* Normalization of chunk k. */
static void FBN_K(forward_nhwc_norm_chunk)(const fbn_bk_forward_args *a,
                                           const fbn_fast_nhwc_plan *plan, int64_t k, bool stream,
                                           uint8_t *bits, int64_t bpr) {
  const int64_t rows = a->desc->n * a->desc->h * a->desc->w, cr = plan->chunk_rows;
  FBN_K(forward_nhwc_norm_rows)(a, plan, k * cr, (k + 1) * cr < rows ? (k + 1) * cr : rows,
                                stream, bits, bpr);
}

/* Normalization of chunks k0 and k1 > k0 (k0 whole; streamed output): a
 * block of each per step of one loop while both have whole blocks and the
 * loop applies, the rest block by block. */
static void FBN_K(forward_nhwc_norm_pair)(const fbn_bk_forward_args *a,
                                          const fbn_fast_nhwc_plan *plan, int64_t k0, int64_t k1,
                                          uint8_t *bits, int64_t bpr) {
  const int64_t c_ = a->desc->c, rows = a->desc->n * a->desc->h * a->desc->w;
  const int64_t cr = plan->chunk_rows, p_ = plan->rows_per_block;
  const int64_t e1 = (k1 + 1) * cr < rows ? (k1 + 1) * cr : rows, dr = (k1 - k0) * cr;
  const FBN_T *x = a->x, *z = a->addend;
  FBN_T *y = a->y;
  int64_t r = k0 * cr;
  for (; r + dr + p_ <= e1; r += p_)
    if (!FBN_K(fbn_fast_norm_nt2)(x + r * c_, z != NULL ? z + r * c_ : NULL, y + r * c_, p_, c_,
                                  false, plan->coef[0], plan->coef[1], plan->coef[2],
                                  bits != NULL ? bits + r * bpr : NULL, bpr, dr * c_, dr * bpr))
      break;
  FBN_K(forward_nhwc_norm_rows)(a, plan, r, (k0 + 1) * cr, true, bits, bpr);
  FBN_K(forward_nhwc_norm_rows)(a, plan, r + dr, e1, true, bits, bpr);
}

/* Unit u of forward_nhwc's statistics pass. Streamed tensors: the whole
 * chunks in quads (u < q: chunks u + j*q, j < 4), then the rest one by one. */
static void FBN_K(forward_nhwc_stats_unit)(const fbn_bk_forward_args *a,
                                           const fbn_fast_nhwc_plan *plan, int64_t u, int64_t q,
                                           double *s1, double *s2) {
  if (u < q)
    FBN_K(forward_nhwc_stats_quad)(a, plan, u, q, s1, s2);
  else
    FBN_K(forward_nhwc_stats_chunk)(a, plan, u + 3 * q, s1, s2);
}

/* Unit u of the normalization pass: chunks u and u + half where both exist
 * (half > 0 only for streamed output), else chunk u. */
static void FBN_K(forward_nhwc_norm_unit)(const fbn_bk_forward_args *a,
                                          const fbn_fast_nhwc_plan *plan, int64_t u,
                                          int64_t half, int64_t nchunks, bool stream,
                                          uint8_t *bits, int64_t bpr) {
  if (half > 0 && u + half < nchunks)
    FBN_K(forward_nhwc_norm_pair)(a, plan, u, u + half, bits, bpr);
  else
    FBN_K(forward_nhwc_norm_chunk)(a, plan, u, stream, bits, bpr);
}

/*
 * The work of one thread of forward_nhwc (par: inside the parallel region
 * of nt > 1 threads; else the only thread, no OpenMP calls).
 *
 * Tensors larger than the caches are read from several places at once: the
 * statistics pass reads four chunks a quarter of the tensor apart, the
 * normalization two chunks half of it apart. On these machines a core reads
 * one sequential stream at 60-80% of the rate it reaches with two to four
 * (docs/benchmarks.md).
 */
static void FBN_K(forward_nhwc_run)(fbn_fast_call *m, const fbn_bk_forward_args *a,
                                    const fbn_fast_nhwc_plan *plan, bool par, bool stream,
                                    uint8_t *bits, int64_t bpr) {
  const int64_t rows = a->desc->n * a->desc->h * a->desc->w, lp = plan->block;
  const int64_t nchunks = (rows + plan->chunk_rows - 1) / plan->chunk_rows;
  const int64_t q = stream ? rows / plan->chunk_rows / 4 : 0;
  const int64_t nstats = nchunks - 3 * q;
  const int64_t half = stream ? (nchunks + 1) / 2 : 0, nnorm = stream ? half : nchunks;
  const int t = par ? fbn_fast_thread_num() : 0, nthreads = par ? fbn_fast_num_threads() : 1;
  if (fbn_fast_full(a)) {
    double *s1 = fbn_fast_partial(plan, t, 0), *s2 = fbn_fast_partial(plan, t, 1);
    memset(s1, 0, (size_t)lp * sizeof(double));
    memset(s2, 0, (size_t)lp * sizeof(double));
    if (par) {
      FBN_OMP(omp for schedule(dynamic, 1) nowait)
      for (int64_t u = 0; u < nstats; u++)
        FBN_K(forward_nhwc_stats_unit)(a, plan, u, q, s1, s2);
      FBN_OMP(omp barrier)
    } else {
      for (int64_t u = 0; u < nstats; u++)
        FBN_K(forward_nhwc_stats_unit)(a, plan, u, q, s1, s2);
    }
  }
  if (par) {
    FBN_OMP(omp single)
    FBN_K(forward_nhwc_coef)(m, a, plan, nthreads);
    FBN_OMP(omp for schedule(dynamic, 1))
    for (int64_t u = 0; u < nnorm; u++)
      FBN_K(forward_nhwc_norm_unit)(a, plan, u, half, nchunks, stream, bits, bpr);
  } else {
    FBN_K(forward_nhwc_coef)(m, a, plan, 1);
    for (int64_t u = 0; u < nnorm; u++)
      FBN_K(forward_nhwc_norm_unit)(a, plan, u, half, nchunks, stream, bits, bpr);
  }
}

static void FBN_K(forward_nhwc)(fbn_fast_call *m, const fbn_bk_forward_args *a, int nt,
                                const fbn_fast_nhwc_plan *plan, uint8_t *bits, int64_t bpr) {
  const fbn_tensor_desc *d = a->desc;
  const int64_t c_ = d->c, p_ = plan->rows_per_block;
  const FBN_T *x = a->x;
  const bool stream = fbn_fast_stream_output(fbn_desc_numel(d) * (int64_t)sizeof(FBN_T));
  if (fbn_fast_full(a)) {
    for (int64_t c = 0; c < c_; c++)
      plan->shift[c] = (double)x[c];
    fbn_fast_repeat(plan->shift, sizeof(double), c_, p_);
  }
  if (nt > 1) {
    FBN_OMP(omp parallel num_threads(nt))
    FBN_K(forward_nhwc_run)(m, a, plan, true, stream, bits, bpr);
  } else {
    FBN_K(forward_nhwc_run)(m, a, plan, false, stream, bits, bpr);
  }
  for (int64_t c = 0; c < c_; c++)
    if (!plan->fast[c])
      fbn_fast_exact_normalize(m, a, c, plan->mean[c], plan->invstd[c], bits, bpr);
}

/* ======================================================================== */
/* Backward drivers                                                         */
/* ======================================================================== */

/* NCHW, long rows: channel groups as in forward_nchw. */
static int64_t FBN_K(backward_nchw_gsize)(const fbn_tensor_desc *d, bool bits, int nt) {
  const int64_t per_channel = (bits ? 2 : 3) * d->n * d->h * d->w * (int64_t)sizeof(FBN_T);
  return fbn_fast_nchw_group(d->c, per_channel, nt);
}

static void FBN_K(backward_nchw_group)(fbn_fast_call *m, const fbn_bk_backward_args *a, int nt,
                                       const uint8_t *bits, int64_t bpr, int64_t gi) {
  const fbn_tensor_desc *d = a->desc;
  const int64_t n_ = d->n, c_ = d->c, hw = d->h * d->w, count = n_ * hw;
  const FBN_T *x = a->x, *y = a->y, *dy = a->dy;
  FBN_T *dx = a->dx, *dz = a->daddend;
  const bool full = fbn_fast_full(a);
  const bool reduce = full || m->grads;
  const bool apply = dx != NULL || dz != NULL;
  const bool stream = fbn_fast_stream_output(fbn_desc_numel(d) * (int64_t)sizeof(FBN_T));
  const int64_t g_ = FBN_K(backward_nchw_gsize)(d, bits != NULL, nt);
  {
    const int64_t c0 = gi * g_;
    const int64_t gc = c_ - c0 < g_ ? c_ - c0 : g_;
    double acc[FBN_FAST_MAX_GROUP][2], shift[FBN_FAST_MAX_GROUP];
    fbn_fast_bwd_chan ch[FBN_FAST_MAX_GROUP];
    FBN_T cm[FBN_FAST_MAX_GROUP], ck[FBN_FAST_MAX_GROUP], cc1[FBN_FAST_MAX_GROUP],
        cc0[FBN_FAST_MAX_GROUP];
    bool fast[FBN_FAST_MAX_GROUP];

    for (int64_t j = 0; j < gc; j++) {
      fbn_fast_bwd_chan_init(m, a, c0 + j, &ch[j]);
      fast[j] = ch[j].finite;
      shift[j] = ch[j].mean;
      acc[j][0] = acc[j][1] = 0.0;
    }
    if (reduce) {
      for (int64_t n = 0; n < n_; n++) {
        const int64_t off = (n * c_ + c0) * hw;
        FBN_K(bwd_reduce_block)(x + off, y + off, bits != NULL ? bits + (n * c_ + c0) * bpr : NULL,
                                bpr, dy + off, NULL, gc, hw, true, shift, acc, NULL, NULL, false);
      }
    }
    for (int64_t j = 0; j < gc; j++) {
      if (reduce)
        fast[j] = fbn_fast_bwd_chan_sums(m, a, c0 + j, fast[j], acc[j][0], acc[j][1], &ch[j]);
      cm[j] = ck[j] = cc1[j] = cc0[j] = (FBN_T)0;
      if (fast[j])
        fast[j] = FBN_K(backward_coef)(&ch[j], full, count, &cm[j], &ck[j], &cc1[j], &cc0[j]);
    }
    if (!apply)
      return;
    for (int64_t n = 0; n < n_; n++) {
      const int64_t off = (n * c_ + c0) * hw;
      FBN_K(bwd_apply_block)(x + off, y + off, bits != NULL ? bits + (n * c_ + c0) * bpr : NULL,
                             bpr, dy + off, dx != NULL ? dx + off : NULL,
                             dz != NULL ? dz + off : NULL, gc, hw, full, false, true, cm, ck, cc1,
                             cc0, stream);
    }
    for (int64_t j = 0; j < gc; j++)
      if (!fast[j])
        fbn_fast_exact_backward_apply(m, a, c0 + j, &ch[j]);
  }
}

static void FBN_K(backward_nchw)(fbn_fast_call *m, const fbn_bk_backward_args *a, int nt,
                                 const uint8_t *bits, int64_t bpr) {
  const int64_t c_ = a->desc->c, g_ = FBN_K(backward_nchw_gsize)(a->desc, bits != NULL, nt);
  const int64_t ngroups = (c_ + g_ - 1) / g_;
  if (nt > 1) {
    FBN_OMP(omp parallel for schedule(dynamic, 1) num_threads(nt))
    for (int64_t gi = 0; gi < ngroups; gi++)
      FBN_K(backward_nchw_group)(m, a, nt, bits, bpr, gi);
  } else {
    for (int64_t gi = 0; gi < ngroups; gi++)
      FBN_K(backward_nchw_group)(m, a, nt, bits, bpr, gi);
  }
}

/* NCHW, short rows, as forward_nchw_vec. */
static void FBN_K(backward_nchw_vec_group)(fbn_fast_call *m, const fbn_bk_backward_args *a, int nt,
                                           const fbn_fast_nchw_plan *plan, const uint8_t *bits,
                                           int64_t bpr, int64_t gi) {
  const fbn_tensor_desc *d = a->desc;
  const int64_t n_ = d->n, c_ = d->c, hw = d->h * d->w, count = n_ * hw;
  const FBN_T *x = a->x, *y = a->y, *dy = a->dy;
  FBN_T *dx = a->dx, *dz = a->daddend;
  const bool full = fbn_fast_full(a);
  const bool reduce = full || m->grads;
  const bool apply = dx != NULL || dz != NULL;
  const bool stream = fbn_fast_stream_output(fbn_desc_numel(d) * (int64_t)sizeof(FBN_T));
  const int64_t g_ = plan->group;
  {
    const int64_t c0 = gi * g_;
    const int64_t gc = c_ - c0 < g_ ? c_ - c0 : g_;
    fbn_fast_nchw_view v;
    fbn_fast_nchw_view_of(plan, fbn_fast_thread_num(), &v);
    FBN_T *cm = v.coef[0], *ck = v.coef[1], *cc1 = v.coef[2], *cc0 = v.coef[3];
    for (int64_t j = 0; j < gc; j++) {
      fbn_fast_bwd_chan_init(m, a, c0 + j, &v.chan[j]);
      v.fast[j] = v.chan[j].finite;
      for (int64_t s = 0; s < hw; s++) {
        v.shift[j * hw + s] = v.chan[j].mean;
        v.s1[j * hw + s] = v.s2[j * hw + s] = 0.0;
      }
    }
    if (reduce)
      for (int64_t n = 0; n < n_; n++) {
        const int64_t off = (n * c_ + c0) * hw;
        FBN_K(bwd_reduce_block)(x + off, y + off, bits != NULL ? bits + (n * c_ + c0) * bpr : NULL,
                                bpr, dy + off, NULL, gc, hw, false, v.shift, NULL, v.s1, v.s2,
                                false);
      }
    for (int64_t j = 0; j < gc; j++) {
      if (reduce) {
        double t1 = 0.0, t2 = 0.0;
        for (int64_t s = 0; s < hw; s++) {
          t1 += v.s1[j * hw + s];
          t2 += v.s2[j * hw + s];
        }
        v.fast[j] = fbn_fast_bwd_chan_sums(m, a, c0 + j, v.fast[j], t1, t2, &v.chan[j]);
      }
      cm[j * hw] = ck[j * hw] = cc1[j * hw] = cc0[j * hw] = (FBN_T)0;
      if (v.fast[j])
        v.fast[j] = FBN_K(backward_coef)(&v.chan[j], full, count, &cm[j * hw], &ck[j * hw],
                                         &cc1[j * hw], &cc0[j * hw]);
    }
    if (!apply)
      return;
    FBN_K(expand)(cm, gc, hw);
    FBN_K(expand)(ck, gc, hw);
    FBN_K(expand)(cc1, gc, hw);
    FBN_K(expand)(cc0, gc, hw);
    for (int64_t n = 0; n < n_; n++) {
      const int64_t off = (n * c_ + c0) * hw;
      FBN_K(bwd_apply_block)(x + off, y + off, bits != NULL ? bits + (n * c_ + c0) * bpr : NULL,
                             bpr, dy + off, dx != NULL ? dx + off : NULL,
                             dz != NULL ? dz + off : NULL, gc, hw, full, false, false, cm, ck,
                             cc1, cc0, stream);
    }
    for (int64_t j = 0; j < gc; j++)
      if (!v.fast[j])
        fbn_fast_exact_backward_apply(m, a, c0 + j, &v.chan[j]);
  }
}

static void FBN_K(backward_nchw_vec)(fbn_fast_call *m, const fbn_bk_backward_args *a, int nt,
                                     const fbn_fast_nchw_plan *plan, const uint8_t *bits,
                                     int64_t bpr) {
  const int64_t c_ = a->desc->c, g_ = plan->group, ngroups = (c_ + g_ - 1) / g_;
  if (nt > 1) {
    FBN_OMP(omp parallel for schedule(dynamic, 1) num_threads(nt))
    for (int64_t gi = 0; gi < ngroups; gi++)
      FBN_K(backward_nchw_vec_group)(m, a, nt, plan, bits, bpr, gi);
  } else {
    for (int64_t gi = 0; gi < ngroups; gi++)
      FBN_K(backward_nchw_vec_group)(m, a, nt, plan, bits, bpr, gi);
  }
}

/*
 * NHWC: chunks of rows as in forward_nhwc. The reduction pass also writes
 * daddend (= g) when it is wanted, so that the second pass reads x and g
 * only.
 */
/* What backward_nhwc's helpers share. */
typedef struct FBN_K(fbn_fast_bwd_nhwc) {
  fbn_fast_call *m;
  const fbn_bk_backward_args *a;
  const fbn_fast_nhwc_plan *plan;
  const uint8_t *bits;
  int64_t bpr, rows, nchunks;
  bool full, reduce, stream;
  bool g_early; /* g written by the reduction pass; the second pass computes dx from it */
} FBN_K(fbn_fast_bwd_nhwc);

/* Sums over rows [r0, r1) (r0 a multiple of P) into s1, s2. */
static void FBN_K(backward_nhwc_reduce_rows)(const FBN_K(fbn_fast_bwd_nhwc) *b, int64_t r0,
                                             int64_t r1, double *s1, double *s2) {
  const fbn_bk_backward_args *a = b->a;
  const int64_t c_ = a->desc->c, p_ = b->plan->rows_per_block;
  const FBN_T *x = a->x, *y = a->y, *dy = a->dy;
  FBN_T *dz = a->daddend;
  for (int64_t r = r0; r < r1; r += p_) {
    const int64_t nr = r + p_ <= r1 ? p_ : r1 - r;
    FBN_K(bwd_reduce_block)(x + r * c_, y + r * c_, b->bits != NULL ? b->bits + r * b->bpr : NULL,
                            b->bpr, dy + r * c_, b->g_early ? dz + r * c_ : NULL, nr, c_, false,
                            b->plan->shift, NULL, s1, s2, b->stream);
  }
}

static void FBN_K(backward_nhwc_reduce_chunk)(const FBN_K(fbn_fast_bwd_nhwc) *b, int64_t k,
                                              double *s1, double *s2) {
  const int64_t cr = b->plan->chunk_rows;
  FBN_K(backward_nhwc_reduce_rows)(b, k * cr, (k + 1) * cr < b->rows ? (k + 1) * cr : b->rows,
                                   s1, s2);
}

/* Per-channel sums (from nthreads threads' partial sums) and coefficients. */
static void FBN_K(backward_nhwc_coef)(const FBN_K(fbn_fast_bwd_nhwc) *b, int nthreads) {
  const fbn_fast_nhwc_plan *plan = b->plan;
  const int64_t c_ = b->a->desc->c, p_ = plan->rows_per_block;
  fbn_fast_bwd_chan *ch = plan->chan;
  FBN_T *cm = plan->coef[0], *ck = plan->coef[1], *cc1 = plan->coef[2], *cc0 = plan->coef[3];
  bool *fast = plan->fast;
  double *t1 = plan->mean, *t2 = plan->invstd; /* unused by backward otherwise */
  if (b->reduce)
    FBN_K(merge_partials)(plan, nthreads, c_, t1, t2);
  for (int64_t c = 0; c < c_; c++) {
    if (b->reduce)
      fast[c] = fbn_fast_bwd_chan_sums(b->m, b->a, c, fast[c], t1[c], t2[c], &ch[c]);
    cm[c] = ck[c] = cc1[c] = cc0[c] = (FBN_T)0;
    if (fast[c])
      fast[c] = FBN_K(backward_coef)(&ch[c], b->full, b->rows, &cm[c], &ck[c], &cc1[c], &cc0[c]);
  }
  fbn_fast_repeat(cm, sizeof(FBN_T), c_, p_);
  fbn_fast_repeat(ck, sizeof(FBN_T), c_, p_);
  fbn_fast_repeat(cc1, sizeof(FBN_T), c_, p_);
  fbn_fast_repeat(cc0, sizeof(FBN_T), c_, p_);
}

/* dx (and dz) of rows [r0, r1), r0 a multiple of P. */
static void FBN_K(backward_nhwc_apply_rows)(const FBN_K(fbn_fast_bwd_nhwc) *b, int64_t r0,
                                            int64_t r1) {
  const fbn_bk_backward_args *a = b->a;
  const fbn_fast_nhwc_plan *plan = b->plan;
  const int64_t c_ = a->desc->c, p_ = plan->rows_per_block;
  const FBN_T *x = a->x, *y = a->y;
  FBN_T *dx = a->dx;
  /* g_early: dz holds g; read it instead of the mask and dy. */
  const FBN_T *pdy = b->g_early ? (const FBN_T *)a->daddend : (const FBN_T *)a->dy;
  FBN_T *pdz = b->g_early ? NULL : (FBN_T *)a->daddend;
  for (int64_t r = r0; r < r1; r += p_) {
    const int64_t nr = r + p_ <= r1 ? p_ : r1 - r;
    FBN_K(bwd_apply_block)(x + r * c_, y + r * c_, b->bits != NULL ? b->bits + r * b->bpr : NULL,
                           b->bpr, pdy + r * c_, dx != NULL ? dx + r * c_ : NULL,
                           pdz != NULL ? pdz + r * c_ : NULL, nr, c_, b->full, b->g_early, false,
                           plan->coef[0], plan->coef[1], plan->coef[2], plan->coef[3], b->stream);
  }
}

static void FBN_K(backward_nhwc_apply_chunk)(const FBN_K(fbn_fast_bwd_nhwc) *b, int64_t k) {
  const int64_t cr = b->plan->chunk_rows;
  FBN_K(backward_nhwc_apply_rows)(b, k * cr, (k + 1) * cr < b->rows ? (k + 1) * cr : b->rows);
}

/* Unit u of a backward pass (apply: dx and dz; else the sums into s1, s2):
 * chunks u and u + half (half > 0 only for streamed tensors), a block of each
 * per step of one loop while both have whole blocks and the loop applies,
 * the rest block by block; else chunk u alone. */
static void FBN_K(backward_nhwc_unit)(const FBN_K(fbn_fast_bwd_nhwc) *b, bool apply, int64_t u,
                                      int64_t half, double *s1, double *s2) {
  const int64_t cr = b->plan->chunk_rows, p_ = b->plan->rows_per_block;
  const int64_t k1 = u + half;
  if (half == 0 || k1 >= b->nchunks) {
    if (apply)
      FBN_K(backward_nhwc_apply_chunk)(b, u);
    else
      FBN_K(backward_nhwc_reduce_chunk)(b, u, s1, s2);
    return;
  }
  const fbn_bk_backward_args *a = b->a;
  const fbn_fast_nhwc_plan *plan = b->plan;
  const int64_t c_ = a->desc->c, e1 = (k1 + 1) * cr < b->rows ? (k1 + 1) * cr : b->rows;
  const int64_t dr = half * cr;
  const FBN_T *x = a->x, *dy = a->dy;
  FBN_T *dz = a->daddend, *dx = a->dx;
  int64_t r = u * cr;
  for (; r + dr + p_ <= e1; r += p_) {
    const uint8_t *bb = b->bits != NULL ? b->bits + r * b->bpr : NULL;
    const int64_t o = r * c_;
    bool done;
    if (apply)
      done = FBN_K(fbn_fast_bwd_apply2)(x + o, bb, b->bpr, dy + o, dz != NULL ? dz + o : NULL,
                                        dx != NULL ? dx + o : NULL, p_, c_, b->full, b->g_early,
                                        plan->coef[0], plan->coef[1], plan->coef[2],
                                        plan->coef[3], dr * c_, dr * b->bpr);
    else
      done = FBN_K(fbn_fast_bwd_reduce2)(x + o, bb, b->bpr, dy + o,
                                         b->g_early ? dz + o : NULL, p_, c_, plan->shift, s1, s2,
                                         dr * c_, dr * b->bpr);
    if (!done)
      break;
  }
  /* the rest of both chunks, one block at a time */
  if (apply) {
    FBN_K(backward_nhwc_apply_rows)(b, r, (u + 1) * cr);
    FBN_K(backward_nhwc_apply_rows)(b, r + dr, e1);
  } else {
    FBN_K(backward_nhwc_reduce_rows)(b, r, (u + 1) * cr, s1, s2);
    FBN_K(backward_nhwc_reduce_rows)(b, r + dr, e1, s1, s2);
  }
}

/* The work of one thread of backward_nhwc (par as in forward_nhwc_run). */
static void FBN_K(backward_nhwc_run)(const FBN_K(fbn_fast_bwd_nhwc) *b, bool par) {
  const fbn_bk_backward_args *a = b->a;
  const int64_t lp = b->plan->block, nchunks = b->nchunks;
  const int t = par ? fbn_fast_thread_num() : 0, nthreads = par ? fbn_fast_num_threads() : 1;
  const bool apply = a->dx != NULL || (a->daddend != NULL && !b->g_early);
  /* streamed: pairs of chunks half the tensor apart (see forward_nhwc_run) */
  const int64_t half = b->stream ? (nchunks + 1) / 2 : 0, nunits = b->stream ? half : nchunks;
  if (b->reduce) {
    double *s1 = fbn_fast_partial(b->plan, t, 0), *s2 = fbn_fast_partial(b->plan, t, 1);
    memset(s1, 0, (size_t)lp * sizeof(double));
    memset(s2, 0, (size_t)lp * sizeof(double));
    if (par) {
      FBN_OMP(omp for schedule(dynamic, 1) nowait)
      for (int64_t u = 0; u < nunits; u++)
        FBN_K(backward_nhwc_unit)(b, false, u, half, s1, s2);
      FBN_OMP(omp barrier)
    } else {
      for (int64_t u = 0; u < nunits; u++)
        FBN_K(backward_nhwc_unit)(b, false, u, half, s1, s2);
    }
  }
  if (par) {
    FBN_OMP(omp single)
    FBN_K(backward_nhwc_coef)(b, nthreads);
    if (apply) {
      FBN_OMP(omp for schedule(dynamic, 1))
      for (int64_t u = 0; u < nunits; u++)
        FBN_K(backward_nhwc_unit)(b, true, u, half, NULL, NULL);
    }
  } else {
    FBN_K(backward_nhwc_coef)(b, 1);
    if (apply)
      for (int64_t u = 0; u < nunits; u++)
        FBN_K(backward_nhwc_unit)(b, true, u, half, NULL, NULL);
  }
}

static void FBN_K(backward_nhwc)(fbn_fast_call *m, const fbn_bk_backward_args *a, int nt,
                                 const fbn_fast_nhwc_plan *plan, const uint8_t *bits,
                                 int64_t bpr) {
  const fbn_tensor_desc *d = a->desc;
  const int64_t c_ = d->c, rows = d->n * d->h * d->w;
  const bool full = fbn_fast_full(a), reduce = full || m->grads;
  const FBN_K(fbn_fast_bwd_nhwc) b = {
      .m = m,
      .a = a,
      .plan = plan,
      .bits = bits,
      .bpr = bpr,
      .rows = rows,
      .nchunks = (rows + plan->chunk_rows - 1) / plan->chunk_rows,
      .full = full,
      .reduce = reduce,
      .stream = fbn_fast_stream_output(fbn_desc_numel(d) * (int64_t)sizeof(FBN_T)),
      .g_early = reduce && a->daddend != NULL,
  };
  fbn_fast_bwd_chan *ch = plan->chan;
  for (int64_t c = 0; c < c_; c++) {
    fbn_fast_bwd_chan_init(m, a, c, &ch[c]);
    plan->fast[c] = ch[c].finite;
    plan->shift[c] = ch[c].mean;
  }
  fbn_fast_repeat(plan->shift, sizeof(double), c_, plan->rows_per_block);
  if (nt > 1) {
    FBN_OMP(omp parallel num_threads(nt))
    FBN_K(backward_nhwc_run)(&b, true);
  } else {
    FBN_K(backward_nhwc_run)(&b, false);
  }
  if (a->dx != NULL || a->daddend != NULL)
    for (int64_t c = 0; c < c_; c++)
      if (!plan->fast[c])
        fbn_fast_exact_backward_apply(m, a, c, &ch[c]);
}

#undef FBN_CHUNK
#undef FBN_ANALYZER_INIT
#undef FBN_K
#undef FBN_CAT
#undef FBN_CAT2
