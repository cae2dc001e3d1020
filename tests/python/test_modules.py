"""fusedbn.torch's modules against torch.nn.BatchNorm2d (+ add) (+ relu).

Three training steps then one eval step, each on fresh random data with a
random upstream gradient: y, dx, daddend, dweight, dbias, running_mean,
running_var and num_batches_tracked are compared after every step, for every
operation, affine x track_running_stats, momentum 0.1 and None, both layouts.
"""
import itertools

import pytest
import torch

from fusedbn.torch import BatchNorm2d, BatchNorm2dReLU, FusedBatchNorm2d

from helpers import rand, rand_x

SHAPE = (3, 4, 5, 6)

# (module class, uses an addend, applies ReLU)
KINDS = {
    "fused_addend": (FusedBatchNorm2d, True, True),
    "fused_no_addend": (FusedBatchNorm2d, False, True),
    "bn_relu": (BatchNorm2dReLU, False, True),
    "bn": (BatchNorm2d, False, False),
}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def make_pair(gen, cls, dtype, **kw):
    """(fusedbn module, torch.nn.BatchNorm2d) with equal random weights and
    running statistics."""
    ours = cls(SHAPE[1], **kw).to(dtype)
    ref = torch.nn.BatchNorm2d(SHAPE[1], **kw).double()
    with torch.no_grad():
        if ref.affine:
            ref.weight.copy_(rand(gen, SHAPE[1], lo=0.5, hi=1.5))
            ref.bias.copy_(rand(gen, SHAPE[1]))
        if ref.track_running_stats:
            ref.running_mean.copy_(rand(gen, SHAPE[1]))
            ref.running_var.copy_(rand(gen, SHAPE[1], lo=0.5, hi=2.0))
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def step(gen, ours, ref, addend, relu, fmt, dtype):
    """One forward + backward of both; returns the pairs to compare."""
    x64 = rand_x(gen, SHAPE).contiguous(memory_format=fmt)
    z64 = rand(gen, SHAPE).contiguous(memory_format=fmt) if addend else None
    g64 = rand(gen, SHAPE)
    x = x64.to(dtype, copy=True).requires_grad_()
    z = z64.to(dtype, copy=True).requires_grad_() if addend else None
    xr = x64.clone().requires_grad_()
    zr = z64.clone().requires_grad_() if addend else None
    y = ours(x, z) if addend else ours(x)
    yr = ref(xr)
    if addend:
        yr = yr + zr
    if relu:
        yr = torch.relu(yr)
    (y.double() * g64).sum().backward()
    (yr * g64).sum().backward()
    pairs = [("y", y, yr), ("dx", x.grad, xr.grad)]
    if addend:
        pairs.append(("daddend", z.grad, zr.grad))
    assert y.is_contiguous(memory_format=fmt)
    return pairs


def module_state(ours, ref, grads=True):
    pairs = []
    if ref.affine and grads:
        pairs += [("dweight", ours.weight.grad, ref.weight.grad),
                  ("dbias", ours.bias.grad, ref.bias.grad)]
    if ref.track_running_stats:
        pairs += [("running_mean", ours.running_mean, ref.running_mean),
                  ("running_var", ours.running_var, ref.running_var),
                  ("num_batches_tracked", ours.num_batches_tracked, ref.num_batches_tracked)]
    else:
        assert ours.running_mean is None and ours.running_var is None
        assert ours.num_batches_tracked is None
    return pairs


def compare(pairs, rtol, atol, when):
    for name, got, want in pairs:
        assert got is not None, "%s: %s missing" % (when, name)
        if name == "num_batches_tracked":
            assert got.dtype == torch.int64 and int(got) == int(want), when
            continue
        torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol,
                                   msg=lambda m: "%s, %s: %s" % (when, name, m))


