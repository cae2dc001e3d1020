/*
 * fusedbn-bench: options, the shapes table, device selection.
 *
 * Exit status: 0 success, 1 a library/CUDA call failed, 2 bad usage,
 * 3 the requested device (--device cuda) is not usable, 4 (after the whole
 * table) an agreement check failed.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"

/* ResNet-50 batch-32 batch-norm shapes, and OneFlow's example shape (4, 2, 8, 3). */
static const bench_shape resnet50_shapes[] = {
    {32, 64, 56, 56}, {32, 256, 56, 56}, {32, 512, 28, 28}, {32, 1024, 14, 14}, {32, 2048, 7, 7},
};
static const bench_shape oneflow_shape = {4, 2, 8, 3};
/* --quick on the CPU: the smallest ResNet-50 shape (and OneFlow's). */
static const bench_shape quick_cpu_shape = {32, 2048, 7, 7};

/* CPU rows get BENCH_DEFAULT_REPS runs unless those take longer than
 * CPU_ROW_BUDGET_S (fused and unfused together); then fewer, at least
 * CPU_MIN_REPS. Keeps the default CPU run to a few minutes on 2 cores. */
#define CPU_ROW_BUDGET_S 3.0
#define CPU_MIN_REPS 5

#define COUNT_OF(a) (sizeof(a) / sizeof((a)[0]))

static void usage(FILE *out) {
  fprintf(out,
          "usage: fusedbn-bench [options]\n"
          "\n"
          "Times y = ReLU(BatchNorm2d(x) + addend), y = ReLU(BatchNorm2d(x)) and BN alone:\n"
          "fusedbn's module of each operation against the unfused sequence a framework runs\n"
          "without it (CPU: fusedbn's BN alone, then an add pass and/or a ReLU pass; BN\n"
          "alone has no unfused form; GPU: cuDNN's BN, add and ReLU).\n"
          "\n"
          "  --device cpu|cuda|auto  where to run (default auto: the GPU if the library has\n"
          "                          the CUDA backend and a device is usable, else the CPU)\n"
          "  --shape N,C,H,W         a shape to run (repeatable; default: the ResNet-50\n"
          "                          batch-32 BN shapes and OneFlow's (4,2,8,3))\n"
          "  --layout nchw|nhwc|both memory layout (CPU default both)\n"
          "  --dtype float32|float64|float16|bfloat16\n"
          "                          data type (CPU default float32; GPU default: float16\n"
          "                          NHWC and float32 NCHW)\n"
          "  --pass LIST             comma-separated train,eval,backward or all (default all)\n"
          "  --op LIST               comma-separated bn,bn_relu,bn_add_relu or all (default\n"
          "                          all on the CPU; the GPU mode times bn_add_relu only)\n"
          "  --reps N                exactly N timed runs per measurement (default %d; CPU\n"
          "                          rows whose runs would take over %.0f s get fewer, at\n"
          "                          least %d; --quick: 5 on the CPU, 10 on the GPU); the\n"
          "                          count is printed per row\n"
          "  --warmup N              untimed runs before timing (default 0 on the CPU, where\n"
          "                          an agreement check runs each pass first; %d on the GPU)\n"
          "  --cpu-backend fast|reference\n"
          "                          fusedbn's CPU backend (sets FBN_CPU_BACKEND; default:\n"
          "                          the environment's choice, else fast)\n"
          "  --quick                 a short run (CI, gpu-check): fewer shapes on the CPU,\n"
          "                          fewer repetitions\n"
          "  --csv                   CSV instead of the table\n"
          "  -h, --help              this text\n",
          BENCH_DEFAULT_REPS, CPU_ROW_BUDGET_S, CPU_MIN_REPS, BENCH_DEFAULT_WARMUP);
}

static bool parse_int(const char *text, long long min, long long max, long long *out) {
  char *end = NULL;
  errno = 0;
  const long long v = strtoll(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0' || v < min || v > max) {
    return false;
  }
  *out = v;
  return true;
}

static bool parse_shape(const char *text, bench_shape *out) {
  long long dims[4];
  const char *p = text;
  for (int i = 0; i < 4; i++) {
    char *end = NULL;
    errno = 0;
    dims[i] = strtoll(p, &end, 10);
    if (errno != 0 || end == p || dims[i] <= 0 || dims[i] > (1ll << 31)) {
      return false;
    }
    if (i < 3 && *end != ',') {
      return false;
    }
    if (i == 3 && *end != '\0') {
      return false;
    }
    p = end + 1;
  }
  out->n = dims[0];
  out->c = dims[1];
  out->h = dims[2];
  out->w = dims[3];
  if (out->n * out->h * out->w == 1) {
    fprintf(stderr, "fusedbn-bench: --shape %s: training needs more than one value per "
                    "channel (N*H*W > 1)\n",
            text);
    return false;
  }
  /* Keep the element count and the byte count far from overflow. */
  return (double)out->n * (double)out->c * (double)out->h * (double)out->w < 4e9;
}

