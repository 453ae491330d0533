"""Speculative decoding against plain greedy decoding, side by side in one run: tokens/s
and acceptance rate of fast.generate(..., draft=...) for each kind of draft, on SmolLM2
(or a random model of its shapes) on this machine.

Drafts: "self", `fxforge.runtime.speculative.self_draft(model, ex)` (the default: the int4
draft a user gets, the same as "int4/g32/fz/bf16/head"); the same model made cheaper by fxforge
(self-speculation, no second model), named by benchmarks/quant.py's scheme labels: "int4" (float32 products), "int4/bf16" (bfloat16
products: PyTorch's vectorized int4 CPU kernel), "int4/bf16/head" (the lm_head quantized
too), "int4/g32/fz/bf16/head" (groups of 32, float zero points: the draft most often right
among the int4 ones), "int8/bf16", ...; and prompt lookup ("ngram", no model). A draft's numerics never
change greedy output, so a draft may use approximations a served model would not. Greedy output is identical to plain
greedy (checked here on every run), so the only question is speed: each round costs k
draft steps plus one model step over k + 1 tokens, and pays off when the draft is right
often and much cheaper than the model.

Timing: rounds interleaved (plain, each draft, plain, ...) and the median per contender,
so that drift of the shared machine is not credited to one side.

--packed-mb N adds the same drafts against a second copy of the model whose verification
steps (2-8 rows) may use up to N MiB of oneDNN-packed weight copies (one per weight)
(`TorchBackend("cpu", few_rows_packed_mb=N)`, runtime/cpu_linear.py), side by side.

    python benchmarks/speculative.py [--model smollm2|smollm2-random] [--tokens 64] [--k 5]
                                     [--drafts self ngram int4/bf16 int8] [--repeat 3] [--packed-mb 512] [--out f.json]
"""
import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import fxforge  # noqa: E402
from decode import load  # noqa: E402
from quant import config_of  # noqa: E402
from fxforge.runtime.speculative import SpeculativeStats, self_draft  # noqa: E402
from report import finish  # noqa: E402

PROMPT = ("Here is a short story about a robot who learns to paint. The robot lived in a small town "
          "by the sea, and every morning it watched the fishermen")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "smollm2-random"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--k", type=int, nargs="+", default=[5], help="draft tokens per round (several: one row each; "
                    "5 was the best for the self draft on SmolLM2, docs/benchmarks.md)")
    ap.add_argument("--stat", default="median", choices=["median", "min"],
                    help="per contender over the rounds: median, or min (the least disturbed run: on a "
                         "machine loaded by other processes, closer to what each costs alone)")
    ap.add_argument("--drafts", nargs="+", default=["self", "ngram"],
                    help="self (self_draft: int4/g32/fz/bf16/head), ngram, or quant.py scheme labels")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--packed-mb", type=float, default=0,
                    help="also run each draft against a model with this many MiB of packed copies for few rows")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device("cpu")
    if args.model == "smollm2":
        import zoo

        model, tok = zoo.smollm2()
        ids = tok(PROMPT, return_tensors="pt").input_ids
    else:
        model, ids = load(args.model, device, torch.float32)
    fast = fxforge.optimize(model, (ids,), kv_cache=True)
    targets = {"": fast}
    if args.packed_mb:
        from fxforge.runtime.backends.torch_backend import TorchBackend

        targets[", packed target"] = fxforge.optimize(model, (ids,), kv_cache=True,
                                                      backend=TorchBackend(device, few_rows_packed_mb=args.packed_mb))
        print(next(s for s in targets[", packed target"].runtime_stats if s.name == "cpu_linear").notes)
    drafts = {}
    for name in args.drafts:
        if name == "ngram":
            drafts[name] = "ngram"
        elif name == "self":
            drafts[name] = self_draft(model, (ids,))
        else:
            drafts[name] = fxforge.optimize(model, (ids,), kv_cache=True, quantize=config_of(name))

    plain = fast.generate(ids, args.tokens, eos_token_id=None)
    contenders = {"plain greedy": lambda: fast.generate(ids, args.tokens, eos_token_id=None)}
    stats = {}
    for name, draft in drafts.items():
        for k in args.k:
            for suffix, target in targets.items():
                label = f"draft {name}, k={k}{suffix}"

                def run(draft=draft, name=name, k=k, target=target, label=label):
                    st = SpeculativeStats()
                    out = target.generate(ids, args.tokens, eos_token_id=None, draft=draft, num_draft_tokens=k,
                                          draft_stats=st)
                    assert torch.equal(out, plain), f"{label}: tokens differ from plain greedy"
                    stats[label] = st
                contenders[label] = run
    # the drafts' own decode speed: what a round's k draft steps cost
    for name, draft in drafts.items():
        if name != "ngram":
            contenders[f"({name} model alone)"] = lambda d=draft: d.generate(ids, args.tokens, eos_token_id=None)
    for fn in contenders.values():  # warm up
        fn()
    seconds = {name: [] for name in contenders}
    for _ in range(args.repeat):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    stat = statistics.median if args.stat == "median" else min
    base = args.tokens / stat(seconds["plain greedy"])
    rows = []
    print(f"\n{args.model}, {args.tokens} new tokens, prompt {ids.shape[1]} tokens, {torch.get_num_threads()} threads, "
          f"{args.stat} of {args.repeat} interleaved rounds\n")
    print("| contender | tokens/s | vs plain greedy | acceptance | tokens per model step |")
    print("|---|---|---|---|---|")
    for name, s in seconds.items():
        tps = args.tokens / stat(s)
        st = stats.get(name)
        acc = f"{st.acceptance_rate:.2f}" if st else "-"
        per_step = f"{args.tokens / st.rounds:.2f}" if st else "-"
        print(f"| {name} | {tps:.1f} | {tps / base:.2f}x | {acc} | {per_step} |")
        rows.append({"contender": name, "tokens_per_s": tps, "ratio": tps / base, "seconds": s,
                     "acceptance": st.acceptance_rate if st else None, "rounds": st.rounds if st else None})
    finish(rows, args.out)


if __name__ == "__main__":
    main()
