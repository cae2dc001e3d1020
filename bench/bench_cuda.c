/*
 * fusedbn-bench: GPU mode (built only with the CUDA backend).
 *
 * For each shape and (dtype, layout), on one stream and one cuDNN handle:
 *   fused    a fusedbn CUDA module, bn_mode AUTO (the fused persistent cuDNN
 *            op where it applies), called through fbn_cuda_module_forward /
 *            backward with caller workspace and caller saved memory, as a
 *            framework would (no allocation, no synchronization inside);
 *   spatial  a second module with bn_mode SPATIAL (the opt-out of cuDNN's
 *            persistent kernel: fusedbn's own kernels in NHWC), timed only
 *            where AUTO takes the fused path;
 *   unfused  the cuDNN sequence a framework runs without the fusion:
 *            cudnnBatchNormalizationForwardTraining (SPATIAL_PERSISTENT for
 *            NHWC, as PyTorch picks, else SPATIAL; SPATIAL if cuDNN refuses
 *            persistent), cudnnOpTensor add, cudnnActivationForward ReLU in
 *            place; eval: cudnnBatchNormalizationForwardInference, add, ReLU;
 *            backward: cudnnActivationBackward, cudnnBatchNormalizationBackward.
 * CUDA events around each sample, the L2 cache flushed (memset of twice its
 * size) before every sample, warm-up, median. The copy bandwidth is a
 * device-to-device cudaMemcpy measured in the same run.
 */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>
#include <cudnn.h>

#include "bench.h"
#include "fusedbn/fusedbn_cuda.h"

/* Samples shorter than this time a batch of back-to-back calls. */
#define GPU_MIN_SAMPLE_MS 0.05
#define GPU_MAX_BATCH 1000

#define BN_EPS 1e-5
#define BN_MOMENTUM 0.1

static const float one_f = 1.0f, zero_f = 0.0f;
static const double one_d = 1.0, zero_d = 0.0;

/* ---- errors --------------------------------------------------------------- */

static int cuda_failed(const char *call, cudaError_t err, int line) {
  fprintf(stderr, "fusedbn-bench: %s failed (bench_cuda.c:%d): %s: %s\n", call, line,
          cudaGetErrorName(err), cudaGetErrorString(err));
  return 1;
}

static int cudnn_failed(const char *call, cudnnStatus_t st, int line) {
  fprintf(stderr, "fusedbn-bench: %s failed (bench_cuda.c:%d): %s\n", call, line,
          cudnnGetErrorString(st));
  return 1;
}

