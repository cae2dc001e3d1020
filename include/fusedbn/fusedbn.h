/*
 * fusedbn: a fused y = ReLU(BatchNorm2d(x) + addend) operator with the
 * module semantics of torch.nn.BatchNorm2d / oneflow.nn.FusedBatchNorm2d,
 * and the two other batch-norm operations of cuDNN (BN alone, BN + ReLU).
 *
 * This header is free of CUDA types.  CUDA/cuDNN interop (streams, cuDNN
 * handles) lives in <fusedbn/fusedbn_cuda.h>.
 *
 * Two APIs over one computation path:
 *   module API  fbn_module_*: the module owns weight, bias, running
 *               statistics, num_batches_tracked and the gradients, like
 *               torch.nn.BatchNorm2d.
 *   op API      fbn_op_*: an explicit-state operator on memory the caller
 *               owns (x, addend, y, weight, bias, running statistics, saved
 *               state, workspace, gradients), in the style of cuDNN's Ex
 *               calls: describe once (fbn_op_create), query sizes
 *               (fbn_op_*_size), run with pointers (fbn_op_forward,
 *               fbn_op_backward).  The module API is a wrapper over it.
 *
 * Module lifecycle
 *   fbn_module_options_init()   fill options with PyTorch's defaults
 *   fbn_module_create()         allocate parameters / running buffers
 *   fbn_saved_create()          one per forward whose backward you will run
 *   fbn_module_forward()        y = ReLU(BN(x) + addend), fills the saved object
 *   fbn_module_backward()       dx, daddend; accumulates dweight/dbias
 *   fbn_saved_destroy(), fbn_module_destroy()
 *
 * Errors: every fallible call returns an fbn_status.  On failure a
 * thread-local message (fbn_last_error_message()) names the call, the value
 * and the rule that was broken.  A call that fails leaves the module's state
 * (parameters, running statistics, num_batches_tracked, gradients, mode)
 * unchanged.  Output buffers may have been partially written only for
 * FBN_STATUS_DEVICE_ERROR.
 *
 * Ownership (see docs/design.md for the full table)
 *   module      weight, bias, running_mean, running_var, num_batches_tracked,
 *               weight/bias gradients: allocated on the module's device,
 *               freed by fbn_module_destroy().
 *   caller      x, addend, y, dy, dx, daddend and the workspace (temporary,
 *               only during the call).
 *   saved       per-forward state needed by backward (mean and inverse std
 *               used to normalize, backend reserve/mask): owned by the
 *               fbn_saved object, valid until the next forward into it.
 *
 * Thread safety: distinct modules may be used concurrently from different
 * threads.  One module must not be used by two threads at once, and its
 * calls on different CUDA streams must be ordered by the caller (they share
 * the module's parameters, gradients and workspace cache).
 */
#ifndef FUSEDBN_FUSEDBN_H
#define FUSEDBN_FUSEDBN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#  if defined(FBN_BUILDING_LIBRARY)
#    define FBN_API __declspec(dllexport)
#  else
#    define FBN_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define FBN_API __attribute__((visibility("default")))
#else
#  define FBN_API
#endif

#define FBN_VERSION_MAJOR 0
#define FBN_VERSION_MINOR 1
#define FBN_VERSION_PATCH 0

/** Version of the library actually linked, as MAJOR*10000+MINOR*100+PATCH. */
FBN_API int fbn_version(void);

/* ------------------------------------------------------------------------ */
/* Status                                                                   */
/* ------------------------------------------------------------------------ */

typedef enum fbn_status {
  FBN_STATUS_SUCCESS = 0,
  /** A required pointer argument was NULL. */
  FBN_STATUS_NULL_POINTER = 1,
  /** A scalar argument is out of its domain (eps < 0, momentum outside
   *  [0,1], num_features <= 0, unknown enum value, ...). */
  FBN_STATUS_INVALID_VALUE = 2,
  /** A tensor shape is invalid on its own: N, H or W <= 0, element counts
   *  that overflow, or training with one value per channel (N*H*W == 1). */
  FBN_STATUS_INVALID_SHAPE = 3,
  /** Shapes disagree: C != num_features, a host buffer of the wrong length,
   *  a saved object recorded for another shape. */
  FBN_STATUS_SHAPE_MISMATCH = 4,
  /** The library can't do this (yet): dtype/layout/device not supported by
   *  the module's backend. */
  FBN_STATUS_UNSUPPORTED = 5,
  /** Call out of order: backward with an empty saved object or one filled by
   *  another module, ... */
  FBN_STATUS_INVALID_STATE = 6,
  /** The requested buffer does not exist for this module (affine=false has
   *  no weight/bias; track_running_stats=false has no running statistics).
   *  This is not an error of the caller's making: it is the analogue of
   *  PyTorch's `None` buffers. */
  FBN_STATUS_ABSENT = 7,
  /** Output overlaps an input (in-place use is not supported). */
  FBN_STATUS_ALIASING = 8,
  /** Caller-provided workspace is smaller than required, or misaligned. */
  FBN_STATUS_INSUFFICIENT_WORKSPACE = 9,
  FBN_STATUS_OUT_OF_MEMORY = 10,
  /** No usable CUDA device / driver (or the library was built without
   *  CUDA) for a module that asks for one. */
  FBN_STATUS_NO_DEVICE = 11,
  /** A CUDA or cuDNN call failed; the message carries its error text. */
  FBN_STATUS_DEVICE_ERROR = 12,
  /** File could not be opened, read, written or renamed. */
  FBN_STATUS_IO_ERROR = 13,
  /** A state file is malformed (bad header, offsets, dtype, ...). */
  FBN_STATUS_INVALID_FILE = 14,
} fbn_status;

