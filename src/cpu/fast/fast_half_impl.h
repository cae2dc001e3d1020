/*
 * The fast backend's loops for half tensors (float16, bfloat16): the
 * block functions the NCHW and NHWC drivers call (fast_nchw_impl.h,
 * fast_nhwc_impl.h), written once for a half type. Included by
 * fast_backend.c with FBN_T = uint16_t (the storage), FBN_C = float (the
 * coefficients and the arithmetic), FBN_SFX f16 or bf16, FBN_HALF_BF16 0
 * or 1, after the float32 loops (fast_loops_impl.h), which do the work.
 *
 * Each block is cut into chunks of FBN_HALF_CHUNK elements (whole rows, or
 * a piece of one row: fbn_fast_chunk_next) that are widened into
 * L1-resident float32 buffers by the process's conversion runs
 * (src/cpu/half: portable, F16C + AVX2 or AVX-512, chosen once); the
 * float32 block function of the same job runs on those buffers, and its
 * float32 outputs are rounded once into the half tensor (outputs larger
 * than the caches: into an L1 tile copied out with non-temporal stores,
 * as the float32 loops stream theirs). The tensors are
 * read and written as half values only: 2 bytes per element per pass, no
 * widened copy of a tensor. Where the conversion path is a vector one
 * (avx2, avx512), the statistics and the forward normalization take the
 * loops of fast_half_avx2.h instead, which widen and round in registers
 * (one sweep, no staging buffers) with the same arithmetic in the same
 * order: their results are those of the staged loops, bit for bit.
 *
 * Numerics:
 *   statistics   float64 sums of the widened values shifted by a value of
 *                the channel (stats_rows_f32 / stats_blocks_f32), as for
 *                float32 tensors;
 *   forward      y = round(ReLU((x - m) * a + b + z)) in float32, rounded
 *                once to the half type (the float32 value is itself within
 *                2^-24 relative of the exact one). ReLU before or after the
 *                rounding gives the same y (rounding keeps signs and
 *                maps no value <= 0 above 0), but not the same mask: a
 *                positive v below half of the smallest half subnormal
 *                rounds to +0, so the saved mask is packed from the
 *                rounded y (widened back, exactly): !(y <= 0), NaN sets it,
 *                as the reference computes it from y in backward;
 *   backward     g = mask ? dy : 0, sums in float64, dx in float32 and
 *                rounded once; daddend = g, exact.
 * The coefficients are the float32 loops' (forward_coef_f32,
 * backward_coef_f32): channels whose coefficients do not fit float32 take
 * the exact path (fast_channel.h), which computes in float64 and rounds
 * once to the half type.
 */
#ifndef FBN_T
#error "define FBN_T, FBN_SFX and FBN_HALF_BF16 before including fast_half_impl.h"
#endif

#include "cpu/fast/fast_half_avx2.h"

#define FBN_C float
#define FBN_CAT2(a, b) a##_##b
#define FBN_CAT(a, b) FBN_CAT2(a, b)
#define FBN_K(name) FBN_CAT(name, FBN_SFX)
/* the float32 loops' chunk: their mask helpers' buffers hold one */
#define FBN_HALF_CHUNK (FBN_FAST_CHUNK_BYTES / (int64_t)sizeof(float))
#define FBN_CHUNK FBN_HALF_CHUNK
#ifdef __clang_analyzer__
#define FBN_ANALYZER_INIT(a) memset((a), 0, sizeof(a))
#else
#define FBN_ANALYZER_INIT(a) ((void)0)
#endif

/* dst[0..n) <- src[0..n) rounded; stream: through the L1 tile ht and
 * non-temporal stores (outputs larger than the caches: no read for
 * ownership of their lines; fbn_fast_stream_fence after the block). */
static inline void FBN_K(half_out)(fbn_half_narrow_fn narrow, const float *src, FBN_T *dst,
                                   int64_t n, bool stream, FBN_T *ht) {
  if (!stream) {
    narrow(src, dst, n);
    return;
  }
  narrow(src, ht, n);
  fbn_fast_stream_u16(dst, ht, n);
}

/* This type's widening and narrowing runs. */
static inline fbn_half_widen_fn FBN_K(half_widen)(void) {
  const fbn_half_convert *cv = fbn_half_convert_get();
  return FBN_HALF_BF16 ? cv->bf16_to_f32 : cv->f16_to_f32;
}
static inline fbn_half_narrow_fn FBN_K(half_narrow)(void) {
  const fbn_half_convert *cv = fbn_half_convert_get();
  return FBN_HALF_BF16 ? cv->f32_to_bf16 : cv->f32_to_f16;
}

