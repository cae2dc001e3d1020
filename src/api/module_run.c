/*
 * The module API's forward and backward, and its saved objects: the
 * module's rules (mode, num_batches_tracked, the running-average factor,
 * saved-object binding, the caller's or the cached workspace) around the
 * op API's forward and backward on the module's buffers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* ---- saved objects ------------------------------------------------------ */

fbn_status fbn_saved_create(fbn_saved **out) {
  fbn_clear_error();
  if (out == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "fbn_saved_create: out is NULL");
  *out = calloc(1, sizeof **out);
  if (*out == NULL)
    return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "fbn_saved_create: out of host memory");
  return FBN_STATUS_SUCCESS;
}

static void fbn_saved_release(fbn_saved *s) {
  if (s->memory_backend != NULL)
    s->memory_backend->mem_free(s->memory_device, s->memory);
  s->memory = NULL;
  s->memory_bytes = 0;
  s->memory_backend = NULL;
}

void fbn_saved_destroy(fbn_saved *saved) {
  if (saved == NULL)
    return;
  fbn_saved_release(saved);
  free(saved);
}

/* Saved-state memory of at least need bytes on the module's device: the
 * caller's (fbn_cuda_saved_set_memory), the object's own, or a new block
 * (*fresh, else NULL) that replaces the object's once the forward succeeded
 * (fbn_saved_adopt): until then the object keeps its memory and binding. */
static fbn_status fbn_saved_memory(const char *fn, const fbn_module *m, const fbn_saved *s,
                                   size_t need, void **mem, size_t *bytes, void **fresh) {
  *fresh = NULL;
  if (s->external != NULL) {
    if (s->external_bytes < need)
      return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                       "%s: the saved object's memory has %zu bytes: this forward needs %zu", fn,
                       s->external_bytes, need);
    *mem = s->external;
    *bytes = s->external_bytes;
    return FBN_STATUS_SUCCESS;
  }
  if (s->memory == NULL || s->memory_backend != m->backend ||
      s->memory_device != m->options.device_index || s->memory_bytes < need) {
    fbn_status st = m->backend->mem_alloc(m->options.device_index, need, fresh);
    if (st != FBN_STATUS_SUCCESS) {
      *fresh = NULL;
      return fbn_error_prefix(st, fn);
    }
    *mem = *fresh;
    *bytes = need;
    return FBN_STATUS_SUCCESS;
  }
  *mem = s->memory;
  *bytes = s->memory_bytes;
  return FBN_STATUS_SUCCESS;
}

/* The new block of fbn_saved_memory (need bytes) becomes the object's. */
static void fbn_saved_adopt(const fbn_module *m, fbn_saved *s, void *fresh, size_t need) {
  fbn_saved_release(s);
  s->memory = fresh;
  s->memory_bytes = need;
  s->memory_backend = m->backend;
  s->memory_device = m->options.device_index;
}

/* ---- the module's ops --------------------------------------------------- */

bool fbn_module_uses_batch_stats(const fbn_module *module) {
  return module->training || !module->options.track_running_stats;
}

fbn_operation fbn_module_forward_operation(const fbn_module *module, bool has_addend) {
  const fbn_operation op = module->options.operation;
  return op == FBN_OPERATION_BN_ADD_RELU && !has_addend ? FBN_OPERATION_BN_RELU : op;
}

fbn_op_desc fbn_module_op_desc(const fbn_module *m, const fbn_tensor_desc *desc, bool batch_stats,
                               fbn_operation operation) {
  const fbn_module_options *o = &m->options;
  fbn_op_desc d;
  fbn_op_desc_init(&d);
  d.num_features = o->num_features;
  d.eps = o->eps;
  d.dtype = desc->dtype;
  d.param_dtype = o->param_dtype;
  d.layout = desc->layout;
  d.device = o->device;
  d.device_index = o->device_index;
  d.operation = operation;
  d.affine = o->affine;
  d.statistics = batch_stats ? FBN_STATISTICS_BATCH : FBN_STATISTICS_RUNNING;
  d.bn_mode = o->bn_mode;
  return d;
}

fbn_status fbn_module_op(const char *fn, fbn_module *m, const fbn_tensor_desc *desc,
                         bool batch_stats, fbn_operation operation, const fbn_op **op) {
  const int slot =
      (((int)desc->dtype * 2 + (int)desc->layout) * 2 + (batch_stats ? 1 : 0)) * 3 + (int)operation;
  if (m->ops[slot] == NULL) {
    const fbn_op_desc d = fbn_module_op_desc(m, desc, batch_stats, operation);
    fbn_status st = fbn_op_create_with(fn, &d, m->backend, &m->ops[slot]);
    if (st != FBN_STATUS_SUCCESS)
      return st;
  }
  *op = m->ops[slot];
  return FBN_STATUS_SUCCESS;
}

