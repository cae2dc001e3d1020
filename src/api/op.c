/*
 * The op API (fbn_op_*): description, size queries and the forward /
 * backward protocol on caller memory. Every rule that does not depend on
 * the device is checked here, before the backend is called; the module API
 * (module.c) runs through the same functions.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* ---- description -------------------------------------------------------- */

void fbn_op_desc_init(fbn_op_desc *desc) {
  if (desc == NULL)
    return;
  memset(desc, 0, sizeof *desc);
  desc->num_features = 0;
  desc->eps = 1e-5;
  desc->dtype = FBN_DTYPE_FLOAT32;
  desc->param_dtype = FBN_DTYPE_FLOAT32;
  desc->layout = FBN_LAYOUT_NCHW;
  desc->device = FBN_DEVICE_CPU;
  desc->device_index = 0;
  desc->operation = FBN_OPERATION_BN_ADD_RELU;
  desc->affine = true;
  desc->statistics = FBN_STATISTICS_BATCH;
  desc->bn_mode = FBN_BN_MODE_AUTO;
}

fbn_status fbn_validate_op_desc(const char *fn, const fbn_op_desc *d) {
  if (d->num_features <= 0)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: num_features = %lld: the number of channels must be > 0", fn,
                     (long long)d->num_features);
  if (d->num_features > INT32_MAX)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: num_features = %lld: the number of channels must be <= %d", fn,
                     (long long)d->num_features, INT32_MAX);
  if (!(d->eps >= 0.0) || isinf(d->eps))
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: eps = %g: eps must be a finite number >= 0",
                     fn, d->eps);
  if (fbn_dtype_size(d->dtype) == 0)
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: dtype = %d: not an fbn_dtype value", fn,
                     (int)d->dtype);
  if (d->param_dtype != FBN_DTYPE_FLOAT32 && d->param_dtype != FBN_DTYPE_FLOAT64)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: param_dtype = %d (%s): parameters must be float32 or float64", fn,
                     (int)d->param_dtype, fbn_dtype_name(d->param_dtype));
  if (d->layout != FBN_LAYOUT_NCHW && d->layout != FBN_LAYOUT_NHWC)
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: layout = %d: not an fbn_layout value", fn,
                     (int)d->layout);
  if (d->device != FBN_DEVICE_CPU && d->device != FBN_DEVICE_CUDA)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: device = %d: device must be FBN_DEVICE_CPU or FBN_DEVICE_CUDA", fn,
                     (int)d->device);
  if (d->device_index < 0)
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: device_index = %d: must be >= 0", fn,
                     d->device_index);
  if (!fbn_operation_valid(d->operation))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: operation = %d: must be FBN_OPERATION_BN, FBN_OPERATION_BN_RELU or "
                     "FBN_OPERATION_BN_ADD_RELU",
                     fn, (int)d->operation);
  if (d->statistics != FBN_STATISTICS_BATCH && d->statistics != FBN_STATISTICS_RUNNING)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: statistics = %d: must be FBN_STATISTICS_BATCH or "
                     "FBN_STATISTICS_RUNNING",
                     fn, (int)d->statistics);
  if (d->bn_mode != FBN_BN_MODE_AUTO && d->bn_mode != FBN_BN_MODE_SPATIAL)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: bn_mode = %d: must be FBN_BN_MODE_AUTO or FBN_BN_MODE_SPATIAL", fn,
                     (int)d->bn_mode);
  return fbn_check_dtype_pair(fn, d->dtype, d->param_dtype);
}

/* ---- lifecycle ---------------------------------------------------------- */

