/*
 * Module state to and from safetensors files (fusedbn_state.h):
 *   round trips for every (affine, track_running_stats) and param dtype,
 *   through files and memory, one module and several per file; dtype
 *   conversions; fixtures written by PyTorch (tests/state/fixtures) loading
 *   to the exact values; atomic saving; one bad file per error, each
 *   checking the status, the message and that the module is unchanged;
 *   CUDA modules when a device exists.
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "fbn_testutil.h"
#include "fixtures/expected.h"
#include "fusedbn/fusedbn_state.h"

#ifndef FBN_STATE_FIXTURES
#error "FBN_STATE_FIXTURES (the fixtures directory) must be defined"
#endif

/* Modules of the bad-file tests. */
#define C 4

/* snprintf into a path buffer, failing the test on truncation. */
#define PATHF(out, ...)                                                                            \
  do {                                                                                             \
    int pathf_n_ = snprintf(out, sizeof(out), __VA_ARGS__);                                        \
    assert_true(pathf_n_ >= 0 && (size_t)pathf_n_ < sizeof(out));                                  \
  } while (0)

/* ---- helpers ------------------------------------------------------------ */

static char tmp_root[256];

static int suite_setup(void **state) {
  (void)state;
  const char *base = getenv("TMPDIR");
  snprintf(tmp_root, sizeof tmp_root, "%s/fbn-state-XXXXXX", base && *base ? base : "/tmp");
  return mkdtemp(tmp_root) != NULL ? 0 : -1;
}

static void remove_tree(const char *path) {
  struct stat sb;
  if (lstat(path, &sb) != 0)
    return;
  if (S_ISDIR(sb.st_mode)) {
    DIR *d = opendir(path);
    if (d != NULL) {
      struct dirent *e;
      while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
          continue;
        char child[1024];
        int n = snprintf(child, sizeof child, "%s/%s", path, e->d_name);
        if (n < 0 || (size_t)n >= sizeof child)
          continue;
        remove_tree(child);
      }
      closedir(d);
    }
    rmdir(path);
  } else {
    unlink(path);
  }
}

static int suite_teardown(void **state) {
  (void)state;
  remove_tree(tmp_root);
  return 0;
}

/* A fresh, empty directory for one test: <tmp_root>/<name>. */
static void test_dir(char *out, size_t size, const char *name) {
  int n = snprintf(out, size, "%s/%s", tmp_root, name);
  assert_true(n >= 0 && (size_t)n < size);
  remove_tree(out);
  assert_int_equal(mkdir(out, 0755), 0);
}

/* Number of directory entries other than . and .. */
static int dir_count(const char *dir) {
  DIR *d = opendir(dir);
  assert_non_null(d);
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
      n++;
  }
  closedir(d);
  return n;
}

static void write_file(const char *path, const void *data, size_t size) {
  FILE *f = fopen(path, "wb");
  assert_non_null(f);
  if (size)
    assert_int_equal(fwrite(data, 1, size, f), size);
  assert_int_equal(fclose(f), 0);
}

static unsigned char *read_file(const char *path, size_t *size) {
  FILE *f = fopen(path, "rb");
  assert_non_null(f);
  assert_int_equal(fseek(f, 0, SEEK_END), 0);
  long n = ftell(f);
  assert_true(n >= 0);
  rewind(f);
  unsigned char *buf = malloc((size_t)n + 1);
  assert_non_null(buf);
  assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
  fclose(f);
  *size = (size_t)n;
  return buf;
}

static fbn_module *make_module_on(fbn_device_type device, int64_t c, fbn_dtype dtype, bool affine,
                                  bool track, fbn_status *status) {
  const fbn_module_options o = fbnt_options(&(fbnt_spec){
      .c = c, .dtype = dtype, .no_affine = !affine, .no_track = !track, .device = device});
  fbn_module *m = NULL;
  *status = fbn_module_create(&o, &m);
  return m;
}

static fbn_module *make_module(int64_t c, fbn_dtype dtype, bool affine, bool track) {
  fbn_status st;
  fbn_module *m = make_module_on(FBN_DEVICE_CPU, c, dtype, affine, track, &st);
  assert_int_equal(st, FBN_STATUS_SUCCESS);
  assert_non_null(m);
  return m;
}

static const fbn_buffer state_buffers[4] = {FBN_BUFFER_WEIGHT, FBN_BUFFER_BIAS,
                                            FBN_BUFFER_RUNNING_MEAN, FBN_BUFFER_RUNNING_VAR};

/* Random values (never the initial ones) in every buffer the module has,
 * including the gradients, and a random num_batches_tracked. */
static void randomize(fbnt_rng *rng, fbn_module *m) {
  fbn_module_options o;
  assert_int_equal(fbn_module_get_options(m, &o), FBN_STATUS_SUCCESS);
  double *v = malloc((size_t)o.num_features * sizeof *v);
  assert_non_null(v);
  for (int b = 0; b < 6; b++) {
    if (!fbn_module_has_buffer(m, (fbn_buffer)b))
      continue;
    bool positive = b == FBN_BUFFER_RUNNING_VAR || b == FBN_BUFFER_WEIGHT;
    fbnt_fill_vector(rng, v, o.num_features, positive ? 0.25 : 0.01, positive ? 4.0 : 3.0,
                     !positive, false);
    assert_int_equal(
        fbn_module_write_buffer(m, (fbn_buffer)b, FBN_DTYPE_FLOAT64, v, (size_t)o.num_features),
        FBN_STATUS_SUCCESS);
  }
  free(v);
  if (o.track_running_stats)
    assert_int_equal(fbn_module_set_num_batches_tracked(m, 1 + fbnt_rng_u32(rng) % 100000),
                     FBN_STATUS_SUCCESS);
}

/* The four state buffers and num_batches_tracked of a and b are bitwise
 * equal (through float64 reads, exact for both param dtypes). */
static void assert_same_state(const fbn_module *a, const fbn_module *b) {
  fbn_module_options oa, ob;
  assert_int_equal(fbn_module_get_options(a, &oa), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_get_options(b, &ob), FBN_STATUS_SUCCESS);
  assert_int_equal(oa.num_features, ob.num_features);
  size_t c = (size_t)oa.num_features;
  double *va = malloc(c * sizeof *va), *vb = malloc(c * sizeof *vb);
  assert_true(va != NULL && vb != NULL);
  for (int k = 0; k < 4; k++) {
    bool ha = fbn_module_has_buffer(a, state_buffers[k]);
    assert_int_equal(ha, fbn_module_has_buffer(b, state_buffers[k]));
    if (!ha)
      continue;
    assert_int_equal(fbn_module_read_buffer(a, state_buffers[k], FBN_DTYPE_FLOAT64, va, c),
                     FBN_STATUS_SUCCESS);
    assert_int_equal(fbn_module_read_buffer(b, state_buffers[k], FBN_DTYPE_FLOAT64, vb, c),
                     FBN_STATUS_SUCCESS);
    for (size_t i = 0; i < c; i++) {
      if (memcmp(&va[i], &vb[i], sizeof va[i]) != 0)
        fail_msg("buffer %d element %zu: %.17g != %.17g", k, i, va[i], vb[i]);
    }
  }
  if (oa.track_running_stats) {
    int64_t na = -1, nb = -2;
    assert_int_equal(fbn_module_get_num_batches_tracked(a, &na), FBN_STATUS_SUCCESS);
    assert_int_equal(fbn_module_get_num_batches_tracked(b, &nb), FBN_STATUS_SUCCESS);
    assert_int_equal(na, nb);
  }
  free(va);
  free(vb);
}

static void assert_message_contains(const char *needle) {
  const char *msg = fbn_last_error_message();
  if (needle != NULL && strstr(msg, needle) == NULL)
    fail_msg("message \"%s\" does not contain \"%s\"", msg, needle);
  if (msg[0] == '\0')
    fail_msg("empty error message");
}

/* ---- round trips -------------------------------------------------------- */

static const char *const prefixes[] = {"", "layer1.0.bn1.", "features.3."};