#define CUDA_CHECK(call)                                                                        \
  do {                                                                                          \
    const cudaError_t err_ = (call);                                                            \
    if (err_ != cudaSuccess) {                                                                  \
      return cuda_failed(#call, err_, __LINE__);                                                \
    }                                                                                           \
  } while (0)

#define CUDNN_CHECK(call)                                                                       \
  do {                                                                                          \
    const cudnnStatus_t st_ = (call);                                                           \
    if (st_ != CUDNN_STATUS_SUCCESS) {                                                          \
      return cudnn_failed(#call, st_, __LINE__);                                                \
    }                                                                                           \
  } while (0)

#define FBN_CHECK(call)                                                                         \
  do {                                                                                          \
    const fbn_status fst_ = (call);                                                             \
    if (fst_ != FBN_STATUS_SUCCESS) {                                                           \
      return bench_fail_status(#call, fst_);                                                    \
    }                                                                                           \
  } while (0)

/* ---- run-wide context ------------------------------------------------------ */

typedef struct gpu_ctx {
  cudaStream_t stream;
  cudnnHandle_t cudnn;
  fbn_cuda_exec exec;
  cudaEvent_t start, stop;
  void *flush; /* L2 flush buffer */
  size_t flush_bytes;
  unsigned flush_value;
  char device_desc[512];
} gpu_ctx;

/* ---- one (shape, dtype, layout) -------------------------------------------- */

typedef struct gpu_case {
  gpu_ctx *ctx;
  bench_shape shape;
  fbn_tensor_desc desc;
  int64_t numel;
  size_t tensor_bytes;
  char err[512]; /* why the last op failed */

  /* fusedbn */
  fbn_module *fused;
  fbn_module *spatial; /* bn_mode SPATIAL; NULL where AUTO does not take the fused path */
  fbn_saved *fused_saved, *spatial_saved;
  void *fused_saved_mem, *spatial_saved_mem;
  void *ws;
  size_t ws_bytes;

  /* tensors (device) */
  void *x, *addend, *dy;
  void *y, *dx, *daddend;             /* fused */
  void *y_sp, *dx_sp, *daddend_sp; /* spatial module */
  void *y_ref, *dx_ref, *daddend_ref; /* unfused */
  void *tmp;                          /* unfused: batch-norm output */
  void *host_a, *host_b;              /* host staging for checks */

  /* unfused cuDNN sequence */
  bool unfused_ok;      /* training forward and backward run */
  bool unfused_eval_ok; /* eval forward runs */
  char unfused_why[160];
  char unfused_eval_why[160];
  cudnnBatchNormMode_t train_mode;
  cudnnTensorDescriptor_t x_desc, bn_desc;
  cudnnOpTensorDescriptor_t add_desc;
  cudnnActivationDescriptor_t relu_desc;
  const void *one, *zero; /* host scaling factors of the data type */
  size_t bn_elem;
  void *bn_scale, *bn_bias, *bn_mean, *bn_var, *bn_save_mean, *bn_save_invvar;
  void *bn_dscale, *bn_dbias;
} gpu_case;

typedef int (*gpu_op)(gpu_case *k);

static int fbn_op_result(gpu_case *k, const char *call, fbn_status st) {
  if (st == FBN_STATUS_SUCCESS) {
    return 0;
  }
  snprintf(k->err, sizeof k->err, "%s: %s: %s", call, fbn_status_string(st),
           fbn_last_error_message());
  return 1;
}

static int cudnn_op_result(gpu_case *k, const char *call, cudnnStatus_t st) {
  if (st == CUDNN_STATUS_SUCCESS) {
    return 0;
  }
  snprintf(k->err, sizeof k->err, "%s: %s", call, cudnnGetErrorString(st));
  return 1;
}

/* ---- fusedbn operations ------------------------------------------------------ */

static int fused_forward_train(gpu_case *k) {
  return fbn_op_result(k, "fbn_cuda_module_forward",
                       fbn_cuda_module_forward(k->fused, &k->ctx->exec, &k->desc, k->x, k->addend,
                                               k->y, k->fused_saved, k->ws, k->ws_bytes));
}

static int fused_forward_eval(gpu_case *k) {
  return fbn_op_result(k, "fbn_cuda_module_forward",
                       fbn_cuda_module_forward(k->fused, &k->ctx->exec, &k->desc, k->x, k->addend,
                                               k->y, NULL, k->ws, k->ws_bytes));
}

static int fused_backward(gpu_case *k) {
  return fbn_op_result(k, "fbn_cuda_module_backward",
                       fbn_cuda_module_backward(k->fused, &k->ctx->exec, k->fused_saved, &k->desc,
                                                k->x, k->y, k->dy, k->dx, k->daddend, k->ws,
                                                k->ws_bytes));
}

static int spatial_forward_train(gpu_case *k) {
  return fbn_op_result(k, "fbn_cuda_module_forward",
                       fbn_cuda_module_forward(k->spatial, &k->ctx->exec, &k->desc, k->x,
                                               k->addend, k->y_sp, k->spatial_saved, k->ws,
                                               k->ws_bytes));
}

static int spatial_backward(gpu_case *k) {
  return fbn_op_result(k, "fbn_cuda_module_backward",
                       fbn_cuda_module_backward(k->spatial, &k->ctx->exec, k->spatial_saved,
                                                &k->desc, k->x, k->y_sp, k->dy, k->dx_sp,
                                                k->daddend_sp, k->ws, k->ws_bytes));
}

/* ---- the unfused cuDNN sequence ----------------------------------------------- */

static int unfused_forward_train(gpu_case *k) {
  cudnnHandle_t h = k->ctx->cudnn;
  cudnnStatus_t st = cudnnBatchNormalizationForwardTraining(
      h, k->train_mode, k->one, k->zero, k->x_desc, k->x, k->x_desc, k->tmp, k->bn_desc,
      k->bn_scale, k->bn_bias, BN_MOMENTUM, k->bn_mean, k->bn_var, BN_EPS, k->bn_save_mean,
      k->bn_save_invvar);
  if (st != CUDNN_STATUS_SUCCESS) {
    return cudnn_op_result(k, "cudnnBatchNormalizationForwardTraining", st);
  }
  st = cudnnOpTensor(h, k->add_desc, k->one, k->x_desc, k->tmp, k->one, k->x_desc, k->addend,
                     k->zero, k->x_desc, k->y_ref);
  if (st != CUDNN_STATUS_SUCCESS) {
    return cudnn_op_result(k, "cudnnOpTensor", st);
  }
  st = cudnnActivationForward(h, k->relu_desc, k->one, k->x_desc, k->y_ref, k->zero, k->x_desc,
                              k->y_ref);
  return cudnn_op_result(k, "cudnnActivationForward", st);
}

static int unfused_forward_eval(gpu_case *k) {
  cudnnHandle_t h = k->ctx->cudnn;
  cudnnStatus_t st = cudnnBatchNormalizationForwardInference(
      h, CUDNN_BATCHNORM_SPATIAL, k->one, k->zero, k->x_desc, k->x, k->x_desc, k->tmp,
      k->bn_desc, k->bn_scale, k->bn_bias, k->bn_mean, k->bn_var, BN_EPS);
  if (st != CUDNN_STATUS_SUCCESS) {
    return cudnn_op_result(k, "cudnnBatchNormalizationForwardInference", st);
  }
  st = cudnnOpTensor(h, k->add_desc, k->one, k->x_desc, k->tmp, k->one, k->x_desc, k->addend,
                     k->zero, k->x_desc, k->y_ref);
  if (st != CUDNN_STATUS_SUCCESS) {
    return cudnn_op_result(k, "cudnnOpTensor", st);
  }
  st = cudnnActivationForward(h, k->relu_desc, k->one, k->x_desc, k->y_ref, k->zero, k->x_desc,
                              k->y_ref);
  return cudnn_op_result(k, "cudnnActivationForward", st);
}

static int unfused_backward(gpu_case *k) {
  cudnnHandle_t h = k->ctx->cudnn;
  /* ReLU backward; the add hands the gradient to both of its inputs, so
   * this is daddend and the batch norm's output gradient. For ReLU, y > 0
   * exactly where its input > 0, so y stands in for the input. */
  cudnnStatus_t st =
      cudnnActivationBackward(h, k->relu_desc, k->one, k->x_desc, k->y_ref, k->x_desc, k->dy,
                              k->x_desc, k->y_ref, k->zero, k->x_desc, k->daddend_ref);
  if (st != CUDNN_STATUS_SUCCESS) {
    return cudnn_op_result(k, "cudnnActivationBackward", st);
  }
  st = cudnnBatchNormalizationBackward(h, k->train_mode, k->one, k->zero, k->one, k->zero,
                                       k->x_desc, k->x, k->x_desc, k->daddend_ref, k->x_desc,
                                       k->dx_ref, k->bn_desc, k->bn_scale, k->bn_dscale,
                                       k->bn_dbias, BN_EPS, k->bn_save_mean, k->bn_save_invvar);
  return cudnn_op_result(k, "cudnnBatchNormalizationBackward", st);
}

/* ---- timing ------------------------------------------------------------------- */

/* One sample: flush L2 (untimed), then `batch` calls between two events. */
static int time_sample(gpu_case *k, gpu_op op, int batch, double *ms) {
  gpu_ctx *g = k->ctx;
  if (g->flush != NULL) {
    CUDA_CHECK(cudaMemsetAsync(g->flush, (int)(g->flush_value++ & 0xff), g->flush_bytes,
                               g->stream));
  }
  CUDA_CHECK(cudaEventRecord(g->start, g->stream));
  for (int i = 0; i < batch; i++) {
    if (op(k) != 0) {
      fprintf(stderr, "fusedbn-bench: %s\n", k->err);
      return 1;
    }
  }
  CUDA_CHECK(cudaEventRecord(g->stop, g->stream));
  CUDA_CHECK(cudaEventSynchronize(g->stop));
  float elapsed = 0.0f;
  CUDA_CHECK(cudaEventElapsedTime(&elapsed, g->start, g->stop));
  *ms = (double)elapsed / batch;
  return 0;
}

typedef struct gpu_impl {
  gpu_op op;           /* NULL: not measured */
  bench_timing *out;
} gpu_impl;

/* Warm up every implementation, then interleave their samples. */
static int measure(const bench_config *cfg, gpu_case *k, gpu_impl *impls, int count) {
  double warm_ms[3] = {0.0, 0.0, 0.0};
  int batch[3] = {1, 1, 1};
  double total_s = 0.0;
  for (int w = 0; w < cfg->warmup; w++) {
    for (int i = 0; i < count; i++) {
      if (impls[i].op != NULL && time_sample(k, impls[i].op, 1, &warm_ms[i]) != 0) {
        return 1;
      }
    }
  }
  for (int i = 0; i < count; i++) {
    total_s += warm_ms[i] * 1e-3;
    if (warm_ms[i] > 0.0 && warm_ms[i] < GPU_MIN_SAMPLE_MS) {
      const double b = GPU_MIN_SAMPLE_MS / warm_ms[i];
      batch[i] = b > GPU_MAX_BATCH ? GPU_MAX_BATCH : (int)b + 1;
    }
  }
  const int reps = bench_choose_reps(cfg, total_s);
  double *samples = malloc((size_t)count * (size_t)reps * sizeof(double));
  if (samples == NULL) {
    fprintf(stderr, "fusedbn-bench: out of memory\n");
    return 1;
  }
  for (int r = 0; r < reps; r++) {
    for (int i = 0; i < count; i++) {
      if (impls[i].op != NULL &&
          time_sample(k, impls[i].op, batch[i], &samples[i * reps + r]) != 0) {
        free(samples);
        return 1;
      }
    }
  }
  for (int i = 0; i < count; i++) {
    if (impls[i].op != NULL) {
      bench_timing_from_samples(impls[i].out, samples + i * reps, reps);
    }
  }
  free(samples);
  return 0;
}

/* ---- setup ------------------------------------------------------------------ */

static cudnnDataType_t cudnn_dtype(fbn_dtype dtype) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT32:
    return CUDNN_DATA_FLOAT;
  case FBN_DTYPE_FLOAT64:
    return CUDNN_DATA_DOUBLE;
  case FBN_DTYPE_FLOAT16:
    return CUDNN_DATA_HALF;
  case FBN_DTYPE_BFLOAT16:
    return CUDNN_DATA_BFLOAT16;
  }
  return CUDNN_DATA_FLOAT;
}

static int dev_alloc(void **p, size_t bytes) {
  CUDA_CHECK(cudaMalloc(p, bytes > 0 ? bytes : 1));
  CUDA_CHECK(cudaMemset(*p, 0, bytes > 0 ? bytes : 1));
  return 0;
}

/* Random values of the case's dtype/layout into a device tensor. */
static int upload_random(gpu_case *k, void *dst, double offset, double scale, bench_rng *rng) {
  bench_fill_random(k->host_a, &k->shape, k->desc.dtype, k->desc.layout, offset, scale, rng);
  CUDA_CHECK(cudaMemcpy(dst, k->host_a, k->tensor_bytes, cudaMemcpyHostToDevice));
  return 0;
}

/* A per-channel device array of the BN parameter type filled with value. */
static int bn_array(gpu_case *k, void **p, double value) {
  const size_t c = (size_t)k->shape.c;
  void *host = malloc(c * k->bn_elem);
  if (host == NULL) {
    fprintf(stderr, "fusedbn-bench: out of memory\n");
    return 1;
  }
  for (size_t i = 0; i < c; i++) {
    if (k->bn_elem == sizeof(double)) {
      ((double *)host)[i] = value;
    } else {
      ((float *)host)[i] = (float)value;
    }
  }
  int rc = dev_alloc(p, c * k->bn_elem);
  if (rc == 0) {
    const cudaError_t err = cudaMemcpy(*p, host, c * k->bn_elem, cudaMemcpyHostToDevice);
    rc = err == cudaSuccess ? 0 : cuda_failed("cudaMemcpy", err, __LINE__);
  }
  free(host);
  return rc;
}

static int create_module(gpu_case *k, fbn_bn_mode mode, fbn_module **module, fbn_saved **saved,
                         void **saved_mem) {
  fbn_module_options opts;
  fbn_module_options_init(&opts);
  opts.num_features = k->shape.c;
  opts.param_dtype = k->desc.dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  opts.device = FBN_DEVICE_CUDA;
  opts.device_index = 0;
  opts.bn_mode = mode;
  FBN_CHECK(fbn_module_create(&opts, module));
  FBN_CHECK(fbn_saved_create(saved));
  /* Caller memory for the saved state and the workspace, sized for both
   * modes, so that timed calls neither allocate nor synchronize. */
  size_t saved_bytes = 0;
  for (int train = 1; train >= 0; train--) {
    size_t fwd = 0, bwd = 0, sv = 0;
    FBN_CHECK(fbn_module_set_training(*module, train != 0));
    FBN_CHECK(fbn_module_forward_workspace_size(*module, &k->desc, true, &fwd));
    FBN_CHECK(fbn_module_backward_workspace_size(*module, &k->desc, true, &bwd));
    FBN_CHECK(fbn_cuda_saved_size(*module, &k->desc, true, &sv));
    k->ws_bytes = fwd > k->ws_bytes ? fwd : k->ws_bytes;
    k->ws_bytes = bwd > k->ws_bytes ? bwd : k->ws_bytes;
    saved_bytes = sv > saved_bytes ? sv : saved_bytes;
  }
  FBN_CHECK(fbn_module_set_training(*module, true));
  if (dev_alloc(saved_mem, saved_bytes) != 0) {
    return 1;
  }
  FBN_CHECK(fbn_cuda_saved_set_memory(*saved, *saved_mem, saved_bytes > 0 ? saved_bytes : 1));
  return 0;
}

/* Descriptors and parameters of the unfused sequence, and one run of each
 * pass: sets unfused_ok / unfused_eval_ok, or the reason why not. */
static int unfused_init(gpu_case *k) {
  const bench_shape *s = &k->shape;
  const bool dbl = k->desc.dtype == FBN_DTYPE_FLOAT64;
  k->one = dbl ? (const void *)&one_d : (const void *)&one_f;
  k->zero = dbl ? (const void *)&zero_d : (const void *)&zero_f;
  k->bn_elem = dbl ? sizeof(double) : sizeof(float);
  if (s->n > INT_MAX || s->c > INT_MAX || s->h > INT_MAX || s->w > INT_MAX ||
      k->numel > INT_MAX) {
    snprintf(k->unfused_why, sizeof k->unfused_why, "unfused: dims exceed cuDNN's int range");
    snprintf(k->unfused_eval_why, sizeof k->unfused_eval_why, "%s", k->unfused_why);
    return 0;
  }
  CUDNN_CHECK(cudnnCreateTensorDescriptor(&k->x_desc));
  CUDNN_CHECK(cudnnCreateTensorDescriptor(&k->bn_desc));
  CUDNN_CHECK(cudnnCreateOpTensorDescriptor(&k->add_desc));
  CUDNN_CHECK(cudnnCreateActivationDescriptor(&k->relu_desc));
  CUDNN_CHECK(cudnnSetTensor4dDescriptor(
      k->x_desc, k->desc.layout == FBN_LAYOUT_NHWC ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW,
      cudnn_dtype(k->desc.dtype), (int)s->n, (int)s->c, (int)s->h, (int)s->w));
  CUDNN_CHECK(cudnnDeriveBNTensorDescriptor(k->bn_desc, k->x_desc, CUDNN_BATCHNORM_SPATIAL));
  CUDNN_CHECK(cudnnSetOpTensorDescriptor(k->add_desc, CUDNN_OP_TENSOR_ADD,
                                         dbl ? CUDNN_DATA_DOUBLE : CUDNN_DATA_FLOAT,
                                         CUDNN_PROPAGATE_NAN));
  CUDNN_CHECK(cudnnSetActivationDescriptor(k->relu_desc, CUDNN_ACTIVATION_RELU,
                                           CUDNN_PROPAGATE_NAN, 0.0));
  if (bn_array(k, &k->bn_scale, 1.0) || bn_array(k, &k->bn_bias, 0.0) ||
      bn_array(k, &k->bn_mean, 0.0) || bn_array(k, &k->bn_var, 1.0) ||
      bn_array(k, &k->bn_save_mean, 0.0) || bn_array(k, &k->bn_save_invvar, 1.0) ||
      bn_array(k, &k->bn_dscale, 0.0) || bn_array(k, &k->bn_dbias, 0.0)) {
    return 1;
  }

  if (unfused_forward_eval(k) == 0) {
    k->unfused_eval_ok = true;
  } else {
    snprintf(k->unfused_eval_why, sizeof k->unfused_eval_why, "unfused unavailable: %.120s",
             k->err);
    fprintf(stderr, "fusedbn-bench: %s\n", k->unfused_eval_why);
  }

  /* PyTorch's choice: SPATIAL_PERSISTENT for channels-last training. Fall
   * back to SPATIAL if cuDNN refuses it for this configuration. */
  k->train_mode = k->desc.layout == FBN_LAYOUT_NHWC ? CUDNN_BATCHNORM_SPATIAL_PERSISTENT
                                                    : CUDNN_BATCHNORM_SPATIAL;
  for (;;) {
    int rc = unfused_forward_train(k);
    if (rc == 0) {
      rc = unfused_backward(k);
    }
    if (rc == 0) {
      k->unfused_ok = true;
      break;
    }
    if (k->train_mode != CUDNN_BATCHNORM_SPATIAL_PERSISTENT) {
      snprintf(k->unfused_why, sizeof k->unfused_why, "unfused unavailable: %.120s", k->err);
      fprintf(stderr, "fusedbn-bench: %s\n", k->unfused_why);
      break;
    }
    k->train_mode = CUDNN_BATCHNORM_SPATIAL;
  }
  CUDA_CHECK(cudaStreamSynchronize(k->ctx->stream));
  return 0;
}

static int case_init(gpu_case *k, gpu_ctx *ctx, const bench_shape *shape,
                     const bench_variant *v) {
  memset(k, 0, sizeof *k);
  k->ctx = ctx;
  k->shape = *shape;
  k->desc = fbn_tensor_desc_make(shape->n, shape->c, shape->h, shape->w, v->dtype, v->layout);
  k->numel = bench_shape_numel(shape);
  k->tensor_bytes = (size_t)k->numel * fbn_dtype_size(v->dtype);

  k->host_a = malloc(k->tensor_bytes);
  k->host_b = malloc(k->tensor_bytes);
  if (k->host_a == NULL || k->host_b == NULL) {
    fprintf(stderr, "fusedbn-bench: out of host memory\n");
    return 1;
  }
  void **tensors[] = {&k->x,      &k->addend,      &k->dy,    &k->y,      &k->dx,
                      &k->daddend, &k->y_sp,      &k->dx_sp, &k->daddend_sp, &k->y_ref,
                      &k->dx_ref, &k->daddend_ref, &k->tmp};
  for (size_t i = 0; i < sizeof tensors / sizeof tensors[0]; i++) {
    if (dev_alloc(tensors[i], k->tensor_bytes) != 0) {
      return 1;
    }
  }
  bench_rng rng;
  bench_rng_seed(&rng, (uint64_t)(shape->n * 1000003 + shape->c * 1009 + shape->h * 31 + shape->w));
  if (upload_random(k, k->x, 2.0, 1.5, &rng) || upload_random(k, k->addend, 0.0, 1.0, &rng) ||
      upload_random(k, k->dy, 0.0, 1.0, &rng)) {
    return 1;
  }

  fbn_module_options opts;
  fbn_module_options_init(&opts);
  opts.num_features = shape->c;
  opts.param_dtype = v->dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  opts.device = FBN_DEVICE_CUDA;
  fbn_cuda_path auto_path = FBN_CUDA_PATH_NONE;
  FBN_CHECK(fbn_cuda_plan_path(&opts, &k->desc, true, true, &auto_path));
  if (create_module(k, FBN_BN_MODE_AUTO, &k->fused, &k->fused_saved, &k->fused_saved_mem) != 0) {
    return 1;
  }
  if (auto_path == FBN_CUDA_PATH_FUSED &&
      create_module(k, FBN_BN_MODE_SPATIAL, &k->spatial, &k->spatial_saved,
                    &k->spatial_saved_mem) != 0) {
    return 1;
  }
  if (k->ws_bytes > 0 && dev_alloc(&k->ws, k->ws_bytes) != 0) {
    return 1;
  }
  CUDA_CHECK(cudaDeviceSynchronize());
  return unfused_init(k);
}

static void case_fini(gpu_case *k) {
  void *device[] = {k->x,      k->addend,      k->dy,       k->y,       k->dx,
                    k->daddend, k->y_sp,      k->dx_sp,   k->daddend_sp, k->y_ref,
                    k->dx_ref, k->daddend_ref, k->tmp,      k->ws,      k->fused_saved_mem,
                    k->spatial_saved_mem, k->bn_scale, k->bn_bias, k->bn_mean, k->bn_var,
                    k->bn_save_mean, k->bn_save_invvar, k->bn_dscale, k->bn_dbias};
  for (size_t i = 0; i < sizeof device / sizeof device[0]; i++) {
    if (device[i] != NULL) {
      (void)cudaFree(device[i]);
    }
  }
  if (k->fused_saved != NULL) {
    fbn_saved_destroy(k->fused_saved);
  }
  if (k->spatial_saved != NULL) {
    fbn_saved_destroy(k->spatial_saved);
  }
  fbn_module_destroy(k->fused);
  fbn_module_destroy(k->spatial);
  if (k->x_desc != NULL) {
    (void)cudnnDestroyTensorDescriptor(k->x_desc);
  }
  if (k->bn_desc != NULL) {
    (void)cudnnDestroyTensorDescriptor(k->bn_desc);
  }
  if (k->add_desc != NULL) {
    (void)cudnnDestroyOpTensorDescriptor(k->add_desc);
  }
  if (k->relu_desc != NULL) {
    (void)cudnnDestroyActivationDescriptor(k->relu_desc);
  }
  free(k->host_a);
  free(k->host_b);
}

/* ---- agreement checks --------------------------------------------------------- */

/* NaN in every float format (all bits set). */
static int poison(gpu_case *k, void *dst) {
  CUDA_CHECK(cudaMemsetAsync(dst, 0xff, k->tensor_bytes, k->ctx->stream));
  return 0;
}

/* Max relative difference of two device tensors. */
static int device_diff(gpu_case *k, const void *a, const void *b, double *diff) {
  CUDA_CHECK(cudaStreamSynchronize(k->ctx->stream));
  CUDA_CHECK(cudaMemcpy(k->host_a, a, k->tensor_bytes, cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaMemcpy(k->host_b, b, k->tensor_bytes, cudaMemcpyDeviceToHost));
  *diff = bench_max_rel_diff(k->host_a, k->host_b, k->desc.dtype, k->numel);
  return 0;
}

static int run_op(gpu_case *k, gpu_op op) {
  if (op(k) != 0) {
    fprintf(stderr, "fusedbn-bench: %s\n", k->err);
    return 1;
  }
  return 0;
}

static void note_path(bench_row *row, const char *who, fbn_cuda_path path) {
  char text[48];
  snprintf(text, sizeof text, "%s %s", who, fbn_cuda_path_name(path));
  bench_note_append(row, text);
}

/* Eval: both sides normalize with the fused module's running statistics. */
static int sync_running_stats(gpu_case *k) {
  const size_t c = (size_t)k->shape.c;
  const fbn_dtype host_dtype = k->bn_elem == sizeof(double) ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  FBN_CHECK(fbn_module_read_buffer(k->fused, FBN_BUFFER_RUNNING_MEAN, host_dtype, k->host_a, c));
  CUDA_CHECK(cudaMemcpy(k->bn_mean, k->host_a, c * k->bn_elem, cudaMemcpyHostToDevice));
  FBN_CHECK(fbn_module_read_buffer(k->fused, FBN_BUFFER_RUNNING_VAR, host_dtype, k->host_a, c));
  CUDA_CHECK(cudaMemcpy(k->bn_var, k->host_a, c * k->bn_elem, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaDeviceSynchronize());
  return 0;
}

/* Run each implementation once on poisoned outputs and compare with the
 * unfused sequence; record the paths taken in the note. */
static int check_pass(gpu_case *k, bench_row *row) {
  double d = NAN;
  fbn_cuda_path path = FBN_CUDA_PATH_NONE;
  switch (row->pass) {
  case BENCH_PASS_TRAIN_FWD:
  case BENCH_PASS_EVAL_FWD: {
    const bool train = row->pass == BENCH_PASS_TRAIN_FWD;
    FBN_CHECK(fbn_cuda_module_path(k->fused, &k->desc, true, &path));
    note_path(row, "fused:", path);
    if (poison(k, k->y) || poison(k, k->y_ref) || poison(k, k->y_sp) ||
        run_op(k, train ? fused_forward_train : fused_forward_eval)) {
      return 1;
    }
    if (train ? k->unfused_ok : k->unfused_eval_ok) {
      if (run_op(k, train ? unfused_forward_train : unfused_forward_eval) ||
          device_diff(k, k->y, k->y_ref, &d)) {
        return 1;
      }
      (void)bench_note_agreement(row, "", d);
    }
    if (train && k->spatial != NULL) {
      FBN_CHECK(fbn_cuda_module_path(k->spatial, &k->desc, true, &path));
      note_path(row, "spatial:", path);
      if (run_op(k, spatial_forward_train)) {
        return 1;
      }
      if (k->unfused_ok) {
        if (device_diff(k, k->y_sp, k->y_ref, &d)) {
          return 1;
        }
        (void)bench_note_agreement(row, "spatial ", d);
      }
    }
    break;
  }
  case BENCH_PASS_TRAIN_BWD: {
    if (run_op(k, fused_forward_train) ||
        (k->spatial != NULL && run_op(k, spatial_forward_train)) ||
        (k->unfused_ok && run_op(k, unfused_forward_train))) {
      return 1;
    }
    FBN_CHECK(fbn_cuda_saved_path(k->fused_saved, &path));
    note_path(row, "fused:", path);
    if (poison(k, k->dx) || poison(k, k->daddend) || run_op(k, fused_backward)) {
      return 1;
    }
    if (k->unfused_ok) {
      /* Same ReLU mask on both sides: elements within rounding of 0 may be
       * positive in one forward and not in the other. */
      CUDA_CHECK(cudaMemcpyAsync(k->y_ref, k->y, k->tensor_bytes, cudaMemcpyDeviceToDevice,
                                 k->ctx->stream));
      double d2 = NAN;
      if (run_op(k, unfused_backward) || device_diff(k, k->dx, k->dx_ref, &d) ||
          device_diff(k, k->daddend, k->daddend_ref, &d2)) {
        return 1;
      }
      (void)bench_note_agreement(row, "", isnan(d) || isnan(d2) ? NAN : fmax(d, d2));
    }
    if (k->spatial != NULL) {
      FBN_CHECK(fbn_cuda_saved_path(k->spatial_saved, &path));
      note_path(row, "spatial:", path);
      if (poison(k, k->dx_sp) || poison(k, k->daddend_sp) || run_op(k, spatial_backward)) {
        return 1;
      }
      if (k->unfused_ok) {
        CUDA_CHECK(cudaMemcpyAsync(k->y_ref, k->y_sp, k->tensor_bytes, cudaMemcpyDeviceToDevice,
                                   k->ctx->stream));
        double d2 = NAN;
        if (run_op(k, unfused_backward) || device_diff(k, k->dx_sp, k->dx_ref, &d) ||
            device_diff(k, k->daddend_sp, k->daddend_ref, &d2)) {
          return 1;
        }
        (void)bench_note_agreement(row, "spatial ", isnan(d) || isnan(d2) ? NAN : fmax(d, d2));
      }
    }
    break;
  }
  case BENCH_PASS_COUNT:
    break;
  }
  CUDA_CHECK(cudaStreamSynchronize(k->ctx->stream));
  return 0;
}

static int run_case(const bench_config *cfg, const bench_report_info *info, gpu_ctx *ctx,
                    const bench_shape *shape, const bench_variant *v) {
  gpu_case k;
  int rc = case_init(&k, ctx, shape, v);
  for (int p = 0; rc == 0 && p < BENCH_PASS_COUNT; p++) {
    if (!cfg->passes[p]) {
      continue;
    }
    bench_row row;
    memset(&row, 0, sizeof row);
    row.shape = *shape;
    row.dtype = v->dtype;
    row.layout = v->layout;
    row.op = FBN_OPERATION_BN_ADD_RELU; /* the GPU mode's only operation */
    row.pass = (bench_pass)p;
    row.bytes = (double)bench_pass_tensors(row.op, row.pass) * (double)k.tensor_bytes;
    if (row.pass == BENCH_PASS_EVAL_FWD) {
      if (!k.unfused_eval_ok) {
        bench_note_append(&row, k.unfused_eval_why);
      }
    } else if (!k.unfused_ok) {
      bench_note_append(&row, k.unfused_why);
    } else {
      bench_note_append(&row, k.train_mode == CUDNN_BATCHNORM_SPATIAL_PERSISTENT
                                  ? "unfused: persistent"
                                  : "unfused: spatial");
    }

    const bool train = row.pass != BENCH_PASS_EVAL_FWD;
    const fbn_status st = fbn_module_set_training(k.fused, train);
    if (st != FBN_STATUS_SUCCESS) {
      rc = bench_fail_status("fbn_module_set_training", st);
      break;
    }
    if (!train && k.unfused_eval_ok && (rc = sync_running_stats(&k)) != 0) {
      break;
    }
    if ((rc = check_pass(&k, &row)) != 0) {
      break;
    }
    gpu_impl impls[3] = {
        {NULL, &row.fused}, {NULL, &row.unfused}, {NULL, &row.spatial}};
    switch (row.pass) {
    case BENCH_PASS_TRAIN_FWD:
      impls[0].op = fused_forward_train;
      impls[1].op = k.unfused_ok ? unfused_forward_train : NULL;
      impls[2].op = k.spatial != NULL ? spatial_forward_train : NULL;
      break;
    case BENCH_PASS_EVAL_FWD:
      impls[0].op = fused_forward_eval;
      impls[1].op = k.unfused_eval_ok ? unfused_forward_eval : NULL;
      break;
    case BENCH_PASS_TRAIN_BWD:
      impls[0].op = fused_backward;
      impls[1].op = k.unfused_ok ? unfused_backward : NULL;
      impls[2].op = k.spatial != NULL ? spatial_backward : NULL;
      break;
    case BENCH_PASS_COUNT:
      break;
    }
    if ((rc = measure(cfg, &k, impls, 3)) == 0) {
      bench_report_row(cfg, info, &row);
    }
  }
  case_fini(&k);
  return rc;
}

/* ---- device, copy bandwidth, entry points --------------------------------------- */

bool bench_cuda_available(char *why, size_t why_size) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    snprintf(why, why_size, "cudaGetDeviceCount: %s: %s", cudaGetErrorName(err),
             cudaGetErrorString(err));
    return false;
  }
  if (count == 0) {
    snprintf(why, why_size, "cudaGetDeviceCount: no CUDA device");
    return false;
  }
  /* The library must be able to use it too. */
  fbn_module_options opts;
  fbn_module_options_init(&opts);
  opts.num_features = 4;
  opts.device = FBN_DEVICE_CUDA;
  fbn_module *m = NULL;
  const fbn_status st = fbn_module_create(&opts, &m);
  if (st != FBN_STATUS_SUCCESS) {
    snprintf(why, why_size, "fbn_module_create(CUDA): %s: %s", fbn_status_string(st),
             fbn_last_error_message());
    return false;
  }
  fbn_module_destroy(m);
  return true;
}

/* Device-to-device cudaMemcpy; GB/s counts bytes read plus written. */
static int measure_copy(gpu_ctx *g, size_t bytes, int reps, double *gbps, char *desc,
                        size_t desc_size) {
  void *src = NULL, *dst = NULL;
  CUDA_CHECK(cudaMalloc(&src, bytes));
  CUDA_CHECK(cudaMalloc(&dst, bytes));
  CUDA_CHECK(cudaMemsetAsync(src, 0x3c, bytes, g->stream));
  double *samples = malloc((size_t)reps * sizeof(double));
  if (samples == NULL) {
    fprintf(stderr, "fusedbn-bench: out of memory\n");
    return 1;
  }
  for (int r = -2; r < reps; r++) { /* two warm-up copies */
    CUDA_CHECK(cudaEventRecord(g->start, g->stream));
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, g->stream));
    CUDA_CHECK(cudaEventRecord(g->stop, g->stream));
    CUDA_CHECK(cudaEventSynchronize(g->stop));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, g->start, g->stop));
    if (r >= 0) {
      samples[r] = ms;
    }
  }
  const double ms = bench_median(samples, reps);
  free(samples);
  CUDA_CHECK(cudaFree(src));
  CUDA_CHECK(cudaFree(dst));
  *gbps = 2.0 * (double)bytes / (ms * 1e-3) / 1e9;
  snprintf(desc, desc_size,
           "device-to-device cudaMemcpy of %zu MiB, read+write bytes, median of %d", bytes >> 20,
           reps);
  return 0;
}

