#!/usr/bin/env python3
"""The synchronized-BN table of docs/benchmarks.md from fbn-sync-bench runs.

    sync_bench_table.py --run W CSV [--run W CSV ...] [--torch FILE]
                        [--machine TEXT] [--load TEXT] [--command TEXT]
                        [--note TEXT] [--md FILE]

Each --run is the CSV of one `mpirun -np W fbn-sync-bench`. Writes the
generated part (machine, load, command, the table of median step times
side by side for every W, the bytes exchanged per step, a Mermaid
xychart-beta chart per layout, the torch.nn.SyncBatchNorm line) between the
markers <!-- sync-bench:begin --> and <!-- sync-bench:end --> of --md, or
prints it when --md is not given.
"""
import argparse
import csv
import sys

BEGIN = "<!-- sync-bench:begin -->"
END = "<!-- sync-bench:end -->"


def read_run(path):
    rows, comments = [], []
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    comments = [ln.strip()[2:] for ln in lines if ln.startswith("#")]
    for r in csv.DictReader(ln for ln in lines if not ln.startswith("#")):
        rows.append(r)
    return rows, comments


def shape_label(r):
    return "%s,%s,%s,%s" % (r["n"], r["c"], r["h"], r["w"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", nargs=2, action="append", metavar=("W", "CSV"), required=True)
    ap.add_argument("--torch", help="output of torch_syncbn_probe.py")
    ap.add_argument("--machine", default="")
    ap.add_argument("--load", action="append", default=[])
    ap.add_argument("--command", default="")
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--md")
    args = ap.parse_args()

    worlds = []
    data = {}  # (layout, shape, world, kind) -> row
    order = []  # (layout, shape) in run order
    headers = {}
    for w, path in args.run:
        w = int(w)
        rows, comments = read_run(path)
        if not rows:
            sys.exit("sync_bench_table: %s has no rows" % path)
        worlds.append(w)
        headers[w] = comments
        for r in rows:
            if int(r["world"]) != w:
                sys.exit("sync_bench_table: %s: world %s in a run of %d ranks" % (path, r["world"], w))
            key = (r["layout"], shape_label(r))
            if key not in order:
                order.append(key)
            data[key + (w, r["kind"])] = r

    out = []
    if args.machine:
        out.append("Machine: %s." % args.machine)
    if args.load:
        out.append("Load (`uptime` before each run): %s." % "; ".join(args.load))
    if args.command:
        out.append("Command: `%s`." % args.command)
    for w in worlds:
        for c in headers[w]:
            if c.startswith("fbn-sync-bench:"):
                out.append("- %s" % c)
                break
    for n in args.note:
        out.append(n)
    out.append("")

    # Step times side by side.
    head = "| layout | shape (whole batch) |"
    sep = "|---|---|"
    for w in worlds:
        head += " W=%d shard | local ms | sync ms | sync/local |" % w
        sep += "---|---|---|---|"
    out += [head, sep]
    for layout, shape in order:
        line = "| %s | %s |" % (layout.upper(), shape)
        for w in worlds:
            lo = data.get((layout, shape, w, "local"))
            sy = data.get((layout, shape, w, "sync"))
            if lo is None or sy is None:
                line += " — | — | — | — |"
                continue
            l_ms, s_ms = float(lo["step_ms"]), float(sy["step_ms"])
            line += " %s | %.2f | %.2f | %.2f |" % (lo["shard_n"], l_ms, s_ms, s_ms / l_ms)
        out.append(line)
    out.append("")

    # Forward and backward separately.
    head = "| layout | shape |"
    sep = "|---|---|"
    for w in worlds:
        head += " W=%d fwd local / sync ms | W=%d bwd local / sync ms |" % (w, w)
        sep += "---|---|"
    out += ["Forward and backward of the same runs (medians of each pass's max over the ranks):", "",
            head, sep]
    for layout, shape in order:
        line = "| %s | %s |" % (layout.upper(), shape)
        for w in worlds:
            lo = data.get((layout, shape, w, "local"))
            sy = data.get((layout, shape, w, "sync"))
            if lo is None or sy is None:
                line += " — | — |"
                continue
            line += " %.2f / %.2f | %.2f / %.2f |" % (float(lo["fwd_ms"]), float(sy["fwd_ms"]),
                                                      float(lo["bwd_ms"]), float(sy["bwd_ms"]))
        out.append(line)
    out.append("")

    # Bytes exchanged per step and rank (they depend on C and W only).
    out += ["Bytes exchanged per synchronized step and rank: the all-gathers (forward: W check headers of 64 "
            "bytes and W records of 64 + 16·C bytes; backward: W check headers of 64 bytes; gathered on every "
            "rank) and the backward's all-reduce of (4 + 2·C) doubles:", ""]
    head = "| C |" + "".join(" W=%d all-gather | W=%d all-reduce | W=%d per step |" % (w, w, w) for w in worlds)
    sep = "|---|" + "---|---|---|" * len(worlds)
    out += [head, sep]
    seen = []
    for layout, shape in order:
        c = shape.split(",")[1]
        if c in seen:
            continue
        seen.append(c)
        line = "| %s |" % c
        for w in worlds:
            sy = next((data[k] for k in data if k[2] == w and k[3] == "sync" and k[1].split(",")[1] == c),
                      None)
            if sy is None:
                line += " — | — | — |"
                continue
            ag, ar = int(sy["allgather_bytes"]), int(sy["allreduce_bytes"])
            line += " %s | %s | %s |" % (fmt_bytes(ag), fmt_bytes(ar), fmt_bytes(ag + ar))
        out.append(line)
    out.append("")

    # One chart per layout: bars synchronized, line local, per shape and W.
    for layout in sorted({k[0] for k in order}):
        cats, sync_ms, local_ms = [], [], []
        for lay, shape in order:
            if lay != layout:
                continue
            c = shape.split(",")[1]
            for w in worlds:
                lo = data.get((lay, shape, w, "local"))
                sy = data.get((lay, shape, w, "sync"))
                if lo is None or sy is None:
                    continue
                cats.append('"C%s W%d"' % (c, w))
                sync_ms.append("%.2f" % float(sy["step_ms"]))
                local_ms.append("%.2f" % float(lo["step_ms"]))
        if not cats:
            continue
        top = max(float(v) for v in sync_ms + local_ms)
        out += ["%s, ms per training step (max over the ranks; bars: synchronized, line: local):" % layout.upper(),
                "",
                "```mermaid",
                "xychart-beta",
                '    title "%s: synchronized (bars) and local (line) step, ms"' % layout.upper(),
                "    x-axis [%s]" % ", ".join(cats),
                '    y-axis "ms" 0 --> %d' % (int(top * 1.1) + 1),
                "    bar [%s]" % ", ".join(sync_ms),
                "    line [%s]" % ", ".join(local_ms),
                "```",
                ""]

    if args.torch:
        with open(args.torch, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        out.append("`torch.nn.SyncBatchNorm` (`bench/sync/torch_syncbn_probe.py`, the same step on a CPU shard in "
                   "a gloo process group):")
        out.append("")
        out += ["- `%s`" % ln for ln in lines]
        out.append("")

    text = "\n".join(out)
    if not args.md:
        print(text)
        return 0
    with open(args.md, encoding="utf-8") as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        sys.exit("sync_bench_table: %s has no %s ... %s markers" % (args.md, BEGIN, END))
    pre, rest = doc.split(BEGIN, 1)
    _, post = rest.split(END, 1)
    with open(args.md, "w", encoding="utf-8") as f:
        f.write(pre + BEGIN + "\n" + text + END + post)
    print(text)
    return 0


def fmt_bytes(b):
    if b >= 1024:
        return "%d (%.1f KiB)" % (b, b / 1024.0)
    return "%d" % b


if __name__ == "__main__":
    sys.exit(main())
