/*
 * Fast CPU backend: the same module semantics as the reference backend
 * (cpu_ref.c, docs/semantics.md) at memory speed. The default for CPU
 * modules; FBN_CPU_BACKEND=reference selects the reference instead.
 *
 *   threads       OpenMP (OMP_NUM_THREADS): over groups of channels (NCHW) or
 *                 chunks of rows (NHWC), handed out dynamically; one thread
 *                 for tensors under FBN_FAST_MIN_PARALLEL elements, and then
 *                 no OpenMP region or worksharing call at all (entering a
 *                 one-thread region costs libgomp a team allocation, which
 *                 dominated calls on small tensors)
 *   forward       training: one statistics pass (float64 sums of the data
 *                 shifted by a value of the channel: no E[x^2] - E[x]^2 in
 *                 float) and one fused normalize + add + ReLU pass; eval: the
 *                 fused pass only (NCHW with long rows: in memory order)
 *   backward      one reduction pass (sum g, sum g*(x - mean)) and one pass
 *                 writing dx and daddend; eval-mode backward without affine
 *                 gradients skips the reduction
 *   pipelines     NCHW with long rows, float32, large (AVX2): the first
 *                 pass of channel group k+1 runs inside the loop of group
 *                 k's second pass (fbn_fast_forward_nchw_pipe,
 *                 fbn_fast_backward_nchw_pipe): a pass that only reads gets
 *                 ~2/3 of the bandwidth of one that also writes here
 *   memory        NCHW channel groups are sized so that their data comes
 *                 back from the caches in the second pass; outputs of 8 MiB
 *                 and more are written with non-temporal stores; no
 *                 temporary tensors (per-module scratch: per-thread partial
 *                 sums and per-channel coefficients)
 *   inner loops   cpu_fast_impl.h: plain `omp simd` loops compiled for
 *                 x86-64-v3 (AVX2, FMA) and the baseline, chosen at load time
 *
 * Degenerate channels take the exact path: a channel whose statistics or
 * coefficients are not finite (NaN or infinity in x, running stats or
 * parameters; a zero variance with eps = 0) or whose coefficients do not fit
 * the tensor's dtype is computed with the reference backend's arithmetic
 * (float64, same order of summation), so NaN and infinity come out exactly
 * where the reference puts them.
 *
 * Saved payload: two arrays of C doubles (mean and inverse standard
 * deviation that normalized x, as the reference backend's), then for
 * float32 tensors the ReLU bitmask of the forward's y (path = 1): one bit
 * per element, !(y <= 0) (NaN sets it), each tensor row on a byte.
 * Backward takes the mask from it instead of reading y (the API requires y
 * unchanged since the forward), which saves a quarter of its first pass's
 * reads.
 */
#include <assert.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "core/bn_formulas.h"
#include "cpu/cpu_common.h"

/* ---- compiler plumbing -------------------------------------------------- */

#define FBN_STR(...) #__VA_ARGS__
#ifdef _OPENMP
#define FBN_OMP(...) _Pragma(FBN_STR(__VA_ARGS__))
#define FBN_SIMD _Pragma("omp simd")
#define FBN_SIMD_REDUCTION(a, b) _Pragma(FBN_STR(omp simd reduction(+ : a, b)))
#else
#define FBN_OMP(...)
#define FBN_SIMD
#define FBN_SIMD_REDUCTION(a, b)
#endif

/* x86-64 with GCC and ifunc support: build each inner loop for AVX2+FMA
 * and for the baseline, dispatched once at load time. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__) && \
    defined(__linux__) && !defined(FBN_FAST_NO_CLONES)
#define FBN_FAST_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FBN_FAST_CLONES
#endif
#define FBN_FAST_INLINE inline __attribute__((always_inline))

/* Without it GCC keeps `y <= 0 ? 0 : dy` as a branch inside the float->double
 * reductions of backward (an ordered compare may raise FE_INVALID) and does
 * not vectorize them. It changes no result, only whether floating-point
 * exception flags are exact; the library never reads them. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

/* ---- tuning ------------------------------------------------------------- */

/* Most channels in one NCHW group (stack arrays of this length). */
#define FBN_FAST_MAX_GROUP 64
/* Bytes of x (or of x, y and dy in backward) one NCHW group aims for. A
 * group's data is read twice, so it should come back from the caches the
 * second time; but each group is N strided runs, and short runs cost more
 * than the reuse gains (measured on 2-core AMD EPYC VMs: runs of 3 KB ran
 * at 60% of the speed of runs of 100 KB), so groups are sized for the
 * L2 + L3 share of a core rather than L2 alone. */
#define FBN_FAST_GROUP_BYTES ((int64_t)1 << 20)
#define FBN_FAST_GROUP_BYTES_SHORT_ROWS ((int64_t)4 << 20)
/* Bytes of x in one group of the pipelined NCHW training forward
 * (fbn_fast_forward_nchw_pipe): two groups are in the caches at once. And
 * groups per unit of work there. */
#define FBN_FAST_PIPE_GROUP_BYTES ((int64_t)512 << 10)
#define FBN_FAST_PIPE_STAGES 8
/* Elements of one unit of the NCHW eval forward (forward_nchw_eval). */
#define FBN_FAST_EVAL_CHUNK ((int64_t)64 << 10)
/* Elements of one NHWC block (P rows, P*C >= this) per vector loop. */
#define FBN_FAST_NHWC_BLOCK 4096
/* Bytes of x in one NHWC unit of work (threads take units dynamically). */
#define FBN_FAST_NHWC_CHUNK_BYTES ((int64_t)256 << 10)
/* NCHW with H*W below this runs channel groups as channels-last blocks of
 * about FBN_FAST_NCHW_VEC_LEN elements (fbn_fast_nchw_plan). */
#define FBN_FAST_NCHW_VEC_HW 256
#define FBN_FAST_NCHW_VEC_LEN 32768
/* Partial sums per row reduction (stats_rows): four AVX2 vectors of
 * doubles per sum, so that four adds are in flight. */
#define FBN_FAST_LANES 16
/* Elements of each of two sets of streams taken in turn by the paired loops
 * (fbn_fast_pair_run): 64 where the outputs of both sets start on 64-byte
 * lines, else 256 (outputs 16 bytes past a line, as glibc's malloc returns
 * large blocks: every switch then leaves two lines half written, and runs of
 * 64 made the loops 35-50% slower than one set at a time; runs of 256
 * measured 4-7% faster than one set). */
#define FBN_FAST_PAIR_RUN_LINES 64
#define FBN_FAST_PAIR_RUN_OTHER 256
/* Tensors with fewer elements run on one thread. */
#define FBN_FAST_MIN_PARALLEL (64 * 1024)
/* Outputs of at least this many bytes are written with non-temporal stores
 * (they would not stay in the caches anyway). */
#define FBN_FAST_STREAM_BYTES ((int64_t)8 << 20)
/* Bytes of one chunk of the chunked loops (cpu_fast_impl.h): the on-stack
 * buffers for the expanded ReLU mask and for streamed outputs. */
#define FBN_FAST_CHUNK_BYTES 4096
/* Padding between scratch arrays, so that no two of them are a multiple of
 * 4 KiB apart (loads that alias a recent store modulo 4 KiB stall). */
#define FBN_FAST_SCRATCH_PAD 448

/* ---- types shared with cpu_fast_impl.h ---------------------------------- */

/* What backward knows of one channel. */
typedef struct fbn_fast_bwd_chan {
  double mean, invstd, weight;
  double sum_g, sum_gxhat;
  bool finite; /* mean, invstd and weight are finite */
} fbn_fast_bwd_chan;

/* Scratch of an NHWC call, carved from the module's scratch buffer. */
typedef struct fbn_fast_nhwc_plan {
  int64_t rows_per_block;  /* P */
  int64_t chunk_rows;      /* rows per unit of work, a multiple of P */
  int64_t block;           /* P * C */
  double *partial;         /* per thread: two arrays of `block` partial sums */
  int64_t partial_stride;  /* doubles from one partial array to the next */
  double *shift;           /* block: per-element shift (forward) / mean (backward) */
  double *mean, *invstd;   /* C each (forward) */
  fbn_fast_bwd_chan *chan; /* C (backward) */
  void *coef[4];           /* 4 arrays of `block` elements of the tensor's dtype */
  bool *fast;              /* C */
} fbn_fast_nhwc_plan;