/** Static, never-NULL name of a status ("FBN_STATUS_INVALID_VALUE", ...);
 *  "FBN_STATUS_UNKNOWN" for a value outside the enum.  Does not touch the
 *  thread's last error message. */
FBN_API const char *fbn_status_string(fbn_status status);

/** Detail of the last failing call on this thread: which call, which value,
 *  which rule.  Empty string ("") if the last call on this thread succeeded,
 *  except where a call documents otherwise
 *  (fbn_cuda_module_check_runtime_error() describes the run-time error it
 *  found while itself succeeding).
 *  Valid until the next fusedbn call on this thread. Never NULL. */
FBN_API const char *fbn_last_error_message(void);

/* ------------------------------------------------------------------------ */
/* Tensors                                                                  */
/* ------------------------------------------------------------------------ */

/** Element types. float16 (IEEE binary16) and bfloat16 tensors take float32
 *  parameters and statistics, float64 tensors float64 ones, float32 tensors
 *  float32 ones. Every backend runs all four: the CPU reference in float64,
 *  the fast CPU backend and CUDA in float32 for the half dtypes; each output
 *  is rounded once to its dtype, to nearest even (docs/semantics.md). */
typedef enum fbn_dtype {
  FBN_DTYPE_FLOAT32 = 0,
  FBN_DTYPE_FLOAT64 = 1,
  FBN_DTYPE_FLOAT16 = 2,
  FBN_DTYPE_BFLOAT16 = 3,
} fbn_dtype;

typedef enum fbn_layout {
  /** Fully packed, W fastest: index ((n*C + c)*H + h)*W + w. */
  FBN_LAYOUT_NCHW = 0,
  /** Fully packed channels-last, C fastest: index ((n*H + h)*W + w)*C + c. */
  FBN_LAYOUT_NHWC = 1,
} fbn_layout;

/** Size in bytes of one element of dtype, 0 for an unknown dtype. */
FBN_API size_t fbn_dtype_size(fbn_dtype dtype);

/** Description of x (and of addend, y, dy, dx, daddend, which always have
 *  exactly x's description). Dimensions are logical (N, C, H, W) whatever
 *  the layout. */
typedef struct fbn_tensor_desc {
  int64_t n;
  int64_t c;
  int64_t h;
  int64_t w;
  fbn_dtype dtype;
  fbn_layout layout;
} fbn_tensor_desc;

/** Convenience initializer: returns the fields as given.  Never fails and
 *  validates nothing (forward, backward and the size queries do). */
FBN_API fbn_tensor_desc fbn_tensor_desc_make(int64_t n, int64_t c, int64_t h, int64_t w,
                                             fbn_dtype dtype, fbn_layout layout);

/* ------------------------------------------------------------------------ */
/* Module                                                                   */
/* ------------------------------------------------------------------------ */

typedef enum fbn_device_type {
  FBN_DEVICE_CPU = 0,
  FBN_DEVICE_CUDA = 1,
} fbn_device_type;

/** Batch-norm mode for the cuDNN backend (ignored on the CPU). */
typedef enum fbn_bn_mode {
  /** Fused cuDNN SPATIAL_PERSISTENT kernel where cuDNN supports it (half
   *  precision NHWC), elsewhere fusedbn's kernels or cuDNN's plain SPATIAL
   *  batch norm (docs/cuda-backend.md has the table). */
  FBN_BN_MODE_AUTO = 0,
  /** Never the persistent kernel (full dynamic range; opt-out of its
   *  integer-atomic reductions): fusedbn's kernels or plain SPATIAL. */
  FBN_BN_MODE_SPATIAL = 1,
} fbn_bn_mode;

