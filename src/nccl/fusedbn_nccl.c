/*
 * The NCCL adapter (<fusedbn/fusedbn_nccl.h>): an fbn_cuda_sync_comm whose
 * callbacks queue ncclAllGather and ncclAllReduce on the call's stream.
 * Uses only the public API of libfusedbn.
 */
#include <stdio.h>
#include <string.h>

#include "fusedbn/fusedbn_nccl.h"

typedef struct fbn_nccl_context {
  ncclComm_t comm;
} fbn_nccl_context;

static fbn_status nccl_failed(ncclComm_t comm, const char *call, ncclResult_t r, char *error,
                              size_t error_size) {
  const char *last = comm != NULL ? ncclGetLastError(comm) : NULL;
  snprintf(error, error_size, "%s returned %d: %s%s%s", call, (int)r, ncclGetErrorString(r),
           last != NULL && last[0] != '\0' ? ": " : "", last != NULL ? last : "");
  return FBN_STATUS_DEVICE_ERROR;
}

/* An asynchronous error the communicator already holds (a collective that
 * failed on the device): reported before anything more is queued. */
static fbn_status nccl_async(ncclComm_t comm, char *error, size_t error_size) {
  ncclResult_t async = ncclSuccess;
  const ncclResult_t r = ncclCommGetAsyncError(comm, &async);
  if (r != ncclSuccess)
    return nccl_failed(comm, "ncclCommGetAsyncError", r, error, error_size);
  if (async != ncclSuccess && async != ncclInProgress)
    return nccl_failed(comm, "the communicator (asynchronous error)", async, error, error_size);
  return FBN_STATUS_SUCCESS;
}

static fbn_status nccl_allgather(void *context, const void *send, void *recv, size_t bytes,
                                 cudaStream_t stream, char *error, size_t error_size) {
  const fbn_nccl_context *n = context;
  fbn_status st = nccl_async(n->comm, error, error_size);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const ncclResult_t r = ncclAllGather(send, recv, bytes, ncclUint8, n->comm, stream);
  return r == ncclSuccess ? FBN_STATUS_SUCCESS
                          : nccl_failed(n->comm, "ncclAllGather", r, error, error_size);
}

static fbn_status nccl_allreduce_sum(void *context, double *data, size_t count,
                                     cudaStream_t stream, char *error, size_t error_size) {
  const fbn_nccl_context *n = context;
  fbn_status st = nccl_async(n->comm, error, error_size);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  const ncclResult_t r = ncclAllReduce(data, data, count, ncclFloat64, ncclSum, n->comm, stream);
  return r == ncclSuccess ? FBN_STATUS_SUCCESS
                          : nccl_failed(n->comm, "ncclAllReduce", r, error, error_size);
}

/* A failure before fusedbn was called: a comm whose callbacks report it,
 * so that the message reaches fbn_last_error_message() the usual way. */
typedef struct fbn_nccl_failure {
  fbn_status status;
  const char *text;
} fbn_nccl_failure;

static fbn_status nccl_report(void *context, const void *send, void *recv, size_t bytes,
                              cudaStream_t stream, char *error, size_t error_size) {
  (void)send;
  (void)recv;
  (void)bytes;
  (void)stream;
  const fbn_nccl_failure *f = context;
  snprintf(error, error_size, "%s", f->text);
  return f->status;
}

static fbn_status nccl_report_reduce(void *context, double *data, size_t count,
                                     cudaStream_t stream, char *error, size_t error_size) {
  (void)data;
  (void)count;
  (void)stream;
  const fbn_nccl_failure *f = context;
  snprintf(error, error_size, "%s", f->text);
  return f->status;
}

/* The callback table of comm, or (NCCL can't say its size or rank) one
 * that reports why from its first collective. */