static void test_state_roundtrip_file(void **state) {
  (void)state;
  char dir[512], path[600];
  test_dir(dir, sizeof dir, "roundtrip_file");
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  int n = 0;
  for (int dt = 0; dt < 2; dt++) {
    fbn_dtype dtype = dt ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
    for (int affine = 0; affine < 2; affine++) {
      for (int track = 0; track < 2; track++) {
        const char *prefix = prefixes[n % 3];
        int64_t c = 1 + n * 7;
        PATHF(path, "%s/state%d.safetensors", dir, n++);
        fbn_module *a = make_module(c, dtype, affine, track);
        fbn_module *b = make_module(c, dtype, affine, track);
        randomize(&rng, a);
        assert_int_equal(fbn_module_save_state(a, path, prefix), FBN_STATUS_SUCCESS);
        assert_string_equal(fbn_last_error_message(), "");
        assert_int_equal(fbn_module_load_state(b, path, prefix), FBN_STATUS_SUCCESS);
        assert_string_equal(fbn_last_error_message(), "");
        assert_same_state(a, b);
        /* Loading changed nothing but the state: b is still in training mode
         * and its gradients are still zero. */
        bool training = false;
        assert_int_equal(fbn_module_is_training(b, &training), FBN_STATUS_SUCCESS);
        assert_true(training);
        if (affine) {
          double g[64];
          assert_true((size_t)c <= 64);
          assert_int_equal(
              fbn_module_read_buffer(b, FBN_BUFFER_WEIGHT_GRAD, FBN_DTYPE_FLOAT64, g, (size_t)c),
              FBN_STATUS_SUCCESS);
          for (int64_t i = 0; i < c; i++)
            assert_true(g[i] == 0.0);
        }
        fbn_module_destroy(a);
        fbn_module_destroy(b);
      }
    }
  }
  /* Only the files, no temporaries left behind. */
  assert_int_equal(dir_count(dir), n);
}

static void test_state_roundtrip_memory(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  for (int dt = 0; dt < 2; dt++) {
    fbn_dtype dtype = dt ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
    for (int affine = 0; affine < 2; affine++) {
      for (int track = 0; track < 2; track++) {
        fbn_module *a = make_module(13, dtype, affine, track);
        fbn_module *b = make_module(13, dtype, affine, track);
        randomize(&rng, a);
        const fbn_module *list[1] = {a};
        const char *pre[1] = {"bn."};
        void *data = (void *)1;
        size_t size = 1;
        assert_int_equal(fbn_modules_save_state_to_memory(1, list, pre, &data, &size),
                         FBN_STATUS_SUCCESS);
        assert_non_null(data);
        /* 8-byte length, then a header padded to 8 bytes starting with '{'. */
        const unsigned char *p = data;
        uint64_t hl = 0;
        for (int i = 7; i >= 0; i--)
          hl = hl << 8 | p[i];
        assert_true(hl % 8 == 0 && 8 + hl <= size && p[8] == '{');
        assert_int_equal(fbn_module_load_state_from_memory(b, data, size, "bn."),
                         FBN_STATUS_SUCCESS);
        assert_same_state(a, b);
        fbn_state_free(data);
        fbn_module_destroy(a);
        fbn_module_destroy(b);
      }
    }
  }
  fbn_state_free(NULL);
}

/* Saved float64 state loads into a float32 module rounded to nearest, and
 * float32 state into a float64 module exactly. */
static void test_state_roundtrip_cross_dtype(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  const int64_t c = 9;
  for (int dir = 0; dir < 2; dir++) {
    fbn_dtype from = dir ? FBN_DTYPE_FLOAT32 : FBN_DTYPE_FLOAT64;
    fbn_dtype to = dir ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
    fbn_module *a = make_module(c, from, true, true);
    fbn_module *b = make_module(c, to, true, true);
    randomize(&rng, a);
    void *data;
    size_t size;
    const fbn_module *list[1] = {a};
    assert_int_equal(fbn_modules_save_state_to_memory(1, list, NULL, &data, &size),
                     FBN_STATUS_SUCCESS);
    assert_int_equal(fbn_module_load_state_from_memory(b, data, size, NULL), FBN_STATUS_SUCCESS);
    fbn_state_free(data);
    for (int k = 0; k < 4; k++) {
      double va[9], vb[9];
      assert_int_equal(fbn_module_read_buffer(a, state_buffers[k], FBN_DTYPE_FLOAT64, va, c),
                       FBN_STATUS_SUCCESS);
      assert_int_equal(fbn_module_read_buffer(b, state_buffers[k], FBN_DTYPE_FLOAT64, vb, c),
                       FBN_STATUS_SUCCESS);
      for (int64_t i = 0; i < c; i++) {
        double want = to == FBN_DTYPE_FLOAT32 ? (double)(float)va[i] : va[i];
        if (vb[i] != want)
          fail_msg("buffer %d [%lld]: %.17g, want %.17g", k, (long long)i, vb[i], want);
      }
    }
    int64_t na, nb;
    assert_int_equal(fbn_module_get_num_batches_tracked(a, &na), FBN_STATUS_SUCCESS);
    assert_int_equal(fbn_module_get_num_batches_tracked(b, &nb), FBN_STATUS_SUCCESS);
    assert_int_equal(na, nb);
    fbn_module_destroy(a);
    fbn_module_destroy(b);
  }
}

/* Several modules in one file, each loading its own entries; duplicate
 * keys are refused before anything is written. */
static void test_state_roundtrip_network(void **state) {
  (void)state;
  char dir[512], path[600];
  test_dir(dir, sizeof dir, "network");
  PATHF(path, "%s/net.safetensors", dir);
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  fbn_module *m[4] = {
      make_module(3, FBN_DTYPE_FLOAT32, true, true),
      make_module(8, FBN_DTYPE_FLOAT64, true, false),
      make_module(5, FBN_DTYPE_FLOAT32, false, true),
      make_module(2, FBN_DTYPE_FLOAT32, true, true),
  };
  const char *pre[4] = {"bn1.", "layer1.0.bn1.", "layer1.0.bn2.", "layer1.0.bn10."};
  for (int i = 0; i < 4; i++)
    randomize(&rng, m[i]);
  const fbn_module *list[4] = {m[0], m[1], m[2], m[3]};
  assert_int_equal(fbn_modules_save_state(4, list, pre, path), FBN_STATUS_SUCCESS);
  for (int i = 3; i >= 0; i--) {
    fbn_module_options o;
    assert_int_equal(fbn_module_get_options(m[i], &o), FBN_STATUS_SUCCESS);
    fbn_module *b = make_module(o.num_features, o.param_dtype, o.affine, o.track_running_stats);
    assert_int_equal(fbn_module_load_state(b, path, pre[i]), FBN_STATUS_SUCCESS);
    assert_same_state(m[i], b);
    fbn_module_destroy(b);
  }

  /* The same prefix twice: INVALID_VALUE, the file is left as it was. */
  size_t before_size, after_size;
  unsigned char *before = read_file(path, &before_size);
  const char *dup[2] = {"x.", "x."};
  assert_int_equal(fbn_modules_save_state(2, list, dup, path), FBN_STATUS_INVALID_VALUE);
  assert_message_contains("two modules write the key 'x.");
  unsigned char *after = read_file(path, &after_size);
  assert_int_equal(before_size, after_size);
  assert_memory_equal(before, after, before_size);
  assert_int_equal(dir_count(dir), 1);
  free(before);
  free(after);

  /* Argument errors. */
  void *data = (void *)1;
  size_t size = 1;
  assert_int_equal(fbn_modules_save_state_to_memory(0, list, NULL, &data, &size),
                   FBN_STATUS_INVALID_VALUE);
  assert_null(data);
  assert_int_equal(size, 0);
  const fbn_module *with_null[2] = {m[0], NULL};
  assert_int_equal(fbn_modules_save_state_to_memory(2, with_null, pre, &data, &size),
                   FBN_STATUS_NULL_POINTER);
  assert_int_equal(fbn_modules_save_state(1, NULL, NULL, path), FBN_STATUS_NULL_POINTER);
  assert_int_equal(fbn_modules_save_state(1, list, NULL, NULL), FBN_STATUS_NULL_POINTER);
  assert_int_equal(fbn_module_save_state(NULL, path, NULL), FBN_STATUS_NULL_POINTER);
  assert_int_equal(fbn_module_save_state(m[0], NULL, NULL), FBN_STATUS_NULL_POINTER);
  assert_int_equal(fbn_module_load_state(NULL, path, NULL), FBN_STATUS_NULL_POINTER);
  assert_int_equal(fbn_module_load_state(m[0], NULL, NULL), FBN_STATUS_NULL_POINTER);
  assert_int_equal(fbn_module_load_state_from_memory(NULL, "", 0, NULL), FBN_STATUS_NULL_POINTER);
  assert_int_equal(fbn_module_load_state_from_memory(m[0], NULL, 8, NULL), FBN_STATUS_NULL_POINTER);
  assert_message_contains("data is NULL");
  for (int i = 0; i < 4; i++)
    fbn_module_destroy(m[i]);
}

