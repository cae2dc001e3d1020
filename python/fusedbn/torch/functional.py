"""Functional form of fusedbn's three operations, with autograd.

    batch_norm(x, running_mean, running_var, weight, bias, training, momentum,
               eps, addend=None, operation="bn_add_relu")

takes torch.nn.functional.batch_norm's arguments (momentum is the factor the
running statistics are updated with, as there) and returns
    "bn"           BN(x)
    "bn_relu"      ReLU(BN(x))
    "bn_add_relu"  ReLU(BN(x) + addend); ReLU(BN(x)) when addend is None
where BN normalizes with the batch statistics when training is true (and then
updates running_mean / running_var in place when they are given) and with
running_mean / running_var otherwise.

Autograd: a torch.autograd.Function whose backward is fbn_op_backward (dx,
daddend, dweight, dbias into fresh tensors; autograd accumulates them into
.grad); with torch >= 2.4 the custom ops torch.ops.fusedbn.forward/backward
with the same backward registered (fusedbn.torch._custom_op).  The backward
is not itself differentiable (no double backward).
The saved state (mean and inverse std used, the ReLU mask) and the workspace
are uint8 tensors from torch's allocator; the saved state lives in the
autograd graph until backward has run (or the graph is freed).

Layouts: x is used as it is when it is contiguous (NCHW) or contiguous in
torch.channels_last (NHWC).  Other strides are copied with x.contiguous() in
the nearer of the two formats (channels_last when C has the smallest stride
of C, H and W); addend, and dy in backward, are copied into x's format when
they are not in it.  y has x's format.
"""
import os

import torch
from torch.autograd.function import once_differentiable

from .. import _lib
from . import _custom_op, _ops

# torch >= 2.4: while torch.compile traces, calls go through the custom ops
# torch.ops.fusedbn.forward / backward, which it can put into a graph; eager
# calls take the autograd Function, whose per-call cost is about a third of
# the custom op's dispatch.  FUSEDBN_TORCH_CUSTOM_OP=always takes the custom
# op in eager mode too, =0 never.
_CUSTOM_OP_MODE = os.environ.get("FUSEDBN_TORCH_CUSTOM_OP", "1")
USE_CUSTOM_OP = _custom_op.AVAILABLE and _CUSTOM_OP_MODE != "0"
_ALWAYS_CUSTOM_OP = USE_CUSTOM_OP and _CUSTOM_OP_MODE == "always"
_compiler = getattr(torch, "compiler", None)
_is_compiling = getattr(_compiler, "is_compiling", None) or (lambda: False)

class _Call:
    """The non-tensor arguments of one call, for the autograd Function."""
    __slots__ = ("op", "layout", "factor", "stream")

    def __init__(self, op, layout, factor, stream):
        self.op, self.layout, self.factor, self.stream = op, layout, factor, stream


class FusedBatchNormFunction(torch.autograd.Function):
    """forward(x, addend, weight, bias, running_mean, running_var, call) -> y."""

    @staticmethod
    def forward(ctx, x, addend, weight, bias, running_mean, running_var, call):
        y, saved = _ops.forward(call.op, x, call.layout, addend, weight, bias, running_mean,
                                running_var, call.factor, True, call.stream)
        ctx.fbn_saved = saved
        ctx.fbn_has_addend = addend is not None
        needs_y = call.op.desc.operation != _lib.OPERATION_BN
        ctx.save_for_backward(x, y if needs_y else None, weight, bias)
        ctx.fbn_memory_format = (torch.channels_last if call.layout == _lib.LAYOUT_NHWC
                                 else torch.contiguous_format)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, y, weight, bias = ctx.saved_tensors
        need_x, need_addend, need_w, need_b = ctx.needs_input_grad[:4]
        dy = dy.contiguous(memory_format=ctx.fbn_memory_format)
        # autograd runs backward on the forward's stream: the current one.
        fn = "fusedbn.torch backward"
        try:
            stream = _ops.stream_of(fn, x.device)
            dx, daddend, dweight, dbias = _ops.backward(
                ctx.fbn_saved, x, y, dy, weight, bias, need_x, need_addend and ctx.fbn_has_addend,
                need_w and weight is not None, need_b and bias is not None, stream)
        except _lib.Error as e:
            raise _lib.in_call(fn, e) from None
        return dx, daddend, dweight, dbias, None, None, None