/*
 * Scratch of an NCHW call with short rows (H*W < FBN_FAST_NCHW_VEC_HW): a
 * group of channels is handled like a channels-last block, its N runs of
 * group*H*W contiguous elements with per-element accumulators and
 * coefficients. Each thread has its own arrays (fbn_fast_nchw_view).
 */
typedef struct fbn_fast_nchw_plan {
  int64_t group;      /* channels per group */
  int64_t len;        /* group * H * W */
  size_t elem;        /* bytes of one tensor element */
  size_t per_thread;  /* bytes of one thread's arrays */
  char *base;
} fbn_fast_nchw_plan;

typedef struct fbn_fast_nchw_view {
  double *s1, *s2, *shift; /* len each */
  double *mean, *invstd;   /* group each */
  fbn_fast_bwd_chan *chan; /* group */
  void *coef[4];           /* len elements each */
  bool *fast;              /* group */
} fbn_fast_nchw_view;

/* Partial sums `which` (0 or 1) of thread t. */
static inline double *fbn_fast_partial(const fbn_fast_nhwc_plan *plan, int t, int which) {
  return plan->partial + (2 * (size_t)t + (size_t)which) * (size_t)plan->partial_stride;
}

/* The parameters of one forward or backward call (the drivers' `m`): the
 * op, the per-channel arrays and the caller's workspace, which the plans
 * carve their scratch from. */
typedef struct fbn_fast_call {
  const fbn_op_desc *op;
  const void *weight, *bias;        /* NULL when !op->affine */
  void *running_mean, *running_var; /* forward: read (running statistics) or updated */
  void *dweight, *dbias;            /* backward: may be NULL */
  bool accumulate;                  /* dweight/dbias += rather than = */
  bool grads;                       /* dweight or dbias requested */
  char *scratch;                    /* the workspace */
  size_t scratch_bytes;
} fbn_fast_call;

/* Whether the call normalizes with batch statistics. */
#define fbn_fast_full(a) ((a)->op->statistics == FBN_STATISTICS_BATCH)

/* ---- small helpers ------------------------------------------------------ */

static inline bool fbn_fast_finite(double v) { return isfinite(v); }

