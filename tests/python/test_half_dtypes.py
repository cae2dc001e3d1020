"""float16 and bfloat16 CPU tensors through fusedbn.torch.

x, addend, y, dy, dx and daddend in the half dtype, float32 parameters and
running statistics (the library's rule, fbn_check_dtype_pair), on the default
CPU backend and on the float64 reference (FBN_CPU_BACKEND=reference), every
operation, training and eval, both layouts.  The data is rounded to the
dtype first; the answers come from torch in float64 on the widened values
(torch 1.13's CPU batch_norm has no float16 kernel), so every element of a
half output must be within one rounding of the float64 answer (half an ulp,
at most u = 2^-11 / 2^-8 relative) plus the backend's arithmetic: float32 on
the fast backend, float64 on the reference.  The ReLU gate of backward is on
the rounded y: the reference gradient is gated by our y as well.

A module moved with .half() / .bfloat16() given x of its dtype: parameters
and statistics run as float32 copies, gradients reach .grad in the module's
dtype, running statistics are written back rounded (torch's CPU BatchNorm2d
does the same for bfloat16, keeping its statistics in bfloat16; for float16
torch 1.13 has no CPU kernel at all, fusedbn runs it by the same rule).

Bad input: half x with float64 parameters, an addend of another dtype.
"""
import pytest
import torch

import fusedbn
from fusedbn.torch import BatchNorm2d, BatchNorm2dReLU, FusedBatchNorm2d, functional

from helpers import rand, rand_x

SHAPE = (4, 6, 5, 7)
DTYPES = [torch.float16, torch.bfloat16]
ROUNDING = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
# Half the smallest subnormal: the rounding error below the normal range.
SUBNORMAL = {torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134}
# Arithmetic error of the backend relative to a tensor's scale.
COMPUTE = {"default": 1e-5, "reference": 1e-12}
CLASSES = {"bn_add_relu": FusedBatchNorm2d, "bn_relu": BatchNorm2dReLU, "bn": BatchNorm2d}


