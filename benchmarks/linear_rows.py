"""Float32 linear products on the CPU by activation row count: each kernel and weight
layout that runtime/cpu_linear.py chooses among, timed at every row count asked for,
with the weights read from memory (the copies timed fill --cold-mb, more than the
last-level cache, as a decoding step of a model larger than that cache reads them).

What it shows on the 2-core Xeon: MKL (F.linear) changes kernel at 16 rows, and from 2 to
15 rows its time grows with every row, so a row bucket timed at 16 rows (where MKL is
fast) chose it for 9-15 rows, where it was the slowest candidate; oneDNN-packed copies
made for 5, 12, 16 or 24 rows give the same values at the same speed, so one copy serves
every bucket (issue 19; the figures are in docs/benchmarks.md).

    python benchmarks/linear_rows.py [--shapes 49152x576,3072x576,576x1536,960x576,576x576]
        [--rows 1,2,4,6,8,11,13,16,24,32] [--cold-mb 600] [--layouts row,column,packed]
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fxforge.runtime.cpu_linear import FEW_TIMED_ROWS, onednn_available, onednn_linear  # noqa: E402

KERNELS = {"aten": F.linear, "onednn": onednn_linear}


def copies_of(shape, layout, count, gen):
    """`count` weights of `shape` stored in `layout` (packed: oneDNN's blocked copy, made
    for FEW_TIMED_ROWS rows, as the plan makes it)."""
    out = []
    for _ in range(count):
        w = torch.randn(shape, generator=gen)
        if layout == "column":
            w = w.t().contiguous().t()
        elif layout == "packed":
            w = torch.ops.mkldnn._reorder_linear_weight(w, FEW_TIMED_ROWS)
        out.append(w)
    return out


def seconds_per_call(kernel, weights, rows, in_features, calls):
    x = torch.randn(rows, in_features)
    for w in weights:  # oneDNN builds its primitive on a shape's first call
        kernel(x, w)
    start, n = time.perf_counter(), 0
    while n < calls:
        for w in weights:
            kernel(x, w)
            n += 1
    return (time.perf_counter() - start) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="49152x576,3072x576,576x1536,960x576,576x576",
                    help="weight shapes out x in (SmolLM2's lm_head, gate+up, down, q+k+v, o)")
    ap.add_argument("--rows", default="1,2,4,6,8,11,13,16,24,32")
    ap.add_argument("--cold-mb", type=float, default=600, help="MiB of weight copies timed in turn per layout")
    ap.add_argument("--layouts", default="row,column,packed")
    ap.add_argument("--calls", type=int, default=48, help="calls per figure (at least one per copy)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    rows = [int(r) for r in args.rows.split(",")]
    layouts = args.layouts.split(",")
    candidates = [("aten", "row"), ("aten", "column"), ("onednn", "row"), ("onednn", "column"), ("onednn", "packed")]
    candidates = [c for c in candidates if c[1] in layouts and (c[0] == "aten" or onednn_available())]
    gen = torch.Generator().manual_seed(0)
    print(f"microseconds per call, {torch.get_num_threads()} threads, weights cycled over {args.cold_mb:.0f} MiB "
          f"per layout\n")
    print("| shape | kernel, layout | " + " | ".join(f"{r} rows" for r in rows) + " |")
    print("|---|---|" + "---|" * len(rows))
    for text in args.shapes.split(","):
        shape = tuple(int(v) for v in text.split("x"))
        count = max(2, int(args.cold_mb * 2**20) // (shape[0] * shape[1] * 4))
        for layout in dict.fromkeys(c[1] for c in candidates):
            weights = copies_of(shape, layout, count, gen)
            for kernel, lay in (c for c in candidates if c[1] == layout):
                us = [seconds_per_call(KERNELS[kernel], weights, r, shape[1], max(args.calls, count)) * 1e6
                      for r in rows]
                print(f"| {text} | {kernel}, {lay} | " + " | ".join(f"{u:.0f}" for u in us) + " |", flush=True)
            del weights


if __name__ == "__main__":
    main()
