/*
 * fusedbn-bench: the unfused CPU baselines' sequences and their elementwise
 * passes (see bench_unfused_cpu.h); the BN step is fusedbn's BN alone.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bench_parallel.h"
#include "bench_unfused_cpu.h"
#include "core/half.h"

/* The three elementwise passes for element type T (suffix S): each one
 * loop over [begin, end) of the flat tensor, threaded over contiguous
 * ranges. The add and the ReLU work in place (as a framework's `out +=
 * identity; relu_(out)`); the ReLU backward writes a new tensor, with
 * non-temporal stores from BENCH_STREAM_MIN bytes on, as the library. */
#define BENCH_ELEMENTWISE(T, S)                                                                 \
  BENCH_CLONES static void add_range_##S(T *restrict y, const T *restrict addend,             \
                                         int64_t begin, int64_t end) {                         \
    BENCH_OMP(simd)                                                                            \
    for (int64_t i = begin; i < end; i++)                                                      \
      y[i] += addend[i];                                                                       \
  }                                                                                            \
  BENCH_CLONES static void relu_range_##S(T *restrict y, int64_t begin, int64_t end) {        \
    BENCH_OMP(simd)                                                                            \
    for (int64_t i = begin; i < end; i++) {                                                    \
      const T v = y[i];                                                                        \
      y[i] = !(v <= 0) ? v : (T)0;                                                             \
    }                                                                                          \
  }                                                                                            \
  static BENCH_ALWAYS_INLINE void relu_backward_run_##S(const T *restrict y,                  \
                                                        const T *restrict dy, T *restrict g,   \
                                                        int64_t n) {                           \
    BENCH_OMP(simd)                                                                            \
    for (int64_t i = 0; i < n; i++)                                                            \
      g[i] = !(y[i] <= 0) ? dy[i] : (T)0;                                                      \
  }                                                                                            \
  /* stream: through a staging buffer with non-temporal stores. */                             \
  BENCH_CLONES static void relu_backward_range_##S(const T *restrict y, const T *restrict dy,  \
                                                   T *restrict g, int64_t begin, int64_t end,  \
                                                   bool stream) {                              \
    if (!stream) {                                                                             \
      relu_backward_run_##S(y + begin, dy + begin, g + begin, end - begin);                   \
      return;                                                                                  \
    }                                                                                          \
    T stage[BENCH_STAGE_ELEMS];                                                                \
    for (int64_t i = begin; i < end; i += BENCH_STAGE_ELEMS) {                                 \
      const int64_t n = end - i < BENCH_STAGE_ELEMS ? end - i : BENCH_STAGE_ELEMS;             \
      relu_backward_run_##S(y + i, dy + i, stage, n);                                          \
      bench_stream_store(g + i, stage, (size_t)n * sizeof(T));                                 \
    }                                                                                          \
  }

BENCH_ELEMENTWISE(float, f32)
BENCH_ELEMENTWISE(double, f64)
#undef BENCH_ELEMENTWISE

/* float16 and bfloat16 tensors, their bits in uint16_t. The add converts
 * both operands to float, adds and rounds the sum once to the tensor's type
 * (nearest even), as a framework's half-precision add. The ReLU and the
 * ReLU backward's gate work on the bits: a value is kept unless it is a
 * zero, or negative and not NaN, which is !(v <= 0) exactly. */
static BENCH_ALWAYS_INLINE float bf16_to_float(uint16_t b) { return fbn_bfloat16_to_float(b); }

static BENCH_ALWAYS_INLINE uint16_t bf16_from_float(float f) { return fbn_float_to_bfloat16(f); }

/* GCC's _Float16 converts with F16C instructions in the x86-64-v3 clones
 * (one rounding, nearest even, NaN quiet: the core rule); elsewhere the
 * core conversions (src/core/half.h). */
static BENCH_ALWAYS_INLINE float f16_to_float(uint16_t b) {
#ifdef __FLT16_MAX__
  _Float16 h;
  memcpy(&h, &b, sizeof h);
  return (float)h;
#else
  return fbn_half_to_float(b);
#endif
}

static BENCH_ALWAYS_INLINE uint16_t f16_from_float(float f) {
#ifdef __FLT16_MAX__
  const _Float16 h = (_Float16)f;
  uint16_t b;
  memcpy(&b, &h, sizeof b);
  return b;
#else
  return fbn_float_to_half(f);
#endif
}

/* Whether !(v <= 0) for the bits b of a 2-byte float whose infinity is
 * inf_bits: b in (0, +inf] or a NaN of either sign. */
#define BENCH_HALF_KEEP(b, inf_bits)                                                            \
  ((uint16_t)((b) - 1u) <= (uint16_t)((inf_bits) - 1u) || ((b) & 0x7fffu) > (inf_bits))