/** The batch-norm operation, as cuDNN's cudnnBatchNormOps_t. */
typedef enum fbn_operation {
  /** y = BN(x) (CUDNN_BATCHNORM_OPS_BN): no addend, no ReLU; backward
   *  needs no y (dz = dy). */
  FBN_OPERATION_BN = 0,
  /** y = ReLU(BN(x)) (CUDNN_BATCHNORM_OPS_BN_ACTIVATION): no addend. */
  FBN_OPERATION_BN_RELU = 1,
  /** y = ReLU(BN(x) + addend) (CUDNN_BATCHNORM_OPS_BN_ADD_ACTIVATION). */
  FBN_OPERATION_BN_ADD_RELU = 2,
} fbn_operation;

/** Static name of an operation ("bn", "bn_relu", "bn_add_relu"), "unknown
 *  operation" for a value outside the enum. */
FBN_API const char *fbn_operation_name(fbn_operation operation);

typedef struct fbn_module_options {
  /** C. Must be > 0. No default (0 after fbn_module_options_init()). */
  int64_t num_features;
  /** Added to the variance before the square root. Default 1e-5. Must be
   *  finite and >= 0. */
  double eps;
  /** Running-statistics factor, in [0, 1]. Default 0.1. Ignored when
   *  cumulative_average is true. */
  double momentum;
  /** true stands for Python's momentum=None: the factor is
   *  1/num_batches_tracked (a cumulative moving average). Default false. */
  bool cumulative_average;
  /** Learnable weight (gamma, init 1) and bias (beta, init 0). Default true. */
  bool affine;
  /** Keep running_mean (init 0), running_var (init 1) and
   *  num_batches_tracked (init 0). Default true. */
  bool track_running_stats;
  /** dtype of weight, bias, running stats and gradients: FBN_DTYPE_FLOAT32
   *  (default; for float32/float16/bfloat16 x) or FBN_DTYPE_FLOAT64 (for
   *  float64 x). Any other value is FBN_STATUS_INVALID_VALUE. */
  fbn_dtype param_dtype;
  /** Where parameters live and computation happens. Default CPU. */
  fbn_device_type device;
  /** CUDA device ordinal (ignored on the CPU). Default 0. */
  int device_index;
  /** Default FBN_BN_MODE_AUTO. */
  fbn_bn_mode bn_mode;
  /** Default FBN_OPERATION_BN_ADD_RELU, whose forward also takes a NULL
   *  addend (then y = ReLU(BN(x))).  FBN_OPERATION_BN_RELU and
   *  FBN_OPERATION_BN take no addend (forward with one:
   *  FBN_STATUS_INVALID_VALUE); with FBN_OPERATION_BN backward takes a NULL
   *  y.  Any other value: FBN_STATUS_INVALID_VALUE at fbn_module_create(). */
  fbn_operation operation;
} fbn_module_options;

/** Fill *options with the defaults (num_features = 0 must still be set).
 *  NULL is ignored. */
FBN_API void fbn_module_options_init(fbn_module_options *options);

typedef struct fbn_module fbn_module;

/** Create a module in training mode with reset parameters and statistics.
 *  *options is copied (not kept).  On success *out belongs to the caller:
 *  free it with fbn_module_destroy().  *out is set to NULL on failure.
 *  NULL options or out: FBN_STATUS_NULL_POINTER; an option outside its
 *  domain or an unknown enum value: FBN_STATUS_INVALID_VALUE; a CUDA module
 *  without a usable device (or a build without CUDA): FBN_STATUS_NO_DEVICE. */
FBN_API fbn_status fbn_module_create(const fbn_module_options *options, fbn_module **out);

/** Free the module and everything it owns (pointers from
 *  fbn_module_buffer_data() become invalid). NULL is a no-op.  Saved
 *  objects it filled stay the caller's to destroy; backward with them fails
 *  (FBN_STATUS_INVALID_STATE) with any other module. */
FBN_API void fbn_module_destroy(fbn_module *module);

/** Copy of the options the module was created with into *out.
 *  NULL module or out: FBN_STATUS_NULL_POINTER. */
FBN_API fbn_status fbn_module_get_options(const fbn_module *module, fbn_module_options *out);

/** Switch training (true) / evaluation (false) mode, like Module.train().
 *  NULL module: FBN_STATUS_NULL_POINTER. */
FBN_API fbn_status fbn_module_set_training(fbn_module *module, bool training);
/** *training = the module's mode (true: training).  NULL module or
 *  training: FBN_STATUS_NULL_POINTER. */
FBN_API fbn_status fbn_module_is_training(const fbn_module *module, bool *training);

/** running_mean = 0, running_var = 1, num_batches_tracked = 0 (no-op
 *  success without running statistics).  NULL module:
 *  FBN_STATUS_NULL_POINTER. */
FBN_API fbn_status fbn_module_reset_running_stats(fbn_module *module);

/** reset_running_stats(), then weight = 1 and bias = 0 (when affine).
 *  Gradients are not touched.  NULL module: FBN_STATUS_NULL_POINTER. */
