#!/usr/bin/python3
"""fusedbn.torch against PyTorch's own modules, one run, medians side by side.

    FUSEDBN_LIBRARY=<build>/src/libfusedbn.so PYTHONPATH=python \\
        /usr/bin/python3 bench/peers/torch_module_bench.py [--quick] [--threads N]
        [--device cpu|cuda]

Three parts:
  step      a training step (forward + backward) of fusedbn.torch's
            FusedBatchNorm2d(x, addend) against torch.nn.BatchNorm2d + add +
            relu on the ResNet-50 batch-norm shapes, NCHW and channels_last;
            median milliseconds of each and their ratio (torch / fusedbn:
            above 1 where fusedbn is faster).
  overhead  OneFlow's example shape (4, 2, 8, 3): the module's forward (training,
            no autograd graph) against the library's forward called straight
            through ctypes on preallocated buffers (fbn_op_forward on the
            CPU; on CUDA the entry point the module uses, fbn_cuda_op_forward
            on torch's current stream when the library has it); the
            difference is the per-call cost of the Python layer (checks, op
            lookup, output allocation).  torch's BatchNorm2d + add + relu on
            the same shape for scale.
  resnet50  a training step (forward, cross-entropy, backward, SGD) of
            torchvision's resnet50 against fusedbn.torch.convert(resnet50),
            batch 8 of 3x224x224 (--image to change).
Timings are wall-clock medians of --reps calls after --warmup calls; float32
unless --dtype float64.  --device cuda runs every part on the GPU (fusedbn
through the library's CUDA entry points, as the module does) and times each
call between two torch.cuda.synchronize(), so a median is the call's queued
work finished, not its launch.  Nothing is compared for correctness here (the
test suite does that); the machine should be otherwise idle for figures.
--quick runs every part on tiny shapes with few repetitions (a check that it
runs: tests/python/meson.build runs it).  Exit status 77 when torch or
torchvision is missing, 2 for --device cuda without a CUDA device.
"""
import argparse
import copy
import ctypes as C
import os
import statistics
import sys
import time


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes and few repetitions (checks that it runs)")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads of both torch and fusedbn's OpenMP (default: OMP_NUM_THREADS, "
                         "else the number of CPUs)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--parts", default="step,overhead,resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--layout", choices=["NCHW", "NHWC"], default="NCHW",
                    help="memory format of the resnet50 part")
    ap.add_argument("--resnet-reps", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return ap.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
THREADS = (ARGS and ARGS.threads) or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count()
# OpenMP reads OMP_NUM_THREADS when it starts, before torch or libfusedbn run.
os.environ["OMP_NUM_THREADS"] = str(THREADS)

try:
    import torch  # noqa: E402
    import torchvision  # noqa: E402
except ImportError as e:
    if __name__ == "__main__":
        print("SKIP: %s (Debian: apt-get install python3-torch python3-torchvision)" % e)
        sys.exit(77)
    raise

import fusedbn.torch as fbt  # noqa: E402
from fusedbn import _lib  # noqa: E402
from fusedbn.torch import _ops  # noqa: E402

RESNET50 = [(32, 64, 56, 56), (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14),
            (32, 2048, 7, 7)]
QUICK = [(2, c, 8, 8) for (_, c, _, _) in RESNET50]
FORMATS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}


DEVICE = torch.device(ARGS.device if ARGS else "cpu")


