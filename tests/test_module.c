/*
 * Module API: options defaults, create/destroy, training mode, buffers
 * (read/write in both dtypes, buffer_data, absent buffers), reset_*,
 * num_batches_tracked, zero_grad, status strings, small helpers.
 */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "fbn_testutil.h"

#define C 5

static const fbn_buffer all_buffers[6] = {FBN_BUFFER_WEIGHT,       FBN_BUFFER_BIAS,
                                          FBN_BUFFER_RUNNING_MEAN, FBN_BUFFER_RUNNING_VAR,
                                          FBN_BUFFER_WEIGHT_GRAD,  FBN_BUFFER_BIAS_GRAD};

static fbn_module *make_module(int64_t c, fbn_dtype param_dtype, bool affine, bool track) {
  const fbn_module_options opt = fbnt_options(
      &(fbnt_spec){.c = c, .dtype = param_dtype, .no_affine = !affine, .no_track = !track});
  fbn_module *m = (fbn_module *)(uintptr_t)1; /* must be overwritten */
  assert_int_equal(fbn_module_create(&opt, &m), FBN_STATUS_SUCCESS);
  assert_non_null(m);
  assert_string_equal(fbn_last_error_message(), "");
  return m;
}

static void read_f64(const fbn_module *m, fbn_buffer which, double *out, size_t count) {
  for (size_t i = 0; i < count; i++) {
    out[i] = NAN;
  }
  assert_int_equal(fbn_module_read_buffer(m, which, FBN_DTYPE_FLOAT64, out, count),
                   FBN_STATUS_SUCCESS);
}

static void assert_all_equal(const double *v, size_t count, double value) {
  for (size_t i = 0; i < count; i++) {
    if (!(v[i] == value)) {
      fail_msg("element %zu is %.17g, want %.17g", i, v[i], value);
    }
  }
}

static void test_options_init_defaults(void **state) {
  (void)state;
  fbn_module_options opt;
  memset(&opt, 0x5a, sizeof opt);
  fbn_module_options_init(&opt);
  assert_int_equal(opt.num_features, 0);
  assert_true(opt.eps == 1e-5);
  assert_true(opt.momentum == 0.1);
  assert_false(opt.cumulative_average);
  assert_true(opt.affine);
  assert_true(opt.track_running_stats);
  assert_int_equal(opt.param_dtype, FBN_DTYPE_FLOAT32);
  assert_int_equal(opt.device, FBN_DEVICE_CPU);
  assert_int_equal(opt.device_index, 0);
  assert_int_equal(opt.bn_mode, FBN_BN_MODE_AUTO);
  fbn_module_options_init(NULL); /* ignored */
}

static void test_module_create_defaults(void **state) {
  (void)state;
  fbn_module *m = make_module(C, FBN_DTYPE_FLOAT32, true, true);
  fbn_module_options opt;
  assert_int_equal(fbn_module_get_options(m, &opt), FBN_STATUS_SUCCESS);
  assert_int_equal(opt.num_features, C);
  assert_true(opt.eps == 1e-5 && opt.momentum == 0.1);
  assert_true(opt.affine && opt.track_running_stats && !opt.cumulative_average);
  assert_int_equal(opt.param_dtype, FBN_DTYPE_FLOAT32);
  assert_int_equal(opt.device, FBN_DEVICE_CPU);
  bool training = false;
  assert_int_equal(fbn_module_is_training(m, &training), FBN_STATUS_SUCCESS);
  assert_true(training);
  int64_t nbt = -1;
  assert_int_equal(fbn_module_get_num_batches_tracked(m, &nbt), FBN_STATUS_SUCCESS);
  assert_int_equal(nbt, 0);
  const double want[6] = {1.0, 0.0, 0.0, 1.0, 0.0, 0.0};
  for (int b = 0; b < 6; b++) {
    double v[C];
    assert_true(fbn_module_has_buffer(m, all_buffers[b]));
    read_f64(m, all_buffers[b], v, C);
    assert_all_equal(v, C, want[b]);
  }
  fbn_module_destroy(m);
}

