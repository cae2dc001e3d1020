/*
 * What both CPU backends (cpu_ref.c, cpu_fast.c) share: module buffers are
 * host arrays of num_features param_dtype elements, the saved payload is a
 * malloc'd block, and float16/bfloat16 tensors are unsupported.
 */
#ifndef FUSEDBN_SRC_CPU_CPU_COMMON_H
#define FUSEDBN_SRC_CPU_CPU_COMMON_H

#include "internal.h"

/* Allocate module->buffers[] for the options' buffers (freed on failure). */
FBN_INTERNAL fbn_status fbn_cpu_buffers_alloc(fbn_module *m);
FBN_INTERNAL void fbn_cpu_buffers_free(fbn_module *m);
FBN_INTERNAL fbn_status fbn_cpu_buffer_read(const fbn_module *m, fbn_buffer which,
                                            fbn_dtype dtype, void *dst);
FBN_INTERNAL fbn_status fbn_cpu_buffer_write(fbn_module *m, fbn_buffer which, fbn_dtype dtype,
                                             const void *src);
FBN_INTERNAL fbn_status fbn_cpu_buffer_fill(fbn_module *m, fbn_buffer which, double value);
/* float32 and float64 tensors only. */
FBN_INTERNAL fbn_status fbn_cpu_check_desc(const fbn_module *m, const fbn_tensor_desc *d,
                                           bool has_addend, bool batch_stats);
/* 0 bytes: the CPU backends need no caller workspace. */
FBN_INTERNAL fbn_status fbn_cpu_workspace_size(const fbn_module *m, const fbn_tensor_desc *d,
                                               bool has_addend, bool batch_stats, bool backward,
                                               size_t *bytes);
/* Make s->payload at least `need` bytes, owned by `owner`. */
FBN_INTERNAL fbn_status fbn_cpu_saved_reserve(fbn_saved *s, size_t need,
                                              const fbn_backend *owner);
FBN_INTERNAL void fbn_cpu_saved_free(fbn_saved *s);

#endif /* FUSEDBN_SRC_CPU_CPU_COMMON_H */
