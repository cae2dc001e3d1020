/*
 * The one internal interface to cuDNN.  Only the engine implementations
 * (cudnn_legacy.c today; a graph-API engine later) include cudnn.h; the rest
 * of the backend sees opaque handles and int status codes.
 *
 * The engine reports errors as values (fbn_dnn_error: the cuDNN status and
 * the name of the call that failed) rather than through fbn_error(), so it
 * can be linked into the host-only tests on its own.
 *
 * Legacy engine (cudnn_legacy.c)
 *   FUSED    cudnnBatchNormalizationForwardTrainingEx / BackwardEx,
 *            SPATIAL_PERSISTENT, bnOps from the operation (OPS_BN,
 *            OPS_BN_ACTIVATION, OPS_BN_ADD_ACTIVATION), ReLU with
 *            CUDNN_PROPAGATE_NAN for the last two, workspace and reserve
 *            space sized by cuDNN's queries
 *   GENERAL  cudnnBatchNormalizationForwardTraining / Backward, SPATIAL
 *            (OPS_BN; the add/ReLU/mask work is the backend's kernels)
 *   QUERY    cudnnQueryRuntimeError: the FP overflow the persistent kernels'
 *            integer-atomic reductions report on the handle
 */
#ifndef FUSEDBN_SRC_CUDA_CUDNN_ENGINE_H
#define FUSEDBN_SRC_CUDA_CUDNN_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "core/core.h"
#include "cuda_paths.h"

/* Outcome of an engine call: code is the cudnnStatus_t (0 = success),
 * call the cuDNN function that returned it. */
typedef struct fbn_dnn_error {
  int code;
  const char *call;
} fbn_dnn_error;

static inline bool fbn_dnn_ok(fbn_dnn_error e) { return e.code == 0; }

/* cudnnGetErrorString(code). */
FBN_INTERNAL const char *fbn_dnn_status_string(int code);
/* "cudnnX returned CUDNN_STATUS_Y (cuDNN's last error text)" into buf. */
FBN_INTERNAL void fbn_dnn_describe(fbn_dnn_error e, char *buf, size_t size);
/* Status in CUDNN_STATUS_NOT_SUPPORTED's category. */
FBN_INTERNAL bool fbn_dnn_is_not_supported(fbn_dnn_error e);
/* Status in CUDNN_STATUS_BAD_PARAM's category. */
FBN_INTERNAL bool fbn_dnn_is_bad_param(fbn_dnn_error e);
/* cudnnGetVersion(). */
FBN_INTERNAL size_t fbn_dnn_version(void);
/* cuDNN's limits for path selection (CUDNN_BN_MIN_EPSILON, ...). */
FBN_INTERNAL fbn_cuda_limits fbn_dnn_limits(void);

/* ---- handles (opaque cudnnHandle_t) -------------------------------------- */

FBN_INTERNAL fbn_dnn_error fbn_dnn_create(void **handle);
FBN_INTERNAL void fbn_dnn_destroy(void *handle);
FBN_INTERNAL fbn_dnn_error fbn_dnn_get_stream(void *handle, cudaStream_t *stream);
FBN_INTERNAL fbn_dnn_error fbn_dnn_set_stream(void *handle, cudaStream_t stream);

/* ---- run-time errors of the persistent kernels ---------------------------- */

/* cudnnQueryRuntimeError on the handle's current stream: blocking
 * (CUDNN_ERRQUERY_BLOCKING: waits for the stream's work) or not
 * (CUDNN_ERRQUERY_NONBLOCKING: CUDNN_STATUS_RUNTIME_IN_PROGRESS while work is
 * queued).  *rstatus receives the kernels' status (0 = none since the last
 * query; a query that reads a result clears it); the return value is the
 * query's own outcome.  Needs a handle, so a GPU. */
FBN_INTERNAL fbn_dnn_error fbn_dnn_query_runtime_error(void *handle, bool blocking, int *rstatus);

/* What a cudnnQueryRuntimeError rstatus means to fusedbn: 0 ->
 * FBN_STATUS_SUCCESS, CUDNN_STATUS_RUNTIME_IN_PROGRESS ->
 * FBN_STATUS_INVALID_STATE (no answer yet, nothing cleared), anything else
 * (CUDNN_STATUS_RUNTIME_FP_OVERFLOW, ...) -> FBN_STATUS_DEVICE_ERROR. */
FBN_INTERNAL fbn_status fbn_dnn_runtime_status(int rstatus);