/* The rows and length the float32 function sees for chunk ck: its whole
 * rows, or the piece of one row as one row. */
static inline int64_t FBN_K(half_rows)(const fbn_fast_chunk *ck) { return ck->nrows; }
static inline int64_t FBN_K(half_len)(const fbn_fast_chunk *ck, int64_t len) {
  return ck->nrows > 1 ? len : ck->n;
}
/* The chunk's first mask byte (bits of the block's first row). */
static inline const uint8_t *FBN_K(half_bits)(const uint8_t *bits, const fbn_fast_chunk *ck,
                                              int64_t bpr) {
  return bits != NULL ? bits + ck->row * bpr + ck->seg / 8 : NULL;
}

/* ---- statistics --------------------------------------------------------- */

/* stats_rows_f32 on the widened rows. */
static void FBN_K(stats_rows)(const FBN_T *x, int64_t rows, int64_t len, const double *k,
                              double (*acc)[2]) {
  float xt[FBN_HALF_CHUNK] __attribute__((aligned(64)));
  const fbn_half_widen_fn widen = FBN_K(half_widen)();
  fbn_fast_chunk ck;
  fbn_fast_chunk_start(&ck, rows, len, FBN_HALF_CHUNK);
#if FBN_FAST_HALF_AVX2
  if (fbn_fast_half_vec()) {
    /* the same chunks, widened in registers (the same sums) */
    while (fbn_fast_chunk_next(&ck))
      fbn_fast_half_stats_rows_avx2(FBN_HALF_BF16, x + ck.off, FBN_K(half_rows)(&ck),
                                    FBN_K(half_len)(&ck, len), k + ck.row, acc + ck.row);
    return;
  }
#endif
  while (fbn_fast_chunk_next(&ck)) {
    widen(x + ck.off, xt, ck.n);
    stats_rows_f32(xt, FBN_K(half_rows)(&ck), FBN_K(half_len)(&ck, len), k + ck.row,
                   acc + ck.row);
  }
}

/* stats_blocks_f32 on the widened blocks, four blocks' pieces at a time. */
static void FBN_K(stats_blocks)(const FBN_T *x, int64_t nblocks, int64_t stride, int64_t n,
                                const double *k, double *s1, double *s2) {
#if FBN_FAST_HALF_AVX2
  if (fbn_fast_half_vec()) {
    fbn_fast_half_stats_blocks_avx2(FBN_HALF_BF16, x, nblocks, stride, n, k, s1, s2);
    return;
  }
#endif
  float xt[4][FBN_HALF_CHUNK] __attribute__((aligned(64)));
  const fbn_half_widen_fn widen = FBN_K(half_widen)();
  for (int64_t j = 0; j < nblocks; j += 4) {
    const int64_t nb = nblocks - j < 4 ? nblocks - j : 4;
    for (int64_t i0 = 0; i0 < n; i0 += FBN_HALF_CHUNK) {
      const int64_t len = n - i0 < FBN_HALF_CHUNK ? n - i0 : FBN_HALF_CHUNK;
      for (int64_t b = 0; b < nb; b++)
        widen(x + (j + b) * stride + i0, xt[b], len);
      stats_blocks_f32(&xt[0][0], nb, FBN_HALF_CHUNK, len, k + i0, s1 + i0, s2 + i0);
    }
  }
}

/* ---- forward ------------------------------------------------------------ */

