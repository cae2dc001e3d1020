/*
 * Declarations shared by the files of the cuDNN backend (never by the API
 * layer: src/cuda/cuda_backend.h is what it sees).
 *
 *   cuda_state.c     per-op state: device checks, cuDNN handle, ones/zeros
 *                    for affine = false, FBN_CUDA_FORCE_PATH; the memory
 *                    hooks of the module layer
 *   cuda_plan.c      path selection with the run-time refusals, the plan
 *                    cache (descriptors + cuDNN's sizes), workspace and
 *                    saved-state sizes and layout
 *   cuda_call.c      one call's context: device, stream and handle,
 *                    pointer checks, workspace carving, error messages
 *   cuda_forward.c   forward of every path
 *   cuda_backward.c  backward of every path
 *   cuda_backend.c   struct fbn_backend and the queries of cuda_backend.h
 *
 * Messages name no public call: the API layer prefixes them.
 *
 * Saved state (device memory, the caller's or the module layer's):
 *   [mean: C params][invstd: C params][ReLU mask words | cuDNN reserve space]
 * each part 256-byte aligned relative to the start; params are float
 * (double for float64 tensors).  BN alone has no mask.
 */
#ifndef FUSEDBN_SRC_CUDA_CUDA_INTERNAL_H
#define FUSEDBN_SRC_CUDA_CUDA_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#include "backend.h"
#include "core/core.h"
#include "cuda_kernels.h"
#include "cuda_paths.h"
#include "cudnn_engine.h"
#include "fusedbn/fusedbn_cuda.h"

#define FBN_CUDA_ALIGN 256u

static inline size_t fbn_cuda_align_up(size_t v) {
  return (v + FBN_CUDA_ALIGN - 1) / FBN_CUDA_ALIGN * FBN_CUDA_ALIGN;
}

/* cuDNN's fused calls want a non-NULL workspace even when they report 0
 * bytes: always give them at least one aligned block. */
static inline size_t fbn_cuda_dnn_ws_bytes(size_t queried) {
  return fbn_cuda_align_up(queried > 0 ? queried : 1);
}

/* ---- per-op state (cuda_state.c) ------------------------------------------ */

#define FBN_CUDA_PLAN_SLOTS 4

typedef struct fbn_cuda_plan_slot {
  bool valid;
  uint64_t last_use;
  fbn_dnn_plan plan;
  fbn_dnn_sizes sizes;
} fbn_cuda_plan_slot;

typedef struct fbn_cuda_state {
  fbn_op_desc op; /* copy of the op's validated description */
  int device;
  size_t param_size; /* 4 or 8 */
  /* The op's own cudnnHandle_t; NULL for ops that never call cuDNN (float32
   * and float64 data, running statistics, FBN_CUDA_FORCE_PATH=kernels). */
  void *dnn;
  fbn_cuda_limits limits;
  /* FBN_CUDA_FORCE_PATH=general|kernels when the op was created: training
   * calls that would take the fused/general path take this one instead
   * (FBN_CUDA_PATH_ID_NONE when unset). */
  int forced_path;
  /* With a handle: C params each of ones and zeros (cuDNN's scale and bias
   * for affine = false) and scratch gradients (cuDNN's dscale/dbias when
   * the caller skips them), in one allocation. */
  void *arena;
  void *ones;
  void *zeros;
  void *scratch_dscale;
  void *scratch_dbias;
  /* Guards what calls change: the refusals, the plan cache and the
   * handle's stream. Held for the whole of a call that uses cuDNN. */
  pthread_mutex_t lock;
  fbn_cuda_refusals refusals;
  fbn_cuda_plan_slot plans[FBN_CUDA_PLAN_SLOTS];
  uint64_t plan_clock;
} fbn_cuda_state;

FBN_INTERNAL fbn_status fbn_cuda_op_init(const fbn_op_desc *op, void **state);
FBN_INTERNAL void fbn_cuda_op_fini(const fbn_op_desc *op, void *state);

