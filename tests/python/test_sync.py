"""fusedbn.torch's synchronized modules through torch.distributed (gloo) with
2 and 3 processes, against one process running the unsynchronized module on
the concatenated batch.

Each world size is one launch: its ranks (spawned processes, a gloo group
from a file:// store in a temporary directory, a 20 s collective timeout)
run sections in order and write one result file per rank and section ("ok"
or the traceback); the tests below read them.  A launch that does not end
within its deadline is killed and fails every test that needs it.  In the
ranks, outputs are poisoned (NaN, 0xA5 bytes) as in conftest.py, and every
rank generates the whole batch from the same seed and takes its shard, so
each can run the reference (the plain module on the whole batch) itself.

Tolerances: float64 1e-12 relative to max(1, |expected|); float32 2e-5 (the
sync statistics are two float64 passes, the plain fast backend's shifted
sums: different float64 orders, y and dx rounded to float32 once each).
"""
import datetime
import multiprocessing
import os
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist

import fusedbn
import fusedbn.torch as fbt
from fusedbn.torch import _ops
from conftest import SEED

import helpers

COLLECTIVE_TIMEOUT_S = 20
LAUNCH_DEADLINE_S = 240

# (world size, shards of the case sweep): unequal shards, N = 1 and N = 0.
SHARDS = {2: (1, 5), 3: (1, 5, 0)}
SECTIONS = {2: ("cases", "eval", "errors", "ddp", "resnet18", "peer_exit"),
            3: ("cases", "eval", "errors")}


# ---- the ranks -----------------------------------------------------------------

def _poison_outputs():
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

    _ops.new_output, _ops.new_per_channel, _ops.new_buffer = output, per_channel, buffer


