/*
 * fusedbn CUDA/cuDNN interop: per-call streams, a caller's cuDNN handle,
 * caller-provided saved-state memory and the path queries of the cuDNN
 * backend, for modules (fbn_cuda_module_*) and ops (fbn_cuda_op_*).
 *
 * Include this header only where the CUDA toolkit headers are available; it
 * pulls in <cuda_runtime_api.h> for cudaStream_t.  It does not include
 * cudnn.h: a cudnnHandle_t converts to `struct cudnnContext *` implicitly.
 *
 * Streams and synchronization
 *   fbn_op_forward()/fbn_op_backward() and fbn_module_forward()/
 *   fbn_module_backward() of <fusedbn/fusedbn.h> run on the legacy default
 *   stream (0) with the op's own cuDNN handle (a module runs one op per
 *   dtype, layout, mode and operation).  The fbn_cuda_*_forward()/backward()
 *   calls take an fbn_cuda_exec: the stream the work is queued on and,
 *   optionally, a cuDNN handle of the caller's (created on the op's
 *   device).  A caller's handle gets the call's stream for the duration of
 *   the call and its previous stream back before the call returns (an op's
 *   own handle goes back to stream 0 after a call on another stream).
 *   Forward and backward are asynchronous with respect to the host: outputs
 *   are ready when the stream says so.  Running statistics, gradients and
 *   the saved state are written in stream order: calls on different streams
 *   that share them (or one module, or its cached workspace) must be
 *   ordered by the caller (events), as for any tensor shared between
 *   streams.  Buffer reads/writes (fbn_module_read_buffer, ...) wait for
 *   the device's queued work first.
 *
 * Device memory
 *   Every tensor, per-channel array, saved state and workspace is device
 *   memory of the op's (module's) device (or managed memory); tensors and
 *   per-channel arrays are aligned to their element size.  Host memory
 *   there is rejected with FBN_STATUS_INVALID_VALUE.  With a caller
 *   workspace and saved memory (always in the op API; for a module's saved
 *   object, caller memory or memory already big enough) forward and
 *   backward neither allocate device memory nor synchronize.  With
 *   workspace == NULL a module uses a cached buffer that it grows
 *   (cudaFree/cudaMalloc, which synchronize) when a call needs more.
 *
 * Ownership
 *   x, addend, y, dy, dx, daddend           caller
 *   weight, bias, running stats, gradients  op API: caller; module: module
 *   ones/zeros for affine == false,
 *   scratch parameter gradients, cuDNN
 *   handle (ops that can call cuDNN)        op, or the caller's exec handle
 *   workspace (cuDNN workspace, reductions) caller, or a module's cache
 *   saved mean / inverse std, ReLU bit mask
 *   or cuDNN reserve space                  op API: caller; module: fbn_saved
 *                                           (device), or caller memory via
 *                                           fbn_cuda_saved_set_memory
 */
#ifndef FUSEDBN_FUSEDBN_CUDA_H
#define FUSEDBN_FUSEDBN_CUDA_H

#include <cuda_runtime_api.h>

#include "fusedbn/fusedbn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* cudnnHandle_t is `struct cudnnContext *` (cudnn_graph.h). */
struct cudnnContext;

/** Launch context of one call. Zero-initialize for the defaults. */
typedef struct fbn_cuda_exec {
  /** Stream the work is queued on; 0 is the legacy default stream. */
  cudaStream_t stream;
  /** A cudnnHandle_t of the caller's on the module's device, or NULL to use
   *  the module's own handle. */
  struct cudnnContext *cudnn;
} fbn_cuda_exec;

/** How the cuDNN backend computes a call (docs/cuda-backend.md has the table). */
typedef enum fbn_cuda_path {
  /** The configuration cannot run on the CUDA backend. */
  FBN_CUDA_PATH_NONE = 0,
  /** Training: cudnnBatchNormalizationForwardTrainingEx / BackwardEx with
   *  the operation's bnOps (CUDNN_BATCHNORM_OPS_BN, _BN_ACTIVATION or
   *  _BN_ADD_ACTIVATION), mode CUDNN_BATCHNORM_SPATIAL_PERSISTENT, ReLU
   *  propagating NaN. */
  FBN_CUDA_PATH_FUSED = 1,
  /** Training: cuDNN batch norm (CUDNN_BATCHNORM_OPS_BN, mode
   *  CUDNN_BATCHNORM_SPATIAL), then (ReLU operations) fusedbn's add + ReLU
   *  kernel writing a 1-bit-per-element mask; backward dz = dy * mask into
   *  cuDNN's backward. */
  FBN_CUDA_PATH_GENERAL = 2,
  /** Training without cuDNN: fusedbn's own statistics, apply and backward
   *  kernels (float64 accumulation). Taken where cuDNN's limits are exceeded
   *  (descriptor dimensions or element count above INT32_MAX, N above
   *  880801) or where cuDNN rejects the dtype at run time. */
  FBN_CUDA_PATH_KERNELS = 3,
  /** Evaluation with running statistics: fusedbn's single-pass kernel
   *  (folded per-channel scale/shift, add, ReLU, mask) and its backward
   *  (statistics are constants). */
  FBN_CUDA_PATH_EVAL = 4,
} fbn_cuda_path;

