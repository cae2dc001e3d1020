/*
 * Synchronized batch norm on the device: the statistics record layout, the
 * check of the W gathered check headers and the merge of the records, as
 * functions shared by the kernels (nvcc, cuda_sync_kernels.cu) and the host
 * code and host-only tests (C11), so that the host tests run the very lines
 * the combine kernel runs.
 *
 * Record (the CPU one of src/sync/, byte for byte): a 64-byte check header
 * (fbn_cs_header), then C doubles of per-channel mean and C doubles of M2 =
 * sum (x - mean)^2.  Gradient record: (4 + 2 C) doubles: count, 1, C, 0,
 * sum dz[C], sum dz * xhat[C].
 *
 * Device status block (the first FBN_CS_STATUS_BYTES of a synchronized
 * call's saved state or workspace): fbn_cs_status, written by the combine
 * kernel (forward) or the gradient kernel (backward) in stream order, read
 * by the host only when the caller asks (fbn_cuda_sync_read_status()).
 */
#ifndef FUSEDBN_SRC_CUDA_CUDA_SYNC_MATH_H
#define FUSEDBN_SRC_CUDA_CUDA_SYNC_MATH_H

#include <stdint.h>

#include "bn_math.h"
#include "fusedbn/fusedbn.h"

#define FBN_CS_MAGIC 0x31434e5953626e66ull /* "fbnSYNC1", src/sync/sync_forward.c */
#define FBN_CS_VERSION 1u
#define FBN_CS_HEADER_BYTES 64
#define FBN_CS_GRAD_HEAD 4
/* The status block: 256 bytes so that what follows stays aligned. */
#define FBN_CS_STATUS_BYTES 256
/* fbn_cs_status.magic of a block a synchronized call wrote. */
#define FBN_CS_STATUS_MAGIC 0x54415453534362ull /* "bCSSTAT" */

typedef struct fbn_cs_header {
  uint64_t magic;
  uint32_t version;
  int32_t dtype, param_dtype, operation, affine, reserved;
  int64_t c;
  int64_t count; /* values per channel in this rank's shard */
  double eps;
} fbn_cs_header;

/* What a failed check found (fbn_cs_status.what). */
enum {
  FBN_CS_OK = 0,
  FBN_CS_BAD_RECORD = 1,   /* magic or version: not a record of fbn_sync_stats */
  FBN_CS_C = 2,            /* C differs from this rank's */
  FBN_CS_DTYPE = 3,        /* dtype differs */
  FBN_CS_OP = 4,           /* param_dtype, operation, affine or eps differ */
  FBN_CS_COUNT = 5,        /* a negative count or a sum past int64 */
  FBN_CS_TOTAL = 6,        /* fewer than 2 values per channel in all */
  FBN_CS_GRAD_RECORD = 7,  /* the summed gradient record's rank/C entries */
  FBN_CS_GRAD_COUNT = 8,   /* its count below this shard's or not an integer */
  FBN_CS_FORWARD = 9,      /* the backward of a forward that failed */
  FBN_CS_NO_FORWARD = 10,  /* the backward's saved state has no status block */
};

typedef struct fbn_cs_status {
  uint64_t magic; /* FBN_CS_STATUS_MAGIC */
  int32_t code;   /* an fbn_status: FBN_STATUS_SUCCESS = 0 */
  int32_t what;   /* FBN_CS_* */
  int32_t rank;   /* the rank whose record failed the check (-1: none) */
  int32_t cause;  /* FBN_CS_FORWARD: the forward's `what` */
  /* The rank's values and this rank's, for the message. */
  int64_t have_c, want_c;
  int32_t have_dtype, want_dtype;
  int32_t have_param_dtype, want_param_dtype;
  int32_t have_operation, want_operation;
  int32_t have_affine, want_affine;
  double have_eps, want_eps;
  uint64_t have_magic; /* the record's magic (FBN_CS_BAD_RECORD) */
  double value; /* the count / total / grad-record entry that failed */
  double value2;
  int64_t total; /* values per channel over the ranks (success) */
} fbn_cs_status;

/* Exact merge (Chan, Golub and LeVeque), the arithmetic of
 * src/core/bn_merge.h line for line: a part of count 0 changes nothing, a
 * part merged into an empty total is taken as it is. */
