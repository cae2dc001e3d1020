"""Synchronized batch norm over torch.distributed: SyncFusedBatchNorm2d
(y = ReLU(BN(x) + addend)), SyncBatchNorm2dReLU and SyncBatchNorm2d.

Each takes the arguments of its unsynchronized module (FusedBatchNorm2d,
BatchNorm2dReLU, BatchNorm2d) plus process_group=None (the default group),
has the same parameters, buffers and state_dict names, and in training
normalizes every rank's shard with the statistics of the whole batch, as one
process on the concatenated batch would; in eval it is the unsynchronized
module and runs no collective (without running statistics that is the
shard's own batch statistics, as with torch's SyncBatchNorm).  CPU tensors, over any
process group: gloo (or MPI) moves the exchanged records as CPU tensors, an
NCCL group gets them copied to the current CUDA device.

One training forward, on every rank of the group, with libfusedbn's split
phases (fusedbn_sync.h):
  1. the local phase: the argument checks and fbn_sync_stats() (this shard's
     record: a check header with C, dtype, param_dtype, operation, affine,
     eps, and per channel count, mean, M2, float64);
  2. all_gather of a fixed-size preamble per rank (the local phase's status
     and message, C, dtype, the record size): a rank whose local phase
     failed, or ranks disagreeing on C or dtype, raise on every rank before
     any collective of mismatched size;
  3. all_gather of the records (uint8 tensors), fbn_sync_combine() (the
     records' check headers compared by every rank: another param_dtype,
     operation, affine or eps raises on every rank), fbn_sync_apply().
The backward (autograd): fbn_sync_backward_reduce(), all_reduce SUM of the
gradient record (float64, with one extra element counting the ranks whose
reduce failed), fbn_sync_backward_apply().  dweight/dbias are this shard's
(DistributedDataParallel all-reduces parameter gradients; their sum over the
ranks is the whole batch's); dx and daddend are the shard's gradients of the
whole batch's loss.

Shards may have any size, N = 0 included (that rank still takes part in
every collective); the total count per channel over the ranks must be > 1.
A failed collective raises fusedbn.Error (FBN_STATUS_DEVICE_ERROR) with
torch.distributed's text.  On any failure the running statistics and
num_batches_tracked are unchanged.  Every rank must make the same calls: a
rank in eval mode, or one that never calls forward/backward, leaves the
others waiting in a collective until the process group's timeout (which
then raises there).

CUDA tensors raise fusedbn.UnsupportedError (on every rank that has them):
the modules bind the host-memory phases of fusedbn_sync.h; libfusedbn's CUDA
synchronized batch norm (fusedbn_cuda_sync.h, stream-ordered collectives
such as its NCCL adapter) has no Python binding.
"""

import torch

from .. import _lib
from . import _ops, modules

try:
    import torch.distributed as dist
except ImportError:  # a torch built without distributed support
    dist = None

# The preamble: four int64 (status, C, dtype code, record bytes) and the
# local phase's message (UTF-8, NUL-padded, truncated to fit).
_PREAMBLE_WORDS = 4
_PREAMBLE_BYTES = 512
_NO_DTYPE = -1


def _distributed_ready():
    return dist is not None and dist.is_available() and dist.is_initialized()


def _group_of(fn, process_group):
    """(group, world size, rank) of the module's process group."""
    if not _distributed_ready():
        raise _lib.make_error(_lib.INVALID_STATE, "%s: torch.distributed is not initialized: "
                              "synchronized batch norm in training needs a process group "
                              "(torch.distributed.init_process_group), or use eval mode or the "
                              "unsynchronized module" % fn)
    group = process_group if process_group is not None else dist.group.WORLD
    return group, dist.get_world_size(group), dist.get_rank(group)


