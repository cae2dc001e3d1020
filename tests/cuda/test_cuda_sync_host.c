/*
 * Host-only tests of synchronized batch norm on CUDA ops (suite
 * 'cuda-host'): what runs without a GPU.
 *
 *   header     the check header the device record gets (a kernel argument
 *              made by fbn_cuda_sync_header) is the CPU record's, byte for
 *              byte, for both dtypes, every operation, affine or not
 *   check      the combine kernel's check (fbn_cs_check_headers, the very
 *              function the kernel runs) on CPU records of ranks that agree
 *              or disagree (C, dtype, eps, operation, affine, a corrupted
 *              magic, empty shards on every rank) gives fbn_sync_combine()'s status
 *              and message; its merge (fbn_cs_merge in rank order) gives
 *              fbn_sync_combine()'s mean and variance bit for bit
 *   merge      fbn_cs_merge against core/bn_merge.h on random parts
 *   grad head  the backward's check of the summed gradient record
 *   layout     saved state and workspace parts aligned, in order, large
 *              enough, the mask only for the ReLU operations
 *   entry      fbn_cuda_sync_* with a NULL op (FBN_STATUS_NULL_POINTER) or
 *              a CPU op (FBN_STATUS_INVALID_VALUE naming the rule), outputs
 *              untouched
 *
 * The device phases themselves are in test_gpu_sync.c (suite 'gpu').
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/bn_merge.h"
#include "cuda_sync.h"
#include "fbn_testutil.h"
#include "fusedbn/fusedbn_cuda_sync.h"

#define MAXR 4

static fbn_op *cpu_op(int64_t c, fbn_dtype dtype, fbn_operation operation, bool affine,
                      double eps) {
  fbn_op_desc od;
  fbn_op_desc_init(&od);
  od.num_features = c;
  od.dtype = dtype;
  od.param_dtype = dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  od.operation = operation;
  od.affine = affine;
  od.eps = eps;
  fbn_op *op = NULL;
  assert_int_equal(fbn_op_create(&od, &op), FBN_STATUS_SUCCESS);
  return op;
}

/* A record of fbn_sync_stats() on fresh random x of shape (n, C, 2, 3),
 * values around a large mean; record_stride bytes (zeroed past it). */
static void cpu_record(const fbn_op *op, int64_t n, fbnt_rng *rng, void *record,
                       size_t record_stride) {
  fbn_op_desc od;
  assert_int_equal(fbn_op_get_desc(op, &od), FBN_STATUS_SUCCESS);
  fbn_tensor_desc d = {.n = n, .c = od.num_features, .h = 2, .w = 3, .dtype = od.dtype,
                       .layout = od.layout};
  const size_t numel = (size_t)(n * od.num_features * 6);
  const size_t es = od.dtype == FBN_DTYPE_FLOAT64 ? 8 : 4;
  void *x = numel > 0 ? malloc(numel * es) : NULL;
  for (size_t i = 0; i < numel; i++) {
    const double v = 100.0 + fbnt_rng_normal(rng);
    if (es == 8)
      ((double *)x)[i] = v;
    else
      ((float *)x)[i] = (float)v;
  }
  memset(record, 0, record_stride);
  size_t rb = 0;
  assert_int_equal(fbn_sync_stats_record_size(op, &rb), FBN_STATUS_SUCCESS);
  assert_true(rb <= record_stride);
  assert_int_equal(fbn_sync_stats(op, &d, x, record, rb), FBN_STATUS_SUCCESS);
  free(x);
}

