/* Synchronized batch norm hooks of the CPU backends (cpu_sync.h). */
#include "cpu/cpu_sync.h"

#include <string.h>

#include "core/bn_formulas.h"
#include "cpu/fast/fast_config.h"
#include "cpu/half/half_convert.h"

#ifdef _OPENMP
#include <omp.h>
#define SYNC_SIMD_SUM(v) _Pragma(FBN_STR(omp simd reduction(+ : v)))
#else
#define SYNC_SIMD_SUM(v)
#endif

/* Accumulator slots (and coefficient slots) of one NHWC block: a block is
 * P whole rows of C <= SYNC_BLOCK channels (P = SYNC_BLOCK / C, contiguous),
 * or SYNC_BLOCK channels of one row when C is larger. Stack arrays. */
#define SYNC_BLOCK 256
/* Elements of one piece of an NCHW run widened (half dtypes) or gated in
 * an L1 buffer. */
#define SYNC_PIECE 512
/* Elements of one tile of rows of the NHWC dx pass with more than
 * SYNC_BLOCK channels. */
#define SYNC_TILE ((int64_t)32 * 1024)
/* Rows of NHWC (or elements of NCHW) below which a thread is not worth it. */
#define SYNC_MIN_PARALLEL ((int64_t)64 * 1024)

/* ---- inner loops: float and double tensors, float64 arithmetic --------- */

/* Per-element coefficients of dx: xhat = (x - mean) * invstd, dx = k (g -
 * mg - xhat mgx), mg = sum_g / total and mgx = sum_gxhat / total. */
typedef struct sync_coef {
  double mean, invstd, k, mg, mgx;
} sync_coef;

/* The same, one slot per element of a piece of NHWC rows (pointers to the
 * slot of the piece's first element). */
typedef struct sync_coefs {
  const double *mean, *invstd, *k, *mg, *mgx;
} sync_coefs;

/* Channels of the NHWC dx pass's whole-row coefficients (five stack arrays
 * of this length, 80 KiB); more channels take blocks of SYNC_BLOCK. */
#define SYNC_ROW_MAX 2048

#define SYNC_LOOPS(T, S)                                                                         \
  static FBN_FAST_CLONES double sum_##S(const T *restrict p, int64_t n) {                        \
    double s = 0.0;                                                                              \
    SYNC_SIMD_SUM(s)                                                                             \
    for (int64_t i = 0; i < n; i++)                                                              \
      s += (double)p[i];                                                                         \
    return s;                                                                                    \
  }                                                                                              \
  static FBN_FAST_CLONES double sq_##S(const T *restrict p, int64_t n, double mean) {            \
    double s = 0.0;                                                                              \
    SYNC_SIMD_SUM(s)                                                                             \
    for (int64_t i = 0; i < n; i++) {                                                            \
      const double v = (double)p[i] - mean;                                                      \
      s += v * v;                                                                                \
    }                                                                                            \
    return s;                                                                                    \
  }                                                                                              \
  /* the same sums in element order (the reference backend's) */                               \
  static double sum_seq_##S(const T *restrict p, int64_t n, double s) {                          \
    for (int64_t i = 0; i < n; i++)                                                              \
      s += (double)p[i];                                                                         \
    return s;                                                                                    \
  }                                                                                              \
  static double sq_seq_##S(const T *restrict p, int64_t n, double mean, double s) {              \
    for (int64_t i = 0; i < n; i++) {                                                            \
      const double v = (double)p[i] - mean;                                                      \
      s += v * v;                                                                                \
    }                                                                                            \
    return s;                                                                                    \
  }                                                                                              \
  /* acc[j] += p[r * stride + j] for rows r, slots j < width */                                  \
  static FBN_FAST_CLONES void sum_rows_##S(const T *restrict p, int64_t stride, int64_t width,   \
                                           int64_t rows, double *restrict acc) {                 \
    for (int64_t r = 0; r < rows; r++) {                                                         \
      const T *restrict q = p + r * stride;                                                      \
      FBN_SIMD                                                                                   \
      for (int64_t j = 0; j < width; j++)                                                        \
        acc[j] += (double)q[j];                                                                  \
    }                                                                                            \
  }                                                                                              \
  static FBN_FAST_CLONES void sq_rows_##S(const T *restrict p, int64_t stride, int64_t width,    \
                                          int64_t rows, const double *restrict mean,             \
                                          double *restrict acc) {                                \
    for (int64_t r = 0; r < rows; r++) {                                                         \
      const T *restrict q = p + r * stride;                                                      \
      FBN_SIMD                                                                                   \
      for (int64_t j = 0; j < width; j++) {                                                      \
        const double v = (double)q[j] - mean[j];                                                 \
        acc[j] += v * v;                                                                         \
      }                                                                                          \
    }                                                                                            \
  }                                                                                              \
  /* g = !(y <= 0) ? dy : 0 */                                                                   \
  static FBN_FAST_CLONES void gate_##S(const T *restrict y, const T *restrict dy, T *restrict g, \
                                       int64_t n) {                                              \
    FBN_SIMD                                                                                     \
    for (int64_t i = 0; i < n; i++)                                                              \
      g[i] = y[i] <= (T)0 ? (T)0 : dy[i];                                                        \
  }

