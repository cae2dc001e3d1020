/*
 * The cuDNN backend's struct fbn_backend, its size queries, and the
 * queries of cuda_backend.h for the API layer's CUDA entry points.
 */
#include <cuda_runtime.h>

#include "cuda_backend.h"
#include "cuda_internal.h"

_Static_assert((int)FBN_CUDA_PATH_NONE == FBN_CUDA_PATH_ID_NONE, "path ids");
_Static_assert((int)FBN_CUDA_PATH_FUSED == FBN_CUDA_PATH_ID_FUSED, "path ids");
_Static_assert((int)FBN_CUDA_PATH_GENERAL == FBN_CUDA_PATH_ID_GENERAL, "path ids");
_Static_assert((int)FBN_CUDA_PATH_KERNELS == FBN_CUDA_PATH_ID_KERNELS, "path ids");
_Static_assert((int)FBN_CUDA_PATH_EVAL == FBN_CUDA_PATH_ID_EVAL, "path ids");

/* ---- size queries ----------------------------------------------------------- */

static fbn_status cuda_saved_size(const fbn_op_desc *op, void *state, const fbn_tensor_desc *d,
                                  size_t *bytes) {
  (void)op;
  fbn_cuda_call cx;
  fbn_status s = fbn_cuda_call_begin(&cx, state, NULL);
  if (s == FBN_STATUS_SUCCESS) {
    fbn_cuda_saved_layout l;
    s = fbn_cuda_saved_layout_of(cx.st, d, &l);
    if (s == FBN_STATUS_SUCCESS)
      *bytes = l.total;
  }
  return fbn_cuda_call_end(&cx, s);
}

static fbn_status cuda_workspace_size(const fbn_op_desc *op, void *state,
                                      const fbn_tensor_desc *d, bool backward, size_t *bytes) {
  (void)op;
  fbn_cuda_call cx;
  fbn_status s = fbn_cuda_call_begin(&cx, state, NULL);
  if (s == FBN_STATUS_SUCCESS) {
    size_t b = 0;
    s = fbn_cuda_workspace_bound(cx.st, d, backward, &b);
    if (s == FBN_STATUS_SUCCESS)
      *bytes = b;
  }
  return fbn_cuda_call_end(&cx, s);
}

static const fbn_backend cuda_backend = {
    .name = "cuda",
    .device = FBN_DEVICE_CUDA,
    .op_init = fbn_cuda_op_init,
    .op_fini = fbn_cuda_op_fini,
    .check_shape = NULL, /* every valid shape has a path (the kernels take any size) */
    .saved_size = cuda_saved_size,
    .workspace_size = cuda_workspace_size,
    .forward = fbn_cuda_forward,
    .backward = fbn_cuda_backward,
    .mem_alloc = fbn_cuda_mem_alloc,
    .mem_free = fbn_cuda_mem_free,
    .mem_copy = fbn_cuda_mem_copy,
    .mem_fill = fbn_cuda_mem_fill,
};

const fbn_backend *fbn_backend_cuda(void) { return &cuda_backend; }

/* ---- paths -------------------------------------------------------------------- */

fbn_status fbn_cuda_plan_path_of(const fbn_op_desc *op, const fbn_tensor_desc *d,
                                 fbn_cuda_path *path) {
  const fbn_cuda_limits limits = fbn_dnn_limits();
  const char *why = "";
  const int p = fbn_cuda_select_path(&limits, NULL, op->bn_mode, op->eps, d, op->operation,
                                     op->statistics == FBN_STATISTICS_BATCH, &why);
  *path = (fbn_cuda_path)p;
  if (p == FBN_CUDA_PATH_ID_NONE)
    return fbn_error(FBN_STATUS_UNSUPPORTED, "dtype = %s, layout = %s: %s",
                     fbn_dtype_name(d->dtype), fbn_layout_name(d->layout), why);
  return FBN_STATUS_SUCCESS;
}

