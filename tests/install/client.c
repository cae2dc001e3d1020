/*
 * A client of the *installed* library: built by install-test.sh with only
 * `pkg-config --cflags --libs fusedbn` against a `meson install` tree, never
 * the source tree's headers.
 *
 * It checks that the installed header and library agree (version), runs one
 * training step on the CPU and compares y, dx, daddend and the running
 * statistics with a float64 computation written out below, runs the same
 * step through the op API on memory it owns (same results), checks an error
 * path, and, when the build has them, round-trips the state through the
 * installed fusedbn_state.h (CLIENT_STATE_IO), and asks the installed
 * fusedbn_cuda.h for a plan (a host function) and creates a CUDA module
 * (CLIENT_CUDA: SUCCESS on a GPU machine, NO_DEVICE without one).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <fusedbn/fusedbn.h>
#ifdef CLIENT_STATE_IO
#include <fusedbn/fusedbn_state.h>
#endif
#ifdef CLIENT_CUDA
#include <fusedbn/fusedbn_cuda.h>
#endif

#define N 3
#define C 4
#define H 2
#define W 3
#define COUNT (N * C * H * W)

static int failures;

#define EXPECT(cond, ...)                                                                      \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      fprintf(stderr, "client: FAIL %s:%d: ", __FILE__, __LINE__);                             \
      fprintf(stderr, __VA_ARGS__);                                                            \
      fprintf(stderr, " (last error: \"%s\")\n", fbn_last_error_message());                    \
      failures++;                                                                              \
    }                                                                                          \
  } while (0)

#define EXPECT_OK(expr)                                                                        \
  do {                                                                                         \
    fbn_status st_ = (expr);                                                                   \
    EXPECT(st_ == FBN_STATUS_SUCCESS, "%s = %s", #expr, fbn_status_string(st_));              \
  } while (0)

/* xorshift64*: fresh, non-trivial data without any helper library. */
static uint64_t rng_state = UINT64_C(0x9E3779B97F4A7C15);
static double next_uniform(void) {
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return (double)((rng_state * UINT64_C(2685821657736338717)) >> 11) * 0x1.0p-53;
}

static size_t at(int n, int c, int h, int w) { return (((size_t)n * C + c) * H + h) * W + w; }

static int close_to(double got, double want, double scale) {
  return fabs(got - want) <= 1e-5 * (fabs(want) + scale);
}

