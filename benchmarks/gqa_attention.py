"""The torch backend's CPU attention with grouped-query heads and several queries per row
(a speculative verification step, a prefill chunk): runtime/torch_kernels.attention_sdpa,
which lets SDPA read each K/V head for its query heads (enable_gqa), against SDPA on K/V
repeated for every query head (what it did before session 12). Both give the same values
bit for bit (checked here); docs/benchmarks.md has the figures (issue 19).

    python benchmarks/gqa_attention.py [--cases 6x22,6x100,6x400,12x300,64x600] [--heads 9x3] [--repeat 200]
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fxforge.runtime.torch_kernels import attention_sdpa  # noqa: E402


def us_per_call(fn, repeat: int) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="6x22,6x100,6x400,12x300,64x600", help="queries x keys")
    ap.add_argument("--heads", default="9x3", help="query heads x K/V heads (SmolLM2's)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    hq, hkv = (int(v) for v in args.heads.split("x"))
    groups, d, scale = hq // hkv, args.head_dim, args.head_dim ** -0.5
    gen = torch.Generator().manual_seed(0)
    print(f"microseconds per call (one layer, batch 1), {torch.get_num_threads()} threads\n")
    print("| queries x keys | attention_sdpa (K/V heads read in place) | SDPA on repeated K/V | ratio |")
    print("|---|---|---|---|")
    for text in args.cases.split(","):
        tq, tk = (int(v) for v in text.split("x"))
        q = torch.randn(1, hq, tq, d, generator=gen)
        k, v = torch.randn(1, hkv, tk, d, generator=gen), torch.randn(1, hkv, tk, d, generator=gen)
        keep = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)  # new queries at the end of the keys

        def repeated():
            mask = torch.zeros(tq, tk).masked_fill(~keep, float("-inf"))
            return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                                  attn_mask=mask, scale=scale)

        def ours():
            return attention_sdpa(q, k, v, causal=True, scale=scale)

        assert torch.equal(ours(), repeated())
        a, b = us_per_call(ours, args.repeat), us_per_call(repeated, args.repeat)
        print(f"| {text} | {a:.0f} | {b:.0f} | {b / a:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