/* The accumulators are zeroed by the callers before the first block, which the
 * analyzer does not follow through the macro's loops. */
SYNC_LOOPS(float, f32)  // NOLINT(clang-analyzer-core.uninitialized.Assign)
SYNC_LOOPS(double, f64) // NOLINT(clang-analyzer-core.uninitialized.Assign)

/* dx of n elements from x and g (of type T) into D, with one channel's
 * coefficients (…_one) or a slot's (…_block): fbn_bn_dx()'s batch-statistics
 * arithmetic, written out (GCC does not vectorize the loops with the call). */
#define SYNC_DX(T, D, S)                                                                         \
  static FBN_FAST_CLONES void dx_one_##S(const T *restrict x, const T *restrict g,               \
                                         D *restrict dx, int64_t n, sync_coef c) {               \
    const double mean = c.mean, invstd = c.invstd, k = c.k, mg = c.mg, mgx = c.mgx;              \
    FBN_SIMD                                                                                     \
    for (int64_t i = 0; i < n; i++) {                                                            \
      const double xhat = ((double)x[i] - mean) * invstd;                                        \
      dx[i] = (D)(k * ((double)g[i] - mg - xhat * mgx));                                         \
    }                                                                                            \
  }                                                                                              \
  static FBN_FAST_CLONES void dx_block_##S(const T *restrict x, const T *restrict g,             \
                                           D *restrict dx, int64_t n,                            \
                                           const sync_coefs *c) {                                \
    const double *restrict mean = c->mean, *restrict invstd = c->invstd, *restrict k = c->k;     \
    const double *restrict mg = c->mg, *restrict mgx = c->mgx;                                   \
    FBN_SIMD                                                                                     \
    for (int64_t i = 0; i < n; i++) {                                                            \
      const double xhat = ((double)x[i] - mean[i]) * invstd[i];                                  \
      dx[i] = (D)(k[i] * ((double)g[i] - mg[i] - xhat * mgx[i]));                                \
    }                                                                                            \
  }

SYNC_DX(float, float, f32)
SYNC_DX(double, double, f64)
SYNC_DX(float, double, f32d) /* half tensors: widened x and g, dx rounded once from double */

/* ---- one contiguous segment, every dtype --------------------------------- */

static fbn_half_widen_fn widen_of(const fbn_half_convert *hc, fbn_dtype dt) {
  return dt == FBN_DTYPE_FLOAT16 ? hc->f16_to_f32 : hc->bf16_to_f32;
}

/* s + Σ x over elements [i, i + n) of x (exact: added to s one element
 * after the other). */
