/*
 * The cuDNN backend: struct fbn_backend for CUDA modules and the entry
 * points of <fusedbn/fusedbn_cuda.h>.
 *
 * Layers
 *   this file        module state on the device, path selection and
 *                    run-time fallbacks, workspace and saved payloads,
 *                    streams/handles, error messages
 *   cudnn_engine.h   every cuDNN call (cudnn_legacy.c)
 *   cuda_kernels.h   fusedbn's own kernels (cuda_kernels.cu)
 *   cuda_paths.h     the pure path-selection function
 *
 * Paths (docs/cuda-backend.md): FUSED, GENERAL, KERNELS (training) and EVAL.
 * A training path cuDNN refuses at run time (NOT_SUPPORTED; also BAD_PARAM
 * for bfloat16, which cuDNN documents nowhere) falls back FUSED -> GENERAL ->
 * KERNELS and the module remembers the refusal for that dtype.
 *
 * Saved payload (device memory; host struct cuda_payload in saved->payload):
 *   [mean: C params][invstd: C params][mask words | cuDNN reserve space]
 * each part 256-byte aligned; params are float (double for float64).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>

#include "cuda_kernels.h"
#include "cuda_paths.h"
#include "cudnn_engine.h"
#include "fusedbn/fusedbn_cuda.h"
#include "internal.h"

_Static_assert((int)FBN_CUDA_PATH_NONE == FBN_CUDA_PATH_ID_NONE, "path ids");
_Static_assert((int)FBN_CUDA_PATH_FUSED == FBN_CUDA_PATH_ID_FUSED, "path ids");
_Static_assert((int)FBN_CUDA_PATH_GENERAL == FBN_CUDA_PATH_ID_GENERAL, "path ids");
_Static_assert((int)FBN_CUDA_PATH_KERNELS == FBN_CUDA_PATH_ID_KERNELS, "path ids");
_Static_assert((int)FBN_CUDA_PATH_EVAL == FBN_CUDA_PATH_ID_EVAL, "path ids");

#define ALIGN 256u

static size_t align_up(size_t v) { return (v + ALIGN - 1) / ALIGN * ALIGN; }

/* cuDNN's fused calls want a non-NULL workspace even when they report 0
 * bytes: always give them at least one aligned block. */
static size_t dnn_ws_bytes(size_t queried) { return align_up(queried > 0 ? queried : 1); }

/* cudaFree whose failure is not reported (teardown, regrowing a cache): its
 * error must not linger for the next launch check. */
static void free_quietly(void *p) {
  if (p != NULL && cudaFree(p) != cudaSuccess)
    (void)cudaGetLastError();
}

/* ---- state --------------------------------------------------------------- */

typedef struct cuda_state {
  int device;
  void *dnn; /* the module's own cudnnHandle_t */
  fbn_cuda_limits limits;
  fbn_cuda_refusals refusals;
  /* FBN_CUDA_FORCE_PATH=general|kernels at creation: training calls that
   * would take the fused/general path take this one instead (testing and
   * benchmarking hook; FBN_CUDA_PATH_ID_NONE when unset). */
  int forced_path;
  size_t param_size; /* 4 or 8 */
  /* One allocation for the module buffers and the helpers below. */
  void *arena;
  void *ones;        /* affine == false: scale for cuDNN */
  void *zeros;       /* affine == false: bias for cuDNN */
  void *dummy_grads; /* affine == false: 2*C params cuDNN's backward writes */
  /* Library-managed workspace and the event ordering its users. */
  void *ws;
  size_t ws_bytes;
  cudaEvent_t ws_event;
  bool ws_pending;
  /* cudaStreamGetId of the stream that last used the cache: unlike the
   * cudaStream_t value, never reused by a later stream. */
  unsigned long long ws_stream_id;
  /* One cached plan (descriptors + cuDNN sizes). */
  bool plan_valid;
  fbn_dnn_plan plan;
  fbn_dnn_sizes sizes;
} cuda_state;

/* fbn_cuda_module_forward/backward pass this as args->exec. */
#define LAUNCH_MAGIC 0x66626e63u /* "fbnc" */
typedef struct cuda_launch {
  unsigned magic;
  const char *fn;
  fbn_cuda_exec exec;
} cuda_launch;

typedef struct cuda_payload {
  void *mem; /* device memory: ours, or saved->external */
  size_t bytes;
  bool external;
  size_t c;          /* channels of the last layout */
  size_t mean_off;   /* 0 */
  size_t invstd_off;
  size_t extra_off;  /* mask words or reserve space */
  size_t extra_bytes;
  size_t reserve_bytes; /* FUSED: cuDNN's reserve size (exactly what forward used) */
} cuda_payload;

static const fbn_backend cuda_backend;

/* ---- errors -------------------------------------------------------------- */

static fbn_status cuda_status_of(cudaError_t e) {
  return e == cudaErrorMemoryAllocation ? FBN_STATUS_OUT_OF_MEMORY : FBN_STATUS_DEVICE_ERROR;
}

/* Every failure is reported here (and by launch_check): clear the runtime's
 * last error so that a non-sticky one is not reported again by the next
 * kernel launch's cudaGetLastError() check. */
static fbn_status cuda_fail(const char *fn, const char *call, cudaError_t e) {
  (void)cudaGetLastError();
  return fbn_error(cuda_status_of(e), "%s: %s failed: %s (%s)", fn, call, cudaGetErrorName(e),
                   cudaGetErrorString(e));
}

static fbn_status dnn_fail(const char *fn, fbn_dnn_error e) {
  char text[512];
  fbn_dnn_describe(e, text, sizeof text);
  return fbn_error(FBN_STATUS_DEVICE_ERROR, "%s: %s", fn, text);
}

#define CUDA_TRY(fn, expr)                                                                       \
  do {                                                                                           \
    cudaError_t cuda_err_ = (expr);                                                              \
    if (cuda_err_ != cudaSuccess)                                                                \
      return cuda_fail(fn, #expr, cuda_err_);                                                    \
  } while (0)

/* ---- device guard -------------------------------------------------------- */

typedef struct device_guard {
  int previous;
  bool changed;
} device_guard;

static fbn_status device_enter(const char *fn, int device, device_guard *g, fbn_status on_error) {
  g->changed = false;
  cudaError_t e = cudaGetDevice(&g->previous);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return fbn_error(on_error, "%s: cudaGetDevice failed: %s (%s)", fn, cudaGetErrorName(e),
                     cudaGetErrorString(e));
  }
  if (g->previous != device) {
    e = cudaSetDevice(device);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      return fbn_error(on_error, "%s: cudaSetDevice(%d) failed: %s (%s)", fn, device,
                       cudaGetErrorName(e), cudaGetErrorString(e));
    }
    g->changed = true;
  }
  return FBN_STATUS_SUCCESS;
}

static void device_leave(device_guard *g) {
  if (g->changed)
    (void)cudaSetDevice(g->previous);
}

/* ---- module lifecycle ---------------------------------------------------- */

static cuda_state *state_of(const fbn_module *m) { return (cuda_state *)m->backend_state; }

static void cuda_state_free(cuda_state *st) {
  if (st == NULL)
    return;
  if (st->plan_valid)
    fbn_dnn_plan_fini(&st->plan);
  if (st->ws != NULL)
    free_quietly(st->ws);
  if (st->ws_event != NULL)
    (void)cudaEventDestroy(st->ws_event);
  if (st->arena != NULL)
    free_quietly(st->arena);
  fbn_dnn_destroy(st->dnn);
  free(st);
}

/* dst[0..count) = value with fusedbn's fill kernel, waiting for it (buffer
 * fills are synchronous). */
static fbn_status fill_params(const char *fn, cuda_state *st, void *dst, size_t count,
                              double value) {
  cudaError_t e = fbn_k_fill(dst, st->param_size == sizeof(double), (int64_t)count, value, 0);
  if (e != cudaSuccess)
    return cuda_fail(fn, "the fill kernel", e);
  e = cudaStreamSynchronize(0);
  if (e != cudaSuccess)
    return cuda_fail(fn, "cudaStreamSynchronize", e);
  return FBN_STATUS_SUCCESS;
}

