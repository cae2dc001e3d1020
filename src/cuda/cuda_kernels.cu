// fusedbn's own CUDA kernels: statistics and gradient reductions (float64
// accumulation), the single-pass apply (normalize, add, ReLU, bit mask), the
// add+ReLU after cuDNN's batch norm, and the backward elementwise kernels.
// See cuda_kernels.h for the contracts and bn_math.h for the formulas.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "bn_math.h"
#include "cuda_kernels.h"
#include "fusedbn/fusedbn.h"

namespace {

constexpr int kThreads = 256;
constexpr unsigned kMaxElementwiseBlocks = 65536;

// ---- element types ---------------------------------------------------------

template <typename T> struct AccOf { typedef float type; };
template <> struct AccOf<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccOf<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Parameter arrays: double for double tensors, float otherwise.
template <typename T> struct ParamOf { typedef float type; };
template <> struct ParamOf<double> { typedef double type; };

// ReLU that propagates NaN and maps v <= 0 (including -0) to +0.
template <typename A> __device__ __forceinline__ A relu(A v) { return v <= A(0) ? A(0) : v; }

template <bool NHWC, typename I> __device__ __forceinline__ I channel_of(I i, I C, I hw) {
  return NHWC ? i % C : (i / hw) % C;
}

// The ReLU gate of element i: mask bit when there is a mask, else !(y <= 0)
// (a NaN y passes the gradient, as PyTorch's threshold_backward).
template <typename T, typename I> struct Gate {
  const uint32_t *mask;
  const T *y;
  __device__ __forceinline__ bool operator()(I i) const {
    if (mask != nullptr)
      return (mask[i >> 5] >> (unsigned)(i & 31)) & 1u;
    return !(to_acc(y[i]) <= 0);
  }
};

// ---- reductions --------------------------------------------------------------

// Sum (a, b) over the block (blockDim.x * blockDim.y == kThreads); the
// result is valid in thread 0.
__device__ __forceinline__ void block_sum2(double &a, double &b) {
  __shared__ double sa[kThreads / 32], sb[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  if ((tid & 31) == 0) {
    sa[tid >> 5] = a;
    sb[tid >> 5] = b;
  }
  __syncthreads();
  if (tid < 32) {
    a = tid < kThreads / 32 ? sa[tid] : 0.0;
    b = tid < kThreads / 32 ? sb[tid] : 0.0;
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, off);
      b += __shfl_down_sync(0xffffffffu, b, off);
    }
  }
}

// Per-element contributions of the statistics reduction: x - shift and
// (x - shift)^2, shift the channel's first value.
template <typename T, typename I> struct StatsOp {
  const T *x;
  struct Chan {
    double shift;
  };
  __device__ Chan chan(I first) const { return Chan{(double)to_acc(x[first])}; }
  __device__ __forceinline__ void add(const Chan &ch, I i, double &a, double &b) const {
    const double v = (double)to_acc(x[i]) - ch.shift;
    a += v;
    b += v * v;
  }
};

// Per-element contributions of the gradient reduction: g and g * xhat.
template <typename T, typename I> struct GradOp {
  typedef typename ParamOf<T>::type P;
  const T *x;
  const T *dy;
  Gate<T, I> gate;
  const P *mean;
  const P *invstd;
  I C;
  I hw;
  bool nhwc;
  struct Chan {
    double mean;
    double invstd;
  };
  __device__ Chan chan(I first) const {
    const I c = nhwc ? first : first / hw;
    return Chan{(double)mean[c], (double)invstd[c]};
  }
  // g * xhat even where the gate is closed (g = 0), so a NaN xhat reaches
  // dweight as in the reference (0 * NaN = NaN).
  __device__ __forceinline__ void add(const Chan &ch, I i, double &a, double &b) const {
    const double g = gate(i) ? (double)to_acc(dy[i]) : 0.0;
    a += g;
    b += g * (((double)to_acc(x[i]) - ch.mean) * ch.invstd);
  }
};

