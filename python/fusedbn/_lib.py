"""ctypes binding of libfusedbn's op API (include/fusedbn/fusedbn.h).

Only what the Python package calls: the op description and its lifecycle, the
size queries, forward, backward, the running-average factor, the status names,
the thread-local error message and the version; in a library built with CUDA
also fbn_cuda_op_forward / fbn_cuda_op_backward (fusedbn_cuda.h), which take
the stream; and synchronized batch norm's split phases (fusedbn_sync.h:
fbn_sync_stats, fbn_sync_combine, fbn_sync_apply, fbn_sync_backward_reduce,
fbn_sync_backward_apply and their sizes).  The structures mirror the C
headers field by field.

The library is looked up, in this order, at
  1. the path in the FUSEDBN_LIBRARY environment variable (nothing else is
     tried when it is set),
  2. libfusedbn.so* next to this package (a wheel that bundles it),
  3. the system loader (libfusedbn.so.0, libfusedbn.so: LD_LIBRARY_PATH,
     ldconfig's cache).
A library that cannot be loaded, is older than REQUIRED_VERSION or lacks an op
API entry point raises LibraryError naming every path tried and why it failed.
"""
import ctypes as C
import glob
import os
import threading

# fbn_version() encoding: MAJOR*10000 + MINOR*100 + PATCH.  0.1.0 is the first
# release with the explicit-state op API.
REQUIRED_VERSION = 100

# Status codes (fbn_status).
SUCCESS = 0
NULL_POINTER = 1
INVALID_VALUE = 2
INVALID_SHAPE = 3
SHAPE_MISMATCH = 4
UNSUPPORTED = 5
INVALID_STATE = 6
ABSENT = 7
ALIASING = 8
INSUFFICIENT_WORKSPACE = 9
OUT_OF_MEMORY = 10
NO_DEVICE = 11
DEVICE_ERROR = 12

# fbn_dtype, fbn_layout, fbn_device_type, fbn_operation, fbn_statistics,
# fbn_param_grad, fbn_bn_mode.
DTYPE_FLOAT32, DTYPE_FLOAT64, DTYPE_FLOAT16, DTYPE_BFLOAT16 = 0, 1, 2, 3
LAYOUT_NCHW, LAYOUT_NHWC = 0, 1
DEVICE_CPU, DEVICE_CUDA = 0, 1
OPERATION_BN, OPERATION_BN_RELU, OPERATION_BN_ADD_RELU = 0, 1, 2
STATISTICS_BATCH, STATISTICS_RUNNING = 0, 1
PARAM_GRAD_OVERWRITE, PARAM_GRAD_ACCUMULATE = 0, 1
BN_MODE_AUTO = 0

# FBN_OP_MEMORY_ALIGNMENT: saved state and workspace pointers.
MEMORY_ALIGNMENT = 64


class TensorDesc(C.Structure):
    """struct fbn_tensor_desc."""
    _fields_ = [("n", C.c_int64), ("c", C.c_int64), ("h", C.c_int64), ("w", C.c_int64),
                ("dtype", C.c_int), ("layout", C.c_int)]


class OpDesc(C.Structure):
    """struct fbn_op_desc."""
    _fields_ = [("num_features", C.c_int64), ("eps", C.c_double), ("dtype", C.c_int),
                ("param_dtype", C.c_int), ("layout", C.c_int), ("device", C.c_int),
                ("device_index", C.c_int), ("operation", C.c_int), ("affine", C.c_bool),
                ("statistics", C.c_int), ("bn_mode", C.c_int)]


class Error(RuntimeError):
    """A fusedbn call failed.  status is the fbn_status code, status_name its
    name ("FBN_STATUS_SHAPE_MISMATCH"); str() is the library's message (the
    call, the value and the rule)."""

    def __init__(self, status, status_name, message):
        super().__init__("%s: %s" % (status_name, message))
        self.status = status
        self.status_name = status_name
        self.message = message


class InvalidArgumentError(Error, ValueError):
    """The caller is wrong: FBN_STATUS_NULL_POINTER, INVALID_VALUE, INVALID_SHAPE,
    SHAPE_MISMATCH, ALIASING."""


class UnsupportedError(Error, NotImplementedError):
    """The library cannot do this: FBN_STATUS_UNSUPPORTED, NO_DEVICE."""