/* ---- descriptors of one configuration ------------------------------------ */

typedef struct fbn_dnn_plan {
  fbn_tensor_desc desc;
  int path; /* FBN_CUDA_PATH_ID_FUSED or _GENERAL */
  /* The operation the plan runs (BN_ADD_RELU: with an addend). GENERAL
   * plans are plain batch norm (OPS_BN) whatever the operation: the ReLU and
   * the addend are the backend's kernels there. */
  fbn_operation operation;
  int mode;    /* cudnnBatchNormMode_t */
  int bn_ops;  /* cudnnBatchNormOps_t */
  int data_type;  /* cudnnDataType_t of x, y, z, dy, dx, dz */
  int param_type; /* cudnnDataType_t of scale/bias/mean/var */
  /* cudnnTensorDescriptor_t for x (and y, z, dy, dx, dz: identical). */
  void *x_desc;
  /* cudnnTensorDescriptor_t 1xCx1x1 derived with cudnnDeriveBNTensorDescriptor. */
  void *bn_desc;
  /* cudnnActivationDescriptor_t: ReLU, CUDNN_PROPAGATE_NAN, coef 0 (FUSED
   * with a ReLU operation only, else NULL). */
  void *act_desc;
} fbn_dnn_plan;

/* Build the descriptors for desc on path (FUSED or GENERAL) and operation
 * (a valid fbn_operation). Needs no GPU.
 * On failure everything built is destroyed and *plan zeroed. A desc whose
 * dimensions do not fit int fails with CUDNN_STATUS_BAD_PARAM_OUT_OF_BOUND
 * and call "fbn_dnn_plan_init (int overflow)" without calling cuDNN. */
FBN_INTERNAL fbn_dnn_error fbn_dnn_plan_init(fbn_dnn_plan *plan, const fbn_tensor_desc *desc,
                                             int path, fbn_operation operation);
FBN_INTERNAL void fbn_dnn_plan_fini(fbn_dnn_plan *plan);

typedef struct fbn_dnn_sizes {
  size_t forward_workspace;
  size_t backward_workspace;
  size_t reserve;
} fbn_dnn_sizes;

/* cuDNN's workspace and reserve-space sizes for the plan (0 for GENERAL,
 * whose calls take none). Needs a handle, so a GPU. */
FBN_INTERNAL fbn_dnn_error fbn_dnn_plan_sizes(void *handle, const fbn_dnn_plan *plan,
                                              fbn_dnn_sizes *sizes);

typedef struct fbn_dnn_forward_args {
  const void *x;
  const void *z; /* FUSED BN_ADD_RELU only */
  void *y;
  const void *scale; /* never NULL: ones for affine == false */
  const void *bias;  /* never NULL: zeros for affine == false */
  double factor;
  void *running_mean; /* NULL: no running update */
  void *running_var;
  double epsilon;
  void *save_mean; /* both or neither */
  void *save_invstd;
  void *workspace; /* FUSED */
  size_t workspace_bytes;
  void *reserve; /* FUSED */
  size_t reserve_bytes;
} fbn_dnn_forward_args;

/* FUSED: y = BN(x), ReLU(BN(x)) or ReLU(BN(x) + z) by the plan's
 * operation; GENERAL: y = BN(x). Batch statistics. */
FBN_INTERNAL fbn_dnn_error fbn_dnn_forward_training(void *handle, const fbn_dnn_plan *plan,
                                                    const fbn_dnn_forward_args *args);

typedef struct fbn_dnn_backward_args {
  const void *x;
  const void *y;  /* FUSED with a ReLU: the forward's output (else unused) */
  const void *dy; /* FUSED: dL/dy; GENERAL: dL/d(BN output) (dy * mask with a ReLU) */
  void *dz;       /* FUSED BN_ADD_RELU: receives dL/dz */
  void *dx;
  const void *scale;
  const void *bias;
  void *dscale;
  void *dbias;
  bool accumulate; /* dscale/dbias += (true) or = (false) */
  double epsilon;
  const void *saved_mean;
  const void *saved_invstd;
  void *workspace;
  size_t workspace_bytes;
  void *reserve;
  size_t reserve_bytes;
} fbn_dnn_backward_args;

FBN_INTERNAL fbn_dnn_error fbn_dnn_backward(void *handle, const fbn_dnn_plan *plan,
                                            const fbn_dnn_backward_args *args);

#endif /* FUSEDBN_SRC_CUDA_CUDNN_ENGINE_H */
