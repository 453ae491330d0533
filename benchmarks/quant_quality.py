"""Quantization quality and memory on SmolLM2-135M (CPU is enough): perplexity on the
repo's fixed English text (tests/data/eval_text.txt) for float32 and each scheme, and the
weight bytes of the quantized layers before/after (scales and zero points included).

    python benchmarks/quant_quality.py [--schemes int8 w8a8 int4 int4/g64 nf4 nf4/g32] [--out results.json]

A scheme "int4/g64" sets the group size (int4 defaults to 128, nf4 to 64); "/fz" asks int4
for a float zero point (the group's own range) instead of an integer one; "w8a8/t4" sets the
outlier threshold (default 6.0); "int8/bf16" runs the quantized products in bfloat16
(QuantConfig's compute_dtype). The labels are parsed by benchmarks/quant.py's config_of.

--references adds rows from other libraries, when they import (neither is a dependency): the
eager transformers model, with the same layers (every nn.Linear but lm_head) replaced by
  - bitsandbytes' quantize_4bit + dequantize_4bit (nf4 and fp4, blocks of 64 weights),
  - torchao's quantize_ (int8 weight-only per channel; int4 weight-only g128 / g64 / g32, the
    tinygemm grid: asymmetric with a float zero point per group). The perplexity is computed
    with each layer's dequantized weight, because torchao's CPU int4 kernel is too slow for
    1024-token windows in float32 (about 1 s for one 1536x576 layer at 576 rows on a 2-core
    CPU); every layer is checked against torchao's own kernel on a random 4-row input.
Their "change" is against the eager float32 model. It also compares the weights element-wise
with fxforge's: bitsandbytes nf4 against our nf4, torchao int4 against our int4 with a float
zero point (same group size).
"""
import argparse
import copy
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
    return rows, model, ids


# -- references: other libraries' quantizers on the eager model (--references) ---------------
def _linear_names(model):
    """(names of the layers fxforge quantizes: every nn.Linear but lm_head, count of all nn.Linear)."""
    from quant import not_lm_head

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return [n for n, m in linears if not_lm_head(m, n)], len(linears)


def _compare(a, b) -> dict:
    """How many elements differ at all, and by more than 1e-5 (float rounding aside: a 4-bit step
    of these weights is >= 1e-3), and the largest difference."""
    d = (a.float() - b.float()).abs()
    return {"elements": d.numel(), "differ": int((d > 0).sum()), "differ_1e-5": int((d > 1e-5).sum()),
            "max_abs_diff": float(d.max())}


def _merge(acc: dict, c: dict) -> dict:
    return {k: max(acc.get(k, 0.0), v) if k == "max_abs_diff" else acc.get(k, 0) + v for k, v in c.items()}


def _same_line(same: dict) -> str:
    return (f"{same['differ']} of {same['elements']} elements differ ({same['differ_1e-5']} by more than 1e-5), "
            f"max |diff| {same['max_abs_diff']:.3g}")


def bitsandbytes_weights(model, names, quant_type, blocksize=64):
    """{name: dequantize_4bit(quantize_4bit(W))}, bytes after/before, and (nf4) the element-wise
    comparison with fxforge's nf4 at the same group size."""
    import bitsandbytes.functional as bnbf

    from fxforge.ir.quant_formats import dequantize_weight, quantize_weight

    weights, before, after, same = {}, 0, 0, {}
    for name in names:
        w = model.get_submodule(name).weight.detach().contiguous()
        q, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
        weights[name] = bnbf.dequantize_4bit(q, state).to(w.dtype).reshape(w.shape)
        before += w.numel() * w.element_size()
        after += q.numel() * q.element_size() + state.absmax.numel() * state.absmax.element_size()
        if quant_type == "nf4":
            ours = dequantize_weight(quantize_weight(w, "nf4", group_size=blocksize))
            same = _merge(same, _compare(ours, weights[name]))
    return weights, after / before, same


def torchao_weights(model, label):
    """torchao's quantize_ on a copy of the model; {name: dequantized weight} of the layers it
    quantized, bytes after/before, the largest relative difference between torchao's own linear
    and F.linear with the dequantized weight (random input, 4 rows), and (int4) the element-wise
    comparison with fxforge's int4 with a float zero point at the same group size."""
    import torch.nn.functional as F
    from quant import config_of, torchao_quantize

    from fxforge.ir.quant_formats import dequantize_weight, quantize_weight

    made = torchao_quantize(model, label, "cpu")
    if isinstance(made, str):
        return made
    q, _, ratio = made
    group = config_of(label).group_size or 128
    weights, worst, same = {}, 0.0, {}
    for name, mod in q.named_modules():
        w = getattr(mod, "weight", None)
        if w is None or type(w.data) is torch.Tensor or not isinstance(mod, torch.nn.Linear):
            continue
        w = w.data
        if type(w).__name__ != "Int4OpaqueTensor":  # e.g. Int8Tensor
            deq = w.dequantize().float()
        else:  # Int4OpaqueTensor keeps its ints shuffled for the CPU kernel (and has no dequantize): redo its
            # quantization with the tinygemm primitives that Int4OpaqueTensor.from_hp calls, then dequantize
            from torchao.quantization.quant_primitives import (
                MappingType, _choose_qparams_affine_tinygemm, _dequantize_affine_tinygemm,
                _quantize_affine_tinygemm)

            orig = model.get_submodule(name).weight.detach()
            block = [1, group]
            scale, zero = _choose_qparams_affine_tinygemm(orig, MappingType.ASYMMETRIC, block, torch.int32, 0, 15,
                                                          1e-6, None, orig.dtype)
            ints = _quantize_affine_tinygemm(orig, block, scale, zero, torch.int32, 0, 15)
            deq = _dequantize_affine_tinygemm(ints, block, scale, zero, torch.int32, 0, 15, output_dtype=torch.float32)
            ours = dequantize_weight(quantize_weight(orig, "int4", group_size=group, zero_point="float"))
            same = _merge(same, _compare(ours, deq))
        x = torch.randn(4, deq.shape[1], generator=torch.Generator().manual_seed(0))
        ref = F.linear(x, deq)
        worst = max(worst, float((F.linear(x, w) - ref).abs().max() / ref.abs().max()))
        weights[name] = deq
    return weights, ratio, worst, same


