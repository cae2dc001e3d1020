/*
 * Fast CPU backend: the pipelined NCHW path (float32, long rows, large
 * tensors, AVX2): the statistics (forward) or reduction (backward) of a
 * channel group run inside the loop of the previous group's second pass.
 * Included after the float32 loops, whose kernels it calls.
 */
/* ---- NCHW training forward: statistics pipelined into normalization ---- */

#if FBN_FAST_PIPE
/*
 * NCHW, long rows, float32, batch statistics, streamed output (AVX2). The
 * grouped forward (forward_nchw) reads a group's x twice in two passes: the
 * statistics pass only reads, and on a 2-core AMD EPYC (docs/benchmarks.md) a core that only
 * reads reaches about 2/3 of the bandwidth of one that reads and writes
 * (misses in flight per core are the limit, not the memory; 2 threads over
 * 100-512 MB: reading alone 21-26 GB/s, reading two streams and writing one
 * with non-temporal stores 29-34 GB/s counting every byte). Here the
 * statistics of group k+1 are accumulated in the same loop that normalizes
 * group k, whose x is still in the caches from the previous step: every
 * step reads two streams from memory (x of k+1, addend of k) and writes
 * one (y of k), like the eval pass. A unit of work is a run of up to
 * FBN_FAST_PIPE_STAGES consecutive groups (threads take units dynamically);
 * its first group's statistics are read alone, its last group is normalized
 * alone. Within a group the rows of n and n + N/2 go through one loop (two
 * sets of streams in flight: 6-9% faster on the ResNet-50 shapes than one
 * row at a time), so the sums are formed in another order than
 * forward_nchw's (both float64 on shifted data).
 */
/* Channels per group (FBN_FAST_PIPE_GROUP_BYTES of the first pass's
 * inputs), groups per unit of work (FBN_FAST_PIPE_STAGES, fewer when that
 * would leave fewer than 4 units per thread) and units. */
typedef struct fbn_fast_pipe_plan {
  int64_t group, stages, ngroups, units;
} fbn_fast_pipe_plan;

static fbn_fast_pipe_plan fbn_fast_pipe_plan_of(const fbn_tensor_desc *d,
                                                int64_t bytes_per_element, int nt) {
  fbn_fast_pipe_plan p;
  const int64_t g = FBN_FAST_PIPE_GROUP_BYTES / (d->n * d->h * d->w * bytes_per_element);
  p.group = g < 1 ? 1 : g > FBN_FAST_MAX_GROUP ? FBN_FAST_MAX_GROUP : g;
  p.ngroups = (d->c + p.group - 1) / p.group;
  const int64_t s = p.ngroups / (4 * (int64_t)nt);
  p.stages = nt == 1 ? FBN_FAST_PIPE_STAGES
             : s < 1 ? 1
             : s > FBN_FAST_PIPE_STAGES ? FBN_FAST_PIPE_STAGES
                                        : s;
  p.units = (p.ngroups + p.stages - 1) / p.stages;
  return p;
}

/* Groups [*gi0, *gi1) of unit u. */
static void fbn_fast_pipe_groups(const fbn_fast_pipe_plan *p, int64_t u, int64_t *gi0,
                                 int64_t *gi1) {
  *gi0 = u * p->stages;
  *gi1 = *gi0 + p->stages < p->ngroups ? *gi0 + p->stages : p->ngroups;
}

static bool fbn_fast_pipe_usable(const fbn_bk_forward_args *a, const uint8_t *bits, int64_t bpr) {
  const fbn_tensor_desc *d = a->desc;
  const int64_t hw = d->h * d->w;
  return d->dtype == FBN_DTYPE_FLOAT32 && fbn_fast_full(a) && hw >= FBN_FAST_NCHW_VEC_HW &&
         hw % 8 == 0 && (bits == NULL || bpr == hw / 8) && ((uintptr_t)a->y & 15) == 0 &&
         fbn_fast_stream_output(fbn_desc_numel(d) * (int64_t)sizeof(float)) &&
         fbn_fast_have_avx2();
}

typedef struct fbn_fast_pipe_group {
  int64_t c0, gc;
  double shift[FBN_FAST_MAX_GROUP], acc[FBN_FAST_MAX_GROUP][2];
} fbn_fast_pipe_group;

