/*
 * Legacy cuDNN engine: the cudnnBatchNormalization* calls of cuDNN 9 (marked
 * deprecated there, in favour of the graph API).  The only file of the
 * backend that includes cudnn.h.  See cudnn_engine.h.
 */
#include "cudnn_engine.h"

#include <stdio.h>
#include <string.h>

#include <cudnn.h>

#if CUDNN_MAJOR < 9
#  error "fusedbn's cuDNN engine needs cuDNN 9 or newer"
#endif

static fbn_dnn_error dnn_result(cudnnStatus_t status, const char *call) {
  fbn_dnn_error e = {(int)status, status == CUDNN_STATUS_SUCCESS ? NULL : call};
  return e;
}

#define DNN_TRY(expr)                                                                            \
  do {                                                                                           \
    cudnnStatus_t dnn_status_ = (expr);                                                          \
    if (dnn_status_ != CUDNN_STATUS_SUCCESS)                                                     \
      return dnn_result(dnn_status_, #expr);                                                     \
  } while (0)

/* Keep the name of the call without its arguments in messages. */
static const char *call_name(const char *expr, char *buf, size_t size) {
  size_t n = strcspn(expr, "(");
  if (n >= size)
    n = size - 1;
  memcpy(buf, expr, n);
  buf[n] = '\0';
  return buf;
}

const char *fbn_dnn_status_string(int code) { return cudnnGetErrorString((cudnnStatus_t)code); }

void fbn_dnn_describe(fbn_dnn_error e, char *buf, size_t size) {
  if (size == 0)
    return;
  char name[96];
  char last[256];
  last[0] = '\0';
  cudnnGetLastErrorString(last, sizeof last);
  const char *call = e.call != NULL ? call_name(e.call, name, sizeof name) : "cuDNN";
  if (last[0] != '\0')
    snprintf(buf, size, "%s returned %s (%d): %s", call, fbn_dnn_status_string(e.code), e.code,
             last);
  else
    snprintf(buf, size, "%s returned %s (%d)", call, fbn_dnn_status_string(e.code), e.code);
}

bool fbn_dnn_is_not_supported(fbn_dnn_error e) {
  return CUDNN_STATUS_CATEGORY(e.code) == CUDNN_STATUS_NOT_SUPPORTED;
}

bool fbn_dnn_is_bad_param(fbn_dnn_error e) {
  return CUDNN_STATUS_CATEGORY(e.code) == CUDNN_STATUS_BAD_PARAM;
}

size_t fbn_dnn_version(void) { return cudnnGetVersion(); }

fbn_cuda_limits fbn_dnn_limits(void) {
  fbn_cuda_limits l = fbn_cuda_default_limits();
  l.min_epsilon = CUDNN_BN_MIN_EPSILON;
  return l;
}

/* ---- handles ------------------------------------------------------------- */

fbn_dnn_error fbn_dnn_create(void **handle) {
  cudnnHandle_t h = NULL;
  *handle = NULL;
  DNN_TRY(cudnnCreate(&h));
  *handle = h;
  return dnn_result(CUDNN_STATUS_SUCCESS, NULL);
}

void fbn_dnn_destroy(void *handle) {
  if (handle != NULL)
    (void)cudnnDestroy((cudnnHandle_t)handle);
}

fbn_dnn_error fbn_dnn_get_stream(void *handle, cudaStream_t *stream) {
  DNN_TRY(cudnnGetStream((cudnnHandle_t)handle, stream));
  return dnn_result(CUDNN_STATUS_SUCCESS, NULL);
}

fbn_dnn_error fbn_dnn_set_stream(void *handle, cudaStream_t stream) {
  DNN_TRY(cudnnSetStream((cudnnHandle_t)handle, stream));
  return dnn_result(CUDNN_STATUS_SUCCESS, NULL);
}

/* ---- run-time errors ----------------------------------------------------- */

/* cudnnQueryRuntimeError is marked deprecated in cuDNN 9 together with the
 * legacy batch-norm calls whose persistent kernels it reports on; it stays
 * the only way to read their overflow flag.  The tag argument is NULL: cuDNN
 * then reports errors of any kind. */
fbn_dnn_error fbn_dnn_query_runtime_error(void *handle, bool blocking, int *rstatus) {
  cudnnStatus_t remote = CUDNN_STATUS_SUCCESS;
  *rstatus = 0;
  DNN_TRY(cudnnQueryRuntimeError((cudnnHandle_t)handle, &remote,
                                 blocking ? CUDNN_ERRQUERY_BLOCKING : CUDNN_ERRQUERY_NONBLOCKING,
                                 NULL));
  *rstatus = (int)remote;
  return dnn_result(CUDNN_STATUS_SUCCESS, NULL);
}

fbn_status fbn_dnn_runtime_status(int rstatus) {
  if (rstatus == (int)CUDNN_STATUS_SUCCESS)
    return FBN_STATUS_SUCCESS;
  if (rstatus == (int)CUDNN_STATUS_RUNTIME_IN_PROGRESS)
    return FBN_STATUS_INVALID_STATE;
  return FBN_STATUS_DEVICE_ERROR;
}

/* ---- descriptors --------------------------------------------------------- */

static cudnnDataType_t dnn_data_type(fbn_dtype dtype) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT64: return CUDNN_DATA_DOUBLE;
  case FBN_DTYPE_FLOAT16: return CUDNN_DATA_HALF;
  case FBN_DTYPE_BFLOAT16: return CUDNN_DATA_BFLOAT16;
  case FBN_DTYPE_FLOAT32:
  default: return CUDNN_DATA_FLOAT;
  }
}