static void test_header_matches_cpu(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, "cuda-sync-header");
  const fbn_dtype dtypes[] = {FBN_DTYPE_FLOAT32, FBN_DTYPE_FLOAT64};
  const fbn_operation ops[] = {FBN_OPERATION_BN, FBN_OPERATION_BN_RELU, FBN_OPERATION_BN_ADD_RELU};
  for (int a = 0; a < 2; a++)
    for (int b = 0; b < 3; b++)
      for (int f = 0; f < 2; f++) {
        fbn_op *op = cpu_op(5, dtypes[a], ops[b], f == 1, f == 1 ? 1e-5 : 0.0);
        fbn_op_desc od;
        assert_int_equal(fbn_op_get_desc(op, &od), FBN_STATUS_SUCCESS);
        unsigned char rec[64 + 16 * 5];
        cpu_record(op, 3, &rng, rec, sizeof rec);
        const fbn_cs_header h = fbn_cuda_sync_header(&od, 3 * 6);
        unsigned char hb[FBN_CS_HEADER_BYTES];
        memset(hb, 0, sizeof hb);
        memcpy(hb, &h, sizeof h);
        assert_memory_equal(rec, hb, FBN_CS_HEADER_BYTES);
        fbn_tensor_desc d = {.n = 3, .c = 5, .h = 2, .w = 3, .dtype = od.dtype,
                             .layout = od.layout};
        size_t rb = 0;
        assert_int_equal(fbn_sync_stats_record_size(op, &rb), FBN_STATUS_SUCCESS);
        assert_int_equal(fbn_cuda_sync_ws_layout(&d, 2).record_bytes, rb);
        fbn_op_destroy(op);
      }
}

typedef enum {
  AGREE,
  OTHER_C,
  OTHER_DTYPE,
  OTHER_EPS,
  OTHER_OPERATION,
  OTHER_AFFINE,
  BAD_MAGIC,
  TOTAL_ZERO
} variant;

/* World of 3 records; rank 1 differs as v says. */
static void run_check_case(variant v, fbnt_rng *rng) {
  const int64_t c = 5;
  const size_t stride = 64 + 16 * (size_t)c;
  unsigned char *recs = calloc(3, stride);
  fbn_op *self = cpu_op(c, FBN_DTYPE_FLOAT32, FBN_OPERATION_BN_ADD_RELU, true, 1e-5);
  int64_t n[3] = {2, 3, 1};
  if (v == TOTAL_ZERO) {
    n[0] = 0; /* every shard empty: 0 values per channel */
    n[1] = 0;
    n[2] = 0;
  }
  for (int r = 0; r < 3; r++) {
    fbn_op *op = self;
    if (r == 1) {
      switch (v) {
      case OTHER_C: op = cpu_op(c - 1, FBN_DTYPE_FLOAT32, FBN_OPERATION_BN_ADD_RELU, true, 1e-5); break;
      case OTHER_DTYPE: op = cpu_op(c, FBN_DTYPE_FLOAT64, FBN_OPERATION_BN_ADD_RELU, true, 1e-5); break;
      case OTHER_EPS: op = cpu_op(c, FBN_DTYPE_FLOAT32, FBN_OPERATION_BN_ADD_RELU, true, 1e-3); break;
      case OTHER_OPERATION: op = cpu_op(c, FBN_DTYPE_FLOAT32, FBN_OPERATION_BN_RELU, true, 1e-5); break;
      case OTHER_AFFINE: op = cpu_op(c, FBN_DTYPE_FLOAT32, FBN_OPERATION_BN_ADD_RELU, false, 1e-5); break;
      default: break;
      }
    }
    cpu_record(op, n[r], rng, recs + (size_t)r * stride, stride);
    if (op != self)
      fbn_op_destroy(op);
  }
  if (v == BAD_MAGIC)
    recs[stride + 3] ^= 0x5a;

  double mean[5], var[5];
  for (int i = 0; i < 5; i++)
    mean[i] = var[i] = -1.0;
  const fbn_status want = fbn_sync_combine(self, recs, 3, stride, mean, var, NULL, NULL, 0.0, NULL);
  char want_msg[1024];
  snprintf(want_msg, sizeof want_msg, "%s", fbn_last_error_message());

  fbn_op_desc od;
  assert_int_equal(fbn_op_get_desc(self, &od), FBN_STATUS_SUCCESS);
  const fbn_cs_header h = fbn_cuda_sync_header(&od, 0);
  fbn_cs_status s;
  const int32_t code = fbn_cs_check_headers(recs, 3, stride, &h, &s);
  assert_int_equal(code, s.code);
  assert_int_equal(s.magic, FBN_CS_STATUS_MAGIC);
  assert_int_equal((int)code, (int)want);
  if (want == FBN_STATUS_SUCCESS) {
    assert_int_equal(s.total, (n[0] + n[1] + n[2]) * 6);
    assert_int_equal(v, AGREE);
    /* the kernel's per-channel merge in rank order */
    for (int64_t ch = 0; ch < c; ch++) {
      double nn = 0.0, m = 0.0, m2 = 0.0;
      for (int r = 0; r < 3; r++) {
        const unsigned char *rec = recs + (size_t)r * stride;
        const fbn_cs_header *rh = (const fbn_cs_header *)(const void *)rec;
        const double *rm = (const double *)(const void *)(rec + FBN_CS_HEADER_BYTES);
        fbn_cs_merge(&nn, &m, &m2, (double)rh->count, rm[ch], rm[c + ch]);
      }
      assert_true(m == mean[ch]);
      assert_true(m2 / (double)s.total == var[ch]);
    }
  } else {
    assert_int_not_equal(v, AGREE);
    if (v != TOTAL_ZERO)
      assert_int_equal(s.rank, 1);
    char text[1024], full[1100];
    fbn_cuda_sync_describe(&s, text, sizeof text);
    snprintf(full, sizeof full, "fbn_sync_combine: %s", text);
    assert_string_equal(full, want_msg);
    /* nothing of the records' data reached the outputs */
    for (int i = 0; i < 5; i++)
      assert_true(mean[i] == -1.0 && var[i] == -1.0);
  }
  fbn_op_destroy(self);
  free(recs);
}

