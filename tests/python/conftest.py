"""Shared fixtures of the fusedbn.torch tests.

Every output the package allocates for the library to write (y, dx, daddend,
dweight, dbias) is poisoned with NaN before the call, and saved state and
workspace with 0xA5 bytes, so an element the library leaves unwritten shows
up as a mismatch.  Random data is drawn from a generator seeded with
FUSEDBN_TEST_SEED, else FBN_TEST_SEED (the C tests' variable), else a fresh
seed; the seed is printed in the report header and after a failing test.
"""
import os
import random

import pytest
import torch

import fusedbn.torch  # noqa: F401  (loads the library; fails loudly if it can't)
from fusedbn.torch import _ops

def _seed():
    for name in ("FUSEDBN_TEST_SEED", "FBN_TEST_SEED"):
        if os.environ.get(name):
            return int(os.environ[name], 0)
    return random.SystemRandom().randrange(1 << 31)


SEED = _seed()


def pytest_report_header(config):
    return "FUSEDBN_TEST_SEED=%d (or FBN_TEST_SEED), libfusedbn %s (%s)" % (
        SEED, fusedbn.library_version(), fusedbn.library_path())


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None and call.when == "call":
        print("\nrerun with FUSEDBN_TEST_SEED=%d" % SEED)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    new_output, new_per_channel, new_buffer = (_ops.new_output, _ops.new_per_channel,
                                               _ops.new_buffer)

    def output(like):
        return new_output(like).fill_(float("nan"))

    def per_channel(num_features, dtype, device):
        return new_per_channel(num_features, dtype, device).fill_(float("nan"))

    def buffer(nbytes, device):
        t, ptr = new_buffer(nbytes, device)
        if t is not None:
            t.fill_(0xA5)
        return t, ptr

    monkeypatch.setattr(_ops, "new_output", output)
    monkeypatch.setattr(_ops, "new_per_channel", per_channel)
    monkeypatch.setattr(_ops, "new_buffer", buffer)


@pytest.fixture
def gen(request):
    """A torch.Generator seeded from SEED and the test's name."""
    g = torch.Generator()
    g.manual_seed((SEED * 1000003 + sum(map(ord, request.node.nodeid))) % (1 << 63))
    return g