void fbn_dnn_plan_fini(fbn_dnn_plan *plan) {
  if (plan == NULL)
    return;
  if (plan->x_desc != NULL)
    (void)cudnnDestroyTensorDescriptor((cudnnTensorDescriptor_t)plan->x_desc);
  if (plan->bn_desc != NULL)
    (void)cudnnDestroyTensorDescriptor((cudnnTensorDescriptor_t)plan->bn_desc);
  if (plan->act_desc != NULL)
    (void)cudnnDestroyActivationDescriptor((cudnnActivationDescriptor_t)plan->act_desc);
  memset(plan, 0, sizeof *plan);
}

static fbn_dnn_error plan_build(fbn_dnn_plan *plan, const fbn_tensor_desc *d) {
  cudnnTensorDescriptor_t x_desc = NULL, bn_desc = NULL;
  cudnnActivationDescriptor_t act_desc = NULL;

  DNN_TRY(cudnnCreateTensorDescriptor(&x_desc));
  plan->x_desc = x_desc;
  DNN_TRY(cudnnSetTensor4dDescriptor(
      x_desc, d->layout == FBN_LAYOUT_NHWC ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW,
      (cudnnDataType_t)plan->data_type, (int)d->n, (int)d->c, (int)d->h, (int)d->w));
  DNN_TRY(cudnnCreateTensorDescriptor(&bn_desc));
  plan->bn_desc = bn_desc;
  DNN_TRY(cudnnDeriveBNTensorDescriptor(bn_desc, x_desc, (cudnnBatchNormMode_t)plan->mode));

  cudnnDataType_t param_type;
  int pn, pc, ph, pw, sn, sc, sh, sw;
  DNN_TRY(cudnnGetTensor4dDescriptor(bn_desc, &param_type, &pn, &pc, &ph, &pw, &sn, &sc, &sh,
                                     &sw));
  plan->param_type = (int)param_type;

  if (plan->path == FBN_CUDA_PATH_ID_FUSED && fbn_operation_has_relu(plan->operation)) {
    DNN_TRY(cudnnCreateActivationDescriptor(&act_desc));
    plan->act_desc = act_desc;
    DNN_TRY(cudnnSetActivationDescriptor(act_desc, CUDNN_ACTIVATION_RELU, CUDNN_PROPAGATE_NAN,
                                         0.0));
  }
  return dnn_result(CUDNN_STATUS_SUCCESS, NULL);
}

