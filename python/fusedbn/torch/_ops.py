"""torch tensors onto libfusedbn's op API: the op cache, the checks the C
library cannot make (it sees pointers, not tensors), and one forward and one
backward on torch memory.

Nothing here computes on tensor values: outputs, saved state and workspace are
allocated through torch (torch.empty*, so torch's allocators own them) and
written by the library.
"""
import os
import threading

import torch

from .. import _lib

OPERATIONS = {"bn": _lib.OPERATION_BN, "bn_relu": _lib.OPERATION_BN_RELU,
              "bn_add_relu": _lib.OPERATION_BN_ADD_RELU}

_DTYPES = {torch.float32: _lib.DTYPE_FLOAT32, torch.float64: _lib.DTYPE_FLOAT64,
           torch.float16: _lib.DTYPE_FLOAT16, torch.bfloat16: _lib.DTYPE_BFLOAT16}


def library():
    return _lib.load_library()


def param_dtype(dtype):
    """dtype of weight, bias and running statistics for tensors of dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _invalid(fn, status, text):
    return _lib.make_error(status, "%s: %s" % (fn, text))


_momentum_factors = {}


def momentum_factor(momentum):
    """fbn_running_average_factor(momentum, false, 1), remembered per momentum
    value (it depends on nothing else)."""
    factor = _momentum_factors.get(momentum)
    if factor is None:
        factor = library().running_average_factor(momentum, False, 1)
        _momentum_factors[momentum] = factor
    return factor


def factor_of(momentum, count):
    """The running-average factor of a training forward: momentum when count
    is None, else the cumulative average's 1/(count + 1), count being
    num_batches_tracked before this batch (a tensor)."""
    if count is None:
        return momentum_factor(momentum)
    return library().running_average_factor(0.0, True, int(count) + 1)


# ---- op cache -----------------------------------------------------------------

_ops = {}
_ops_lock = threading.Lock()


def get_op(dtype, layout, device, statistics, operation, affine, num_features, eps):
    """The cached op for this configuration, created on first use.  The CPU
    backend choice (FBN_CPU_BACKEND, read by fbn_op_create) is part of the key."""
    backend = os.environ.get("FBN_CPU_BACKEND") if device.type == "cpu" else None
    key = (dtype, layout, device.type, device.index, statistics, operation, bool(affine),
           int(num_features), float(eps), backend)
    op = _ops.get(key)
    if op is not None:
        return op
    with _ops_lock:
        op = _ops.get(key)
        if op is None:
            lib = library()
            desc = _lib.new_op_desc(lib)
            desc.num_features = int(num_features)
            desc.eps = float(eps)
            desc.dtype = _DTYPES[dtype]
            desc.param_dtype = _DTYPES[param_dtype(dtype)]
            desc.layout = layout
            desc.device = _lib.DEVICE_CUDA if device.type == "cuda" else _lib.DEVICE_CPU
            desc.device_index = (device.index or 0) if device.type == "cuda" else 0
            desc.operation = operation
            desc.affine = bool(affine)
            desc.statistics = statistics
            op = _lib.Op(lib, desc)
            _ops[key] = op
    return op


def cached_op_count():
    """Number of ops in the cache (one per configuration run so far)."""
    return len(_ops)


# ---- layouts and checks -------------------------------------------------------

def layout_of(x):
    """(layout, memory_format) that x is made contiguous in.

    Contiguous NCHW stays NCHW, contiguous channels_last stays NHWC.  Any other
    strides: NHWC when C has the smallest stride of C, H and W (the tensor is
    closer to channels_last), else NCHW; the copy is x.contiguous() in that
    format.
    """
    if x.is_contiguous():
        return _lib.LAYOUT_NCHW, torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return _lib.LAYOUT_NHWC, torch.channels_last
    _, sc, sh, sw = x.stride()
    if sc < sh and sc < sw:
        return _lib.LAYOUT_NHWC, torch.channels_last
    return _lib.LAYOUT_NCHW, torch.contiguous_format


def check_x(fn, x):
    """Raise for what no tensor description can express: not a tensor, not
    4-D, a dtype fusedbn has no name for, a device other than CPU/CUDA."""
    if not isinstance(x, torch.Tensor):
        raise _invalid(fn, _lib.INVALID_VALUE,
                       "x is a %s: expected a torch.Tensor" % type(x).__name__)
    if x.dim() != 4:
        raise _invalid(fn, _lib.INVALID_SHAPE,
                       "x of shape %s has %d dimensions: x must be 4-D (N, C, H, W)"
                       % (tuple(x.shape), x.dim()))
    if x.dtype not in _DTYPES:
        raise _invalid(fn, _lib.INVALID_VALUE if not x.dtype.is_floating_point
                       else _lib.UNSUPPORTED,
                       "x dtype %s: x must be floating point (float32, float64, float16 or "
                       "bfloat16)" % x.dtype)
    if x.device.type not in ("cpu", "cuda"):
        raise _invalid(fn, _lib.UNSUPPORTED,
                       "x on device %s: fusedbn runs on CPU and CUDA tensors" % x.device)


def check_like_x(fn, name, t, x):
    """addend (or dy): x's shape, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise _invalid(fn, _lib.INVALID_VALUE,
                       "%s is a %s: expected a torch.Tensor" % (name, type(t).__name__))
    if t.shape != x.shape:
        raise _invalid(fn, _lib.SHAPE_MISMATCH, "%s of shape %s, x of shape %s: %s must have "
                       "x's shape" % (name, tuple(t.shape), tuple(x.shape), name))
    if t.dtype != x.dtype:
        raise _invalid(fn, _lib.INVALID_VALUE, "%s dtype %s, x dtype %s: %s must have x's dtype"
                       % (name, t.dtype, x.dtype, name))
    if t.device != x.device:
        raise _invalid(fn, _lib.INVALID_VALUE, "%s on %s, x on %s: %s must be on x's device"
                       % (name, t.device, x.device, name))


