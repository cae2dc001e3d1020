/*
 * Synchronized batch norm on the cuDNN backend's ops: what the API layer
 * (src/sync/sync_cuda.c, <fusedbn/fusedbn_cuda_sync.h>) asks of the
 * backend.  cuda_sync_host.c: layout, sizes, check headers and messages
 * (pure host code, also in the host-only test library); cuda_sync.c: the
 * phases, queued on the call's stream (cuda_sync_kernels.cu and the
 * backend's own apply / gradient kernels).  Messages name no public call.
 *
 * Saved state: [status block][mean][invstd][ReLU mask (ReLU operations)],
 * each part 256-byte aligned; mean/invstd of the param type.
 * Workspace:   [status block][own record][W gathered records][coefficients]
 *              [reduction partials][gradient record][its local copy].
 */
#ifndef FUSEDBN_SRC_CUDA_CUDA_SYNC_H
#define FUSEDBN_SRC_CUDA_CUDA_SYNC_H

#include <stdbool.h>
#include <stddef.h>

#include "backend.h"
#include "core/core.h"
#include "cuda_sync_math.h"
#include "fusedbn/fusedbn_cuda.h"

/* ---- layout (cuda_sync_host.c) ------------------------------------------ */

typedef struct fbn_cuda_sync_saved_parts {
  size_t mean, invstd, mask; /* byte offsets; mask 0: none */
  size_t bytes;
} fbn_cuda_sync_saved_parts;

typedef struct fbn_cuda_sync_ws_parts {
  size_t record, records, coef, partials, grad, grad_local; /* byte offsets */
  size_t record_bytes; /* 64 + 16 C: the stride of the gathered records */
  size_t bytes;
} fbn_cuda_sync_ws_parts;

FBN_INTERNAL fbn_cuda_sync_saved_parts fbn_cuda_sync_saved_layout(const fbn_op_desc *op,
                                                                  const fbn_tensor_desc *d);
FBN_INTERNAL fbn_cuda_sync_ws_parts fbn_cuda_sync_ws_layout(const fbn_tensor_desc *d,
                                                            int world_size);

/* This rank's check header for a shard of count values per channel (the
 * CPU record's header, byte for byte). */
FBN_INTERNAL fbn_cs_header fbn_cuda_sync_header(const fbn_op_desc *op, int64_t count);

/* The message of a failed status block (s->code != 0), naming no call:
 * "rank 1 has C = 3, this rank's op has num_features = 4: ...". */
FBN_INTERNAL void fbn_cuda_sync_describe(const fbn_cs_status *s, char *text, size_t size);

/* ---- phases (cuda_sync.c) ----------------------------------------------- */

/* NULL, or device memory of the op's device aligned to align. */
FBN_INTERNAL fbn_status fbn_cuda_sync_check_memory(void *state, const char *name,
                                                   const void *ptr, size_t align);

/* The statistics record of x into the workspace's own-record slot (an
 * empty shard: count 0). */
FBN_INTERNAL fbn_status fbn_cuda_sync_stats(void *state, const fbn_cuda_exec *exec,
                                            const fbn_tensor_desc *d, int world_size,
                                            const void *x, void *workspace);

/* This op's check header alone into the own-record slot (the check). */
FBN_INTERNAL fbn_status fbn_cuda_sync_header_only(void *state, const fbn_cuda_exec *exec,
                                                  int world_size, void *workspace);

/* Combine the world_size gathered records and (shard not empty) apply:
 * y, the saved state (saved may be NULL), running statistics (may be
 * NULL), the status blocks of the workspace and the saved state. */
FBN_INTERNAL fbn_status fbn_cuda_sync_apply(void *state, const fbn_cuda_exec *exec,
                                            const fbn_tensor_desc *d, int world_size,
                                            const void *x, const void *addend, void *y,
                                            const void *weight, const void *bias,
                                            void *running_mean, void *running_var, double factor,
                                            void *saved, void *workspace);

/* The gradient record (and its local copy) in the workspace. */
FBN_INTERNAL fbn_status fbn_cuda_sync_grad_reduce(void *state, const fbn_cuda_exec *exec,
                                                  const fbn_tensor_desc *d, int world_size,
                                                  const void *x, const void *dy,
                                                  const void *saved, void *workspace);

/* dx, daddend (each may be NULL) from the summed gradient record;
 * dweight/dbias (each may be NULL) the local (global false) or global sums. */
FBN_INTERNAL fbn_status fbn_cuda_sync_grad_apply(void *state, const fbn_cuda_exec *exec,
                                                 const fbn_tensor_desc *d, int world_size,
                                                 const void *x, const void *dy,
                                                 const void *saved,
                                                 const void *weight, void *dx, void *daddend,
                                                 void *dweight, void *dbias, bool accumulate,
                                                 bool global, void *workspace);

/* Wait for exec's stream and copy the status block at block to *out. */
FBN_INTERNAL fbn_status fbn_cuda_sync_read(void *state, const fbn_cuda_exec *exec,
                                           const void *block, fbn_cs_status *out);

/* Wait for exec's stream and copy bytes of device memory to host. */
FBN_INTERNAL fbn_status fbn_cuda_sync_fetch(void *state, const fbn_cuda_exec *exec,
                                            const void *src, void *dst, size_t bytes);

#endif /* FUSEDBN_SRC_CUDA_CUDA_SYNC_H */
