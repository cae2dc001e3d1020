/* Checks of a module and a tensor against the reference, and one forward
 * (+ backward) of an fbnt_case through the fixture. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "fbn_testutil.h"

void fbnt_case_name(const fbnt_case *cs, char *buf, size_t size) {
  snprintf(buf, size,
           "(%" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64 ") %s %s%s%s%s %s", cs->n, cs->c,
           cs->h, cs->w, fbnt_layout_str(cs->layout), fbnt_dtype_str(cs->dtype),
           cs->addend ? " addend" : "", cs->affine ? " affine" : "",
           cs->track ? " track" : "", cs->training ? "train" : "eval");
}

/* Compare a module buffer with the reference's copy. */
static bool check_buffer(const char *name, const char *what, const fbn_module *m,
                         fbn_buffer which, const double *want, int64_t c, double rtol,
                         bool exact) {
  double *got = malloc((size_t)c * sizeof *got);
  if (got == NULL) {
    abort();
  }
  fbn_status st = fbn_module_read_buffer(m, which, FBN_DTYPE_FLOAT64, got, (size_t)c);
  bool ok = st == FBN_STATUS_SUCCESS;
  if (!ok) {
    print_error("%s: read_buffer(%s) = %s\n", name, what, fbn_status_string(st));
  } else {
    char label[256];
    snprintf(label, sizeof label, "%s: %s", name, what);
    double scale = fbnt_max_abs(want, (size_t)c);
    ok = fbnt_check_close(label, got, want, (size_t)c, exact ? 0.0 : rtol,
                          exact ? 0.0 : rtol * (scale > 0 ? scale : 1.0), NULL);
  }
  free(got);
  return ok;
}

bool fbnt_check_module(const char *name, const fbn_module *m, const fbnt_ref_module *ref,
                       double rtol, bool exact_params) {
  bool ok = true;
  if (ref->affine) {
    ok &= check_buffer(name, "weight", m, FBN_BUFFER_WEIGHT, ref->weight, ref->c, rtol, exact_params);
    ok &= check_buffer(name, "bias", m, FBN_BUFFER_BIAS, ref->bias, ref->c, rtol, exact_params);
    ok &= check_buffer(name, "weight_grad", m, FBN_BUFFER_WEIGHT_GRAD, ref->weight_grad, ref->c,
                       rtol, false);
    ok &= check_buffer(name, "bias_grad", m, FBN_BUFFER_BIAS_GRAD, ref->bias_grad, ref->c, rtol,
                       false);
  }
  if (ref->track_running_stats) {
    ok &= check_buffer(name, "running_mean", m, FBN_BUFFER_RUNNING_MEAN, ref->running_mean,
                       ref->c, rtol, false);
    ok &= check_buffer(name, "running_var", m, FBN_BUFFER_RUNNING_VAR, ref->running_var, ref->c,
                       rtol, false);
    int64_t nbt = -1;
    fbn_status st = fbn_module_get_num_batches_tracked(m, &nbt);
    if (st != FBN_STATUS_SUCCESS || nbt != ref->num_batches_tracked) {
      print_error("%s: num_batches_tracked = %" PRId64 " (%s), want %" PRId64 "\n", name, nbt,
                  fbn_status_string(st), ref->num_batches_tracked);
      ok = false;
    }
  }
  bool training = !ref->training;
  if (fbn_module_is_training(m, &training) != FBN_STATUS_SUCCESS || training != ref->training) {
    print_error("%s: training mode changed\n", name);
    ok = false;
  }
  return ok;
}

bool fbnt_check_tensor(const char *name, const char *what, const fbn_tensor_desc *d,
                       const void *data, const double *want) {
  size_t count = fbnt_desc_numel(d);
  double *got = malloc(count * sizeof *got);
  if (got == NULL) {
    abort();
  }
  fbnt_tensor_to_ref(d, data, got);
  fbnt_tol tol = fbnt_tol_for(d->dtype, fbnt_max_abs(want, count));
  char label[256];
  snprintf(label, sizeof label, "%s: %s", name, what);
  bool ok = fbnt_check_close(label, got, want, count, tol.rtol, tol.atol, d);
  free(got);
  return ok;
}

bool fbnt_case_run(const fbnt_case *cs, fbnt_rng *rng) {
  const fbnt_spec spec = {
      .n = cs->n,
      .c = cs->c,
      .h = cs->h,
      .w = cs->w,
      .dtype = cs->dtype,
      .layout = cs->layout,
      .addend = cs->addend,
      .eval = !cs->training,
      .no_affine = !cs->affine,
      .no_track = !cs->track,
  };
  fbnt_fixture f;
  if (fbnt_fixture_create(&f, rng, &spec) != FBN_STATUS_SUCCESS) {
    return false;
  }
  fbnt_case_name(cs, f.name, sizeof f.name);
  bool ok = fbnt_fixture_forward(&f, NULL, f.t.saved, NULL);
  if (cs->backward && f.t.forward_done) {
    ok &= fbnt_fixture_backward(&f, NULL, f.t.saved, true, cs->addend, NULL);
  }
  fbnt_fixture_destroy(&f);
  return ok;
}

void fbnt_tally_begin(fbnt_tally *t, const char *test) {
  fbnt_rng_for_test(&t->rng, test);
  t->failed = 0;
  t->total = 0;
}

void fbnt_tally_add(fbnt_tally *t, bool ok) {
  t->total++;
  if (!ok) {
    t->failed++;
  }
}

void fbnt_tally_end(const fbnt_tally *t, const char *what) {
  if (t->failed != 0) {
    fail_msg("%d of %d %s failed", t->failed, t->total, what);
  }
}

void fbnt_case_matrix(const char *test, fbn_layout layout, fbn_dtype dtype, bool backward) {
  static const int64_t shapes[][4] = {
      {3, 1, 4, 5}, {5, 3, 1, 1}, {3, 5, 7, 3}, {4, 2, 8, 3}, {8, 16, 12, 10}, {32, 24, 7, 9},
  };
  fbnt_tally all;
  fbnt_tally_begin(&all, test);
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
    for (int flags = 0; flags < 16; flags++) {
      const fbnt_case cs = {
          .n = shapes[s][0],
          .c = shapes[s][1],
          .h = shapes[s][2],
          .w = shapes[s][3],
          .dtype = dtype,
          .layout = layout,
          .addend = (flags & 1) != 0,
          .affine = (flags & 2) != 0,
          .track = (flags & 4) != 0,
          .training = (flags & 8) != 0,
          .backward = backward,
      };
      fbnt_tally_add(&all, fbnt_case_run(&cs, &all.rng));
    }
  }
  fbnt_tally_end(&all, "cases");
}