class LibraryError(ImportError):
    """libfusedbn could not be found, loaded, or is too old."""


_INVALID = (NULL_POINTER, INVALID_VALUE, INVALID_SHAPE, SHAPE_MISMATCH, ALIASING)
_UNSUPPORTED = (UNSUPPORTED, NO_DEVICE)

_STATUS_NAMES = {
    SUCCESS: "FBN_STATUS_SUCCESS", NULL_POINTER: "FBN_STATUS_NULL_POINTER",
    INVALID_VALUE: "FBN_STATUS_INVALID_VALUE", INVALID_SHAPE: "FBN_STATUS_INVALID_SHAPE",
    SHAPE_MISMATCH: "FBN_STATUS_SHAPE_MISMATCH", UNSUPPORTED: "FBN_STATUS_UNSUPPORTED",
    INVALID_STATE: "FBN_STATUS_INVALID_STATE", DEVICE_ERROR: "FBN_STATUS_DEVICE_ERROR",
}


def make_error(status, message, status_name=None):
    """The exception for a status: InvalidArgumentError, UnsupportedError or Error."""
    if status_name is None:
        status_name = _STATUS_NAMES.get(status, "FBN_STATUS_%d" % status)
    if status in _INVALID:
        return InvalidArgumentError(status, status_name, message)
    if status in _UNSUPPORTED:
        return UnsupportedError(status, status_name, message)
    return Error(status, status_name, message)


def in_call(caller, error):
    """error with its message prefixed by caller (what the user called, e.g.
    "fusedbn.torch.FusedBatchNorm2d.forward"), the library's text kept; the
    same error when its message already starts with caller."""
    if not isinstance(error, Error) or error.message.startswith(caller + ":"):
        return error
    return make_error(error.status, "%s: %s" % (caller, error.message), error.status_name)


_vp = C.c_void_p
_sz = C.c_size_t
_PSIZE = C.POINTER(C.c_size_t)

# name: (restype, argtypes).  Every entry is required of the library.
_SIGNATURES = {
    "fbn_version": (C.c_int, []),
    "fbn_status_string": (C.c_char_p, [C.c_int]),
    "fbn_last_error_message": (C.c_char_p, []),
    "fbn_op_desc_init": (None, [C.POINTER(OpDesc)]),
    "fbn_op_create": (C.c_int, [C.POINTER(OpDesc), C.POINTER(_vp)]),
    "fbn_op_destroy": (None, [_vp]),
    "fbn_op_saved_size": (C.c_int, [_vp, C.POINTER(TensorDesc), _PSIZE]),
    "fbn_op_forward_workspace_size": (C.c_int, [_vp, C.POINTER(TensorDesc), _PSIZE]),
    "fbn_op_backward_workspace_size": (C.c_int, [_vp, C.POINTER(TensorDesc), _PSIZE]),
    "fbn_running_average_factor": (C.c_int, [C.c_double, C.c_bool, C.c_int64,
                                             C.POINTER(C.c_double)]),
    # op, x_desc, x, addend, y, weight, bias, running_mean, running_var, factor,
    # saved, saved_bytes, workspace, workspace_bytes
    "fbn_op_forward": (C.c_int, [_vp, C.POINTER(TensorDesc), _vp, _vp, _vp, _vp, _vp, _vp, _vp,
                                 C.c_double, _vp, _sz, _vp, _sz]),
    # op, x_desc, x, y, dy, saved, saved_bytes, weight, bias, dx, daddend,
    # dweight, dbias, param_grad, workspace, workspace_bytes
    "fbn_op_backward": (C.c_int, [_vp, C.POINTER(TensorDesc), _vp, _vp, _vp, _vp, _sz, _vp, _vp,
                                  _vp, _vp, _vp, _vp, C.c_int, _vp, _sz]),
}


class CudaExec(C.Structure):
    """struct fbn_cuda_exec: the stream (cudaStream_t) and an optional cuDNN handle."""
    _fields_ = [("stream", C.c_void_p), ("cudnn", C.c_void_p)]


# Present only in a library built with CUDA (fusedbn_cuda.h).
_CUDA_SIGNATURES = {
    "fbn_cuda_op_forward": (C.c_int, [_vp, C.POINTER(CudaExec), C.POINTER(TensorDesc), _vp, _vp,
                                      _vp, _vp, _vp, _vp, _vp, C.c_double, _vp, _sz, _vp, _sz]),
    "fbn_cuda_op_backward": (C.c_int, [_vp, C.POINTER(CudaExec), C.POINTER(TensorDesc), _vp, _vp,
                                       _vp, _vp, _sz, _vp, _vp, _vp, _vp, _vp, _vp, C.c_int, _vp,
                                       _sz]),
}