static bool parse_dtype(const char *text, fbn_dtype *out) {
  static const struct {
    const char *name;
    fbn_dtype dtype;
  } names[] = {
      {"float32", FBN_DTYPE_FLOAT32},   {"fp32", FBN_DTYPE_FLOAT32}, {"f32", FBN_DTYPE_FLOAT32},
      {"float64", FBN_DTYPE_FLOAT64},   {"fp64", FBN_DTYPE_FLOAT64}, {"f64", FBN_DTYPE_FLOAT64},
      {"float16", FBN_DTYPE_FLOAT16},   {"fp16", FBN_DTYPE_FLOAT16}, {"half", FBN_DTYPE_FLOAT16},
      {"bfloat16", FBN_DTYPE_BFLOAT16}, {"bf16", FBN_DTYPE_BFLOAT16},
  };
  for (size_t i = 0; i < COUNT_OF(names); i++) {
    if (strcmp(text, names[i].name) == 0) {
      *out = names[i].dtype;
      return true;
    }
  }
  return false;
}

static bool parse_ops(const char *text, bool ops[BENCH_OP_COUNT]) {
  static const struct {
    const char *name;
    fbn_operation op;
  } names[] = {{"bn", FBN_OPERATION_BN},
               {"bn_relu", FBN_OPERATION_BN_RELU},
               {"bn_add_relu", FBN_OPERATION_BN_ADD_RELU}};
  char buf[128];
  if (strlen(text) >= sizeof buf) {
    return false;
  }
  strcpy(buf, text);
  for (int o = 0; o < BENCH_OP_COUNT; o++) {
    ops[o] = false;
  }
  bool any = false;
  char *save = NULL;
  for (char *tok = strtok_r(buf, ",", &save); tok != NULL; tok = strtok_r(NULL, ",", &save)) {
    bool known = strcmp(tok, "all") == 0;
    for (int o = 0; known && o < BENCH_OP_COUNT; o++) {
      ops[o] = true;
    }
    for (size_t i = 0; i < COUNT_OF(names); i++) {
      if (strcmp(tok, names[i].name) == 0) {
        ops[names[i].op] = known = true;
      }
    }
    if (!known) {
      return false;
    }
    any = true;
  }
  return any;
}

static bool parse_passes(const char *text, bool passes[BENCH_PASS_COUNT]) {
  char buf[128];
  if (strlen(text) >= sizeof buf) {
    return false;
  }
  strcpy(buf, text);
  for (int p = 0; p < BENCH_PASS_COUNT; p++) {
    passes[p] = false;
  }
  char *save = NULL;
  for (char *tok = strtok_r(buf, ",", &save); tok != NULL; tok = strtok_r(NULL, ",", &save)) {
    if (strcmp(tok, "all") == 0) {
      for (int p = 0; p < BENCH_PASS_COUNT; p++) {
        passes[p] = true;
      }
    } else if (strcmp(tok, "train") == 0) {
      passes[BENCH_PASS_TRAIN_FWD] = true;
    } else if (strcmp(tok, "eval") == 0) {
      passes[BENCH_PASS_EVAL_FWD] = true;
    } else if (strcmp(tok, "backward") == 0) {
      passes[BENCH_PASS_TRAIN_BWD] = true;
    } else {
      return false;
    }
  }
  for (int p = 0; p < BENCH_PASS_COUNT; p++) {
    if (passes[p]) {
      return true;
    }
  }
  return false;
}

/* Options as given, before the device-dependent defaults are applied. */
typedef struct bench_args {
  bool have_dtype;
  fbn_dtype dtype;
  int layouts; /* 0: default, 1: nchw, 2: nhwc, 3: both */
  bool have_reps;
  long long reps;
  bool have_warmup;
  long long warmup;
} bench_args;

