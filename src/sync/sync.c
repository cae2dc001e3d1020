/*
 * Synchronized batch norm, split phases (<fusedbn/fusedbn_sync.h>): the
 * statistics record, the combine step and the apply phases of forward and
 * backward. Every argument is checked here before a backend is called; the
 * backends compute through their own forward/backward (running-statistics
 * mode with float64 per-channel arrays: the combined statistics in place of
 * the running ones) and the two sync hooks of backend.h.
 */
#include <math.h>
#include <string.h>

#include "core/bn_formulas.h"
#include "core/bn_merge.h"
#include "sync/sync_internal.h"

#define FBN_SYNC_MAGIC 0x31434e5953626e66ull /* "fbnSYNC1" */

typedef struct fbn_sync_header {
  uint64_t magic;
  uint32_t version;
  int32_t dtype, param_dtype, operation, affine, reserved;
  int64_t c;
  int64_t count; /* values per channel in this rank's shard */
  double eps;
} fbn_sync_header;

_Static_assert(sizeof(fbn_sync_header) <= FBN_SYNC_HEADER_BYTES,
               "the check header must fit its slot");

/* ---- helpers ------------------------------------------------------------ */

static inline double load(const void *p, fbn_dtype dtype, int64_t i) {
  return dtype == FBN_DTYPE_FLOAT64 ? ((const double *)p)[i] : (double)((const float *)p)[i];
}

static inline void store(void *p, fbn_dtype dtype, int64_t i, double v) {
  if (dtype == FBN_DTYPE_FLOAT64)
    ((double *)p)[i] = v;
  else
    ((float *)p)[i] = (float)v;
}

/* The op the backend runs for the apply phases: running-statistics mode
 * (normalize with the given mean/variance), float64 per-channel arrays,
 * always with weight and bias (1 and 0 for an op without affine). */
static fbn_op_desc sync_apply_desc(const fbn_op *op) {
  fbn_op_desc d = op->desc;
  d.statistics = FBN_STATISTICS_RUNNING;
  d.param_dtype = FBN_DTYPE_FLOAT64;
  d.affine = true;
  return d;
}

static size_t sync_stats_bytes(const fbn_op *op) {
  return FBN_SYNC_HEADER_BYTES + 2 * (size_t)op->desc.num_features * sizeof(double);
}

static size_t sync_grad_count(const fbn_op *op) {
  return FBN_SYNC_GRAD_HEAD + 2 * (size_t)op->desc.num_features;
}

/* Bytes of the float64 weight, bias and variance at the start of the
 * workspace. */
static size_t sync_param_bytes(const fbn_op *op) {
  return fbn_sync_align(3 * (size_t)op->desc.num_features * sizeof(double));
}

static size_t sync_pbytes(const fbn_op *op) {
  return (size_t)op->desc.num_features * fbn_dtype_size(op->desc.param_dtype);
}