FBN_HD void fbn_cs_merge(double *n, double *mean, double *m2, double nb, double mean_b,
                         double m2_b) {
  if (nb == 0.0)
    return;
  if (*n == 0.0) {
    *n = nb;
    *mean = mean_b;
    *m2 = m2_b;
    return;
  }
  const double na = *n, total = na + nb, delta = mean_b - *mean;
  *mean += delta * (nb / total);
  *m2 += m2_b + delta * delta * (na * nb / total);
  *n = total;
}

FBN_HD void fbn_cs_status_clear(fbn_cs_status *s) {
  const char zero = 0;
  char *p = (char *)s;
  for (unsigned i = 0; i < sizeof *s; i++)
    p[i] = zero;
  s->magic = FBN_CS_STATUS_MAGIC;
  s->rank = -1;
}

/* The check headers of world_size records, stride bytes apart, against
 * this rank's header `self` (its count unused), in rank order, the first
 * failure reported (as src/sync/ does on the CPU).  On success s->total is
 * the summed count.  Returns s->code. */
FBN_HD int32_t fbn_cs_check_headers(const unsigned char *records, int world_size, uint64_t stride,
                                    const fbn_cs_header *self, fbn_cs_status *s) {
  fbn_cs_status_clear(s);
  s->want_c = self->c;
  s->want_dtype = self->dtype;
  s->want_param_dtype = self->param_dtype;
  s->want_operation = self->operation;
  s->want_affine = self->affine;
  s->want_eps = self->eps;
  int64_t sum = 0;
  for (int r = 0; r < world_size; r++) {
    const fbn_cs_header *h = (const fbn_cs_header *)(const void *)(records + (uint64_t)r * stride);
    int32_t what = FBN_CS_OK, code = 0;
    if (h->magic != FBN_CS_MAGIC || h->version != FBN_CS_VERSION) {
      what = FBN_CS_BAD_RECORD;
      code = FBN_STATUS_INVALID_STATE;
      s->have_magic = h->magic;
      s->value2 = (double)h->version;
    } else if (h->c != self->c) {
      what = FBN_CS_C;
      code = FBN_STATUS_SHAPE_MISMATCH;
    } else if (h->dtype != self->dtype) {
      what = FBN_CS_DTYPE;
      code = FBN_STATUS_SHAPE_MISMATCH;
    } else if (h->param_dtype != self->param_dtype || h->operation != self->operation ||
               h->affine != self->affine || !(h->eps == self->eps)) {
      what = FBN_CS_OP;
      code = FBN_STATUS_INVALID_VALUE;
    } else if (h->count < 0 || h->count > INT64_MAX - sum) {
      what = FBN_CS_COUNT;
      code = FBN_STATUS_INVALID_STATE;
      s->value = (double)h->count;
    }
    if (code != 0) {
      s->code = code;
      s->what = what;
      s->rank = r;
      s->have_c = h->c;
      s->have_dtype = h->dtype;
      s->have_param_dtype = h->param_dtype;
      s->have_operation = h->operation;
      s->have_affine = h->affine;
      s->have_eps = h->eps;
      return code;
    }
    sum += h->count;
  }
  if (sum < 2) {
    s->code = FBN_STATUS_INVALID_SHAPE;
    s->what = FBN_CS_TOTAL;
    s->value = (double)sum;
    s->value2 = (double)world_size;
    return s->code;
  }
  s->total = sum;
  return 0;
}

/* The summed gradient record's head (count, ranks, C entries) against this
 * shard (local values per channel, c channels).  Returns s->code. */
FBN_HD int32_t fbn_cs_check_grad_head(const double *rec, int64_t c, int64_t local,
                                      fbn_cs_status *s) {
  fbn_cs_status_clear(s);
  const double total = rec[0], ranks = rec[1], cs = rec[2];
  if (!(ranks >= 1.0) || !(cs == ranks * (double)c)) {
    s->code = FBN_STATUS_SHAPE_MISMATCH;
    s->what = FBN_CS_GRAD_RECORD;
    s->value = ranks;
    s->value2 = cs;
    s->want_c = c;
    return s->code;
  }
  if (!(total >= (double)local && total >= 1.0) || total != floor(total) ||
      total > 9007199254740992.0) {
    s->code = FBN_STATUS_INVALID_VALUE;
    s->what = FBN_CS_GRAD_COUNT;
    s->value = total;
    s->value2 = (double)local;
    return s->code;
  }
  s->total = (int64_t)total;
  return 0;
}

#endif /* FUSEDBN_SRC_CUDA_CUDA_SYNC_MATH_H */
