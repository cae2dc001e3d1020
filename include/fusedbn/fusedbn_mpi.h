/*
 * fusedbn synchronized batch norm over an MPI communicator (libfusedbn_mpi,
 * built when MPI is found): the calls of <fusedbn/fusedbn_sync.h> with an
 * MPI_Comm in place of the callback table, on host memory.  Collective:
 * every rank of comm calls them in the same order.
 *
 * Build with `pkg-config --cflags --libs fusedbn-mpi` (libfusedbn_mpi,
 * libfusedbn and the MPI's own pkg-config module: ompi-c, mpich), or the
 * Meson dependency fusedbn_mpi_dep ('fusedbn-mpi') of a subproject; with an
 * MPI that has no pkg-config module, with its compiler wrapper (mpicc) and
 * -lfusedbn_mpi -lfusedbn.  C++ clients of this C API skip MPI's deprecated
 * C++ bindings as usual (-DOMPI_SKIP_MPICXX, -DMPICH_SKIP_MPICXX).
 *
 * MPI errors: the calls set no error handler.  With comm's handler
 * MPI_ERRORS_RETURN a failed collective is FBN_STATUS_DEVICE_ERROR with
 * MPI's error string in fbn_last_error_message(); with the default
 * MPI_ERRORS_ARE_FATAL, MPI aborts the job.
 */
#ifndef FUSEDBN_FUSEDBN_MPI_H
#define FUSEDBN_FUSEDBN_MPI_H

#include <mpi.h>

#include "fusedbn/fusedbn_sync.h"

#ifdef __cplusplus
extern "C" {
#endif

/** fbn_sync_comm_workspace_size() for comm's size (a failing MPI_Comm_size
 *  counts as size 0: FBN_STATUS_INVALID_VALUE, "world_size = 0"). */
FBN_API fbn_status fbn_mpi_sync_workspace_size(const fbn_op *op, MPI_Comm comm,
                                               const fbn_tensor_desc *x_desc, size_t *bytes);

/** fbn_sync_forward() over comm (MPI_Allgather of bytes). */
FBN_API fbn_status fbn_mpi_sync_forward(const fbn_op *op, MPI_Comm comm,
                                        const fbn_tensor_desc *x_desc, const void *x,
                                        const void *addend, void *y, const void *weight,
                                        const void *bias, void *running_mean, void *running_var,
                                        double factor, void *saved, size_t saved_bytes,
                                        void *workspace, size_t workspace_bytes);

/** fbn_sync_backward() over comm (MPI_Allreduce of doubles, MPI_SUM). */
FBN_API fbn_status fbn_mpi_sync_backward(const fbn_op *op, MPI_Comm comm,
                                         const fbn_tensor_desc *x_desc, const void *x,
                                         const void *y, const void *dy, const void *saved,
                                         size_t saved_bytes, const void *weight, const void *bias,
                                         void *dx, void *daddend, void *dweight, void *dbias,
                                         fbn_param_grad param_grad, fbn_sync_grad_scope scope,
                                         void *workspace, size_t workspace_bytes);

#ifdef __cplusplus
}
#endif

#endif /* FUSEDBN_FUSEDBN_MPI_H */