int main(void) {
  EXPECT(fbn_version() == FBN_VERSION_MAJOR * 10000 + FBN_VERSION_MINOR * 100 + FBN_VERSION_PATCH,
         "header version %d.%d.%d but library fbn_version() = %d", FBN_VERSION_MAJOR,
         FBN_VERSION_MINOR, FBN_VERSION_PATCH, fbn_version());

  fbn_module_options opt;
  fbn_module_options_init(&opt);
  opt.num_features = C;
  fbn_module *bn = NULL;
  fbn_saved *saved = NULL;
  EXPECT_OK(fbn_module_create(&opt, &bn));
  EXPECT_OK(fbn_saved_create(&saved));
  if (bn == NULL || saved == NULL)
    return 1;

  float weight[C], bias[C];
  for (int c = 0; c < C; c++) {
    weight[c] = (float)(0.5 + next_uniform());
    bias[c] = (float)(next_uniform() - 0.5);
  }
  EXPECT_OK(fbn_module_write_buffer(bn, FBN_BUFFER_WEIGHT, FBN_DTYPE_FLOAT32, weight, C));
  EXPECT_OK(fbn_module_write_buffer(bn, FBN_BUFFER_BIAS, FBN_DTYPE_FLOAT32, bias, C));

  static float x[COUNT], z[COUNT], y[COUNT], dy[COUNT], dx[COUNT], dz[COUNT];
  for (int i = 0; i < COUNT; i++) {
    x[i] = (float)(4.0 * next_uniform() - 1.0 + 0.25 * (i % C));
    z[i] = (float)(next_uniform() - 0.5);
    dy[i] = (float)(2.0 * next_uniform() - 1.0);
    y[i] = dx[i] = dz[i] = NAN; /* every element must be written */
  }
  fbn_tensor_desc d = fbn_tensor_desc_make(N, C, H, W, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);

  EXPECT_OK(fbn_module_forward(bn, &d, x, z, y, saved, NULL, 0));
  EXPECT_OK(fbn_module_backward(bn, saved, &d, x, y, dy, dx, dz, NULL, 0));

  /* float64 expectation: batch statistics, momentum 0.1, eps 1e-5. */
  const double m = N * H * W;
  float running_mean[C], running_var[C];
  EXPECT_OK(fbn_module_read_buffer(bn, FBN_BUFFER_RUNNING_MEAN, FBN_DTYPE_FLOAT32, running_mean,
                                   C));
  EXPECT_OK(fbn_module_read_buffer(bn, FBN_BUFFER_RUNNING_VAR, FBN_DTYPE_FLOAT32, running_var, C));
  for (int c = 0; c < C; c++) {
    double mean = 0.0, sq = 0.0;
    for (int n = 0; n < N; n++)
      for (int h = 0; h < H; h++)
        for (int w = 0; w < W; w++)
          mean += x[at(n, c, h, w)];
    mean /= m;
    for (int n = 0; n < N; n++)
      for (int h = 0; h < H; h++)
        for (int w = 0; w < W; w++)
          sq += (x[at(n, c, h, w)] - mean) * (x[at(n, c, h, w)] - mean);
    const double var = sq / m, invstd = 1.0 / sqrt(var + 1e-5);
    EXPECT(close_to(running_mean[c], 0.1 * mean, 1.0), "running_mean[%d] = %g, want %g", c,
           running_mean[c], 0.1 * mean);
    EXPECT(close_to(running_var[c], 0.9 + 0.1 * sq / (m - 1), 1.0),
           "running_var[%d] = %g, want %g", c, running_var[c], 0.9 + 0.1 * sq / (m - 1));

    double sum_g = 0.0, sum_gx = 0.0;
    for (int n = 0; n < N; n++)
      for (int h = 0; h < H; h++)
        for (int w = 0; w < W; w++) {
          size_t i = at(n, c, h, w);
          double xhat = (x[i] - mean) * invstd;
          double pre = weight[c] * xhat + bias[c] + z[i];
          double want = pre > 0.0 ? pre : 0.0;
          EXPECT(close_to(y[i], want, 4.0), "y[%zu] = %g, want %g", i, y[i], want);
          double g = y[i] > 0.0f ? dy[i] : 0.0;
          EXPECT(dz[i] == (float)g, "daddend[%zu] = %g, want %g", i, dz[i], g);
          sum_g += g;
          sum_gx += g * xhat;
        }
    for (int n = 0; n < N; n++)
      for (int h = 0; h < H; h++)
        for (int w = 0; w < W; w++) {
          size_t i = at(n, c, h, w);
          double g = y[i] > 0.0f ? dy[i] : 0.0;
          double xhat = (x[i] - mean) * invstd;
          double want = weight[c] * invstd * (g - sum_g / m - xhat * sum_gx / m);
          EXPECT(close_to(dx[i], want, 4.0 * weight[c] * invstd), "dx[%zu] = %g, want %g", i,
                 dx[i], want);
        }
  }

  /* The same training step through the op API on memory the client owns:
   * the module is a wrapper over it, so every result is the same. */
  {
    fbn_op_desc od;
    fbn_op_desc_init(&od);
    od.num_features = C;
    fbn_op *op = NULL;
    EXPECT_OK(fbn_op_create(&od, &op));
    size_t saved_bytes = 0, fws = 0, bws = 0;
    EXPECT_OK(fbn_op_saved_size(op, &d, &saved_bytes));
    EXPECT_OK(fbn_op_forward_workspace_size(op, &d, &fws));
    EXPECT_OK(fbn_op_backward_workspace_size(op, &d, &bws));
    const size_t ws_bytes = fws > bws ? fws : bws;
    void *op_saved = aligned_alloc(FBN_OP_MEMORY_ALIGNMENT, (saved_bytes + 63) / 64 * 64);
    void *ws = ws_bytes > 0 ? aligned_alloc(FBN_OP_MEMORY_ALIGNMENT, (ws_bytes + 63) / 64 * 64)
                            : NULL;
    float rm[C], rv[C], dw[C], db[C], module_dw[C], module_db[C];
    static float y2[COUNT], dx2[COUNT], dz2[COUNT];
    for (int c = 0; c < C; c++) {
      rm[c] = 0.0f;
      rv[c] = 1.0f;
      dw[c] = db[c] = NAN; /* overwritten */
    }
    for (int i = 0; i < COUNT; i++)
      y2[i] = dx2[i] = dz2[i] = NAN;
    double factor = 0.0;
    EXPECT_OK(fbn_running_average_factor(0.1, false, 1, &factor));
    if (op != NULL && op_saved != NULL && (ws != NULL || ws_bytes == 0)) {
      EXPECT_OK(fbn_op_forward(op, &d, x, z, y2, weight, bias, rm, rv, factor, op_saved,
                               saved_bytes, ws, fws));
      EXPECT_OK(fbn_op_backward(op, &d, x, y2, dy, op_saved, saved_bytes, weight, bias, dx2, dz2,
                                dw, db, FBN_PARAM_GRAD_OVERWRITE, ws, bws));
      EXPECT(memcmp(y, y2, sizeof y) == 0, "op API y differs from the module's");
      EXPECT(memcmp(dx, dx2, sizeof dx) == 0, "op API dx differs from the module's");
      EXPECT(memcmp(dz, dz2, sizeof dz) == 0, "op API daddend differs from the module's");
      EXPECT(memcmp(rm, running_mean, sizeof rm) == 0, "op API running_mean differs");
      EXPECT(memcmp(rv, running_var, sizeof rv) == 0, "op API running_var differs");
      EXPECT_OK(fbn_module_read_buffer(bn, FBN_BUFFER_WEIGHT_GRAD, FBN_DTYPE_FLOAT32, module_dw, C));
      EXPECT_OK(fbn_module_read_buffer(bn, FBN_BUFFER_BIAS_GRAD, FBN_DTYPE_FLOAT32, module_db, C));
      for (int c = 0; c < C; c++)
        EXPECT(dw[c] == module_dw[c] && db[c] == module_db[c],
               "op API dweight/dbias[%d] = %g/%g, module %g/%g", c, dw[c], db[c], module_dw[c],
               module_db[c]);
      printf("client: op API training step checked\n");
    }
    free(op_saved);
    free(ws);
    fbn_op_destroy(op);
  }

  /* An error: a status, a message naming the call, no crash. */
  EXPECT(fbn_module_forward(bn, &d, NULL, NULL, y, NULL, NULL, 0) == FBN_STATUS_NULL_POINTER,
         "forward with x = NULL did not return FBN_STATUS_NULL_POINTER");
  EXPECT(strstr(fbn_last_error_message(), "fbn_module_forward") != NULL,
         "message \"%s\" does not name the call", fbn_last_error_message());

#ifdef CLIENT_STATE_IO
  {
    /* Save to memory, load into a fresh module, same running statistics. */
    const fbn_module *const mods[1] = {bn};
    const char *const prefixes[1] = {"layer1.bn."};
    void *data = NULL;
    size_t size = 0;
    EXPECT_OK(fbn_modules_save_state_to_memory(1, mods, prefixes, &data, &size));
    fbn_module *copy = NULL;
    EXPECT_OK(fbn_module_create(&opt, &copy));
    if (data != NULL && copy != NULL) {
      EXPECT_OK(fbn_module_load_state_from_memory(copy, data, size, "layer1.bn."));
      float got[C];
      EXPECT_OK(fbn_module_read_buffer(copy, FBN_BUFFER_RUNNING_MEAN, FBN_DTYPE_FLOAT32, got, C));
      EXPECT(memcmp(got, running_mean, sizeof got) == 0, "state round trip changed running_mean");
      EXPECT_OK(fbn_module_read_buffer(copy, FBN_BUFFER_WEIGHT, FBN_DTYPE_FLOAT32, got, C));
      EXPECT(memcmp(got, weight, sizeof got) == 0, "state round trip changed weight");
    }
    fbn_state_free(data);
    fbn_module_destroy(copy);
    printf("client: state_io round trip checked\n");
  }
#endif

#ifdef CLIENT_CUDA
  {
    fbn_module_options gopt = opt;
    gopt.device = FBN_DEVICE_CUDA;
    fbn_cuda_path path = FBN_CUDA_PATH_NONE;
    EXPECT_OK(fbn_cuda_plan_path(&gopt, &d, true, true, &path));
    EXPECT(path != FBN_CUDA_PATH_NONE, "fbn_cuda_plan_path gave no path for a plain training call");
    const char *name = fbn_cuda_path_name(path);
    EXPECT(name != NULL && name[0] != '\0', "fbn_cuda_path_name(%d) is empty", (int)path);
    printf("client: CUDA plan for training with addend: %s\n", name ? name : "(null)");
    fbn_module *g = NULL;
    fbn_status st = fbn_module_create(&gopt, &g);
    EXPECT(st == FBN_STATUS_SUCCESS || st == FBN_STATUS_NO_DEVICE,
           "CUDA module: %s, want SUCCESS (GPU) or NO_DEVICE (none)", fbn_status_string(st));
    printf("client: CUDA module create: %s\n", fbn_status_string(st));
    fbn_module_destroy(g);
  }
#endif

  fbn_saved_destroy(saved);
  fbn_module_destroy(bn);
  if (failures != 0) {
    fprintf(stderr, "client: %d check(s) failed\n", failures);
    return 1;
  }
  printf("client: OK (fusedbn %d)\n", fbn_version());
  return 0;
}