/* norm_block for half tensors (same arguments; coefficients in float32). */
static void FBN_K(norm_block)(bool relu, const FBN_T *x, const FBN_T *z, FBN_T *y, int64_t rows,
                              int64_t len, bool per_row, const float *m, const float *a,
                              const float *b, uint8_t *bits, int64_t bpr, bool stream) {
#if FBN_FAST_HALF_AVX2
  if (fbn_fast_half_vec() && (len >= 8 || rows == 1)) {
    fbn_fast_half_norm_avx2(FBN_HALF_BF16, relu, x, z, y, rows, len, per_row, m, a, b, bits, bpr,
                            stream);
    return;
  }
#endif
  FBN_T ht[FBN_HALF_CHUNK] __attribute__((aligned(64)));
  float xt[FBN_HALF_CHUNK] __attribute__((aligned(64)));
  float zt[FBN_HALF_CHUNK] __attribute__((aligned(64)));
  float yt[FBN_HALF_CHUNK] __attribute__((aligned(64)));
  FBN_ANALYZER_INIT(zt);
  FBN_ANALYZER_INIT(yt);
  const fbn_half_widen_fn widen = FBN_K(half_widen)();
  const fbn_half_narrow_fn narrow = FBN_K(half_narrow)();
  fbn_fast_chunk ck;
  fbn_fast_chunk_start(&ck, rows, len, FBN_HALF_CHUNK);
  while (fbn_fast_chunk_next(&ck)) {
    widen(x + ck.off, xt, ck.n);
    if (z != NULL)
      widen(z + ck.off, zt, ck.n);
    const int64_t r = per_row ? ck.row : ck.off;
    norm_block_f32(relu, xt, z != NULL ? zt : NULL, yt, FBN_K(half_rows)(&ck),
                   FBN_K(half_len)(&ck, len), per_row, m + r, a + r, b + r, NULL, 0, false);
    FBN_K(half_out)(narrow, yt, y + ck.off, ck.n, stream, ht);
    if (relu && bits != NULL) {
      /* the mask of the rounded y */
      widen(stream ? ht : y + ck.off, yt, ck.n);
      mask_pack_f32(yt, &ck, len, bits, bpr);
    }
  }
  if (stream)
    fbn_fast_stream_fence();
}

/* ---- NCHW training forward: statistics pipelined into normalization ---- */

#if FBN_FAST_PIPE && FBN_FAST_HALF_AVX2
/*
 * fbn_fast_forward_nchw_pipe (fast_pipe.h) for half tensors, where the
 * conversion path is a vector one: the statistics of group k+1 are summed
 * in the loop that normalizes group k (fbn_fast_half_pipe_row_avx2), one
 * row at a time, so that every channel's sums are those of forward_nchw
 * (rows n = 0..N-1 in turn, each in the staged loops' chunks): the results
 * are the staged path's, bit for bit. Where fbn_fast_half_pipe_usable.
 */
static void FBN_K(pipe_unit)(fbn_fast_call *m, const fbn_bk_forward_args *a,
                             const fbn_fast_pipe_plan *p, int64_t u, uint8_t *bits, int64_t bpr) {
  const fbn_tensor_desc *d = a->desc;
  const int64_t n_ = d->n, c_ = d->c, hw = d->h * d->w, g_ = p->group;
  int64_t gi0, gi1;
  fbn_fast_pipe_groups(p, u, &gi0, &gi1);
  const FBN_T *x = a->x, *z = a->addend;
  FBN_T *y = a->y;
  const bool relu = fbn_fast_relu(a);
  fbn_fast_pipe_group grp[2];
  grp[1].c0 = grp[1].gc = 0; /* set before use; said for the static analyzer */
  double mean[FBN_FAST_MAX_GROUP], invstd[FBN_FAST_MAX_GROUP];
  float cm[FBN_FAST_MAX_GROUP], ca[FBN_FAST_MAX_GROUP], cb[FBN_FAST_MAX_GROUP];
  bool fast[FBN_FAST_MAX_GROUP];

  fbn_fast_pipe_group *cur = &grp[0], *next = &grp[1];
  const int64_t first = gi0 * g_;
  cur->c0 = first;
  cur->gc = c_ - first < g_ ? c_ - first : g_;
  for (int64_t j = 0; j < cur->gc; j++) {
    cur->acc[j][0] = cur->acc[j][1] = 0.0;
    cur->shift[j] = fbn_fast_shift_of(d, x, first + j);
  }
  for (int64_t n = 0; n < n_; n++)
    FBN_K(stats_rows)(x + (n * c_ + cur->c0) * hw, cur->gc, hw, cur->shift, cur->acc);
  for (int64_t gi = gi0; gi < gi1; gi++) {
    const int64_t c0 = cur->c0, gc = cur->gc;
    for (int64_t j = 0; j < gc; j++) {
      fbn_fast_batch_stats(m, a, c0 + j, cur->shift[j], cur->acc[j][0], cur->acc[j][1],
                           &mean[j], &invstd[j]);
      fast[j] = forward_coef_f32(mean[j], invstd[j], fbn_fast_weight(m, c0 + j),
                                 fbn_fast_bias(m, c0 + j), &cm[j], &ca[j], &cb[j]);
    }
    const bool more = gi + 1 < gi1;
    const int64_t c1 = c0 + gc, gc1 = !more ? 0 : c_ - c1 < g_ ? c_ - c1 : g_;
    next->c0 = c1;
    next->gc = gc1;
    for (int64_t j = 0; j < gc1; j++) {
      next->acc[j][0] = next->acc[j][1] = 0.0;
      next->shift[j] = fbn_fast_shift_of(d, x, c1 + j);
    }
    for (int64_t n = 0; n < n_; n++) {
      const int64_t off = (n * c_ + c0) * hw, off1 = (n * c_ + c1) * hw;
      uint8_t *bn = bits != NULL ? bits + (n * c_ + c0) * bpr : NULL;
      /* gc1 <= gc: only the tensor's last group is smaller */
      for (int64_t j = 0; j < gc1; j++) {
        const int64_t o = off + j * hw;
        fbn_fast_half_pipe_row_avx2(FBN_HALF_BF16, relu, x + o, FBN_FAST_AT(z, o), y + o, hw,
                                    cm[j], ca[j], cb[j], FBN_FAST_AT(bn, j * bpr),
                                    x + off1 + j * hw, next->shift[j], next->acc[j],
                                    FBN_HALF_CHUNK);
      }
      if (gc > gc1) {
        const int64_t o = off + gc1 * hw;
        FBN_K(norm_block)(relu, x + o, FBN_FAST_AT(z, o), y + o, gc - gc1, hw, true, cm + gc1,
                          ca + gc1, cb + gc1, FBN_FAST_AT(bn, gc1 * bpr), bpr, true);
      }
    }
    fbn_fast_stream_fence();
    for (int64_t j = 0; j < gc; j++)
      if (!fast[j])
        fbn_fast_exact_normalize(m, a, c0 + j, mean[j], invstd[j], bits, bpr);
    fbn_fast_pipe_group *t = cur;
    cur = next;
    next = t;
  }
}