static void fbn_fast_pipe_group_init(fbn_fast_pipe_group *g, const fbn_tensor_desc *d,
                                     const float *x, int64_t c0, int64_t gc) {
  g->c0 = c0;
  g->gc = gc;
  for (int64_t j = 0; j < gc; j++) {
    g->acc[j][0] = g->acc[j][1] = 0.0;
    g->shift[j] = fbn_fast_shift_of(d, x, c0 + j);
  }
}

/* Unit u of plan p. */
static void fbn_fast_pipe_unit(fbn_fast_call *m, const fbn_bk_forward_args *a,
                               const fbn_fast_pipe_plan *p, int64_t u, uint8_t *bits,
                               int64_t bpr) {
  const fbn_tensor_desc *d = a->desc;
  const int64_t n_ = d->n, c_ = d->c, hw = d->h * d->w, g_ = p->group;
  int64_t gi0, gi1;
  fbn_fast_pipe_groups(p, u, &gi0, &gi1);
  const float *x = a->x, *z = a->addend;
  float *y = a->y;
  const bool y32 = ((uintptr_t)y & 31) == 0, relu = fbn_fast_relu(a);
  /* y + dn * hw alike y modulo 32 bytes: hw % 8 == 0 */
  const int64_t half = n_ / 2, dn = half * c_;
  fbn_fast_pipe_group grp[2];
  grp[1].c0 = grp[1].gc = 0; /* set before use; said for the static analyzer */
  double mean[FBN_FAST_MAX_GROUP], invstd[FBN_FAST_MAX_GROUP];
  float cm[FBN_FAST_MAX_GROUP], ca[FBN_FAST_MAX_GROUP], cb[FBN_FAST_MAX_GROUP];
  bool fast[FBN_FAST_MAX_GROUP];

  fbn_fast_pipe_group *cur = &grp[0], *next = &grp[1];
  const int64_t first = gi0 * g_;
  fbn_fast_pipe_group_init(cur, d, x, first, c_ - first < g_ ? c_ - first : g_);
  for (int64_t n = 0; n < n_; n++)
    stats_rows_f32(x + (n * c_ + cur->c0) * hw, cur->gc, hw, cur->shift, cur->acc);
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
    if (more)
      fbn_fast_pipe_group_init(next, d, x, c1, gc1);
    /* the rows of n and n + half in one loop (two sets of streams in
     * flight, see forward_nhwc_run in fast_nhwc_impl.h), then the last n of
     * an odd N alone */
    for (int64_t q = 0; q < n_ - half; q++) {
      const bool two = q < half;
      const int64_t n = two ? q : 2 * half;
      const int64_t off = (n * c_ + c0) * hw, off1 = (n * c_ + c1) * hw;
      uint8_t *bn = bits != NULL ? bits + (n * c_ + c0) * bpr : NULL;
      const int64_t both = gc1; /* <= gc: only the tensor's last group is smaller */
      for (int64_t j = 0; j < both; j++) {
        const int64_t o = off + j * hw;
        if (two)
          fbn_fast_pipe_row2_avx2(relu, x + o, FBN_FAST_AT(z, o), y + o, hw, cm[j], ca[j], cb[j],
                                  FBN_FAST_AT(bn, j * bpr), y32, x + off1 + j * hw,
                                  next->shift[j], next->acc[j], dn * hw, dn * bpr,
                                  fbn_fast_pair_run(y + o, dn * hw, 0));
        else
          fbn_fast_pipe_row_avx2(relu, x + o, FBN_FAST_AT(z, o), y + o, hw, cm[j], ca[j], cb[j],
                                 FBN_FAST_AT(bn, j * bpr), y32, x + off1 + j * hw,
                                 next->shift[j], next->acc[j]);
      }
      if (gc > both) {
        const int64_t o = off + both * hw;
        if (two)
          fbn_fast_norm_nt2_rows_avx2(relu, x + o, FBN_FAST_AT(z, o), y + o, gc - both, hw, true,
                                      cm + both, ca + both, cb + both,
                                      FBN_FAST_AT(bn, both * bpr), y32, dn * hw, dn * bpr,
                                      fbn_fast_pair_run(y + o, dn * hw, hw));
        else
          fbn_fast_norm_nt_avx2(relu, x + o, FBN_FAST_AT(z, o), y + o, gc - both, hw, true,
                                cm + both, ca + both, cb + both, FBN_FAST_AT(bn, both * bpr),
                                y32);
      }
    }
    _mm_sfence();
    for (int64_t j = 0; j < gc; j++)
      if (!fast[j])
        fbn_fast_exact_normalize(m, a, c0 + j, mean[j], invstd[j], bits, bpr);
    fbn_fast_pipe_group *t = cur;
    cur = next;
    next = t;
  }
}

