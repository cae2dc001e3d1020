/*
 * The CUDA interop entry points of <fusedbn/fusedbn_cuda.h>: the module and
 * op calls with an explicit launch context, the path queries, the
 * persistent kernels' run-time error query and the saved objects' device
 * memory.  API layer: validation through the core and the module/op layer,
 * then the cuDNN backend's queries (cuda/cuda_backend.h).
 */
#include <stdint.h>
#include <string.h>

#include "cuda/cuda_backend.h"
#include "fusedbn/fusedbn_cuda.h"
#include "internal.h"

/* Caller memory for a saved object's state: the alignment the module layer
 * gives its own (cudaMalloc's). */
#define SAVED_MEMORY_ALIGNMENT 256u

const char *fbn_cuda_path_name(fbn_cuda_path path) {
  switch (path) {
  case FBN_CUDA_PATH_FUSED: return "fused";
  case FBN_CUDA_PATH_GENERAL: return "general";
  case FBN_CUDA_PATH_KERNELS: return "kernels";
  case FBN_CUDA_PATH_EVAL: return "eval";
  default: return "none";
  }
}

static bool is_cuda(const fbn_backend *b) { return b != NULL && b == fbn_backend_cuda(); }

static fbn_status require_cuda_module(const char *fn, const fbn_module *m) {
  if (m == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: module is NULL", fn);
  if (!is_cuda(m->backend))
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: module is not a CUDA module (backend %s)", fn,
                     m->backend != NULL ? m->backend->name : "none");
  return FBN_STATUS_SUCCESS;
}

static fbn_status require_cuda_op(const char *fn, const fbn_op *op) {
  if (op == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: op is NULL", fn);
  if (!is_cuda(op->backend))
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: op is not a CUDA op (backend %s)", fn,
                     op->backend->name);
  return FBN_STATUS_SUCCESS;
}

/* The operation a module's forward runs; an addend given to a module whose
 * operation takes none is INVALID_VALUE. */
static fbn_status module_operation(const char *fn, const fbn_module_options *o, bool has_addend,
                                   fbn_operation *op) {
  if (has_addend && !fbn_operation_has_addend(o->operation))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: has_addend = true: a module of operation %s takes no addend", fn,
                     fbn_operation_name(o->operation));
  *op = o->operation == FBN_OPERATION_BN_ADD_RELU && !has_addend ? FBN_OPERATION_BN_RELU
                                                                 : o->operation;
  return FBN_STATUS_SUCCESS;
}

/* desc against the options, in the module API's order: shape, channels and
 * overflow, the dtype/param_dtype pair, one value per channel. */
static fbn_status check_module_desc(const char *fn, const fbn_module_options *o,
                                    const fbn_tensor_desc *d, bool batch_stats) {
  fbn_status s = fbn_check_desc_shape(fn, d, o->num_features, "num_features");
  if (s == FBN_STATUS_SUCCESS)
    s = fbn_check_dtype_pair(fn, d->dtype, o->param_dtype);
  if (s == FBN_STATUS_SUCCESS && batch_stats)
    s = fbn_check_batch_values(fn, d);
  return s;
}

/* The module's CUDA op for a forward of desc in its current mode (created
 * on first use: the module's op cache), desc validated. */
