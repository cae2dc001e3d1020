/*
 * The fast CPU backend (cpu_fast.c): the default for CPU modules;
 * FBN_CPU_BACKEND=reference selects the reference backend (cpu_ref.c)
 * instead.
 */
#ifndef FUSEDBN_SRC_CPU_CPU_FAST_H
#define FUSEDBN_SRC_CPU_CPU_FAST_H

#include "internal.h"

FBN_INTERNAL const fbn_backend *fbn_backend_cpu_fast(void);

#endif /* FUSEDBN_SRC_CPU_CPU_FAST_H */