def _requires_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def run(fn, x, running_mean, running_var, weight, bias, use_batch_stats, averaging, eps, addend,
        operation, num_features):
    """The checked call behind batch_norm() and the modules.  fn names the
    caller in messages (the library's messages are prefixed with it);
    operation is an _lib.OPERATION_* value (BN_ADD_RELU with addend None runs
    BN_RELU); averaging = (momentum, count) gives the factor running
    statistics are updated with (_ops.factor_of; count is num_batches_tracked
    for the cumulative average, else None), asked of the library only when
    they are updated.

    float16/bfloat16 per-channel tensors (a module moved with .half() or
    .bfloat16()) run as float32 copies when x is not float64: weight and
    bias through .float() (autograd casts their gradients back), running
    statistics copied back after the library succeeded."""
    _ops.check_x(fn, x)
    if addend is not None:
        _ops.check_like_x(fn, "addend", addend, x)
    weight, bias = _ops.as_param_dtype(weight, x), _ops.as_param_dtype(bias, x)
    low_mean, low_var = running_mean, running_var
    running_mean = _ops.as_param_dtype(running_mean, x)
    running_var = _ops.as_param_dtype(running_var, x)
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _ops.check_per_channel(fn, name, t, x, num_features)
    try:
        y = _run_checked(fn, x, running_mean, running_var, weight, bias, use_batch_stats,
                         averaging, eps, addend, operation, num_features)
    except _lib.Error as e:
        raise _lib.in_call(fn, e) from None
    if use_batch_stats:
        with torch.no_grad():
            for low, used in ((low_mean, running_mean), (low_var, running_var)):
                if low is not used:
                    low.copy_(used)
    return y


def _run_checked(fn, x, running_mean, running_var, weight, bias, use_batch_stats, averaging, eps,
                 addend, operation, num_features):
    stream = _ops.stream_of(fn, x.device)
    if operation == _lib.OPERATION_BN_ADD_RELU and addend is None:
        operation = _lib.OPERATION_BN_RELU
    layout, memory_format = _ops.layout_of(x)
    x = x.contiguous(memory_format=memory_format)
    if addend is not None:
        addend = addend.contiguous(memory_format=memory_format)
    statistics = _lib.STATISTICS_BATCH if use_batch_stats else _lib.STATISTICS_RUNNING
    momentum, count = averaging
    if USE_CUSTOM_OP and (_ALWAYS_CUSTOM_OP or _is_compiling()):
        if x.shape[1] != num_features:
            # The custom op creates its op from x; ask the library about C here.
            _ops.get_op(x.dtype, layout, x.device, statistics, operation, weight is not None,
                        num_features, eps).sizes(_ops.x_desc_of(x, layout))
        # The factor is computed inside the custom op (ctypes is opaque to
        # torch.compile's tracer).
        return _custom_op.run(x, addend, weight, bias, running_mean, running_var, operation,
                              use_batch_stats, float(momentum), count, eps,
                              _requires_grad(x, addend, weight, bias))
    updates = use_batch_stats and (running_mean is not None or running_var is not None)
    factor = _ops.factor_of(momentum, count) if updates else 0.0
    op = _ops.get_op(x.dtype, layout, x.device, statistics, operation, weight is not None,
                     num_features, eps)
    if _requires_grad(x, addend, weight, bias):
        return FusedBatchNormFunction.apply(x, addend, weight, bias, running_mean, running_var,
                                            _Call(op, layout, factor, stream))
    y, _ = _ops.forward(op, x, layout, addend, weight, bias, running_mean, running_var, factor,
                        False, stream)
    return y


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, addend=None, operation="bn_add_relu"):
    """operation(BN(x), addend) with torch.nn.functional.batch_norm's arguments.

    training=True normalizes with the batch statistics and, when running_mean
    and running_var are given (both or neither), updates them in place with
    factor momentum; training=False normalizes with running_mean/running_var
    (both required).  float16/bfloat16 per-channel tensors are accepted
    for x other than float64 (run as float32 copies, running statistics
    written back).  Bad arguments raise fusedbn.InvalidArgumentError (a
    ValueError) or fusedbn.UnsupportedError (a NotImplementedError) with the
    library's message after "fusedbn.torch.functional.batch_norm: "; nothing
    is changed then.
    """
    fn = "fusedbn.torch.functional.batch_norm"
    if operation not in _ops.OPERATIONS:
        raise _lib.make_error(_lib.INVALID_VALUE, "%s: operation %r: must be one of %s"
                              % (fn, operation, ", ".join(sorted(_ops.OPERATIONS))))
    num_features = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else 0
    return run(fn, x, running_mean, running_var, weight, bias, bool(training),
               (float(momentum), None), eps, addend, _ops.OPERATIONS[operation], num_features)
