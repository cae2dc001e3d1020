/*
 * fusedbn-bench: unfused CPU baseline kernels for one element type.
 *
 * Included by bench_unfused_cpu.c once per type with
 *   BU_T       the element (and accumulation) type: float or double
 *   BU_SQRT    sqrtf or sqrt
 *   BU_FN(x)   the function name for this type (x_f32, x_f64)
 * Every pass is one plain loop nest over memory, split over OpenMP threads
 * like a framework's CPU operator (at::parallel_for-style: inline on one
 * thread below BENCH_PARALLEL_MIN elements): NCHW reductions over channels,
 * NHWC reductions over rows with per-thread partial sums, elementwise loops
 * over rows or flat ranges.
 */

/* Sum of p[0..n) with 8 partial sums (vectorizable). */
static BU_T BU_FN(sum)(const BU_T *restrict p, int64_t n) {
  BU_T part[8] = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; k++) {
      part[k] += p[i + k];
    }
  }
  for (; i < n; i++) {
    part[0] += p[i];
  }
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

/* Sum of (p[i] - mean)^2. */
static BU_T BU_FN(sum_sq_dev)(const BU_T *restrict p, int64_t n, BU_T mean) {
  BU_T part[8] = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; k++) {
      const BU_T d = p[i + k] - mean;
      part[k] += d * d;
    }
  }
  for (; i < n; i++) {
    const BU_T d = p[i] - mean;
    part[0] += d * d;
  }
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

/* Sum of g[i] * (x[i] - mean). */
static BU_T BU_FN(sum_prod_dev)(const BU_T *restrict g, const BU_T *restrict x, int64_t n,
                                BU_T mean) {
  BU_T part[8] = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; k++) {
      part[k] += g[i + k] * (x[i + k] - mean);
    }
  }
  for (; i < n; i++) {
    part[0] += g[i] * (x[i] - mean);
  }
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

/* NHWC rows [begin, end) into a[C] (and b[C]), zeroed first: with g,
 * a = sum g and b = sum g * (x - mean); else with mean, a = sum (x - mean)^2;
 * else a = sum x. */
static void BU_FN(nhwc_reduce_rows)(const bench_unfused_cpu *u, const BU_T *restrict x,
                                    const BU_T *restrict g, const BU_T *restrict mean,
                                    BU_T *restrict a, BU_T *restrict b, int64_t begin,
                                    int64_t end) {
  const int64_t c = u->shape.c;
  for (int64_t ch = 0; ch < c; ch++) {
    a[ch] = 0;
    b[ch] = 0;
  }
  for (int64_t p = begin; p < end; p++) {
    const BU_T *restrict xr = x + p * c;
    if (g != NULL) {
      const BU_T *restrict gr = g + p * c;
      for (int64_t ch = 0; ch < c; ch++) {
        a[ch] += gr[ch];
        b[ch] += gr[ch] * (xr[ch] - mean[ch]);
      }
    } else if (mean != NULL) {
      for (int64_t ch = 0; ch < c; ch++) {
        const BU_T d = xr[ch] - mean[ch];
        a[ch] += d * d;
      }
    } else {
      for (int64_t ch = 0; ch < c; ch++) {
        a[ch] += xr[ch];
      }
    }
  }
}

/* NHWC reduction over all rows: per-thread partial sums (u->partial: per
 * thread 2C values), then acc (and acc2) = their sum. */
static void BU_FN(nhwc_reduce)(const bench_unfused_cpu *u, const BU_T *restrict x,
                               const BU_T *restrict g, const BU_T *restrict mean,
                               BU_T *restrict acc, BU_T *restrict acc2) {
  const int64_t c = u->shape.c, rows = u->shape.n * u->shape.h * u->shape.w;
  BU_T *partial = u->partial;
  const int nt = bench_unfused_threads(u);
  int used = 1; /* threads that ran */
  if (nt <= 1) {
    BU_FN(nhwc_reduce_rows)(u, x, g, mean, partial, partial + c, 0, rows);
  } else {
    BENCH_OMP(parallel num_threads(nt))
    {
      const int t = bench_thread_num();
      if (t == 0) {
        used = bench_num_threads();
      }
      int64_t begin, end;
      bench_thread_range(rows, &begin, &end);
      BU_T *a = partial + (size_t)t * 2 * (size_t)c;
      BU_FN(nhwc_reduce_rows)(u, x, g, mean, a, a + c, begin, end);
    }
  }
  for (int64_t ch = 0; ch < c; ch++) {
    BU_T sa = 0, sb = 0;
    for (int t = 0; t < used; t++) {
      sa += partial[(size_t)t * 2 * (size_t)c + (size_t)ch];
      sb += partial[(size_t)t * 2 * (size_t)c + (size_t)(c + ch)];
    }
    acc[ch] = sa;
    if (acc2 != NULL) {
      acc2[ch] = sb;
    }
  }
}

