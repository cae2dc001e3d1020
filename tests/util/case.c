/* One forward (+ backward) on host memory, checked against the reference. */
#include <inttypes.h>
#include <math.h>
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
  char name[160];
  fbnt_case_name(cs, name, sizeof name);
  fbn_tensor_desc d = {cs->n, cs->c, cs->h, cs->w, cs->dtype, cs->layout};
  size_t count = fbnt_desc_numel(&d);
  size_t bytes = count * (cs->dtype == FBN_DTYPE_FLOAT64 ? 8 : 4);
  fbn_module_options opt;
  fbn_module_options_init(&opt);
  opt.num_features = cs->c;
  opt.param_dtype = cs->dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  opt.affine = cs->affine;
  opt.track_running_stats = cs->track;
  double rtol = fbnt_tol_for(opt.param_dtype, 1.0).rtol;

  fbnt_ref_module ref;
  memset(&ref, 0, sizeof ref);
  fbn_module *m = NULL;
  fbn_status st = fbnt_module_create_random(rng, &opt, &m, &ref);
  if (st != FBN_STATUS_SUCCESS) {
    print_error("%s: module setup failed: %s %s\n", name, fbn_status_string(st),
                fbn_last_error_message());
    fbnt_ref_module_free(&ref);
    return false;
  }
  bool ok = true;
  st = fbn_module_set_training(m, cs->training);
  ref.training = cs->training;
  ok &= st == FBN_STATUS_SUCCESS;

  void *x = fbnt_tensor_alloc(&d), *a = fbnt_tensor_alloc(&d), *y = fbnt_tensor_alloc(&d);
  void *x_copy = fbnt_alloc(bytes), *a_copy = fbnt_alloc(bytes);
  double *xr = calloc(count, sizeof *xr), *ar = calloc(count, sizeof *ar);
  double *yr = calloc(count, sizeof *yr), *ym = calloc(count, sizeof *ym);
  if (xr == NULL || ar == NULL || yr == NULL || ym == NULL) {
    abort();
  }
  fbnt_fill_channels(rng, &d, x, xr);
  fbnt_fill_normal(rng, &d, a, ar, 1.0);
  memcpy(x_copy, x, bytes);
  memcpy(a_copy, a, bytes);
  fbnt_tensor_poison(&d, y);

  fbn_saved *saved = NULL;
  ok &= fbn_saved_create(&saved) == FBN_STATUS_SUCCESS;
  st = fbn_module_forward(m, &d, x, cs->addend ? a : NULL, y, saved, NULL, 0);
  if (st != FBN_STATUS_SUCCESS) {
    print_error("%s: forward = %s: %s\n", name, fbn_status_string(st), fbn_last_error_message());
    ok = false;
    goto done;
  }
  fbnt_ref_saved rs;
  fbnt_ref_saved_init(&rs);
  if (!fbnt_ref_forward(&ref, cs->n, cs->h, cs->w, xr, cs->addend ? ar : NULL, yr, &rs)) {
    print_error("%s: reference refused the case\n", name);
    ok = false;
    goto done;
  }
  ok &= fbnt_check_tensor(name, "forward y", &d, y, yr);
  ok &= fbnt_check_module(name, m, &ref, rtol, true);
  if (memcmp(x, x_copy, bytes) != 0 || memcmp(a, a_copy, bytes) != 0) {
    print_error("%s: forward modified x or addend\n", name);
    ok = false;
  }

  if (cs->backward) {
    void *dy = fbnt_tensor_alloc(&d), *dx = fbnt_tensor_alloc(&d), *da = fbnt_tensor_alloc(&d);
    double *dyr = calloc(count, sizeof *dyr), *dxr = calloc(count, sizeof *dxr);
    double *dar = calloc(count, sizeof *dar);
    if (dyr == NULL || dxr == NULL || dar == NULL) {
      abort();
    }
    fbnt_fill_normal(rng, &d, dy, dyr, 1.0);
    fbnt_tensor_poison(&d, dx);
    fbnt_tensor_poison(&d, da);
    st = fbn_module_backward(m, saved, &d, x, y, dy, dx, cs->addend ? da : NULL, NULL, 0);
    if (st != FBN_STATUS_SUCCESS) {
      print_error("%s: backward = %s: %s\n", name, fbn_status_string(st),
                  fbn_last_error_message());
      ok = false;
    } else {
      /* the ReLU gate is !(y <= 0) of the forward's actual output */
      fbnt_tensor_to_ref(&d, y, ym);
      fbnt_ref_backward(&ref, &rs, xr, ym, dyr, dxr, dar);
      ok &= fbnt_check_tensor(name, "backward dx", &d, dx, dxr);
      if (cs->addend) {
        ok &= fbnt_check_tensor(name, "backward daddend", &d, da, dar);
      } else {
        /* not requested: must not have been written */
        double *dam = calloc(count, sizeof *dam);
        fbnt_tensor_to_ref(&d, da, dam);
        for (size_t i = 0; i < count; i++) {
          if (!isnan(dam[i])) {
            print_error("%s: daddend written although NULL was passed\n", name);
            ok = false;
            break;
          }
        }
        free(dam);
      }
      ok &= fbnt_check_module(name, m, &ref, rtol, true);
      if (memcmp(x, x_copy, bytes) != 0) {
        print_error("%s: backward modified x\n", name);
        ok = false;
      }
    }
    fbnt_free(dy);
    fbnt_free(dx);
    fbnt_free(da);
    free(dyr);
    free(dxr);
    free(dar);
  }
  fbnt_ref_saved_free(&rs);

done:
  fbn_saved_destroy(saved);
  fbn_module_destroy(m);
  fbnt_ref_module_free(&ref);
  fbnt_free(x);
  fbnt_free(a);
  fbnt_free(y);
  fbnt_free(x_copy);
  fbnt_free(a_copy);
  free(xr);
  free(ar);
  free(yr);
  free(ym);
  return ok;
}