FBN_API fbn_status fbn_module_reset_parameters(fbn_module *module);

/** The per-channel buffers a module may own. */
typedef enum fbn_buffer {
  FBN_BUFFER_WEIGHT = 0,
  FBN_BUFFER_BIAS = 1,
  FBN_BUFFER_RUNNING_MEAN = 2,
  FBN_BUFFER_RUNNING_VAR = 3,
  FBN_BUFFER_WEIGHT_GRAD = 4,
  FBN_BUFFER_BIAS_GRAD = 5,
} fbn_buffer;

/** true if the module owns that buffer (weight/bias and their gradients
 *  need affine; running stats need track_running_stats). false for NULL or
 *  an unknown buffer. */
FBN_API bool fbn_module_has_buffer(const fbn_module *module, fbn_buffer which);

/** Copy a buffer to host memory, converting to dtype (FLOAT32, FLOAT64,
 *  FLOAT16 or BFLOAT16: rounded once to nearest even, NaN kept, values
 *  beyond float16's range +-Inf, as docs/semantics.md says; another value:
 *  FBN_STATUS_INVALID_VALUE). count must equal num_features
 *  (FBN_STATUS_SHAPE_MISMATCH). FBN_STATUS_ABSENT if the module has no such
 *  buffer. Synchronous.  dst is the caller's host memory of count elements
 *  of dtype, untouched on failure.  NULL module or dst:
 *  FBN_STATUS_NULL_POINTER; an unknown buffer: FBN_STATUS_INVALID_VALUE. */
FBN_API fbn_status fbn_module_read_buffer(const fbn_module *module, fbn_buffer which,
                                          fbn_dtype dtype, void *dst, size_t count);

/** Copy host memory into a buffer, converting from dtype (FLOAT32,
 *  FLOAT64, FLOAT16 or BFLOAT16; half values widen exactly) to the module's
 *  param_dtype. count must equal num_features.  Synchronous.  src is only
 *  read, during the call.  Statuses as for fbn_module_read_buffer() (NULL
 *  module or src: FBN_STATUS_NULL_POINTER; unknown buffer or dtype:
 *  FBN_STATUS_INVALID_VALUE; wrong count: FBN_STATUS_SHAPE_MISMATCH; no such
 *  buffer: FBN_STATUS_ABSENT); the buffer is unchanged on failure. */
FBN_API fbn_status fbn_module_write_buffer(fbn_module *module, fbn_buffer which,
                                           fbn_dtype dtype, const void *src, size_t count);

/** The buffer's storage (host memory for a CPU module, device memory for a
 *  CUDA module), num_features elements of param_dtype, owned by the module
 *  and valid until it is destroyed.  NULL module or data:
 *  FBN_STATUS_NULL_POINTER; unknown buffer: FBN_STATUS_INVALID_VALUE; no
 *  such buffer: FBN_STATUS_ABSENT (*data untouched on failure). */
FBN_API fbn_status fbn_module_buffer_data(fbn_module *module, fbn_buffer which, void **data);

/** *value = num_batches_tracked.  NULL module or value:
 *  FBN_STATUS_NULL_POINTER; FBN_STATUS_ABSENT without running statistics
 *  (track_running_stats = false; *value untouched). */
FBN_API fbn_status fbn_module_get_num_batches_tracked(const fbn_module *module, int64_t *value);
/** value must be >= 0 (FBN_STATUS_INVALID_VALUE).  NULL module:
 *  FBN_STATUS_NULL_POINTER; FBN_STATUS_ABSENT without running statistics. */
FBN_API fbn_status fbn_module_set_num_batches_tracked(fbn_module *module, int64_t value);

/** Set the weight and bias gradients to zero (success without affine).
 *  NULL module: FBN_STATUS_NULL_POINTER. */
FBN_API fbn_status fbn_module_zero_grad(fbn_module *module);

/* ------------------------------------------------------------------------ */
/* Saved state (one per forward whose backward will run)                     */
/* ------------------------------------------------------------------------ */

typedef struct fbn_saved fbn_saved;

/** An empty saved object. It is bound to a module, a shape and a mode by
 *  the next forward that receives it, and may be reused by later forwards
 *  (each overwrites the previous content).  *out belongs to the caller (free
 *  it with fbn_saved_destroy()); it may outlive the module that filled it.
 *  NULL out: FBN_STATUS_NULL_POINTER. */
FBN_API fbn_status fbn_saved_create(fbn_saved **out);
/** Free a saved object and the payload it allocated (never caller memory
 *  given to fbn_cuda_saved_set_memory()). NULL is a no-op. */
FBN_API void fbn_saved_destroy(fbn_saved *saved);

/* ------------------------------------------------------------------------ */
/* Forward / backward                                                       */
/* ------------------------------------------------------------------------ */