/** Static name of a path ("fused", "general", "kernels", "eval", "none");
 *  "none" for a value outside the enum.  Never NULL, never fails. */
FBN_API const char *fbn_cuda_path_name(fbn_cuda_path path);

/**
 * The path a CUDA module created with *options would take for a forward of
 * desc: batch_stats is true in training mode (or without tracked running
 * statistics), false in eval mode with tracked statistics.  A pure host
 * function: needs no device.  It assumes cuDNN accepts bfloat16 in its fused
 * and batch-norm calls; fbn_cuda_module_path() also knows what the device
 * refused at run time.  Fails like fbn_module_forward's validation would
 * (e.g. FBN_STATUS_SHAPE_MISMATCH when desc->c != num_features; has_addend
 * with an operation other than FBN_OPERATION_BN_ADD_RELU:
 * FBN_STATUS_INVALID_VALUE), with *path = FBN_CUDA_PATH_NONE.  The path is
 * the one of options->operation (FBN_OPERATION_BN_ADD_RELU without an
 * addend: that of FBN_OPERATION_BN_RELU).  Options no module could be
 * created with fail as in fbn_module_create() (FBN_STATUS_INVALID_VALUE);
 * options->device must be a valid value but is otherwise not looked at.
 * NULL options, desc or path: FBN_STATUS_NULL_POINTER.
 */
FBN_API fbn_status fbn_cuda_plan_path(const fbn_module_options *options,
                                      const fbn_tensor_desc *desc, bool has_addend,
                                      bool batch_stats, fbn_cuda_path *path);

/** The path the module's next forward of desc will take, in its current
 *  mode, including run-time fallbacks already learnt (e.g. bfloat16
 *  refused by cuDNN).  NULL module, desc or path: FBN_STATUS_NULL_POINTER; a
 *  CPU module: FBN_STATUS_INVALID_VALUE; desc validated as in forward.
 *  *path = FBN_CUDA_PATH_NONE on failure. */
FBN_API fbn_status fbn_cuda_module_path(const fbn_module *module, const fbn_tensor_desc *desc,
                                        bool has_addend, fbn_cuda_path *path);

/** The path the forward that filled saved took (FBN_CUDA_PATH_NONE for an
 *  empty saved object or one filled by a CPU module).  NULL saved or path:
 *  FBN_STATUS_NULL_POINTER. */
FBN_API fbn_status fbn_cuda_saved_path(const fbn_saved *saved, fbn_cuda_path *path);

/** The CUDA device ordinal of a CUDA module (FBN_STATUS_INVALID_VALUE for a
 *  CPU module; *device untouched on failure).  NULL module or device:
 *  FBN_STATUS_NULL_POINTER. */
FBN_API fbn_status fbn_cuda_module_device(const fbn_module *module, int *device);

/** fbn_module_forward() with an explicit launch context (NULL exec = the
 *  defaults). See fusedbn.h for the arguments, their NULL rules, aliasing
 *  and statuses; messages name fbn_cuda_module_forward.  *exec is read
 *  during the call only; exec->cudnn stays the caller's.  A CPU module runs
 *  as with fbn_module_forward() (exec unused). */
FBN_API fbn_status fbn_cuda_module_forward(fbn_module *module, const fbn_cuda_exec *exec,
                                           const fbn_tensor_desc *desc, const void *x,
                                           const void *addend, void *y, fbn_saved *saved,
                                           void *workspace, size_t workspace_bytes);

/** fbn_module_backward() with an explicit launch context (NULL exec = the
 *  defaults); arguments, NULL rules and statuses as for
 *  fbn_module_backward(), messages naming fbn_cuda_module_backward. */
FBN_API fbn_status fbn_cuda_module_backward(fbn_module *module, const fbn_cuda_exec *exec,
                                            const fbn_saved *saved, const fbn_tensor_desc *desc,
                                            const void *x, const void *y, const void *dy,
                                            void *dx, void *daddend, void *workspace,
                                            size_t workspace_bytes);

