/*
 * Synchronized batch norm on CUDA ops, host part (cuda_sync.h): saved and
 * workspace layouts, this rank's check header, the message of a failed
 * status block.  No device code, no fbn_error: also built into the
 * host-only test library.
 */
#include <stdio.h>
#include <string.h>

#include "bn_math.h"
#include "cuda_sync.h"

#define ALIGN 256u

_Static_assert(sizeof(fbn_cs_status) <= FBN_CS_STATUS_BYTES, "the status block must fit its slot");
_Static_assert(sizeof(fbn_cs_header) <= FBN_CS_HEADER_BYTES, "the check header must fit its slot");

static size_t up(size_t v) { return (v + ALIGN - 1) / ALIGN * ALIGN; }

static size_t param_size(const fbn_tensor_desc *d) {
  return d->dtype == FBN_DTYPE_FLOAT64 ? sizeof(double) : sizeof(float);
}

/* fbn_dtype_name's words (core/desc.c is not in the host-only library;
 * the host test compares these messages with the CPU's). */
static const char *dtype_name(int32_t dtype) {
  switch (dtype) {
  case FBN_DTYPE_FLOAT32: return "float32";
  case FBN_DTYPE_FLOAT64: return "float64";
  case FBN_DTYPE_FLOAT16: return "float16";
  case FBN_DTYPE_BFLOAT16: return "bfloat16";
  default: return "unknown dtype";
  }
}

static int64_t values_per_channel(const fbn_tensor_desc *d) { return d->n * d->h * d->w; }

fbn_cuda_sync_saved_parts fbn_cuda_sync_saved_layout(const fbn_op_desc *op,
                                                    const fbn_tensor_desc *d) {
  fbn_cuda_sync_saved_parts p;
  const size_t stats = up((size_t)d->c * param_size(d));
  p.mean = FBN_CS_STATUS_BYTES;
  p.invstd = p.mean + stats;
  p.bytes = p.invstd + stats;
  p.mask = 0;
  if (fbn_operation_has_relu(op->operation)) {
    const size_t numel = (size_t)(values_per_channel(d) * d->c);
    p.mask = p.bytes;
    p.bytes += up((numel + 31) / 32 * sizeof(uint32_t));
  }
  return p;
}

/* The slices of the backend's gradient reduction (fbn_k_reduce_slices). */
static size_t grad_partials_bytes(const fbn_tensor_desc *d) {
  const int64_t m = values_per_channel(d);
  const int slices = d->layout == FBN_LAYOUT_NHWC
                         ? fbn_bn_reduce_slices_target(m, (d->c + 31) / 32, FBN_BN_NHWC_SLICE_ROWS)
                         : fbn_bn_reduce_slices(m, d->c);
  return (size_t)slices * (size_t)d->c * 2 * sizeof(double);
}

/* The slices of the statistics record's moments (fbn_ks_moment_slices):
 * those of the gradient reduction. */
static size_t moment_partials_bytes(const fbn_tensor_desc *d) { return grad_partials_bytes(d); }

fbn_cuda_sync_ws_parts fbn_cuda_sync_ws_layout(const fbn_tensor_desc *d, int world_size) {
  fbn_cuda_sync_ws_parts p;
  const size_t c = (size_t)d->c;
  const size_t gp = grad_partials_bytes(d), mp = moment_partials_bytes(d);
  p.record_bytes = FBN_CS_HEADER_BYTES + 2 * c * sizeof(double);
  p.record = FBN_CS_STATUS_BYTES;
  p.records = p.record + up(p.record_bytes);
  p.coef = p.records + up((size_t)world_size * p.record_bytes);
  p.partials = p.coef + up(4 * c * sizeof(double)); /* the kernels' float64 coefficients */
  p.grad = p.partials + up(gp > mp ? gp : mp);
  p.grad_local = p.grad + up((FBN_CS_GRAD_HEAD + 2 * c) * sizeof(double));
  p.bytes = p.grad_local + up((FBN_CS_GRAD_HEAD + 2 * c) * sizeof(double));
  return p;
}

fbn_cs_header fbn_cuda_sync_header(const fbn_op_desc *op, int64_t count) {
  fbn_cs_header h;
  memset(&h, 0, sizeof h);
  h.magic = FBN_CS_MAGIC;
  h.version = FBN_CS_VERSION;
  h.dtype = (int32_t)op->dtype;
  h.param_dtype = (int32_t)op->param_dtype;
  h.operation = (int32_t)op->operation;
  h.affine = op->affine ? 1 : 0;
  h.c = op->num_features;
  h.count = count;
  h.eps = op->eps;
  return h;
}

void fbn_cuda_sync_describe(const fbn_cs_status *s, char *text, size_t size) {
  switch (s->what) {
  case FBN_CS_BAD_RECORD:
    snprintf(text, size,
             "the record of rank %d (magic %#llx, version %u) is not a statistics record of "
             "fbn_sync_stats version %u",
             (int)s->rank, (unsigned long long)s->have_magic, (unsigned)s->value2,
             FBN_CS_VERSION);
    break;
  case FBN_CS_C:
    snprintf(text, size,
             "rank %d has C = %lld, this rank's op has num_features = %lld: every rank must "
             "have the same channels",
             (int)s->rank, (long long)s->have_c, (long long)s->want_c);
    break;
  case FBN_CS_DTYPE:
    snprintf(text, size,
             "rank %d has dtype %s, this rank's op %s: every rank must have the same dtype",
             (int)s->rank, dtype_name(s->have_dtype),
             dtype_name(s->want_dtype));
    break;
  case FBN_CS_OP:
    snprintf(text, size,
             "rank %d has param_dtype %s, operation %s, affine %d, eps %g; this rank's op %s, "
             "%s, %d, %g: every rank must run the same op",
             (int)s->rank, dtype_name(s->have_param_dtype),
             fbn_operation_name((fbn_operation)s->have_operation), (int)s->have_affine,
             s->have_eps, dtype_name(s->want_param_dtype),
             fbn_operation_name((fbn_operation)s->want_operation), (int)s->want_affine,
             s->want_eps);
    break;
  case FBN_CS_COUNT:
    snprintf(text, size,
             "the record of rank %d has count %.0f: counts must be >= 0 and their sum must fit "
             "int64",
             (int)s->rank, s->value);
    break;
  case FBN_CS_TOTAL:
    snprintf(text, size,
             "%.0f value(s) per channel over the %.0f ranks: batch statistics need more than 1",
             s->value, s->value2);
    break;
  case FBN_CS_GRAD_RECORD:
    snprintf(text, size,
             "the summed gradient record has %g ranks with %g channels in all: every rank must "
             "have C = %lld",
             s->value, s->value2, (long long)s->want_c);
    break;
  case FBN_CS_GRAD_COUNT:
    snprintf(text, size,
             "the summed gradient record has count %g: the total count must be an integer >= "
             "this shard's %g",
             s->value, s->value2);
    break;
  case FBN_CS_FORWARD: {
    fbn_cs_status f = *s;
    char inner[384];
    f.what = s->cause == FBN_CS_FORWARD ? FBN_CS_OK : s->cause;
    fbn_cuda_sync_describe(&f, inner, sizeof inner);
    snprintf(text, size, "the forward that filled saved failed its check: %s", inner);
    break;
  }
  case FBN_CS_NO_FORWARD:
    snprintf(text, size,
             "saved holds no status block of fbn_cuda_sync_forward (pass the saved state that "
             "forward filled)");
    break;
  default:
    snprintf(text, size, "status block of unknown kind %d (status %d)", (int)s->what,
             (int)s->code);
    break;
  }
}