static void FBN_K(forward_nchw_pipe)(fbn_fast_call *m, const fbn_bk_forward_args *a, int nt,
                                     uint8_t *bits, int64_t bpr) {
  const fbn_fast_pipe_plan p = fbn_fast_pipe_plan_of(a->desc, (int64_t)sizeof(FBN_T), nt);
  if (nt > 1) {
    FBN_OMP(omp parallel for schedule(dynamic, 1) num_threads(nt))
    for (int64_t u = 0; u < p.units; u++)
      FBN_K(pipe_unit)(m, a, &p, u, bits, bpr);
  } else {
    for (int64_t u = 0; u < p.units; u++)
      FBN_K(pipe_unit)(m, a, &p, u, bits, bpr);
  }
}
#endif

/* ---- backward ----------------------------------------------------------- */

/* bwd_reduce_block for half tensors (gout: g, exact). */
static void FBN_K(bwd_reduce_block)(bool relu, const FBN_T *x, const FBN_T *y,
                                    const uint8_t *bits, int64_t bpr, const FBN_T *dy,
                                    FBN_T *gout, int64_t rows, int64_t len, bool per_row,
                                    const double *mean, double (*acc)[2], double *sg,
                                    double *sgx, bool stream) {
  FBN_T ht[FBN_HALF_CHUNK] __attribute__((aligned(64)));
  float xt[FBN_HALF_CHUNK] __attribute__((aligned(64)));
  float yt[FBN_HALF_CHUNK] __attribute__((aligned(64)));
  float dyt[FBN_HALF_CHUNK] __attribute__((aligned(64)));
  float gt[FBN_HALF_CHUNK] __attribute__((aligned(64)));
  FBN_ANALYZER_INIT(yt);
  FBN_ANALYZER_INIT(gt);
  const fbn_half_widen_fn widen = FBN_K(half_widen)();
  const fbn_half_narrow_fn narrow = FBN_K(half_narrow)();
  const bool from_y = relu && bits == NULL;
  fbn_fast_chunk ck;
  fbn_fast_chunk_start(&ck, rows, len, FBN_HALF_CHUNK);
  while (fbn_fast_chunk_next(&ck)) {
    widen(x + ck.off, xt, ck.n);
    widen(dy + ck.off, dyt, ck.n);
    if (from_y)
      widen(y + ck.off, yt, ck.n);
    const int64_t nr = FBN_K(half_rows)(&ck), nl = FBN_K(half_len)(&ck, len);
    const uint8_t *bc = relu ? FBN_K(half_bits)(bits, &ck, bpr) : NULL;
    if (per_row)
      bwd_reduce_block_f32(relu, xt, from_y ? yt : NULL, bc, bpr, dyt,
                           /* gt is an output buffer, written by the call */
                           // cppcheck-suppress legacyUninitvar
                           gout != NULL ? gt : NULL, nr, nl, true, mean + ck.row, acc + ck.row,
                           NULL, NULL, false);
    else
      bwd_reduce_block_f32(relu, xt, from_y ? yt : NULL, bc, bpr, dyt,
                           // cppcheck-suppress legacyUninitvar
                           gout != NULL ? gt : NULL, nr, nl, false, mean + ck.off, NULL,
                           sg + ck.off, sgx + ck.off, false);
    if (gout != NULL)
      FBN_K(half_out)(narrow, gt, gout + ck.off, ck.n, stream, ht);
  }
  if (gout != NULL && stream)
    fbn_fast_stream_fence();
}

