"""Quantize SmolLM2-135M's linear layers to int8 (or int4/nf4/w8a8), generate with the KV
cache, and see what it cost: weight bytes from report(), perplexity on a slice of the
repo's text, and the generated text next to the float model's.

    python examples/quantize_and_generate.py [--scheme int8] [--compute-dtype bfloat16]
                                             [--prompt "..."] [--new-tokens 32] [--eval-tokens 256]

--compute-dtype bfloat16 runs the quantized products in bf16: on CPU, int8 then decodes
faster than the float32 model (docs/benchmarks.md).
"""
import argparse
import os
import sys

import torch

import fxforge
from fxforge.evaluate import perplexity
from fxforge.passes.quantize import QuantConfig

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from quickstart import load_smollm2  # noqa: E402

TEXT = os.path.join(HERE, "..", "tests", "data", "eval_text.txt")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scheme", default="int8", choices=["int8", "int4", "nf4", "w8a8"])
    ap.add_argument("--compute-dtype", default=None, choices=["bfloat16", "float16"])
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=256, help="perplexity is measured on these")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok = load_smollm2()
    ids = tok(args.prompt, return_tensors="pt").input_ids

    captures = fxforge.CaptureCache()  # both optimize() calls capture the model once
    float_model = fxforge.optimize(model, (ids,), kv_cache=True, capture_cache=captures)
    compute = getattr(torch, args.compute_dtype) if args.compute_dtype else None
    quant = fxforge.optimize(model, (ids,), kv_cache=True, quantize=QuantConfig(args.scheme, compute_dtype=compute),
                             capture_cache=captures)
    details = next(s for s in quant.stats if s.name == "quantize").details["quantize"]
    print(f"{args.scheme}: {len(details['layers'])} layers quantized, {len(details['skipped'])} skipped; "
          f"weight bytes {details['bytes_before'] / 2**20:.1f} MiB -> {details['bytes_after'] / 2**20:.1f} MiB "
          f"({details['bytes_after'] / details['bytes_before']:.3f}x)")

    text_ids = tok(open(TEXT).read(), return_tensors="pt").input_ids[:, :args.eval_tokens]
    ppl_float, ppl_quant = perplexity(float_model, text_ids), perplexity(quant, text_ids)
    print(f"perplexity on {text_ids.shape[1]} tokens of tests/data/eval_text.txt: float {ppl_float:.3f}, "
          f"{args.scheme} {ppl_quant:.3f} ({100 * (ppl_quant / ppl_float - 1):+.2f}%)")

    for label, fast in (("float32", float_model), (args.scheme, quant)):
        out = fast.generate(ids, args.new_tokens)
        print(f"{label:>8}: {tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