# Synchronized batch norm's split phases (fusedbn_sync.h), used by
# fusedbn.torch.SyncFusedBatchNorm2d; optional so that an older library still
# loads for the other modules.
_PD = C.POINTER(C.c_double)
_SYNC_SIGNATURES = {
    "fbn_sync_stats_record_size": (C.c_int, [_vp, _PSIZE]),
    "fbn_sync_grad_record_size": (C.c_int, [_vp, _PSIZE]),
    "fbn_sync_saved_size": (C.c_int, [_vp, C.POINTER(TensorDesc), _PSIZE]),
    "fbn_sync_workspace_size": (C.c_int, [_vp, C.POINTER(TensorDesc), _PSIZE]),
    # op, x_desc, x, record, record_bytes
    "fbn_sync_stats": (C.c_int, [_vp, C.POINTER(TensorDesc), _vp, _vp, _sz]),
    # op, records, world_size, record_bytes, mean, var, running_mean,
    # running_var, factor, total_count
    "fbn_sync_combine": (C.c_int, [_vp, _vp, C.c_int, _sz, _vp, _vp, _vp, _vp, C.c_double,
                                   C.POINTER(C.c_int64)]),
    # op, x_desc, x, addend, y, weight, bias, mean, var, saved, saved_bytes,
    # workspace, workspace_bytes
    "fbn_sync_apply": (C.c_int, [_vp, C.POINTER(TensorDesc), _vp, _vp, _vp, _vp, _vp, _vp, _vp,
                                 _vp, _sz, _vp, _sz]),
    # op, x_desc, x, y, dy, saved, saved_bytes, weight, bias, grad_record,
    # grad_record_bytes, dweight, dbias, param_grad, workspace, workspace_bytes
    "fbn_sync_backward_reduce": (C.c_int, [_vp, C.POINTER(TensorDesc), _vp, _vp, _vp, _vp, _sz,
                                           _vp, _vp, _vp, _sz, _vp, _vp, C.c_int, _vp, _sz]),
    # op, x_desc, x, y, dy, saved, saved_bytes, weight, bias, grad_record,
    # grad_record_bytes, dx, daddend, dweight, dbias, param_grad, workspace,
    # workspace_bytes
    "fbn_sync_backward_apply": (C.c_int, [_vp, C.POINTER(TensorDesc), _vp, _vp, _vp, _vp, _sz,
                                          _vp, _vp, _vp, _sz, _vp, _vp, _vp, _vp, C.c_int, _vp,
                                          _sz]),
}


