"""Bad input: each raises a specific exception whose message names the value
and the rule (the library's own message where the library sees the problem),
and leaves the module's state (parameters, running statistics,
num_batches_tracked) and gradients unchanged."""
import pytest
import torch

import fusedbn
from fusedbn.torch import BatchNorm2d, BatchNorm2dReLU, FusedBatchNorm2d, functional

from helpers import rand, rand_x

SHAPE = (2, 3, 4, 5)


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_unchanged(m, before):
    after = m.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def module(gen, cls=FusedBatchNorm2d, dtype=torch.float64, **kw):
    m = cls(SHAPE[1], **kw).to(dtype)
    with torch.no_grad():
        m.weight.copy_(rand(gen, SHAPE[1]))
        m.running_mean.copy_(rand(gen, SHAPE[1]))
    m(rand_x(gen, SHAPE, dtype), None)  # num_batches_tracked = 1
    return m


def expect(m, exc, words, *args):
    """m(*args) raises exc with all words in its message; state unchanged."""
    before = snapshot(m)
    with pytest.raises(exc) as info:
        m(*args)
    msg = str(info.value)
    for w in words:
        assert w in msg, "%r not in %r" % (w, msg)
    assert_unchanged(m, before)
    return info.value


@pytest.mark.parametrize("training", [True, False])
def test_not_4d(gen, training):
    m = module(gen).train(training)
    e = expect(m, fusedbn.InvalidArgumentError, ["FusedBatchNorm2d.forward", "3 dimensions",
                                                 "4-D"], rand(gen, (2, 3, 4)))
    assert isinstance(e, ValueError) and e.status_name == "FBN_STATUS_INVALID_SHAPE"


@pytest.mark.parametrize("training", [True, False])
def test_wrong_channel_count_carries_library_message(gen, training):
    m = module(gen).train(training)
    e = expect(m, fusedbn.InvalidArgumentError, ["fbn_op_", "C = 4", "num_features = 3"],
               rand_x(gen, (2, 4, 4, 5)))
    assert e.status_name == "FBN_STATUS_SHAPE_MISMATCH"
    # The library's text (from a size query the user did not call) after
    # the name of what the user called.
    assert e.message.startswith("fusedbn.torch.FusedBatchNorm2d.forward: fbn_op_"), e.message


def test_library_message_names_the_functional_call(gen):
    with pytest.raises(fusedbn.InvalidArgumentError) as info:
        functional.batch_norm(rand_x(gen, SHAPE), None, None, training=True,
                              operation="bn", addend=rand(gen, SHAPE))
    assert info.value.message.startswith(
        "fusedbn.torch.functional.batch_norm: fbn_op_forward: "), info.value.message


@pytest.mark.parametrize("x", [[[1.0]], 3.0, None])
def test_x_not_a_tensor(gen, x):
    m = module(gen)
    e = expect(m, fusedbn.InvalidArgumentError, ["FusedBatchNorm2d.forward", "x is a %s"
                                                 % type(x).__name__, "torch.Tensor"], x)
    assert e.status_name == "FBN_STATUS_INVALID_VALUE"
    with pytest.raises(fusedbn.InvalidArgumentError,
                       match="functional.batch_norm: x is a %s" % type(x).__name__):
        functional.batch_norm(x, None, None, training=True)


def test_integer_dtype(gen):
    m = module(gen)
    expect(m, fusedbn.InvalidArgumentError, ["torch.int64", "floating point"],
           torch.ones(SHAPE, dtype=torch.int64))


def test_parameters_of_another_dtype(gen):
    m = module(gen, dtype=torch.float32)
    expect(m, fusedbn.InvalidArgumentError, ["weight dtype torch.float32", "torch.float64"],
           rand_x(gen, SHAPE))


@pytest.mark.parametrize("bad,words", [
    (lambda g: rand(g, (2, 3, 4, 6)), ["addend of shape (2, 3, 4, 6)", "x's shape"]),
    (lambda g: rand(g, SHAPE, torch.float32), ["addend dtype torch.float32", "x's dtype"]),
    (lambda g: torch.empty(SHAPE, dtype=torch.float64, device="meta"), ["addend on meta",
                                                                        "x's device"]),
    (lambda g: 1.0, ["addend is a float"]),
])
def test_bad_addend(gen, bad, words):
    m = module(gen)
    expect(m, fusedbn.InvalidArgumentError, words, rand_x(gen, SHAPE), bad(gen))


