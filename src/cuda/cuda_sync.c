/*
 * Synchronized batch norm on CUDA ops, the phases (cuda_sync.h): each
 * enters the op's device and queues its kernels on the call's stream
 * (cuda_sync_kernels.cu for the record, combine and gradient record; the
 * backend's own fbn_k_apply / fbn_k_grad_reduce / fbn_k_grad_apply for the
 * element-wise work).  Nothing here synchronizes except fbn_cuda_sync_read
 * and fbn_cuda_sync_fetch.
 */
#include <string.h>

#include "cuda_internal.h"
#include "cuda_sync.h"
#include "cuda_sync_kernels.h"

static fbn_cuda_state *state_of(void *state) { return state; }

static char *at(void *base, size_t off) { return (char *)base + off; }

static int param_double(const fbn_tensor_desc *d) { return d->dtype == FBN_DTYPE_FLOAT64; }

static int64_t count_of(const fbn_tensor_desc *d) { return d->n * d->h * d->w; }

fbn_status fbn_cuda_sync_check_memory(void *state, const char *name, const void *ptr,
                                      size_t align) {
  return fbn_cuda_check_memory(state_of(state), name, ptr, align);
}

fbn_status fbn_cuda_sync_stats(void *state, const fbn_cuda_exec *exec,
                               const fbn_tensor_desc *d, int world_size, const void *x,
                               void *workspace) {
  fbn_cuda_call cx;
  fbn_status s = fbn_cuda_call_begin(&cx, state_of(state), exec);
  if (s == FBN_STATUS_SUCCESS) {
    const fbn_cuda_sync_ws_parts w = fbn_cuda_sync_ws_layout(d, world_size);
    const fbn_k_shape ks = fbn_cuda_kshape(d);
    const fbn_cs_header h = fbn_cuda_sync_header(&state_of(state)->op, count_of(d));
    s = fbn_cuda_launch_check("the statistics record kernels",
                              fbn_ks_record(&ks, x, h, (double *)(void *)at(workspace, w.partials),
                                            at(workspace, w.record), cx.stream));
  }
  return fbn_cuda_call_end(&cx, s);
}

fbn_status fbn_cuda_sync_header_only(void *state, const fbn_cuda_exec *exec,
                                     int world_size, void *workspace) {
  const fbn_op_desc *o = &state_of(state)->op;
  fbn_tensor_desc d = {.n = 0, .c = o->num_features, .h = 1, .w = 1, .dtype = o->dtype,
                       .layout = o->layout};
  return fbn_cuda_sync_stats(state, exec, &d, world_size, NULL, workspace);
}

fbn_status fbn_cuda_sync_apply(void *state, const fbn_cuda_exec *exec,
                               const fbn_tensor_desc *d, int world_size, const void *x,
                               const void *addend, void *y, const void *weight, const void *bias,
                               void *running_mean, void *running_var, double factor, void *saved,
                               void *workspace) {
  fbn_cuda_state *st = state_of(state);
  fbn_cuda_call cx;
  fbn_status s = fbn_cuda_call_begin(&cx, st, exec);
  if (s != FBN_STATUS_SUCCESS)
    return fbn_cuda_call_end(&cx, s);
  const fbn_cuda_sync_ws_parts w = fbn_cuda_sync_ws_layout(d, world_size);
  const fbn_cuda_sync_saved_parts sp = fbn_cuda_sync_saved_layout(&st->op, d);
  const fbn_cs_header self = fbn_cuda_sync_header(&st->op, count_of(d));
  const bool apply = d->n > 0 && y != NULL;
  void *coef = apply ? at(workspace, w.coef) : NULL;
  void *save_mean = saved != NULL ? at(saved, sp.mean) : NULL;
  void *save_invstd = saved != NULL ? at(saved, sp.invstd) : NULL;
  s = fbn_cuda_launch_check(
      "the combine kernel",
      fbn_ks_combine(at(workspace, w.records), world_size, w.record_bytes, self, param_double(d),
                     factor, running_mean, running_var, weight, bias, save_mean, save_invstd, coef,
                     (fbn_cs_status *)workspace, (fbn_cs_status *)saved, cx.stream));
  if (s == FBN_STATUS_SUCCESS && apply) {
    const fbn_k_shape ks = fbn_cuda_kshape(d);
    const bool relu = fbn_operation_has_relu(st->op.operation);
    uint32_t *mask = relu && saved != NULL ? (uint32_t *)(void *)at(saved, sp.mask) : NULL;
    s = fbn_cuda_launch_check("the apply kernel",
                              fbn_k_apply(&ks, x, addend, y, mask, coef, relu ? 1 : 0, cx.stream));
  }
  return fbn_cuda_call_end(&cx, s);
}