// NCHW: block (kThreads) per (channel, slice); the slice is a range of the
// channel's M = N*HW values in (n, hw) order.
template <typename Op, typename I>
__global__ void reduce_nchw_kernel(Op op, I C, I hw, I M, I len, double *partials) {
  const I c = blockIdx.x, s = blockIdx.y;
  const I start = s * len;
  const I end = start + len < M ? start + len : M;
  const typename Op::Chan ch = op.chan(c * hw);
  double a = 0.0, b = 0.0;
  for (I m = start + threadIdx.x; m < end; m += blockDim.x) {
    const I n = m / hw, p = m - n * hw;
    op.add(ch, (n * C + c) * hw + p, a, b);
  }
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    partials[((size_t)s * C + c) * 2] = a;
    partials[((size_t)s * C + c) * 2 + 1] = b;
  }
}

// NHWC: block (32 channels x 8 rows) per (channel group, slice).
template <typename Op, typename I>
__global__ void reduce_nhwc_kernel(Op op, I C, I M, I len, double *partials) {
  const I c = (I)blockIdx.x * 32 + threadIdx.x, s = blockIdx.y;
  const I start = s * len;
  const I end = start + len < M ? start + len : M;
  double a = 0.0, b = 0.0;
  if (c < C) {
    const typename Op::Chan ch = op.chan(c);
    for (I m = start + threadIdx.y; m < end; m += blockDim.y)
      op.add(ch, m * C + c, a, b);
  }
  __shared__ double sa[8][33], sb[8][33];
  sa[threadIdx.y][threadIdx.x] = a;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int r = 1; r < 8; r++) {
      a += sa[r][threadIdx.x];
      b += sb[r][threadIdx.x];
    }
    partials[((size_t)s * C + c) * 2] = a;
    partials[((size_t)s * C + c) * 2 + 1] = b;
  }
}

template <typename Op, typename I>
cudaError_t launch_reduce(const fbn_k_shape *s, Op op, double *partials, cudaStream_t stream) {
  const I C = (I)s->c, hw = (I)s->hw, M = (I)(s->n * s->hw);
  const int slices = fbn_k_reduce_slices(s);
  const I len = (M + (I)slices - 1) / (I)slices;
  if (s->nhwc) {
    dim3 grid((unsigned)((s->c + 31) / 32), (unsigned)slices);
    reduce_nhwc_kernel<Op, I><<<grid, dim3(32, 8), 0, stream>>>(op, C, M, len, partials);
  } else {
    dim3 grid((unsigned)s->c, (unsigned)slices);
    reduce_nchw_kernel<Op, I><<<grid, kThreads, 0, stream>>>(op, C, hw, M, len, partials);
  }
  return cudaGetLastError();
}

// ---- per-channel finalization ----------------------------------------------------
// One warp per channel: the lanes sum the channel's slice partials (lane k
// takes slices k, k + 32, ...), then a shuffle tree; lane 0 holds the sums.

__device__ __forceinline__ void warp_sum_slices(const double *partials, int64_t C, int64_t c,
                                                int slices, double &a, double &b) {
  for (int k = (int)(threadIdx.x & 31); k < slices; k += 32) {
    a += partials[((size_t)k * C + c) * 2];
    b += partials[((size_t)k * C + c) * 2 + 1];
  }
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
}

