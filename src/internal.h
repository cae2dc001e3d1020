/*
 * Internal declarations shared by the API layer (module.c), the error
 * helpers (status.c) and the backends (cpu/, cuda/).  Never installed.
 *
 * Layers (docs/design.md):
 *   API / module state   module.c: validation, mode, num_batches_tracked,
 *                        running-average factor, saved-object binding
 *   backend interface    struct fbn_backend below
 *   kernels              cpu/ (reference, float64 accumulation),
 *                        cuda/ (cuDNN + own CUDA C kernels)
 *
 * The API layer validates *everything* that does not depend on the backend
 * before calling into it, and changes module state only after the backend
 * reported success, so that a failing call leaves the module untouched.
 */
#ifndef FUSEDBN_SRC_INTERNAL_H
#define FUSEDBN_SRC_INTERNAL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fusedbn/fusedbn.h"

#define FBN_INTERNAL __attribute__((visibility("hidden")))

#define FBN_NUM_BUFFERS 6
#define FBN_WORKSPACE_ALIGNMENT 256

/* ---- errors (status.c) -------------------------------------------------- */

/* Record "fmt..." as this thread's last error message and return status. */
FBN_INTERNAL fbn_status fbn_error(fbn_status status, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Clear the thread's last error (called at the start of every API call). */
FBN_INTERNAL void fbn_clear_error(void);
/* Append " (detail)" to the current message, for wrapping backend errors. */
FBN_INTERNAL void fbn_error_append(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- helpers (module.c) ------------------------------------------------- */

FBN_INTERNAL const char *fbn_dtype_name(fbn_dtype dtype);
FBN_INTERNAL const char *fbn_layout_name(fbn_layout layout);
FBN_INTERNAL const char *fbn_buffer_name(fbn_buffer which);
/* Number of elements of a validated desc. */
FBN_INTERNAL int64_t fbn_desc_numel(const fbn_tensor_desc *desc);
/* Offset in elements of logical (n, c, h, w) for desc's layout. */
static inline int64_t fbn_desc_offset(const fbn_tensor_desc *d, int64_t n, int64_t c, int64_t h,
                                      int64_t w) {
  return d->layout == FBN_LAYOUT_NCHW ? ((n * d->c + c) * d->h + h) * d->w + w
                                      : ((n * d->h + h) * d->w + w) * d->c + c;
}
FBN_INTERNAL bool fbn_desc_equal(const fbn_tensor_desc *a, const fbn_tensor_desc *b);
/* Whether a module with these options has buffer `which`. */
FBN_INTERNAL bool fbn_options_have_buffer(const fbn_module_options *o, fbn_buffer which);

/* ---- module and saved state --------------------------------------------- */

struct fbn_backend;

struct fbn_module {
  uint64_t id; /* unique per process, never 0 */
  fbn_module_options options;
  bool training;
  int64_t num_batches_tracked; /* host-side; meaningful when tracking */
  const struct fbn_backend *backend;
  /* Storage of each fbn_buffer (indexed by fbn_buffer), num_features
   * elements of options.param_dtype on the module's device; NULL when the
   * module does not have that buffer. Allocated by backend->module_init. */
  void *buffers[FBN_NUM_BUFFERS];
  /* Backend-private state (handles, cached descriptors, workspace cache). */
  void *backend_state;
};

struct fbn_saved {
  /* id of the module whose forward filled it; 0 = empty. */
  uint64_t module_id;
  fbn_tensor_desc desc;
  bool has_addend;
  /* true: normalized with batch statistics (full BN backward);
   * false: with running statistics (constants in backward). */
  bool batch_stats;
  /* Backend-specific path identifier the forward took (backend defined). */
  int path;
  /* Backend-owned payload: mean and inverse std used to normalize, reserve
   * space / ReLU mask, ... Layout defined by the backend that allocated it;
   * freed through payload_backend->saved_free. */
  const struct fbn_backend *payload_backend;
  void *payload;
  size_t payload_bytes;
  /* Memory provided by the caller for the payload (not freed by us), or
   * NULL. */
  void *external;
  size_t external_bytes;
};

/* ---- backend interface -------------------------------------------------- */

/* Everything one forward call needs, validated by the API layer. */
typedef struct fbn_forward_args {
  const fbn_tensor_desc *desc;
  const void *x;
  const void *addend; /* may be NULL */
  void *y;
  fbn_saved *saved; /* may be NULL: no backward will follow */
  /* Normalize with batch statistics (training, or no running stats). */
  bool batch_stats;
  /* Update running stats with factor (training with tracked stats). */
  bool update_running;
  double factor;
  void *workspace; /* NULL: backend uses its own cache */
  size_t workspace_bytes;
  const void *exec; /* backend-specific launch context (CUDA: stream/handle), may be NULL */
} fbn_forward_args;

typedef struct fbn_backward_args {
  const fbn_tensor_desc *desc;
  const fbn_saved *saved; /* filled by this module's forward, same desc */
  const void *x;
  const void *y;
  const void *dy;
  void *dx;      /* may be NULL */
  void *daddend; /* may be NULL */
  void *workspace;
  size_t workspace_bytes;
  const void *exec;
} fbn_backward_args;

typedef struct fbn_backend {
  const char *name;
  /* Allocate module->buffers[] for the buffers the options ask for, and
   * module->backend_state. Must leave the module fully freed on failure
   * (module_fini is not called then). */
  fbn_status (*module_init)(fbn_module *module);
  void (*module_fini)(fbn_module *module);
  /* Can this backend run desc (dtype, layout, sizes)? UNSUPPORTED with a
   * message if not. Called after generic validation. */
  fbn_status (*check_desc)(const fbn_module *module, const fbn_tensor_desc *desc,
                           bool has_addend, bool batch_stats);
  /* Host <-> buffer copies with dtype conversion (dtype is FLOAT32 or
   * FLOAT64, count == num_features, buffer present). */
  fbn_status (*buffer_read)(const fbn_module *module, fbn_buffer which, fbn_dtype dtype,
                            void *dst);
  fbn_status (*buffer_write)(fbn_module *module, fbn_buffer which, fbn_dtype dtype,
                             const void *src);
  fbn_status (*buffer_fill)(fbn_module *module, fbn_buffer which, double value);
  fbn_status (*workspace_size)(const fbn_module *module, const fbn_tensor_desc *desc,
                               bool has_addend, bool batch_stats, bool backward,
                               size_t *bytes);
  /* Make saved->payload big enough for this forward (allocating or
   * reusing). Called before forward; must not touch the module. */
  fbn_status (*saved_prepare)(const fbn_module *module, const fbn_tensor_desc *desc,
                              bool has_addend, bool batch_stats, fbn_saved *saved);
  void (*saved_free)(fbn_saved *saved);
  fbn_status (*forward)(fbn_module *module, const fbn_forward_args *args);
  fbn_status (*backward)(fbn_module *module, const fbn_backward_args *args);
} fbn_backend;

FBN_INTERNAL const fbn_backend *fbn_backend_cpu(void);
/* The fast CPU backend (cpu/cpu_fast.c), the default for CPU modules. */
FBN_INTERNAL const fbn_backend *fbn_backend_cpu_fast(void);
/* NULL when the library was built without CUDA. */
FBN_INTERNAL const fbn_backend *fbn_backend_cuda(void);

/* API-layer implementations with an explicit backend launch context, shared
 * by fusedbn.h (exec = NULL) and fusedbn_cuda.h entry points. `fn` is the
 * public function's name, used in error messages. */
FBN_INTERNAL fbn_status fbn_forward_impl(const char *fn, fbn_module *module,
                                         const fbn_tensor_desc *desc, const void *x,
                                         const void *addend, void *y, fbn_saved *saved,
                                         void *workspace, size_t workspace_bytes,
                                         const void *exec);
FBN_INTERNAL fbn_status fbn_backward_impl(const char *fn, fbn_module *module,
                                          const fbn_saved *saved, const fbn_tensor_desc *desc,
                                          const void *x, const void *y, const void *dy,
                                          void *dx, void *daddend, void *workspace,
                                          size_t workspace_bytes, const void *exec);
/* Validate options as fbn_module_create does (num_features, eps, momentum,
 * param_dtype, device, device_index, bn_mode); the message names fn. */
FBN_INTERNAL fbn_status fbn_validate_options(const char *fn, const fbn_module_options *o);
/* Validate desc against the module (C, dims, overflow, dtype/param dtype,
 * layout, one value per channel when batch_stats) and the backend. */
FBN_INTERNAL fbn_status fbn_validate_desc(const char *fn, const fbn_module *module,
                                          const fbn_tensor_desc *desc, bool has_addend,
                                          bool batch_stats);
/* Whether a forward in the module's current mode uses batch statistics. */
FBN_INTERNAL bool fbn_module_uses_batch_stats(const fbn_module *module);

#endif /* FUSEDBN_SRC_INTERNAL_H */