static double seg_sum(const void *x, fbn_dtype dt, const fbn_half_convert *hc, bool exact,
                      int64_t i, int64_t n, double s) {
  if (dt == FBN_DTYPE_FLOAT64)
    return exact ? sum_seq_f64((const double *)x + i, n, s) : s + sum_f64((const double *)x + i, n);
  if (dt == FBN_DTYPE_FLOAT32)
    return exact ? sum_seq_f32((const float *)x + i, n, s) : s + sum_f32((const float *)x + i, n);
  const uint16_t *h = (const uint16_t *)x + i;
  const fbn_half_widen_fn widen = widen_of(hc, dt);
  float buf[SYNC_PIECE];
  for (int64_t o = 0; o < n; o += SYNC_PIECE) {
    const int64_t m = n - o < SYNC_PIECE ? n - o : SYNC_PIECE;
    widen(h + o, buf, m);
    s = exact ? sum_seq_f32(buf, m, s) : s + sum_f32(buf, m);
  }
  return s;
}

/* s + Σ (x - mean)² over elements [i, i + n) of x (exact: as seg_sum). */
static double seg_sq(const void *x, fbn_dtype dt, const fbn_half_convert *hc, bool exact,
                     int64_t i, int64_t n, double mean, double s) {
  if (dt == FBN_DTYPE_FLOAT64)
    return exact ? sq_seq_f64((const double *)x + i, n, mean, s)
                 : s + sq_f64((const double *)x + i, n, mean);
  if (dt == FBN_DTYPE_FLOAT32)
    return exact ? sq_seq_f32((const float *)x + i, n, mean, s)
                 : s + sq_f32((const float *)x + i, n, mean);
  const uint16_t *h = (const uint16_t *)x + i;
  const fbn_half_widen_fn widen = widen_of(hc, dt);
  float buf[SYNC_PIECE];
  for (int64_t o = 0; o < n; o += SYNC_PIECE) {
    const int64_t m = n - o < SYNC_PIECE ? n - o : SYNC_PIECE;
    widen(h + o, buf, m);
    s = exact ? sq_seq_f32(buf, m, mean, s) : s + sq_f32(buf, m, mean);
  }
  return s;
}

/* acc[j] += x[i + r * stride + j] (mean == NULL) or (x - mean[j])²,
 * rows r, slots j < width. */
static void rows_acc(const void *x, fbn_dtype dt, const fbn_half_convert *hc, int64_t i,
                     int64_t stride, int64_t width, int64_t rows, const double *mean,
                     double *acc) {
  if (dt == FBN_DTYPE_FLOAT64) {
    const double *p = (const double *)x + i;
    if (mean == NULL)
      sum_rows_f64(p, stride, width, rows, acc);
    else
      sq_rows_f64(p, stride, width, rows, mean, acc);
    return;
  }
  if (dt == FBN_DTYPE_FLOAT32) {
    const float *p = (const float *)x + i;
    if (mean == NULL)
      sum_rows_f32(p, stride, width, rows, acc);
    else
      sq_rows_f32(p, stride, width, rows, mean, acc);
    return;
  }
  const uint16_t *h = (const uint16_t *)x + i;
  const fbn_half_widen_fn widen = widen_of(hc, dt);
  float buf[SYNC_BLOCK];
  for (int64_t r = 0; r < rows; r++)
    for (int64_t o = 0; o < width; o += SYNC_BLOCK) {
      const int64_t m = width - o < SYNC_BLOCK ? width - o : SYNC_BLOCK;
      widen(h + r * stride + o, buf, m);
      if (mean == NULL)
        sum_rows_f32(buf, 0, m, 1, acc + o);
      else
        sq_rows_f32(buf, 0, m, 1, mean + o, acc + o);
    }
}

/* What the backward writes, and how. */
typedef struct sync_bwd {
  const fbn_bk_backward_args *a;
  fbn_dtype dt;
  bool relu;
  const fbn_half_convert *hc; /* half dtypes */
} sync_bwd;