template <typename T>
__global__ void stats_finalize_kernel(int64_t C, int64_t count, bool nhwc, int64_t hw, const T *x,
                                      const double *partials, int slices, double eps, double factor,
                                      const typename ParamOf<T>::type *weight,
                                      const typename ParamOf<T>::type *bias,
                                      typename ParamOf<T>::type *running_mean,
                                      typename ParamOf<T>::type *running_var,
                                      typename ParamOf<T>::type *save_mean,
                                      typename ParamOf<T>::type *save_invstd,
                                      typename AccOf<T>::type *coef) {
  typedef typename ParamOf<T>::type P;
  typedef typename AccOf<T>::type A;
  const int64_t c = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  if (c >= C)
    return; // the whole warp: c is the warp's channel
  double sum = 0.0, sumsq = 0.0;
  warp_sum_slices(partials, C, c, slices, sum, sumsq);
  if ((threadIdx.x & 31) != 0)
    return;
  const double shift = (double)to_acc(x[nhwc ? c : c * hw]);
  const fbn_bn_stats st = fbn_bn_stats_from_sums(shift, sum, sumsq, count);
  const double invstd = 1.0 / sqrt(st.var + eps);
  if (running_mean != nullptr) {
    running_mean[c] = (P)fbn_bn_running_update((double)running_mean[c], st.mean, factor);
    running_var[c] = (P)fbn_bn_running_update((double)running_var[c], st.var_unbiased, factor);
  }
  if (save_mean != nullptr) {
    save_mean[c] = (P)st.mean;
    save_invstd[c] = (P)invstd;
  }
  const double w = weight != nullptr ? (double)weight[c] : 1.0;
  const double b = bias != nullptr ? (double)bias[c] : 0.0;
  coef[c] = (A)st.mean;
  coef[C + c] = (A)(w * invstd);
  coef[2 * C + c] = (A)b;
}

template <typename P, typename A>
__global__ void eval_prepare_kernel(int64_t C, double eps, const P *weight, const P *bias,
                                    const P *running_mean, const P *running_var, P *save_mean,
                                    P *save_invstd, A *coef) {
  const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C)
    return;
  const double mean = (double)running_mean[c];
  const double invstd = 1.0 / sqrt((double)running_var[c] + eps);
  if (save_mean != nullptr) {
    save_mean[c] = (P)mean;
    save_invstd[c] = (P)invstd;
  }
  const double w = weight != nullptr ? (double)weight[c] : 1.0;
  const double b = bias != nullptr ? (double)bias[c] : 0.0;
  coef[c] = (A)mean;
  coef[C + c] = (A)(w * invstd);
  coef[2 * C + c] = (A)b;
}

template <typename P, typename A>
__global__ void grad_finalize_kernel(int64_t C, int64_t count, const double *partials, int slices,
                                     bool batch_stats, const P *weight, const P *mean,
                                     const P *invstd, P *dweight, P *dbias, A *coef) {
  const int64_t c = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  if (c >= C)
    return; // the whole warp: c is the warp's channel
  double sum_g = 0.0, sum_gx = 0.0;
  if (partials != nullptr)
    warp_sum_slices(partials, C, c, slices, sum_g, sum_gx);
  if ((threadIdx.x & 31) != 0)
    return;
  if (partials != nullptr) {
    if (dweight != nullptr)
      dweight[c] = (P)((double)dweight[c] + sum_gx);
    if (dbias != nullptr)
      dbias[c] = (P)((double)dbias[c] + sum_g);
  }
  const double w = weight != nullptr ? (double)weight[c] : 1.0;
  const fbn_bn_grad_coef k =
      fbn_bn_grad_coef_make(w, (double)invstd[c], sum_g, sum_gx, count, batch_stats ? 1 : 0);
  coef[c] = (A)k.k;
  coef[C + c] = (A)mean[c];
  coef[2 * C + c] = (A)k.b;
  coef[3 * C + c] = (A)k.d;
}

// ---- elementwise -------------------------------------------------------------------
// Thread i of the grid handles element i; a warp covers 32 consecutive
// elements starting at a multiple of 32, so its ballot is one mask word.

