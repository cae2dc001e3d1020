/*
 * Exact merge of per-channel statistics of disjoint parts of a batch
 * (Chan, Golub and LeVeque's pairwise update), in float64: the combine step
 * of synchronized batch norm (src/sync/). Pure formulas, usable by any host
 * code.
 */
#ifndef FUSEDBN_SRC_CORE_BN_MERGE_H
#define FUSEDBN_SRC_CORE_BN_MERGE_H

/* Running merge of (n, mean, m2) with a part (nb, mean_b, m2_b), m2 the sum
 * of squared deviations from the part's mean. A part of count 0 changes
 * nothing; merging into an empty total takes the part as it is (so one
 * non-empty part comes out bit-identical). */
static inline void fbn_bn_merge(double *n, double *mean, double *m2, double nb, double mean_b,
                                double m2_b) {
  if (nb == 0.0)
    return;
  if (*n == 0.0) {
    *n = nb;
    *mean = mean_b;
    *m2 = m2_b;
    return;
  }
  const double na = *n, total = na + nb, delta = mean_b - *mean;
  *mean += delta * (nb / total);
  *m2 += m2_b + delta * delta * (na * nb / total);
  *n = total;
}

#endif /* FUSEDBN_SRC_CORE_BN_MERGE_H */
