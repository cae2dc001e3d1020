/*
 * The internal backend interface: what the API layer (src/api/) asks of a
 * backend (src/cpu/, src/cuda/). Never installed.
 *
 * A backend computes on explicit pointers. It never sees fbn_module,
 * fbn_saved or fbn_op (the API layer's objects) and never calls up into
 * the API layer; it includes this header and core/core.h only.
 *
 * Division of work:
 *   API layer  validates every argument that does not depend on the device
 *              (NULL pointers, enum values, shapes and overflow, C against
 *              num_features, dtype/layout against the op, which pointers an
 *              operation takes, factor in [0, 1], aliasing, sizes and
 *              alignment of saved memory and workspace against this
 *              backend's queries), before any backend call; module state
 *              (num_batches_tracked, saved objects) changes only after the
 *              backend succeeded.
 *   backend    op_init: can it run this op description (UNSUPPORTED with a
 *              message naming the value and the rule if not)? check_shape:
 *              device limits of one tensor shape; size queries; forward and
 *              backward; memory hooks for the module layer's buffers.
 *
 * Backend messages name no public call: the API layer prefixes them with
 * the public function's name (fbn_error_prefix).
 */
#ifndef FUSEDBN_SRC_BACKEND_H
#define FUSEDBN_SRC_BACKEND_H

#include "core/core.h"

/* Everything one forward needs, validated by the API layer. */
typedef struct fbn_bk_forward_args {
  const fbn_op_desc *op;       /* validated, accepted by op_init */
  void *state;                 /* the backend's per-op state (op_init) */
  const fbn_tensor_desc *desc; /* C, dtype, layout equal to the op's */
  const void *x;
  const void *addend; /* non-NULL exactly for FBN_OPERATION_BN_ADD_RELU */
  void *y;
  /* num_features elements of op->param_dtype each; weight/bias non-NULL
   * exactly when op->affine. */
  const void *weight;
  const void *bias;
  /* FBN_STATISTICS_RUNNING: both non-NULL, read. FBN_STATISTICS_BATCH:
   * both non-NULL exactly when update_running. */
  void *running_mean;
  void *running_var;
  bool update_running;
  double factor; /* in [0, 1] when update_running */
  /* NULL: no backward follows. Else saved_size() bytes or more, aligned to
   * FBN_OP_MEMORY_ALIGNMENT, on the op's device: the backend writes what
   * its backward needs (layout private to the backend). */
  void *saved;
  size_t saved_bytes;
  /* min_workspace_size(backward = false) bytes or more (workspace_size's
   * when that hook is NULL; NULL when that is 0), aligned to
   * FBN_OP_MEMORY_ALIGNMENT, on the op's device. */
  void *workspace;
  size_t workspace_bytes;
  /* Backend launch context: CUDA: const fbn_cuda_exec * (stream, cuDNN
   * handle), NULL for the defaults; always NULL on the CPU. */
  const void *exec;
  /* Out, may be NULL: backend-defined id of the path the forward took
   * (CUDA: an fbn_cuda_path value, for fbn_cuda_saved_path()); the CPU
   * backends leave it alone. */
  int *path;
} fbn_bk_forward_args;

/* Everything one backward needs, validated by the API layer: the same op
 * and desc as the forward that filled saved (the caller's contract; the
 * API layer cannot read device memory to check it). */
typedef struct fbn_bk_backward_args {
  const fbn_op_desc *op;
  void *state;
  const fbn_tensor_desc *desc;
  const void *x;
  const void *y; /* NULL allowed for FBN_OPERATION_BN only */
  const void *dy;
  const void *saved; /* saved_size() bytes or more, filled by forward */
  size_t saved_bytes;
  const void *weight; /* non-NULL exactly when op->affine */
  const void *bias;   /* non-NULL exactly when op->affine */
  void *dx;           /* may be NULL */
  void *daddend;      /* may be NULL; NULL unless FBN_OPERATION_BN_ADD_RELU */
  void *dweight;      /* may be NULL; NULL unless op->affine */
  void *dbias;        /* may be NULL; NULL unless op->affine */
  bool accumulate;    /* dweight/dbias += (true) or = (false) */
  void *workspace;    /* min_workspace_size(backward = true) bytes or more */
  size_t workspace_bytes;
  const void *exec;
} fbn_bk_backward_args;

/* Direction of a copy through fbn_backend.mem_copy. */
typedef enum fbn_bk_copy {
  FBN_BK_COPY_TO_HOST = 0,   /* dst host, src the backend's memory */
  FBN_BK_COPY_FROM_HOST = 1, /* dst the backend's memory, src host */
  FBN_BK_COPY_ON_DEVICE = 2, /* both the backend's memory */
} fbn_bk_copy;