/* ---- validation --------------------------------------------------------- */

/* desc against the module, in the module API's order: shape, channels and
 * overflow, the dtype/param_dtype pair, one value per channel, what the
 * backend can run (through the module's op for it, created here). */
static fbn_status fbn_module_check_desc(const char *fn, fbn_module *m, const fbn_tensor_desc *d,
                                        bool batch_stats, fbn_operation operation,
                                        const fbn_op **op) {
  fbn_status st = fbn_check_desc_shape(fn, d, m->options.num_features, "num_features");
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_check_dtype_pair(fn, d->dtype, m->options.param_dtype);
  if (st == FBN_STATUS_SUCCESS && batch_stats)
    st = fbn_check_batch_values(fn, d);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_module_op(fn, m, d, batch_stats, operation, op);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_op_check_x_desc(fn, *op, d);
  return st;
}

/* Bytes of workspace a module asks of its caller: the op's need on CUDA;
 * none on the CPU, where the module's workspace cache serves (host memory,
 * kept from call to call). */
static fbn_status fbn_module_caller_workspace(const char *fn, const fbn_op *op,
                                              const fbn_tensor_desc *desc, bool backward,
                                              size_t *bytes) {
  *bytes = 0;
  if (op->backend->device == FBN_DEVICE_CPU)
    return FBN_STATUS_SUCCESS;
  fbn_status st = op->backend->workspace_size(&op->desc, op->state, desc, backward, bytes);
  return st == FBN_STATUS_SUCCESS ? st : fbn_error_prefix(st, fn);
}

/* The caller's workspace (NULL: none) against what the module asks. */
static fbn_status fbn_module_check_workspace(const char *fn, const fbn_op *op,
                                             const fbn_tensor_desc *desc, bool backward,
                                             const void *workspace, size_t workspace_bytes) {
  if (workspace == NULL)
    return FBN_STATUS_SUCCESS;
  size_t need = 0;
  fbn_status st = fbn_module_caller_workspace(fn, op, desc, backward, &need);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (workspace_bytes < need)
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                     "%s: workspace_bytes = %zu: this call needs at least %zu bytes", fn,
                     workspace_bytes, need);
  if ((uintptr_t)workspace % FBN_WORKSPACE_ALIGNMENT != 0)
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                     "%s: workspace = %p: must be aligned to %d bytes", fn, workspace,
                     FBN_WORKSPACE_ALIGNMENT);
  return FBN_STATUS_SUCCESS;
}

/* The workspace a call runs with: the caller's when it holds the op's need,
 * else the module's cache grown to it. */
static fbn_status fbn_module_workspace(const char *fn, fbn_module *m, const fbn_op *op,
                                      const fbn_tensor_desc *desc, bool backward,
                                      void **workspace, size_t *workspace_bytes) {
  size_t need = 0;
  fbn_status st = op->backend->workspace_size(&op->desc, op->state, desc, backward, &need);
  if (st != FBN_STATUS_SUCCESS)
    return fbn_error_prefix(st, fn);
  if (*workspace != NULL && *workspace_bytes >= need)
    return FBN_STATUS_SUCCESS;
  if (need > m->workspace_bytes) {
    void *p;
    st = m->backend->mem_alloc(m->options.device_index, need, &p);
    if (st != FBN_STATUS_SUCCESS)
      return fbn_error_prefix(st, fn);
    m->backend->mem_free(m->options.device_index, m->workspace);
    m->workspace = p;
    m->workspace_bytes = need;
  }
  *workspace = need > 0 ? m->workspace : NULL;
  *workspace_bytes = need > 0 ? m->workspace_bytes : 0;
  return FBN_STATUS_SUCCESS;
}

/* ---- workspace queries -------------------------------------------------- */

