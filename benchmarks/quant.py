"""Full-model decode speed with quantized weights: tokens/s of fast.generate for float vs
int8 / int4 / nf4 / w8a8, side by side in one run, and torchao's weight-only `quantize_`
(int8 per channel, int4 per group) with transformers' generate where torchao imports. Per-layer
kernel times (batch 1 and 16) are in benchmarks/quant_linear.py (GPU).

    python benchmarks/quant.py [--model smollm2|llama-1b] [--dtype float16] [--schemes int8 int8/bf16 int4/g64]
                               [--torchao int8 int4/g64] [--tokens 64] [--out f.json]
    python benchmarks/quant.py --tokens 0 --torchao --prefill 128 512 1024 [--keep-mb 1024] [--no-digits]
                               [--schemes int8 int4/g64 int8/bf16 int4/g64/bf16]

--prefill: one forward over a random prompt of each length (issue 20: a quantized model must
not be slower than the float one at prefill), every variant timed side by side, interleaved
(median of --repeat rounds after a warm-up), with the path its products take
(runtime/cpu_quant.py's report line). --keep-mb adds each scheme again with that many MiB of
dequantized weights kept (the torch backend's opt-in keep_dequantized_mb). --no-digits adds
each scheme again with the int8 digit path (runtime/cpu_int8_digits.py) turned off: what
int8 products cost before it, in the same rounds. --tokens 0 skips the decode table.

torchao quantizes the same layers as fxforge (every nn.Linear but lm_head). On the CPU its
int4 is the prototype `PrototypeInt4WeightOnlyConfig` (aten._weight_int4pack_mm_for_cpu,
pure PyTorch: torchao's own C++ extensions are not needed); elsewhere `Int4WeightOnlyConfig`.
Both use tinygemm's grid: asymmetric, scale = (max - min) / 15 and a float zero point per group.

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
from decode import DTYPES, load, once, timed  # noqa: E402
from fxforge.passes.quantize import DEFAULT_EXCLUDE, QuantConfig  # noqa: E402
from report import finish  # noqa: E402


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def config_of(label: str) -> QuantConfig:
    """A scheme label: the scheme, then "/"-separated modifiers: gN group size, fz a float
    zero point (int4), tX the outlier threshold (w8a8), bf16 / fp16 the compute dtype, head
    to quantize the lm_head too (a draft model's: it is the largest weight of a small model).
    E.g. "int4/g64", "w8a8/t4", "int8/bf16", "int4/bf16/head"."""
    scheme, *mods = label.split("/")
    unknown = [m for m in mods if not (re.fullmatch(r"g\d+|t[\d.]+", m) or m in ("fz", "head") or m in COMPUTE_DTYPES)]
    if unknown:
        raise ValueError(f"scheme label {label!r}: unknown modifier(s) {unknown}; known: gN, tX, fz, head, "
                         f"{', '.join(COMPUTE_DTYPES)}")
    group = next((int(m[1:]) for m in mods if m.startswith("g")), None)
    threshold = next((float(m[1:]) for m in mods if m.startswith("t")), 6.0)
    compute = next((COMPUTE_DTYPES[m] for m in mods if m in COMPUTE_DTYPES), None)
    head = {"exclude": tuple(p for p in DEFAULT_EXCLUDE if not p.startswith("lm_head")), "include_tied": True} \
        if "head" in mods else {}
    return QuantConfig(scheme, group_size=group, zero_point="float" if "fz" in mods else "int",
                       threshold=threshold, compute_dtype=compute, **head)


def not_lm_head(module, fqn: str) -> bool:
    """torchao quantize_'s filter for fxforge's layer set: every nn.Linear but lm_head (tied to the
    embedding in these models; fxforge's quantize pass skips it too)."""
    return isinstance(module, torch.nn.Linear) and fqn.rsplit(".", 1)[-1] != "lm_head"


def torchao_config(label: str, device):
    """torchao's weight-only config for a label "int8" (symmetric per output channel) or "int4/gN"
    (group N, default 128), or the reason there is none (a str)."""
    try:
        import torchao  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "skip torchao"
        return f"torchao not importable ({type(e).__name__}: {e})"
    cfg = config_of(label)
    try:
        if cfg.scheme == "int8":
            try:
                from torchao.quantization import Int8WeightOnlyConfig
            except ImportError:
                from torchao.quantization import int8_weight_only

                return int8_weight_only()
            return Int8WeightOnlyConfig(set_inductor_config=False)
        if cfg.scheme == "int4":
            group = cfg.group_size or 128
            if torch.device(device).type == "cpu":
                from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

                return PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False)
            from torchao.quantization import Int4WeightOnlyConfig

            return Int4WeightOnlyConfig(group_size=group, set_inductor_config=False)
    except Exception as e:  # noqa: BLE001
        return f"torchao {torchao.__version__} has no {label} weight-only config here ({type(e).__name__}: {e})"
    return f"no torchao counterpart for {label!r} (int8 and int4/gN only)"


def torchao_quantize(model, label: str, device):
    """A torchao-quantized deep copy of `model` (fxforge's layer set), with the quantized layer
    count and the bytes of those layers' weights after/before; or the reason it cannot be made."""
    from torchao.quantization import quantize_

    cfg = torchao_config(label, device)
    if isinstance(cfg, str):
        return cfg
    q = copy.deepcopy(model)
    try:
        quantize_(q, cfg, filter_fn=not_lm_head)
    except Exception as e:  # noqa: BLE001 - e.g. a kernel package this machine lacks
        return f"quantize_ failed ({type(e).__name__}: {str(e)[:200]})"
    layers, before, after = 0, 0, 0
    for fqn, mod in q.named_modules():
        if not_lm_head(mod, fqn) and type(mod.weight.data) is not torch.Tensor:  # a torchao tensor subclass
            w = mod.weight.data
            names, _ = w.__tensor_flatten__()
            layers += 1
            before += w.numel() * w.element_size()
            after += sum(getattr(w, k).numel() * getattr(w, k).element_size() for k in names
                         if getattr(w, k, None) is not None)
    return q, layers, after / max(before, 1)


def torchao_generate(model, ids, n, device, repeat, label="int8"):
    """transformers' generate on a torchao weight-only copy: (tokens/s, layers, bytes ratio), or
    the reason it cannot run (a str)."""
    try:
        import torchao  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "skip torchao"
        return f"torchao not importable ({type(e).__name__})"
    made = torchao_quantize(model, label, device)
    if isinstance(made, str):
        return made
    q, layers, ratio = made
    try:
        tps = n / timed(lambda: q.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False), device, repeat)
    except Exception as e:  # noqa: BLE001
        return f"generate failed ({type(e).__name__}: {str(e)[:200]})"
    return tps, layers, ratio