/* NCHW channels [begin, end): a[ch] = sum x, or with mean sum (x - mean)^2,
 * or with g: a = sum g, b = sum g * (x - mean). */
static void BU_FN(nchw_reduce_channels)(const bench_unfused_cpu *u, const BU_T *restrict x,
                                        const BU_T *restrict g, const BU_T *restrict mean,
                                        BU_T *restrict a, BU_T *restrict b, int64_t begin,
                                        int64_t end) {
  const int64_t n = u->shape.n, c = u->shape.c, hw = u->shape.h * u->shape.w;
  for (int64_t ch = begin; ch < end; ch++) {
    BU_T sa = 0, sb = 0;
    for (int64_t in = 0; in < n; in++) {
      const int64_t base = (in * c + ch) * hw;
      if (g != NULL) {
        sa += BU_FN(sum)(g + base, hw);
        sb += BU_FN(sum_prod_dev)(g + base, x + base, hw, mean[ch]);
      } else if (mean != NULL) {
        sa += BU_FN(sum_sq_dev)(x + base, hw, mean[ch]);
      } else {
        sa += BU_FN(sum)(x + base, hw);
      }
    }
    a[ch] = sa;
    if (b != NULL) {
      b[ch] = sb;
    }
  }
}

/* Reduction pass over x (and g) into per-channel acc (and acc2); see
 * nchw_reduce_channels / nhwc_reduce_rows for what is summed. */
static void BU_FN(channel_reduce)(const bench_unfused_cpu *u, const BU_T *restrict x,
                                  const BU_T *restrict g, const BU_T *restrict mean,
                                  BU_T *restrict acc, BU_T *restrict acc2) {
  if (u->layout == FBN_LAYOUT_NHWC) {
    BU_FN(nhwc_reduce)(u, x, g, mean, acc, acc2);
    return;
  }
  const int nt = bench_unfused_threads(u);
  BENCH_PARALLEL_RANGE(nt, u->shape.c,
                       BU_FN(nchw_reduce_channels)(u, x, g, mean, acc, acc2, begin, end));
}

/* Rows [begin, end) of out = x * scale[c] + shift[c]; a row is one (n, c)
 * plane in NCHW, one pixel's C values in NHWC. */
static void BU_FN(affine_rows)(const bench_unfused_cpu *u, const BU_T *restrict x,
                               const BU_T *restrict scale, const BU_T *restrict shift,
                               BU_T *restrict out, int64_t begin, int64_t end) {
  const int64_t c = u->shape.c, hw = u->shape.h * u->shape.w;
  if (u->layout == FBN_LAYOUT_NCHW) {
    for (int64_t nc = begin; nc < end; nc++) {
      const BU_T a = scale[nc % c], b = shift[nc % c];
      const BU_T *restrict xp = x + nc * hw;
      BU_T *restrict op = out + nc * hw;
      for (int64_t i = 0; i < hw; i++) {
        op[i] = xp[i] * a + b;
      }
    }
  } else {
    for (int64_t p = begin; p < end; p++) {
      const BU_T *restrict xr = x + p * c;
      BU_T *restrict orow = out + p * c;
      for (int64_t ch = 0; ch < c; ch++) {
        orow[ch] = xr[ch] * scale[ch] + shift[ch];
      }
    }
  }
}