/* bwd_apply_block for half tensors. */
static void FBN_K(bwd_apply_block)(const FBN_T *x, const FBN_T *y, const uint8_t *bits,
                                   int64_t bpr, const FBN_T *dy, FBN_T *dx, FBN_T *dz,
                                   int64_t rows, int64_t len, bool full, bool g_given,
                                   bool per_row, const float *m, const float *k, const float *c1,
                                   const float *c0, bool stream) {
  FBN_T ht[FBN_HALF_CHUNK] __attribute__((aligned(64)));
  float xt[FBN_HALF_CHUNK] __attribute__((aligned(64)));
  float yt[FBN_HALF_CHUNK] __attribute__((aligned(64)));
  float dyt[FBN_HALF_CHUNK] __attribute__((aligned(64)));
  float dxt[FBN_HALF_CHUNK] __attribute__((aligned(64)));
  float dzt[FBN_HALF_CHUNK] __attribute__((aligned(64)));
  FBN_ANALYZER_INIT(xt);
  FBN_ANALYZER_INIT(yt);
  FBN_ANALYZER_INIT(dxt);
  FBN_ANALYZER_INIT(dzt);
  const fbn_half_widen_fn widen = FBN_K(half_widen)();
  const fbn_half_narrow_fn narrow = FBN_K(half_narrow)();
  const bool from_y = !g_given && bits == NULL;
  fbn_fast_chunk ck;
  fbn_fast_chunk_start(&ck, rows, len, FBN_HALF_CHUNK);
  while (fbn_fast_chunk_next(&ck)) {
    if (full && dx != NULL)
      widen(x + ck.off, xt, ck.n);
    widen(dy + ck.off, dyt, ck.n);
    if (from_y)
      widen(y + ck.off, yt, ck.n);
    const int64_t r = per_row ? ck.row : ck.off;
    bwd_apply_block_f32(xt, from_y ? yt : NULL, g_given ? NULL : FBN_K(half_bits)(bits, &ck, bpr),
                        bpr, dyt, dx != NULL ? dxt : NULL, dz != NULL ? dzt : NULL,
                        FBN_K(half_rows)(&ck), FBN_K(half_len)(&ck, len), full, g_given, per_row,
                        m + r, k + r, c1 + r, c0 + r, false);
    if (dx != NULL)
      FBN_K(half_out)(narrow, dxt, dx + ck.off, ck.n, stream, ht);
    if (dz != NULL)
      FBN_K(half_out)(narrow, dzt, dz + ck.off, ck.n, stream, ht);
  }
  if (stream)
    fbn_fast_stream_fence();
}

/* ---- per-channel coefficients: the float32 loops' ----------------------- */

static bool FBN_K(forward_coef)(double mean, double invstd, double w, double b, float *cm,
                                float *ca, float *cb) {
  return forward_coef_f32(mean, invstd, w, b, cm, ca, cb);
}

static bool FBN_K(backward_coef)(const fbn_fast_bwd_chan *ch, bool full, int64_t count, float *cm,
                                 float *ck, float *cc1, float *cc0) {
  return backward_coef_f32(ch, full, count, cm, ck, cc1, cc0);
}

static void FBN_K(expand)(float *e, int64_t gc, int64_t hw) { expand_f32(e, gc, hw); }