static void fbn_fast_forward_nchw_pipe(fbn_fast_call *m, const fbn_bk_forward_args *a, int nt,
                                       uint8_t *bits, int64_t bpr) {
  const fbn_fast_pipe_plan p = fbn_fast_pipe_plan_of(a->desc, (int64_t)sizeof(float), nt);
  if (nt > 1) {
    FBN_OMP(omp parallel for schedule(dynamic, 1) num_threads(nt))
    for (int64_t u = 0; u < p.units; u++)
      fbn_fast_pipe_unit(m, a, &p, u, bits, bpr);
  } else {
    for (int64_t u = 0; u < p.units; u++)
      fbn_fast_pipe_unit(m, a, &p, u, bits, bpr);
  }
}
/*
 * Backward, NCHW, long rows, float32, batch statistics, with the saved mask
 * (the ReLU operations; BN alone: none, g = dy) and dx (daddend too or not),
 * streamed (AVX2): the reduction of group k+1 (x, dy and mask read from
 * memory) in the loop that writes dx (and daddend) of group k (whose x, dy
 * and mask are still in the caches), as the forward above. A group's sums
 * are in this loop's order (not bwd_reduce_block's).
 */
static bool fbn_fast_bwd_pipe_usable(const fbn_bk_backward_args *a, const uint8_t *bits,
                                     int64_t bpr) {
  const fbn_tensor_desc *d = a->desc;
  const int64_t hw = d->h * d->w;
  return d->dtype == FBN_DTYPE_FLOAT32 && d->layout == FBN_LAYOUT_NCHW &&
         hw >= FBN_FAST_NCHW_VEC_HW && hw % 8 == 0 &&
         (fbn_fast_relu(a) ? bits != NULL && bpr == hw / 8 : bits == NULL) &&
         fbn_fast_full(a) && a->dx != NULL && ((uintptr_t)a->dx & 15) == 0 &&
         ((uintptr_t)a->daddend & 15) == 0 &&
         fbn_fast_stream_output(fbn_desc_numel(d) * (int64_t)sizeof(float)) &&
         fbn_fast_have_avx2();
}

typedef struct fbn_fast_bwd_pipe_group {
  int64_t c0, gc;
  fbn_fast_bwd_chan ch[FBN_FAST_MAX_GROUP];
  double acc[FBN_FAST_MAX_GROUP][2];
} fbn_fast_bwd_pipe_group;

static void fbn_fast_bwd_pipe_group_init(const fbn_fast_call *m, const fbn_bk_backward_args *a,
                                         fbn_fast_bwd_pipe_group *g, int64_t c0, int64_t gc) {
  g->c0 = c0;
  g->gc = gc;
  for (int64_t j = 0; j < gc; j++) {
    fbn_fast_bwd_chan_init(m, a, c0 + j, &g->ch[j]);
    g->acc[j][0] = g->acc[j][1] = 0.0;
  }
}