/** Bytes of temporary workspace that fbn_module_forward() needs from the
 *  caller for this shape (0 on the CPU, where the module keeps a workspace
 *  cache of its own).  NULL module, desc or bytes:
 *  FBN_STATUS_NULL_POINTER; desc is validated as fbn_module_forward() does
 *  (same statuses). */
FBN_API fbn_status fbn_module_forward_workspace_size(const fbn_module *module,
                                                     const fbn_tensor_desc *desc,
                                                     bool has_addend, size_t *bytes);

/** Bytes of temporary workspace that fbn_module_backward() needs.  NULL
 *  module, desc or bytes: FBN_STATUS_NULL_POINTER; desc is validated as
 *  fbn_module_backward() does. */
FBN_API fbn_status fbn_module_backward_workspace_size(const fbn_module *module,
                                                      const fbn_tensor_desc *desc,
                                                      bool has_addend, size_t *bytes);

/**
 * y = ReLU(BatchNorm(x) + addend) (the module's operation: ReLU(BN(x)) or
 * BN(x) for FBN_OPERATION_BN_RELU / FBN_OPERATION_BN, which take a NULL
 * addend only: FBN_STATUS_INVALID_VALUE otherwise).
 *
 * Training mode, or track_running_stats == false: normalize with the batch
 * mean and biased variance over (N, H, W). With tracked statistics in
 * training mode also: num_batches_tracked += 1 and
 * running = (1 - f) * running + f * batch_stat with f = momentum (or
 * 1/num_batches_tracked for the cumulative average); running_var uses the
 * unbiased batch variance. Eval mode with tracked statistics normalizes
 * with running_mean / running_var and changes nothing.
 *
 * @param desc       shape/dtype/layout of x, addend and y.
 * @param x          input, memory on the module's device.
 * @param addend     NULL for y = ReLU(BN(x)), else a tensor like x.
 * @param y          output; must not overlap x or addend (FBN_STATUS_ALIASING).
 * @param saved      NULL if no backward will follow, else filled with what
 *                   backward needs.  A failing call leaves it as it was:
 *                   still bound to its earlier forward, whose backward runs.
 * @param workspace  NULL (workspace_bytes ignored): the library uses its
 *                   own cached buffer. Otherwise at least
 *                   fbn_module_forward_workspace_size() bytes, 256-byte
 *                   aligned (checked even when 0 bytes are needed), on the
 *                   module's device; else FBN_STATUS_INSUFFICIENT_WORKSPACE.
 *
 * NULL module, desc, x or y: FBN_STATUS_NULL_POINTER.  desc: N, H or W <= 0,
 * overflowing counts or (with batch statistics) N*H*W == 1:
 * FBN_STATUS_INVALID_SHAPE; C != num_features: FBN_STATUS_SHAPE_MISMATCH;
 * unknown dtype/layout: FBN_STATUS_INVALID_VALUE; a dtype the backend or
 * param_dtype can't take: FBN_STATUS_UNSUPPORTED.  All buffers stay the
 * caller's; nothing is kept after the call except in saved.
 */
FBN_API fbn_status fbn_module_forward(fbn_module *module, const fbn_tensor_desc *desc,
                                      const void *x, const void *addend, void *y,
                                      fbn_saved *saved, void *workspace,
                                      size_t workspace_bytes);

/**
 * Gradients of the forward recorded in saved.
 *
 * A saved object from a training-mode forward (batch statistics) gives the
 * full batch-norm backward through the statistics; one from an eval-mode
 * forward (running statistics) treats mean and variance as constants.
 * dweight and dbias are *accumulated* into the module's gradient buffers
 * (affine only), as autograd does.
 *
 * @param x, y       the forward's input and output (unchanged since).
 * @param dy         gradient of the loss with respect to y.
 * @param dx         NULL to skip, else receives dL/dx.
 * @param daddend    NULL to skip, else receives dL/daddend = dy where
 *                   !(y <= 0), else 0 (a NaN y passes dy, as PyTorch's
 *                   threshold_backward).
 * dx and daddend must not overlap each other or any input.
 *
 * y may be NULL for a module of operation FBN_OPERATION_BN (backward of
 * BN alone needs no y).
 *
 * NULL module, saved, desc, x, y or dy: FBN_STATUS_NULL_POINTER.  An empty
 * saved object, one filled by another module, or daddend for a forward
 * without addend: FBN_STATUS_INVALID_STATE; desc other than the forward's:
 * FBN_STATUS_SHAPE_MISMATCH; desc itself is validated as in forward.
 * workspace as for fbn_module_forward().  saved is only read.
 */
FBN_API fbn_status fbn_module_backward(fbn_module *module, const fbn_saved *saved,
                                       const fbn_tensor_desc *desc, const void *x,
                                       const void *y, const void *dy, void *dx,
                                       void *daddend, void *workspace,
                                       size_t workspace_bytes);

