"""How long fxforge.optimize takes, split into capture (torch.export + lowering) and the
pass pipeline, on SmolLM2-135M and on random Llama models 2x and 4x deeper, to show how
the time grows with depth. Model loading is not timed.

The first optimize() of a model on a machine times cpu_linear's candidates (cold); later
ones read the choices from the cache (warm). Each model gets its own empty cache folder
(a fresh temporary one unless --cpu-linear-cache names a root), so the first call is cold,
then `--repeat` warm calls; the table gives both, and whether every call built the same
plan. Run twice with the same --cpu-linear-cache to check that a second process builds the
same plan too (its "plan" column, a hash of the choices, must match the first run's).

--remeasure N times cpu_linear's choices N more times on SmolLM2 (cpu_linear="measure",
in a folder of its own) and counts the distinct plans: how much the measurement itself
depends on noise, which the cache then hides.

The pass time should grow with the graph, no faster: the last lines give it at 1x/2x/4x
the layers and the ratio to 1x (linear is 2x and 4x; the bar is 4.4x at 4x the layers).
--passes-only times capture and passes alone (best of --repeat), skipping optimize().

    python benchmarks/optimize_time.py [--out results.json] [--repeat 2] [--smollm2-only]
                                       [--cpu-linear-cache DIR] [--remeasure N] [--passes-only]
"""
import argparse
import hashlib
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import fxforge  # noqa: E402
from fxforge.ir.capture import capture_with_spec  # noqa: E402
from fxforge.passes import registry  # noqa: E402
from fxforge.passes.manager import run_pipeline  # noqa: E402
from fxforge.runtime.cpu_linear_cache import FOLDER_VARIABLE  # noqa: E402


def deeper_llama(base_config, layers):
    from transformers import LlamaForCausalLM

    cfg = base_config.__class__.from_dict({**base_config.to_dict(), "num_hidden_layers": layers})
    with torch.device("cpu"):
        return LlamaForCausalLM(cfg).eval()


def cpu_linear_plan(fast) -> tuple[str, str, dict]:
    """(hash of the plan, its summary, the cpu_linear step's details) of an optimized model."""
    stats = next((s for s in fast.runtime_stats if s.name == "cpu_linear"), None)
    if stats is None:
        return "none", "cpu_linear off", {}
    details = stats.details["cpu_linear"]
    text = repr((sorted(details["choices"].items()), sorted(details["column_major"])))
    summary = ", ".join(f"{k} x{n}" for k, n in sorted(stats.rules.items())) or "F.linear everywhere"
    return hashlib.sha256(text.encode()).hexdigest()[:10], summary, {**details, "seconds": stats.seconds}


def timed_optimize(model, ids):
    start = time.perf_counter()
    fast = fxforge.optimize(model, (ids,))
    return time.perf_counter() - start, cpu_linear_plan(fast)


def remeasure(model, ids, times, cache_root):
    """cpu_linear's choices for SmolLM2 measured `times` times: (distinct plans, seconds each)."""
    from fxforge.runtime.cpu_linear import plan_cpu_linears

    os.environ[FOLDER_VARIABLE] = os.path.join(cache_root, "remeasure")
    graph = fxforge.optimize(model, (ids,), cpu_linear=False).graph
    plans, seconds = {}, []
    for _ in range(times):
        _, plan, stats = plan_cpu_linears(graph, "measure")
        choices = sorted(plan.choices.items())
        key = ", ".join(f"{s[0]}x{s[1]}: {'_'.join(c)}" for s, c in choices) or "F.linear everywhere"
        plans[key] = plans.get(key, 0) + 1
        seconds.append(stats.details["cpu_linear"]["timing_seconds"])
    return plans, seconds


def capture_and_passes(model, ids) -> dict:
    """One round of capture and the default pipeline, timed apart."""
    t0 = time.perf_counter()
    graph, _ = capture_with_spec(model, (ids,))
    t1 = time.perf_counter()
    graph, _ = run_pipeline(graph, registry.pipeline({}), check=False)
    t2 = time.perf_counter()
    return {"capture_s": t1 - t0, "passes_s": t2 - t1, "nodes": len(graph.nodes)}


def time_passes(model, ids, repeat):
    """Capture and the default pipeline alone, best of `repeat` rounds (no optimize())."""
    best = None
    for _ in range(repeat):
        row = capture_and_passes(model, ids)
        best = row if best is None or row["passes_s"] < best["passes_s"] else best
    return best


def print_pass_scaling(rows):
    """Pass time at 1x/2x/4x the layers and its ratio to 1x."""
    base = rows[0]
    print("\n| layers | x | IR nodes | passes (s) | passes / 1x | nodes / 1x |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['layers'] / base['layers']:.0f}x | {r['nodes']} | {r['passes_s']:.3f} | "
              f"{r['passes_s'] / base['passes_s']:.2f}x | {r['nodes'] / base['nodes']:.2f}x |")


