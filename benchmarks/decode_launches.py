"""Launches, host syncs and host time of one decode step (fxforge.runtime.launch_count),
for SmolLM2-135M's shapes with random weights, float and quantized. On a GPU it runs the
`triton` backend; without one the same kernels through Triton's interpreter (`interpret`):
the counts are the same, the host time is not a GPU's.

    python benchmarks/decode_launches.py [--quantize none,w8a8] [--layers 30] [--steps 2]
"""
import argparse
import os
import sys

if not os.environ.get("TRITON_INTERPRET"):
    import torch as _torch
    os.environ["TRITON_INTERPRET"] = "0" if _torch.cuda.is_available() else "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import fxforge  # noqa: E402
from fxforge.runtime.launch_count import decode_profile  # noqa: E402
from report import finish  # noqa: E402


def smollm2_random(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantize", default="none,w8a8")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    cuda = torch.cuda.is_available()
    backend = "triton" if cuda else "interpret"
    model = smollm2_random(args.layers).to("cuda" if cuda else "cpu")
    ids = torch.randint(3, 49152, (1, 6), device=model.device)
    rows = []
    for q in args.quantize.split(","):
        opts = {} if q == "none" else {"quantize": q}
        fast = fxforge.optimize(model, (ids,), kv_cache=True, backend=backend, **opts)
        p = decode_profile(fast, steps=args.steps)
        print(f"{q:5s} {backend}: {p}")
        rows.append({"quantize": q, "backend": backend, "layers": args.layers, "launches": p.launches,
                     "triton": p.triton, "torch": p.torch, "syncs": p.syncs, "host_us": p.host_us,
                     "top": p.top[:12]})
    finish(rows, args.out)


if __name__ == "__main__":
    main()