/**
 * Whether cuDNN's persistent kernels (FBN_CUDA_PATH_FUSED, mode
 * CUDNN_BATCHNORM_SPATIAL_PERSISTENT) raised a run-time error on a cuDNN
 * handle since the handle's last query: cudnnQueryRuntimeError.  The
 * persistent kernels reduce with integer atomics; where those overflow the
 * forward/backward call itself still returns FBN_STATUS_SUCCESS and its
 * results (y, saved statistics, running statistics, dx, daddend, gradients)
 * may be wrong or non-finite.  cuDNN only records
 * CUDNN_STATUS_RUNTIME_FP_OVERFLOW in a per-handle flag, which this call
 * reads and clears.  A module created with bn_mode = FBN_BN_MODE_SPATIAL
 * never runs the persistent kernel (and never raises the flag).
 *
 * When to call: after fused-path forwards/backwards (fbn_cuda_module_path()
 * or fbn_cuda_saved_path() say FBN_CUDA_PATH_FUSED), with the exec those
 * calls used: the same stream and the same cuDNN handle (exec == NULL or
 * exec->cudnn == NULL: the module's own handle, which all calls of the
 * module without a caller handle share; a caller's handle: the flag covers
 * every persistent-mode call on it, fusedbn's or not).  For example once per
 * training step, before the optimizer consumes the gradients.  The flag
 * belongs to the handle, not to one call: a query answers for all calls on
 * the handle since the previous query that read it.
 *
 * wait == true (blocking, CUDNN_ERRQUERY_BLOCKING): synchronizes
 * exec->stream (cudaStreamSynchronize) and reads the flag.
 * wait == false (non-blocking, CUDNN_ERRQUERY_NONBLOCKING): if work queued
 * on exec->stream has not finished (cudaStreamQuery), answers "no answer
 * yet" without reading or clearing anything; otherwise reads the flag.
 * CUDNN_ERRQUERY_RAWCODE (read the flag whatever the stream's progress) is
 * not offered: its answer can miss a kernel still running.  Neither mode may
 * be used on a stream that is being captured into a CUDA graph.  The query
 * is a use of the module (and of exec->cudnn): not concurrently with other
 * calls on them.  The handle gets exec->stream for the query and its
 * previous stream back before the call returns.
 *
 * Returns the status of the query itself: FBN_STATUS_SUCCESS when cuDNN
 * answered, with *result:
 *   FBN_STATUS_SUCCESS        no run-time error since the last query;
 *   FBN_STATUS_DEVICE_ERROR   cuDNN reported CUDNN_STATUS_RUNTIME_FP_OVERFLOW
 *                             (or another run-time status); the flag is now
 *                             clear;
 *   FBN_STATUS_INVALID_STATE  wait == false and the stream's work has not
 *                             finished (or cuDNN said
 *                             CUDNN_STATUS_RUNTIME_IN_PROGRESS); nothing
 *                             cleared: ask again.
 * Unlike other calls, a successful call with *result != FBN_STATUS_SUCCESS
 * leaves the detail in fbn_last_error_message(): the call's name and cuDNN's
 * status text (e.g. "CUDNN_STATUS_RUNTIME_FP_OVERFLOW (1007)").
 * Failures (*result is then set to the returned status): NULL result or
 * module: FBN_STATUS_NULL_POINTER (*result untouched when result is NULL); a
 * CPU module: FBN_STATUS_INVALID_VALUE; a failing cudaSetDevice,
 * cudaStreamSynchronize/cudaStreamQuery (e.g. an earlier kernel's sticky
 * error) or cuDNN call: FBN_STATUS_DEVICE_ERROR naming it.
 */
FBN_API fbn_status fbn_cuda_module_check_runtime_error(fbn_module *module,
                                                       const fbn_cuda_exec *exec, bool wait,
                                                       fbn_status *result);

/** Bytes of device memory the saved state of a forward of desc needs in the
 *  module's current mode (saved mean and inverse std, then the ReLU mask or
 *  cuDNN's reserve space).  NULL module, desc or bytes:
 *  FBN_STATUS_NULL_POINTER; a CPU module: FBN_STATUS_INVALID_VALUE; desc
 *  validated as in forward.  *bytes = 0 on failure. */
FBN_API fbn_status fbn_cuda_saved_size(const fbn_module *module, const fbn_tensor_desc *desc,
                                       bool has_addend, size_t *bytes);

/**
 * Let saved keep its payload in caller memory: device memory of the module's
 * device, 256-byte aligned, at least fbn_cuda_saved_size() bytes for the
 * forwards it will receive (a smaller one fails the forward with
 * FBN_STATUS_INSUFFICIENT_WORKSPACE).  The memory stays the caller's: it
 * must outlive the saved object's use and is never freed by fusedbn.
 * Frees a payload the saved object had allocated and empties it.
 * device_memory == NULL goes back to library-allocated payloads.
 * NULL saved: FBN_STATUS_NULL_POINTER; device_memory not 256-byte aligned:
 * FBN_STATUS_INSUFFICIENT_WORKSPACE; bytes == 0 with device_memory:
 * FBN_STATUS_INVALID_VALUE.  A failing call leaves saved as it was.
 * Alignment is checked here; that it is device memory is not (a forward
 * with host memory fails instead).
 */