static fbn_status module_cuda_op(const char *fn, const fbn_module *m, const fbn_tensor_desc *d,
                                 bool has_addend, const fbn_op **op) {
  fbn_status s = require_cuda_module(fn, m);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  if (d == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: desc is NULL", fn);
  fbn_operation operation = FBN_OPERATION_BN;
  if ((s = module_operation(fn, &m->options, has_addend, &operation)) != FBN_STATUS_SUCCESS)
    return s;
  const bool batch_stats = fbn_module_uses_batch_stats(m);
  if ((s = check_module_desc(fn, &m->options, d, batch_stats)) != FBN_STATUS_SUCCESS)
    return s;
  /* The op cache is the module's own bookkeeping, not its observable
   * state: a query may fill it. */
  s = fbn_module_op(fn, (fbn_module *)m, d, batch_stats, operation, op);
  if (s == FBN_STATUS_SUCCESS)
    s = fbn_op_check_x_desc(fn, *op, d);
  return s;
}

/* ---- paths ---------------------------------------------------------------------- */

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
  fbn_status s = fbn_validate_options(fn, o);
  fbn_operation operation = FBN_OPERATION_BN;
  if (s == FBN_STATUS_SUCCESS)
    s = module_operation(fn, o, has_addend, &operation);
  if (s == FBN_STATUS_SUCCESS)
    s = check_module_desc(fn, o, d, batch_stats);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = o->num_features;
  od.eps = o->eps;
  od.dtype = d->dtype;
  od.param_dtype = o->param_dtype;
  od.layout = d->layout;
  od.device = FBN_DEVICE_CUDA;
  od.device_index = o->device_index;
  od.operation = operation;
  od.affine = o->affine;
  od.statistics = batch_stats ? FBN_STATISTICS_BATCH : FBN_STATISTICS_RUNNING;
  od.bn_mode = o->bn_mode;
  fbn_cuda_path p = FBN_CUDA_PATH_NONE;
  s = fbn_cuda_plan_path_of(&od, d, &p);
  if (s != FBN_STATUS_SUCCESS)
    return fbn_error_prefix(s, fn);
  *path = p;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cuda_module_path(const fbn_module *m, const fbn_tensor_desc *d, bool has_addend,
                                fbn_cuda_path *path) {
  static const char fn[] = "fbn_cuda_module_path";
  fbn_clear_error();
  if (path == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: path is NULL", fn);
  *path = FBN_CUDA_PATH_NONE;
  const fbn_op *op = NULL;
  fbn_status s = module_cuda_op(fn, m, d, has_addend, &op);
  if (s != FBN_STATUS_SUCCESS || op == NULL)
    return s;
  *path = fbn_cuda_state_path_of(op->state, d);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cuda_op_path(const fbn_op *op, const fbn_tensor_desc *d, fbn_cuda_path *path) {
  static const char fn[] = "fbn_cuda_op_path";
  fbn_clear_error();
  if (path == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: path is NULL", fn);
  *path = FBN_CUDA_PATH_NONE;
  fbn_status s = require_cuda_op(fn, op);
  if (s != FBN_STATUS_SUCCESS)
    return s;
  if (d == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: x_desc is NULL", fn);
  if ((s = fbn_op_check_x_desc(fn, op, d)) != FBN_STATUS_SUCCESS)
    return s;
  *path = fbn_cuda_state_path_of(op->state, d);
  return FBN_STATUS_SUCCESS;
}

/* Filled by a forward of a CUDA module: in its own memory, or in caller
 * memory (fbn_cuda_saved_set_memory: device memory, for CUDA modules). */
static bool saved_is_cuda(const fbn_saved *saved) {
  return saved->module_id != 0 &&
         (saved->external != NULL || is_cuda(saved->memory_backend));
}

fbn_status fbn_cuda_saved_path(const fbn_saved *saved, fbn_cuda_path *path) {
  static const char fn[] = "fbn_cuda_saved_path";
  fbn_clear_error();
  if (path == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: path is NULL", fn);
  *path = FBN_CUDA_PATH_NONE;
  if (saved == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: saved is NULL", fn);
  if (saved_is_cuda(saved))
    *path = fbn_cuda_recorded_saved_path(saved->external != NULL ? saved->external
                                                                 : saved->memory);
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
  *device = m->options.device_index;
  return FBN_STATUS_SUCCESS;
}

/* ---- forward / backward with a launch context --------------------------------------- */

/* The CPU backends take no launch context. */
static const void *exec_for(const fbn_backend *b, const fbn_cuda_exec *exec) {
  return is_cuda(b) ? (const void *)exec : NULL;
}

fbn_status fbn_cuda_module_forward(fbn_module *m, const fbn_cuda_exec *exec,
                                   const fbn_tensor_desc *desc, const void *x, const void *addend,
                                   void *y, fbn_saved *saved, void *workspace,
                                   size_t workspace_bytes) {
  return fbn_module_forward_impl("fbn_cuda_module_forward", m, desc, x, addend, y, saved,
                                 workspace, workspace_bytes,
                                 m != NULL ? exec_for(m->backend, exec) : NULL);
}

fbn_status fbn_cuda_module_backward(fbn_module *m, const fbn_cuda_exec *exec,
                                    const fbn_saved *saved, const fbn_tensor_desc *desc,
                                    const void *x, const void *y, const void *dy, void *dx,
                                    void *daddend, void *workspace, size_t workspace_bytes) {
  return fbn_module_backward_impl("fbn_cuda_module_backward", m, saved, desc, x, y, dy, dx,
                                  daddend, workspace, workspace_bytes,
                                  m != NULL ? exec_for(m->backend, exec) : NULL);
}

fbn_status fbn_cuda_op_forward(const fbn_op *op, const fbn_cuda_exec *exec,
                               const fbn_tensor_desc *x_desc, const void *x, const void *addend,
                               void *y, const void *weight, const void *bias, void *running_mean,
                               void *running_var, double factor, void *saved, size_t saved_bytes,
                               void *workspace, size_t workspace_bytes) {
  return fbn_op_forward_impl("fbn_cuda_op_forward", op, x_desc, x, addend, y, weight, bias,
                             running_mean, running_var, factor, saved, saved_bytes, workspace,
                             workspace_bytes, op != NULL ? exec_for(op->backend, exec) : NULL);
}

fbn_status fbn_cuda_op_backward(const fbn_op *op, const fbn_cuda_exec *exec,
                                const fbn_tensor_desc *x_desc, const void *x, const void *y,
                                const void *dy, const void *saved, size_t saved_bytes,
                                const void *weight, const void *bias, void *dx, void *daddend,
                                void *dweight, void *dbias, fbn_param_grad param_grad,
                                void *workspace, size_t workspace_bytes) {
  return fbn_op_backward_impl("fbn_cuda_op_backward", op, x_desc, x, y, dy, saved, saved_bytes,
                              weight, bias, dx, daddend, dweight, dbias, param_grad, workspace,
                              workspace_bytes, op != NULL ? exec_for(op->backend, exec) : NULL);
}

/* ---- run-time errors of the persistent kernels ------------------------------------- */

/* The query's status to the caller: on failure *result carries it too (a
 * caller that only looks at *result never reads success from a failed
 * query); *result's own message, if any, is prefixed with fn. */
static fbn_status runtime_answer(const char *fn, fbn_status s, fbn_status *result) {
  if (s != FBN_STATUS_SUCCESS) {
    *result = s;
    return fbn_error_prefix(s, fn);
  }
  if (*result != FBN_STATUS_SUCCESS)
    (void)fbn_error_prefix(*result, fn);
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
  *result = FBN_STATUS_SUCCESS;
  if (exec != NULL && exec->cudnn != NULL)
    return runtime_answer(
        fn, fbn_cuda_handle_runtime_error(m->options.device_index, exec, wait, result), result);
  /* The module's calls without a caller handle ran on its ops' own handles:
   * ask each; the first that reports something answers. */
  for (int i = 0; i < FBN_MODULE_OP_SLOTS; i++) {
    const fbn_op *op = m->ops[i];
    if (op == NULL || !fbn_cuda_op_has_handle(op->state))
      continue;
    fbn_status r = FBN_STATUS_SUCCESS;
    s = fbn_cuda_op_runtime_error(op->state, exec, wait, &r);
    if (s != FBN_STATUS_SUCCESS || r != FBN_STATUS_SUCCESS) {
      *result = r;
      return runtime_answer(fn, s, result);
    }
  }
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cuda_op_check_runtime_error(const fbn_op *op, const fbn_cuda_exec *exec, bool wait,
                                           fbn_status *result) {
  static const char fn[] = "fbn_cuda_op_check_runtime_error";
  fbn_clear_error();
  if (result == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: result is NULL", fn);
  fbn_status s = require_cuda_op(fn, op);
  if (s != FBN_STATUS_SUCCESS) {
    *result = s;
    return s;
  }
  *result = FBN_STATUS_SUCCESS;
  return runtime_answer(fn, fbn_cuda_op_runtime_error(op->state, exec, wait, result), result);
}

/* ---- saved objects' device memory ---------------------------------------------------- */

fbn_status fbn_cuda_saved_size(const fbn_module *m, const fbn_tensor_desc *d, bool has_addend,
                               size_t *bytes) {
  static const char fn[] = "fbn_cuda_saved_size";
  fbn_clear_error();
  if (bytes == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: bytes is NULL", fn);
  *bytes = 0;
  const fbn_op *op = NULL;
  fbn_status s = module_cuda_op(fn, m, d, has_addend, &op);
  if (s != FBN_STATUS_SUCCESS || op == NULL)
    return s;
  size_t b = 0;
  s = op->backend->saved_size(&op->desc, op->state, d, &b);
  if (s != FBN_STATUS_SUCCESS)
    return fbn_error_prefix(s, fn);
  *bytes = b;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cuda_saved_set_memory(fbn_saved *saved, void *device_memory, size_t bytes) {
  static const char fn[] = "fbn_cuda_saved_set_memory";
  fbn_clear_error();
  if (saved == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: saved is NULL", fn);
  if (device_memory != NULL && (uintptr_t)device_memory % SAVED_MEMORY_ALIGNMENT != 0)
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                     "%s: device_memory = %p: must be aligned to %u bytes", fn, device_memory,
                     SAVED_MEMORY_ALIGNMENT);
  if (device_memory != NULL && bytes == 0)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: bytes = 0 with device_memory = %p: give its size", fn, device_memory);
  if (saved->memory_backend != NULL)
    saved->memory_backend->mem_free(saved->memory_device, saved->memory);
  saved->memory = NULL;
  saved->memory_bytes = 0;
  saved->memory_backend = NULL;
  saved->module_id = 0;
  saved->external = device_memory;
  saved->external_bytes = device_memory != NULL ? bytes : 0;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_cuda_saved_stats(const fbn_saved *saved, const void **mean, const void **invstd) {
  static const char fn[] = "fbn_cuda_saved_stats";
  fbn_clear_error();
  if (saved == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: saved is NULL", fn);
  if (mean == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: mean is NULL", fn);
  if (invstd == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: invstd is NULL", fn);
  if (!saved_is_cuda(saved))
    return fbn_error(FBN_STATUS_INVALID_STATE,
                     "%s: saved holds no CUDA forward state (empty, or filled by a CPU module)",
                     fn);
  size_t mean_off = 0, invstd_off = 0;
  fbn_cuda_saved_stats_offsets(&saved->desc, &mean_off, &invstd_off);
  const char *base = saved->external != NULL ? saved->external : saved->memory;
  *mean = base + mean_off;
  *invstd = base + invstd_off;
  return FBN_STATUS_SUCCESS;
}
