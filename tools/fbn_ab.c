/*
 * fbn-ab: in-process A/B timing of two builds of libfusedbn (CPU backend).
 *
 *   fbn-ab LIB_A LIB_B [options] N,C,H,W...
 *
 * Both libraries are dlopen()ed into this one process (give two different
 * files: copies of libfusedbn.so.0 from two builds) and their calls are
 * alternated A B B A ..., so that each pair of calls sees the same state of
 * the shared machine. Printed per shape: the median time of each library and
 * the median of the per-pair ratios B/A with its quartiles, and the machine
 * (CPU model, the library's instruction-set path, threads). On a shared
 * 2-core machine this resolves differences of a few percent where separate
 * processes, minutes apart, spread by +-20%.
 *
 * Options: --reps N (pairs, default 30), --layout nchw|nhwc (default nchw),
 * --pass train|eval|bwd|train-saved (default train; train-saved: forward
 * training that also saves the context for backward, the ReLU mask included,
 * as fbn-peers-bench times it), --evict-mib N (read a buffer of N
 * MiB before every timed call, untimed: cold caches holding clean lines, as
 * the benchmarks; default 64 or twice the last-level cache, 0: none), --env-a NAME=VALUE / --env-b
 * NAME=VALUE (setenv before each call of A / B: compare two settings of one
 * library read from the environment at call time; LIB_B may then be LIB_A),
 * --align N (buffers from aligned_alloc(N); default 0: malloc, which glibc
 * answers for large blocks with an address 16 bytes past a page).
 * --dtype-a / --dtype-b float32|float16|bfloat16 (default float32): the
 * tensors' dtype of A / B (float32 parameters; LIB_B may then be LIB_A:
 * half against float32 on one library).
 * Threads: OMP_NUM_THREADS. x, addend and dy random (the benchmarks'
 * generator, a fixed seed per shape, rounded to the dtype); every buffer
 * written before timing.
 */
#include <dlfcn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <fusedbn/fusedbn.h>

#include "bench_common.h"

typedef struct lib {
  void (*options_init)(fbn_module_options *);
  fbn_status (*create)(const fbn_module_options *, fbn_module **);
  void (*destroy)(fbn_module *);
  fbn_status (*set_training)(fbn_module *, bool);
  fbn_status (*saved_create)(fbn_saved **);
  void (*saved_destroy)(fbn_saved *);
  fbn_status (*forward)(fbn_module *, const fbn_tensor_desc *, const void *, const void *, void *,
                        fbn_saved *, void *, size_t);
  fbn_status (*backward)(fbn_module *, const fbn_saved *, const fbn_tensor_desc *, const void *,
                         const void *, const void *, void *, void *, void *, size_t);
  const char *env; /* NAME=VALUE or NULL */
  fbn_dtype dtype;  /* of the tensors */
  fbn_module *m;
  fbn_saved *s;
} lib;

enum { PASS_TRAIN, PASS_EVAL, PASS_BWD, PASS_TRAIN_SAVED };

