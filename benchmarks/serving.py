"""Serving throughput: fxforge's continuous-batching engine against transformers' generate
in padded static batches, and against fxforge's generate one request at a time, on the
same requests in one run; and the KV cache memory each holds: the engine on a dense
cache (max_batch rows of the longest request) and on a paged one (blocks handed out per
request as it grows, KVCacheConfig(layout="paged")), whose KV waste (slots handed out that
hold no token, averaged over the decode steps) is the issue's target (< 5%).

Workload: `--requests` prompts (random token ids, lengths uniform in --prompt-lens) each
asking for a fixed number of new tokens (uniform in --output-lens), greedy, no EOS (every
request runs to its own length). Throughput counts only the tokens requests asked for: a
padded static batch generates its longest request's length for every row, and the surplus
is waste, not throughput.

    python benchmarks/serving.py [--model smollm2|smollm2-random|tiny] [--requests 32]
        [--prompt-lens 16,512] [--output-lens 16,256] [--max-batch 8] [--layouts dense,paged]
        [--block-size 16] [--paged-max-batch N] [--device cpu|cuda|auto] [--dtype bfloat16]
        [--skip-alone] [--skip-transformers] [--packed-mb N] [--out f.json]

`--packed-mb N` (CPU) gives the engine's model N MiB of oneDNN-packed weight copies for
steps of 2-32 rows (`TorchBackend("cpu", few_rows_packed_mb=N)`, runtime/cpu_linear.py):
one copy per weight, SmolLM2's lm_head 108 MiB.

`--model tiny` (a 2-layer random Llama) measures the KV memory figures in seconds: they
depend on the workload and the scheduling, not on the model.
"""
import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import fxforge  # noqa: E402
from fxforge.passes.kv_cache import KVCacheConfig  # noqa: E402
from fxforge.runtime.backends.torch_backend import TorchBackend  # noqa: E402
from fxforge.ir import roles  # noqa: E402
from decode import load  # noqa: E402
from report import finish  # noqa: E402


