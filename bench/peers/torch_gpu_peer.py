#!/usr/bin/env python3
"""PyTorch CUDA peer of `fusedbn-bench --device cuda`: what a framework runs without fusedbn.

    y = torch.nn.BatchNorm2d(C)(x) (training), then y.add_(z), y.relu_()
    eval:      the same module in eval mode (running statistics)
    backward:  autograd of that forward: dx, daddend, dweight, dbias

The same shapes and dtype/layout pairs as fusedbn-bench's GPU defaults
(float16 channels_last, float32 NCHW), timed like it: one stream, the L2
flushed (a 256 MiB buffer written) before each sample, CUDA events around one
call, median of --reps samples after --warmup untimed calls. Prints a table
(ms, GB/s with fusedbn-bench's byte counts) and, with --csv, CSV rows
`pass,n,c,h,w,layout,dtype,impl,median_ms,min_ms,reps`.

    python3 bench/peers/torch_gpu_peer.py [--reps 20] [--shape N,C,H,W] [--csv]
"""
import argparse
import statistics
import sys

RESNET50 = [(32, 64, 56, 56), (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14),
            (32, 2048, 7, 7), (4, 2, 8, 3)]
# tensors moved per pass (fusedbn-bench's count): x, addend, y / x, y, dy, dx, daddend
TENSORS = {"train_fwd": 3, "eval_fwd": 3, "bwd": 5}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--shape", action="append", help="N,C,H,W (repeatable)")
    p.add_argument("--csv", action="store_true")
    args = p.parse_args()
    try:
        import torch
    except ImportError as e:
        print("# pytorch: not available (%s)" % e)
        return 0
    if not torch.cuda.is_available():
        print("# pytorch: no CUDA device")
        return 0
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else RESNET50
    dev = torch.device("cuda")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    print("# pytorch %s, cuDNN %s, %s; L2 flushed before each sample" %
          (torch.__version__, torch.backends.cudnn.version(), torch.cuda.get_device_name()))
    if args.csv:
        print("pass,n,c,h,w,layout,dtype,impl,median_ms,min_ms,reps")
    else:
        print("%-17s %-6s %-8s %-10s %10s %8s" % ("shape", "layout", "dtype", "pass", "torch ms",
                                                  "GB/s"))

    def timed(fn):
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(args.reps):
            flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return times

    for shape in shapes:
        for dtype, fmt, layout in ((torch.float16, torch.channels_last, "nhwc"),
                                   (torch.float32, torch.contiguous_format, "nchw")):
            n, c, h, w = shape
            g = torch.Generator(device=dev).manual_seed(1)

            def tensor(lo, hi):
                t = torch.empty(shape, device=dev).uniform_(lo, hi, generator=g)
                return t.to(dtype).contiguous(memory_format=fmt)

            x, z, dy = tensor(-1.5, 2.5), tensor(-1.0, 1.0), tensor(-1.0, 1.0)
            bn = torch.nn.BatchNorm2d(c).to(dev)  # float32 parameters, as with AMP
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)

            def forward():
                y = bn(x)
                y.add_(z)
                y.relu_()
                return y

            results = []
            with torch.no_grad():
                bn.train()
                results.append(("train_fwd", timed(forward)))
                bn.eval()
                results.append(("eval_fwd", timed(forward)))
            bn.train()
            xg = x.detach().requires_grad_(True)
            zg = z.detach().requires_grad_(True)
            yg = bn(xg).add_(zg).relu_()
            inputs = (xg, zg, bn.weight, bn.bias)
            results.append(("bwd", timed(
                lambda: torch.autograd.grad(yg, inputs, dy, retain_graph=True))))
            elem = x.element_size() * n * c * h * w
            for name, times in results:
                med = statistics.median(times)
                if args.csv:
                    print("%s,%d,%d,%d,%d,%s,%s,pytorch,%.5f,%.5f,%d" % (
                        name, n, c, h, w, layout, str(dtype).replace("torch.", ""), med,
                        min(times), args.reps))
                else:
                    print("%-17s %-6s %-8s %-10s %10.4f %8.1f" % (
                        "(%d,%d,%d,%d)" % shape, layout, str(dtype).replace("torch.", ""), name,
                        med, TENSORS[name] * elem / (med * 1e-3) / 1e9))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