static void test_check_matches_combine(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, "cuda-sync-check");
  for (int v = AGREE; v <= TOTAL_ZERO; v++)
    for (int rep = 0; rep < 3; rep++)
      run_check_case((variant)v, &rng);
}

static void test_merge_matches_core(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, "cuda-sync-merge");
  for (int k = 0; k < 2000; k++) {
    double na = 0.0, ma = 0.0, qa = 0.0, nb = 0.0, mb = 0.0, qb = 0.0;
    for (int part = 0; part < 5; part++) {
      const double n = (double)(fbnt_rng_u32(&rng) % 4 == 0 ? 0 : 1 + fbnt_rng_u32(&rng) % 1000);
      const double m = 1e3 * fbnt_rng_normal(&rng), q = n * fabs(fbnt_rng_normal(&rng));
      fbn_bn_merge(&na, &ma, &qa, n, m, q);
      fbn_cs_merge(&nb, &mb, &qb, n, m, q);
    }
    assert_true(na == nb);
    assert_memory_equal(&ma, &mb, sizeof ma);
    assert_memory_equal(&qa, &qb, sizeof qa);
  }
}

static void test_grad_head(void **state) {
  (void)state;
  fbn_cs_status s;
  char text[512];
  const int64_t c = 7;
  double ok[4] = {30.0, 3.0, 21.0, 0.0};
  assert_int_equal(fbn_cs_check_grad_head(ok, c, 12, &s), FBN_STATUS_SUCCESS);
  assert_int_equal(s.total, 30);
  double other_c[4] = {30.0, 3.0, 20.0, 0.0};
  assert_int_equal(fbn_cs_check_grad_head(other_c, c, 12, &s), FBN_STATUS_SHAPE_MISMATCH);
  fbn_cuda_sync_describe(&s, text, sizeof text);
  assert_non_null(strstr(text, "3 ranks with 20 channels"));
  assert_non_null(strstr(text, "C = 7"));
  double no_ranks[4] = {30.0, 0.0, 0.0, 0.0};
  assert_int_equal(fbn_cs_check_grad_head(no_ranks, c, 12, &s), FBN_STATUS_SHAPE_MISMATCH);
  double nan_ranks[4] = {30.0, NAN, 21.0, 0.0};
  assert_int_equal(fbn_cs_check_grad_head(nan_ranks, c, 12, &s), FBN_STATUS_SHAPE_MISMATCH);
  double small[4] = {11.0, 3.0, 21.0, 0.0};
  assert_int_equal(fbn_cs_check_grad_head(small, c, 12, &s), FBN_STATUS_INVALID_VALUE);
  fbn_cuda_sync_describe(&s, text, sizeof text);
  assert_non_null(strstr(text, "count 11"));
  assert_non_null(strstr(text, "shard's 12"));
  double frac[4] = {30.5, 3.0, 21.0, 0.0};
  assert_int_equal(fbn_cs_check_grad_head(frac, c, 12, &s), FBN_STATUS_INVALID_VALUE);
  /* the backward of a failed forward names the forward's finding */
  unsigned char recs[2][64];
  fbn_cs_header self = {0};
  self.magic = FBN_CS_MAGIC;
  self.version = FBN_CS_VERSION;
  self.c = 4;
  self.count = 5;
  fbn_cs_header other = self;
  other.c = 6;
  memcpy(recs[0], &self, sizeof self);
  memcpy(recs[1], &other, sizeof other);
  fbn_cs_status f;
  assert_int_equal(fbn_cs_check_headers(&recs[0][0], 2, 64, &self, &f), FBN_STATUS_SHAPE_MISMATCH);
  f.cause = f.what;
  f.what = FBN_CS_FORWARD;
  fbn_cuda_sync_describe(&f, text, sizeof text);
  assert_non_null(strstr(text, "the forward that filled saved failed its check: rank 1 has C = 6"));
}

