"""fusedbn's forward and backward as torch custom ops (torch >= 2.4), so that
torch.compile and other tracers see one opaque operator instead of ctypes:

    torch.ops.fusedbn.forward(x, addend, weight, bias, running_mean,
        running_var, operation, batch_stats, momentum, count, eps, keep_saved)
        -> (y, saved, new_running_mean, new_running_var)
    torch.ops.fusedbn.backward(x, y, dy, saved, weight, bias, operation,
        batch_stats, eps, needs) -> (dx, daddend, dweight, dbias)

x (and addend) come contiguous in their layout (functional.run sees to it);
the running-average factor is momentum, or with count (num_batches_tracked
before this batch) the cumulative average's, both from
fbn_running_average_factor (_ops.factor_of) inside the op, so that no ctypes
call is left for torch.compile to trace around it;
saved is the uint8 saved state (empty when keep_saved is false); gradients
not asked for in needs come back as empty tensors.  torch registers autograd
formulas only for functional operators, so forward mutates nothing: with
batch statistics and running statistics given, the library updates copies
of them, returned as new_running_mean / new_running_var (empty otherwise),
which run() copies into the module's buffers.  The fake (meta)
implementations give the same shapes, strides and saved size, which they ask
the library for (fbn_op_saved_size is a host function): shapes must be
concrete.  With older torch (Debian's 1.13) nothing is registered and
functional.run uses the autograd Function alone.
"""
from typing import List, Optional, Tuple

import torch

from .. import _lib
from . import _ops

AVAILABLE = hasattr(torch, "library") and hasattr(torch.library, "custom_op")

_FN = "torch.ops.fusedbn"


def _op_for(x, operation, batch_stats, affine, eps):
    layout, _ = _ops.layout_of(x)
    statistics = _lib.STATISTICS_BATCH if batch_stats else _lib.STATISTICS_RUNNING
    return _ops.get_op(x.dtype, layout, x.device, statistics, operation, affine, x.shape[1],
                       eps), layout


def _saved_view(saved_tensor):
    """(aligned address, bytes) of a saved-state tensor from new_buffer."""
    align = _lib.MEMORY_ALIGNMENT
    base = saved_tensor.data_ptr()
    ptr = (base + align - 1) // align * align
    return ptr, saved_tensor.numel() - (ptr - base)


if AVAILABLE:
    @torch.library.custom_op("fusedbn::forward", mutates_args=(), device_types=("cpu", "cuda"))
    def forward(x: torch.Tensor, addend: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], operation: int, batch_stats: bool,
                momentum: float, count: Optional[torch.Tensor], eps: float, keep_saved: bool
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        op, layout = _op_for(x, operation, batch_stats, weight is not None, eps)
        stream = _ops.stream_of(_FN + ".forward", x.device)
        updates = batch_stats and running_mean is not None and running_var is not None
        factor = 0.0
        if batch_stats and (running_mean is not None or running_var is not None):
            factor = _ops.factor_of(momentum, count)
        if updates:
            running_mean, running_var = running_mean.clone(), running_var.clone()
        y, saved = _ops.forward(op, x, layout, addend, weight, bias, running_mean, running_var,
                                factor, keep_saved, stream)
        empty = x.new_empty((0,), dtype=_ops.param_dtype(x.dtype))
        saved_t = (torch.empty(0, dtype=torch.uint8, device=x.device) if saved is None
                   else saved.tensor)
        return (y, saved_t, running_mean if updates else empty,
                running_var if updates else empty.clone())

    @forward.register_fake
    def _forward_fake(x, addend, weight, bias, running_mean, running_var, operation, batch_stats,
                      momentum, count, eps, keep_saved):
        op, layout = _op_for(x, operation, batch_stats, weight is not None, eps)
        nbytes = op.sizes(_ops.x_desc_of(x, layout))[0] if keep_saved else 0
        updates = batch_stats and running_mean is not None and running_var is not None
        c = x.shape[1] if updates else 0
        pdtype = _ops.param_dtype(x.dtype)
        return (torch.empty_like(x), x.new_empty((nbytes,), dtype=torch.uint8),
                x.new_empty((c,), dtype=pdtype), x.new_empty((c,), dtype=pdtype))

    @torch.library.custom_op("fusedbn::backward", mutates_args=(), device_types=("cpu", "cuda"))
    def backward(x: torch.Tensor, y: Optional[torch.Tensor], dy: torch.Tensor,
                 saved: torch.Tensor, weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], operation: int, batch_stats: bool, eps: float,
                 needs: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor]:
        op, layout = _op_for(x, operation, batch_stats, weight is not None, eps)
        ptr, nbytes = _saved_view(saved)
        record = _ops.Saved(op, _ops.x_desc_of(x, layout), saved, ptr, nbytes)
        stream = _ops.stream_of(_FN + ".backward", x.device)
        grads = _ops.backward(record, x, y, dy, weight, bias, needs[0], needs[1], needs[2],
                              needs[3], stream)
        return tuple(x.new_empty((0,)) if g is None else g for g in grads)

    @backward.register_fake
    def _backward_fake(x, y, dy, saved, weight, bias, operation, batch_stats, eps, needs):
        c = x.shape[1]
        pdtype = _ops.param_dtype(x.dtype)
        return (torch.empty_like(x) if needs[0] else x.new_empty((0,)),
                torch.empty_like(x) if needs[1] else x.new_empty((0,)),
                x.new_empty((c,), dtype=pdtype) if needs[2] else x.new_empty((0,)),
                x.new_empty((c,), dtype=pdtype) if needs[3] else x.new_empty((0,)))

    def _setup_context(ctx, inputs, output):
        x, addend, weight, bias, _, _, operation, batch_stats, _, _, eps, _ = inputs
        y, saved, _, _ = output
        ctx.save_for_backward(x, y if operation != _lib.OPERATION_BN else None, saved, weight,
                              bias)
        ctx.fbn_args = (operation, batch_stats, eps, addend is not None)
        ctx.fbn_memory_format = _ops.layout_of(x)[1]

    def _backward_autograd(ctx, dy, _dsaved, _dmean, _dvar):
        x, y, saved, weight, bias = ctx.saved_tensors
        operation, batch_stats, eps, has_addend = ctx.fbn_args
        need = ctx.needs_input_grad
        needs = [bool(need[0]), bool(need[1] and has_addend), bool(need[2] and weight is not None),
                 bool(need[3] and bias is not None)]
        dy = dy.contiguous(memory_format=ctx.fbn_memory_format)
        grads = backward(x, y, dy, saved, weight, bias, operation, batch_stats, eps, needs)
        grads = [g if n else None for g, n in zip(grads, needs)]
        return tuple(grads) + (None,) * 8

    torch.library.register_autograd("fusedbn::forward", _backward_autograd,
                                    setup_context=_setup_context)


def run(x, addend, weight, bias, running_mean, running_var, operation, batch_stats, momentum,
        count, eps, keep_saved):
    """y through torch.ops.fusedbn.forward; the updated running statistics
    copied into running_mean / running_var."""
    y, _, new_mean, new_var = torch.ops.fusedbn.forward(
        x, addend, weight, bias, running_mean, running_var, operation, batch_stats, momentum, count,
        eps, keep_saved)
    if batch_stats and running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y