def _tol(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-5


def _close(name, got, want, tol):
    assert got.shape == want.shape, "%s: shape %s, expected %s" % (name, got.shape, want.shape)
    if got.numel() == 0:
        return
    got, want = got.double(), want.double()
    assert not torch.isnan(got).any(), "%s: NaN (an element left unwritten)" % name
    err = ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()
    assert err <= tol, "%s: relative error %.3g > %.3g" % (name, err, tol)


def _summed(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


_PLAIN = {"bn_add_relu": fbt.FusedBatchNorm2d, "bn_relu": fbt.BatchNorm2dReLU,
          "bn": fbt.BatchNorm2d}
_SYNC = {"bn_add_relu": fbt.SyncFusedBatchNorm2d, "bn_relu": fbt.SyncBatchNorm2dReLU,
         "bn": fbt.SyncBatchNorm2d}


def _module_pair(kind, c, dtype, momentum, gen, **kw):
    ref = _PLAIN[kind](c, momentum=momentum, **kw).to(dtype)
    ours = _SYNC[kind](c, momentum=momentum, **kw).to(dtype)
    with torch.no_grad():
        if ref.affine:
            ref.weight.copy_(helpers.rand(gen, (c,), lo=0.5, hi=1.5))
            ref.bias.copy_(helpers.rand(gen, (c,)))
        if ref.track_running_stats:
            ref.running_mean.copy_(helpers.rand(gen, (c,)))
            ref.running_var.copy_(helpers.rand(gen, (c,), lo=0.5, hi=2.0))
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _off_the_gate(ref, x, z, fmt):
    """z moved by 0.01 where the float64 pre-activation BN(x) + z is within
    1e-4 of 0, so that float32 roundings cannot flip a ReLU gate between the
    two sides (a flipped gate changes a whole channel's dx by ~dy/N)."""
    x64 = x.double()
    mean = x64.mean(dim=(0, 2, 3), keepdim=True)
    var = x64.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    v = (x64 - mean) / torch.sqrt(var + ref.eps)
    if ref.affine:
        v = v * ref.weight.detach().double().view(1, -1, 1, 1) + \
            ref.bias.detach().double().view(1, -1, 1, 1)
    v = v + z.double()
    return torch.where(v.abs() < 1e-4, z + 0.01, z).contiguous(memory_format=fmt)


def _step(ours, ref, kind, shard, lo, gen, shape, dtype, fmt, step):
    """One training step of ours on the shard and ref on the whole batch;
    every output of the shard compared."""
    tol = _tol(dtype)
    n_total = shape[0]
    x = helpers.rand_x(gen, shape, dtype).contiguous(memory_format=fmt)
    z = helpers.rand(gen, shape, dtype).contiguous(memory_format=fmt)
    dy = helpers.rand(gen, shape, dtype).contiguous(memory_format=fmt)
    if dtype == torch.float32 and kind == "bn_add_relu":
        z = _off_the_gate(ref, x, z, fmt)
    hi = lo + shard
    xs = x[lo:hi].clone().requires_grad_()
    xr = x.clone().requires_grad_()
    zs = z[lo:hi].clone().requires_grad_() if kind == "bn_add_relu" else None
    zr = z.clone().requires_grad_() if kind == "bn_add_relu" else None
    args_s = (xs,) if zs is None else (xs, zs)
    args_r = (xr,) if zr is None else (xr, zr)
    ys, yr = ours(*args_s), ref(*args_r)
    ys.backward(dy[lo:hi])
    yr.backward(dy)
    what = "%s %s %s N=%d of %d step %d" % (kind, dtype, fmt, shard, n_total, step)
    _close(what + " y", ys, yr[lo:hi], tol)
    _close(what + " dx", xs.grad, xr.grad[lo:hi], tol)
    if zs is not None:
        _close(what + " daddend", zs.grad, zr.grad[lo:hi], tol)
    if ref.affine:
        _close(what + " dweight summed", _summed(ours.weight.grad), ref.weight.grad, tol)
        _close(what + " dbias summed", _summed(ours.bias.grad), ref.bias.grad, tol)
        for p in (ours.weight, ours.bias, ref.weight, ref.bias):
            p.grad = None
    if ref.track_running_stats:
        _close(what + " running_mean", ours.running_mean, ref.running_mean, tol)
        _close(what + " running_var", ours.running_var, ref.running_var, tol)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked), what


def _section_cases(rank, world_size, gen):
    shards = SHARDS[world_size]
    lo = sum(shards[:rank])
    count = 0
    for dtype in (torch.float64, torch.float32):
        for fmt in (torch.contiguous_format, torch.channels_last):
            for kind in ("bn_add_relu", "bn_relu", "bn"):
                for momentum in (0.1, None):
                    c = 3
                    ours, ref = _module_pair(kind, c, dtype, momentum, gen)
                    for step in range(3):
                        h, w = 3 + step, 4
                        _step(ours, ref, kind, shards[rank], lo, gen, (sum(shards), c, h, w),
                              dtype, fmt, step)
                    count += 1
    # affine=False, track_running_stats=False
    ours, ref = _module_pair("bn_add_relu", 2, torch.float64, 0.1, gen, affine=False,
                             track_running_stats=False)
    _step(ours, ref, "bn_add_relu", shards[rank], lo, gen, (sum(shards), 2, 3, 3),
          torch.float64, torch.contiguous_format, 0)
    # larger shards: the fast backend's vectorized loops and threads
    big = tuple(4 * s + 1 for s in shards)
    ours, ref = _module_pair("bn_add_relu", 24, torch.float32, 0.1, gen)
    for step in range(2):
        _step(ours, ref, "bn_add_relu", big[rank], sum(big[:rank]), gen, (sum(big), 24, 9, 11),
              torch.float32, torch.channels_last if step else torch.contiguous_format, step)
    return "%d cases x 3 steps, shards %s" % (count, shards)


class _NoCollective:
    """torch.distributed's collectives replaced by ones that raise."""

    def __enter__(self):
        self.saved = dist.all_gather, dist.all_reduce

        def fail(*a, **k):
            raise AssertionError("a collective was called")
        dist.all_gather = dist.all_reduce = fail

    def __exit__(self, *exc):
        dist.all_gather, dist.all_reduce = self.saved


def _section_eval(rank, world_size, gen):
    """Eval mode: the running statistics, no collective."""
    ours, ref = _module_pair("bn_add_relu", 3, torch.float64, 0.1, gen)
    x = helpers.rand_x(gen, (2 + rank, 3, 4, 4))
    z = helpers.rand(gen, x.shape)
    ours.eval()
    ref.eval()
    with _NoCollective():
        y = ours(x, z)
    _close("eval y", y, ref(x, z), 1e-12)
    return "eval without collectives"


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_state(m, before, what):
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), "%s: %s changed" % (what, k)


