"""GQA conversion quality (CPU is enough): perplexity on the repo's fixed English text
(tests/data/eval_text.txt) for "mean" vs "aligned", on SmolLM2-135M real weights (3 -> 1
KV heads), on a GPT-2 with random weights (12 heads -> 6 and 3), and on a byte-level
GPT-2 trained here from random init (tests/trained_gpt2.py; 12 heads -> 6 and 3), where
perplexity means something, unlike on random weights.

Calibration uses the first 512 tokens of the text (the byte-level model: the first 2048
bytes); perplexity is measured on the rest, so the aligned method is not scored on the
text it was fitted to. The byte-level model's perplexity is per byte.

    python benchmarks/gqa_quality.py [--out results.json]
"""
import argparse
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

import fxforge  # noqa: E402
from fxforge.evaluate import perplexity  # noqa: E402
from fxforge.passes.gqa import GQAConfig  # noqa: E402
from report import finish  # noqa: E402

TEXT = os.path.join(HERE, "..", "tests", "data", "eval_text.txt")
CALIBRATION_TOKENS = 512
# The byte-level model: about as much text as SmolLM2's 512 tokens, as rows of its context
CALIBRATION_BYTES = 2048


def random_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024,
                     attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg).eval()


def kl_and_entropy(reference, model, ids, window=1024) -> tuple[float, float]:
    """Mean KL(reference || model) of the next-token distributions over `ids` (how far the
    converted model's predictions moved, meaningful for random weights too), and the mean
    entropy of the model's predictions (a uniform guess has ln(vocab))."""
    kl, entropy, count = 0.0, 0.0, 0
    for start in range(0, ids.shape[1], window):
        chunk = ids[:, start:start + window]
        p = torch.log_softmax(reference(chunk).logits.float(), -1)
        q = torch.log_softmax(model(chunk).logits.float(), -1)
        kl += (p.exp() * (p - q)).sum().item()
        entropy -= (q.exp() * q).sum().item()
        count += chunk.shape[1]
    return kl / count, entropy / count


def noise_control(reference, held_out, sigmas=(0.005, 0.01, 0.02, 0.04), seeds=(1, 2)) -> list[dict]:
    """What raw perplexity does on the random GPT-2 when its K/V projections get plain
    Gaussian noise instead of a conversion: rows of (sigma, seed, KL, perplexity). If the
    perplexity moves up or down with the noise seed, by more as the KL grows, then a
    conversion's perplexity on this model says how much it moved, not how well."""
    import copy

    rows = []
    n_embd = reference.config.n_embd
    for sigma in sigmas:
        for seed in seeds:
            noisy = copy.deepcopy(reference)
            gen = torch.Generator().manual_seed(seed)
            for block in noisy.transformer.h:
                kv = block.attn.c_attn.weight[:, n_embd:]  # Conv1D [in, 3*out]: q | k | v columns
                kv += sigma * torch.randn(kv.shape, generator=gen)
            kl, _ = kl_and_entropy(reference, noisy, held_out)
            rows.append({"sigma": sigma, "seed": seed, "kl": kl, "ppl": perplexity(noisy, held_out)})
            print(rows[-1], flush=True)
    return rows


def compare(label, m, example, calib, held_out, targets, window=1024) -> list[dict]:
    """One row per target KV head count: perplexity, KL and entropy on `held_out` of the
    unconverted model and of its "mean" and "aligned" conversions (fitted on `calib`), in
    windows of `window` tokens (the model's context at most)."""
    reference = fxforge.optimize(m, (example,))
    base = perplexity(reference, held_out, window=window)
    _, base_entropy = kl_and_entropy(reference, reference, held_out, window=window)
    rows = []
    for g in targets:
        row = {"model": label, "ppl_base": base, "entropy_base": base_entropy,
               "entropy_uniform": math.log(m.config.vocab_size)}
        for method in ("mean", "aligned"):
            fast = fxforge.optimize(m, (example,), gqa=GQAConfig(g, method, calibration=calib))
            d = next(s for s in fast.stats if s.name == "gqa").details["gqa"]
            row[f"ppl_{method}"] = perplexity(fast, held_out, window=window)
            row[f"kl_{method}"], row[f"entropy_{method}"] = kl_and_entropy(reference, fast, held_out, window=window)
            row[f"err_{method}"] = sum(x["rel_error"] for x in d["layers"]) / len(d["layers"])
            row["kv_heads"] = "{} -> {}".format(*d["layers"][0]["kv_heads"])
            row["kv_bytes"] = (sum(x["kv_bytes_per_token"][0] for x in d["layers"]),
                               sum(x["kv_bytes_per_token"][1] for x in d["layers"]))
        rows.append(row)
        print(row, flush=True)
    return rows