@pytest.mark.parametrize("cls", [BatchNorm2d, BatchNorm2dReLU])
def test_addend_to_operation_without_one_carries_library_message(gen, cls):
    m = module(gen, cls)
    e = expect(m, fusedbn.InvalidArgumentError, ["fbn_op_forward", "addend"],
               rand_x(gen, SHAPE), rand(gen, SHAPE))
    assert e.status_name == "FBN_STATUS_INVALID_VALUE"


def test_x_on_another_device(gen):
    m = module(gen)
    expect(m, fusedbn.UnsupportedError, ["meta"],
           torch.empty(SHAPE, dtype=torch.float64, device="meta"))


def test_one_value_per_channel_in_training_carries_library_message(gen):
    m = module(gen)
    e = expect(m, fusedbn.InvalidArgumentError, ["fbn_op_"], rand_x(gen, (1, 3, 1, 1)))
    assert e.status_name == "FBN_STATUS_INVALID_SHAPE"


def test_momentum_out_of_range_carries_library_message(gen):
    m = module(gen)
    m.momentum = 1.5
    e = expect(m, fusedbn.InvalidArgumentError, ["fbn_running_average_factor", "1.5"],
               rand_x(gen, SHAPE))
    assert e.status_name == "FBN_STATUS_INVALID_VALUE"


def test_negative_eps_carries_library_message(gen):
    m = module(gen)
    m.eps = -1.0
    e = expect(m, fusedbn.InvalidArgumentError, ["fbn_op_create", "eps"], rand_x(gen, SHAPE))
    assert e.status_name == "FBN_STATUS_INVALID_VALUE"


def test_running_stats_of_wrong_length(gen):
    m = module(gen)
    m.running_mean = rand(gen, 4)
    expect(m, fusedbn.InvalidArgumentError, ["running_mean of shape (4,)", "num_features = 3"],
           rand_x(gen, SHAPE))


def test_failed_forward_leaves_gradients_alone(gen):
    m = module(gen)
    x = rand_x(gen, SHAPE).requires_grad_()
    (m(x, None) * rand(gen, SHAPE)).sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    with pytest.raises(fusedbn.InvalidArgumentError):
        m(rand_x(gen, (2, 4, 4, 5)).requires_grad_())
    for p, g in zip(m.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_functional_unknown_operation():
    with pytest.raises(fusedbn.InvalidArgumentError, match="operation 'relu'"):
        functional.batch_norm(torch.ones(SHAPE, dtype=torch.float64), None, None,
                              training=True, operation="relu")


def test_functional_eval_without_running_stats_carries_library_message(gen):
    with pytest.raises(fusedbn.InvalidArgumentError, match="fbn_op_forward"):
        functional.batch_norm(rand_x(gen, SHAPE), None, None, training=False)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_functional_one_running_statistic_carries_library_message(gen, training, given):
    """Training updates both running statistics or neither, eval normalizes
    with both: one alone is refused by fbn_op_forward and stays as it was."""
    stat = rand(gen, SHAPE[1], lo=0.5, hi=1.5)
    before = stat.clone()
    x = rand_x(gen, SHAPE)
    x_before = x.clone()
    stats = (stat, None) if given == "running_mean" else (None, stat)
    with pytest.raises(fusedbn.InvalidArgumentError) as info:
        functional.batch_norm(x, *stats, weight=rand(gen, SHAPE[1]), bias=rand(gen, SHAPE[1]),
                              training=training)
    e = info.value
    assert e.message.startswith("fusedbn.torch.functional.batch_norm: fbn_op_forward: "), e.message
    missing = "running_var" if given == "running_mean" else "running_mean"
    if training:
        assert e.status_name == "FBN_STATUS_INVALID_VALUE" and "give both" in e.message
    else:
        assert e.status_name == "FBN_STATUS_NULL_POINTER" and missing + " is NULL" in e.message
    assert torch.equal(stat, before) and torch.equal(x, x_before)


def test_functional_addend_on_another_device(gen):
    mean, var = rand(gen, SHAPE[1]), rand(gen, SHAPE[1], lo=0.5, hi=1.5)
    before = (mean.clone(), var.clone())
    with pytest.raises(fusedbn.InvalidArgumentError, match="addend on meta, x on cpu: addend "
                       "must be on x's device"):
        functional.batch_norm(rand_x(gen, SHAPE), mean, var, training=True,
                              addend=torch.empty(SHAPE, dtype=torch.float64, device="meta"))
    assert torch.equal(mean, before[0]) and torch.equal(var, before[1])
