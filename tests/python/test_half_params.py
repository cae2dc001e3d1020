"""A module moved with .half() or .bfloat16(): its float16/bfloat16 parameters
and running statistics run as float32 copies (the library's per-channel dtype
for float32 and narrower x), weight/bias gradients reach .grad in the
module's dtype through autograd and the updated running statistics are
written back rounded to it.  These tests give the .half() module float32
input; test_half_dtypes.py gives it x of its own dtype on the CPU, and on a
GPU test_cuda.py runs float16 x as well.

Against torch.nn.BatchNorm2d in float64 holding the same (rounded)
parameters: y, dx and daddend to float32's tolerance, gradients and running
statistics to a few units of the narrow dtype's rounding."""
import pytest
import torch

import fusedbn
from fusedbn.torch import FusedBatchNorm2d

from helpers import rand, rand_x

SHAPE = (4, 6, 5, 7)
# Unit roundoff of the narrow dtype: its gradients and statistics are rounded once.
ROUNDING = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def assert_scaled_close(got, want, rel, what):
    """|got - want| <= rel * max|want| (+ a floor for all-small tensors), every element."""
    got, want = got.double(), want.double()
    assert not torch.isnan(got).any(), "%s: NaN (an element left unwritten?)" % what
    scale = max(float(want.abs().max()), 1e-3)
    err = float((got - want).abs().max())
    assert err <= rel * scale, "%s: max error %.3g > %.3g * scale %.3g" % (what, err, rel, scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_low_precision_module_on_float32_x(gen, dtype, fmt):
    c = SHAPE[1]
    ours = FusedBatchNorm2d(c)
    with torch.no_grad():
        ours.weight.copy_(rand(gen, c, lo=0.5, hi=1.5))
        ours.bias.copy_(rand(gen, c))
        ours.running_mean.copy_(rand(gen, c))
        ours.running_var.copy_(rand(gen, c, lo=0.5, hi=2.0))
    ours.to(dtype)
    ref = torch.nn.BatchNorm2d(c).double()
    ref.load_state_dict(ours.state_dict())   # the rounded values, widened
    u = ROUNDING[dtype]
    for step, training in enumerate([True, True, False]):
        ours.train(training)
        ref.train(training)
        ours.zero_grad()
        ref.zero_grad()
        x64, z64, g64 = rand_x(gen, SHAPE), rand(gen, SHAPE), rand(gen, SHAPE)
        x = x64.float().contiguous(memory_format=fmt).requires_grad_()
        z = z64.float().contiguous(memory_format=fmt).requires_grad_()
        xr, zr = x64.clone().requires_grad_(), z64.clone().requires_grad_()
        y = ours(x, z)
        yr = torch.relu(ref(xr) + zr)
        (y.double() * g64).sum().backward()
        (yr * g64).sum().backward()
        when = "step %d (%s)" % (step, "train" if training else "eval")
        assert y.dtype == torch.float32 and y.is_contiguous(memory_format=fmt), when
        for name, got, want in (("y", y, yr), ("dx", x.grad, xr.grad),
                                ("daddend", z.grad, zr.grad)):
            assert_scaled_close(got, want, 1e-4, "%s, %s" % (when, name))
        for name, got, want in (("dweight", ours.weight.grad, ref.weight.grad),
                                ("dbias", ours.bias.grad, ref.bias.grad),
                                ("running_mean", ours.running_mean, ref.running_mean),
                                ("running_var", ours.running_var, ref.running_var)):
            assert got.dtype == dtype, "%s, %s: %s" % (when, name, got.dtype)
            # One rounding to the narrow dtype (plus float32's noise in the gradients).
            assert_scaled_close(got, want, 2 * u, "%s, %s" % (when, name))
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == min(step + 1, 2)
        with torch.no_grad():
            # The next step starts both from the rounded statistics.
            ref.running_mean.copy_(ours.running_mean.double())
            ref.running_var.copy_(ours.running_var.double())


def test_low_precision_module_failing_call_changes_nothing(gen):
    m = FusedBatchNorm2d(SHAPE[1]).half()
    m(rand_x(gen, SHAPE, torch.float32))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(fusedbn.InvalidArgumentError, match="num_features = 6"):
        m(rand_x(gen, (4, 5, 5, 7), torch.float32))
    for k, v in m.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


def test_float64_x_still_needs_float64_parameters(gen):
    """float64 x is not narrowed or widened: its parameters must be float64."""
    m = FusedBatchNorm2d(SHAPE[1]).half()
    with pytest.raises(fusedbn.InvalidArgumentError,
                       match="weight dtype torch.float16 with x dtype torch.float64"):
        m(rand_x(gen, SHAPE))