def _comm_device(group):
    """Where the exchanged records live: the current CUDA device for an NCCL
    group (NCCL moves only CUDA tensors), else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective_failed(fn, what, world_size, error):
    e = _lib.make_error(_lib.DEVICE_ERROR, "%s: %s over the process group (world size %d) "
                        "failed: %s: %s" % (fn, what, world_size, type(error).__name__, error),
                        "FBN_STATUS_DEVICE_ERROR")
    e.__cause__ = error
    return e


def _all_gather(fn, what, group, world_size, local):
    """The world_size local tensors of the ranks, stacked in rank order (a
    CPU tensor)."""
    device = _comm_device(group)
    send = local.to(device)
    out = torch.empty((world_size,) + tuple(local.shape), dtype=local.dtype, device=device)
    try:
        dist.all_gather(list(out.unbind(0)), send, group=group)
    except Exception as error:  # noqa: BLE001 (any failure of the collective is reported)
        raise _collective_failed(fn, what, world_size, error) from None
    return out.cpu()


def _all_reduce_sum(fn, what, group, world_size, local):
    device = _comm_device(group)
    t = local.to(device, copy=True)
    try:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    except Exception as error:  # noqa: BLE001
        raise _collective_failed(fn, what, world_size, error) from None
    return t.cpu()


def _status_name(status):
    return _ops.library().lib.fbn_status_string(status).decode()


def _local_failure(fn, error):
    """(status, message) of a local phase's exception."""
    if isinstance(error, _lib.Error):
        return error.status, _lib.in_call(fn, error).message
    return _lib.INVALID_VALUE, "%s: %s: %s" % (fn, type(error).__name__, error)


def _preamble(status, message, channels, dtype_code, record_bytes):
    t = torch.zeros(_PREAMBLE_BYTES, dtype=torch.uint8)
    t[:8 * _PREAMBLE_WORDS].view(torch.int64).copy_(
        torch.tensor([status, channels, dtype_code, record_bytes], dtype=torch.int64))
    text = message.encode("utf-8", "replace")[:_PREAMBLE_BYTES - 8 * _PREAMBLE_WORDS - 1]
    if text:
        t[8 * _PREAMBLE_WORDS:8 * _PREAMBLE_WORDS + len(text)].copy_(
            torch.frombuffer(bytearray(text), dtype=torch.uint8))
    return t


def _dtype_name(code):
    for dtype, c in _ops._DTYPES.items():
        if c == code:
            return str(dtype)
    return "(none)"


def _check_preambles(fn, preambles, local_error):
    """Raise on every rank when a rank's local phase failed or the ranks
    disagree on C or dtype; the failing rank raises its own exception."""
    world_size = preambles.shape[0]
    words = preambles[:, :8 * _PREAMBLE_WORDS].contiguous().view(torch.int64).tolist()
    if local_error is not None:
        raise (_lib.in_call(fn, local_error) if isinstance(local_error, _lib.Error)
               else local_error)
    for r, (status, _, _, _) in enumerate(words):
        if status != _lib.SUCCESS:
            raw = bytes(preambles[r, 8 * _PREAMBLE_WORDS:].tolist()).split(b"\0", 1)[0]
            raise _lib.make_error(status, "%s: rank %d of %d failed before the exchange: %s"
                                  % (fn, r, world_size, raw.decode("utf-8", "replace")),
                                  _status_name(status))
    _, c0, d0, _ = words[0]
    for r, (_, c, d, _) in enumerate(words):
        if c != c0:
            raise _lib.make_error(_lib.SHAPE_MISMATCH, "%s: rank %d has C = %d, rank 0 C = %d: "
                                  "every rank's x must have the same number of channels"
                                  % (fn, r, c, c0), "FBN_STATUS_SHAPE_MISMATCH")
        if d != d0:
            raise _lib.make_error(_lib.SHAPE_MISMATCH, "%s: rank %d has x dtype %s, rank 0 %s: "
                                  "every rank's x must have the same dtype"
                                  % (fn, r, _dtype_name(d), _dtype_name(d0)),
                                  "FBN_STATUS_SHAPE_MISMATCH")


