/*
 * fusedbn synchronized batch norm: training statistics combined across the
 * W ranks (processes, threads) of a data-parallel job, each holding a shard
 * of the batch (shards of any size, including empty ones), with the fused
 * add + ReLU kept.  Host memory (CPU ops) only.  No CUDA or MPI types:
 * <fusedbn/fusedbn_mpi.h> has the MPI adapter, <fusedbn/fusedbn_cuda_sync.h>
 * the synchronized forward/backward of CUDA ops (device memory, a stream).
 *
 * Split phases on an fbn_op of statistics FBN_STATISTICS_BATCH (the caller
 * moves the records between the ranks):
 *
 *   forward
 *     fbn_sync_stats()           this rank's statistics record: a check
 *                                header (magic, version, C, dtype,
 *                                param_dtype, operation, affine, eps) and
 *                                count, per-channel mean and M2 (sum of
 *                                squared deviations), float64
 *     -- all-gather the W records (fbn_sync_stats_record_size() bytes each,
 *        rank order) --
 *     fbn_sync_combine()         exact merge (Chan et al.) of the W records:
 *                                global mean and biased variance (float64,
 *                                C each), running statistics updated with the
 *                                unbiased variance over the total count; a
 *                                record that disagrees with this rank's op is
 *                                a status on every rank (all see the same
 *                                records)
 *     fbn_sync_apply()           y = op(x, addend) normalized with them, saved
 *                                state written for the backward
 *   backward
 *     fbn_sync_backward_reduce() this rank's gradient record: count, C and
 *                                per channel sum dz and sum dz * xhat
 *                                (float64); optionally the local dweight/dbias
 *     -- all-reduce SUM the record (fbn_sync_grad_record_size() bytes,
 *        doubles) --
 *     fbn_sync_backward_apply()  dx with the total count, daddend;
 *                                optionally the global dweight/dbias
 *
 * Only the all-gather form of the statistics exchange is offered (an
 * all-reduce SUM of raw or shifted sums is not: it is not exact for every
 * mix of shard sizes and means without a common shift agreed beforehand).
 *
 * dweight/dbias: data-parallel wrappers reduce parameter gradients
 * themselves, so the local gradient of this shard (pass dweight/dbias to
 * fbn_sync_backward_reduce()) is the usual choice; the global one (the sum
 * over the ranks, pass them to fbn_sync_backward_apply()) is there on
 * request.  fbn_sync_backward() takes an fbn_sync_grad_scope.
 *
 * The callback adapter (fbn_sync_comm: allgather / allreduce-sum function
 * pointers and a context) runs the whole synchronized forward
 * (fbn_sync_forward()) or backward (fbn_sync_backward()) through a
 * framework's own communicator.  Each call exchanges a fixed-size check
 * header first (forward and backward), so that ranks whose records would
 * differ in size (C disagreeing) fail with a status instead of entering a
 * collective of mismatched size, and a rank that fails on its own (an
 * argument, its workspace, an overlap, its local phase) still sends its
 * header, carrying its status: it returns its status, every other rank the
 * same status naming it, and no rank waits.  Only a rank whose comm is
 * unusable (NULL, world_size or rank out of range, a NULL callback)
 * returns at once, leaving the others in the collective.
 *
 * Shards: N may be 0 (that rank contributes count 0; x, addend, y, dy, dx,
 * daddend may then be NULL); the total count over the ranks must be > 1
 * per channel (FBN_STATUS_INVALID_SHAPE on every rank otherwise).  H and W
 * are per rank (only C must agree).
 *
 * Errors as everywhere in fusedbn: a status, a message naming the call, the
 * value and the rule; nothing written (outputs, running statistics,
 * gradients, saved state) on failure.
 */
#ifndef FUSEDBN_FUSEDBN_SYNC_H
#define FUSEDBN_FUSEDBN_SYNC_H

#include "fusedbn/fusedbn.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Version of the statistics record layout (in its check header). */
#define FBN_SYNC_RECORD_VERSION 1

/* ---- sizes -------------------------------------------------------------- */