template <typename T, bool NHWC, typename I>
__global__ void apply_kernel(I numel, I C, I hw, const T *x, const T *z, T *y, uint32_t *mask,
                             const typename AccOf<T>::type *coef) {
  typedef typename AccOf<T>::type A;
  const I stride = (I)gridDim.x * blockDim.x;
  for (I base = (I)blockIdx.x * blockDim.x; base < numel; base += stride) {
    const I i = base + threadIdx.x;
    bool positive = false;
    if (i < numel) {
      const I c = channel_of<NHWC>(i, C, hw);
      A v = (to_acc(x[i]) - coef[c]) * coef[C + c] + coef[2 * C + c];
      if (z != nullptr)
        v += to_acc(z[i]);
      const T out = from_acc<T>(relu(v));
      y[i] = out;
      positive = !(to_acc(out) <= A(0));
    }
    const unsigned bits = __ballot_sync(0xffffffffu, positive);
    if (mask != nullptr && (threadIdx.x & 31) == 0 && i < numel)
      mask[i >> 5] = bits;
  }
}

template <typename T, typename I>
__global__ void add_relu_kernel(I numel, T *y, const T *z, uint32_t *mask) {
  typedef typename AccOf<T>::type A;
  const I stride = (I)gridDim.x * blockDim.x;
  for (I base = (I)blockIdx.x * blockDim.x; base < numel; base += stride) {
    const I i = base + threadIdx.x;
    bool positive = false;
    if (i < numel) {
      A v = to_acc(y[i]);
      if (z != nullptr)
        v += to_acc(z[i]);
      const T out = from_acc<T>(relu(v));
      y[i] = out;
      positive = !(to_acc(out) <= A(0));
    }
    const unsigned bits = __ballot_sync(0xffffffffu, positive);
    if (mask != nullptr && (threadIdx.x & 31) == 0 && i < numel)
      mask[i >> 5] = bits;
  }
}

template <typename T, typename I>
__global__ void mask_grad_kernel(I numel, const T *dy, Gate<T, I> gate, T *dz) {
  const I stride = (I)gridDim.x * blockDim.x;
  for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += stride)
    dz[i] = gate(i) ? dy[i] : from_acc<T>(0);
}

template <typename T, bool NHWC, typename I>
__global__ void grad_apply_kernel(I numel, I C, I hw, const T *x, const T *dy, Gate<T, I> gate,
                                  const typename AccOf<T>::type *coef, T *dx, T *dz) {
  typedef typename AccOf<T>::type A;
  const I stride = (I)gridDim.x * blockDim.x;
  for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const A g = gate(i) ? to_acc(dy[i]) : A(0);
    if (dz != nullptr)
      dz[i] = from_acc<T>(g);
    if (dx != nullptr) {
      const I c = channel_of<NHWC>(i, C, hw);
      dx[i] = from_acc<T>(coef[c] * g + coef[2 * C + c] * (to_acc(x[i]) - coef[C + c]) +
                          coef[3 * C + c]);
    }
  }
}

template <typename P> __global__ void fill_kernel(P *dst, int64_t count, P value) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count)
    dst[i] = value;
}

// ---- dispatch --------------------------------------------------------------------------

template <typename F> cudaError_t dispatch_dtype(int dtype, F f) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT32: return f(float());
  case FBN_DTYPE_FLOAT64: return f(double());
  case FBN_DTYPE_FLOAT16: return f(__half());
  case FBN_DTYPE_BFLOAT16: return f(__nv_bfloat16());
  default: return cudaErrorInvalidValue;
  }
}

int64_t numel_of(const fbn_k_shape *s) { return s->n * s->c * s->hw; }

// 32-bit indices when the element count (plus one grid stride) fits.
bool small_index(const fbn_k_shape *s) { return numel_of(s) < ((int64_t)1 << 31); }

unsigned elementwise_blocks(int64_t numel) {
  int64_t b = (numel + kThreads - 1) / kThreads;
  if (b > (int64_t)kMaxElementwiseBlocks)
    b = kMaxElementwiseBlocks;
  return (unsigned)(b < 1 ? 1 : b);
}

