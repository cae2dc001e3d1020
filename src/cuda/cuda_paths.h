/*
 * Path selection of the cuDNN backend: a pure host function of the op
 * description (operation, bn_mode, eps), the tensor description, the
 * statistics and what the device refused at run time.  No CUDA or cuDNN
 * header needed: the limits come in as values (cudnn_engine.h provides
 * cuDNN's).
 */
#ifndef FUSEDBN_SRC_CUDA_CUDA_PATHS_H
#define FUSEDBN_SRC_CUDA_CUDA_PATHS_H

#include <stdbool.h>
#include <stdint.h>

#include "fusedbn/fusedbn.h"
#include "core/core.h"

/* Mirrors fbn_cuda_path of fusedbn_cuda.h (kept equal by a static assert in
 * src/api/cuda_api.c) so this header stays free of CUDA types. */
enum {
  FBN_CUDA_PATH_ID_NONE = 0,
  FBN_CUDA_PATH_ID_FUSED = 1,
  FBN_CUDA_PATH_ID_GENERAL = 2,
  FBN_CUDA_PATH_ID_KERNELS = 3,
  FBN_CUDA_PATH_ID_EVAL = 4,
};

/* Limits of the cuDNN legacy batch-norm calls. */
typedef struct fbn_cuda_limits {
  /* CUDNN_BN_MIN_EPSILON: smaller eps cannot go to cuDNN. */
  double min_epsilon;
  /* Descriptor dimensions and strides are int: every dimension and the
   * element count must be <= max_dim (INT32_MAX). */
  int64_t max_dim;
  /* Largest N frameworks run through cuDNN's training batch norm
   * (PyTorch: 880801). */
  int64_t max_train_n;
} fbn_cuda_limits;

/* The defaults above (min_epsilon 0, as cuDNN 9 defines it). */
FBN_INTERNAL fbn_cuda_limits fbn_cuda_default_limits(void);

/* What cuDNN refused on this device at run time. The fused op is tracked
 * per fbn_dtype, operation (cuDNN's bnOps: BN, BN_ACTIVATION,
 * BN_ADD_ACTIVATION) and whether C % 4 == 0, so one refused shape class
 * does not disable the others; plain batch norm per fbn_dtype. */
typedef struct fbn_cuda_refusals {
  bool fused[4][3][2]; /* [dtype][fbn_operation][C % 4 == 0] */
  bool bn[4];          /* plain cuDNN batch norm (OPS_BN, SPATIAL) */
} fbn_cuda_refusals;

/* The fused-refusal flag of desc / operation (a valid fbn_operation). */
static inline bool *fbn_cuda_fused_refusal(fbn_cuda_refusals *r, const fbn_tensor_desc *d,
                                           fbn_operation op) {
  return &r->fused[d->dtype][(int)op][d->c % 4 == 0 ? 1 : 0];
}

/* Whether a size or eps gate sends training to the kernels whatever the
 * table says (dimensions beyond int, N above the training limit, eps below
 * cuDNN's minimum). FBN_CUDA_FORCE_PATH does not override these. */
FBN_INTERNAL bool fbn_cuda_size_gated(const fbn_cuda_limits *limits, double eps,
                                      const fbn_tensor_desc *d);

/* Which path a forward of operation op takes (BN_ADD_RELU: with an
 * addend). refusals may be NULL (nothing refused). *why (may be NULL)
 * receives a static sentence for messages and docs. */
FBN_INTERNAL int fbn_cuda_select_path(const fbn_cuda_limits *limits,
                                      const fbn_cuda_refusals *refusals, fbn_bn_mode mode,
                                      double eps, const fbn_tensor_desc *desc, fbn_operation op,
                                      bool batch_stats, const char **why);

/* Where a training path falls back to when cuDNN refuses it at run time:
 * FUSED -> GENERAL -> KERNELS -> NONE (EVAL -> NONE). */
FBN_INTERNAL int fbn_cuda_fallback_path(int path);

/* true when cuDNN's descriptors can describe desc (int dims and strides). */
FBN_INTERNAL bool fbn_cuda_desc_fits_int(const fbn_tensor_desc *desc, int64_t max_dim);

FBN_INTERNAL const char *fbn_cuda_path_id_name(int path);

#endif /* FUSEDBN_SRC_CUDA_CUDA_PATHS_H */
