/*
 * One call of the cuDNN backend: its device, stream and cuDNN handle, the
 * checks of the caller's pointers, and the error messages of CUDA and
 * cuDNN failures.
 */
#include <string.h>

#include <cuda_runtime.h>

#include "cuda_internal.h"

fbn_status fbn_cuda_status_of(cudaError_t e) {
  return e == cudaErrorMemoryAllocation ? FBN_STATUS_OUT_OF_MEMORY : FBN_STATUS_DEVICE_ERROR;
}

/* Every failure is reported here (and by fbn_cuda_launch_check): clear the
 * runtime's last error so that a non-sticky one is not reported again by
 * the next kernel launch's cudaGetLastError() check. */
fbn_status fbn_cuda_fail(const char *call, cudaError_t e) {
  (void)cudaGetLastError();
  return fbn_error(fbn_cuda_status_of(e), "%s failed: %s (%s)", call, cudaGetErrorName(e),
                   cudaGetErrorString(e));
}

fbn_status fbn_cuda_dnn_fail(fbn_dnn_error e) {
  char text[512];
  fbn_dnn_describe(e, text, sizeof text);
  return fbn_error(FBN_STATUS_DEVICE_ERROR, "%s", text);
}

fbn_status fbn_cuda_launch_check(const char *kernel, cudaError_t e) {
  if (e == cudaSuccess)
    return FBN_STATUS_SUCCESS;
  (void)cudaGetLastError();
  return fbn_error(fbn_cuda_status_of(e), "launching %s failed: %s (%s)", kernel,
                   cudaGetErrorName(e), cudaGetErrorString(e));
}

/* ---- device guard -------------------------------------------------------- */

fbn_status fbn_cuda_device_enter(int device, fbn_cuda_device_guard *g, fbn_status on_error) {
  g->changed = false;
  cudaError_t e = cudaGetDevice(&g->previous);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return fbn_error(on_error, "cudaGetDevice failed: %s (%s)", cudaGetErrorName(e),
                     cudaGetErrorString(e));
  }
  if (g->previous != device) {
    e = cudaSetDevice(device);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      return fbn_error(on_error, "cudaSetDevice(%d) failed: %s (%s)", device, cudaGetErrorName(e),
                       cudaGetErrorString(e));
    }
    g->changed = true;
  }
  return FBN_STATUS_SUCCESS;
}

void fbn_cuda_device_leave(fbn_cuda_device_guard *g) {
  if (g->changed)
    (void)cudaSetDevice(g->previous);
  g->changed = false;
}

/* ---- pointers ------------------------------------------------------------- */

fbn_status fbn_cuda_check_memory(const fbn_cuda_state *st, const char *name, const void *ptr,
                                 size_t align) {
  if (ptr == NULL)
    return FBN_STATUS_SUCCESS;
  if (align > 1 && (uintptr_t)ptr % align != 0)
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s = %p: must be aligned to %zu bytes", name,
                     ptr, align);
  struct cudaPointerAttributes attr;
  cudaError_t e = cudaPointerGetAttributes(&attr, ptr);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s = %p: cudaPointerGetAttributes failed: %s (%s); the CUDA backend needs "
                     "device memory",
                     name, ptr, cudaGetErrorName(e), cudaGetErrorString(e));
  }
  if (attr.type == cudaMemoryTypeHost || attr.type == cudaMemoryTypeUnregistered)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s = %p is host memory: the CUDA backend needs device (or managed) memory "
                     "of device %d",
                     name, ptr, st->device);
  if (attr.type == cudaMemoryTypeDevice && attr.device != st->device)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s = %p is memory of CUDA device %d: the op lives on device %d", name, ptr,
                     attr.device, st->device);
  return FBN_STATUS_SUCCESS;
}

/* ---- call context ----------------------------------------------------------- */

fbn_status fbn_cuda_call_begin(fbn_cuda_call *cx, fbn_cuda_state *st, const fbn_cuda_exec *exec) {
  memset(cx, 0, sizeof *cx);
  cx->st = st;
  if (exec != NULL) {
    cx->stream = exec->stream;
    if (exec->cudnn != NULL) {
      cx->dnn = exec->cudnn;
      cx->caller_handle = true;
    }
  }
  if (!cx->caller_handle)
    cx->dnn = st->dnn;
  fbn_status s = fbn_cuda_device_enter(st->device, &cx->guard, FBN_STATUS_DEVICE_ERROR);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  cx->entered = true;
  if (pthread_mutex_lock(&st->lock) != 0)
    return fbn_error(FBN_STATUS_DEVICE_ERROR, "pthread_mutex_lock of the op's state failed");
  cx->locked = true;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cuda_call_dnn(fbn_cuda_call *cx) {
  if (cx->dnn_stream_set)
    return FBN_STATUS_SUCCESS;
  if (cx->dnn == NULL)
    return fbn_error(FBN_STATUS_DEVICE_ERROR, "this op holds no cuDNN handle");
  fbn_dnn_error e;
  if (cx->caller_handle) {
    e = fbn_dnn_get_stream(cx->dnn, &cx->dnn_previous_stream);
    if (!fbn_dnn_ok(e))
      return fbn_cuda_dnn_fail(e);
  }
  e = fbn_dnn_set_stream(cx->dnn, cx->stream);
  if (!fbn_dnn_ok(e))
    return fbn_cuda_dnn_fail(e);
  cx->dnn_stream_set = true;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cuda_call_end(fbn_cuda_call *cx, fbn_status s) {
  if (cx->dnn_stream_set && (cx->caller_handle || cx->stream != 0)) {
    /* A caller's handle gets its own stream back; the op's handle goes back
     * to the legacy default stream, so it never keeps a caller stream that
     * may be destroyed before the op (cudnnDestroy, later calls). */
    fbn_dnn_error e =
        fbn_dnn_set_stream(cx->dnn, cx->caller_handle ? cx->dnn_previous_stream : 0);
    if (!fbn_dnn_ok(e) && s == FBN_STATUS_SUCCESS)
      s = fbn_cuda_dnn_fail(e);
  }
  cx->dnn_stream_set = false;
  if (cx->locked)
    (void)pthread_mutex_unlock(&cx->st->lock);
  cx->locked = false;
  if (cx->entered)
    fbn_cuda_device_leave(&cx->guard);
  cx->entered = false;
  return s;
}
