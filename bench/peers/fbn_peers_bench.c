/*
 * fbn-peers-bench: fusedbn's CPU module against its peers, in one run.
 *
 *   fusedbn          the library (fast CPU backend unless FBN_CPU_BACKEND says
 *                    otherwise): y = ReLU(BN(x) + z) in one call
 *   onednn           (built with oneDNN only) the best correct oneDNN 2.x
 *                    sequence: batch-norm forward with scale and shift into y,
 *                    then an in-place binary add of z with a ReLU post-op.
 *                    (oneDNN 2.x's fuse_norm_relu computes ReLU(BN(x)) + z,
 *                    which is not this operator.)
 *   onednn-unfused   batch norm, binary add, eltwise ReLU: three primitives
 *   backward         fusedbn backward (dx, daddend, dweight, dbias) against
 *                    oneDNN's eltwise ReLU backward (from y: daddend) followed
 *                    by batch-norm backward (dx, dscale, dshift)
 *   memcpy-floor     per pass, shape and layout: a 2-thread copy (non-temporal
 *                    stores, copy_nt_2threads) moving the
 *                    pass's minimal traffic (16 bytes per element for a
 *                    training forward: x read twice, addend once, y written;
 *                    12 for eval, 20 for backward), timed interleaved with
 *                    the implementations: the memory floor
 *   copy2-floor      the same copy with two sets of streams per thread (each
 *                    thread's half cut in two parts copied in turn), as the
 *                    library's large loops read and write: a stricter floor,
 *                    shown beside the goal's
 *   two-pass-loops   forward training only: plain loops reading x, then
 *                    normalizing it (twopass_2threads): the floor's traffic
 *                    with a read-only first pass, as batch statistics need
 *   copy             memcpy with 2 threads over 512 MiB at the start and the
 *                    end: the machine's copy bandwidth
 *
 * PyTorch runs from torch_peer.py with the same CSV output; scripts/
 * cpu-bench-table runs both, twice, and writes docs/benchmarks.md.
 *
 * Every buffer is allocated and written before timing (page faults cost
 * ~7 us each on these machines). Each implementation is timed call by call,
 * interleaved with the others, and the median of --reps calls is reported.
 * Before timing, the peers' outputs are checked against fusedbn's, so that a
 * peer that computes something else cannot be benchmarked.
 *
 * Output: CSV on stdout, "# ..." lines are comments.
 *   pass,n,c,h,w,layout,impl,median_ms,min_ms,reps
 *   copy,0,0,0,0,-,memcpy,median_ms,min_ms,reps      (plus "# copy_gbs=...")
 */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fusedbn/fusedbn.h"

#include "../bench_time.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#ifdef FBN_PEERS_HAVE_ONEDNN
#include <oneapi/dnnl/dnnl.h>
#endif

/* ---- configuration ------------------------------------------------------ */

typedef struct peers_shape {
  int64_t n, c, h, w;
} peers_shape;

/* ResNet-50's batch-norm shapes at batch 32 (one per stage width). */
static const peers_shape resnet50_shapes[] = {
    {32, 64, 56, 56}, {32, 256, 56, 56}, {32, 512, 28, 28}, {32, 1024, 14, 14}, {32, 2048, 7, 7},
};
/* --quick: the same channel counts at batch 2. */
static const peers_shape quick_shapes[] = {
    {2, 64, 56, 56}, {2, 256, 56, 56}, {2, 512, 28, 28}, {2, 1024, 14, 14}, {2, 2048, 7, 7},
};
#define PEERS_NUM_SHAPES 5

enum { PASS_TRAIN_FWD, PASS_EVAL_FWD, PASS_BWD, PASS_COUNT };
static const char *const pass_names[PASS_COUNT] = {"train_fwd", "eval_fwd", "bwd"};
/* Minimal traffic of each pass, float32 bytes per element (read + written):
 * the memory floor. */
static const int floor_bytes[PASS_COUNT] = {16, 12, 20};

typedef struct peers_config {
  int reps;
  int warmup;
  bool quick;
  bool layouts[2]; /* NCHW, NHWC */
  bool onednn;
  size_t copy_bytes;
  size_t evict_bytes;  /* read before every timed call (0: none) */
  bool have_one_shape; /* --shape: only this one */
  peers_shape one_shape;
} peers_config;

/* ---- utilities ---------------------------------------------------------- */

