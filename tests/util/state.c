/* Snapshots of everything a failing call must leave unchanged. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "fbn_testutil.h"

void fbnt_state_capture(const fbn_module *module, fbnt_state *s) {
  memset(s, 0, sizeof *s);
  if (fbn_module_get_options(module, &s->options) != FBN_STATUS_SUCCESS) {
    s->c = -1;
    return;
  }
  s->c = s->options.num_features;
  (void)fbn_module_is_training(module, &s->training);
  s->nbt_status = fbn_module_get_num_batches_tracked(module, &s->num_batches_tracked);
  for (int b = 0; b < 6; b++) {
    s->values[b] = calloc((size_t)s->c, sizeof(double));
    if (s->values[b] == NULL) {
      abort();
    }
    s->status[b] = fbn_module_read_buffer(module, (fbn_buffer)b, FBN_DTYPE_FLOAT64, s->values[b],
                                          (size_t)s->c);
  }
}

bool fbnt_state_equal(const fbnt_state *a, const fbnt_state *b) {
  if (a->c != b->c) {
    print_error("state: num_features %" PRId64 " != %" PRId64 "\n", a->c, b->c);
    return false;
  }
  const fbn_module_options *oa = &a->options, *ob = &b->options;
  if (oa->num_features != ob->num_features || memcmp(&oa->eps, &ob->eps, sizeof oa->eps) != 0 ||
      memcmp(&oa->momentum, &ob->momentum, sizeof oa->momentum) != 0 ||
      oa->cumulative_average != ob->cumulative_average || oa->affine != ob->affine ||
      oa->track_running_stats != ob->track_running_stats || oa->param_dtype != ob->param_dtype ||
      oa->device != ob->device || oa->device_index != ob->device_index ||
      oa->bn_mode != ob->bn_mode) {
    print_error("state: options changed\n");
    return false;
  }
  if (a->training != b->training) {
    print_error("state: training %d != %d\n", a->training, b->training);
    return false;
  }
  if (a->nbt_status != b->nbt_status || a->num_batches_tracked != b->num_batches_tracked) {
    print_error("state: num_batches_tracked %" PRId64 " (status %d) != %" PRId64 " (status %d)\n",
                a->num_batches_tracked, (int)a->nbt_status, b->num_batches_tracked,
                (int)b->nbt_status);
    return false;
  }
  for (int k = 0; k < 6; k++) {
    if (a->status[k] != b->status[k]) {
      print_error("state: buffer %d read status %d != %d\n", k, (int)a->status[k],
                  (int)b->status[k]);
      return false;
    }
    if (a->status[k] != FBN_STATUS_SUCCESS) {
      continue;
    }
    for (int64_t i = 0; i < a->c; i++) {
      if (memcmp(&a->values[k][i], &b->values[k][i], sizeof(double)) != 0) {
        print_error("state: buffer %d [%" PRId64 "] changed: %.17g -> %.17g\n", k, i,
                    a->values[k][i], b->values[k][i]);
        return false;
      }
    }
  }
  return true;
}

void fbnt_state_free(fbnt_state *s) {
  for (int b = 0; b < 6; b++) {
    free(s->values[b]);
  }
  memset(s, 0, sizeof *s);
}

fbn_status fbnt_module_create_random(fbnt_rng *rng, const fbn_module_options *options,
                                     fbn_module **out, fbnt_ref_module *ref) {
  fbn_module *m = NULL;
  fbn_status st = fbn_module_create(options, &m);
  if (st != FBN_STATUS_SUCCESS) {
    *out = NULL;
    return st;
  }
  fbnt_ref_module local;
  fbnt_ref_module_init(&local, options->num_features);
  st = fbnt_ref_module_from(&local, m);
  if (st == FBN_STATUS_SUCCESS) {
    bool f32 = options->param_dtype == FBN_DTYPE_FLOAT32;
    int64_t c = options->num_features;
    fbnt_fill_vector(rng, local.weight, c, 0.5, 1.5, true, f32);
    fbnt_fill_vector(rng, local.bias, c, -0.5, 0.5, false, f32);
    fbnt_fill_vector(rng, local.running_mean, c, -1.0, 1.0, false, f32);
    fbnt_fill_vector(rng, local.running_var, c, 0.5, 2.0, false, f32);
    fbnt_fill_vector(rng, local.weight_grad, c, -1.0, 1.0, false, f32);
    fbnt_fill_vector(rng, local.bias_grad, c, -1.0, 1.0, false, f32);
    local.num_batches_tracked = 3;
    st = fbnt_ref_module_to(&local, m);
  }
  if (st != FBN_STATUS_SUCCESS) {
    fbnt_ref_module_free(&local);
    fbn_module_destroy(m);
    *out = NULL;
    return st;
  }
  if (ref != NULL) {
    fbnt_ref_module_free(ref);
    *ref = local;
  } else {
    fbnt_ref_module_free(&local);
  }
  *out = m;
  return FBN_STATUS_SUCCESS;
}

fbn_status fbnt_module_create_pair(fbnt_rng *rng, const fbn_module_options *a,
                                   const fbn_module_options *b, fbn_module **out_a,
                                   fbn_module **out_b) {
  *out_a = NULL;
  *out_b = NULL;
  fbnt_ref_module ref;
  memset(&ref, 0, sizeof ref);
  fbn_module *ma = NULL, *mb = NULL;
  fbn_status st = fbnt_module_create_random(rng, a, &ma, &ref);
  if (st == FBN_STATUS_SUCCESS) {
    st = fbn_module_create(b, &mb);
  }
  if (st == FBN_STATUS_SUCCESS) {
    st = fbnt_ref_module_to(&ref, mb);
  }
  fbnt_ref_module_free(&ref);
  if (st != FBN_STATUS_SUCCESS) {
    fbn_module_destroy(ma);
    fbn_module_destroy(mb);
    return st;
  }
  *out_a = ma;
  *out_b = mb;
  return FBN_STATUS_SUCCESS;
}