def run_steps(gen, kind, affine, track, momentum, layout, dtype, rtol, atol):
    cls, addend, relu = KINDS[kind]
    ours, ref = make_pair(gen, cls, dtype, momentum=momentum, affine=affine,
                          track_running_stats=track)
    fmt = LAYOUTS[layout]
    for i, training in enumerate([True, True, True, False]):
        ours.train(training)
        ref.train(training)
        for p in list(ours.parameters()) + list(ref.parameters()):
            p.grad = None
        pairs = step(gen, ours, ref, addend, relu, fmt, dtype)
        compare(pairs + module_state(ours, ref), rtol, atol,
                "step %d (%s)" % (i, "train" if training else "eval"))


@pytest.mark.parametrize("kind,affine,track,momentum,layout", list(itertools.product(
    KINDS, [True, False], [True, False], [0.1, None], LAYOUTS)))
def test_module_matches_torch_float64(gen, kind, affine, track, momentum, layout):
    run_steps(gen, kind, affine, track, momentum, layout, torch.float64, 1e-10, 1e-12)


# float32 against torch in float64: single-precision data and outputs,
# float64-accumulated statistics; the tolerance covers the float32 roundings
# of x, y and the gradients.
@pytest.mark.parametrize("kind,layout", list(itertools.product(KINDS, LAYOUTS)))
def test_module_matches_torch_float32(gen, kind, layout):
    run_steps(gen, kind, True, True, 0.1, layout, torch.float32, 1e-4, 1e-5)


def test_gradients_accumulate_like_autograd(gen):
    """Two backwards without zeroing: .grad holds the sum, as with torch."""
    ours, ref = make_pair(gen, FusedBatchNorm2d, torch.float64)
    for _ in range(2):
        x = rand_x(gen, SHAPE)
        z = rand(gen, SHAPE)
        g = rand(gen, SHAPE)
        (ours(x, z) * g).sum().backward()
        (torch.relu(ref(x) + z) * g).sum().backward()
    compare(module_state(ours, ref), 1e-10, 1e-12, "two backwards")


def test_module_used_twice_before_backward(gen):
    """Each forward keeps its own saved state: two forwards, one backward."""
    ours, ref = make_pair(gen, FusedBatchNorm2d, torch.float64)
    xs = [rand_x(gen, SHAPE).requires_grad_() for _ in range(2)]
    zs = [rand(gen, SHAPE) for _ in range(2)]
    g = rand(gen, SHAPE)
    loss = sum((ours(x, z) * g).sum() for x, z in zip(xs, zs))
    xr = [x.detach().clone().requires_grad_() for x in xs]
    loss_r = sum((torch.relu(ref(x) + z) * g).sum() for x, z in zip(xr, zs))
    loss.backward()
    loss_r.backward()
    compare([("dx0", xs[0].grad, xr[0].grad), ("dx1", xs[1].grad, xr[1].grad)]
            + module_state(ours, ref), 1e-10, 1e-12, "shared module")


def test_non_contiguous_input_is_copied_into_nearer_layout(gen):
    """A transposed view (C has the smallest stride) runs as channels_last,
    a sliced NCHW view as NCHW; results as torch's either way."""
    ours, ref = make_pair(gen, FusedBatchNorm2d, torch.float64)
    base = rand_x(gen, (3, 4, 5, 12))
    for x, fmt in ((base[..., ::2], torch.contiguous_format),
                   (rand_x(gen, (3, 5, 6, 4)).permute(0, 3, 1, 2)[:, :, :, 1:],
                    torch.channels_last)):
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        z = rand(gen, x.shape)
        y = ours(x, z)
        assert y.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y, torch.relu(ref(x) + z), rtol=1e-10, atol=1e-12)


def test_no_grad_forward_keeps_no_graph(gen):
    ours, ref = make_pair(gen, FusedBatchNorm2d, torch.float64)
    x, z = rand_x(gen, SHAPE), rand(gen, SHAPE)
    with torch.no_grad():
        y = ours(x, z)
    assert y.grad_fn is None
    torch.testing.assert_close(y, torch.relu(ref(x) + z), rtol=1e-10, atol=1e-12)
    compare(module_state(ours, ref, grads=False), 1e-10, 1e-12, "no_grad")
