/* Element-by-element comparison with a float64 reference. */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "fbn_testutil.h"

static bool close_enough(double got, double want, double rtol, double atol) {
  if (isnan(want)) {
    return isnan(got);
  }
  if (isnan(got)) {
    return false;
  }
  if (isinf(want) || isinf(got)) {
    return got == want;
  }
  return fabs(got - want) <= atol + rtol * fabs(want);
}

bool fbnt_check_close(const char *what, const double *got, const double *want, size_t count,
                      double rtol, double atol, const fbn_tensor_desc *desc) {
  size_t bad = 0;
  size_t first = 0;
  double worst = 0.0;
  size_t worst_i = 0;
  for (size_t i = 0; i < count; i++) {
    if (!close_enough(got[i], want[i], rtol, atol)) {
      if (bad == 0) {
        first = i;
      }
      bad++;
      double excess = fabs(got[i] - want[i]) / (atol + rtol * fabs(want[i]));
      if (isnan(excess) || excess > worst || bad == 1) {
        worst = isnan(excess) ? INFINITY : excess;
        worst_i = i;
      }
    }
  }
  if (bad == 0) {
    return true;
  }
  char where[128];
  if (desc != NULL) {
    size_t i = first;
    int64_t w = (int64_t)(i % (size_t)desc->w);
    i /= (size_t)desc->w;
    int64_t h = (int64_t)(i % (size_t)desc->h);
    i /= (size_t)desc->h;
    int64_t c = (int64_t)(i % (size_t)desc->c);
    int64_t n = (int64_t)(i / (size_t)desc->c);
    snprintf(where, sizeof where, "(n=%" PRId64 ",c=%" PRId64 ",h=%" PRId64 ",w=%" PRId64 ")", n,
             c, h, w);
  } else {
    snprintf(where, sizeof where, "[%zu]", first);
  }
  print_error("%s: %zu of %zu elements differ (rtol %.3g, atol %.3g); first at %s: got %.17g, "
              "want %.17g; worst at [%zu]: got %.17g, want %.17g; FBN_TEST_SEED=%" PRIu64 "\n",
              what, bad, count, rtol, atol, where, got[first], want[first], worst_i, got[worst_i],
              want[worst_i], fbnt_seed());
  return false;
}

double fbnt_max_abs(const double *v, size_t count) {
  double m = 0.0;
  for (size_t i = 0; i < count; i++) {
    if (!isnan(v[i]) && fabs(v[i]) > m) {
      m = fabs(v[i]);
    }
  }
  return m;
}

double fbnt_max_finite(const double *v, size_t count) {
  double m = 0.0;
  for (size_t i = 0; i < count; i++) {
    if (isfinite(v[i]) && fabs(v[i]) > m) {
      m = fabs(v[i]);
    }
  }
  return m;
}

bool fbnt_check_values(const char *name, const char *what, const double *got, const double *want,
                       size_t count, double rtol, double atol_rel, const fbn_tensor_desc *desc) {
  char label[256];
  snprintf(label, sizeof label, "%s: %s", name, what);
  const double scale = fbnt_max_finite(want, count);
  return fbnt_check_close(label, got, want, count, rtol, atol_rel * (scale > 0 ? scale : 1.0),
                          desc);
}