static void test_layout(void **state) {
  (void)state;
  const fbn_dtype dtypes[] = {FBN_DTYPE_FLOAT32, FBN_DTYPE_FLOAT64, FBN_DTYPE_FLOAT16};
  const fbn_operation ops[] = {FBN_OPERATION_BN, FBN_OPERATION_BN_RELU, FBN_OPERATION_BN_ADD_RELU};
  const int64_t ns[] = {0, 1, 7, 64};
  const int64_t cs[] = {1, 3, 64, 1000};
  for (size_t a = 0; a < 3; a++)
    for (size_t b = 0; b < 3; b++)
      for (size_t i = 0; i < 4; i++)
        for (size_t j = 0; j < 4; j++)
          for (int lay = 0; lay < 2; lay++)
            for (int w = 1; w <= 8; w *= 2) {
              fbn_op_desc od;
              fbn_op_desc_init(&od);
              od.num_features = cs[j];
              od.dtype = dtypes[a];
              od.operation = ops[b];
              fbn_tensor_desc d = {.n = ns[i], .c = cs[j], .h = 5, .w = 3, .dtype = dtypes[a],
                                   .layout = lay ? FBN_LAYOUT_NHWC : FBN_LAYOUT_NCHW};
              const size_t ps = dtypes[a] == FBN_DTYPE_FLOAT64 ? 8 : 4;
              const size_t numel = (size_t)(ns[i] * cs[j] * 15);
              const fbn_cuda_sync_saved_parts sp = fbn_cuda_sync_saved_layout(&od, &d);
              assert_int_equal(sp.mean, FBN_CS_STATUS_BYTES);
              assert_true(sp.invstd >= sp.mean + (size_t)cs[j] * ps);
              assert_int_equal(sp.mean % 256, 0);
              assert_int_equal(sp.invstd % 256, 0);
              if (ops[b] == FBN_OPERATION_BN) {
                assert_int_equal(sp.mask, 0);
                assert_true(sp.bytes >= sp.invstd + (size_t)cs[j] * ps);
              } else {
                assert_true(sp.mask >= sp.invstd + (size_t)cs[j] * ps);
                assert_int_equal(sp.mask % 256, 0);
                assert_true(sp.bytes >= sp.mask + (numel + 31) / 32 * 4);
              }
              const fbn_cuda_sync_ws_parts wp = fbn_cuda_sync_ws_layout(&d, w);
              const size_t rb = 64 + 16 * (size_t)cs[j];
              const size_t grad = (4 + 2 * (size_t)cs[j]) * 8;
              assert_int_equal(wp.record_bytes, rb);
              assert_int_equal(wp.record, FBN_CS_STATUS_BYTES);
              assert_true(wp.records >= wp.record + rb);
              assert_true(wp.coef >= wp.records + (size_t)w * rb);
              assert_true(wp.partials >= wp.coef + 4 * (size_t)cs[j] * ps);
              assert_true(wp.grad >= wp.partials + 2 * (size_t)cs[j] * 8);
              assert_true(wp.grad_local >= wp.grad + grad);
              assert_true(wp.bytes >= wp.grad_local + grad);
              const size_t parts[] = {wp.record, wp.records, wp.coef, wp.partials, wp.grad,
                                      wp.grad_local};
              for (size_t k = 0; k < 6; k++)
                assert_int_equal(parts[k] % 256, 0);
            }
}