typedef struct fbn_backend {
  /* "cpu-reference", "cpu-fast", "cuda". */
  const char *name;
  fbn_device_type device;

  /* ---- per-op state ---- */
  /* Can this backend run op (dtype, layout, param dtype, operation,
   * bn_mode, device_index)? UNSUPPORTED (or NO_DEVICE) with a message if
   * not. On success *state is the backend's per-op state (handles,
   * descriptors, plan cache; NULL allowed), freed by op_fini. Called by
   * fbn_op_create and by the module layer for each op it caches. */
  fbn_status (*op_init)(const fbn_op_desc *op, void **state);
  void (*op_fini)(const fbn_op_desc *op, void *state);
  /* Device limits of one shape (desc already validated by the core:
   * dims, overflow, C, dtype/layout equal to the op's). May be NULL. */
  fbn_status (*check_shape)(const fbn_op_desc *op, void *state, const fbn_tensor_desc *desc);

  /* ---- sizes (desc validated as for check_shape, and accepted by it) ---- */
  /* Bytes of saved state one forward leaves for its backward (> 0). */
  fbn_status (*saved_size)(const fbn_op_desc *op, void *state, const fbn_tensor_desc *desc,
                           size_t *bytes);
  /* Bytes of temporary workspace of forward (backward = false) or backward. */
  fbn_status (*workspace_size)(const fbn_op_desc *op, void *state, const fbn_tensor_desc *desc,
                               bool backward, size_t *bytes);

  /* The least workspace a call can run with, for the API layer's check of
   * the caller's workspace; NULL: workspace_size itself. A backend whose
   * workspace_size depends on state that may change between the query and
   * the call (the fast CPU backend: the OpenMP thread count) gives the
   * smallest size it can run with here (the fast CPU backend: over thread
   * counts up to the current one) and runs each call on as many threads
   * as the workspace it gets holds. */
  fbn_status (*min_workspace_size)(const fbn_op_desc *op, void *state,
                                   const fbn_tensor_desc *desc, bool backward, size_t *bytes);

  /* ---- compute ---- */
  fbn_status (*forward)(const fbn_bk_forward_args *args);
  fbn_status (*backward)(const fbn_bk_backward_args *args);

  /* ---- memory on the backend's device, for the module layer (parameters,
   * running statistics, gradients, saved objects, workspace cache) ----
   * Synchronous. device_index is the op's / module's CUDA ordinal (0 on
   * the CPU). Returned memory is aligned to at least 256 bytes. */
  fbn_status (*mem_alloc)(int device_index, size_t bytes, void **ptr);
  void (*mem_free)(int device_index, void *ptr); /* NULL is a no-op */
  fbn_status (*mem_copy)(int device_index, void *dst, const void *src, size_t bytes,
                         fbn_bk_copy kind);
  /* count elements of dtype (FLOAT32 or FLOAT64) at ptr = value. */
  fbn_status (*mem_fill)(int device_index, void *ptr, fbn_dtype dtype, size_t count,
                         double value);
} fbn_backend;

/* Synchronized batch norm (src/sync/): the hooks a backend offers for it.
 * The split phases run the backend's own forward and backward with the op
 * in running-statistics mode and float64 per-channel arrays (the combined
 * mean and biased variance in place of running_mean / running_var; the
 * backward's dweight/dbias give the local sums); these two do the rest, on
 * host memory. */
typedef struct fbn_backend_sync {
  /* Per channel c of x (desc validated, desc->n > 0): mean[c] and m2[c] =
   * sum (x - mean[c])^2, float64. */
  fbn_status (*stats)(const fbn_op_desc *op, void *state, const fbn_tensor_desc *desc,
                      const void *x, double *mean, double *m2);
  /* dx and daddend (args->dx / args->daddend, either may be NULL; dweight
   * and dbias unused) of a shard whose saved state a running-statistics
   * forward of args->op on this backend filled, with the sums over the
   * whole batch (C each) and its count: the batch-statistics backward. */
  fbn_status (*backward_apply)(const fbn_bk_backward_args *args, const double *sum_g,
                               const double *sum_gxhat, int64_t total_count);
} fbn_backend_sync;

/* The sync hooks of backend (cpu/cpu_sync.c: both CPU backends), NULL for
 * a backend without synchronized batch norm. */
FBN_INTERNAL const fbn_backend_sync *fbn_backend_sync_hooks(const fbn_backend *backend);

/* The float64 reference backend (cpu/cpu_ref.c), always built. */
FBN_INTERNAL const fbn_backend *fbn_backend_cpu_reference(void);
/* The fast CPU backend (cpu/fast/), the default for CPU ops and modules. */
FBN_INTERNAL const fbn_backend *fbn_backend_cpu_fast(void);
/* The cuDNN backend (cuda/); NULL when the library was built without CUDA. */
FBN_INTERNAL const fbn_backend *fbn_backend_cuda(void);

#endif /* FUSEDBN_SRC_BACKEND_H */
