/*
 * fusedbn-bench: the unfused CPU baseline (see bench_unfused_cpu.h).
 */
#include <math.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bench_unfused_cpu.h"

#define BENCH_STR(...) #__VA_ARGS__
#ifdef _OPENMP
#define BENCH_OMP(...) _Pragma(BENCH_STR(omp __VA_ARGS__))
#else
#define BENCH_OMP(...)
#endif

int bench_cpu_threads(void) {
#ifdef _OPENMP
  const int t = omp_get_max_threads();
  return t < 1 ? 1 : t;
#else
  return 1;
#endif
}

static inline int bench_thread_num(void) {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

static inline int bench_num_threads(void) {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

/* [begin, end) of this OpenMP thread in a static split of [0, total). */
static inline void bench_thread_range(int64_t total, int64_t *begin, int64_t *end) {
  const int64_t t = bench_thread_num(), n = bench_num_threads();
  *begin = total * t / n;
  *end = total * (t + 1) / n;
}

/* Run CALL, an expression using the int64_t variables `begin` and `end`,
 * over [0, total): inline when nt <= 1 (no OpenMP region at all), else
 * split statically over nt threads. */
#define BENCH_PARALLEL_RANGE(nt, total, CALL)                                                   \
  do {                                                                                          \
    const int64_t total_ = (total);                                                             \
    if ((nt) <= 1) {                                                                            \
      const int64_t begin = 0, end = total_;                                                    \
      CALL;                                                                                     \
    } else {                                                                                    \
      BENCH_OMP(parallel num_threads(nt))                                                       \
      {                                                                                         \
        int64_t begin, end;                                                                     \
        bench_thread_range(total_, &begin, &end);                                               \
        CALL;                                                                                   \
      }                                                                                         \
    }                                                                                           \
  } while (0)

/* Threads for one pass over this case's tensors. */
static inline int bench_unfused_threads(const bench_unfused_cpu *u) {
  return bench_shape_numel(&u->shape) < BENCH_PARALLEL_MIN ? 1 : u->max_threads;
}

#define BU_CAT2(a, b) a##_##b
#define BU_CAT(a, b) BU_CAT2(a, b)

#define BU_T float
#define BU_SQRT sqrtf
#define BU_FN(name) BU_CAT(name, f32)
#include "bench_unfused_cpu_tmpl.h"
#undef BU_T
#undef BU_SQRT
#undef BU_FN

#define BU_T double
#define BU_SQRT sqrt
#define BU_FN(name) BU_CAT(name, f64)
#include "bench_unfused_cpu_tmpl.h"
#undef BU_T
#undef BU_SQRT
#undef BU_FN

static void *alloc_channels(const bench_unfused_cpu *u, double value) {
  const size_t count = (size_t)u->shape.c;
  void *p = bench_alloc_touched(count * fbn_dtype_size(u->dtype));
  for (size_t i = 0; i < count; i++) {
    if (u->dtype == FBN_DTYPE_FLOAT32) {
      ((float *)p)[i] = (float)value;
    } else {
      ((double *)p)[i] = value;
    }
  }
  return p;
}

void bench_unfused_cpu_init(bench_unfused_cpu *u, const bench_shape *shape, fbn_dtype dtype,
                            fbn_layout layout) {
  u->shape = *shape;
  u->dtype = dtype;
  u->layout = layout;
  u->eps = 1e-5;
  u->momentum = 0.1;
  u->weight = alloc_channels(u, 1.0);
  u->bias = alloc_channels(u, 0.0);
  u->running_mean = alloc_channels(u, 0.0);
  u->running_var = alloc_channels(u, 1.0);
  u->save_mean = alloc_channels(u, 0.0);
  u->save_invstd = alloc_channels(u, 1.0);
  u->weight_grad = alloc_channels(u, 0.0);
  u->bias_grad = alloc_channels(u, 0.0);
  u->acc_a = alloc_channels(u, 0.0);
  u->acc_b = alloc_channels(u, 0.0);
  u->scale = alloc_channels(u, 0.0);
  u->shift = alloc_channels(u, 0.0);
  u->offset = alloc_channels(u, 0.0);
  u->max_threads = bench_cpu_threads();
  u->partial = bench_alloc_touched((size_t)u->max_threads * 2 * (size_t)shape->c *
                                   fbn_dtype_size(dtype));
  u->tmp = bench_alloc_touched((size_t)bench_shape_numel(shape) * fbn_dtype_size(dtype));
}

void bench_unfused_cpu_fini(bench_unfused_cpu *u) {
  void *buffers[] = {u->weight, u->bias,  u->running_mean, u->running_var, u->save_mean,
                     u->save_invstd, u->weight_grad, u->bias_grad, u->acc_a, u->acc_b,
                     u->scale, u->shift, u->offset, u->partial, u->tmp};
  for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) {
    bench_free(buffers[i]);
  }
}

void bench_unfused_cpu_train_forward(bench_unfused_cpu *u, const void *x, const void *addend,
                                     void *y) {
  if (u->dtype == FBN_DTYPE_FLOAT32) {
    train_forward_f32(u, x, addend, y);
  } else {
    train_forward_f64(u, x, addend, y);
  }
}

void bench_unfused_cpu_eval_forward(bench_unfused_cpu *u, const void *x, const void *addend,
                                    void *y) {
  if (u->dtype == FBN_DTYPE_FLOAT32) {
    eval_forward_f32(u, x, addend, y);
  } else {
    eval_forward_f64(u, x, addend, y);
  }
}

void bench_unfused_cpu_train_backward(bench_unfused_cpu *u, const void *x, const void *y,
                                      const void *dy, void *dx, void *daddend) {
  if (u->dtype == FBN_DTYPE_FLOAT32) {
    train_backward_f32(u, x, y, dy, dx, daddend);
  } else {
    train_backward_f64(u, x, y, dy, dx, daddend);
  }
}
