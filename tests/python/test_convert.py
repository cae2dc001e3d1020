"""convert() on torchvision ResNets: the converted model trains as the
unconverted one (same initial weights, same data, SGD with momentum).

Inputs are 40x40 so that layer4 still normalizes over N*H*W = 16 values per
channel: at 32x32 (4 values) training is chaotic, float64 rounding
differences of 1e-16 grow about 50x per step, for torch against itself too.
"Agree to r" below means every element within r relative or r times the
largest magnitude of its tensor.
"""
import copy
import pickle

import pytest
import torch
import torchvision

import fusedbn.torch as fbt


SIZE = 40


def train(model, steps, gen_seed, dtype, batch=4, opt=None, g=None):
    g = g or torch.Generator().manual_seed(gen_seed)
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    model.train()
    for _ in range(steps):
        x = torch.randn(batch, 3, SIZE, SIZE, generator=g, dtype=torch.float64).to(dtype)
        labels = torch.randint(0, 10, (batch,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_models_agree(a, b, rtol):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa.keys()) == list(sb.keys())
    for k in sa:
        if sa[k].dtype == torch.int64:
            assert torch.equal(sa[k], sb[k]), k
        else:
            scale = sb[k].abs().max().item()
            torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=rtol * scale,
                                       msg=lambda m: "%s: %s" % (k, m))


def converted_pair(build, dtype, seed):
    torch.manual_seed(seed)
    ref = build().to(dtype)
    ours = fbt.convert(copy.deepcopy(ref))
    return ref, ours


def test_resnet18_blocks_are_converted(gen):
    m = fbt.convert(torchvision.models.resnet18(num_classes=10))
    assert type(m.bn1) is fbt.BatchNorm2dReLU and type(m.relu) is torch.nn.Identity
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
        for block in layer:
            assert type(block.bn1) is fbt.BatchNorm2dReLU
            assert type(block.bn2) is fbt.FusedBatchNorm2d
            if block.downsample is not None:
                assert type(block.downsample[1]) is fbt.BatchNorm2d
    left = [n for n, mod in m.named_modules() if type(mod) is torch.nn.BatchNorm2d]
    assert left == []


def test_convert_keeps_the_tensors():
    m = torchvision.models.resnet18(num_classes=10)
    before = {n: p for n, p in m.named_parameters()}
    buffers = {n: b for n, b in m.named_buffers()}
    fbt.convert(m)
    assert all(p is before[n] for n, p in m.named_parameters())
    assert all(b is buffers[n] for n, b in m.named_buffers())


@pytest.mark.parametrize("seed", [0])
def test_resnet18_trains_as_unconverted_float64(seed):
    ref, ours = converted_pair(lambda: torchvision.models.resnet18(num_classes=10),
                               torch.float64, seed)
    lr, lo = train(ref, 10, seed, torch.float64), train(ours, 10, seed, torch.float64)
    torch.testing.assert_close(torch.tensor(lo), torch.tensor(lr), rtol=1e-9, atol=0)
    assert_models_agree(ours, ref, rtol=1e-9)
    # and in eval mode
    ref.eval()
    ours.eval()
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-9, atol=1e-12)


# float32: trajectories of several steps are chaotic whoever computes them (a
# ReLU gate flipped by a rounding difference changes a gradient discretely;
# torch's own float32 run drifts from its float64 run by more than 10% of
# some tensor's largest value within 3 steps on this model and data).  So
# each of the 10 steps starts the converted model from the reference's state:
# per step, the losses agree to 1e-5 and at least 99% of the updated
# parameters and running statistics to 1e-4 of their tensor's largest
# magnitude (typically all, within 3e-6), all of them to 2e-2 of it plus
# 1e-4 (where a gate flipped: the gradients upstream of it all move a little,
# biases near 0 by about lr * |dy|).
def test_resnet18_steps_as_unconverted_float32():
    ref, ours = converted_pair(lambda: torchvision.models.resnet18(num_classes=10),
                               torch.float32, 1)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (ref, ours)]
    g = torch.Generator().manual_seed(1)
    for step in range(10):
        ours.load_state_dict(ref.state_dict())
        state = g.get_state()
        losses = []
        for m, opt in zip((ref, ours), opts):
            g.set_state(state)
            losses += train(m, 1, None, torch.float32, opt=opt, g=g)
        assert abs(losses[1] - losses[0]) <= 1e-5 * abs(losses[0]), (step, losses)
        total = off = 0
        for (k, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
            if a.dtype == torch.int64:
                assert torch.equal(a, b), k
                continue
            scale = a.abs().max().item()
            diff = (a - b).abs()
            assert diff.max().item() <= 2e-2 * scale + 1e-4, (step, k)
            off += int((diff > 1e-4 * scale).sum())
            total += a.numel()
        assert off <= 1e-2 * total, (step, off, total)


def test_bottleneck_resnet_trains_as_unconverted_float64():
    from torchvision.models.resnet import Bottleneck, ResNet
    ref, ours = converted_pair(lambda: ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10),
                               torch.float64, 2)
    for block in (ours.layer1[0], ours.layer4[0]):
        assert type(block.bn1) is type(block.bn2) is fbt.BatchNorm2dReLU
        assert type(block.bn3) is fbt.FusedBatchNorm2d
        assert type(block.downsample[1]) is fbt.BatchNorm2d
    lr, lo = train(ref, 3, 2, torch.float64), train(ours, 3, 2, torch.float64)
    torch.testing.assert_close(torch.tensor(lo), torch.tensor(lr), rtol=1e-9, atol=0)
    assert_models_agree(ours, ref, rtol=1e-9)


def test_converted_model_copies_and_pickles():
    torch.manual_seed(3)
    m = fbt.convert(torchvision.models.resnet18(num_classes=10)).double().eval()
    x = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)
    want = m(x)
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert other.layer1[0].forward.args[0] is other.layer1[0]
        torch.testing.assert_close(other(x), want, rtol=0, atol=0)


def test_other_batch_norms_are_left_alone():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    fbt.convert(net)
    assert type(net[1]) is torch.nn.BatchNorm2d