def _expect_error(what, cls, status, words, call, m):
    """call() raises cls with status and every one of words in the message
    (on this rank), m's state unchanged."""
    before = _state(m)
    try:
        call()
    except cls as e:
        if status is not None:
            assert getattr(e, "status", None) == status, "%s: status %r: %s" % (
                what, getattr(e, "status", None), e)
        for word in words:
            assert word in str(e), "%s: %r not in %s" % (what, word, e)
    else:
        raise AssertionError("%s: no exception" % what)
    _assert_state(m, before, what)


def _section_errors(rank, world_size, gen):
    w = world_size
    last = w - 1
    fwd = "fusedbn.torch.SyncFusedBatchNorm2d.forward"

    # C disagreeing across ranks (the last rank has 4 channels)
    c = 4 if rank == last else 3
    m = fbt.SyncFusedBatchNorm2d(c).double()
    x = helpers.rand_x(gen, (2, c, 3, 3))
    _expect_error("C", fusedbn.InvalidArgumentError, 4, [fwd, "rank %d has C = 4" % last],
                  lambda: m(x), m)

    # dtype disagreeing
    dtype = torch.float32 if rank == last else torch.float64
    m = fbt.SyncFusedBatchNorm2d(3).to(dtype)
    x = helpers.rand_x(gen, (2, 3, 3, 3), dtype)
    _expect_error("dtype", fusedbn.InvalidArgumentError, 4, [fwd, "dtype"], lambda: m(x), m)

    # eps disagreeing: the records' check headers, compared by the library
    m = fbt.SyncFusedBatchNorm2d(3, eps=1e-3 if rank == last else 1e-5).double()
    x = helpers.rand_x(gen, (2, 3, 3, 3))
    _expect_error("eps", fusedbn.InvalidArgumentError, 2, [fwd, "eps"], lambda: m(x), m)

    # a bad argument on one rank (addend of another shape): its own error
    # there, the rank named everywhere else
    m = fbt.SyncFusedBatchNorm2d(3).double()
    x = helpers.rand_x(gen, (2, 3, 3, 3))
    z = helpers.rand(gen, (2, 3, 3, 4) if rank == last else x.shape)
    words = [fwd, "addend"] + ([] if rank == last else ["rank %d of %d" % (last, w)])
    _expect_error("local argument", fusedbn.InvalidArgumentError, 4, words, lambda: m(x, z), m)

    # total count of 1 over the ranks (the others have empty shards)
    x = helpers.rand_x(gen, (1 if rank == 0 else 0, 3, 1, 1))
    _expect_error("count 1", fusedbn.InvalidArgumentError, 3, [fwd], lambda: m(x), m)

    # a failing collective on every rank: its text reaches the caller
    saved = dist.all_gather

    def broken_all_gather(*a, **k):
        raise RuntimeError("injected all_gather failure on rank %d" % rank)
    dist.all_gather = broken_all_gather
    try:
        x = helpers.rand_x(gen, (2, 3, 3, 3))
        _expect_error("all_gather", fusedbn.Error, 12,
                      [fwd, "injected all_gather failure on rank %d" % rank], lambda: m(x), m)
    finally:
        dist.all_gather = saved

    # a failing all_reduce in backward: raised from backward on every rank
    x = helpers.rand_x(gen, (2, 3, 3, 3)).requires_grad_()
    y = m(x)
    saved = dist.all_reduce

    def broken_all_reduce(*a, **k):
        raise RuntimeError("injected all_reduce failure on rank %d" % rank)
    dist.all_reduce = broken_all_reduce
    try:
        _expect_error("all_reduce", fusedbn.Error, 12,
                      ["backward", "injected all_reduce failure on rank %d" % rank],
                      lambda: y.sum().backward(), m)
        assert x.grad is None and m.weight.grad is None
    finally:
        dist.all_reduce = saved

    # the group still works afterwards (no rank left behind in a collective);
    # the ranks drew different data above: a generator in step again
    gen = torch.Generator()
    gen.manual_seed(_rank_seed + 1)
    shards = (1,) + (2,) * (w - 1)
    ours, ref = _module_pair("bn_add_relu", 3, torch.float64, 0.1, gen)
    _step(ours, ref, "bn_add_relu", shards[rank], sum(shards[:rank]), gen,
          (sum(shards), 3, 3, 3), torch.float64, torch.contiguous_format, 0)

    if torch.cuda.is_available():
        m = fbt.SyncFusedBatchNorm2d(3).cuda()
        x = helpers.rand_x(gen, (2, 3, 3, 3), torch.float32).cuda()
        _expect_error("cuda", fusedbn.UnsupportedError, 5, [fwd, "CPU tensors"], lambda: m(x), m)
        return "errors raised on every rank; CUDA tensors raise UnsupportedError"
    return "errors raised on every rank; no CUDA device: the CUDA check not run"


