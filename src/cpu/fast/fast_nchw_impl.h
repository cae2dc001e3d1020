/*
 * Fast CPU backend: the NCHW drivers, forward and backward, long rows
 * (channel groups) and short rows (groups as channels-last blocks), written
 * once for an element type: included by fast_backend.c after
 * fast_loops_impl.h for FBN_T = float and for FBN_T = double, and after
 * fast_half_impl.h for the half types (FBN_T = uint16_t storage; FBN_C, the
 * type of the coefficients and of the arithmetic, = float).
 */
#ifndef FBN_C
#define FBN_C FBN_T
#endif

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
    FBN_C cm[FBN_FAST_MAX_GROUP], ca[FBN_FAST_MAX_GROUP], cb[FBN_FAST_MAX_GROUP];
    bool fast[FBN_FAST_MAX_GROUP];

    if (fbn_fast_full(a)) {
      for (int64_t j = 0; j < gc; j++) {
        acc[j][0] = acc[j][1] = 0.0;
        shift[j] = fbn_fast_shift_of(d, x, c0 + j);
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
      FBN_K(norm_block)(fbn_fast_relu(a), x + off, FBN_FAST_AT(z, off), y + off, gc, hw, true, cm,
                        ca, cb, FBN_FAST_AT(bits, (n * c_ + c0) * bpr), bpr, stream);
    }
    for (int64_t j = 0; j < gc; j++)
      if (!fast[j])
        fbn_fast_exact_normalize(m, a, c0 + j, mean[j], invstd[j], bits, bpr);
  }
}