/* dx / daddend of elements [i, i + n), n <= SYNC_PIECE, with one channel's
 * coefficients (block == NULL) or a block's (element i + j: slot j). */
static void bwd_seg(const sync_bwd *b, int64_t i, int64_t n, sync_coef one,
                    const sync_coefs *block) {
  const fbn_bk_backward_args *a = b->a;
  if (b->dt == FBN_DTYPE_FLOAT32 || b->dt == FBN_DTYPE_FLOAT64) {
    const size_t es = b->dt == FBN_DTYPE_FLOAT32 ? sizeof(float) : sizeof(double);
    union {
      float f[SYNC_PIECE];
      double d[SYNC_PIECE];
    } gbuf;
    const char *dy = (const char *)a->dy + (size_t)i * es;
    const void *g = dy;
    if (b->relu) {
      const char *y = (const char *)a->y + (size_t)i * es;
      if (b->dt == FBN_DTYPE_FLOAT32) {
        gate_f32((const float *)(const void *)y, (const float *)(const void *)dy, gbuf.f, n);
        g = gbuf.f;
      } else {
        gate_f64((const double *)(const void *)y, (const double *)(const void *)dy, gbuf.d, n);
        g = gbuf.d;
      }
    }
    if (a->daddend != NULL)
      memcpy((char *)a->daddend + (size_t)i * es, g, (size_t)n * es);
    if (a->dx == NULL)
      return;
    const char *x = (const char *)a->x + (size_t)i * es;
    char *dx = (char *)a->dx + (size_t)i * es;
    if (b->dt == FBN_DTYPE_FLOAT32) {
      if (block == NULL)
        dx_one_f32((const float *)(const void *)x, g, (float *)(void *)dx, n, one);
      else
        dx_block_f32((const float *)(const void *)x, g, (float *)(void *)dx, n, block);
    } else {
      if (block == NULL)
        dx_one_f64((const double *)(const void *)x, g, (double *)(void *)dx, n, one);
      else
        dx_block_f64((const double *)(const void *)x, g, (double *)(void *)dx, n, block);
    }
    return;
  }
  /* float16 / bfloat16: widened into float (exact), g in float, daddend
   * narrowed back (exact: g is dy or 0), dx rounded once from double. */
  const bool f16 = b->dt == FBN_DTYPE_FLOAT16;
  const fbn_half_widen_fn widen = widen_of(b->hc, b->dt);
  float dybuf[SYNC_PIECE], gbuf[SYNC_PIECE], tbuf[SYNC_PIECE];
  const float *g = dybuf;
  widen((const uint16_t *)a->dy + i, dybuf, n);
  if (b->relu) {
    widen((const uint16_t *)a->y + i, tbuf, n);
    gate_f32(tbuf, dybuf, gbuf, n);
    g = gbuf;
  }
  if (a->daddend != NULL)
    (f16 ? b->hc->f32_to_f16 : b->hc->f32_to_bf16)(g, (uint16_t *)a->daddend + i, n);
  if (a->dx == NULL)
    return;
  double dbuf[SYNC_PIECE];
  widen((const uint16_t *)a->x + i, tbuf, n);
  if (block == NULL)
    dx_one_f32d(tbuf, g, dbuf, n, one);
  else
    dx_block_f32d(tbuf, g, dbuf, n, block);
  uint16_t *dx = (uint16_t *)a->dx + i;
  if (f16)
    for (int64_t j = 0; j < n; j++)
      dx[j] = fbn_double_to_half(dbuf[j]);
  else
    for (int64_t j = 0; j < n; j++)
      dx[j] = fbn_double_to_bfloat16(dbuf[j]);
}

/* ---- threads ------------------------------------------------------------- */

/* Threads for a loop over desc's elements (1 below SYNC_MIN_PARALLEL or
 * without OpenMP). */
