/*
 * fusedbn: a fused y = ReLU(BatchNorm2d(x) + addend) operator with the
 * module semantics of torch.nn.BatchNorm2d / oneflow.nn.FusedBatchNorm2d.
 *
 * This header is free of CUDA types.  CUDA/cuDNN interop (streams, cuDNN
 * handles) lives in <fusedbn/fusedbn_cuda.h>.
 *
 * Lifecycle
 *   fbn_module_options_init()   fill options with the seed's defaults
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
 * threads.  One module must not be used by two threads at once.
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

/** Copy a buffer to host memory, converting to dtype (FLOAT32 or FLOAT64;
 *  FLOAT16/BFLOAT16 are FBN_STATUS_UNSUPPORTED, other values
 *  FBN_STATUS_INVALID_VALUE). count must equal num_features
 *  (FBN_STATUS_SHAPE_MISMATCH). FBN_STATUS_ABSENT if the module has no such
 *  buffer. Synchronous.  dst is the caller's host memory of count elements
 *  of dtype, untouched on failure.  NULL module or dst:
 *  FBN_STATUS_NULL_POINTER; an unknown buffer: FBN_STATUS_INVALID_VALUE. */
FBN_API fbn_status fbn_module_read_buffer(const fbn_module *module, fbn_buffer which,
                                          fbn_dtype dtype, void *dst, size_t count);

/** Copy host memory into a buffer, converting from dtype (FLOAT32 or
 *  FLOAT64) to the module's param_dtype. count must equal num_features.
 *  Synchronous.  src is only read, during the call.  Statuses as for
 *  fbn_module_read_buffer() (NULL module or src: FBN_STATUS_NULL_POINTER;
 *  FLOAT16/BFLOAT16: FBN_STATUS_UNSUPPORTED; unknown buffer or dtype:
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

/** Bytes of temporary workspace that fbn_module_forward() needs for this
 *  shape (0 on the CPU).  NULL module, desc or bytes:
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
 * y = ReLU(BatchNorm(x) + addend).
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
 *                   backward needs.
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

#ifdef __cplusplus
}
#endif

#endif /* FUSEDBN_FUSEDBN_H */