def reference_rows(model, ids) -> tuple[list, list]:
    """Rows for the other libraries (see the module docstring) and lines to print below the table."""
    from fxforge.evaluate import perplexity as ppl_of

    names, n_linear = _linear_names(model)
    work = copy.deepcopy(model)
    base = ppl_of(work, ids)
    rows = [{"scheme": "float32, transformers eager", "ppl": base, "reference": True}]
    notes = []

    def measure_swapped(label, weights, ratio, target, **extra):
        originals = {n: work.get_submodule(n).weight for n in weights}
        for n, w in weights.items():
            work.get_submodule(n).weight = torch.nn.Parameter(w, requires_grad=False)
        try:
            ppl = ppl_of(work, ids)
        finally:
            for n, w in originals.items():
                work.get_submodule(n).weight = w
        rows.append({"scheme": label, "ppl": ppl, "delta_pct": 100 * (ppl / base - 1), "target_pct": target,
                     "bytes_ratio": ratio, "layers": len(weights), "skipped": n_linear - len(weights),
                     "reference": True, **extra})

    try:
        import bitsandbytes
    except Exception as e:  # noqa: BLE001 - any import failure means "not installed"
        notes.append(f"bitsandbytes: not installed or not importable ({type(e).__name__}: {e})")
    else:
        for qt in ("nf4", "fp4"):
            label = f"bitsandbytes {bitsandbytes.__version__} {qt} g64"
            try:
                weights, ratio, same = bitsandbytes_weights(model, names, qt)
            except Exception as e:  # noqa: BLE001
                notes.append(f"{label}: failed ({type(e).__name__}: {str(e)[:200]})")
                continue
            measure_swapped(label, weights, ratio, TARGETS.get(qt), **({"vs_fxforge_nf4": same} if same else {}))
            if same:
                notes.append(f"{label} vs fxforge nf4 (g64) weights: {_same_line(same)}")
    try:
        import torchao
    except Exception as e:  # noqa: BLE001
        notes.append(f"torchao: not installed or not importable ({type(e).__name__}: {e})")
    else:
        for label in ("int8", "int4/g128", "int4/g64", "int4/g32"):
            name = f"torchao {torchao.__version__} {label}"
            try:
                made = torchao_weights(model, label)
            except Exception as e:  # noqa: BLE001
                made = f"failed ({type(e).__name__}: {str(e)[:200]})"
            if isinstance(made, str):
                notes.append(f"{name}: not run, {made}")
                continue
            weights, ratio, worst, same = made
            extra = {"kernel_check_rel_err": worst, **({"vs_fxforge_int4_fz": same} if same else {})}
            measure_swapped(name, weights, ratio, TARGETS[label.split("/")[0]], **extra)
            line = f"{name}: torchao's linear vs the dequantized weight, max relative diff {worst:.2g}"
            if same:
                line += f"; vs fxforge {label}/fz weights: {_same_line(same)}"
            notes.append(line)
    return rows, notes


from report import finish  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", nargs="*", default=["int8", "w8a8", "int4", "int4/g64", "int4/g32", "int4/g64/fz",
                                                     "int4/g32/fz", "nf4", "nf4/g32"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--references", action="store_true",
                    help="add bitsandbytes and torchao rows (eager model) where they import")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    rows, model, ids = measure(args.schemes)
    notes = []
    if args.references:
        refs, notes = reference_rows(model, ids)
        rows += refs
    print(f"\nperplexity of SmolLM2-135M on tests/data/eval_text.txt ({rows[0]['tokens']} tokens)\n")
    print("| scheme | perplexity | change | target | weight bytes vs fp32 | layers quantized (skipped) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "delta_pct" not in r:
            print(f"| {r['scheme']} | {r['ppl']:.3f} | - | - | 1.000 | - |")
        else:
            target = "-"
            if r["target_pct"] is not None:
                ok = "met" if r["delta_pct"] <= r["target_pct"] else "MISSED"
                target = f"<= +{r['target_pct']:.0f}% ({ok})"
            print(f"| {r['scheme']} | {r['ppl']:.3f} | {r['delta_pct']:+.2f}% | {target} | "
                  f"{r['bytes_ratio']:.3f} | {r['layers']} ({r['skipped']}) |")
    if args.references:
        print("\nRows naming bitsandbytes or torchao: the eager transformers model with those layers' weights "
              "replaced by the library's dequantized ones; change against its own float32 row.")
    for line in notes:
        print(f"- {line}")
    finish(rows, args.out)


if __name__ == "__main__":
    main()
