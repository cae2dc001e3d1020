/* A module from a designated-initializer spec, its float64 twin and host
 * tensors; forward and backward checked element by element. */
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

fbn_module_options fbnt_options(const fbnt_spec *spec) {
  fbn_module_options o;
  fbn_module_options_init(&o);
  o.num_features = spec->c;
  o.param_dtype = spec->dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
  o.affine = !spec->no_affine;
  o.track_running_stats = !spec->no_track;
  o.cumulative_average = spec->cumulative;
  if (spec->zero_eps) {
    o.eps = 0.0;
  } else if (spec->eps != 0.0) {
    o.eps = spec->eps;
  }
  if (spec->zero_momentum) {
    o.momentum = 0.0;
  } else if (spec->momentum != 0.0) {
    o.momentum = spec->momentum;
  }
  o.bn_mode = spec->bn_mode;
  o.device = spec->device;
  return o;
}

void fbnt_spec_name(const fbnt_spec *spec, char *buf, size_t size) {
  const fbn_module_options o = fbnt_options(spec);
  snprintf(buf, size,
           "(%" PRId64 ",%" PRId64 ",%" PRId64 ",%" PRId64 ") %s %s%s%s%s%s%s eps=%g momentum=%g%s",
           spec->n, spec->c, spec->h, spec->w, fbnt_layout_str(spec->layout),
           fbnt_dtype_str(spec->dtype), spec->addend ? " addend" : "",
           o.affine ? " affine" : "", o.track_running_stats ? " track" : "",
           o.cumulative_average ? " cumulative" : "",
           o.device == FBN_DEVICE_CUDA ? " cuda" : "", o.eps, o.momentum,
           spec->eval ? " eval" : "");
}

static double *ref_array(size_t count) {
  double *r = calloc(count > 0 ? count : 1, sizeof *r);
  if (r == NULL) {
    abort();
  }
  return r;
}

/* Every tensor and float64 array of d, outputs poisoned, a fresh saved
 * object; the inputs are the caller's to fill. */
static void tensors_alloc(fbnt_tensors *t, fbn_tensor_desc d, bool addend) {
  memset(t, 0, sizeof *t);
  t->d = d;
  t->count = fbnt_desc_numel(&d);
  t->addend = addend;
  void **bufs[6] = {&t->x, &t->a, &t->y, &t->dy, &t->dx, &t->da};
  double **refs[6] = {&t->xr, &t->ar, &t->yr, &t->dyr, &t->dxr, &t->dar};
  for (int i = 0; i < 6; i++) {
    *bufs[i] = fbnt_tensor_alloc(&d);
    *refs[i] = ref_array(t->count);
  }
  fbnt_tensor_poison(&d, t->y);
  fbnt_tensor_poison(&d, t->dx);
  fbnt_tensor_poison(&d, t->da);
  if (fbn_saved_create(&t->saved) != FBN_STATUS_SUCCESS) {
    abort();
  }
  fbnt_ref_saved_init(&t->rs);
}

void fbnt_tensors_init(fbnt_tensors *t, fbnt_rng *rng, fbn_tensor_desc d, bool addend) {
  tensors_alloc(t, d, addend);
  fbnt_fill_channels(rng, &d, t->x, t->xr);
  fbnt_fill_normal(rng, &d, t->a, t->ar, 1.0);
  fbnt_fill_normal(rng, &d, t->dy, t->dyr, 1.0);
}

void fbnt_tensors_init_as(fbnt_tensors *t, const fbnt_tensors *src, fbn_tensor_desc d) {
  tensors_alloc(t, d, src->addend);
  /* store, then read back what the dtype holds */
  fbnt_tensor_from_ref(&d, src->xr, t->x);
  fbnt_tensor_from_ref(&d, src->ar, t->a);
  fbnt_tensor_from_ref(&d, src->dyr, t->dy);
  fbnt_tensor_to_ref(&d, t->x, t->xr);
  fbnt_tensor_to_ref(&d, t->a, t->ar);
  fbnt_tensor_to_ref(&d, t->dy, t->dyr);
}

void fbnt_tensors_free(fbnt_tensors *t) {
  void *bufs[6] = {t->x, t->a, t->y, t->dy, t->dx, t->da};
  double *refs[6] = {t->xr, t->ar, t->yr, t->dyr, t->dxr, t->dar};
  for (int i = 0; i < 6; i++) {
    fbnt_free(bufs[i]);
    free(refs[i]);
  }
  fbn_saved_destroy(t->saved);
  fbnt_ref_saved_free(&t->rs);
  memset(t, 0, sizeof *t);
}

fbn_status fbnt_fixture_create(fbnt_fixture *f, fbnt_rng *rng, const fbnt_spec *spec) {
  memset(f, 0, sizeof *f);
  f->spec = *spec;
  fbnt_spec_name(spec, f->name, sizeof f->name);
  const fbn_module_options o = fbnt_options(spec);
  fbn_status st = fbnt_module_create_random(rng, &o, &f->m, &f->ref);
  if (st == FBN_STATUS_SUCCESS && spec->eval) {
    st = fbnt_fixture_set_training(f, false);
  }
  if (st != FBN_STATUS_SUCCESS) {
    print_error("%s: module setup = %s: %s\n", f->name, fbn_status_string(st),
                fbn_last_error_message());
    fbnt_fixture_destroy(f);
    return st;
  }
  if (spec->n > 0) {
    const fbn_tensor_desc d = {spec->n, spec->c, spec->h, spec->w, spec->dtype, spec->layout};
    fbnt_tensors_init(&f->t, rng, d, spec->addend);
  }
  return FBN_STATUS_SUCCESS;
}

