"""How long fxforge.optimize takes, split into capture (torch.export + lowering) and the
pass pipeline, on SmolLM2-135M and on random Llama models 2x and 4x deeper, to show how
the time grows with depth. Model loading is not timed.

    python benchmarks/optimize_time.py [--out results.json] [--repeat 2]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import fxforge  # noqa: E402
from fxforge.ir.capture import capture_with_spec  # noqa: E402
from fxforge.passes import registry  # noqa: E402
from fxforge.passes.manager import run_pipeline  # noqa: E402


def deeper_llama(base_config, layers):
    from transformers import LlamaForCausalLM

    cfg = base_config.__class__.from_dict({**base_config.to_dict(), "num_hidden_layers": layers})
    with torch.device("cpu"):
        return LlamaForCausalLM(cfg).eval()


def time_optimize(model, ids, repeat):
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        graph, _ = capture_with_spec(model, (ids,))
        t1 = time.perf_counter()
        graph, _ = run_pipeline(graph, registry.pipeline({}), check=False)
        t2 = time.perf_counter()
        fxforge.optimize(model, (ids,))
        t3 = time.perf_counter()
        row = {"capture_s": t1 - t0, "passes_s": t2 - t1, "optimize_s": t3 - t2, "nodes": len(graph.nodes)}
        best = row if best is None or row["optimize_s"] < best["optimize_s"] else best
    return best


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import finish  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    import zoo

    model, tok = zoo.smollm2()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    rows = []
    for label, layers in [("SmolLM2-135M", None), ("Llama 2x deeper (random)", 60), ("Llama 4x deeper (random)", 120)]:
        m = model if layers is None else deeper_llama(model.config, layers)
        r = time_optimize(m, ids, args.repeat)
        r.update(model=label, layers=m.config.num_hidden_layers)
        rows.append(r)
        print(f"{label:<26} layers={r['layers']:<4} nodes={r['nodes']:<5} capture={r['capture_s']:.2f}s "
              f"passes={r['passes_s']:.2f}s optimize()={r['optimize_s']:.2f}s", flush=True)
        if layers is not None:
            del m
    base = rows[0]
    print("\n| model | layers | IR nodes | capture (s) | passes (s) | optimize() (s) | optimize() / SmolLM2 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['layers']} | {r['nodes']} | {r['capture_s']:.2f} | {r['passes_s']:.2f} | "
              f"{r['optimize_s']:.2f} | {r['optimize_s'] / base['optimize_s']:.2f}x |")
    finish(rows, args.out)


if __name__ == "__main__":
    main()