def _section_resnet18(rank, world_size, gen):
    """A converted torchvision ResNet-18, float64, 5 SGD steps on shards
    (1, 3) of 3x40x40 images against one process with the whole batch
    (torchvision's model, torch's batch norms); parameter gradients summed
    across the ranks by hand (each rank's loss is the sum over its shard /
    the whole batch).  40x40 as in test_convert.py: layer4 normalizes 16
    values per channel (at 32x32, 4: rounding differences grow chaotically)."""
    import torchvision
    shards = (1, 3)
    n = sum(shards)
    lo, hi = sum(shards[:rank]), sum(shards[:rank + 1])
    torch.manual_seed(_rank_seed)
    ref = torchvision.models.resnet18(num_classes=10).double()
    ours = torchvision.models.resnet18(num_classes=10).double()
    ours.load_state_dict(ref.state_dict())
    ours = fbt.convert(ours, sync=True)
    assert type(ours.layer1[0].bn2) is fbt.SyncFusedBatchNorm2d
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    opt = torch.optim.SGD(ours.parameters(), lr=0.01, momentum=0.9)
    size = 40
    for _ in range(5):
        x = torch.randn(n, 3, size, size, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, 10, (n,), generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ours(x[lo:hi]), labels[lo:hi],
                                                 reduction="sum") / n
        loss.backward()
        for p in ours.parameters():
            dist.all_reduce(p.grad)
        opt.step()
        if rank == 0:
            opt_ref.zero_grad()
            torch.nn.functional.cross_entropy(ref(x), labels).backward()
            opt_ref.step()
    sa = ours.state_dict()
    flat = torch.cat([v.double().flatten() for v in sa.values()])
    everyone = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(everyone, flat)
    for r, other in enumerate(everyone):
        assert torch.equal(other, flat), "rank %d's model differs from rank %d's" % (r, rank)
    if rank != 0:
        return "same model as rank 0"
    sb = ref.state_dict()
    assert list(sa.keys()) == list(sb.keys())
    worst = 0.0
    for k in sa:
        if sa[k].dtype == torch.int64:
            assert torch.equal(sa[k], sb[k]), k
            continue
        scale = max(sb[k].abs().max().item(), 1e-300)
        err = ((sa[k] - sb[k]).abs().max().item()) / scale
        worst = max(worst, err)
        assert err <= 1e-9, "%s: error %.3g of the tensor's largest magnitude" % (k, err)
    return "after 5 steps: largest error %.2g of a tensor's largest magnitude" % worst