def quant_paths(fast) -> str:
    """What cpu_quant's report says about the paths of the quantized products ("-" if none)."""
    stats = [s for s in fast.runtime_stats if s.name == "cpu_quant"]
    return "; ".join(stats[0].notes) if stats else "-"


def without_digits(build):
    """build() with cpu_quant's int8 digit path off (as if oneDNN's quantized linear were missing)."""
    from unittest import mock

    from fxforge.runtime import cpu_int8_digits

    with mock.patch.object(cpu_int8_digits, "digits_available", lambda: False):
        return build()


def prefill_rows(model, ids, schemes, lengths, keep_mb, device, repeat, no_digits=False):
    """Seconds of one forward over a random prompt of each length, for the float model and
    each scheme (and each scheme with keep_mb MiB of dequantized weights kept, if > 0):
    all variants timed in one round, rounds repeated, the median per variant, so that
    load from other processes hits every variant alike. Prints a table; returns rows."""
    import statistics

    from fxforge.runtime.backends.torch_backend import TorchBackend

    variants = {"float": fxforge.optimize(model, (ids,), kv_cache=True)}
    for label in schemes:
        variants[label] = fxforge.optimize(model, (ids,), kv_cache=True, quantize=config_of(label))
        if no_digits and device.type == "cpu" and "int8 digits" in quant_paths(variants[label]):
            variants[f"{label} without digits"] = without_digits(
                lambda: fxforge.optimize(model, (ids,), kv_cache=True, quantize=config_of(label)))
        if keep_mb and device.type == "cpu":
            variants[f"{label} +kept {keep_mb:g} MiB"] = fxforge.optimize(
                model, (ids,), kv_cache=True, quantize=config_of(label),
                backend=TorchBackend(device, keep_dequantized_mb=keep_mb))
    rows = []
    for length in lengths:
        prompt = torch.randint(0, model.config.vocab_size, (1, length), device=device)
        seconds = {name: [] for name in variants}
        for fast in variants.values():
            fast(prompt)  # warm-up (and fills a keep_dequantized_mb cache)
        for _ in range(repeat):
            for name, fast in variants.items():
                seconds[name].append(once(lambda: fast(prompt), device))
        base = statistics.median(seconds["float"])
        for name, s in seconds.items():
            rows.append({"variant": name, "prefill_tokens": length, "prefill_s": statistics.median(s),
                         "vs_float": base / statistics.median(s), "seconds": s,
                         "paths": quant_paths(variants[name])})
    print(f"\nprefill: one forward over a random prompt, median of {repeat} interleaved rounds, "
          f"{torch.get_num_threads()} threads\n")
    print("| variant | " + " | ".join(f"{n} tokens (s) | speed vs float" for n in lengths) + " |")
    print("|---|" + "---|---|" * len(lengths))
    for name in variants:
        cells = [r for r in rows if r["variant"] == name]
        print(f"| {name} | " + " | ".join(f"{r['prefill_s']:.3f} | {r['vs_float']:.2f}x" for r in cells) + " |")
    print()
    for name, fast in variants.items():
        if name != "float":
            print(f"- {name}: {quant_paths(fast)}")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama-1b"])
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: float16 on GPU, float32 on CPU")
    ap.add_argument("--schemes", nargs="*", default=["int8", "int4/g64", "nf4", "w8a8"])
    ap.add_argument("--torchao", nargs="*", default=["int8", "int4/g64"],
                    help="torchao weight-only variants to time (int8, int4/gN); none to skip")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--prefill", type=int, nargs="*", default=[],
                    help="also time one forward over a prompt of each of these lengths (issue 20: a quantized "
                         "model must not be slower than the float one at prefill)")
    ap.add_argument("--keep-mb", type=float, default=0,
                    help="prefill: also each scheme with this many MiB of dequantized weights kept (opt-in)")
    ap.add_argument("--no-digits", action="store_true",
                    help="also each int8 scheme with the int8 digit path off (the paths before it)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    model, ids = load(args.model, device, dtype)
    n = args.tokens

    def tokens_per_s(fast):
        return n / timed(lambda: fast.generate(ids, n, eos_token_id=None), device, args.repeat)

    prefill = prefill_rows(model, ids, args.schemes, args.prefill, args.keep_mb, device, args.repeat,
                           args.no_digits) if args.prefill else []
    if not n:
        finish(prefill, args.out)
        return
    float_model = fxforge.optimize(model, (ids,), kv_cache=True)
    base = tokens_per_s(float_model)
    rows = [{"variant": f"fxforge {str(dtype)[6:]}", "tokens_per_s": base, "vs_float": 1.0}]
    del float_model
    for label in args.schemes:
        fast = fxforge.optimize(model, (ids,), kv_cache=True, quantize=config_of(label))
        d = next(s for s in fast.stats if s.name == "quantize").details["quantize"]
        tps = tokens_per_s(fast)
        rows.append({"variant": f"fxforge {label}", "tokens_per_s": tps, "vs_float": tps / base,
                     "layers": len(d["layers"]), "bytes_ratio": d["bytes_after"] / d["bytes_before"]})
        if args.no_digits and device.type == "cpu" and "int8 digits" in quant_paths(fast):
            del fast
            fast = without_digits(lambda: fxforge.optimize(model, (ids,), kv_cache=True, quantize=config_of(label)))
            tps = tokens_per_s(fast)
            rows.append({"variant": f"fxforge {label} without digits", "tokens_per_s": tps, "vs_float": tps / base,
                         "layers": len(d["layers"]), "bytes_ratio": d["bytes_after"] / d["bytes_before"]})
    hf = n / timed(lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False), device,
                   args.repeat)
    rows.append({"variant": "transformers generate (float)", "tokens_per_s": hf, "vs_float": hf / base})
    for label in args.torchao:
        ao = torchao_generate(model, ids, n, device, args.repeat, label)
        if isinstance(ao, str):
            print(f"torchao {label}: skipped, {ao}")
            continue
        tps, layers, ratio = ao
        import torchao

        rows.append({"variant": f"torchao {torchao.__version__} {label} weight-only + transformers generate",
                     "tokens_per_s": tps, "vs_float": tps / base, "layers": layers, "bytes_ratio": ratio})
    print(f"\n{args.model} on {device}, {str(dtype)[6:]}, batch 1, {n} new tokens\n")
    print("| variant | tokens/s | vs fxforge float | layers quantized | weight bytes vs float |")
    print("|---|---|---|---|---|")
    for r in rows:
        extra = f"{r['layers']} | {r['bytes_ratio']:.3f}" if "layers" in r else "- | -"
        print(f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['vs_float']:.2f}x | {extra} |")
    finish(prefill + rows, args.out)


if __name__ == "__main__":
    main()