unsigned channel_blocks(int64_t C) { return (unsigned)((C + kThreads - 1) / kThreads); }
// Blocks for one warp per channel (the finalize kernels).
unsigned warp_channel_blocks(int64_t C) {
  return (unsigned)((C * 32 + kThreads - 1) / kThreads);
}

} // namespace

// ---- C entry points ------------------------------------------------------------------------

extern "C" int fbn_k_reduce_slices(const fbn_k_shape *s) {
  if (s->nhwc)
    return fbn_bn_reduce_slices_target(s->n * s->hw, (s->c + 31) / 32, FBN_BN_NHWC_SLICE_ROWS);
  return fbn_bn_reduce_slices(s->n * s->hw, s->c);
}

extern "C" size_t fbn_k_partials_bytes(const fbn_k_shape *s) {
  return (size_t)fbn_k_reduce_slices(s) * (size_t)s->c * 2 * sizeof(double);
}

extern "C" size_t fbn_k_mask_words(const fbn_k_shape *s) {
  return (size_t)((numel_of(s) + 31) / 32);
}

extern "C" cudaError_t fbn_k_fill(void *dst, int param_double, int64_t count, double value,
                                  cudaStream_t stream) {
  if (count <= 0)
    return cudaSuccess;
  const unsigned blocks = (unsigned)((count + kThreads - 1) / kThreads);
  if (param_double)
    fill_kernel<double><<<blocks, kThreads, 0, stream>>>((double *)dst, count, value);
  else
    fill_kernel<float><<<blocks, kThreads, 0, stream>>>((float *)dst, count, (float)value);
  return cudaGetLastError();
}

extern "C" cudaError_t fbn_k_stats(const fbn_k_shape *s, const void *x, double *partials,
                                   cudaStream_t stream) {
  return dispatch_dtype(s->dtype, [&](auto tag) {
    typedef decltype(tag) T;
    if (small_index(s))
      return launch_reduce<StatsOp<T, uint32_t>, uint32_t>(
          s, StatsOp<T, uint32_t>{(const T *)x}, partials, stream);
    return launch_reduce<StatsOp<T, uint64_t>, uint64_t>(s, StatsOp<T, uint64_t>{(const T *)x},
                                                         partials, stream);
  });
}

extern "C" cudaError_t fbn_k_stats_finalize(const fbn_k_shape *s, const void *x,
                                            const double *partials, double eps, double factor,
                                            const void *weight, const void *bias,
                                            void *running_mean, void *running_var,
                                            void *save_mean, void *save_invstd, void *coef,
                                            cudaStream_t stream) {
  return dispatch_dtype(s->dtype, [&](auto tag) {
    typedef decltype(tag) T;
    typedef typename ParamOf<T>::type P;
    typedef typename AccOf<T>::type A;
    stats_finalize_kernel<T><<<warp_channel_blocks(s->c), kThreads, 0, stream>>>(
        s->c, s->n * s->hw, s->nhwc != 0, s->hw, (const T *)x, partials, fbn_k_reduce_slices(s),
        eps, factor, (const P *)weight, (const P *)bias, (P *)running_mean, (P *)running_var,
        (P *)save_mean, (P *)save_invstd, (A *)coef);
    return cudaGetLastError();
  });
}

extern "C" cudaError_t fbn_k_eval_prepare(const fbn_k_shape *s, double eps, const void *weight,
                                          const void *bias, const void *running_mean,
                                          const void *running_var, void *save_mean,
                                          void *save_invstd, void *coef, cudaStream_t stream) {
  const unsigned blocks = channel_blocks(s->c);
  if (s->dtype == FBN_DTYPE_FLOAT64)
    eval_prepare_kernel<double, double><<<blocks, kThreads, 0, stream>>>(
        s->c, eps, (const double *)weight, (const double *)bias, (const double *)running_mean,
        (const double *)running_var, (double *)save_mean, (double *)save_invstd, (double *)coef);
  else
    eval_prepare_kernel<float, float><<<blocks, kThreads, 0, stream>>>(
        s->c, eps, (const float *)weight, (const float *)bias, (const float *)running_mean,
        (const float *)running_var, (float *)save_mean, (float *)save_invstd, (float *)coef);
  return cudaGetLastError();
}

