// Kernels of synchronized batch norm on the device (cuda_sync_kernels.h):
// the statistics record (two passes, float64), the combine of the gathered
// records (check and exact merge in rank order, one block), the gradient
// record and the backward coefficients from the summed one.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "cuda_sync_kernels.h"
#include "fusedbn/fusedbn.h"

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ double to_double(float v) { return (double)v; }
__device__ __forceinline__ double to_double(double v) { return v; }
__device__ __forceinline__ double to_double(__half v) { return (double)__half2float(v); }
__device__ __forceinline__ double to_double(__nv_bfloat16 v) {
  return (double)__bfloat162float(v);
}

// Block-wide sums of a and b (every thread of the block calls it); thread 0
// gets the totals.
__device__ void block_sum2(double &a, double &b) {
  __shared__ double sa[kThreads], sb[kThreads];
  sa[threadIdx.x] = a;
  sb[threadIdx.x] = b;
  __syncthreads();
  for (unsigned half = kThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      sa[threadIdx.x] += sa[threadIdx.x + half];
      sb[threadIdx.x] += sb[threadIdx.x + half];
    }
    __syncthreads();
  }
  a = sa[0];
  b = sb[0];
}

// NCHW: block (kThreads) per (channel, slice): sums of d and d^2, d = x -
// center[c] (center NULL: 0), over the slice's values in (n, hw) order.
template <typename T>
__global__ void moments_kernel(const T *x, int64_t C, int64_t hw, int64_t M, int64_t len,
                               const double *center, double *partials) {
  const int64_t c = blockIdx.x, sl = blockIdx.y;
  const int64_t lo = sl * len, hi = lo + len < M ? lo + len : M;
  const double ctr = center != nullptr ? center[c] : 0.0;
  double a = 0.0, b = 0.0;
  for (int64_t m = lo + threadIdx.x; m < hi; m += kThreads) {
    const int64_t n = m / hw, sp = m - n * hw;
    const int64_t i = (n * C + c) * hw + sp;
    const double d = to_double(x[i]) - ctr;
    a += d;
    b += d * d;
  }
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    partials[((size_t)sl * C + c) * 2] = a;
    partials[((size_t)sl * C + c) * 2 + 1] = b;
  }
}

// NHWC: block (32 channels x 8 rows) per (channel group, slice): lane x
// takes channel 32 * blockIdx.x + x (consecutive channels: coalesced rows),
// row y the slice's rows y, y + 8, ...; the 8 row sums of a channel are
// added in row order.
template <typename T>
__global__ void moments_nhwc_kernel(const T *x, int64_t C, int64_t M, int64_t len,
                                    const double *center, double *partials) {
  __shared__ double sa[8][33], sb[8][33];
  const int64_t c = (int64_t)blockIdx.x * 32 + threadIdx.x, sl = blockIdx.y;
  const int64_t lo = sl * len, hi = lo + len < M ? lo + len : M;
  double a = 0.0, b = 0.0;
  if (c < C) {
    const double ctr = center != nullptr ? center[c] : 0.0;
    for (int64_t m = lo + threadIdx.y; m < hi; m += 8) {
      const double d = to_double(x[m * C + c]) - ctr;
      a += d;
      b += d * d;
    }
  }
  sa[threadIdx.y][threadIdx.x] = a;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y != 0 || c >= C)
    return;
  for (int k = 1; k < 8; k++) {
    a += sa[k][threadIdx.x];
    b += sb[k][threadIdx.x];
  }
  partials[((size_t)sl * C + c) * 2] = a;
  partials[((size_t)sl * C + c) * 2 + 1] = b;
}

