/*
 * fusedbn synchronized batch norm over an NCCL communicator
 * (libfusedbn_nccl, built when NCCL is found with the CUDA backend): the
 * calls of <fusedbn/fusedbn_cuda_sync.h> with an ncclComm_t and a CUDA
 * stream in place of the callback table, on device memory.  An interop
 * header: it includes <nccl.h> and <cuda_runtime_api.h>.  Collective: every
 * rank of comm calls them in the same order.
 *
 * The records are exchanged with ncclAllGather (bytes, ncclUint8) and the
 * gradient record with ncclAllReduce (ncclFloat64, ncclSum), both queued on
 * `stream`, where the kernels before and after them run: nothing waits on
 * the host, so a step can be captured into a CUDA graph (NCCL supports
 * capture of its collectives).  The device's checks of the exchanged
 * records (C, dtype and the op on every rank, the total count) are read
 * with fbn_cuda_sync_read_status() on the workspace or saved state (see
 * fusedbn_cuda_sync.h for what a failed check leaves).
 *
 * Ranks disagreeing on C would enter collectives of different sizes (NCCL
 * does not check sizes: a hang): call fbn_nccl_sync_check() once per op
 * and communicator before the first step; it exchanges the fixed-size
 * check headers alone, synchronizes and returns the status on every rank.
 *
 * NCCL errors: a collective that NCCL refuses to queue, or an asynchronous
 * error the communicator already holds (ncclCommGetAsyncError), is
 * FBN_STATUS_DEVICE_ERROR with ncclGetErrorString() and ncclGetLastError()
 * in fbn_last_error_message(); nothing is queued after it.
 *
 * Link with libfusedbn_nccl, libfusedbn and NCCL: pkg-config fusedbn-nccl,
 * or the Meson dependency fusedbn_nccl_dep in the tree.
 */
#ifndef FUSEDBN_FUSEDBN_NCCL_H
#define FUSEDBN_FUSEDBN_NCCL_H

#include <nccl.h>

#include "fusedbn/fusedbn_cuda_sync.h"

#ifdef __cplusplus
extern "C" {
#endif

/** fbn_cuda_sync_workspace_size() for comm's size (a failing ncclCommCount
 *  counts as size 0: FBN_STATUS_INVALID_VALUE, "world_size = 0"). */
FBN_API fbn_status fbn_nccl_sync_workspace_size(const fbn_op *op, ncclComm_t comm,
                                                const fbn_tensor_desc *x_desc, size_t *bytes);

/** fbn_cuda_sync_check() over comm on stream (synchronizes). */
FBN_API fbn_status fbn_nccl_sync_check(const fbn_op *op, ncclComm_t comm, cudaStream_t stream,
                                       void *workspace, size_t workspace_bytes);

/** fbn_cuda_sync_forward() over comm, everything queued on stream. */
FBN_API fbn_status fbn_nccl_sync_forward(const fbn_op *op, ncclComm_t comm, cudaStream_t stream,
                                         const fbn_tensor_desc *x_desc, const void *x,
                                         const void *addend, void *y, const void *weight,
                                         const void *bias, void *running_mean, void *running_var,
                                         double factor, void *saved, size_t saved_bytes,
                                         void *workspace, size_t workspace_bytes);

/** fbn_cuda_sync_backward() over comm, everything queued on stream. */
FBN_API fbn_status fbn_nccl_sync_backward(const fbn_op *op, ncclComm_t comm, cudaStream_t stream,
                                          const fbn_tensor_desc *x_desc, const void *x,
                                          const void *y, const void *dy, const void *saved,
                                          size_t saved_bytes, const void *weight,
                                          const void *bias, void *dx, void *daddend,
                                          void *dweight, void *dbias, fbn_param_grad param_grad,
                                          fbn_sync_grad_scope scope, void *workspace,
                                          size_t workspace_bytes);

#ifdef __cplusplus
}
#endif

#endif /* FUSEDBN_FUSEDBN_NCCL_H */