FBN_INTERNAL fbn_status fbn_cuda_mem_alloc(int device, size_t bytes, void **ptr);
FBN_INTERNAL void fbn_cuda_mem_free(int device, void *ptr);
FBN_INTERNAL fbn_status fbn_cuda_mem_copy(int device, void *dst, const void *src, size_t bytes,
                                          fbn_bk_copy kind);
FBN_INTERNAL fbn_status fbn_cuda_mem_fill(int device, void *ptr, fbn_dtype dtype, size_t count,
                                          double value);

/* ---- errors and the call context (cuda_call.c) ---------------------------- */

/* FBN_STATUS_OUT_OF_MEMORY for cudaErrorMemoryAllocation, else DEVICE_ERROR. */
FBN_INTERNAL fbn_status fbn_cuda_status_of(cudaError_t e);
/* "call failed: cudaErrorX (text)", clearing the runtime's last error. */
FBN_INTERNAL fbn_status fbn_cuda_fail(const char *call, cudaError_t e);
/* cuDNN's status and last error text. */
FBN_INTERNAL fbn_status fbn_cuda_dnn_fail(fbn_dnn_error e);

typedef struct fbn_cuda_device_guard {
  int previous;
  bool changed;
} fbn_cuda_device_guard;

/* Make device current (on_error: the status of a failure). */
FBN_INTERNAL fbn_status fbn_cuda_device_enter(int device, fbn_cuda_device_guard *g,
                                              fbn_status on_error);
FBN_INTERNAL void fbn_cuda_device_leave(fbn_cuda_device_guard *g);

/* NULL, or device (or managed) memory of the state's device aligned to
 * align bytes: INVALID_VALUE naming `name` otherwise. */
FBN_INTERNAL fbn_status fbn_cuda_check_memory(const fbn_cuda_state *st, const char *name,
                                              const void *ptr, size_t align);

typedef struct fbn_cuda_call {
  fbn_cuda_state *st;
  cudaStream_t stream;
  void *dnn; /* the handle of this call: the caller's or the op's */
  bool caller_handle;
  cudaStream_t dnn_previous_stream; /* a caller handle's stream, given back */
  bool dnn_stream_set;
  bool locked;
  fbn_cuda_device_guard guard;
  bool entered;
} fbn_cuda_call;

/* Enter the op's device, take the lock; exec may be NULL (stream 0, the
 * op's own handle). */
FBN_INTERNAL fbn_status fbn_cuda_call_begin(fbn_cuda_call *cx, fbn_cuda_state *st,
                                            const fbn_cuda_exec *exec);
/* Point the call's cuDNN handle at the call's stream (first use only). */
FBN_INTERNAL fbn_status fbn_cuda_call_dnn(fbn_cuda_call *cx);
/* Give the handle its stream back, release the lock, leave the device;
 * returns s (or the first failure of the clean-up when s is success). */
FBN_INTERNAL fbn_status fbn_cuda_call_end(fbn_cuda_call *cx, fbn_status s);
/* A kernel launcher's result: DEVICE_ERROR naming the kernel. */
FBN_INTERNAL fbn_status fbn_cuda_launch_check(const char *kernel, cudaError_t e);

/* Consecutive 256-byte aligned pieces of a workspace. */
typedef struct fbn_cuda_carver {
  char *base;
  size_t used;
} fbn_cuda_carver;

static inline void *fbn_cuda_carve(fbn_cuda_carver *c, size_t bytes) {
  if (bytes == 0)
    return NULL;
  void *p = c->base + c->used;
  c->used += fbn_cuda_align_up(bytes);
  return p;
}

/* ---- paths, plans and sizes (cuda_plan.c) --------------------------------- */

