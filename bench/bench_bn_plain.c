/*
 * fusedbn-bench: the unfused baseline's BN step, plain C (bench_bn_plain in
 * bench_unfused_cpu.h). Training: one statistics pass over x (float64 sums
 * shifted by the channel's first element: per-thread partial sums over
 * contiguous ranges of rows, combined in thread order), then one normalize
 * pass y = x * scale[c] + shift[c]. Eval: the normalize pass. Backward: one
 * reduction pass (sum g, sum g * (x - mean), float64) and one dx pass.
 * Threads and loops as the library (bench_parallel.h); outputs of 8 MiB and
 * more written with non-temporal stores through a staging buffer.
 */
#include <math.h>
#include <string.h>

#include "bench_parallel.h"
#include "bench_unfused_cpu.h"

/* Rows of the kernels: (n, c) planes in NCHW, pixels in NHWC. */
static int64_t bench_bn_rows(const bench_unfused_cpu *u) {
  return u->layout == FBN_LAYOUT_NCHW ? u->shape.n * u->shape.c
                                      : u->shape.n * u->shape.h * u->shape.w;
}

/* Whether the passes write their output with non-temporal stores (outputs
 * of BENCH_STREAM_MIN bytes or more, as the library). */
static bool bench_bn_stream(const bench_unfused_cpu *u) {
  return (size_t)bench_shape_numel(&u->shape) * fbn_dtype_size(u->dtype) >= BENCH_STREAM_MIN;
}

/* Run CALL (using double *a, *b: this thread's partial sums of C each, and
 * begin, end: its rows) on every thread, then u->sum_a / u->sum_b = the
 * partial sums added in thread order. */
#define BP_REDUCE(u, CALL)                                                                      \
  do {                                                                                          \
    const int64_t c_ = (u)->shape.c;                                                            \
    const int nt_ = bench_parallel_threads(bench_shape_numel(&(u)->shape));                     \
    memset((u)->partial, 0, (size_t)nt_ * 2 * (size_t)c_ * sizeof(double));                     \
    BENCH_PARALLEL_RANGE(nt_, bench_bn_rows(u), {                                               \
      double *a = (u)->partial + (size_t)tid * 2 * (size_t)c_;                                  \
      double *b = a + c_;                                                                       \
      CALL;                                                                                     \
    });                                                                                         \
    for (int64_t ch_ = 0; ch_ < c_; ch_++) {                                                    \
      double sa = 0.0, sb = 0.0;                                                                \
      for (int t_ = 0; t_ < nt_; t_++) {                                                        \
        sa += (u)->partial[(size_t)t_ * 2 * (size_t)c_ + (size_t)ch_];                          \
        sb += (u)->partial[(size_t)t_ * 2 * (size_t)c_ + (size_t)(c_ + ch_)];                   \
      }                                                                                         \
      (u)->sum_a[ch_] = sa;                                                                     \
      (u)->sum_b[ch_] = sb;                                                                     \
    }                                                                                           \
  } while (0)

#define BP_CAT2(a, b) a##_##b
#define BP_CAT(a, b) BP_CAT2(a, b)

#define BP_T float
#define BP_FN(name) BP_CAT(name, f32)
#include "bench_bn_plain_tmpl.h"
#undef BP_T
#undef BP_FN

#define BP_T double
#define BP_FN(name) BP_CAT(name, f64)
#include "bench_bn_plain_tmpl.h"
#undef BP_T
#undef BP_FN

static void plain_train_forward(bench_unfused_cpu *u, const void *x, void *y) {
  if (u->dtype == FBN_DTYPE_FLOAT32)
    train_forward_f32(u, x, y);
  else
    train_forward_f64(u, x, y);
}

static void plain_eval_forward(bench_unfused_cpu *u, const void *x, void *y) {
  if (u->dtype == FBN_DTYPE_FLOAT32)
    eval_forward_f32(u, x, y);
  else
    eval_forward_f64(u, x, y);
}

static void plain_backward(bench_unfused_cpu *u, const void *x, const void *dy_bn, void *dx) {
  if (u->dtype == FBN_DTYPE_FLOAT32)
    backward_f32(u, x, dy_bn, dx);
  else
    backward_f64(u, x, dy_bn, dx);
}

const bench_bn_step bench_bn_plain = {
    .desc = "BN alone in plain C: one float64-accumulated statistics pass (shifted sums), one "
            "normalize pass with per-channel scale and shift",
    .train_forward = plain_train_forward,
    .eval_forward = plain_eval_forward,
    .backward = plain_backward,
};
