/*
 * The kernels of synchronized batch norm on the device
 * (cuda_sync_kernels.cu), callable from C.  Records, status blocks and the
 * check are those of cuda_sync_math.h.  Per-channel arrays (weight, bias,
 * running statistics, saved mean/invstd, gradients, coefficients) are of
 * the tensors' param type: double for float64 tensors, float otherwise (as
 * in cuda_kernels.h).  Every launcher queues work on `stream` and returns
 * cudaGetLastError(); none synchronizes.
 */
#ifndef FUSEDBN_SRC_CUDA_CUDA_SYNC_KERNELS_H
#define FUSEDBN_SRC_CUDA_CUDA_SYNC_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "cuda_kernels.h"
#include "cuda_sync_math.h"

#ifdef __cplusplus
extern "C" {
#endif

#define FBN_KS_HIDDEN __attribute__((visibility("hidden")))

/* Slices of each channel's N*H*W values in fbn_ks_moments(). */
FBN_KS_HIDDEN int fbn_ks_moment_slices(const fbn_k_shape *s);
/* Bytes of its partials: slices * C * 2 doubles. */
FBN_KS_HIDDEN size_t fbn_ks_moment_partials_bytes(const fbn_k_shape *s);

/* The statistics record of x (s->n >= 0) into record (64 + 16 C bytes,
 * 8-byte aligned): two passes, float64 accumulation: the mean from the sum
 * of x, then M2 = sum d^2 - (sum d)^2 / count with d = x - mean (the
 * corrected two-pass sum: its correction term is the rounding of the first
 * pass).  header (this shard's count in it) is written by the kernel from
 * its argument.  partials: fbn_ks_moment_partials_bytes(). */
FBN_KS_HIDDEN cudaError_t fbn_ks_record(const fbn_k_shape *s, const void *x, fbn_cs_header header,
                                        double *partials, void *record, cudaStream_t stream);

/*
 * Combine (one block): the check of the world_size gathered records
 * (stride bytes apart) against `self`, then, per channel, the merge in rank
 * order, the biased variance M2 / total, invstd (fbn_bn_stats_invstd), and
 *   running (not NULL) = (1 - factor) running + factor (mean, M2/(total-1)),
 *   save_mean / save_invstd (not NULL),
 *   coef (mean, weight * invstd, bias) for fbn_k_apply(); weight/bias NULL:
 *   1 / 0.
 * On a failed check: status (and status2 when not NULL) receive the
 * fbn_cs_status, running statistics are not written, save_* and coef are
 * NaN (so the apply writes NaN to every y).
 */
FBN_KS_HIDDEN cudaError_t fbn_ks_combine(const void *records, int world_size, size_t stride,
                                         fbn_cs_header self, int param_double, double factor,
                                         void *running_mean, void *running_var,
                                         const void *weight, const void *bias, void *save_mean,
                                         void *save_invstd, void *coef, fbn_cs_status *status,
                                         fbn_cs_status *status2, cudaStream_t stream);

/*
 * Gradient record from the partials of fbn_k_grad_reduce() (slices =
 * fbn_k_reduce_slices()) into rec and rec_local (the copy the all-reduce
 * leaves alone): count, 1, C, 0, sum g[C], sum g xhat[C]; partials NULL
 * (empty shard): zero sums.  A forward whose status block `forward` failed
 * gives NaN sums (so every rank's summed record is NaN).
 */
FBN_KS_HIDDEN cudaError_t fbn_ks_grad_record(int64_t c, int64_t count, const double *partials,
                                             int slices, const fbn_cs_status *forward,
                                             double *rec, double *rec_local, cudaStream_t stream);

/*
 * Backward coefficients (k, mean, b, d; cuda_kernels.h) from the summed
 * gradient record rec with its total count, for fbn_k_grad_apply(); coef
 * may be NULL (no dx).  The check (fbn_cs_check_grad_head, and the
 * forward's status block) goes to status; on failure coef is NaN and
 * dweight/dbias are not written; else dweight/dbias (not NULL) = or += the
 * sums of rec_local (this shard's) or, rec_local NULL, of rec (global).
 */
FBN_KS_HIDDEN cudaError_t fbn_ks_grad_coef(int64_t c, int64_t local, const double *rec,
                                           const double *rec_local, const fbn_cs_status *forward,
                                           int param_double, const void *weight,
                                           const void *mean, const void *invstd, void *dweight,
                                           void *dbias, int accumulate, void *coef,
                                           fbn_cs_status *status, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* FUSEDBN_SRC_CUDA_CUDA_SYNC_KERNELS_H */