static fbn_status cuda_module_init_on_device(fbn_module *m, cuda_state *st) {
  static const char fn[] = "fbn_module_create";
  const fbn_module_options *o = &m->options;
  fbn_dnn_error de = fbn_dnn_create(&st->dnn);
  if (!fbn_dnn_ok(de)) {
    char text[512];
    fbn_dnn_describe(de, text, sizeof text);
    return fbn_error(FBN_STATUS_NO_DEVICE, "%s: no usable CUDA device for cuDNN: %s", fn, text);
  }
  st->param_size = fbn_dtype_size(o->param_dtype);
  const size_t c = (size_t)o->num_features;
  const size_t chunk = align_up(c * st->param_size);
  /* buffers[6], then ones, zeros, dummy dscale, dummy dbias */
  const size_t chunks = FBN_NUM_BUFFERS + 4;
  cudaError_t e = cudaMalloc(&st->arena, chunks * chunk);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    st->arena = NULL;
    return fbn_error(cuda_status_of(e),
                     "%s: cudaMalloc(%zu bytes) for the parameters failed: %s (%s)", fn,
                     chunks * chunk, cudaGetErrorName(e), cudaGetErrorString(e));
  }
  char *base = st->arena;
  for (int i = 0; i < FBN_NUM_BUFFERS; i++)
    m->buffers[i] = fbn_options_have_buffer(o, (fbn_buffer)i) ? base + (size_t)i * chunk : NULL;
  st->ones = base + (size_t)FBN_NUM_BUFFERS * chunk;
  st->zeros = base + (size_t)(FBN_NUM_BUFFERS + 1) * chunk;
  st->dummy_grads = base + (size_t)(FBN_NUM_BUFFERS + 2) * chunk;
  /* The first kernel launch: a device this build has no code for is not
   * usable. */
  e = fbn_k_fill(st->ones, st->param_size == sizeof(double), (int64_t)c, 1.0, 0);
  if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction ||
      e == cudaErrorUnsupportedPtxVersion) {
    (void)cudaGetLastError();
    struct cudaDeviceProp prop;
    int major = 0, minor = 0;
    if (cudaGetDeviceProperties(&prop, st->device) == cudaSuccess) {
      major = prop.major;
      minor = prop.minor;
    }
    return fbn_error(FBN_STATUS_NO_DEVICE,
                     "%s: CUDA device %d (sm_%d%d) cannot run this build's kernels: %s (%s); "
                     "rebuild with -Dgpu_archs=%d%d",
                     fn, st->device, major, minor, cudaGetErrorName(e), cudaGetErrorString(e),
                     major, minor);
  }
  fbn_status s = fill_params(fn, st, st->ones, c, 1.0);
  if (s == FBN_STATUS_SUCCESS)
    s = fill_params(fn, st, st->zeros, c, 0.0);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  CUDA_TRY(fn, cudaEventCreateWithFlags(&st->ws_event, cudaEventDisableTiming));
  st->limits = fbn_dnn_limits();
  const char *force = getenv("FBN_CUDA_FORCE_PATH");
  if (force != NULL && force[0] != '\0') {
    if (strcmp(force, "general") == 0)
      st->forced_path = FBN_CUDA_PATH_ID_GENERAL;
    else if (strcmp(force, "kernels") == 0)
      st->forced_path = FBN_CUDA_PATH_ID_KERNELS;
    else
      return fbn_error(FBN_STATUS_INVALID_VALUE,
                       "%s: FBN_CUDA_FORCE_PATH = \"%s\": must be \"general\" or \"kernels\" "
                       "(or unset)",
                       fn, force);
  }
  return FBN_STATUS_SUCCESS;
}

static fbn_status cuda_module_init(fbn_module *m) {
  static const char fn[] = "fbn_module_create";
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return fbn_error(FBN_STATUS_NO_DEVICE,
                     "%s: no usable CUDA device: cudaGetDeviceCount failed: %s (%s)", fn,
                     cudaGetErrorName(e), cudaGetErrorString(e));
  }
  if (count <= 0)
    return fbn_error(FBN_STATUS_NO_DEVICE, "%s: no usable CUDA device: cudaGetDeviceCount = 0",
                     fn);
  const int device = m->options.device_index;
  if (device < 0 || device >= count)
    return fbn_error(FBN_STATUS_NO_DEVICE,
                     "%s: device_index = %d: this process sees %d CUDA device(s) (0..%d)", fn,
                     device, count, count - 1);

  device_guard g;
  fbn_status s = device_enter(fn, device, &g, FBN_STATUS_NO_DEVICE);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  cuda_state *st = calloc(1, sizeof *st);
  if (st == NULL) {
    device_leave(&g);
    return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: out of host memory", fn);
  }
  st->device = device;
  s = cuda_module_init_on_device(m, st);
  if (s != FBN_STATUS_SUCCESS) {
    cuda_state_free(st);
    for (int i = 0; i < FBN_NUM_BUFFERS; i++)
      m->buffers[i] = NULL;
    device_leave(&g);
    return s;
  }
  m->backend_state = st;
  device_leave(&g);
  return FBN_STATUS_SUCCESS;
}

static void cuda_module_fini(fbn_module *m) {
  cuda_state *st = state_of(m);
  if (st == NULL)
    return;
  device_guard g;
  bool entered = device_enter("fbn_module_destroy", st->device, &g, FBN_STATUS_DEVICE_ERROR) ==
                 FBN_STATUS_SUCCESS;
  cuda_state_free(st);
  if (entered)
    device_leave(&g);
  m->backend_state = NULL;
  for (int i = 0; i < FBN_NUM_BUFFERS; i++)
    m->buffers[i] = NULL;
}

/* ---- buffers ------------------------------------------------------------- */

static fbn_status cuda_buffer_read(const fbn_module *m, fbn_buffer which, fbn_dtype dtype,
                                   void *dst) {
  static const char fn[] = "fbn_module_read_buffer";
  cuda_state *st = state_of(m);
  const size_t c = (size_t)m->options.num_features;
  device_guard g;
  fbn_status s = device_enter(fn, st->device, &g, FBN_STATUS_DEVICE_ERROR);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  void *host = malloc(c * st->param_size);
  if (host == NULL) {
    device_leave(&g);
    return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: out of host memory", fn);
  }
  /* Wait for queued forwards/backwards on any stream that may write it. */
  cudaError_t e = cudaDeviceSynchronize();
  const char *call = "cudaDeviceSynchronize";
  if (e == cudaSuccess) {
    e = cudaMemcpy(host, m->buffers[which], c * st->param_size, cudaMemcpyDeviceToHost);
    call = "cudaMemcpy(device -> host)";
  }
  if (e == cudaSuccess) {
    for (size_t i = 0; i < c; i++) {
      double v = st->param_size == sizeof(double) ? ((double *)host)[i]
                                                  : (double)((float *)host)[i];
      if (dtype == FBN_DTYPE_FLOAT64)
        ((double *)dst)[i] = v;
      else
        ((float *)dst)[i] = (float)v;
    }
    s = FBN_STATUS_SUCCESS;
  } else {
    s = cuda_fail(fn, call, e);
  }
  free(host);
  device_leave(&g);
  return s;
}

static fbn_status cuda_buffer_write(fbn_module *m, fbn_buffer which, fbn_dtype dtype,
                                    const void *src) {
  static const char fn[] = "fbn_module_write_buffer";
  cuda_state *st = state_of(m);
  const size_t c = (size_t)m->options.num_features;
  device_guard g;
  fbn_status s = device_enter(fn, st->device, &g, FBN_STATUS_DEVICE_ERROR);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  void *host = malloc(c * st->param_size);
  if (host == NULL) {
    device_leave(&g);
    return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: out of host memory", fn);
  }
  for (size_t i = 0; i < c; i++) {
    double v = dtype == FBN_DTYPE_FLOAT64 ? ((const double *)src)[i]
                                          : (double)((const float *)src)[i];
    if (st->param_size == sizeof(double))
      ((double *)host)[i] = v;
    else
      ((float *)host)[i] = (float)v;
  }
  cudaError_t e = cudaDeviceSynchronize();
  const char *call = "cudaDeviceSynchronize";
  if (e == cudaSuccess) {
    e = cudaMemcpy(m->buffers[which], host, c * st->param_size, cudaMemcpyHostToDevice);
    call = "cudaMemcpy(host -> device)";
  }
  s = e == cudaSuccess ? FBN_STATUS_SUCCESS : cuda_fail(fn, call, e);
  free(host);
  device_leave(&g);
  return s;
}

static fbn_status cuda_buffer_fill(fbn_module *m, fbn_buffer which, double value) {
  static const char fn[] = "fbn_module_buffer_fill";
  cuda_state *st = state_of(m);
  device_guard g;
  fbn_status s = device_enter(fn, st->device, &g, FBN_STATUS_DEVICE_ERROR);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  cudaError_t e = cudaDeviceSynchronize();
  s = e == cudaSuccess
          ? fill_params(fn, st, m->buffers[which], (size_t)m->options.num_features, value)
          : cuda_fail(fn, "cudaDeviceSynchronize", e);
  device_leave(&g);
  return s;
}

/* ---- shapes, plans and sizes ---------------------------------------------- */

static fbn_k_shape kshape(const fbn_tensor_desc *d) {
  fbn_k_shape s = {
      .n = d->n,
      .c = d->c,
      .hw = d->h * d->w,
      .nhwc = d->layout == FBN_LAYOUT_NHWC,
      .dtype = (int)d->dtype,
  };
  return s;
}

