"""Quantization quality and memory on SmolLM2-135M (CPU is enough): perplexity on the
repo's fixed English text (tests/data/eval_text.txt) for float32 and each scheme, and the
weight bytes of the quantized layers before/after (scales and zero points included).

    python benchmarks/quant_quality.py [--schemes int8 w8a8 int4 int4/g64 nf4 nf4/g32] [--out results.json]

A scheme "int4/g64" sets the group size (int4 defaults to 128, nf4 to 64); "/fz" asks int4
for a float zero point (the group's own range) instead of an integer one; "w8a8/t4" sets the
outlier threshold (default 6.0); "int8/bf16" runs the quantized products in bfloat16
(QuantConfig's compute_dtype). The labels are parsed by benchmarks/quant.py's config_of.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

import fxforge  # noqa: E402
from fxforge.evaluate import perplexity  # noqa: E402
from quant import config_of  # noqa: E402

TEXT = os.path.join(HERE, "..", "tests", "data", "eval_text.txt")
TARGETS = {"int8": 1.0, "w8a8": 2.0, "int4": 10.0, "nf4": 10.0}  # max perplexity increase, percent


def measure(schemes):
    import zoo

    model, tok = zoo.smollm2()
    ids = tok(open(TEXT).read(), return_tensors="pt").input_ids
    base = fxforge.optimize(model, (ids[:, :8],))
    rows = [{"scheme": "float32", "ppl": perplexity(base, ids), "tokens": ids.shape[1]}]
    for label in schemes:
        cfg = config_of(label)
        scheme = cfg.scheme
        fast = fxforge.optimize(model, (ids[:, :8],), quantize=cfg)
        d = next(s for s in fast.stats if s.name == "quantize").details["quantize"]
        ppl = perplexity(fast, ids)
        rows.append({"scheme": label, "ppl": ppl, "delta_pct": 100 * (ppl / rows[0]["ppl"] - 1),
                     "target_pct": TARGETS[scheme], "bytes_ratio": d["bytes_after"] / d["bytes_before"],
                     "layers": len(d["layers"]), "skipped": len(d["skipped"])})
    return rows


from report import finish  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", nargs="*", default=["int8", "w8a8", "int4", "int4/g64", "int4/g32", "int4/g64/fz",
                                                     "int4/g32/fz", "nf4", "nf4/g32"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    rows = measure(args.schemes)
    print(f"\nperplexity of SmolLM2-135M on tests/data/eval_text.txt ({rows[0]['tokens']} tokens)\n")
    print("| scheme | perplexity | change | target | weight bytes vs fp32 | layers quantized (skipped) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["scheme"] == "float32":
            print(f"| float32 | {r['ppl']:.3f} | - | - | 1.000 | - |")
        else:
            ok = "met" if r["delta_pct"] <= r["target_pct"] else "MISSED"
            print(f"| {r['scheme']} | {r['ppl']:.3f} | {r['delta_pct']:+.2f}% | <= +{r['target_pct']:.0f}% ({ok}) | "
                  f"{r['bytes_ratio']:.3f} | {r['layers']} ({r['skipped']}) |")
    finish(rows, args.out)


if __name__ == "__main__":
    main()