static int parse_args(int argc, char **argv, bench_config *cfg, bench_args *args) {
  for (int i = 1; i < argc; i++) {
    const char *opt = argv[i];
    const char *val = i + 1 < argc ? argv[i + 1] : NULL;
    const bool takes_value = strcmp(opt, "--device") == 0 || strcmp(opt, "--shape") == 0 ||
                             strcmp(opt, "--layout") == 0 || strcmp(opt, "--dtype") == 0 ||
                             strcmp(opt, "--pass") == 0 || strcmp(opt, "--op") == 0 ||
                             strcmp(opt, "--reps") == 0 ||
                             strcmp(opt, "--warmup") == 0 || strcmp(opt, "--cpu-backend") == 0;
    if (takes_value) {
      if (val == NULL) {
        fprintf(stderr, "fusedbn-bench: %s needs a value\n", opt);
        return 2;
      }
      i++;
    }
    bool ok = true;
    if (strcmp(opt, "-h") == 0 || strcmp(opt, "--help") == 0) {
      usage(stdout);
      exit(0);
    } else if (strcmp(opt, "--csv") == 0) {
      cfg->csv = true;
    } else if (strcmp(opt, "--quick") == 0) {
      cfg->quick = true;
    } else if (strcmp(opt, "--device") == 0) {
      if (strcmp(val, "cpu") == 0) {
        cfg->device = BENCH_DEVICE_CPU;
      } else if (strcmp(val, "cuda") == 0 || strcmp(val, "gpu") == 0) {
        cfg->device = BENCH_DEVICE_CUDA;
      } else if (strcmp(val, "auto") == 0) {
        cfg->device = BENCH_DEVICE_AUTO;
      } else {
        ok = false;
      }
    } else if (strcmp(opt, "--cpu-backend") == 0) {
      /* The library reads FBN_CPU_BACKEND when a CPU module is created. */
      ok = strcmp(val, "fast") == 0 || strcmp(val, "reference") == 0;
      if (ok && setenv("FBN_CPU_BACKEND", val, 1) != 0) {
        perror("fusedbn-bench: setenv");
        return 1;
      }
    } else if (strcmp(opt, "--shape") == 0) {
      if (cfg->num_shapes == BENCH_MAX_SHAPES) {
        fprintf(stderr, "fusedbn-bench: at most %d --shape options\n", BENCH_MAX_SHAPES);
        return 2;
      }
      ok = parse_shape(val, &cfg->shapes[cfg->num_shapes]);
      if (ok) {
        cfg->num_shapes++;
      }
    } else if (strcmp(opt, "--layout") == 0) {
      args->layouts = strcmp(val, "nchw") == 0   ? 1
                      : strcmp(val, "nhwc") == 0 ? 2
                      : strcmp(val, "both") == 0 ? 3
                                                 : 0;
      ok = args->layouts != 0;
    } else if (strcmp(opt, "--dtype") == 0) {
      ok = args->have_dtype = parse_dtype(val, &args->dtype);
    } else if (strcmp(opt, "--pass") == 0) {
      ok = parse_passes(val, cfg->passes);
    } else if (strcmp(opt, "--op") == 0) {
      ok = cfg->ops_given = parse_ops(val, cfg->ops);
    } else if (strcmp(opt, "--reps") == 0) {
      ok = args->have_reps = parse_int(val, 1, 100000, &args->reps);
    } else if (strcmp(opt, "--warmup") == 0) {
      ok = args->have_warmup = parse_int(val, 0, 1000, &args->warmup);
    } else {
      fprintf(stderr, "fusedbn-bench: unknown option '%s' (see --help)\n", opt);
      return 2;
    }
    if (!ok) {
      fprintf(stderr, "fusedbn-bench: invalid value '%s' for %s (see --help)\n", val, opt);
      return 2;
    }
  }
  return 0;
}

static void add_variant(bench_config *cfg, fbn_dtype dtype, fbn_layout layout) {
  cfg->variants[cfg->num_variants].dtype = dtype;
  cfg->variants[cfg->num_variants].layout = layout;
  cfg->num_variants++;
}