fbn_status fbn_op_create_with(const char *fn, const fbn_op_desc *desc, const fbn_backend *backend,
                              fbn_op **out) {
  fbn_op *op = calloc(1, sizeof *op);
  if (op == NULL)
    return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: out of host memory", fn);
  op->desc = *desc;
  op->backend = backend;
  fbn_status st = backend->op_init(&op->desc, &op->state);
  if (st != FBN_STATUS_SUCCESS) {
    free(op);
    return fbn_error_prefix(st, fn);
  }
  *out = op;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_op_create(const fbn_op_desc *desc, fbn_op **out) {
  static const char fn[] = "fbn_op_create";
  fbn_clear_error();
  if (out == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: out is NULL", fn);
  *out = NULL;
  if (desc == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: desc is NULL", fn);
  fbn_status st = fbn_validate_op_desc(fn, desc);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const fbn_backend *backend;
  st = fbn_select_backend(fn, desc->device, &backend);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  return fbn_op_create_with(fn, desc, backend, out);
}

void fbn_op_destroy(fbn_op *op) {
  if (op == NULL)
    return;
  op->backend->op_fini(&op->desc, op->state);
  free(op);
}

fbn_status fbn_op_get_desc(const fbn_op *op, fbn_op_desc *out) {
  fbn_clear_error();
  if (op == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "fbn_op_get_desc: op is NULL");
  if (out == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "fbn_op_get_desc: out is NULL");
  *out = op->desc;
  return FBN_STATUS_SUCCESS;
}

/* ---- tensor descriptions and sizes -------------------------------------- */

fbn_status fbn_op_check_x_desc(const char *fn, const fbn_op *op, const fbn_tensor_desc *x) {
  const fbn_op_desc *o = &op->desc;
  fbn_status st = fbn_check_desc_shape(fn, x, o->num_features, "num_features");
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (x->dtype != o->dtype)
    return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                     "%s: x_desc dtype = %s: must equal the op's dtype = %s", fn,
                     fbn_dtype_name(x->dtype), fbn_dtype_name(o->dtype));
  if (x->layout != o->layout)
    return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                     "%s: x_desc layout = %s: must equal the op's layout = %s", fn,
                     fbn_layout_name(x->layout), fbn_layout_name(o->layout));
  if (o->statistics == FBN_STATISTICS_BATCH) {
    st = fbn_check_batch_values(fn, x);
    if (st != FBN_STATUS_SUCCESS)
      return st;
  }
  if (op->backend->check_shape != NULL) {
    st = op->backend->check_shape(o, op->state, x);
    if (st != FBN_STATUS_SUCCESS)
      return fbn_error_prefix(st, fn);
  }
  return FBN_STATUS_SUCCESS;
}

typedef enum fbn_size_kind { FBN_SIZE_SAVED, FBN_SIZE_FORWARD, FBN_SIZE_BACKWARD } fbn_size_kind;

/* A backend size query (x_desc validated); the message names fn. */
static fbn_status fbn_op_size(const char *fn, const fbn_op *op, const fbn_tensor_desc *x,
                              fbn_size_kind kind, size_t *bytes) {
  fbn_status st = kind == FBN_SIZE_SAVED
                      ? op->backend->saved_size(&op->desc, op->state, x, bytes)
                      : op->backend->workspace_size(&op->desc, op->state, x,
                                                    kind == FBN_SIZE_BACKWARD, bytes);
  return st == FBN_STATUS_SUCCESS ? st : fbn_error_prefix(st, fn);
}

/* The least workspace a call of the op accepts (x_desc validated): the
 * backend's minimum (the fast CPU backend: the smallest size over thread
 * counts up to the current one, so that a workspace sized at a lower count
 * passes); the message names fn. */
static fbn_status fbn_op_min_workspace(const char *fn, const fbn_op *op, const fbn_tensor_desc *x,
                                       bool backward, size_t *bytes) {
  if (op->backend->min_workspace_size == NULL)
    return fbn_op_size(fn, op, x, backward ? FBN_SIZE_BACKWARD : FBN_SIZE_FORWARD, bytes);
  fbn_status st = op->backend->min_workspace_size(&op->desc, op->state, x, backward, bytes);
  return st == FBN_STATUS_SUCCESS ? st : fbn_error_prefix(st, fn);
}

static fbn_status fbn_op_size_query(const char *fn, const fbn_op *op, const fbn_tensor_desc *x,
                                    fbn_size_kind kind, size_t *bytes) {
  fbn_clear_error();
  if (op == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: op is NULL", fn);
  if (x == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: x_desc is NULL", fn);
  if (bytes == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: bytes is NULL", fn);
  fbn_status st = fbn_op_check_x_desc(fn, op, x);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  size_t b = 0;
  st = fbn_op_size(fn, op, x, kind, &b);
  if (st == FBN_STATUS_SUCCESS)
    *bytes = b;
  return st;
}

fbn_status fbn_op_saved_size(const fbn_op *op, const fbn_tensor_desc *x_desc, size_t *bytes) {
  return fbn_op_size_query("fbn_op_saved_size", op, x_desc, FBN_SIZE_SAVED, bytes);
}

fbn_status fbn_op_forward_workspace_size(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                         size_t *bytes) {
  return fbn_op_size_query("fbn_op_forward_workspace_size", op, x_desc, FBN_SIZE_FORWARD, bytes);
}

fbn_status fbn_op_backward_workspace_size(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                          size_t *bytes) {
  return fbn_op_size_query("fbn_op_backward_workspace_size", op, x_desc, FBN_SIZE_BACKWARD,
                           bytes);
}

fbn_status fbn_running_average_factor(double momentum, bool cumulative_average,
                                      int64_t num_batches_tracked, double *factor) {
  static const char fn[] = "fbn_running_average_factor";
  fbn_clear_error();
  if (factor == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: factor is NULL", fn);
  if (cumulative_average) {
    if (num_batches_tracked < 1)
      return fbn_error(FBN_STATUS_INVALID_VALUE,
                       "%s: num_batches_tracked = %lld: the cumulative average needs the count "
                       "including this batch (>= 1)",
                       fn, (long long)num_batches_tracked);
    *factor = 1.0 / (double)num_batches_tracked;
    return FBN_STATUS_SUCCESS;
  }
  if (!(momentum >= 0.0 && momentum <= 1.0))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: momentum = %g: momentum must be in [0, 1] (use cumulative_average for "
                     "momentum=None)",
                     fn, momentum);
  *factor = momentum;
  return FBN_STATUS_SUCCESS;
}

/* ---- memory checks ------------------------------------------------------ */

/* Caller memory `name` of `have` bytes for a need of `need` bytes: NULL only
 * when need is 0 (or when optional), large enough, aligned. */
static fbn_status fbn_check_memory(const char *fn, const char *name, const void *ptr,
                                   size_t have, size_t need) {
  if (ptr == NULL) {
    if (need == 0)
      return FBN_STATUS_SUCCESS;
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                     "%s: %s is NULL: this call needs %zu bytes of it", fn, name, need);
  }
  if (have < need)
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE,
                     "%s: %s_bytes = %zu: this op and shape need at least %zu bytes", fn, name,
                     have, need);
  if ((uintptr_t)ptr % FBN_OP_MEMORY_ALIGNMENT != 0)
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE, "%s: %s = %p: must be aligned to %d bytes",
                     fn, name, ptr, FBN_OP_MEMORY_ALIGNMENT);
  return FBN_STATUS_SUCCESS;
}

/* ALIASING when memory the call writes (saved state, workspace) overlaps a
 * tensor of the call. */
typedef struct fbn_span {
  const void *ptr;
  size_t bytes;
  const char *name;
} fbn_span;

/* all[first..first+count) are written by the call: none may overlap any
 * other entry of all. The message names the first written span that
 * overlaps and what it overlaps, the spans only read before the written
 * ones. */
static fbn_status fbn_check_spans(const char *fn, const fbn_span *all, size_t nall, size_t first,
                                  size_t count) {
  for (size_t i = first; i < first + count; i++)
    for (size_t k = 0; k < nall; k++) {
      const size_t j = (k + first + count) % nall; /* read-only spans first */
      if (j != i && fbn_overlap(all[i].ptr, all[i].bytes, all[j].ptr, all[j].bytes))
        return fbn_error(FBN_STATUS_ALIASING, "%s: %s overlaps %s", fn, all[i].name,
                         all[j].name);
    }
  return FBN_STATUS_SUCCESS;
}

/* weight and bias: both for an affine op, neither otherwise. */
static fbn_status fbn_check_affine(const char *fn, const fbn_op_desc *o, const void *weight,
                                   const void *bias) {
  const struct {
    const void *ptr;
    const char *name;
  } p[] = {{weight, "weight"}, {bias, "bias"}};
  for (size_t i = 0; i < 2; i++) {
    if (o->affine && p[i].ptr == NULL)
      return fbn_error(FBN_STATUS_NULL_POINTER, "%s: %s is NULL: an affine op needs it", fn,
                       p[i].name);
    if (!o->affine && p[i].ptr != NULL)
      return fbn_error(FBN_STATUS_INVALID_VALUE,
                       "%s: %s = %p: the op has affine = false (pass NULL)", fn, p[i].name,
                       p[i].ptr);
  }
  return FBN_STATUS_SUCCESS;
}

/* ---- forward / backward ------------------------------------------------- */

fbn_status fbn_op_forward_impl(const char *fn, const fbn_op *op, const fbn_tensor_desc *x_desc,
                               const void *x, const void *addend, void *y, const void *weight,
                               const void *bias, void *running_mean, void *running_var,
                               double factor, void *saved, size_t saved_bytes, void *workspace,
                               size_t workspace_bytes, const void *exec) {
  fbn_clear_error();
  if (op == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: op is NULL", fn);
  if (x_desc == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: x_desc is NULL", fn);
  if (x == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: x is NULL", fn);
  if (y == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: y is NULL", fn);
  const fbn_op_desc *o = &op->desc;
  fbn_status st = fbn_op_check_x_desc(fn, op, x_desc);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (fbn_operation_has_addend(o->operation) && addend == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: addend is NULL: operation %s needs one", fn,
                     fbn_operation_name(o->operation));
  if (!fbn_operation_has_addend(o->operation) && addend != NULL)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: addend = %p: operation %s takes no addend (pass NULL)", fn, addend,
                     fbn_operation_name(o->operation));
  st = fbn_check_affine(fn, o, weight, bias);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (o->statistics == FBN_STATISTICS_RUNNING) {
    if (running_mean == NULL)
      return fbn_error(FBN_STATUS_NULL_POINTER,
                       "%s: running_mean is NULL: running statistics normalize with it", fn);
    if (running_var == NULL)
      return fbn_error(FBN_STATUS_NULL_POINTER,
                       "%s: running_var is NULL: running statistics normalize with it", fn);
  } else if ((running_mean == NULL) != (running_var == NULL)) {
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: running_mean = %p, running_var = %p: give both (to update them) or "
                     "neither",
                     fn, running_mean, running_var);
  }
  const bool update = o->statistics == FBN_STATISTICS_BATCH && running_mean != NULL;
  if (update && !(factor >= 0.0 && factor <= 1.0))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: factor = %g: the running-average factor must be in [0, 1]", fn, factor);

  const size_t bytes = fbn_desc_bytes(x_desc);
  if (fbn_overlap(y, bytes, x, bytes))
    return fbn_error(FBN_STATUS_ALIASING, "%s: y overlaps x: in-place forward is not supported",
                     fn);
  if (fbn_overlap(y, bytes, addend, bytes))
    return fbn_error(FBN_STATUS_ALIASING,
                     "%s: y overlaps addend: in-place forward is not supported", fn);

  size_t need = 0;
  if (saved != NULL) {
    st = fbn_op_size(fn, op, x_desc, FBN_SIZE_SAVED, &need);
    if (st == FBN_STATUS_SUCCESS)
      st = fbn_check_memory(fn, "saved", saved, saved_bytes, need);
    if (st != FBN_STATUS_SUCCESS)
      return st;
  }
  st = fbn_op_min_workspace(fn, op, x_desc, false, &need);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_check_memory(fn, "workspace", workspace, workspace_bytes, need);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  {
    const size_t pbytes = (size_t)o->num_features * fbn_dtype_size(o->param_dtype);
    /* what forward writes first (the running statistics only when it
     * updates them), each against every other span */
    const fbn_span all[] = {{saved, saved != NULL ? saved_bytes : 0, "saved"},
                            {workspace, workspace_bytes, "workspace"},
                            {y, bytes, "y"},
                            {running_mean, pbytes, "running_mean"},
                            {running_var, pbytes, "running_var"},
                            {x, bytes, "x"},
                            {addend, bytes, "addend"},
                            {weight, pbytes, "weight"},
                            {bias, pbytes, "bias"}};
    st = fbn_check_spans(fn, all, sizeof all / sizeof all[0], 0, update ? 5 : 3);
    if (st != FBN_STATUS_SUCCESS)
      return st;
  }

  const fbn_bk_forward_args args = {
      .op = o,
      .state = op->state,
      .desc = x_desc,
      .x = x,
      .addend = addend,
      .y = y,
      .weight = weight,
      .bias = bias,
      .running_mean = running_mean,
      .running_var = running_var,
      .update_running = update,
      .factor = update ? factor : 0.0,
      .saved = saved,
      .saved_bytes = saved != NULL ? saved_bytes : 0,
      .workspace = workspace,
      .workspace_bytes = workspace != NULL ? workspace_bytes : 0,
      .exec = exec,
  };
  st = op->backend->forward(&args);
  return st == FBN_STATUS_SUCCESS ? st : fbn_error_prefix(st, fn);
}

fbn_status fbn_op_backward_impl(const char *fn, const fbn_op *op, const fbn_tensor_desc *x_desc,
                                const void *x, const void *y, const void *dy, const void *saved,
                                size_t saved_bytes, const void *weight, const void *bias,
                                void *dx, void *daddend, void *dweight, void *dbias,
                                fbn_param_grad param_grad, void *workspace,
                                size_t workspace_bytes, const void *exec) {
  fbn_clear_error();
  if (op == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: op is NULL", fn);
  if (x_desc == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: x_desc is NULL", fn);
  if (x == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: x is NULL", fn);
  const fbn_op_desc *o = &op->desc;
  if (y == NULL && fbn_operation_has_relu(o->operation))
    return fbn_error(FBN_STATUS_NULL_POINTER,
                     "%s: y is NULL: the backward of operation %s gates dy with y", fn,
                     fbn_operation_name(o->operation));
  if (dy == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: dy is NULL", fn);
  if (saved == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: saved is NULL", fn);
  fbn_status st = fbn_op_check_x_desc(fn, op, x_desc);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  st = fbn_check_affine(fn, o, weight, bias);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (daddend != NULL && !fbn_operation_has_addend(o->operation))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: daddend = %p: operation %s has no addend (pass NULL)", fn, daddend,
                     fbn_operation_name(o->operation));
  if (!o->affine && (dweight != NULL || dbias != NULL))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: %s = %p: the op has affine = false (pass NULL)", fn,
                     dweight != NULL ? "dweight" : "dbias", dweight != NULL ? dweight : dbias);
  if (param_grad != FBN_PARAM_GRAD_OVERWRITE && param_grad != FBN_PARAM_GRAD_ACCUMULATE)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: param_grad = %d: must be FBN_PARAM_GRAD_OVERWRITE or "
                     "FBN_PARAM_GRAD_ACCUMULATE",
                     fn, (int)param_grad);

  const size_t bytes = fbn_desc_bytes(x_desc);
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

  size_t need = 0;
  st = fbn_op_size(fn, op, x_desc, FBN_SIZE_SAVED, &need);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_check_memory(fn, "saved", saved, saved_bytes, need);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_op_min_workspace(fn, op, x_desc, true, &need);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_check_memory(fn, "workspace", workspace, workspace_bytes, need);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  {
    const size_t pbytes = (size_t)o->num_features * fbn_dtype_size(o->param_dtype);
    const fbn_span all[] = {{dx, bytes, "dx"},
                            {daddend, bytes, "daddend"},
                            {dweight, pbytes, "dweight"},
                            {dbias, pbytes, "dbias"},
                            {workspace, workspace_bytes, "workspace"},
                            {x, bytes, "x"},
                            {y, bytes, "y"},
                            {dy, bytes, "dy"},
                            {saved, saved_bytes, "saved"},
                            {weight, pbytes, "weight"},
                            {bias, pbytes, "bias"}};
    /* what backward writes against everything (dx/daddend against the
     * tensors were checked above) */
    st = fbn_check_spans(fn, all, sizeof all / sizeof all[0], 0, 5);
    if (st != FBN_STATUS_SUCCESS)
      return st;
  }

  const fbn_bk_backward_args args = {
      .op = o,
      .state = op->state,
      .desc = x_desc,
      .x = x,
      .y = y,
      .dy = dy,
      .saved = saved,
      .saved_bytes = saved_bytes,
      .weight = weight,
      .bias = bias,
      .dx = dx,
      .daddend = daddend,
      .dweight = dweight,
      .dbias = dbias,
      .accumulate = param_grad == FBN_PARAM_GRAD_ACCUMULATE,
      .workspace = workspace,
      .workspace_bytes = workspace != NULL ? workspace_bytes : 0,
      .exec = exec,
  };
  st = op->backend->backward(&args);
  return st == FBN_STATUS_SUCCESS ? st : fbn_error_prefix(st, fn);
}

fbn_status fbn_op_forward(const fbn_op *op, const fbn_tensor_desc *x_desc, const void *x,
                          const void *addend, void *y, const void *weight, const void *bias,
                          void *running_mean, void *running_var, double factor, void *saved,
                          size_t saved_bytes, void *workspace, size_t workspace_bytes) {
  return fbn_op_forward_impl("fbn_op_forward", op, x_desc, x, addend, y, weight, bias,
                             running_mean, running_var, factor, saved, saved_bytes, workspace,
                             workspace_bytes, NULL);
}

fbn_status fbn_op_backward(const fbn_op *op, const fbn_tensor_desc *x_desc, const void *x,
                           const void *y, const void *dy, const void *saved, size_t saved_bytes,
                           const void *weight, const void *bias, void *dx, void *daddend,
                           void *dweight, void *dbias, fbn_param_grad param_grad,
                           void *workspace, size_t workspace_bytes) {
  return fbn_op_backward_impl("fbn_op_backward", op, x_desc, x, y, dy, saved, saved_bytes, weight,
                              bias, dx, daddend, dweight, dbias, param_grad, workspace,
                              workspace_bytes, NULL);
}
