"""Attention forward on a CUDA GPU: TFLOP/s and peak memory of fxforge's Triton kernel vs
F.scaled_dot_product_attention restricted to the flash backend vs naive
matmul-softmax-matmul, for head dim 64 and 128, lengths 512..16k, causal and not, fp16
and bf16. Timing: triton.testing.do_bench (warmup, then the median).

    python benchmarks/attention.py [--quick] [--out results.json]
"""
import argparse
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import finish  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer lengths")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU; none is available here. Nothing measured.")
        return 0
    import triton
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fxforge.codegen.kernels.attention import attention_triton, flops

    def naive(q, k, v, causal, scale):
        s = (q @ k.transpose(-1, -2)) * scale
        if causal:
            t = q.shape[-2]
            s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        return torch.softmax(s.float(), -1).to(q.dtype) @ v

    def flash(q, k, v, causal, scale):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    def ours(q, k, v, causal, scale):
        return attention_triton(q, k, v, causal=causal, scale=scale)

    methods = {"fxforge": ours, "sdpa_flash": flash, "naive": naive}
    lengths = [1024, 4096] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for d in (64, 128):
            for causal in (False, True):
                for t in lengths:
                    b, h = max(1, 16384 // t), 2048 // d
                    q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=dtype) for _ in range(3))
                    scale = d ** -0.5
                    row = {"dtype": str(dtype).split(".")[-1], "d": d, "causal": causal, "T": t, "B": b, "H": h}
                    ref = flash(q, k, v, causal, scale)
                    for name, fn in methods.items():
                        try:
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                            base = torch.cuda.memory_allocated()
                            out = fn(q, k, v, causal, scale)
                            peak = torch.cuda.max_memory_allocated() - base
                            err = (out.float() - ref.float()).abs().max().item()
                            ms = triton.testing.do_bench(lambda: fn(q, k, v, causal, scale), warmup=25, rep=100)
                            row[name] = {"ms": ms, "tflops": flops(b, h, t, t, d, causal) / ms / 1e9,
                                         "peak_mib": peak / 2**20, "max_err_vs_flash": err}
                        except torch.cuda.OutOfMemoryError:
                            row[name] = "OOM"
                        torch.cuda.empty_cache()
                    rows.append(row)
                    cells = [f"{n}={r['tflops']:.0f}TF/{r['peak_mib']:.0f}MiB" if isinstance(r, dict) else f"{n}=OOM"
                             for n, r in ((n, row[n]) for n in methods)]
                    print(f"{row['dtype']} d={d} causal={causal} T={t}: " + "  ".join(cells), flush=True)

    print("\n| dtype | D | causal | T | fxforge TFLOP/s | SDPA flash TFLOP/s | ratio | naive TFLOP/s | "
          "peak MiB fxforge / flash / naive |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ours_r, fl, nv = r["fxforge"], r["sdpa_flash"], r["naive"]
        tf = lambda x: f"{x['tflops']:.0f}" if isinstance(x, dict) else "OOM"  # noqa: E731
        mem = lambda x: f"{x['peak_mib']:.0f}" if isinstance(x, dict) else "OOM"  # noqa: E731
        ratio = f"{ours_r['tflops'] / fl['tflops']:.2f}" if isinstance(ours_r, dict) and isinstance(fl, dict) else "-"
        print(f"| {r['dtype']} | {r['d']} | {r['causal']} | {r['T']} | {tf(ours_r)} | {tf(fl)} | {ratio} | {tf(nv)} | "
              f"{mem(ours_r)} / {mem(fl)} / {mem(nv)} |")
    finish(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