fbn_status fbn_sync_check_op(const char *fn, const fbn_op *op) {
  if (op == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: op is NULL", fn);
  if (op->desc.statistics != FBN_STATISTICS_BATCH)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: op statistics = FBN_STATISTICS_RUNNING: synchronized batch norm "
                     "normalizes with batch statistics (use fbn_op_forward in eval mode)",
                     fn);
  if (fbn_backend_sync_hooks(op->backend) == NULL)
    return fbn_error(FBN_STATUS_UNSUPPORTED,
                     "%s: the %s backend has no synchronized batch norm (CPU ops only)", fn,
                     op->backend->name);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_sync_check_x_desc(const char *fn, const fbn_op *op, const fbn_tensor_desc *x) {
  if (x == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: x_desc is NULL", fn);
  if (x->n < 0)
    return fbn_error(FBN_STATUS_INVALID_SHAPE,
                     "%s: N = %lld: a shard has N >= 0 (0: an empty shard)", fn, (long long)x->n);
  fbn_tensor_desc t = *x;
  if (t.n == 0)
    t.n = 1; /* the other dimensions are checked as for a shard of one */
  const fbn_op_desc *o = &op->desc;
  fbn_status st = fbn_check_desc_shape(fn, &t, o->num_features, "num_features");
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
  if (x->n > 0 && op->backend->check_shape != NULL) {
    const fbn_op_desc ad = sync_apply_desc(op);
    st = op->backend->check_shape(&ad, op->state, x);
    if (st != FBN_STATUS_SUCCESS)
      return fbn_error_prefix(st, fn);
  }
  return FBN_STATUS_SUCCESS;
}

static fbn_status sync_check_memory(const char *fn, const char *name, const void *ptr,
                                    size_t have, size_t need, size_t align) {
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
  if ((uintptr_t)ptr % align != 0)
    return fbn_error(FBN_STATUS_INSUFFICIENT_WORKSPACE, "%s: %s = %p: must be aligned to %zu bytes",
                     fn, name, ptr, align);
  return FBN_STATUS_SUCCESS;
}

static fbn_status sync_check_affine(const char *fn, const fbn_op *op, const void *weight,
                                    const void *bias) {
  const bool affine = op->desc.affine;
  if (affine && (weight == NULL || bias == NULL))
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: %s is NULL: an affine op needs it", fn,
                     weight == NULL ? "weight" : "bias");
  if (!affine && (weight != NULL || bias != NULL))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: %s = %p: the op has affine = false (pass NULL)", fn,
                     weight != NULL ? "weight" : "bias", weight != NULL ? weight : bias);
  return FBN_STATUS_SUCCESS;
}

/* A tensor pointer of a shard: required unless the shard is empty. */
static fbn_status sync_check_tensor(const char *fn, const char *name, const void *p,
                                    const fbn_tensor_desc *x) {
  if (p == NULL && x->n > 0)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: %s is NULL (N = %lld)", fn, name,
                     (long long)x->n);
  return FBN_STATUS_SUCCESS;
}

/* Float64 weight and bias for the backend at the start of the workspace. */
static void sync_params64(const fbn_op *op, const void *weight, const void *bias, double *w64,
                          double *b64) {
  const int64_t c_ = op->desc.num_features;
  for (int64_t c = 0; c < c_; c++) {
    w64[c] = op->desc.affine ? load(weight, op->desc.param_dtype, c) : 1.0;
    b64[c] = op->desc.affine ? load(bias, op->desc.param_dtype, c) : 0.0;
  }
}

/* ---- sizes -------------------------------------------------------------- */