static cudnnBatchNormOps_t dnn_bn_ops(fbn_operation op) {
  switch (op) {
  case FBN_OPERATION_BN_ADD_RELU: return CUDNN_BATCHNORM_OPS_BN_ADD_ACTIVATION;
  case FBN_OPERATION_BN_RELU: return CUDNN_BATCHNORM_OPS_BN_ACTIVATION;
  default: return CUDNN_BATCHNORM_OPS_BN;
  }
}

fbn_dnn_error fbn_dnn_plan_init(fbn_dnn_plan *plan, const fbn_tensor_desc *desc, int path,
                                fbn_operation operation) {
  memset(plan, 0, sizeof *plan);
  if (path != FBN_CUDA_PATH_ID_FUSED && path != FBN_CUDA_PATH_ID_GENERAL)
    return dnn_result(CUDNN_STATUS_BAD_PARAM, "fbn_dnn_plan_init (path is not a cuDNN path)");
  if (!fbn_operation_valid(operation))
    return dnn_result(CUDNN_STATUS_BAD_PARAM, "fbn_dnn_plan_init (unknown operation)");
  if (!fbn_cuda_desc_fits_int(desc, INT32_MAX))
    return dnn_result(CUDNN_STATUS_BAD_PARAM_OUT_OF_BOUND, "fbn_dnn_plan_init (int overflow)");
  plan->desc = *desc;
  plan->path = path;
  plan->operation = operation;
  plan->data_type = (int)dnn_data_type(desc->dtype);
  if (path == FBN_CUDA_PATH_ID_FUSED) {
    plan->mode = (int)CUDNN_BATCHNORM_SPATIAL_PERSISTENT;
    plan->bn_ops = (int)dnn_bn_ops(operation);
  } else {
    plan->mode = (int)CUDNN_BATCHNORM_SPATIAL;
    plan->bn_ops = (int)CUDNN_BATCHNORM_OPS_BN;
  }
  fbn_dnn_error e = plan_build(plan, desc);
  if (!fbn_dnn_ok(e))
    fbn_dnn_plan_fini(plan);
  return e;
}

fbn_dnn_error fbn_dnn_plan_sizes(void *handle, const fbn_dnn_plan *plan, fbn_dnn_sizes *sizes) {
  memset(sizes, 0, sizeof *sizes);
  if (plan->path != FBN_CUDA_PATH_ID_FUSED)
    return dnn_result(CUDNN_STATUS_SUCCESS, NULL);
  cudnnHandle_t h = (cudnnHandle_t)handle;
  const cudnnBatchNormMode_t mode = (cudnnBatchNormMode_t)plan->mode;
  const cudnnBatchNormOps_t ops = (cudnnBatchNormOps_t)plan->bn_ops;
  cudnnTensorDescriptor_t x = (cudnnTensorDescriptor_t)plan->x_desc;
  cudnnTensorDescriptor_t z = plan->operation == FBN_OPERATION_BN_ADD_RELU ? x : NULL;
  cudnnTensorDescriptor_t bn = (cudnnTensorDescriptor_t)plan->bn_desc;
  cudnnActivationDescriptor_t act = (cudnnActivationDescriptor_t)plan->act_desc;
  DNN_TRY(cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize(h, mode, ops, x, z, x, bn, act,
                                                                   &sizes->forward_workspace));
  DNN_TRY(cudnnGetBatchNormalizationBackwardExWorkspaceSize(h, mode, ops, x, x, x, z, x, bn, act,
                                                            &sizes->backward_workspace));
  DNN_TRY(cudnnGetBatchNormalizationTrainingExReserveSpaceSize(h, mode, ops, act, x,
                                                               &sizes->reserve));
  return dnn_result(CUDNN_STATUS_SUCCESS, NULL);
}

/* ---- execution ----------------------------------------------------------- */

/* alpha/beta are host values: double for double tensors, float otherwise. */
typedef union dnn_scalar {
  float f;
  double d;
} dnn_scalar;

