/*
 * Fast CPU backend: the same semantics as the reference backend
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
 *   pipelines     NCHW with long rows, float32, large (AVX2; the training
 *                 forward for half tensors too): the first
 *                 pass of channel group k+1 runs inside the loop of group
 *                 k's second pass (fbn_fast_forward_nchw_pipe,
 *                 fbn_fast_backward_nchw_pipe): a pass that only reads gets
 *                 ~2/3 of the bandwidth of one that also writes here
 *   memory        NCHW channel groups are sized so that their data comes
 *                 back from the caches in the second pass; outputs of 8 MiB
 *                 and more are written with non-temporal stores; no
 *                 temporary tensors (the caller's workspace, sized by
 *                 workspace_size: per-thread partial sums and per-channel
 *                 coefficients)
 *   inner loops   fast_loops_impl.h: plain `omp simd` loops compiled for
 *                 x86-64-v3 (AVX2, FMA) and the baseline, chosen at load time
 *
 * Degenerate channels take the exact path: a channel whose statistics or
 * coefficients are not finite (NaN or infinity in x, running stats or
 * parameters) or do not fit the tensor's dtype (a factor below its normal
 * range, a mean so large that x - mean could overflow: fast_channel.h) is
 * computed with the reference backend's arithmetic (float64, same order of
 * summation), so NaN and infinity come out exactly where the reference puts
 * them. Batch statistics alone are recomputed that way (the loops then
 * normalize) when the shifted sums would cancel (a shift beyond 8 standard
 * deviations of the mean) or the variance is 0 with eps = 0.
 *
 * Operations: the three take the same drivers and loops. BN alone (no ReLU)
 * runs them without the ReLU gate and without a mask (forward: y = v;
 * backward: g = dy, y not read), a compile-time flag of the loop bodies, so
 * that its arithmetic is BN + ReLU's up to the gate: BN + ReLU == ReLU(BN)
 * bit for bit.
 *
 * dtypes: float32 and float64 tensors run loops of their own type;
 * float16 and bfloat16 tensors (float32 parameters) run the same drivers
 * with the block functions of fast_half_impl.h: chunks widened into
 * L1-resident float32 buffers by the run-time chosen conversions
 * (src/cpu/half), the float32 loops on them, outputs rounded once, so that
 * the tensors move 2 bytes per element per pass.
 *
 * Saved state: the CPU header and two arrays of C doubles (mean and inverse
 * standard deviation that normalized x, as the reference backend's,
 * cpu_common.h), then for float32 and half tensors of the ReLU operations
 * the ReLU bitmask of the forward's y (half: the rounded y): one bit per
 * element, !(y <= 0) (NaN sets it), each tensor row on a byte.
 * Backward takes the mask from it instead of reading y (the API requires y
 * unchanged since the forward), which saves a quarter of its first pass's
 * reads.
 *
 * Files (src/cpu/fast/), one translation unit so that the inner loops are
 * inlined into their x86-64-v3 and baseline clones:
 *   fast_config.h      compiler plumbing, tuning constants
 *   fast_types.h       shared types and small helpers
 *   fast_chunks.h      non-temporal stores, chunks, mask bits
 *   fast_channel.h     per-channel statistics and exact paths
 *   fast_plan.h        plans carved from the workspace
 *   fast_kernels.h     the kernel table, filled once from the CPU's features
 *   fast_avx2.h        the AVX2 intrinsics loops
 *   fast_loops_impl.h  masks, statistics, normalize and backward loops (per dtype)
 *   fast_half_impl.h   the block functions for float16 / bfloat16 tensors
 *   fast_half_avx2.h   their AVX2 + F16C loops that convert in registers
 *   fast_nchw_impl.h   NCHW drivers (per dtype)
 *   fast_nhwc_impl.h   NHWC drivers (per dtype)
 *   fast_pipe.h        the pipelined NCHW path (float32)
 *   fast_backend.c     sizes, routing and the backend's entry points (this file)
 */
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/fast/fast_avx2.h"
#include "cpu/fast/fast_channel.h"
#include "cpu/fast/fast_plan.h"
#include "cpu/half/half_convert.h"

/* ---- the loops, for float and double ------------------------------------ */