extern "C" cudaError_t fbn_k_apply(const fbn_k_shape *s, const void *x, const void *z, void *y,
                                   uint32_t *mask, const void *coef, cudaStream_t stream) {
  const int64_t numel = numel_of(s);
  const unsigned blocks = elementwise_blocks(numel);
  return dispatch_dtype(s->dtype, [&](auto tag) {
    typedef decltype(tag) T;
    typedef typename AccOf<T>::type A;
    const T *xt = (const T *)x, *zt = (const T *)z;
    T *yt = (T *)y;
    const A *ct = (const A *)coef;
    if (small_index(s)) {
      typedef uint32_t I;
      if (s->nhwc)
        apply_kernel<T, true, I><<<blocks, kThreads, 0, stream>>>((I)numel, (I)s->c, (I)s->hw,
                                                                 xt, zt, yt, mask, ct);
      else
        apply_kernel<T, false, I><<<blocks, kThreads, 0, stream>>>((I)numel, (I)s->c, (I)s->hw,
                                                                  xt, zt, yt, mask, ct);
    } else {
      typedef uint64_t I;
      if (s->nhwc)
        apply_kernel<T, true, I><<<blocks, kThreads, 0, stream>>>((I)numel, (I)s->c, (I)s->hw,
                                                                 xt, zt, yt, mask, ct);
      else
        apply_kernel<T, false, I><<<blocks, kThreads, 0, stream>>>((I)numel, (I)s->c, (I)s->hw,
                                                                  xt, zt, yt, mask, ct);
    }
    return cudaGetLastError();
  });
}

extern "C" cudaError_t fbn_k_add_relu(const fbn_k_shape *s, void *y, const void *z,
                                      uint32_t *mask, cudaStream_t stream) {
  const int64_t numel = numel_of(s);
  const unsigned blocks = elementwise_blocks(numel);
  return dispatch_dtype(s->dtype, [&](auto tag) {
    typedef decltype(tag) T;
    if (small_index(s))
      add_relu_kernel<T, uint32_t><<<blocks, kThreads, 0, stream>>>((uint32_t)numel, (T *)y,
                                                                    (const T *)z, mask);
    else
      add_relu_kernel<T, uint64_t><<<blocks, kThreads, 0, stream>>>((uint64_t)numel, (T *)y,
                                                                    (const T *)z, mask);
    return cudaGetLastError();
  });
}

extern "C" cudaError_t fbn_k_mask_grad(const fbn_k_shape *s, const void *dy,
                                       const uint32_t *mask, const void *y, void *dz,
                                       cudaStream_t stream) {
  const int64_t numel = numel_of(s);
  const unsigned blocks = elementwise_blocks(numel);
  return dispatch_dtype(s->dtype, [&](auto tag) {
    typedef decltype(tag) T;
    if (small_index(s))
      mask_grad_kernel<T, uint32_t><<<blocks, kThreads, 0, stream>>>(
          (uint32_t)numel, (const T *)dy, Gate<T, uint32_t>{mask, (const T *)y}, (T *)dz);
    else
      mask_grad_kernel<T, uint64_t><<<blocks, kThreads, 0, stream>>>(
          (uint64_t)numel, (const T *)dy, Gate<T, uint64_t>{mask, (const T *)y}, (T *)dz);
    return cudaGetLastError();
  });
}