/** Bytes of one rank's statistics record (64 + 16 * C).  NULL op or bytes:
 *  FBN_STATUS_NULL_POINTER; an op the synchronized calls can't run (not
 *  FBN_STATISTICS_BATCH: FBN_STATUS_INVALID_VALUE; not on the CPU:
 *  FBN_STATUS_UNSUPPORTED). */
FBN_API fbn_status fbn_sync_stats_record_size(const fbn_op *op, size_t *bytes);

/** Bytes of the gradient record of the backward all-reduce: (4 + 2 * C)
 *  doubles.  Statuses as fbn_sync_stats_record_size(). */
FBN_API fbn_status fbn_sync_grad_record_size(const fbn_op *op, size_t *bytes);

/** Saved state of fbn_sync_apply() for its backward, and the workspace of
 *  fbn_sync_apply(), fbn_sync_backward_reduce() and
 *  fbn_sync_backward_apply() (one size for the three), for a shard of
 *  description x_desc (N may be 0; C, dtype and layout those of the op).
 *  FBN_OP_MEMORY_ALIGNMENT-aligned memory, as for the op API. */
FBN_API fbn_status fbn_sync_saved_size(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                       size_t *bytes);
FBN_API fbn_status fbn_sync_workspace_size(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                           size_t *bytes);

/* ---- forward, split phases ---------------------------------------------- */

/** This rank's statistics record of x into record (record_bytes at least
 *  fbn_sync_stats_record_size(); 8-byte aligned).  Only record is written. */
FBN_API fbn_status fbn_sync_stats(const fbn_op *op, const fbn_tensor_desc *x_desc, const void *x,
                                  void *record, size_t record_bytes);

/**
 * Combine the world_size records at records (record_bytes apart, rank
 * order, as an all-gather leaves them) into the global mean and biased
 * variance (mean, var: C doubles each, written) and, with running_mean and
 * running_var given (both or neither; param_dtype, C each), the running
 * update running = (1 - factor) * running + factor * stat with the
 * unbiased variance M2 / (total - 1).  *total_count (may be NULL) receives
 * the number of values per channel over all ranks.
 *
 * A record whose check header is not one of fbn_sync_stats()
 * (FBN_STATUS_INVALID_STATE), or whose C, dtype, param_dtype, operation,
 * affine or eps differ from this op's (FBN_STATUS_SHAPE_MISMATCH for C and
 * dtype, FBN_STATUS_INVALID_VALUE for the others), names the rank; a total
 * count < 2: FBN_STATUS_INVALID_SHAPE.  Every rank combining the same
 * records gets the same status and bit-identical results.
 */
FBN_API fbn_status fbn_sync_combine(const fbn_op *op, const void *records, int world_size,
                                    size_t record_bytes, double *mean, double *var,
                                    void *running_mean, void *running_var, double factor,
                                    int64_t *total_count);

/** y = op(x, addend) with mean and var from fbn_sync_combine() (the biased
 *  variance; invstd = 1 / sqrt(var + eps)); saved (NULL: no backward) as
 *  sized by fbn_sync_saved_size().  Pointers as for fbn_op_forward(). */
FBN_API fbn_status fbn_sync_apply(const fbn_op *op, const fbn_tensor_desc *x_desc, const void *x,
                                  const void *addend, void *y, const void *weight, const void *bias,
                                  const double *mean, const double *var, void *saved,
                                  size_t saved_bytes, void *workspace, size_t workspace_bytes);

/* ---- backward, split phases --------------------------------------------- */

/** This rank's gradient record (doubles: count, 1, C, 0, sum dz[C],
 *  sum dz * xhat[C]) from the saved state of its fbn_sync_apply().  dweight
 *  and dbias (affine only; each may be NULL) receive, or with
 *  FBN_PARAM_GRAD_ACCUMULATE are incremented by, this shard's gradients. */
FBN_API fbn_status fbn_sync_backward_reduce(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                            const void *x, const void *y, const void *dy,
                                            const void *saved, size_t saved_bytes,
                                            const void *weight, const void *bias,
                                            double *grad_record, size_t grad_record_bytes,
                                            void *dweight, void *dbias, fbn_param_grad param_grad,
                                            void *workspace, size_t workspace_bytes);