static int ctx_init(gpu_ctx *g) {
  memset(g, 0, sizeof *g);
  CUDA_CHECK(cudaSetDevice(0));
  struct cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  /* A blocking stream: the synchronous setup copies (legacy default
   * stream) are ordered before the work queued on it. */
  CUDA_CHECK(cudaStreamCreate(&g->stream));
  CUDNN_CHECK(cudnnCreate(&g->cudnn));
  CUDNN_CHECK(cudnnSetStream(g->cudnn, g->stream));
  g->exec.stream = g->stream;
  g->exec.cudnn = g->cudnn;
  CUDA_CHECK(cudaEventCreate(&g->start));
  CUDA_CHECK(cudaEventCreate(&g->stop));
  g->flush_bytes = 2 * (size_t)(prop.l2CacheSize > 0 ? prop.l2CacheSize : 64 << 20);
  CUDA_CHECK(cudaMalloc(&g->flush, g->flush_bytes));
  int runtime = 0;
  CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
  const size_t cudnn_version = cudnnGetVersion();
  snprintf(g->device_desc, sizeof g->device_desc,
           "cuda: %.120s (sm_%d%d, %d SMs, %d MiB L2), CUDA runtime %d.%d, cuDNN %zu.%zu.%zu; "
           "one stream, L2 flushed before each sample",
           prop.name, prop.major, prop.minor, prop.multiProcessorCount, prop.l2CacheSize >> 20,
           runtime / 1000, runtime % 1000 / 10, cudnn_version / 10000, cudnn_version / 100 % 100,
           cudnn_version % 100);
  return 0;
}

