/*
 * Fast CPU backend: the types its files share (per-channel backward state,
 * NHWC and NCHW plans, the parameters of one call) and small helpers
 * (threads, element access, indices).
 */
#ifndef FUSEDBN_SRC_CPU_FAST_FAST_TYPES_H
#define FUSEDBN_SRC_CPU_FAST_FAST_TYPES_H

#include "core/half.h"
#include "cpu/cpu_common.h"
#include "cpu/fast/fast_config.h"

#include <math.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- types -------------------------------------------------------------- */

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
  void *coef[4];           /* 4 arrays of `block` coefficients (fbn_fast_coef_size) */
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
  size_t elem;        /* bytes of one coefficient (fbn_fast_coef_size) */
  size_t per_thread;  /* bytes of one thread's arrays */
  char *base;
} fbn_fast_nchw_plan;

typedef struct fbn_fast_nchw_view {
  double *s1, *s2, *shift; /* len each */
  double *mean, *invstd;   /* group each */
  fbn_fast_bwd_chan *chan; /* group */
  void *coef[4];           /* len coefficients each */
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
/* Whether the call's operation ends in the ReLU (BN alone does not). */
#define fbn_fast_relu(a) fbn_operation_has_relu((a)->op->operation)
/* p + o, or NULL where p is NULL (y of BN alone's backward, optional
 * outputs). */
#define FBN_FAST_AT(p, o) ((p) != NULL ? (p) + (o) : NULL)

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

/* Element i widened to double (exact), and v stored rounded once to the
 * dtype (half types: src/core/half.h). */
static inline double fbn_fast_load(const void *p, fbn_dtype dtype, int64_t i) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT64: return ((const double *)p)[i];
  case FBN_DTYPE_FLOAT16: return fbn_half_to_double(((const uint16_t *)p)[i]);
  case FBN_DTYPE_BFLOAT16: return fbn_bfloat16_to_double(((const uint16_t *)p)[i]);
  case FBN_DTYPE_FLOAT32: break;
  }
  return (double)((const float *)p)[i];
}

static inline void fbn_fast_store(void *p, fbn_dtype dtype, int64_t i, double v) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT64: ((double *)p)[i] = v; return;
  case FBN_DTYPE_FLOAT16: ((uint16_t *)p)[i] = fbn_double_to_half(v); return;
  case FBN_DTYPE_BFLOAT16: ((uint16_t *)p)[i] = fbn_double_to_bfloat16(v); return;
  case FBN_DTYPE_FLOAT32: break;
  }
  ((float *)p)[i] = (float)v;
}

/* Bytes of one coefficient of the vectorized loops (their arithmetic's
 * type): float64 tensors double, the others float. */
static inline size_t fbn_fast_coef_size(fbn_dtype dtype) {
  return dtype == FBN_DTYPE_FLOAT64 ? sizeof(double) : sizeof(float);
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

#endif /* FUSEDBN_SRC_CPU_FAST_FAST_TYPES_H */