static dnn_scalar dnn_scalar_make(const fbn_dnn_plan *plan, double v) {
  dnn_scalar s;
  if (plan->data_type == (int)CUDNN_DATA_DOUBLE)
    s.d = v;
  else
    s.f = (float)v;
  return s;
}

fbn_dnn_error fbn_dnn_forward_training(void *handle, const fbn_dnn_plan *plan,
                                       const fbn_dnn_forward_args *a) {
  cudnnHandle_t h = (cudnnHandle_t)handle;
  const cudnnBatchNormMode_t mode = (cudnnBatchNormMode_t)plan->mode;
  cudnnTensorDescriptor_t x = (cudnnTensorDescriptor_t)plan->x_desc;
  cudnnTensorDescriptor_t bn = (cudnnTensorDescriptor_t)plan->bn_desc;
  const dnn_scalar one = dnn_scalar_make(plan, 1.0), zero = dnn_scalar_make(plan, 0.0);
  if (plan->path == FBN_CUDA_PATH_ID_FUSED) {
    const bool addend = plan->operation == FBN_OPERATION_BN_ADD_RELU;
    DNN_TRY(cudnnBatchNormalizationForwardTrainingEx(
        h, mode, (cudnnBatchNormOps_t)plan->bn_ops, &one, &zero, x, a->x, addend ? x : NULL,
        addend ? a->z : NULL, x, a->y, bn, a->scale, a->bias, a->factor, a->running_mean,
        a->running_var, a->epsilon, a->save_mean, a->save_invstd,
        (cudnnActivationDescriptor_t)plan->act_desc, a->workspace, a->workspace_bytes,
        a->reserve, a->reserve_bytes));
  } else {
    DNN_TRY(cudnnBatchNormalizationForwardTraining(
        h, mode, &one, &zero, x, a->x, x, a->y, bn, a->scale, a->bias, a->factor,
        a->running_mean, a->running_var, a->epsilon, a->save_mean, a->save_invstd));
  }
  return dnn_result(CUDNN_STATUS_SUCCESS, NULL);
}

fbn_dnn_error fbn_dnn_backward(void *handle, const fbn_dnn_plan *plan,
                               const fbn_dnn_backward_args *a) {
  cudnnHandle_t h = (cudnnHandle_t)handle;
  const cudnnBatchNormMode_t mode = (cudnnBatchNormMode_t)plan->mode;
  cudnnTensorDescriptor_t x = (cudnnTensorDescriptor_t)plan->x_desc;
  cudnnTensorDescriptor_t bn = (cudnnTensorDescriptor_t)plan->bn_desc;
  const dnn_scalar one = dnn_scalar_make(plan, 1.0), zero = dnn_scalar_make(plan, 0.0);
  const dnn_scalar *beta_param = a->accumulate ? &one : &zero;
  if (plan->path == FBN_CUDA_PATH_ID_FUSED) {
    /* BN alone needs no y (nor bias: "needed if there is activation"). */
    const bool addend = plan->operation == FBN_OPERATION_BN_ADD_RELU;
    const bool relu = fbn_operation_has_relu(plan->operation);
    DNN_TRY(cudnnBatchNormalizationBackwardEx(
        h, mode, (cudnnBatchNormOps_t)plan->bn_ops, &one, &zero, &one, beta_param, x, a->x,
        relu ? x : NULL, relu ? a->y : NULL, x, a->dy, addend ? x : NULL, addend ? a->dz : NULL,
        x, a->dx, bn, a->scale, a->bias,
        a->dscale, a->dbias, a->epsilon, a->saved_mean, a->saved_invstd,
        (cudnnActivationDescriptor_t)plan->act_desc, a->workspace, a->workspace_bytes,
        a->reserve, a->reserve_bytes));
  } else {
    DNN_TRY(cudnnBatchNormalizationBackward(h, mode, &one, &zero, &one, beta_param, x, a->x, x,
                                            a->dy, x, a->dx, bn, a->scale, a->dscale, a->dbias,
                                            a->epsilon, a->saved_mean, a->saved_invstd));
  }
  return dnn_result(CUDNN_STATUS_SUCCESS, NULL);
}
