#!/usr/bin/python3
"""PyTorch CPU peer of fbn-peers-bench: the same shapes, passes and CSV.

    y = torch.nn.BatchNorm2d(C)(x) (training), then y.add_(z), y.relu_()
    eval:      the same module in eval mode (running statistics)
    backward:  autograd of that forward: dx, daddend, dweight, dbias

NHWC is torch.channels_last. --dtype float16|bfloat16: x, z and dy in that type,
the module's parameters and running statistics float32 (PyTorch's mixed-type CPU
batch norm, as fusedbn's float32 parameters), or, where that path is missing, the
module converted to the dtype (said in a "# pytorch params" line). A version
whose CPU batch norm refuses the dtype altogether (torch 1.13's float16) gets a
"# pytorch-unsupported" line per shape and layout instead of rows. Threads are set
explicitly (torch defaults to
half the cores here). PyTorch allocates its outputs on every call and has no
CPU caching allocator; run this script with

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736

so that freed tensors stay in the heap and are reused instead of being
unmapped and faulted in again (~7 us per 4 KiB page on these machines); the
minor page faults per call are reported ("# ... faults/call") so that a run
without it shows up. Output: CSV rows as fbn-peers-bench's (dtype last), impl
"pytorch".
"""
import argparse
import resource
import statistics
import sys
import time

RESNET50 = [(32, 64, 56, 56), (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14),
            (32, 2048, 7, 7)]
QUICK = [(2, c, h, w) for (_, c, h, w) in RESNET50]


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, warmup, reps, evict):
    for _ in range(warmup):
        fn()
    times = []
    f0 = faults()
    for _ in range(reps):
        if evict is not None:
            evict()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times, (faults() - f0) / reps


def param_modes(torch, dtype):
    """How the module's parameters are held, in order of preference."""
    if dtype == torch.float32:
        return ["float32"]
    return ["float32", "dtype"]


def probe(torch, dtype, mode):
    """None if this torch runs BN + add + ReLU forward (training, eval) and
    backward on CPU tensors of dtype with parameters held as mode, else the
    error's first line."""
    try:
        x = torch.rand(2, 3, 4, 5).to(dtype).requires_grad_(True)
        bn = torch.nn.BatchNorm2d(3)
        if mode == "dtype":
            bn = bn.to(dtype)
        y = bn(x).add_(x.detach()).relu_()
        torch.autograd.grad(y, (x, bn.weight, bn.bias), torch.ones_like(y))
        bn.eval()
        with torch.no_grad():
            bn(x.detach()).add_(x.detach()).relu_()
        return None
    except (RuntimeError, TypeError) as e:
        return (str(e).strip().splitlines() or [type(e).__name__])[0]


def run_shape(torch, shape, layout, args):
    n, c, h, w = shape
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    gen = torch.Generator().manual_seed(1)
    if args.param_mode is None:
        print("# pytorch-unsupported (%d,%d,%d,%d) %s %s: not supported by torch %s (%s)" %
              (n, c, h, w, layout, args.dtype_name, args.torch_version, args.unsupported))
        sys.stdout.flush()
        return

    def tensor(lo, hi):
        t = torch.empty(shape).uniform_(lo, hi, generator=gen).to(args.dtype)
        return t.contiguous(memory_format=fmt)

    x, z, dy = tensor(-1.5, 2.5), tensor(-1.0, 1.0), tensor(-1.0, 1.0)
    bn = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-0.5, 0.5, generator=gen)
    if args.param_mode == "dtype":
        bn = bn.to(args.dtype)

    def forward():
        y = bn(x)
        y.add_(z)
        y.relu_()
        return y

    results = []
    with torch.no_grad():
        bn.train()
        y = forward()
        assert y.is_contiguous(memory_format=fmt), "BatchNorm2d changed the layout"
        assert y.dtype == args.dtype, "BatchNorm2d changed the dtype"
        results.append(("train_fwd",) + timed(forward, args.warmup, args.reps, args.evict))
        bn.eval()
        results.append(("eval_fwd",) + timed(forward, args.warmup, args.reps, args.evict))
    bn.train()
    xg = x.detach().requires_grad_(True)
    zg = z.detach().requires_grad_(True)
    yg = bn(xg)
    yg = yg.add_(zg)
    yg = yg.relu_()
    inputs = (xg, zg, bn.weight, bn.bias)

    def backward():
        return torch.autograd.grad(yg, inputs, dy, retain_graph=True)

    results.append(("bwd",) + timed(backward, args.warmup, args.reps, args.evict))
    for name, times, fpc in results:
        print("%s,%d,%d,%d,%d,%s,pytorch,%.4f,%.4f,%d,%s" %
              (name, n, c, h, w, layout, 1e3 * statistics.median(times), 1e3 * min(times),
               args.reps, args.dtype_name))
        print("# pytorch %s (%d,%d,%d,%d) %s: %.1f minor page faults/call" %
              (name, n, c, h, w, layout, fpc))
    sys.stdout.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="batch 2 instead of 32")
    p.add_argument("--shape", help="N,C,H,W: only this shape")
    p.add_argument("--layout", choices=["nchw", "nhwc", "both"], default="both")
    p.add_argument("--header", action="store_true", help="print the CSV header line")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="the tensors' type (parameters float32 where this torch can)")
    p.add_argument("--evict-mib", type=int, default=64,
                   help="read a buffer of this size, untimed, before every timed call "
                        "(as fbn-peers-bench: cold caches holding clean lines; 0: none)")
    args = p.parse_args()
    try:
        import torch
    except ImportError as e:
        print("# pytorch: not available (%s)" % e)
        return 0
    torch.set_num_threads(args.threads)
    args.evict = None
    if args.evict_mib > 0:
        buf = torch.ones(args.evict_mib << 17, dtype=torch.int64)  # evict_mib MiB
        lines = buf[::8]  # one word per 64-byte line

        def evict():
            with torch.no_grad():
                lines.sum().item()
        args.evict = evict
    backend = [l.strip() for l in torch.__config__.parallel_info().splitlines()
               if "parallel backend" in l]
    print("# pytorch %s, threads=%d, %s" % (torch.__version__, torch.get_num_threads(),
                                              backend[0] if backend else "parallel backend ?"))
    args.dtype_name = args.dtype
    args.dtype = getattr(torch, args.dtype)
    args.torch_version = torch.__version__.split("+")[0]
    args.param_mode, args.unsupported = None, None
    for mode in param_modes(torch, args.dtype):
        err = probe(torch, args.dtype, mode)
        if err is None:
            args.param_mode = mode
            break
        args.unsupported = args.unsupported or err
    if args.dtype != torch.float32:
        print("# pytorch params: %s" % {
            "float32": "float32 (mixed-type batch norm: %s tensors, float32 parameters and "
                       "running statistics)" % args.dtype_name,
            "dtype": "%s (the module converted: this torch has no mixed-type CPU batch norm "
                     "for %s)" % (args.dtype_name, args.dtype_name),
            None: "none: not supported by torch %s (%s)" % (args.torch_version,
                                                             args.unsupported)}[args.param_mode])
    if args.header:
        print("pass,n,c,h,w,layout,impl,median_ms,min_ms,reps,dtype")
    shapes = QUICK if args.quick else RESNET50
    if args.shape:
        shapes = [tuple(int(v) for v in args.shape.split(","))]
    layouts = {"nchw": ["NCHW"], "nhwc": ["NHWC"], "both": ["NCHW", "NHWC"]}[args.layout]
    for shape in shapes:
        for layout in layouts:
            run_shape(torch, shape, layout, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