static int threads_for(const fbn_tensor_desc *d, int64_t units) {
#ifdef _OPENMP
  const int64_t elems = d->n * d->c * d->h * d->w;
  if (elems < SYNC_MIN_PARALLEL || units < 2)
    return 1;
  const int t = omp_get_max_threads();
  return units < t ? (int)units : t;
#else
  (void)d;
  (void)units;
  return 1;
#endif
}

/* ---- local statistics ---------------------------------------------------- */

/* NCHW: per channel, the N runs of H*W (threads over channels). */
static void stats_nchw_channel(const fbn_tensor_desc *d, const void *x,
                               const fbn_half_convert *hc, bool exact, int64_t c,
                               double *mean_out, double *m2_out) {
  const int64_t hw = d->h * d->w, count = d->n * hw;
  double sum = 0.0;
  for (int64_t n = 0; n < d->n; n++)
    sum = seg_sum(x, d->dtype, hc, exact, (n * d->c + c) * hw, hw, sum);
  const double mean = count > 0 ? sum / (double)count : 0.0;
  double sq = 0.0;
  for (int64_t n = 0; n < d->n; n++)
    sq = seg_sq(x, d->dtype, hc, exact, (n * d->c + c) * hw, hw, mean, sq);
  mean_out[c] = mean;
  m2_out[c] = sq;
}

/* NHWC: the channels [c0, c0 + cw) of rows [r0, r1), summed (mean == NULL,
 * part[j] = Σ x) or squared about mean[0..cw) (part[j] = Σ (x - mean)²).
 * With cw == C <= SYNC_BLOCK, P = SYNC_BLOCK / C rows at a time (one
 * contiguous block, P slots per channel, added up at the end), unless
 * exact (one slot per channel: each channel's sum in row order). */
static void stats_nhwc_part(const fbn_tensor_desc *d, const void *x,
                            const fbn_half_convert *hc, bool exact, int64_t c0, int64_t cw,
                            int64_t r0, int64_t r1, const double *mean, double *part) {
  const int64_t c_ = d->c;
  const int64_t p = cw == c_ && !exact ? SYNC_BLOCK / c_ : 1;
  const int64_t width = p * cw, rows = r1 - r0, full = rows / p;
  double acc[SYNC_BLOCK] = {0}, mrep[SYNC_BLOCK];
  if (mean != NULL)
    for (int64_t j = 0; j < width; j++)
      mrep[j] = mean[j % cw];
  const double *m = mean != NULL ? mrep : NULL;
  rows_acc(x, d->dtype, hc, r0 * c_ + c0, p * c_, width, full, m, acc);
  rows_acc(x, d->dtype, hc, (r0 + full * p) * c_ + c0, c_, cw, rows - full * p, m, acc);
  for (int64_t j = 0; j < cw; j++) {
    double s = acc[j];
    for (int64_t q = 1; q < p; q++)
      s += acc[q * cw + j];
    part[j] = s;
  }
}

/* One pass of the NHWC statistics over every channel block: out[c] = Σ x
 * (mean == NULL) or Σ (x - mean[c])². The rows are split into nt parts
 * (threads); the parts' sums are added in part order, so that the result
 * depends on nt only, not on which thread ran what. Exact: each channel's
 * sum in row order (threads over blocks of channels). */
