/*
 * API layer internals (src/api/): the objects behind the public handles
 * (fbn_op, fbn_module, fbn_saved), backend selection, and the forward /
 * backward implementations with an explicit launch context that both
 * <fusedbn/fusedbn.h> (exec = NULL) and the CUDA interop entry points of
 * <fusedbn/fusedbn_cuda.h> call. Never installed; backends never include
 * it (they see backend.h and core/core.h only).
 *
 * The module API is a wrapper over the op API: a module owns its buffers,
 * num_batches_tracked, a workspace cache and one fbn_op per (dtype, layout,
 * statistics, operation) it has run, created on first use; its forward and
 * backward are fbn_op_forward_impl / fbn_op_backward_impl on those.
 */
#ifndef FUSEDBN_SRC_API_API_H
#define FUSEDBN_SRC_API_API_H

#include "backend.h"
#include "core/core.h"

#define FBN_NUM_BUFFERS 6
/* Alignment the module API requires of a caller's workspace. */
#define FBN_WORKSPACE_ALIGNMENT 256

/* ---- op ----------------------------------------------------------------- */

struct fbn_op {
  fbn_op_desc desc; /* validated */
  const fbn_backend *backend;
  void *state; /* backend->op_init's, freed by backend->op_fini */
};

/* Validate an op description (every field's domain, the dtype/param_dtype
 * pair); messages name fn. Does not ask a backend. */
FBN_INTERNAL fbn_status fbn_validate_op_desc(const char *fn, const fbn_op_desc *desc);
/* The backend for device: CPU: FBN_CPU_BACKEND (fast, the default, or
 * reference; another value is INVALID_VALUE); CUDA: NO_DEVICE in a build
 * without it. */
FBN_INTERNAL fbn_status fbn_select_backend(const char *fn, fbn_device_type device,
                                           const fbn_backend **out);
/* fbn_op_create with a chosen backend; desc already validated. */
FBN_INTERNAL fbn_status fbn_op_create_with(const char *fn, const fbn_op_desc *desc,
                                           const fbn_backend *backend, fbn_op **out);
/* x_desc against the op: shape (core), C/dtype/layout equal to the op's,
 * then the backend's check_shape. */
FBN_INTERNAL fbn_status fbn_op_check_x_desc(const char *fn, const fbn_op *op,
                                            const fbn_tensor_desc *x_desc);

/* fbn_op_forward / fbn_op_backward with a backend launch context (CUDA:
 * const fbn_cuda_exec *, NULL on the CPU); fn names the public call. */
FBN_INTERNAL fbn_status fbn_op_forward_impl(const char *fn, const fbn_op *op,
                                            const fbn_tensor_desc *x_desc, const void *x,
                                            const void *addend, void *y, const void *weight,
                                            const void *bias, void *running_mean,
                                            void *running_var, double factor, void *saved,
                                            size_t saved_bytes, void *workspace,
                                            size_t workspace_bytes, const void *exec);
FBN_INTERNAL fbn_status fbn_op_backward_impl(const char *fn, const fbn_op *op,
                                             const fbn_tensor_desc *x_desc, const void *x,
                                             const void *y, const void *dy, const void *saved,
                                             size_t saved_bytes, const void *weight,
                                             const void *bias, void *dx, void *daddend,
                                             void *dweight, void *dbias,
                                             fbn_param_grad param_grad, void *workspace,
                                             size_t workspace_bytes, const void *exec);

/* ---- module ------------------------------------------------------------- */

/* One cached op per dtype x layout x statistics x operation. */
#define FBN_MODULE_OP_SLOTS (4 * 2 * 2 * 3)

struct fbn_module {
  uint64_t id; /* unique per process, never 0 */
  fbn_module_options options;
  bool training;
  int64_t num_batches_tracked; /* host-side; meaningful when tracking */
  const fbn_backend *backend;
  /* Storage of each fbn_buffer (indexed by fbn_buffer), num_features
   * elements of options.param_dtype on the module's device
   * (backend->mem_alloc); NULL when the module does not have that buffer. */
  void *buffers[FBN_NUM_BUFFERS];
  /* Ops created on first use (fbn_module_op). */
  fbn_op *ops[FBN_MODULE_OP_SLOTS];
  /* Workspace used when the caller passes none (backend->mem_alloc). */
  void *workspace;
  size_t workspace_bytes;
};

struct fbn_saved {
  /* id of the module whose forward filled it; 0 = empty. */
  uint64_t module_id;
  fbn_tensor_desc desc;
  /* The operation the forward ran (a BN_ADD_RELU module without addend
   * runs BN_RELU) and its statistics: together with desc they select the
   * module's op that backward uses. */
  fbn_operation operation;
  bool batch_stats;
  /* Saved-state memory owned by the object (memory_backend->mem_alloc on
   * memory_device), or NULL. */
  const fbn_backend *memory_backend;
  int memory_device;
  void *memory;
  size_t memory_bytes;
  /* Memory provided by the caller instead (fbn_cuda_saved_set_memory; not
   * freed by fusedbn), or NULL. */
  void *external;
  size_t external_bytes;
};

FBN_INTERNAL const char *fbn_buffer_name(fbn_buffer which);
/* Whether a module with these options has buffer `which`. */
FBN_INTERNAL bool fbn_options_have_buffer(const fbn_module_options *o, fbn_buffer which);
/* Validate options as fbn_module_create does; the message names fn. */
FBN_INTERNAL fbn_status fbn_validate_options(const char *fn, const fbn_module_options *o);
/* Whether a forward in the module's current mode uses batch statistics. */
FBN_INTERNAL bool fbn_module_uses_batch_stats(const fbn_module *module);
/* The operation a module's forward runs with or without an addend. */
FBN_INTERNAL fbn_operation fbn_module_forward_operation(const fbn_module *module,
                                                        bool has_addend);
/* The op description a module runs for desc (dtype and layout of desc,
 * not validated) with this statistics mode and operation. */
FBN_INTERNAL fbn_op_desc fbn_module_op_desc(const fbn_module *module, const fbn_tensor_desc *desc,
                                            bool batch_stats, fbn_operation operation);
/* The module's op for that description, created on first use. desc's
 * dtype and layout must be valid enum values. */
FBN_INTERNAL fbn_status fbn_module_op(const char *fn, fbn_module *module,
                                      const fbn_tensor_desc *desc, bool batch_stats,
                                      fbn_operation operation, const fbn_op **op);

/* fbn_module_forward / fbn_module_backward with a backend launch context;
 * fn names the public call. */
FBN_INTERNAL fbn_status fbn_module_forward_impl(const char *fn, fbn_module *module,
                                                const fbn_tensor_desc *desc, const void *x,
                                                const void *addend, void *y, fbn_saved *saved,
                                                void *workspace, size_t workspace_bytes,
                                                const void *exec);
FBN_INTERNAL fbn_status fbn_module_backward_impl(const char *fn, fbn_module *module,
                                                 const fbn_saved *saved,
                                                 const fbn_tensor_desc *desc, const void *x,
                                                 const void *y, const void *dy, void *dx,
                                                 void *daddend, void *workspace,
                                                 size_t workspace_bytes, const void *exec);

#endif /* FUSEDBN_SRC_API_API_H */
