/*
 * Inner loops and drivers of the fast CPU backend, written once for an
 * element type. Included by fast_backend.c twice: FBN_T = float (FBN_SFX f32,
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
 * BN alone (FBN_OPERATION_BN) runs the same loops without the gate: y = v,
 * g = dy (no mask, y not read). The flag is a compile-time parameter of the
 * always-inline bodies (RELU, MASK), chosen once per block, so that both
 * variants do the same arithmetic up to the gate: BN + ReLU is ReLU(BN) bit
 * for bit.
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
#error "define FBN_T, FBN_SFX and FBN_MASK_T before including fast_loops_impl.h"
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
/* Forward: y = ReLU((x - m) * a + b [+ z]), or without ReLU (BN alone)      */
/* ======================================================================== */

/* The gate: ReLU(v) when RELU, else v. */
#define FBN_GATE(RELU, v) ((RELU) && (v) <= (FBN_T)0 ? (FBN_T)0 : (v))

FBN_FAST_INLINE void FBN_K(norm_piece)(const bool RELU, const FBN_T *restrict x,
                                       const FBN_T *restrict z, FBN_T *restrict y, int64_t n,
                                       FBN_T m, FBN_T a, FBN_T b) {
  if (z != NULL) {
    FBN_SIMD
    for (int64_t i = 0; i < n; i++) {
      const FBN_T v = (x[i] - m) * a + b + z[i];
      y[i] = FBN_GATE(RELU, v);
    }
  } else {
    FBN_SIMD
    for (int64_t i = 0; i < n; i++) {
      const FBN_T v = (x[i] - m) * a + b;
      y[i] = FBN_GATE(RELU, v);
    }
  }
}

FBN_FAST_INLINE void FBN_K(norm_piece_vec)(const bool RELU, const FBN_T *restrict x,
                                           const FBN_T *restrict z, FBN_T *restrict y, int64_t n,
                                           const FBN_T *restrict m, const FBN_T *restrict a,
                                           const FBN_T *restrict b) {
  if (z != NULL) {
    FBN_SIMD
    for (int64_t i = 0; i < n; i++) {
      const FBN_T v = (x[i] - m[i]) * a[i] + b[i] + z[i];
      y[i] = FBN_GATE(RELU, v);
    }
  } else {
    FBN_SIMD
    for (int64_t i = 0; i < n; i++) {
      const FBN_T v = (x[i] - m[i]) * a[i] + b[i];
      y[i] = FBN_GATE(RELU, v);
    }
  }
}

/* norm_block's staged loop (RELU: with the gate; else BN alone, bits NULL). */
static FBN_FAST_INLINE void FBN_K(norm_block_body)(const bool RELU, const FBN_T *x,
                                                   const FBN_T *z, FBN_T *y, int64_t rows,
                                                   int64_t len, bool per_row, const FBN_T *m,
                                                   const FBN_T *a, const FBN_T *b, uint8_t *bits,
                                                   int64_t bpr, bool stream) {
  FBN_T tmp[FBN_CHUNK] __attribute__((aligned(64)));
  FBN_ANALYZER_INIT(tmp);
  fbn_fast_chunk ck;
  fbn_fast_chunk_start(&ck, rows, len, FBN_CHUNK);
  while (fbn_fast_chunk_next(&ck)) {
    FBN_T *out = stream ? tmp : y + ck.off;
    if (per_row) {
      for (int64_t j = 0; j < ck.nrows; j++) {
        const int64_t r = ck.row + j, o = j * len, n = ck.nrows > 1 ? len : ck.n;
        FBN_K(norm_piece)(RELU, x + ck.off + o, z != NULL ? z + ck.off + o : NULL, out + o, n,
                          m[r], a[r], b[r]);
      }
    } else {
      FBN_K(norm_piece_vec)(RELU, x + ck.off, z != NULL ? z + ck.off : NULL, out, ck.n,
                            m + ck.off, a + ck.off, b + ck.off);
    }
    if (RELU && bits != NULL)
      FBN_K(mask_pack)(out, &ck, len, bits, bpr);
    if (stream)
      FBN_K(fbn_fast_stream)(y + ck.off, tmp, ck.n);
  }
  if (stream)
    fbn_fast_stream_fence();
}

/*
 * One block of rows x len. Coefficients per row (m[r], a[r], b[r]) when
 * per_row, else per element of the block. bits (may be NULL): the block's
 * first row of the saved bitmask. relu: y = ReLU(v); else y = v (BN alone,
 * no mask).
 */
FBN_FAST_CLONES
static void FBN_K(norm_block)(bool relu, const FBN_T *x, const FBN_T *z, FBN_T *y, int64_t rows,
                              int64_t len, bool per_row, const FBN_T *m, const FBN_T *a,
                              const FBN_T *b, uint8_t *bits, int64_t bpr, bool stream) {
  if (stream && FBN_K(fbn_fast_norm_nt)(relu, x, z, y, rows, len, per_row, m, a, b, bits, bpr))
    return;
  if (relu)
    FBN_K(norm_block_body)(true, x, z, y, rows, len, per_row, m, a, b, bits, bpr, stream);
  else
    FBN_K(norm_block_body)(false, x, z, y, rows, len, per_row, m, a, b, NULL, bpr, stream);
}

/* ======================================================================== */
/* Backward                                                                 */
/* ======================================================================== */

/* g of element i: dy masked by mk (MASK), else dy (BN alone). */
#define FBN_G(MASK, mk, dyv) ((MASK) ? ((mk) ? (dyv) : (FBN_T)0) : (dyv))

