/*
 * The CPU backends' hooks for synchronized batch norm (fbn_backend_sync,
 * backend.h; src/sync/): local statistics of a shard, and dx / daddend of a shard with
 * the sums and count of the whole batch. Both CPU backends use these, with
 * the reference backend's arithmetic (float64, n-major order); the forward
 * apply and the backward reduction run through their forward / backward
 * (running-statistics mode) instead.
 */
#ifndef FUSEDBN_SRC_CPU_CPU_SYNC_H
#define FUSEDBN_SRC_CPU_CPU_SYNC_H

#include "cpu/cpu_common.h"

/* fbn_backend_sync_hooks() (backend.h) is defined in cpu_sync.c: the hooks
 * of the reference and of the fast backend (each checks that its own
 * forward filled the saved state it reads). */

#endif /* FUSEDBN_SRC_CPU_CPU_SYNC_H */