static fbn_status fbn_workspace_query(const char *fn, const fbn_module *module,
                                      const fbn_tensor_desc *desc, bool has_addend,
                                      bool backward, size_t *bytes) {
  fbn_clear_error();
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: module is NULL", fn);
  if (desc == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: desc is NULL", fn);
  if (bytes == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: bytes is NULL", fn);
  const bool batch_stats = fbn_module_uses_batch_stats(module);
  const fbn_operation operation = fbn_module_forward_operation(module, has_addend);
  const fbn_op *op;
  /* the op cache is not part of the module's observable state */
  fbn_status st =
      fbn_module_check_desc(fn, (fbn_module *)module, desc, batch_stats, operation, &op);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  return fbn_module_caller_workspace(fn, op, desc, backward, bytes);
}

fbn_status fbn_module_forward_workspace_size(const fbn_module *module, const fbn_tensor_desc *desc,
                                             bool has_addend, size_t *bytes) {
  return fbn_workspace_query("fbn_module_forward_workspace_size", module, desc, has_addend, false,
                             bytes);
}

fbn_status fbn_module_backward_workspace_size(const fbn_module *module,
                                              const fbn_tensor_desc *desc, bool has_addend,
                                              size_t *bytes) {
  return fbn_workspace_query("fbn_module_backward_workspace_size", module, desc, has_addend, true,
                             bytes);
}

/* ---- forward / backward ------------------------------------------------- */

fbn_status fbn_module_forward_impl(const char *fn, fbn_module *module, const fbn_tensor_desc *desc,
                                   const void *x, const void *addend, void *y, fbn_saved *saved,
                                   void *workspace, size_t workspace_bytes, const void *exec) {
  fbn_clear_error();
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: module is NULL", fn);
  if (desc == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: desc is NULL", fn);
  if (x == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: x is NULL", fn);
  if (y == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: y is NULL", fn);
  const fbn_module_options *o = &module->options;
  if (addend != NULL && !fbn_operation_has_addend(o->operation))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: addend = %p: a module of operation %s takes no addend (pass NULL)", fn,
                     addend, fbn_operation_name(o->operation));

  const bool has_addend = addend != NULL;
  const bool batch_stats = fbn_module_uses_batch_stats(module);
  const fbn_operation operation = fbn_module_forward_operation(module, has_addend);
  const fbn_op *op;
  fbn_status st = fbn_module_check_desc(fn, module, desc, batch_stats, operation, &op);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  const size_t bytes = fbn_desc_bytes(desc);
  if (fbn_overlap(y, bytes, x, bytes))
    return fbn_error(FBN_STATUS_ALIASING, "%s: y overlaps x: in-place forward is not supported",
                     fn);
  if (fbn_overlap(y, bytes, addend, bytes))
    return fbn_error(FBN_STATUS_ALIASING,
                     "%s: y overlaps addend: in-place forward is not supported", fn);
  st = fbn_module_check_workspace(fn, op, desc, false, workspace, workspace_bytes);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  const bool update_running = module->training && o->track_running_stats;
  double factor = 0.0;
  int64_t next_count = module->num_batches_tracked;
  if (update_running) {
    if (module->num_batches_tracked == INT64_MAX)
      return fbn_error(FBN_STATUS_INVALID_STATE,
                       "%s: num_batches_tracked = %lld: one more batch would overflow it", fn,
                       (long long)module->num_batches_tracked);
    next_count = module->num_batches_tracked + 1;
    st = fbn_running_average_factor(o->momentum, o->cumulative_average, next_count, &factor);
    if (st != FBN_STATUS_SUCCESS)
      return fbn_error_prefix(st, fn);
  }

  /* The saved object keeps its memory and binding (a backward of its
   * earlier forward still runs) unless this forward succeeds. */
  void *saved_mem = NULL, *saved_fresh = NULL;
  size_t saved_bytes = 0, saved_need = 0;
  if (saved != NULL) {
    st = op->backend->saved_size(&op->desc, op->state, desc, &saved_need);
    if (st != FBN_STATUS_SUCCESS)
      return fbn_error_prefix(st, fn);
    st = fbn_saved_memory(fn, module, saved, saved_need, &saved_mem, &saved_bytes, &saved_fresh);
    if (st != FBN_STATUS_SUCCESS)
      return st;
  }
  st = fbn_module_workspace(fn, module, op, desc, false, &workspace, &workspace_bytes);

  /* running statistics: updated in training, read in eval, none without them */
  void *rm = o->track_running_stats ? module->buffers[FBN_BUFFER_RUNNING_MEAN] : NULL;
  void *rv = o->track_running_stats ? module->buffers[FBN_BUFFER_RUNNING_VAR] : NULL;
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_op_forward_impl(fn, op, desc, x, addend, y, module->buffers[FBN_BUFFER_WEIGHT],
                             module->buffers[FBN_BUFFER_BIAS], rm, rv, factor, saved_mem,
                             saved_bytes, workspace, workspace_bytes, exec);
  if (st != FBN_STATUS_SUCCESS) {
    if (saved_fresh != NULL)
      module->backend->mem_free(o->device_index, saved_fresh);
    return st;
  }

  module->num_batches_tracked = next_count;
  if (saved != NULL) {
    if (saved_fresh != NULL)
      fbn_saved_adopt(module, saved, saved_fresh, saved_need);
    saved->module_id = module->id;
    saved->desc = *desc;
    saved->operation = operation;
    saved->batch_stats = batch_stats;
  }
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_module_backward_impl(const char *fn, fbn_module *module, const fbn_saved *saved,
                                    const fbn_tensor_desc *desc, const void *x, const void *y,
                                    const void *dy, void *dx, void *daddend, void *workspace,
                                    size_t workspace_bytes, const void *exec) {
  fbn_clear_error();
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: module is NULL", fn);
  if (saved == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: saved is NULL", fn);
  if (desc == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: desc is NULL", fn);
  if (x == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: x is NULL", fn);
  if (y == NULL && module->options.operation != FBN_OPERATION_BN)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: y is NULL", fn);
  if (dy == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: dy is NULL", fn);

  if (saved->module_id == 0)
    return fbn_error(FBN_STATUS_INVALID_STATE,
                     "%s: saved is empty: pass it to a successful fbn_module_forward first", fn);
  if (saved->module_id != module->id)
    return fbn_error(FBN_STATUS_INVALID_STATE,
                     "%s: saved was filled by another module's forward (module id %llu, this "
                     "module is %llu)",
                     fn, (unsigned long long)saved->module_id, (unsigned long long)module->id);
  const fbn_op *op;
  fbn_status st =
      fbn_module_check_desc(fn, module, desc, saved->batch_stats, saved->operation, &op);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (!fbn_desc_equal(desc, &saved->desc))
    return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                     "%s: desc (N=%lld, C=%lld, H=%lld, W=%lld, %s, %s) differs from the forward's "
                     "(N=%lld, C=%lld, H=%lld, W=%lld, %s, %s)",
                     fn, (long long)desc->n, (long long)desc->c, (long long)desc->h,
                     (long long)desc->w, fbn_dtype_name(desc->dtype), fbn_layout_name(desc->layout),
                     (long long)saved->desc.n, (long long)saved->desc.c, (long long)saved->desc.h,
                     (long long)saved->desc.w, fbn_dtype_name(saved->desc.dtype),
                     fbn_layout_name(saved->desc.layout));
  if (daddend != NULL && !fbn_operation_has_addend(saved->operation))
    return fbn_error(FBN_STATUS_INVALID_STATE,
                     "%s: daddend is not NULL but the forward had no addend", fn);

  const size_t bytes = fbn_desc_bytes(desc);
  const struct {
    const void *ptr;
    const char *name;
  } inputs[] = {{x, "x"}, {y, "y"}, {dy, "dy"}};
  for (size_t i = 0; i < sizeof inputs / sizeof inputs[0]; i++) {
    if (fbn_overlap(dx, bytes, inputs[i].ptr, bytes))
      return fbn_error(FBN_STATUS_ALIASING,
                       "%s: dx overlaps %s: in-place backward is not supported", fn,
                       inputs[i].name);
    if (fbn_overlap(daddend, bytes, inputs[i].ptr, bytes))
      return fbn_error(FBN_STATUS_ALIASING,
                       "%s: daddend overlaps %s: in-place backward is not supported", fn,
                       inputs[i].name);
  }
  if (fbn_overlap(dx, bytes, daddend, bytes))
    return fbn_error(FBN_STATUS_ALIASING, "%s: dx overlaps daddend", fn);
  st = fbn_module_check_workspace(fn, op, desc, true, workspace, workspace_bytes);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  st = fbn_module_workspace(fn, module, op, desc, true, &workspace, &workspace_bytes);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  const void *mem = saved->external != NULL ? saved->external : saved->memory;
  const size_t mem_bytes = saved->external != NULL ? saved->external_bytes : saved->memory_bytes;
  return fbn_op_backward_impl(fn, op, desc, x, y, dy, mem, mem_bytes,
                              module->buffers[FBN_BUFFER_WEIGHT], module->buffers[FBN_BUFFER_BIAS],
                              dx, daddend, module->buffers[FBN_BUFFER_WEIGHT_GRAD],
                              module->buffers[FBN_BUFFER_BIAS_GRAD], FBN_PARAM_GRAD_ACCUMULATE,
                              workspace, workspace_bytes, exec);
}

fbn_status fbn_module_forward(fbn_module *module, const fbn_tensor_desc *desc, const void *x,
                              const void *addend, void *y, fbn_saved *saved, void *workspace,
                              size_t workspace_bytes) {
  return fbn_module_forward_impl("fbn_module_forward", module, desc, x, addend, y, saved,
                                 workspace, workspace_bytes, NULL);
}

fbn_status fbn_module_backward(fbn_module *module, const fbn_saved *saved,
                               const fbn_tensor_desc *desc, const void *x, const void *y,
                               const void *dy, void *dx, void *daddend, void *workspace,
                               size_t workspace_bytes) {
  return fbn_module_backward_impl("fbn_module_backward", module, saved, desc, x, y, dy, dx,
                                  daddend, workspace, workspace_bytes, NULL);
}