@pytest.fixture(params=["default", "reference"])
def backend(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setenv("FBN_CPU_BACKEND", "reference")
    else:
        monkeypatch.delenv("FBN_CPU_BACKEND", raising=False)
    return request.param


def assert_within_rounding(got, want, dtype, compute, what, rounded=True):
    """Every element: |got - want| <= u |want| + half the smallest subnormal
    (one rounding to dtype, when rounded) + compute * max|want|; NaN nowhere (outputs are poisoned with
    NaN before each call, so an element left unwritten shows)."""
    got, want = got.double(), want.double()
    assert not torch.isnan(got).any(), "%s: NaN (an element left unwritten?)" % what
    scale = max(float(want.abs().max()), 1e-30)
    u = ROUNDING[dtype] if rounded else 0.0
    bound = u * want.abs() + (SUBNORMAL[dtype] if rounded else 0.0) + compute * scale
    err = (got - want).abs()
    bad = err > bound
    assert not bad.any(), "%s: %d of %d elements beyond one rounding; worst %.3g (bound %.3g)" % (
        what, int(bad.sum()), bad.numel(), float((err - bound).max()), float(bound.max()))


def make_pair(gen, cls, c, param_dtype=torch.float32):
    ours = cls(c)
    with torch.no_grad():
        ours.weight.copy_(rand(gen, c, lo=0.5, hi=1.5))
        ours.bias.copy_(rand(gen, c))
        ours.running_mean.copy_(rand(gen, c))
        ours.running_var.copy_(rand(gen, c, lo=0.5, hi=2.0))
    ours.to(param_dtype)
    ref = torch.nn.BatchNorm2d(c).double()
    ref.load_state_dict(ours.state_dict())  # the same (rounded) values, widened
    return ours, ref


def run_pair(gen, ours, ref, dtype, op, fmt, training):
    ours.train(training)
    ref.train(training)
    ours.zero_grad()
    ref.zero_grad()
    x = rand_x(gen, SHAPE).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    z = rand(gen, SHAPE).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    g = rand(gen, SHAPE).to(dtype)
    xr = x.detach().double().requires_grad_()
    zr = z.detach().double().requires_grad_()
    y = ours(x, z) if op == "bn_add_relu" else ours(x)
    pre = ref(xr) + zr if op == "bn_add_relu" else ref(xr)
    if op == "bn":
        yr = pre
        gr = g.double()
    else:
        yr = torch.relu(pre)
        gr = g.double() * (y.detach().double() > 0)  # the gate on our rounded y
    y.backward(g)
    pre.backward(gr)
    return x, z, y, xr, zr, yr


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("op", sorted(CLASSES))
def test_half_tensors_float32_parameters(gen, backend, dtype, fmt, op):
    c = SHAPE[1]
    ours, ref = make_pair(gen, CLASSES[op], c)
    compute = COMPUTE[backend]
    for step, training in enumerate([True, False]):
        when = "%s %s step %d (%s)" % (backend, op, step, "train" if training else "eval")
        x, z, y, xr, zr, yr = run_pair(gen, ours, ref, dtype, op, fmt, training)
        assert y.dtype == dtype and y.is_contiguous(memory_format=fmt), when
        assert x.grad.dtype == dtype and ours.weight.grad.dtype == torch.float32, when
        assert_within_rounding(y, yr, dtype, compute, when + ", y")
        assert_within_rounding(x.grad, xr.grad, dtype, compute, when + ", dx")
        if op == "bn_add_relu":
            # daddend = the gated dy: a copy of dy's values, exact
            assert torch.equal(z.grad.double(), zr.grad), when + ", daddend"
        for name, got, want in (("dweight", ours.weight.grad, ref.weight.grad),
                                ("dbias", ours.bias.grad, ref.bias.grad),
                                ("running_mean", ours.running_mean, ref.running_mean),
                                ("running_var", ours.running_var, ref.running_var)):
            assert got.dtype == torch.float32, "%s, %s: %s" % (when, name, got.dtype)
            # float32 results: float32's rounding on top of the arithmetic
            assert_within_rounding(got, want, dtype, max(compute, 1e-6),
                                   "%s, %s" % (when, name), rounded=False)
        with torch.no_grad():
            ref.running_mean.copy_(ours.running_mean.double())
            ref.running_var.copy_(ours.running_var.double())


@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_half_x(gen, backend, dtype):
    """functional.batch_norm on half x with float32 running statistics."""
    c = SHAPE[1]
    x = rand_x(gen, SHAPE).to(dtype)
    mean, var = rand(gen, c).float(), rand(gen, c, lo=0.5, hi=2.0).float()
    mean_r, var_r = mean.double(), var.double()
    y = functional.batch_norm(x, mean, var, training=True, momentum=0.1, operation="bn")
    yr = torch.nn.functional.batch_norm(x.double(), mean_r, var_r, training=True, momentum=0.1)
    assert y.dtype == dtype
    assert_within_rounding(y, yr, dtype, COMPUTE[backend], "y")
    assert_within_rounding(mean, mean_r, dtype, 1e-6, "running_mean", rounded=False)
    assert_within_rounding(var, var_r, dtype, 1e-6, "running_var", rounded=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_module_on_half_x(gen, backend, dtype):
    """model.half() / .bfloat16() with x of that dtype: runs, like torch's
    CPU BatchNorm2d does for bfloat16 (float16: torch 1.13 has no CPU
    kernel; fusedbn applies the same rule)."""
    c = SHAPE[1]
    ours, ref = make_pair(gen, FusedBatchNorm2d, c, param_dtype=dtype)
    u = ROUNDING[dtype]
    for step, training in enumerate([True, True, False]):
        when = "%s step %d (%s)" % (backend, step, "train" if training else "eval")
        x, z, y, xr, zr, yr = run_pair(gen, ours, ref, dtype, "bn_add_relu",
                                       torch.contiguous_format, training)
        assert y.dtype == dtype, when
        assert_within_rounding(y, yr, dtype, COMPUTE[backend], when + ", y")
        assert_within_rounding(x.grad, xr.grad, dtype, COMPUTE[backend], when + ", dx")
        for name, got, want in (("dweight", ours.weight.grad, ref.weight.grad),
                                ("dbias", ours.bias.grad, ref.bias.grad),
                                ("running_mean", ours.running_mean, ref.running_mean),
                                ("running_var", ours.running_var, ref.running_var)):
            assert got.dtype == dtype, "%s, %s: %s" % (when, name, got.dtype)
            assert_within_rounding(got, want, dtype, 1e-6, "%s, %s" % (when, name))
        assert int(ours.num_batches_tracked) == min(step + 1, 2), when
        with torch.no_grad():
            ref.running_mean.copy_(ours.running_mean.double())
            ref.running_var.copy_(ours.running_var.double())
    if dtype == torch.bfloat16:
        # torch's own CPU module in bfloat16 agrees to a few roundings
        tm = torch.nn.BatchNorm2d(c).to(dtype)
        tm.load_state_dict(ours.state_dict())
        tm.eval()
        ours.eval()
        x = rand_x(gen, SHAPE).to(dtype)
        with torch.no_grad():
            got, want = ours(x, None), torch.relu(tm(x))
        assert float((got.double() - want.double()).abs().max()) <= 4 * u * float(
            want.double().abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_x_with_float64_parameters_is_refused(gen, dtype):
    """The dtype pair rule: half x takes float32 parameters; nothing changes."""
    m = FusedBatchNorm2d(SHAPE[1]).double()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(fusedbn.InvalidArgumentError) as info:
        m(rand_x(gen, SHAPE).to(dtype), None)
    msg = str(info.value)
    for word in ("FusedBatchNorm2d.forward", "weight dtype torch.float64",
                 "x dtype %s" % dtype, "torch.float32"):
        assert word in msg, (word, msg)
    for k, v in before.items():
        assert torch.equal(m.state_dict()[k], v), k


def test_half_addend_of_another_dtype_is_refused(gen):
    m = FusedBatchNorm2d(SHAPE[1])
    x = rand_x(gen, SHAPE).half()
    with pytest.raises(fusedbn.InvalidArgumentError) as info:
        m(x, rand(gen, SHAPE).to(torch.bfloat16))
    assert "addend dtype torch.bfloat16, x dtype torch.float16" in str(info.value)