/* ---- files written by hand: conversions --------------------------------- */

static void put_le(unsigned char *p, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; i++)
    p[i] = (unsigned char)(v >> (8 * i));
}

/* le64(strlen(header)) + header + data. */
static unsigned char *make_blob(const char *header, const unsigned char *data, size_t data_len,
                                size_t *len) {
  size_t hl = strlen(header);
  unsigned char *b = malloc(8 + hl + data_len + 1);
  assert_non_null(b);
  put_le(b, hl, 8);
  memcpy(b + 8, header, hl);
  if (data_len)
    memcpy(b + 8 + hl, data, data_len);
  *len = 8 + hl + data_len;
  return b;
}

/* F16 weight, BF16 bias, F64 running_mean, F32 running_var and an I32
 * counter: each converts exactly (F64 rounds to nearest for a float32
 * module) into both param dtypes. */
static void test_state_load_converts_dtypes(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  double want[4][C];
  unsigned char data[8 * C + 8 * C + 8 * C + 4 * C + 4];
  unsigned char *p = data;
  for (int i = 0; i < C; i++) { /* weight F16 */
    uint16_t h = fbnt_float_to_half((float)fbnt_rng_signed(&rng, 0.01, 60000.0));
    want[0][i] = fbnt_half_to_float(h);
    put_le(p, h, 2);
    p += 2;
  }
  for (int i = 0; i < C; i++) { /* bias BF16 */
    uint16_t h = fbnt_float_to_bfloat16((float)fbnt_rng_signed(&rng, 1e-30, 1e30));
    want[1][i] = fbnt_bfloat16_to_float(h);
    put_le(p, h, 2);
    p += 2;
  }
  size_t f64_at = (size_t)(p - data);
  for (int i = 0; i < C; i++) { /* running_mean F64 (not representable in float) */
    double d = fbnt_rng_signed(&rng, 0.1, 10.0) * (1.0 + 0x1p-40);
    want[2][i] = d;
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    put_le(p, u, 8);
    p += 8;
  }
  for (int i = 0; i < C; i++) { /* running_var F32, subnormal included */
    float f = i == 0 ? 0x1p-140f : (float)fbnt_rng_uniform(&rng, 0.5, 2.0);
    want[3][i] = f;
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    put_le(p, u, 4);
    p += 4;
  }
  put_le(p, 123456, 4); /* num_batches_tracked I32 */
  p += 4;
  size_t n = (size_t)(p - data);
  (void)f64_at;
  char header[1024];
  snprintf(header, sizeof header,
           "{\"weight\":{\"dtype\":\"F16\",\"shape\":[%d],\"data_offsets\":[0,%d]},"
           "\"bias\":{\"dtype\":\"BF16\",\"shape\":[%d],\"data_offsets\":[%d,%d]},"
           "\"running_mean\":{\"dtype\":\"F64\",\"shape\":[%d],\"data_offsets\":[%d,%d]},"
           "\"running_var\":{\"dtype\":\"F32\",\"shape\":[%d],\"data_offsets\":[%d,%d]},"
           "\"num_batches_tracked\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[%d,%d]}}",
           C, 2 * C, C, 2 * C, 4 * C, C, 4 * C, 12 * C, C, 12 * C, 16 * C, 16 * C, 16 * C + 4);
  assert_int_equal((size_t)(16 * C + 4), n);
  size_t len;
  unsigned char *blob = make_blob(header, data, n, &len);
  for (int dt = 0; dt < 2; dt++) {
    fbn_dtype dtype = dt ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
    fbn_module *m = make_module(C, dtype, true, true);
    assert_int_equal(fbn_module_load_state_from_memory(m, blob, len, ""), FBN_STATUS_SUCCESS);
    for (int k = 0; k < 4; k++) {
      double got[C];
      assert_int_equal(fbn_module_read_buffer(m, state_buffers[k], FBN_DTYPE_FLOAT64, got, C),
                       FBN_STATUS_SUCCESS);
      for (int i = 0; i < C; i++) {
        double w = dtype == FBN_DTYPE_FLOAT32 ? (double)(float)want[k][i] : want[k][i];
        if (memcmp(&got[i], &w, sizeof w) != 0)
          fail_msg("%s buffer %d [%d]: %a, want %a", fbnt_dtype_str(dtype), k, i, got[i], w);
      }
    }
    int64_t nbt;
    assert_int_equal(fbn_module_get_num_batches_tracked(m, &nbt), FBN_STATUS_SUCCESS);
    assert_int_equal(nbt, 123456);
    fbn_module_destroy(m);
  }
  free(blob);
}

/* A BN layer saved by PyTorch in half precision (model.half()): weight,
 * bias, running_mean and running_var all F16 (or all BF16), an I64
 * counter. Every value, subnormals, -0, the largest finite one, Inf and NaN
 * included, widens exactly into both param dtypes and reads back as the
 * same half pattern; saving the module writes its parameters in its param
 * dtype (F32 here), which reloads to the same state. */
static void test_state_load_half_model(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  static const char *names[2] = {"F16", "BF16"};
  const fbn_dtype dtypes[2] = {FBN_DTYPE_FLOAT16, FBN_DTYPE_BFLOAT16};
  for (int t = 0; t < 2; t++) {
    const bool f16 = t == 0;
    uint16_t v[4][C];
    for (int k = 0; k < 4; k++)
      for (int i = 0; i < C; i++) {
        uint16_t h = (uint16_t)fbnt_rng_u32(&rng);
        if ((h & 0x7fffu) >= (f16 ? 0x7c00u : 0x7f80u))
          h &= 0xbfffu; /* finite; the specials come below */
        v[k][i] = h;
      }
    v[0][0] = 0x0001;                  /* the smallest subnormal */
    v[0][1] = 0x8000;                  /* -0 */
    v[1][2] = f16 ? 0x7c00 : 0x7f80;   /* +Inf */
    v[2][3] = f16 ? 0x7e00 : 0x7fc0;   /* a quiet NaN */
    v[3][0] = f16 ? 0x7bff : 0x7f7f;   /* the largest finite value */
    v[3][1] = f16 ? 0x03ff : 0x007f;   /* the largest subnormal */
    unsigned char data[8 + 4 * 2 * C];
    put_le(data, 777, 8); /* num_batches_tracked I64 first, as PyTorch aligns it */
    for (int k = 0; k < 4; k++)
      for (int i = 0; i < C; i++)
        put_le(data + 8 + (size_t)(k * C + i) * 2, v[k][i], 2);
    char header[1024];
    snprintf(header, sizeof header,
             "{\"__metadata__\":{\"format\":\"pt\"},"
             "\"num_batches_tracked\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[0,8]},"
             "\"weight\":{\"dtype\":\"%s\",\"shape\":[%d],\"data_offsets\":[8,%d]},"
             "\"bias\":{\"dtype\":\"%s\",\"shape\":[%d],\"data_offsets\":[%d,%d]},"
             "\"running_mean\":{\"dtype\":\"%s\",\"shape\":[%d],\"data_offsets\":[%d,%d]},"
             "\"running_var\":{\"dtype\":\"%s\",\"shape\":[%d],\"data_offsets\":[%d,%d]}}",
             names[t], C, 8 + 2 * C, names[t], C, 8 + 2 * C, 8 + 4 * C, names[t], C, 8 + 4 * C,
             8 + 6 * C, names[t], C, 8 + 6 * C, 8 + 8 * C);
    size_t len;
    unsigned char *blob = make_blob(header, data, sizeof data, &len);
    for (int dt = 0; dt < 2; dt++) {
      fbn_dtype pdt = dt ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
      fbn_module *m = make_module(C, pdt, true, true);
      fbn_status st = fbn_module_load_state_from_memory(m, blob, len, "");
      if (st != FBN_STATUS_SUCCESS)
        fail_msg("%s: load = %s: %s", names[t], fbn_status_string(st), fbn_last_error_message());
      for (int k = 0; k < 4; k++) {
        double got[C];
        uint16_t back[C];
        assert_int_equal(fbn_module_read_buffer(m, state_buffers[k], FBN_DTYPE_FLOAT64, got, C),
                         FBN_STATUS_SUCCESS);
        assert_int_equal(fbn_module_read_buffer(m, state_buffers[k], dtypes[t], back, C),
                         FBN_STATUS_SUCCESS);
        for (int i = 0; i < C; i++) {
          double w = f16 ? fbnt_half_to_float(v[k][i]) : fbnt_bfloat16_to_float(v[k][i]);
          if (memcmp(&got[i], &w, sizeof w) != 0)
            fail_msg("%s into %s: buffer %d [%d] = 0x%04x: %a, want %a", names[t],
                     fbnt_dtype_str(pdt), k, i, v[k][i], got[i], w);
          assert_int_equal(back[i], v[k][i]);
        }
      }
      int64_t nbt;
      assert_int_equal(fbn_module_get_num_batches_tracked(m, &nbt), FBN_STATUS_SUCCESS);
      assert_int_equal(nbt, 777);
      /* saved in the param dtype; reloads to the same state */
      const fbn_module *list[1] = {m};
      void *saved = NULL;
      size_t size = 0;
      assert_int_equal(fbn_modules_save_state_to_memory(1, list, NULL, &saved, &size),
                       FBN_STATUS_SUCCESS);
      uint64_t hl = 0;
      for (int b = 0; b < 8; b++)
        hl |= (uint64_t)((const unsigned char *)saved)[b] << (8 * b);
      char *text = calloc(1, (size_t)hl + 1);
      assert_non_null(text);
      memcpy(text, (const unsigned char *)saved + 8, (size_t)hl);
      assert_non_null(strstr(text, dt ? "\"F64\"" : "\"F32\""));
      assert_null(strstr(text, "F16"));
      free(text);
      fbn_module *again = make_module(C, pdt, true, true);
      assert_int_equal(fbn_module_load_state_from_memory(again, saved, size, ""),
                       FBN_STATUS_SUCCESS);
      fbnt_state a, b;
      fbnt_state_capture(m, &a);
      fbnt_state_capture(again, &b);
      bool same = true;
      for (int k = 0; k < 4; k++)
        same = same && memcmp(a.values[state_buffers[k]], b.values[state_buffers[k]],
                              C * sizeof(double)) == 0;
      assert_true(same);
      assert_int_equal(a.num_batches_tracked, b.num_batches_tracked);
      fbnt_state_free(&a);
      fbnt_state_free(&b);
      fbn_state_free(saved);
      fbn_module_destroy(again);
      fbn_module_destroy(m);
    }
    free(blob);
  }
}