static void test_module_options_are_copied(void **state) {
  (void)state;
  fbn_module_options opt = fbnt_options(&(fbnt_spec){
      .c = 3, .eps = 1e-3, .momentum = 0.25, .cumulative = true, .dtype = FBN_DTYPE_FLOAT64});
  fbn_module *m = NULL;
  assert_int_equal(fbn_module_create(&opt, &m), FBN_STATUS_SUCCESS);
  opt.eps = 7.0;
  opt.num_features = 9;
  fbn_module_options got;
  assert_int_equal(fbn_module_get_options(m, &got), FBN_STATUS_SUCCESS);
  assert_int_equal(got.num_features, 3);
  assert_true(got.eps == 1e-3 && got.momentum == 0.25 && got.cumulative_average);
  assert_int_equal(got.param_dtype, FBN_DTYPE_FLOAT64);
  fbn_module_destroy(m);
}

static void test_module_set_training_toggles(void **state) {
  (void)state;
  fbn_module *m = make_module(C, FBN_DTYPE_FLOAT32, true, true);
  bool t = true;
  assert_int_equal(fbn_module_set_training(m, false), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_is_training(m, &t), FBN_STATUS_SUCCESS);
  assert_false(t);
  assert_int_equal(fbn_module_set_training(m, false), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_is_training(m, &t), FBN_STATUS_SUCCESS);
  assert_false(t);
  assert_int_equal(fbn_module_set_training(m, true), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_is_training(m, &t), FBN_STATUS_SUCCESS);
  assert_true(t);
  fbn_module_destroy(m);
}

static void test_module_buffers_roundtrip(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  for (int p = 0; p < 2; p++) {
    fbn_dtype pd = p == 0 ? FBN_DTYPE_FLOAT32 : FBN_DTYPE_FLOAT64;
    fbn_module *m = make_module(C, pd, true, true);
    for (int b = 0; b < 6; b++) {
      double v[C], got[C];
      float vf[C], gotf[C];
      /* write float64, read float64 and float32 */
      fbnt_fill_vector(&rng, v, C, 0.1, 2.0, true, false); /* not float-representable */
      assert_int_equal(fbn_module_write_buffer(m, all_buffers[b], FBN_DTYPE_FLOAT64, v, C),
                       FBN_STATUS_SUCCESS);
      read_f64(m, all_buffers[b], got, C);
      for (int i = 0; i < C; i++) {
        double want = pd == FBN_DTYPE_FLOAT32 ? (double)(float)v[i] : v[i];
        assert_true(got[i] == want);
      }
      memset(gotf, 0, sizeof gotf);
      assert_int_equal(fbn_module_read_buffer(m, all_buffers[b], FBN_DTYPE_FLOAT32, gotf, C),
                       FBN_STATUS_SUCCESS);
      for (int i = 0; i < C; i++) {
        assert_true(gotf[i] == (float)v[i]);
      }
      /* write float32, read both */
      for (int i = 0; i < C; i++) {
        vf[i] = (float)fbnt_rng_signed(&rng, 0.1, 2.0);
      }
      assert_int_equal(fbn_module_write_buffer(m, all_buffers[b], FBN_DTYPE_FLOAT32, vf, C),
                       FBN_STATUS_SUCCESS);
      read_f64(m, all_buffers[b], got, C);
      assert_int_equal(fbn_module_read_buffer(m, all_buffers[b], FBN_DTYPE_FLOAT32, gotf, C),
                       FBN_STATUS_SUCCESS);
      for (int i = 0; i < C; i++) {
        assert_true(got[i] == (double)vf[i]);
        assert_true(gotf[i] == vf[i]);
      }
    }
    /* the six buffers are distinct storage */
    for (int b = 0; b < 6; b++) {
      double v[C];
      for (int i = 0; i < C; i++) {
        v[i] = 10.0 * b + i;
      }
      assert_int_equal(fbn_module_write_buffer(m, all_buffers[b], FBN_DTYPE_FLOAT64, v, C),
                       FBN_STATUS_SUCCESS);
    }
    for (int b = 0; b < 6; b++) {
      double v[C];
      read_f64(m, all_buffers[b], v, C);
      for (int i = 0; i < C; i++) {
        assert_true(v[i] == 10.0 * b + i);
      }
    }
    fbn_module_destroy(m);
  }
}

