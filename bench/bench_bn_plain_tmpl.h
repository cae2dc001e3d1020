/*
 * fusedbn-bench: the plain-C BN step for one element type (bench_bn_plain.c
 * includes it once per type with BP_T, the element type, and BP_FN(x), the
 * function name for it). Rows are (n, c) planes of H*W elements in NCHW and
 * pixels of C elements in NHWC; every kernel runs over a range of rows.
 */

/* Statistics: a[ch] += sum (x - shift[ch]), b[ch] += sum (x - shift[ch])^2
 * over rows [begin, end), in float64. */
BENCH_CLONES static void BP_FN(stats_rows)(const bench_unfused_cpu *u, const BP_T *restrict x,
                                           const double *restrict shift, double *restrict a,
                                           double *restrict b, int64_t begin, int64_t end) {
  const int64_t c = u->shape.c, hw = u->shape.h * u->shape.w;
  if (u->layout == FBN_LAYOUT_NCHW) {
    for (int64_t r = begin; r < end; r++) {
      const BP_T *restrict xp = x + r * hw;
      const double s = shift[r % c];
      double s1 = 0.0, s2 = 0.0;
      BENCH_OMP(simd reduction(+ : s1, s2))
      for (int64_t i = 0; i < hw; i++) {
        const double d = (double)xp[i] - s;
        s1 += d;
        s2 += d * d;
      }
      a[r % c] += s1;
      b[r % c] += s2;
    }
  } else {
    for (int64_t r = begin; r < end; r++) {
      const BP_T *restrict xr = x + r * c;
      BENCH_OMP(simd)
      for (int64_t ch = 0; ch < c; ch++) {
        const double d = (double)xr[ch] - shift[ch];
        a[ch] += d;
        b[ch] += d * d;
      }
    }
  }
}

/* Backward reduction: a[ch] += sum g, b[ch] += sum g * (x - mean[ch]). */
BENCH_CLONES static void BP_FN(grad_rows)(const bench_unfused_cpu *u, const BP_T *restrict x,
                                          const BP_T *restrict g, const double *restrict mean,
                                          double *restrict a, double *restrict b, int64_t begin,
                                          int64_t end) {
  const int64_t c = u->shape.c, hw = u->shape.h * u->shape.w;
  if (u->layout == FBN_LAYOUT_NCHW) {
    for (int64_t r = begin; r < end; r++) {
      const BP_T *restrict xp = x + r * hw, *restrict gp = g + r * hw;
      const double m = mean[r % c];
      double s1 = 0.0, s2 = 0.0;
      BENCH_OMP(simd reduction(+ : s1, s2))
      for (int64_t i = 0; i < hw; i++) {
        const double gv = (double)gp[i];
        s1 += gv;
        s2 += gv * ((double)xp[i] - m);
      }
      a[r % c] += s1;
      b[r % c] += s2;
    }
  } else {
    for (int64_t r = begin; r < end; r++) {
      const BP_T *restrict xr = x + r * c, *restrict gr = g + r * c;
      BENCH_OMP(simd)
      for (int64_t ch = 0; ch < c; ch++) {
        const double gv = (double)gr[ch];
        a[ch] += gv;
        b[ch] += gv * ((double)xr[ch] - mean[ch]);
      }
    }
  }
}

/* The elementwise runs of the normalize and dx passes: n elements, one
 * channel's coefficients (NCHW) or C channels' (NHWC, k indexed like y). */
static BENCH_ALWAYS_INLINE void BP_FN(affine_run)(const BP_T *restrict x, BP_T sc, BP_T sh,
                                                  BP_T *restrict y, int64_t n) {
  BENCH_OMP(simd)
  for (int64_t i = 0; i < n; i++)
    y[i] = x[i] * sc + sh;
}

static BENCH_ALWAYS_INLINE void BP_FN(affine_vec_run)(const BP_T *restrict x,
                                                      const BP_T *restrict sc,
                                                      const BP_T *restrict sh, BP_T *restrict y,
                                                      int64_t n) {
  BENCH_OMP(simd)
  for (int64_t i = 0; i < n; i++)
    y[i] = x[i] * sc[i] + sh[i];
}

static BENCH_ALWAYS_INLINE void BP_FN(dx_run)(const BP_T *restrict g, const BP_T *restrict x,
                                              BP_T kg, BP_T kx, BP_T k0, BP_T *restrict dx,
                                              int64_t n) {
  BENCH_OMP(simd)
  for (int64_t i = 0; i < n; i++)
    dx[i] = g[i] * kg + x[i] * kx + k0;
}

