/*
 * Per-op state of the cuDNN backend (op_init / op_fini) and the memory
 * hooks through which the module layer keeps its buffers on the device.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>

#include "cuda_internal.h"

/* cudaFree whose failure is not reported (teardown): its error must not
 * linger for the next launch check. */
static void free_quietly(void *p) {
  if (p != NULL && cudaFree(p) != cudaSuccess)
    (void)cudaGetLastError();
}

/* Whether an op can ever call cuDNN: batch statistics on float16/bfloat16
 * data (float32/float64 and eval run fusedbn's kernels), unless
 * FBN_CUDA_FORCE_PATH says kernels; any dtype with FBN_CUDA_FORCE_PATH=general. */
static bool op_may_use_cudnn(const fbn_op_desc *o, int forced_path) {
  if (o->statistics != FBN_STATISTICS_BATCH || forced_path == FBN_CUDA_PATH_ID_KERNELS)
    return false;
  return forced_path == FBN_CUDA_PATH_ID_GENERAL || o->dtype == FBN_DTYPE_FLOAT16 ||
         o->dtype == FBN_DTYPE_BFLOAT16;
}

static fbn_status read_forced_path(int *forced) {
  *forced = FBN_CUDA_PATH_ID_NONE;
  const char *force = getenv("FBN_CUDA_FORCE_PATH");
  if (force == NULL || force[0] == '\0')
    return FBN_STATUS_SUCCESS;
  if (strcmp(force, "general") == 0)
    *forced = FBN_CUDA_PATH_ID_GENERAL;
  else if (strcmp(force, "kernels") == 0)
    *forced = FBN_CUDA_PATH_ID_KERNELS;
  else
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "FBN_CUDA_FORCE_PATH = \"%s\": must be \"general\" or \"kernels\" (or unset)",
                     force);
  return FBN_STATUS_SUCCESS;
}

/* A usable device: the runtime sees it and this build has kernels for it. */
static fbn_status check_device(int device) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return fbn_error(FBN_STATUS_NO_DEVICE,
                     "no usable CUDA device: cudaGetDeviceCount failed: %s (%s)",
                     cudaGetErrorName(e), cudaGetErrorString(e));
  }
  if (count <= 0)
    return fbn_error(FBN_STATUS_NO_DEVICE, "no usable CUDA device: cudaGetDeviceCount = 0");
  if (device < 0 || device >= count)
    return fbn_error(FBN_STATUS_NO_DEVICE,
                     "device_index = %d: this process sees %d CUDA device(s) (0..%d)", device,
                     count, count - 1);
  return FBN_STATUS_SUCCESS;
}

/* The first kernel launch on the device: a device this build has no code
 * for is not usable. dst: count params of the state's type. */
static fbn_status first_fill(const fbn_cuda_state *st, void *dst, size_t count, double value) {
  cudaError_t e = fbn_k_fill(dst, st->param_size == sizeof(double), (int64_t)count, value, 0);
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
                     "CUDA device %d (sm_%d%d) cannot run this build's kernels: %s (%s); "
                     "rebuild with -Dgpu_archs=%d%d",
                     st->device, major, minor, cudaGetErrorName(e), cudaGetErrorString(e), major,
                     minor);
  }
  if (e != cudaSuccess)
    return fbn_cuda_fail("the fill kernel", e);
  e = cudaStreamSynchronize(0);
  return e == cudaSuccess ? FBN_STATUS_SUCCESS : fbn_cuda_fail("cudaStreamSynchronize", e);
}

/* Make device current for a teardown, which reports nothing (the thread's
 * last error message stays what it was). */
static bool enter_quietly(int device, fbn_cuda_device_guard *g) {
  g->changed = false;
  if (cudaGetDevice(&g->previous) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (g->previous != device) {
    if (cudaSetDevice(device) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    g->changed = true;
  }
  return true;
}

static void state_free(fbn_cuda_state *st) {
  if (st == NULL)
    return;
  for (int i = 0; i < FBN_CUDA_PLAN_SLOTS; i++)
    if (st->plans[i].valid)
      fbn_dnn_plan_fini(&st->plans[i].plan);
  free_quietly(st->arena);
  fbn_dnn_destroy(st->dnn);
  (void)pthread_mutex_destroy(&st->lock);
  free(st);
}

/* The handle and the helper buffers of an op that may call cuDNN. */
static fbn_status init_cudnn_side(fbn_cuda_state *st) {
  fbn_dnn_error de = fbn_dnn_create(&st->dnn);
  if (!fbn_dnn_ok(de)) {
    char text[512];
    fbn_dnn_describe(de, text, sizeof text);
    return fbn_error(FBN_STATUS_NO_DEVICE, "no usable CUDA device for cuDNN: %s", text);
  }
  const size_t c = (size_t)st->op.num_features;
  const size_t chunk = fbn_cuda_align_up(c * st->param_size);
  cudaError_t e = cudaMalloc(&st->arena, 4 * chunk);
  if (e != cudaSuccess) {
    st->arena = NULL;
    return fbn_cuda_fail("cudaMalloc for cuDNN's ones/zeros and scratch gradients", e);
  }
  char *base = st->arena;
  st->ones = base;
  st->zeros = base + chunk;
  st->scratch_dscale = base + 2 * chunk;
  st->scratch_dbias = base + 3 * chunk;
  fbn_status s = first_fill(st, st->ones, c, 1.0);
  if (s == FBN_STATUS_SUCCESS)
    s = first_fill(st, st->zeros, c, 0.0);
  return s;
}

fbn_status fbn_cuda_op_init(const fbn_op_desc *op, void **state) {
  *state = NULL;
  int forced = FBN_CUDA_PATH_ID_NONE;
  fbn_status s = read_forced_path(&forced);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  if ((s = check_device(op->device_index)) != FBN_STATUS_SUCCESS)
    return s;
  fbn_cuda_device_guard g;
  s = fbn_cuda_device_enter(op->device_index, &g, FBN_STATUS_NO_DEVICE);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  fbn_cuda_state *st = calloc(1, sizeof *st);
  if (st == NULL) {
    fbn_cuda_device_leave(&g);
    return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "out of host memory");
  }
  if (pthread_mutex_init(&st->lock, NULL) != 0) {
    free(st);
    fbn_cuda_device_leave(&g);
    return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "pthread_mutex_init failed");
  }
  st->op = *op;
  st->device = op->device_index;
  st->param_size = fbn_dtype_size(op->param_dtype);
  st->forced_path = forced;
  st->limits = fbn_dnn_limits();
  if (op_may_use_cudnn(op, forced)) {
    s = init_cudnn_side(st);
  } else {
    /* No cuDNN: one kernel launch still proves the device can run ours. */
    void *probe = NULL;
    cudaError_t e = cudaMalloc(&probe, FBN_CUDA_ALIGN);
    if (e != cudaSuccess) {
      s = fbn_cuda_fail("cudaMalloc", e);
    } else {
      s = first_fill(st, probe, 1, 0.0);
      free_quietly(probe);
    }
  }
  if (s != FBN_STATUS_SUCCESS) {
    state_free(st);
    fbn_cuda_device_leave(&g);
    return s;
  }
  *state = st;
  fbn_cuda_device_leave(&g);
  return FBN_STATUS_SUCCESS;
}

