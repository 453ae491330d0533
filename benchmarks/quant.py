"""Full-model decode speed with quantized weights: tokens/s of fast.generate for float vs
int8 / int4 / nf4 / w8a8, side by side in one run, and torchao's weight-only `quantize_`
with transformers' generate where torchao imports. Per-layer kernel times (batch 1 and 16)
are in benchmarks/quant_linear.py (GPU).

    python benchmarks/quant.py [--model smollm2|llama-1b] [--dtype float16] [--schemes int8 int8/bf16 int4/g64]
                               [--tokens 64] [--out f.json]

On a GPU (Triton backend) the targets are int8 >= 1.6x and int4 >= 2.2x fp16 decode
tokens/s at batch 1 for a >= 1B model (`--model llama-1b --dtype float16`). On the CPU
(torch backend) it shows what the quantized path costs or gains there.
"""
import argparse
import copy
import os
import re
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import fxforge  # noqa: E402
from decode import DTYPES, load, timed  # noqa: E402
from fxforge.passes.quantize import QuantConfig  # noqa: E402
from report import finish  # noqa: E402


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def config_of(label: str) -> QuantConfig:
    """A scheme label: the scheme, then "/"-separated modifiers: gN group size, fz a float
    zero point (int4), tX the outlier threshold (w8a8), bf16 / fp16 the compute dtype.
    E.g. "int4/g64", "w8a8/t4", "int8/bf16"."""
    scheme, *mods = label.split("/")
    unknown = [m for m in mods if not (re.fullmatch(r"g\d+|t[\d.]+", m) or m == "fz" or m in COMPUTE_DTYPES)]
    if unknown:
        raise ValueError(f"scheme label {label!r}: unknown modifier(s) {unknown}; known: gN, tX, fz, "
                         f"{', '.join(COMPUTE_DTYPES)}")
    group = next((int(m[1:]) for m in mods if m.startswith("g")), None)
    threshold = next((float(m[1:]) for m in mods if m.startswith("t")), 6.0)
    compute = next((COMPUTE_DTYPES[m] for m in mods if m in COMPUTE_DTYPES), None)
    return QuantConfig(scheme, group_size=group, zero_point="float" if "fz" in mods else "int",
                       threshold=threshold, compute_dtype=compute)


def torchao_generate(model, ids, n, device, repeat):
    """transformers' generate on a torchao int8 weight-only copy, or the reason it cannot run."""
    try:
        from torchao.quantization import quantize_
        try:
            from torchao.quantization import Int8WeightOnlyConfig as int8_config
        except ImportError:
            from torchao.quantization import int8_weight_only as int8_config
    except Exception as e:  # noqa: BLE001 - any import failure means "skip torchao"
        return f"torchao not importable ({type(e).__name__})"
    q = copy.deepcopy(model)
    quantize_(q, int8_config())
    return n / timed(lambda: q.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False), device, repeat)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama-1b"])
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: float16 on GPU, float32 on CPU")
    ap.add_argument("--schemes", nargs="*", default=["int8", "int4/g64", "nf4", "w8a8"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    model, ids = load(args.model, device, dtype)
    n = args.tokens

    def tokens_per_s(fast):
        return n / timed(lambda: fast.generate(ids, n, eos_token_id=None), device, args.repeat)

    base = tokens_per_s(fxforge.optimize(model, (ids,), kv_cache=True))
    rows = [{"variant": f"fxforge {str(dtype)[6:]}", "tokens_per_s": base, "vs_float": 1.0}]
    for label in args.schemes:
        fast = fxforge.optimize(model, (ids,), kv_cache=True, quantize=config_of(label))
        d = next(s for s in fast.stats if s.name == "quantize").details["quantize"]
        tps = tokens_per_s(fast)
        rows.append({"variant": f"fxforge {label}", "tokens_per_s": tps, "vs_float": tps / base,
                     "layers": len(d["layers"]), "bytes_ratio": d["bytes_after"] / d["bytes_before"]})
    hf = n / timed(lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False), device,
                   args.repeat)
    rows.append({"variant": "transformers generate (float)", "tokens_per_s": hf, "vs_float": hf / base})
    ao = torchao_generate(model, ids, n, device, args.repeat)
    if isinstance(ao, str):
        print(f"torchao: skipped, {ao}")
    else:
        rows.append({"variant": "torchao int8 weight-only + transformers generate", "tokens_per_s": ao,
                     "vs_float": ao / base})
    print(f"\n{args.model} on {device}, {str(dtype)[6:]}, batch 1, {n} new tokens\n")
    print("| variant | tokens/s | vs fxforge float | layers quantized | weight bytes vs float |")
    print("|---|---|---|---|---|")
    for r in rows:
        extra = f"{r['layers']} | {r['bytes_ratio']:.3f}" if "layers" in r else "- | -"
        print(f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['vs_float']:.2f}x | {extra} |")
    finish(rows, args.out)


if __name__ == "__main__":
    main()