static void test_module_buffer_data_is_storage(void **state) {
  (void)state;
  for (int p = 0; p < 2; p++) {
    fbn_dtype pd = p == 0 ? FBN_DTYPE_FLOAT32 : FBN_DTYPE_FLOAT64;
    fbn_module *m = make_module(C, pd, true, true);
    void *ptrs[6];
    for (int b = 0; b < 6; b++) {
      void *data = NULL;
      assert_int_equal(fbn_module_buffer_data(m, all_buffers[b], &data), FBN_STATUS_SUCCESS);
      assert_non_null(data);
      void *again = NULL;
      assert_int_equal(fbn_module_buffer_data(m, all_buffers[b], &again), FBN_STATUS_SUCCESS);
      assert_ptr_equal(data, again);
      for (int k = 0; k < b; k++) {
        assert_ptr_not_equal(ptrs[k], data);
      }
      ptrs[b] = data;
      /* writes through the pointer are seen by read_buffer ... */
      for (int i = 0; i < C; i++) {
        fbnt_store(pd, data, (size_t)i, 0.5 * i - b);
      }
      double v[C];
      read_f64(m, all_buffers[b], v, C);
      for (int i = 0; i < C; i++) {
        assert_true(v[i] == 0.5 * i - b);
      }
      /* ... and write_buffer lands in the pointer's storage */
      for (int i = 0; i < C; i++) {
        v[i] = 3.0 + i + b;
      }
      assert_int_equal(fbn_module_write_buffer(m, all_buffers[b], FBN_DTYPE_FLOAT64, v, C),
                       FBN_STATUS_SUCCESS);
      for (int i = 0; i < C; i++) {
        assert_true(fbnt_load(pd, data, (size_t)i) == 3.0 + i + b);
      }
    }
    fbn_module_destroy(m);
  }
}

static void test_module_absent_buffers(void **state) {
  (void)state;
  for (int variant = 0; variant < 3; variant++) {
    bool affine = variant != 0;
    bool track = variant != 1;
    if (variant == 2) {
      affine = track = false;
    }
    fbn_module *m = make_module(C, FBN_DTYPE_FLOAT32, affine, track);
    for (int b = 0; b < 6; b++) {
      bool running = all_buffers[b] == FBN_BUFFER_RUNNING_MEAN ||
                     all_buffers[b] == FBN_BUFFER_RUNNING_VAR;
      bool present = running ? track : affine;
      assert_int_equal(fbn_module_has_buffer(m, all_buffers[b]), present);
      double v[C] = {1, 2, 3, 4, 5};
      void *data = (void *)v;
      if (present) {
        continue;
      }
      assert_int_equal(fbn_module_read_buffer(m, all_buffers[b], FBN_DTYPE_FLOAT64, v, C),
                       FBN_STATUS_ABSENT);
      assert_true(v[0] == 1.0 && v[4] == 5.0); /* untouched */
      assert_int_equal(fbn_module_write_buffer(m, all_buffers[b], FBN_DTYPE_FLOAT64, v, C),
                       FBN_STATUS_ABSENT);
      assert_int_equal(fbn_module_buffer_data(m, all_buffers[b], &data), FBN_STATUS_ABSENT);
    }
    int64_t nbt = 99;
    if (track) {
      assert_int_equal(fbn_module_get_num_batches_tracked(m, &nbt), FBN_STATUS_SUCCESS);
      assert_int_equal(nbt, 0);
    } else {
      /* PyTorch: num_batches_tracked is None without running statistics */
      assert_int_equal(fbn_module_get_num_batches_tracked(m, &nbt), FBN_STATUS_ABSENT);
      assert_int_equal(fbn_module_set_num_batches_tracked(m, 4), FBN_STATUS_ABSENT);
    }
    /* documented no-op successes */
    assert_int_equal(fbn_module_zero_grad(m), FBN_STATUS_SUCCESS);
    assert_int_equal(fbn_module_reset_running_stats(m), FBN_STATUS_SUCCESS);
    assert_int_equal(fbn_module_reset_parameters(m), FBN_STATUS_SUCCESS);
    assert_false(fbn_module_has_buffer(m, (fbn_buffer)6));
    assert_false(fbn_module_has_buffer(m, (fbn_buffer)-1));
    fbn_module_destroy(m);
  }
  assert_false(fbn_module_has_buffer(NULL, FBN_BUFFER_WEIGHT));
}

