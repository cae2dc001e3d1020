#!/usr/bin/env python3
"""Markdown table of a GPU benchmark run: fusedbn vs cuDNN unfused vs PyTorch.

    python3 bench/peers/gpu_table.py BENCH_CSV [TORCH_CSV ...]

BENCH_CSV is `fusedbn-bench --device cuda --csv` output (one or several runs
concatenated: every dtype/layout it holds is tabled), TORCH_CSV
`bench/peers/torch_gpu_peer.py --csv` from the same machine. Prints one row per
(shape, layout, dtype, pass): milliseconds, fusedbn's GB/s and fraction of the
copy bandwidth, the path fusedbn took, and the ratios unfused/fusedbn and
PyTorch/fusedbn (> 1: fusedbn is faster).
"""
import csv
import re
import sys

PASS_NAME = {"train-fwd": "train_fwd", "eval-fwd": "eval_fwd", "train-bwd": "bwd"}


def rows_of(path):
    with open(path) as f:
        lines = [l for l in f if l.strip() and not l.startswith("#")]
    out, header = [], None
    for r in csv.reader(lines):
        if r[0] in ("device", "pass"):
            header = r
            continue
        if header is not None and len(r) == len(header):
            out.append(dict(zip(header, r)))
    return out


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    bench = rows_of(sys.argv[1])
    torch = {}
    for p in sys.argv[2:]:
        for r in rows_of(p):
            key = (r["n"], r["c"], r["h"], r["w"], r["layout"], r["dtype"], r["pass"])
            torch[key] = num(r["median_ms"])
    copy = num(bench[0]["copy_gbps"]) if bench else None
    print("Copy bandwidth (device-to-device cudaMemcpy, read + write): %.0f GB/s\n" % (copy or 0))
    print("| shape | layout | dtype | pass | fusedbn ms | GB/s | % copy | path | cuDNN unfused ms "
          "| PyTorch ms | unfused / fusedbn | PyTorch / fusedbn |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in bench:
        shape = "%s,%s,%s,%s" % (r["n"], r["c"], r["h"], r["w"])
        p = PASS_NAME.get(r["pass"], r["pass"])
        fused, unf = num(r["fused_ms"]), num(r["unfused_ms"])
        tm = torch.get((r["n"], r["c"], r["h"], r["w"], r["layout"], r["dtype"], p))
        m = re.search(r"(?:^|; )fused: (\w+)", r["note"])
        path = m.group(1) if m else "?"
        frac = num(r["fused_copy_frac"])
        print("| %s | %s | %s | %s | %.4f | %.0f | %.0f%% | %s | %s | %s | %s | %s |" % (
            shape, r["layout"], r["dtype"], p, fused, num(r["fused_gbps"]) or 0,
            100 * (frac or 0), path, "%.4f" % unf if unf else "—",
            "%.4f" % tm if tm else "—", "%.2f" % (unf / fused) if unf and fused else "—",
            "%.2f" % (tm / fused) if tm and fused else "—"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
