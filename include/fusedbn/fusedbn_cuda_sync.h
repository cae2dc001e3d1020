/*
 * fusedbn synchronized batch norm on CUDA ops: the synchronized training
 * forward and backward of <fusedbn/fusedbn_sync.h> on device memory and a
 * CUDA stream, through a communicator whose collectives are queued on that
 * stream (the NCCL adapter <fusedbn/fusedbn_nccl.h> is one).  An interop
 * header like <fusedbn/fusedbn_cuda.h> (it includes it).
 *
 * Stream order, no host synchronization
 *   fbn_cuda_sync_forward() and fbn_cuda_sync_backward() queue kernels and
 *   the communicator's collectives on exec->stream and return: they never
 *   synchronize, allocate or copy to the host, so a step can be captured
 *   into a CUDA graph (with a communicator that can be captured).  The
 *   records (statistics: 64 + 16 C bytes per rank, the CPU layout; gradient:
 *   (4 + 2 C) doubles) live in the workspace.
 *
 * Checks on the device, status read later
 *   The combine (a kernel) checks every rank's check header (C, dtype,
 *   param_dtype, operation, affine, eps, count) and the total count, as
 *   fbn_sync_combine() does.  Its outcome cannot be returned without a host
 *   synchronization, so it goes to a status block (the first 256 bytes of
 *   the workspace and of the saved state) and the kernels honour it: on a
 *   failed check the running statistics are not written and every y, the
 *   saved mean and invstd are NaN; the backward of such a forward writes
 *   NaN dx, leaves dweight/dbias alone and records the forward's status.
 *   fbn_cuda_sync_read_status() (synchronizing: outside the captured step,
 *   e.g. once per step or when a loss is NaN) returns it with the message
 *   naming the rank and both values.  Every rank sees the same records, so
 *   every rank records the same status.
 *
 * C disagreeing across ranks
 *   Records of different C differ in size; a collective of mismatched sizes
 *   would hang.  fbn_cuda_sync_check() exchanges the fixed-size check
 *   headers alone and checks them on the host (it synchronizes): call it
 *   once per op and communicator before the first step (or before
 *   capturing): it returns the status on every rank.  The forward itself
 *   relies on C agreeing.
 *
 * Errors the host sees (returned at once, nothing queued after them): bad
 * arguments (statuses as in fusedbn_sync.h; host memory
 * FBN_STATUS_INVALID_VALUE as in fusedbn_cuda.h), a failed launch, a
 * failing collective callback (its status, its text in
 * fbn_last_error_message()).
 */
#ifndef FUSEDBN_FUSEDBN_CUDA_SYNC_H
#define FUSEDBN_FUSEDBN_CUDA_SYNC_H

#include "fusedbn/fusedbn_cuda.h"
#include "fusedbn/fusedbn_sync.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * A communicator whose collectives are queued on a CUDA stream.  Each
 * callback is collective (every rank calls it, in the same order), gets
 * device pointers and the call's stream, queues its work there and returns
 * FBN_STATUS_SUCCESS, or the status to report with a message
 * (NUL-terminated, at most error_size bytes) in error.
 */
typedef struct fbn_cuda_sync_comm {
  /** W >= 1. */
  int world_size;
  /** This rank's index in [0, world_size). */
  int rank;
  void *context;
  /** recv[r * bytes .. (r + 1) * bytes) = rank r's send, for every r. */
  fbn_status (*allgather)(void *context, const void *send, void *recv, size_t bytes,
                          cudaStream_t stream, char *error, size_t error_size);
  /** data[0 .. count) = the element-wise sum over the ranks, in place. */
  fbn_status (*allreduce_sum)(void *context, double *data, size_t count, cudaStream_t stream,
                              char *error, size_t error_size);
} fbn_cuda_sync_comm;

