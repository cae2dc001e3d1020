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
 *   memcpy-floor     per pass, shape and layout: the copy floor of the
 *                    shared harness (bench/common: non-temporal stores, the
 *                    same threads as the library) moving the pass's minimal
 *                    traffic (4 tensor passes for a training forward: x read
 *                    twice, addend once, y written; 3 for eval, 5 for
 *                    backward; 16, 12 and 20 bytes per float32 element, half
 *                    that in float16 and bfloat16), timed interleaved with
 *                    the implementations: the memory floor
 *   copy             the same copy over 512 MiB at the start and the end:
 *                    the machine's copy bandwidth
 *
 * PyTorch runs from torch_peer.py with the same CSV output; scripts/
 * cpu-bench-table runs both, twice, and writes docs/benchmarks.md.
 *
 * Every buffer is allocated and written before timing (a page fault costs
 * microseconds). Before every timed call a buffer is read, untimed (cache
 * eviction: each call starts from memory, with caches holding clean lines).
 * Each implementation is timed call by call, interleaved with the others,
 * and the median of --reps calls is reported.
 * Before timing, the peers' outputs are checked against fusedbn's, so that a
 * peer that computes something else cannot be benchmarked.
 *
 * --dtype float16|bfloat16: fusedbn's tensors in that type (parameters
 * float32) and the floor moving 2 bytes per element and tensor pass; oneDNN
 * is timed in float32 only (not in such a run).
 *
 * Output: CSV on stdout, "# ..." lines are comments.
 *   pass,n,c,h,w,layout,impl,median_ms,min_ms,reps,dtype
 *   copy,0,0,0,0,-,memcpy,median_ms,min_ms,reps,-   (plus "# copy_gbs=...")
 */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fusedbn/fusedbn.h"

#include "bench_common.h"

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
/* Minimal traffic of each pass in tensor passes (each read or written
 * once): the memory floor moves these times the tensor's bytes. */
static const int floor_tensors[PASS_COUNT] = {4, 3, 5};

