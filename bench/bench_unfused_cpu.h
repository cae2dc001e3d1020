/*
 * fusedbn-bench: the unfused CPU baselines, what a framework runs without a
 * fused operator, with fusedbn's own BN alone (the op API with
 * FBN_OPERATION_BN, on the same CPU backend as the fused form) as the BN
 * step:
 *
 *   BN + add + ReLU   y = BN(x); y += addend (add pass); y = ReLU(y) (ReLU
 *                     pass, exact: !(v <= 0) ? v : 0, NaN kept)
 *                     backward: daddend = !(y <= 0) ? dy : 0 (ReLU-backward
 *                     pass; the add passes the gradient to both inputs),
 *                     then BN's backward from daddend to dx
 *   BN + ReLU         y = BN(x); y = ReLU(y)
 *                     backward: g = !(y <= 0) ? dy : 0 into a temporary
 *                     tensor, then BN's backward from g to dx
 *   BN alone          no unfused form (it is the BN step itself)
 *
 * Each elementwise pass is one loop over memory, vectorizable and threaded
 * as the library (bench_parallel.h); outputs of BENCH_STREAM_MIN bytes or
 * more that are new tensors go out with non-temporal stores. The ratio
 * fused / unfused is then what fusing the passes into the BN buys, with the
 * same BN code on both sides.
 */
#ifndef FUSEDBN_BENCH_UNFUSED_CPU_H
#define FUSEDBN_BENCH_UNFUSED_CPU_H

#include "bench.h"

typedef struct bench_unfused_cpu {
  bench_shape shape;
  fbn_tensor_desc desc; /* any dtype; parameters float64 for float64 tensors, else float32 */
  fbn_dtype param_dtype;
  double momentum;
  /* fusedbn BN alone: batch statistics (training) and running statistics
   * (eval). */
  fbn_op *train_op, *eval_op;
  /* Per-channel arrays in param_dtype (C each). */
  void *weight, *bias, *running_mean, *running_var, *dweight, *dbias;
  /* The training forward's saved state, and one workspace for every call. */
  void *saved, *workspace;
  size_t saved_bytes, workspace_bytes;
} bench_unfused_cpu;

/* Weight 1, bias 0, running mean 0, running var 1, every buffer touched.
 * Any dtype the CPU backend takes. Returns a process exit status (0, or 1
 * with the failing call printed). */
int bench_unfused_cpu_init(bench_unfused_cpu *u, const bench_shape *shape, fbn_dtype dtype,
                           fbn_layout layout);
void bench_unfused_cpu_fini(bench_unfused_cpu *u);

/* The BN step alone: y = BN_train(x) (running statistics updated, saved
 * state filled) or BN_eval(x). */
fbn_status bench_unfused_cpu_bn_forward(bench_unfused_cpu *u, bool train, const void *x, void *y);
/* Backward of the last training forward from dy_bn (the gradient of its
 * output): dx; dweight and dbias accumulate. */
fbn_status bench_unfused_cpu_bn_backward(bench_unfused_cpu *u, const void *x, const void *dy_bn,
                                         void *dx);

/* The unfused sequence of operation op (BN + ReLU or BN + add + ReLU;
 * addend NULL for BN + ReLU): y = ReLU(BN(x) [+ addend]). */
fbn_status bench_unfused_cpu_forward(bench_unfused_cpu *u, fbn_operation op, bool train,
                                     const void *x, const void *addend, void *y);
/* Backward of the last training forward: g = !(y <= 0) ? dy : 0 into g
 * (daddend of BN + add + ReLU, a temporary of BN + ReLU), then dx through
 * the batch statistics. */
fbn_status bench_unfused_cpu_backward(bench_unfused_cpu *u, const void *x, const void *y,
                                      const void *dy, void *dx, void *g);

#endif /* FUSEDBN_BENCH_UNFUSED_CPU_H */