static size_t tensor_bytes(const fbn_tensor_desc *d) {
  return (size_t)(d->n * d->c * d->h * d->w) * fbn_dtype_size(d->dtype);
}

static int select_path(const fbn_module *m, const fbn_tensor_desc *d, bool has_addend,
                       bool batch_stats, const char **why) {
  const cuda_state *st = state_of(m);
  int path = fbn_cuda_select_path(&st->limits, &st->refusals, m->options.bn_mode, m->options.eps,
                                  d, has_addend, batch_stats, why);
  if (st->forced_path != FBN_CUDA_PATH_ID_NONE && batch_stats &&
      path != FBN_CUDA_PATH_ID_NONE &&
      !fbn_cuda_size_gated(&st->limits, m->options.eps, d)) {
    path = st->forced_path;
    if (why != NULL)
      *why = "forced by FBN_CUDA_FORCE_PATH";
  }
  return path;
}

/* Note that cuDNN refused path for this configuration class. */
static void refuse(cuda_state *st, int path, const fbn_tensor_desc *d, bool has_addend) {
  if (path == FBN_CUDA_PATH_ID_FUSED)
    *fbn_cuda_fused_refusal(&st->refusals, d, has_addend) = true;
  else if (path == FBN_CUDA_PATH_ID_GENERAL)
    st->refusals.bn[d->dtype] = true;
}

/* Does this cuDNN error mean "cuDNN can't do this configuration"? */
static bool is_refusal(fbn_dnn_error e, fbn_dtype dtype) {
  if (fbn_dnn_is_not_supported(e))
    return true;
  /* bfloat16 in the legacy batch-norm calls is undocumented: a BAD_PARAM
   * there means the same. */
  return dtype == FBN_DTYPE_BFLOAT16 && fbn_dnn_is_bad_param(e);
}

typedef enum plan_result { PLAN_OK, PLAN_REFUSED, PLAN_ERROR } plan_result;

/* The cached plan for (desc, path, has_addend), built (and sized with the
 * module's handle) if needed. PLAN_REFUSED: cuDNN refused it (recorded). */
static plan_result get_plan(const char *fn, cuda_state *st, const fbn_tensor_desc *d, int path,
                            bool has_addend, const fbn_dnn_plan **plan,
                            const fbn_dnn_sizes **sizes, fbn_status *status) {
  if (st->plan_valid && st->plan.path == path && st->plan.has_addend == has_addend &&
      fbn_desc_equal(&st->plan.desc, d)) {
    *plan = &st->plan;
    *sizes = &st->sizes;
    return PLAN_OK;
  }
  if (st->plan_valid) {
    fbn_dnn_plan_fini(&st->plan);
    st->plan_valid = false;
  }
  fbn_dnn_plan p;
  fbn_dnn_error e = fbn_dnn_plan_init(&p, d, path, has_addend);
  if (fbn_dnn_ok(e)) {
    fbn_dnn_sizes sz;
    e = fbn_dnn_plan_sizes(st->dnn, &p, &sz);
    if (fbn_dnn_ok(e)) {
      st->plan = p;
      st->sizes = sz;
      st->plan_valid = true;
      *plan = &st->plan;
      *sizes = &st->sizes;
      return PLAN_OK;
    }
    fbn_dnn_plan_fini(&p);
  }
  if (is_refusal(e, d->dtype)) {
    refuse(st, path, d, has_addend);
    return PLAN_REFUSED;
  }
  *status = dnn_fail(fn, e);
  return PLAN_ERROR;
}

static size_t coef_bytes(const fbn_tensor_desc *d, int coefs) {
  const size_t acc = d->dtype == FBN_DTYPE_FLOAT64 ? sizeof(double) : sizeof(float);
  return align_up((size_t)coefs * (size_t)d->c * acc);
}

static size_t stats_bytes(const cuda_state *st, const fbn_tensor_desc *d) {
  return align_up((size_t)d->c * st->param_size);
}

/* Workspace of the own-kernel backward (partials + coefficients). */
static size_t own_backward_ws(const fbn_tensor_desc *d) {
  fbn_k_shape ks = kshape(d);
  return align_up(fbn_k_partials_bytes(&ks)) + coef_bytes(d, FBN_K_BWD_COEFS);
}

/* Workspace one path needs; *status set on PLAN_ERROR. */
static plan_result path_workspace(const char *fn, cuda_state *st, const fbn_tensor_desc *d,
                                  bool has_addend, int path, bool backward, size_t *bytes,
                                  fbn_status *status) {
  fbn_k_shape ks = kshape(d);
  *bytes = 0;
  switch (path) {
  case FBN_CUDA_PATH_ID_FUSED: {
    const fbn_dnn_plan *plan;
    const fbn_dnn_sizes *sz;
    plan_result r = get_plan(fn, st, d, path, has_addend, &plan, &sz, status);
    if (r != PLAN_OK)
      return r;
    if (backward) {
      size_t need = dnn_ws_bytes(sz->backward_workspace) +
                    (has_addend ? align_up(tensor_bytes(d)) : 0);
      size_t own = own_backward_ws(d);
      *bytes = need > own ? need : own;
    } else {
      /* cuDNN workspace, and reserve + saved stats when no saved object */
      *bytes = dnn_ws_bytes(sz->forward_workspace) + align_up(sz->reserve) +
               2 * stats_bytes(st, d);
    }
    return PLAN_OK;
  }
  case FBN_CUDA_PATH_ID_GENERAL: {
    if (backward) {
      size_t need = align_up(tensor_bytes(d));
      size_t own = own_backward_ws(d);
      *bytes = need > own ? need : own;
    }
    return PLAN_OK;
  }
  case FBN_CUDA_PATH_ID_KERNELS:
    *bytes = backward ? own_backward_ws(d)
                      : align_up(fbn_k_partials_bytes(&ks)) + coef_bytes(d, FBN_K_FWD_COEFS);
    return PLAN_OK;
  case FBN_CUDA_PATH_ID_EVAL:
    *bytes = backward ? own_backward_ws(d) : coef_bytes(d, FBN_K_FWD_COEFS);
    return PLAN_OK;
  default: return PLAN_OK;
  }
}

/* The most workspace any path of the fallback chain starting at the
 * selected one needs, so a caller's workspace sized by this query stays big
 * enough after a run-time fallback. */
static fbn_status workspace_bound(const char *fn, const fbn_module *m, const fbn_tensor_desc *d,
                                  bool has_addend, bool batch_stats, bool backward,
                                  size_t *bytes) {
  cuda_state *st = state_of(m);
  *bytes = 0;
  int path = select_path(m, d, has_addend, batch_stats, NULL);
  while (path != FBN_CUDA_PATH_ID_NONE) {
    size_t b = 0;
    fbn_status s = FBN_STATUS_SUCCESS;
    plan_result r = path_workspace(fn, st, d, has_addend, path, backward, &b, &s);
    if (r == PLAN_ERROR)
      return s;
    if (r == PLAN_OK && b > *bytes)
      *bytes = b;
    path = fbn_cuda_fallback_path(path);
  }
  return FBN_STATUS_SUCCESS;
}

static fbn_status cuda_workspace_size(const fbn_module *m, const fbn_tensor_desc *d,
                                      bool has_addend, bool batch_stats, bool backward,
                                      size_t *bytes) {
  const char *fn = backward ? "fbn_module_backward_workspace_size"
                            : "fbn_module_forward_workspace_size";
  cuda_state *st = state_of(m);
  device_guard g;
  fbn_status s = device_enter(fn, st->device, &g, FBN_STATUS_DEVICE_ERROR);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  s = workspace_bound(fn, m, d, has_addend, batch_stats, backward, bytes);
  device_leave(&g);
  return s;
}

static fbn_status cuda_check_desc(const fbn_module *m, const fbn_tensor_desc *d, bool has_addend,
                                  bool batch_stats) {
  const char *why = "";
  if (select_path(m, d, has_addend, batch_stats, &why) == FBN_CUDA_PATH_ID_NONE)
    return fbn_error(FBN_STATUS_UNSUPPORTED, "dtype = %s, layout = %s: %s",
                     fbn_dtype_name(d->dtype), fbn_layout_name(d->layout), why);
  return FBN_STATUS_SUCCESS;
}

/* ---- saved payloads ------------------------------------------------------ */