#define FBN_T float
#define FBN_SFX f32
#define FBN_MASK_T int32_t
#define FBN_T_MIN FLT_MIN
#include "cpu/fast/fast_loops_impl.h"
#include "cpu/fast/fast_nchw_impl.h"
#include "cpu/fast/fast_nhwc_impl.h"
#undef FBN_T
#undef FBN_SFX
#undef FBN_MASK_T
#undef FBN_T_MIN

#include "cpu/fast/fast_pipe.h"

#define FBN_T double
#define FBN_SFX f64
#define FBN_MASK_T int64_t
#define FBN_T_MIN DBL_MIN
#include "cpu/fast/fast_loops_impl.h"
#include "cpu/fast/fast_nchw_impl.h"
#include "cpu/fast/fast_nhwc_impl.h"
#undef FBN_T
#undef FBN_SFX
#undef FBN_MASK_T
#undef FBN_T_MIN

/* ---- the drivers for float16 and bfloat16 (float32 arithmetic) ---------- */

#define FBN_T uint16_t
#define FBN_SFX f16
#define FBN_HALF_BF16 0
#include "cpu/fast/fast_half_impl.h"
#include "cpu/fast/fast_nchw_impl.h"
#include "cpu/fast/fast_nhwc_impl.h"
#undef FBN_T
#undef FBN_SFX
#undef FBN_HALF_BF16

#define FBN_T uint16_t
#define FBN_SFX bf16
#define FBN_HALF_BF16 1
#include "cpu/fast/fast_half_impl.h"
#include "cpu/fast/fast_nchw_impl.h"
#include "cpu/fast/fast_nhwc_impl.h"
#undef FBN_T
#undef FBN_SFX
#undef FBN_HALF_BF16

/* The pipelined NCHW training forward for half tensors (fast_half_impl.h):
 * long rows of a multiple of 16 elements, batch statistics, streamed output
 * 16-byte aligned, the vector conversions. */
#if FBN_FAST_PIPE && FBN_FAST_HALF_AVX2
static bool fbn_fast_half_pipe_usable(const fbn_bk_forward_args *a, const uint8_t *bits,
                                      int64_t bpr) {
  const fbn_tensor_desc *d = a->desc;
  const int64_t hw = d->h * d->w;
  return (d->dtype == FBN_DTYPE_FLOAT16 || d->dtype == FBN_DTYPE_BFLOAT16) && fbn_fast_full(a) &&
         hw >= FBN_FAST_NCHW_VEC_HW && hw % 16 == 0 && (bits == NULL || bpr == hw / 8) &&
         ((uintptr_t)a->y & 15) == 0 &&
         fbn_fast_stream_output(fbn_desc_numel(d) * (int64_t)sizeof(uint16_t)) &&
         fbn_fast_half_vec();
}
#define fbn_fast_half_forward_nchw_pipe(d, ...)                                                  \
  ((d)->dtype == FBN_DTYPE_BFLOAT16 ? forward_nchw_pipe_bf16(__VA_ARGS__)                      \
                                    : forward_nchw_pipe_f16(__VA_ARGS__))
#else
#define fbn_fast_half_pipe_usable(...) false
#define fbn_fast_half_forward_nchw_pipe(...) ((void)0)
#endif

/* fn's instance for d's dtype, called with the arguments that follow. */
#define FBN_FAST_BY_DTYPE(d, fn, ...)                                                            \
  do {                                                                                         \
    switch ((d)->dtype) {                                                                      \
    case FBN_DTYPE_FLOAT32: fn##_f32(__VA_ARGS__); break;                                      \
    case FBN_DTYPE_FLOAT64: fn##_f64(__VA_ARGS__); break;                                      \
    case FBN_DTYPE_FLOAT16: fn##_f16(__VA_ARGS__); break;                                      \
    case FBN_DTYPE_BFLOAT16: fn##_bf16(__VA_ARGS__); break;                                    \
    }                                                                                          \
  } while (0)

/* ---- backend entry points ----------------------------------------------- */

/* The ReLU mask saved after the statistics: float32 and half tensors of the
 * ReLU operations. */
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
  FBN_FAST_ROUTE_NCHW_EVAL, /* long rows, running statistics */
  FBN_FAST_ROUTE_NCHW,      /* long rows (or the pipelined path) */
  FBN_FAST_ROUTE_NCHW_VEC,  /* short rows */
  FBN_FAST_ROUTE_NHWC,
} fbn_fast_route;