def _section_ddp(rank, world_size, gen):
    """DistributedDataParallel over a conv and a SyncFusedBatchNorm2d, float64,
    shards (1, 3): DDP's averaged gradients (each rank's loss scaled by W) are
    the whole batch's, as the local dweight/dbias summed are; 2 SGD steps."""
    shards = (1, 3)
    n = sum(shards)
    lo, hi = sum(shards[:rank]), sum(shards[:rank + 1])
    torch.manual_seed(_rank_seed)
    conv = torch.nn.Conv2d(3, 4, 3).double()
    ref = torch.nn.Sequential(conv, fbt.FusedBatchNorm2d(4).double())
    ours = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3).double(),
                               fbt.SyncFusedBatchNorm2d(4).double())
    ours.load_state_dict(ref.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(ours)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(2):
        x = helpers.rand_x(gen, (n, 3, 6, 5))
        dy = helpers.rand(gen, (n, 4, 4, 3))
        opt.zero_grad()
        (ddp(x[lo:hi]) * dy[lo:hi]).sum().mul(world_size / n).backward()
        opt_ref.zero_grad()
        (ref(x) * dy).sum().div(n).backward()
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            _close("ddp step %d %s grad" % (step, name), p.grad, q.grad, 1e-12)
        opt.step()
        opt_ref.step()
    for k, v in ours.state_dict().items():
        _close("ddp " + k, v.double(), ref.state_dict()[k].double(), 1e-12)
    return "DDP gradients and state match the whole batch"


def _section_peer_exit(rank, world_size, gen):
    """The last rank exits: the others' next forward raises with gloo's text."""
    if rank == world_size - 1:
        return "exits"
    m = fbt.SyncFusedBatchNorm2d(3).double()
    x = helpers.rand_x(gen, (2, 3, 3, 3))
    time.sleep(0.5)
    _expect_error("peer exit", fusedbn.Error, 12, ["over the process group", "failed"],
                  lambda: m(x), m)
    return "a dead peer raised"


_SECTIONS = {"cases": _section_cases, "eval": _section_eval, "errors": _section_errors,
             "ddp": _section_ddp, "resnet18": _section_resnet18,
             "peer_exit": _section_peer_exit}


# The launch's seed in a rank (conftest.SEED is drawn afresh in each process
# unless FUSEDBN_TEST_SEED is set).
_rank_seed = None


def _rank_main(rank, world_size, init_file, out_dir, seed, sections):
    global _rank_seed
    _rank_seed = seed % (1 << 31)
    torch.set_num_threads(1)
    _poison_outputs()
    def write(section, text):
        with open(os.path.join(out_dir, "%s.%d" % (section, rank)), "w") as f:
            f.write(text)
    try:
        dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    except Exception:  # noqa: BLE001
        write("init", traceback.format_exc())
        return
    write("init", "ok")
    for section in sections:
        gen = torch.Generator()
        gen.manual_seed((seed * 1000003 + sum(map(ord, section))) % (1 << 63))
        start = time.monotonic()
        try:
            text = _SECTIONS[section](rank, world_size, gen)
            write(section, "ok %s (%.1f s)" % (text, time.monotonic() - start))
        except Exception:  # noqa: BLE001
            write(section, traceback.format_exc())
            return
        if section == "peer_exit" and rank == world_size - 1:
            os._exit(0)


# ---- the launches --------------------------------------------------------------

_launches = {}


def _launch(world_size):
    """{section: [rank's result text or None]} of one launch of world_size ranks."""
    if world_size in _launches:
        return _launches[world_size]
    out_dir = tempfile.mkdtemp(prefix="fusedbn-sync-")
    ctx = multiprocessing.get_context("spawn")
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        procs = [ctx.Process(target=_rank_main, args=(r, world_size,
                                                      os.path.join(out_dir, "store"), out_dir,
                                                      SEED, SECTIONS[world_size]))
                 for r in range(world_size)]
        for p in procs:
            p.start()
    finally:
        if env_before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
    deadline = time.monotonic() + LAUNCH_DEADLINE_S
    hung = False
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            hung = True
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = {}
    for section in ("init",) + SECTIONS[world_size]:
        texts = []
        for r in range(world_size):
            path = os.path.join(out_dir, "%s.%d" % (section, r))
            texts.append(open(path).read() if os.path.exists(path) else None)
        results[section] = texts
    results["hung"] = hung
    results["exitcodes"] = [p.exitcode for p in procs]
    _launches[world_size] = results
    return results


def _check(world_size, section):
    res = _launch(world_size)
    texts = res[section]
    problems = []
    for r, text in enumerate(texts):
        if text is None:
            problems.append("rank %d: no result%s (init: %s)" % (
                r, " (the launch passed its %d s deadline and was killed)" % LAUNCH_DEADLINE_S
                if res["hung"] else "", (res["init"][r] or "none")[:2000]))
        elif not text.startswith("ok"):
            problems.append("rank %d:\n%s" % (r, text))
    assert not problems, "\n".join(problems)
    assert not res["hung"], "the launch hung"
    print("\n".join("rank %d: %s" % (r, t) for r, t in enumerate(texts)))


@pytest.mark.parametrize("world_size", [2, 3])
def test_unequal_shards_match_single_process(world_size):
    """y, dx, daddend of each shard, summed dweight/dbias, running statistics
    and num_batches_tracked: both dtypes and layouts, the three modules,
    momentum and cumulative average, 3 steps."""
    _check(world_size, "cases")


@pytest.mark.parametrize("world_size", [2, 3])
def test_eval_runs_no_collective(world_size):
    _check(world_size, "eval")


@pytest.mark.parametrize("world_size", [2, 3])
def test_errors_raise_on_every_rank(world_size):
    """Disagreeing C, dtype, eps; a bad argument on one rank; a total count
    of 1 (empty shards); failing all_gather and all_reduce: an exception on
    every rank, state unchanged, the group usable afterwards."""
    _check(world_size, "errors")


def test_cuda_tensors_unsupported():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: CUDA tensors' UnsupportedError not checked")
    _check(2, "errors")


def test_distributed_data_parallel():
    _check(2, "ddp")


def test_converted_resnet18_on_two_ranks_matches_one_process():
    _check(2, "resnet18")


def test_dead_peer_raises():
    res = _launch(2)
    _check(2, "peer_exit")
    assert res["exitcodes"][1] == 0


# ---- in one process ------------------------------------------------------------

def test_training_forward_needs_a_process_group(gen):
    m = fbt.SyncFusedBatchNorm2d(3).double()
    x = helpers.rand_x(gen, (4, 3, 2, 2))
    before = _state(m)
    with pytest.raises(fusedbn.Error) as e:
        m(x)
    assert e.value.status == 6 and "torch.distributed is not initialized" in str(e.value)
    _assert_state(m, before, "no group")
    m.eval()
    ref = fbt.FusedBatchNorm2d(3).double().eval()
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)