static void stats_nhwc_pass(const fbn_tensor_desc *d, const void *x, const fbn_half_convert *hc,
                            bool exact, int nt, const double *mean, double *out) {
  const int64_t rows = d->n * d->h * d->w, c_ = d->c;
  int64_t cb = c_ <= SYNC_BLOCK ? c_ : SYNC_BLOCK;
  if (exact && nt > 1) {
    cb = (c_ + nt - 1) / nt;
    cb = cb > SYNC_BLOCK ? SYNC_BLOCK : cb;
  }
  const int64_t blocks = (c_ + cb - 1) / cb;
  if (nt <= 1 && c_ > SYNC_BLOCK) {
    /* one thread: whole rows, out itself the accumulators (each channel's
     * sum in row order) */
    for (int64_t c = 0; c < c_; c++)
      out[c] = 0.0;
    rows_acc(x, d->dtype, hc, 0, c_, c_, rows, mean, out);
    return;
  }
  if (nt <= 1 || exact) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
    for (int64_t b = 0; b < blocks; b++) {
      const int64_t c0 = b * cb, cw = c_ - c0 < cb ? c_ - c0 : cb;
      stats_nhwc_part(d, x, hc, exact, c0, cw, 0, rows, mean != NULL ? mean + c0 : NULL,
                      out + c0);
    }
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  for (int64_t c0 = 0; c0 < c_; c0 += cb) {
    const int64_t cw = c_ - c0 < cb ? c_ - c0 : cb;
#pragma omp for ordered schedule(static, 1)
    for (int t = 0; t < nt; t++) {
      double part[SYNC_BLOCK];
      stats_nhwc_part(d, x, hc, false, c0, cw, rows * t / nt, rows * (t + 1) / nt,
                      mean != NULL ? mean + c0 : NULL, part);
#pragma omp ordered
      for (int64_t j = 0; j < cw; j++)
        out[c0 + j] = t == 0 ? part[j] : out[c0 + j] + part[j];
    }
  }
#endif
}

/* exact: the reference backend's order of every sum (so that one rank
 * gives its plain op's statistics value for value); else vectorized sums
 * and rows split over the threads. */
static fbn_status sync_stats(const fbn_tensor_desc *d, const void *x, bool exact, double *mean_out,
                             double *m2_out) {
  const fbn_half_convert *hc = fbn_half_convert_get(); /* used by half tensors only */
  const int64_t hw = d->h * d->w, count = d->n * hw, c_ = d->c;
  if (d->layout == FBN_LAYOUT_NCHW) {
    const int nt = threads_for(d, c_);
    if (nt <= 1) {
      for (int64_t c = 0; c < c_; c++)
        stats_nchw_channel(d, x, hc, exact, c, mean_out, m2_out);
    } else {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt)
      for (int64_t c = 0; c < c_; c++)
        stats_nchw_channel(d, x, hc, exact, c, mean_out, m2_out);
#endif
    }
    return FBN_STATUS_SUCCESS;
  }
  /* NHWC: two passes over the rows (the second about the mean) */
  const int nt = threads_for(d, count / 64);
  stats_nhwc_pass(d, x, hc, exact, nt, NULL, mean_out);
  for (int64_t c = 0; c < c_; c++)
    mean_out[c] = count > 0 ? mean_out[c] / (double)count : 0.0;
  stats_nhwc_pass(d, x, hc, exact, nt, mean_out, m2_out);
  return FBN_STATUS_SUCCESS;
}

static fbn_status ref_sync_stats(const fbn_op_desc *op, void *state, const fbn_tensor_desc *d,
                                 const void *x, double *mean_out, double *m2_out) {
  (void)op;
  (void)state;
  return sync_stats(d, x, true, mean_out, m2_out);
}

static fbn_status fast_sync_stats(const fbn_op_desc *op, void *state, const fbn_tensor_desc *d,
                                  const void *x, double *mean_out, double *m2_out) {
  (void)op;
  (void)state;
  return sync_stats(d, x, false, mean_out, m2_out);
}

/* ---- backward apply ------------------------------------------------------ */

typedef struct sync_bwd_sums {
  const double *saved_mean, *saved_invstd, *sum_g, *sum_gxhat;
  int64_t total;
} sync_bwd_sums;

static sync_coef coef_of(const sync_bwd *b, const sync_bwd_sums *s, int64_t c) {
  const fbn_op_desc *o = b->a->op;
  const double weight = o->affine ? fbn_cpu_load(b->a->weight, o->param_dtype, c) : 1.0;
  sync_coef k;
  k.mean = s->saved_mean[c];
  k.invstd = s->saved_invstd[c];
  k.k = weight * k.invstd;
  k.mg = s->sum_g[c] / (double)s->total;
  k.mgx = s->sum_gxhat[c] / (double)s->total;
  return k;
}