/* ------------------------------------------------------------------------ */
/* Op API: explicit state, caller-owned memory                              */
/* ------------------------------------------------------------------------ */
/*
 * Lifecycle
 *   fbn_op_desc_init()            fill a description with the defaults
 *   fbn_op_create()               validate it, choose the backend, build
 *                                 the per-op backend state (once)
 *   fbn_op_saved_size()           bytes of saved state one forward leaves
 *                                 for its backward (mean/invstd used, ReLU
 *                                 mask or cuDNN reserve space)
 *   fbn_op_forward_workspace_size(), fbn_op_backward_workspace_size()
 *                                 bytes of temporary workspace
 *   fbn_op_forward()              y = op(x, addend), running statistics
 *                                 updated, saved state written
 *   fbn_op_backward()             dx, daddend, dweight, dbias
 *   fbn_op_destroy()
 *
 * Memory: every tensor, parameter, statistic, gradient, the saved state and
 * the workspace are the caller's, on the op's device (host memory for
 * FBN_DEVICE_CPU, device memory for FBN_DEVICE_CUDA).  Per-channel arrays
 * (weight, bias, running_mean, running_var, dweight, dbias) have
 * num_features elements of param_dtype.  Saved state and workspace must be
 * FBN_OP_MEMORY_ALIGNMENT-byte aligned and at least as large as the size
 * queries say for that tensor shape.  Forward and backward allocate nothing
 * and (CUDA) do not synchronize.
 *
 * Saved state: what forward writes there is read by the backward of the
 * same op and the same tensor shape; its content is private to the backend.
 * Several forwards may run before their backwards, each with its own saved
 * memory.  Backward is validated from what the caller passes (op, shape,
 * pointers); on the CPU the saved memory also carries a small header, and a
 * backward with memory no forward of this op and shape filled is
 * FBN_STATUS_INVALID_STATE (on CUDA that memory is not read on the host, so
 * the caller's contract alone holds there).
 *
 * Statistics (fbn_op_desc.statistics):
 *   FBN_STATISTICS_BATCH    normalize with the batch mean and biased
 *                           variance over (N, H, W) (training, or a module
 *                           without tracked statistics).  With running_mean
 *                           and running_var given (both or neither), also
 *                           running = (1 - factor) * running
 *                           + factor * batch_stat (running_var with the
 *                           unbiased variance): cuDNN's
 *                           exponentialAverageFactor, see
 *                           fbn_running_average_factor().
 *   FBN_STATISTICS_RUNNING  normalize with running_mean / running_var (both
 *                           required, only read; factor ignored): eval
 *                           mode.  Backward treats them as constants.
 *
 * Operations and what each call needs:
 *   | operation   | forward addend | backward y | backward daddend |
 *   | BN          | NULL           | NULL ok    | NULL             |
 *   | BN_RELU     | NULL           | required   | NULL             |
 *   | BN_ADD_RELU | required       | required   | optional         |
 *
 * Errors as everywhere in fusedbn: a status, a message naming the call, the
 * value and the rule, and nothing written (no output, no running
 * statistic, no gradient, no saved state) on failure.
 *
 * Thread safety: one op may be used by several threads at once (its
 * backend state is only read by forward/backward) as long as their memory
 * does not overlap.
 */

/** Alignment in bytes that fbn_op_forward()/fbn_op_backward() require of the
 *  saved-state and workspace pointers. */
#define FBN_OP_MEMORY_ALIGNMENT 64

typedef enum fbn_statistics {
  /** Batch statistics (training, or no tracked statistics). */
  FBN_STATISTICS_BATCH = 0,
  /** Running statistics (eval with tracked statistics). */
  FBN_STATISTICS_RUNNING = 1,
} fbn_statistics;

/** What dweight/dbias receive in fbn_op_backward() (cuDNN's beta of the
 *  parameter gradients: 0 or 1). */
typedef enum fbn_param_grad {
  /** dweight = gradient, dbias = gradient. */
  FBN_PARAM_GRAD_OVERWRITE = 0,
  /** dweight += gradient, dbias += gradient (as autograd accumulates). */
  FBN_PARAM_GRAD_ACCUMULATE = 1,
} fbn_param_grad;