static void nccl_comm_table(fbn_nccl_context *ctx, fbn_nccl_failure *failure, char *error,
                            size_t error_size, fbn_cuda_sync_comm *out) {
  int size = 0, rank = 0;
  ncclResult_t r = ncclCommCount(ctx->comm, &size);
  const char *call = "ncclCommCount";
  if (r == ncclSuccess) {
    r = ncclCommUserRank(ctx->comm, &rank);
    call = "ncclCommUserRank";
  }
  if (r != ncclSuccess) {
    failure->status = nccl_failed(ctx->comm, call, r, error, error_size);
    failure->text = error;
    *out = (fbn_cuda_sync_comm){1, 0, failure, nccl_report, nccl_report_reduce};
    return;
  }
  *out = (fbn_cuda_sync_comm){size, rank, ctx, nccl_allgather, nccl_allreduce_sum};
}

fbn_status fbn_nccl_sync_workspace_size(const fbn_op *op, ncclComm_t comm,
                                        const fbn_tensor_desc *x_desc, size_t *bytes) {
  int size = 0;
  if (comm == NULL || ncclCommCount(comm, &size) != ncclSuccess)
    size = 0; /* fbn_cuda_sync_workspace_size names the invalid world size */
  return fbn_cuda_sync_workspace_size(op, x_desc, size, bytes);
}

fbn_status fbn_nccl_sync_check(const fbn_op *op, ncclComm_t comm, cudaStream_t stream,
                               void *workspace, size_t workspace_bytes) {
  fbn_nccl_context ctx = {comm};
  fbn_nccl_failure failure = {FBN_STATUS_SUCCESS, ""};
  char error[256] = "";
  fbn_cuda_sync_comm table;
  nccl_comm_table(&ctx, &failure, error, sizeof error, &table);
  const fbn_cuda_exec exec = {stream, NULL};
  return fbn_cuda_sync_check(op, &exec, &table, workspace, workspace_bytes);
}

fbn_status fbn_nccl_sync_forward(const fbn_op *op, ncclComm_t comm, cudaStream_t stream,
                                 const fbn_tensor_desc *x_desc, const void *x, const void *addend,
                                 void *y, const void *weight, const void *bias,
                                 void *running_mean, void *running_var, double factor,
                                 void *saved, size_t saved_bytes, void *workspace,
                                 size_t workspace_bytes) {
  fbn_nccl_context ctx = {comm};
  fbn_nccl_failure failure = {FBN_STATUS_SUCCESS, ""};
  char error[256] = "";
  fbn_cuda_sync_comm table;
  nccl_comm_table(&ctx, &failure, error, sizeof error, &table);
  const fbn_cuda_exec exec = {stream, NULL};
  return fbn_cuda_sync_forward(op, &exec, &table, x_desc, x, addend, y, weight, bias,
                               running_mean, running_var, factor, saved, saved_bytes, workspace,
                               workspace_bytes);
}

fbn_status fbn_nccl_sync_backward(const fbn_op *op, ncclComm_t comm, cudaStream_t stream,
                                  const fbn_tensor_desc *x_desc, const void *x, const void *y,
                                  const void *dy, const void *saved, size_t saved_bytes,
                                  const void *weight, const void *bias, void *dx, void *daddend,
                                  void *dweight, void *dbias, fbn_param_grad param_grad,
                                  fbn_sync_grad_scope scope, void *workspace,
                                  size_t workspace_bytes) {
  fbn_nccl_context ctx = {comm};
  fbn_nccl_failure failure = {FBN_STATUS_SUCCESS, ""};
  char error[256] = "";
  fbn_cuda_sync_comm table;
  nccl_comm_table(&ctx, &failure, error, sizeof error, &table);
  const fbn_cuda_exec exec = {stream, NULL};
  return fbn_cuda_sync_backward(op, &exec, &table, x_desc, x, y, dy, saved, saved_bytes, weight,
                                bias, dx, daddend, dweight, dbias, param_grad, scope, workspace,
                                workspace_bytes);
}