fbn_cuda_path fbn_cuda_state_path_of(const void *state, const fbn_tensor_desc *d) {
  return (fbn_cuda_path)fbn_cuda_state_path(state, d, NULL);
}

bool fbn_cuda_op_has_handle(const void *state) {
  return state != NULL && ((const fbn_cuda_state *)state)->dnn != NULL;
}

void fbn_cuda_saved_stats_offsets(const fbn_tensor_desc *d, size_t *mean_off,
                                  size_t *invstd_off) {
  *mean_off = 0;
  *invstd_off = fbn_cuda_stats_bytes(d);
}

/* ---- the path of each saved state ---------------------------------------------------- */

/* Which path the last forward into a saved-state address took, for
 * fbn_cuda_saved_path(): a table keyed by the address, 16 probes from its
 * hash, the oldest of them replaced when none matches. A saved state stays
 * findable until 4096 other addresses have been recorded in its
 * neighbourhood; an address forgotten that way answers FBN_CUDA_PATH_NONE. */
#define SAVED_PATH_SLOTS 4096u
#define SAVED_PATH_PROBES 16u

typedef struct saved_path_slot {
  const void *key;
  int path;
  uint64_t stamp;
} saved_path_slot;

static saved_path_slot saved_paths[SAVED_PATH_SLOTS];
static uint64_t saved_path_clock;
static pthread_mutex_t saved_path_lock = PTHREAD_MUTEX_INITIALIZER;

static unsigned saved_path_home(const void *key) {
  /* saved states are at least 64-byte aligned: drop the zero bits */
  return (unsigned)((((uintptr_t)key >> 6) * UINT64_C(0x9e3779b97f4a7c15)) >> 40) %
         SAVED_PATH_SLOTS;
}

void fbn_cuda_record_saved_path(const void *saved, int path) {
  if (saved == NULL || pthread_mutex_lock(&saved_path_lock) != 0)
    return;
  const unsigned home = saved_path_home(saved);
  saved_path_slot *victim = &saved_paths[home];
  for (unsigned k = 0; k < SAVED_PATH_PROBES; k++) {
    saved_path_slot *slot = &saved_paths[(home + k) % SAVED_PATH_SLOTS];
    if (slot->key == saved) {
      victim = slot;
      break;
    }
    if (slot->stamp < victim->stamp)
      victim = slot;
  }
  victim->key = saved;
  victim->path = path;
  victim->stamp = ++saved_path_clock;
  (void)pthread_mutex_unlock(&saved_path_lock);
}

fbn_cuda_path fbn_cuda_recorded_saved_path(const void *saved) {
  int path = FBN_CUDA_PATH_ID_NONE;
  if (saved == NULL || pthread_mutex_lock(&saved_path_lock) != 0)
    return FBN_CUDA_PATH_NONE;
  const unsigned home = saved_path_home(saved);
  for (unsigned k = 0; k < SAVED_PATH_PROBES; k++) {
    const saved_path_slot *slot = &saved_paths[(home + k) % SAVED_PATH_SLOTS];
    if (slot->key == saved) {
      path = slot->path;
      break;
    }
  }
  (void)pthread_mutex_unlock(&saved_path_lock);
  return (fbn_cuda_path)path;
}

/* ---- run-time errors of the persistent kernels ----------------------------------- */

/* Wait for (wait) or poll (!wait) the stream, then read and clear the cuDNN
 * handle's run-time error flag with the handle on that stream (cuDNN's
 * BLOCKING/NONBLOCKING modes look at the handle's current stream, which the
 * op's own handle no longer has after a call on a caller stream).
 * *rstatus = -1: the stream's work is not finished (nothing asked). */
