"""The PyTorch modules: FusedBatchNorm2d, BatchNorm2d, BatchNorm2dReLU.

Each is a torch.nn.modules.batchnorm._BatchNorm, so weight, bias,
running_mean, running_var and num_batches_tracked are ordinary tensors with
torch.nn.BatchNorm2d's names, and state_dict / load_state_dict, .to(),
.double(), reset_parameters(), reset_running_stats(), train()/eval(), hooks
and optimizers work as with torch.nn.BatchNorm2d.  Only forward differs: it
runs libfusedbn's op API (see fusedbn.torch.functional for layouts,
autograd and what is saved for backward).
"""
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _lib
from . import _ops, functional


class _FusedBatchNorm(_BatchNorm):
    _operation = _lib.OPERATION_BN_ADD_RELU

    def __init__(self, num_features, eps=1e-05, momentum=0.1, affine=True,
                 track_running_stats=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)

    def _check_input_dim(self, input):
        # _BatchNorm's hook; forward's checks (functional.run) include it.
        _ops.check_x("fusedbn.torch.%s.forward" % type(self).__name__, input)

    def forward(self, x, addend=None):
        fn = "fusedbn.torch.%s.forward" % type(self).__name__
        # torch.nn.BatchNorm2d's bookkeeping, except that num_batches_tracked
        # is incremented only after the library succeeded (a failing call
        # changes nothing); the cumulative factor is computed (by
        # functional.run) for the incremented count.
        update = self.training and self.track_running_stats
        tracked = update and self.num_batches_tracked is not None
        if update and self.momentum is not None:
            averaging = (self.momentum, None)
        elif tracked:
            averaging = (0.0, self.num_batches_tracked)
        else:
            averaging = (0.0, None)
        use_batch_stats = self.training or (self.running_mean is None and
                                            self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        y = functional.run(fn, x, self.running_mean if keep_running else None,
                           self.running_var if keep_running else None, self.weight, self.bias,
                           use_batch_stats, averaging, self.eps, addend, self._operation,
                           self.num_features)
        if tracked:
            self.num_batches_tracked.add_(1)
        return y


class FusedBatchNorm2d(_FusedBatchNorm):
    """y = ReLU(BatchNorm2d(x) + addend), oneflow.nn.FusedBatchNorm2d's module.

    FusedBatchNorm2d(num_features, eps=1e-05, momentum=0.1, affine=True,
    track_running_stats=True): the arguments, buffers and parameters of
    torch.nn.BatchNorm2d (momentum=None: the cumulative average).
    forward(x, addend=None): x is a 4-D (N, C, H, W) float32, float64,
    float16 or bfloat16 tensor (CPU and CUDA; float32 parameters and
    statistics for the half dtypes, y rounded once to x's dtype), contiguous
    NCHW or channels_last (other strides are copied into the nearer of the
    two); addend None gives ReLU(BN(x)), otherwise addend must have x's
    shape, dtype and device.  After .half() or .bfloat16() the parameters
    and running statistics run as float32 copies (x not float64).
    Bad input raises fusedbn.InvalidArgumentError (a ValueError) carrying
    the library's message after the name of this forward, with the running
    statistics and num_batches_tracked unchanged.
    """


class BatchNorm2dReLU(_FusedBatchNorm):
    """y = ReLU(BatchNorm2d(x)); FusedBatchNorm2d's arguments, no addend
    (forward with one raises fusedbn.InvalidArgumentError)."""
    _operation = _lib.OPERATION_BN_RELU


class BatchNorm2d(_FusedBatchNorm):
    """y = BatchNorm2d(x) through libfusedbn, a drop-in for torch.nn.BatchNorm2d;
    FusedBatchNorm2d's arguments, no addend (forward with one raises
    fusedbn.InvalidArgumentError)."""
    _operation = _lib.OPERATION_BN