_sync_ops = {}


def _sync_op(op):
    """The SyncOp of a cached Op (one per op)."""
    s = _sync_ops.get(id(op))
    if s is None or s.op is not op:
        s = _lib.SyncOp(op)
        _sync_ops[id(op)] = s
    return s


def _ptr(t):
    return None if t is None or t.numel() == 0 else t.data_ptr()


class _Call:
    """One synchronized forward: its arguments other than the tensors autograd
    tracks."""
    __slots__ = ("fn", "group", "world_size", "rank", "running_mean", "running_var", "factor",
                 "eps", "operation", "num_features", "keep_saved", "saved")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))


def _forward(call, x, addend, weight, bias):
    """y of this shard (and, with call.keep_saved, call.saved for the
    backward); the running statistics updated only when everything
    succeeded."""
    fn = call.fn
    local_error = None
    channels, dtype_code, record_bytes = -1, _NO_DTYPE, 0
    try:
        _ops.check_x(fn, x)
        channels, dtype_code = int(x.shape[1]), _ops._DTYPES[x.dtype]
        if x.device.type != "cpu":
            raise _lib.make_error(_lib.UNSUPPORTED, "%s: x on %s: fusedbn.torch's synchronized "
                                  "modules run on CPU tensors (libfusedbn's CUDA synchronized "
                                  "batch norm, fusedbn_cuda_sync.h, has no Python binding)"
                                  % (fn, x.device))
        if addend is not None:
            _ops.check_like_x(fn, "addend", addend, x)
        for name, t in (("weight", weight), ("bias", bias), ("running_mean", call.running_mean),
                        ("running_var", call.running_var)):
            _ops.check_per_channel(fn, name, t, x, call.num_features)
        operation = call.operation
        if operation == _lib.OPERATION_BN_ADD_RELU and addend is None:
            operation = _lib.OPERATION_BN_RELU
        layout, memory_format = _ops.layout_of(x)
        x = x.contiguous(memory_format=memory_format)
        if addend is not None:
            addend = addend.contiguous(memory_format=memory_format)
        op = _ops.get_op(x.dtype, layout, x.device, _lib.STATISTICS_BATCH, operation,
                         weight is not None, call.num_features, call.eps)
        sync = _sync_op(op)
        desc = _ops.x_desc_of(x, layout)
        record_bytes = sync.record_bytes()
        saved_bytes, ws_bytes = sync.sizes(desc)
        record = torch.empty(record_bytes, dtype=torch.uint8)
        sync.stats(desc, _ptr(x), record.data_ptr(), record_bytes)
    except Exception as error:  # noqa: BLE001 (every rank must hear of it)
        local_error = error
    status, message = ((_lib.SUCCESS, "") if local_error is None
                       else _local_failure(fn, local_error))
    preambles = _all_gather(fn, "the all_gather of the check preambles", call.group,
                            call.world_size,
                            _preamble(status, message, channels, dtype_code, record_bytes))
    _check_preambles(fn, preambles, local_error)

    records = _all_gather(fn, "the all_gather of the statistics records", call.group,
                          call.world_size, record).contiguous()
    c = call.num_features
    stats = torch.empty(2 * c, dtype=torch.float64)
    running = [None if t is None else t.detach().clone()
               for t in (call.running_mean, call.running_var)]
    try:
        sync.combine(records.data_ptr(), call.world_size, record_bytes, stats.data_ptr(),
                     stats.data_ptr() + 8 * c, _ptr(running[0]), _ptr(running[1]), call.factor)
        y = _ops.new_output(x)
        saved_t, saved_ptr = (_ops.new_buffer(saved_bytes, x.device) if call.keep_saved
                              else (None, None))
        ws_t, ws_ptr = _ops.new_buffer(ws_bytes, x.device)
        sync.apply(desc, _ptr(x), _ptr(addend), _ptr(y), _ptr(weight), _ptr(bias),
                   stats.data_ptr(), stats.data_ptr() + 8 * c, saved_ptr,
                   saved_bytes if call.keep_saved else 0, ws_ptr, ws_bytes)
        del ws_t
    except _lib.Error as e:
        raise _lib.in_call(fn, e) from None
    with torch.no_grad():
        for dst, src in zip((call.running_mean, call.running_var), running):
            if dst is not None:
                dst.copy_(src)
    if call.keep_saved:
        call.saved = (sync, desc, saved_t, saved_ptr, saved_bytes, ws_bytes, memory_format, x)
    return y


