"""float32 modules on ResNet-50 batch-norm shapes (many channels, few values
per channel in the late stages), against torch.nn.BatchNorm2d in float64 on
the same (float32-rounded) data: a training step then an eval step, both
layouts, y, dx, daddend, dweight, dbias and the running statistics, each to
1e-4 of its tensor's largest magnitude (TOL).

The float32 results carry a few float32 roundings of values of order one
(x, the normalized value, the output and the gradients; the statistics are
accumulated in float64 by the library), about 1e-7 of the tensor's scale
(measured: every output within 3e-7 of its scale); 1e-4 leaves room for
other data and thread counts without hiding a wrong element, which is off by
O(1) of the scale.

ReLU gate: where the float64 pre-activation is within rounding of zero, the
float32 gate may fall the other way, which changes that element's gradient
by O(1).  The reference backward therefore uses fusedbn's gate, after
checking that the two gates differ only where |pre-activation| <= GATE_SLACK
of its scale (a wrong gate anywhere else fails)."""
import pytest
import torch

from fusedbn.torch import BatchNorm2d, FusedBatchNorm2d

from helpers import rand, rand_x

TOL = 1e-4
GATE_SLACK = 1e-5
SHAPES = [(2, 256, 14, 14), (2, 1024, 7, 7), (4, 64, 28, 28)]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def assert_scaled_close(got, want, what):
    got, want = got.double(), want.double()
    assert got.shape == want.shape, what
    assert not torch.isnan(got).any(), "%s: NaN (an element left unwritten?)" % what
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    assert err <= TOL * scale + 1e-12, "%s: max error %.3g > %.0e * scale %.3g" % (
        what, err, TOL, scale)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused_addend", "bn"])
def test_float32_resnet50_shapes(gen, shape, layout, fused):
    c, fmt = shape[1], LAYOUTS[layout]
    ref = torch.nn.BatchNorm2d(c).double()
    with torch.no_grad():
        ref.weight.copy_(rand(gen, c, lo=0.5, hi=1.5))
        ref.bias.copy_(rand(gen, c))
        ref.running_mean.copy_(rand(gen, c))
        ref.running_var.copy_(rand(gen, c, lo=0.5, hi=2.0))
        for t in (ref.weight, ref.bias, ref.running_mean, ref.running_var):
            t.copy_(t.float())   # values float32 holds exactly
    ours = (FusedBatchNorm2d if fused else BatchNorm2d)(c)
    ours.load_state_dict(ref.state_dict())
    for training in (True, False):
        when = "%s %s" % (layout, "train" if training else "eval")
        ours.train(training)
        ref.train(training)
        ours.zero_grad()
        ref.zero_grad()
        x32 = rand_x(gen, shape, torch.float32).contiguous(memory_format=fmt).requires_grad_()
        z32 = rand(gen, shape, torch.float32).contiguous(memory_format=fmt).requires_grad_()
        g = rand(gen, shape)
        xr = x32.detach().double().requires_grad_()
        zr = z32.detach().double().requires_grad_()
        if fused:
            y = ours(x32, z32)
            pre = ref(xr) + zr
            gate = y.detach() > 0
            want_gate = pre.detach() > 0
            scale = float(pre.detach().abs().max())
            differ = pre.detach()[gate != want_gate].abs()
            assert differ.numel() == 0 or float(differ.max()) <= GATE_SLACK * scale, (
                "%s: ReLU gate differs at |pre-activation| %.3g (scale %.3g)"
                % (when, float(differ.max()), scale))
            yr = torch.relu(pre)
            (pre * (g * gate)).sum().backward()
        else:
            y = ours(x32)
            yr = ref(xr)
            (yr * g).sum().backward()
        (y.double() * g).sum().backward()
        assert y.dtype == torch.float32 and y.is_contiguous(memory_format=fmt), when
        pairs = [("y", y, yr), ("dx", x32.grad, xr.grad), ("dweight", ours.weight.grad,
                 ref.weight.grad), ("dbias", ours.bias.grad, ref.bias.grad),
                 ("running_mean", ours.running_mean, ref.running_mean),
                 ("running_var", ours.running_var, ref.running_var)]
        if fused:
            pairs.append(("daddend", z32.grad, zr.grad))
        for name, got, want in pairs:
            assert got is not None, "%s: %s missing" % (when, name)
            assert_scaled_close(got, want.detach(), "%s, %s" % (when, name))
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 1, when
