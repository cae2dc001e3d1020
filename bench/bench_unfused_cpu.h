/*
 * fusedbn-bench: the unfused CPU baseline, what a framework runs without
 * the fused operator, each step as good as the library's own code:
 *
 *   y = BN(x)          a BN step (bench_bn_step below)
 *   y += addend        an add pass
 *   y = ReLU(y)        a ReLU pass, exact: !(v <= 0) ? v : 0 (NaN kept)
 *
 * and backward: daddend = !(y <= 0) ? dy : 0 (a ReLU-backward pass; the add
 * passes the gradient to both of its inputs), then the BN step's backward
 * from daddend to dx. Each pass is one loop over memory, vectorizable and
 * threaded as the library (bench_parallel.h); outputs of BENCH_STREAM_MIN
 * bytes or more that are new tensors go out with non-temporal stores. The ratio fused / unfused is
 * then what fusing the three steps buys, not better code.
 *
 * The BN step is behind bench_bn_step so that it can be any BN-alone
 * implementation; bench_bn_plain (bench_bn_plain.c) is the one used: plain
 * C with float64-accumulated statistics in one pass (sums shifted by a
 * value of the channel), then a normalize pass with per-channel scale and
 * shift, both layouts.
 */
#ifndef FUSEDBN_BENCH_UNFUSED_CPU_H
#define FUSEDBN_BENCH_UNFUSED_CPU_H

#include "bench.h"

struct bench_bn_step;

typedef struct bench_unfused_cpu {
  bench_shape shape;
  fbn_dtype dtype; /* FLOAT32 or FLOAT64 */
  fbn_layout layout;
  double eps;
  double momentum;
  /* Per-channel float64 arrays (C each). */
  double *weight, *bias;
  double *running_mean, *running_var; /* momentum update; unbiased variance */
  double *save_mean, *save_invstd;    /* of the last training forward */
  double *weight_grad, *bias_grad;    /* accumulated by backward */
  double *shift;                      /* per-channel shift of the statistics */
  double *sum_a, *sum_b;              /* reduction results */
  /* Per-thread partial sums: threads * 2C doubles. */
  double *partial;
  int max_threads;
  /* Per-channel coefficients of the elementwise passes in the data type:
   * 3C elements of dtype. */
  void *coef;
  const struct bench_bn_step *bn;
} bench_unfused_cpu;

/* A BN-alone implementation on the state above. */
typedef struct bench_bn_step {
  const char *desc; /* what it is, for the report header */
  /* Batch statistics of x: save_mean/save_invstd, running stats updated,
   * y = (x - mean) * invstd * weight + bias. */
  void (*train_forward)(bench_unfused_cpu *u, const void *x, void *y);
  /* y = (x - running_mean) / sqrt(running_var + eps) * weight + bias. */
  void (*eval_forward)(bench_unfused_cpu *u, const void *x, void *y);
  /* Backward of the last train_forward from dy_bn (the gradient of its
   * output): dx; weight_grad and bias_grad accumulate. */
  void (*backward)(bench_unfused_cpu *u, const void *x, const void *dy_bn, void *dx);
} bench_bn_step;

extern const bench_bn_step bench_bn_plain;

/* dtype must be FLOAT32 or FLOAT64. Weight 1, bias 0, running mean 0,
 * running var 1, every buffer touched; bn: the BN step. */
void bench_unfused_cpu_init(bench_unfused_cpu *u, const bench_shape *shape, fbn_dtype dtype,
                            fbn_layout layout, const bench_bn_step *bn);
void bench_unfused_cpu_fini(bench_unfused_cpu *u);

/* y = ReLU(BN_train(x) + addend); updates running stats, saves mean/invstd. */
void bench_unfused_cpu_train_forward(bench_unfused_cpu *u, const void *x, const void *addend,
                                     void *y);
/* y = ReLU(BN_eval(x) + addend) with the running statistics. */
void bench_unfused_cpu_eval_forward(bench_unfused_cpu *u, const void *x, const void *addend,
                                    void *y);
/* Backward of the last train_forward: daddend = !(y <= 0) ? dy : 0, then dx
 * through the batch statistics; accumulates weight_grad / bias_grad. */
void bench_unfused_cpu_train_backward(bench_unfused_cpu *u, const void *x, const void *y,
                                      const void *dy, void *dx, void *daddend);

#endif /* FUSEDBN_BENCH_UNFUSED_CPU_H */