static inline int fbn_fast_thread_num(void) {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

static inline int fbn_fast_num_threads(void) {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

/* Threads for a tensor of numel elements. */
static int fbn_fast_threads(int64_t numel) {
#ifdef _OPENMP
  if (numel < FBN_FAST_MIN_PARALLEL)
    return 1;
  const int t = omp_get_max_threads();
  return t < 1 ? 1 : t;
#else
  (void)numel;
  return 1;
#endif
}

static inline double fbn_fast_load(const void *p, fbn_dtype dtype, int64_t i) {
  return dtype == FBN_DTYPE_FLOAT64 ? ((const double *)p)[i] : (double)((const float *)p)[i];
}

static inline void fbn_fast_store(void *p, fbn_dtype dtype, int64_t i, double v) {
  if (dtype == FBN_DTYPE_FLOAT64)
    ((double *)p)[i] = v;
  else
    ((float *)p)[i] = (float)v;
}

static inline double fbn_fast_param(const fbn_fast_call *m, const void *p, int64_t c) {
  return fbn_fast_load(p, m->op->param_dtype, c);
}

static inline double fbn_fast_weight(const fbn_fast_call *m, int64_t c) {
  return m->op->affine ? fbn_fast_param(m, m->weight, c) : 1.0;
}

static inline double fbn_fast_bias(const fbn_fast_call *m, int64_t c) {
  return m->op->affine ? fbn_fast_param(m, m->bias, c) : 0.0;
}

/* Index of (n, c, s), s = h*W + w. */
static inline int64_t fbn_fast_index(const fbn_tensor_desc *d, int64_t hw, int64_t n, int64_t c,
                                     int64_t s) {
  return d->layout == FBN_LAYOUT_NCHW ? (n * d->c + c) * hw + s : (n * hw + s) * d->c + c;
}

/* a[0..c) copied p - 1 more times behind itself (elements of size bytes),
 * doubling the copied part each step. */
static void fbn_fast_repeat(void *a, size_t size, int64_t c, int64_t p) {
  const size_t total = (size_t)(p * c) * size;
  for (size_t have = (size_t)c * size; have < total;) {
    const size_t n = have < total - have ? have : total - have;
    memcpy((char *)a + have, a, n);
    have += n;
  }
}

/* Channels per NCHW group: about FBN_FAST_GROUP_BYTES of data, at most
 * FBN_FAST_MAX_GROUP, and at least 4 groups per thread when C allows and
 * there is more than one thread. */
static int64_t fbn_fast_nchw_group(int64_t c, int64_t bytes_per_channel, int nt) {
  int64_t g = FBN_FAST_GROUP_BYTES / (bytes_per_channel > 0 ? bytes_per_channel : 1);
  if (g > FBN_FAST_MAX_GROUP)
    g = FBN_FAST_MAX_GROUP;
  const int64_t balanced = c / (4 * (int64_t)nt);
  if (nt > 1 && g > balanced)
    g = balanced;
  return g < 1 ? 1 : g;
}

static inline bool fbn_fast_stream_output(int64_t bytes) { return bytes >= FBN_FAST_STREAM_BYTES; }

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
FBN_FAST_INLINE void fbn_fast_stream_fence(void) { _mm_sfence(); }
#else
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

/* The saved ReLU bitmask (float32 tensors): one bit per element, !(y <= 0),
 * each row of the tensor (NCHW: the H*W of one (n, c); NHWC: the C of one
 * (n, h, w)) starting on a byte. Backward reads it instead of y. */
static int64_t fbn_fast_mask_row_len(const fbn_tensor_desc *d) {
  return d->layout == FBN_LAYOUT_NCHW ? d->h * d->w : d->c;
}
static int64_t fbn_fast_mask_bpr(const fbn_tensor_desc *d) {
  return (fbn_fast_mask_row_len(d) + 7) / 8;
}
static size_t fbn_fast_mask_bytes(const fbn_tensor_desc *d) {
  if (d->dtype != FBN_DTYPE_FLOAT32)
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

/* ---- per-channel statistics (shared by both dtypes) --------------------- */

static void fbn_fast_save(const fbn_bk_forward_args *a, int64_t c, double mean, double invstd) {
  if (a->saved != NULL) {
    double *p = fbn_cpu_saved_stats(a->saved);
    p[c] = mean;
    p[a->desc->c + c] = invstd;
  }
}

/* Mean and sum of squared deviations of channel c, as the reference backend
 * computes them (two passes, float64, n-major order). */
static void fbn_fast_exact_stats(const fbn_tensor_desc *d, const void *x, int64_t c,
                                 double *mean_out, double *sq_out) {
  const int64_t hw = d->h * d->w, count = d->n * hw;
  double sum = 0.0;
  for (int64_t n = 0; n < d->n; n++)
    for (int64_t s = 0; s < hw; s++)
      sum += fbn_fast_load(x, d->dtype, fbn_fast_index(d, hw, n, c, s));
  const double mean = sum / (double)count;
  double sq = 0.0;
  for (int64_t n = 0; n < d->n; n++)
    for (int64_t s = 0; s < hw; s++) {
      const double v = fbn_fast_load(x, d->dtype, fbn_fast_index(d, hw, n, c, s)) - mean;
      sq += v * v;
    }
  *mean_out = mean;
  *sq_out = sq;
}

/*
 * Batch statistics of channel c from its shifted sums s1 = sum (x - k),
 * s2 = sum (x - k)^2: running-statistics update, saved mean/invstd.
 * Non-finite sums, or a variance that would give an infinite invstd, are
 * recomputed the reference's way.
 */
static void fbn_fast_batch_stats(fbn_fast_call *m, const fbn_bk_forward_args *a, int64_t c, double k,
                                 double s1, double s2, double *mean_out, double *invstd_out) {
  const fbn_tensor_desc *d = a->desc;
  const fbn_op_desc *o = m->op;
  const int64_t count = d->n * d->h * d->w;
  double mean, sq;
  bool ok = isfinite(s1) && isfinite(s2);
  if (ok) {
    const double mu = s1 / (double)count;
    sq = s2 - s1 * mu;
    if (sq < 0.0)
      sq = 0.0;
    mean = k + mu;
    ok = sq / (double)count + o->eps > 0.0;
  }
  if (!ok)
    fbn_fast_exact_stats(d, a->x, c, &mean, &sq);
  const double var = sq / (double)count; /* biased: normalizes */
  if (a->update_running) {
    const fbn_dtype pt = o->param_dtype;
    const double unbiased = sq / (double)(count - 1);
    void *rm = m->running_mean, *rv = m->running_var;
    fbn_fast_store(rm, pt, c, fbn_bn_running_update(fbn_fast_load(rm, pt, c), a->factor, mean));
    fbn_fast_store(rv, pt, c,
                   fbn_bn_running_update(fbn_fast_load(rv, pt, c), a->factor, unbiased));
  }
  const double invstd = fbn_bn_invstd(var, o->eps);
  fbn_fast_save(a, c, mean, invstd);
  *mean_out = mean;
  *invstd_out = invstd;
}

static void fbn_fast_running_stats(const fbn_fast_call *m, const fbn_bk_forward_args *a, int64_t c,
                                   double *mean_out, double *invstd_out) {
  const double mean = fbn_fast_param(m, m->running_mean, c);
  const double var = fbn_fast_param(m, m->running_var, c);
  const double invstd = fbn_bn_invstd(var, m->op->eps);
  fbn_fast_save(a, c, mean, invstd);
  *mean_out = mean;
  *invstd_out = invstd;
}

/* y of channel c with the reference's arithmetic (and its mask bits). */
static void fbn_fast_exact_normalize(const fbn_fast_call *m, const fbn_bk_forward_args *a, int64_t c,
                                     double mean, double invstd, uint8_t *bits, int64_t bpr) {
  (void)bpr;
  const fbn_tensor_desc *d = a->desc;
  const int64_t hw = d->h * d->w;
  const double weight = fbn_fast_weight(m, c), bias = fbn_fast_bias(m, c);
  const bool relu = fbn_operation_has_relu(a->op->operation);
  for (int64_t n = 0; n < d->n; n++)
    for (int64_t s = 0; s < hw; s++) {
      const int64_t i = fbn_fast_index(d, hw, n, c, s);
      double v = (fbn_fast_load(a->x, d->dtype, i) - mean) * invstd * weight + bias;
      if (a->addend != NULL)
        v += fbn_fast_load(a->addend, d->dtype, i);
      fbn_fast_store(a->y, d->dtype, i, !relu || v > 0.0 || isnan(v) ? v : 0.0);
      if (bits != NULL)
        fbn_fast_mask_set(d, bits, n, c, s, !(fbn_fast_load(a->y, d->dtype, i) <= 0.0));
    }
}

/* ---- per-channel backward ----------------------------------------------- */

static void fbn_fast_bwd_chan_init(const fbn_fast_call *m, const fbn_bk_backward_args *a, int64_t c,
                                   fbn_fast_bwd_chan *ch) {
  const double *p = fbn_cpu_saved_stats_const(a->saved);
  ch->mean = p[c];
  ch->invstd = p[a->desc->c + c];
  ch->weight = fbn_fast_weight(m, c);
  ch->sum_g = ch->sum_gxhat = 0.0;
  ch->finite = isfinite(ch->mean) && isfinite(ch->invstd) && isfinite(ch->weight);
}

/* sum g and sum g * xhat of channel c the reference's way. */
static void fbn_fast_exact_bwd_sums(const fbn_bk_backward_args *a, int64_t c, fbn_fast_bwd_chan *ch) {
  const fbn_tensor_desc *d = a->desc;
  const fbn_dtype dt = d->dtype;
  const int64_t hw = d->h * d->w;
  const bool relu = fbn_operation_has_relu(a->op->operation);
  double sum_g = 0.0, sum_g_xhat = 0.0;
  for (int64_t n = 0; n < d->n; n++)
    for (int64_t s = 0; s < hw; s++) {
      const int64_t i = fbn_fast_index(d, hw, n, c, s);
      const double g =
          relu && fbn_fast_load(a->y, dt, i) <= 0.0 ? 0.0 : fbn_fast_load(a->dy, dt, i);
      sum_g += g;
      sum_g_xhat += g * (fbn_fast_load(a->x, dt, i) - ch->mean) * ch->invstd;
    }
  ch->sum_g = sum_g;
  ch->sum_gxhat = sum_g_xhat;
}

/*
 * Complete channel c's sums from the fast reduction (sg = sum g,
 * sgx = sum g*(x - mean)) or, if the channel is not on the fast path or the
 * sums are not finite, exactly; accumulate dweight/dbias. Returns whether
 * the channel stays on the fast path.
 */
static bool fbn_fast_bwd_chan_sums(fbn_fast_call *m, const fbn_bk_backward_args *a, int64_t c,
                                   bool fast, double sg, double sgx, fbn_fast_bwd_chan *ch) {
  if (fast) {
    ch->sum_g = sg;
    ch->sum_gxhat = sgx * ch->invstd;
    fast = isfinite(ch->sum_g) && isfinite(ch->sum_gxhat);
  }
  if (!fast)
    fbn_fast_exact_bwd_sums(a, c, ch);
  const fbn_dtype pt = m->op->param_dtype;
  if (m->dweight != NULL)
    fbn_fast_store(m->dweight, pt, c,
                   m->accumulate ? fbn_fast_load(m->dweight, pt, c) + ch->sum_gxhat
                                 : ch->sum_gxhat);
  if (m->dbias != NULL)
    fbn_fast_store(m->dbias, pt, c,
                   m->accumulate ? fbn_fast_load(m->dbias, pt, c) + ch->sum_g : ch->sum_g);
  return fast;
}

/* dx and daddend of channel c with the reference's arithmetic. */
static void fbn_fast_exact_backward_apply(const fbn_fast_call *m, const fbn_bk_backward_args *a,
                                          int64_t c, const fbn_fast_bwd_chan *ch) {
  const fbn_tensor_desc *d = a->desc;
  const fbn_dtype dt = d->dtype;
  const int64_t hw = d->h * d->w, count = d->n * hw;
  const double k = ch->weight * ch->invstd;
  const double mean_g = ch->sum_g / (double)count, mean_g_xhat = ch->sum_gxhat / (double)count;
  const bool relu = fbn_operation_has_relu(a->op->operation);
  for (int64_t n = 0; n < d->n; n++)
    for (int64_t s = 0; s < hw; s++) {
      const int64_t i = fbn_fast_index(d, hw, n, c, s);
      const double g =
          relu && fbn_fast_load(a->y, dt, i) <= 0.0 ? 0.0 : fbn_fast_load(a->dy, dt, i);
      if (a->daddend != NULL)
        fbn_fast_store(a->daddend, dt, i, g);
      if (a->dx != NULL) {
        double dx;
        if (fbn_fast_full(a)) {
          const double xhat = (fbn_fast_load(a->x, dt, i) - ch->mean) * ch->invstd;
          dx = k * (g - mean_g - xhat * mean_g_xhat);
        } else {
          dx = k * g;
        }
        fbn_fast_store(a->dx, dt, i, dx);
      }
    }
}

/* ---- scratch ------------------------------------------------------------ */

#define FBN_FAST_ALIGN 64

static size_t fbn_fast_round_up(size_t v) {
  return (v + FBN_FAST_ALIGN - 1) / FBN_FAST_ALIGN * FBN_FAST_ALIGN;
}

/* The call's workspace as scratch of at least bytes (NULL if smaller: the
 * caller then plans for fewer threads). */
static void *fbn_fast_scratch(fbn_fast_call *m, size_t bytes) {
  return m->scratch != NULL && m->scratch_bytes >= bytes ? m->scratch : NULL;
}

/* Carve an NHWC plan for a tensor of `rows` rows of C channels, nt
 * threads, elements of elem bytes, from m's workspace; *bytes = the scratch
 * it needs. m NULL: only *bytes. INSUFFICIENT_WORKSPACE (no message) when
 * the workspace is smaller. */
static fbn_status fbn_fast_nhwc_plan_make(fbn_fast_call *m, int64_t rows, int64_t c, int nt,
                                          size_t elem, fbn_fast_nhwc_plan *plan, size_t *bytes) {
  int64_t p = c >= FBN_FAST_NHWC_BLOCK ? 1 : (FBN_FAST_NHWC_BLOCK + c - 1) / c;
  /* A block never spans more rows than the tensor has: the per-call setup
   * (shift, partial sums, coefficient rows) is O(P*C), which must not
   * dwarf a small tensor. */
  if (p > rows)
    p = rows;
  /* Units of work: about FBN_FAST_NHWC_CHUNK_BYTES of x, at least 8 per
   * thread when the tensor allows, whole blocks of P rows. */
  int64_t cr = FBN_FAST_NHWC_CHUNK_BYTES / (c * (int64_t)elem);
  const int64_t spread = rows / (8 * (int64_t)nt);
  if (cr > spread)
    cr = spread;
  cr = cr / p * p;
  plan->chunk_rows = cr < p ? p : cr;
  const size_t lp = (size_t)(p * c), cs = (size_t)c, pad = FBN_FAST_SCRATCH_PAD;
  const size_t one_partial = fbn_fast_round_up(lp * sizeof(double)) + pad;
  const size_t shift = fbn_fast_round_up(lp * sizeof(double)) + pad;
  const size_t stats = fbn_fast_round_up(2 * cs * sizeof(double));
  const size_t chan = fbn_fast_round_up(cs * sizeof(fbn_fast_bwd_chan));
  const size_t one_coef = fbn_fast_round_up(lp * elem) + pad;
  const size_t fast = fbn_fast_round_up(cs * sizeof(bool));
  const size_t total = 2 * (size_t)nt * one_partial + shift + stats + chan + 4 * one_coef + fast;
  *bytes = total;
  if (m == NULL)
    return FBN_STATUS_SUCCESS;
  char *base = fbn_fast_scratch(m, total);
  if (base == NULL)
    return FBN_STATUS_INSUFFICIENT_WORKSPACE;
  plan->rows_per_block = p;
  plan->block = (int64_t)lp;
  plan->partial = (double *)base;
  plan->partial_stride = (int64_t)(one_partial / sizeof(double));
  base += 2 * (size_t)nt * one_partial;
  plan->shift = (double *)base;
  base += shift;
  plan->mean = (double *)base;
  plan->invstd = plan->mean + c;
  base += stats;
  plan->chan = (fbn_fast_bwd_chan *)base;
  base += chan;
  for (int i = 0; i < 4; i++) {
    plan->coef[i] = base;
    base += one_coef;
  }
  plan->fast = (bool *)base;
  return FBN_STATUS_SUCCESS;
}

/* Bytes of the arrays of one NCHW view (and, with base, their addresses). */
static size_t fbn_fast_nchw_carve(const fbn_fast_nchw_plan *plan, char *base,
                                  fbn_fast_nchw_view *v) {
  const size_t len = (size_t)plan->len, g = (size_t)plan->group, pad = FBN_FAST_SCRATCH_PAD;
  const size_t arr = fbn_fast_round_up(len * sizeof(double)) + pad;
  const size_t coef = fbn_fast_round_up(len * plan->elem) + pad;
  size_t off = 0;
  double **dbl[] = {&v->s1, &v->s2, &v->shift};
  for (size_t i = 0; i < 3; i++, off += arr)
    *dbl[i] = (double *)(base + off);
  v->mean = (double *)(base + off);
  v->invstd = v->mean + g;
  off += fbn_fast_round_up(2 * g * sizeof(double));
  v->chan = (fbn_fast_bwd_chan *)(base + off);
  off += fbn_fast_round_up(g * sizeof(fbn_fast_bwd_chan));
  for (size_t i = 0; i < 4; i++, off += coef)
    v->coef[i] = base + off;
  v->fast = (bool *)(base + off);
  off += fbn_fast_round_up(g * sizeof(bool));
  return off;
}

/* Thread t's view of an NCHW plan. */
static void fbn_fast_nchw_view_of(const fbn_fast_nchw_plan *plan, int t, fbn_fast_nchw_view *v) {
  fbn_fast_nchw_carve(plan, plan->base + (size_t)t * plan->per_thread, v);
}

/* Plan for NCHW with short rows: group of channels and per-thread scratch,
 * from m's workspace as fbn_fast_nhwc_plan_make. */
static fbn_status fbn_fast_nchw_plan_make(fbn_fast_call *m, const fbn_tensor_desc *d, int nt,
                                          int64_t bytes_per_channel, fbn_fast_nchw_plan *plan,
                                          size_t *bytes) {
  const int64_t hw = d->h * d->w;
  int64_t g = FBN_FAST_NCHW_VEC_LEN / hw;
  const int64_t fits =
      FBN_FAST_GROUP_BYTES_SHORT_ROWS / (bytes_per_channel > 0 ? bytes_per_channel : 1);
  if (g > fits)
    g = fits;
  const int64_t balanced = d->c / (4 * (int64_t)nt);
  if (nt > 1 && g > balanced) /* one thread: no balancing, fewer calls */
    g = balanced;
  if (g > d->c) /* one group holds every channel: no scratch for more */
    g = d->c;
  if (g < 1)
    g = 1;
  plan->group = g;
  plan->len = g * hw;
  plan->elem = fbn_dtype_size(d->dtype);
  fbn_fast_nchw_view v;
  plan->per_thread = fbn_fast_nchw_carve(plan, NULL, &v);
  *bytes = plan->per_thread * (size_t)nt;
  if (m == NULL)
    return FBN_STATUS_SUCCESS;
  plan->base = fbn_fast_scratch(m, *bytes);
  return plan->base != NULL ? FBN_STATUS_SUCCESS : FBN_STATUS_INSUFFICIENT_WORKSPACE;
}

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
 * and read back (measured on the 2-core EPYC VMs: the staged loop spent about
 * a third of its time in the copy-out, and a direct streamed loop ran ~17%
 * faster than staging + copy on a 100 MB tensor). Same arithmetic as
 * norm_piece's x86-64-v3 clone: fma((x - m), a, b) + z, then
 * y = v where !(v <= 0) (NaN included), else +0.
 */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
/* v = fma(x - m, a, b) [+ z]; y[0..8) <- v where !(v <= 0) (NaN included),
 * else +0, with non-temporal stores (one 32-byte store when y32, else two
 * 16-byte ones); returns the 8 mask bits !(v <= 0). */
static inline __attribute__((always_inline, target("avx2,fma"))) unsigned
fbn_fast_norm8_nt(const float *x, const float *z, float *y, __m256 m, __m256 a, __m256 b,
                  bool y32) {
  __m256 v = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(x), m), a, b);
  if (z != NULL)
    v = _mm256_add_ps(v, _mm256_loadu_ps(z));
  const __m256 pass = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NLE_UQ);
  const __m256 out = _mm256_and_ps(pass, v);
  if (y32) {
    _mm256_stream_ps(y, out);
  } else {
    _mm_stream_ps(y, _mm256_castps256_ps128(out));
    _mm_stream_ps(y + 4, _mm256_extractf128_ps(out, 1));
  }
  return (unsigned)_mm256_movemask_ps(pass);
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
fbn_fast_norm_rows_body(const bool TWO, const float *x, const float *z, float *y, int64_t rows,
                        int64_t len, bool per_row, const float *m, const float *a,
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
    const unsigned k = fbn_fast_norm8_nt(x + e, z != NULL ? z + e : NULL, y + e, mv, av, bv, y32); \
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
fbn_fast_norm_nt_avx2(const float *x, const float *z, float *y, int64_t rows, int64_t len,
                      bool per_row, const float *m, const float *a, const float *b,
                      uint8_t *bits, bool y32) {
  fbn_fast_norm_rows_body(false, x, z, y, rows, len, per_row, m, a, b, bits, y32, 0, 0, 0);
}

__attribute__((target("avx2,fma"))) static void
fbn_fast_norm_nt2_rows_avx2(const float *x, const float *z, float *y, int64_t rows, int64_t len,
                            bool per_row, const float *m, const float *a, const float *b,
                            uint8_t *bits, bool y32, int64_t d, int64_t db, int64_t run) {
  fbn_fast_norm_rows_body(true, x, z, y, rows, len, per_row, m, a, b, bits, y32, d, db, run);
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
fbn_fast_pipe_row_body(const bool TWO, const float *x, const float *z, float *y, int64_t len,
                       float m, float a, float b, uint8_t *bits, bool y32, const float *xs,
                       double k, double *acc, int64_t d, int64_t db, int64_t run) {
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
        fbn_fast_norm8_nt(x + o_, z != NULL ? z + o_ : NULL, y + o_, mv, av, bv, y32);         \
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
fbn_fast_pipe_row_avx2(const float *x, const float *z, float *y, int64_t len, float m, float a,
                       float b, uint8_t *bits, bool y32, const float *xs, double k,
                       double *acc) {
  fbn_fast_pipe_row_body(false, x, z, y, len, m, a, b, bits, y32, xs, k, acc, 0, 0, 0);
}

/* Two rows at once: the second (and its statistics row) at + d, its bits at
 * + db, summed into the same acc. */
__attribute__((target("avx2,fma"))) static void
fbn_fast_pipe_row2_avx2(const float *x, const float *z, float *y, int64_t len, float m, float a,
                        float b, uint8_t *bits, bool y32, const float *xs, double k,
                        double *acc, int64_t d, int64_t db, int64_t run) {
  fbn_fast_pipe_row_body(true, x, z, y, len, m, a, b, bits, y32, xs, k, acc, d, db, run);
}

/*
 * One row of the pipelined NCHW backward (fbn_fast_backward_nchw_pipe).
 * APPLY: for the current group's row, g = (its mask bit ? dy : +0),
 * dz <- g (dz not NULL) and dx <- g k + (x - m) c1 + c0 (bwd_apply_piece's
 * per-row arithmetic, products and sums not fused), non-temporal stores. REDUCE:
 * for the next group's row (xs, bs, dys), acc[0] += sum g, acc[1] += sum
 * g (xs - mean) in float64. len % 8 == 0 and each row's mask on whole
 * bytes; dx and dz 16-byte aligned (32-byte: al32).
 */
static inline __attribute__((always_inline, target("avx2,fma"))) void
fbn_fast_bwd_pipe_body(const bool APPLY, const bool REDUCE, const float *x, const uint8_t *bits,
                       const float *dy, float *dx, float *dz, int64_t len, float m, float k,
                       float c1, float c0, bool al32, const float *xs, const uint8_t *bs,
                       const float *dys, double mean, double *acc) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 mv = _mm256_set1_ps(m), kv = _mm256_set1_ps(k), c1v = _mm256_set1_ps(c1);
  const __m256 c0v = _mm256_set1_ps(c0);
  const __m256d meanv = _mm256_set1_pd(mean);
  __m256d s10 = _mm256_setzero_pd(), s11 = s10, s20 = s10, s21 = s10;
  for (int64_t i = 0; i < len; i += 8) {
    if (REDUCE) {
      const __m256i bv = _mm256_and_si256(_mm256_set1_epi32(bs[i / 8]), sel);
      const __m256 g = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(bv, sel)),
                                     _mm256_loadu_ps(dys + i));
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
      const __m256i bv = _mm256_and_si256(_mm256_set1_epi32(bits[i / 8]), sel);
      const __m256 g = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(bv, sel)),
                                     _mm256_loadu_ps(dy + i));
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
  fbn_fast_bwd_pipe_body(true, true, x, bits, dy, dx, dz, len, m, k, c1, c0, al32, xs, bs, dys,
                         mean, acc);
}

__attribute__((target("avx2,fma"))) static void
fbn_fast_bwd_pipe_apply_avx2(const float *x, const uint8_t *bits, const float *dy, float *dx,
                             float *dz, int64_t len, float m, float k, float c1, float c0,
                             bool al32) {
  fbn_fast_bwd_pipe_body(true, false, x, bits, dy, dx, dz, len, m, k, c1, c0, al32, NULL, NULL,
                         NULL, 0.0, NULL);
}

__attribute__((target("avx2,fma"))) static void
fbn_fast_bwd_pipe_reduce_avx2(int64_t len, const float *xs, const uint8_t *bs, const float *dys,
                              double mean, double *acc) {
  fbn_fast_bwd_pipe_body(false, true, NULL, NULL, NULL, NULL, NULL, len, 0.0f, 0.0f, 0.0f, 0.0f,
                         false, xs, bs, dys, mean, acc);
}

/*
 * NHWC backward over two blocks of n elements (n % 8 == 0) at once, the
 * second at + d (x, dy, dz, dx; its mask at bits + db), with per-element
 * arrays of the block (the first block's element i and the second's share
 * them), 64 elements of each in turn (two sets of streams in flight). Mask
 * bytes on whole rows (bit e of byte e / 8); dz and dx 16-byte aligned
 * (32-byte: al32), the second block's alike.
 *
 * reduce: g = (mask bit ? dy : +0), dz <- g when dz is not NULL;
 *   s1[i] += g, s2[i] += g * (x - mean[i]) in float64 (bwd_reduce_block's
 *   arithmetic; the two blocks' terms summed into the same accumulators).
 * apply: g from the mask and dy, or (g_given) read from dz;
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

__attribute__((target("avx2,fma"))) static void
fbn_fast_bwd_reduce2_avx2(const float *x, const uint8_t *bits, const float *dy, float *dz,
                          int64_t n, const double *mean, double *s1, double *s2, bool al32,
                          int64_t d, int64_t db, int64_t run) {
  for (int64_t i0 = 0; i0 < n; i0 += run) {
    const int64_t i1 = i0 + run < n ? i0 + run : n;
    for (int s = 0; s < 2; s++) {
      const int64_t o = s != 0 ? d : 0;
      const uint8_t *bs = bits + (s != 0 ? db : 0);
      for (int64_t i = i0; i < i1; i += 8) {
        const __m256 g = fbn_fast_g8(bs, dy + o, i);
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
          g = _mm256_loadu_ps(dz + o + i);
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
fbn_fast_norm1(const float *x, const float *z, float *y, const float *m, const float *a,
               const float *b, uint8_t *fb, int64_t e) {
  float v = __builtin_fmaf(x[e] - m[e], a[e], b[e]);
  if (z != NULL)
    v += z[e];
  const bool pass = !(v <= 0.0f);
  y[e] = pass ? v : 0.0f;
  if (fb != NULL && pass)
    fb[e / 8] = (uint8_t)(fb[e / 8] | 1u << (e % 8));
}

/* 8 elements at e of a flat run: bits into fb through the carry (see
 * fbn_fast_norm_flat_body). */
static inline __attribute__((always_inline, target("avx2,fma"))) void
fbn_fast_norm8_flat(const float *x, const float *z, float *y, const float *m, const float *a,
                    const float *b, uint8_t *fb, int64_t e, unsigned sh, unsigned *carry,
                    bool y32) {
  const unsigned mask =
      fbn_fast_norm8_nt(x + e, z != NULL ? z + e : NULL, y + e, _mm256_loadu_ps(m + e),
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
fbn_fast_norm_flat_body(const bool TWO, const float *x, const float *z, float *y,
                        int64_t total, const float *m, const float *a, const float *b,
                        uint8_t *fb0, uint8_t *fb1, int64_t d, int64_t run) {
  const float *x1 = TWO ? x + d : NULL, *z1 = TWO && z != NULL ? z + d : NULL;
  float *y1 = TWO ? y + d : NULL;
  int64_t e = 0;
  for (; e < total && ((uintptr_t)(y + e) & 15) != 0; e++) {
    fbn_fast_norm1(x, z, y, m, a, b, fb0, e);
    if (TWO)
      fbn_fast_norm1(x1, z1, y1, m, a, b, fb1, e);
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
        fbn_fast_norm8_flat(x, z, y, m, a, b, fb0, e + j, sh, &c0, y32);
      for (int64_t j = 0; j < run; j += 8)
        fbn_fast_norm8_flat(x1, z1, y1, m, a, b, fb1, e + j, sh, &c1, y32);
    }
  }
  /* the rest of each set in turn (see fbn_fast_norm_rows_body) */
  const int64_t e0 = e;
  for (; e + 8 <= total; e += 8)
    fbn_fast_norm8_flat(x, z, y, m, a, b, fb0, e, sh, &c0, y32);
  if (TWO)
    for (int64_t j = e0; j + 8 <= total; j += 8)
      fbn_fast_norm8_flat(x1, z1, y1, m, a, b, fb1, j, sh, &c1, y32);
  if (fb0 != NULL)
    fb0[e / 8] = (uint8_t)c0;
  if (TWO && fb1 != NULL)
    fb1[e / 8] = (uint8_t)c1;
  _mm_sfence();
  for (; e < total; e++) {
    fbn_fast_norm1(x, z, y, m, a, b, fb0, e);
    if (TWO)
      fbn_fast_norm1(x1, z1, y1, m, a, b, fb1, e);
  }
}

__attribute__((target("avx2,fma"))) static void
fbn_fast_norm_nt_flat_avx2(const float *x, const float *z, float *y, int64_t total,
                           const float *m, const float *a, const float *b, uint8_t *fb) {
  fbn_fast_norm_flat_body(false, x, z, y, total, m, a, b, fb, NULL, 0, 0);
}

__attribute__((target("avx2,fma"))) static void
fbn_fast_norm_nt2_flat_avx2(const float *x, const float *z, float *y, int64_t total,
                            const float *m, const float *a, const float *b, uint8_t *fb0,
                            uint8_t *fb1, int64_t d, int64_t run) {
  fbn_fast_norm_flat_body(true, x, z, y, total, m, a, b, fb0, fb1, d, run);
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

static int fbn_fast_avx2_state = -1; /* a racing first write stores the same value */
static bool fbn_fast_have_avx2(void) {
  if (fbn_fast_avx2_state < 0)
    fbn_fast_avx2_state = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return fbn_fast_avx2_state != 0;
}

static bool fbn_fast_norm_nt_f32(const float *x, const float *z, float *y, int64_t rows,
                                 int64_t len, bool per_row, const float *m, const float *a,
                                 const float *b, uint8_t *bits, int64_t bpr) {
  if (!fbn_fast_have_avx2())
    return false;
  if (len % 8 == 0 && (bits == NULL || bpr == len / 8) && ((uintptr_t)y & 15) == 0) {
    fbn_fast_norm_nt_avx2(x, z, y, rows, len, per_row, m, a, b, bits, ((uintptr_t)y & 31) == 0);
    return true;
  }
  const int64_t total = rows * len;
  if (per_row || (bits != NULL && total > FBN_FAST_NT_FLAT_MAX))
    return false;
  uint8_t fb[FBN_FAST_NT_FLAT_MAX / 8 + 9];
  if (bits != NULL)
    memset(fb, 0, (size_t)(total / 8 + 9));
  fbn_fast_norm_nt_flat_avx2(x, z, y, total, m, a, b, bits != NULL ? fb : NULL);
  if (bits != NULL)
    fbn_fast_mask_rows(fb, rows, len, bits, bpr);
  return true;
}

/* fbn_fast_norm_nt_f32 on two blocks of rows x len elements with the same
 * coefficients, the second at x + d (z + d, y + d, bits + db), in one loop:
 * false where it does not apply (the caller then normalizes each block on
 * its own). */
static bool fbn_fast_norm_nt2_f32(const float *x, const float *z, float *y, int64_t rows,
                                  int64_t len, bool per_row, const float *m, const float *a,
                                  const float *b, uint8_t *bits, int64_t bpr, int64_t d,
                                  int64_t db) {
  if (!fbn_fast_have_avx2() || ((uintptr_t)(y + d) & 31) != ((uintptr_t)y & 31))
    return false;
  if (len % 8 == 0 && (bits == NULL || bpr == len / 8) && ((uintptr_t)y & 15) == 0) {
    fbn_fast_norm_nt2_rows_avx2(x, z, y, rows, len, per_row, m, a, b, bits,
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
  fbn_fast_norm_nt2_flat_avx2(x, z, y, total, m, a, b, bits != NULL ? fb[0] : NULL,
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
static bool fbn_fast_bwd_reduce2_f32(const float *x, const uint8_t *bits, int64_t bpr,
                                     const float *dy, float *dz, int64_t rows, int64_t len,
                                     const double *mean, double *s1, double *s2, int64_t d,
                                     int64_t db) {
  if (!fbn_fast_have_avx2() || bits == NULL || bpr * 8 != len ||
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

/* ---- the loops, for float and double ------------------------------------ */

#define FBN_T float
#define FBN_SFX f32
#define FBN_MASK_T int32_t
#define FBN_T_MIN FLT_MIN
#include "cpu/cpu_fast_impl.h"
#undef FBN_T
#undef FBN_SFX
#undef FBN_MASK_T
#undef FBN_T_MIN

/* ---- NCHW training forward: statistics pipelined into normalization ---- */

#if FBN_FAST_PIPE
/*
 * NCHW, long rows, float32, batch statistics, streamed output (AVX2). The
 * grouped forward (forward_nchw) reads a group's x twice in two passes: the
 * statistics pass only reads, and on these 2-core machines a core that only
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

static void fbn_fast_pipe_group_init(fbn_fast_pipe_group *g, const float *x, int64_t c0,
                                     int64_t gc, int64_t hw) {
  g->c0 = c0;
  g->gc = gc;
  for (int64_t j = 0; j < gc; j++) {
    g->acc[j][0] = g->acc[j][1] = 0.0;
    g->shift[j] = (double)x[(c0 + j) * hw];
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
  const bool y32 = ((uintptr_t)y & 31) == 0;
  /* y + dn * hw alike y modulo 32 bytes: hw % 8 == 0 */
  const int64_t half = n_ / 2, dn = half * c_;
  fbn_fast_pipe_group grp[2];
  double mean[FBN_FAST_MAX_GROUP], invstd[FBN_FAST_MAX_GROUP];
  float cm[FBN_FAST_MAX_GROUP], ca[FBN_FAST_MAX_GROUP], cb[FBN_FAST_MAX_GROUP];
  bool fast[FBN_FAST_MAX_GROUP];

  fbn_fast_pipe_group *cur = &grp[0], *next = &grp[1];
  const int64_t first = gi0 * g_;
  fbn_fast_pipe_group_init(cur, x, first, c_ - first < g_ ? c_ - first : g_, hw);
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
      fbn_fast_pipe_group_init(next, x, c1, gc1, hw);
    /* the rows of n and n + half in one loop (two sets of streams in
     * flight, see forward_nhwc_run in cpu_fast_impl.h), then the last n of
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
          fbn_fast_pipe_row2_avx2(x + o, z != NULL ? z + o : NULL, y + o, hw, cm[j], ca[j], cb[j],
                                  bn != NULL ? bn + j * bpr : NULL, y32, x + off1 + j * hw,
                                  next->shift[j], next->acc[j], dn * hw, dn * bpr,
                                  fbn_fast_pair_run(y + o, dn * hw, 0));
        else
          fbn_fast_pipe_row_avx2(x + o, z != NULL ? z + o : NULL, y + o, hw, cm[j], ca[j], cb[j],
                                 bn != NULL ? bn + j * bpr : NULL, y32, x + off1 + j * hw,
                                 next->shift[j], next->acc[j]);
      }
      if (gc > both) {
        const int64_t o = off + both * hw;
        if (two)
          fbn_fast_norm_nt2_rows_avx2(x + o, z != NULL ? z + o : NULL, y + o, gc - both, hw, true,
                                      cm + both, ca + both, cb + both,
                                      bn != NULL ? bn + both * bpr : NULL, y32, dn * hw,
                                      dn * bpr, fbn_fast_pair_run(y + o, dn * hw, hw));
        else
          fbn_fast_norm_nt_avx2(x + o, z != NULL ? z + o : NULL, y + o, gc - both, hw, true,
                                cm + both, ca + both, cb + both,
                                bn != NULL ? bn + both * bpr : NULL, y32);
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
 * and dx (daddend too or not), streamed (AVX2): the reduction of group k+1
 * (x, dy and mask read from memory) in the loop that writes dx (and
 * daddend) of group k (whose x, dy and mask are still in the caches), as the
 * forward above. A group's sums are in this loop's order (not
 * bwd_reduce_block's).
 */
static bool fbn_fast_bwd_pipe_usable(const fbn_bk_backward_args *a, const uint8_t *bits,
                                     int64_t bpr) {
  const fbn_tensor_desc *d = a->desc;
  const int64_t hw = d->h * d->w;
  return d->dtype == FBN_DTYPE_FLOAT32 && d->layout == FBN_LAYOUT_NCHW &&
         hw >= FBN_FAST_NCHW_VEC_HW && hw % 8 == 0 && bits != NULL && bpr == hw / 8 &&
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
  float cm[FBN_FAST_MAX_GROUP], ck[FBN_FAST_MAX_GROUP], cc1[FBN_FAST_MAX_GROUP],
      cc0[FBN_FAST_MAX_GROUP];
  bool fast[FBN_FAST_MAX_GROUP];

  fbn_fast_bwd_pipe_group *cur = &grp[0], *next = &grp[1];
  const int64_t first = gi0 * g_;
  fbn_fast_bwd_pipe_group_init(m, a, cur, first, c_ - first < g_ ? c_ - first : g_);
  for (int64_t n = 0; n < n_; n++)
    for (int64_t j = 0; j < cur->gc; j++) {
      const int64_t o = (n * c_ + cur->c0 + j) * hw;
      fbn_fast_bwd_pipe_reduce_avx2(hw, x + o, bits + (n * c_ + cur->c0 + j) * bpr, dy + o,
                                    cur->ch[j].mean, cur->acc[j]);
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
        const uint8_t *b = bits + (n * c_ + c0 + j) * bpr;
        float *dzo = dz != NULL ? dz + o : NULL;
        if (j < gc1)
          fbn_fast_bwd_pipe_both_avx2(x + o, b, dy + o, dx + o, dzo, hw, cm[j], ck[j], cc1[j],
                                      cc0[j], al32, x + o1, bits + (n * c_ + c1 + j) * bpr,
                                      dy + o1, next->ch[j].mean, next->acc[j]);
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

#define FBN_T double
#define FBN_SFX f64
#define FBN_MASK_T int64_t
#define FBN_T_MIN DBL_MIN
#include "cpu/cpu_fast_impl.h"
#undef FBN_T
#undef FBN_SFX
#undef FBN_MASK_T
#undef FBN_T_MIN

/* ---- BN alone ----------------------------------------------------------- */

/*
 * FBN_OPERATION_BN (no ReLU, no addend) runs each channel with the
 * reference's arithmetic (the exact paths above), channels spread over the
 * threads: the vectorized loops all end in the ReLU.
 */
static void fbn_fast_forward_plain(fbn_fast_call *m, const fbn_bk_forward_args *a, int nt) {
  const int64_t c_ = a->desc->c;
  FBN_OMP(omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1))
  for (int64_t c = 0; c < c_; c++) {
    double mean, invstd;
    if (fbn_fast_full(a)) /* NaN sums: fbn_fast_batch_stats takes the exact way */
      fbn_fast_batch_stats(m, a, c, 0.0, NAN, NAN, &mean, &invstd);
    else
      fbn_fast_running_stats(m, a, c, &mean, &invstd);
    fbn_fast_exact_normalize(m, a, c, mean, invstd, NULL, 0);
  }
}

static void fbn_fast_backward_plain(fbn_fast_call *m, const fbn_bk_backward_args *a, int nt) {
  const int64_t c_ = a->desc->c;
  FBN_OMP(omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1))
  for (int64_t c = 0; c < c_; c++) {
    fbn_fast_bwd_chan ch;
    fbn_fast_bwd_chan_init(m, a, c, &ch);
    fbn_fast_bwd_chan_sums(m, a, c, false, 0.0, 0.0, &ch);
    fbn_fast_exact_backward_apply(m, a, c, &ch);
  }
}

/* ---- backend entry points ----------------------------------------------- */

/* The ReLU mask saved after the statistics: float32 tensors of the ReLU
 * operations. */
static size_t fbn_fast_saved_mask_bytes(const fbn_op_desc *op, const fbn_tensor_desc *d) {
  return fbn_operation_has_relu(op->operation) ? fbn_fast_mask_bytes(d) : 0;
}

static fbn_status fast_saved_size(const fbn_op_desc *op, void *state, const fbn_tensor_desc *d,
                                  size_t *bytes) {
  *bytes = fbn_cpu_saved_bytes(d, fbn_fast_saved_mask_bytes(op, d));
  return FBN_STATUS_SUCCESS;
}

/* Which driver a call takes (both the size query and the call decide it
 * here, so that they agree). */
typedef enum fbn_fast_route {
  FBN_FAST_ROUTE_PLAIN,     /* BN alone */
  FBN_FAST_ROUTE_NCHW_EVAL, /* long rows, running statistics */
  FBN_FAST_ROUTE_NCHW,      /* long rows (or the pipelined path) */
  FBN_FAST_ROUTE_NCHW_VEC,  /* short rows */
  FBN_FAST_ROUTE_NHWC,
} fbn_fast_route;

static fbn_fast_route fbn_fast_route_of(const fbn_op_desc *op, const fbn_tensor_desc *d,
                                        bool backward) {
  if (!fbn_operation_has_relu(op->operation))
    return FBN_FAST_ROUTE_PLAIN;
  if (d->layout == FBN_LAYOUT_NHWC)
    return FBN_FAST_ROUTE_NHWC;
  if (d->h * d->w < FBN_FAST_NCHW_VEC_HW)
    return FBN_FAST_ROUTE_NCHW_VEC;
  if (!backward && op->statistics == FBN_STATISTICS_RUNNING)
    return FBN_FAST_ROUTE_NCHW_EVAL;
  return FBN_FAST_ROUTE_NCHW;
}

/* Bytes of x (and dy, y) a short-row NCHW group aims for per channel. */
static int64_t fbn_fast_vec_channel_bytes(const fbn_op_desc *op, const fbn_tensor_desc *d,
                                          bool backward) {
  const int64_t per = d->n * d->h * d->w * (int64_t)fbn_dtype_size(d->dtype);
  if (!backward)
    return per;
  return (fbn_fast_saved_mask_bytes(op, d) > 0 ? 2 : 3) * per;
}

/* Scratch bytes of a call on nt threads. */
static size_t fbn_fast_scratch_bytes(const fbn_op_desc *op, const fbn_tensor_desc *d,
                                     bool backward, int nt) {
  size_t bytes = 0;
  switch (fbn_fast_route_of(op, d, backward)) {
  case FBN_FAST_ROUTE_PLAIN:
  case FBN_FAST_ROUTE_NCHW: return 0;
  case FBN_FAST_ROUTE_NCHW_EVAL: {
    /* 2 C doubles (mean, invstd), 3 C coefficients, C flags */
    const size_t c = (size_t)d->c;
    return 2 * c * sizeof(double) + 3 * c * fbn_dtype_size(d->dtype) + c;
  }
  case FBN_FAST_ROUTE_NCHW_VEC: {
    fbn_fast_nchw_plan plan;
    fbn_fast_nchw_plan_make(NULL, d, nt, fbn_fast_vec_channel_bytes(op, d, backward), &plan,
                            &bytes);
    return bytes;
  }
  case FBN_FAST_ROUTE_NHWC: {
    fbn_fast_nhwc_plan plan;
    fbn_fast_nhwc_plan_make(NULL, d->n * d->h * d->w, d->c, nt, fbn_dtype_size(d->dtype), &plan,
                            &bytes);
    return bytes;
  }
  }
  return 0;
}

static fbn_status fast_workspace_size(const fbn_op_desc *op, void *state,
                                      const fbn_tensor_desc *d, bool backward, size_t *bytes) {
  *bytes = fbn_fast_scratch_bytes(op, d, backward, fbn_fast_threads(fbn_desc_numel(d)));
  return FBN_STATUS_SUCCESS;
}

/* Threads for a call: as many as fbn_fast_threads() gives, fewer when the
 * workspace was sized for fewer (OpenMP's thread count changed since the
 * size query). 0 when not even one fits. */
static int fbn_fast_call_threads(const fbn_op_desc *op, const fbn_tensor_desc *d, bool backward,
                                 size_t workspace_bytes) {
  for (int nt = fbn_fast_threads(fbn_desc_numel(d)); nt >= 1; nt--)
    if (fbn_fast_scratch_bytes(op, d, backward, nt) <= workspace_bytes)
      return nt;
  return 0;
}

static fbn_status fbn_fast_no_room(const fbn_tensor_desc *d, size_t need, size_t have) {
  return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                   "workspace_bytes = %zu: this shape needs at least %zu bytes on one thread",
                   have, need);
}

static fbn_status fast_forward(const fbn_bk_forward_args *a) {
  const fbn_tensor_desc *d = a->desc;
  const bool f32 = d->dtype == FBN_DTYPE_FLOAT32;
  const int nt = fbn_fast_call_threads(a->op, d, false, a->workspace_bytes);
  if (nt == 0)
    return fbn_fast_no_room(d, fbn_fast_scratch_bytes(a->op, d, false, 1), a->workspace_bytes);
  fbn_fast_call call = {
      .op = a->op,
      .weight = a->weight,
      .bias = a->bias,
      .running_mean = a->running_mean,
      .running_var = a->running_var,
      .scratch = a->workspace,
      .scratch_bytes = a->workspace_bytes,
  };
  fbn_fast_call *m = &call;
  const size_t mask_bytes = fbn_fast_saved_mask_bytes(a->op, d);
  uint8_t *bits = a->saved != NULL && mask_bytes > 0 ? fbn_cpu_saved_extra(a->saved, d->c) : NULL;
  const int64_t bpr = fbn_fast_mask_bpr(d);
  switch (fbn_fast_route_of(a->op, d, false)) {
  case FBN_FAST_ROUTE_PLAIN: fbn_fast_forward_plain(m, a, nt); break;
  case FBN_FAST_ROUTE_NCHW_EVAL: {
    const size_t c = (size_t)d->c, stat_bytes = 2 * c * sizeof(double);
    const size_t coef_bytes = 3 * c * fbn_dtype_size(d->dtype);
    char *sc = fbn_fast_scratch(m, stat_bytes + coef_bytes + c);
    double *stat = (double *)sc;
    void *coef = sc + stat_bytes;
    bool *fast = (bool *)(sc + stat_bytes + coef_bytes);
    if (f32)
      forward_nchw_eval_f32(m, a, nt, bits, bpr, coef, stat, fast);
    else
      forward_nchw_eval_f64(m, a, nt, bits, bpr, coef, stat, fast);
    break;
  }
  case FBN_FAST_ROUTE_NCHW:
    if (fbn_fast_pipe_usable(a, bits, bpr))
      fbn_fast_forward_nchw_pipe(m, a, nt, bits, bpr);
    else if (f32)
      forward_nchw_f32(m, a, nt, bits, bpr);
    else
      forward_nchw_f64(m, a, nt, bits, bpr);
    break;
  case FBN_FAST_ROUTE_NCHW_VEC: {
    fbn_fast_nchw_plan plan;
    size_t bytes;
    fbn_fast_nchw_plan_make(m, d, nt, fbn_fast_vec_channel_bytes(a->op, d, false), &plan, &bytes);
    if (f32)
      forward_nchw_vec_f32(m, a, nt, &plan, bits, bpr);
    else
      forward_nchw_vec_f64(m, a, nt, &plan, bits, bpr);
    break;
  }
  case FBN_FAST_ROUTE_NHWC: {
    fbn_fast_nhwc_plan plan;
    size_t bytes;
    fbn_fast_nhwc_plan_make(m, d->n * d->h * d->w, d->c, nt, fbn_dtype_size(d->dtype), &plan,
                            &bytes);
    if (f32)
      forward_nhwc_f32(m, a, nt, &plan, bits, bpr);
    else
      forward_nhwc_f64(m, a, nt, &plan, bits, bpr);
    break;
  }
  }
  if (a->saved != NULL)
    fbn_cpu_saved_seal(a->saved, fbn_backend_cpu_fast(), a->op, d);
  return FBN_STATUS_SUCCESS;
}

static fbn_status fast_backward(const fbn_bk_backward_args *a) {
  const fbn_tensor_desc *d = a->desc;
  fbn_status st = fbn_cpu_saved_check(a->saved, fbn_backend_cpu_fast(), a->op, d);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const bool f32 = d->dtype == FBN_DTYPE_FLOAT32;
  const int nt = fbn_fast_call_threads(a->op, d, true, a->workspace_bytes);
  if (nt == 0)
    return fbn_fast_no_room(d, fbn_fast_scratch_bytes(a->op, d, true, 1), a->workspace_bytes);
  fbn_fast_call call = {
      .op = a->op,
      .weight = a->weight,
      .bias = a->bias,
      .dweight = a->dweight,
      .dbias = a->dbias,
      .accumulate = a->accumulate,
      .grads = a->dweight != NULL || a->dbias != NULL,
      .scratch = a->workspace,
      .scratch_bytes = a->workspace_bytes,
  };
  fbn_fast_call *m = &call;
  /* the mask the forward saved (float32, ReLU operations) */
  const uint8_t *bits =
      fbn_fast_saved_mask_bytes(a->op, d) > 0 ? fbn_cpu_saved_extra_const(a->saved, d->c) : NULL;
  const int64_t bpr = fbn_fast_mask_bpr(d);
  switch (fbn_fast_route_of(a->op, d, true)) {
  case FBN_FAST_ROUTE_PLAIN: fbn_fast_backward_plain(m, a, nt); break;
  case FBN_FAST_ROUTE_NCHW_EVAL:
  case FBN_FAST_ROUTE_NCHW:
    if (fbn_fast_bwd_pipe_usable(a, bits, bpr))
      fbn_fast_backward_nchw_pipe(m, a, nt, bits, bpr);
    else if (f32)
      backward_nchw_f32(m, a, nt, bits, bpr);
    else
      backward_nchw_f64(m, a, nt, bits, bpr);
    break;
  case FBN_FAST_ROUTE_NCHW_VEC: {
    fbn_fast_nchw_plan plan;
    size_t bytes;
    fbn_fast_nchw_plan_make(m, d, nt, fbn_fast_vec_channel_bytes(a->op, d, true), &plan, &bytes);
    if (f32)
      backward_nchw_vec_f32(m, a, nt, &plan, bits, bpr);
    else
      backward_nchw_vec_f64(m, a, nt, &plan, bits, bpr);
    break;
  }
  case FBN_FAST_ROUTE_NHWC: {
    fbn_fast_nhwc_plan plan;
    size_t bytes;
    fbn_fast_nhwc_plan_make(m, d->n * d->h * d->w, d->c, nt, fbn_dtype_size(d->dtype), &plan,
                            &bytes);
    if (f32)
      backward_nhwc_f32(m, a, nt, &plan, bits, bpr);
    else
      backward_nhwc_f64(m, a, nt, &plan, bits, bpr);
    break;
  }
  }
  return FBN_STATUS_SUCCESS;
}

static const fbn_backend fast_backend = {
    .name = "cpu-fast",
    .device = FBN_DEVICE_CPU,
    .op_init = fbn_cpu_op_init,
    .op_fini = fbn_cpu_op_fini,
    .check_shape = NULL,
    .saved_size = fast_saved_size,
    .workspace_size = fast_workspace_size,
    .forward = fast_forward,
    .backward = fast_backward,
    .mem_alloc = fbn_cpu_mem_alloc,
    .mem_free = fbn_cpu_mem_free,
    .mem_copy = fbn_cpu_mem_copy,
    .mem_fill = fbn_cpu_mem_fill,
};

const fbn_backend *fbn_backend_cpu_fast(void) { return &fast_backend; }