static fbn_status runtime_query(void *dnn, cudaStream_t stream, bool wait, int *rstatus) {
  *rstatus = 0;
  cudaError_t e = wait ? cudaStreamSynchronize(stream) : cudaStreamQuery(stream);
  if (!wait && e == cudaErrorNotReady) {
    (void)cudaGetLastError();
    *rstatus = -1;
    return FBN_STATUS_SUCCESS;
  }
  if (e != cudaSuccess)
    return fbn_cuda_fail(wait ? "cudaStreamSynchronize" : "cudaStreamQuery", e);
  cudaStream_t previous = 0;
  fbn_dnn_error de = fbn_dnn_get_stream(dnn, &previous);
  if (!fbn_dnn_ok(de))
    return fbn_cuda_dnn_fail(de);
  de = fbn_dnn_set_stream(dnn, stream);
  if (!fbn_dnn_ok(de))
    return fbn_cuda_dnn_fail(de);
  fbn_dnn_error qe = fbn_dnn_query_runtime_error(dnn, wait, rstatus);
  de = fbn_dnn_set_stream(dnn, previous);
  if (!fbn_dnn_ok(qe))
    return fbn_cuda_dnn_fail(qe);
  if (!fbn_dnn_ok(de))
    return fbn_cuda_dnn_fail(de);
  return FBN_STATUS_SUCCESS;
}

static fbn_status runtime_result(int rstatus, fbn_status *result) {
  if (rstatus == -1) {
    *result = fbn_error(FBN_STATUS_INVALID_STATE,
                        "work queued on the stream has not finished (wait = false): no answer "
                        "yet and nothing cleared; ask again, or with wait = true");
    return FBN_STATUS_SUCCESS;
  }
  *result = fbn_dnn_runtime_status(rstatus);
  if (*result == FBN_STATUS_INVALID_STATE)
    (void)fbn_error(*result,
                    "cudnnQueryRuntimeError reported %s (%d): no answer yet; ask again, or with "
                    "wait = true",
                    fbn_dnn_status_string(rstatus), rstatus);
  else if (*result != FBN_STATUS_SUCCESS)
    (void)fbn_error(*result,
                    "cudnnQueryRuntimeError reported %s (%d): a persistent-mode (fused path) "
                    "call on this cuDNN handle since the last query failed at run time "
                    "(CUDNN_STATUS_RUNTIME_FP_OVERFLOW: its integer-atomic reductions "
                    "overflowed); the y, saved statistics, running statistics and gradients of "
                    "those calls may be wrong (bn_mode = FBN_BN_MODE_SPATIAL avoids the "
                    "persistent kernel)",
                    fbn_dnn_status_string(rstatus), rstatus);
  return FBN_STATUS_SUCCESS;
}

static fbn_status query_on(int device, void *dnn, const fbn_cuda_exec *exec, bool wait,
                           fbn_status *result) {
  fbn_cuda_device_guard g;
  fbn_status s = fbn_cuda_device_enter(device, &g, FBN_STATUS_DEVICE_ERROR);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  int rstatus = 0;
  s = runtime_query(dnn, exec != NULL ? exec->stream : 0, wait, &rstatus);
  fbn_cuda_device_leave(&g);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  return runtime_result(rstatus, result);
}

fbn_status fbn_cuda_handle_runtime_error(int device, const fbn_cuda_exec *exec, bool wait,
                                         fbn_status *result) {
  return query_on(device, exec->cudnn, exec, wait, result);
}

fbn_status fbn_cuda_op_runtime_error(const void *state, const fbn_cuda_exec *exec, bool wait,
                                     fbn_status *result) {
  fbn_cuda_state *st = (fbn_cuda_state *)state;
  if (exec != NULL && exec->cudnn != NULL)
    return fbn_cuda_handle_runtime_error(st->device, exec, wait, result);
  *result = FBN_STATUS_SUCCESS;
  if (st->dnn == NULL)
    return FBN_STATUS_SUCCESS; /* this op never calls cuDNN */
  /* The op's handle: not while a call of the op uses it. */
  if (pthread_mutex_lock(&st->lock) != 0)
    return fbn_error(FBN_STATUS_DEVICE_ERROR, "pthread_mutex_lock of the op's state failed");
  fbn_status s = query_on(st->device, st->dnn, exec, wait, result);
  (void)pthread_mutex_unlock(&st->lock);
  return s;
}
