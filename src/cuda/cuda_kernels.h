/*
 * fusedbn's own CUDA kernels (cuda_kernels.cu), callable from C.
 *
 * Types: tensors (x, z, y, dy, dx, dz) are of shape->dtype.  Per-channel
 * parameter arrays (weight, bias, running stats, saved mean/invstd,
 * gradients) are double for float64 tensors and float otherwise, like the
 * module's param_dtype.  Coefficient arrays (workspace) use the same type.
 * Reduction partials are double.
 *
 * ReLU mask: bit (i % 32) of word i / 32 is !(y[i] <= 0) (set for NaN), i the element's offset
 * in memory (whatever the layout); fbn_k_mask_words() words.
 *
 * Every launcher queues work on `stream` and returns cudaGetLastError().
 */
#ifndef FUSEDBN_SRC_CUDA_CUDA_KERNELS_H
#define FUSEDBN_SRC_CUDA_CUDA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fbn_k_shape {
  int64_t n;
  int64_t c;
  int64_t hw;
  int nhwc;  /* 1: channels last */
  int dtype; /* fbn_dtype of the tensors */
} fbn_k_shape;

/* Coefficients per channel: forward (mean, scale, shift), backward (k,
 * mean, b, d); see bn_math.h. */
#define FBN_K_FWD_COEFS 3
#define FBN_K_BWD_COEFS 4

/* Slices of each channel's N*H*W values in the reduction kernels. */
__attribute__((visibility("hidden"))) int fbn_k_reduce_slices(const fbn_k_shape *s);
/* Bytes of the partial sums of one reduction (slices * C * 2 doubles). */
__attribute__((visibility("hidden"))) size_t fbn_k_partials_bytes(const fbn_k_shape *s);
/* 32-bit words of the ReLU mask. */
__attribute__((visibility("hidden"))) size_t fbn_k_mask_words(const fbn_k_shape *s);

/* dst[0..count) = value; dst is double (param_double) or float. */
__attribute__((visibility("hidden"))) cudaError_t
fbn_k_fill(void *dst, int param_double, int64_t count, double value, cudaStream_t stream);

/* ---- forward ------------------------------------------------------------- */

/* Partial sums of (x - k) and (x - k)^2 per channel and slice, k the
 * channel's shift (bn_math.h: fbn_bn_median3 of fbn_bn_shift_samples). */
__attribute__((visibility("hidden"))) cudaError_t
fbn_k_stats(const fbn_k_shape *s, const void *x, double *partials, cudaStream_t stream);

/* From the partials: batch mean, biased variance, invstd = 1/sqrt(var+eps);
 * running = (1-f) running + f batch (unbiased variance) when running_mean
 * is not NULL; save_mean/save_invstd when not NULL; forward coefficients
 * (mean, weight*invstd, bias) into coef. weight/bias NULL = 1/0. */
__attribute__((visibility("hidden"))) cudaError_t
fbn_k_stats_finalize(const fbn_k_shape *s, const void *x, const double *partials, double eps,
                     double factor, const void *weight, const void *bias, void *running_mean,
                     void *running_var, void *save_mean, void *save_invstd, void *coef,
                     cudaStream_t stream);

/* Eval: forward coefficients from the running statistics; save_mean /
 * save_invstd (may be NULL) receive running_mean and 1/sqrt(running_var+eps). */
__attribute__((visibility("hidden"))) cudaError_t
fbn_k_eval_prepare(const fbn_k_shape *s, double eps, const void *weight, const void *bias,
                   const void *running_mean, const void *running_var, void *save_mean,
                   void *save_invstd, void *coef, cudaStream_t stream);

/* y = ReLU((x - mean) * scale + shift + z) in one pass (z may be NULL),
 * NaN propagating; mask (may be NULL) receives !(y <= 0).  with_relu == 0
 * (BN alone): y = (x - mean) * scale + shift, z and mask NULL. */
__attribute__((visibility("hidden"))) cudaError_t
fbn_k_apply(const fbn_k_shape *s, const void *x, const void *z, void *y, uint32_t *mask,
            const void *coef, int with_relu, cudaStream_t stream);

/* y = ReLU(y + z) in place (z may be NULL), NaN propagating; mask (may be
 * NULL) receives !(y <= 0). */
__attribute__((visibility("hidden"))) cudaError_t
fbn_k_add_relu(const fbn_k_shape *s, void *y, const void *z, uint32_t *mask, cudaStream_t stream);

/* ---- backward ------------------------------------------------------------ */
/* The ReLU gate comes from mask when it is not NULL, else from !(y <= 0) (a
 * NaN y passes dy) when y is not NULL; with neither (BN alone: no ReLU) it
 * is open, g = dy. */

/* dz = dy * gate. */
__attribute__((visibility("hidden"))) cudaError_t
fbn_k_mask_grad(const fbn_k_shape *s, const void *dy, const uint32_t *mask, const void *y, void *dz,
                cudaStream_t stream);

/* Partial sums of g and g * (x - mean) * invstd, g = dy * gate. */
__attribute__((visibility("hidden"))) cudaError_t
fbn_k_grad_reduce(const fbn_k_shape *s, const void *x, const void *dy, const uint32_t *mask,
                  const void *y, const void *mean, const void *invstd, double *partials,
                  cudaStream_t stream);

/* Backward coefficients (k, mean, b, d) into coef; with partials (not
 * NULL) also dweight = sum(g xhat), dbias = sum(g) (accumulate != 0: +=)
 * when those are not NULL. partials may be NULL only when !batch_stats
 * (then b = d = 0). weight NULL = 1. */
__attribute__((visibility("hidden"))) cudaError_t
fbn_k_grad_finalize(const fbn_k_shape *s, const double *partials, int batch_stats,
                    const void *weight, const void *mean, const void *invstd, void *dweight,
                    void *dbias, int accumulate, void *coef, cudaStream_t stream);

/* dz = dy * gate (dz may be NULL); dx = k dz + b (x - mean) + d (dx may be
 * NULL). */
__attribute__((visibility("hidden"))) cudaError_t
fbn_k_grad_apply(const fbn_k_shape *s, const void *x, const void *dy, const uint32_t *mask,
                 const void *y, const void *coef, void *dx, void *dz, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* FUSEDBN_SRC_CUDA_CUDA_KERNELS_H */