fbn_status fbn_cuda_sync_grad_reduce(void *state, const fbn_cuda_exec *exec,
                                     const fbn_tensor_desc *d, int world_size, const void *x,
                                     const void *dy, const void *saved, void *workspace) {
  fbn_cuda_state *st = state_of(state);
  fbn_cuda_call cx;
  fbn_status s = fbn_cuda_call_begin(&cx, st, exec);
  if (s != FBN_STATUS_SUCCESS)
    return fbn_cuda_call_end(&cx, s);
  const fbn_cuda_sync_ws_parts w = fbn_cuda_sync_ws_layout(d, world_size);
  const fbn_cuda_sync_saved_parts sp = fbn_cuda_sync_saved_layout(&st->op, d);
  const fbn_k_shape ks = fbn_cuda_kshape(d);
  double *partials = NULL;
  int slices = 0;
  if (d->n > 0) {
    partials = (double *)(void *)at(workspace, w.partials);
    slices = fbn_k_reduce_slices(&ks);
    const uint32_t *mask = sp.mask != 0 ? (const uint32_t *)(const void *)((const char *)saved +
                                                                           sp.mask)
                                        : NULL;
    s = fbn_cuda_launch_check("the gradient reduction kernel",
                              fbn_k_grad_reduce(&ks, x, dy, mask, NULL,
                                                (const char *)saved + sp.mean,
                                                (const char *)saved + sp.invstd, partials,
                                                cx.stream));
  }
  if (s == FBN_STATUS_SUCCESS)
    s = fbn_cuda_launch_check(
        "the gradient record kernel",
        fbn_ks_grad_record(d->c, count_of(d), partials, slices, (const fbn_cs_status *)saved,
                           (double *)(void *)at(workspace, w.grad),
                           (double *)(void *)at(workspace, w.grad_local), cx.stream));
  return fbn_cuda_call_end(&cx, s);
}

fbn_status fbn_cuda_sync_grad_apply(void *state, const fbn_cuda_exec *exec,
                                    const fbn_tensor_desc *d, int world_size, const void *x,
                                    const void *dy,
                                    const void *saved, const void *weight, void *dx, void *daddend,
                                    void *dweight, void *dbias, bool accumulate, bool global,
                                    void *workspace) {
  fbn_cuda_state *st = state_of(state);
  fbn_cuda_call cx;
  fbn_status s = fbn_cuda_call_begin(&cx, st, exec);
  if (s != FBN_STATUS_SUCCESS)
    return fbn_cuda_call_end(&cx, s);
  const fbn_cuda_sync_ws_parts w = fbn_cuda_sync_ws_layout(d, world_size);
  const fbn_cuda_sync_saved_parts sp = fbn_cuda_sync_saved_layout(&st->op, d);
  const bool elementwise = d->n > 0 && (dx != NULL || daddend != NULL);
  void *coef = elementwise && dx != NULL ? at(workspace, w.coef) : NULL;
  s = fbn_cuda_launch_check(
      "the backward coefficient kernel",
      fbn_ks_grad_coef(d->c, count_of(d), (const double *)(const void *)at(workspace, w.grad),
                       global ? NULL : (const double *)(const void *)at(workspace, w.grad_local),
                       (const fbn_cs_status *)saved, param_double(d), weight,
                       (const char *)saved + sp.mean, (const char *)saved + sp.invstd, dweight,
                       dbias, accumulate ? 1 : 0, coef, (fbn_cs_status *)workspace, cx.stream));
  if (s == FBN_STATUS_SUCCESS && elementwise) {
    const fbn_k_shape ks = fbn_cuda_kshape(d);
    const uint32_t *mask =
        sp.mask != 0 ? (const uint32_t *)(const void *)((const char *)saved + sp.mask) : NULL;
    s = fbn_cuda_launch_check("the backward apply kernel",
                              fbn_k_grad_apply(&ks, x, dy, mask, NULL, coef, dx, daddend,
                                               cx.stream));
  }
  return fbn_cuda_call_end(&cx, s);
}

fbn_status fbn_cuda_sync_fetch(void *state, const fbn_cuda_exec *exec, const void *src,
                               void *dst, size_t bytes) {
  fbn_cuda_call cx;
  fbn_status s = fbn_cuda_call_begin(&cx, state_of(state), exec);
  if (s == FBN_STATUS_SUCCESS) {
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cx.stream);
    if (e != cudaSuccess)
      s = fbn_cuda_fail("cudaMemcpyAsync of the status block", e);
    else if ((e = cudaStreamSynchronize(cx.stream)) != cudaSuccess)
      s = fbn_cuda_fail("cudaStreamSynchronize", e);
  }
  return fbn_cuda_call_end(&cx, s);
}

fbn_status fbn_cuda_sync_read(void *state, const fbn_cuda_exec *exec, const void *block,
                              fbn_cs_status *out) {
  return fbn_cuda_sync_fetch(state, exec, block, out, sizeof *out);
}
