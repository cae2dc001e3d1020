/*
 * fusedbn-bench: the unfused CPU baseline's sequence and its elementwise
 * passes (see bench_unfused_cpu.h); the BN step is bench_bn_plain.c.
 */
#include <math.h>
#include <stdlib.h>

#include "bench_parallel.h"
#include "bench_unfused_cpu.h"

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

static double *alloc_channels(const bench_unfused_cpu *u, double value) {
  const size_t count = (size_t)u->shape.c;
  double *p = bench_alloc_touched(count * sizeof(double));
  for (size_t i = 0; i < count; i++)
    p[i] = value;
  return p;
}

void bench_unfused_cpu_init(bench_unfused_cpu *u, const bench_shape *shape, fbn_dtype dtype,
                            fbn_layout layout, const bench_bn_step *bn) {
  u->shape = *shape;
  u->dtype = dtype;
  u->layout = layout;
  u->eps = 1e-5;
  u->momentum = 0.1;
  u->bn = bn;
  u->weight = alloc_channels(u, 1.0);
  u->bias = alloc_channels(u, 0.0);
  u->running_mean = alloc_channels(u, 0.0);
  u->running_var = alloc_channels(u, 1.0);
  u->save_mean = alloc_channels(u, 0.0);
  u->save_invstd = alloc_channels(u, 1.0);
  u->weight_grad = alloc_channels(u, 0.0);
  u->bias_grad = alloc_channels(u, 0.0);
  u->shift = alloc_channels(u, 0.0);
  u->sum_a = alloc_channels(u, 0.0);
  u->sum_b = alloc_channels(u, 0.0);
  u->max_threads = bench_threads();
  u->partial = bench_alloc_touched((size_t)u->max_threads * 2 * (size_t)shape->c * sizeof(double));
  u->coef = bench_alloc_touched(3 * (size_t)shape->c * fbn_dtype_size(dtype));
}

void bench_unfused_cpu_fini(bench_unfused_cpu *u) {
  double *buffers[] = {u->weight,      u->bias,      u->running_mean, u->running_var,
                       u->save_mean,   u->save_invstd, u->weight_grad, u->bias_grad,
                       u->shift,       u->sum_a,     u->sum_b,        u->partial};
  for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++)
    bench_free(buffers[i]);
  bench_free(u->coef);
}

/* y += addend, then y = ReLU(y): two passes. */
static void add_then_relu(const bench_unfused_cpu *u, const void *addend, void *y) {
  const int64_t numel = bench_shape_numel(&u->shape);
  const int nt = bench_parallel_threads(numel);
  if (u->dtype == FBN_DTYPE_FLOAT32) {
    BENCH_PARALLEL_RANGE(nt, numel, add_range_f32(y, addend, begin, end));
    BENCH_PARALLEL_RANGE(nt, numel, relu_range_f32(y, begin, end));
  } else {
    BENCH_PARALLEL_RANGE(nt, numel, add_range_f64(y, addend, begin, end));
    BENCH_PARALLEL_RANGE(nt, numel, relu_range_f64(y, begin, end));
  }
}

void bench_unfused_cpu_train_forward(bench_unfused_cpu *u, const void *x, const void *addend,
                                     void *y) {
  u->bn->train_forward(u, x, y);
  add_then_relu(u, addend, y);
}

void bench_unfused_cpu_eval_forward(bench_unfused_cpu *u, const void *x, const void *addend,
                                    void *y) {
  u->bn->eval_forward(u, x, y);
  add_then_relu(u, addend, y);
}

void bench_unfused_cpu_train_backward(bench_unfused_cpu *u, const void *x, const void *y,
                                      const void *dy, void *dx, void *daddend) {
  const int64_t numel = bench_shape_numel(&u->shape);
  const int nt = bench_parallel_threads(numel);
  const bool stream = (size_t)numel * fbn_dtype_size(u->dtype) >= BENCH_STREAM_MIN;
  if (u->dtype == FBN_DTYPE_FLOAT32)
    BENCH_PARALLEL_RANGE(nt, numel, relu_backward_range_f32(y, dy, daddend, begin, end, stream));
  else
    BENCH_PARALLEL_RANGE(nt, numel, relu_backward_range_f64(y, dy, daddend, begin, end, stream));
  u->bn->backward(u, x, daddend, dx);
}
