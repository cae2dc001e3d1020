"""fusedbn for PyTorch: FusedBatchNorm2d (y = ReLU(BN(x) + addend)),
BatchNorm2dReLU (ReLU(BN(x))), BatchNorm2d (BN(x)), their functional form
(fusedbn.torch.functional.batch_norm), their synchronized forms over
torch.distributed (SyncFusedBatchNorm2d, SyncBatchNorm2dReLU,
SyncBatchNorm2d: fusedbn.torch.sync) and convert() for torchvision ResNets.

    from fusedbn.torch import FusedBatchNorm2d
    m = FusedBatchNorm2d(num_features=2, eps=1e-5, momentum=0.1)
    y = m(x, addend=None)

Importing this package loads libfusedbn (fusedbn.LibraryError, an
ImportError, names the paths tried when none fits).
"""
from .. import _lib

_lib.load_library()

from .modules import BatchNorm2d, BatchNorm2dReLU, FusedBatchNorm2d  # noqa: E402
from .sync import SyncBatchNorm2d, SyncBatchNorm2dReLU, SyncFusedBatchNorm2d  # noqa: E402
from .convert import convert  # noqa: E402
from . import functional  # noqa: E402

__all__ = ["FusedBatchNorm2d", "BatchNorm2dReLU", "BatchNorm2d", "SyncFusedBatchNorm2d",
           "SyncBatchNorm2dReLU", "SyncBatchNorm2d", "convert", "functional"]
