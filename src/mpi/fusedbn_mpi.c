/*
 * The MPI adapter (<fusedbn/fusedbn_mpi.h>): an fbn_sync_comm whose
 * callbacks are MPI_Allgather and MPI_Allreduce on the caller's
 * communicator. Uses only the public API of libfusedbn.
 */
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "fusedbn/fusedbn_mpi.h"

typedef struct fbn_mpi_context {
  MPI_Comm comm;
} fbn_mpi_context;

static fbn_status mpi_failed(const char *call, int rc, char *error, size_t error_size) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS)
    snprintf(text, sizeof text, "MPI error %d", rc);
  snprintf(error, error_size, "%s returned %d: %s", call, rc, text);
  return FBN_STATUS_DEVICE_ERROR;
}

static fbn_status mpi_allgather(void *context, const void *send, void *recv, size_t bytes,
                                char *error, size_t error_size) {
  const fbn_mpi_context *m = context;
  if (bytes > (size_t)INT_MAX) {
    snprintf(error, error_size, "MPI_Allgather of %zu bytes: more than INT_MAX", bytes);
    return FBN_STATUS_INVALID_VALUE;
  }
  const int rc = MPI_Allgather(send, (int)bytes, MPI_BYTE, recv, (int)bytes, MPI_BYTE, m->comm);
  return rc == MPI_SUCCESS ? FBN_STATUS_SUCCESS
                           : mpi_failed("MPI_Allgather", rc, error, error_size);
}

static fbn_status mpi_allreduce_sum(void *context, double *data, size_t count, char *error,
                                    size_t error_size) {
  const fbn_mpi_context *m = context;
  if (count > (size_t)INT_MAX) {
    snprintf(error, error_size, "MPI_Allreduce of %zu doubles: more than INT_MAX", count);
    return FBN_STATUS_INVALID_VALUE;
  }
  const int rc = MPI_Allreduce(MPI_IN_PLACE, data, (int)count, MPI_DOUBLE, MPI_SUM, m->comm);
  return rc == MPI_SUCCESS ? FBN_STATUS_SUCCESS
                           : mpi_failed("MPI_Allreduce", rc, error, error_size);
}

/* The callback table of comm; FBN_STATUS_DEVICE_ERROR when MPI can't say
 * its size or rank (*error then has MPI's text). */
static fbn_status mpi_comm_table(fbn_mpi_context *ctx, fbn_sync_comm *out, char *error,
                                 size_t error_size) {
  int size = 0, rank = 0;
  int rc = MPI_Comm_size(ctx->comm, &size);
  if (rc != MPI_SUCCESS)
    return mpi_failed("MPI_Comm_size", rc, error, error_size);
  rc = MPI_Comm_rank(ctx->comm, &rank);
  if (rc != MPI_SUCCESS)
    return mpi_failed("MPI_Comm_rank", rc, error, error_size);
  out->world_size = size;
  out->rank = rank;
  out->context = ctx;
  out->allgather = mpi_allgather;
  out->allreduce_sum = mpi_allreduce_sum;
  return FBN_STATUS_SUCCESS;
}

/* A failure before fusedbn was called: a comm callback that reports it, so
 * that the message reaches fbn_last_error_message() the usual way. */
typedef struct fbn_mpi_failure {
  fbn_status status;
  const char *text;
} fbn_mpi_failure;

static fbn_status mpi_report(void *context, const void *send, void *recv, size_t bytes, char *error,
                             size_t error_size) {
  (void)send;
  (void)recv;
  (void)bytes;
  const fbn_mpi_failure *f = context;
  snprintf(error, error_size, "%s", f->text);
  return f->status;
}

static fbn_status mpi_report_reduce(void *context, double *data, size_t count, char *error,
                                    size_t error_size) {
  (void)data;
  (void)count;
  const fbn_mpi_failure *f = context;
  snprintf(error, error_size, "%s", f->text);
  return f->status;
}

fbn_status fbn_mpi_sync_workspace_size(const fbn_op *op, MPI_Comm comm,
                                       const fbn_tensor_desc *x_desc, size_t *bytes) {
  int size = 0;
  if (MPI_Comm_size(comm, &size) != MPI_SUCCESS)
    size = 0; /* fbn_sync_comm_workspace_size names the invalid world size */
  return fbn_sync_comm_workspace_size(op, x_desc, size, bytes);
}

fbn_status fbn_mpi_sync_forward(const fbn_op *op, MPI_Comm comm, const fbn_tensor_desc *x_desc,
                                const void *x, const void *addend, void *y, const void *weight,
                                const void *bias, void *running_mean, void *running_var,
                                double factor, void *saved, size_t saved_bytes, void *workspace,
                                size_t workspace_bytes) {
  fbn_mpi_context ctx = {comm};
  fbn_sync_comm table;
  char error[256] = "";
  fbn_status st = mpi_comm_table(&ctx, &table, error, sizeof error);
  fbn_mpi_failure failure = {st, error};
  if (st != FBN_STATUS_SUCCESS) /* reported by the first collective */
    table = (fbn_sync_comm){1, 0, &failure, mpi_report, mpi_report_reduce};
  return fbn_sync_forward(op, &table, x_desc, x, addend, y, weight, bias, running_mean, running_var,
                          factor, saved, saved_bytes, workspace, workspace_bytes);
}

fbn_status fbn_mpi_sync_backward(const fbn_op *op, MPI_Comm comm, const fbn_tensor_desc *x_desc,
                                 const void *x, const void *y, const void *dy, const void *saved,
                                 size_t saved_bytes, const void *weight, const void *bias, void *dx,
                                 void *daddend, void *dweight, void *dbias,
                                 fbn_param_grad param_grad, fbn_sync_grad_scope scope,
                                 void *workspace, size_t workspace_bytes) {
  fbn_mpi_context ctx = {comm};
  fbn_sync_comm table;
  char error[256] = "";
  fbn_status st = mpi_comm_table(&ctx, &table, error, sizeof error);
  fbn_mpi_failure failure = {st, error};
  if (st != FBN_STATUS_SUCCESS)
    table = (fbn_sync_comm){1, 0, &failure, mpi_report, mpi_report_reduce};
  return fbn_sync_backward(op, &table, x_desc, x, y, dy, saved, saved_bytes, weight, bias, dx,
                           daddend, dweight, dbias, param_grad, scope, workspace, workspace_bytes);
}
