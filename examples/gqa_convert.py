"""Convert SmolLM2-135M from 3 to 1 key/value heads with the gqa pass, "mean" (the GQA
paper's pooling) vs "aligned" (calibrated merging), and compare perplexity, the error the
report gives per layer, and the KV cache size. No uptraining: expect a large loss, and
"aligned" to lose far less than "mean".

    python examples/gqa_convert.py [--kv-heads 1] [--calibration-tokens 256] [--layers N]
"""
import argparse
import os
import sys

import torch

import fxforge
from fxforge.evaluate import perplexity
from fxforge.passes.gqa import GQAConfig

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from quickstart import load_smollm2  # noqa: E402

TEXT = os.path.join(HERE, "..", "tests", "data", "eval_text.txt")


def first_layers(model, n: int):
    """The model with only its first `n` decoder layers (each layer converts the same way)."""
    layers = model.model.layers
    if not 0 < n <= len(layers):
        sys.exit(f"--layers {n}: this model has {len(layers)} layers; give 1 to {len(layers)}")
    model.model.layers = layers[:n]
    model.config.num_hidden_layers = n
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--calibration-tokens", type=int, default=256)
    ap.add_argument("--held-out-tokens", type=int, default=512, help="perplexity is measured on these")
    ap.add_argument("--layers", type=int, default=None,
                    help="convert only the first N of the 30 layers (a quick run of the same conversion: "
                         "the perplexities are then those of the cut model)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok = load_smollm2()
    if args.layers is not None:
        model = first_layers(model, args.layers)
        print(f"(the first {args.layers} layers only: the perplexities below are the cut model's, not SmolLM2's)")
    ids = tok(open(TEXT).read(), return_tensors="pt").input_ids
    calib = ids[:, :args.calibration_tokens]
    held_out = ids[:, args.calibration_tokens:args.calibration_tokens + args.held_out_tokens]  # not calibrated on

    captures = fxforge.CaptureCache()  # the three optimize() calls below capture the model once
    base = fxforge.optimize(model, (ids[:, :8],), kv_cache=True, capture_cache=captures)
    print(f"unconverted: perplexity {perplexity(base, held_out):.2f}, "
          f"KV cache {base.kv_layout.bytes_per_token} bytes/token")
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    for method in ("mean", "aligned"):
        cfg = GQAConfig(args.kv_heads, method, calibration=calib)
        fast = fxforge.optimize(model, (ids[:, :8],), gqa=cfg, kv_cache=True, capture_cache=captures)
        details = next(s for s in fast.stats if s.name == "gqa").details["gqa"]
        errors = [layer["rel_error"] for layer in details["layers"]]
        print(f"{method:>8}: perplexity {perplexity(fast, held_out):.2f}, KV cache "
              f"{fast.kv_layout.bytes_per_token} bytes/token, attention error per layer "
              f"{min(errors):.2f}..{max(errors):.2f} (mean {sum(errors) / len(errors):.2f})")
        text = tok.decode(fast.generate(prompt, 12)[0, prompt.shape[1]:], skip_special_tokens=True)
        print(f"{'':>10}generates: {text!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