typedef struct peers_config {
  fbn_dtype dtype; /* of the tensors: float32, float16 or bfloat16 */
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

static bench_evict evict;
static bench_rng rng;

static const char *dtype_name(fbn_dtype dtype) {
  return dtype == FBN_DTYPE_FLOAT16 ? "float16" : dtype == FBN_DTYPE_BFLOAT16 ? "bfloat16" : "float32";
}

static void fill_random(float *p, size_t count, double offset, double scale) {
  bench_fill_float(p, count, offset, scale, &rng);
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

/* Median time of the harness's copy of cfg->copy_bytes, each after an
 * eviction; bandwidth counts bytes read plus bytes written. */
static double measure_copy(const peers_config *cfg, double *best_ms) {
  bench_copy c;
  bench_copy_init(&c, cfg->copy_bytes);
  const int total = cfg->warmup + cfg->reps;
  double *t = calloc((size_t)total, sizeof *t);
  if (t == NULL)
    die("out of memory", NULL);
  for (int r = 0; r < total; r++) {
    bench_evict_run(&evict);
    const double t0 = bench_now_s();
    bench_copy_run(&c, cfg->copy_bytes);
    t[r] = bench_now_s() - t0;
  }
  double *timed = t + cfg->warmup;
  *best_ms = 1e3 * bench_min(timed, cfg->reps);
  const double med = bench_median(timed, cfg->reps);
  free(t);
  bench_copy_fini(&c);
  return med;
}

/* ---- fusedbn ------------------------------------------------------------ */

typedef struct ours {
  fbn_module *m;
  fbn_saved *saved;
  fbn_tensor_desc d;
} ours;

/* A failing call ends the run: exit 1, or 77 when the library refuses what
 * was asked (FBN_STATUS_UNSUPPORTED: a --dtype the CPU backend does not
 * take), the status test harnesses read as "skipped". */
static void check_fbn(fbn_status st, const char *what) {
  if (st != FBN_STATUS_SUCCESS) {
    fprintf(stderr, "fbn-peers-bench: %s: %s (%s)\n", what, fbn_last_error_message(),
            fbn_status_string(st));
    exit(st == FBN_STATUS_UNSUPPORTED ? 77 : 1);
  }
}

static void ours_init(ours *o, const peers_shape *s, fbn_layout layout, fbn_dtype dtype,
                      const float *weight, const float *bias) {
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
  o->d = fbn_tensor_desc_make(s->n, s->c, s->h, s->w, dtype, layout);
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

/* IMPL_FLOOR: the harness's copy moving the pass's minimal traffic
 * (floor_bytes / 2 per element copied: read + written), timed in the same
 * interleaving as the implementations, so that the floor is measured under
 * the same conditions of a shared machine as the calls it is compared with
 * (its bandwidth can move by 10-40% within a minute). */
enum { IMPL_OURS, IMPL_FLOOR, IMPL_DNNL, IMPL_DNNL_UNFUSED, IMPL_COUNT };
static const char *const impl_names[IMPL_COUNT] = {"fusedbn", "memcpy-floor", "onednn",
                                                   "onednn-unfused"};

/* Whether implementation i is timed for this pass. */
static bool impl_applies(const peers_config *cfg, int i, int pass) {
  switch (i) {
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
  void *x, *z, *dy; /* of cfg->dtype */
  void *y_ours, *dx_ours, *dz_ours;
  float *y_dnnl, *dx_dnnl, *dz_dnnl; /* float32 runs only */
  float *weight, *bias, *mean, *var, *dscale, *dshift;
  bench_copy copy; /* the floor's buffers: 10 bytes per element each */
} shape_bufs;

static void run_shape(const peers_config *cfg, const peers_shape *s, fbn_layout layout) {
  shape_bufs b;
  b.numel = (size_t)(s->n * s->c * s->h * s->w);
  const size_t bytes = b.numel * fbn_dtype_size(cfg->dtype), cbytes = (size_t)s->c * sizeof(float);
  void **big[] = {&b.x, &b.z, &b.dy, &b.y_ours, &b.dx_ours, &b.dz_ours};
  for (size_t i = 0; i < sizeof big / sizeof big[0]; i++)
    *big[i] = bench_alloc_touched(bytes);
  b.y_dnnl = b.dx_dnnl = b.dz_dnnl = NULL;
  if (cfg->onednn) {
    b.y_dnnl = bench_alloc_touched(bytes);
    b.dx_dnnl = bench_alloc_touched(bytes);
    b.dz_dnnl = bench_alloc_touched(bytes);
  }
  float **small[] = {&b.weight, &b.bias, &b.mean, &b.var, &b.dscale, &b.dshift};
  for (size_t i = 0; i < sizeof small / sizeof small[0]; i++)
    *small[i] = bench_alloc_touched(cbytes);
  bench_copy_init(&b.copy, bytes * (size_t)floor_tensors[PASS_BWD] / 2);
  bench_rng_seed(&rng, (uint64_t)(s->n * 1000003 + s->c * 1009 + s->h * 31 + s->w));
  void *data[3] = {b.x, b.z, b.dy};
  const double offset[3] = {0.5, 0.0, 0.0}, scale[3] = {2.0, 1.0, 1.0};
  for (int i = 0; i < 3; i++) {
    if (cfg->dtype == FBN_DTYPE_FLOAT32)
      fill_random(data[i], b.numel, offset[i], scale[i]);
    else
      bench_fill_half(data[i], b.numel, cfg->dtype == FBN_DTYPE_BFLOAT16, offset[i], scale[i],
                      &rng);
  }
  fill_random(b.weight, (size_t)s->c, 1.0, 0.5);
  fill_random(b.bias, (size_t)s->c, 0.0, 0.5);

  ours o;
  ours_init(&o, s, layout, cfg->dtype, b.weight, b.bias);
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
    const size_t floor_copy = bytes * (size_t)floor_tensors[pass] / 2;
    for (int r = 0; r < total; r++)
      for (int i = 0; i < IMPL_COUNT; i++) {
        if (!impl_applies(cfg, i, pass))
          continue;
        bench_evict_run(&evict);
        const double t0 = bench_now_s();
        if (i == IMPL_FLOOR) {
          bench_copy_run(&b.copy, floor_copy);
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
      printf("%s,%lld,%lld,%lld,%lld,%s,%s,%.4f,%.4f,%d,%s\n", pass_names[pass],
             (long long)s->n, (long long)s->c, (long long)s->h, (long long)s->w, lname,
             pass == PASS_BWD && i == IMPL_DNNL ? "onednn" : impl_names[i], 1e3 * med,
             1e3 * bench_min(timed, cfg->reps), cfg->reps, dtype_name(cfg->dtype));
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
  bench_copy_fini(&b.copy);
  for (size_t i = 0; i < sizeof small / sizeof small[0]; i++)
    free(*small[i]);
}

/* ---- main --------------------------------------------------------------- */

static void usage(void) {
  printf("usage: fbn-peers-bench [--reps N] [--warmup N] [--quick | --shape N,C,H,W]\n"
         "                       [--layout nchw|nhwc|both] [--no-onednn] [--copy-mib N]\n"
         "                       [--evict-mib N] [--dtype float32|float16|bfloat16]\n"
         "Times fusedbn's CPU module, oneDNN (if built with it; float32 only) and the copy\n"
         "floor on ResNet-50's batch-32 batch-norm shapes. CSV on stdout.\n"
         "--dtype: the tensors' type (default float32; parameters are float32).\n"
         "--evict-mib: buffer read before every timed call (default: 64 or twice the\n"
         "last-level cache, whichever is larger; 0: none).\n");
}

int main(int argc, char **argv) {
  peers_config cfg = {.dtype = FBN_DTYPE_FLOAT32, .reps = 25, .warmup = 3, .quick = false, .layouts = {true, true},
                      .onednn = true, .copy_bytes = (size_t)512 << 20,
                      .evict_bytes = bench_evict_default_bytes()};
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
    } else if (strcmp(a, "--dtype") == 0 && v) {
      if (strcmp(v, "float32") == 0)
        cfg.dtype = FBN_DTYPE_FLOAT32;
      else if (strcmp(v, "float16") == 0)
        cfg.dtype = FBN_DTYPE_FLOAT16;
      else if (strcmp(v, "bfloat16") == 0)
        cfg.dtype = FBN_DTYPE_BFLOAT16;
      else
        die("--dtype wants float32, float16 or bfloat16", v);
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
  const bool onednn_asked = cfg.onednn;
  if (cfg.dtype != FBN_DTYPE_FLOAT32)
    cfg.onednn = false;

  bench_evict_init(&evict, cfg.evict_bytes);
  const char *backend = getenv("FBN_CPU_BACKEND");
  char machine[320];
  bench_machine_line(machine, sizeof machine);
  printf("# fbn-peers-bench: machine: %s\n", machine);
  printf("# fbn-peers-bench: evict_mib=%zu (read before every timed call); floor: %s\n",
         (evict.words * sizeof(uint64_t)) >> 20, bench_copy_method());
  printf("# fbn-peers-bench: fusedbn %d, FBN_CPU_BACKEND=%s, threads=%d, reps=%d, warmup=%d, "
         "dtype=%s\n",
         fbn_version(), backend ? backend : "(unset: fast)", bench_threads(), cfg.reps,
         cfg.warmup, dtype_name(cfg.dtype));
#ifdef FBN_PEERS_HAVE_ONEDNN
  const dnnl_version_t *dv = dnnl_version();
  printf("# onednn %d.%d.%d (%s), cpu_runtime %u%s\n", dv->major, dv->minor, dv->patch, dv->hash,
         dv->cpu_runtime,
         cfg.onednn        ? ""
         : onednn_asked    ? " (not timed: this benchmark runs oneDNN in float32 only)"
                           : " (disabled by --no-onednn)");
#else
  (void)onednn_asked;
  printf("# onednn: not built (bench/peers without oneDNN)\n");
#endif
  printf("pass,n,c,h,w,layout,impl,median_ms,min_ms,reps,dtype\n");

  double best_ms;
  double copy_s = measure_copy(&cfg, &best_ms);
  printf("copy,0,0,0,0,-,memcpy,%.4f,%.4f,%d,-\n", 1e3 * copy_s, best_ms, cfg.reps);
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
  printf("copy,0,0,0,0,-,memcpy,%.4f,%.4f,%d,-\n", 1e3 * copy_s, best_ms, cfg.reps);
  printf("# copy_bytes=%zu copy_gbs=%.3f (at the end)\n", cfg.copy_bytes,
         2.0 * (double)cfg.copy_bytes / copy_s / 1e9);
  bench_evict_fini(&evict);
  return 0;
}