/* Device bytes of the payload for a forward of d (mean, invstd, extra). */
static fbn_status payload_layout(const char *fn, const fbn_module *m, const fbn_tensor_desc *d,
                                 bool has_addend, bool batch_stats, size_t *total,
                                 size_t *extra, size_t *reserve) {
  cuda_state *st = state_of(m);
  fbn_k_shape ks = kshape(d);
  size_t mask = fbn_k_mask_words(&ks) * sizeof(uint32_t);
  *extra = align_up(mask);
  *reserve = 0;
  int path = select_path(m, d, has_addend, batch_stats, NULL);
  while (path == FBN_CUDA_PATH_ID_FUSED) {
    const fbn_dnn_plan *plan;
    const fbn_dnn_sizes *sz;
    fbn_status s = FBN_STATUS_SUCCESS;
    plan_result r = get_plan(fn, st, d, path, has_addend, &plan, &sz, &s);
    if (r == PLAN_ERROR)
      return s;
    if (r == PLAN_REFUSED) {
      path = select_path(m, d, has_addend, batch_stats, NULL);
      continue;
    }
    *reserve = sz->reserve;
    if (align_up(sz->reserve) > *extra)
      *extra = align_up(sz->reserve);
    break;
  }
  *total = 2 * stats_bytes(st, d) + *extra;
  return FBN_STATUS_SUCCESS;
}

static void cuda_saved_free(fbn_saved *saved) {
  cuda_payload *p = saved->payload;
  if (p != NULL) {
    if (!p->external && p->mem != NULL)
      free_quietly(p->mem);
    free(p);
  }
  saved->payload = NULL;
  saved->payload_bytes = 0;
  saved->payload_backend = NULL;
}

static fbn_status check_device_memory(const char *fn, const cuda_state *st, const char *name,
                                      const void *ptr, size_t align);

static fbn_status cuda_saved_prepare(const fbn_module *m, const fbn_tensor_desc *d,
                                     bool has_addend, bool batch_stats, fbn_saved *saved) {
  static const char fn[] = "fbn_module_forward";
  cuda_state *st = state_of(m);
  device_guard g;
  fbn_status s = device_enter(fn, st->device, &g, FBN_STATUS_DEVICE_ERROR);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  size_t total = 0, extra = 0, reserve = 0;
  s = payload_layout(fn, m, d, has_addend, batch_stats, &total, &extra, &reserve);
  if (s != FBN_STATUS_SUCCESS)
    goto out;

  cuda_payload *p = saved->payload;
  if (p == NULL) {
    p = calloc(1, sizeof *p);
    if (p == NULL) {
      s = fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: out of host memory", fn);
      goto out;
    }
    saved->payload = p;
    saved->payload_backend = &cuda_backend;
  }
  if (saved->external != NULL) {
    if (!p->external && p->mem != NULL)
      free_quietly(p->mem);
    p->mem = saved->external;
    p->bytes = saved->external_bytes;
    p->external = true;
    if (p->bytes < total) {
      s = fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                    "%s: the saved object's caller memory has %zu bytes: this forward needs %zu "
                    "(fbn_cuda_saved_size)",
                    fn, p->bytes, total);
      goto out;
    }
    s = check_device_memory(fn, st, "saved memory", p->mem, ALIGN);
    if (s != FBN_STATUS_SUCCESS)
      goto out;
  } else {
    if (p->external) {
      p->mem = NULL;
      p->bytes = 0;
      p->external = false;
    }
    if (p->bytes < total) {
      if (p->mem != NULL)
        free_quietly(p->mem);
      p->mem = NULL;
      p->bytes = 0;
      cudaError_t e = cudaMalloc(&p->mem, total);
      if (e != cudaSuccess) {
        (void)cudaGetLastError();
        p->mem = NULL;
        s = fbn_error(cuda_status_of(e),
                      "%s: cudaMalloc(%zu bytes) for the saved state failed: %s (%s)", fn, total,
                      cudaGetErrorName(e), cudaGetErrorString(e));
        goto out;
      }
      p->bytes = total;
    }
  }
  p->c = (size_t)d->c;
  p->mean_off = 0;
  p->invstd_off = stats_bytes(st, d);
  p->extra_off = 2 * stats_bytes(st, d);
  p->extra_bytes = extra;
  p->reserve_bytes = reserve;
  saved->payload_bytes = p->bytes;
out:
  device_leave(&g);
  return s;
}

/* ---- per-call context ------------------------------------------------------ */

typedef struct call_ctx {
  const char *fn;
  cuda_state *st;
  cudaStream_t stream;
  void *dnn;              /* handle used for this call */
  bool caller_handle;
  cudaStream_t dnn_saved_stream; /* a caller handle's stream, restored at the end */
  bool dnn_stream_set;
  device_guard guard;
  bool entered;
  /* workspace */
  char *ws;
  size_t ws_bytes;
  bool ws_cached;
} call_ctx;

static fbn_status check_device_memory(const char *fn, const cuda_state *st, const char *name,
                                      const void *ptr, size_t align) {
  if (ptr == NULL)
    return FBN_STATUS_SUCCESS;
  if ((uintptr_t)ptr % align != 0)
    return fbn_error(align == ALIGN ? FBN_STATUS_INSUFFICIENT_WORKSPACE : FBN_STATUS_INVALID_VALUE,
                     "%s: %s = %p: must be aligned to %zu bytes", fn, name, ptr, align);
  struct cudaPointerAttributes attr;
  cudaError_t e = cudaPointerGetAttributes(&attr, ptr);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: %s = %p: cudaPointerGetAttributes failed: %s (%s); CUDA modules need "
                     "device memory",
                     fn, name, ptr, cudaGetErrorName(e), cudaGetErrorString(e));
  }
  if (attr.type == cudaMemoryTypeHost || attr.type == cudaMemoryTypeUnregistered)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: %s = %p is host memory: a CUDA module needs device (or managed) memory "
                     "of device %d",
                     fn, name, ptr, st->device);
  if (attr.type == cudaMemoryTypeDevice && attr.device != st->device)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: %s = %p is memory of CUDA device %d: the module lives on device %d", fn,
                     name, ptr, attr.device, st->device);
  return FBN_STATUS_SUCCESS;
}

static fbn_status ctx_begin(call_ctx *cx, const char *default_fn, fbn_module *m,
                            const void *exec) {
  memset(cx, 0, sizeof *cx);
  cx->fn = default_fn;
  cx->st = state_of(m);
  const cuda_launch *launch = exec;
  if (launch != NULL && launch->magic == LAUNCH_MAGIC) {
    cx->fn = launch->fn;
    cx->stream = launch->exec.stream;
    if (launch->exec.cudnn != NULL) {
      cx->dnn = launch->exec.cudnn;
      cx->caller_handle = true;
    }
  }
  fbn_status s = device_enter(cx->fn, cx->st->device, &cx->guard, FBN_STATUS_DEVICE_ERROR);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  cx->entered = true;
  if (!cx->caller_handle)
    cx->dnn = cx->st->dnn;
  return FBN_STATUS_SUCCESS;
}

/* Point the call's cuDNN handle at the call's stream (first use only). */
static fbn_status ctx_dnn(call_ctx *cx) {
  if (cx->dnn_stream_set)
    return FBN_STATUS_SUCCESS;
  fbn_dnn_error e;
  if (cx->caller_handle) {
    e = fbn_dnn_get_stream(cx->dnn, &cx->dnn_saved_stream);
    if (!fbn_dnn_ok(e))
      return dnn_fail(cx->fn, e);
  }
  e = fbn_dnn_set_stream(cx->dnn, cx->stream);
  if (!fbn_dnn_ok(e))
    return dnn_fail(cx->fn, e);
  cx->dnn_stream_set = true;
  return FBN_STATUS_SUCCESS;
}

/* Workspace of at least need bytes: the caller's (checked by the API layer
 * against the bound) or the module's cache. */
static fbn_status ctx_workspace(call_ctx *cx, void *caller_ws, size_t caller_bytes,
                                size_t need) {
  cuda_state *st = cx->st;
  if (caller_ws != NULL) {
    if (caller_bytes < need)
      return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                       "%s: workspace_bytes = %zu: this call needs at least %zu bytes", cx->fn,
                       caller_bytes, need);
    cx->ws = caller_ws;
    cx->ws_bytes = caller_bytes;
    return FBN_STATUS_SUCCESS;
  }
  if (need == 0)
    return FBN_STATUS_SUCCESS;
  if (st->ws_bytes < need) {
    if (st->ws != NULL)
      free_quietly(st->ws); /* synchronizes the device: no user left */
    st->ws = NULL;
    st->ws_bytes = 0;
    st->ws_pending = false;
    size_t bytes = need + need / 4;
    cudaError_t e = cudaMalloc(&st->ws, bytes);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      st->ws = NULL;
      return fbn_error(cuda_status_of(e), "%s: cudaMalloc(%zu bytes) for the workspace failed: "
                       "%s (%s)", cx->fn, bytes, cudaGetErrorName(e), cudaGetErrorString(e));
    }
    st->ws_bytes = bytes;
  }
  /* Order this call after the last one that used the cache when that ran on
   * another stream. Streams are compared by id: a destroyed stream's handle
   * value can come back for a new stream while the old one's work still
   * runs. The same stream needs no wait (and must not get one while it is
   * being captured into a CUDA graph). */
  if (st->ws_pending) {
    unsigned long long id = 0;
    cudaError_t e = cudaStreamGetId(cx->stream, &id);
    if (e != cudaSuccess)
      (void)cudaGetLastError();
    if (e != cudaSuccess || id != st->ws_stream_id)
      CUDA_TRY(cx->fn, cudaStreamWaitEvent(cx->stream, st->ws_event, 0));
  }
  cx->ws = st->ws;
  cx->ws_bytes = st->ws_bytes;
  cx->ws_cached = true;
  return FBN_STATUS_SUCCESS;
}