/** Bytes of the saved state fbn_cuda_sync_forward() leaves for its
 *  backward (status block, mean, invstd, ReLU mask), for a shard of
 *  x_desc (N may be 0).  A CPU op: FBN_STATUS_INVALID_VALUE (use
 *  fbn_sync_saved_size()); statistics running: FBN_STATUS_INVALID_VALUE. */
FBN_API fbn_status fbn_cuda_sync_saved_size(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                            size_t *bytes);

/** Bytes of the workspace of fbn_cuda_sync_forward(),
 *  fbn_cuda_sync_backward() and fbn_cuda_sync_check() for a shard of
 *  x_desc and world_size ranks (one size for all three). */
FBN_API fbn_status fbn_cuda_sync_workspace_size(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                                int world_size, size_t *bytes);

/** Collective, synchronizing: exchange this op's check header with every
 *  rank and check them all (C and dtype: FBN_STATUS_SHAPE_MISMATCH;
 *  param_dtype, operation, affine, eps: FBN_STATUS_INVALID_VALUE; naming
 *  the rank and both values).  workspace as for a forward of any shard of
 *  the op (fbn_cuda_sync_workspace_size() with N = 0 is enough).  NULL
 *  exec: the defaults. */
FBN_API fbn_status fbn_cuda_sync_check(const fbn_op *op, const fbn_cuda_exec *exec,
                                       const fbn_cuda_sync_comm *comm, void *workspace,
                                       size_t workspace_bytes);

/** The synchronized training forward (fbn_sync_forward() on the device):
 *  the statistics record, all-gathered through comm, combined and applied
 *  on exec->stream.  saved: fbn_cuda_sync_saved_size() bytes (NULL: no
 *  backward); workspace: fbn_cuda_sync_workspace_size().  Running
 *  statistics (both or neither) updated in stream order when the device's
 *  check passes. */
FBN_API fbn_status fbn_cuda_sync_forward(const fbn_op *op, const fbn_cuda_exec *exec,
                                         const fbn_cuda_sync_comm *comm,
                                         const fbn_tensor_desc *x_desc, const void *x,
                                         const void *addend, void *y, const void *weight,
                                         const void *bias, void *running_mean, void *running_var,
                                         double factor, void *saved, size_t saved_bytes,
                                         void *workspace, size_t workspace_bytes);

/** The synchronized backward of the fbn_cuda_sync_forward() that filled
 *  saved: the gradient record, all-reduced (SUM) through comm, dx and
 *  daddend with the total count; dweight/dbias (each may be NULL) as scope
 *  says.  y may be NULL (the ReLU gate is the saved mask); saved is
 *  required, also for an empty shard (it holds the forward's status). */
FBN_API fbn_status fbn_cuda_sync_backward(const fbn_op *op, const fbn_cuda_exec *exec,
                                          const fbn_cuda_sync_comm *comm,
                                          const fbn_tensor_desc *x_desc, const void *x,
                                          const void *y, const void *dy, const void *saved,
                                          size_t saved_bytes, const void *weight,
                                          const void *bias, void *dx, void *daddend,
                                          void *dweight, void *dbias, fbn_param_grad param_grad,
                                          fbn_sync_grad_scope scope, void *workspace,
                                          size_t workspace_bytes);

/**
 * Synchronizing: wait for exec->stream and read the status block at
 * status_memory (a workspace or saved state of the calls above: the last
 * forward's or backward's check on it).  Returns the status of the read
 * itself; *result is the device check's status (FBN_STATUS_SUCCESS, or
 * the check's status with its message in fbn_last_error_message()).  A
 * block no synchronized call wrote: FBN_STATUS_INVALID_STATE.
 */
FBN_API fbn_status fbn_cuda_sync_read_status(const fbn_op *op, const fbn_cuda_exec *exec,
                                             const void *status_memory, fbn_status *result);

#ifdef __cplusplus
}
#endif

#endif /* FUSEDBN_FUSEDBN_CUDA_SYNC_H */