/* ---- fixtures written by PyTorch ---------------------------------------- */

static void fixture_path(char *out, size_t size, const char *file) {
  int n = snprintf(out, size, "%s/%s", FBN_STATE_FIXTURES, file);
  assert_true(n >= 0 && (size_t)n < size);
}

static void test_state_fixtures_load_exact(void **state) {
  (void)state;
  size_t count = sizeof fixture_expects / sizeof fixture_expects[0];
  for (size_t f = 0; f < count; f++) {
    const fixture_expect *e = &fixture_expects[f];
    char path[1024];
    fixture_path(path, sizeof path, e->file);
    for (int dt = 0; dt < 2; dt++) {
      fbn_dtype dtype = dt ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
      fbn_module *m = make_module(FIXTURE_C, dtype, e->affine, e->track);
      fbnt_rng rng;
      fbnt_rng_for_test(&rng, e->file);
      randomize(&rng, m); /* so every loaded value must have been written */
      fbn_status st = fbn_module_load_state(m, path, e->prefix);
      if (st != FBN_STATUS_SUCCESS)
        fail_msg("%s: %s: %s", e->file, fbn_status_string(st), fbn_last_error_message());
      const double *want[4] = {e->weight, e->bias, e->running_mean, e->running_var};
      for (int k = 0; k < 4; k++) {
        if (!fbn_module_has_buffer(m, state_buffers[k]))
          continue;
        double got[FIXTURE_C];
        assert_int_equal(
            fbn_module_read_buffer(m, state_buffers[k], FBN_DTYPE_FLOAT64, got, FIXTURE_C),
            FBN_STATUS_SUCCESS);
        for (int i = 0; i < FIXTURE_C; i++) {
          double w = dtype == FBN_DTYPE_FLOAT32 ? (double)(float)want[k][i] : want[k][i];
          if (memcmp(&got[i], &w, sizeof w) != 0)
            fail_msg("%s prefix '%s' into %s: buffer %d [%d] = %a, want %a", e->file, e->prefix,
                     fbnt_dtype_str(dtype), k, i, got[i], w);
        }
      }
      if (e->track) {
        int64_t nbt = -1;
        assert_int_equal(fbn_module_get_num_batches_tracked(m, &nbt), FBN_STATUS_SUCCESS);
        assert_int_equal(nbt, e->num_batches_tracked);
        assert_true(nbt > 0);
      }
      fbn_module_destroy(m);
    }
  }
}

