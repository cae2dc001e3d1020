"""The modules are torch.nn.BatchNorm2d to everything but forward: names,
state_dict, load_state_dict, dtype/device moves, resets, hooks, copies."""
import copy
import io
import pickle

import pytest
import torch

from fusedbn.torch import BatchNorm2d, BatchNorm2dReLU, FusedBatchNorm2d

from helpers import rand, rand_x

SHAPE = (4, 2, 8, 3)  # OneFlow's example shape
CLASSES = [FusedBatchNorm2d, BatchNorm2dReLU, BatchNorm2d]


def trained_reference(gen, steps=3, **kw):
    ref = torch.nn.BatchNorm2d(SHAPE[1], **kw).double()
    with torch.no_grad():
        if ref.affine:
            ref.weight.copy_(rand(gen, SHAPE[1]))
            ref.bias.copy_(rand(gen, SHAPE[1]))
    for _ in range(steps):
        ref(rand_x(gen, SHAPE))
    return ref


def test_seed_example_runs():
    x = torch.randn(4, 2, 8, 3)
    m = FusedBatchNorm2d(num_features=2, eps=1e-5, momentum=0.1)
    y = m(x, addend=None)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert int(m.num_batches_tracked) == 1


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("affine,track", [(True, True), (True, False), (False, True),
                                          (False, False)])
def test_state_dict_identical_to_batchnorm2d(gen, cls, affine, track):
    ref = trained_reference(gen, affine=affine, track_running_stats=track)
    ours = cls(SHAPE[1], affine=affine, track_running_stats=track).double()
    fresh = torch.nn.BatchNorm2d(SHAPE[1], affine=affine, track_running_stats=track).double()
    assert list(ours.state_dict().keys()) == list(fresh.state_dict().keys())
    for k, v in fresh.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in fresh.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in fresh.named_buffers()]
    ours.load_state_dict(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    # and back into torch's module
    back = torch.nn.BatchNorm2d(SHAPE[1], affine=affine, track_running_stats=track).double()
    back.load_state_dict(ours.state_dict())
    assert repr(ours).split("(", 1)[1] == repr(back).split("(", 1)[1]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_load_batchnorm2d_state_and_continue(gen, momentum):
    ref = trained_reference(gen, momentum=momentum)
    ours = FusedBatchNorm2d(SHAPE[1], momentum=momentum).double()
    ours.load_state_dict(ref.state_dict())
    for training in (True, True, False):
        ours.train(training)
        ref.train(training)
        x, z = rand_x(gen, SHAPE), rand(gen, SHAPE)
        torch.testing.assert_close(ours(x, z), torch.relu(ref(x) + z), rtol=1e-10, atol=1e-12)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-10, atol=1e-12)


def test_dtype_moves_and_resets(gen):
    m = FusedBatchNorm2d(SHAPE[1])
    assert m.weight.dtype == torch.float32
    m.double()
    assert m.weight.dtype == m.running_var.dtype == torch.float64
    assert m.num_batches_tracked.dtype == torch.int64
    m(rand_x(gen, SHAPE))
    m.to(torch.float32)
    assert m.running_mean.dtype == torch.float32
    m(rand_x(gen, SHAPE, torch.float32))
    assert int(m.num_batches_tracked) == 2
    with torch.no_grad():
        m.weight.mul_(3)
    m.reset_running_stats()
    assert torch.equal(m.running_mean, torch.zeros(2)) and torch.equal(m.running_var,
                                                                       torch.ones(2))
    assert int(m.num_batches_tracked) == 0
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(2)) and torch.equal(m.bias, torch.zeros(2))


def test_hooks_and_zero_grad(gen):
    m = FusedBatchNorm2d(SHAPE[1]).double()
    seen = []
    m.register_forward_pre_hook(lambda mod, args: seen.append(("pre", len(args))))
    m.register_forward_hook(lambda mod, args, out: seen.append(("post", out.shape)))
    x = rand_x(gen, SHAPE).requires_grad_()
    m(x, rand(gen, SHAPE)).sum().backward()
    assert seen == [("pre", 2), ("post", SHAPE)]
    assert m.weight.grad is not None
    m.zero_grad()
    assert m.weight.grad is None or not m.weight.grad.any()


def test_eval_mode_uses_running_statistics(gen):
    ref = trained_reference(gen).eval()
    ours = FusedBatchNorm2d(SHAPE[1]).double()
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x, z = rand_x(gen, SHAPE), rand(gen, SHAPE)
    torch.testing.assert_close(ours(x, z), torch.relu(ref(x) + z), rtol=1e-10, atol=1e-12)
    for k, v in before.items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_deepcopy_pickle_and_torch_save(gen):
    m = FusedBatchNorm2d(SHAPE[1]).double()
    m(rand_x(gen, SHAPE))
    x = rand_x(gen, SHAPE)
    m.eval()
    want = m(x)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m)), torch.load(buf)):
        assert type(other) is FusedBatchNorm2d
        torch.testing.assert_close(other(x), want, rtol=0, atol=0)
