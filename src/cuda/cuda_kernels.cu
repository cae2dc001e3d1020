// fusedbn's own CUDA kernels: statistics and gradient reductions (float64
// accumulation), the single-pass apply (normalize, add, ReLU, bit mask), the
// add+ReLU after cuDNN's batch norm, and the backward elementwise kernels.
// See cuda_kernels.h for the contracts and bn_math.h for the formulas.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "bn_math.h"
#include "cuda_kernels.h"
#include "fusedbn/fusedbn.h"

namespace {

constexpr int kThreads = 256;
constexpr unsigned kMaxElementwiseBlocks = 65536;

// ---- element types ---------------------------------------------------------

// Arithmetic of the elementwise kernels: float64 for float32 and float64
// tensors (x - mean and the backward coefficients of channels whose spread
// is near float32's range neither overflow nor underflow), float32 for
// float16/bfloat16 (docs/semantics.md: computed in float32, rounded once).
// The per-channel coefficients are stored in float64 for every dtype
// (Coef) and converted to A where they are used.
template <typename T> struct AccOf { typedef float type; };
template <> struct AccOf<float> { typedef double type; };
template <> struct AccOf<double> { typedef double type; };
typedef double Coef;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccOf<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(double v) { return (float)v; }
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

// ---- vectors (up to 16 bytes) ---------------------------------------------------
// The vector paths move V consecutive elements per load/store and thread,
// V = 16 / sizeof(T) where possible (LDG.E.128).  They are taken when every
// tensor pointer is aligned to V * sizeof(T) bytes and the contiguous run of
// one channel (hw for NCHW) or of the channel vector (C for NHWC) is a
// multiple of V, so a vector never straddles a channel (NCHW) or a row
// (NHWC); pick_width() takes the widest such V, and without one (odd runs,
// odd addresses) the scalar kernels run.  The per-element math is the
// scalar kernels' own; only the order of the float64 reduction sums differs.

template <typename T> struct VecWidth { static constexpr int value = 16 / (int)sizeof(T); };

// V elements of T, aligned like the 16-byte (or smaller) access that moves them.
template <typename T, int V>
struct alignas(sizeof(T) * V > 16 ? 16 : sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T> __device__ __forceinline__ Pack<T, V> load_pack(const T *p) {
  return *reinterpret_cast<const Pack<T, V> *>(p);
}
template <int V, typename T> __device__ __forceinline__ void store_pack(T *p, const Pack<T, V> &v) {
  *reinterpret_cast<Pack<T, V> *>(p) = v;
}

bool aligned(const void *p, unsigned bytes) { return ((uintptr_t)p & (bytes - 1u)) == 0; }
// A pointer the kernel does not dereference (NULL) does not matter.
bool aligned_or_null(const void *p, unsigned bytes) { return p == nullptr || aligned(p, bytes); }

// Elements per access of the vector kernels: the widest V of 16/sizeof(T),
// ..., 2 (at most max_v) such that run % V == 0 and ok(V * sizeof(T)) (the
// pointers' alignment); 1: the scalar kernels.  Narrower vectors still help
// where 16 bytes do not fit, e.g. float16 NCHW with hw = 14*14 (V = 4).
template <typename T, typename OK> int pick_width(int64_t run, int max_v, OK ok) {
  for (int v = VecWidth<T>::value < max_v ? VecWidth<T>::value : max_v; v >= 2; v /= 2)
    if (run % v == 0 && ok((unsigned)(v * (int)sizeof(T))))
      return v;
  return 1;
}

// f(std::integral_constant<int, V>()) for the V of pick_width.
template <typename T, typename F> cudaError_t with_width(int v, F f) {
  constexpr int kMax = VecWidth<T>::value;
  if constexpr (kMax >= 8)
    if (v == 8)
      return f(std::integral_constant<int, 8>());
  if constexpr (kMax >= 4)
    if (v == 4)
      return f(std::integral_constant<int, 4>());
  if (v == 2)
    return f(std::integral_constant<int, 2>());
  return f(std::integral_constant<int, 1>());
}

// The ReLU gate of element i: mask bit when there is a mask, else !(y <= 0)
// (a NaN y passes the gradient, as PyTorch's threshold_backward); open for
// every element when there is neither (BN alone has no ReLU).
template <typename T, typename I> struct Gate {
  const uint32_t *mask;
  const T *y;
  __device__ __forceinline__ bool operator()(I i) const {
    if (mask != nullptr)
      return (mask[i >> 5] >> (unsigned)(i & 31)) & 1u;
    if (y == nullptr)
      return true;
    return !(to_acc(y[i]) <= 0);
  }
  // Gates of elements i .. i + V - 1 as bits 0 .. V - 1; i % V == 0 and V
  // divides 32, so the bits lie in one mask word.
  template <int V> __device__ __forceinline__ unsigned bits(I i) const {
    if (mask != nullptr)
      return (mask[i >> 5] >> (unsigned)(i & 31)) & ((1u << V) - 1u);
    if (y == nullptr)
      return (1u << V) - 1u;
    const Pack<T, V> yv = load_pack<V>(y + i);
    unsigned b = 0;
#pragma unroll
    for (int j = 0; j < V; j++)
      b |= (unsigned)!(to_acc(yv.v[j]) <= 0) << j;
    return b;
  }
  // y is read only without a mask.
  bool vec_ok(unsigned bytes) const {
    return mask != nullptr || y == nullptr || aligned(y, bytes);
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

// The channel's shift (bn_math.h: median of three of its values).
template <typename T>
__device__ __forceinline__ double channel_shift(const T *x, int64_t n, int64_t c, int64_t C,
                                                int64_t hw, bool nhwc) {
  int64_t at[3];
  fbn_bn_shift_samples(n, c, C, hw, nhwc ? 1 : 0, at);
  return fbn_bn_median3((double)to_acc(x[at[0]]), (double)to_acc(x[at[1]]),
                        (double)to_acc(x[at[2]]));
}

// Per-element contributions of the statistics reduction: x - shift and
// (x - shift)^2, shift from channel_shift().
// The vector kernels split add() into load() of V elements at i (i % V ==
// 0) and elem() of element j of that fragment, so that several fragments'
// loads are in flight before their sums.
template <typename T, typename I> struct StatsOp {
  typedef T Elem;
  const T *x;
  I n;
  I C;
  I hw;
  bool nhwc;
  struct Chan {
    double shift;
  };
  __device__ Chan chan(I first) const {
    const I c = nhwc ? first : first / hw;
    return Chan{channel_shift(x, (int64_t)n, (int64_t)c, (int64_t)C, (int64_t)hw, nhwc)};
  }
  __device__ __forceinline__ void add(const Chan &ch, I i, double &a, double &b) const {
    const double v = (double)to_acc(x[i]) - ch.shift;
    a += v;
    b += v * v;
  }
  template <int V> struct Frag {
    Pack<T, V> x;
  };
  template <int V> __device__ __forceinline__ Frag<V> load(I i) const {
    return Frag<V>{load_pack<V>(x + i)};
  }
  template <int V>
  __device__ __forceinline__ void elem(const Chan &ch, const Frag<V> &f, int j, double &a,
                                       double &b) const {
    const double v = (double)to_acc(f.x.v[j]) - ch.shift;
    a += v;
    b += v * v;
  }
  bool vec_ok(unsigned bytes) const { return aligned(x, bytes); }
};

// Per-element contributions of the gradient reduction: g and g * xhat.
template <typename T, typename I> struct GradOp {
  typedef T Elem;
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
  template <int V> struct Frag {
    Pack<T, V> x;
    Pack<T, V> dy;
    unsigned gate;
  };
  template <int V> __device__ __forceinline__ Frag<V> load(I i) const {
    return Frag<V>{load_pack<V>(x + i), load_pack<V>(dy + i), gate.template bits<V>(i)};
  }
  template <int V>
  __device__ __forceinline__ void elem(const Chan &ch, const Frag<V> &f, int j, double &a,
                                       double &b) const {
    const double g = (f.gate >> j) & 1u ? (double)to_acc(f.dy.v[j]) : 0.0;
    a += g;
    b += g * (((double)to_acc(f.x.v[j]) - ch.mean) * ch.invstd);
  }
  bool vec_ok(unsigned bytes) const {
    return aligned(x, bytes) && aligned(dy, bytes) && gate.vec_ok(bytes);
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

// NCHW, vectors of V along hw (hw % V == 0, len % V == 0): the slice's
// vectors in (n, hw) order, two per thread and step.
template <typename Op, typename I, int V>
__global__ void reduce_nchw_vec_kernel(Op op, I C, I hw, I M, I len, double *partials) {
  const I c = blockIdx.x, s = blockIdx.y;
  const I start = s * len;
  const I end = start + len < M ? start + len : M;
  const typename Op::Chan ch = op.chan(c * hw);
  const I hwv = hw / V, vend = end / V, step = blockDim.x;
  double a = 0.0, b = 0.0;
  I m = start / V + threadIdx.x;
  for (; m + step < vend; m += 2 * step) {
    const I m2 = m + step;
    const I n1 = m / hwv, n2 = m2 / hwv;
    const auto f1 = op.template load<V>((n1 * C + c) * hw + (m - n1 * hwv) * V);
    const auto f2 = op.template load<V>((n2 * C + c) * hw + (m2 - n2 * hwv) * V);
#pragma unroll
    for (int j = 0; j < V; j++)
      op.elem(ch, f1, j, a, b);
#pragma unroll
    for (int j = 0; j < V; j++)
      op.elem(ch, f2, j, a, b);
  }
  if (m < vend) {
    const I n1 = m / hwv;
    const auto f1 = op.template load<V>((n1 * C + c) * hw + (m - n1 * hwv) * V);
#pragma unroll
    for (int j = 0; j < V; j++)
      op.elem(ch, f1, j, a, b);
  }
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    partials[((size_t)s * C + c) * 2] = a;
    partials[((size_t)s * C + c) * 2 + 1] = b;
  }
}

// NHWC, vectors of V channels (C % V == 0): block (32/V channel vectors x
// kThreads/(32/V) rows) per (group of 32 channels, slice), the same grid as
// the scalar kernel.  Each thread keeps V sum pairs, one per channel.
template <typename Op, typename I, int V>
__global__ void reduce_nhwc_vec_kernel(Op op, I C, I M, I len, double *partials) {
  constexpr int TX = 32 / V, ROWS = kThreads / TX;
  const I c0 = ((I)blockIdx.x * TX + threadIdx.x) * V, s = blockIdx.y;
  const I start = s * len;
  const I end = start + len < M ? start + len : M;
  double a[V], b[V];
#pragma unroll
  for (int j = 0; j < V; j++)
    a[j] = b[j] = 0.0;
  if (c0 < C) {
    typename Op::Chan ch[V];
#pragma unroll
    for (int j = 0; j < V; j++)
      ch[j] = op.chan(c0 + j);
    I m = start + threadIdx.y;
    for (; m + ROWS < end; m += 2 * ROWS) {
      const auto f1 = op.template load<V>(m * C + c0);
      const auto f2 = op.template load<V>((m + ROWS) * C + c0);
#pragma unroll
      for (int j = 0; j < V; j++) {
        op.elem(ch[j], f1, j, a[j], b[j]);
        op.elem(ch[j], f2, j, a[j], b[j]);
      }
    }
    if (m < end) {
      const auto f1 = op.template load<V>(m * C + c0);
#pragma unroll
      for (int j = 0; j < V; j++)
        op.elem(ch[j], f1, j, a[j], b[j]);
    }
  }
  // sh[k][j][row][x]: sum k (0: a, 1: b) of channel vector x's element j.
  __shared__ double sh[2][V][ROWS][TX];
#pragma unroll
  for (int j = 0; j < V; j++) {
    sh[0][j][threadIdx.y][threadIdx.x] = a[j];
    sh[1][j][threadIdx.y][threadIdx.x] = b[j];
  }
  __syncthreads();
  // 2 * 32 column sums over the ROWS rows, one thread each.
  const int t = threadIdx.y * TX + threadIdx.x;
  if (t < 2 * V * TX) {
    const int k = t / (V * TX), j = (t / TX) % V, x = t % TX;
    double acc = 0.0;
    for (int r = 0; r < ROWS; r++)
      acc += sh[k][j][r][x];
    const I c = ((I)blockIdx.x * TX + x) * V + j;
    if (c < C)
      partials[((size_t)s * C + c) * 2 + k] = acc;
  }
}

// NHWC: at most 4 channels per thread, so that the 2 * V double sums and V
// channel constants of a thread (GradOp: mean and invstd) stay in registers
// at good occupancy; float16/bfloat16 move 8 bytes per access there.
constexpr int kNhwcMaxWidth = 4;

template <typename Op, typename I>
cudaError_t launch_reduce(const fbn_k_shape *s, Op op, double *partials, cudaStream_t stream) {
  typedef typename Op::Elem T;
  const I C = (I)s->c, hw = (I)s->hw, M = (I)(s->n * s->hw);
  const int slices = fbn_k_reduce_slices(s);
  const I len = (M + (I)slices - 1) / (I)slices;
  const int width = pick_width<T>(s->nhwc ? s->c : s->hw, s->nhwc ? kNhwcMaxWidth : 16,
                                  [&](unsigned bytes) { return op.vec_ok(bytes); });
  return with_width<T>(width, [&](auto w) {
    constexpr int V = decltype(w)::value;
    if constexpr (V > 1) {
      if (s->nhwc) {
        // pick_width caps NHWC at kNhwcMaxWidth: no wider kernel is built.
        if constexpr (V <= kNhwcMaxWidth) {
          constexpr int TX = 32 / V;
          dim3 grid((unsigned)((s->c + 31) / 32), (unsigned)slices);
          reduce_nhwc_vec_kernel<Op, I, V>
              <<<grid, dim3(TX, kThreads / TX), 0, stream>>>(op, C, M, len, partials);
        }
      } else {
        // Slices of whole vectors; the last slices may be empty (zero partials).
        const I vlen = (len + V - 1) / V * V;
        dim3 grid((unsigned)s->c, (unsigned)slices);
        reduce_nchw_vec_kernel<Op, I, V>
            <<<grid, kThreads, 0, stream>>>(op, C, hw, M, vlen, partials);
      }
    } else if (s->nhwc) {
      dim3 grid((unsigned)((s->c + 31) / 32), (unsigned)slices);
      reduce_nhwc_kernel<Op, I><<<grid, dim3(32, 8), 0, stream>>>(op, C, M, len, partials);
    } else {
      dim3 grid((unsigned)s->c, (unsigned)slices);
      reduce_nchw_kernel<Op, I><<<grid, kThreads, 0, stream>>>(op, C, hw, M, len, partials);
    }
    return cudaGetLastError();
  });
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
                                      Coef *coef) {
  typedef typename ParamOf<T>::type P;
  const int64_t c = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  if (c >= C)
    return; // the whole warp: c is the warp's channel
  double sum = 0.0, sumsq = 0.0;
  warp_sum_slices(partials, C, c, slices, sum, sumsq);
  if ((threadIdx.x & 31) != 0)
    return;
  const double shift = channel_shift(x, count / hw, c, C, hw, nhwc);
  const fbn_bn_stats st = fbn_bn_stats_from_sums(shift, sum, sumsq, count);
  const double invstd = fbn_bn_stats_invstd(st.var, eps);
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
  coef[c] = st.mean;
  coef[C + c] = w * invstd;
  coef[2 * C + c] = b;
}

template <typename P>
__global__ void eval_prepare_kernel(int64_t C, double eps, const P *weight, const P *bias,
                                    const P *running_mean, const P *running_var, P *save_mean,
                                    P *save_invstd, Coef *coef) {
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
  coef[c] = mean;
  coef[C + c] = w * invstd;
  coef[2 * C + c] = b;
}

template <typename P>
__global__ void grad_finalize_kernel(int64_t C, int64_t count, const double *partials, int slices,
                                     bool batch_stats, const P *weight, const P *mean,
                                     const P *invstd, P *dweight, P *dbias, bool accumulate,
                                     Coef *coef) {
  const int64_t c = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  if (c >= C)
    return; // the whole warp: c is the warp's channel
  double sum_g = 0.0, sum_gx = 0.0;
  if (partials != nullptr)
    warp_sum_slices(partials, C, c, slices, sum_g, sum_gx);
  if ((threadIdx.x & 31) != 0)
    return;
  if (partials != nullptr) {
    // Overwrite never reads the old value (it may be NaN or uninitialized).
    if (dweight != nullptr)
      dweight[c] = (P)(accumulate ? (double)dweight[c] + sum_gx : sum_gx);
    if (dbias != nullptr)
      dbias[c] = (P)(accumulate ? (double)dbias[c] + sum_g : sum_g);
  }
  const double w = weight != nullptr ? (double)weight[c] : 1.0;
  const fbn_bn_grad_coef k =
      fbn_bn_grad_coef_make(w, (double)invstd[c], sum_g, sum_gx, count, batch_stats ? 1 : 0);
  coef[c] = k.k;
  coef[C + c] = (double)mean[c];
  coef[2 * C + c] = k.b;
  coef[3 * C + c] = k.d;
}

// ---- elementwise -------------------------------------------------------------------
// Thread i of the grid handles element i; a warp covers 32 consecutive
// elements starting at a multiple of 32, so its ballot is one mask word.

template <typename T, bool NHWC, typename I>
__global__ void apply_kernel(I numel, I C, I hw, const T *x, const T *z, T *y, uint32_t *mask,
                             const Coef *coef, bool with_relu) {
  typedef typename AccOf<T>::type A;
  const I stride = (I)gridDim.x * blockDim.x;
  for (I base = (I)blockIdx.x * blockDim.x; base < numel; base += stride) {
    const I i = base + threadIdx.x;
    bool positive = false;
    if (i < numel) {
      const I c = channel_of<NHWC>(i, C, hw);
      A v = ((A)to_acc(x[i]) - (A)coef[c]) * (A)coef[C + c] + (A)coef[2 * C + c];
      if (z != nullptr)
        v += to_acc(z[i]);
      const T out = from_acc<T>(with_relu ? relu(v) : v);
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
                                  const Coef *coef, T *dx, T *dz) {
  typedef typename AccOf<T>::type A;
  const I stride = (I)gridDim.x * blockDim.x;
  for (I i = (I)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const A g = gate(i) ? to_acc(dy[i]) : A(0);
    if (dz != nullptr)
      dz[i] = from_acc<T>(g);
    if (dx != nullptr) {
      const I c = channel_of<NHWC>(i, C, hw);
      dx[i] = from_acc<T>((A)coef[c] * g + (A)coef[2 * C + c] * ((A)to_acc(x[i]) - (A)coef[C + c]) +
                          (A)coef[3 * C + c]);
    }
  }
}

// Vector versions: thread vi of the grid handles elements vi*V .. vi*V+V-1
// (V divides 32 and numel: hw or C is a multiple of V).

// Coefficients of row k (coef + k*C) for the V elements at offset i, as
// A: V consecutive channels from i % C (NHWC, C % V == 0) or channel
// (i / hw) % C for all (NCHW, hw % V == 0).
template <typename A, bool NHWC, int V, typename I>
__device__ __forceinline__ Pack<A, V> coef_pack(const Coef *row, I i, I C, I hw) {
  Pack<A, V> r;
  if (NHWC) {
    const Coef *p = row + i % C;
#pragma unroll
    for (int j = 0; j < V; j++)
      r.v[j] = (A)p[j];
    return r;
  }
  const A v = (A)row[(i / hw) % C];
#pragma unroll
  for (int j = 0; j < V; j++)
    r.v[j] = v;
  return r;
}

// Stores the ReLU mask bits of a warp's vectors: the thread at vector vi
// holds bits 0..V-1 for elements vi*V..vi*V+V-1, so 32/V consecutive lanes
// (vi % (32/V) == lane % (32/V), blocks being multiples of 32) make one word,
// assembled by an OR butterfly over the group and written by its first lane.
// Every lane of the warp calls it; invalid lanes pass bits = 0.
template <int V, typename I>
__device__ __forceinline__ void store_mask_bits(uint32_t *mask, unsigned bits, I vi, bool valid) {
  constexpr unsigned kGroup = 32 / V;
  const unsigned lane = threadIdx.x & 31u;
  bits <<= V * (lane % kGroup);
#pragma unroll
  for (unsigned off = 1; off < kGroup; off <<= 1)
    bits |= __shfl_xor_sync(0xffffffffu, bits, off);
  // The group's first vector is valid when any of its vectors is.
  if (valid && lane % kGroup == 0)
    mask[(vi * V) >> 5] = bits;
}

template <typename T, bool NHWC, typename I, int V>
__global__ void apply_vec_kernel(I nvec, I C, I hw, const T *x, const T *z, T *y, uint32_t *mask,
                                 const Coef *coef, bool with_relu) {
  typedef typename AccOf<T>::type A;
  const I stride = (I)gridDim.x * blockDim.x;
  for (I base = (I)blockIdx.x * blockDim.x; base < nvec; base += stride) {
    const I vi = base + threadIdx.x;
    unsigned bits = 0;
    if (vi < nvec) {
      const I i = vi * V;
      const Pack<T, V> xv = load_pack<V>(x + i);
      Pack<T, V> zv{};
      if (z != nullptr)
        zv = load_pack<V>(z + i);
      const Pack<A, V> mean = coef_pack<A, NHWC, V>(coef, i, C, hw);
      const Pack<A, V> scale = coef_pack<A, NHWC, V>(coef + C, i, C, hw);
      const Pack<A, V> shift = coef_pack<A, NHWC, V>(coef + 2 * C, i, C, hw);
      Pack<T, V> out;
#pragma unroll
      for (int j = 0; j < V; j++) {
        A v = ((A)to_acc(xv.v[j]) - mean.v[j]) * scale.v[j] + shift.v[j];
        if (z != nullptr)
          v += to_acc(zv.v[j]);
        out.v[j] = from_acc<T>(with_relu ? relu(v) : v);
        bits |= (unsigned)!(to_acc(out.v[j]) <= A(0)) << j;
      }
      store_pack<V>(y + i, out);
    }
    if (mask != nullptr)
      store_mask_bits<V>(mask, bits, vi, vi < nvec);
  }
}

template <typename T, typename I, int V>
__global__ void add_relu_vec_kernel(I nvec, T *y, const T *z, uint32_t *mask) {
  typedef typename AccOf<T>::type A;
  const I stride = (I)gridDim.x * blockDim.x;
  for (I base = (I)blockIdx.x * blockDim.x; base < nvec; base += stride) {
    const I vi = base + threadIdx.x;
    unsigned bits = 0;
    if (vi < nvec) {
      const I i = vi * V;
      const Pack<T, V> yv = load_pack<V>(y + i);
      Pack<T, V> zv{};
      if (z != nullptr)
        zv = load_pack<V>(z + i);
      Pack<T, V> out;
#pragma unroll
      for (int j = 0; j < V; j++) {
        A v = to_acc(yv.v[j]);
        if (z != nullptr)
          v += to_acc(zv.v[j]);
        out.v[j] = from_acc<T>(relu(v));
        bits |= (unsigned)!(to_acc(out.v[j]) <= A(0)) << j;
      }
      store_pack<V>(y + i, out);
    }
    if (mask != nullptr)
      store_mask_bits<V>(mask, bits, vi, vi < nvec);
  }
}

template <typename T, typename I, int V>
__global__ void mask_grad_vec_kernel(I nvec, const T *dy, Gate<T, I> gate, T *dz) {
  const I stride = (I)gridDim.x * blockDim.x;
  for (I vi = (I)blockIdx.x * blockDim.x + threadIdx.x; vi < nvec; vi += stride) {
    const I i = vi * V;
    const Pack<T, V> dyv = load_pack<V>(dy + i);
    const unsigned g = gate.template bits<V>(i);
    Pack<T, V> out;
#pragma unroll
    for (int j = 0; j < V; j++)
      out.v[j] = (g >> j) & 1u ? dyv.v[j] : from_acc<T>(0);
    store_pack<V>(dz + i, out);
  }
}

template <typename T, bool NHWC, typename I, int V>
__global__ void grad_apply_vec_kernel(I nvec, I C, I hw, const T *x, const T *dy,
                                      Gate<T, I> gate, const Coef *coef, T *dx,
                                      T *dz) {
  typedef typename AccOf<T>::type A;
  const I stride = (I)gridDim.x * blockDim.x;
  for (I vi = (I)blockIdx.x * blockDim.x + threadIdx.x; vi < nvec; vi += stride) {
    const I i = vi * V;
    // All loads before the stores (outputs never alias inputs).
    const Pack<T, V> dyv = load_pack<V>(dy + i);
    const unsigned gb = gate.template bits<V>(i);
    Pack<T, V> xv{};
    if (dx != nullptr)
      xv = load_pack<V>(x + i);
    A g[V];
#pragma unroll
    for (int j = 0; j < V; j++)
      g[j] = (gb >> j) & 1u ? to_acc(dyv.v[j]) : A(0);
    if (dz != nullptr) {
      Pack<T, V> out;
#pragma unroll
      for (int j = 0; j < V; j++)
        out.v[j] = from_acc<T>(g[j]);
      store_pack<V>(dz + i, out);
    }
    if (dx != nullptr) {
      const Pack<A, V> k = coef_pack<A, NHWC, V>(coef, i, C, hw);
      const Pack<A, V> mean = coef_pack<A, NHWC, V>(coef + C, i, C, hw);
      const Pack<A, V> b = coef_pack<A, NHWC, V>(coef + 2 * C, i, C, hw);
      const Pack<A, V> d = coef_pack<A, NHWC, V>(coef + 3 * C, i, C, hw);
      Pack<T, V> out;
#pragma unroll
      for (int j = 0; j < V; j++)
        out.v[j] =
            from_acc<T>(k.v[j] * g[j] + b.v[j] * ((A)to_acc(xv.v[j]) - mean.v[j]) + d.v[j]);
      store_pack<V>(dx + i, out);
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

// The contiguous run a vector of the elementwise kernels must divide: one
// channel (NCHW: hw) or one row of channels (NHWC: C).
int64_t vec_run(const fbn_k_shape *s) { return s->nhwc ? s->c : s->hw; }

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
          s, StatsOp<T, uint32_t>{(const T *)x, (uint32_t)s->n, (uint32_t)s->c, (uint32_t)s->hw,
                                  s->nhwc != 0},
          partials, stream);
    return launch_reduce<StatsOp<T, uint64_t>, uint64_t>(
        s,
        StatsOp<T, uint64_t>{(const T *)x, (uint64_t)s->n, (uint64_t)s->c, (uint64_t)s->hw,
                             s->nhwc != 0},
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
    stats_finalize_kernel<T><<<warp_channel_blocks(s->c), kThreads, 0, stream>>>(
        s->c, s->n * s->hw, s->nhwc != 0, s->hw, (const T *)x, partials, fbn_k_reduce_slices(s),
        eps, factor, (const P *)weight, (const P *)bias, (P *)running_mean, (P *)running_var,
        (P *)save_mean, (P *)save_invstd, (Coef *)coef);
    return cudaGetLastError();
  });
}

extern "C" cudaError_t fbn_k_eval_prepare(const fbn_k_shape *s, double eps, const void *weight,
                                          const void *bias, const void *running_mean,
                                          const void *running_var, void *save_mean,
                                          void *save_invstd, void *coef, cudaStream_t stream) {
  const unsigned blocks = channel_blocks(s->c);
  if (s->dtype == FBN_DTYPE_FLOAT64)
    eval_prepare_kernel<double><<<blocks, kThreads, 0, stream>>>(
        s->c, eps, (const double *)weight, (const double *)bias, (const double *)running_mean,
        (const double *)running_var, (double *)save_mean, (double *)save_invstd, (Coef *)coef);
  else
    eval_prepare_kernel<float><<<blocks, kThreads, 0, stream>>>(
        s->c, eps, (const float *)weight, (const float *)bias, (const float *)running_mean,
        (const float *)running_var, (float *)save_mean, (float *)save_invstd, (Coef *)coef);
  return cudaGetLastError();
}

extern "C" cudaError_t fbn_k_apply(const fbn_k_shape *s, const void *x, const void *z, void *y,
                                   uint32_t *mask, const void *coef, int with_relu,
                                   cudaStream_t stream) {
  const bool relu_on = with_relu != 0;
  return dispatch_dtype(s->dtype, [&](auto tag) {
    typedef decltype(tag) T;
    const T *xt = (const T *)x, *zt = (const T *)z;
    T *yt = (T *)y;
    const Coef *ct = (const Coef *)coef;
    const int width = pick_width<T>(vec_run(s), 16, [&](unsigned bytes) {
      return aligned(x, bytes) && aligned_or_null(z, bytes) && aligned(y, bytes);
    });
    auto run = [&](auto itag) {
      typedef decltype(itag) I;
      const I C = (I)s->c, hw = (I)s->hw;
      return with_width<T>(width, [&](auto w) {
        constexpr int V = decltype(w)::value;
        const I units = (I)(numel_of(s) / V);
        const unsigned blocks = elementwise_blocks((int64_t)units);
        if constexpr (V > 1) {
          if (s->nhwc)
            apply_vec_kernel<T, true, I, V>
                <<<blocks, kThreads, 0, stream>>>(units, C, hw, xt, zt, yt, mask, ct, relu_on);
          else
            apply_vec_kernel<T, false, I, V>
                <<<blocks, kThreads, 0, stream>>>(units, C, hw, xt, zt, yt, mask, ct, relu_on);
        } else {
          if (s->nhwc)
            apply_kernel<T, true, I>
                <<<blocks, kThreads, 0, stream>>>(units, C, hw, xt, zt, yt, mask, ct, relu_on);
          else
            apply_kernel<T, false, I>
                <<<blocks, kThreads, 0, stream>>>(units, C, hw, xt, zt, yt, mask, ct, relu_on);
        }
        return cudaGetLastError();
      });
    };
    return small_index(s) ? run(uint32_t()) : run(uint64_t());
  });
}

extern "C" cudaError_t fbn_k_add_relu(const fbn_k_shape *s, void *y, const void *z,
                                      uint32_t *mask, cudaStream_t stream) {
  return dispatch_dtype(s->dtype, [&](auto tag) {
    typedef decltype(tag) T;
    // Elementwise without channels: only numel % V matters.
    const int width = pick_width<T>(numel_of(s), 16, [&](unsigned bytes) {
      return aligned(y, bytes) && aligned_or_null(z, bytes);
    });
    auto run = [&](auto itag) {
      typedef decltype(itag) I;
      return with_width<T>(width, [&](auto w) {
        constexpr int V = decltype(w)::value;
        const I units = (I)(numel_of(s) / V);
        const unsigned blocks = elementwise_blocks((int64_t)units);
        if constexpr (V > 1)
          add_relu_vec_kernel<T, I, V>
              <<<blocks, kThreads, 0, stream>>>(units, (T *)y, (const T *)z, mask);
        else
          add_relu_kernel<T, I><<<blocks, kThreads, 0, stream>>>(units, (T *)y, (const T *)z, mask);
        return cudaGetLastError();
      });
    };
    return small_index(s) ? run(uint32_t()) : run(uint64_t());
  });
}

extern "C" cudaError_t fbn_k_mask_grad(const fbn_k_shape *s, const void *dy,
                                       const uint32_t *mask, const void *y, void *dz,
                                       cudaStream_t stream) {
  return dispatch_dtype(s->dtype, [&](auto tag) {
    typedef decltype(tag) T;
    auto run = [&](auto itag) {
      typedef decltype(itag) I;
      const Gate<T, I> gate{mask, (const T *)y};
      const int width = pick_width<T>(numel_of(s), 16, [&](unsigned bytes) {
        return aligned(dy, bytes) && aligned(dz, bytes) && gate.vec_ok(bytes);
      });
      return with_width<T>(width, [&](auto w) {
        constexpr int V = decltype(w)::value;
        const I units = (I)(numel_of(s) / V);
        const unsigned blocks = elementwise_blocks((int64_t)units);
        if constexpr (V > 1)
          mask_grad_vec_kernel<T, I, V>
              <<<blocks, kThreads, 0, stream>>>(units, (const T *)dy, gate, (T *)dz);
        else
          mask_grad_kernel<T, I>
              <<<blocks, kThreads, 0, stream>>>(units, (const T *)dy, gate, (T *)dz);
        return cudaGetLastError();
      });
    };
    return small_index(s) ? run(uint32_t()) : run(uint64_t());
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
                                           int accumulate, void *coef, cudaStream_t stream) {
  const unsigned blocks = warp_channel_blocks(s->c);
  const int slices = fbn_k_reduce_slices(s);
  if (s->dtype == FBN_DTYPE_FLOAT64)
    grad_finalize_kernel<double><<<blocks, kThreads, 0, stream>>>(
        s->c, s->n * s->hw, partials, slices, batch_stats != 0, (const double *)weight,
        (const double *)mean, (const double *)invstd, (double *)dweight, (double *)dbias,
        accumulate != 0, (Coef *)coef);
  else
    grad_finalize_kernel<float><<<blocks, kThreads, 0, stream>>>(
        s->c, s->n * s->hw, partials, slices, batch_stats != 0, (const float *)weight,
        (const float *)mean, (const float *)invstd, (float *)dweight, (float *)dbias,
        accumulate != 0, (Coef *)coef);
  return cudaGetLastError();
}

extern "C" cudaError_t fbn_k_grad_apply(const fbn_k_shape *s, const void *x, const void *dy,
                                        const uint32_t *mask, const void *y, const void *coef,
                                        void *dx, void *dz, cudaStream_t stream) {
  return dispatch_dtype(s->dtype, [&](auto tag) {
    typedef decltype(tag) T;
    const T *xt = (const T *)x, *dyt = (const T *)dy;
    const Coef *ct = (const Coef *)coef;
    auto run = [&](auto itag) {
      typedef decltype(itag) I;
      const I C = (I)s->c, hw = (I)s->hw;
      const Gate<T, I> gate{mask, (const T *)y};
      // x and coef are read only for dx.
      const int width = pick_width<T>(vec_run(s), 16, [&](unsigned bytes) {
        return aligned(dy, bytes) && gate.vec_ok(bytes) && aligned_or_null(dz, bytes) &&
               (dx == nullptr || (aligned(dx, bytes) && aligned(x, bytes)));
      });
      return with_width<T>(width, [&](auto w) {
        constexpr int V = decltype(w)::value;
        const I units = (I)(numel_of(s) / V);
        const unsigned blocks = elementwise_blocks((int64_t)units);
        if constexpr (V > 1) {
          if (s->nhwc)
            grad_apply_vec_kernel<T, true, I, V><<<blocks, kThreads, 0, stream>>>(
                units, C, hw, xt, dyt, gate, ct, (T *)dx, (T *)dz);
          else
            grad_apply_vec_kernel<T, false, I, V><<<blocks, kThreads, 0, stream>>>(
                units, C, hw, xt, dyt, gate, ct, (T *)dx, (T *)dz);
        } else {
          if (s->nhwc)
            grad_apply_kernel<T, true, I><<<blocks, kThreads, 0, stream>>>(
                units, C, hw, xt, dyt, gate, ct, (T *)dx, (T *)dz);
          else
            grad_apply_kernel<T, false, I><<<blocks, kThreads, 0, stream>>>(
                units, C, hw, xt, dyt, gate, ct, (T *)dx, (T *)dz);
        }
        return cudaGetLastError();
      });
    };
    return small_index(s) ? run(uint32_t()) : run(uint64_t());
  });
}
