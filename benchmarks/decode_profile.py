"""Where a decode step's device time goes, and what each decode fusion buys on this device.

For SmolLM2-135M's shapes (random weights) it builds the cached graph once per variant
(the default pipeline, then with fusion passes left out), times the static step that
generate() runs (a CUDA graph on a GPU), and lists the kernels of one eager step by their
device time (torch's profiler; a kernel costs the same in a graph as launched alone).

    python benchmarks/decode_profile.py [--dtype bfloat16] [--context 32] [--top 12]
                                        [--variants default,-fuse_linear_pointwise,...]

A variant is `default` or a '+'-joined list of passes to disable, each prefixed by '-'.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxforge  # noqa: E402
from decode import DTYPES, load, sync  # noqa: E402

DEFAULT_VARIANTS = "default,-fuse_linear_pointwise,-fuse_linear_pointwise+-fuse_rope_attention"


def step_ms(fn, device, repeat=50) -> float:
    for _ in range(3):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat * 1e3


def kernel_table(fn, device, top: int) -> list[tuple[str, float, int]]:
    """(name, device microseconds per step, calls per step) of the costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = 5
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        us = getattr(e, "self_cuda_time_total", 0) if us is None else us
        if device.type != "cuda":
            us = e.self_cpu_time_total
        if us > 0 and e.device_type is not None:
            rows.append((e.key, us / steps, e.count // steps))
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (a quick check)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, ids = load("smollm2-random", device, DTYPES[args.dtype])
    if args.layers:
        model.model.layers = model.model.layers[:args.layers]
        model.config.num_hidden_layers = args.layers
    vocab, ctx = model.config.vocab_size, args.context
    seq = torch.randint(0, vocab, (1, ctx + 1), device=device)
    pad = torch.zeros(1, dtype=torch.long, device=device)
    summary = []
    for variant in args.variants.split(","):
        disable = [] if variant == "default" else [p.lstrip("-") for p in variant.split("+")]
        fast = fxforge.optimize(model, (ids,), kv_cache=True, disable=disable, verbose=False)
        cache = fast.kv_cache_for(1, ctx + 1)
        fast.run_cached(seq[:, :ctx], 0, pad, cache)

        def eager_step():
            fast.run_cached(seq[:, ctx:], ctx, pad, cache)

        row = {"variant": variant, "eager_ms": step_ms(eager_step, device, repeat=10)}
        if fast.uses_static_decode():
            static = fast.static_step(cache, 1)
            row["static_ms"] = step_ms(lambda: static(seq[:, ctx:], ctx, pad), device)
        summary.append(row)
        print(f"\n== {variant}: static step {row.get('static_ms', float('nan')):.3f} ms, "
              f"eager step {row['eager_ms']:.2f} ms (context {ctx}, {args.dtype}, {device})", flush=True)
        for name, us, calls in kernel_table(eager_step, device, args.top):
            print(f"  {us:9.1f} us  x{calls:<4d} {name[:110]}")
        fast.release_kv_cache(cache)
    print("\n| variant | static step (ms) | eager step (ms) |\n|---|---|---|")
    for r in summary:
        print(f"| {r['variant']} | {r.get('static_ms', float('nan')):.3f} | {r['eager_ms']:.2f} |")


if __name__ == "__main__":
    main()