void fbnt_fixture_destroy(fbnt_fixture *f) {
  fbn_module_destroy(f->m);
  fbnt_ref_module_free(&f->ref);
  if (f->t.x != NULL) {
    fbnt_tensors_free(&f->t);
  }
  f->m = NULL;
}

fbn_status fbnt_fixture_set_training(fbnt_fixture *f, bool training) {
  const fbn_status st = fbn_module_set_training(f->m, training);
  if (st == FBN_STATUS_SUCCESS) {
    f->ref.training = training;
  }
  return st;
}

/* Every element of a tensor still holds the float64 values in want. */
static bool unchanged(const char *name, const char *what, const fbn_tensor_desc *d,
                      const void *data, const double *want) {
  const size_t count = fbnt_desc_numel(d);
  double *got = ref_array(count);
  fbnt_tensor_to_ref(d, data, got);
  bool ok = true;
  for (size_t i = 0; i < count; i++) {
    if (!(got[i] == want[i] || (isnan(got[i]) && isnan(want[i])))) {
      print_error("%s: %s modified at [%zu]: %.17g, was %.17g\n", name, what, i, got[i], want[i]);
      ok = false;
      break;
    }
  }
  free(got);
  return ok;
}

static double param_rtol(const fbnt_fixture *f) {
  return fbnt_tol_for(f->spec.dtype == FBN_DTYPE_FLOAT64 ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32,
                      1.0)
      .rtol;
}

bool fbnt_fixture_forward(fbnt_fixture *f, fbnt_tensors *t, fbn_saved *saved, const char *what) {
  if (t == NULL) {
    t = &f->t;
  }
  const char *name = what != NULL ? what : f->name;
  t->forward_done = false;
  fbnt_tensor_poison(&t->d, t->y);
  const fbn_status st =
      fbn_module_forward(f->m, &t->d, t->x, t->addend ? t->a : NULL, t->y, saved, NULL, 0);
  if (st != FBN_STATUS_SUCCESS) {
    print_error("%s: forward = %s: %s\n", name, fbn_status_string(st), fbn_last_error_message());
    return false;
  }
  fbnt_ref_saved_free(&t->rs);
  fbnt_ref_saved_init(&t->rs);
  if (!fbnt_ref_forward(&f->ref, t->d.n, t->d.h, t->d.w, t->xr, t->addend ? t->ar : NULL, t->yr,
                        &t->rs)) {
    print_error("%s: the reference refused the forward\n", name);
    return false;
  }
  t->forward_done = true;
  bool ok = fbnt_check_tensor(name, "forward y", &t->d, t->y, t->yr);
  ok &= fbnt_check_module(name, f->m, &f->ref, param_rtol(f), true);
  ok &= unchanged(name, "forward: x", &t->d, t->x, t->xr);
  ok &= unchanged(name, "forward: addend", &t->d, t->a, t->ar);
  return ok;
}

bool fbnt_fixture_backward(fbnt_fixture *f, fbnt_tensors *t, const fbn_saved *saved,
                           bool want_dx, bool want_daddend, const char *what) {
  if (t == NULL) {
    t = &f->t;
  }
  const char *name = what != NULL ? what : f->name;
  if (!t->forward_done) {
    print_error("%s: backward without a successful forward on these tensors\n", name);
    return false;
  }
  fbnt_tensor_poison(&t->d, t->dx);
  fbnt_tensor_poison(&t->d, t->da);
  const fbn_status st = fbn_module_backward(f->m, saved, &t->d, t->x, t->y, t->dy,
                                            want_dx ? t->dx : NULL, want_daddend ? t->da : NULL,
                                            NULL, 0);
  if (st != FBN_STATUS_SUCCESS) {
    print_error("%s: backward = %s: %s\n", name, fbn_status_string(st), fbn_last_error_message());
    return false;
  }
  /* the ReLU gate is !(y <= 0) of the module's own forward output */
  double *ym = ref_array(t->count);
  fbnt_tensor_to_ref(&t->d, t->y, ym);
  fbnt_ref_backward(&f->ref, &t->rs, t->xr, ym, t->dyr, t->dxr, t->dar);
  free(ym);
  /* an output not asked for must not have been written */
  double *nan_ref = ref_array(t->count);
  for (size_t i = 0; i < t->count; i++) {
    nan_ref[i] = NAN;
  }
  bool ok = fbnt_check_tensor(name, "backward dx", &t->d, t->dx, want_dx ? t->dxr : nan_ref);
  ok &= fbnt_check_tensor(name, "backward daddend", &t->d, t->da, want_daddend ? t->dar : nan_ref);
  free(nan_ref);
  ok &= fbnt_check_module(name, f->m, &f->ref, param_rtol(f), true);
  ok &= unchanged(name, "backward: x", &t->d, t->x, t->xr);
  return ok;
}