def workload(n, prompt_lens, output_lens, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = prompt_lens
    prompts = [torch.randint(1, vocab, (int(k),), generator=gen) for k in torch.randint(lo, hi + 1, (n,), generator=gen)]
    lo, hi = output_lens
    outputs = [int(k) for k in torch.randint(lo, hi + 1, (n,), generator=gen)]
    return prompts, outputs


def run_engine(fast, prompts, outputs, max_batch, capacity, pool_rows=None):
    """A paged engine gets the dense engine's memory as its pool (`pool_rows` rows of
    `capacity`, default max_batch rows); with max_batch above pool_rows it runs as many
    requests at once as their blocks fit in that same memory."""
    blocks = None
    if roles.is_paged(fast.graph):
        from fxforge.runtime.block_allocator import blocks_for
        from fxforge.runtime.paged_cache import block_size_of

        blocks = (pool_rows or max_batch) * blocks_for(capacity, block_size_of(fast.graph))
    engine = fxforge.Engine(fast, max_batch=max_batch, max_seq_len=capacity, **({"num_blocks": blocks} if blocks else {}))
    t0 = time.perf_counter()
    requests = [engine.submit(p, n, eos_token_id=None) for p, n in zip(prompts, outputs)]  # as run_alone
    engine.run()
    seconds = time.perf_counter() - t0
    stats = engine.stats()
    engine.close()
    return seconds, [r.result() for r in requests], stats


def run_transformers_batches(model, prompts, outputs, batch):
    """Left-padded static batches in submission order, each generating its longest request."""
    t0 = time.perf_counter()
    results, padded_positions = [], 0
    for i in range(0, len(prompts), batch):
        group, wants = prompts[i:i + batch], outputs[i:i + batch]
        width, new = max(p.numel() for p in group), max(wants)
        ids = torch.zeros(len(group), width, dtype=torch.long, device=model.device)
        mask = torch.zeros(len(group), width, dtype=torch.long, device=model.device)
        for r, p in enumerate(group):
            ids[r, width - p.numel():] = p
            mask[r, width - p.numel():] = 1
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        results += [out[r, width:width + wants[r]] for r in range(len(group))]
        padded_positions += len(group) * (width + new)
    return time.perf_counter() - t0, results, padded_positions


def _cpu(tensors):
    return [t.cpu() for t in tensors]


def run_alone(fast, prompts, outputs):
    t0 = time.perf_counter()
    results = [fast.generate(p[None].to(fast.device), n, eos_token_id=None)[0, p.numel():]
               for p, n in zip(prompts, outputs)]
    return time.perf_counter() - t0, results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "smollm2-random", "tiny"])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-lens", default="16,512")
    ap.add_argument("--output-lens", default="16,256")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--skip-alone", action="store_true", help="leave out the one-at-a-time run (the slowest)")
    ap.add_argument("--skip-transformers", action="store_true", help="leave out transformers' padded batches")
    ap.add_argument("--layouts", default="dense,paged", help="the engine's KV cache layouts to run")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per block of the paged layout")
    ap.add_argument("--paged-max-batch", type=int, default=None,
                    help="rows the paged engine may run at once in the dense engine's memory (default: --max-batch); "
                         "paging fits more requests in the same KV memory, which is where its throughput comes from")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when there is one)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--packed-mb", type=float, default=0,
                    help="CPU: MiB of oneDNN-packed weight copies for 2-32-row steps (0: none, the default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    model, ids = load_tiny() if args.model == "tiny" else load(args.model, device, dtype)
    prompt_lens = tuple(int(x) for x in args.prompt_lens.split(","))
    output_lens = tuple(int(x) for x in args.output_lens.split(","))
    prompts, outputs = workload(args.requests, prompt_lens, output_lens, model.config.vocab_size)
    layouts = args.layouts.split(",")
    capacity = max(p.numel() + n for p, n in zip(prompts, outputs))
    useful = sum(outputs)
    held = sum(p.numel() + n for p, n in zip(prompts, outputs))
    print(f"{args.model} on {device} ({args.dtype}): {args.requests} requests, prompts {prompt_lens}, "
          f"outputs {output_lens}, "
          f"{useful} new tokens asked for, {torch.get_num_threads()} threads")

    rows, engine_out, memory = [], None, []
    for layout in layouts:
        config = KVCacheConfig(layout=layout, block_size=args.block_size) if layout == "paged" else True
        options = {"backend": TorchBackend(device, few_rows_packed_mb=args.packed_mb)} if args.packed_mb else {}
        fast = fxforge.optimize(model, (ids,), kv_cache=config, **options)
        rows_at_once = args.paged_max_batch or args.max_batch if layout == "paged" else args.max_batch
        if device.type == "cuda":  # compile and autotune the kernels before the clock starts
            t_warm = time.perf_counter()
            run_engine(fast, prompts[:rows_at_once], [4] * min(rows_at_once, len(prompts)), rows_at_once, capacity,
                       pool_rows=args.max_batch)
            print(f"{layout} engine warm-up (kernel compiles, not timed): {time.perf_counter() - t_warm:.1f} s")
        t_engine, out, stats = run_engine(fast, prompts, outputs, rows_at_once, capacity, pool_rows=args.max_batch)
        if engine_out is None:
            engine_out, first_fast = out, fast
        else:
            print(f"{layout} engine answers identical to the {layouts[0]} engine's: "
                  f"{sum(torch.equal(a, b) for a, b in zip(_cpu(engine_out), _cpu(out)))} of {len(prompts)}")
        dense_alloc = args.max_batch * capacity
        peak_alloc = stats["peak_allocated_blocks"] * stats["block_size"] if layout == "paged" else dense_alloc
        rows.append({"contender": f"fxforge Engine, {layout} KV cache (max_batch {rows_at_once}, KV memory of "
                                  f"{args.max_batch} max-length rows)",
                     "seconds": t_engine, "kv_positions_allocated": peak_alloc,
                     "kv_positions_peak_used": stats["peak_cached_tokens"], "kv_waste": stats["kv_waste"]})
        memory.append((layout, peak_alloc, dense_alloc, stats))
        print(f"{layout} engine: {t_engine:.1f} s, {useful / t_engine:.1f} tokens/s")  # seen even if a later run times out
    t_hf = None
    if not args.skip_transformers:
        t_hf, hf_out, padded = run_transformers_batches(model, prompts, outputs, args.max_batch)
        print(f"transformers padded batches: {t_hf:.1f} s, {useful / t_hf:.1f} tokens/s")
        rows.append({"contender": f"transformers generate, padded batches of {args.max_batch}", "seconds": t_hf,
                     "kv_positions_allocated": args.max_batch * (max(p.numel() for p in prompts) + max(outputs)),
                     "kv_positions_peak_used": None, "padded_positions_total": padded})
        same_hf = sum(torch.equal(a, b) for a, b in zip(_cpu(engine_out), _cpu(hf_out)))
        print(f"engine answers identical to transformers' padded batches: {same_hf} of {len(prompts)}")
    if not args.skip_alone:
        t_alone, alone_out = run_alone(first_fast, prompts, outputs)
        rows.append({"contender": "fxforge generate, one request at a time", "seconds": t_alone,
                     "kv_positions_allocated": capacity, "kv_positions_peak_used": None})
        same_alone = sum(torch.equal(a, b) for a, b in zip(_cpu(engine_out), _cpu(alone_out)))
        print(f"engine answers identical to generate() alone: {same_alone} of {len(prompts)}")
    print("\n| contender | seconds | tokens/s | requests/s | vs transformers batches |\n|---|---|---|---|---|")
    for r in rows:
        r["tokens_per_s"] = useful / r["seconds"]
        r["requests_per_s"] = len(prompts) / r["seconds"]
        vs = f"{t_hf / r['seconds']:.2f}x" if t_hf else "-"
        print(f"| {r['contender']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | {vs} |")
    print(f"\nKV cache ({held} prompt + output tokens in all; positions = tokens of K and V in every layer):")
    print("| engine cache | positions allocated (peak) | vs dense max-length allocation | peak holding tokens | "
          "waste (avg over decode steps) |\n|---|---|---|---|---|")
    for layout, peak_alloc, dense_alloc, stats in memory:
        print(f"| {layout} | {peak_alloc} | {100 * peak_alloc / dense_alloc:.0f}% | {stats['peak_cached_tokens']} | "
              f"{100 * stats['kv_waste']:.1f}% |")
    finish(rows, args.out)


def load_tiny():
    """A 2-layer random Llama (the KV memory figures do not depend on the model's size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval(), torch.randint(0, 256, (1, 6))


if __name__ == "__main__":
    main()