static void die(const char *what, const char *detail) {
  fprintf(stderr, "fbn-peers-bench: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  exit(1);
}

/* Page-aligned buffer, every page written. */
static void *alloc_touched(size_t bytes) {
  const size_t rounded = (bytes + 4095) / 4096 * 4096;
  void *p = aligned_alloc(4096, rounded ? rounded : 4096);
  if (p == NULL)
    die("out of memory", NULL);
  memset(p, 0, rounded);
  return p;
}

/*
 * Read `bytes` of a buffer with 2 threads, untimed, before every timed call
 * (implementations and floors alike), so that each call starts from the same
 * state: cold caches holding clean lines. Without it a call pays for writing
 * back the dirty lines the previous call left (oneDNN writes its outputs
 * with ordinary stores; on the 12.8 MB tensors that is up to ~0.5 ms of the
 * next call, whichever implementation comes next), and a small tensor's
 * inputs may still be in the 32 MiB L3 from an earlier call.
 */
static const uint64_t *evict_buf;
static size_t evict_words;

static volatile uint64_t evict_sink;

static void evict_caches(void) {
  uint64_t sum = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(2) reduction(+ : sum) schedule(static)
#endif
  for (size_t i = 0; i < evict_words; i += 8) /* one word per 64-byte line */
    sum += evict_buf[i];
  evict_sink = sum;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15u;

static double rng_unit(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return (double)(rng_state >> 11) * 0x1.0p-53;
}

static void fill_random(float *p, size_t count, double offset, double scale) {
  for (size_t i = 0; i < count; i++)
    p[i] = (float)(offset + scale * (2.0 * rng_unit() - 1.0));
}

#ifdef FBN_PEERS_HAVE_ONEDNN
/* Largest |a - b| / (1 + |b|) over the elements (NaN counts as infinite):
 * the agreement check of oneDNN's outputs with fusedbn's. */
static double max_rel_diff(const float *a, const float *b, size_t count) {
  double worst = 0.0;
  for (size_t i = 0; i < count; i++) {
    const double d = fabs((double)a[i] - (double)b[i]) / (1.0 + fabs((double)b[i]));
    if (!(d <= worst))
      worst = isnan(d) ? INFINITY : d;
  }
  return worst;
}
#endif

/* ---- copy bandwidth ----------------------------------------------------- */

/* dst <- src, `bytes`, split between 2 threads (one without OpenMP). */
static void copy_2threads(char *dst, const char *src, size_t bytes) {
#ifdef _OPENMP
#pragma omp parallel num_threads(2)
  {
    const size_t half = bytes / 2, id = (size_t)omp_get_thread_num();
    memcpy(dst + id * half, src + id * half, id ? bytes - half : half);
  }
#else
  memcpy(dst, src, bytes);
#endif
}

/* The same with non-temporal stores, 256 bytes per step (32-byte AVX
 * stores where the CPU has AVX: up to ~8% faster than 16-byte ones here):
 * glibc's memcpy changes strategy with the size (measured here: 20-22 GB/s
 * on 100-200 MB, 34-35 GB/s on 512 MiB), this loop does not (31-37 GB/s
 * on both), so that floors of every size are measured alike. parts (1 or 2):
 * the buffers are cut into that many parts, copied 256 bytes of each in
 * turn (two sets of streams in flight per core: 20-30% faster here, as the
 * library's loops). dst and src 64-byte aligned, bytes a multiple of
 * 256 * parts. */
#if defined(__x86_64__) && defined(__GNUC__)
/* The loop of both: V, the vector type; LOAD, STREAM its intrinsics; W, its
 * bytes. Four vectors per step, 256 bytes of each part in turn. */
#define COPY_NT_BODY(V, LOAD, STREAM, W)                                                        \
  do {                                                                                         \
    const size_t part = bytes / parts;                                                         \
    for (size_t i = 0; i < part; i += 256)                                                     \
      for (size_t p = 0; p < parts; p++)                                                       \
        for (size_t j = p * part + i; j < p * part + i + 256; j += 4 * (W)) {                  \
          const V a = LOAD((const V *)(src + j)), b = LOAD((const V *)(src + j + (W)));        \
          const V c = LOAD((const V *)(src + j + 2 * (W)));                                    \
          const V e = LOAD((const V *)(src + j + 3 * (W)));                                    \
          STREAM((V *)(dst + j), a);                                                           \
          STREAM((V *)(dst + j + (W)), b);                                                     \
          STREAM((V *)(dst + j + 2 * (W)), c);                                                 \
          STREAM((V *)(dst + j + 3 * (W)), e);                                                 \
        }                                                                                      \
    _mm_sfence();                                                                              \
  } while (0)

__attribute__((target("avx"))) static void copy_nt_avx(char *dst, const char *src, size_t bytes,
                                                       size_t parts) {
  COPY_NT_BODY(__m256i, _mm256_load_si256, _mm256_stream_si256, 32);
}

static void copy_nt_sse2(char *dst, const char *src, size_t bytes, size_t parts) {
  COPY_NT_BODY(__m128i, _mm_load_si128, _mm_stream_si128, 16);
}
#undef COPY_NT_BODY
#endif

/* bytes: a multiple of 512 * parts. */
static void copy_nt_2threads(char *dst, const char *src, size_t bytes, size_t parts) {
#if defined(__x86_64__) && defined(__GNUC__)
  const bool avx = __builtin_cpu_supports("avx");
#ifdef _OPENMP
#pragma omp parallel num_threads(2)
  {
    const size_t half = bytes / 2, id = (size_t)omp_get_thread_num();
    if (avx)
      copy_nt_avx(dst + id * half, src + id * half, half, parts);
    else
      copy_nt_sse2(dst + id * half, src + id * half, half, parts);
  }
#else
  if (avx)
    copy_nt_avx(dst, src, bytes, parts);
  else
    copy_nt_sse2(dst, src, bytes, parts);
#endif
#else
  (void)parts;
  copy_2threads(dst, src, bytes);
#endif
}

/*
 * "two-pass-loops": the two plain passes of a training forward whose x does
 * not stay in the caches between its statistics and its normalization. A
 * read of x (a sum: no per-channel work), then y = max(x * s + z, 0) with
 * non-temporal stores: the floor's 16 bytes per element, but the first pass
 * only reads, as every implementation of batch statistics must (no element
 * of y before all of x is read) unless it overlaps the two, as fusedbn's
 * NCHW pipeline does. Same threads as the floors, each its half; the read in
 * 4 parts, the normalization in 2 (256 bytes of each in turn: the fastest
 * of 1, 2, 4 and 8 parts measured here). Not a goal check: it shows how much
 * of fusedbn / floor is the read-only pass, and (fusedbn / two-pass-loops)
 * how much is the module's own per-element work. n: a multiple of
 * 2 * 4 * 64; buffers 64-byte aligned.
 */
static volatile float twopass_sink;

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx"))) static void twopass_avx(const float *x, const float *z, float *y,
                                                       size_t n) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  const size_t part4 = n / 4, part2 = n / 2;
  for (size_t i = 0; i < part4; i += 64)
    for (size_t p = 0; p < 4; p++)
      for (size_t j = p * part4 + i; j < p * part4 + i + 64; j += 32)
        for (int k = 0; k < 4; k++)
          acc[k] = _mm256_add_ps(acc[k], _mm256_load_ps(x + j + 8 * k));
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]),
                                        _mm256_add_ps(acc[2], acc[3])));
  twopass_sink = lanes[0];
  const __m256 s = _mm256_set1_ps(0.5f), zero = _mm256_setzero_ps();
  for (size_t i = 0; i < part2; i += 64)
    for (size_t p = 0; p < 2; p++)
      for (size_t j = p * part2 + i; j < p * part2 + i + 64; j += 8) {
        const __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_load_ps(x + j), s),
                                       _mm256_load_ps(z + j));
        _mm256_stream_ps(y + j, _mm256_max_ps(v, zero));
      }
  _mm_sfence();
}
#endif

