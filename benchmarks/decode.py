"""Decoding speed with and without the KV cache, and fast.generate() against transformers'
generate, side by side in one run.

1. Per-token latency at context 32, 256, 1024: one decode step of the cached graph
   (fxforge, kv_cache=True) vs recomputing the whole sequence (fxforge without a cache,
   and eager transformers without a cache). With the cache it must stay nearly flat.
2. Tokens/s of generating N tokens after a short prompt: fast.generate vs transformers'
   generate (its own dynamic cache), and, with --compile, torch.compile over a static
   cache (the transformers recipe; slow to compile on CPU).

    python benchmarks/decode.py [--model smollm2|smollm2-random|llama-1b] [--tokens 64] [--quantize int8]
                                [--dtype float32|float16|bfloat16] [--compile] [--out f.json]

Runs on the GPU when there is one (the Triton backend), else on the CPU (torch backend).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxforge  # noqa: E402
from report import finish  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load(name: str, device, dtype):
    if name == "smollm2":
        import zoo

        model, tok = zoo.smollm2()
        ids = tok("The capital of France is", return_tensors="pt").input_ids
    elif name == "smollm2-random":  # SmolLM2-135M's shapes, random weights (speed only; no GGUF needed)
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                          rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
        ids = torch.randint(0, cfg.vocab_size, (1, 6))
    else:  # a ~1B Llama with random weights (speed only): the shape of Llama-3.2-1B
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                          tie_word_embeddings=True)
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
        ids = torch.randint(0, cfg.vocab_size, (1, 6))
    model = model.to(device=device, dtype=dtype).eval()
    return model, ids.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def once(fn, device) -> float:
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def timed(fn, device, repeat):
    """Best of `repeat` after a warm-up call."""
    fn()
    sync(device)
    return min(once(fn, device) for _ in range(repeat))


def per_token_latency(model, cached, plain, vocab, device, contexts, repeat):
    rows = []
    pad = torch.zeros(1, dtype=torch.long, device=device)
    for ctx in contexts:
        seq = torch.randint(0, vocab, (1, ctx + 1), device=device)
        cache = cached.kv_cache_for(1, ctx + 1)
        cached.run_cached(seq[:, :ctx], 0, pad, cache)  # prefill the context once

        def step():
            cached.run_cached(seq[:, ctx:], ctx, pad, cache)  # decode token ctx (rewrites slot ctx)

        row = {"context": ctx, "cached_ms": timed(step, device, repeat) * 1e3}
        if cached.uses_static_decode():  # the step generate() runs: static buffers (a CUDA graph on a GPU)
            static = cached.static_step(cache, 1)
            row["static_step_ms"] = timed(lambda: static(seq[:, ctx:], ctx, pad), device, repeat) * 1e3
        row.update({"fxforge_recompute_ms": timed(lambda: plain(seq), device, repeat) * 1e3,
                    "eager_recompute_ms": timed(lambda: model(seq), device, repeat) * 1e3})
        cached.release_kv_cache(cache)
        rows.append(row)
        static = f", static step {row['static_step_ms']:8.2f} ms" if "static_step_ms" in row else ""
        print(f"context {ctx:5d}: cached step {row['cached_ms']:8.2f} ms{static} | recompute: fxforge "
              f"{row['fxforge_recompute_ms']:8.2f} ms, eager {row['eager_recompute_ms']:8.2f} ms", flush=True)
    return rows


def generate_speed(model, cached, ids, n, device, repeat, compile_static):
    """Tokens/s of each contender, timed in interleaved rounds (fxforge, transformers,
    fxforge, ...) and reported as the median: on a shared machine the memory bandwidth
    drifts over minutes, and back-to-back blocks would credit the drift to one side.
    torch.compile's contender comes last, in rounds of its own after the others are
    printed: its compilation is the slow, fragile part, and must not cost the rest."""

    def ours():
        out = cached.generate(ids, n, eos_token_id=None)
        assert out.shape[1] == ids.shape[1] + n

    def ours_eager_steps():
        cached.static_decode = False
        try:
            ours()
        finally:
            cached.static_decode = None

    def hf():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert out.shape[1] == ids.shape[1] + n

    label = "fxforge (CUDA graphs)" if cached.uses_static_decode() and device.type == "cuda" else "fxforge"
    contenders = {label: ours, "transformers": hf}
    if label != "fxforge":
        contenders["fxforge (eager steps)"] = ours_eager_steps
    results = _rounds(contenders, n, device, repeat)
    if compile_static:
        # On CUDA transformers compiles its decoding forward itself (reduce-overhead, CUDA
        # graphs) when generate runs over a static cache; on the CPU it does not, so the
        # forward is swapped for a compiled one during this contender's calls only (the
        # plain contender must not run the compiled forward over a dynamic cache).
        compiled = None if device.type == "cuda" else torch.compile(model.forward)

        def hf_compiled():
            if compiled is not None:
                model.forward = compiled
            try:
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static")
            finally:
                if compiled is not None:
                    del model.forward

        try:
            more = _rounds({"transformers+torch.compile(static cache)": hf_compiled, label: ours}, n, device, repeat)
        except Exception as e:  # noqa: BLE001 - a compile failure is a result to report, not a crash
            print(f"transformers+torch.compile(static cache) failed: {type(e).__name__}: {str(e)[:300]}")
        else:
            name = "transformers+torch.compile(static cache)"
            results[name] = more[name]
            results["rounds"][name] = more["rounds"][name]
            print(f"{label} / torch.compile(static cache), same rounds: {more[label] / more[name]:.2f}x")
    for k, v in results.items():
        if k != "rounds":
            print(f"generate {n} tokens: {k:42s} {v:8.1f} tokens/s  ({v / results['transformers']:.2f}x transformers)")
    return results


def _rounds(contenders: dict, n: int, device, repeat: int) -> dict:
    for fn in contenders.values():  # warm up (and compile)
        fn()
    seconds = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            seconds[name].append(once(fn, device))
    results = {name: n / statistics.median(s) for name, s in seconds.items()}
    for name, v in results.items():
        print(f"  {name:42s} {v:8.1f} tokens/s (median of {repeat})", flush=True)
    results["rounds"] = {name: [n / x for x in s] for name, s in seconds.items()}
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "smollm2-random", "llama-1b"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--contexts", default="32,256,1024")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, ids = load(args.model, device, DTYPES[args.dtype])
    opts = {"quantize": args.quantize} if args.quantize else {}
    cached = fxforge.optimize(model, (ids,), kv_cache=True, **opts)
    plain = fxforge.optimize(model, (ids,), **opts)
    print(f"{args.model} on {device} ({args.dtype}{', ' + args.quantize if args.quantize else ''}), "
          f"backend {cached.backend}")
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = per_token_latency(model, cached, plain, model.config.vocab_size, device, contexts, args.repeat)
    speed = generate_speed(model, cached, ids, args.tokens, device, args.repeat, args.compile)
    finish([{"latency": rows, "tokens_per_s": speed, "model": args.model, "dtype": args.dtype,
             "quantize": args.quantize, "tokens": args.tokens}], args.out)


if __name__ == "__main__":
    main()