/* The PyTorch module's eval forward, reproduced after loading its state. */
static void test_state_fixtures_eval_forward_matches_torch(void **state) {
  (void)state;
  char path[1024];
  fixture_path(path, sizeof path, "bn_f32_affine1_track1.safetensors");
  fbn_module *m = make_module(FIXTURE_C, FBN_DTYPE_FLOAT32, true, true);
  assert_int_equal(fbn_module_load_state(m, path, NULL), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_set_training(m, false), FBN_STATUS_SUCCESS);
  fbn_tensor_desc desc =
      fbn_tensor_desc_make(2, FIXTURE_C, 3, 3, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  size_t n = fbnt_desc_numel(&desc);
  assert_int_equal(n, sizeof fixture_eval_x / sizeof fixture_eval_x[0]);
  float *x = fbnt_tensor_alloc(&desc), *y = fbnt_tensor_alloc(&desc);
  for (size_t i = 0; i < n; i++)
    x[i] = (float)fixture_eval_x[i];
  fbnt_tensor_poison(&desc, y);
  assert_int_equal(fbn_module_forward(m, &desc, x, NULL, y, NULL, NULL, 0), FBN_STATUS_SUCCESS);
  double *got = malloc(n * sizeof *got);
  assert_non_null(got);
  fbnt_tensor_to_ref(&desc, y, got);
  assert_true(fbnt_check_close("eval y vs torch", got, fixture_eval_y, n, 1e-5, 1e-6, &desc));
  free(got);
  fbnt_free(x);
  fbnt_free(y);
  fbn_module_destroy(m);
}

/* A fixture without weight/bias can't fill an affine module; one with them
 * loads into a module without (the extra entries are ignored). */
static void test_state_fixtures_config_mismatch(void **state) {
  (void)state;
  char path[1024];
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  fixture_path(path, sizeof path, "bn_f32_affine0_track1.safetensors");
  fbn_module *m = make_module(FIXTURE_C, FBN_DTYPE_FLOAT32, true, true);
  randomize(&rng, m);
  fbnt_state before, after;
  fbnt_state_capture(m, &before);
  assert_int_equal(fbn_module_load_state(m, path, ""), FBN_STATUS_INVALID_FILE);
  assert_message_contains("no tensor 'weight'");
  fbnt_state_capture(m, &after);
  assert_true(fbnt_state_equal(&before, &after));
  fbnt_state_free(&before);
  fbnt_state_free(&after);
  fbn_module_destroy(m);

  fixture_path(path, sizeof path, "bn_f32_affine1_track1.safetensors");
  m = make_module(FIXTURE_C, FBN_DTYPE_FLOAT32, false, true);
  assert_int_equal(fbn_module_load_state(m, path, ""), FBN_STATUS_SUCCESS);
  double rm[FIXTURE_C];
  assert_int_equal(
      fbn_module_read_buffer(m, FBN_BUFFER_RUNNING_MEAN, FBN_DTYPE_FLOAT64, rm, FIXTURE_C),
      FBN_STATUS_SUCCESS);
  assert_true(rm[0] == fixture_expects[0].running_mean[0]);
  fbn_module_destroy(m);

  /* Wrong num_features: SHAPE_MISMATCH. */
  m = make_module(FIXTURE_C + 1, FBN_DTYPE_FLOAT32, true, true);
  assert_int_equal(fbn_module_load_state(m, path, ""), FBN_STATUS_SHAPE_MISMATCH);
  assert_message_contains("num_features");
  fbn_module_destroy(m);
}

/* ---- atomic saving ------------------------------------------------------ */

static void test_state_save_replaces_existing_file(void **state) {
  (void)state;
  char dir[512], path[600];
  test_dir(dir, sizeof dir, "replace");
  PATHF(path, "%s/bn.safetensors", dir);
  write_file(path, "old contents", 12);
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  fbn_module *a = make_module(6, FBN_DTYPE_FLOAT32, true, true);
  fbn_module *b = make_module(6, FBN_DTYPE_FLOAT32, true, true);
  randomize(&rng, a);
  assert_int_equal(fbn_module_save_state(a, path, NULL), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_load_state(b, path, NULL), FBN_STATUS_SUCCESS);
  assert_same_state(a, b);
  assert_int_equal(dir_count(dir), 1);
  /* A relative path (no directory part) works as well. */
  char cwd[1024];
  assert_non_null(getcwd(cwd, sizeof cwd));
  assert_int_equal(chdir(dir), 0);
  randomize(&rng, a);
  assert_int_equal(fbn_module_save_state(a, "bn.safetensors", NULL), FBN_STATUS_SUCCESS);
  assert_int_equal(fbn_module_load_state(b, "bn.safetensors", NULL), FBN_STATUS_SUCCESS);
  assert_int_equal(chdir(cwd), 0);
  assert_same_state(a, b);
  assert_int_equal(dir_count(dir), 1);
  fbn_module_destroy(a);
  fbn_module_destroy(b);
}

static void test_state_save_missing_directory(void **state) {
  (void)state;
  char dir[512], path[700];
  test_dir(dir, sizeof dir, "missing_dir");
  PATHF(path, "%s/no/such/dir/bn.safetensors", dir);
  fbn_module *a = make_module(3, FBN_DTYPE_FLOAT32, true, true);
  assert_int_equal(fbn_module_save_state(a, path, NULL), FBN_STATUS_IO_ERROR);
  assert_message_contains("No such file or directory");
  assert_int_equal(dir_count(dir), 0);
  fbn_module_destroy(a);
}

/* The rename fails (the target is a non-empty directory): IO_ERROR, the
 * target untouched, the temporary file removed. */
static void test_state_save_rename_fails(void **state) {
  (void)state;
  char dir[512], path[600], inner[700];
  test_dir(dir, sizeof dir, "rename_fails");
  PATHF(path, "%s/bn.safetensors", dir);
  assert_int_equal(mkdir(path, 0755), 0);
  PATHF(inner, "%s/keep", path);
  write_file(inner, "x", 1);
  fbn_module *a = make_module(3, FBN_DTYPE_FLOAT32, true, true);
  assert_int_equal(fbn_module_save_state(a, path, NULL), FBN_STATUS_IO_ERROR);
  assert_message_contains("rename");
  assert_int_equal(dir_count(dir), 1);
  assert_int_equal(dir_count(path), 1);
  fbn_module_destroy(a);
}

/* A write error midway (file size limit, as a full disk would): IO_ERROR,
 * the old file intact, no temporary left. */
static void test_state_save_write_fails_keeps_old_file(void **state) {
  (void)state;
  char dir[512], path[600];
  test_dir(dir, sizeof dir, "write_fails");
  PATHF(path, "%s/bn.safetensors", dir);
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  fbn_module *small = make_module(2, FBN_DTYPE_FLOAT32, true, true);
  randomize(&rng, small);
  assert_int_equal(fbn_module_save_state(small, path, NULL), FBN_STATUS_SUCCESS);
  size_t old_size;
  unsigned char *old = read_file(path, &old_size);

  fbn_module *big = make_module(1000, FBN_DTYPE_FLOAT64, true, true);
  randomize(&rng, big);
  struct rlimit saved;
  assert_int_equal(getrlimit(RLIMIT_FSIZE, &saved), 0);
  struct rlimit lim = saved;
  lim.rlim_cur = 4096; /* the big module's file needs ~32 KB */
  void (*old_handler)(int) = signal(SIGXFSZ, SIG_IGN);
  assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
  fbn_status st = fbn_module_save_state(big, path, NULL);
  assert_int_equal(setrlimit(RLIMIT_FSIZE, &saved), 0);
  signal(SIGXFSZ, old_handler);
  assert_int_equal(st, FBN_STATUS_IO_ERROR);
  assert_message_contains("write");

  size_t new_size;
  unsigned char *now = read_file(path, &new_size);
  assert_int_equal(old_size, new_size);
  assert_memory_equal(old, now, old_size);
  assert_int_equal(dir_count(dir), 1);
  fbn_module *check = make_module(2, FBN_DTYPE_FLOAT32, true, true);
  assert_int_equal(fbn_module_load_state(check, path, NULL), FBN_STATUS_SUCCESS);
  assert_same_state(small, check);
  free(old);
  free(now);
  fbn_module_destroy(small);
  fbn_module_destroy(big);
  fbn_module_destroy(check);
}

/* ---- bad files: one per error ------------------------------------------ */

/* The valid layout for a C=4 float32 module with every entry. */
#define E_W "\"weight\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}"
#define E_B "\"bias\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[16,32]}"
#define E_RM "\"running_mean\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[32,48]}"
#define E_RV "\"running_var\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[48,64]}"
#define E_N "\"num_batches_tracked\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[64,72]}"
#define GOOD_HEADER "{" E_W "," E_B "," E_RM "," E_RV "," E_N "}"
#define GOOD_DATA 72

typedef struct bad_case {
  const char *name;
  const char *header; /* NULL: raw bytes below */
  size_t data_len;    /* bytes after the header (float32 values, then nbt) */
  int64_t nbt;        /* value at data offset 64 when data_len >= 72 */
  const char *raw;    /* raw file bytes when header is NULL */
  size_t raw_len;
  bool file_only; /* path cases: missing file, directory */
  fbn_status want;
  const char *needle; /* must appear in the message */
} bad_case;

static const bad_case bad_cases[] = {
    {"missing_file", NULL, 0, 0, NULL, 0, true, FBN_STATUS_IO_ERROR, "cannot open"},
    {"directory", NULL, 0, 0, NULL, 0, true, FBN_STATUS_IO_ERROR, "not a regular file"},
    {"empty_file", NULL, 0, 0, "", 0, false, FBN_STATUS_INVALID_FILE, "8-byte"},
    {"shorter_than_8_bytes", NULL, 0, 0, "\x02\0\0\0\0\0\0", 7, false, FBN_STATUS_INVALID_FILE,
     "8-byte"},
    {"header_longer_than_file", NULL, 0, 0, "\x40\0\0\0\0\0\0\0{}", 10, false,
     FBN_STATUS_INVALID_FILE, "larger than"},
    {"header_length_absurd", NULL, 0, 0, "\0\0\0\0\0\0\0\x80{}", 10, false, FBN_STATUS_INVALID_FILE,
     "limit"},
    {"header_length_over_100MB", NULL, 0, 0, "\x01\xe1\xf5\x05\0\0\0\0{}", 10, false,
     FBN_STATUS_INVALID_FILE, "100000000-byte limit"},
    {"zero_header_length", NULL, 0, 0, "\0\0\0\0\0\0\0\0", 8, false, FBN_STATUS_INVALID_FILE,
     "start with '{'"},
    {"header_not_object", "[1,2]", 0, 0, NULL, 0, false, FBN_STATUS_INVALID_FILE, "start with '{'"},
    {"invalid_json", "{\"weight\":{\"dtype\":\"F32\",", 0, 0, NULL, 0, false,
     FBN_STATUS_INVALID_FILE, "not valid JSON"},
    {"invalid_json_trailing_garbage", GOOD_HEADER "x", GOOD_DATA, 3, NULL, 0, false,
     FBN_STATUS_INVALID_FILE, "not valid JSON"},
    {"invalid_utf8", "{\"w\xff\":{}}", 0, 0, NULL, 0, false, FBN_STATUS_INVALID_FILE,
     "not valid JSON"},
    {"duplicate_key", "{" E_W "," E_W "," E_B "," E_RM "," E_RV "," E_N "}", GOOD_DATA, 3, NULL, 0,
     false, FBN_STATUS_INVALID_FILE, "duplicate"},
    {"entry_not_object", "{\"weight\":[0,16]}", 0, 0, NULL, 0, false, FBN_STATUS_INVALID_FILE,
     "must be an object"},
    {"missing_dtype",
     "{\"weight\":{\"shape\":[4],\"data_offsets\":[0,16]}," E_B "," E_RM "," E_RV "," E_N "}",
     GOOD_DATA, 3, NULL, 0, false, FBN_STATUS_INVALID_FILE, "'weight' has no dtype"},
    {"missing_shape",
     "{" E_W "," E_B ",\"running_mean\":{\"dtype\":\"F32\",\"data_offsets\":[32,48]}," E_RV "," E_N
     "}",
     GOOD_DATA, 3, NULL, 0, false, FBN_STATUS_INVALID_FILE, "'running_mean' has no shape"},
    {"missing_data_offsets",
     "{" E_W "," E_B "," E_RM "," E_RV ",\"num_batches_tracked\":{\"dtype\":\"I64\",\"shape\":[]}}",
     GOOD_DATA, 3, NULL, 0, false, FBN_STATUS_INVALID_FILE,
     "'num_batches_tracked' has no data_offsets"},
    {"unknown_dtype",
     "{\"weight\":{\"dtype\":\"F128\",\"shape\":[4],\"data_offsets\":[0,16]}," E_B "," E_RM "," E_RV
     "," E_N "}",
     GOOD_DATA, 3, NULL, 0, false, FBN_STATUS_INVALID_FILE, "unknown dtype \"F128\""},
    {"unknown_dtype_other_entry",
     "{" E_W "," E_B "," E_RM "," E_RV "," E_N
     ",\"conv.weight\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[72,74]}}",
     GOOD_DATA + 2, 3, NULL, 0, false, FBN_STATUS_INVALID_FILE, "unknown dtype \"Q4\""},
    {"dtype_not_a_float",
     "{\"weight\":{\"dtype\":\"I32\",\"shape\":[4],\"data_offsets\":[0,16]}," E_B "," E_RM "," E_RV
     "," E_N "}",
     GOOD_DATA, 3, NULL, 0, false, FBN_STATUS_INVALID_FILE, "must be F16, BF16, F32 or F64"},
    {"counter_dtype_float",
     "{" E_W "," E_B "," E_RM "," E_RV
     ",\"num_batches_tracked\":{\"dtype\":\"F64\",\"shape\":[],\"data_offsets\":[64,72]}}",
     GOOD_DATA, 3, NULL, 0, false, FBN_STATUS_INVALID_FILE, "I64 or I32"},
    {"shape_not_num_features",
     "{" E_W "," E_B "," E_RM ",\"running_var\":{\"dtype\":\"F32\",\"shape\":[5],"
     "\"data_offsets\":[48,68]},\"num_batches_tracked\":{\"dtype\":\"I64\",\"shape\":[],"
     "\"data_offsets\":[68,76]}}",
     GOOD_DATA + 4, 0, NULL, 0, false, FBN_STATUS_SHAPE_MISMATCH, "expected [4] (num_features)"},
    {"shape_wrong_rank",
     "{\"weight\":{\"dtype\":\"F32\",\"shape\":[1,4],\"data_offsets\":[0,16]}," E_B "," E_RM
     "," E_RV "," E_N "}",
     GOOD_DATA, 3, NULL, 0, false, FBN_STATUS_SHAPE_MISMATCH, "[1, 4]"},
    {"counter_not_scalar",
     "{" E_W "," E_B "," E_RM "," E_RV
     ",\"num_batches_tracked\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[64,72]}}",
     GOOD_DATA, 3, NULL, 0, false, FBN_STATUS_SHAPE_MISMATCH, "scalar"},
    {"shape_not_integers",
     "{\"weight\":{\"dtype\":\"F32\",\"shape\":[\"4\"],\"data_offsets\":[0,16]}," E_B "," E_RM
     "," E_RV "," E_N "}",
     GOOD_DATA, 3, NULL, 0, false, FBN_STATUS_INVALID_FILE, "shape[0]"},
    {"shape_negative",
     "{\"weight\":{\"dtype\":\"F32\",\"shape\":[-4],\"data_offsets\":[0,16]}," E_B "," E_RM "," E_RV
     "," E_N "}",
     GOOD_DATA, 3, NULL, 0, false, FBN_STATUS_INVALID_FILE, "non-negative"},
    {"shape_overflow",
     "{" E_W "," E_B "," E_RM "," E_RV "," E_N
     ",\"huge\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4],\"data_offsets\":[72,72]}}",
     GOOD_DATA, 3, NULL, 0, false, FBN_STATUS_INVALID_FILE, "overflows"},
    {"offsets_out_of_range",
     "{" E_W "," E_B "," E_RM ",\"running_var\":{\"dtype\":\"F32\",\"shape\":[4],"
     "\"data_offsets\":[48,64]},\"num_batches_tracked\":{\"dtype\":\"I64\",\"shape\":[],"
     "\"data_offsets\":[64,72]}}",
     64, 0, NULL, 0, false, FBN_STATUS_INVALID_FILE, "out of range"},
    {"offsets_overlap",
     "{" E_W ",\"bias\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}," E_RM "," E_RV
     "," E_N "}",
     GOOD_DATA, 3, NULL, 0, false, FBN_STATUS_INVALID_FILE, "overlaps"},
    {"offsets_gap",
     "{" E_W ",\"bias\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[20,36]},"
     "\"running_mean\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[36,52]},"
     "\"running_var\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[52,68]},"
     "\"num_batches_tracked\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[68,76]}}",
     GOOD_DATA + 4, 0, NULL, 0, false, FBN_STATUS_INVALID_FILE, "without gaps"},
    {"offsets_size_mismatch",
     "{\"weight\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,12]},"
     "\"bias\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[12,28]},"
     "\"running_mean\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[28,44]},"
     "\"running_var\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[44,60]},"
     "\"num_batches_tracked\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[60,68]}}",
     68, 0, NULL, 0, false, FBN_STATUS_INVALID_FILE, "needs 16"},
    {"offsets_reversed",
     "{\"weight\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[16,0]}," E_B "," E_RM "," E_RV
     "," E_N "}",
     GOOD_DATA, 3, NULL, 0, false, FBN_STATUS_INVALID_FILE, "begin must not exceed end"},
    {"offsets_not_a_pair",
     "{\"weight\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16,32]}," E_B "," E_RM
     "," E_RV "," E_N "}",
     GOOD_DATA, 3, NULL, 0, false, FBN_STATUS_INVALID_FILE, "[begin, end]"},
    {"trailing_bytes", GOOD_HEADER, GOOD_DATA + 8, 3, NULL, 0, false, FBN_STATUS_INVALID_FILE,
     "cover the byte buffer exactly"},
    {"missing_required_key",
     "{" E_W "," E_B "," E_RM
     ",\"num_batches_tracked\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[48,56]}}",
     56, 0, NULL, 0, false, FBN_STATUS_INVALID_FILE, "no tensor 'running_var'"},
    {"counter_negative", GOOD_HEADER, GOOD_DATA, -1, NULL, 0, false, FBN_STATUS_INVALID_FILE,
     ">= 0"},
    {"metadata_not_strings",
     "{\"__metadata__\":{\"format\":\"pt\",\"epoch\":3}," E_W "," E_B "," E_RM "," E_RV "," E_N "}",
     GOOD_DATA, 3, NULL, 0, false, FBN_STATUS_INVALID_FILE, "__metadata__[\"epoch\"]"},
    {"metadata_not_object", "{\"__metadata__\":[\"pt\"]," E_W "," E_B "," E_RM "," E_RV "," E_N "}",
     GOOD_DATA, 3, NULL, 0, false, FBN_STATUS_INVALID_FILE, "__metadata__ must be an object"},
};

/* Fill the data of a bad case: float32 values, then the counter. */
static unsigned char *bad_case_bytes(const bad_case *bc, fbnt_rng *rng, size_t *len) {
  if (bc->header == NULL) {
    unsigned char *b = malloc(bc->raw_len + 1);
    assert_non_null(b);
    memcpy(b, bc->raw, bc->raw_len);
    *len = bc->raw_len;
    return b;
  }
  unsigned char *data = calloc(bc->data_len + 1, 1);
  assert_non_null(data);
  for (size_t i = 0; i + 4 <= bc->data_len && i < 64; i += 4) {
    float f = (float)fbnt_rng_signed(rng, 0.1, 5.0);
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    put_le(data + i, u, 4);
  }
  if (bc->data_len >= 72)
    put_le(data + 64, (uint64_t)bc->nbt, 8);
  unsigned char *b = make_blob(bc->header, data, bc->data_len, len);
  free(data);
  return b;
}

static void test_state_bad_file(void **state) {
  const bad_case *bc = *state;
  char dir[512], path[700];
  PATHF(dir, "bad_%s", bc->name);
  char full[600];
  test_dir(full, sizeof full, dir);
  PATHF(path, "%s/bad.safetensors", full);
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, bc->name);

  size_t len = 0;
  unsigned char *bytes = NULL;
  if (strcmp(bc->name, "directory") == 0) {
    assert_int_equal(mkdir(path, 0755), 0);
  } else if (!bc->file_only) {
    bytes = bad_case_bytes(bc, &rng, &len);
    write_file(path, bytes, len);
  }

  for (int dt = 0; dt < 2; dt++) {
    fbn_dtype dtype = dt ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
    fbn_module *m = make_module(C, dtype, true, true);
    randomize(&rng, m);
    fbnt_state before, after;
    fbnt_state_capture(m, &before);

    fbn_status st = fbn_module_load_state(m, path, NULL);
    if (st != bc->want)
      fail_msg("%s (file): got %s, want %s: %s", bc->name, fbn_status_string(st),
               fbn_status_string(bc->want), fbn_last_error_message());
    assert_message_contains(bc->needle);
    if (!bc->file_only) /* the message names the file */
      assert_message_contains("bad.safetensors");
    fbnt_state_capture(m, &after);
    assert_true(fbnt_state_equal(&before, &after));
    fbnt_state_free(&after);

    if (!bc->file_only) {
      st = fbn_module_load_state_from_memory(m, bytes, len, NULL);
      if (st != bc->want)
        fail_msg("%s (memory): got %s, want %s: %s", bc->name, fbn_status_string(st),
                 fbn_status_string(bc->want), fbn_last_error_message());
      assert_message_contains(bc->needle);
      fbnt_state_capture(m, &after);
      assert_true(fbnt_state_equal(&before, &after));
      fbnt_state_free(&after);
    }
    fbnt_state_free(&before);
    fbn_module_destroy(m);
  }
  free(bytes);
}