/* Defaults that depend on the device chosen: variants, shapes, reps. */
static void apply_defaults(bench_config *cfg, const bench_args *args) {
  const bool gpu = cfg->device == BENCH_DEVICE_CUDA;

  if (gpu && !args->have_dtype && args->layouts == 0) {
    add_variant(cfg, FBN_DTYPE_FLOAT16, FBN_LAYOUT_NHWC);
    add_variant(cfg, FBN_DTYPE_FLOAT32, FBN_LAYOUT_NCHW);
  } else {
    const int layouts = args->layouts == 0 ? 3 : args->layouts;
    fbn_dtype dtypes[2];
    int num_dtypes = 0;
    if (args->have_dtype) {
      dtypes[num_dtypes++] = args->dtype;
    } else if (gpu) {
      dtypes[num_dtypes++] = FBN_DTYPE_FLOAT16;
      dtypes[num_dtypes++] = FBN_DTYPE_FLOAT32;
    } else {
      dtypes[num_dtypes++] = FBN_DTYPE_FLOAT32;
    }
    for (int d = 0; d < num_dtypes; d++) {
      if (layouts & 1) {
        add_variant(cfg, dtypes[d], FBN_LAYOUT_NCHW);
      }
      if (layouts & 2) {
        add_variant(cfg, dtypes[d], FBN_LAYOUT_NHWC);
      }
    }
  }

  if (cfg->num_shapes == 0) {
    if (cfg->quick && !gpu) {
      cfg->shapes[cfg->num_shapes++] = quick_cpu_shape;
    } else {
      for (size_t i = 0; i < COUNT_OF(resnet50_shapes); i++) {
        cfg->shapes[cfg->num_shapes++] = resnet50_shapes[i];
      }
    }
    cfg->shapes[cfg->num_shapes++] = oneflow_shape;
  }

  /* Repetitions: --reps is exact. Otherwise 20 (5 with --quick on the CPU,
   * 10 on the GPU), lowered down to min_reps for CPU rows whose runs would
   * take longer than the time budget: the float64 reference backend needs
   * seconds per call on the big shapes. The count is printed per row. */
  cfg->reps_forced = args->have_reps;
  if (args->have_reps) {
    cfg->reps = (int)args->reps;
  } else if (cfg->quick) {
    cfg->reps = gpu ? 10 : 5;
  } else {
    cfg->reps = BENCH_DEFAULT_REPS;
  }
  cfg->min_reps = cfg->reps < CPU_MIN_REPS ? cfg->reps : CPU_MIN_REPS;
  cfg->time_budget_s = gpu ? 1e9 : CPU_ROW_BUDGET_S;
  /* On the CPU every pass first runs once, untimed, for the agreement
   * check: that is its warm-up. */
  cfg->warmup = args->have_warmup ? (int)args->warmup : gpu ? BENCH_DEFAULT_WARMUP : 0;
}

int main(int argc, char **argv) {
  bench_config cfg;
  memset(&cfg, 0, sizeof cfg);
  for (int p = 0; p < BENCH_PASS_COUNT; p++) {
    cfg.passes[p] = true;
  }
  for (int o = 0; o < BENCH_OP_COUNT; o++) {
    cfg.ops[o] = true;
  }
  bench_args args;
  memset(&args, 0, sizeof args);
  int rc = parse_args(argc, argv, &cfg, &args);
  if (rc != 0) {
    return rc;
  }

  /* Device selection. */
  char why[256] = "";
#ifdef FBN_BENCH_HAVE_CUDA
  const bool cuda_ok = cfg.device != BENCH_DEVICE_CPU && bench_cuda_available(why, sizeof why);
#else
  const bool cuda_ok = false;
  snprintf(why, sizeof why, "libfusedbn was built without the CUDA backend");
#endif
  if (cfg.device == BENCH_DEVICE_CUDA && !cuda_ok) {
    fprintf(stderr, "fusedbn-bench: --device cuda: %s\n", why);
    return 3;
  }
  if (cfg.device == BENCH_DEVICE_AUTO) {
    cfg.device = cuda_ok ? BENCH_DEVICE_CUDA : BENCH_DEVICE_CPU;
    if (!cuda_ok) {
      snprintf(cfg.fallback_reason, sizeof cfg.fallback_reason, "%s", why);
      fprintf(stderr, "fusedbn-bench: no usable GPU (%s); running on the CPU\n", why);
    }
  }
  if (cfg.device == BENCH_DEVICE_CUDA && cfg.ops_given &&
      (cfg.ops[FBN_OPERATION_BN] || cfg.ops[FBN_OPERATION_BN_RELU])) {
    fprintf(stderr, "fusedbn-bench: --op: the GPU mode times bn_add_relu only (its baseline is "
                    "cuDNN's BN, add and ReLU); use --device cpu for bn and bn_relu\n");
    return 2;
  }
  apply_defaults(&cfg, &args);

#ifdef FBN_BENCH_HAVE_CUDA
  const int status = cfg.device == BENCH_DEVICE_CUDA ? bench_run_cuda(&cfg) : bench_run_cpu(&cfg);
#else
  const int status = bench_run_cpu(&cfg);
#endif
  if (status == 0 && bench_mismatch_count() > 0) {
    fprintf(stderr,
            "fusedbn-bench: %d agreement check(s) failed (rows marked MISMATCH): the fused "
            "results differ from the unfused baseline\n",
            bench_mismatch_count());
    return BENCH_EXIT_MISMATCH;
  }
  return status;
}