static fbn_status ctx_end(call_ctx *cx, fbn_status s) {
  cuda_state *st = cx->st;
  if (cx->ws_cached) {
    cudaError_t e = cudaEventRecord(st->ws_event, cx->stream);
    if (e == cudaSuccess) {
      st->ws_pending = true;
      if (cudaStreamGetId(cx->stream, &st->ws_stream_id) != cudaSuccess) {
        (void)cudaGetLastError();
        st->ws_stream_id = ~0ull; /* unknown: the next user waits */
      }
    } else if (s == FBN_STATUS_SUCCESS) {
      s = cuda_fail(cx->fn, "cudaEventRecord", e);
    }
  }
  if (cx->dnn_stream_set && (cx->caller_handle || cx->stream != 0)) {
    /* A caller's handle gets its own stream back; the module's handle goes
     * back to the legacy default stream, so it never keeps a caller stream
     * that may be destroyed before the module (cudnnDestroy, later calls). */
    fbn_dnn_error e = fbn_dnn_set_stream(cx->dnn, cx->caller_handle ? cx->dnn_saved_stream : 0);
    if (!fbn_dnn_ok(e) && s == FBN_STATUS_SUCCESS)
      s = dnn_fail(cx->fn, e);
  }
  if (cx->entered)
    device_leave(&cx->guard);
  return s;
}

/* Carve consecutive 256-byte aligned pieces out of the call's workspace. */
typedef struct carver {
  char *base;
  size_t used;
} carver;

static void *carve(carver *c, size_t bytes) {
  if (bytes == 0)
    return NULL;
  void *p = c->base + c->used;
  c->used += align_up(bytes);
  return p;
}

static fbn_status launch_check(const call_ctx *cx, const char *kernel, cudaError_t e) {
  if (e == cudaSuccess)
    return FBN_STATUS_SUCCESS;
  (void)cudaGetLastError();
  return fbn_error(cuda_status_of(e), "%s: launching %s failed: %s (%s)", cx->fn, kernel,
                   cudaGetErrorName(e), cudaGetErrorString(e));
}

#define KERNEL_TRY(cx, name, expr)                                                               \
  do {                                                                                           \
    fbn_status kst_ = launch_check(cx, name, (expr));                                            \
    if (kst_ != FBN_STATUS_SUCCESS)                                                              \
      return kst_;                                                                               \
  } while (0)

static void *payload_at(const fbn_saved *saved, size_t off) {
  const cuda_payload *p = saved->payload;
  return (char *)p->mem + off;
}

/* ---- forward -------------------------------------------------------------- */

typedef enum run_result { RUN_OK, RUN_REFUSED, RUN_ERROR } run_result;

static run_result forward_fused(call_ctx *cx, fbn_module *m, const fbn_forward_args *a,
                                fbn_status *s) {
  cuda_state *st = cx->st;
  const fbn_tensor_desc *d = a->desc;
  const bool has_addend = a->addend != NULL;
  const fbn_dnn_plan *plan;
  const fbn_dnn_sizes *sz;
  plan_result r = get_plan(cx->fn, st, d, FBN_CUDA_PATH_ID_FUSED, has_addend, &plan, &sz, s);
  if (r != PLAN_OK)
    return r == PLAN_REFUSED ? RUN_REFUSED : RUN_ERROR;
  const cuda_payload *p = a->saved != NULL ? a->saved->payload : NULL;
  if (p != NULL && p->extra_bytes < sz->reserve) {
    *s = fbn_error(FBN_STATUS_INVALID_STATE,
                   "%s: the saved object holds %zu bytes for cuDNN's reserve space, which needs "
                   "%zu", cx->fn, p->extra_bytes, sz->reserve);
    return RUN_ERROR;
  }
  size_t need = dnn_ws_bytes(sz->forward_workspace);
  if (p == NULL)
    need += align_up(sz->reserve) + 2 * stats_bytes(st, d);
  if ((*s = ctx_workspace(cx, a->workspace, a->workspace_bytes, need)) != FBN_STATUS_SUCCESS)
    return RUN_ERROR;
  if ((*s = ctx_dnn(cx)) != FBN_STATUS_SUCCESS)
    return RUN_ERROR;
  carver cv = {cx->ws, 0};
  fbn_dnn_forward_args fa = {
      .x = a->x,
      .z = a->addend,
      .y = a->y,
      .scale = m->options.affine ? m->buffers[FBN_BUFFER_WEIGHT] : st->ones,
      .bias = m->options.affine ? m->buffers[FBN_BUFFER_BIAS] : st->zeros,
      .factor = a->update_running ? a->factor : 1.0,
      .running_mean = a->update_running ? m->buffers[FBN_BUFFER_RUNNING_MEAN] : NULL,
      .running_var = a->update_running ? m->buffers[FBN_BUFFER_RUNNING_VAR] : NULL,
      .epsilon = m->options.eps,
      .workspace = carve(&cv, dnn_ws_bytes(sz->forward_workspace)),
      .workspace_bytes = dnn_ws_bytes(sz->forward_workspace),
      .reserve_bytes = sz->reserve,
  };
  if (p != NULL) {
    fa.save_mean = payload_at(a->saved, p->mean_off);
    fa.save_invstd = payload_at(a->saved, p->invstd_off);
    fa.reserve = sz->reserve > 0 ? payload_at(a->saved, p->extra_off) : NULL;
  } else {
    fa.reserve = carve(&cv, sz->reserve);
    fa.save_mean = carve(&cv, stats_bytes(st, d));
    fa.save_invstd = carve(&cv, stats_bytes(st, d));
  }
  fbn_dnn_error e = fbn_dnn_forward_training(cx->dnn, plan, &fa);
  if (!fbn_dnn_ok(e)) {
    if (is_refusal(e, d->dtype)) {
      refuse(st, FBN_CUDA_PATH_ID_FUSED, d, has_addend);
      return RUN_REFUSED;
    }
    *s = dnn_fail(cx->fn, e);
    return RUN_ERROR;
  }
  if (a->saved != NULL)
    ((cuda_payload *)a->saved->payload)->reserve_bytes = sz->reserve;
  return RUN_OK;
}

static run_result forward_general(call_ctx *cx, fbn_module *m, const fbn_forward_args *a,
                                  fbn_status *s) {
  cuda_state *st = cx->st;
  const fbn_tensor_desc *d = a->desc;
  const fbn_dnn_plan *plan;
  const fbn_dnn_sizes *sz;
  plan_result r = get_plan(cx->fn, st, d, FBN_CUDA_PATH_ID_GENERAL, false, &plan, &sz, s);
  if (r != PLAN_OK)
    return r == PLAN_REFUSED ? RUN_REFUSED : RUN_ERROR;
  if ((*s = ctx_dnn(cx)) != FBN_STATUS_SUCCESS)
    return RUN_ERROR;
  const cuda_payload *p = a->saved != NULL ? a->saved->payload : NULL;
  fbn_dnn_forward_args fa = {
      .x = a->x,
      .y = a->y,
      .scale = m->options.affine ? m->buffers[FBN_BUFFER_WEIGHT] : st->ones,
      .bias = m->options.affine ? m->buffers[FBN_BUFFER_BIAS] : st->zeros,
      .factor = a->update_running ? a->factor : 1.0,
      .running_mean = a->update_running ? m->buffers[FBN_BUFFER_RUNNING_MEAN] : NULL,
      .running_var = a->update_running ? m->buffers[FBN_BUFFER_RUNNING_VAR] : NULL,
      .epsilon = m->options.eps,
      .save_mean = p != NULL ? payload_at(a->saved, p->mean_off) : NULL,
      .save_invstd = p != NULL ? payload_at(a->saved, p->invstd_off) : NULL,
  };
  fbn_dnn_error e = fbn_dnn_forward_training(cx->dnn, plan, &fa);
  if (!fbn_dnn_ok(e)) {
    if (is_refusal(e, d->dtype)) {
      refuse(st, FBN_CUDA_PATH_ID_GENERAL, d, false);
      return RUN_REFUSED;
    }
    *s = dnn_fail(cx->fn, e);
    return RUN_ERROR;
  }
  fbn_k_shape ks = kshape(d);
  uint32_t *mask = p != NULL ? payload_at(a->saved, p->extra_off) : NULL;
  cudaError_t ke = fbn_k_add_relu(&ks, a->y, a->addend, mask, cx->stream);
  if ((*s = launch_check(cx, "the add+ReLU kernel", ke)) != FBN_STATUS_SUCCESS)
    return RUN_ERROR;
  return RUN_OK;
}