static void FBN_K(forward_nchw)(fbn_fast_call *m, const fbn_bk_forward_args *a, int nt,
                                uint8_t *bits,
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
                                     uint8_t *bits, int64_t bpr, FBN_C *coef, double *stat,
                                     bool *fast) {
  const fbn_tensor_desc *d = a->desc;
  const int64_t n_ = d->n, c_ = d->c, hw = d->h * d->w;
  const FBN_T *x = a->x, *z = a->addend;
  FBN_T *y = a->y;
  const bool stream = fbn_fast_stream_output(fbn_desc_numel(d) * (int64_t)sizeof(FBN_T));
  FBN_C *cm = coef, *ca = coef + c_, *cb = coef + 2 * c_;
  const bool relu = fbn_fast_relu(a);
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
  FBN_K(norm_block)(relu, x + ((n) * c_ + (c0)) * hw, FBN_FAST_AT(z, ((n) * c_ + (c0)) * hw),    \
                    y + ((n) * c_ + (c0)) * hw, (c1) - (c0), hw, true, cm + (c0), ca + (c0),     \
                    cb + (c0), FBN_FAST_AT(bits, ((n) * c_ + (c0)) * bpr), bpr, stream)
#define FBN_EVAL_UNIT(k)                                                                         \
  do {                                                                                         \
    const int64_t c0 = (k) % cpn * rpc, c1 = c0 + rpc < c_ ? c0 + rpc : c_;                    \
    if ((k) < half * cpn) {                                                                    \
      const int64_t n = (k) / cpn, off = (n * c_ + c0) * hw;                                   \
      if (!FBN_K(fbn_fast_norm_nt2)(relu, x + off, FBN_FAST_AT(z, off), y + off, c1 - c0, hw,   \
                                    true, cm + c0, ca + c0, cb + c0,                           \
                                    FBN_FAST_AT(bits, (n * c_ + c0) * bpr), bpr, dn * hw,      \
                                    dn * bpr)) {                                               \
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
  const bool relu = fbn_fast_relu(a);
  const int64_t g_ = plan->group;
  {
    const int64_t c0 = gi * g_;
    const int64_t gc = c_ - c0 < g_ ? c_ - c0 : g_, len = gc * hw;
    fbn_fast_nchw_view v;
    fbn_fast_nchw_view_of(plan, fbn_fast_thread_num(), &v);
    FBN_C *cm = v.coef[0], *ca = v.coef[1], *cb = v.coef[2];
    if (fbn_fast_full(a)) {
      for (int64_t j = 0; j < gc; j++) {
        const double k = fbn_fast_shift_of(d, x, c0 + j);
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
  FBN_K(norm_block)(relu, x + ((n) * c_ + c0) * hw, FBN_FAST_AT(z, ((n) * c_ + c0) * hw),        \
                    y + ((n) * c_ + c0) * hw, gc, hw, false, cm, ca, cb,                         \
                    FBN_FAST_AT(bits, ((n) * c_ + c0) * bpr), bpr, stream)
    for (int64_t n = 0; n < half; n++) {
      const int64_t off = (n * c_ + c0) * hw;
      if (!FBN_K(fbn_fast_norm_nt2)(relu, x + off, FBN_FAST_AT(z, off), y + off, gc, hw, false,
                                    cm, ca, cb, FBN_FAST_AT(bits, (n * c_ + c0) * bpr), bpr,
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


/* ======================================================================== */
/* Backward drivers                                                         */
/* ======================================================================== */

/* NCHW, long rows: channel groups as in forward_nchw; no_y: y is not read
 * (the saved mask, or BN alone). */
static int64_t FBN_K(backward_nchw_gsize)(const fbn_tensor_desc *d, bool no_y, int nt) {
  const int64_t per_channel = (no_y ? 2 : 3) * d->n * d->h * d->w * (int64_t)sizeof(FBN_T);
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
  const bool relu = fbn_fast_relu(a);
  const int64_t g_ = FBN_K(backward_nchw_gsize)(d, bits != NULL || !relu, nt);
  {
    const int64_t c0 = gi * g_;
    const int64_t gc = c_ - c0 < g_ ? c_ - c0 : g_;
    double acc[FBN_FAST_MAX_GROUP][2], shift[FBN_FAST_MAX_GROUP];
    fbn_fast_bwd_chan ch[FBN_FAST_MAX_GROUP];
    FBN_C cm[FBN_FAST_MAX_GROUP], ck[FBN_FAST_MAX_GROUP], cc1[FBN_FAST_MAX_GROUP],
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
        FBN_K(bwd_reduce_block)(relu, x + off, FBN_FAST_AT(y, off),
                                FBN_FAST_AT(bits, (n * c_ + c0) * bpr), bpr, dy + off, NULL, gc,
                                hw, true, shift, acc, NULL, NULL, false);
      }
    }
    for (int64_t j = 0; j < gc; j++) {
      if (reduce)
        fast[j] = fbn_fast_bwd_chan_sums(m, a, c0 + j, fast[j], acc[j][0], acc[j][1], &ch[j]);
      cm[j] = ck[j] = cc1[j] = cc0[j] = (FBN_C)0;
      if (fast[j])
        fast[j] = FBN_K(backward_coef)(&ch[j], full, count, &cm[j], &ck[j], &cc1[j], &cc0[j]);
    }
    if (!apply)
      return;
    for (int64_t n = 0; n < n_; n++) {
      const int64_t off = (n * c_ + c0) * hw;
      FBN_K(bwd_apply_block)(x + off, FBN_FAST_AT(y, off), FBN_FAST_AT(bits, (n * c_ + c0) * bpr),
                             bpr, dy + off, FBN_FAST_AT(dx, off), FBN_FAST_AT(dz, off), gc, hw,
                             full, !relu, true, cm, ck, cc1, cc0, stream);
    }
    for (int64_t j = 0; j < gc; j++)
      if (!fast[j])
        fbn_fast_exact_backward_apply(m, a, c0 + j, &ch[j]);
  }
}

static void FBN_K(backward_nchw)(fbn_fast_call *m, const fbn_bk_backward_args *a, int nt,
                                 const uint8_t *bits, int64_t bpr) {
  const int64_t c_ = a->desc->c;
  const int64_t g_ = FBN_K(backward_nchw_gsize)(a->desc, bits != NULL || !fbn_fast_relu(a), nt);
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
  const bool relu = fbn_fast_relu(a);
  const int64_t g_ = plan->group;
  {
    const int64_t c0 = gi * g_;
    const int64_t gc = c_ - c0 < g_ ? c_ - c0 : g_;
    fbn_fast_nchw_view v;
    fbn_fast_nchw_view_of(plan, fbn_fast_thread_num(), &v);
    FBN_C *cm = v.coef[0], *ck = v.coef[1], *cc1 = v.coef[2], *cc0 = v.coef[3];
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
        FBN_K(bwd_reduce_block)(relu, x + off, FBN_FAST_AT(y, off),
                                FBN_FAST_AT(bits, (n * c_ + c0) * bpr), bpr, dy + off, NULL, gc,
                                hw, false, v.shift, NULL, v.s1, v.s2, false);
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
      cm[j * hw] = ck[j * hw] = cc1[j * hw] = cc0[j * hw] = (FBN_C)0;
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
      FBN_K(bwd_apply_block)(x + off, FBN_FAST_AT(y, off), FBN_FAST_AT(bits, (n * c_ + c0) * bpr),
                             bpr, dy + off, FBN_FAST_AT(dx, off), FBN_FAST_AT(dz, off), gc, hw,
                             full, !relu, false, cm, ck, cc1, cc0, stream);
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

