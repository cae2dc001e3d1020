#!/usr/bin/python3
"""Second oracle: compare libfusedbn against PyTorch's BatchNorm2d + add + ReLU.

Runs random configurations (layout, dtype, flags, momentum / cumulative average,
several training steps, eval, backward) through the library (ctypes) and through
torch (float64 on the CPU), and reports the largest relative error per quantity.

  /usr/bin/python3 tests/oracle/torch_oracle.py build-test/src/libfusedbn.so [--device cuda]

Needs torch (Debian's python3-torch on the CPU). Not part of `meson test`: the
cmocka suites carry their own float64 reference; this checks that the
reference and torch agree.

--device cuda (a GPU machine with torch built for CUDA): the library's module
is a CUDA module fed torch CUDA tensors (float32, float64 and float16, both
layouts, so every cuDNN path is taken); the reference stays torch float64 on
the CPU. For float16 the backward reference uses the library's own ReLU gate
(a z within float16 rounding of 0 may be gated differently), float32/float64
go through torch.relu's backward as is. About a fifth of the cases put a NaN
into x (channel 0) or the addend, which checks NaN propagation and the ReLU
gate of a NaN y against torch's threshold_backward.
"""
import argparse
import ctypes as C
import sys

import numpy as np
import torch

FLOAT32, FLOAT64, FLOAT16, BFLOAT16 = 0, 1, 2, 3
NCHW, NHWC = 0, 1
WEIGHT, BIAS, RMEAN, RVAR, GWEIGHT, GBIAS = range(6)


class Options(C.Structure):
    _fields_ = [("num_features", C.c_int64), ("eps", C.c_double), ("momentum", C.c_double),
                ("cumulative_average", C.c_bool), ("affine", C.c_bool),
                ("track_running_stats", C.c_bool), ("param_dtype", C.c_int),
                ("device", C.c_int), ("device_index", C.c_int), ("bn_mode", C.c_int)]


class Desc(C.Structure):
    _fields_ = [("n", C.c_int64), ("c", C.c_int64), ("h", C.c_int64), ("w", C.c_int64),
                ("dtype", C.c_int), ("layout", C.c_int)]