/* Rows [begin, end) of dx = g * k_g[c] + x * k_x[c] + k_0[c]. */
static void BU_FN(dx_rows)(const bench_unfused_cpu *u, const BU_T *restrict g,
                           const BU_T *restrict x, const BU_T *restrict k_g,
                           const BU_T *restrict k_x, const BU_T *restrict k_0,
                           BU_T *restrict dx, int64_t begin, int64_t end) {
  const int64_t c = u->shape.c, hw = u->shape.h * u->shape.w;
  if (u->layout == FBN_LAYOUT_NCHW) {
    for (int64_t nc = begin; nc < end; nc++) {
      const BU_T a = k_g[nc % c], b = k_x[nc % c], d = k_0[nc % c];
      const BU_T *restrict gp = g + nc * hw;
      const BU_T *restrict xp = x + nc * hw;
      BU_T *restrict dp = dx + nc * hw;
      for (int64_t i = 0; i < hw; i++) {
        dp[i] = gp[i] * a + xp[i] * b + d;
      }
    }
  } else {
    for (int64_t p = begin; p < end; p++) {
      const BU_T *restrict gr = g + p * c;
      const BU_T *restrict xr = x + p * c;
      BU_T *restrict dr = dx + p * c;
      for (int64_t ch = 0; ch < c; ch++) {
        dr[ch] = gr[ch] * k_g[ch] + xr[ch] * k_x[ch] + k_0[ch];
      }
    }
  }
}

/* Rows of a pass: (n, c) planes in NCHW, pixels in NHWC. */
static int64_t BU_FN(rows)(const bench_unfused_cpu *u) {
  return u->layout == FBN_LAYOUT_NCHW ? u->shape.n * u->shape.c
                                      : u->shape.n * u->shape.h * u->shape.w;
}

/* Pass: out = x * scale[c] + shift[c]. */
static void BU_FN(channel_affine)(const bench_unfused_cpu *u, const BU_T *restrict x,
                                  const BU_T *restrict scale, const BU_T *restrict shift,
                                  BU_T *restrict out) {
  const int nt = bench_unfused_threads(u);
  BENCH_PARALLEL_RANGE(nt, BU_FN(rows)(u),
                       BU_FN(affine_rows)(u, x, scale, shift, out, begin, end));
}

/* Pass: dx = g * k_g[c] + x * k_x[c] + k_0[c]. */
static void BU_FN(channel_dx)(const bench_unfused_cpu *u, const BU_T *restrict g,
                              const BU_T *restrict x, const BU_T *restrict k_g,
                              const BU_T *restrict k_x, const BU_T *restrict k_0,
                              BU_T *restrict dx) {
  const int nt = bench_unfused_threads(u);
  BENCH_PARALLEL_RANGE(nt, BU_FN(rows)(u), BU_FN(dx_rows)(u, g, x, k_g, k_x, k_0, dx, begin, end));
}

/* Elementwise kernels over [begin, end) of the flat tensor. */
static void BU_FN(add_range)(const BU_T *restrict a, const BU_T *restrict b, BU_T *restrict y,
                             int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i++) {
    y[i] = a[i] + b[i];
  }
}

static void BU_FN(relu_range)(BU_T *restrict y, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i++) {
    y[i] = y[i] < 0 ? (BU_T)0 : y[i]; /* NaN stays NaN */
  }
}

static void BU_FN(relu_backward_range)(const BU_T *restrict y, const BU_T *restrict dy,
                                       BU_T *restrict g, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i++) {
    g[i] = y[i] > 0 ? dy[i] : (BU_T)0;
  }
}

/* Pass: y = a + b. */
static void BU_FN(add)(const bench_unfused_cpu *u, const BU_T *restrict a, const BU_T *restrict b,
                       BU_T *restrict y) {
  const int nt = bench_unfused_threads(u);
  BENCH_PARALLEL_RANGE(nt, bench_shape_numel(&u->shape), BU_FN(add_range)(a, b, y, begin, end));
}

/* Pass: y = ReLU(y) in place. */
static void BU_FN(relu_inplace)(const bench_unfused_cpu *u, BU_T *restrict y) {
  const int nt = bench_unfused_threads(u);
  BENCH_PARALLEL_RANGE(nt, bench_shape_numel(&u->shape), BU_FN(relu_range)(y, begin, end));
}

/* Pass: g = y > 0 ? dy : 0. */
static void BU_FN(relu_backward)(const bench_unfused_cpu *u, const BU_T *restrict y,
                                 const BU_T *restrict dy, BU_T *restrict g) {
  const int nt = bench_unfused_threads(u);
  BENCH_PARALLEL_RANGE(nt, bench_shape_numel(&u->shape),
                       BU_FN(relu_backward_range)(y, dy, g, begin, end));
}