/** Everything an op is created from; fixed for the op's lifetime. */
typedef struct fbn_op_desc {
  /** C. Must be in [1, INT32_MAX]. No default (0 after fbn_op_desc_init()). */
  int64_t num_features;
  /** Added to the variance before the square root. Default 1e-5. Must be
   *  finite and >= 0. */
  double eps;
  /** dtype of x, addend, y, dy, dx, daddend. Default FBN_DTYPE_FLOAT32. */
  fbn_dtype dtype;
  /** dtype of the per-channel arrays: FBN_DTYPE_FLOAT32 (default; for
   *  float32/float16/bfloat16 tensors) or FBN_DTYPE_FLOAT64 (for float64
   *  tensors). */
  fbn_dtype param_dtype;
  /** Default FBN_LAYOUT_NCHW. */
  fbn_layout layout;
  /** Default FBN_DEVICE_CPU. */
  fbn_device_type device;
  /** CUDA device ordinal (ignored on the CPU). Default 0. */
  int device_index;
  /** Default FBN_OPERATION_BN_ADD_RELU. */
  fbn_operation operation;
  /** weight and bias given (and dweight/dbias computed). Default true. */
  bool affine;
  /** Default FBN_STATISTICS_BATCH. */
  fbn_statistics statistics;
  /** cuDNN backend only (ignored on the CPU). Default FBN_BN_MODE_AUTO. */
  fbn_bn_mode bn_mode;
} fbn_op_desc;

/** Fill *desc with the defaults (num_features = 0 must still be set).  NULL
 *  is ignored. */
FBN_API void fbn_op_desc_init(fbn_op_desc *desc);

typedef struct fbn_op fbn_op;

/** Create an op: validate *desc (copied, not kept), choose the backend (CPU:
 *  the fast backend, or the float64 reference with FBN_CPU_BACKEND=reference
 *  in the environment) and build its state.  *out is the caller's (free it
 *  with fbn_op_destroy()), NULL on failure.  NULL desc or out:
 *  FBN_STATUS_NULL_POINTER; a field outside its domain or an unknown enum
 *  value: FBN_STATUS_INVALID_VALUE; a dtype/layout the backend can't run or
 *  a dtype/param_dtype pair that does not go together:
 *  FBN_STATUS_UNSUPPORTED; CUDA without a usable device or in a build
 *  without CUDA: FBN_STATUS_NO_DEVICE. */
FBN_API fbn_status fbn_op_create(const fbn_op_desc *desc, fbn_op **out);

/** Free an op and its backend state. NULL is a no-op. Saved state written
 *  by its forwards is caller memory and stays so. */
FBN_API void fbn_op_destroy(fbn_op *op);

/** Copy of the op's description into *out.  NULL op or out:
 *  FBN_STATUS_NULL_POINTER. */
FBN_API fbn_status fbn_op_get_desc(const fbn_op *op, fbn_op_desc *out);

/**
 * Size queries for a tensor of description x_desc (the description of x,
 * addend, y, dy, dx and daddend: C must equal num_features, dtype and
 * layout must equal the op's).  The sizes depend only on the op and
 * x_desc (and, for the fast CPU backend's workspace, on the number of
 * OpenMP threads at the time of the query: a call that finds more threads
 * than the workspace was sized for accepts it and runs on as many threads
 * as it holds; after lowering the thread count, query again, as the need
 * can grow).
 *
 * fbn_op_saved_size: bytes of saved state (0 is never returned).
 * fbn_op_forward_workspace_size / fbn_op_backward_workspace_size: bytes of
 * temporary workspace (may be 0: the pointer may then be NULL).
 *
 * NULL op, x_desc or bytes: FBN_STATUS_NULL_POINTER.  x_desc: N, H or
 * W <= 0, overflowing counts, or batch statistics with N*H*W == 1:
 * FBN_STATUS_INVALID_SHAPE; C, dtype or layout other than the op's:
 * FBN_STATUS_SHAPE_MISMATCH; unknown dtype/layout value:
 * FBN_STATUS_INVALID_VALUE.  *bytes untouched on failure.
 */
FBN_API fbn_status fbn_op_saved_size(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                     size_t *bytes);
FBN_API fbn_status fbn_op_forward_workspace_size(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                                 size_t *bytes);
FBN_API fbn_status fbn_op_backward_workspace_size(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                                  size_t *bytes);

/**
 * The running-average factor of one training forward, the value
 * fbn_op_forward() takes as `factor`: momentum, or, for PyTorch's
 * momentum=None (cumulative_average = true), 1 / num_batches_tracked where
 * num_batches_tracked already counts this batch (PyTorch increments it
 * before computing the factor: the first batch has num_batches_tracked = 1
 * and factor 1).
 *
 * NULL factor: FBN_STATUS_NULL_POINTER; momentum outside [0, 1] or NaN
 * (when cumulative_average is false), num_batches_tracked < 1 (when it is
 * true): FBN_STATUS_INVALID_VALUE, *factor untouched.
 */
FBN_API fbn_status fbn_running_average_factor(double momentum, bool cumulative_average,
                                              int64_t num_batches_tracked, double *factor);