static void ctx_fini(gpu_ctx *g) {
  if (g->flush != NULL) {
    (void)cudaFree(g->flush);
  }
  if (g->start != NULL) {
    (void)cudaEventDestroy(g->start);
  }
  if (g->stop != NULL) {
    (void)cudaEventDestroy(g->stop);
  }
  if (g->cudnn != NULL) {
    (void)cudnnDestroy(g->cudnn);
  }
  if (g->stream != NULL) {
    (void)cudaStreamDestroy(g->stream);
  }
}

int bench_run_cuda(const bench_config *cfg) {
  gpu_ctx ctx;
  int rc = ctx_init(&ctx);
  char copy_desc[160];
  bench_report_info info;
  info.device_desc = ctx.device_desc;
  info.baseline_desc =
      "cuDNN: cudnnBatchNormalizationForwardTraining (SPATIAL_PERSISTENT for NHWC as PyTorch, "
      "else SPATIAL) -> cudnnOpTensor add -> cudnnActivationForward ReLU; eval: "
      "cudnnBatchNormalizationForwardInference -> add -> ReLU; backward: "
      "cudnnActivationBackward -> cudnnBatchNormalizationBackward. spatial: fusedbn with "
      "bn_mode SPATIAL, no persistent kernel (only where the default takes the fused path)";
  info.copy_desc = copy_desc;
  info.copy_gbps = NAN;
  if (rc == 0) {
    rc = measure_copy(&ctx, cfg->quick ? (size_t)256 << 20 : (size_t)1 << 30, cfg->quick ? 10 : 20,
                      &info.copy_gbps, copy_desc, sizeof copy_desc);
  }
  if (rc == 0) {
    bench_report_begin(cfg, &info);
  }
  for (int s = 0; rc == 0 && s < cfg->num_shapes; s++) {
    for (int v = 0; rc == 0 && v < cfg->num_variants; v++) {
      rc = run_case(cfg, &info, &ctx, &cfg->shapes[s], &cfg->variants[v]);
    }
  }
  if (rc == 0) {
    bench_report_end(cfg);
  }
  ctx_fini(&ctx);
  return rc;
}
