/*
 * What the cuDNN backend offers the API layer beyond struct fbn_backend:
 * the queries behind the CUDA interop entry points of <fusedbn/fusedbn_cuda.h>
 * (src/api/cuda_api.c).  Path ids are fbn_cuda_path values.  Messages name
 * no public call (the API layer prefixes them).
 */
#ifndef FUSEDBN_SRC_CUDA_CUDA_BACKEND_H
#define FUSEDBN_SRC_CUDA_CUDA_BACKEND_H

#include <stdbool.h>
#include <stddef.h>

#include "backend.h"
#include "core/core.h"
#include "fusedbn/fusedbn_cuda.h"

/* The path the table (docs/cuda-backend.md) and the size gates give a
 * forward of desc with op: a pure host function (cuDNN's limits, nothing
 * refused). FBN_CUDA_PATH_NONE with an UNSUPPORTED message when none. */
FBN_INTERNAL fbn_status fbn_cuda_plan_path_of(const fbn_op_desc *op, const fbn_tensor_desc *desc,
                                              fbn_cuda_path *path);

/* The path the op's next forward of desc takes, with what cuDNN refused on
 * the device so far and FBN_CUDA_FORCE_PATH. state: the op's backend state. */
FBN_INTERNAL fbn_cuda_path fbn_cuda_state_path_of(const void *state,
                                                 const fbn_tensor_desc *desc);

/* cudnnQueryRuntimeError on the handle a call with exec used: the caller's
 * (exec->cudnn) or the op's own (none when the op never calls cuDNN: then
 * *result = SUCCESS without a query).  wait: synchronize exec->stream
 * first; else answer INVALID_STATE while its work has not finished.
 * Returns the query's own status; *result (on success) is SUCCESS,
 * DEVICE_ERROR (a run-time error, message set) or INVALID_STATE (no answer
 * yet, message set). */
FBN_INTERNAL fbn_status fbn_cuda_op_runtime_error(const void *state, const fbn_cuda_exec *exec,
                                                  bool wait, fbn_status *result);
/* The same on a caller's handle of device `device`, no op needed. */
FBN_INTERNAL fbn_status fbn_cuda_handle_runtime_error(int device, const fbn_cuda_exec *exec,
                                                      bool wait, fbn_status *result);
/* Whether the op holds a cuDNN handle of its own. */
FBN_INTERNAL bool fbn_cuda_op_has_handle(const void *state);

/* The path the last forward into the saved state at `saved` took (every
 * forward with saved memory records it), FBN_CUDA_PATH_NONE when none is
 * known. */
FBN_INTERNAL fbn_cuda_path fbn_cuda_recorded_saved_path(const void *saved);

/* Byte offsets of the saved mean and inverse std in the saved state of a
 * forward of desc (params of the tensors' param dtype, num_features each). */
FBN_INTERNAL void fbn_cuda_saved_stats_offsets(const fbn_tensor_desc *desc, size_t *mean_off,
                                               size_t *invstd_off);

#endif /* FUSEDBN_SRC_CUDA_CUDA_BACKEND_H */