#define BENCH_ELEMENTWISE_HALF(S, INF)                                                           \
  BENCH_CLONES static void add_range_##S(uint16_t *restrict y, const uint16_t *restrict addend,\
                                         int64_t begin, int64_t end) {                         \
    BENCH_OMP(simd)                                                                            \
    for (int64_t i = begin; i < end; i++)                                                      \
      y[i] = S##_from_float(S##_to_float(y[i]) + S##_to_float(addend[i]));                     \
  }                                                                                            \
  BENCH_CLONES static void relu_range_##S(uint16_t *restrict y, int64_t begin, int64_t end) {  \
    BENCH_OMP(simd)                                                                            \
    for (int64_t i = begin; i < end; i++) {                                                    \
      const uint16_t v = y[i];                                                                 \
      y[i] = BENCH_HALF_KEEP(v, INF) ? v : (uint16_t)0;                                        \
    }                                                                                          \
  }                                                                                            \
  static BENCH_ALWAYS_INLINE void relu_backward_run_##S(                                       \
      const uint16_t *restrict y, const uint16_t *restrict dy, uint16_t *restrict g, int64_t n) { \
    BENCH_OMP(simd)                                                                            \
    for (int64_t i = 0; i < n; i++)                                                            \
      g[i] = BENCH_HALF_KEEP(y[i], INF) ? dy[i] : (uint16_t)0;                                 \
  }                                                                                            \
  BENCH_CLONES static void relu_backward_range_##S(const uint16_t *restrict y,                 \
                                                   const uint16_t *restrict dy,                \
                                                   uint16_t *restrict g, int64_t begin,        \
                                                   int64_t end, bool stream) {                 \
    if (!stream) {                                                                             \
      relu_backward_run_##S(y + begin, dy + begin, g + begin, end - begin);                   \
      return;                                                                                  \
    }                                                                                          \
    uint16_t stage[BENCH_STAGE_ELEMS];                                                         \
    for (int64_t i = begin; i < end; i += BENCH_STAGE_ELEMS) {                                 \
      const int64_t n = end - i < BENCH_STAGE_ELEMS ? end - i : BENCH_STAGE_ELEMS;             \
      relu_backward_run_##S(y + i, dy + i, stage, n);                                          \
      bench_stream_store(g + i, stage, (size_t)n * sizeof(uint16_t));                          \
    }                                                                                          \
  }

/* clang reports `omp simd` loops it leaves scalar (the half-precision gates'
 * selects) as errors under -Werror; they are correct either way. */
#if defined(__clang__)
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wpass-failed"
#endif
BENCH_ELEMENTWISE_HALF(f16, 0x7c00u)
BENCH_ELEMENTWISE_HALF(bf16, 0x7f80u)
#if defined(__clang__)
#pragma clang diagnostic pop
#endif
#undef BENCH_ELEMENTWISE_HALF

static void *alloc_channels(const bench_unfused_cpu *u, double value) {
  const int64_t c = u->shape.c;
  void *p = bench_alloc_touched((size_t)c * fbn_dtype_size(u->param_dtype));
  for (int64_t i = 0; i < c; i++) {
    if (u->param_dtype == FBN_DTYPE_FLOAT64) {
      ((double *)p)[i] = value;
    } else {
      ((float *)p)[i] = (float)value;
    }
  }
  return p;
}

static size_t max_size(size_t a, size_t b) { return a > b ? a : b; }

/* One BN-alone op (statistics as given) with its workspace needs folded
 * into u. */
static int create_bn_op(bench_unfused_cpu *u, fbn_statistics statistics, fbn_op **out) {
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = u->shape.c;
  od.dtype = u->desc.dtype;
  od.param_dtype = u->param_dtype;
  od.layout = u->desc.layout;
  od.device = FBN_DEVICE_CPU;
  od.operation = FBN_OPERATION_BN;
  od.statistics = statistics;
  fbn_status st = fbn_op_create(&od, out);
  if (st != FBN_STATUS_SUCCESS) {
    return bench_fail_status("fbn_op_create (BN alone)", st);
  }
  size_t fwd = 0, bwd = 0;
  if ((st = fbn_op_forward_workspace_size(*out, &u->desc, &fwd)) != FBN_STATUS_SUCCESS ||
      (st = fbn_op_backward_workspace_size(*out, &u->desc, &bwd)) != FBN_STATUS_SUCCESS) {
    return bench_fail_status("fbn_op_*_workspace_size (BN alone)", st);
  }
  u->workspace_bytes = max_size(u->workspace_bytes, max_size(fwd, bwd));
  return 0;
}

int bench_unfused_cpu_init(bench_unfused_cpu *u, const bench_shape *shape, fbn_dtype dtype,
                           fbn_layout layout) {
  memset(u, 0, sizeof *u);
  u->shape = *shape;
  u->desc = fbn_tensor_desc_make(shape->n, shape->c, shape->h, shape->w, dtype, layout);
  u->param_dtype = dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  u->momentum = 0.1;
  int rc = create_bn_op(u, FBN_STATISTICS_BATCH, &u->train_op);
  if (rc == 0) {
    rc = create_bn_op(u, FBN_STATISTICS_RUNNING, &u->eval_op);
  }
  if (rc != 0) {
    return rc;
  }
  const fbn_status st = fbn_op_saved_size(u->train_op, &u->desc, &u->saved_bytes);
  if (st != FBN_STATUS_SUCCESS) {
    return bench_fail_status("fbn_op_saved_size (BN alone)", st);
  }
  u->saved = bench_alloc_touched(u->saved_bytes);
  u->workspace = u->workspace_bytes > 0 ? bench_alloc_touched(u->workspace_bytes) : NULL;
  u->weight = alloc_channels(u, 1.0);
  u->bias = alloc_channels(u, 0.0);
  u->running_mean = alloc_channels(u, 0.0);
  u->running_var = alloc_channels(u, 1.0);
  u->dweight = alloc_channels(u, 0.0);
  u->dbias = alloc_channels(u, 0.0);
  return 0;
}