void fbn_cuda_op_fini(const fbn_op_desc *op, void *state) {
  (void)op;
  fbn_cuda_state *st = state;
  if (st == NULL)
    return;
  fbn_cuda_device_guard g;
  const bool entered = enter_quietly(st->device, &g);
  state_free(st);
  if (entered)
    fbn_cuda_device_leave(&g);
}

/* ---- memory hooks --------------------------------------------------------- */

fbn_status fbn_cuda_mem_alloc(int device, size_t bytes, void **ptr) {
  *ptr = NULL;
  /* The module layer's first allocation is where a module learns that
   * there is no device. */
  fbn_status s = check_device(device);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  fbn_cuda_device_guard g;
  s = fbn_cuda_device_enter(device, &g, FBN_STATUS_NO_DEVICE);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  cudaError_t e = cudaMalloc(ptr, bytes > 0 ? bytes : 1);
  if (e != cudaSuccess) {
    *ptr = NULL;
    (void)cudaGetLastError();
    s = fbn_error(fbn_cuda_status_of(e), "cudaMalloc(%zu bytes) failed: %s (%s)", bytes,
                  cudaGetErrorName(e), cudaGetErrorString(e));
  }
  fbn_cuda_device_leave(&g);
  return s;
}

void fbn_cuda_mem_free(int device, void *ptr) {
  if (ptr == NULL)
    return;
  fbn_cuda_device_guard g;
  const bool entered = enter_quietly(device, &g);
  free_quietly(ptr);
  if (entered)
    fbn_cuda_device_leave(&g);
}

fbn_status fbn_cuda_mem_copy(int device, void *dst, const void *src, size_t bytes,
                             fbn_bk_copy kind) {
  fbn_cuda_device_guard g;
  fbn_status s = fbn_cuda_device_enter(device, &g, FBN_STATUS_DEVICE_ERROR);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  /* Synchronous: wait for queued forwards/backwards on any stream that may
   * write (or read) the memory first. */
  cudaError_t e = cudaDeviceSynchronize();
  const char *call = "cudaDeviceSynchronize";
  if (e == cudaSuccess && bytes > 0) {
    enum cudaMemcpyKind k = kind == FBN_BK_COPY_TO_HOST     ? cudaMemcpyDeviceToHost
                            : kind == FBN_BK_COPY_FROM_HOST ? cudaMemcpyHostToDevice
                                                            : cudaMemcpyDeviceToDevice;
    e = cudaMemcpy(dst, src, bytes, k);
    call = kind == FBN_BK_COPY_TO_HOST     ? "cudaMemcpy(device -> host)"
           : kind == FBN_BK_COPY_FROM_HOST ? "cudaMemcpy(host -> device)"
                                           : "cudaMemcpy(device -> device)";
    if (e == cudaSuccess && kind == FBN_BK_COPY_ON_DEVICE) {
      e = cudaDeviceSynchronize();
      call = "cudaDeviceSynchronize";
    }
  }
  s = e == cudaSuccess ? FBN_STATUS_SUCCESS : fbn_cuda_fail(call, e);
  fbn_cuda_device_leave(&g);
  return s;
}

fbn_status fbn_cuda_mem_fill(int device, void *ptr, fbn_dtype dtype, size_t count, double value) {
  fbn_cuda_device_guard g;
  fbn_status s = fbn_cuda_device_enter(device, &g, FBN_STATUS_DEVICE_ERROR);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  cudaError_t e = cudaDeviceSynchronize();
  const char *call = "cudaDeviceSynchronize";
  if (e == cudaSuccess) {
    e = fbn_k_fill(ptr, dtype == FBN_DTYPE_FLOAT64, (int64_t)count, value, 0);
    call = "the fill kernel";
  }
  if (e == cudaSuccess) {
    e = cudaStreamSynchronize(0);
    call = "cudaStreamSynchronize";
  }
  s = e == cudaSuccess ? FBN_STATUS_SUCCESS : fbn_cuda_fail(call, e);
  fbn_cuda_device_leave(&g);
  return s;
}