static void twopass_plain(const float *x, const float *z, float *y, size_t n) {
  float acc = 0.0f;
  for (size_t i = 0; i < n; i++)
    acc += x[i];
  twopass_sink = acc;
  for (size_t i = 0; i < n; i++) {
    const float v = x[i] * 0.5f + z[i];
    y[i] = v > 0.0f ? v : 0.0f;
  }
}

static void twopass_2threads(const float *x, const float *z, float *y, size_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  const bool avx = __builtin_cpu_supports("avx");
#else
  const bool avx = false;
#endif
#ifdef _OPENMP
#pragma omp parallel num_threads(2)
#endif
  {
#ifdef _OPENMP
    const size_t half = n / 2, id = (size_t)omp_get_thread_num();
#else
    const size_t half = n, id = 0;
#endif
#if defined(__x86_64__) && defined(__GNUC__)
    if (avx)
      twopass_avx(x + id * half, z + id * half, y + id * half, half);
    else
#endif
      twopass_plain(x + id * half, z + id * half, y + id * half, half);
  }
}

/* Median time of a 2-thread memcpy of `bytes`; bandwidth counts bytes read
 * plus bytes written. */
static double measure_copy(const peers_config *cfg, double *best_ms) {
  const size_t bytes = cfg->copy_bytes;
  char *src = alloc_touched(bytes), *dst = alloc_touched(bytes);
  memset(src, 1, bytes);
  const int total = cfg->warmup + cfg->reps;
  double *t = calloc((size_t)total, sizeof *t);
  for (int r = 0; r < total; r++) {
    const double t0 = bench_now_s();
    copy_2threads(dst, src, bytes);
    t[r] = bench_now_s() - t0;
  }
  double *timed = t + cfg->warmup;
  const double med = bench_median(timed, cfg->reps);
  *best_ms = 1e3 * timed[0];
  free(t);
  free(src);
  free(dst);
  return med;
}

/* ---- fusedbn ------------------------------------------------------------ */

typedef struct ours {
  fbn_module *m;
  fbn_saved *saved;
  fbn_tensor_desc d;
} ours;

static void check_fbn(fbn_status st, const char *what) {
  if (st != FBN_STATUS_SUCCESS) {
    char buf[1200];
    snprintf(buf, sizeof buf, "%s (%s)", fbn_last_error_message(), fbn_status_string(st));
    die(what, buf);
  }
}

static void ours_init(ours *o, const peers_shape *s, fbn_layout layout, const float *weight,
                      const float *bias) {
  fbn_module_options opt;
  fbn_module_options_init(&opt);
  opt.num_features = s->c;
  check_fbn(fbn_module_create(&opt, &o->m), "fbn_module_create");
  check_fbn(fbn_saved_create(&o->saved), "fbn_saved_create");
  check_fbn(fbn_module_write_buffer(o->m, FBN_BUFFER_WEIGHT, FBN_DTYPE_FLOAT32, weight,
                                    (size_t)s->c),
            "write weight");
  check_fbn(fbn_module_write_buffer(o->m, FBN_BUFFER_BIAS, FBN_DTYPE_FLOAT32, bias, (size_t)s->c),
            "write bias");
  o->d = fbn_tensor_desc_make(s->n, s->c, s->h, s->w, FBN_DTYPE_FLOAT32, layout);
}

static void ours_fini(ours *o) {
  fbn_saved_destroy(o->saved);
  fbn_module_destroy(o->m);
}

/* ---- oneDNN ------------------------------------------------------------- */