def time_optimize(model, ids, repeat):
    """One cold optimize() (an empty cpu_linear cache: it times and writes), then `repeat`
    rounds of capture, passes and a warm optimize() (the cache is read); the best round."""
    cold_s, (cold_plan, summary, cold) = timed_optimize(model, ids)
    best, plans = None, {cold_plan}
    for _ in range(repeat):
        row = capture_and_passes(model, ids)
        optimize_s, (plan, _, warm) = timed_optimize(model, ids)
        plans.add(plan)
        row.update(optimize_s=optimize_s, cpu_linear_s=warm.get("seconds", 0.0), warm_timed=warm.get("timed", 0))
        best = row if best is None or row["optimize_s"] < best["optimize_s"] else best
    best.update(optimize_cold_s=cold_s, cpu_linear_cold_s=cold.get("seconds", 0.0), cold_timed=cold.get("timed", 0),
                cut_short=cold.get("cut_short", 0), plan=cold_plan, plan_summary=summary, same_plan=len(plans) == 1,
                cache_file=cold.get("cache_file"))
    return best


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import finish  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeat", type=int, default=2, help="warm optimize() calls per model, after the cold one")
    ap.add_argument("--remeasure", type=int, default=0, help="time cpu_linear's choices on SmolLM2 N more times")
    ap.add_argument("--smollm2-only", action="store_true", help="skip the deeper random Llamas")
    ap.add_argument("--passes-only", action="store_true", help="time capture and passes only, not optimize()")
    ap.add_argument("--cpu-linear-cache", default=None,
                    help="root of the per-model cpu_linear cache folders (default: a fresh temporary folder)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    cache_root = args.cpu_linear_cache or tempfile.mkdtemp(prefix="fxforge-optimize-time-")
    import zoo

    model, tok = zoo.smollm2()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    rows = []
    models = [("SmolLM2-135M", None), ("Llama 2x deeper (random)", 60), ("Llama 4x deeper (random)", 120)]
    for label, layers in models[:1] if args.smollm2_only else models:
        m = model if layers is None else deeper_llama(model.config, layers)
        os.environ[FOLDER_VARIABLE] = os.path.join(cache_root, f"layers{m.config.num_hidden_layers}")
        if args.passes_only:
            r = time_passes(m, ids, args.repeat)
            r.update(model=label, layers=m.config.num_hidden_layers)
            rows.append(r)
            print(f"{label:<26} layers={r['layers']:<4} nodes={r['nodes']:<5} capture={r['capture_s']:.2f}s "
                  f"passes={r['passes_s']:.3f}s", flush=True)
            del m
            continue
        r = time_optimize(m, ids, args.repeat)
        r.update(model=label, layers=m.config.num_hidden_layers)
        rows.append(r)
        print(f"{label:<26} layers={r['layers']:<4} nodes={r['nodes']:<5} capture={r['capture_s']:.2f}s "
              f"passes={r['passes_s']:.2f}s optimize()={r['optimize_s']:.2f}s (first {r['optimize_cold_s']:.2f}s; "
              f"cpu_linear {r['cpu_linear_cold_s']:.2f}s timing {r['cold_timed']} shapes, then "
              f"{r['cpu_linear_s']:.3f}s from the cache) plan {r['plan']}: {r['plan_summary']}"
              f"{'' if r['same_plan'] else ' -- PLANS DIFFER'}", flush=True)
        if layers is not None:
            del m
    print_pass_scaling(rows)
    if args.passes_only:
        finish(rows, args.out)
        return
    base = rows[0]
    print(f"\ncpu_linear cache: {cache_root}")
    print("\n| model | layers | IR nodes | capture (s) | passes (s) | optimize() (s) | optimize() / SmolLM2 | "
          "first optimize() (s) | cpu_linear first / later (s) | same plan |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['layers']} | {r['nodes']} | {r['capture_s']:.2f} | {r['passes_s']:.2f} | "
              f"{r['optimize_s']:.2f} | {r['optimize_s'] / base['optimize_s']:.2f}x | {r['optimize_cold_s']:.2f} | "
              f"{r['cpu_linear_cold_s']:.2f} / {r['cpu_linear_s']:.3f} | "
              f"{'yes' if r['same_plan'] else 'no'} ({r['plan']}) |")
    if args.remeasure:
        plans, seconds = remeasure(model, ids, args.remeasure, cache_root)
        print(f"\ncpu_linear measured {args.remeasure} times on SmolLM2: {len(plans)} distinct plans; timing took "
              f"{min(seconds):.2f}-{max(seconds):.2f} s")
        for key, n in sorted(plans.items(), key=lambda kv: -kv[1]):
            print(f"  {n} x {key}")
        rows.append({"remeasure_plans": plans, "remeasure_seconds": seconds})
    finish(rows, args.out)


if __name__ == "__main__":
    main()