fbn_status fbn_sync_stats_record_size(const fbn_op *op, size_t *bytes) {
  static const char fn[] = "fbn_sync_stats_record_size";
  fbn_clear_error();
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (bytes == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: bytes is NULL", fn);
  *bytes = sync_stats_bytes(op);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_sync_grad_record_size(const fbn_op *op, size_t *bytes) {
  static const char fn[] = "fbn_sync_grad_record_size";
  fbn_clear_error();
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (bytes == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: bytes is NULL", fn);
  *bytes = sync_grad_count(op) * sizeof(double);
  return FBN_STATUS_SUCCESS;
}

/* Backend saved bytes / workspace bytes for a checked shard. */
static fbn_status sync_sizes(const char *fn, const fbn_op *op, const fbn_tensor_desc *x,
                             size_t *saved, size_t *workspace) {
  const fbn_op_desc ad = sync_apply_desc(op);
  size_t s = FBN_OP_MEMORY_ALIGNMENT, wf = 0, wb = 0;
  fbn_status st = FBN_STATUS_SUCCESS;
  if (x->n > 0) {
    st = op->backend->saved_size(&ad, op->state, x, &s);
    if (st == FBN_STATUS_SUCCESS)
      st = op->backend->workspace_size(&ad, op->state, x, false, &wf);
    if (st == FBN_STATUS_SUCCESS)
      st = op->backend->workspace_size(&ad, op->state, x, true, &wb);
    if (st != FBN_STATUS_SUCCESS)
      return fbn_error_prefix(st, fn);
  }
  if (saved != NULL)
    *saved = s;
  if (workspace != NULL)
    *workspace = sync_param_bytes(op) + fbn_sync_align(wf > wb ? wf : wb);
  return st;
}

static fbn_status sync_size_query(const char *fn, const fbn_op *op, const fbn_tensor_desc *x,
                                  bool saved, size_t *bytes) {
  fbn_clear_error();
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_x_desc(fn, op, x);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (bytes == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: bytes is NULL", fn);
  size_t s = 0, w = 0;
  st = sync_sizes(fn, op, x, &s, &w);
  if (st == FBN_STATUS_SUCCESS)
    *bytes = saved ? s : w;
  return st;
}

fbn_status fbn_sync_saved_size(const fbn_op *op, const fbn_tensor_desc *x_desc, size_t *bytes) {
  return sync_size_query("fbn_sync_saved_size", op, x_desc, true, bytes);
}

fbn_status fbn_sync_workspace_size(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                   size_t *bytes) {
  return sync_size_query("fbn_sync_workspace_size", op, x_desc, false, bytes);
}

/* ---- statistics record -------------------------------------------------- */

fbn_status fbn_sync_stats(const fbn_op *op, const fbn_tensor_desc *x_desc, const void *x,
                          void *record, size_t record_bytes) {
  static const char fn[] = "fbn_sync_stats";
  fbn_clear_error();
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_x_desc(fn, op, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_tensor(fn, "x", x, x_desc);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (record == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: record is NULL", fn);
  st = sync_check_memory(fn, "record", record, record_bytes, sync_stats_bytes(op),
                         sizeof(double));
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (x != NULL && fbn_overlap(record, sync_stats_bytes(op), x, x_desc->n > 0 ? fbn_desc_bytes(x_desc) : 0))
    return fbn_error(FBN_STATUS_ALIASING, "%s: record overlaps x", fn);

  const int64_t c_ = op->desc.num_features;
  double *mean = (double *)(void *)((char *)record + FBN_SYNC_HEADER_BYTES);
  double *m2 = mean + c_;
  if (x_desc->n > 0) {
    st = fbn_backend_sync_hooks(op->backend)->stats(&op->desc, op->state, x_desc, x, mean, m2);
    if (st != FBN_STATUS_SUCCESS)
      return fbn_error_prefix(st, fn);
  } else {
    memset(mean, 0, 2 * (size_t)c_ * sizeof(double));
  }
  fbn_sync_header h;
  memset(&h, 0, sizeof h);
  h.magic = FBN_SYNC_MAGIC;
  h.version = FBN_SYNC_RECORD_VERSION;
  h.dtype = (int32_t)op->desc.dtype;
  h.param_dtype = (int32_t)op->desc.param_dtype;
  h.operation = (int32_t)op->desc.operation;
  h.affine = op->desc.affine ? 1 : 0;
  h.c = c_;
  h.count = x_desc->n * x_desc->h * x_desc->w;
  h.eps = op->desc.eps;
  memset(record, 0, FBN_SYNC_HEADER_BYTES);
  memcpy(record, &h, sizeof h);
  return FBN_STATUS_SUCCESS;
}

/* ---- combine ------------------------------------------------------------ */

fbn_status fbn_sync_check_headers(const char *fn, const fbn_op *op, const void *records,
                                  int world_size, size_t stride, int64_t *total) {
  const fbn_op_desc *o = &op->desc;
  int64_t sum = 0;
  for (int r = 0; r < world_size; r++) {
    fbn_sync_header h;
    memcpy(&h, (const char *)records + (size_t)r * stride, sizeof h);
    if (h.magic != FBN_SYNC_MAGIC || h.version != FBN_SYNC_RECORD_VERSION)
      return fbn_error(FBN_STATUS_INVALID_STATE,
                       "%s: the record of rank %d (magic %#llx, version %u) is not a statistics "
                       "record of fbn_sync_stats version %d",
                       fn, r, (unsigned long long)h.magic, (unsigned)h.version,
                       FBN_SYNC_RECORD_VERSION);
    if (h.c != o->num_features)
      return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                       "%s: rank %d has C = %lld, this rank's op has num_features = %lld: every "
                       "rank must have the same channels",
                       fn, r, (long long)h.c, (long long)o->num_features);
    if (h.dtype != (int32_t)o->dtype)
      return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                       "%s: rank %d has dtype %s, this rank's op %s: every rank must have the "
                       "same dtype",
                       fn, r, fbn_dtype_name((fbn_dtype)h.dtype), fbn_dtype_name(o->dtype));
    if (h.param_dtype != (int32_t)o->param_dtype || h.operation != (int32_t)o->operation ||
        h.affine != (o->affine ? 1 : 0) || memcmp(&h.eps, &o->eps, sizeof h.eps) != 0)
      return fbn_error(FBN_STATUS_INVALID_VALUE,
                       "%s: rank %d has param_dtype %s, operation %s, affine %d, eps %g; this "
                       "rank's op %s, %s, %d, %g: every rank must run the same op",
                       fn, r, fbn_dtype_name((fbn_dtype)h.param_dtype),
                       fbn_operation_name((fbn_operation)h.operation), (int)h.affine, h.eps,
                       fbn_dtype_name(o->param_dtype), fbn_operation_name(o->operation),
                       o->affine ? 1 : 0, o->eps);
    if (h.count < 0 || __builtin_add_overflow(sum, h.count, &sum))
      return fbn_error(FBN_STATUS_INVALID_STATE,
                       "%s: the record of rank %d has count %lld: counts must be >= 0 and their "
                       "sum must fit int64",
                       fn, r, (long long)h.count);
  }
  if (sum < 2)
    return fbn_error(FBN_STATUS_INVALID_SHAPE,
                     "%s: %lld value(s) per channel over the %d ranks: batch statistics need "
                     "more than 1",
                     fn, (long long)sum, world_size);
  *total = sum;
  return FBN_STATUS_SUCCESS;
}

void fbn_sync_combine_run(const fbn_op *op, const void *records, int world_size, size_t stride,
                          int64_t total, double *mean_out, double *var_out, void *running_mean,
                          void *running_var, double factor) {
  const int64_t c_ = op->desc.num_features;
  const fbn_dtype pt = op->desc.param_dtype;
  for (int64_t c = 0; c < c_; c++) {
    double n = 0.0, mean = 0.0, m2 = 0.0;
    for (int r = 0; r < world_size; r++) {
      const char *rec = (const char *)records + (size_t)r * stride;
      fbn_sync_header h;
      memcpy(&h, rec, sizeof h);
      double mb, m2b;
      memcpy(&mb, rec + FBN_SYNC_HEADER_BYTES + (size_t)c * sizeof(double), sizeof mb);
      memcpy(&m2b, rec + FBN_SYNC_HEADER_BYTES + (size_t)(c_ + c) * sizeof(double), sizeof m2b);
      fbn_bn_merge(&n, &mean, &m2, (double)h.count, mb, m2b);
    }
    mean_out[c] = mean;
    var_out[c] = m2 / (double)total; /* biased: normalizes */
    if (running_mean != NULL) {
      const double unbiased = m2 / (double)(total - 1);
      store(running_mean, pt, c,
            fbn_bn_running_update(load(running_mean, pt, c), factor, mean));
      store(running_var, pt, c, fbn_bn_running_update(load(running_var, pt, c), factor, unbiased));
    }
  }
}

fbn_status fbn_sync_combine(const fbn_op *op, const void *records, int world_size,
                            size_t record_bytes, double *mean, double *var, void *running_mean,
                            void *running_var, double factor, int64_t *total_count) {
  static const char fn[] = "fbn_sync_combine";
  fbn_clear_error();
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (records == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: records is NULL", fn);
  if (mean == NULL || var == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: %s is NULL", fn, mean == NULL ? "mean" : "var");
  if (world_size < 1)
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: world_size = %d: must be >= 1", fn,
                     world_size);
  if (record_bytes < sync_stats_bytes(op) || record_bytes % sizeof(double) != 0)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: record_bytes = %zu: must be a multiple of 8 and at least %zu "
                     "(fbn_sync_stats_record_size)",
                     fn, record_bytes, sync_stats_bytes(op));
  if ((running_mean == NULL) != (running_var == NULL))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: running_mean = %p, running_var = %p: give both (to update them) or "
                     "neither",
                     fn, running_mean, running_var);
  if (running_mean != NULL && !(factor >= 0.0 && factor <= 1.0))
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: factor = %g: the running-average factor must be in [0, 1]", fn, factor);
  const size_t cbytes = (size_t)op->desc.num_features * sizeof(double);
  const size_t all = (size_t)world_size * record_bytes;
  const fbn_span_check spans[] = {{mean, cbytes, "mean"},
                                  {var, cbytes, "var"},
                                  {running_mean, sync_pbytes(op), "running_mean"},
                                  {running_var, sync_pbytes(op), "running_var"},
                                  {records, all, "records"}};
  for (size_t i = 0; i < 4; i++)
    for (size_t j = 0; j < 5; j++)
      if (i != j && fbn_overlap(spans[i].ptr, spans[i].bytes, spans[j].ptr, spans[j].bytes))
        return fbn_error(FBN_STATUS_ALIASING, "%s: %s overlaps %s", fn, spans[i].name,
                         spans[j].name);
  int64_t total = 0;
  st = fbn_sync_check_headers(fn, op, records, world_size, record_bytes, &total);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  fbn_sync_combine_run(op, records, world_size, record_bytes, total, mean, var, running_mean,
                       running_var, factor);
  if (total_count != NULL)
    *total_count = total;
  return FBN_STATUS_SUCCESS;
}

/* ---- forward apply ------------------------------------------------------ */

fbn_status fbn_sync_apply_checks(const char *fn, const fbn_op *op, const fbn_tensor_desc *x_desc,
                                 const void *x, const void *addend, const void *y,
                                 const void *weight, const void *bias, const void *saved,
                                 size_t saved_bytes, const void *workspace,
                                 size_t workspace_bytes) {
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_x_desc(fn, op, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_tensor(fn, "x", x, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_tensor(fn, "y", y, x_desc);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const fbn_op_desc *o = &op->desc;
  if (fbn_operation_has_addend(o->operation))
    st = sync_check_tensor(fn, "addend", addend, x_desc);
  else if (addend != NULL)
    st = fbn_error(FBN_STATUS_INVALID_VALUE,
                   "%s: addend = %p: operation %s takes no addend (pass NULL)", fn, addend,
                   fbn_operation_name(o->operation));
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_affine(fn, op, weight, bias);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  size_t need_saved = 0, need_ws = 0;
  st = sync_sizes(fn, op, x_desc, &need_saved, &need_ws);
  if (st == FBN_STATUS_SUCCESS && saved != NULL)
    st = sync_check_memory(fn, "saved", saved, saved_bytes, need_saved, FBN_OP_MEMORY_ALIGNMENT);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_memory(fn, "workspace", workspace, workspace_bytes, need_ws,
                           FBN_OP_MEMORY_ALIGNMENT);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const size_t bytes = x_desc->n > 0 ? fbn_desc_bytes(x_desc) : 0;
  const size_t pbytes = sync_pbytes(op);
  const fbn_span_check spans[] = {{y, bytes, "y"},
                                  {saved, saved_bytes, "saved"},
                                  {workspace, workspace_bytes, "workspace"},
                                  {x, bytes, "x"},
                                  {addend, bytes, "addend"},
                                  {weight, pbytes, "weight"},
                                  {bias, pbytes, "bias"}};
  for (size_t i = 0; i < 3; i++)
    for (size_t j = 0; j < sizeof spans / sizeof spans[0]; j++)
      if (i != j && fbn_overlap(spans[i].ptr, spans[i].bytes, spans[j].ptr, spans[j].bytes))
        return fbn_error(FBN_STATUS_ALIASING, "%s: %s overlaps %s", fn, spans[i].name,
                         spans[j].name);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_sync_apply_run(const char *fn, const fbn_op *op, const fbn_tensor_desc *x_desc,
                              const void *x, const void *addend, void *y, const void *weight,
                              const void *bias, const double *mean, const double *var,
                              void *saved, size_t saved_bytes, void *workspace,
                              size_t workspace_bytes) {
  if (x_desc->n == 0)
    return FBN_STATUS_SUCCESS;
  const fbn_op_desc ad = sync_apply_desc(op);
  const int64_t c_ = op->desc.num_features;
  double *w64 = workspace, *b64 = w64 + c_, *v64 = b64 + c_;
  sync_params64(op, weight, bias, w64, b64);
  /* the running path's invstd is 1/sqrt(var + eps); batch statistics give
   * a constant channel with eps = 0 invstd 0 (PyTorch's rule), which
   * 1/sqrt(+inf) is */
  for (int64_t c = 0; c < c_; c++)
    v64[c] = var[c] == 0.0 && op->desc.eps == 0.0 ? INFINITY : var[c];
  const size_t off = sync_param_bytes(op);
  const size_t rest = workspace_bytes - off;
  const fbn_bk_forward_args args = {
      .op = &ad,
      .state = op->state,
      .desc = x_desc,
      .x = x,
      .addend = addend,
      .y = y,
      .weight = w64,
      .bias = b64,
      /* only read in running-statistics mode */
      .running_mean = (void *)(uintptr_t)mean,
      .running_var = v64,
      .update_running = false,
      .factor = 0.0,
      .saved = saved,
      .saved_bytes = saved != NULL ? saved_bytes : 0,
      .workspace = rest > 0 ? (char *)workspace + off : NULL,
      .workspace_bytes = rest,
      .exec = NULL,
  };
  fbn_status st = op->backend->forward(&args);
  return st == FBN_STATUS_SUCCESS ? st : fbn_error_prefix(st, fn);
}

fbn_status fbn_sync_apply(const fbn_op *op, const fbn_tensor_desc *x_desc, const void *x,
                          const void *addend, void *y, const void *weight, const void *bias,
                          const double *mean, const double *var, void *saved, size_t saved_bytes,
                          void *workspace, size_t workspace_bytes) {
  static const char fn[] = "fbn_sync_apply";
  fbn_clear_error();
  fbn_status st = fbn_sync_apply_checks(fn, op, x_desc, x, addend, y, weight, bias, saved,
                                        saved_bytes, workspace, workspace_bytes);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  if (mean == NULL || var == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: %s is NULL", fn, mean == NULL ? "mean" : "var");
  return fbn_sync_apply_run(fn, op, x_desc, x, addend, y, weight, bias, mean, var, saved,
                            saved_bytes, workspace, workspace_bytes);
}

/* ---- backward ----------------------------------------------------------- */

fbn_status fbn_sync_backward_checks(const char *fn, const fbn_op *op,
                                    const fbn_tensor_desc *x_desc, const void *x, const void *y,
                                    const void *dy, const void *saved, size_t saved_bytes,
                                    const void *weight, const void *bias, void *dx,
                                    void *daddend, void *dweight, void *dbias,
                                    fbn_param_grad param_grad, const void *workspace,
                                    size_t workspace_bytes) {
  fbn_status st = fbn_sync_check_op(fn, op);
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_sync_check_x_desc(fn, op, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_tensor(fn, "x", x, x_desc);
  if (st == FBN_STATUS_SUCCESS && fbn_operation_has_relu(op->desc.operation))
    st = sync_check_tensor(fn, "y", y, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_tensor(fn, "dy", dy, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_tensor(fn, "saved", saved, x_desc);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_affine(fn, op, weight, bias);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const fbn_op_desc *o = &op->desc;
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
  size_t need_saved = 0, need_ws = 0;
  st = sync_sizes(fn, op, x_desc, &need_saved, &need_ws);
  if (st == FBN_STATUS_SUCCESS && x_desc->n > 0)
    st = sync_check_memory(fn, "saved", saved, saved_bytes, need_saved, FBN_OP_MEMORY_ALIGNMENT);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_memory(fn, "workspace", workspace, workspace_bytes, need_ws,
                           FBN_OP_MEMORY_ALIGNMENT);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const size_t bytes = x_desc->n > 0 ? fbn_desc_bytes(x_desc) : 0;
  const size_t pbytes = sync_pbytes(op);
  const fbn_span_check spans[] = {{dx, bytes, "dx"},
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
  for (size_t i = 0; i < 5; i++)
    for (size_t j = 0; j < sizeof spans / sizeof spans[0]; j++)
      if (i != j && fbn_overlap(spans[i].ptr, spans[i].bytes, spans[j].ptr, spans[j].bytes))
        return fbn_error(FBN_STATUS_ALIASING, "%s: %s overlaps %s", fn, spans[i].name,
                         spans[j].name);
  return FBN_STATUS_SUCCESS;
}

void fbn_sync_store_param_grads(const fbn_op *op, const double *rec, void *dweight, void *dbias,
                                bool accumulate) {
  const int64_t c_ = op->desc.num_features;
  const fbn_dtype pt = op->desc.param_dtype;
  const double *sum_g = rec + FBN_SYNC_GRAD_HEAD, *sum_gxhat = sum_g + c_;
  for (int64_t c = 0; c < c_; c++) {
    if (dweight != NULL)
      store(dweight, pt, c, accumulate ? load(dweight, pt, c) + sum_gxhat[c] : sum_gxhat[c]);
    if (dbias != NULL)
      store(dbias, pt, c, accumulate ? load(dbias, pt, c) + sum_g[c] : sum_g[c]);
  }
}

static fbn_status sync_check_grad_record(const char *fn, const fbn_op *op, const void *rec,
                                         size_t rec_bytes) {
  if (rec == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: grad_record is NULL", fn);
  return sync_check_memory(fn, "grad_record", rec, rec_bytes, sync_grad_count(op) * sizeof(double),
                           sizeof(double));
}

fbn_status fbn_sync_backward_reduce(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                    const void *x, const void *y, const void *dy,
                                    const void *saved, size_t saved_bytes, const void *weight,
                                    const void *bias, double *grad_record,
                                    size_t grad_record_bytes, void *dweight, void *dbias,
                                    fbn_param_grad param_grad, void *workspace,
                                    size_t workspace_bytes) {
  static const char fn[] = "fbn_sync_backward_reduce";
  fbn_clear_error();
  fbn_status st = fbn_sync_backward_checks(fn, op, x_desc, x, y, dy, saved, saved_bytes, weight,
                                           bias, NULL, NULL, dweight, dbias, param_grad,
                                           workspace, workspace_bytes);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_grad_record(fn, op, grad_record, grad_record_bytes);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const int64_t c_ = op->desc.num_features;
  const size_t rec_bytes = sync_grad_count(op) * sizeof(double);
  const size_t pbytes = sync_pbytes(op);
  const size_t bytes = x_desc->n > 0 ? fbn_desc_bytes(x_desc) : 0;
  const fbn_span_check others[] = {{x, bytes, "x"},           {y, bytes, "y"},
                                   {dy, bytes, "dy"},         {saved, saved_bytes, "saved"},
                                   {dweight, pbytes, "dweight"}, {dbias, pbytes, "dbias"},
                                   {workspace, workspace_bytes, "workspace"}};
  for (size_t j = 0; j < sizeof others / sizeof others[0]; j++)
    if (fbn_overlap(grad_record, rec_bytes, others[j].ptr, others[j].bytes))
      return fbn_error(FBN_STATUS_ALIASING, "%s: grad_record overlaps %s", fn, others[j].name);

  double *sum_g = grad_record + FBN_SYNC_GRAD_HEAD, *sum_gxhat = sum_g + c_;
  if (x_desc->n > 0) {
    const fbn_op_desc ad = sync_apply_desc(op);
    double *w64 = workspace, *b64 = w64 + c_;
    sync_params64(op, weight, bias, w64, b64);
    const size_t off = sync_param_bytes(op), rest = workspace_bytes - off;
    const fbn_bk_backward_args args = {
        .op = &ad,
        .state = op->state,
        .desc = x_desc,
        .x = x,
        .y = y,
        .dy = dy,
        .saved = saved,
        .saved_bytes = saved_bytes,
        .weight = w64,
        .bias = b64,
        .dx = NULL,
        .daddend = NULL,
        /* running-statistics backward: dweight = sum g * xhat, dbias = sum g */
        .dweight = sum_gxhat,
        .dbias = sum_g,
        .accumulate = false,
        .workspace = rest > 0 ? (char *)workspace + off : NULL,
        .workspace_bytes = rest,
        .exec = NULL,
    };
    st = op->backend->backward(&args);
    if (st != FBN_STATUS_SUCCESS)
      return fbn_error_prefix(st, fn);
  } else {
    memset(sum_g, 0, 2 * (size_t)c_ * sizeof(double));
  }
  grad_record[0] = (double)(x_desc->n * x_desc->h * x_desc->w);
  grad_record[1] = 1.0;
  grad_record[2] = (double)c_;
  grad_record[3] = 0.0;
  fbn_sync_store_param_grads(op, grad_record, dweight, dbias,
                             param_grad == FBN_PARAM_GRAD_ACCUMULATE);
  return FBN_STATUS_SUCCESS;
}

fbn_status fbn_sync_backward_apply(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                   const void *x, const void *y, const void *dy,
                                   const void *saved, size_t saved_bytes, const void *weight,
                                   const void *bias, const double *grad_record,
                                   size_t grad_record_bytes, void *dx, void *daddend,
                                   void *dweight, void *dbias, fbn_param_grad param_grad,
                                   void *workspace, size_t workspace_bytes) {
  static const char fn[] = "fbn_sync_backward_apply";
  fbn_clear_error();
  fbn_status st = fbn_sync_backward_checks(fn, op, x_desc, x, y, dy, saved, saved_bytes, weight,
                                           bias, dx, daddend, dweight, dbias, param_grad,
                                           workspace, workspace_bytes);
  if (st == FBN_STATUS_SUCCESS)
    st = sync_check_grad_record(fn, op, grad_record, grad_record_bytes);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const int64_t c_ = op->desc.num_features;
  const size_t rec_bytes = sync_grad_count(op) * sizeof(double);
  const size_t bytes = x_desc->n > 0 ? fbn_desc_bytes(x_desc) : 0;
  const size_t pbytes = sync_pbytes(op);
  const fbn_span_check outs[] = {{dx, bytes, "dx"},
                                 {daddend, bytes, "daddend"},
                                 {dweight, pbytes, "dweight"},
                                 {dbias, pbytes, "dbias"}};
  for (size_t j = 0; j < sizeof outs / sizeof outs[0]; j++)
    if (fbn_overlap(grad_record, rec_bytes, outs[j].ptr, outs[j].bytes))
      return fbn_error(FBN_STATUS_ALIASING, "%s: %s overlaps grad_record", fn, outs[j].name);
  const double total = grad_record[0], ranks = grad_record[1], cs = grad_record[2];
  const double local = (double)(x_desc->n * x_desc->h * x_desc->w);
  if (!(ranks >= 1.0) || cs != ranks * (double)c_)
    return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                     "%s: grad_record has %g ranks with %g channels in all: every rank must "
                     "have C = %lld (all-reduce SUM the records of fbn_sync_backward_reduce)",
                     fn, ranks, cs, (long long)c_);
  if (!(total >= local && total >= 1.0) || total != floor(total) || total > 9007199254740992.0)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: grad_record count = %g: the total count must be an integer >= this "
                     "shard's %g",
                     fn, total, local);

  const double *sum_g = grad_record + FBN_SYNC_GRAD_HEAD, *sum_gxhat = sum_g + c_;
  if (x_desc->n > 0 && (dx != NULL || daddend != NULL)) {
    const fbn_op_desc ad = sync_apply_desc(op);
    double *w64 = workspace, *b64 = w64 + c_;
    sync_params64(op, weight, bias, w64, b64);
    const fbn_bk_backward_args args = {
        .op = &ad,
        .state = op->state,
        .desc = x_desc,
        .x = x,
        .y = y,
        .dy = dy,
        .saved = saved,
        .saved_bytes = saved_bytes,
        .weight = w64,
        .bias = b64,
        .dx = dx,
        .daddend = daddend,
        .exec = NULL,
    };
    st = fbn_backend_sync_hooks(op->backend)->backward_apply(&args, sum_g, sum_gxhat, (int64_t)total);
    if (st != FBN_STATUS_SUCCESS)
      return fbn_error_prefix(st, fn);
  }
  fbn_sync_store_param_grads(op, grad_record, dweight, dbias,
                             param_grad == FBN_PARAM_GRAD_ACCUMULATE);
  return FBN_STATUS_SUCCESS;
}