def check_per_channel(fn, name, t, x, num_features):
    """weight, bias, running_mean, running_var: num_features contiguous
    elements of param_dtype(x.dtype) on x's device (the library reads and
    writes num_features elements behind the pointer)."""
    if t is None:
        return
    want = param_dtype(x.dtype)
    if t.device != x.device:
        raise _invalid(fn, _lib.INVALID_VALUE, "%s on %s, x on %s: parameters and running "
                       "statistics must be on x's device" % (name, t.device, x.device))
    if t.dtype != want:
        raise _invalid(fn, _lib.INVALID_VALUE, "%s dtype %s with x dtype %s: %s x takes %s "
                       "parameters and running statistics"
                       % (name, t.dtype, x.dtype, x.dtype, want))
    if t.dim() != 1 or t.numel() != num_features or not t.is_contiguous():
        raise _invalid(fn, _lib.SHAPE_MISMATCH, "%s of shape %s (stride %s): must be a contiguous "
                       "vector of num_features = %d elements"
                       % (name, tuple(t.shape), tuple(t.stride()), num_features))


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def as_param_dtype(t, x):
    """t, or a float32 copy of t when t is a float16/bfloat16 tensor and x is
    not float64 (the library's per-channel dtype for such x is float32): a
    module moved with .half() or .bfloat16() runs with its parameters and
    statistics widened.  The copy of a parameter that requires grad is part
    of the autograd graph (.float()), so its gradient reaches t cast back."""
    if (isinstance(t, torch.Tensor) and t.dtype in _LOW_PRECISION
            and x.dtype != torch.float64):
        return t.float()
    return t