# The gradient record's extra element (after the library's record): the
# number of ranks whose local reduce failed.
def _backward(call, x, y, dy, weight, bias, need_dx, need_daddend, need_dweight, need_dbias):
    fn = call.fn + " backward"
    sync, desc, _, saved_ptr, saved_bytes, ws_bytes, memory_format, _ = call.saved
    local_error = None
    dweight = dbias = None
    grad_bytes = 0
    record = None
    try:
        grad_bytes = sync.grad_record_bytes()
        record = torch.zeros(grad_bytes // 8 + 1, dtype=torch.float64)
        dy = dy.contiguous(memory_format=memory_format)
        c = call.num_features
        if need_dweight:
            dweight = _ops.new_per_channel(c, weight.dtype, x.device)
        if need_dbias:
            dbias = _ops.new_per_channel(c, bias.dtype, x.device)
        ws_t, ws_ptr = _ops.new_buffer(ws_bytes, x.device)
        sync.backward_reduce(desc, _ptr(x), _ptr(y), _ptr(dy), saved_ptr, saved_bytes,
                             _ptr(weight), _ptr(bias), record.data_ptr(), grad_bytes,
                             _ptr(dweight), _ptr(dbias), ws_ptr, ws_bytes)
    except Exception as error:  # noqa: BLE001 (every rank must hear of it)
        local_error = error
        if record is None:
            record = torch.zeros(1, dtype=torch.float64)
        record.zero_()
        record[-1] = 1.0
    total = _all_reduce_sum(fn, "the all_reduce of the gradient records", call.group,
                            call.world_size, record)
    if local_error is not None:
        raise (_lib.in_call(fn, local_error) if isinstance(local_error, _lib.Error)
               else local_error)
    if total.numel() != record.numel():
        raise _lib.make_error(_lib.SHAPE_MISMATCH, "%s: gradient records of %d elements summed "
                              "into %d" % (fn, record.numel(), total.numel()))
    failed = int(total[-1].item())
    if failed:
        raise _lib.make_error(_lib.DEVICE_ERROR, "%s: the local gradient reduction failed on %d "
                              "of %d ranks (their own exceptions name the cause)"
                              % (fn, failed, call.world_size), "FBN_STATUS_DEVICE_ERROR")
    total = total[:-1].contiguous()
    dx = _ops.new_output(x) if need_dx else None
    daddend = _ops.new_output(x) if need_daddend else None
    try:
        sync.backward_apply(desc, _ptr(x), _ptr(y), _ptr(dy), saved_ptr, saved_bytes,
                            _ptr(weight), _ptr(bias), total.data_ptr(), grad_bytes, _ptr(dx),
                            _ptr(daddend), ws_ptr, ws_bytes)
    except _lib.Error as e:
        raise _lib.in_call(fn, e) from None
    del ws_t
    return dx, daddend, dweight, dbias


class SyncFunction(torch.autograd.Function):
    """forward(x, addend, weight, bias, call) -> y, synchronized; backward
    synchronized too (collectives on every rank)."""

    @staticmethod
    def forward(ctx, x, addend, weight, bias, call):
        call.keep_saved = True
        y = _forward(call, x, addend, weight, bias)
        ctx.fbn_call = call
        ctx.fbn_has_addend = addend is not None
        x_used = call.saved[7]  # x in the layout the library read
        needs_y = call.operation != _lib.OPERATION_BN
        ctx.save_for_backward(x_used, y if needs_y else None, weight, bias)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, y, weight, bias = ctx.saved_tensors
        need_x, need_addend, need_w, need_b = ctx.needs_input_grad[:4]
        dx, daddend, dweight, dbias = _backward(
            ctx.fbn_call, x, y, dy, weight, bias, need_x, need_addend and ctx.fbn_has_addend,
            need_w and weight is not None, need_b and bias is not None)
        return dx, daddend, dweight, dbias, None


def _requires_grad(*tensors):
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in tensors)