static void test_entry_rejects(void **state) {
  (void)state;
  fbn_op *op = cpu_op(4, FBN_DTYPE_FLOAT32, FBN_OPERATION_BN_ADD_RELU, true, 1e-5);
  fbn_tensor_desc d = {.n = 2, .c = 4, .h = 3, .w = 3, .dtype = FBN_DTYPE_FLOAT32,
                       .layout = FBN_LAYOUT_NCHW};
  size_t bytes = 12345;
  assert_int_equal(fbn_cuda_sync_saved_size(NULL, &d, &bytes), FBN_STATUS_NULL_POINTER);
  assert_non_null(strstr(fbn_last_error_message(), "fbn_cuda_sync_saved_size: op is NULL"));
  assert_int_equal(fbn_cuda_sync_saved_size(op, &d, &bytes), FBN_STATUS_INVALID_VALUE);
  assert_non_null(strstr(fbn_last_error_message(),
                         "fbn_cuda_sync_saved_size: op is not a CUDA op (backend"));
  assert_int_equal(fbn_cuda_sync_workspace_size(op, &d, 2, &bytes), FBN_STATUS_INVALID_VALUE);
  assert_non_null(strstr(fbn_last_error_message(), "fbn_cuda_sync_workspace_size: op is not"));
  assert_int_equal(bytes, 12345);

  float x[72], y[72], z[72], w[4], b[4];
  for (int i = 0; i < 72; i++) {
    x[i] = z[i] = (float)i;
    y[i] = -7.0f;
  }
  for (int i = 0; i < 4; i++) {
    w[i] = 1.0f;
    b[i] = 0.0f;
  }
  unsigned char ws[4096], saved[4096];
  fbn_cuda_sync_comm comm = {1, 0, NULL, NULL, NULL};
  assert_int_equal(fbn_cuda_sync_forward(op, NULL, &comm, &d, x, z, y, w, b, NULL, NULL, 0.0,
                                         saved, sizeof saved, ws, sizeof ws),
                   FBN_STATUS_INVALID_VALUE);
  assert_non_null(strstr(fbn_last_error_message(), "fbn_cuda_sync_forward: op is not a CUDA op"));
  for (int i = 0; i < 72; i++)
    assert_true(y[i] == -7.0f);
  assert_int_equal(fbn_cuda_sync_backward(op, NULL, &comm, &d, x, y, z, saved, sizeof saved, w,
                                          b, x, z, w, b, FBN_PARAM_GRAD_OVERWRITE,
                                          FBN_SYNC_GRAD_LOCAL, ws, sizeof ws),
                   FBN_STATUS_INVALID_VALUE);
  assert_non_null(strstr(fbn_last_error_message(), "fbn_cuda_sync_backward: op is not"));
  assert_int_equal(fbn_cuda_sync_check(op, NULL, &comm, ws, sizeof ws), FBN_STATUS_INVALID_VALUE);
  assert_non_null(strstr(fbn_last_error_message(), "fbn_cuda_sync_check: op is not"));
  fbn_status result = (fbn_status)99;
  assert_int_equal(fbn_cuda_sync_read_status(op, NULL, ws, &result), FBN_STATUS_INVALID_VALUE);
  assert_int_equal((int)result, 99);
  assert_int_equal(fbn_cuda_sync_read_status(NULL, NULL, ws, &result), FBN_STATUS_NULL_POINTER);
  assert_int_equal(fbn_cuda_sync_check(NULL, NULL, &comm, ws, sizeof ws), FBN_STATUS_NULL_POINTER);
  assert_int_equal(fbn_cuda_sync_forward(NULL, NULL, &comm, &d, x, z, y, w, b, NULL, NULL, 0.0,
                                         saved, sizeof saved, ws, sizeof ws),
                   FBN_STATUS_NULL_POINTER);
  assert_int_equal(fbn_cuda_sync_backward(NULL, NULL, &comm, &d, x, y, z, saved, sizeof saved, w,
                                          b, x, z, w, b, FBN_PARAM_GRAD_OVERWRITE,
                                          FBN_SYNC_GRAD_LOCAL, ws, sizeof ws),
                   FBN_STATUS_NULL_POINTER);
  /* the CPU calls refuse nothing of this op: the entry points differ only
   * in the backend they take */
  size_t rb = 0;
  assert_int_equal(fbn_sync_stats_record_size(op, &rb), FBN_STATUS_SUCCESS);
  fbn_op_destroy(op);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_header_matches_cpu), cmocka_unit_test(test_check_matches_combine),
      cmocka_unit_test(test_merge_matches_core), cmocka_unit_test(test_grad_head),
      cmocka_unit_test(test_layout),             cmocka_unit_test(test_entry_rejects),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
