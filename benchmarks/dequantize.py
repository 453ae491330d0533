"""CPU dequantization of one weight, by scheme and shape: what a quantized product pays on
top of the float GEMM when it dequantizes (runtime/cpu_quant.py: long inputs, and every
call of nf4), next to that GEMM at a prompt's row count.

`dequantize_weight` is what the runtime calls. For int4 the (zero point, byte) table
lookup it replaced in session 12 is timed beside it (`--table`), spelled here only for
the comparison: three float32 passes against two (docs/benchmarks.md, issue 20).

    python benchmarks/dequantize.py [--shapes 1536x576,3072x576,576x1536] [--schemes int4/g64,nf4/g64,int8]
        [--rows 128] [--table] [--repeat 30]
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fxforge.ir.quant_formats import Int4Packed, dequantize_weight, quantize_weight  # noqa: E402


def table_lookup_int4(packed: Int4Packed) -> torch.Tensor:
    """The int4 dequantization before session 12: q - z read from a [16 * 256, 2] table
    indexed by zero * 256 + byte (integer zero points only), then scaled."""
    n, k = packed.shape
    g = packed.group_size
    byte = torch.arange(256)
    zero = torch.arange(16, dtype=torch.float32)[:, None]
    table = torch.stack([(byte & 0xF) - zero, (byte >> 4) - zero], dim=-1).reshape(16 * 256, 2)
    index = packed.zeros.int().mul_(256)[..., None] + packed.qweight.view(n, k // g, g // 2)
    w = table.index_select(0, index.reshape(-1)).view(n, k // g, g)
    return w.mul_(packed.scales.float()[..., None]).reshape(n, k)


def median_ms(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1536x576,3072x576,576x1536", help="weights, out x in features")
    ap.add_argument("--schemes", default="int4/g64,nf4/g64,int8")
    ap.add_argument("--rows", type=int, default=128, help="activation rows of the float GEMM timed beside")
    ap.add_argument("--table", action="store_true", help="also the int4 table lookup it replaced")
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(0)
    print(f"ms per call (median of {args.repeat}), {torch.get_num_threads()} threads\n")
    print(f"| weight | scheme | dequantize_weight | table lookup (before) | float32 GEMM at {args.rows} rows |")
    print("|---|---|---|---|---|")
    for text in args.shapes.split(","):
        n, k = (int(v) for v in text.split("x"))
        w = torch.randn(n, k, generator=gen)
        x = torch.randn(args.rows, k, generator=gen)
        gemm = median_ms(lambda: F.linear(x, w), args.repeat)
        for label in args.schemes.split(","):
            scheme, _, group = label.partition("/g")
            packed = quantize_weight(w, scheme, **({"group_size": int(group)} if group else {}))
            ours = median_ms(lambda: dequantize_weight(packed), args.repeat)
            before = "-"
            if args.table and isinstance(packed, Int4Packed) and not packed.zeros.dtype.is_floating_point:
                assert torch.equal(table_lookup_int4(packed), dequantize_weight(packed))
                before = f"{median_ms(lambda: table_lookup_int4(packed), args.repeat):.3f}"
            print(f"| {text} | {label} | {ours:.3f} | {before} | {gemm:.3f} |", flush=True)


if __name__ == "__main__":
    main()