class _SyncMixin:
    """forward() of the synchronized modules; the rest is the unsynchronized
    module's."""

    def _init_sync(self, process_group):
        self.process_group = process_group

    def forward(self, x, addend=None):
        if not self.training:
            return super().forward(x, addend)
        fn = "fusedbn.torch.%s.forward" % type(self).__name__
        group, world_size, rank = _group_of(fn, self.process_group)
        update = self.track_running_stats
        tracked = update and self.num_batches_tracked is not None
        running_mean = self.running_mean if update else None
        running_var = self.running_var if update else None
        factor = 0.0
        if update and running_mean is not None:
            if self.momentum is not None:
                factor = _ops.factor_of(self.momentum, None)
            elif tracked:
                factor = _ops.factor_of(0.0, self.num_batches_tracked)
        low = (running_mean, running_var)
        weight, bias = self.weight, self.bias
        if isinstance(x, torch.Tensor):
            weight, bias = _ops.as_param_dtype(weight, x), _ops.as_param_dtype(bias, x)
            running_mean = _ops.as_param_dtype(running_mean, x)
            running_var = _ops.as_param_dtype(running_var, x)
        call = _Call(fn=fn, group=group, world_size=world_size, rank=rank,
                     running_mean=running_mean, running_var=running_var, factor=factor,
                     eps=self.eps, operation=self._operation, num_features=self.num_features,
                     keep_saved=False)
        if _requires_grad(x, addend, weight, bias):
            y = SyncFunction.apply(x, addend, weight, bias, call)
        else:
            y = _forward(call, x, addend, weight, bias)
        with torch.no_grad():
            for dst, used in zip(low, (running_mean, running_var)):
                if dst is not used:
                    dst.copy_(used)
        if tracked:
            self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self):
        return super().extra_repr() + ", process_group=%r" % (self.process_group,)


class SyncFusedBatchNorm2d(_SyncMixin, modules.FusedBatchNorm2d):
    """y = ReLU(BatchNorm2d(x) + addend) with the batch statistics of every
    rank of process_group (see the module docstring).

    SyncFusedBatchNorm2d(num_features, eps=1e-05, momentum=0.1, affine=True,
    track_running_stats=True, process_group=None): FusedBatchNorm2d's
    arguments and the torch.distributed group (None: the default group).
    """

    def __init__(self, num_features, eps=1e-05, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self._init_sync(process_group)


class SyncBatchNorm2dReLU(_SyncMixin, modules.BatchNorm2dReLU):
    """ReLU(BatchNorm2d(x)), synchronized; SyncFusedBatchNorm2d's arguments."""

    def __init__(self, num_features, eps=1e-05, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self._init_sync(process_group)


class SyncBatchNorm2d(_SyncMixin, modules.BatchNorm2d):
    """BatchNorm2d(x), synchronized; SyncFusedBatchNorm2d's arguments."""

    def __init__(self, num_features, eps=1e-05, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self._init_sync(process_group)


# The synchronized module of each unsynchronized one.
SYNC_OF = {modules.FusedBatchNorm2d: SyncFusedBatchNorm2d,
           modules.BatchNorm2dReLU: SyncBatchNorm2dReLU,
           modules.BatchNorm2d: SyncBatchNorm2d}