// Pass 1: mean[c] = sum / count into the record's mean slot.  Pass 2:
// m2[c] = sum d^2 - (sum d)^2 / count, and the header (thread 0 of block 0).
__global__ void record_finish_kernel(int64_t C, int64_t count, const double *partials, int slices,
                                     int pass, fbn_cs_header header, unsigned char *record) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  double *mean = (double *)(void *)(record + FBN_CS_HEADER_BYTES);
  double *m2 = mean + C;
  if (pass == 2 && c == 0) {
    const unsigned char *h = (const unsigned char *)&header;
    for (int k = 0; k < FBN_CS_HEADER_BYTES; k++)
      record[k] = k < (int)sizeof header ? h[k] : 0;
  }
  if (c >= C)
    return;
  double a = 0.0, b = 0.0;
  if (partials != nullptr)
    for (int k = 0; k < slices; k++) {
      a += partials[((size_t)k * C + c) * 2];
      b += partials[((size_t)k * C + c) * 2 + 1];
    }
  if (count == 0) {
    mean[c] = 0.0;
    if (pass == 2)
      m2[c] = 0.0;
    return;
  }
  if (pass == 1) {
    mean[c] = a / (double)count;
  } else {
    double v = b - a * a / (double)count;
    if (v < 0.0) // rounding of a (near-)constant channel; NaN stays NaN
      v = 0.0;
    m2[c] = v;
  }
}

template <typename P>
__global__ void combine_kernel(const unsigned char *records, int world_size, size_t stride,
                               fbn_cs_header self, double factor, P *running_mean, P *running_var,
                               const P *weight, const P *bias, P *save_mean, P *save_invstd,
                               double *coef, fbn_cs_status *status, fbn_cs_status *status2) {
  __shared__ fbn_cs_status s;
  if (threadIdx.x == 0) {
    fbn_cs_check_headers(records, world_size, stride, &self, &s);
    *status = s;
    if (status2 != nullptr)
      *status2 = s;
  }
  __syncthreads();
  const bool ok = s.code == FBN_STATUS_SUCCESS;
  const int64_t C = self.c;
  const double total = (double)s.total;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    double mean = NAN, invstd = NAN, w = NAN, b = NAN;
    if (ok) {
      double n = 0.0, m = 0.0, m2 = 0.0;
      for (int r = 0; r < world_size; r++) {
        const unsigned char *rec = records + (size_t)r * stride;
        const fbn_cs_header *h = (const fbn_cs_header *)(const void *)rec;
        const double *rm = (const double *)(const void *)(rec + FBN_CS_HEADER_BYTES);
        fbn_cs_merge(&n, &m, &m2, (double)h->count, rm[c], rm[C + c]);
      }
      const double var = m2 / total;
      mean = m;
      invstd = fbn_bn_stats_invstd(var, self.eps);
      if (running_mean != nullptr) {
        running_mean[c] = (P)fbn_bn_running_update((double)running_mean[c], m, factor);
        running_var[c] =
            (P)fbn_bn_running_update((double)running_var[c], m2 / (total - 1.0), factor);
      }
      w = weight != nullptr ? (double)weight[c] : 1.0;
      b = bias != nullptr ? (double)bias[c] : 0.0;
    }
    if (save_mean != nullptr) {
      save_mean[c] = (P)mean;
      save_invstd[c] = (P)invstd;
    }
    if (coef != nullptr) {
      coef[c] = mean;
      coef[C + c] = w * invstd;
      coef[2 * C + c] = b;
    }
  }
}

__global__ void grad_record_kernel(int64_t C, int64_t count, const double *partials, int slices,
                                   const fbn_cs_status *forward, double *rec, double *rec_local) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const bool ok = forward->magic == FBN_CS_STATUS_MAGIC && forward->code == FBN_STATUS_SUCCESS;
  if (c < FBN_CS_GRAD_HEAD) {
    const double head[FBN_CS_GRAD_HEAD] = {(double)count, 1.0, (double)C, 0.0};
    rec[c] = head[c];
    rec_local[c] = head[c];
  }
  if (c >= C)
    return;
  double g = 0.0, gx = 0.0;
  if (partials != nullptr)
    for (int k = 0; k < slices; k++) {
      g += partials[((size_t)k * C + c) * 2];
      gx += partials[((size_t)k * C + c) * 2 + 1];
    }
  if (!ok) {
    g = NAN;
    gx = NAN;
  }
  rec[FBN_CS_GRAD_HEAD + c] = g;
  rec[FBN_CS_GRAD_HEAD + C + c] = gx;
  rec_local[FBN_CS_GRAD_HEAD + c] = g;
  rec_local[FBN_CS_GRAD_HEAD + C + c] = gx;
}