extern "C" cudaError_t fbn_k_grad_reduce(const fbn_k_shape *s, const void *x, const void *dy,
                                         const uint32_t *mask, const void *y, const void *mean,
                                         const void *invstd, double *partials,
                                         cudaStream_t stream) {
  return dispatch_dtype(s->dtype, [&](auto tag) {
    typedef decltype(tag) T;
    typedef typename ParamOf<T>::type P;
    if (small_index(s)) {
      typedef uint32_t I;
      GradOp<T, I> op{(const T *)x, (const T *)dy, Gate<T, I>{mask, (const T *)y},
                      (const P *)mean, (const P *)invstd, (I)s->c, (I)s->hw, s->nhwc != 0};
      return launch_reduce<GradOp<T, I>, I>(s, op, partials, stream);
    }
    typedef uint64_t I;
    GradOp<T, I> op{(const T *)x, (const T *)dy, Gate<T, I>{mask, (const T *)y},
                    (const P *)mean, (const P *)invstd, (I)s->c, (I)s->hw, s->nhwc != 0};
    return launch_reduce<GradOp<T, I>, I>(s, op, partials, stream);
  });
}

extern "C" cudaError_t fbn_k_grad_finalize(const fbn_k_shape *s, const double *partials,
                                           int batch_stats, const void *weight, const void *mean,
                                           const void *invstd, void *dweight, void *dbias,
                                           void *coef, cudaStream_t stream) {
  const unsigned blocks = warp_channel_blocks(s->c);
  const int slices = fbn_k_reduce_slices(s);
  if (s->dtype == FBN_DTYPE_FLOAT64)
    grad_finalize_kernel<double, double><<<blocks, kThreads, 0, stream>>>(
        s->c, s->n * s->hw, partials, slices, batch_stats != 0, (const double *)weight,
        (const double *)mean, (const double *)invstd, (double *)dweight, (double *)dbias,
        (double *)coef);
  else
    grad_finalize_kernel<float, float><<<blocks, kThreads, 0, stream>>>(
        s->c, s->n * s->hw, partials, slices, batch_stats != 0, (const float *)weight,
        (const float *)mean, (const float *)invstd, (float *)dweight, (float *)dbias,
        (float *)coef);
  return cudaGetLastError();
}

extern "C" cudaError_t fbn_k_grad_apply(const fbn_k_shape *s, const void *x, const void *dy,
                                        const uint32_t *mask, const void *y, const void *coef,
                                        void *dx, void *dz, cudaStream_t stream) {
  const int64_t numel = numel_of(s);
  const unsigned blocks = elementwise_blocks(numel);
  return dispatch_dtype(s->dtype, [&](auto tag) {
    typedef decltype(tag) T;
    typedef typename AccOf<T>::type A;
    const T *xt = (const T *)x, *dyt = (const T *)dy;
    const A *ct = (const A *)coef;
    if (small_index(s)) {
      typedef uint32_t I;
      Gate<T, I> gate{mask, (const T *)y};
      if (s->nhwc)
        grad_apply_kernel<T, true, I><<<blocks, kThreads, 0, stream>>>(
            (I)numel, (I)s->c, (I)s->hw, xt, dyt, gate, ct, (T *)dx, (T *)dz);
      else
        grad_apply_kernel<T, false, I><<<blocks, kThreads, 0, stream>>>(
            (I)numel, (I)s->c, (I)s->hw, xt, dyt, gate, ct, (T *)dx, (T *)dz);
    } else {
      typedef uint64_t I;
      Gate<T, I> gate{mask, (const T *)y};
      if (s->nhwc)
        grad_apply_kernel<T, true, I><<<blocks, kThreads, 0, stream>>>(
            (I)numel, (I)s->c, (I)s->hw, xt, dyt, gate, ct, (T *)dx, (T *)dz);
      else
        grad_apply_kernel<T, false, I><<<blocks, kThreads, 0, stream>>>(
            (I)numel, (I)s->c, (I)s->hw, xt, dyt, gate, ct, (T *)dx, (T *)dz);
    }
    return cudaGetLastError();
  });
}