static void randomize(fbnt_rng *rng, fbn_module *m) {
  for (int b = 0; b < 6; b++) {
    double v[C];
    fbnt_fill_vector(rng, v, C, 0.25, 2.0, true, true);
    assert_int_equal(fbn_module_write_buffer(m, all_buffers[b], FBN_DTYPE_FLOAT64, v, C),
                     FBN_STATUS_SUCCESS);
  }
  assert_int_equal(fbn_module_set_num_batches_tracked(m, 7), FBN_STATUS_SUCCESS);
}

static void test_module_reset_running_stats(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  fbn_module *m = make_module(C, FBN_DTYPE_FLOAT32, true, true);
  randomize(&rng, m);
  assert_int_equal(fbn_module_set_training(m, false), FBN_STATUS_SUCCESS);
  double before[6][C];
  for (int b = 0; b < 6; b++) {
    read_f64(m, all_buffers[b], before[b], C);
  }
  assert_int_equal(fbn_module_reset_running_stats(m), FBN_STATUS_SUCCESS);
  double v[C];
  read_f64(m, FBN_BUFFER_RUNNING_MEAN, v, C);
  assert_all_equal(v, C, 0.0);
  read_f64(m, FBN_BUFFER_RUNNING_VAR, v, C);
  assert_all_equal(v, C, 1.0);
  int64_t nbt = -1;
  assert_int_equal(fbn_module_get_num_batches_tracked(m, &nbt), FBN_STATUS_SUCCESS);
  assert_int_equal(nbt, 0);
  /* weight, bias, grads and mode untouched */
  const fbn_buffer kept[4] = {FBN_BUFFER_WEIGHT, FBN_BUFFER_BIAS, FBN_BUFFER_WEIGHT_GRAD,
                              FBN_BUFFER_BIAS_GRAD};
  const int kept_index[4] = {0, 1, 4, 5};
  for (int k = 0; k < 4; k++) {
    read_f64(m, kept[k], v, C);
    assert_memory_equal(v, before[kept_index[k]], sizeof v);
  }
  bool t = true;
  assert_int_equal(fbn_module_is_training(m, &t), FBN_STATUS_SUCCESS);
  assert_false(t);
  fbn_module_destroy(m);
}

static void test_module_reset_parameters(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  for (int p = 0; p < 2; p++) {
    fbn_module *m = make_module(C, p ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32, true, true);
    randomize(&rng, m);
    assert_int_equal(fbn_module_reset_parameters(m), FBN_STATUS_SUCCESS);
    const double want[4] = {1.0, 0.0, 0.0, 1.0};
    for (int b = 0; b < 4; b++) {
      double v[C];
      read_f64(m, all_buffers[b], v, C);
      assert_all_equal(v, C, want[b]);
    }
    int64_t nbt = -1;
    assert_int_equal(fbn_module_get_num_batches_tracked(m, &nbt), FBN_STATUS_SUCCESS);
    assert_int_equal(nbt, 0);
    bool t = false;
    assert_int_equal(fbn_module_is_training(m, &t), FBN_STATUS_SUCCESS);
    assert_true(t);
    fbn_module_destroy(m);
  }
}

static void test_module_num_batches_tracked_get_set(void **state) {
  (void)state;
  fbn_module *m = make_module(C, FBN_DTYPE_FLOAT32, true, true);
  const int64_t values[] = {12345, 0, 1, INT64_C(1) << 40};
  for (size_t i = 0; i < sizeof values / sizeof values[0]; i++) {
    int64_t got = -1;
    assert_int_equal(fbn_module_set_num_batches_tracked(m, values[i]), FBN_STATUS_SUCCESS);
    assert_int_equal(fbn_module_get_num_batches_tracked(m, &got), FBN_STATUS_SUCCESS);
    assert_int_equal(got, values[i]);
  }
  fbn_module_destroy(m);
}

static void test_module_zero_grad(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  fbn_module *m = make_module(C, FBN_DTYPE_FLOAT64, true, true);
  randomize(&rng, m);
  double w[C], rm[C];
  read_f64(m, FBN_BUFFER_WEIGHT, w, C);
  read_f64(m, FBN_BUFFER_RUNNING_MEAN, rm, C);
  assert_int_equal(fbn_module_zero_grad(m), FBN_STATUS_SUCCESS);
  double v[C];
  read_f64(m, FBN_BUFFER_WEIGHT_GRAD, v, C);
  assert_all_equal(v, C, 0.0);
  read_f64(m, FBN_BUFFER_BIAS_GRAD, v, C);
  assert_all_equal(v, C, 0.0);
  read_f64(m, FBN_BUFFER_WEIGHT, v, C);
  assert_memory_equal(v, w, sizeof v);
  read_f64(m, FBN_BUFFER_RUNNING_MEAN, v, C);
  assert_memory_equal(v, rm, sizeof v);
  fbn_module_destroy(m);
}