def check(lib, st):
    if st != 0:
        raise RuntimeError(lib.fbn_last_error_message().decode())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("lib")
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    lib = C.CDLL(args.lib)
    lib.fbn_last_error_message.restype = C.c_char_p
    rng = np.random.default_rng(args.seed)
    # torch 2.x refuses eps = 0 (ValueError); older versions take it.
    eps_choices = [1e-5, 1e-3, 0.0]
    try:
        torch.nn.functional.batch_norm(torch.ones(2, 1, 1, 1), None, None, training=True, eps=0.0)
    except ValueError:
        eps_choices = eps_choices[:2]
        print("torch %s refuses eps = 0: not drawn" % torch.__version__)
    worst = {}
    failures = 0

    def note(name, ours, ref, tol):
        nonlocal failures
        ours = np.asarray(ours, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if not np.array_equal(np.isnan(ours), np.isnan(ref)):
            failures += 1
            print(f"NaN pattern differs in {name}")
            return
        m = ~np.isnan(ref)
        err = np.max(np.abs(ours[m] - ref[m]) / (np.abs(ref[m]) + 1.0), initial=0.0)
        worst[name] = max(worst.get(name, 0.0), err)
        if err > tol:
            failures += 1
            print(f"{name}: max rel err {err:.3g} > {tol:g}")

    for case in range(args.cases):
        n, c, h, w = (int(v) for v in rng.integers(1, [5, 7, 6, 6], endpoint=True))
        if n * h * w == 1:
            n = 2
        layout = int(rng.integers(0, 2))
        kind = int(rng.integers(0, 3 if cuda else 2))
        dt, npdt, tol = [(FLOAT32, np.float32, 2e-5), (FLOAT64, np.float64, 1e-10),
                         (FLOAT16, np.float16, 4e-3)][kind]
        f64 = dt == FLOAT64
        nan_x, nan_z = bool(rng.random() < 0.12), bool(rng.random() < 0.12)
        affine, track = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
        cumulative = bool(rng.integers(0, 2))
        momentum = float(rng.choice([0.1, 0.0, 1.0, 0.37]))
        eps = float(rng.choice(eps_choices))
        has_addend = bool(rng.integers(0, 2))

        o = Options()
        lib.fbn_module_options_init(C.byref(o))
        o.num_features, o.eps, o.momentum = c, eps, momentum
        o.cumulative_average, o.affine, o.track_running_stats = cumulative, affine, track
        o.param_dtype = FLOAT64 if f64 else FLOAT32
        o.device = 1 if cuda else 0
        mod = C.c_void_p()
        check(lib, lib.fbn_module_create(C.byref(o), C.byref(mod)))
        saved = C.c_void_p()
        check(lib, lib.fbn_saved_create(C.byref(saved)))

        tm = torch.nn.BatchNorm2d(c, eps=eps, momentum=None if cumulative else momentum,
                                  affine=affine, track_running_stats=track).double()
        if affine:
            wv = rng.normal(1.0, 0.5, c)
            bv = rng.normal(0.0, 0.5, c)
            with torch.no_grad():
                tm.weight.copy_(torch.from_numpy(wv.astype(npdt).astype(np.float64)))
                tm.bias.copy_(torch.from_numpy(bv.astype(npdt).astype(np.float64)))
            for which, v in ((WEIGHT, wv), (BIAS, bv)):
                arr = np.ascontiguousarray(v, dtype=np.float64)
                check(lib, lib.fbn_module_write_buffer(mod, which, FLOAT64,
                                                       arr.ctypes.data_as(C.c_void_p), C.c_size_t(c)))
        desc = Desc(n, c, h, w, dt, layout)

        def dev(a):  # numpy array -> what the library is given (pointer holder)
            return torch.from_numpy(a).cuda() if cuda else a

        def ptr(t):
            if t is None:
                return None
            return C.c_void_p(t.data_ptr()) if cuda else t.ctypes.data_as(C.c_void_p)

        def host(t):
            if cuda:
                torch.cuda.synchronize()
                return t.cpu().numpy()
            return t

        def to_lib(t):  # torch NCHW float64 -> numpy in layout, dtype
            a = t.detach().numpy()
            if layout == NHWC:
                a = a.transpose(0, 2, 3, 1)
            return np.ascontiguousarray(a.astype(npdt))

        def from_lib(a):
            a = a.astype(np.float64)
            if layout == NHWC:
                a = a.transpose(0, 3, 1, 2)
            return a

        steps = [True, True, True, False] if track else [True, False]
        for step, training in enumerate(steps):
            check(lib, lib.fbn_module_set_training(mod, training))
            tm.train(training)
            shift = rng.normal(0, 2, (1, c, 1, 1))
            x = torch.from_numpy(rng.normal(0, 1.5, (n, c, h, w)) + shift)
            z = torch.from_numpy(rng.normal(0, 1, (n, c, h, w))) if has_addend else None
            if nan_x and step == 0:
                x[0, 0, 0, 0] = float("nan")
            if nan_z and has_addend:
                z[n - 1, c - 1, h - 1, w - 1] = float("nan")
            xl = to_lib(x)
            x = torch.from_numpy(from_lib(xl)).requires_grad_(True)  # same rounding as ours
            zl = to_lib(z) if has_addend else None
            if has_addend:
                z = torch.from_numpy(from_lib(zl)).requires_grad_(True)
            pre = tm(x)
            if has_addend:
                pre = pre + z
            y_ref = torch.relu(pre)
            xd, zd = dev(xl), dev(zl) if has_addend else None
            yd = dev(np.full_like(xl, np.nan))
            check(lib, lib.fbn_module_forward(mod, C.byref(desc), ptr(xd), ptr(zd), ptr(yd), saved,
                                              None, C.c_size_t(0)))
            yl = host(yd)
            note("y", from_lib(yl), y_ref.detach().numpy(), tol)
            if track:
                for which, ref in ((RMEAN, tm.running_mean), (RVAR, tm.running_var)):
                    got = np.zeros(c)
                    check(lib, lib.fbn_module_read_buffer(mod, which, FLOAT64,
                                                          got.ctypes.data_as(C.c_void_p), C.c_size_t(c)))
                    note("running_mean" if which == RMEAN else "running_var", got, ref.numpy(), tol)
                nbt = C.c_int64()
                check(lib, lib.fbn_module_get_num_batches_tracked(mod, C.byref(nbt)))
                if nbt.value != int(tm.num_batches_tracked):
                    failures += 1
                    print(f"num_batches_tracked {nbt.value} != {int(tm.num_batches_tracked)}")
            # backward
            dy = torch.from_numpy(from_lib(to_lib(torch.from_numpy(rng.normal(0, 1, (n, c, h, w))))))
            if affine:
                tm.zero_grad()
                check(lib, lib.fbn_module_zero_grad(mod))
            if dt == FLOAT16:  # our gate: !(y <= 0), NaN passes, as threshold_backward
                gate = torch.from_numpy(~(from_lib(yl) <= 0)).double()
                pre.backward(dy * gate)
            else:
                y_ref.backward(dy)
            dyl = to_lib(dy)
            dyd = dev(dyl)
            dxd = dev(np.full_like(xl, np.nan))
            dzd = dev(np.full_like(xl, np.nan)) if has_addend else None
            # backward from our own y (ReLU mask of our forward)
            check(lib, lib.fbn_module_backward(mod, saved, C.byref(desc), ptr(xd), ptr(yd), ptr(dyd),
                                               ptr(dxd), ptr(dzd), None, C.c_size_t(0)))
            dxl = host(dxd)
            dzl = host(dzd) if has_addend else None
            gtol = tol * 50
            note("dx", from_lib(dxl), x.grad.numpy(), gtol)
            if has_addend:
                note("daddend", from_lib(dzl), z.grad.numpy(), gtol)
            if affine:
                for which, ref in ((GWEIGHT, tm.weight.grad), (GBIAS, tm.bias.grad)):
                    got = np.zeros(c)
                    check(lib, lib.fbn_module_read_buffer(mod, which, FLOAT64,
                                                          got.ctypes.data_as(C.c_void_p), C.c_size_t(c)))
                    note("dweight" if which == GWEIGHT else "dbias", got, ref.numpy(), gtol)
        lib.fbn_saved_destroy(saved)
        lib.fbn_module_destroy(mod)

    for k in sorted(worst):
        print(f"{k:14s} worst relative error {worst[k]:.3g}")
    print(f"{args.cases} cases, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