static void BU_FN(train_forward)(bench_unfused_cpu *u, const BU_T *x, const BU_T *addend,
                                 BU_T *y) {
  const int64_t c = u->shape.c;
  const BU_T count = (BU_T)(bench_shape_numel(&u->shape) / c);
  BU_T *mean = u->save_mean, *invstd = u->save_invstd, *acc = u->acc_a;
  BU_T *scale = u->scale, *shift = u->shift, *tmp = u->tmp;
  const BU_T *weight = u->weight, *bias = u->bias;
  BU_T *running_mean = u->running_mean, *running_var = u->running_var;
  const BU_T momentum = (BU_T)u->momentum;

  /* batch norm: statistics (two passes), then normalize into tmp */
  BU_FN(channel_reduce)(u, x, NULL, NULL, acc, NULL);
  for (int64_t ch = 0; ch < c; ch++) {
    mean[ch] = acc[ch] / count;
  }
  BU_FN(channel_reduce)(u, x, NULL, mean, acc, NULL);
  for (int64_t ch = 0; ch < c; ch++) {
    const BU_T var = acc[ch] / count;
    invstd[ch] = (BU_T)1 / BU_SQRT(var + (BU_T)u->eps);
    scale[ch] = weight[ch] * invstd[ch];
    shift[ch] = bias[ch] - mean[ch] * scale[ch];
    running_mean[ch] = (1 - momentum) * running_mean[ch] + momentum * mean[ch];
    running_var[ch] = (1 - momentum) * running_var[ch] + momentum * (acc[ch] / (count - 1));
  }
  BU_FN(channel_affine)(u, x, scale, shift, tmp);
  /* add, then ReLU */
  BU_FN(add)(u, tmp, addend, y);
  BU_FN(relu_inplace)(u, y);
}

static void BU_FN(eval_forward)(bench_unfused_cpu *u, const BU_T *x, const BU_T *addend, BU_T *y) {
  const int64_t c = u->shape.c;
  BU_T *scale = u->scale, *shift = u->shift, *tmp = u->tmp;
  const BU_T *weight = u->weight, *bias = u->bias;
  const BU_T *running_mean = u->running_mean, *running_var = u->running_var;

  for (int64_t ch = 0; ch < c; ch++) {
    scale[ch] = weight[ch] / BU_SQRT(running_var[ch] + (BU_T)u->eps);
    shift[ch] = bias[ch] - running_mean[ch] * scale[ch];
  }
  BU_FN(channel_affine)(u, x, scale, shift, tmp);
  BU_FN(add)(u, tmp, addend, y);
  BU_FN(relu_inplace)(u, y);
}

static void BU_FN(train_backward)(bench_unfused_cpu *u, const BU_T *x, const BU_T *y,
                                  const BU_T *dy, BU_T *dx, BU_T *daddend) {
  const int64_t c = u->shape.c;
  const BU_T count = (BU_T)(bench_shape_numel(&u->shape) / c);
  const BU_T *mean = u->save_mean, *invstd = u->save_invstd, *weight = u->weight;
  BU_T *sum_g = u->acc_a, *sum_gx = u->acc_b;
  BU_T *k_g = u->scale, *k_x = u->shift, *k_0 = u->offset;
  BU_T *weight_grad = u->weight_grad, *bias_grad = u->bias_grad;

  /* ReLU backward; the add passes the gradient through to both inputs, so
   * this is daddend and the batch norm's output gradient g. */
  BU_FN(relu_backward)(u, y, dy, daddend);
  BU_FN(channel_reduce)(u, x, daddend, mean, sum_g, sum_gx);
  for (int64_t ch = 0; ch < c; ch++) {
    /* dx = w*invstd * (g - sum_g/M - (x-mean)*invstd^2*sum_gx/M) */
    const BU_T a = weight[ch] * invstd[ch];
    const BU_T b = invstd[ch] * invstd[ch] * sum_gx[ch] / count;
    k_g[ch] = a;
    k_x[ch] = -a * b;
    k_0[ch] = a * (mean[ch] * b - sum_g[ch] / count);
    weight_grad[ch] += sum_gx[ch] * invstd[ch];
    bias_grad[ch] += sum_g[ch];
  }
  BU_FN(channel_dx)(u, daddend, x, k_g, k_x, k_0, dx);
}