static BENCH_ALWAYS_INLINE void BP_FN(dx_vec_run)(const BP_T *restrict g, const BP_T *restrict x,
                                                  const BP_T *restrict kg,
                                                  const BP_T *restrict kx,
                                                  const BP_T *restrict k0, BP_T *restrict dx,
                                                  int64_t n) {
  BENCH_OMP(simd)
  for (int64_t i = 0; i < n; i++)
    dx[i] = g[i] * kg[i] + x[i] * kx[i] + k0[i];
}

/* RUN(out, j, len) computes elements [j, j + len) of a row into out[0..len):
 * straight into the row (plain stores), or with stream through a staging
 * buffer and non-temporal stores. */
#define BP_ROW(row_out, n, stream, RUN)                                                         \
  do {                                                                                          \
    if (!(stream)) {                                                                            \
      BP_T *restrict out_ = (row_out);                                                          \
      const int64_t j_ = 0, len_ = (n);                                                         \
      RUN(out_, j_, len_);                                                                      \
    } else {                                                                                    \
      BP_T stage_[BENCH_STAGE_ELEMS];                                                           \
      for (int64_t j_ = 0; j_ < (n); j_ += BENCH_STAGE_ELEMS) {                                 \
        const int64_t len_ = (n) - j_ < BENCH_STAGE_ELEMS ? (n) - j_ : BENCH_STAGE_ELEMS;       \
        BP_T *restrict out_ = stage_;                                                           \
        RUN(out_, j_, len_);                                                                    \
        bench_stream_store((row_out) + j_, stage_, (size_t)len_ * sizeof(BP_T));                \
      }                                                                                         \
    }                                                                                           \
  } while (0)

/* y = x * k[ch] + k[C + ch] over rows [begin, end). */
BENCH_CLONES static void BP_FN(affine_rows)(const bench_unfused_cpu *u, const BP_T *restrict x,
                                            const BP_T *restrict k, BP_T *restrict y,
                                            int64_t begin, int64_t end, bool stream) {
  const int64_t c = u->shape.c, hw = u->shape.h * u->shape.w;
  if (u->layout == FBN_LAYOUT_NCHW) {
    for (int64_t r = begin; r < end; r++) {
      const BP_T sc = k[r % c], sh = k[c + r % c];
      const BP_T *restrict xp = x + r * hw;
#define BP_RUN(o, j, len) BP_FN(affine_run)(xp + (j), sc, sh, (o), (len))
      BP_ROW(y + r * hw, hw, stream, BP_RUN);
#undef BP_RUN
    }
  } else {
    for (int64_t r = begin; r < end; r++) {
      const BP_T *restrict xr = x + r * c;
#define BP_RUN(o, j, len) BP_FN(affine_vec_run)(xr + (j), k + (j), k + c + (j), (o), (len))
      BP_ROW(y + r * c, c, stream, BP_RUN);
#undef BP_RUN
    }
  }
}

/* dx = g * k[ch] + x * k[C + ch] + k[2C + ch] over rows [begin, end). */
BENCH_CLONES static void BP_FN(dx_rows)(const bench_unfused_cpu *u, const BP_T *restrict g,
                                        const BP_T *restrict x, const BP_T *restrict k,
                                        BP_T *restrict dx, int64_t begin, int64_t end,
                                        bool stream) {
  const int64_t c = u->shape.c, hw = u->shape.h * u->shape.w;
  if (u->layout == FBN_LAYOUT_NCHW) {
    for (int64_t r = begin; r < end; r++) {
      const BP_T kg = k[r % c], kx = k[c + r % c], k0 = k[2 * c + r % c];
      const BP_T *restrict gp = g + r * hw, *restrict xp = x + r * hw;
#define BP_RUN(o, j, len) BP_FN(dx_run)(gp + (j), xp + (j), kg, kx, k0, (o), (len))
      BP_ROW(dx + r * hw, hw, stream, BP_RUN);
#undef BP_RUN
    }
  } else {
    for (int64_t r = begin; r < end; r++) {
      const BP_T *restrict gr = g + r * c, *restrict xr = x + r * c;
#define BP_RUN(o, j, len)                                                                       \
  BP_FN(dx_vec_run)(gr + (j), xr + (j), k + (j), k + c + (j), k + 2 * c + (j), (o), (len))
      BP_ROW(dx + r * c, c, stream, BP_RUN);
#undef BP_RUN
    }
  }
}
#undef BP_ROW

