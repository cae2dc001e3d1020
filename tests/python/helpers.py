"""Random test data for the fusedbn.torch tests."""
import torch


def rand(gen, shape, dtype=torch.float64, lo=-1.0, hi=1.0):
    return torch.empty(shape, dtype=torch.float64).uniform_(lo, hi, generator=gen).to(dtype)


def rand_x(gen, shape, dtype=torch.float64):
    """x with a per-channel offset and scale (statistics far from 0 and 1)."""
    c = shape[1]
    offset = rand(gen, (1, c, 1, 1), lo=-2.0, hi=2.0)
    scale = rand(gen, (1, c, 1, 1), lo=0.5, hi=3.0)
    return (rand(gen, shape) * scale + offset).to(dtype)