static void die(const char *what, const char *detail) {
  fprintf(stderr, "fbn-ab: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  exit(1);
}

static void *sym(void *h, const char *name) {
  void *p = dlsym(h, name);
  if (p == NULL)
    die("missing symbol", name);
  return p;
}

static void load(lib *l, const char *path) {
  void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (h == NULL)
    die("dlopen failed", dlerror());
  *(void **)&l->options_init = sym(h, "fbn_module_options_init");
  *(void **)&l->create = sym(h, "fbn_module_create");
  *(void **)&l->destroy = sym(h, "fbn_module_destroy");
  *(void **)&l->set_training = sym(h, "fbn_module_set_training");
  *(void **)&l->saved_create = sym(h, "fbn_saved_create");
  *(void **)&l->saved_destroy = sym(h, "fbn_saved_destroy");
  *(void **)&l->forward = sym(h, "fbn_module_forward");
  *(void **)&l->backward = sym(h, "fbn_module_backward");
}

static void apply_env(const lib *l) {
  if (l->env == NULL)
    return;
  const char *eq = strchr(l->env, '=');
  char name[128];
  snprintf(name, sizeof name, "%.*s", (int)(eq - l->env), l->env);
  setenv(name, eq + 1, 1);
}

static void check(fbn_status st, const char *what) {
  if (st != FBN_STATUS_SUCCESS)
    die("call failed", what);
}

/* bufs: x, addend, y, dy, dx, daddend */
static void run(lib *l, int pass, const fbn_tensor_desc *d, void **bufs) {
  apply_env(l);
  if (pass == PASS_BWD)
    check(l->backward(l->m, l->s, d, bufs[0], bufs[2], bufs[3], bufs[4], bufs[5], NULL, 0),
          "backward");
  else
    check(l->forward(l->m, d, bufs[0], bufs[1], bufs[2], pass == PASS_TRAIN_SAVED ? l->s : NULL,
                     NULL, 0),
          "forward");
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: fbn-ab LIB_A LIB_B [--reps N] [--layout nchw|nhwc] "
                    "[--pass train|eval|bwd|train-saved] [--evict-mib N] [--align N] [--env-a N=V] "
                    "[--env-b N=V] [--dtype-a T] [--dtype-b T] "
                    "N,C,H,W...\n");
    return 2;
  }
  lib libs[2] = {{0}, {0}};
  load(&libs[0], argv[1]);
  load(&libs[1], argv[2]);
  int reps = 30, pass = PASS_TRAIN;
  fbn_layout layout = FBN_LAYOUT_NCHW;
  size_t evict_bytes = bench_evict_default_bytes(), align = 0;
  int first_shape = argc;
  for (int i = 3; i < argc; i += 2) { /* options are pairs: --name value */
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strncmp(a, "--", 2) != 0) {
      first_shape = i;
      break;
    }
    if (v == NULL)
      die("option without a value", a);
    if (strcmp(a, "--reps") == 0)
      reps = atoi(v);
    else if (strcmp(a, "--layout") == 0)
      layout = strcmp(v, "nhwc") == 0 ? FBN_LAYOUT_NHWC : FBN_LAYOUT_NCHW;
    else if (strcmp(a, "--pass") == 0)
      pass = strcmp(v, "eval") == 0          ? PASS_EVAL
             : strcmp(v, "bwd") == 0         ? PASS_BWD
             : strcmp(v, "train-saved") == 0 ? PASS_TRAIN_SAVED
                                             : PASS_TRAIN;
    else if (strcmp(a, "--align") == 0)
      align = (size_t)atoi(v);
    else if (strcmp(a, "--evict-mib") == 0)
      evict_bytes = (size_t)atoi(v) << 20;
    else if (strcmp(a, "--env-a") == 0 || strcmp(a, "--env-b") == 0) {
      if (strchr(v, '=') == NULL)
        die("--env-a/--env-b want NAME=VALUE", v);
      libs[a[6] == 'b'].env = v;
    } else if (strcmp(a, "--dtype-a") == 0 || strcmp(a, "--dtype-b") == 0) {
      fbn_dtype *t = &libs[a[8] == 'b'].dtype;
      if (strcmp(v, "float32") == 0)
        *t = FBN_DTYPE_FLOAT32;
      else if (strcmp(v, "float16") == 0)
        *t = FBN_DTYPE_FLOAT16;
      else if (strcmp(v, "bfloat16") == 0)
        *t = FBN_DTYPE_BFLOAT16;
      else
        die("--dtype-a/--dtype-b want float32, float16 or bfloat16", v);
    } else
      die("unknown option", a);
  }
  if (libs[0].forward == libs[1].forward && libs[0].env == NULL && libs[1].env == NULL &&
      libs[0].dtype == libs[1].dtype)
    die("LIB_A and LIB_B are the same library", "copy one of them to another file");
  if (reps < 2)
    die("--reps must be >= 2", NULL);
  if (align != 0 && (align < sizeof(void *) || (align & (align - 1)) != 0))
    die("--align must be 0 or a power of two >= 8", NULL);
  bench_evict ev;
  bench_evict_init(&ev, evict_bytes);
  char machine[320];
  bench_machine_line(machine, sizeof machine);
  static const char *const dtype_names[] = {"float32", "float64", "float16", "bfloat16"};
  printf("# fbn-ab: %s; eviction %zu MiB before every call; A %s, B %s\n", machine,
         (ev.words * sizeof(uint64_t)) >> 20, dtype_names[libs[0].dtype],
         dtype_names[libs[1].dtype]);
  static const char *const pass_names[] = {"train", "eval", "bwd", "train-saved"};
  for (int a = first_shape; a < argc; a++) {
    long long n, c, h, w;
    if (sscanf(argv[a], "%lld,%lld,%lld,%lld", &n, &c, &h, &w) != 4 || n < 1 || c < 1 ||
        h < 1 || w < 1)
      die("a shape is N,C,H,W", argv[a]);
    const size_t numel = (size_t)(n * c * h * w);
    fbn_tensor_desc ds[2];
    void *bufs[2][6];
    for (int l = 0; l < 2; l++) {
      const fbn_dtype t = libs[l].dtype;
      ds[l] = (fbn_tensor_desc){n, c, h, w, t, layout};
      bench_rng rng;
      bench_rng_seed(&rng, (uint64_t)(n * 1000003 + c * 1009 + h * 31 + w));
      for (int i = 0; i < 6; i++) {
        const size_t bytes = numel * (t == FBN_DTYPE_FLOAT32 ? sizeof(float) : sizeof(uint16_t));
        bufs[l][i] = align > 0 ? aligned_alloc(align, (bytes + align - 1) / align * align)
                               : malloc(bytes);
        if (bufs[l][i] == NULL)
          die("out of memory", NULL);
        const double off = i == 0 ? 0.5 : 0.0, scale = i == 0 ? 2.0 : 1.0;
        if (t == FBN_DTYPE_FLOAT32)
          bench_fill_float(bufs[l][i], numel, off, scale, &rng);
        else
          bench_fill_half(bufs[l][i], numel, t == FBN_DTYPE_BFLOAT16, off, scale, &rng);
      }
    }
    for (int l = 0; l < 2; l++) {
      const fbn_tensor_desc d = ds[l];
      apply_env(&libs[l]);
      fbn_module_options o;
      libs[l].options_init(&o);
      o.num_features = c;
      check(libs[l].create(&o, &libs[l].m), "create");
      check(libs[l].saved_create(&libs[l].s), "saved_create");
      check(libs[l].set_training(libs[l].m, pass != PASS_EVAL), "set_training");
      check(libs[l].forward(libs[l].m, &d, bufs[l][0], bufs[l][1], bufs[l][2], libs[l].s, NULL,
                            0),
            "forward");
      run(&libs[l], pass, &d, bufs[l]); /* warm-up */
    }
    double *t[2] = {malloc((size_t)reps * sizeof(double)), malloc((size_t)reps * sizeof(double))};
    double *ratio = malloc((size_t)reps * sizeof(double));
    if (t[0] == NULL || t[1] == NULL || ratio == NULL)
      die("out of memory", NULL);
    for (int k = 0; k < reps; k++)
      for (int j = 0; j < 2; j++) {
        const int l = (k & 1) ? 1 - j : j; /* A B, B A, ... */
        bench_evict_run(&ev);
        const double t0 = bench_now_s();
        run(&libs[l], pass, &ds[l], bufs[l]);
        t[l][k] = bench_now_s() - t0;
      }
    for (int k = 0; k < reps; k++)
      ratio[k] = t[1][k] / t[0][k];
    qsort(t[0], (size_t)reps, sizeof(double), bench_cmp_double);
    qsort(t[1], (size_t)reps, sizeof(double), bench_cmp_double);
    qsort(ratio, (size_t)reps, sizeof(double), bench_cmp_double);
    printf("%-16s %s %-5s A %8.3f ms  B %8.3f ms  B/A median %.3f [quartiles %.3f %.3f] (%d "
           "pairs)\n",
           argv[a], layout == FBN_LAYOUT_NHWC ? "nhwc" : "nchw", pass_names[pass],
           1e3 * t[0][reps / 2], 1e3 * t[1][reps / 2], ratio[reps / 2], ratio[reps / 4],
           ratio[3 * reps / 4], reps);
    fflush(stdout);
    free(t[0]);
    free(t[1]);
    free(ratio);
    for (int l = 0; l < 2; l++) {
      libs[l].saved_destroy(libs[l].s);
      libs[l].destroy(libs[l].m);
    }
    for (int l = 0; l < 2; l++)
      for (int i = 0; i < 6; i++)
        free(bufs[l][i]);
  }
  bench_evict_fini(&ev);
  return 0;
}