static void test_module_instances_are_independent(void **state) {
  (void)state;
  fbn_module *a = make_module(C, FBN_DTYPE_FLOAT32, true, true);
  fbn_module *b = make_module(C, FBN_DTYPE_FLOAT32, true, true);
  double v[C] = {2, 3, 4, 5, 6};
  assert_int_equal(fbn_module_write_buffer(a, FBN_BUFFER_WEIGHT, FBN_DTYPE_FLOAT64, v, C),
                   FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_set_num_batches_tracked(a, 5), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_set_training(a, false), FBN_STATUS_SUCCESS);
  read_f64(b, FBN_BUFFER_WEIGHT, v, C);
  assert_all_equal(v, C, 1.0);
  int64_t nbt = -1;
  bool t = false;
  assert_int_equal(fbn_module_get_num_batches_tracked(b, &nbt), FBN_STATUS_SUCCESS);
  assert_int_equal(nbt, 0);
  assert_int_equal(fbn_module_is_training(b, &t), FBN_STATUS_SUCCESS);
  assert_true(t);
  fbn_module_destroy(a);
  fbn_module_destroy(b);
}

static void test_status_strings_distinct(void **state) {
  (void)state;
  const char *names[FBN_STATUS_INVALID_FILE + 1];
  for (int s = 0; s <= FBN_STATUS_INVALID_FILE; s++) {
    names[s] = fbn_status_string((fbn_status)s);
    assert_non_null(names[s]);
    assert_true(strlen(names[s]) > 0);
    for (int k = 0; k < s; k++) {
      if (strcmp(names[k], names[s]) == 0) {
        fail_msg("status %d and %d share the string \"%s\"", k, s, names[s]);
      }
    }
  }
  assert_string_equal(fbn_status_string(FBN_STATUS_SUCCESS), "FBN_STATUS_SUCCESS");
  assert_string_equal(fbn_status_string(FBN_STATUS_INVALID_VALUE), "FBN_STATUS_INVALID_VALUE");
  assert_string_equal(fbn_status_string(FBN_STATUS_NO_DEVICE), "FBN_STATUS_NO_DEVICE");
  assert_non_null(fbn_status_string((fbn_status)999));
  assert_non_null(fbn_status_string((fbn_status)-1));
}

static void test_status_last_error_lifecycle(void **state) {
  (void)state;
  assert_non_null(fbn_last_error_message());
  fbn_module_options opt;
  fbn_module_options_init(&opt); /* num_features = 0: invalid */
  fbn_module *m = NULL;
  assert_int_equal(fbn_module_create(&opt, &m), FBN_STATUS_INVALID_VALUE);
  const char *msg = fbn_last_error_message();
  assert_non_null(msg);
  assert_true(strlen(msg) > 0);
  /* a successful call clears it */
  opt.num_features = 2;
  assert_int_equal(fbn_module_create(&opt, &m), FBN_STATUS_SUCCESS);
  assert_string_equal(fbn_last_error_message(), "");
  /* a failing call on a live module sets it again, a success clears it */
  assert_int_equal(fbn_module_set_num_batches_tracked(m, -1), FBN_STATUS_INVALID_VALUE);
  assert_true(strlen(fbn_last_error_message()) > 0);
  bool t;
  assert_int_equal(fbn_module_is_training(m, &t), FBN_STATUS_SUCCESS);
  assert_string_equal(fbn_last_error_message(), "");
  fbn_module_destroy(m);
}

static void *fail_on_thread(void *arg) {
  (void)arg;
  static int ok;
  ok = fbn_module_set_num_batches_tracked(NULL, 1) == FBN_STATUS_NULL_POINTER &&
       strlen(fbn_last_error_message()) > 0;
  return &ok;
}