def stream_of(fn, device):
    """The stream argument of the op calls for tensors on device: None on the
    CPU; torch.cuda.current_stream() (as a cudaStream_t integer) on CUDA,
    through fbn_cuda_op_forward/backward.  A library without those entry
    points queues CUDA work on the legacy default stream (fbn_op_forward), so
    there only torch's default stream is accepted."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.current_stream(device).cuda_stream
    if library().has_cuda_streams:
        return stream
    if stream != 0:
        raise _invalid(fn, _lib.UNSUPPORTED, "current CUDA stream 0x%x on %s: this libfusedbn has "
                       "no fbn_cuda_op_forward (built without CUDA?), so CUDA tensors run only on "
                       "the default stream" % (stream, device))
    return None


# ---- memory -------------------------------------------------------------------

def new_output(like):
    """A fresh tensor shaped, typed, placed and laid out as like (uninitialized)."""
    return torch.empty_like(like)


def new_per_channel(num_features, dtype, device):
    """A fresh per-channel gradient vector (uninitialized)."""
    return torch.empty(num_features, dtype=dtype, device=device)


def new_buffer(nbytes, device):
    """(uint8 tensor, aligned address) of nbytes from torch's allocator;
    (None, None) for 0 bytes."""
    if nbytes == 0:
        return None, None
    align = _lib.MEMORY_ALIGNMENT
    t = torch.empty(nbytes, dtype=torch.uint8, device=device)
    ptr = t.data_ptr()
    if ptr % align:
        t = torch.empty(nbytes + align - 1, dtype=torch.uint8, device=device)
        ptr = (t.data_ptr() + align - 1) // align * align
    return t, ptr


def _ptr(t):
    return None if t is None else t.data_ptr()


def x_desc_of(x, layout):
    n, c, h, w = x.shape
    return _lib.TensorDesc(n, c, h, w, _DTYPES[x.dtype], layout)


# ---- one forward, one backward ------------------------------------------------

class Saved:
    """What one forward leaves for its backward: the op, x's description and
    the saved-state memory (a uint8 tensor owned by torch)."""
    __slots__ = ("op", "desc", "tensor", "ptr", "nbytes")

    def __init__(self, op, desc, tensor, ptr, nbytes):
        self.op, self.desc, self.tensor, self.ptr, self.nbytes = op, desc, tensor, ptr, nbytes


def forward(op, x, layout, addend, weight, bias, running_mean, running_var, factor, keep_saved,
            stream):
    """y = op(x, addend) through fbn_op_forward (fbn_cuda_op_forward on stream
    when stream is not None) on contiguous tensors of x's layout.  Returns
    (y, Saved or None)."""
    desc = x_desc_of(x, layout)
    saved_bytes, ws_bytes, _ = op.sizes(desc)
    y = new_output(x)
    saved_t, saved_ptr = new_buffer(saved_bytes, x.device) if keep_saved else (None, None)
    ws_t, ws_ptr = new_buffer(ws_bytes, x.device)
    op.forward(desc, x.data_ptr(), _ptr(addend), y.data_ptr(), _ptr(weight), _ptr(bias),
               _ptr(running_mean), _ptr(running_var), factor, saved_ptr,
               saved_bytes if keep_saved else 0, ws_ptr, ws_bytes, stream)
    del ws_t
    saved = Saved(op, desc, saved_t, saved_ptr, saved_bytes) if keep_saved else None
    return y, saved


def backward(saved, x, y, dy, weight, bias, need_dx, need_daddend, need_dweight, need_dbias,
             stream):
    """(dx, daddend, dweight, dbias) through fbn_op_backward, each a fresh
    tensor (overwritten by the library) or None where not needed."""
    op = saved.op
    _, _, ws_bytes = op.sizes(saved.desc)
    dx = new_output(x) if need_dx else None
    daddend = new_output(x) if need_daddend else None
    c = x.shape[1]
    dweight = new_per_channel(c, weight.dtype, x.device) if need_dweight else None
    dbias = new_per_channel(c, bias.dtype, x.device) if need_dbias else None
    ws_t, ws_ptr = new_buffer(ws_bytes, x.device)
    op.backward(saved.desc, x.data_ptr(), _ptr(y), dy.data_ptr(), saved.ptr, saved.nbytes,
                _ptr(weight), _ptr(bias), _ptr(dx), _ptr(daddend), _ptr(dweight), _ptr(dbias),
                ws_ptr, ws_bytes, stream)
    del ws_t
    return dx, daddend, dweight, dbias
