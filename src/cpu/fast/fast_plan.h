/*
 * Fast CPU backend: plans of the NHWC and short-row NCHW loops, carved from
 * the call's workspace (the same functions size the workspace queries).
 */
#ifndef FUSEDBN_SRC_CPU_FAST_FAST_PLAN_H
#define FUSEDBN_SRC_CPU_FAST_FAST_PLAN_H

#include "cpu/fast/fast_types.h"

/* ---- scratch ------------------------------------------------------------ */

#define FBN_FAST_ALIGN 64

static size_t fbn_fast_round_up(size_t v) {
  return (v + FBN_FAST_ALIGN - 1) / FBN_FAST_ALIGN * FBN_FAST_ALIGN;
}

/* The call's workspace as scratch of at least bytes (NULL if smaller: the
 * caller then plans for fewer threads). */
static void *fbn_fast_scratch(fbn_fast_call *m, size_t bytes) {
  return m->scratch != NULL && m->scratch_bytes >= bytes ? m->scratch : NULL;
}

/* Carve an NHWC plan for a tensor of `rows` rows of C channels, nt
 * threads, coefficients of elem bytes (fbn_fast_coef_size), from m's workspace; *bytes = the scratch
 * it needs. m NULL: only *bytes. INSUFFICIENT_WORKSPACE (no message) when
 * the workspace is smaller. */
static fbn_status fbn_fast_nhwc_plan_make(fbn_fast_call *m, int64_t rows, int64_t c, int nt,
                                          size_t elem, fbn_fast_nhwc_plan *plan, size_t *bytes) {
  int64_t p = c >= FBN_FAST_NHWC_BLOCK ? 1 : (FBN_FAST_NHWC_BLOCK + c - 1) / c;
  /* A block never spans more rows than the tensor has: the per-call setup
   * (shift, partial sums, coefficient rows) is O(P*C), which must not
   * dwarf a small tensor. */
  if (p > rows)
    p = rows;
  /* Units of work: about FBN_FAST_NHWC_CHUNK_BYTES of x, at least 8 per
   * thread when the tensor allows, whole blocks of P rows. */
  int64_t cr = FBN_FAST_NHWC_CHUNK_BYTES / (c * (int64_t)elem);
  const int64_t spread = rows / (8 * (int64_t)nt);
  if (cr > spread)
    cr = spread;
  cr = cr / p * p;
  plan->chunk_rows = cr < p ? p : cr;
  const size_t lp = (size_t)(p * c), cs = (size_t)c, pad = FBN_FAST_SCRATCH_PAD;
  const size_t one_partial = fbn_fast_round_up(lp * sizeof(double)) + pad;
  const size_t shift = fbn_fast_round_up(lp * sizeof(double)) + pad;
  const size_t stats = fbn_fast_round_up(2 * cs * sizeof(double));
  const size_t chan = fbn_fast_round_up(cs * sizeof(fbn_fast_bwd_chan));
  const size_t one_coef = fbn_fast_round_up(lp * elem) + pad;
  const size_t fast = fbn_fast_round_up(cs * sizeof(bool));
  const size_t total = 2 * (size_t)nt * one_partial + shift + stats + chan + 4 * one_coef + fast;
  *bytes = total;
  if (m == NULL)
    return FBN_STATUS_SUCCESS;
  char *base = fbn_fast_scratch(m, total);
  if (base == NULL)
    return FBN_STATUS_INSUFFICIENT_WORKSPACE;
  plan->rows_per_block = p;
  plan->block = (int64_t)lp;
  plan->partial = (double *)base;
  plan->partial_stride = (int64_t)(one_partial / sizeof(double));
  base += 2 * (size_t)nt * one_partial;
  plan->shift = (double *)base;
  base += shift;
  plan->mean = (double *)base;
  plan->invstd = plan->mean + c;
  base += stats;
  plan->chan = (fbn_fast_bwd_chan *)base;
  base += chan;
  for (int i = 0; i < 4; i++) {
    plan->coef[i] = base;
    base += one_coef;
  }
  plan->fast = (bool *)base;
  return FBN_STATUS_SUCCESS;
}

/* Bytes of the arrays of one NCHW view (and, with base, their addresses). */
static size_t fbn_fast_nchw_carve(const fbn_fast_nchw_plan *plan, char *base,
                                  fbn_fast_nchw_view *v) {
  const size_t len = (size_t)plan->len, g = (size_t)plan->group, pad = FBN_FAST_SCRATCH_PAD;
  const size_t arr = fbn_fast_round_up(len * sizeof(double)) + pad;
  const size_t coef = fbn_fast_round_up(len * plan->elem) + pad;
  size_t off = 0;
  double **dbl[] = {&v->s1, &v->s2, &v->shift};
  for (size_t i = 0; i < 3; i++, off += arr)
    *dbl[i] = (double *)(base + off);
  v->mean = (double *)(base + off);
  v->invstd = v->mean + g;
  off += fbn_fast_round_up(2 * g * sizeof(double));
  v->chan = (fbn_fast_bwd_chan *)(base + off);
  off += fbn_fast_round_up(g * sizeof(fbn_fast_bwd_chan));
  for (size_t i = 0; i < 4; i++, off += coef)
    v->coef[i] = base + off;
  v->fast = (bool *)(base + off);
  off += fbn_fast_round_up(g * sizeof(bool));
  return off;
}

/* Thread t's view of an NCHW plan. */
static void fbn_fast_nchw_view_of(const fbn_fast_nchw_plan *plan, int t, fbn_fast_nchw_view *v) {
  fbn_fast_nchw_carve(plan, plan->base + (size_t)t * plan->per_thread, v);
}

/* Plan for NCHW with short rows: group of channels and per-thread scratch,
 * from m's workspace as fbn_fast_nhwc_plan_make. */
static fbn_status fbn_fast_nchw_plan_make(fbn_fast_call *m, const fbn_tensor_desc *d, int nt,
                                          int64_t bytes_per_channel, fbn_fast_nchw_plan *plan,
                                          size_t *bytes) {
  const int64_t hw = d->h * d->w;
  int64_t g = FBN_FAST_NCHW_VEC_LEN / hw;
  const int64_t fits =
      FBN_FAST_GROUP_BYTES_SHORT_ROWS / (bytes_per_channel > 0 ? bytes_per_channel : 1);
  if (g > fits)
    g = fits;
  const int64_t balanced = d->c / (4 * (int64_t)nt);
  if (nt > 1 && g > balanced) /* one thread: no balancing, fewer calls */
    g = balanced;
  if (g > d->c) /* one group holds every channel: no scratch for more */
    g = d->c;
  if (g < 1)
    g = 1;
  plan->group = g;
  plan->len = g * hw;
  plan->elem = fbn_fast_coef_size(d->dtype);
  fbn_fast_nchw_view v;
  plan->per_thread = fbn_fast_nchw_carve(plan, NULL, &v);
  *bytes = plan->per_thread * (size_t)nt;
  if (m == NULL)
    return FBN_STATUS_SUCCESS;
  plan->base = fbn_fast_scratch(m, *bytes);
  return plan->base != NULL ? FBN_STATUS_SUCCESS : FBN_STATUS_INSUFFICIENT_WORKSPACE;
}

#endif /* FUSEDBN_SRC_CPU_FAST_FAST_PLAN_H */