/* NCHW: the run of H*W of (n, c) = pair / C, pair % C. */
static void bwd_nchw_run(const sync_bwd *b, const sync_bwd_sums *s, int64_t pair) {
  const fbn_tensor_desc *d = b->a->desc;
  const int64_t hw = d->h * d->w, base = pair * hw;
  const sync_coef k = coef_of(b, s, pair % d->c);
  for (int64_t o = 0; o < hw; o += SYNC_PIECE)
    bwd_seg(b, base + o, hw - o < SYNC_PIECE ? hw - o : SYNC_PIECE, k, NULL);
}

/* Rows [r0, r1) of an NHWC tensor, a block of channels (or of P whole
 * rows) at a time, with the block's coefficients in slots. */
static void bwd_nhwc_tile(const sync_bwd *b, const sync_bwd_sums *s, int64_t r0, int64_t r1) {
  const int64_t c_ = b->a->desc->c;
  const int64_t cb = c_ <= SYNC_BLOCK ? c_ : SYNC_BLOCK;
  double km[SYNC_BLOCK], ki[SYNC_BLOCK], kk[SYNC_BLOCK], kg[SYNC_BLOCK], kx[SYNC_BLOCK];
  const sync_coefs k = {km, ki, kk, kg, kx};
  for (int64_t c0 = 0; c0 < c_; c0 += cb) {
    const int64_t cw = c_ - c0 < cb ? c_ - c0 : cb;
    const int64_t p = cw == c_ ? SYNC_BLOCK / c_ : 1;
    for (int64_t j = 0; j < cw; j++) {
      const sync_coef one = coef_of(b, s, c0 + j);
      for (int64_t q = 0; q < p; q++) {
        km[q * cw + j] = one.mean;
        ki[q * cw + j] = one.invstd;
        kk[q * cw + j] = one.k;
        kg[q * cw + j] = one.mg;
        kx[q * cw + j] = one.mgx;
      }
    }
    const sync_coef none = {0.0, 0.0, 0.0, 0.0, 0.0};
    int64_t r = r0;
    for (; r + p <= r1; r += p)
      bwd_seg(b, r * c_ + c0, p * cw, none, &k);
    for (; r < r1; r++)
      bwd_seg(b, r * c_ + c0, cw, none, &k);
  }
}

/* NHWC: rows [r0, r1), a block of channels (or of P whole rows) at a time,
 * with the block's coefficients in slots. With up to SYNC_ROW_MAX channels,
 * whole rows with every channel's coefficients; with more, tiles of rows (about SYNC_TILE elements) take every block in
 * turn, so that the rows are read in order at that grain. */
static void bwd_nhwc_rows(const sync_bwd *b, const sync_bwd_sums *s, int64_t r0, int64_t r1) {
  const int64_t c_ = b->a->desc->c;
  if (c_ > SYNC_BLOCK && c_ <= SYNC_ROW_MAX) {
    /* whole rows, pieces of SYNC_PIECE channels */
    double km[SYNC_ROW_MAX], ki[SYNC_ROW_MAX], kk[SYNC_ROW_MAX], kg[SYNC_ROW_MAX], kx[SYNC_ROW_MAX];
    for (int64_t c = 0; c < c_; c++) {
      const sync_coef one = coef_of(b, s, c);
      km[c] = one.mean;
      ki[c] = one.invstd;
      kk[c] = one.k;
      kg[c] = one.mg;
      kx[c] = one.mgx;
    }
    const sync_coef none = {0.0, 0.0, 0.0, 0.0, 0.0};
    for (int64_t r = r0; r < r1; r++)
      for (int64_t o = 0; o < c_; o += SYNC_PIECE) {
        const sync_coefs k = {km + o, ki + o, kk + o, kg + o, kx + o};
        bwd_seg(b, r * c_ + o, c_ - o < SYNC_PIECE ? c_ - o : SYNC_PIECE, none, &k);
      }
    return;
  }
  if (c_ > SYNC_BLOCK) {
    const int64_t tile = SYNC_TILE / c_ > 0 ? SYNC_TILE / c_ : 1;
    for (int64_t t0 = r0; t0 < r1; t0 += tile)
      bwd_nhwc_tile(b, s, t0, r1 - t0 < tile ? r1 : t0 + tile);
    return;
  }
  bwd_nhwc_tile(b, s, r0, r1);
}