/* The good layout the bad cases start from does load (so each bad case
 * fails for its own reason), __metadata__ with strings included, and so
 * does the same file under a prefix only with that prefix. */
static void test_state_bad_file_baseline_loads(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  const bad_case good = {"good", GOOD_HEADER, GOOD_DATA, 77, NULL, 0, false, 0, NULL};
  const bad_case meta = {"meta",
                         "{\"__metadata__\":{\"format\":\"pt\",\"note\":\"x\"}," E_W "," E_B
                         "," E_RM "," E_RV "," E_N "}  ",
                         GOOD_DATA,
                         78,
                         NULL,
                         0,
                         false,
                         0,
                         NULL};
  const bad_case null_meta = {
      "null_meta", "{\"__metadata__\":null," E_W "," E_B "," E_RM "," E_RV "," E_N "}",
      GOOD_DATA,   79,
      NULL,        0,
      false,       0,
      NULL};
  const bad_case *cases[3] = {&good, &meta, &null_meta};
  for (int i = 0; i < 3; i++) {
    size_t len;
    unsigned char *bytes = bad_case_bytes(cases[i], &rng, &len);
    fbn_module *m = make_module(C, FBN_DTYPE_FLOAT32, true, true);
    fbn_status st = fbn_module_load_state_from_memory(m, bytes, len, "");
    if (st != FBN_STATUS_SUCCESS)
      fail_msg("%s: %s", cases[i]->name, fbn_last_error_message());
    int64_t nbt;
    assert_int_equal(fbn_module_get_num_batches_tracked(m, &nbt), FBN_STATUS_SUCCESS);
    assert_int_equal(nbt, cases[i]->nbt);
    double w[C];
    assert_int_equal(fbn_module_read_buffer(m, FBN_BUFFER_RUNNING_VAR, FBN_DTYPE_FLOAT64, w, C),
                     FBN_STATUS_SUCCESS);
    for (int j = 0; j < C; j++) {
      const unsigned char *p = bytes + 8 + strlen(cases[i]->header) + 48 + 4 * j;
      uint32_t u =
          (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
      float f;
      memcpy(&f, &u, sizeof f);
      assert_true(w[j] == (double)f);
    }
    /* A prefix the file does not use: every key is missing. */
    assert_int_equal(fbn_module_load_state_from_memory(m, bytes, len, "layer1."),
                     FBN_STATUS_INVALID_FILE);
    assert_message_contains("no tensor 'layer1.weight'");
    fbn_module_destroy(m);
    free(bytes);
  }
}

/* ---- CUDA modules ------------------------------------------------------- */

static void test_state_cuda_roundtrip(void **state) {
  (void)state;
  fbn_status st;
  fbn_module *probe = make_module_on(FBN_DEVICE_CUDA, 3, FBN_DTYPE_FLOAT32, true, true, &st);
  if (st == FBN_STATUS_NO_DEVICE) {
    print_message("[  SKIPPED ] no CUDA device: %s\n", fbn_last_error_message());
    skip();
  }
  assert_int_equal(st, FBN_STATUS_SUCCESS);
  fbn_module_destroy(probe);
  char dir[512], path[600];
  test_dir(dir, sizeof dir, "cuda");
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  int n = 0;
  for (int dt = 0; dt < 2; dt++) {
    fbn_dtype dtype = dt ? FBN_DTYPE_FLOAT64 : FBN_DTYPE_FLOAT32;
    for (int affine = 0; affine < 2; affine++) {
      for (int track = 0; track < 2; track++) {
        PATHF(path, "%s/cuda%d.safetensors", dir, n++);
        /* CUDA -> file -> CPU and file -> CUDA. */
        fbn_module *g = make_module_on(FBN_DEVICE_CUDA, 37, dtype, affine, track, &st);
        assert_int_equal(st, FBN_STATUS_SUCCESS);
        fbn_module *c = make_module(37, dtype, affine, track);
        fbn_module *g2 = make_module_on(FBN_DEVICE_CUDA, 37, dtype, affine, track, &st);
        assert_int_equal(st, FBN_STATUS_SUCCESS);
        randomize(&rng, g);
        assert_int_equal(fbn_module_save_state(g, path, "bn."), FBN_STATUS_SUCCESS);
        assert_int_equal(fbn_module_load_state(c, path, "bn."), FBN_STATUS_SUCCESS);
        assert_same_state(g, c);
        assert_int_equal(fbn_module_load_state(g2, path, "bn."), FBN_STATUS_SUCCESS);
        assert_same_state(g, g2);
        /* A bad file leaves the CUDA module unchanged. */
        fbnt_state before, after;
        fbnt_state_capture(g2, &before);
        assert_int_equal(fbn_module_load_state(g2, path, "other."),
                         affine || track ? FBN_STATUS_INVALID_FILE : FBN_STATUS_SUCCESS);
        fbnt_state_capture(g2, &after);
        assert_true(fbnt_state_equal(&before, &after));
        fbnt_state_free(&before);
        fbnt_state_free(&after);
        fbn_module_destroy(g);
        fbn_module_destroy(g2);
        fbn_module_destroy(c);
      }
    }
  }
}

/* ---- bad arguments: status, message naming the call, nothing changed ---- */

static void expect_arg_failure(fbn_status got, fbn_status want, const char *call,
                               const char *name, fbn_module *const *mods,
                               const fbnt_state *before, int nmods, const char *dir, int line) {
  char msg[1024];
  snprintf(msg, sizeof msg, "%s", fbn_last_error_message());
  if (got != want)
    fail_msg("line %d: %s returned %s, want %s (message: \"%s\")", line, call,
             fbn_status_string(got), fbn_status_string(want), msg);
  if (msg[0] == '\0')
    fail_msg("line %d: %s failed with an empty message", line, call);
  if (strstr(msg, name) == NULL)
    fail_msg("line %d: %s: message \"%s\" does not name %s", line, call, msg, name);
  for (int i = 0; i < nmods; i++) {
    fbnt_state after;
    fbnt_state_capture(mods[i], &after);
    bool same = fbnt_state_equal(&before[i], &after);
    fbnt_state_free(&after);
    if (!same)
      fail_msg("line %d: %s changed module %d", line, call, i);
  }
  /* the directory holds the one good file only: nothing written or left */
  if (dir_count(dir) != 1)
    fail_msg("line %d: %s left %d entries in the directory", line, call, dir_count(dir));
}

#define ARG_FAILS(name, call, want)                                                             \
  expect_arg_failure((call), (want), #call, #name, mods, before, 2, dir, __LINE__)

static void test_state_bad_arguments(void **state) {
  (void)state;
  fbnt_rng rng;
  fbnt_rng_for_test(&rng, __func__);
  char dir[512], path[600], missing[600];
  test_dir(dir, sizeof dir, "bad_arguments");
  PATHF(path, "%s/good.safetensors", dir);
  PATHF(missing, "%s/new.safetensors", dir);
  fbn_module *mods[2] = {make_module(C, FBN_DTYPE_FLOAT32, true, true),
                         make_module(C, FBN_DTYPE_FLOAT64, true, true)};
  randomize(&rng, mods[0]);
  randomize(&rng, mods[1]);
  /* a good file from a third module, so a load that went ahead would change mods[i] */
  fbn_module *src = make_module(C, FBN_DTYPE_FLOAT32, true, true);
  randomize(&rng, src);
  assert_int_equal(fbn_module_save_state(src, path, NULL), FBN_STATUS_SUCCESS);
  void *blob = NULL;
  size_t blob_size = 0;
  const fbn_module *one[1] = {src};
  assert_int_equal(fbn_modules_save_state_to_memory(1, one, NULL, &blob, &blob_size),
                   FBN_STATUS_SUCCESS);
  fbnt_state before[2];
  fbnt_state_capture(mods[0], &before[0]);
  fbnt_state_capture(mods[1], &before[1]);

  ARG_FAILS(fbn_module_load_state, fbn_module_load_state(NULL, path, NULL),
            FBN_STATUS_NULL_POINTER);
  ARG_FAILS(fbn_module_load_state, fbn_module_load_state(mods[0], NULL, NULL),
            FBN_STATUS_NULL_POINTER);
  ARG_FAILS(fbn_module_load_state, fbn_module_load_state(mods[0], NULL, "p."),
            FBN_STATUS_NULL_POINTER);
  ARG_FAILS(fbn_module_load_state_from_memory,
            fbn_module_load_state_from_memory(NULL, blob, blob_size, NULL),
            FBN_STATUS_NULL_POINTER);
  ARG_FAILS(fbn_module_load_state_from_memory,
            fbn_module_load_state_from_memory(mods[1], NULL, blob_size, NULL),
            FBN_STATUS_NULL_POINTER);
  /* documented: NULL with size 0 is an (empty, so invalid) file */
  ARG_FAILS(fbn_module_load_state_from_memory,
            fbn_module_load_state_from_memory(mods[1], NULL, 0, NULL), FBN_STATUS_INVALID_FILE);
  ARG_FAILS(fbn_module_load_state_from_memory,
            fbn_module_load_state_from_memory(mods[1], blob, 0, NULL), FBN_STATUS_INVALID_FILE);

  ARG_FAILS(fbn_module_save_state, fbn_module_save_state(NULL, missing, NULL),
            FBN_STATUS_NULL_POINTER);
  ARG_FAILS(fbn_module_save_state, fbn_module_save_state(mods[0], NULL, "x."),
            FBN_STATUS_NULL_POINTER);

  const fbn_module *list[2] = {mods[0], mods[1]};
  const fbn_module *with_null[2] = {mods[0], NULL};
  const char *const pre[2] = {"a.", "b."};
  const char *const same[2] = {"a.", "a."};
  ARG_FAILS(fbn_modules_save_state, fbn_modules_save_state(0, list, pre, missing),
            FBN_STATUS_INVALID_VALUE);
  ARG_FAILS(fbn_modules_save_state, fbn_modules_save_state(2, NULL, pre, missing),
            FBN_STATUS_NULL_POINTER);
  ARG_FAILS(fbn_modules_save_state, fbn_modules_save_state(2, with_null, pre, missing),
            FBN_STATUS_NULL_POINTER);
  ARG_FAILS(fbn_modules_save_state, fbn_modules_save_state(2, list, pre, NULL),
            FBN_STATUS_NULL_POINTER);
  ARG_FAILS(fbn_modules_save_state, fbn_modules_save_state(2, list, same, missing),
            FBN_STATUS_INVALID_VALUE);
  ARG_FAILS(fbn_modules_save_state, fbn_modules_save_state(2, list, NULL, missing),
            FBN_STATUS_INVALID_VALUE); /* no prefixes: both write "weight" */

  /* to_memory: on failure *data is NULL and *size 0 */
  struct {
    size_t count;
    const fbn_module *const *modules;
    const char *const *prefixes;
    fbn_status want;
  } mem_cases[] = {
      {0, list, pre, FBN_STATUS_INVALID_VALUE},
      {2, NULL, pre, FBN_STATUS_NULL_POINTER},
      {2, with_null, pre, FBN_STATUS_NULL_POINTER},
      {2, list, same, FBN_STATUS_INVALID_VALUE},
  };
  for (size_t i = 0; i < sizeof mem_cases / sizeof mem_cases[0]; i++) {
    void *data = (void *)&rng;
    size_t size = 99;
    ARG_FAILS(fbn_modules_save_state_to_memory,
              fbn_modules_save_state_to_memory(mem_cases[i].count, mem_cases[i].modules,
                                               mem_cases[i].prefixes, &data, &size),
              mem_cases[i].want);
    assert_null(data);
    assert_int_equal(size, 0);
  }
  size_t size = 99;
  void *data = (void *)&rng;
  ARG_FAILS(fbn_modules_save_state_to_memory,
            fbn_modules_save_state_to_memory(2, list, pre, NULL, &size), FBN_STATUS_NULL_POINTER);
  ARG_FAILS(fbn_modules_save_state_to_memory,
            fbn_modules_save_state_to_memory(2, list, pre, &data, NULL), FBN_STATUS_NULL_POINTER);
  assert_null(data);
  fbn_state_free(NULL);

  fbnt_state_free(&before[0]);
  fbnt_state_free(&before[1]);
  fbn_state_free(blob);
  fbn_module_destroy(src);
  fbn_module_destroy(mods[0]);
  fbn_module_destroy(mods[1]);
}

int main(int argc, char **argv) {
  fbnt_parse_args(argc, argv);
  enum { NBAD = sizeof bad_cases / sizeof bad_cases[0] };
  static char names[NBAD][96];
  struct CMUnitTest tests[17 + NBAD];
  size_t n = 0;
#define ADD(f) tests[n++] = (struct CMUnitTest)cmocka_unit_test(f)
  ADD(test_state_roundtrip_file);
  ADD(test_state_roundtrip_memory);
  ADD(test_state_roundtrip_cross_dtype);
  ADD(test_state_roundtrip_network);
  ADD(test_state_load_converts_dtypes);
  ADD(test_state_load_half_model);
  ADD(test_state_fixtures_load_exact);
  ADD(test_state_fixtures_eval_forward_matches_torch);
  ADD(test_state_fixtures_config_mismatch);
  ADD(test_state_save_replaces_existing_file);
  ADD(test_state_save_missing_directory);
  ADD(test_state_save_rename_fails);
  ADD(test_state_save_write_fails_keeps_old_file);
  ADD(test_state_bad_file_baseline_loads);
  ADD(test_state_cuda_roundtrip);
  ADD(test_state_bad_arguments);
#undef ADD
  for (size_t i = 0; i < NBAD; i++) {
    snprintf(names[i], sizeof names[i], "test_state_bad_file_%s", bad_cases[i].name);
    tests[n++] =
        (struct CMUnitTest){names[i], test_state_bad_file, NULL, NULL, (void *)&bad_cases[i]};
  }
  return _cmocka_run_group_tests("state", tests, n, suite_setup, suite_teardown);
}