static void BP_FN(train_forward)(bench_unfused_cpu *u, const void *xv, void *yv) {
  const BP_T *x = xv;
  const int64_t c = u->shape.c, hw = u->shape.h * u->shape.w;
  const double count = (double)(bench_shape_numel(&u->shape) / c);
  /* Shift each channel's sums by its first element: no cancellation of
   * E[x^2] - E[x]^2 when the mean is large against the spread. */
  for (int64_t ch = 0; ch < c; ch++)
    u->shift[ch] = (double)x[u->layout == FBN_LAYOUT_NCHW ? ch * hw : ch];
  BP_REDUCE(u, BP_FN(stats_rows)(u, x, u->shift, a, b, begin, end));
  BP_T *k = u->coef;
  const double m = u->momentum;
  for (int64_t ch = 0; ch < c; ch++) {
    const double d = u->sum_a[ch] / count;
    const double mean = u->shift[ch] + d;
    double var = u->sum_b[ch] / count - d * d;
    var = var < 0.0 ? 0.0 : var;
    const double invstd = 1.0 / sqrt(var + u->eps);
    u->save_mean[ch] = mean;
    u->save_invstd[ch] = invstd;
    u->running_mean[ch] = (1.0 - m) * u->running_mean[ch] + m * mean;
    u->running_var[ch] = (1.0 - m) * u->running_var[ch] + m * var * count / (count - 1.0);
    const double scale = u->weight[ch] * invstd;
    k[ch] = (BP_T)scale;
    k[c + ch] = (BP_T)(u->bias[ch] - mean * scale);
  }
  const int nt = bench_parallel_threads(bench_shape_numel(&u->shape));
  const bool stream = bench_bn_stream(u);
  BENCH_PARALLEL_RANGE(nt, bench_bn_rows(u),
                       BP_FN(affine_rows)(u, x, k, yv, begin, end, stream));
}

static void BP_FN(eval_forward)(bench_unfused_cpu *u, const void *xv, void *yv) {
  const int64_t c = u->shape.c;
  BP_T *k = u->coef;
  for (int64_t ch = 0; ch < c; ch++) {
    const double scale = u->weight[ch] / sqrt(u->running_var[ch] + u->eps);
    k[ch] = (BP_T)scale;
    k[c + ch] = (BP_T)(u->bias[ch] - u->running_mean[ch] * scale);
  }
  const int nt = bench_parallel_threads(bench_shape_numel(&u->shape));
  const bool stream = bench_bn_stream(u);
  BENCH_PARALLEL_RANGE(nt, bench_bn_rows(u),
                       BP_FN(affine_rows)(u, xv, k, yv, begin, end, stream));
}

static void BP_FN(backward)(bench_unfused_cpu *u, const void *xv, const void *gv, void *dxv) {
  const BP_T *x = xv, *g = gv;
  const int64_t c = u->shape.c;
  const double count = (double)(bench_shape_numel(&u->shape) / c);
  BP_REDUCE(u, BP_FN(grad_rows)(u, x, g, u->save_mean, a, b, begin, end));
  BP_T *k = u->coef;
  for (int64_t ch = 0; ch < c; ch++) {
    /* dx = w*invstd * (g - sum_g/M - (x - mean) * invstd^2 * sum_gx/M) */
    const double invstd = u->save_invstd[ch], mean = u->save_mean[ch];
    const double a = u->weight[ch] * invstd;
    const double bx = invstd * invstd * u->sum_b[ch] / count;
    k[ch] = (BP_T)a;
    k[c + ch] = (BP_T)(-a * bx);
    k[2 * c + ch] = (BP_T)(a * (mean * bx - u->sum_a[ch] / count));
    u->weight_grad[ch] += u->sum_b[ch] * invstd;
    u->bias_grad[ch] += u->sum_a[ch];
  }
  const int nt = bench_parallel_threads(bench_shape_numel(&u->shape));
  const bool stream = bench_bn_stream(u);
  BENCH_PARALLEL_RANGE(nt, bench_bn_rows(u), BP_FN(dx_rows)(u, g, x, k, dxv, begin, end, stream));
}