FBN_API fbn_status fbn_cuda_saved_set_memory(fbn_saved *saved, void *device_memory,
                                             size_t bytes);

/** Device pointers to the per-channel mean and inverse standard deviation
 *  (param_dtype, num_features each) recorded by the forward that filled
 *  saved; owned by saved, valid until the next forward into it (or its
 *  destruction).  NULL saved, mean or invstd: FBN_STATUS_NULL_POINTER; an
 *  empty saved object or one filled by a CPU module:
 *  FBN_STATUS_INVALID_STATE (*mean and *invstd untouched on failure). */
FBN_API fbn_status fbn_cuda_saved_stats(const fbn_saved *saved, const void **mean,
                                        const void **invstd);

/* ------------------------------------------------------------------------ */
/* Op API on CUDA (see fbn_op_* in fusedbn.h)                               */
/* ------------------------------------------------------------------------ */
/*
 * fbn_op_forward()/fbn_op_backward() run a CUDA op on the legacy default
 * stream with the op's own cuDNN handle; the calls below take an
 * fbn_cuda_exec (stream, optional cuDNN handle of the caller's on the op's
 * device).  Every pointer (tensors, per-channel arrays, saved state,
 * workspace) is device memory of the op's device (or managed memory):
 * host memory is FBN_STATUS_INVALID_VALUE, tensors and per-channel arrays
 * must be aligned to their element size.  Forward and backward neither
 * allocate nor synchronize: they queue work on exec->stream and return.
 * The saved state is written by forward on that stream and read by the
 * backward, which must be queued after it (same stream, or ordered by the
 * caller's events).  A CUDA op has one cuDNN handle of its own (only when
 * it can ever call cuDNN: float16/bfloat16 data with batch statistics),
 * whose use is serialized by a lock; a caller's handle gets the call's
 * stream for the call and its previous stream back before the call
 * returns.
 */

/** fbn_op_forward() with a launch context (NULL exec = the defaults).
 *  Arguments, NULL rules and statuses as there, messages naming
 *  fbn_cuda_op_forward.  A CPU op runs as with fbn_op_forward() (exec
 *  unused). */
FBN_API fbn_status fbn_cuda_op_forward(const fbn_op *op, const fbn_cuda_exec *exec,
                                       const fbn_tensor_desc *x_desc, const void *x,
                                       const void *addend, void *y, const void *weight,
                                       const void *bias, void *running_mean, void *running_var,
                                       double factor, void *saved, size_t saved_bytes,
                                       void *workspace, size_t workspace_bytes);

/** fbn_op_backward() with a launch context (NULL exec = the defaults);
 *  arguments, NULL rules and statuses as there, messages naming
 *  fbn_cuda_op_backward. */
FBN_API fbn_status fbn_cuda_op_backward(const fbn_op *op, const fbn_cuda_exec *exec,
                                        const fbn_tensor_desc *x_desc, const void *x,
                                        const void *y, const void *dy, const void *saved,
                                        size_t saved_bytes, const void *weight, const void *bias,
                                        void *dx, void *daddend, void *dweight, void *dbias,
                                        fbn_param_grad param_grad, void *workspace,
                                        size_t workspace_bytes);

/** The path the op's next forward of x_desc takes, including what cuDNN
 *  refused on the device so far (its backward takes the same path).  NULL
 *  op, x_desc or path: FBN_STATUS_NULL_POINTER; a CPU op:
 *  FBN_STATUS_INVALID_VALUE; x_desc validated as in fbn_op_forward().
 *  *path = FBN_CUDA_PATH_NONE on failure. */
FBN_API fbn_status fbn_cuda_op_path(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                    fbn_cuda_path *path);

/** fbn_cuda_module_check_runtime_error() for an op: the handle exec->cudnn
 *  when given, else the op's own (an op without one never ran the
 *  persistent kernels: *result = FBN_STATUS_SUCCESS).  Statuses and
 *  *result as there; a CPU op: FBN_STATUS_INVALID_VALUE. */
FBN_API fbn_status fbn_cuda_op_check_runtime_error(const fbn_op *op, const fbn_cuda_exec *exec,
                                                   bool wait, fbn_status *result);

#ifdef __cplusplus
}
#endif

#endif /* FUSEDBN_FUSEDBN_CUDA_H */