template <typename P>
__global__ void grad_coef_kernel(int64_t C, int64_t local, const double *rec,
                                 const double *rec_local, const fbn_cs_status *forward,
                                 const P *weight, const P *mean, const P *invstd, P *dweight,
                                 P *dbias, bool accumulate, double *coef,
                                 fbn_cs_status *status) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  fbn_cs_status s;
  if (forward->magic != FBN_CS_STATUS_MAGIC) {
    fbn_cs_status_clear(&s);
    s.code = FBN_STATUS_INVALID_STATE;
    s.what = FBN_CS_NO_FORWARD;
  } else if (forward->code != FBN_STATUS_SUCCESS) {
    s = *forward;
    s.cause = forward->what;
    s.what = FBN_CS_FORWARD;
  } else {
    fbn_cs_check_grad_head(rec, C, local, &s);
  }
  if (c == 0)
    *status = s;
  if (c >= C)
    return;
  const bool ok = s.code == FBN_STATUS_SUCCESS;
  const double sum_g = rec[FBN_CS_GRAD_HEAD + c], sum_gx = rec[FBN_CS_GRAD_HEAD + C + c];
  if (ok) {
    // the local sums (rec_local) or the global ones; overwrite never reads
    // the old value (it may be NaN or uninitialized)
    const double *pr = rec_local != nullptr ? rec_local : rec;
    const double pg = pr[FBN_CS_GRAD_HEAD + c], pgx = pr[FBN_CS_GRAD_HEAD + C + c];
    if (dweight != nullptr)
      dweight[c] = (P)(accumulate ? (double)dweight[c] + pgx : pgx);
    if (dbias != nullptr)
      dbias[c] = (P)(accumulate ? (double)dbias[c] + pg : pg);
  }
  if (coef == nullptr)
    return;
  if (!ok) {
    coef[c] = NAN;
    coef[C + c] = NAN;
    coef[2 * C + c] = NAN;
    coef[3 * C + c] = NAN;
    return;
  }
  const double w = weight != nullptr ? (double)weight[c] : 1.0;
  const fbn_bn_grad_coef k =
      fbn_bn_grad_coef_make(w, (double)invstd[c], sum_g, sum_gx, s.total, 1);
  coef[c] = k.k;
  coef[C + c] = (double)mean[c];
  coef[2 * C + c] = k.b;
  coef[3 * C + c] = k.d;
}

template <typename F> cudaError_t dispatch_dtype(int dtype, F f) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT32: return f(float());
  case FBN_DTYPE_FLOAT64: return f(double());
  case FBN_DTYPE_FLOAT16: return f(__half());
  case FBN_DTYPE_BFLOAT16: return f(__nv_bfloat16());
  default: return cudaErrorInvalidValue;
  }
}

unsigned channel_blocks(int64_t C) { return (unsigned)((C + kThreads - 1) / kThreads); }

} // namespace

extern "C" int fbn_ks_moment_slices(const fbn_k_shape *s) {
  if (s->nhwc)
    return fbn_bn_reduce_slices_target(s->n * s->hw, (s->c + 31) / 32, FBN_BN_NHWC_SLICE_ROWS);
  return fbn_bn_reduce_slices(s->n * s->hw, s->c);
}

extern "C" size_t fbn_ks_moment_partials_bytes(const fbn_k_shape *s) {
  return (size_t)fbn_ks_moment_slices(s) * (size_t)s->c * 2 * sizeof(double);
}