#ifdef FBN_PEERS_HAVE_ONEDNN
#define DNNL_CHECK(call)                                                                       \
  do {                                                                                         \
    dnnl_status_t dnnl_st_ = (call);                                                           \
    if (dnnl_st_ != dnnl_success) {                                                            \
      char buf_[256];                                                                          \
      snprintf(buf_, sizeof buf_, "%s failed with status %d", #call, (int)dnnl_st_);           \
      die("oneDNN", buf_);                                                                     \
    }                                                                                          \
  } while (0)

typedef struct dnnl_peer {
  dnnl_engine_t engine;
  dnnl_stream_t stream;
  dnnl_primitive_t bn_train, bn_infer, add_relu, add, relu, relu_bwd, bn_bwd;
  dnnl_memory_t x, z, y, dy, dz, dx, scale, shift, mean, var, dscale, dshift;
  char impl[7][128];
} dnnl_peer;

static dnnl_primitive_t dnnl_make(const_dnnl_op_desc_t desc, const_dnnl_primitive_attr_t attr,
                                  dnnl_engine_t engine, const_dnnl_primitive_desc_t hint,
                                  dnnl_primitive_desc_t *pd_out, char *impl) {
  dnnl_primitive_desc_t pd;
  DNNL_CHECK(dnnl_primitive_desc_create(&pd, desc, attr, engine, hint));
  const char *info = NULL;
  DNNL_CHECK(dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &info));
  snprintf(impl, 128, "%s", info ? info : "?");
  dnnl_primitive_t p;
  DNNL_CHECK(dnnl_primitive_create(&p, pd));
  if (pd_out != NULL)
    *pd_out = pd;
  else
    DNNL_CHECK(dnnl_primitive_desc_destroy(pd));
  return p;
}

static void dnnl_peer_init(dnnl_peer *p, const peers_shape *s, fbn_layout layout, float *x,
                           float *z, float *y, float *dy, float *dz, float *dx, float *weight,
                           float *bias, float *mean, float *var, float *dscale, float *dshift) {
  memset(p, 0, sizeof *p);
  DNNL_CHECK(dnnl_engine_create(&p->engine, dnnl_cpu, 0));
  DNNL_CHECK(dnnl_stream_create(&p->stream, p->engine, dnnl_stream_default_flags));
  const dnnl_dims_t dims = {s->n, s->c, s->h, s->w};
  const dnnl_dims_t cdims = {s->c};
  dnnl_memory_desc_t data_md, chan_md;
  DNNL_CHECK(dnnl_memory_desc_init_by_tag(&data_md, 4, dims, dnnl_f32,
                                          layout == FBN_LAYOUT_NCHW ? dnnl_nchw : dnnl_nhwc));
  DNNL_CHECK(dnnl_memory_desc_init_by_tag(&chan_md, 1, cdims, dnnl_f32, dnnl_a));
  struct {
    dnnl_memory_t *mem;
    const dnnl_memory_desc_t *md;
    void *ptr;
  } mems[] = {
      {&p->x, &data_md, x},          {&p->z, &data_md, z},          {&p->y, &data_md, y},
      {&p->dy, &data_md, dy},        {&p->dz, &data_md, dz},        {&p->dx, &data_md, dx},
      {&p->scale, &chan_md, weight}, {&p->shift, &chan_md, bias},   {&p->mean, &chan_md, mean},
      {&p->var, &chan_md, var},      {&p->dscale, &chan_md, dscale}, {&p->dshift, &chan_md, dshift},
  };
  for (size_t i = 0; i < sizeof mems / sizeof mems[0]; i++)
    DNNL_CHECK(dnnl_memory_create(mems[i].mem, mems[i].md, p->engine, mems[i].ptr));

  const float eps = 1e-5f;
  dnnl_batch_normalization_desc_t bnd;
  dnnl_primitive_desc_t bn_train_pd;
  DNNL_CHECK(dnnl_batch_normalization_forward_desc_init(&bnd, dnnl_forward_training, &data_md, eps,
                                                        dnnl_use_scale | dnnl_use_shift));
  p->bn_train = dnnl_make(&bnd, NULL, p->engine, NULL, &bn_train_pd, p->impl[0]);
  DNNL_CHECK(dnnl_batch_normalization_forward_desc_init(
      &bnd, dnnl_forward_inference, &data_md, eps,
      dnnl_use_global_stats | dnnl_use_scale | dnnl_use_shift));
  p->bn_infer = dnnl_make(&bnd, NULL, p->engine, NULL, NULL, p->impl[1]);

  /* binary add with a ReLU post-op, and without */
  dnnl_binary_desc_t bd;
  DNNL_CHECK(dnnl_binary_desc_init(&bd, dnnl_binary_add, &data_md, &data_md, &data_md));
  dnnl_post_ops_t ops;
  dnnl_primitive_attr_t attr;
  DNNL_CHECK(dnnl_post_ops_create(&ops));
  DNNL_CHECK(dnnl_post_ops_append_eltwise(ops, 1.0f, dnnl_eltwise_relu, 0.0f, 0.0f));
  DNNL_CHECK(dnnl_primitive_attr_create(&attr));
  DNNL_CHECK(dnnl_primitive_attr_set_post_ops(attr, ops));
  p->add_relu = dnnl_make(&bd, attr, p->engine, NULL, NULL, p->impl[2]);
  DNNL_CHECK(dnnl_primitive_attr_destroy(attr));
  DNNL_CHECK(dnnl_post_ops_destroy(ops));
  p->add = dnnl_make(&bd, NULL, p->engine, NULL, NULL, p->impl[3]);

  /* ReLU forward (in place) and its backward from the output */
  dnnl_eltwise_desc_t ed;
  DNNL_CHECK(dnnl_eltwise_forward_desc_init(&ed, dnnl_forward_training,
                                            dnnl_eltwise_relu_use_dst_for_bwd, &data_md, 0.0f,
                                            0.0f));
  dnnl_primitive_desc_t relu_pd;
  p->relu = dnnl_make(&ed, NULL, p->engine, NULL, &relu_pd, p->impl[4]);
  DNNL_CHECK(dnnl_eltwise_backward_desc_init(&ed, dnnl_eltwise_relu_use_dst_for_bwd, &data_md,
                                             &data_md, 0.0f, 0.0f));
  p->relu_bwd = dnnl_make(&ed, NULL, p->engine, relu_pd, NULL, p->impl[5]);
  DNNL_CHECK(dnnl_primitive_desc_destroy(relu_pd));

  DNNL_CHECK(dnnl_batch_normalization_backward_desc_init(&bnd, dnnl_backward, &data_md, &data_md,
                                                         eps, dnnl_use_scale | dnnl_use_shift));
  p->bn_bwd = dnnl_make(&bnd, NULL, p->engine, bn_train_pd, NULL, p->impl[6]);
  DNNL_CHECK(dnnl_primitive_desc_destroy(bn_train_pd));
}

