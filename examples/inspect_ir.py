"""Look inside fxforge: the IR after every pass, one transformer block before and after
the default pipeline, the generated program, and a graphviz picture of one block.

Runs on a one-layer Llama with random weights (no download), so it takes seconds.

    python examples/inspect_ir.py [--out out/inspect]
"""
import argparse
import os

import torch

import fxforge


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/inspect")
    args = ap.parse_args()
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 8))

    # 1. every pass's IR, the program and the report, written to --out
    fast = fxforge.optimize(model, (ids,), dump_dir=args.out)
    print("dumped:", ", ".join(sorted(os.listdir(args.out))))

    # 2. the block before and after: the captured IR vs the optimized IR
    captured = fxforge.capture(model, (ids,))
    print(f"\ncaptured: {len(captured.nodes)} nodes; optimized: {len(fast.graph.nodes)} nodes")
    print("\noptimized IR (parameters elided from the signature):")
    lines = fast.ir.splitlines()
    print("graph(%input_ids: i64[B, T], ...) {")
    print("\n".join(lines[1:]))

    # 3. the IR is text that parses back to the same graph
    again = fxforge.parse(fast.ir, params=fast.graph.params)
    assert fxforge.ir.structurally_equal(again, fast.graph)

    # 4. a graphviz picture (render with: dot -Tsvg block.dot -o block.svg)
    dot_path = os.path.join(args.out, "block.dot")
    with open(dot_path, "w") as f:
        f.write(fast.graph.to_dot())
    dag = fast.graph.to_networkx()
    print(f"\nwrote {dot_path}: {dag.number_of_nodes()} nodes, {dag.number_of_edges()} edges")

    # 5. the straight-line program the runtime executes
    print("\nfirst lines of the program:")
    print("\n".join(fast.code.splitlines()[:8]))
    with torch.no_grad():
        err = (fast(ids).logits - model(ids).logits).abs().max().item()
    print(f"\nmax |fxforge - eager| = {err:.2e}")
    assert err < 1e-4
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