FBN_INTERNAL fbn_k_shape fbn_cuda_kshape(const fbn_tensor_desc *d);
FBN_INTERNAL size_t fbn_cuda_tensor_bytes(const fbn_tensor_desc *d);
/* Bytes of one per-channel parameter array of desc (aligned). */
FBN_INTERNAL size_t fbn_cuda_stats_bytes(const fbn_tensor_desc *d);
/* Bytes of coefs per-channel coefficient rows (aligned). */
FBN_INTERNAL size_t fbn_cuda_coef_bytes(const fbn_tensor_desc *d, int coefs);

/* The path a forward of desc takes now: the table, the size gates, the
 * refusals learnt so far and FBN_CUDA_FORCE_PATH. Takes no lock (a racing
 * refusal at worst sends this call down the chain). */
FBN_INTERNAL int fbn_cuda_state_path(const fbn_cuda_state *st, const fbn_tensor_desc *d,
                                     const char **why);
/* Whether a forward of desc may have taken the fused path although the
 * selection no longer says so (cuDNN refused the class since): its backward
 * then has no mask to read and gates with !(y <= 0), which is what the mask
 * of the other paths encodes. */
FBN_INTERNAL bool fbn_cuda_forward_maybe_fused(const fbn_cuda_state *st,
                                               const fbn_tensor_desc *d);

/* Does this cuDNN error mean "cuDNN can't do this configuration"? */
FBN_INTERNAL bool fbn_cuda_is_refusal(fbn_dnn_error e, fbn_dtype dtype);
/* Note that cuDNN refused path for desc's class (lock held). */
FBN_INTERNAL void fbn_cuda_refuse(fbn_cuda_state *st, int path, const fbn_tensor_desc *d);

typedef enum fbn_cuda_plan_result {
  FBN_CUDA_PLAN_OK,
  FBN_CUDA_PLAN_REFUSED,
  FBN_CUDA_PLAN_ERROR
} fbn_cuda_plan_result;

/* The cached plan of (desc, path), built and sized with the op's handle if
 * needed (lock held). REFUSED: cuDNN refused it (recorded); ERROR: *status
 * set. */
FBN_INTERNAL fbn_cuda_plan_result fbn_cuda_get_plan(fbn_cuda_state *st,
                                                    const fbn_tensor_desc *d, int path,
                                                    const fbn_dnn_plan **plan,
                                                    const fbn_dnn_sizes **sizes,
                                                    fbn_status *status);

/* Where the parts of the saved state lie for a forward of desc. */
typedef struct fbn_cuda_saved_layout {
  size_t mean_off;
  size_t invstd_off;
  size_t extra_off;    /* mask words or reserve space */
  size_t extra_bytes;  /* 0 for BN alone off the fused path */
  size_t reserve_bytes; /* cuDNN's reserve size when the fused path is selected */
  size_t total;
} fbn_cuda_saved_layout;

/* Lock held; needs the op's device current for cuDNN's size queries. */
FBN_INTERNAL fbn_status fbn_cuda_saved_layout_of(fbn_cuda_state *st, const fbn_tensor_desc *d,
                                                 fbn_cuda_saved_layout *layout);
/* The most workspace any path of the fallback chain starting at the
 * selected one needs (lock held, device current). */
FBN_INTERNAL fbn_status fbn_cuda_workspace_bound(fbn_cuda_state *st, const fbn_tensor_desc *d,
                                                 bool backward, size_t *bytes);
/* Workspace of the own-kernel backward (partials + coefficients). */
FBN_INTERNAL size_t fbn_cuda_own_backward_ws(const fbn_tensor_desc *d);

/* Remember the path a forward into saved took (cuda_backend.c). */
FBN_INTERNAL void fbn_cuda_record_saved_path(const void *saved, int path);

/* ---- compute (cuda_forward.c, cuda_backward.c) ---------------------------- */

FBN_INTERNAL fbn_status fbn_cuda_forward(const fbn_bk_forward_args *args);
FBN_INTERNAL fbn_status fbn_cuda_backward(const fbn_bk_backward_args *args);

#endif /* FUSEDBN_SRC_CUDA_CUDA_INTERNAL_H */