static void dnnl_exec(dnnl_peer *p, dnnl_primitive_t prim, int nargs, const dnnl_exec_arg_t *args) {
  DNNL_CHECK(dnnl_primitive_execute(prim, p->stream, nargs, args));
}

/* Training forward; unfused: three primitives, else two. */
static void dnnl_train_fwd(dnnl_peer *p, bool unfused) {
  const dnnl_exec_arg_t bn[] = {
      {DNNL_ARG_SRC, p->x},         {DNNL_ARG_DST, p->y},       {DNNL_ARG_SCALE, p->scale},
      {DNNL_ARG_SHIFT, p->shift},   {DNNL_ARG_MEAN, p->mean},   {DNNL_ARG_VARIANCE, p->var},
  };
  const dnnl_exec_arg_t add[] = {{DNNL_ARG_SRC_0, p->y}, {DNNL_ARG_SRC_1, p->z}, {DNNL_ARG_DST, p->y}};
  const dnnl_exec_arg_t relu[] = {{DNNL_ARG_SRC, p->y}, {DNNL_ARG_DST, p->y}};
  dnnl_exec(p, p->bn_train, 6, bn);
  if (unfused) {
    dnnl_exec(p, p->add, 3, add);
    dnnl_exec(p, p->relu, 2, relu);
  } else {
    dnnl_exec(p, p->add_relu, 3, add);
  }
  DNNL_CHECK(dnnl_stream_wait(p->stream));
}

static void dnnl_eval_fwd(dnnl_peer *p, bool unfused) {
  const dnnl_exec_arg_t bn[] = {
      {DNNL_ARG_SRC, p->x},         {DNNL_ARG_DST, p->y},       {DNNL_ARG_SCALE, p->scale},
      {DNNL_ARG_SHIFT, p->shift},   {DNNL_ARG_MEAN, p->mean},   {DNNL_ARG_VARIANCE, p->var},
  };
  const dnnl_exec_arg_t add[] = {{DNNL_ARG_SRC_0, p->y}, {DNNL_ARG_SRC_1, p->z}, {DNNL_ARG_DST, p->y}};
  const dnnl_exec_arg_t relu[] = {{DNNL_ARG_SRC, p->y}, {DNNL_ARG_DST, p->y}};
  dnnl_exec(p, p->bn_infer, 6, bn);
  if (unfused) {
    dnnl_exec(p, p->add, 3, add);
    dnnl_exec(p, p->relu, 2, relu);
  } else {
    dnnl_exec(p, p->add_relu, 3, add);
  }
  DNNL_CHECK(dnnl_stream_wait(p->stream));
}

/* daddend = dy * (y > 0), then batch-norm backward of daddend. */
static void dnnl_bwd(dnnl_peer *p) {
  const dnnl_exec_arg_t relu[] = {{DNNL_ARG_DST, p->y}, {DNNL_ARG_DIFF_DST, p->dy},
                                  {DNNL_ARG_DIFF_SRC, p->dz}};
  const dnnl_exec_arg_t bn[] = {
      {DNNL_ARG_SRC, p->x},           {DNNL_ARG_MEAN, p->mean},         {DNNL_ARG_VARIANCE, p->var},
      {DNNL_ARG_DIFF_DST, p->dz},     {DNNL_ARG_SCALE, p->scale},       {DNNL_ARG_SHIFT, p->shift},
      {DNNL_ARG_DIFF_SRC, p->dx},     {DNNL_ARG_DIFF_SCALE, p->dscale}, {DNNL_ARG_DIFF_SHIFT, p->dshift},
  };
  dnnl_exec(p, p->relu_bwd, 3, relu);
  dnnl_exec(p, p->bn_bwd, 9, bn);
  DNNL_CHECK(dnnl_stream_wait(p->stream));
}