void bench_unfused_cpu_fini(bench_unfused_cpu *u) {
  void *buffers[] = {u->weight,  u->bias,  u->running_mean, u->running_var,
                     u->dweight, u->dbias, u->saved,        u->workspace};
  for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) {
    bench_free(buffers[i]);
  }
  fbn_op_destroy(u->train_op);
  fbn_op_destroy(u->eval_op);
  memset(u, 0, sizeof *u);
}

fbn_status bench_unfused_cpu_bn_forward(bench_unfused_cpu *u, bool train, const void *x,
                                        void *y) {
  if (train) {
    return fbn_op_forward(u->train_op, &u->desc, x, NULL, y, u->weight, u->bias,
                          u->running_mean, u->running_var, u->momentum, u->saved, u->saved_bytes,
                          u->workspace, u->workspace_bytes);
  }
  return fbn_op_forward(u->eval_op, &u->desc, x, NULL, y, u->weight, u->bias, u->running_mean,
                        u->running_var, 0.0, NULL, 0, u->workspace, u->workspace_bytes);
}

fbn_status bench_unfused_cpu_bn_backward(bench_unfused_cpu *u, const void *x, const void *dy_bn,
                                         void *dx) {
  return fbn_op_backward(u->train_op, &u->desc, x, NULL, dy_bn, u->saved, u->saved_bytes,
                         u->weight, u->bias, dx, NULL, u->dweight, u->dbias,
                         FBN_PARAM_GRAD_ACCUMULATE, u->workspace, u->workspace_bytes);
}

fbn_status bench_unfused_cpu_forward(bench_unfused_cpu *u, fbn_operation op, bool train,
                                     const void *x, const void *addend, void *y) {
  const fbn_status st = bench_unfused_cpu_bn_forward(u, train, x, y);
  if (st != FBN_STATUS_SUCCESS) {
    return st;
  }
  const int64_t numel = bench_shape_numel(&u->shape);
  const int nt = bench_parallel_threads(numel);
  const bool add = op == FBN_OPERATION_BN_ADD_RELU;
  switch (u->desc.dtype) {
  case FBN_DTYPE_FLOAT32:
    if (add) {
      BENCH_PARALLEL_RANGE(nt, numel, add_range_f32(y, addend, begin, end));
    }
    BENCH_PARALLEL_RANGE(nt, numel, relu_range_f32(y, begin, end));
    break;
  case FBN_DTYPE_FLOAT64:
    if (add) {
      BENCH_PARALLEL_RANGE(nt, numel, add_range_f64(y, addend, begin, end));
    }
    BENCH_PARALLEL_RANGE(nt, numel, relu_range_f64(y, begin, end));
    break;
  case FBN_DTYPE_FLOAT16:
    if (add) {
      BENCH_PARALLEL_RANGE(nt, numel, add_range_f16(y, addend, begin, end));
    }
    BENCH_PARALLEL_RANGE(nt, numel, relu_range_f16(y, begin, end));
    break;
  case FBN_DTYPE_BFLOAT16:
    if (add) {
      BENCH_PARALLEL_RANGE(nt, numel, add_range_bf16(y, addend, begin, end));
    }
    BENCH_PARALLEL_RANGE(nt, numel, relu_range_bf16(y, begin, end));
    break;
  }
  return FBN_STATUS_SUCCESS;
}

fbn_status bench_unfused_cpu_backward(bench_unfused_cpu *u, const void *x, const void *y,
                                      const void *dy, void *dx, void *g) {
  const int64_t numel = bench_shape_numel(&u->shape);
  const int nt = bench_parallel_threads(numel);
  const bool stream = (size_t)numel * fbn_dtype_size(u->desc.dtype) >= BENCH_STREAM_MIN;
  switch (u->desc.dtype) {
  case FBN_DTYPE_FLOAT32:
    BENCH_PARALLEL_RANGE(nt, numel, relu_backward_range_f32(y, dy, g, begin, end, stream));
    break;
  case FBN_DTYPE_FLOAT64:
    BENCH_PARALLEL_RANGE(nt, numel, relu_backward_range_f64(y, dy, g, begin, end, stream));
    break;
  case FBN_DTYPE_FLOAT16:
    BENCH_PARALLEL_RANGE(nt, numel, relu_backward_range_f16(y, dy, g, begin, end, stream));
    break;
  case FBN_DTYPE_BFLOAT16:
    BENCH_PARALLEL_RANGE(nt, numel, relu_backward_range_bf16(y, dy, g, begin, end, stream));
    break;
  }
  return bench_unfused_cpu_bn_backward(u, x, g, dx);
}
