"""fusedbn: y = ReLU(BatchNorm2d(x) + addend) from libfusedbn, for Python frameworks.

fusedbn.torch has the PyTorch modules (FusedBatchNorm2d, BatchNorm2d,
BatchNorm2dReLU) and convert() for torchvision ResNets.  This package itself
only finds and loads the C library (see fusedbn._lib for the lookup order);
importing it does not load anything.
"""
from ._lib import (Error, InvalidArgumentError, LibraryError, UnsupportedError,
                   REQUIRED_VERSION, load_library)

__all__ = ["Error", "InvalidArgumentError", "LibraryError", "UnsupportedError",
           "REQUIRED_VERSION", "load_library", "library_version", "library_path"]

__version__ = "0.1.0"


def library_version():
    """Version string of the libfusedbn that fusedbn loads ("0.1.0")."""
    return load_library().version_string


def library_path():
    """Path (or loader name) of the libfusedbn that fusedbn loads."""
    return load_library().path