static run_result forward_own(call_ctx *cx, fbn_module *m, const fbn_forward_args *a, bool eval,
                              fbn_status *s) {
  const fbn_tensor_desc *d = a->desc;
  fbn_k_shape ks = kshape(d);
  const size_t partials = eval ? 0 : align_up(fbn_k_partials_bytes(&ks));
  const size_t need = partials + coef_bytes(d, FBN_K_FWD_COEFS);
  if ((*s = ctx_workspace(cx, a->workspace, a->workspace_bytes, need)) != FBN_STATUS_SUCCESS)
    return RUN_ERROR;
  carver cv = {cx->ws, 0};
  double *part = eval ? NULL : carve(&cv, partials);
  void *coef = carve(&cv, coef_bytes(d, FBN_K_FWD_COEFS));
  const cuda_payload *p = a->saved != NULL ? a->saved->payload : NULL;
  void *save_mean = p != NULL ? payload_at(a->saved, p->mean_off) : NULL;
  void *save_invstd = p != NULL ? payload_at(a->saved, p->invstd_off) : NULL;
  const void *weight = m->options.affine ? m->buffers[FBN_BUFFER_WEIGHT] : NULL;
  const void *bias = m->options.affine ? m->buffers[FBN_BUFFER_BIAS] : NULL;
  cudaError_t ke;
  if (eval) {
    ke = fbn_k_eval_prepare(&ks, m->options.eps, weight, bias,
                            m->buffers[FBN_BUFFER_RUNNING_MEAN], m->buffers[FBN_BUFFER_RUNNING_VAR],
                            save_mean, save_invstd, coef, cx->stream);
    if ((*s = launch_check(cx, "the eval prepare kernel", ke)) != FBN_STATUS_SUCCESS)
      return RUN_ERROR;
  } else {
    ke = fbn_k_stats(&ks, a->x, part, cx->stream);
    if ((*s = launch_check(cx, "the statistics kernel", ke)) != FBN_STATUS_SUCCESS)
      return RUN_ERROR;
    ke = fbn_k_stats_finalize(
        &ks, a->x, part, m->options.eps, a->factor, weight, bias,
        a->update_running ? m->buffers[FBN_BUFFER_RUNNING_MEAN] : NULL,
        a->update_running ? m->buffers[FBN_BUFFER_RUNNING_VAR] : NULL, save_mean, save_invstd,
        coef, cx->stream);
    if ((*s = launch_check(cx, "the statistics finalize kernel", ke)) != FBN_STATUS_SUCCESS)
      return RUN_ERROR;
  }
  uint32_t *mask = p != NULL ? payload_at(a->saved, p->extra_off) : NULL;
  ke = fbn_k_apply(&ks, a->x, a->addend, a->y, mask, coef, cx->stream);
  if ((*s = launch_check(cx, "the apply kernel", ke)) != FBN_STATUS_SUCCESS)
    return RUN_ERROR;
  return RUN_OK;
}

static fbn_status check_tensor(const call_ctx *cx, const char *name, const void *ptr,
                               fbn_dtype dtype) {
  return check_device_memory(cx->fn, cx->st, name, ptr, fbn_dtype_size(dtype));
}

static fbn_status cuda_forward(fbn_module *m, const fbn_forward_args *a) {
  call_ctx cx;
  fbn_status s = ctx_begin(&cx, "fbn_module_forward", m, a->exec);
  if (s != FBN_STATUS_SUCCESS)
    return ctx_end(&cx, s);
  const fbn_tensor_desc *d = a->desc;
  if ((s = check_tensor(&cx, "x", a->x, d->dtype)) != FBN_STATUS_SUCCESS ||
      (s = check_tensor(&cx, "addend", a->addend, d->dtype)) != FBN_STATUS_SUCCESS ||
      (s = check_tensor(&cx, "y", a->y, d->dtype)) != FBN_STATUS_SUCCESS ||
      (s = check_device_memory(cx.fn, cx.st, "workspace", a->workspace, 1)) != FBN_STATUS_SUCCESS)
    return ctx_end(&cx, s);

  const bool has_addend = a->addend != NULL;
  int path = select_path(m, d, has_addend, a->batch_stats, NULL);
  for (;;) {
    run_result r;
    switch (path) {
    case FBN_CUDA_PATH_ID_FUSED: r = forward_fused(&cx, m, a, &s); break;
    case FBN_CUDA_PATH_ID_GENERAL: r = forward_general(&cx, m, a, &s); break;
    case FBN_CUDA_PATH_ID_KERNELS: r = forward_own(&cx, m, a, false, &s); break;
    case FBN_CUDA_PATH_ID_EVAL: r = forward_own(&cx, m, a, true, &s); break;
    default:
      s = fbn_error(FBN_STATUS_UNSUPPORTED, "%s: no CUDA path for dtype = %s, layout = %s",
                    cx.fn, fbn_dtype_name(d->dtype), fbn_layout_name(d->layout));
      r = RUN_ERROR;
      break;
    }
    if (r == RUN_OK)
      break;
    if (r == RUN_ERROR)
      return ctx_end(&cx, s);
    /* refused: the refusal is recorded; select again */
    path = select_path(m, d, has_addend, a->batch_stats, NULL);
  }
  if (a->saved != NULL)
    a->saved->path = path;
  return ctx_end(&cx, FBN_STATUS_SUCCESS);
}

/* ---- backward ------------------------------------------------------------- */

/* Backward with fusedbn's kernels; the gate comes from the mask, or from y
 * when the forward left none (FUSED). */
static fbn_status backward_own(call_ctx *cx, fbn_module *m, const fbn_backward_args *a,
                               const uint32_t *mask) {
  const fbn_tensor_desc *d = a->desc;
  const fbn_saved *saved = a->saved;
  const cuda_payload *p = saved->payload;
  fbn_k_shape ks = kshape(d);
  const bool affine = m->options.affine;
  const bool batch_stats = saved->batch_stats;
  const bool reduce = affine || (batch_stats && a->dx != NULL);
  const size_t partials = reduce ? align_up(fbn_k_partials_bytes(&ks)) : 0;
  fbn_status s = ctx_workspace(cx, a->workspace, a->workspace_bytes,
                               partials + coef_bytes(d, FBN_K_BWD_COEFS));
  if (s != FBN_STATUS_SUCCESS)
    return s;
  carver cv = {cx->ws, 0};
  double *part = reduce ? carve(&cv, partials) : NULL;
  void *coef = carve(&cv, coef_bytes(d, FBN_K_BWD_COEFS));
  const void *mean = payload_at(saved, p->mean_off);
  const void *invstd = payload_at(saved, p->invstd_off);
  if (reduce)
    KERNEL_TRY(cx, "the gradient reduction kernel",
               fbn_k_grad_reduce(&ks, a->x, a->dy, mask, a->y, mean, invstd, part, cx->stream));
  if (reduce || a->dx != NULL)
    KERNEL_TRY(cx, "the gradient finalize kernel",
               fbn_k_grad_finalize(&ks, part, batch_stats, affine ? m->buffers[FBN_BUFFER_WEIGHT] : NULL,
                                   mean, invstd,
                                   affine ? m->buffers[FBN_BUFFER_WEIGHT_GRAD] : NULL,
                                   affine ? m->buffers[FBN_BUFFER_BIAS_GRAD] : NULL, coef,
                                   cx->stream));
  if (a->dx != NULL || a->daddend != NULL)
    KERNEL_TRY(cx, "the backward kernel",
               fbn_k_grad_apply(&ks, a->x, a->dy, mask, a->y, coef, a->dx, a->daddend,
                                cx->stream));
  return FBN_STATUS_SUCCESS;
}

