#!/usr/bin/env python3
"""Whether torch.nn.SyncBatchNorm runs on the CPU here (scripts/sync-bench).

Starts WORLD processes (default 2) in a gloo process group on this host,
and on each runs one training step (forward + backward) of
torch.nn.SyncBatchNorm on a CPU tensor of its shard, then the kernel the
synchronized path is built on (torch.batch_norm_stats). Prints one line per
attempt on stdout:

    torch <version>: SyncBatchNorm ... ran in <ms> ms
    torch <version>: SyncBatchNorm ... cannot run: <Error>: <first line of its text>

and exits 0 either way (1 when torch or torch.distributed is missing, with
the reason). The timing of a step that runs would be a single call, for the
record only: the C benchmark's method (barriers, medians) is not repeated.
"""
import argparse
import os
import sys
import time


def step(rank, world, port, shape, queue):
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    n, c, h, w = shape
    x = torch.randn(n // world, c, h, w, requires_grad=True)
    lines = []
    bn = torch.nn.SyncBatchNorm(c)
    what = "torch.nn.SyncBatchNorm(%d) on a CPU shard (%d,%d,%d,%d), %d gloo ranks" % (
        c, n // world, c, h, w, world)
    try:
        t0 = time.perf_counter()
        bn(x).sum().backward()
        lines.append("%s: ran in %.2f ms" % (what, 1e3 * (time.perf_counter() - t0)))
    except Exception as e:  # what the user would see
        lines.append("%s: cannot run: %s: %s" % (what, type(e).__name__, str(e).splitlines()[0]))
    try:
        torch.batch_norm_stats(x.detach(), 1e-5)
        lines.append("torch.batch_norm_stats on the CPU: runs")
    except Exception as e:
        lines.append("torch.batch_norm_stats (the statistics kernel of its synchronized path) "
                     "on the CPU: %s: %s" % (type(e).__name__, str(e).splitlines()[0][:160]))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        queue.put(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--port", type=int, default=29517)
    ap.add_argument("--shape", default="32,64,56,56", help="the whole batch: N,C,H,W")
    args = ap.parse_args()
    try:
        import torch
        import torch.distributed as dist
        import torch.multiprocessing as mp
    except ImportError as e:
        print("torch not importable: %s" % e)
        return 1
    if not dist.is_available() or not dist.is_gloo_available():
        print("torch %s: torch.distributed with gloo not available" % torch.__version__)
        return 1
    shape = tuple(int(v) for v in args.shape.split(","))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=step, args=(r, args.world, args.port, shape, queue))
             for r in range(args.world)]
    for p in procs:
        p.start()
    lines = queue.get(timeout=300)
    for p in procs:
        p.join()
    for line in lines:
        print("torch %s: %s" % (torch.__version__, line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
