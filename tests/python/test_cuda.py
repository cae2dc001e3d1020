"""CUDA tensors: FusedBatchNorm2d on the GPU against torch's float64 CPU
modules, on the default stream and on another stream, float32/float64 both
layouts and float16/bfloat16 channels_last (cuDNN's fused path).  Skipped
without a CUDA device (Debian's torch has no CUDA)."""
import pytest
import torch

import fusedbn
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


def run_steps(gen, dtype, fmt, stream=None):
    needs_cuda_library()
    ref = torch.nn.BatchNorm2d(SHAPE[1]).double()
    with torch.no_grad():
        ref.weight.copy_(rand(gen, SHAPE[1], lo=0.5, hi=1.5))
        ref.bias.copy_(rand(gen, SHAPE[1]))
    ours = FusedBatchNorm2d(SHAPE[1]).to(_ops.param_dtype(dtype)).cuda()
    ours.load_state_dict(ref.state_dict())
    rtol, atol = TOL[dtype]
    for training in (True, True, False):
        ours.train(training)
        ref.train(training)
        x64, z64, g64 = rand_x(gen, SHAPE), rand(gen, SHAPE), rand(gen, SHAPE)
        x = x64.to(dtype).contiguous(memory_format=fmt).cuda().requires_grad_()
        z = z64.to(dtype).contiguous(memory_format=fmt).cuda().requires_grad_()
        xr, zr = x64.clone().requires_grad_(), z64.clone().requires_grad_()
        ctx = torch.cuda.stream(stream) if stream is not None else torch.cuda.device(x.device)
        with ctx:
            y = ours(x, z)
            (y.double() * g64.cuda()).sum().backward()
        torch.cuda.synchronize()
        yr = torch.relu(ref(xr) + zr)
        (yr * g64).sum().backward()
        for name, got, want in (("y", y, yr), ("dx", x.grad, xr.grad), ("daddend", z.grad, zr.grad),
                                ("running_mean", ours.running_mean, ref.running_mean),
                                ("running_var", ours.running_var, ref.running_var),
                                ("dweight", ours.weight.grad, ref.weight.grad),
                                ("dbias", ours.bias.grad, ref.bias.grad)):
            torch.testing.assert_close(got.double().cpu(), want, rtol=rtol, atol=atol,
                                       msg=lambda m: "%s: %s" % (name, m))
        ours.zero_grad()
        ref.zero_grad()
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_cuda_matches_torch(gen, dtype, fmt):
    run_steps(gen, dtype, fmt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_channels_last(gen, dtype):
    run_steps(gen, dtype, torch.channels_last)


def test_cuda_non_default_stream(gen):
    run_steps(gen, torch.float32, torch.channels_last, stream=torch.cuda.Stream())


def test_cuda_parameters_on_another_device(gen):
    m = FusedBatchNorm2d(SHAPE[1])
    before = m.running_mean.clone()
    with pytest.raises(fusedbn.InvalidArgumentError, match="must be on x's device"):
        m(rand_x(gen, SHAPE, torch.float32).cuda())
    assert torch.equal(m.running_mean, before) and int(m.num_batches_tracked) == 0