/* bwd_reduce_block's loop (MASK: g = mk ? dy : 0; else g = dy, y not read). */
static FBN_FAST_INLINE void FBN_K(bwd_reduce_body)(const bool MASK, const FBN_T *x,
                                                   const FBN_T *y, const uint8_t *bits,
                                                   int64_t bpr, const FBN_T *dy, FBN_T *gout,
                                                   int64_t rows, int64_t len, bool per_row,
                                                   const double *mean, double (*acc)[2],
                                                   double *sg, double *sgx, bool stream) {
  FBN_MASK_T mk[FBN_CHUNK] __attribute__((aligned(64)));
  FBN_T tmp[FBN_CHUNK] __attribute__((aligned(64)));
  FBN_ANALYZER_INIT(tmp);
  fbn_fast_chunk ck;
  fbn_fast_chunk_start(&ck, rows, len, FBN_CHUNK);
  while (fbn_fast_chunk_next(&ck)) {
    if (MASK)
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
          const FBN_T g = FBN_G(MASK, mo[i], dyv);
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
            go[i] = FBN_G(MASK, mo[i], dyv);
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
          const FBN_T g = FBN_G(MASK, mo[i], dyv);
          go[i] = g;
          s1[i] += (double)g;
          s2[i] += (double)g * ((double)xc[i] - me[i]);
        }
      } else {
        FBN_SIMD
        for (int64_t i = 0; i < ck.n; i++) {
          const FBN_T dyv = dyc[i];
          const FBN_T g = FBN_G(MASK, mo[i], dyv);
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

/*
 * Reduction of one block: sum g and sum g * (x - mean), g = mk ? dy : 0
 * (relu: the mask from bits, or from y when bits is NULL), else g = dy (BN
 * alone: y may be NULL). per_row: acc[r] per row with mean[r]; else per
 * element into sg[], sgx[] with mean[] per element. gout (may be NULL)
 * receives g.
 */
FBN_FAST_CLONES
static void FBN_K(bwd_reduce_block)(bool relu, const FBN_T *x, const FBN_T *y,
                                    const uint8_t *bits, int64_t bpr, const FBN_T *dy,
                                    FBN_T *gout, int64_t rows, int64_t len, bool per_row,
                                    const double *mean, double (*acc)[2], double *sg,
                                    double *sgx, bool stream) {
  if (relu)
    FBN_K(bwd_reduce_body)(true, x, y, bits, bpr, dy, gout, rows, len, per_row, mean, acc, sg, sgx,
                           stream);
  else
    FBN_K(bwd_reduce_body)(false, x, NULL, NULL, bpr, dy, gout, rows, len, per_row, mean, acc, sg,
                           sgx, stream);
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
    if (mk == NULL) { /* dy holds g; dz is NULL */
      if (full) {
        FBN_SIMD
        for (int64_t i = 0; i < n; i++)
          dx[i] = dy[i] * ks + (x[i] - ms) * c1s + c0s;
      } else {
        FBN_SIMD
        for (int64_t i = 0; i < n; i++)
          dx[i] = dy[i] * ks;
      }
    } else if (dz != NULL && full) {
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
 * g_given, dy already holds g (no mask, dz NULL, y not read: daddend
 * written by the reduction, or BN alone, where g = dy). Coefficients per
 * row or per element as in norm_block.
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
        FBN_K(bwd_apply_piece)(x + ck.off + o, g_given ? NULL : mk + o, dy + ck.off + o,
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

/* The x - m bound of fbn_fast_shift_fits for FBN_T. */
#define FBN_T_SHIFT_LIMIT                                                                        \
  _Generic((FBN_T)0, float: FBN_FAST_SHIFT_LIMIT(FLT_MAX, FLT_EPSILON),                          \
           default: FBN_FAST_SHIFT_LIMIT(DBL_MAX, DBL_EPSILON))

/* Forward coefficients of one channel; false when they do not fit FBN_T
 * (fast_channel.h: fbn_fast_factor_fits, fbn_fast_shift_fits; the channel
 * then takes the exact path). */
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
         fbn_fast_finite((double)*cb) &&
         fbn_fast_factor_fits(invstd == 0.0 || w == 0.0, (double)*ca, FBN_T_MIN) &&
         fbn_fast_shift_fits((double)*cm, FBN_T_SHIFT_LIMIT);
}

/* Backward coefficients: dx = g*k + (x - m)*c1 + c0 (x read only with
 * batch statistics); false as above. */
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
  const bool k_zero = ch->weight == 0.0 || ch->invstd == 0.0;
  const bool c1_zero = !full || k_zero || ch->sum_gxhat == 0.0;
  return fbn_fast_finite(ch->mean) && fbn_fast_finite(k) && fbn_fast_finite(c1) &&
         fbn_fast_finite(c0) && fbn_fast_finite((double)*cm) && fbn_fast_finite((double)*ck) &&
         fbn_fast_finite((double)*cc1) && fbn_fast_finite((double)*cc0) &&
         fbn_fast_factor_fits(k_zero, (double)*ck, FBN_T_MIN) &&
         fbn_fast_factor_fits(c1_zero, (double)*cc1, FBN_T_MIN) &&
         (!full || fbn_fast_shift_fits((double)*cm, FBN_T_SHIFT_LIMIT));
}

#undef FBN_T_SHIFT_LIMIT

/* Copy e[j*hw] to e[j*hw + 1 .. (j+1)*hw) for the gc channels of a group. */
static void FBN_K(expand)(FBN_T *e, int64_t gc, int64_t hw) {
  for (int64_t j = 0; j < gc; j++)
    for (int64_t s = 1; s < hw; s++)
      e[j * hw + s] = e[j * hw];
}