static void dnnl_peer_fini(dnnl_peer *p) {
  dnnl_primitive_t prims[] = {p->bn_train, p->bn_infer, p->add_relu, p->add,
                              p->relu,     p->relu_bwd, p->bn_bwd};
  for (size_t i = 0; i < sizeof prims / sizeof prims[0]; i++)
    dnnl_primitive_destroy(prims[i]);
  dnnl_memory_t mems[] = {p->x,     p->z,     p->y,    p->dy,  p->dz,     p->dx,
                          p->scale, p->shift, p->mean, p->var, p->dscale, p->dshift};
  for (size_t i = 0; i < sizeof mems / sizeof mems[0]; i++)
    dnnl_memory_destroy(mems[i]);
  dnnl_stream_destroy(p->stream);
  dnnl_engine_destroy(p->engine);
}
#endif /* FBN_PEERS_HAVE_ONEDNN */

/* ---- one shape ---------------------------------------------------------- */

/* IMPL_FLOOR: a 2-thread copy moving the pass's minimal traffic
 * (floor_bytes / 2 per element copied: read + written), timed in the same
 * interleaving as the implementations, so that the floor is measured under
 * the same conditions of the shared machine as the calls it is compared
 * with (its bandwidth moves by 10-40% within a minute here). */
enum {
  IMPL_OURS,
  IMPL_FLOOR,
  IMPL_FLOOR2,
  IMPL_TWOPASS,
  IMPL_DNNL,
  IMPL_DNNL_UNFUSED,
  IMPL_COUNT
};
static const char *const impl_names[IMPL_COUNT] = {
    "fusedbn", "memcpy-floor", "copy2-floor", "two-pass-loops", "onednn", "onednn-unfused"};

/* Whether implementation i is timed for this pass. */
static bool impl_applies(const peers_config *cfg, int i, int pass) {
  switch (i) {
  case IMPL_TWOPASS:
    return pass == PASS_TRAIN_FWD;
  case IMPL_DNNL:
    return cfg->onednn;
  case IMPL_DNNL_UNFUSED:
    return cfg->onednn && pass != PASS_BWD;
  default:
    return true;
  }
}

typedef struct shape_bufs {
  size_t numel;
  float *x, *z, *dy;
  float *y_ours, *dx_ours, *dz_ours;
  float *y_dnnl, *dx_dnnl, *dz_dnnl;
  float *weight, *bias, *mean, *var, *dscale, *dshift;
  char *copy_src, *copy_dst; /* the floors' copies: 10 bytes per element (also
                                the output of two-pass-loops) */
} shape_bufs;

