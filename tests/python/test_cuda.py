"""CUDA tensors: FusedBatchNorm2d on the GPU against torch's float64 CPU
modules, float32/float64 both layouts, float16/bfloat16 channels_last (cuDNN's
fused path) with float32 or (.half()) float16/bfloat16 parameters, and on a
non-default stream where work on the wrong stream reads stale input.  Skipped
without a CUDA device (Debian's torch has no CUDA)."""
import pytest
import torch

import fusedbn
from fusedbn import _lib
from fusedbn.torch import FusedBatchNorm2d, _ops

from helpers import rand, rand_x

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device (torch %s, cuda available: False)"
                                % torch.__version__)

SHAPE = (4, 8, 6, 5)
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-5),
       torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}


def needs_cuda_library():
    if not _ops.library().has_cuda_streams:
        pytest.skip("libfusedbn %s built without CUDA" % fusedbn.library_path())


def make_pair(gen, module_dtype):
    """(torch float64 CPU BatchNorm2d, CUDA FusedBatchNorm2d in module_dtype)
    with equal random parameters."""
    c = SHAPE[1]
    ref = torch.nn.BatchNorm2d(c).double()
    with torch.no_grad():
        ref.weight.copy_(rand(gen, c, lo=0.5, hi=1.5))
        ref.bias.copy_(rand(gen, c))
    ours = FusedBatchNorm2d(c).to(module_dtype).cuda()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def compare(ours, ref, pairs, rtol, atol):
    pairs = pairs + [("running_mean", ours.running_mean, ref.running_mean),
                     ("running_var", ours.running_var, ref.running_var),
                     ("dweight", ours.weight.grad, ref.weight.grad),
                     ("dbias", ours.bias.grad, ref.bias.grad)]
    for name, got, want in pairs:
        torch.testing.assert_close(got.double().cpu(), want, rtol=rtol, atol=atol,
                                   msg=lambda m: "%s: %s" % (name, m))
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


def run_steps(gen, dtype, fmt, module_dtype=None):
    """Two training steps and an eval step on the default stream."""
    needs_cuda_library()
    ref, ours = make_pair(gen, module_dtype or _ops.param_dtype(dtype))
    rtol, atol = TOL[dtype]
    for training in (True, True, False):
        ours.train(training)
        ref.train(training)
        x64, z64, g64 = rand_x(gen, SHAPE), rand(gen, SHAPE), rand(gen, SHAPE)
        x = x64.to(dtype).contiguous(memory_format=fmt).cuda().requires_grad_()
        z = z64.to(dtype).contiguous(memory_format=fmt).cuda().requires_grad_()
        xr, zr = x64.clone().requires_grad_(), z64.clone().requires_grad_()
        y = ours(x, z)
        (y.double() * g64.cuda()).sum().backward()
        torch.cuda.synchronize()
        yr = torch.relu(ref(xr) + zr)
        (yr * g64).sum().backward()
        compare(ours, ref, [("y", y, yr), ("dx", x.grad, xr.grad), ("daddend", z.grad, zr.grad)],
                rtol, atol)
        ours.zero_grad()
        ref.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_cuda_matches_torch(gen, dtype, fmt):
    run_steps(gen, dtype, fmt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_channels_last(gen, dtype):
    run_steps(gen, dtype, torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_module_moved_with_half(gen, dtype):
    """model.half() / .bfloat16(): parameters and statistics in dtype too
    (run as float32 copies, written back)."""
    run_steps(gen, dtype, torch.channels_last, module_dtype=dtype)


# Cycles torch.cuda._sleep spins on the side stream before x is written:
# tens of milliseconds, far longer than the module's kernels take.
SLEEP_CYCLES = 50_000_000


def rounded(nbytes):
    """A block's size in torch.cuda.memory_allocated(): a multiple of 512."""
    return (nbytes + 511) // 512 * 512


def test_cuda_non_default_stream(gen):
    """Forward and backward on a fresh non-blocking stream.  x is written in
    place on that stream right after a long sleep and right before the call,
    so work queued on any other stream (the legacy default stream, torch's
    default stream) would read the stale x and fail the comparison; the
    saved state shows in torch.cuda.memory_allocated() while it lives."""
    needs_cuda_library()
    dtype, fmt = torch.float32, torch.channels_last
    ref, ours = make_pair(gen, torch.float32)
    x64, z64, g64 = rand_x(gen, SHAPE), rand(gen, SHAPE), rand(gen, SHAPE)
    stale = rand_x(gen, SHAPE) * 3.0 + 5.0        # other statistics: a stale read shows
    x = stale.to(dtype).contiguous(memory_format=fmt).cuda()
    fresh = x64.to(dtype).contiguous(memory_format=fmt).cuda()
    z = z64.to(dtype).contiguous(memory_format=fmt).cuda().requires_grad_()
    g = g64.cuda()
    side = torch.cuda.Stream()
    assert side.cuda_stream != torch.cuda.current_stream().cuda_stream
    side.wait_stream(torch.cuda.current_stream())  # x, fresh, z, g are made on the current stream
    layout = _lib.LAYOUT_NHWC
    saved_bytes = _ops.get_op(dtype, layout, x.device, _lib.STATISTICS_BATCH,
                              _lib.OPERATION_BN_ADD_RELU, True, SHAPE[1],
                              ours.eps).sizes(_ops.x_desc_of(x, layout))[0]
    assert saved_bytes > 0
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        with torch.no_grad():
            x.copy_(fresh)
        x.requires_grad_()
        before = torch.cuda.memory_allocated()
        y = ours(x, z)
        grown = torch.cuda.memory_allocated() - before
        torch.cuda._sleep(SLEEP_CYCLES)
        (y.double() * g).sum().backward()
    # y and the saved state (torch's allocator, kept by the graph) are live:
    # each a block of its own, rounded up to 512 bytes by the caching
    # allocator, so a saved state allocated elsewhere would come up short.
    want = rounded(y.numel() * y.element_size()) + rounded(saved_bytes)
    assert grown >= want, "memory_allocated grew %d bytes, y + saved state take %d" % (grown,
                                                                                       want)
    torch.cuda.synchronize()
    xr, zr = x64.clone().requires_grad_(), z64.clone().requires_grad_()
    yr = torch.relu(ref(xr) + zr)
    (yr * g64).sum().backward()
    rtol, atol = TOL[dtype]
    compare(ours, ref, [("y", y, yr), ("dx", x.grad, xr.grad), ("daddend", z.grad, zr.grad)],
            rtol, atol)


def test_cuda_parameters_on_another_device(gen):
    m = FusedBatchNorm2d(SHAPE[1])
    before = m.running_mean.clone()
    with pytest.raises(fusedbn.InvalidArgumentError, match="must be on x's device"):
        m(rand_x(gen, SHAPE, torch.float32).cuda())
    assert torch.equal(m.running_mean, before) and int(m.num_batches_tracked) == 0