static fbn_fast_route fbn_fast_route_of(const fbn_op_desc *op, const fbn_tensor_desc *d,
                                        bool backward) {
  if (d->layout == FBN_LAYOUT_NHWC)
    return FBN_FAST_ROUTE_NHWC;
  if (d->h * d->w < FBN_FAST_NCHW_VEC_HW)
    return FBN_FAST_ROUTE_NCHW_VEC;
  if (!backward && op->statistics == FBN_STATISTICS_RUNNING)
    return FBN_FAST_ROUTE_NCHW_EVAL;
  return FBN_FAST_ROUTE_NCHW;
}

/* Bytes of x (and dy, y) a short-row NCHW group aims for per channel (y
 * is not read with the saved mask, nor by BN alone). */
static int64_t fbn_fast_vec_channel_bytes(const fbn_op_desc *op, const fbn_tensor_desc *d,
                                          bool backward) {
  const int64_t per = d->n * d->h * d->w * (int64_t)fbn_dtype_size(d->dtype);
  if (!backward)
    return per;
  const bool reads_y =
      fbn_operation_has_relu(op->operation) && fbn_fast_saved_mask_bytes(op, d) == 0;
  return (reads_y ? 3 : 2) * per;
}

/* Scratch bytes of a call on nt threads. */
static size_t fbn_fast_scratch_bytes(const fbn_op_desc *op, const fbn_tensor_desc *d,
                                     bool backward, int nt) {
  size_t bytes = 0;
  switch (fbn_fast_route_of(op, d, backward)) {
  case FBN_FAST_ROUTE_NCHW: return 0;
  case FBN_FAST_ROUTE_NCHW_EVAL: {
    /* 2 C doubles (mean, invstd), 3 C coefficients, C flags */
    const size_t c = (size_t)d->c;
    return 2 * c * sizeof(double) + 3 * c * fbn_fast_coef_size(d->dtype) + c;
  }
  case FBN_FAST_ROUTE_NCHW_VEC: {
    fbn_fast_nchw_plan plan;
    fbn_fast_nchw_plan_make(NULL, d, nt, fbn_fast_vec_channel_bytes(op, d, backward), &plan,
                            &bytes);
    return bytes;
  }
  case FBN_FAST_ROUTE_NHWC: {
    fbn_fast_nhwc_plan plan;
    fbn_fast_nhwc_plan_make(NULL, d->n * d->h * d->w, d->c, nt, fbn_fast_coef_size(d->dtype), &plan,
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

/* The least workspace a call runs with: the smallest size over the thread
 * counts up to the current one (not monotonic: short-row NCHW groups
 * shrink with more threads); the call then runs on as many threads as its
 * workspace holds (fbn_fast_call_threads). */
static fbn_status fast_min_workspace_size(const fbn_op_desc *op, void *state,
                                          const fbn_tensor_desc *d, bool backward,
                                          size_t *bytes) {
  size_t least = SIZE_MAX;
  for (int nt = fbn_fast_threads(fbn_desc_numel(d)); nt >= 1; nt--) {
    const size_t b = fbn_fast_scratch_bytes(op, d, backward, nt);
    least = b < least ? b : least;
  }
  *bytes = least;
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
  case FBN_FAST_ROUTE_NCHW_EVAL: {
    const size_t c = (size_t)d->c, stat_bytes = 2 * c * sizeof(double);
    const size_t coef_bytes = 3 * c * fbn_fast_coef_size(d->dtype);
    char *sc = fbn_fast_scratch(m, stat_bytes + coef_bytes + c);
    if (sc == NULL)
      return fbn_fast_no_room(d, stat_bytes + coef_bytes + c, a->workspace_bytes);
    double *stat = (double *)sc;
    void *coef = sc + stat_bytes;
    bool *fast = (bool *)(sc + stat_bytes + coef_bytes);
    FBN_FAST_BY_DTYPE(d, forward_nchw_eval, m, a, nt, bits, bpr, coef, stat, fast);
    break;
  }
  case FBN_FAST_ROUTE_NCHW:
    if (fbn_fast_pipe_usable(a, bits, bpr))
      fbn_fast_forward_nchw_pipe(m, a, nt, bits, bpr);
    else if (fbn_fast_half_pipe_usable(a, bits, bpr))
      fbn_fast_half_forward_nchw_pipe(d, m, a, nt, bits, bpr);
    else
      FBN_FAST_BY_DTYPE(d, forward_nchw, m, a, nt, bits, bpr);
    break;
  case FBN_FAST_ROUTE_NCHW_VEC: {
    fbn_fast_nchw_plan plan;
    size_t bytes;
    if (fbn_fast_nchw_plan_make(m, d, nt, fbn_fast_vec_channel_bytes(a->op, d, false), &plan,
                                &bytes) != FBN_STATUS_SUCCESS)
      return fbn_fast_no_room(d, bytes, a->workspace_bytes);
    FBN_FAST_BY_DTYPE(d, forward_nchw_vec, m, a, nt, &plan, bits, bpr);
    break;
  }
  case FBN_FAST_ROUTE_NHWC: {
    fbn_fast_nhwc_plan plan;
    size_t bytes;
    if (fbn_fast_nhwc_plan_make(m, d->n * d->h * d->w, d->c, nt, fbn_fast_coef_size(d->dtype), &plan,
                                &bytes) != FBN_STATUS_SUCCESS)
      return fbn_fast_no_room(d, bytes, a->workspace_bytes);
    FBN_FAST_BY_DTYPE(d, forward_nhwc, m, a, nt, &plan, bits, bpr);
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
  /* the mask the forward saved (float32 and half, ReLU operations) */
  const uint8_t *bits =
      fbn_fast_saved_mask_bytes(a->op, d) > 0 ? fbn_cpu_saved_extra_const(a->saved, d->c) : NULL;
  const int64_t bpr = fbn_fast_mask_bpr(d);
  switch (fbn_fast_route_of(a->op, d, true)) {
  case FBN_FAST_ROUTE_NCHW_EVAL:
  case FBN_FAST_ROUTE_NCHW:
    if (fbn_fast_bwd_pipe_usable(a, bits, bpr))
      fbn_fast_backward_nchw_pipe(m, a, nt, bits, bpr);
    else
      FBN_FAST_BY_DTYPE(d, backward_nchw, m, a, nt, bits, bpr);
    break;
  case FBN_FAST_ROUTE_NCHW_VEC: {
    fbn_fast_nchw_plan plan;
    size_t bytes;
    if (fbn_fast_nchw_plan_make(m, d, nt, fbn_fast_vec_channel_bytes(a->op, d, true), &plan,
                                &bytes) != FBN_STATUS_SUCCESS)
      return fbn_fast_no_room(d, bytes, a->workspace_bytes);
    FBN_FAST_BY_DTYPE(d, backward_nchw_vec, m, a, nt, &plan, bits, bpr);
    break;
  }
  case FBN_FAST_ROUTE_NHWC: {
    fbn_fast_nhwc_plan plan;
    size_t bytes;
    if (fbn_fast_nhwc_plan_make(m, d->n * d->h * d->w, d->c, nt, fbn_fast_coef_size(d->dtype), &plan,
                                &bytes) != FBN_STATUS_SUCCESS)
      return fbn_fast_no_room(d, bytes, a->workspace_bytes);
    FBN_FAST_BY_DTYPE(d, backward_nhwc, m, a, nt, &plan, bits, bpr);
    break;
  }
  }
  return FBN_STATUS_SUCCESS;
}

static const fbn_backend fast_backend = {
    .name = "cpu-fast",
    .device = FBN_DEVICE_CPU,
    .op_init = fbn_cpu_op_init, /* every dtype */
    .op_fini = fbn_cpu_op_fini,
    .check_shape = NULL,
    .saved_size = fast_saved_size,
    .workspace_size = fast_workspace_size,
    .min_workspace_size = fast_min_workspace_size,
    .forward = fast_forward,
    .backward = fast_backward,
    .mem_alloc = fbn_cpu_mem_alloc,
    .mem_free = fbn_cpu_mem_free,
    .mem_copy = fbn_cpu_mem_copy,
    .mem_fill = fbn_cpu_mem_fill,
};

const fbn_backend *fbn_backend_cpu_fast(void) { return &fast_backend; }

