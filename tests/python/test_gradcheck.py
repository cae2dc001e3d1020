"""torch.autograd.gradcheck of fusedbn's backward (float64): batch statistics
(training) and running statistics (eval), with and without addend, every
operation, both layouts, affine or not."""
import itertools

import pytest
import torch

from fusedbn.torch import functional

from helpers import rand, rand_x

SHAPE = (2, 3, 3, 4)
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.mark.parametrize("operation,training,affine,layout", list(itertools.product(
    ["bn_add_relu+addend", "bn_add_relu", "bn_relu", "bn"], [True, False], [True, False],
    FORMATS)))
def test_gradcheck(gen, operation, training, affine, layout):
    fmt = FORMATS[layout]
    with_addend = operation.endswith("+addend")
    op = operation.split("+")[0]
    c = SHAPE[1]
    x = rand_x(gen, SHAPE).contiguous(memory_format=fmt).requires_grad_()
    z = rand(gen, SHAPE).contiguous(memory_format=fmt).requires_grad_() if with_addend else None
    w = rand(gen, c, lo=0.5, hi=1.5).requires_grad_() if affine else None
    b = rand(gen, c).requires_grad_() if affine else None
    # Eval normalizes with (constant) running statistics; training uses the
    # batch's and updates none (None, None) so repeated calls are identical.
    rm = None if training else rand(gen, c)
    rv = None if training else rand(gen, c, lo=0.5, hi=2.0)

    def f(x, z, w, b):
        return functional.batch_norm(x, rm, rv, w, b, training=training, eps=1e-5, addend=z,
                                     operation=op)

    inputs = (x, z, w, b)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
