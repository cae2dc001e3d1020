/*
 * fusedbn-bench: the unfused CPU baseline.
 *
 * What a framework does without the fused operator, written plainly: a
 * batch-norm pass (per-channel mean, then variance, each a loop over x;
 * then a normalizing loop writing a temporary tensor), an add pass
 * (y = tmp + addend) and a ReLU pass (in place on y), each a separate loop
 * over memory. Accumulation is in the data type (float for float32, as
 * frameworks do), with 8 partial sums so the compiler can vectorize the
 * reductions. Backward is likewise ReLU backward (daddend = dy * (y > 0)),
 * then the batch-norm backward: one reduction pass and one dx pass.
 * Each pass is parallelized with OpenMP like a framework's CPU operator,
 * with as many threads as the fusedbn CPU backend uses.
 */
#ifndef FUSEDBN_BENCH_UNFUSED_CPU_H
#define FUSEDBN_BENCH_UNFUSED_CPU_H

#include "bench.h"

typedef struct bench_unfused_cpu {
  bench_shape shape;
  fbn_dtype dtype; /* FLOAT32 or FLOAT64 */
  fbn_layout layout;
  double eps;
  double momentum;
  /* Per-channel arrays of dtype (C elements each). */
  void *weight;
  void *bias;
  void *running_mean;
  void *running_var;
  void *save_mean;
  void *save_invstd;
  void *weight_grad;
  void *bias_grad;
  void *acc_a; /* reduction scratch */
  void *acc_b;
  void *scale; /* folded per-channel coefficients */
  void *shift;
  void *offset;
  /* NHWC reductions: max_threads per-thread arrays of 2C partial sums. */
  void *partial;
  int max_threads;
  /* The batch-norm output, a full tensor (the "temp" between passes). */
  void *tmp;
} bench_unfused_cpu;

/* Below this many elements the baseline runs on one thread (PyTorch's
 * grain size for its CPU kernels is of this order). */
#define BENCH_PARALLEL_MIN 32768

/* Threads the baseline uses: the OpenMP default (OMP_NUM_THREADS or the
 * number of cores; 1 without OpenMP), the same the fusedbn CPU backend
 * uses. */
int bench_cpu_threads(void);

/* dtype must be FLOAT32 or FLOAT64. Weight 1, bias 0, running mean 0,
 * running var 1, every buffer touched. */
void bench_unfused_cpu_init(bench_unfused_cpu *u, const bench_shape *shape, fbn_dtype dtype,
                            fbn_layout layout);
void bench_unfused_cpu_fini(bench_unfused_cpu *u);

/* y = ReLU(BN_train(x) + addend); updates running stats, saves mean/invstd. */
void bench_unfused_cpu_train_forward(bench_unfused_cpu *u, const void *x, const void *addend,
                                     void *y);
/* y = ReLU(BN_eval(x) + addend) with the running statistics. */
void bench_unfused_cpu_eval_forward(bench_unfused_cpu *u, const void *x, const void *addend,
                                    void *y);
/* Backward of the last train_forward: daddend = dy*(y>0), dx through the
 * batch statistics; accumulates weight_grad / bias_grad. */
void bench_unfused_cpu_train_backward(bench_unfused_cpu *u, const void *x, const void *y,
                                      const void *dy, void *dx, void *daddend);

#endif /* FUSEDBN_BENCH_UNFUSED_CPU_H */