def test_constructor_and_state_dict_names():
    m = fbt.SyncFusedBatchNorm2d(5, eps=1e-3, momentum=None, process_group="g")
    ref = fbt.FusedBatchNorm2d(5, eps=1e-3, momentum=None)
    assert list(m.state_dict().keys()) == list(ref.state_dict().keys())
    assert (m.eps, m.momentum, m.process_group) == (1e-3, None, "g")
    assert isinstance(m, fbt.FusedBatchNorm2d)


def test_convert_sync_keeps_names_and_values():
    import torchvision
    ref = torchvision.models.resnet18(num_classes=10)
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(ref.state_dict())
    weight = model.layer1[0].bn2.weight
    model = fbt.convert(model, sync=True, process_group="g")
    b = model.layer1[0]
    assert type(model.bn1) is fbt.SyncBatchNorm2dReLU and type(model.relu) is torch.nn.Identity
    assert type(b.bn1) is fbt.SyncBatchNorm2dReLU and type(b.bn2) is fbt.SyncFusedBatchNorm2d
    assert type(model.layer2[0].downsample[1]) is fbt.SyncBatchNorm2d
    assert model.layer1[0].bn2.weight is weight and b.bn2.process_group == "g"
    sa, sb = model.state_dict(), ref.state_dict()
    assert list(sa.keys()) == list(sb.keys())
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # an earlier convert(): its fusedbn modules become synchronized ones
    again = fbt.convert(fbt.convert(torchvision.models.resnet18()), sync=True)
    assert type(again.layer1[0].bn2) is fbt.SyncFusedBatchNorm2d
    assert type(again.layer1[0].bn1) is fbt.SyncBatchNorm2dReLU
    assert not any(type(m) in (fbt.FusedBatchNorm2d, fbt.BatchNorm2dReLU, fbt.BatchNorm2d,
                               torch.nn.BatchNorm2d) for m in again.modules())
    # batch norms outside ResNet blocks, and a model that is one
    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    seq = fbt.convert(seq, sync=True)
    assert type(seq[1]) is fbt.SyncBatchNorm2d
    lone = fbt.convert(torch.nn.BatchNorm2d(4).eval(), sync=True)
    assert type(lone) is fbt.SyncBatchNorm2d and not lone.training