static run_result backward_dnn(call_ctx *cx, fbn_module *m, const fbn_backward_args *a, int path,
                               fbn_status *s) {
  cuda_state *st = cx->st;
  const fbn_tensor_desc *d = a->desc;
  const fbn_saved *saved = a->saved;
  const cuda_payload *p = saved->payload;
  const bool has_addend = saved->has_addend;
  const fbn_dnn_plan *plan;
  const fbn_dnn_sizes *sz;
  plan_result r = get_plan(cx->fn, st, d, path, path == FBN_CUDA_PATH_ID_FUSED && has_addend,
                           &plan, &sz, s);
  if (r != PLAN_OK)
    return r == PLAN_REFUSED ? RUN_REFUSED : RUN_ERROR;
  if (path == FBN_CUDA_PATH_ID_FUSED && sz->reserve != p->reserve_bytes) {
    *s = fbn_error(FBN_STATUS_INVALID_STATE,
                   "%s: cuDNN's reserve size changed between forward (%zu bytes) and backward "
                   "(%zu bytes)", cx->fn, p->reserve_bytes, sz->reserve);
    return RUN_ERROR;
  }
  /* dz: the addend's gradient (FUSED with addend) or dy * mask (GENERAL) */
  const bool need_dz = path == FBN_CUDA_PATH_ID_GENERAL || has_addend;
  const bool dz_scratch = need_dz && a->daddend == NULL;
  const bool fused = path == FBN_CUDA_PATH_ID_FUSED;
  const size_t dnn_ws = fused ? dnn_ws_bytes(sz->backward_workspace) : 0;
  size_t need = dnn_ws + (dz_scratch ? align_up(tensor_bytes(d)) : 0);
  if ((*s = ctx_workspace(cx, a->workspace, a->workspace_bytes, need)) != FBN_STATUS_SUCCESS)
    return RUN_ERROR;
  if ((*s = ctx_dnn(cx)) != FBN_STATUS_SUCCESS)
    return RUN_ERROR;
  carver cv = {cx->ws, 0};
  void *dnn_workspace = carve(&cv, dnn_ws);
  void *dz = need_dz ? (dz_scratch ? carve(&cv, tensor_bytes(d)) : a->daddend) : NULL;
  const bool affine = m->options.affine;
  fbn_dnn_backward_args ba = {
      .x = a->x,
      .y = a->y,
      .dy = a->dy,
      .dz = dz,
      .dx = a->dx,
      .scale = affine ? m->buffers[FBN_BUFFER_WEIGHT] : st->ones,
      .bias = affine ? m->buffers[FBN_BUFFER_BIAS] : st->zeros,
      .dscale = affine ? m->buffers[FBN_BUFFER_WEIGHT_GRAD] : st->dummy_grads,
      .dbias = affine ? m->buffers[FBN_BUFFER_BIAS_GRAD]
                      : (char *)st->dummy_grads + align_up((size_t)d->c * st->param_size),
      .accumulate = affine,
      .epsilon = m->options.eps,
      .saved_mean = payload_at(saved, p->mean_off),
      .saved_invstd = payload_at(saved, p->invstd_off),
      .workspace = dnn_workspace,
      .workspace_bytes = dnn_ws,
      .reserve = path == FBN_CUDA_PATH_ID_FUSED ? payload_at(saved, p->extra_off) : NULL,
      .reserve_bytes = path == FBN_CUDA_PATH_ID_FUSED ? p->reserve_bytes : 0,
  };
  if (path == FBN_CUDA_PATH_ID_GENERAL) {
    fbn_k_shape ks = kshape(d);
    cudaError_t ke = fbn_k_mask_grad(&ks, a->dy, payload_at(saved, p->extra_off), NULL, dz,
                                     cx->stream);
    if ((*s = launch_check(cx, "the ReLU mask backward kernel", ke)) != FBN_STATUS_SUCCESS)
      return RUN_ERROR;
    ba.dy = dz;
  }
  fbn_dnn_error e = fbn_dnn_backward(cx->dnn, plan, &ba);
  if (!fbn_dnn_ok(e)) {
    if (is_refusal(e, d->dtype))
      return RUN_REFUSED; /* the forward worked: don't mark the path refused */
    *s = dnn_fail(cx->fn, e);
    return RUN_ERROR;
  }
  return RUN_OK;
}

static fbn_status cuda_backward(fbn_module *m, const fbn_backward_args *a) {
  call_ctx cx;
  fbn_status s = ctx_begin(&cx, "fbn_module_backward", m, a->exec);
  if (s != FBN_STATUS_SUCCESS)
    return ctx_end(&cx, s);
  const fbn_tensor_desc *d = a->desc;
  const fbn_saved *saved = a->saved;
  if (saved->payload_backend != &cuda_backend || saved->payload == NULL)
    return ctx_end(&cx, fbn_error(FBN_STATUS_INVALID_STATE,
                                  "%s: saved holds no CUDA forward state", cx.fn));
  if ((s = check_tensor(&cx, "x", a->x, d->dtype)) != FBN_STATUS_SUCCESS ||
      (s = check_tensor(&cx, "y", a->y, d->dtype)) != FBN_STATUS_SUCCESS ||
      (s = check_tensor(&cx, "dy", a->dy, d->dtype)) != FBN_STATUS_SUCCESS ||
      (s = check_tensor(&cx, "dx", a->dx, d->dtype)) != FBN_STATUS_SUCCESS ||
      (s = check_tensor(&cx, "daddend", a->daddend, d->dtype)) != FBN_STATUS_SUCCESS ||
      (s = check_device_memory(cx.fn, cx.st, "workspace", a->workspace, 1)) != FBN_STATUS_SUCCESS)
    return ctx_end(&cx, s);

  const cuda_payload *p = saved->payload;
  const int path = saved->path;
  const uint32_t *mask =
      path == FBN_CUDA_PATH_ID_FUSED ? NULL : (const uint32_t *)payload_at(saved, p->extra_off);
  if ((path == FBN_CUDA_PATH_ID_FUSED || path == FBN_CUDA_PATH_ID_GENERAL) && a->dx != NULL) {
    run_result r = backward_dnn(&cx, m, a, path, &s);
    if (r == RUN_OK)
      return ctx_end(&cx, FBN_STATUS_SUCCESS);
    if (r == RUN_ERROR)
      return ctx_end(&cx, s);
    /* refused: fusedbn's kernels below compute the same gradients */
  }
  s = backward_own(&cx, m, a, mask);
  return ctx_end(&cx, s);
}

static const fbn_backend cuda_backend = {
    .name = "cuda-cudnn",
    .module_init = cuda_module_init,
    .module_fini = cuda_module_fini,
    .check_desc = cuda_check_desc,
    .buffer_read = cuda_buffer_read,
    .buffer_write = cuda_buffer_write,
    .buffer_fill = cuda_buffer_fill,
    .workspace_size = cuda_workspace_size,
    .saved_prepare = cuda_saved_prepare,
    .saved_free = cuda_saved_free,
    .forward = cuda_forward,
    .backward = cuda_backward,
};

const fbn_backend *fbn_backend_cuda(void) { return &cuda_backend; }

/* ---- public entry points (fusedbn_cuda.h) ---------------------------------- */

const char *fbn_cuda_path_name(fbn_cuda_path path) { return fbn_cuda_path_id_name((int)path); }