bool fbnt_check_modules_agree(const char *name, const fbn_module *got, const fbn_module *want,
                              double rtol) {
  static const char *const names[] = {"weight",      "bias",         "running_mean",
                                      "running_var", "weight_grad",  "bias_grad"};
  fbn_module_options opt;
  fbn_status st = fbn_module_get_options(want, &opt);
  if (st != FBN_STATUS_SUCCESS) {
    print_error("%s: get_options = %s\n", name, fbn_status_string(st));
    return false;
  }
  const size_t c = (size_t)opt.num_features;
  double *g = malloc(c * sizeof *g), *w = malloc(c * sizeof *w);
  if (g == NULL || w == NULL) {
    abort();
  }
  bool ok = true;
  for (int b = 0; b < 6; b++) {
    const bool present = fbn_module_has_buffer(want, (fbn_buffer)b);
    if (present != fbn_module_has_buffer(got, (fbn_buffer)b)) {
      print_error("%s: %s present on one module only\n", name, names[b]);
      ok = false;
      continue;
    }
    if (!present) {
      continue;
    }
    const fbn_status sg = fbn_module_read_buffer(got, (fbn_buffer)b, FBN_DTYPE_FLOAT64, g, c);
    const fbn_status sw = fbn_module_read_buffer(want, (fbn_buffer)b, FBN_DTYPE_FLOAT64, w, c);
    if (sg != FBN_STATUS_SUCCESS || sw != FBN_STATUS_SUCCESS) {
      print_error("%s: read_buffer(%s) = %s / %s: %s\n", name, names[b], fbn_status_string(sg),
                  fbn_status_string(sw), fbn_last_error_message());
      ok = false;
      continue;
    }
    char label[256];
    snprintf(label, sizeof label, "%s: %s", name, names[b]);
    ok &= fbnt_check_close(label, g, w, c, rtol, rtol * fbnt_max_finite(w, c), NULL);
  }
  int64_t ng = -1, nw = -2;
  const fbn_status sg = fbn_module_get_num_batches_tracked(got, &ng);
  const fbn_status sw = fbn_module_get_num_batches_tracked(want, &nw);
  if (sg != sw) {
    print_error("%s: num_batches_tracked: %s, want %s\n", name, fbn_status_string(sg),
                fbn_status_string(sw));
    ok = false;
  } else if (sg != FBN_STATUS_SUCCESS && sg != FBN_STATUS_ABSENT) {
    print_error("%s: num_batches_tracked: %s: %s\n", name, fbn_status_string(sg),
                fbn_last_error_message());
    ok = false;
  } else if (sg == FBN_STATUS_SUCCESS && ng != nw) {
    print_error("%s: num_batches_tracked %" PRId64 ", want %" PRId64 "\n", name, ng, nw);
    ok = false;
  }
  free(g);
  free(w);
  return ok;
}

/*
 * Tolerances of a tensor of the dtype against the float64 reference (the
 * float64 result on the same widened inputs, not rounded):
 *   float64  1e-10, float32 2e-5: the float64/float32 loops' arithmetic;
 *   float16 (u = 2^-11) and bfloat16 (u = 2^-8): every output is rounded
 *     once. From float64 (the reference backend) it lies within u |want|
 *     of the float64 value; from float32 (the fast backend, whose float32
 *     value is within 2^-22 of its terms' size) the rounding can cross one
 *     more boundary: at most one ulp, 2u |want|, relative. The absolute
 *     part, 2^-14 max|want| of the tensor, covers the results that cancel
 *     below their terms' size: the float32 error of y = (x - m) a + b + z
 *     is ~2^-22 of |a (x - m)| + |b| + |z|, of dx = k (g - mean g - xhat
 *     mean(g xhat)) ~2^-22 |k| max|g| (1 + max|xhat|); both stay below
 *     2^-14 max|want| while those terms are below 2^8 max|want| (the test
 *     data's: |xhat| < 2^5, |mean(g xhat)| and |mean g| below max|g|), and
 *     the subnormal spacing (2^-25 / 2^-134) below it while max|want| >=
 *     2^-11 / 2^-120. A coefficient off by 1% fails it.
 * Parameters, running statistics and parameter gradients are float32
 * buffers: their checks take float32's tolerance whatever the tensor's
 * dtype (fixture.c: param_rtol).
 */
fbnt_tol fbnt_tol_for(fbn_dtype dtype, double scale) {
  double r;
  switch (dtype) {
  case FBN_DTYPE_FLOAT64:
    r = 1e-10;
    break;
  case FBN_DTYPE_FLOAT32:
    r = 2e-5;
    break;
  case FBN_DTYPE_FLOAT16:
    r = 0x1p-10; /* 2u */
    break;
  case FBN_DTYPE_BFLOAT16:
  default:
    r = 0x1p-7; /* 2u */
    break;
  }
  const bool half = dtype == FBN_DTYPE_FLOAT16 || dtype == FBN_DTYPE_BFLOAT16;
  fbnt_tol t = {r, (half ? 0x1p-14 : r) * (scale > 0.0 ? scale : 1e-6)};
  return t;
}

void fbnt_parse_args(int argc, char **argv) {
  fbnt_print_seed();
  if (argc > 1 && argv[1] != NULL && argv[1][0] != '\0') {
    cmocka_set_test_filter(argv[1]);
  }
}