static void test_status_last_error_is_thread_local(void **state) {
  (void)state;
  const fbn_module_options opt = fbnt_options(&(fbnt_spec){.c = 1});
  fbn_module *m = NULL;
  assert_int_equal(fbn_module_create(&opt, &m), FBN_STATUS_SUCCESS);
  assert_string_equal(fbn_last_error_message(), "");
  pthread_t t;
  void *result = NULL;
  assert_int_equal(pthread_create(&t, NULL, fail_on_thread, NULL), 0);
  assert_int_equal(pthread_join(t, &result), 0);
  assert_true(*(int *)result);
  /* the other thread's failure is not this thread's message */
  assert_string_equal(fbn_last_error_message(), "");
  fbn_module_destroy(m);
}

static void test_version_and_helpers(void **state) {
  (void)state;
  assert_int_equal(fbn_version(),
                   FBN_VERSION_MAJOR * 10000 + FBN_VERSION_MINOR * 100 + FBN_VERSION_PATCH);
  assert_int_equal(fbn_dtype_size(FBN_DTYPE_FLOAT32), 4);
  assert_int_equal(fbn_dtype_size(FBN_DTYPE_FLOAT64), 8);
  assert_int_equal(fbn_dtype_size(FBN_DTYPE_FLOAT16), 2);
  assert_int_equal(fbn_dtype_size(FBN_DTYPE_BFLOAT16), 2);
  assert_int_equal(fbn_dtype_size((fbn_dtype)17), 0);
  fbn_tensor_desc d = fbn_tensor_desc_make(4, 2, 8, 3, FBN_DTYPE_FLOAT64, FBN_LAYOUT_NHWC);
  assert_int_equal(d.n, 4);
  assert_int_equal(d.c, 2);
  assert_int_equal(d.h, 8);
  assert_int_equal(d.w, 3);
  assert_int_equal(d.dtype, FBN_DTYPE_FLOAT64);
  assert_int_equal(d.layout, FBN_LAYOUT_NHWC);
}

static void test_workspace_size_zero_on_cpu(void **state) {
  (void)state;
  fbn_module *m = make_module(2, FBN_DTYPE_FLOAT32, true, true);
  fbn_tensor_desc d = fbn_tensor_desc_make(4, 2, 8, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  for (int addend = 0; addend < 2; addend++) {
    size_t bytes = 12345;
    assert_int_equal(fbn_module_forward_workspace_size(m, &d, addend, &bytes),
                     FBN_STATUS_SUCCESS);
    assert_int_equal(bytes, 0);
    bytes = 12345;
    assert_int_equal(fbn_module_backward_workspace_size(m, &d, addend, &bytes),
                     FBN_STATUS_SUCCESS);
    assert_int_equal(bytes, 0);
  }
  fbn_module_destroy(m);
}

static void test_saved_create_destroy(void **state) {
  (void)state;
  fbn_saved *a = NULL, *b = NULL;
  assert_int_equal(fbn_saved_create(&a), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_saved_create(&b), FBN_STATUS_SUCCESS);
  assert_non_null(a);
  assert_non_null(b);
  assert_ptr_not_equal(a, b);
  fbn_saved_destroy(a);
  fbn_saved_destroy(b);
  fbn_saved_destroy(NULL);
  fbn_module_destroy(NULL);
}

int main(int argc, char **argv) {
  fbnt_parse_args(argc, argv);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_options_init_defaults),
      cmocka_unit_test(test_module_create_defaults),
      cmocka_unit_test(test_module_options_are_copied),
      cmocka_unit_test(test_module_set_training_toggles),
      cmocka_unit_test(test_module_buffers_roundtrip),
      cmocka_unit_test(test_module_buffer_data_is_storage),
      cmocka_unit_test(test_module_absent_buffers),
      cmocka_unit_test(test_module_reset_running_stats),
      cmocka_unit_test(test_module_reset_parameters),
      cmocka_unit_test(test_module_num_batches_tracked_get_set),
      cmocka_unit_test(test_module_zero_grad),
      cmocka_unit_test(test_module_instances_are_independent),
      cmocka_unit_test(test_status_strings_distinct),
      cmocka_unit_test(test_status_last_error_lifecycle),
      cmocka_unit_test(test_status_last_error_is_thread_local),
      cmocka_unit_test(test_version_and_helpers),
      cmocka_unit_test(test_workspace_size_zero_on_cpu),
      cmocka_unit_test(test_saved_create_destroy),
  };
  return cmocka_run_group_tests_name("module", tests, NULL, NULL);
}