static void run_shape(const peers_config *cfg, const peers_shape *s, fbn_layout layout) {
  shape_bufs b;
  b.numel = (size_t)(s->n * s->c * s->h * s->w);
  const size_t bytes = b.numel * sizeof(float), cbytes = (size_t)s->c * sizeof(float);
  float **big[] = {&b.x, &b.z, &b.dy, &b.y_ours, &b.dx_ours, &b.dz_ours};
  for (size_t i = 0; i < sizeof big / sizeof big[0]; i++)
    *big[i] = alloc_touched(bytes);
  b.y_dnnl = b.dx_dnnl = b.dz_dnnl = NULL;
  if (cfg->onednn) {
    b.y_dnnl = alloc_touched(bytes);
    b.dx_dnnl = alloc_touched(bytes);
    b.dz_dnnl = alloc_touched(bytes);
  }
  float **small[] = {&b.weight, &b.bias, &b.mean, &b.var, &b.dscale, &b.dshift};
  for (size_t i = 0; i < sizeof small / sizeof small[0]; i++)
    *small[i] = alloc_touched(cbytes);
  b.copy_src = alloc_touched(b.numel * (size_t)floor_bytes[PASS_BWD] / 2);
  b.copy_dst = alloc_touched(b.numel * (size_t)floor_bytes[PASS_BWD] / 2);
  fill_random(b.x, b.numel, 0.5, 2.0);
  fill_random(b.z, b.numel, 0.0, 1.0);
  fill_random(b.dy, b.numel, 0.0, 1.0);
  fill_random(b.weight, (size_t)s->c, 1.0, 0.5);
  fill_random(b.bias, (size_t)s->c, 0.0, 0.5);

  ours o;
  ours_init(&o, s, layout, b.weight, b.bias);
  const char *lname = layout == FBN_LAYOUT_NCHW ? "NCHW" : "NHWC";

#ifdef FBN_PEERS_HAVE_ONEDNN
  dnnl_peer dp;
  if (cfg->onednn) {
    dnnl_peer_init(&dp, s, layout, b.x, b.z, b.y_dnnl, b.dy, b.dz_dnnl, b.dx_dnnl, b.weight,
                   b.bias, b.mean, b.var, b.dscale, b.dshift);
    static const char *const what[7] = {"bnorm-train", "bnorm-infer", "binary-add-relu",
                                        "binary-add", "eltwise-relu", "eltwise-relu-bwd",
                                        "bnorm-bwd"};
    for (int i = 0; i < 7; i++)
      printf("# onednn %s (%lld,%lld,%lld,%lld) %s: %s\n", what[i], (long long)s->n,
             (long long)s->c, (long long)s->h, (long long)s->w, lname, dp.impl[i]);
    /* The peers must compute what we compute. */
    check_fbn(fbn_module_forward(o.m, &o.d, b.x, b.z, b.y_ours, o.saved, NULL, 0), "forward");
    dnnl_train_fwd(&dp, false);
    const double d_fused = max_rel_diff(b.y_dnnl, b.y_ours, b.numel);
    dnnl_train_fwd(&dp, true);
    const double d_unfused = max_rel_diff(b.y_dnnl, b.y_ours, b.numel);
    check_fbn(fbn_module_backward(o.m, o.saved, &o.d, b.x, b.y_ours, b.dy, b.dx_ours, b.dz_ours,
                                  NULL, 0),
              "backward");
    /* Both backwards from fusedbn's y: the same ReLU mask (elements of y
     * within rounding of 0 may be masked differently otherwise). */
    memcpy(b.y_dnnl, b.y_ours, bytes);
    dnnl_bwd(&dp);
    const double d_dx = max_rel_diff(b.dx_dnnl, b.dx_ours, b.numel);
    const double d_dz = max_rel_diff(b.dz_dnnl, b.dz_ours, b.numel);
    printf("# check (%lld,%lld,%lld,%lld) %s: max |onednn - fusedbn| / (1 + |fusedbn|): "
           "y %.2g, y unfused %.2g, dx %.2g, daddend %.2g\n",
           (long long)s->n, (long long)s->c, (long long)s->h, (long long)s->w, lname, d_fused,
           d_unfused, d_dx, d_dz);
    if (!(d_fused < 1e-3 && d_unfused < 1e-3 && d_dx < 1e-3 && d_dz < 1e-3))
      die("oneDNN's results differ from fusedbn's", "refusing to benchmark them");
  }
#endif

  const int total = cfg->warmup + cfg->reps;
  double *times[IMPL_COUNT];
  for (int i = 0; i < IMPL_COUNT; i++)
    times[i] = calloc((size_t)total, sizeof(double));

  for (int pass = 0; pass < PASS_COUNT; pass++) {
    check_fbn(fbn_module_set_training(o.m, pass != PASS_EVAL_FWD), "set_training");
    if (pass == PASS_BWD) {
      check_fbn(fbn_module_forward(o.m, &o.d, b.x, b.z, b.y_ours, o.saved, NULL, 0), "forward");
#ifdef FBN_PEERS_HAVE_ONEDNN
      if (cfg->onednn)
        dnnl_train_fwd(&dp, false);
#endif
    }
    const size_t floor_copy = b.numel * (size_t)floor_bytes[pass] / 2 / 1024 * 1024;
    for (int r = 0; r < total; r++)
      for (int i = 0; i < IMPL_COUNT; i++) {
        if (!impl_applies(cfg, i, pass))
          continue;
        evict_caches();
        const double t0 = bench_now_s();
        if (i == IMPL_FLOOR || i == IMPL_FLOOR2) {
          copy_nt_2threads(b.copy_dst, b.copy_src, floor_copy, i == IMPL_FLOOR2 ? 2 : 1);
        } else if (i == IMPL_TWOPASS) {
          twopass_2threads(b.x, b.z, (float *)b.copy_dst, b.numel / 1024 * 1024);
        } else if (i == IMPL_OURS) {
          fbn_status st;
          if (pass == PASS_BWD)
            st = fbn_module_backward(o.m, o.saved, &o.d, b.x, b.y_ours, b.dy, b.dx_ours,
                                     b.dz_ours, NULL, 0);
          else
            st = fbn_module_forward(o.m, &o.d, b.x, b.z, b.y_ours,
                                    pass == PASS_TRAIN_FWD ? o.saved : NULL, NULL, 0);
          check_fbn(st, pass == PASS_BWD ? "backward" : "forward");
        }
#ifdef FBN_PEERS_HAVE_ONEDNN
        else if (pass == PASS_TRAIN_FWD) {
          dnnl_train_fwd(&dp, i == IMPL_DNNL_UNFUSED);
        } else if (pass == PASS_EVAL_FWD) {
          dnnl_eval_fwd(&dp, i == IMPL_DNNL_UNFUSED);
        } else {
          dnnl_bwd(&dp);
        }
#endif
        times[i][r] = bench_now_s() - t0;
      }
    for (int i = 0; i < IMPL_COUNT; i++) {
      if (!impl_applies(cfg, i, pass))
        continue;
      double *timed = times[i] + cfg->warmup;
      const double med = bench_median(timed, cfg->reps);
      printf("%s,%lld,%lld,%lld,%lld,%s,%s,%.4f,%.4f,%d\n", pass_names[pass], (long long)s->n,
             (long long)s->c, (long long)s->h, (long long)s->w, lname,
             pass == PASS_BWD && i == IMPL_DNNL ? "onednn" : impl_names[i], 1e3 * med,
             1e3 * timed[0], cfg->reps);
    }
    fflush(stdout);
  }

  for (int i = 0; i < IMPL_COUNT; i++)
    free(times[i]);
#ifdef FBN_PEERS_HAVE_ONEDNN
  if (cfg->onednn)
    dnnl_peer_fini(&dp);
#endif
  ours_fini(&o);
  for (size_t i = 0; i < sizeof big / sizeof big[0]; i++)
    free(*big[i]);
  free(b.y_dnnl);
  free(b.dx_dnnl);
  free(b.dz_dnnl);
  free(b.copy_src);
  free(b.copy_dst);
  for (size_t i = 0; i < sizeof small / sizeof small[0]; i++)
    free(*small[i]);
}

/* ---- main --------------------------------------------------------------- */

