/*
 * Fast CPU backend: the NHWC drivers, forward and backward (chunks of rows,
 * per-thread partial sums merged by one thread), written once for an
 * element type: included by fast_backend.c after fast_loops_impl.h for
 * FBN_T = float and for FBN_T = double, and for the half types (FBN_C:
 * fast_nchw_impl.h).
 */
#ifndef FBN_C
#define FBN_C FBN_T
#endif
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
  FBN_C *cm = plan->coef[0], *ca = plan->coef[1], *cb = plan->coef[2];
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
  fbn_fast_repeat(cm, sizeof(FBN_C), c_, p_);
  fbn_fast_repeat(ca, sizeof(FBN_C), c_, p_);
  fbn_fast_repeat(cb, sizeof(FBN_C), c_, p_);
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
    FBN_K(norm_block)(fbn_fast_relu(a), x + r * c_, FBN_FAST_AT(z, r * c_), y + r * c_, nr, c_,
                      false, plan->coef[0], plan->coef[1], plan->coef[2],
                      FBN_FAST_AT(bits, r * bpr), bpr, stream);
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
    if (!FBN_K(fbn_fast_norm_nt2)(fbn_fast_relu(a), x + r * c_, FBN_FAST_AT(z, r * c_), y + r * c_,
                                  p_, c_, false, plan->coef[0], plan->coef[1], plan->coef[2],
                                  FBN_FAST_AT(bits, r * bpr), bpr, dr * c_, dr * bpr))
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
      plan->shift[c] = fbn_fast_shift_of(d, x, c);
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
  bool relu;    /* the ReLU operations; BN alone: g = dy, y not read (may be NULL) */
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
    FBN_K(bwd_reduce_block)(b->relu, x + r * c_, FBN_FAST_AT(y, r * c_),
                            FBN_FAST_AT(b->bits, r * b->bpr), b->bpr, dy + r * c_,
                            b->g_early ? dz + r * c_ : NULL, nr, c_, false, b->plan->shift, NULL,
                            s1, s2, b->stream);
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
  FBN_C *cm = plan->coef[0], *ck = plan->coef[1], *cc1 = plan->coef[2], *cc0 = plan->coef[3];
  bool *fast = plan->fast;
  double *t1 = plan->mean, *t2 = plan->invstd; /* unused by backward otherwise */
  if (b->reduce)
    FBN_K(merge_partials)(plan, nthreads, c_, t1, t2);
  for (int64_t c = 0; c < c_; c++) {
    if (b->reduce)
      fast[c] = fbn_fast_bwd_chan_sums(b->m, b->a, c, fast[c], t1[c], t2[c], &ch[c]);
    cm[c] = ck[c] = cc1[c] = cc0[c] = (FBN_C)0;
    if (fast[c])
      fast[c] = FBN_K(backward_coef)(&ch[c], b->full, b->rows, &cm[c], &ck[c], &cc1[c], &cc0[c]);
  }
  fbn_fast_repeat(cm, sizeof(FBN_C), c_, p_);
  fbn_fast_repeat(ck, sizeof(FBN_C), c_, p_);
  fbn_fast_repeat(cc1, sizeof(FBN_C), c_, p_);
  fbn_fast_repeat(cc0, sizeof(FBN_C), c_, p_);
}

/* dx (and dz) of rows [r0, r1), r0 a multiple of P. */
static void FBN_K(backward_nhwc_apply_rows)(const FBN_K(fbn_fast_bwd_nhwc) *b, int64_t r0,
                                            int64_t r1) {
  const fbn_bk_backward_args *a = b->a;
  const fbn_fast_nhwc_plan *plan = b->plan;
  const int64_t c_ = a->desc->c, p_ = plan->rows_per_block;
  const FBN_T *x = a->x, *y = a->y;
  FBN_T *dx = a->dx;
  /* g_early: dz holds g; read it instead of the mask and dy. BN alone: g = dy. */
  const FBN_T *pdy = b->g_early ? (const FBN_T *)a->daddend : (const FBN_T *)a->dy;
  FBN_T *pdz = b->g_early ? NULL : (FBN_T *)a->daddend;
  for (int64_t r = r0; r < r1; r += p_) {
    const int64_t nr = r + p_ <= r1 ? p_ : r1 - r;
    FBN_K(bwd_apply_block)(x + r * c_, FBN_FAST_AT(y, r * c_), FBN_FAST_AT(b->bits, r * b->bpr),
                           b->bpr, pdy + r * c_, FBN_FAST_AT(dx, r * c_), FBN_FAST_AT(pdz, r * c_),
                           nr, c_, b->full, b->g_early || !b->relu, false, plan->coef[0],
                           plan->coef[1], plan->coef[2], plan->coef[3], b->stream);
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
  /* the apply pass's g: given in dz (g_early) or dy (BN alone), else from
   * the mask and dy */
  const bool g_given = b->g_early || !b->relu;
  const FBN_T *gy = b->g_early ? dz : dy;
  int64_t r = u * cr;
  for (; r + dr + p_ <= e1; r += p_) {
    const uint8_t *bb = FBN_FAST_AT(b->bits, r * b->bpr);
    const int64_t o = r * c_;
    bool done;
    if (apply)
      done = FBN_K(fbn_fast_bwd_apply2)(x + o, bb, b->bpr, gy + o,
                                        g_given ? NULL : FBN_FAST_AT(dz, o), FBN_FAST_AT(dx, o),
                                        p_, c_, b->full, g_given, plan->coef[0], plan->coef[1],
                                        plan->coef[2], plan->coef[3], dr * c_, dr * b->bpr);
    else
      done = FBN_K(fbn_fast_bwd_reduce2)(b->relu, x + o, bb, b->bpr, dy + o,
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
      .relu = fbn_fast_relu(a),
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

#undef FBN_C
#undef FBN_CHUNK
#undef FBN_ANALYZER_INIT
#undef FBN_GATE
#undef FBN_G
#undef FBN_K
#undef FBN_CAT
#undef FBN_CAT2