/* Unit u of plan p. */
static void fbn_fast_bwd_pipe_unit(fbn_fast_call *m, const fbn_bk_backward_args *a,
                                   const fbn_fast_pipe_plan *p, int64_t u, const uint8_t *bits,
                                   int64_t bpr) {
  const fbn_tensor_desc *d = a->desc;
  const int64_t n_ = d->n, c_ = d->c, hw = d->h * d->w, count = n_ * hw, g_ = p->group;
  int64_t gi0, gi1;
  fbn_fast_pipe_groups(p, u, &gi0, &gi1);
  const float *x = a->x, *dy = a->dy;
  float *dx = a->dx, *dz = a->daddend;
  const bool al32 = (((uintptr_t)dx | (uintptr_t)dz) & 31) == 0; /* dz may be NULL */
  fbn_fast_bwd_pipe_group grp[2];
  grp[1].c0 = grp[1].gc = 0; /* set before use; said for the static analyzer */
  float cm[FBN_FAST_MAX_GROUP], ck[FBN_FAST_MAX_GROUP], cc1[FBN_FAST_MAX_GROUP],
      cc0[FBN_FAST_MAX_GROUP];
  bool fast[FBN_FAST_MAX_GROUP];

  fbn_fast_bwd_pipe_group *cur = &grp[0], *next = &grp[1];
  const int64_t first = gi0 * g_;
  fbn_fast_bwd_pipe_group_init(m, a, cur, first, c_ - first < g_ ? c_ - first : g_);
  for (int64_t n = 0; n < n_; n++)
    for (int64_t j = 0; j < cur->gc; j++) {
      const int64_t o = (n * c_ + cur->c0 + j) * hw;
      fbn_fast_bwd_pipe_reduce_avx2(hw, x + o, FBN_FAST_AT(bits, (n * c_ + cur->c0 + j) * bpr),
                                    dy + o, cur->ch[j].mean, cur->acc[j]);
    }
  for (int64_t gi = gi0; gi < gi1; gi++) {
    const int64_t c0 = cur->c0, gc = cur->gc;
    for (int64_t j = 0; j < gc; j++) {
      fast[j] = fbn_fast_bwd_chan_sums(m, a, c0 + j, cur->ch[j].finite, cur->acc[j][0],
                                       cur->acc[j][1], &cur->ch[j]);
      cm[j] = ck[j] = cc1[j] = cc0[j] = 0.0f;
      if (fast[j])
        fast[j] = backward_coef_f32(&cur->ch[j], true, count, &cm[j], &ck[j], &cc1[j], &cc0[j]);
    }
    const bool more = gi + 1 < gi1;
    const int64_t c1 = c0 + gc, gc1 = !more ? 0 : c_ - c1 < g_ ? c_ - c1 : g_;
    if (more)
      fbn_fast_bwd_pipe_group_init(m, a, next, c1, gc1);
    for (int64_t n = 0; n < n_; n++) {
      for (int64_t j = 0; j < gc; j++) { /* gc1 <= gc: only the tensor's last group is smaller */
        const int64_t o = (n * c_ + c0 + j) * hw, o1 = (n * c_ + c1 + j) * hw;
        const uint8_t *b = FBN_FAST_AT(bits, (n * c_ + c0 + j) * bpr);
        float *dzo = FBN_FAST_AT(dz, o);
        if (j < gc1)
          fbn_fast_bwd_pipe_both_avx2(x + o, b, dy + o, dx + o, dzo, hw, cm[j], ck[j], cc1[j],
                                      cc0[j], al32, x + o1,
                                      FBN_FAST_AT(bits, (n * c_ + c1 + j) * bpr), dy + o1,
                                      next->ch[j].mean, next->acc[j]);
        else
          fbn_fast_bwd_pipe_apply_avx2(x + o, b, dy + o, dx + o, dzo, hw, cm[j], ck[j], cc1[j],
                                       cc0[j], al32);
      }
    }
    _mm_sfence();
    for (int64_t j = 0; j < gc; j++)
      if (!fast[j])
        fbn_fast_exact_backward_apply(m, a, c0 + j, &cur->ch[j]);
    fbn_fast_bwd_pipe_group *t = cur;
    cur = next;
    next = t;
  }
}

static void fbn_fast_backward_nchw_pipe(fbn_fast_call *m, const fbn_bk_backward_args *a, int nt,
                                        const uint8_t *bits, int64_t bpr) {
  /* the first pass reads x and dy (and 1/8 byte of mask) per element */
  const fbn_fast_pipe_plan p = fbn_fast_pipe_plan_of(a->desc, 2 * (int64_t)sizeof(float), nt);
  if (nt > 1) {
    FBN_OMP(omp parallel for schedule(dynamic, 1) num_threads(nt))
    for (int64_t u = 0; u < p.units; u++)
      fbn_fast_bwd_pipe_unit(m, a, &p, u, bits, bpr);
  } else {
    for (int64_t u = 0; u < p.units; u++)
      fbn_fast_bwd_pipe_unit(m, a, &p, u, bits, bpr);
  }
}
#else
#define fbn_fast_pipe_usable(...) false
#define fbn_fast_forward_nchw_pipe(...) ((void)0)
#define fbn_fast_bwd_pipe_usable(...) false
#define fbn_fast_backward_nchw_pipe(...) ((void)0)
#endif