static void usage(void) {
  printf("usage: fbn-peers-bench [--reps N] [--warmup N] [--quick | --shape N,C,H,W]\n"
         "                       [--layout nchw|nhwc|both] [--no-onednn] [--copy-mib N]\n"
         "                       [--evict-mib N]\n"
         "Times fusedbn's CPU module, oneDNN (if built with it) and a 2-thread memcpy on\n"
         "ResNet-50's batch-32 batch-norm shapes, float32. CSV on stdout.\n");
}

int main(int argc, char **argv) {
  peers_config cfg = {.reps = 25, .warmup = 3, .quick = false, .layouts = {true, true},
                      .onednn = true, .copy_bytes = (size_t)512 << 20,
                      .evict_bytes = (size_t)64 << 20};
#ifndef FBN_PEERS_HAVE_ONEDNN
  cfg.onednn = false;
#endif
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(a, "--reps") == 0 && v) {
      cfg.reps = atoi(v);
      i++;
    } else if (strcmp(a, "--warmup") == 0 && v) {
      cfg.warmup = atoi(v);
      i++;
    } else if (strcmp(a, "--copy-mib") == 0 && v) {
      cfg.copy_bytes = (size_t)atoi(v) << 20;
      i++;
    } else if (strcmp(a, "--evict-mib") == 0 && v) {
      cfg.evict_bytes = (size_t)atoi(v) << 20;
      i++;
    } else if (strcmp(a, "--layout") == 0 && v) {
      cfg.layouts[0] = strcmp(v, "nhwc") != 0;
      cfg.layouts[1] = strcmp(v, "nchw") != 0;
      i++;
    } else if (strcmp(a, "--shape") == 0 && v) {
      long long n, c, h, w;
      if (sscanf(v, "%lld,%lld,%lld,%lld", &n, &c, &h, &w) != 4 || n < 1 || c < 1 || h < 1 ||
          w < 1)
        die("--shape wants N,C,H,W (all >= 1)", v);
      cfg.one_shape = (peers_shape){n, c, h, w};
      cfg.have_one_shape = true;
      i++;
    } else if (strcmp(a, "--quick") == 0) {
      cfg.quick = true;
    } else if (strcmp(a, "--no-onednn") == 0) {
      cfg.onednn = false;
    } else if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      usage();
      return 0;
    } else {
      usage();
      return 2;
    }
  }
  if (cfg.reps < 1 || cfg.warmup < 0 || cfg.copy_bytes < ((size_t)1 << 20))
    die("--reps must be >= 1, --warmup >= 0, --copy-mib >= 1", NULL);

  if (cfg.evict_bytes > 0) {
    uint64_t *e = alloc_touched(cfg.evict_bytes);
    for (size_t i = 0; i < cfg.evict_bytes / sizeof(uint64_t); i++)
      e[i] = i;
    evict_buf = e;
    evict_words = cfg.evict_bytes / sizeof(uint64_t);
  }
  const char *backend = getenv("FBN_CPU_BACKEND");
  printf("# fbn-peers-bench: evict_mib=%zu (read before every timed call)\n",
         cfg.evict_bytes >> 20);
  printf("# fbn-peers-bench: fusedbn %d, FBN_CPU_BACKEND=%s, threads=%d, reps=%d, warmup=%d\n",
         fbn_version(), backend ? backend : "(unset: fast)",
#ifdef _OPENMP
         omp_get_max_threads(),
#else
         1,
#endif
         cfg.reps, cfg.warmup);
#ifdef FBN_PEERS_HAVE_ONEDNN
  const dnnl_version_t *dv = dnnl_version();
  printf("# onednn %d.%d.%d (%s), cpu_runtime %u%s\n", dv->major, dv->minor, dv->patch, dv->hash,
         dv->cpu_runtime, cfg.onednn ? "" : " (disabled by --no-onednn)");
#else
  printf("# onednn: not built (bench/peers without oneDNN)\n");
#endif
  printf("pass,n,c,h,w,layout,impl,median_ms,min_ms,reps\n");

  double best_ms;
  double copy_s = measure_copy(&cfg, &best_ms);
  printf("copy,0,0,0,0,-,memcpy,%.4f,%.4f,%d\n", 1e3 * copy_s, best_ms, cfg.reps);
  printf("# copy_bytes=%zu copy_gbs=%.3f (bytes read + written per second, median)\n",
         cfg.copy_bytes, 2.0 * (double)cfg.copy_bytes / copy_s / 1e9);
  fflush(stdout);

  const peers_shape *shapes = cfg.quick ? quick_shapes : resnet50_shapes;
  const int num_shapes = cfg.have_one_shape ? 1 : PEERS_NUM_SHAPES;
  if (cfg.have_one_shape)
    shapes = &cfg.one_shape;
  for (int s = 0; s < num_shapes; s++)
    for (int l = 0; l < 2; l++)
      if (cfg.layouts[l])
        run_shape(&cfg, &shapes[s], l == 0 ? FBN_LAYOUT_NCHW : FBN_LAYOUT_NHWC);

  copy_s = measure_copy(&cfg, &best_ms);
  printf("copy,0,0,0,0,-,memcpy,%.4f,%.4f,%d\n", 1e3 * copy_s, best_ms, cfg.reps);
  printf("# copy_bytes=%zu copy_gbs=%.3f (at the end)\n", cfg.copy_bytes,
         2.0 * (double)cfg.copy_bytes / copy_s / 1e9);
  return 0;
}