/* dx = k (g - sum_g / total - xhat sum_gxhat / total), daddend = g, with the
 * saved mean/invstd of the apply forward (the reference's backward
 * arithmetic with the whole batch's sums and count). */
static fbn_status sync_backward_apply(const fbn_bk_backward_args *a, const double *sum_g,
                                      const double *sum_gxhat, int64_t total) {
  const fbn_tensor_desc *d = a->desc;
  if (a->dx == NULL && a->daddend == NULL)
    return FBN_STATUS_SUCCESS;
  sync_bwd b;
  b.a = a;
  b.dt = d->dtype;
  b.relu = fbn_operation_has_relu(a->op->operation);
  b.hc = fbn_half_convert_get(); /* used by half tensors only */
  sync_bwd_sums s;
  s.saved_mean = fbn_cpu_saved_stats_const(a->saved);
  s.saved_invstd = s.saved_mean + d->c;
  s.sum_g = sum_g;
  s.sum_gxhat = sum_gxhat;
  s.total = total;
  if (d->layout == FBN_LAYOUT_NCHW) {
    const int64_t pairs = d->n * d->c;
    const int nt = threads_for(d, pairs);
    if (nt <= 1) {
      for (int64_t q = 0; q < pairs; q++)
        bwd_nchw_run(&b, &s, q);
    } else {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt)
      for (int64_t q = 0; q < pairs; q++)
        bwd_nchw_run(&b, &s, q);
#endif
    }
    return FBN_STATUS_SUCCESS;
  }
  const int64_t rows = d->n * d->h * d->w;
  const int nt = threads_for(d, rows / 64);
  if (nt <= 1) {
    bwd_nhwc_rows(&b, &s, 0, rows);
  } else {
#ifdef _OPENMP
#pragma omp parallel for schedule(static, 1) num_threads(nt)
    for (int t = 0; t < nt; t++)
      bwd_nhwc_rows(&b, &s, rows * t / nt, rows * (t + 1) / nt);
#endif
  }
  return FBN_STATUS_SUCCESS;
}

static fbn_status ref_sync_backward_apply(const fbn_bk_backward_args *a, const double *sum_g,
                                          const double *sum_gxhat, int64_t total_count) {
  fbn_status st = fbn_cpu_saved_check(a->saved, fbn_backend_cpu_reference(), a->op, a->desc);
  return st == FBN_STATUS_SUCCESS ? sync_backward_apply(a, sum_g, sum_gxhat, total_count) : st;
}

static fbn_status fast_sync_backward_apply(const fbn_bk_backward_args *a, const double *sum_g,
                                           const double *sum_gxhat, int64_t total_count) {
  fbn_status st = fbn_cpu_saved_check(a->saved, fbn_backend_cpu_fast(), a->op, a->desc);
  return st == FBN_STATUS_SUCCESS ? sync_backward_apply(a, sum_g, sum_gxhat, total_count) : st;
}

static const fbn_backend_sync ref_sync = {ref_sync_stats, ref_sync_backward_apply};
static const fbn_backend_sync fast_sync = {fast_sync_stats, fast_sync_backward_apply};

const fbn_backend_sync *fbn_backend_sync_hooks(const fbn_backend *backend) {
  if (backend == fbn_backend_cpu_reference())
    return &ref_sync;
  if (backend == fbn_backend_cpu_fast())
    return &fast_sync;
  return NULL;
}