fbn_status fbn_cuda_plan_path(const fbn_module_options *o, const fbn_tensor_desc *d,
                              bool has_addend, bool batch_stats, fbn_cuda_path *path) {
  static const char fn[] = "fbn_cuda_plan_path";
  fbn_clear_error();
  if (path == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: path is NULL", fn);
  *path = FBN_CUDA_PATH_NONE;
  if (o == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: options is NULL", fn);
  if (d == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: desc is NULL", fn);
  /* Options no module could be created with fail as in fbn_module_create. */
  fbn_status vs = fbn_validate_options(fn, o);
  if (vs != FBN_STATUS_SUCCESS)
    return vs;
  /* The API layer's validation, on a throwaway module that only carries
   * the options and this backend (check_desc only reads the options and the
   * default limits). */
  cuda_state st;
  memset(&st, 0, sizeof st);
  st.limits = fbn_dnn_limits();
  fbn_module probe;
  memset(&probe, 0, sizeof probe);
  probe.options = *o;
  probe.backend = &cuda_backend;
  probe.backend_state = &st;
  fbn_status s = fbn_validate_desc(fn, &probe, d, has_addend, batch_stats);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  *path = (fbn_cuda_path)select_path(&probe, d, has_addend, batch_stats, NULL);
  return FBN_STATUS_SUCCESS;
}

static fbn_status require_cuda_module(const char *fn, const fbn_module *m) {
  if (m == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: module is NULL", fn);
  if (m->backend != &cuda_backend)
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: module is not a CUDA module (backend %s)", fn,
                     m->backend != NULL ? m->backend->name : "none");
  return FBN_STATUS_SUCCESS;
}

/* Shared checks of the per-module queries: a CUDA module, a desc valid for
 * it in the module's current mode (whose batch_stats flag is returned). */
static fbn_status module_query_begin(const char *fn, const fbn_module *m, const fbn_tensor_desc *d,
                                     bool has_addend, bool *batch_stats) {
  fbn_status s = require_cuda_module(fn, m);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  if (d == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: desc is NULL", fn);
  *batch_stats = fbn_module_uses_batch_stats(m);
  return fbn_validate_desc(fn, m, d, has_addend, *batch_stats);
}

fbn_status fbn_cuda_module_path(const fbn_module *m, const fbn_tensor_desc *d, bool has_addend,
                                fbn_cuda_path *path) {
  static const char fn[] = "fbn_cuda_module_path";
  fbn_clear_error();
  if (path == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: path is NULL", fn);
  *path = FBN_CUDA_PATH_NONE;
  bool batch_stats = false;
  fbn_status s = module_query_begin(fn, m, d, has_addend, &batch_stats);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  *path = (fbn_cuda_path)select_path(m, d, has_addend, batch_stats, NULL);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cuda_saved_path(const fbn_saved *saved, fbn_cuda_path *path) {
  static const char fn[] = "fbn_cuda_saved_path";
  fbn_clear_error();
  if (path == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: path is NULL", fn);
  *path = FBN_CUDA_PATH_NONE;
  if (saved == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: saved is NULL", fn);
  if (saved->module_id != 0 && saved->payload_backend == &cuda_backend)
    *path = (fbn_cuda_path)saved->path;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cuda_module_device(const fbn_module *m, int *device) {
  static const char fn[] = "fbn_cuda_module_device";
  fbn_clear_error();
  if (device == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: device is NULL", fn);
  fbn_status s = require_cuda_module(fn, m);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  *device = state_of(m)->device;
  return FBN_STATUS_SUCCESS;
}

/* Wait for (wait) or poll (!wait) the stream, then read and clear the cuDNN
 * handle's run-time error flag with the handle on that stream (cuDNN's
 * BLOCKING/NONBLOCKING modes look at the handle's current stream, which the
 * module's own handle no longer has after a call on a caller stream). */
static fbn_status runtime_query(const char *fn, void *dnn, cudaStream_t stream, bool wait,
                                int *rstatus) {
  *rstatus = 0;
  cudaError_t e = wait ? cudaStreamSynchronize(stream) : cudaStreamQuery(stream);
  if (!wait && e == cudaErrorNotReady) {
    (void)cudaGetLastError();
    *rstatus = -1; /* pending: cuDNN is not asked, nothing is cleared */
    return FBN_STATUS_SUCCESS;
  }
  if (e != cudaSuccess)
    return cuda_fail(fn, wait ? "cudaStreamSynchronize" : "cudaStreamQuery", e);
  cudaStream_t previous = 0;
  fbn_dnn_error de = fbn_dnn_get_stream(dnn, &previous);
  if (!fbn_dnn_ok(de))
    return dnn_fail(fn, de);
  de = fbn_dnn_set_stream(dnn, stream);
  if (!fbn_dnn_ok(de))
    return dnn_fail(fn, de);
  fbn_dnn_error qe = fbn_dnn_query_runtime_error(dnn, wait, rstatus);
  de = fbn_dnn_set_stream(dnn, previous);
  if (!fbn_dnn_ok(qe))
    return dnn_fail(fn, qe);
  if (!fbn_dnn_ok(de))
    return dnn_fail(fn, de);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cuda_module_check_runtime_error(fbn_module *m, const fbn_cuda_exec *exec,
                                               bool wait, fbn_status *result) {
  static const char fn[] = "fbn_cuda_module_check_runtime_error";
  fbn_clear_error();
  if (result == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: result is NULL", fn);
  fbn_status s = require_cuda_module(fn, m);
  if (s != FBN_STATUS_SUCCESS) {
    *result = s;
    return s;
  }
  cuda_state *st = state_of(m);
  cudaStream_t stream = exec != NULL ? exec->stream : 0;
  void *dnn = exec != NULL && exec->cudnn != NULL ? (void *)exec->cudnn : st->dnn;
  device_guard guard;
  s = device_enter(fn, st->device, &guard, FBN_STATUS_DEVICE_ERROR);
  if (s != FBN_STATUS_SUCCESS) {
    *result = s;
    return s;
  }
  int rstatus = 0;
  s = runtime_query(fn, dnn, stream, wait, &rstatus);
  device_leave(&guard);
  if (s != FBN_STATUS_SUCCESS) {
    *result = s;
    return s;
  }
  if (rstatus == -1) {
    *result = fbn_error(FBN_STATUS_INVALID_STATE,
                        "%s: work queued on the stream has not finished (wait = false): no "
                        "answer yet and nothing cleared; ask again, or with wait = true",
                        fn);
    return FBN_STATUS_SUCCESS;
  }
  *result = fbn_dnn_runtime_status(rstatus);
  if (*result == FBN_STATUS_INVALID_STATE) {
    (void)fbn_error(*result, "%s: cudnnQueryRuntimeError reported %s (%d): no answer yet; ask "
                    "again, or with wait = true", fn, fbn_dnn_status_string(rstatus), rstatus);
  } else if (*result != FBN_STATUS_SUCCESS) {
    (void)fbn_error(*result,
                    "%s: cudnnQueryRuntimeError reported %s (%d): a persistent-mode (fused "
                    "path) call on this cuDNN handle since the last query failed at run time "
                    "(CUDNN_STATUS_RUNTIME_FP_OVERFLOW: its integer-atomic reductions "
                    "overflowed); the y, saved statistics, running statistics and gradients of "
                    "those calls may be wrong (bn_mode = FBN_BN_MODE_SPATIAL avoids the "
                    "persistent kernel)",
                    fn, fbn_dnn_status_string(rstatus), rstatus);
  }
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cuda_module_forward(fbn_module *m, const fbn_cuda_exec *exec,
                                   const fbn_tensor_desc *desc, const void *x, const void *addend,
                                   void *y, fbn_saved *saved, void *workspace,
                                   size_t workspace_bytes) {
  cuda_launch launch = {LAUNCH_MAGIC, "fbn_cuda_module_forward", {0, NULL}};
  if (exec != NULL)
    launch.exec = *exec;
  return fbn_forward_impl(launch.fn, m, desc, x, addend, y, saved, workspace, workspace_bytes,
                          &launch);
}

fbn_status fbn_cuda_module_backward(fbn_module *m, const fbn_cuda_exec *exec,
                                    const fbn_saved *saved, const fbn_tensor_desc *desc,
                                    const void *x, const void *y, const void *dy, void *dx,
                                    void *daddend, void *workspace, size_t workspace_bytes) {
  cuda_launch launch = {LAUNCH_MAGIC, "fbn_cuda_module_backward", {0, NULL}};
  if (exec != NULL)
    launch.exec = *exec;
  return fbn_backward_impl(launch.fn, m, saved, desc, x, y, dy, dx, daddend, workspace,
                           workspace_bytes, &launch);
}

fbn_status fbn_cuda_saved_size(const fbn_module *m, const fbn_tensor_desc *d, bool has_addend,
                               size_t *bytes) {
  static const char fn[] = "fbn_cuda_saved_size";
  fbn_clear_error();
  if (bytes == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: bytes is NULL", fn);
  *bytes = 0;
  bool batch_stats = false;
  fbn_status s = module_query_begin(fn, m, d, has_addend, &batch_stats);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  device_guard g;
  s = device_enter(fn, state_of(m)->device, &g, FBN_STATUS_DEVICE_ERROR);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  size_t extra, reserve;
  s = payload_layout(fn, m, d, has_addend, batch_stats, bytes, &extra, &reserve);
  device_leave(&g);
  return s;
}

fbn_status fbn_cuda_saved_set_memory(fbn_saved *saved, void *device_memory, size_t bytes) {
  static const char fn[] = "fbn_cuda_saved_set_memory";
  fbn_clear_error();
  if (saved == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: saved is NULL", fn);
  if (device_memory != NULL && (uintptr_t)device_memory % ALIGN != 0)
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                     "%s: device_memory = %p: must be aligned to %u bytes", fn, device_memory,
                     ALIGN);
  if (device_memory != NULL && bytes == 0)
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: bytes = 0 with caller memory", fn);
  if (saved->payload_backend != NULL)
    saved->payload_backend->saved_free(saved);
  saved->module_id = 0;
  saved->external = device_memory;
  saved->external_bytes = device_memory != NULL ? bytes : 0;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cuda_saved_stats(const fbn_saved *saved, const void **mean, const void **invstd) {
  static const char fn[] = "fbn_cuda_saved_stats";
  fbn_clear_error();
  if (saved == NULL || mean == NULL || invstd == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: saved, mean and invstd must not be NULL", fn);
  if (saved->module_id == 0 || saved->payload_backend != &cuda_backend ||
      saved->payload == NULL)
    return fbn_error(FBN_STATUS_INVALID_STATE, "%s: saved holds no CUDA forward state", fn);
  const cuda_payload *p = saved->payload;
  *mean = payload_at(saved, p->mean_off);
  *invstd = payload_at(saved, p->invstd_off);
  return FBN_STATUS_SUCCESS;
}