/**
 * Forward of the op's operation on caller memory.
 *
 * @param x_desc        description of x, addend and y (as in the queries).
 * @param x, y          input and output; y must not overlap any other
 *                      memory of the call (FBN_STATUS_ALIASING).
 * @param addend        required for FBN_OPERATION_BN_ADD_RELU, NULL
 *                      otherwise (FBN_STATUS_INVALID_VALUE).
 * @param weight, bias  affine: both required; not affine: both NULL
 *                      (FBN_STATUS_INVALID_VALUE).
 * @param running_mean, running_var
 *                      FBN_STATISTICS_RUNNING: both required (read).
 *                      FBN_STATISTICS_BATCH: both NULL (no update) or both
 *                      given (updated with factor); one alone:
 *                      FBN_STATUS_INVALID_VALUE.  When updated, neither may
 *                      overlap the other or any other memory of the call
 *                      (FBN_STATUS_ALIASING).
 * @param factor        used only when the running statistics are updated:
 *                      must then be in [0, 1] (NaN: FBN_STATUS_INVALID_VALUE).
 * @param saved         NULL when no backward will follow (saved_bytes is then
 *                      ignored), else at least fbn_op_saved_size() bytes,
 *                      FBN_OP_MEMORY_ALIGNMENT-aligned
 *                      (FBN_STATUS_INSUFFICIENT_WORKSPACE otherwise); filled
 *                      for fbn_op_backward().
 * @param workspace     at least fbn_op_forward_workspace_size() bytes,
 *                      FBN_OP_MEMORY_ALIGNMENT-aligned (NULL allowed when 0
 *                      bytes are needed); FBN_STATUS_INSUFFICIENT_WORKSPACE
 *                      otherwise.  Its content is undefined after the call.
 *
 * What forward writes (y, the running statistics when updated, saved,
 * workspace) must not overlap each other, a tensor or a per-channel array
 * of the call: FBN_STATUS_ALIASING, the message naming both.
 *
 * NULL op, x_desc, x or y: FBN_STATUS_NULL_POINTER; x_desc as in the
 * queries.
 */
FBN_API fbn_status fbn_op_forward(const fbn_op *op, const fbn_tensor_desc *x_desc, const void *x,
                                  const void *addend, void *y, const void *weight,
                                  const void *bias, void *running_mean, void *running_var,
                                  double factor, void *saved, size_t saved_bytes,
                                  void *workspace, size_t workspace_bytes);

/**
 * Backward of the forward that filled saved (same op, same x_desc).
 *
 * FBN_STATISTICS_BATCH: the full batch-norm backward through the batch
 * statistics; FBN_STATISTICS_RUNNING: mean and variance are constants
 * (dx = dz * weight * invstd).  With the ReLU operations the gradient that
 * reaches BN's output and the addend is dz = dy where !(y <= 0), else 0 (a
 * NaN y passes dy); with FBN_OPERATION_BN dz = dy.
 *
 * @param x, y          the forward's input and output, unchanged since; y
 *                      may be NULL for FBN_OPERATION_BN.
 * @param dy            gradient of the loss with respect to y.
 * @param saved         the forward's saved state, saved_bytes as there;
 *                      only read.
 * @param weight, bias  affine: both required; not affine: both NULL.
 * @param dx            NULL to skip, else receives dL/dx.
 * @param daddend       NULL to skip; only FBN_OPERATION_BN_ADD_RELU has one
 *                      (FBN_STATUS_INVALID_VALUE otherwise).
 * @param dweight, dbias  not affine: both NULL (FBN_STATUS_INVALID_VALUE);
 *                      affine: each NULL to skip, else receives (or, with
 *                      FBN_PARAM_GRAD_ACCUMULATE, is incremented by)
 *                      dL/dweight = sum dz * xhat, dL/dbias = sum dz.
 * @param param_grad    FBN_PARAM_GRAD_OVERWRITE or FBN_PARAM_GRAD_ACCUMULATE
 *                      (another value: FBN_STATUS_INVALID_VALUE).
 * @param workspace     as for fbn_op_forward(), sized by
 *                      fbn_op_backward_workspace_size().
 *
 * dx, daddend, dweight, dbias and workspace must not overlap each other or
 * any other memory of the call (FBN_STATUS_ALIASING).  NULL op, x_desc, x,
 * dy or saved (and y for the ReLU operations): FBN_STATUS_NULL_POINTER; saved_bytes or workspace too
 * small or misaligned: FBN_STATUS_INSUFFICIENT_WORKSPACE; CPU: saved memory
 * not filled by a forward of this op and x_desc: FBN_STATUS_INVALID_STATE.
 */
FBN_API fbn_status fbn_op_backward(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                   const void *x, const void *y, const void *dy,
                                   const void *saved, size_t saved_bytes, const void *weight,
                                   const void *bias, void *dx, void *daddend, void *dweight,
                                   void *dbias, fbn_param_grad param_grad, void *workspace,
                                   size_t workspace_bytes);

#ifdef __cplusplus
}
#endif

#endif /* FUSEDBN_FUSEDBN_H */