def trained_rows() -> tuple[list[dict], dict]:
    """The byte-level GPT-2 trained here (tests/trained_gpt2.py; trained on the first run,
    then loaded from the cache): rows at 12 -> 6 and 12 -> 3, and how it was trained."""
    import dataclasses
    import time

    from trained_gpt2 import BENCHMARK_SPEC, bigram_perplexity, cache_path, corpus_bytes, trained_byte_gpt2

    cached = os.path.exists(cache_path(BENCHMARK_SPEC, corpus_bytes()))
    start = time.perf_counter()
    model, encode = trained_byte_gpt2(BENCHMARK_SPEC, verbose=True)
    info = {"spec": dataclasses.asdict(BENCHMARK_SPEC), "seconds": time.perf_counter() - start, "from_cache": cached}
    ids = encode(open(TEXT).read())
    window = BENCHMARK_SPEC.n_positions
    calib = ids[:, :CALIBRATION_BYTES].reshape(-1, window)  # rows of the model's context length
    held_out = ids[:, CALIBRATION_BYTES:]
    info["held_out_bytes"] = held_out.shape[1]
    info["bigram_ppl"] = bigram_perplexity(held_out)  # the bar: a table of byte pairs of the same corpus
    label = f"GPT-2 (trained here, bytes, {BENCHMARK_SPEC.n_layer} layers)"
    return compare(label, model, ids[:, :8], calib, held_out, [6, 3], window=window), info


def measure():
    import zoo

    model, tok = zoo.smollm2()
    ids = tok(open(TEXT).read(), return_tensors="pt").input_ids
    calib, held_out = ids[:, :CALIBRATION_TOKENS], ids[:, CALIBRATION_TOKENS:]
    rows = compare("SmolLM2-135M", model, ids[:, :8], calib, held_out, [1])
    rows += compare("GPT-2 (random, 4 layers)", random_gpt2(), ids[:, :8], calib, held_out, [6, 3])
    control = noise_control(random_gpt2(), held_out)
    trained, info = trained_rows()
    return rows + trained, control, held_out.shape[1], info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    rows, control, n, trained = measure()
    print(f"\ntrained byte-level GPT-2: {trained['spec']}, "
          f"{'loaded from the cache' if trained['from_cache'] else 'trained'} in {trained['seconds']:.0f} s; "
          f"a table of byte pairs counted on its training text: {trained['bigram_ppl']:.2f} per byte")
    print(f"\nperplexity on {n} held-out tokens of tests/data/eval_text.txt (calibration: the first "
          f"{CALIBRATION_TOKENS}); the byte-level GPT-2: per byte, on {trained['held_out_bytes']} held-out bytes "
          f"(calibration: the first {CALIBRATION_BYTES})\n")
    print("| model | KV heads | KV cache bytes/token | perplexity: unconverted | mean | aligned | "
          "KL to unconverted (nats/token): mean | aligned | attention rel. error: mean | aligned |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['kv_heads']} | {r['kv_bytes'][0]} -> {r['kv_bytes'][1]} | {r['ppl_base']:.2f} | "
              f"{r['ppl_mean']:.2f} | {r['ppl_aligned']:.2f} | {r['kl_mean']:.4f} | {r['kl_aligned']:.4f} | "
              f"{r['err_mean']:.3f} | {r['err_aligned']:.3f} |")
    print("\nmean entropy of the next-token predictions (nats; a uniform guess: ln(vocab))\n")
    print("| model | KV heads | uniform | unconverted | mean | aligned |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['kv_heads']} | {r['entropy_uniform']:.3f} | {r['entropy_base']:.3f} | "
              f"{r['entropy_mean']:.3f} | {r['entropy_aligned']:.3f} |")
    print("\ncontrol: random GPT-2 with Gaussian noise on its K/V projections instead of a conversion\n")
    print("| noise sigma | seed | KL to unconverted | perplexity |")
    print("|---|---|---|---|")
    for r in control:
        print(f"| {r['sigma']} | {r['seed']} | {r['kl']:.4f} | {r['ppl']:.0f} |")
    finish(rows + [{"noise_control": control}, {"trained_byte_gpt2": trained}], args.out)


if __name__ == "__main__":
    main()
