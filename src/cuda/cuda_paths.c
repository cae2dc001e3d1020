/* Path selection of the cuDNN backend (see cuda_paths.h and
 * docs/cuda-backend.md, whose table this function implements). */
#include "cuda_paths.h"

#include <stddef.h>

fbn_cuda_limits fbn_cuda_default_limits(void) {
  fbn_cuda_limits l = {
      .min_epsilon = 0.0,
      .max_dim = INT32_MAX,
      .max_train_n = 880801,
  };
  return l;
}

bool fbn_cuda_desc_fits_int(const fbn_tensor_desc *d, int64_t max_dim) {
  if (d->n > max_dim || d->c > max_dim || d->h > max_dim || d->w > max_dim)
    return false;
  int64_t numel;
  if (__builtin_mul_overflow(d->n, d->c, &numel) || __builtin_mul_overflow(numel, d->h, &numel) ||
      __builtin_mul_overflow(numel, d->w, &numel))
    return false;
  return numel <= max_dim;
}

const char *fbn_cuda_path_id_name(int path) {
  switch (path) {
  case FBN_CUDA_PATH_ID_FUSED: return "fused";
  case FBN_CUDA_PATH_ID_GENERAL: return "general";
  case FBN_CUDA_PATH_ID_KERNELS: return "kernels";
  case FBN_CUDA_PATH_ID_EVAL: return "eval";
  default: return "none";
  }
}

int fbn_cuda_fallback_path(int path) {
  switch (path) {
  case FBN_CUDA_PATH_ID_FUSED: return FBN_CUDA_PATH_ID_GENERAL;
  case FBN_CUDA_PATH_ID_GENERAL: return FBN_CUDA_PATH_ID_KERNELS;
  default: return FBN_CUDA_PATH_ID_NONE;
  }
}

static void set_why(const char **why, const char *text) {
  if (why != NULL)
    *why = text;
}

bool fbn_cuda_size_gated(const fbn_cuda_limits *limits, double eps, const fbn_tensor_desc *d) {
  return !fbn_cuda_desc_fits_int(d, limits->max_dim) || d->n > limits->max_train_n ||
         eps < limits->min_epsilon;
}

int fbn_cuda_select_path(const fbn_cuda_limits *limits, const fbn_cuda_refusals *refusals,
                         fbn_bn_mode mode, double eps, const fbn_tensor_desc *d, fbn_operation op,
                         bool batch_stats, const char **why) {
  const bool known_dtype = d->dtype == FBN_DTYPE_FLOAT32 || d->dtype == FBN_DTYPE_FLOAT64 ||
                           d->dtype == FBN_DTYPE_FLOAT16 || d->dtype == FBN_DTYPE_BFLOAT16;
  if (!known_dtype || (d->layout != FBN_LAYOUT_NCHW && d->layout != FBN_LAYOUT_NHWC) ||
      !fbn_operation_valid(op)) {
    set_why(why, "unknown dtype, layout or operation");
    return FBN_CUDA_PATH_ID_NONE;
  }
  if (!batch_stats) {
    set_why(why, "eval mode with running statistics: cuDNN has no fused inference op, "
                 "fusedbn's single-pass kernel");
    return FBN_CUDA_PATH_ID_EVAL;
  }
  if (!fbn_cuda_desc_fits_int(d, limits->max_dim)) {
    set_why(why, "a dimension or the element count exceeds cuDNN's int descriptors: "
                 "fusedbn's own training kernels");
    return FBN_CUDA_PATH_ID_KERNELS;
  }
  if (d->n > limits->max_train_n) {
    set_why(why, "N above the limit frameworks report for cuDNN's training batch norm: "
                 "fusedbn's own training kernels");
    return FBN_CUDA_PATH_ID_KERNELS;
  }
  if (eps < limits->min_epsilon) {
    set_why(why, "eps below CUDNN_BN_MIN_EPSILON: fusedbn's own training kernels");
    return FBN_CUDA_PATH_ID_KERNELS;
  }
  const int dt = (int)d->dtype;
  if (refusals != NULL && refusals->bn[dt]) {
    set_why(why, "cuDNN refused this dtype at run time: fusedbn's own training kernels");
    return FBN_CUDA_PATH_ID_KERNELS;
  }
  /* Measured on an H100 (cuDNN 9.19, docs/gpu-results.md): fusedbn's kernels
   * beat cuDNN's plain batch norm + add/ReLU by 2.5-15x in NHWC and on 9 of
   * 10 float32 NCHW ResNet-50 rows; for float16/bfloat16 NCHW each won on
   * some shapes, so cuDNN keeps those. */
  if (d->dtype == FBN_DTYPE_FLOAT32 || d->dtype == FBN_DTYPE_FLOAT64) {
    set_why(why, "float32/float64: no fused cuDNN op (documented for half only); fusedbn's own "
                 "training kernels, faster than cuDNN's plain batch norm + add/ReLU");
    return FBN_CUDA_PATH_ID_KERNELS;
  }
  if (d->layout != FBN_LAYOUT_NHWC) {
    set_why(why, "float16/bfloat16 NCHW: the fused kernel needs packed NHWC; cuDNN batch norm + "
                 "fusedbn's add/ReLU/mask kernel");
    return FBN_CUDA_PATH_ID_GENERAL;
  }
  if (mode == FBN_BN_MODE_SPATIAL) {
    set_why(why, "bn_mode = SPATIAL, NHWC: no persistent kernel; fusedbn's own training kernels "
                 "(cuDNN's SPATIAL NHWC batch norm is several times slower)");
    return FBN_CUDA_PATH_ID_KERNELS;
  }
  if (op == FBN_OPERATION_BN_ADD_RELU && d->c % 4 != 0) {
    set_why(why, "NHWC, C % 4 != 0 with an addend: CUDNN_BATCHNORM_OPS_BN_ADD_ACTIVATION needs "
                 "C % 4 == 0; fusedbn's own training kernels");
    return FBN_CUDA_PATH_ID_KERNELS;
  }
  if (refusals != NULL && refusals->fused[dt][(int)op][d->c % 4 == 0 ? 1 : 0]) {
    set_why(why, "cuDNN refused the fused op for this class at run time; fusedbn's own "
                 "training kernels");
    return FBN_CUDA_PATH_ID_KERNELS;
  }
  switch (op) {
  case FBN_OPERATION_BN_ADD_RELU:
    set_why(why, "NHWC float16/bfloat16, C % 4 == 0: cuDNN BN_ADD_ACTIVATION, SPATIAL_PERSISTENT");
    break;
  case FBN_OPERATION_BN_RELU:
    set_why(why, "NHWC float16/bfloat16: cuDNN BN_ACTIVATION, SPATIAL_PERSISTENT");
    break;
  default: set_why(why, "NHWC float16/bfloat16: cuDNN OPS_BN, SPATIAL_PERSISTENT"); break;
  }
  return FBN_CUDA_PATH_ID_FUSED;
}
