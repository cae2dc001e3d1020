"""torch >= 2.4: the custom ops torch.ops.fusedbn.forward/backward pass
torch.library.opcheck (schema, fake implementation, autograd registration)
and torch.compile runs a model with them to the same results as eager.
Skipped with older torch (Debian's 1.13), which has no torch.library.custom_op."""
import pytest
import torch

from fusedbn.torch import FusedBatchNorm2d, _custom_op, functional

from helpers import rand, rand_x

pytestmark = pytest.mark.skipif(not _custom_op.AVAILABLE,
                                reason="torch %s has no torch.library.custom_op (needs >= 2.4)"
                                % torch.__version__)

SHAPE = (2, 3, 4, 5)


def test_custom_op_is_registered():
    assert functional.USE_CUSTOM_OP
    assert hasattr(torch.ops.fusedbn, "forward") and hasattr(torch.ops.fusedbn, "backward")


@pytest.mark.parametrize("training", [True, False])
def test_module_through_custom_op_matches_function(gen, monkeypatch, training):
    """Eager calls through the custom op (FUSEDBN_TORCH_CUSTOM_OP=always) give
    the autograd Function's results bit for bit."""
    mods = [FusedBatchNorm2d(SHAPE[1]).double().train(training) for _ in range(2)]
    x, z, g = rand_x(gen, SHAPE), rand(gen, SHAPE), rand(gen, SHAPE)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    zs = [z.clone().requires_grad_() for _ in range(2)]
    for i, always in enumerate((False, True)):
        monkeypatch.setattr(functional, "_ALWAYS_CUSTOM_OP", always)
        (mods[i](xs[i], zs[i]) * g).sum().backward()
    for a, b in ((xs[0].grad, xs[1].grad), (zs[0].grad, zs[1].grad),
                 (mods[0].weight.grad, mods[1].weight.grad),
                 (mods[0].bias.grad, mods[1].bias.grad)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for a, b in zip(mods[0].state_dict().values(), mods[1].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("cumulative", [False, True])
def test_opcheck_forward(gen, batch_stats, fmt, cumulative):
    x = rand_x(gen, SHAPE).contiguous(memory_format=fmt).requires_grad_()
    z = rand(gen, SHAPE).contiguous(memory_format=fmt).requires_grad_()
    w = rand(gen, SHAPE[1], lo=0.5, hi=1.5).requires_grad_()
    b = rand(gen, SHAPE[1]).requires_grad_()
    rm, rv = rand(gen, SHAPE[1]), rand(gen, SHAPE[1], lo=0.5, hi=2.0)
    count = torch.tensor(3) if cumulative else None
    torch.library.opcheck(torch.ops.fusedbn.forward.default,
                          (x, z, w, b, rm, rv, 2, batch_stats, 0.1, count, 1e-5, True))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_compiled_module_matches_eager(gen, momentum):
    """One graph (fullgraph=True): nothing in forward breaks the trace."""
    eager = FusedBatchNorm2d(SHAPE[1], momentum=momentum).double()
    compiled_module = FusedBatchNorm2d(SHAPE[1], momentum=momentum).double()
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x = rand_x(gen, SHAPE)
        z = rand(gen, SHAPE)
        g = rand(gen, SHAPE)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [eager(xs[0], z), compiled(xs[1], z)]
        for y in ys:
            (y * g).sum().backward()
        torch.testing.assert_close(ys[1], ys[0], rtol=0, atol=0)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=0, atol=0)
    for a, b in zip(eager.state_dict().values(), compiled_module.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch.testing.assert_close(compiled_module.weight.grad, eager.weight.grad, rtol=0, atol=0)