extern "C" cudaError_t fbn_ks_record(const fbn_k_shape *s, const void *x, fbn_cs_header header,
                                     double *partials, void *record, cudaStream_t stream) {
  const int64_t C = s->c, M = s->n * s->hw;
  unsigned char *rec = (unsigned char *)record;
  const unsigned cblocks = channel_blocks(C);
  if (M == 0) {
    record_finish_kernel<<<cblocks, kThreads, 0, stream>>>(C, 0, nullptr, 0, 2, header, rec);
    return cudaGetLastError();
  }
  const int slices = fbn_ks_moment_slices(s);
  const int64_t len = (M + slices - 1) / slices;
  const double *mean = (const double *)(const void *)(rec + FBN_CS_HEADER_BYTES);
  return dispatch_dtype(s->dtype, [&](auto tag) {
    typedef decltype(tag) T;
    const T *xt = (const T *)x;
    for (int pass = 1; pass <= 2; pass++) {
      const double *center = pass == 1 ? nullptr : mean;
      if (s->nhwc)
        moments_nhwc_kernel<T><<<dim3((unsigned)((C + 31) / 32), (unsigned)slices), dim3(32, 8), 0,
                                 stream>>>(xt, C, M, len, center, partials);
      else
        moments_kernel<T><<<dim3((unsigned)C, (unsigned)slices), kThreads, 0, stream>>>(
            xt, C, s->hw, M, len, center, partials);
      if (pass == 1)
        record_finish_kernel<<<cblocks, kThreads, 0, stream>>>(C, M, partials, slices, 1, header,
                                                               rec);
    }
    record_finish_kernel<<<cblocks, kThreads, 0, stream>>>(C, M, partials, slices, 2, header,
                                                           rec);
    return cudaGetLastError();
  });
}

extern "C" cudaError_t fbn_ks_combine(const void *records, int world_size, size_t stride,
                                      fbn_cs_header self, int param_double, double factor,
                                      void *running_mean, void *running_var, const void *weight,
                                      const void *bias, void *save_mean, void *save_invstd,
                                      void *coef, fbn_cs_status *status, fbn_cs_status *status2,
                                      cudaStream_t stream) {
  const unsigned char *rec = (const unsigned char *)records;
  if (param_double)
    combine_kernel<double><<<1, kThreads, 0, stream>>>(
        rec, world_size, stride, self, factor, (double *)running_mean, (double *)running_var,
        (const double *)weight, (const double *)bias, (double *)save_mean, (double *)save_invstd,
        (double *)coef, status, status2);
  else
    combine_kernel<float><<<1, kThreads, 0, stream>>>(
        rec, world_size, stride, self, factor, (float *)running_mean, (float *)running_var,
        (const float *)weight, (const float *)bias, (float *)save_mean, (float *)save_invstd,
        (double *)coef, status, status2);
  return cudaGetLastError();
}

extern "C" cudaError_t fbn_ks_grad_record(int64_t c, int64_t count, const double *partials,
                                          int slices, const fbn_cs_status *forward, double *rec,
                                          double *rec_local, cudaStream_t stream) {
  const int64_t n = c > FBN_CS_GRAD_HEAD ? c : FBN_CS_GRAD_HEAD;
  grad_record_kernel<<<channel_blocks(n), kThreads, 0, stream>>>(c, count, partials, slices,
                                                                 forward, rec, rec_local);
  return cudaGetLastError();
}

extern "C" cudaError_t fbn_ks_grad_coef(int64_t c, int64_t local, const double *rec,
                                        const double *rec_local, const fbn_cs_status *forward,
                                        int param_double, const void *weight, const void *mean,
                                        const void *invstd, void *dweight, void *dbias,
                                        int accumulate, void *coef, fbn_cs_status *status,
                                        cudaStream_t stream) {
  const unsigned blocks = channel_blocks(c);
  if (param_double)
    grad_coef_kernel<double><<<blocks, kThreads, 0, stream>>>(
        c, local, rec, rec_local, forward, (const double *)weight, (const double *)mean,
        (const double *)invstd, (double *)dweight, (double *)dbias, accumulate != 0,
        (double *)coef, status);
  else
    grad_coef_kernel<float><<<blocks, kThreads, 0, stream>>>(
        c, local, rec, rec_local, forward, (const float *)weight, (const float *)mean,
        (const float *)invstd, (float *)dweight, (float *)dbias, accumulate != 0, (double *)coef,
        status);
  return cudaGetLastError();
}