def sync():
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def median_ms(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bn_step_part(args, dtype):
    shapes = QUICK if args.quick else RESNET50
    print("# step: forward + backward on %s, median ms of %d (float%d)"
          % (DEVICE, args.reps, torch.finfo(dtype).bits))
    print("%-22s %-6s %10s %10s %9s" % ("shape", "layout", "fusedbn", "torch", "torch/fbn"))
    g = torch.Generator().manual_seed(1)
    for shape in shapes:
        for layout, fmt in FORMATS.items():
            def t():
                return torch.empty(shape).uniform_(-1, 1, generator=g).to(DEVICE, dtype).contiguous(
                    memory_format=fmt)
            x, z, dy = t().requires_grad_(), t().requires_grad_(), t()
            ours = fbt.FusedBatchNorm2d(shape[1]).to(DEVICE, dtype)
            ref = torch.nn.BatchNorm2d(shape[1]).to(DEVICE, dtype)

            def step_ours():
                ours(x, z).backward(dy)

            def step_ref():
                torch.relu(ref(x) + z).backward(dy)

            a = median_ms(step_ours, args.warmup, args.reps)
            b = median_ms(step_ref, args.warmup, args.reps)
            print("%-22s %-6s %10.3f %10.3f %9.2f" % (str(shape), layout, a, b, b / a),
                  flush=True)


def overhead_part(args, dtype):
    shape = (4, 2, 8, 3)
    reps = args.reps * 100
    x = torch.randn(shape, dtype=dtype).to(DEVICE)
    z = torch.randn(shape, dtype=dtype).to(DEVICE)
    m = fbt.FusedBatchNorm2d(shape[1]).to(DEVICE, dtype)
    ref = torch.nn.BatchNorm2d(shape[1]).to(DEVICE, dtype)
    # The same op the module uses, called straight, on preallocated memory.
    op = _ops.get_op(dtype, _lib.LAYOUT_NCHW, x.device, _lib.STATISTICS_BATCH,
                     _lib.OPERATION_BN_ADD_RELU, True, shape[1], m.eps)
    desc = _ops.x_desc_of(x, _lib.LAYOUT_NCHW)
    _, ws_bytes, _ = op.sizes(desc)
    y = torch.empty_like(x)
    ws, ws_ptr = _ops.new_buffer(ws_bytes, x.device)
    ptrs = [t.data_ptr() for t in (x, z, y, m.weight, m.bias, m.running_mean, m.running_var)]
    desc_ref = C.byref(desc)
    # The module's entry point: fbn_cuda_op_forward on the current stream
    # for CUDA tensors with a CUDA-built library, else fbn_op_forward.
    stream = _ops.stream_of("torch_module_bench", x.device)
    lib = op.library.lib
    if stream is None:
        entry = "fbn_op_forward"

        def raw():
            lib.fbn_op_forward(op.handle, desc_ref, *ptrs, 0.1, None, 0, ws_ptr, ws_bytes)
    else:
        entry = "fbn_cuda_op_forward"
        exec_ref = C.byref(_lib.CudaExec(stream, None))

        def raw():
            lib.fbn_cuda_op_forward(op.handle, exec_ref, desc_ref, *ptrs, 0.1, None, 0, ws_ptr,
                                    ws_bytes)
    raw()
    sync()

    def module():
        m(x, z)

    def torch_ref():
        torch.relu(ref(x) + z)

    with torch.no_grad():
        t_raw = median_ms(raw, args.warmup, reps)
        t_mod = median_ms(module, args.warmup, reps)
        t_ref = median_ms(torch_ref, args.warmup, reps)
    x.requires_grad_()
    t_step = median_ms(lambda: m(x, z).sum().backward(), args.warmup, reps)
    t_ref_step = median_ms(lambda: torch.relu(ref(x) + z).sum().backward(), args.warmup, reps)
    print("# overhead: OneFlow's example shape %s on %s, median us of %d (float%d)"
          % (shape, DEVICE, reps, torch.finfo(dtype).bits))
    print("%-34s %8.1f" % (entry + " through ctypes", t_raw * 1e3))
    print("FusedBatchNorm2d forward (no grad) %8.1f  (Python layer: %.1f)"
          % (t_mod * 1e3, (t_mod - t_raw) * 1e3))
    print("torch BatchNorm2d + add + relu     %8.1f" % (t_ref * 1e3))
    print("FusedBatchNorm2d training step     %8.1f" % (t_step * 1e3))
    print("torch training step                %8.1f" % (t_ref_step * 1e3), flush=True)


def resnet_part(args, dtype):
    torch.manual_seed(0)
    ref = torchvision.models.resnet50().to(DEVICE, dtype)
    ours = fbt.convert(copy.deepcopy(ref))
    x = torch.randn(args.batch, 3, args.image, args.image, dtype=dtype).to(DEVICE)
    labels = torch.randint(0, 1000, (args.batch,)).to(DEVICE)
    if args.layout == "NHWC":
        ref = ref.to(memory_format=torch.channels_last)
        ours = ours.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    times = {}
    for name, model in (("torch", ref), ("fusedbn", ours)):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), labels).backward()
            opt.step()

        times[name] = median_ms(step, 1, args.resnet_reps)
    print("# resnet50: training step on %s, batch %d of 3x%dx%d %s, median ms of %d (float%d)"
          % (DEVICE, args.batch, args.image, args.image, args.layout, args.resnet_reps,
             torch.finfo(dtype).bits))
    print("torch %.1f  convert(): %.1f  torch/convert() %.3f"
          % (times["torch"], times["fusedbn"], times["torch"] / times["fusedbn"]), flush=True)


def main():
    args = ARGS
    if args.quick:
        args.reps, args.warmup, args.resnet_reps = 2, 1, 1
        args.batch, args.image = 2, 32
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("torch_module_bench: --device cuda: torch %s sees no CUDA device"
              % torch.__version__, file=sys.stderr)
        return 2
    torch.set_num_threads(THREADS)
    dtype = getattr(torch, args.dtype)
    print("# torch %s, %d threads (torch and OMP_NUM_THREADS), libfusedbn %s (%s)"
          % (torch.__version__, torch.get_num_threads(), _lib.load_library().version_string,
             _lib.load_library().path))
    parts = {"step": bn_step_part, "overhead": overhead_part, "resnet50": resnet_part}
    for name in args.parts.split(","):
        parts[name](args, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