/** dx (may be NULL) and daddend (may be NULL) of this shard from the
 *  all-reduced gradient record (its count is the total count; its C entry,
 *  summed, must be W * C: FBN_STATUS_SHAPE_MISMATCH otherwise).  dweight and
 *  dbias (each may be NULL) receive or are incremented by the global
 *  gradients. */
FBN_API fbn_status fbn_sync_backward_apply(
    const fbn_op *op, const fbn_tensor_desc *x_desc, const void *x, const void *y, const void *dy,
    const void *saved, size_t saved_bytes, const void *weight, const void *bias,
    const double *grad_record, size_t grad_record_bytes, void *dx, void *daddend, void *dweight,
    void *dbias, fbn_param_grad param_grad, void *workspace, size_t workspace_bytes);

/* ---- callback adapter --------------------------------------------------- */

/**
 * A communicator brought by the caller.  Each callback is collective (every
 * rank calls it, in the same order) and returns FBN_STATUS_SUCCESS or the
 * status to report; on failure it may write a message (NUL-terminated,
 * at most error_size bytes) into error, which reaches the caller of
 * fbn_sync_forward()/fbn_sync_backward() in fbn_last_error_message().
 */
typedef struct fbn_sync_comm {
  /** W >= 1. */
  int world_size;
  /** This rank's index in [0, world_size). */
  int rank;
  void *context;
  /** recv[r * bytes .. (r + 1) * bytes) = rank r's send, for every r. */
  fbn_status (*allgather)(void *context, const void *send, void *recv, size_t bytes, char *error,
                          size_t error_size);
  /** data[0 .. count) = the element-wise sum over the ranks, in place. */
  fbn_status (*allreduce_sum)(void *context, double *data, size_t count, char *error,
                              size_t error_size);
} fbn_sync_comm;

/** Which dweight/dbias fbn_sync_backward() writes. */
typedef enum fbn_sync_grad_scope {
  /** This shard's gradients (the default: data-parallel wrappers reduce
   *  parameter gradients themselves). */
  FBN_SYNC_GRAD_LOCAL = 0,
  /** The sum over the ranks (as one process on the whole batch). */
  FBN_SYNC_GRAD_GLOBAL = 1,
} fbn_sync_grad_scope;

/** Workspace of fbn_sync_forward() and fbn_sync_backward() for this shard
 *  and world size (the records, the statistics and fbn_sync_workspace_size()). */
FBN_API fbn_status fbn_sync_comm_workspace_size(const fbn_op *op, const fbn_tensor_desc *x_desc,
                                                int world_size, size_t *bytes);

/** The synchronized training forward: fbn_sync_stats(), the check headers
 *  and the records all-gathered through comm, fbn_sync_combine(),
 *  fbn_sync_apply().  Arguments as for fbn_op_forward() (saved sized by
 *  fbn_sync_saved_size(), workspace by fbn_sync_comm_workspace_size());
 *  running statistics updated only when the call succeeds. */
FBN_API fbn_status fbn_sync_forward(const fbn_op *op, const fbn_sync_comm *comm,
                                    const fbn_tensor_desc *x_desc, const void *x,
                                    const void *addend, void *y, const void *weight,
                                    const void *bias, void *running_mean, void *running_var,
                                    double factor, void *saved, size_t saved_bytes, void *workspace,
                                    size_t workspace_bytes);

/** The synchronized backward of the fbn_sync_forward() that filled saved:
 *  reduce, all-reduce through comm, apply; dweight/dbias as scope says,
 *  written only when the call succeeds. */
FBN_API fbn_status fbn_sync_backward(const fbn_op *op, const fbn_sync_comm *comm,
                                     const fbn_tensor_desc *x_desc, const void *x, const void *y,
                                     const void *dy, const void *saved, size_t saved_bytes,
                                     const void *weight, const void *bias, void *dx, void *daddend,
                                     void *dweight, void *dbias, fbn_param_grad param_grad,
                                     fbn_sync_grad_scope scope, void *workspace,
                                     size_t workspace_bytes);

#ifdef __cplusplus
}
#endif

#endif /* FUSEDBN_FUSEDBN_SYNC_H */