def _version_string(v):
    return "%d.%d.%d" % (v // 10000, v // 100 % 100, v % 100)


def _candidates():
    """(path, where) pairs in lookup order."""
    env = os.environ.get("FUSEDBN_LIBRARY")
    if env:
        return [(env, "FUSEDBN_LIBRARY")]
    here = os.path.dirname(os.path.abspath(__file__))
    bundled = sorted(glob.glob(os.path.join(here, "libfusedbn.so*")))
    return ([(p, "next to the package") for p in bundled] +
            [("libfusedbn.so.0", "system loader"), ("libfusedbn.so", "system loader")])


def _open(path):
    """The CDLL with signatures set, or raise LibraryError's reason (OSError/RuntimeError)."""
    lib = C.CDLL(path)
    missing = [name for name in _SIGNATURES if not hasattr(lib, name)]
    if "fbn_version" in missing:
        raise RuntimeError("no fbn_version: not libfusedbn")
    lib.fbn_version.restype = C.c_int
    version = lib.fbn_version()
    if version < REQUIRED_VERSION or missing:
        raise RuntimeError("version %s%s: fusedbn's Python package needs %s or newer with the op "
                           "API" % (_version_string(version),
                                    ", lacks " + ", ".join(missing) if missing else "",
                                    _version_string(REQUIRED_VERSION)))
    for name, (restype, argtypes) in (list(_SIGNATURES.items()) + list(_CUDA_SIGNATURES.items())
                                      + list(_SYNC_SIGNATURES.items())):
        if hasattr(lib, name):
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
    return lib


class Library:
    """The loaded library: path, version and the raw ctypes functions (lib)."""

    def __init__(self, lib, path):
        self.lib = lib
        self.path = path
        self.version = lib.fbn_version()
        self.version_string = _version_string(self.version)
        # Stream-taking op entry points: only in a library built with CUDA.
        self.has_cuda_streams = all(hasattr(lib, name) for name in _CUDA_SIGNATURES)
        # Synchronized batch norm's split phases (fusedbn_sync.h).
        self.has_sync = all(hasattr(lib, name) for name in _SYNC_SIGNATURES)

    def error(self, status):
        """The exception for a failed call: the status name and the thread's message."""
        name = self.lib.fbn_status_string(status).decode()
        message = self.lib.fbn_last_error_message().decode()
        return make_error(status, message, name)

    def check(self, status):
        if status != SUCCESS:
            raise self.error(status)

    def running_average_factor(self, momentum, cumulative_average, num_batches_tracked):
        """fbn_running_average_factor(): momentum, or 1/num_batches_tracked for momentum=None."""
        factor = C.c_double()
        self.check(self.lib.fbn_running_average_factor(
            float(momentum), bool(cumulative_average), int(num_batches_tracked), C.byref(factor)))
        return factor.value


_library = None
_library_lock = threading.Lock()


def load_library():
    """The process's Library, loaded on first call (LibraryError if none fits)."""
    global _library
    if _library is not None:
        return _library
    with _library_lock:
        if _library is None:
            tried = []
            for path, where in _candidates():
                try:
                    lib = _open(path)
                except (OSError, RuntimeError) as e:
                    tried.append("%s (%s): %s" % (path, where, e))
                    continue
                _library = Library(lib, getattr(lib, "_name", path))
                break
            else:
                raise LibraryError(
                    "libfusedbn %s or newer not found; tried:\n  %s\nSet FUSEDBN_LIBRARY to the "
                    "path of libfusedbn.so (e.g. <build>/src/libfusedbn.so) or install the "
                    "library." % (_version_string(REQUIRED_VERSION), "\n  ".join(tried)))
    return _library


class Op:
    """One fbn_op: created from an OpDesc, destroyed with this object.  Ops are
    immutable; forward and backward may use one from several threads."""

    def __init__(self, library, desc):
        self.library = library
        self.desc = desc
        handle = _vp()
        library.check(library.lib.fbn_op_create(C.byref(desc), C.byref(handle)))
        self.handle = handle.value
        self._destroy = library.lib.fbn_op_destroy

    def __del__(self):
        handle, self.handle = getattr(self, "handle", None), None
        if handle:
            self._destroy(handle)

    def sizes(self, x_desc):
        """(saved bytes, forward workspace bytes, backward workspace bytes) for x_desc."""
        lib = self.library.lib
        saved, fws, bws = C.c_size_t(), C.c_size_t(), C.c_size_t()
        ref = C.byref(x_desc)
        for fn, out in ((lib.fbn_op_saved_size, saved), (lib.fbn_op_forward_workspace_size, fws),
                        (lib.fbn_op_backward_workspace_size, bws)):
            status = fn(self.handle, ref, C.byref(out))
            if status != SUCCESS:
                raise self.library.error(status)
        return saved.value, fws.value, bws.value

    def forward(self, x_desc, x, addend, y, weight, bias, running_mean, running_var, factor,
                saved, saved_bytes, workspace, workspace_bytes, stream=None):
        """fbn_op_forward, or fbn_cuda_op_forward on stream (a cudaStream_t
        as an integer) when stream is not None."""
        args = (C.byref(x_desc), x, addend, y, weight, bias, running_mean, running_var, factor,
                saved, saved_bytes, workspace, workspace_bytes)
        if stream is None:
            status = self.library.lib.fbn_op_forward(self.handle, *args)
        else:
            status = self.library.lib.fbn_cuda_op_forward(
                self.handle, C.byref(CudaExec(stream, None)), *args)
        if status != SUCCESS:
            raise self.library.error(status)

    def backward(self, x_desc, x, y, dy, saved, saved_bytes, weight, bias, dx, daddend, dweight,
                 dbias, workspace, workspace_bytes, stream=None):
        """fbn_op_backward (gradients overwritten), or fbn_cuda_op_backward on
        stream when stream is not None."""
        args = (C.byref(x_desc), x, y, dy, saved, saved_bytes, weight, bias, dx, daddend, dweight,
                dbias, PARAM_GRAD_OVERWRITE, workspace, workspace_bytes)
        if stream is None:
            status = self.library.lib.fbn_op_backward(self.handle, *args)
        else:
            status = self.library.lib.fbn_cuda_op_backward(
                self.handle, C.byref(CudaExec(stream, None)), *args)
        if status != SUCCESS:
            raise self.library.error(status)


def new_op_desc(library):
    """An OpDesc filled with the library's defaults (fbn_op_desc_init)."""
    desc = OpDesc()
    library.lib.fbn_op_desc_init(C.byref(desc))
    return desc


class SyncOp:
    """The synchronized batch norm phases (fusedbn_sync.h) of one Op of
    statistics STATISTICS_BATCH: sizes, the local statistics record, the
    combine of the all-gathered records, the apply, and the backward's
    reduce and apply.  Pointers are integers (None for NULL); every failing
    call raises the library's Error."""

    def __init__(self, op):
        self.op = op
        self.library = op.library
        if not self.library.has_sync:
            raise make_error(UNSUPPORTED, "libfusedbn %s at %s has no synchronized batch norm "
                             "(fbn_sync_*)" % (self.library.version_string, self.library.path))
        self._lib = self.library.lib

    def _size(self, fn, *args):
        out = C.c_size_t()
        self.library.check(fn(self.op.handle, *args, C.byref(out)))
        return out.value

    def record_bytes(self):
        """fbn_sync_stats_record_size(): bytes of one rank's statistics record."""
        return self._size(self._lib.fbn_sync_stats_record_size)

    def grad_record_bytes(self):
        """fbn_sync_grad_record_size(): bytes of the backward's gradient record."""
        return self._size(self._lib.fbn_sync_grad_record_size)

    def sizes(self, x_desc):
        """(saved bytes, workspace bytes) of the apply / backward phases for x_desc."""
        ref = C.byref(x_desc)
        return (self._size(self._lib.fbn_sync_saved_size, ref),
                self._size(self._lib.fbn_sync_workspace_size, ref))

    def stats(self, x_desc, x, record, record_bytes):
        self.library.check(self._lib.fbn_sync_stats(self.op.handle, C.byref(x_desc), x, record,
                                                     record_bytes))

    def combine(self, records, world_size, record_bytes, mean, var, running_mean, running_var,
                factor):
        """fbn_sync_combine(); returns the total count per channel."""
        total = C.c_int64()
        self.library.check(self._lib.fbn_sync_combine(
            self.op.handle, records, int(world_size), record_bytes, mean, var, running_mean,
            running_var, float(factor), C.byref(total)))
        return total.value

    def apply(self, x_desc, x, addend, y, weight, bias, mean, var, saved, saved_bytes, workspace,
              workspace_bytes):
        self.library.check(self._lib.fbn_sync_apply(
            self.op.handle, C.byref(x_desc), x, addend, y, weight, bias, mean, var, saved,
            saved_bytes, workspace, workspace_bytes))

    def backward_reduce(self, x_desc, x, y, dy, saved, saved_bytes, weight, bias, grad_record,
                        grad_record_bytes, dweight, dbias, workspace, workspace_bytes):
        """fbn_sync_backward_reduce(), dweight/dbias (this shard's) overwritten."""
        self.library.check(self._lib.fbn_sync_backward_reduce(
            self.op.handle, C.byref(x_desc), x, y, dy, saved, saved_bytes, weight, bias,
            grad_record, grad_record_bytes, dweight, dbias, PARAM_GRAD_OVERWRITE, workspace,
            workspace_bytes))

    def backward_apply(self, x_desc, x, y, dy, saved, saved_bytes, weight, bias, grad_record,
                       grad_record_bytes, dx, daddend, workspace, workspace_bytes):
        """fbn_sync_backward_apply(): dx and daddend (global dweight/dbias not asked for)."""
        self.library.check(self._lib.fbn_sync_backward_apply(
            self.op.handle, C.byref(x_desc), x, y, dy, saved, saved_bytes, weight, bias,
            grad_record, grad_record_bytes, dx, daddend, None, None, PARAM_GRAD_OVERWRITE,
            workspace, workspace_bytes))
